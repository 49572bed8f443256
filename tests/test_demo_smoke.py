"""A smoke run of `archive-vision demo` with the tiny random backbone (the real demo runs in CI via `make demo`)."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from archive_vision import demo, sample_archive


def test_sample_archive_is_deterministic_and_knows_its_turns(tmp_path):
    first = sample_archive.build_sample_archive(str(tmp_path / "a"), photo_variants=1, documents=3)
    second = sample_archive.build_sample_archive(str(tmp_path / "b"), photo_variants=1, documents=3)
    assert len(first.files) == len(second.files) and len(first.corrupt) == 3
    for one, two in zip(first.files, second.files):
        assert one["orientation"] == two["orientation"]
        with open(one["uri"], "rb") as f, open(two["uri"], "rb") as g:
            assert f.read() == g.read()
    assert first.rotated and all(f["orientation"] in (0, 90, 180, 270) for f in first.files)


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code = demo.main(["--output", out, "--backbone", "tiny", "--weights", "none", "--documents", "4",
                      "--photo-variants", "1", "--epochs", "1", "--image-size", "64", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "turned images found:" in printed and os.path.exists(os.path.join(out, "score", "report.html"))
    with open(os.path.join(out, "demo.json")) as f:
        result = json.load(f)
    assert result["problems"] == [] and result["outcome"]["turned_on_purpose"] > 0
    # a tiny random backbone learns too little to find turns: its rotation results are shown, not judged
    assert result["rotation_checked"] is False and "rotation results not checked" in printed
    rows = pq.read_table(os.path.join(out, "score", "results.parquet")).num_rows
    errors = pq.read_table(os.path.join(out, "score", "errors.parquet")).num_rows
    assert (rows, errors) == (len(rows_truth(out)), 3)  # every good image scored, every corrupt one an error
    with open(os.path.join(out, "score", "run.json")) as f:
        truth = json.load(f)["truth"]["orientation"]  # score --truth: figures in run.json and on screen
    assert truth["images"] == rows and sum(d["images"] for d in truth["by_decision"].values()) == rows
    assert f"truth    orientation {100 * truth['accuracy']:.1f}% right of {rows} (" in printed


@pytest.mark.slow
def test_demo_fails_when_asked_to_check_useless_rotation_results(tmp_path, capsys):
    # the same tiny smoke run, but judged as the pretrained demo is: it finds no turned image, so it must fail
    out = str(tmp_path / "demo")
    code = demo.main(["--output", out, "--backbone", "tiny", "--weights", "none", "--documents", "2",
                      "--photo-variants", "1", "--epochs", "1", "--image-size", "32", "--threads", "1",
                      "--check-rotation"])
    captured = capsys.readouterr()
    with open(os.path.join(out, "demo.json")) as f:
        result = json.load(f)
    assert code == 1, captured.out[-3000:]
    assert result["rotation_checked"] is True
    assert result["problems"] == demo.rotation_problems(result["outcome"]) != []
    assert all(f"demo FAILED: {p}" in captured.err for p in result["problems"])


# a normal run of `make demo` (README): 18 of 22 found, 17 with the right turn, 4 to review, no false alarm
NORMAL_RUN = {"turned_on_purpose": 22, "found": 18, "found_right_turn": 17, "false_alarms": 0,
              "sent_to_review": 4, "missed": 0}


def outcome(**changes):
    return dict(NORMAL_RUN, **changes)


def test_a_normal_demo_run_has_no_rotation_problems():
    assert demo.rotation_problems(NORMAL_RUN) == []
    # and with room to spare: a noticeably weaker run still passes
    assert demo.rotation_problems(outcome(found=6, found_right_turn=4, sent_to_review=14, missed=2)) == []


def test_finding_no_turned_image_is_a_problem():
    problems = demo.rotation_problems(outcome(found=0, found_right_turn=0, sent_to_review=20, missed=2))
    assert problems == ["no turned image was found: 0 of 22 turned on purpose were marked auto_rotate "
                        "(20 sent to review, 2 missed)"]


def test_any_upright_image_marked_auto_rotate_is_a_problem():
    assert demo.rotation_problems(outcome(false_alarms=1)) == ["1 upright image(s) wrongly marked auto_rotate"]


def test_fewer_than_half_of_the_auto_rotated_turns_right_is_a_problem():
    assert demo.rotation_problems(outcome(found=18, found_right_turn=8)) == [
        "only 8 of the 18 images marked auto_rotate got the right turn (fewer than half)"]
    assert demo.rotation_problems(outcome(found=18, found_right_turn=9)) == []  # exactly half passes


def test_every_rotation_problem_is_reported_together():
    assert len(demo.rotation_problems(outcome(found=3, found_right_turn=1, false_alarms=2))) == 2


def test_an_archive_with_nothing_turned_is_not_a_rotation_problem():
    nothing = {"turned_on_purpose": 0, "found": 0, "found_right_turn": 0, "false_alarms": 0,
               "sent_to_review": 0, "missed": 0}
    assert demo.rotation_problems(nothing) == []


@pytest.mark.parametrize("argv, checked", [
    ([], True),                                                   # `make demo`: the pretrained default backbone
    (["--backbone", "tiny", "--weights", "none"], False),         # the smoke run above
    (["--weights", "none"], False),                               # the default backbone with random weights
    (["--backbone", "tiny", "--weights", "none", "--check-rotation"], True),
    (["--no-check-rotation"], False),
])
def test_rotation_is_judged_only_with_the_pretrained_backbone_unless_told(argv, checked):
    assert demo.rotation_checked(demo._parse_args(argv)) is checked


def rows_truth(out: str):
    import csv

    with open(os.path.join(out, "truth.csv"), newline="") as f:
        return [int(r["orientation"]) for r in csv.DictReader(f)]
