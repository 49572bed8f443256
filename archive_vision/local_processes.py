"""Helpers for the processes archive-vision starts on one machine (local server, job service, workers):
free 127.0.0.1 ports, and stopping a child process politely, then firmly."""
from __future__ import annotations

import socket
import subprocess
from typing import List


def free_ports(count: int) -> List[int]:
    """`count` different ports nothing listens on at 127.0.0.1 (held together while the kernel picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One port nothing listens on right now at 127.0.0.1."""
    return free_ports(1)[0]


def stop_process(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not left within `grace_s` seconds (no-op when it already exited)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
