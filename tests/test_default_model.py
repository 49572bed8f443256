"""The shipped default orientation model: loads offline, follows the model contract, gets real photos right.

The photos are scikit-image's samples (never training data: that package is reserved for evaluation) and a
Pillow-rendered text page, each turned 0/90/180/270 degrees clockwise.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage import data as skimage_data

from trainer import default_model
from trainer.preprocessing import preprocess_image_bytes

TURNS = (0, 90, 180, 270)


def _turned(array: np.ndarray, degrees: int) -> np.ndarray:
    return np.rot90(array, k=-(degrees // 90))  # np.rot90 turns counter-clockwise for positive k


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _text_page() -> np.ndarray:
    from archive_vision.sample_archive import render_page

    return np.asarray(render_page(seed=3).convert("RGB"))


@pytest.fixture(scope="module")
def model():
    try:
        tf.config.threading.set_intra_op_parallelism_threads(2)
    except RuntimeError:  # TensorFlow already started in this process (other test files ran first): keep its setting
        pass
    return default_model.build_default_orientation_model()


@pytest.fixture(scope="module")
def turned_images():
    """(name, true turn, JPEG bytes) for three photos and one page under the four turns."""
    uprights = {"astronaut": skimage_data.astronaut(), "chelsea": skimage_data.chelsea(),
                "coffee": skimage_data.coffee(), "page": _text_page()}
    return [(name, degrees, _jpeg(_turned(array, degrees))) for name, array in uprights.items() for degrees in TURNS]


def _probabilities(model, images) -> np.ndarray:
    pixels = tf.stack([preprocess_image_bytes(tf.constant(data)) for _, _, data in images])
    out = model(pixels, training=False)
    return out[default_model.ORIENTATION_OUTPUT].numpy()


def test_shipped_head_is_small_and_describes_itself():
    assert os.path.getsize(default_model.HEAD_WEIGHTS) < 5 * 2 ** 20
    meta = default_model.head_metadata()
    assert meta["backbone"] == "mobilenet_v2_torchvision"
    assert meta["temperature"] > 0
    assert meta["train_photos"] > 100 and meta["train_images"] > 1000


def test_contract_outputs_softmax_over_four_turns(model):
    out = model(tf.zeros([2, 224, 224, 3]), training=False)
    assert list(out) == [default_model.ORIENTATION_OUTPUT]
    probabilities = out[default_model.ORIENTATION_OUTPUT].numpy()
    assert probabilities.shape == (2, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_turns_of_unseen_photos_and_a_page(model, turned_images):
    probabilities = _probabilities(model, turned_images)
    predicted = np.argmax(probabilities, axis=1) * 90
    truth = np.array([degrees for _, degrees, _ in turned_images])
    right = {name: int(np.sum((predicted == truth)[[n == name for n, _, _ in turned_images]]))
             for name, _, _ in turned_images}
    # The model gets about 70% of held-out photo turns right (bench/quality.py) and these three are hard for it
    # (a face-filling cat, a cup seen from above): at least half right (chance: a quarter).
    # The rendered page (Pillow's font at ~15 px on a 600 px page, unlike the corpus' 150 dpi pages) is read
    # right upright, upside down and at 270; its 90-degree copy is taken for 270 by the fine-tuned top blocks
    # (the frozen-backbone head got it), which test-time turns repair (next test, and the score test).
    assert right["astronaut"] + right["chelsea"] + right["coffee"] >= 6, f"right turns per image (of 4): {right}"
    assert right["page"] >= 3, f"right turns per image (of 4): {right}"
    page = probabilities[[n == "page" for n, _, _ in turned_images]]
    assert [int(np.argmax(page[d])) for d in (0, 2)] == [0, 2], page  # up and upside down never confused


def test_test_time_turns_agree_up_to_the_known_turn(model, turned_images):
    probabilities = _probabilities(model, turned_images)
    # chelsea (a cat's face filling the frame) and coffee (a cup seen from above) carry weak cues for this
    # model: its four turned answers do not settle on upright, so they are not asserted here.
    for name in ("astronaut", "page"):
        rows = probabilities[[n == name for n, _, _ in turned_images]]  # the upright turned 0/90/180/270
        # The copy turned j more has its answer for "upright" at column j: roll back and average.
        combined = np.mean([np.roll(rows[j], -j) for j in range(4)], axis=0)
        assert int(np.argmax(combined)) == 0, f"{name}: {combined}"


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """$ARCHIVE_VISION_CACHE for this module: the default model is exported once and shared by the tests."""
    return str(tmp_path_factory.mktemp("cache"))


def test_export_serves_the_same_answer_from_image_bytes(monkeypatch, cache_root, model, turned_images):
    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    version_dir = default_model.default_export_dir()
    assert version_dir.startswith(cache_root)
    assert os.path.exists(os.path.join(version_dir, "saved_model.pb"))
    assert default_model.default_export_dir() == version_dir  # exported once, then reused
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    images = turned_images[:4]
    served = serve(images=tf.constant([data for _, _, data in images]))
    np.testing.assert_allclose(served["orientation_probabilities"].numpy(), _probabilities(model, images),
                               atol=1e-4)
    assert list(served["orientation_degrees"].numpy()) == [
        int(np.argmax(p)) * 90 for p in _probabilities(model, images)]
    # How score scores it travels with it: TF Serving's copy names it to score through --model-settings.
    from pipelines.score import recorded_score_settings

    assert recorded_score_settings(version_dir) == default_model.score_settings()


def _archive(tmp_path, turned_images, names) -> str:
    """A folder holding the named images under their four turns, as `<name>_<turn>.jpg`."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, degrees, data in turned_images:
        if name in names:
            (archive / f"{name}_{degrees}.jpg").write_bytes(data)
    return str(archive)


def _rows_by_file(output) -> dict:
    import pyarrow.parquet as pq

    return {os.path.basename(r["uri"]): r for r in pq.read_table(output / "results.parquet").to_pylist()}


def _score_each(tmp_path, archive, flags, extra=()) -> dict:
    """{flag: (run summary, rows by file name)} of the built-in score over `archive`, once per flag."""
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import score

    out = {}
    for flag in flags:
        output = tmp_path / flag.strip("-").split("=")[0]
        summary = score.run(["--input", archive, "--output", str(output), "--no-report", *extra, flag],
                            test_pipeline=TestPipeline())
        out[flag] = (summary, _rows_by_file(output))
    return out


def test_score_without_a_model_uses_the_built_in_one_with_test_time_turns(monkeypatch, cache_root, tmp_path,
                                                                           turned_images):
    """`archive-vision score --input A --output B`: no model, no server, and the turned photo and page are found."""
    import json

    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import score

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    archive = _archive(tmp_path, turned_images, ("astronaut", "page"))
    output = tmp_path / "out"
    summary = score.run(["--input", archive, "--output", str(output), "--no-report"],
                        test_pipeline=TestPipeline())
    assert summary["model"]["name"] == default_model.DEFAULT_MODEL_NAME
    assert summary["model"]["source"].startswith(cache_root)
    assert summary["options"]["tta"] is True and summary["options"]["rotate_threshold"] == 0.9
    assert summary["text_crops"]["enabled"] is True and summary["text_lines"]["enabled"] is True
    assert summary["counts"]["reconciled"] and summary["counts"]["results"] == 8
    with open(output / "run.json") as f:
        assert json.load(f)["tta"]["enabled"] is True
    rows = _rows_by_file(output)
    for file_name, row in rows.items():
        truth = int(file_name.rsplit("_", 1)[1].split(".")[0])
        assert row["orientation_degrees"] == truth, (file_name, row)
        assert row["decision"] == ("ok" if truth == 0 else "auto_rotate") or row["decision"] == "review", row
    # Every turn is named right (test-time turns settle the photo and the page's 90-degree copy); at the
    # built-in 0.9 threshold the page's turned copies may go to review, but nothing lands in the wrong band.
    assert rows["page_0.jpg"]["decision"] == "ok"
    # At least three of the four turned copies agree (the 90-degree one is the dissenter on this rendered page).
    assert all(rows[f"page_{d}.jpg"]["tta_agreement"] >= 0.75 for d in TURNS)


def test_a_check_set_scored_against_its_truth_says_how_right_each_decision_is(monkeypatch, cache_root, tmp_path,
                                                                              turned_images, capsys):
    """`checkset` turns images known to be upright four ways; `score --truth` on them records and prints how many
    turns it got right, per decision (even with --no-report): what an archive team checks before trusting it."""
    from apache_beam.testing.test_pipeline import TestPipeline

    from archive_vision import check_set
    from pipelines import score

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    upright = tmp_path / "upright"
    upright.mkdir()
    for name, degrees, data in turned_images:
        if degrees == 0 and name in ("astronaut", "page"):
            (upright / f"{name}.jpg").write_bytes(data)
    assert check_set.main(["--input", str(upright), "--output", str(tmp_path / "check")]) == 0
    output = tmp_path / "scored"
    summary = score.run(["--input", str(tmp_path / "check" / "images"), "--output", str(output), "--no-report",
                         "--truth", str(tmp_path / "check" / "truth.csv")], test_pipeline=TestPipeline())
    rows = _rows_by_file(output)
    right = sum(r["orientation_degrees"] == int(name.rsplit("_t", 1)[1].split(".")[0]) for name, r in rows.items())
    truth = summary["truth"]["orientation"]
    assert (truth["images"], truth["right"]) == (8, right) and right >= 7
    decisions = {d: sum(r["decision"] == d for r in rows.values()) for d in ("auto_rotate", "ok", "review")}
    assert {d: v["images"] for d, v in truth["by_decision"].items()} == {d: n for d, n in decisions.items() if n}
    assert truth["by_threshold"]["turned"]["0.9"]["images"] == decisions["auto_rotate"]
    with open(output / "run.json") as f:
        assert json.load(f)["truth"]["orientation"]["right"] == right
    assert f"  truth    orientation {100 * right / 8:.1f}% right of 8 (" in score.format_summary(summary)


def test_score_reads_the_text_lines_of_unsure_pages_and_says_so(monkeypatch, cache_root, tmp_path, turned_images):
    """--text-lines (on by default with the built-in model): every page below --text-lines-below has its lines
    read, the answer is the fused one, results say how many pieces of line were read, run.json counts them."""
    from pipelines import score

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    archive = _archive(tmp_path, turned_images, ("coffee", "page"))
    runs = _score_each(tmp_path, archive, ("--text-lines-below=1.0", "--no-text-lines"))
    summaries = {flag: summary for flag, (summary, _) in runs.items()}
    for flag, (_, rows) in runs.items():
        if flag == "--no-text-lines":
            assert all(r["text_lines"] is None for r in rows.values())
            continue
        for file_name, row in rows.items():
            truth = int(file_name.rsplit("_", 1)[1].split(".")[0])
            if file_name.startswith("page"):
                assert row["text_lines"] >= 5 and row["orientation_degrees"] == truth, row
                assert row["orientation_confidence"] > 0.99, row  # the lines leave no doubt
            else:
                assert row["text_lines"] is not None  # read (below 1.0), whatever it found
    read = summaries["--text-lines-below=1.0"]["text_lines"]
    assert read["enabled"] and read["below"] == 1.0 and read["read"] == 8 and read["found"] >= 4
    assert read["failed"] == 0 and read["seconds_total"] > 0
    assert "text     read for 8 pages below p 1.0" in score.format_summary(summaries["--text-lines-below=1.0"])
    assert "text " not in score.format_summary(summaries["--no-text-lines"])
    assert summaries["--no-text-lines"]["text_lines"]["enabled"] is False
    assert summaries["--no-text-lines"]["text_lines"]["read"] == 0


def test_score_refuses_both_a_model_and_an_endpoint(tmp_path):
    from pipelines import score

    with pytest.raises(SystemExit):
        score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "m",
                          "--endpoint", "127.0.0.1:1"])
    opts, _ = score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "m"])
    assert opts.tta is False and opts.rotate_threshold == 0.8  # a user's own model keeps the plain defaults
    opts, _ = score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--no-tta",
                                "--rotate-threshold", "0.7"])
    assert opts.tta is False and opts.rotate_threshold == 0.7  # explicit flags win over the built-in defaults


def test_shipped_backbone_blocks_replace_only_the_top_of_the_pretrained_backbone():
    from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

    tuned = default_model.fine_tuned_backbone_layers()
    assert tuned, "the shipped file holds fine-tuned backbone layers"
    assert all(int(name.split("_")[1]) >= 15 for name in tuned)
    pretrained = build_mobilenet_v2_torchvision(weights="default", include_top=False)
    shipped = default_model.build_default_backbone()
    for layer in pretrained.layers:
        before = layer.get_weights()
        after = shipped.get_layer(layer.name).get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(before, after))
        assert same == (layer.name not in tuned), layer.name


def test_fine_tuning_on_cut_activations_moves_only_the_top_convolutions():
    """train_default's fine-tuning step: blocks >= 15 and the head learn; BatchNorm and lower blocks stay."""
    from archive_vision import train_default

    rng = np.random.default_rng(0)
    cut = rng.random((6, 4, 7, 7, 160)).astype(np.float16) * 3
    _, head_init = train_default.build_pooled_head()
    settings = dict(train_default.FINE_TUNE, epochs=1)
    model, head, tuned, _ = train_default.fine_tune_top(head_init, cut, settings=settings)
    names = {layer.name for layer in tuned}
    assert names and all(int(n.split("_")[1]) >= 15 for n in names)
    import keras

    from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in tuned)
    assert "features_18_0" in names  # the last 1x1 conv is tuned too
    pretrained = build_mobilenet_v2_torchvision(weights="default", include_top=False)
    for layer in tuned:  # one Adam step moved every tuned layer away from the pretrained values
        assert not np.array_equal(layer.get_weights()[0], pretrained.get_layer(layer.name).get_weights()[0])
    probabilities = train_default.predict_turns(model, cut)
    assert probabilities.shape == (6, 4, 4)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_export_cli_writes_the_default_model_for_tf_serving(tmp_path, capsys):
    """`archive-vision export --model default --export_base B`: a TF Serving version like any trained model's."""
    from serving import export

    assert export.main(["--model", "default", "--export_base", str(tmp_path), "--version", "7"]) == 0
    version_dir = capsys.readouterr().out.strip().splitlines()[-1]
    assert version_dir == str(tmp_path / "archive_vision" / "7")
    assert (tmp_path / "models.config").exists()  # what tensorflow_model_server --model_config_file reads
    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    assert set(signature.structured_outputs) == {"orientation_probabilities", "orientation_degrees"}


def test_score_reads_the_text_crops_of_unsure_images_and_says_so(monkeypatch, cache_root, tmp_path, turned_images):
    """--text-crops (on by default with the built-in model): every image below --text-crops-below has its crops
    read from the copy made while it was decoded; the answer is the fused one; results and run.json say so."""
    from pipelines import score

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    archive = _archive(tmp_path, turned_images, ("coffee", "page"))
    runs = _score_each(tmp_path, archive, ("--text-crops-below=1.0", "--no-text-crops", "--text-crops"),
                       ("--no-text-lines",))
    summaries = {flag: summary for flag, (summary, _) in runs.items()}
    for flag, (_, rows) in runs.items():
        if flag == "--no-text-crops":
            assert all(r["text_crops"] is None for r in rows.values())
            continue
        if flag == "--text-crops":  # the built-in gate, and the sure images' crops counted when 4 of 5 agree
            recorded = default_model.head_metadata()["text_crops"]
            section = summaries[flag]["text_crops"]
            assert section["agree"] == recorded["agree"] == 4 and section["below"] == recorded["below"]
            assert all(r["text_crops"] in (0, 1) for r in rows.values())  # every image's crops read
            assert section["read"] + section["not_agreed"] == 8 and section["read"] >= 4  # the pages, at least
            assert all(r["text_crops"] == 1 for name, r in rows.items() if name.startswith("page"))
            assert all(r["orientation_degrees"] == int(name.rsplit("_", 1)[1].split(".")[0])
                       for name, r in rows.items() if name.startswith("page"))
            assert "or with at least 4 sure crops agreeing" in score.format_summary(summaries[flag])
            continue
        for file_name, row in rows.items():
            truth = int(file_name.rsplit("_", 1)[1].split(".")[0])
            assert row["text_crops"] == 1, row
            if file_name.startswith("page"):
                assert row["orientation_degrees"] == truth and row["orientation_confidence"] > 0.99, row
    read = summaries["--text-crops-below=1.0"]["text_crops"]
    assert read["enabled"] and read["below"] == 1.0 and read["read"] == 8 and read["failed"] == 0
    assert read["seconds_total"] >= 0 and read["weight"] == default_model.head_metadata()["text_crops"]["weight"]
    assert "crops    read for 8 pages below p 1.0" in score.format_summary(summaries["--text-crops-below=1.0"])
    assert "  crops " not in score.format_summary(summaries["--no-text-crops"])
    assert summaries["--no-text-crops"]["text_crops"] == dict(summaries["--no-text-crops"]["text_crops"],
                                                              enabled=False, read=0)


def test_score_sends_the_built_in_model_the_pixels_it_computes_from_the_original_file(
        monkeypatch, cache_root, tmp_path, model, turned_images):
    """With the built-in model, score's copies are letterboxed by the serving graph's own function and sent as
    lossless PNG at 224 px (--input-prep exact), so each answer is the model's answer on the original file; the
    ingest-style copies (Pillow resize, JPEG) that suit models trained on ingest's shards move it further."""
    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    # PNG files: Pillow and TensorFlow decode them to the same pixels (their JPEG decoders differ by about one
    # level, which moves this model's answers by up to 0.06 however the copy is made).
    archive = tmp_path / "archive"
    archive.mkdir()
    chosen = []
    for name, degrees, data in turned_images:
        if name in ("page", "astronaut"):
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buffer, "PNG")
            (archive / f"{name}_{degrees}.png").write_bytes(buffer.getvalue())
            chosen.append((name, degrees, buffer.getvalue()))
    archive = str(archive)
    direct = {f"{name}_{degrees}.png": p for (name, degrees, _), p in zip(chosen, _probabilities(model, chosen))}
    plain = ("--no-tta", "--no-text-crops", "--no-text-lines")
    runs = _score_each(tmp_path, archive, ("--input-prep=exact", "--input-prep=ingest"), plain)
    assert runs["--input-prep=exact"][0]["options"]["size"] == 224

    def deviation(flag):
        rows = runs[flag][1]
        return max(float(np.abs(np.asarray(rows[f]["orientation_probabilities"]) - p).max())
                   for f, p in direct.items())

    # Not zero: the copy is rounded to whole levels, and the in-process model is the exported, BatchNorm-folded
    # one; on these files the ingest-style copies move answers by about 0.17.
    assert deviation("--input-prep=exact") < 0.05
    assert deviation("--input-prep=exact") < deviation("--input-prep=ingest") / 3
    for file_name, row in runs["--input-prep=exact"][1].items():
        assert row["orientation_degrees"] == int(np.argmax(direct[file_name])) * 90, row
