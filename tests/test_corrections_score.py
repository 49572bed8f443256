"""score --corrections: a person's answers (the review page's corrections.parquet) decide the pages they answered,
--write-corrected turns those by the person's turn (never a no_up / not_image page), and tables that cannot be
used are refused before anything is scored."""
from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

from pipelines import corrections, score
from tests import score_fixtures as sf
from tests.image_factory import make_asymmetric_image
from tests.test_score_pipeline import red_corner_export, results_by_name  # noqa: F401 - the module's fixture
from tests.test_serving_export import limit_tf_threads

limit_tf_threads()


def test_answers_decide_their_pages_and_corrected_copies_take_the_persons_turn(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    paths = sf.write_turned_archive(archive, {"a": 90, "b": 0, "c": 180, "d": 270})
    later = datetime.datetime(2026, 2, 1, tzinfo=datetime.timezone.utc)
    answers = sf.write_corrections(str(tmp_path / "corrections.parquet"), [
        # b is upright and the model says so; the person says it needs a quarter turn left (wrong, but theirs).
        {"uri": paths["b"], "label": "turn_left", "model_orientation": 0},
        {"uri": paths["c"], "label": "no_up", "model_orientation": 180},
        # Two answers for a: the later one stands.
        {"uri": paths["a"], "label": "accept", "model_orientation": 90, "answered_at": later},
        {"uri": paths["a"], "label": "turn_180", "model_orientation": 90},
        # A file of the archive changed since it was answered: its answer matches no page.
        {"uri": os.path.join(archive, "gone.png"), "sha256": "0" * 64, "label": "accept", "model_orientation": 0},
    ])
    output, fixed = str(tmp_path / "out"), str(tmp_path / "fixed")

    summary = score.run(["--input", archive, "--output", output, "--model", red_corner_export, "--no-report",
                         "--corrections", answers, "--write-corrected", fixed], test_pipeline=TestPipeline())

    rows = results_by_name(output)
    assert {n: (r["decision"], r["corrected_orientation"]) for n, r in rows.items()} == {
        "a.png": ("corrected", 90), "b.png": ("corrected", 90), "c.png": ("corrected", -1),
        "d.png": ("auto_rotate", None)}
    # The model's own answer stays in its columns (the report measures the model), its decision in the reason.
    assert rows["c.png"]["orientation_degrees"] == 180
    assert "no_up" in rows["c.png"]["review_reason"] and "auto_rotate" in rows["c.png"]["review_reason"]
    # b's copy is turned by the person's 90, not the model's 0; c (no up) is never turned; d by the model's.
    stored_b = Image.open(paths["b"]).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(rows["b.png"]["corrected_uri"]).convert("RGB")),
                          np.asarray(score.make_upright(stored_b, 90)))
    assert rows["c.png"]["corrected_uri"] == "" and not os.path.exists(os.path.join(fixed, "c.png"))
    for name in ("a.png", "d.png"):
        assert np.array_equal(np.asarray(Image.open(rows[name]["corrected_uri"]).convert("RGB")),
                              make_asymmetric_image())
    record = summary["counts"]["per_decision"], summary["corrections"]
    assert record[0] == {"corrected": 3, "auto_rotate": 1}
    assert {k: record[1][k] for k in ("answers", "pages_corrected", "unmatched", "outside_input")} == {
        "answers": 4, "pages_corrected": 3, "unmatched": 1, "outside_input": 0}
    assert record[1]["unmatched_named"] == [f"{os.path.join(archive, 'gone.png')} (page 0)"]
    assert summary["counts"]["reconciled"] and summary["counts"]["corrected_written"] == 3
    with open(os.path.join(output, "run.json")) as f:
        assert json.load(f)["corrections"]["pages_corrected"] == 3


def test_a_corrected_file_is_known_and_a_reused_page_answered_since_takes_the_answer(tmp_path, red_corner_export):
    """Night 1 scores; a person answers a; night 2 (--skip-known, --corrections) reads nothing, decides a by the
    answer and writes its copy; night 3 reuses a's corrected row as it stands and writes nothing again."""
    archive = str(tmp_path / "archive")
    paths = sf.write_turned_archive(archive, {"a": 90, "b": 0})
    common = ["--input", archive, "--model", red_corner_export, "--no-report"]
    first = str(tmp_path / "night1")
    score.run(common + ["--output", first], test_pipeline=TestPipeline())
    answers = sf.write_corrections(str(tmp_path / "corrections.parquet"), [
        {"uri": paths["a"], "label": "turn_left", "model_orientation": 90}])
    second, fixed = str(tmp_path / "night2"), str(tmp_path / "fixed")

    summary = score.run(common + ["--output", second, "--skip-known", os.path.join(first, "results.parquet"),
                                  "--corrections", answers, "--write-corrected", fixed], test_pipeline=TestPipeline())

    rows = results_by_name(second)
    assert all(r["reused"] for r in rows.values())
    assert (rows["a.png"]["decision"], rows["a.png"]["corrected_orientation"]) == ("corrected", 180)
    assert rows["b.png"]["decision"] == "ok" and rows["b.png"]["corrected_uri"] == ""
    # Only the answered page was opened, for its copy (turned by the person's 180, not the model's 90).
    assert summary["counts"]["files_read"] == 1 and summary["counts"]["corrected_written"] == 1, (rows["a.png"], summary["counts"])
    stored = Image.open(paths["a"]).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(rows["a.png"]["corrected_uri"]).convert("RGB")),
                          np.asarray(score.make_upright(stored, 180)))

    third = str(tmp_path / "night3")
    summary = score.run(common + ["--output", third, "--skip-known", os.path.join(second, "results.parquet"),
                                  "--corrections", answers, "--write-corrected", fixed], test_pipeline=TestPipeline())
    again = results_by_name(third)
    assert again["a.png"]["decision"] == "corrected" and again["a.png"]["review_reason"] == \
        rows["a.png"]["review_reason"] and again["a.png"]["corrected_uri"] == rows["a.png"]["corrected_uri"]
    assert summary["counts"]["files_read"] == 0 and summary["counts"]["bytes_read"] == 0


def test_a_run_over_part_of_the_archive_takes_the_answers_of_its_part(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    first = sf.write_turned_archive(os.path.join(archive, "box1"), {"a": 90})
    second = sf.write_turned_archive(os.path.join(archive, "box2"), {"b": 180})
    answers = sf.write_corrections(str(tmp_path / "corrections.parquet"), [
        {"uri": first["a"], "label": "turn_right", "model_orientation": 90},
        {"uri": second["b"], "label": "not_image", "model_orientation": 180}])
    output = str(tmp_path / "out")

    summary = score.run(["--input", os.path.join(archive, "box2"), "--output", output, "--model", red_corner_export,
                         "--no-report", "--corrections", answers], test_pipeline=TestPipeline())

    assert results_by_name(output)["b.png"]["corrected_orientation"] == -1
    assert (summary["corrections"]["outside_input"], summary["corrections"]["unmatched"]) == (1, 0)


def _main_fails(args, capsys):
    assert score.main(args + ["--no-report"]) == 2
    return capsys.readouterr().err


def test_answers_that_cannot_be_used_are_refused_before_scoring(tmp_path, red_corner_export, capsys):
    archive = str(tmp_path / "archive")
    paths = sf.write_turned_archive(archive, {"a": 90})
    elsewhere = sf.write_turned_archive(str(tmp_path / "other_archive"), {"x": 0})
    base = ["--input", archive, "--model", red_corner_export]

    other = sf.write_corrections(str(tmp_path / "other.parquet"), [
        {"uri": elsewhere["x"], "label": "accept", "model_orientation": 0}])
    err = _main_fails(base + ["--output", str(tmp_path / "o1"), "--corrections", other], capsys)
    assert "another archive's corrections" in err and elsewhere["x"] in err
    assert not os.path.exists(str(tmp_path / "o1" / "results.parquet"))  # refused before anything was scored

    unknown = sf.write_corrections(str(tmp_path / "unknown.parquet"), [
        {"uri": paths["a"], "label": "rotate_a_bit", "model_orientation": 90, "orientation": 45}])
    err = _main_fails(base + ["--output", str(tmp_path / "o2"), "--corrections", unknown], capsys)
    assert "unknown answer 'rotate_a_bit'" in err

    thin = str(tmp_path / "thin.parquet")
    pq.write_table(pa.table({"uri": [paths["a"]], "orientation": [0]}), thin)
    err = _main_fails(base + ["--output", str(tmp_path / "o3"), "--corrections", thin], capsys)
    assert "not a corrections table: no sha256, page, label, answered_at column" in err

    err = _main_fails(base + ["--output", str(tmp_path / "o4"), "--corrections", str(tmp_path / "none.parquet")],
                      capsys)
    assert "no corrections table at" in err


def test_an_answer_and_an_orientation_that_disagree_are_refused():
    answer = {("s", 0): {"uri": "/a.png", "label": "no_up", "orientation": 90}}
    with pytest.raises(corrections.CorrectionsError, match="answer 'no_up' with orientation 90"):
        corrections.check_answers(answer, "c.parquet")
