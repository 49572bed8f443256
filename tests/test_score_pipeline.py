"""The score job end to end with tiny exported models: decisions, errors that reconcile, corrected copies that
are upright, --skip-known, --tta, and the same answers through a real local gRPC server as in-process."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image, ImageOps

from pipelines import score
from serving import export
from tests import score_fixtures as sf
from tests.image_factory import encode_array, make_asymmetric_image
from tests.test_serving_export import limit_tf_threads, make_tiny_model

limit_tf_threads()


@pytest.fixture(scope="module")
def red_corner_export(tmp_path_factory):
    """Export base holding version 3 of the model that finds the asymmetric image's turn."""
    base = str(tmp_path_factory.mktemp("export"))
    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=3)
    return base


def run_score(args, tmp_path=None):
    return score.run(list(args) + ["--no-report"], test_pipeline=TestPipeline())


def results_by_name(output):
    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    return {os.path.basename(r["uri"]): r for r in rows}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_turns_found_and_bad_inputs_reconcile(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    turns = {"upright": 0, "turned90": 90, "turned180": 180, "turned270": 270}
    sf.write_turned_archive(archive, turns)
    bad = sf.write_bad_files(archive)
    output = str(tmp_path / "out")

    summary = run_score(["--input", archive, "--output", output, "--model", red_corner_export])

    rows = results_by_name(output)
    assert {name: rows[f"{name}.png"]["orientation_degrees"] for name in turns} == turns
    assert {name: rows[f"{name}.png"]["decision"] for name in turns} == {
        "upright": "ok", "turned90": "auto_rotate", "turned180": "auto_rotate", "turned270": "auto_rotate"}
    assert all(r["model_name"] == "archive_vision" and r["model_version"] == 3 for r in rows.values())
    assert all(r["class_name"] == "document" and not r["reused"] for r in rows.values())
    errors = pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    assert {e["uri"]: e["error_type"] for e in errors} == bad
    counts = summary["counts"]
    assert (counts["inputs"], counts["inputs_ok"], counts["inputs_failed"]) == (7, 4, 3)
    assert counts["reconciled"] and counts["per_decision"] == {"ok": 1, "auto_rotate": 3}
    with open(os.path.join(output, "run.json")) as f:
        assert json.load(f)["model"]["version"] == 3
    csv_rows = pacsv.read_csv(os.path.join(output, "results.csv")).to_pylist()
    assert len(csv_rows) == 4 and all(len(r["orientation_probabilities"].split(";")) == 4 for r in csv_rows)


def test_corrected_copies_are_upright_and_originals_untouched(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    upright = make_asymmetric_image(128, 160)  # multiples of 16: JPEG can be turned losslessly
    os.makedirs(os.path.join(archive, "box"))
    paths = {}
    for degrees, (fmt, ext) in ((90, ("PNG", "png")), (180, ("JPEG", "jpg")), (270, ("TIFF", "tif"))):
        path = os.path.join(archive, "box", f"scan{degrees}.{ext}")
        with open(path, "wb") as f:
            f.write(encode_array(sf.turned(upright, degrees), fmt, **({"quality": 95} if fmt == "JPEG" else {})))
        paths[degrees] = path
    before = {p: sha(p) for p in paths.values()}
    fixed = str(tmp_path / "fixed")

    summary = run_score(["--input", archive, "--output", str(tmp_path / "out"), "--model", red_corner_export,
                         "--write-corrected", fixed])

    rows = results_by_name(str(tmp_path / "out"))
    for degrees, path in paths.items():
        row = rows[os.path.basename(path)]
        assert row["decision"] == "auto_rotate" and row["orientation_degrees"] == degrees
        assert row["corrected_uri"] == os.path.join(fixed, "box", os.path.basename(path)), row["corrected_method"]
        pixels = np.asarray(Image.open(row["corrected_uri"]).convert("RGB")).astype(int)
        assert pixels.shape == upright.shape
        if path.endswith(".jpg"):
            assert np.abs(pixels - upright).mean() < 4
        else:
            assert np.array_equal(pixels, upright)
    if shutil.which("jpegtran"):
        assert rows["scan180.jpg"]["corrected_method"] == "jpegtran_lossless"
    assert {p: sha(p) for p in paths.values()} == before
    assert summary["counts"]["corrected_written"] == 3


def test_corrected_dir_inside_the_archive_is_refused(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {"a": 90})
    with pytest.raises(SystemExit):
        score.parse_args(["--input", archive, "--output", str(tmp_path / "out"), "--model", red_corner_export,
                          "--write-corrected", os.path.join(archive, "fixed")])


def test_tta_agrees_on_a_clear_image_and_reports_the_rate(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {"upright": 0, "turned90": 90, "turned270": 270})
    output = str(tmp_path / "out")

    summary = run_score(["--input", archive, "--output", output, "--model", red_corner_export, "--tta"])

    rows = results_by_name(output)
    assert {n: r["orientation_degrees"] for n, r in rows.items()} == {
        "upright.png": 0, "turned90.png": 90, "turned270.png": 270}
    assert all(r["tta_agreement"] == 1.0 for r in rows.values())
    assert summary["tta"]["enabled"] and summary["tta"]["images"] == 3 and summary["tta"]["disagreement_rate"] == 0.0


def test_skip_known_skips_exactly_the_already_scored_content(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    first = sf.write_turned_archive(archive, {"old_a": 0, "old_b": 90})
    first_out = str(tmp_path / "run1")
    run_score(["--input", archive, "--output", first_out, "--model", red_corner_export])
    new = sf.write_turned_archive(archive, {"new_c": 180, "new_d": 270})
    copy = os.path.join(archive, "copy_of_old_b.png")
    shutil.copyfile(first["old_b"], copy)  # same bytes under a new name: known content
    second_out = str(tmp_path / "run2")

    summary = run_score(["--input", archive, "--output", second_out, "--model", red_corner_export,
                         "--skip-known", os.path.join(first_out, "results.parquet")])

    rows = results_by_name(second_out)
    assert {n for n, r in rows.items() if r["reused"]} == {"old_a.png", "old_b.png", "copy_of_old_b.png"}
    assert {n for n, r in rows.items() if not r["reused"]} == {"new_c.png", "new_d.png"}
    assert rows["copy_of_old_b.png"]["orientation_degrees"] == 90
    assert rows["copy_of_old_b.png"]["uri"] == copy
    assert summary["counts"]["pages_scored"] == 2 and summary["counts"]["pages_reused"] == 3
    assert summary["counts"]["reconciled"] and summary["counts"]["inputs"] == 5
    assert set(new) == {"new_c", "new_d"}


def test_skip_known_ignores_results_of_another_model_version(tmp_path):
    import pyarrow as pa

    from pipelines.tables import RESULTS_SCHEMA

    row = {name: None for name in RESULTS_SCHEMA.names}
    row.update(uri="/a.png", page=0, sha256="abc", decision="ok", model_name="archive_vision", model_version=1,
               reused=False, orientation_probabilities=[1.0, 0.0, 0.0, 0.0])
    path = str(tmp_path / "old.parquet")
    pq.write_table(pa.Table.from_pylist([row], RESULTS_SCHEMA), path)
    assert score.load_known(path, score.ModelInfo("archive_vision", 2)) == {}
    assert list(score.load_known(path, score.ModelInfo("archive_vision", 1))) == ["abc"]


def test_one_bad_image_does_not_fail_its_batch():
    items = [{"uri": f"u{i}", "page": 0, "sha256": str(i), "images": [b"ok" if i != 3 else b"poison"],
              "turns": (0,)} for i in range(7)]
    calls = []

    def predict(images):
        calls.append(len(images))
        if b"poison" in images:
            raise ValueError("cannot decode")
        return [{"orientation_probabilities": np.array([0.1, 0.7, 0.1, 0.1]), "orientation_degrees": 90}
                for _ in images]

    outcomes = score.predict_isolating(items, predict)
    assert [o[0]["uri"] for o in outcomes] == [f"u{i}" for i in range(7)]
    assert [o[2] != "" for o in outcomes] == [i == 3 for i in range(7)]
    assert "cannot decode" in outcomes[3][2]
    assert all(o[1]["orientation_degrees"] == 90 for i, o in enumerate(outcomes) if i != 3)


def test_a_server_that_is_gone_fails_the_batch_without_splitting():
    from serving.errors import ServerUnavailableError

    items = [{"uri": f"u{i}", "page": 0, "sha256": "", "images": [b"x"], "turns": (0,)} for i in range(8)]
    calls = []

    def predict(images):
        calls.append(len(images))
        raise ServerUnavailableError("UNAVAILABLE")

    outcomes = score.predict_isolating(items, predict, fatal=(ServerUnavailableError,))
    assert calls == [8] and all(o[1] is None and "UNAVAILABLE" in o[2] for o in outcomes)


def test_turned_copies_are_shifted_back_before_combining():
    # The image is really turned 90. Copies turned a further 0/90/180/270 read as 90/180/270/0.
    def onehot(index, p=0.85):
        v = np.full(4, (1 - p) / 3)
        v[index] = p
        return {"orientation_probabilities": v}

    combined = score.combine_turned([onehot(1), onehot(2), onehot(3), onehot(0)], (0, 90, 180, 270))
    assert combined["orientation_degrees"] == 90 and combined["tta_agreement"] == 1.0
    disagreeing = score.combine_turned([onehot(1), onehot(2), onehot(3), onehot(1)], (0, 90, 180, 270))
    assert disagreeing["orientation_degrees"] == 90 and disagreeing["tta_agreement"] == 0.75


@pytest.mark.slow
def test_local_grpc_server_and_in_process_give_the_same_answers(tmp_path):
    from archive_vision.demo import LocalServer

    base = str(tmp_path / "export")
    export.export_model(make_tiny_model(image_size=sf.IMAGE_SIZE, seed=5), base, class_names=["a", "b", "c"],
                        image_size=sf.IMAGE_SIZE, version=7)
    archive = str(tmp_path / "archive")
    sf.random_photos(archive, 6)
    sf.write_turned_archive(archive, {"asym": 90}, fmt="JPEG", ext="jpg")
    sf.write_bad_files(archive)
    local_out, remote_out = str(tmp_path / "local"), str(tmp_path / "remote")

    local = run_score(["--input", archive, "--output", local_out, "--model", base, "--batch-size", "4"])
    with LocalServer(os.path.join(base, "archive_vision"), "archive_vision", str(tmp_path / "server.log"),
                     threads=1) as server:
        server.wait_until_available(120)
        remote = run_score(["--input", archive, "--output", remote_out, "--endpoint", server.address,
                            "--batch-size", "3"])

    local_rows, remote_rows = results_by_name(local_out), results_by_name(remote_out)
    assert sorted(local_rows) == sorted(remote_rows) and len(local_rows) == 7
    for name, row in local_rows.items():
        other = remote_rows[name]
        for key in ("orientation_degrees", "class_name", "class_id", "decision", "sha256", "model_version"):
            assert row[key] == other[key], (name, key)
        np.testing.assert_allclose(row["orientation_probabilities"], other["orientation_probabilities"], atol=1e-5)
        np.testing.assert_allclose(row["class_probabilities"], other["class_probabilities"], atol=1e-5)
    assert local["model"]["mode"] == "in_process" and remote["model"]["mode"] == "grpc"
    assert local["counts"]["errors"] == remote["counts"]["errors"] == 3
    assert remote["counts"]["reconciled"] and remote["model"]["version"] == 7


def test_pages_of_a_tiff_and_an_exif_turned_jpeg_are_scored_as_displayed(tmp_path, red_corner_export):
    from tests.image_factory import jpeg_with_exif_orientation, multipage_tiff

    archive = str(tmp_path / "archive")
    os.makedirs(archive)
    upright = make_asymmetric_image(128, 160)
    with open(os.path.join(archive, "two_pages.tif"), "wb") as f:
        f.write(multipage_tiff([Image.fromarray(upright), Image.fromarray(sf.turned(upright, 180))]))
    # Stored pixels turned 270 with EXIF 6 ("show turned 90 clockwise"): displayed upright, so it is ok.
    with open(os.path.join(archive, "exif_upright.jpg"), "wb") as f:
        f.write(jpeg_with_exif_orientation(sf.turned(upright, 270), 6))
    # Stored upright, EXIF 6: displayed turned 90 clockwise, which the copy must undo.
    with open(os.path.join(archive, "exif_turned.jpg"), "wb") as f:
        f.write(jpeg_with_exif_orientation(upright, 6))
    output, fixed = str(tmp_path / "out"), str(tmp_path / "fixed")

    run_score(["--input", archive, "--output", output, "--model", red_corner_export, "--write-corrected", fixed])

    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    seen = {(os.path.basename(r["uri"]), r["page"]): (r["orientation_degrees"], r["decision"]) for r in rows}
    assert seen == {("two_pages.tif", 0): (0, "ok"), ("two_pages.tif", 1): (180, "auto_rotate"),
                    ("exif_upright.jpg", 0): (0, "ok"), ("exif_turned.jpg", 0): (90, "auto_rotate")}
    page_copy = np.asarray(Image.open(os.path.join(fixed, "two_pages.page1.tif")).convert("RGB"))
    assert np.array_equal(page_copy, upright)
    exif_row = next(r for r in rows if r["uri"].endswith("exif_turned.jpg"))
    if shutil.which("jpegtran"):  # the EXIF turn folded into one lossless transform, the tag reset
        assert exif_row["corrected_method"] == "jpegtran_lossless"
    copy = Image.open(exif_row["corrected_uri"])
    assert copy.getexif().get(0x0112, 1) == 1
    exif_copy = np.asarray(ImageOps.exif_transpose(copy).convert("RGB")).astype(int)
    assert exif_copy.shape == upright.shape and np.abs(exif_copy - upright).mean() < 4


@pytest.mark.parametrize("exif", range(1, 9))
@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.skipif(shutil.which("jpegtran") is None, reason="jpegtran (libjpeg-turbo-progs) is not installed")
def test_lossless_jpeg_turn_matches_the_decoded_pixels(exif, degrees):
    """Every EXIF tag x every turn: the lossless copy shows what decoding + turning upright shows."""
    from tests.image_factory import jpeg_with_exif_orientation

    from pipelines import imaging

    data = jpeg_with_exif_orientation(make_asymmetric_image(64, 96), exif)
    expected = np.asarray(score.make_upright(next(imaging.decode_pages(data)).image, degrees)).astype(int)
    payload, _, method = score.upright_bytes(data, 0, degrees, "jpeg")
    assert method == "jpegtran_lossless"
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).convert("RGB")).astype(int)
    assert shown.shape == expected.shape and np.abs(shown - expected).mean() < 2
