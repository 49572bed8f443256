"""`archive-vision checkset`: images known to be upright, each written in four turns with truth.csv for score."""
from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from archive_vision import check_set
from pipelines import imaging, report, sources
from tests.image_factory import encode_array, make_asymmetric_image, make_random_image, tiff_16bit_grey
from tests.score_fixtures import write_bad_files


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def upright(tmp_path):
    """A small archive of upright images in two folders, and every kind of bad input beside them."""
    root = tmp_path / "upright"
    (root / "photos").mkdir(parents=True)
    (root / "pages").mkdir()
    (root / "photos" / "aligned.jpg").write_bytes(encode_array(make_asymmetric_image(48, 64), "JPEG", quality=92))
    (root / "photos" / "odd_size.jpg").write_bytes(  # not a whole number of JPEG blocks: no lossless turns
        encode_array(make_asymmetric_image(45, 61), "JPEG", quality=92))
    (root / "pages" / "palette.png").write_bytes(encode_array(make_asymmetric_image(30, 40), "PNG", mode="P"))
    (root / "pages" / "grey16.tif").write_bytes(tiff_16bit_grey(make_random_image(21, 33, 1)[..., 0].astype(
        np.uint16) * 257))
    (root / "photos" / "huge.png").write_bytes(encode_array(make_asymmetric_image(300, 300), "PNG"))
    bad = {os.path.basename(p): kind for p, kind in write_bad_files(str(root / "pages")).items()}
    return root, bad


def test_every_upright_image_is_written_in_four_turns_with_its_truth(upright, tmp_path):
    root, bad = upright
    out = tmp_path / "check"
    counts = check_set.build(str(root), str(out), max_pixels=200 * 200, progress=None)
    # 8 inputs: 4 turned, the 3 bad files and the over-size one refused with ingest's error kinds; counts add up
    assert {k: counts[k] for k in ("listed", "inputs", "images_written", "failed", "files")} == {
        "listed": 8, "inputs": 8, "images_written": 4, "failed": 4, "files": 16}
    errors = {os.path.basename(r["uri"]): r for r in _read_csv(out / "errors.csv")}
    assert {name: row["error_type"] for name, row in errors.items()} == {**bad, "huge.png": "too_large"}
    assert all(row["message"] for row in errors.values())
    truth = _read_csv(out / "truth.csv")
    assert len(truth) == 16
    for row in truth:
        source = Image.open(row["source_uri"])
        turned = Image.open(row["uri"])
        turn = int(row["orientation"])
        assert row["uri"].startswith(str(out / "images")) and os.path.isabs(row["uri"])
        assert row["uri"].endswith(f"_t{turn}" + os.path.splitext(row["uri"])[1])
        # the folders are kept, so a folder label stays a label
        assert os.path.basename(os.path.dirname(row["uri"])) == row["label"] in ("photos", "pages")
        expected = np.asarray(imaging.turn_clockwise(source.convert("RGB"), turn), np.int16)
        got = np.asarray(turned.convert("RGB"), np.int16)
        assert got.shape == expected.shape
        if source.format == "JPEG":
            assert np.abs(got - expected).mean() < 3, row
        else:  # PNG and TIFF keep every pixel, in their own format and mode
            assert turned.format == source.format and turned.mode == source.mode and row["method"] == "lossless_pixels"
            assert (got == expected).all(), row
    methods = {os.path.basename(r["source_uri"]): set() for r in truth}
    for r in truth:
        methods[os.path.basename(r["source_uri"])].add(r["method"])
    # An image's turns are all made one way: the odd-sized JPEG cannot be turned losslessly, so all four of its
    # copies (turn 0 too) are re-encoded, never the original file beside three re-encoded turns.
    assert all(len(m) == 1 for m in methods.values()), methods
    if shutil.which("jpegtran"):
        assert methods["aligned.jpg"] == {"jpegtran_lossless"}
        original = (root / "photos" / "aligned.jpg").read_bytes()
        assert (out / "images" / "photos" / "aligned_t0.jpg").read_bytes() == original
        assert methods["odd_size.jpg"] == {"reencoded_q95_asked"}
    else:
        assert methods["aligned.jpg"] == methods["odd_size.jpg"] == {"reencoded_q95_no_jpegtran"}


def test_inputs_that_would_share_a_name_are_errors_not_overwritten(tmp_path):
    """x/a.jpg and x/a.jpeg would both give x/a_t0.jpg: the second is an error row; a manifest's files from two
    folders keep their whole paths, so they do not clash at all."""
    root = tmp_path / "in"
    for folder in ("x", "y"):
        (root / folder).mkdir(parents=True)
        (root / folder / "a.jpg").write_bytes(encode_array(make_asymmetric_image(32, 48), "JPEG"))
    (root / "x" / "a.jpeg").write_bytes(encode_array(make_asymmetric_image(32, 48), "JPEG"))
    counts = check_set.build(str(root), str(tmp_path / "check"), progress=None)
    assert (counts["inputs"], counts["images_written"], counts["failed"], counts["files"]) == (3, 2, 1, 8)
    errors = _read_csv(tmp_path / "check" / "errors.csv")  # listed in name order: x/a.jpeg comes first
    assert [(os.path.relpath(e["uri"], root), e["error_type"]) for e in errors] == [("x/a.jpg", "name_clash")]
    truth = _read_csv(tmp_path / "check" / "truth.csv")
    assert len({r["uri"] for r in truth}) == 8 and all(os.path.exists(r["uri"]) for r in truth)
    assert len(os.listdir(tmp_path / "check" / "images" / "x")) == 4

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n{root / 'x' / 'a.jpg'}\n{root / 'y' / 'a.jpg'}\n")
    counts = check_set.build(str(manifest), str(tmp_path / "check2"), progress=None)
    assert (counts["images_written"], counts["failed"], counts["files"]) == (2, 0, 8)
    assert len({r["uri"] for r in _read_csv(tmp_path / "check2" / "truth.csv")}) == 8


def test_score_reads_the_check_sets_truth_as_written(upright, tmp_path):
    """The truth file names the copies the way score lists them, and says their turns."""
    out = tmp_path / "check"
    check_set.build(str(upright[0]), str(out), turns=(0, 270), progress=None)
    truth = report.read_truth(str(out / "truth.csv"))
    assert len(truth) == 10  # five good images (huge.png is within the default pixel limit), two turns each
    assert {uri for uri, _ in truth} == {e.uri for e in sources.list_archive(str(out / check_set.IMAGES_DIR))}
    for (uri, page), row in truth.items():
        assert os.path.exists(uri) and page == 0
        assert row["orientation"] == int(uri.rsplit("_t", 1)[1].split(".")[0]) in (0, 270)


def test_a_manifests_stored_turn_is_added_to_each_turn(tmp_path):
    image = tmp_path / "sideways.png"
    image.write_bytes(encode_array(make_asymmetric_image(30, 40), "PNG"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,orientation\n{image},90\n")
    check_set.build(str(manifest), str(tmp_path / "check"), progress=None)
    truth = {int(r["uri"].rsplit("_t", 1)[1].split(".")[0]): int(r["orientation"])
             for r in _read_csv(tmp_path / "check" / "truth.csv")}
    assert truth == {0: 90, 90: 180, 180: 270, 270: 0}


def test_a_sample_is_the_same_every_time_and_a_used_output_is_refused(tmp_path, capsys):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(12):
        (root / f"{i:02d}.png").write_bytes(encode_array(make_asymmetric_image(16, 20 + i), "PNG"))
    first = check_set.main(["--input", str(root), "--output", str(tmp_path / "a"), "--sample", "5", "--turns", "0,180"])
    second = check_set.main(["--input", str(root), "--output", str(tmp_path / "b"), "--sample", "5", "--turns", "0,180"])
    assert first == second == 0
    names = [[os.path.basename(r["source_uri"]) for r in _read_csv(tmp_path / d / "truth.csv")] for d in "ab"]
    assert names[0] == names[1] and len(names[0]) == 10 and len(set(names[0])) == 5
    assert "score --input" in capsys.readouterr().out
    assert check_set.main(["--input", str(root), "--output", str(tmp_path / "a")]) == 2
    assert "already holds a check set" in capsys.readouterr().err
    (tmp_path / "c" / "images").mkdir(parents=True)
    (tmp_path / "c" / "images" / "left.png").write_bytes(b"from a run that stopped")
    assert check_set.main(["--input", str(root), "--output", str(tmp_path / "c")]) == 2
    assert "already holds files" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # the same files under another mount: the same sample
    assert check_set.main(["--input", str(moved), "--output", str(tmp_path / "d"), "--sample", "5", "--turns",
                           "0,180"]) == 0
    assert [os.path.basename(r["source_uri"]) for r in _read_csv(tmp_path / "d" / "truth.csv")] == names[0]
    assert check_set.main(["--input", str(root), "--output", str(root / "check")]) == 2
    assert "is inside --input" in capsys.readouterr().err and not (root / "check").exists()


@pytest.mark.parametrize("text", ["0,45", "90,90", "", "left"])
def test_only_distinct_quarter_turns_are_taken(text):
    with pytest.raises(Exception, match="quarter turns"):
        check_set.parse_turns(text)


def test_truth_figures_per_decision_and_threshold():
    """What score records in run.json and prints: accuracy, each decision's share right, and per threshold how
    many answers of each kind (turned, upright) are at or above it and how many of those are right."""
    labels = ["maps", "maps", "photos", "photos", "", "photos"]  # f4 has no label: counted, in no label's line
    truth = {(f"f{i}", 0): {"label": labels[i], "orientation": t} for i, t in enumerate([0, 90, 180, 270, 0, 90])}
    rows = [  # uri, answer, confidence, decision
        ("f0", 0, 0.95, "ok"), ("f1", 90, 0.97, "auto_rotate"), ("f2", 0, 0.6, "ok"),
        ("f3", 270, 0.85, "review"), ("f4", 180, 0.55, "review"), ("f5", 90, 0.4, "skipped")]
    results = [{"uri": u, "page": 0, "orientation_degrees": a, "orientation_confidence": c, "decision": d,
                "class_name": ""} for u, a, c, d in rows]
    summary = report.truth_summary(report.truth_metrics(results, truth))
    o = summary["orientation"]
    assert (o["images"], o["right"], o["accuracy"]) == (5, 3, 0.6)  # the skipped row is not counted
    assert o["by_decision"] == {"auto_rotate": {"images": 1, "right": 1, "accuracy": 1.0, "at_least": 0.2698},
                                "ok": {"images": 2, "right": 1, "accuracy": 0.5, "at_least": 0.1208},
                                "review": {"images": 2, "right": 1, "accuracy": 0.5, "at_least": 0.1208}}
    assert o["by_threshold"]["turned"]["0.8"] == {"images": 2, "share": 0.4, "right": 2, "accuracy": 1.0,
                                                  "at_least": 0.4249}
    assert o["by_threshold"]["turned"]["0.5"] == {"images": 3, "share": 0.6, "right": 2, "accuracy": 0.6667,
                                                  "at_least": 0.2535}
    assert o["by_threshold"]["upright"]["0.5"] == {"images": 2, "share": 0.4, "right": 1, "accuracy": 0.5,
                                                   "at_least": 0.1208}
    assert o["by_threshold"]["upright"]["0.99"] == {"images": 0, "share": 0.0, "right": 0, "accuracy": None,
                                                    "at_least": None}
    line = report.truth_summary_line(summary)
    assert line == "orientation 60.0% right of 5 (auto_rotate 1/1 (>=26.9%), ok 1/2 (>=12.0%), review 1/2)"
    # Per label, worst first; f4's missing label is a group of its own, so that the groups add up to the whole.
    assert list(o["by_label"].items()) == [
        ("(no label)", {"images": 1, "right": 0, "accuracy": 0.0, "at_least": 0.0}),
        ("photos", {"images": 2, "right": 1, "accuracy": 0.5, "at_least": 0.1208}),
        ("maps", {"images": 2, "right": 2, "accuracy": 1.0, "at_least": 0.4249})]
    assert report.truth_label_lines(summary) == ["(no label)     0 of     1 turns right (0.0%, >=0.0%)",
                                                 "photos         1 of     2 turns right (50.0%, >=12.0%)",
                                                 "maps           2 of     2 turns right (100.0%, >=42.4%)"]
    assert report.truth_label_lines(summary, most=2)[2:] == [
        "... 1 more label in run.json (truth.orientation.by_label)"]
    del o["by_label"]["maps"], o["by_label"]["(no label)"]
    assert report.truth_label_lines(summary) == []  # one label says nothing the summary line does not
    unlabelled = {key: {**t, "label": ""} for key, t in truth.items()}
    assert report.truth_summary(report.truth_metrics(results, unlabelled))["orientation"]["by_label"] == {}


def test_results_and_truth_rows_that_match_nothing_are_counted_and_said():
    """A truth whose paths differ from the scored ones (another mount, a relative path resolved elsewhere) must not
    pass for a smaller check: the line says how many results had no truth row and how many truth rows no result."""
    truth = {("/a", 0): {"label": "", "orientation": 0}, ("/b", 0): {"label": "", "orientation": 90},
             ("/failed", 0): {"label": "", "orientation": 0}, ("/mnt/elsewhere/c", 0): {"label": "", "orientation": 0},
             ("/tiff", 0): {"label": "", "orientation": 90}}
    results = [{"uri": u, "page": page, "orientation_degrees": a, "orientation_confidence": 0.95, "decision": d,
                "class_name": ""} for u, page, a, d in
               [("/a", 0, 0, "ok"), ("/b", 0, 90, "auto_rotate"), ("/c", 0, 0, "ok"),
                ("/tiff", 0, 90, "auto_rotate"), ("/tiff", 1, 0, "ok")]]  # the TIFF's page 1: no truth row for it
    summary = report.truth_summary(report.truth_metrics(results, truth))
    assert summary["coverage"] == {"results": 5, "with_truth": 3, "truth_rows": 5, "truth_without_result": 2}
    assert summary["orientation"]["images"] == 3
    assert report.truth_summary_line(summary) == (
        "orientation 100.0% right of 3 (auto_rotate 2/2 (>=42.4%), ok 1/1 (>=26.9%)); 2 of 5 results have no truth "
        "row; 2 of 5 truth rows match no result (failed inputs, or other paths)")
    everything = {**truth, ("/c", 0): truth[("/mnt/elsewhere/c", 0)], ("/tiff", 1): truth[("/tiff", 0)]}
    del everything[("/failed", 0)], everything[("/mnt/elsewhere/c", 0)]
    line = report.truth_summary_line(report.truth_summary(report.truth_metrics(results, everything)))
    # All matched (the TIFF's page 1 now counts, and is wrong): nothing more on the line.
    assert line == "orientation 80.0% right of 5 (auto_rotate 2/2 (>=42.4%), ok 2/3 (>=25.3%))"


def test_labels_are_ranked_by_share_right_then_size_in_the_lines_and_the_page():
    """One order, worst first: the share right, then the larger group first (a near-tie rounded alike in run.json
    keeps the order of the exact shares)."""
    counts = {"a": (3, 1), "b": (10000, 3333), "c": (4, 4), "d": (2, 1), "e": (8, 4)}  # label: (images, right)
    truth, results = {}, []
    for label, (n, right) in counts.items():
        for i in range(n):
            truth[(f"{label}{i}", 0)] = {"label": label, "orientation": 90}
            results.append({"uri": f"{label}{i}", "page": 0, "orientation_degrees": 90 if i < right else 0,
                            "orientation_confidence": 0.5, "decision": "review", "class_name": ""})
    metrics = report.truth_metrics(results, truth)
    assert list(metrics["orientation"]["by_label"]) == ["b", "a", "e", "d", "c"]  # 3333/10000 < 1/3; 4/8 before 1/2
    summary = report.truth_summary(metrics)
    assert [line.split()[0] for line in report.truth_label_lines(summary)] == ["b", "a", "e", "d", "c"]


def test_the_lower_bound_is_what_the_counts_show_and_tightens_with_more_images():
    """60 of 60 right shows at least 95.6% with 95% confidence (Wilson, one-sided): not 100%, and not the 99.5% a
    band must reach; it takes 539 of 539 to show that."""
    assert report.lower_bound(60, 60) == pytest.approx(60 / (60 + 1.645 ** 2))  # no miss: n / (n + z^2)
    assert report._floor(report.lower_bound(60, 60), 3) == 0.956
    assert report.lower_bound(539, 539) > 0.995 > report.lower_bound(538, 538)
    assert report.lower_bound(0, 10) == 0.0 and report.lower_bound(0, 0) is None
    # Shown cut down, never rounded up: 538 of 538 does not show 99.5%, 539 of 539 does.
    right_538 = [{"uri": f"u{i}", "page": 0, "orientation_degrees": 90, "orientation_confidence": 0.99,
                  "decision": "auto_rotate", "class_name": ""} for i in range(539)]
    for n, shown in ((538, "(>=99.4%)"), (539, "(>=99.5%)")):
        truth = {(f"u{i}", 0): {"label": "", "orientation": 90} for i in range(n)}
        assert f"auto_rotate {n}/{n} {shown}" in report.truth_summary_line(
            report.truth_summary(report.truth_metrics(right_538, truth)))
    for right, n in ((170, 172), (2, 3), (295, 300)):  # where the score test just rejects: (p - L)^2 = z^2 L (1-L) / n
        low = report.lower_bound(right, n)
        assert (right / n - low) ** 2 == pytest.approx(1.645 ** 2 * low * (1 - low) / n) and low < right / n
    assert report.lower_bound(170, 172) < 170 / 172 < 1  # below what was seen, and tighter with more images:
    assert report.lower_bound(85, 86) < report.lower_bound(170, 172) < report.lower_bound(340, 344)


def test_the_shared_sample_archive_gives_ingests_error_kinds(tmp_path):
    """Every format ingest reads (JPEG, PNG, BMP, WebP) is turned; every bad input gets the kind ingest gives it."""
    from tests.image_factory import write_sample_archive

    archive = write_sample_archive(str(tmp_path / "scans"))
    counts = check_set.build(str(tmp_path / "scans"), str(tmp_path / "check"), progress=None)
    assert counts["images_written"] == len(archive["good"]) and counts["failed"] == len(archive["bad"])
    errors = {r["uri"]: r["error_type"] for r in _read_csv(tmp_path / "check" / "errors.csv")}
    assert errors == archive["bad"]
    truth = _read_csv(tmp_path / "check" / "truth.csv")
    assert sorted({r["source_uri"] for r in truth}) == sorted(archive["good"])
    assert {os.path.splitext(r["uri"])[1] for r in truth} == {".jpg", ".png", ".bmp", ".webp"}
