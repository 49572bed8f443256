"""Multi-worker training as the cluster runs it: two `python -m trainer.task` processes on 127.0.0.1, each with
the TF_CONFIG archive_vision/cluster.py builds for its task index, train one model together; only the chief
exports it."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from archive_vision import cluster
from tests.test_trainer_data import write_archive
from archive_vision.local_processes import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
TINY = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
        "--threads", "1", "--early-stopping-patience", "0"]



def test_two_workers_with_built_tf_config_train_one_model_and_only_the_chief_exports(tmp_path):
    data = write_archive(str(tmp_path / "data"), {"train": 32, "val": 8, "test": 8}, stored_turns=(0, 90, 180, 270))
    job_dir = str(tmp_path / "job")
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    for index in range(2):
        tf_config = cluster.build_tf_config(addresses, index)
        cluster.validate_tf_config(tf_config)
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2",
               "CUDA_VISIBLE_DEVICES": ""}
        log = open(tmp_path / f"worker-{index}.log", "wb")
        workers.append((subprocess.Popen([sys.executable, "-m", "trainer.task", "--data", data, "--job-dir", job_dir,
                                          *TINY], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [process.wait(timeout=420) for process, _ in workers]
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            log.close()
    logs = [(tmp_path / f"worker-{i}.log").read_text(errors="replace") for i in range(2)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)

    # One model: exactly one SavedModel in the whole job dir, in the chief's export/.
    saved = glob.glob(os.path.join(job_dir, "**", "saved_model.pb"), recursive=True)
    assert len(saved) == 1
    assert saved[0].startswith(os.path.join(job_dir, "export", "archive_vision") + os.sep)
    with open(os.path.join(job_dir, "training_config.json")) as f:
        config = json.load(f)
    # tf.distribute.MultiWorkerMirroredStrategy's concrete class is CollectiveAllReduceStrategy
    assert config["strategy_class"] in ("MultiWorkerMirroredStrategy", "CollectiveAllReduceStrategy")
    assert config["num_workers"] == 2 and config["replicas"] == 2
    with open(os.path.join(job_dir, "run_summary.json")) as f:
        summary = json.load(f)
    assert summary["is_chief"] is True and summary["export_dir"] == os.path.dirname(saved[0])
    # Worker 1 trained alongside (its own history, in its private dir) and left export to the chief.
    worker_dir = os.path.join(job_dir, "workers", "worker-1")
    assert os.path.exists(os.path.join(worker_dir, "history_heads.csv"))
    assert not os.path.exists(os.path.join(worker_dir, "export"))
    assert "evaluation and export are left to the chief" in logs[1]
