"""Helpers for the processes archive-vision starts on one machine (local server, job service, workers):
how many cores they may use, free 127.0.0.1 ports, and stopping a child process politely, then firmly."""
from __future__ import annotations

import math
import os
import socket
import subprocess
from typing import List, Optional

CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def cgroup_cpu_limit(cpu_max: str = CGROUP_V2_CPU_MAX, v1_quota: str = CGROUP_V1_QUOTA,
                     v1_period: str = CGROUP_V1_PERIOD) -> Optional[float]:
    """CPUs' worth of time the container's cgroup allows (quota / period, e.g. 1.5), or None without a limit."""
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(v1_quota) as f, open(v1_period) as g:
            quota_us, period_us = int(f.read()), int(g.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(cpu_limit: Optional[float] = None) -> int:
    """Cores this process may really run on: its CPU affinity (taskset, a batch scheduler's cpuset), capped by the
    container's CPU quota (a Kubernetes `limits.cpu`, rounded up). `os.cpu_count()`, which Beam's
    --direct_num_workers=0 uses, counts the host's cores instead: on a 64-core node a pod limited to 2 CPUs
    would start 64 workers, each loading TensorFlow and the model.

    cpu_limit: the quota to apply (default: read from the cgroup files, cgroup_cpu_limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit() if cpu_limit is None else cpu_limit
    if limit:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


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
