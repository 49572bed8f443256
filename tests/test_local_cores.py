"""How many Beam workers a local job starts: one per core the job may use, not one per core the host has."""
import os
import shutil
import subprocess
import sys

import pytest

from archive_vision.local_processes import cgroup_cpu_limit, usable_cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("cpu_max, expected", [("200000 100000\n", 2.0), ("150000 100000\n", 1.5),
                                               ("max 100000\n", None)])
def test_a_cgroup_v2_quota_reads_as_cpus(tmp_path, cpu_max, expected):
    path = _write(tmp_path / "cpu.max", cpu_max)
    assert cgroup_cpu_limit(cpu_max=path, v1_quota="/nonexistent", v1_period="/nonexistent") == expected


@pytest.mark.parametrize("quota, expected", [("50000\n", 0.5), ("-1\n", None)])
def test_a_cgroup_v1_quota_reads_as_cpus(tmp_path, quota, expected):
    q, p = _write(tmp_path / "quota", quota), _write(tmp_path / "period", "100000\n")
    assert cgroup_cpu_limit(cpu_max="/nonexistent", v1_quota=q, v1_period=p) == expected


def test_no_cgroup_files_means_no_limit():
    assert cgroup_cpu_limit("/nonexistent/a", "/nonexistent/b", "/nonexistent/c") is None


def test_a_container_quota_caps_the_cores_and_rounds_up():
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(cpu_limit=0.5) == 1
    assert usable_cores(cpu_limit=1.5) == min(affinity, 2)
    assert usable_cores(cpu_limit=1000.0) == affinity


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_job_pinned_to_one_core_gets_one_direct_runner_worker():
    # Beam's own default (--direct_num_workers=0) would start os.cpu_count() workers here, each loading the model
    # and contending for the one core (measured: 350 pages scored at 4.85 pages/s with 2 workers, 7.16 with 1).
    code = ("from pipelines.ingest import default_pipeline_options\n"
            "print(default_pipeline_options([]).get_all_options()['direct_num_workers'])\n")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert pinned.returncode == 0, pinned.stderr[-2000:]
    assert pinned.stdout.split()[-1] == "1"
    free = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert free.stdout.split()[-1] == str(usable_cores())


def test_an_explicit_worker_count_is_kept():
    from pipelines.ingest import default_pipeline_options

    options = default_pipeline_options(["--direct_num_workers=3"]).get_all_options()
    assert options["direct_num_workers"] == 3
    assert options["direct_running_mode"] == "multi_processing"
