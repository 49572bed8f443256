"""Beam's portable path, the way Flink/Spark clusters run the jobs: a job service and an external SDK worker
pool as separate processes on 127.0.0.1, the ingest job submitted through infra/flink/launch.sh with
`--runner PortableRunner`, and the same outputs as the DirectRunner."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.image_factory import write_sample_archive
from archive_vision.local_processes import free_ports, stop_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow



def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def venv_env(**extra: str) -> dict:
    """This interpreter's bin dir first on PATH: the worker pool starts SDK workers as plain `python`."""
    return {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}", **extra}


@contextlib.contextmanager
def started(args: list, port: int, log_path: str, env: dict = None):
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=env or venv_env())
    try:
        wait_for_port(port, process)
        yield process
    finally:
        stop_process(process)


def outputs(out: str) -> dict:
    """Everything a user reads from an ingest run, minus timings and paths that name the run."""
    manifest = sorted(pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist(),
                      key=lambda r: (r["source_uri"], r["page"], r["augment_index"]))
    errors = sorted((r["uri"], r["stage"], r["error_type"]) for r in
                    pq.read_table(os.path.join(out, "errors.parquet")).to_pylist())
    shards = {}
    for name in sorted(os.listdir(out)):
        if ".tfrecord" in name:
            with open(os.path.join(out, name), "rb") as f:
                shards[name] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out, "labels.json")) as f:
        labels = json.load(f)
    with open(os.path.join(out, "run.json")) as f:
        counts = json.load(f)["counts"]
    return {"manifest": manifest, "errors": errors, "shards": shards, "labels": labels, "counts": counts}


def test_ingest_through_job_service_and_external_worker_pool_matches_the_direct_runner(tmp_path):
    from pipelines import ingest

    archive = write_sample_archive(str(tmp_path / "archive"))
    # The sample's bad files are a third of it, on purpose: the failed-input limit is off so both runs exit 0.
    job_flags = ["--input", str(tmp_path / "archive"), "--size", "48", "--num-shards", "2",
                 "--max-failed-fraction", "1"]

    direct_out = str(tmp_path / "direct")
    ingest.run([*job_flags, "--output", direct_out, "--direct_running_mode=in_memory"])

    job_port, pool_port = free_ports(2)
    portable_out = str(tmp_path / "portable")
    env = venv_env(JOB_ENDPOINT=f"localhost:{job_port}", ENVIRONMENT_TYPE="EXTERNAL",
                   ENVIRONMENT_CONFIG=f"localhost:{pool_port}", PARALLELISM="1")
    with started(["-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)],
                 pool_port, str(tmp_path / "worker_pool.log")) as pool, \
            started(["-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port),
                     "--staging_dir", str(tmp_path / "staging")], job_port, str(tmp_path / "job_service.log")):
        run = subprocess.run(["bash", os.path.join(REPO, "infra", "flink", "launch.sh"), "ingest", *job_flags,
                              "--output", portable_out], env=env, capture_output=True, text=True, timeout=240,
                             cwd=str(tmp_path))
        assert pool.poll() is None, "the worker pool died during the job"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "reconciled" in run.stdout

    direct, portable = outputs(direct_out), outputs(portable_out)
    assert portable["counts"]["records"] == len(archive["good"]) and portable["counts"]["reconciled"]
    assert portable["errors"] == direct["errors"] and len(portable["errors"]) == len(archive["bad"])
    assert portable["manifest"] == direct["manifest"]
    assert portable["shards"] == direct["shards"] and len(portable["shards"]) >= 2
    assert portable["labels"] == direct["labels"]
    assert portable["counts"] == direct["counts"]
    # the DoFns ran in SDK workers the pool started, not in the launcher or the job service
    with open(tmp_path / "worker_pool.log", errors="replace") as f:
        assert "Starting worker with command" in f.read()
