"""Where score's workers find the built-in model (the runner decides whether it is staged), and what train's --init
takes; no TensorFlow, no emulator (tests/test_models_anywhere.py runs them against gs:// and a worker pool)."""
from __future__ import annotations

import os

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.score import models
from serving import model_files


@pytest.mark.parametrize("args, local", [
    ([], True), (["--runner", "DirectRunner"], True), (["--runner=direct"], True), (["--runner", "PrismRunner"], True),
    (["--runner", "PortableRunner", "--environment_type", "LOOPBACK"], True),
    (["--runner", "PortableRunner", "--environment_type", "EXTERNAL"], False),
    (["--runner", "FlinkRunner"], False), (["--runner", "DataflowRunner"], False),
    (["--runner", "apache_beam.runners.dataflow.dataflow_runner.DataflowRunner"], False)])
def test_which_runners_workers_read_the_launchers_files(args, local):
    assert models.workers_see_this_machine(PipelineOptions(args)) is local


def fake_export(root) -> str:
    """What serving.builtin leaves in a cache: <digest>-v<format>/<model>/1 with a SavedModel's files."""
    version = root / "default_orientation" / "abc123-v6" / "archive_vision_default_orientation" / "1"
    (version / "variables").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"graph")
    (version / "variables" / "variables.index").write_bytes(b"index")
    return str(version)


def test_the_built_in_model_is_staged_only_for_workers_elsewhere(tmp_path, monkeypatch):
    from serving import builtin

    local = fake_export(tmp_path / "cache")
    monkeypatch.setattr(builtin, "builtin_model_dir", lambda: local)
    assert models.builtin_model_dir(PipelineOptions([]), str(tmp_path / "out")) == local

    flink = ["--runner", "PortableRunner", "--environment_type", "EXTERNAL"]
    temp = tmp_path / "shared" / "temp"
    staged = models.builtin_model_dir(PipelineOptions(flink + ["--temp_location", str(temp)]), str(tmp_path / "out"))
    assert staged == str(temp / models.STAGED_BUILTIN / "abc123-v6" / "archive_vision_default_orientation" / "1")
    assert (temp / models.STAGED_BUILTIN / "abc123-v6" / "archive_vision_default_orientation" / "1" / "variables"
            / "variables.index").read_bytes() == b"index"
    # Staged once per weights and export format: a later run reuses it (saved_model.pb, written last, is there).
    monkeypatch.setattr(model_files, "upload_tree", lambda *a, **k: pytest.fail("staged again"))
    assert models.builtin_model_dir(PipelineOptions(flink + ["--temp_location", str(temp)]), "") == staged
    # No --temp_location: under the job's output, which the workers write and so can reach.
    out = tmp_path / "out"
    monkeypatch.undo()
    monkeypatch.setattr(builtin, "builtin_model_dir", lambda: local)
    assert models.builtin_model_dir(PipelineOptions(flink), str(out)).startswith(
        str(out / models.STAGED_BUILTIN / "abc123-v6"))


def test_local_paths_are_used_as_they_are(tmp_path):
    version = fake_export(tmp_path)
    assert model_files.local_copy(version) == version
    assert model_files.local_file(os.path.join(version, "saved_model.pb")).endswith("saved_model.pb")
    with pytest.raises(FileNotFoundError, match="no SavedModel version there"):
        model_files.resolve_version_dir(str(tmp_path / "nothing"))


@pytest.mark.parametrize("init, message", [
    ("defualt", "--init is none, default, or a head weights file"),
    ("missing/head.npz", "--init missing/head.npz: not a head weights file in the shipped format")])
def test_train_init_says_what_it_takes(tmp_path, init, message):
    from trainer import config

    with pytest.raises(ValueError, match=message):
        config.config_from_args(["--data", str(tmp_path), "--job-dir", str(tmp_path / "job"), "--tasks",
                                 "orientation", "--init", init])


def test_train_init_takes_a_head_file(tmp_path):
    import shutil

    from trainer import config
    from trainer.default_model import HEAD_WEIGHTS, head_metadata, init_weights

    head = str(tmp_path / "retrained.npz")
    shutil.copy(HEAD_WEIGHTS, head)
    cfg = config.config_from_args(["--data", str(tmp_path), "--job-dir", str(tmp_path / "job"), "--tasks",
                                   "orientation", "--init", head, "--orientation-grid", "5"])
    assert cfg.init == head and cfg.checks_orientation_labels  # the head reads the records' turns, as default's does
    assert cfg.orientation_grid == head_metadata(head)["grid"] and init_weights(cfg.init) == head
    assert init_weights("default") == HEAD_WEIGHTS


def test_processes_finding_the_built_in_model_missing_export_it_once(tmp_path, monkeypatch):
    """Two scores (or Beam workers, or parallel test runs) starting on a fresh cache: one exports, the other waits
    on the cache's lock and takes that export instead of writing a second one over it."""
    import threading
    import time

    from serving import builtin

    calls = []

    def slow_export(base, name, version):
        calls.append(base)
        time.sleep(0.5)  # long enough for the other caller to find the export missing and reach the lock
        version_dir = os.path.join(base, name, str(version))
        os.makedirs(version_dir)
        with open(os.path.join(version_dir, "saved_model.pb"), "wb") as f:
            f.write(b"graph")
        return version_dir

    monkeypatch.setattr(builtin, "export_default_model", slow_export)
    found = []
    callers = [threading.Thread(target=lambda: found.append(builtin.builtin_model_dir(str(tmp_path))))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    assert len(calls) == 1 and len(found) == 2 and found[0] == found[1]
    assert os.path.isfile(os.path.join(found[0], "saved_model.pb"))
