"""train --corrections: a person's answers (the review page's corrections.parquet) train the pages they answered as
the person said, over the stored orientation (and the default model's check); no_up pages train no orientation;
tables that cannot be used stop the job before anything is built."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np
import pytest

from pipelines import schema
from pipelines.corrections import CorrectionsError
from tests.score_fixtures import write_corrections
from tests.test_trainer_data import encode_png, turn_clockwise_np, upright_image

TINY = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "16", "--threads", "2",
        "--early-stopping-patience", "0", "--tasks", "orientation", "--export", "false"]


def _uri(split: str, i: int) -> str:
    return f"file:///archive/{split}/{i:04d}.png"


def _sha(split: str, i: int) -> str:
    return f"{split}{i:04d}".encode().hex().ljust(64, "0")


def write_scanned_archive(directory: str, counts: Dict[str, int], turned: Dict[str, List[int]]) -> str:
    """What `ingest --assume-upright` makes of an archive with upside-down scans: every record stored as upright
    (orientation 0), the records `turned[split]` holding their picture turned 180 degrees."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for split, n in counts.items():
        with tf.io.TFRecordWriter(os.path.join(directory, f"{split}-00000-of-00001.tfrecord")) as writer:
            for i in range(n):
                pixels = upright_image(rng, 32, i % 2)
                if i in turned.get(split, ()):
                    pixels = turn_clockwise_np(pixels, 180)
                record = schema.ImageRecord(
                    encoded=encode_png(pixels), format="png", height=32, width=32, source_uri=_uri(split, i), page=0,
                    sha256=_sha(split, i), original_height=32, original_width=32, exif_orientation=0, label_index=-1,
                    label_name="", orientation=0, split=split)
                writer.write(schema.make_example(record).SerializeToString())
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"classes": [], "source": "none"}, f)
    return directory


def _answers(path: str, answered: Dict[str, Dict[int, str]]) -> str:
    """A corrections table: answered[split][i] is the person's answer to that record, shown as the model (upright)."""
    return write_corrections(path, [{"uri": _uri(split, i), "sha256": _sha(split, i), "label": label,
                                     "model_orientation": 0}
                                    for split, labels in answered.items() for i, label in labels.items()])


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """48 train records, half of them upside-down scans stored as upright; 16 clean val records."""
    turned = {"train": list(range(0, 48, 2))}
    data = write_scanned_archive(str(tmp_path_factory.mktemp("scans")), {"train": 48, "val": 16}, turned)
    answers = {"train": {i: "turn_180" for i in turned["train"]}}
    answers["train"][1] = "no_up"  # an upright one the person says has no up
    return data, _answers(str(tmp_path_factory.mktemp("run") / "corrections.parquet"), answers)


def test_answered_records_are_trained_as_the_person_said(scanned):
    from trainer import config, review
    from trainer import input as train_input

    data, answers = scanned
    cfg = config.config_from_args(["--data", data, "--job-dir", "unused", *TINY, "--corrections", answers])
    matched = review.match_answers(cfg.corrections, cfg.data)
    assert {k: matched.counts[k] for k in ("answers", "records_answered", "no_orientation")} == {
        "answers": 25, "records_answered": 24, "no_orientation": 1}
    layouts = {s: train_input.record_layout(data, s, cfg) for s in ("train", "val")}
    labels = train_input.Corrections(review.with_answers(review.stored_as_is(layouts), matched).table())
    seen = {}
    for example in train_input.example_dataset(data, "train", cfg, training=False, corrections=labels):
        key = (example["source_uri"].numpy().decode(), int(example["turn"]))
        seen[key] = (int(example["orientation_label"]) * 90, float(example["orientation_weight"]))
    # An upside-down scan turned a further 90 is stored 270 from upright: trained so, at full weight.
    assert seen[(_uri("train", 0), 90)] == (270, 1.0) and seen[(_uri("train", 0), 0)] == (180, 1.0)
    assert seen[(_uri("train", 3), 90)] == (90, 1.0)  # not answered: as stored
    assert all(weight == 0.0 for (uri, _), (_, weight) in seen.items() if uri == _uri("train", 1))  # no up
    assert len(seen) == 48 * 4


def _val_accuracy(job: str) -> float:
    with open(os.path.join(job, "eval", "val_metrics.json")) as f:
        return json.load(f)["orientation"]["accuracy"]


def test_a_tiny_run_learns_from_the_answers(scanned, tmp_path, capsys):
    from trainer import task

    data, answers = scanned
    common = ["--data", data, *TINY, "--epochs", "8", "--cache-features", "--calibrate", "false"]
    assert task.main(common + ["--job-dir", str(tmp_path / "answered"), "--corrections", answers]) == 0
    out = capsys.readouterr().out
    assert "[answers] 25 answers in" in out and "24 records trained as the person answered (train 24)" in out
    with open(tmp_path / "answered" / "corrections_used.json") as f:
        assert json.load(f)["no_orientation"] == 1
    assert task.main(common + ["--job-dir", str(tmp_path / "stored")]) == 0
    # Half the train records upside down and trained as upright teach 0 and 180 alike; answered, they are right.
    answered, stored = _val_accuracy(str(tmp_path / "answered")), _val_accuracy(str(tmp_path / "stored"))
    assert answered >= 0.9 and answered > stored + 0.1, (answered, stored)


@pytest.mark.slow
def test_the_val_records_a_person_answered_do_not_calibrate_the_head(tmp_path, capsys):
    """The temperature the tuned head is exported with is fitted on the val records no one answered (the answers are
    the hardest pages, not a sample); run_summary.json and corrections_used.json say which records and the T."""
    from trainer import task

    data = write_scanned_archive(str(tmp_path / "scans"), {"train": 16, "val": 40}, {"val": [0, 2, 4, 6, 8]})
    answers = _answers(str(tmp_path / "corrections.parquet"),
                       {"val": {i: "turn_180" if i % 2 == 0 else "accept" for i in range(10)}})
    job = str(tmp_path / "job")
    assert task.main(["--data", data, "--job-dir", job, *TINY, "--epochs", "1", "--learning-rate", "1e-4",
                      "--cache-features", "--evaluate", "false", "--corrections", answers]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(job, "run_summary.json")) as f:
        calibrated = json.load(f)["orientation_calibration"]
    with open(os.path.join(job, "corrections_used.json")) as f:
        used = json.load(f)
    assert used["per_split"] == {"val": 10} and used["calibration"] == calibrated
    assert (calibrated["fit"]["records"], calibrated["fit"]["examples"], calibrated["fit"]["answered_left_out"]) == (
        30, 120, 10), calibrated
    if calibrated["temperature"] is not None:
        assert calibrated["source"] == "fitted on the val records no one answered"
        assert "fitted on 120 val examples" in out and "10 val records a person answered left out of the fit" in out
    else:  # a head right on every unanswered val turn: no fit, said
        assert calibrated["why"] and calibrated["why"] in out


def test_answers_that_do_not_fit_the_shards_stop_the_job_before_training(scanned, tmp_path, capsys):
    from trainer import review, task

    data, _ = scanned
    other = _answers(str(tmp_path / "other.parquet"), {"train": {1: "accept"}})
    # Same URI, other content: the answer is of a picture these shards do not hold.
    write_corrections(other, [{"uri": _uri("train", 1), "sha256": "f" * 64, "label": "accept", "model_orientation": 0}])
    job = str(tmp_path / "job")
    assert task.main(["--data", data, "--job-dir", job, *TINY, "--epochs", "1", "--corrections", other]) == 2
    err = capsys.readouterr().err
    assert "1 of 1 corrections" in err and "another run's corrections?" in err and _uri("train", 1) in err
    assert not os.path.exists(os.path.join(job, "history_heads.csv"))

    thin = str(tmp_path / "thin.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": ["a"], "sha256": ["b"]}), thin)
    with pytest.raises(CorrectionsError, match="no page, orientation, label, answered_at column"):
        review.match_answers(thin, data)
    assert task.main(["--data", data, "--job-dir", job, *TINY, "--tasks", "classes", "--corrections", thin]) == 2
    assert "--corrections trains the orientation head" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tuned_model_is_exported_and_published(scanned, tmp_path, capsys):
    """The loop's last step: the head trained on the answers leaves the job as a version that publish validates in
    the local server and copies where the servers look."""
    from archive_vision import cli
    from trainer import task

    data, answers = scanned
    job = str(tmp_path / "job")
    assert task.main(["--data", data, "--job-dir", job, *TINY[:-2], "--epochs", "2", "--cache-features",
                      "--corrections", answers]) == 0
    with open(os.path.join(job, "run_summary.json")) as f:
        version_dir = json.load(f)["export_dir"]
    assert version_dir and os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    capsys.readouterr()
    base = tmp_path / "served" / "archive_vision"
    assert cli.main(["publish", "--version-dir", version_dir, "--to", str(base), "-q"]) == 0, capsys.readouterr().err
    assert (base / os.path.basename(version_dir) / "saved_model.pb").is_file()
