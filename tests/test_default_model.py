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

from serving import builtin
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
    # The model gets about 70% of held-out photo turns right (research/quality.py) and these three are hard for it
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
    from pipelines.score import local_model_info
    from serving import policy as P

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    version_dir = builtin.builtin_model_dir()
    assert version_dir.startswith(cache_root)
    assert os.path.exists(os.path.join(version_dir, "saved_model.pb"))
    assert builtin.builtin_model_dir() == version_dir  # exported once, then reused
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    images = turned_images[:4]
    served = {k: v.numpy() for k, v in serve(images=tf.constant([data for _, _, data in images])).items()}
    # The image model alone on the stored copy is the in-memory model's answer (BatchNorms folded: close, not equal)
    np.testing.assert_allclose(served["image_orientation_probabilities"], _probabilities(model, images), atol=1e-4,
                               err_msg="the image model's view in the graph is not the letterboxed file")
    assert list(served["orientation_degrees"]) == [int(np.argmax(p)) * 90
                                                   for p in served["orientation_probabilities"]]
    # The astronaut under its four turns: the whole answer (turned copies, crops) names every turn.
    assert list(served["orientation_degrees"]) == list(TURNS)
    # How score scores it travels with it: the policy the default model's settings make, read back from the export.
    info = local_model_info(version_dir)
    assert info.policy == P.policy_from_settings(default_model.score_settings(), default_model.DEFAULT_IMAGE_SIZE)
    assert info.policy_from == os.path.abspath(version_dir) and info.name == default_model.DEFAULT_MODEL_NAME
    for i in range(len(images)):
        assert served["decision"][i].decode() == P.decide(
            info.policy.decision, served["orientation_probabilities"][i], float(served["tta_agreement"][i]), None,
            float(served["ink"][i]), int(served["text_crops"][i]))[0]


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
    # The run says whose policy decided: the export's own, turned copies, text crops and the 0.9 threshold.
    policy = summary["policy"]
    assert policy["from"] == summary["model"]["source"]
    assert policy["answer"]["tta"] is True and policy["answer"]["text_crops"]["agree"] == 2
    assert policy["answer"]["tta_below"] == policy["answer"]["text_crops"]["read_below"] == 0.99
    assert policy["answer"]["text_crops"]["first_crops"] == 2  # two crops read before the other three
    assert policy["decision"]["rotate_threshold"] == 0.9 and policy["decision_used"] == policy["decision"]
    assert summary["text_crops"]["enabled"] is True and summary["tta"]["enabled"] is True
    assert summary["counts"]["reconciled"] and summary["counts"]["results"] == 8
    assert summary["counts"]["pages_sent_as_file"] == 8  # JPEGs without an EXIF turn go as they are
    with open(output / "run.json") as f:
        written = json.load(f)
    assert written["tta"]["enabled"] is True and written["policy"] == json.loads(json.dumps(policy))
    rows = _rows_by_file(output)
    for file_name, row in rows.items():
        truth = int(file_name.rsplit("_", 1)[1].split(".")[0])
        assert row["orientation_degrees"] == truth, (file_name, row)
        assert row["decision"] == ("ok" if truth == 0 else "auto_rotate") or row["decision"] == "review", row
    # Every turn is named right (turned copies and crops settle the photo and the page); at the built-in 0.9
    # threshold a turned copy may go to review, but nothing lands in the wrong band.
    assert rows["page_0.jpg"]["decision"] == "ok"
    assert all(rows[f"page_{d}.jpg"]["text_crops"] == 1 for d in TURNS)  # the page's crops settle every turn
    # score decides as the graph does: the served answer's own `decision` for each file, under the same policy
    serve = tf.saved_model.load(summary["model"]["source"]).signatures["serving_default"]
    names = sorted(rows)
    graph = serve(images=tf.constant([open(os.path.join(archive, n), "rb").read() for n in names]))
    assert [rows[n]["decision"] for n in names] == [d.decode() for d in graph["decision"].numpy()]
    np.testing.assert_allclose([rows[n]["orientation_probabilities"] for n in names],
                               graph["orientation_probabilities"].numpy(), atol=1e-6)


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


@pytest.mark.parametrize("flag", ["--no-tta", "--text-lines", "--input-prep=ingest", "--text-crops-below=1.0"])
def test_score_refuses_the_answer_flags_that_moved_into_the_model(tmp_path, flag, capsys):
    """Turns, crops, text lines and the input view are the model's (its recorded policy): a user who still passes
    one of the old flags is told so rather than getting an answer that silently ignored it."""
    from pipelines import score

    with pytest.raises(SystemExit):
        score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), flag])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_score_refuses_both_a_model_and_an_endpoint(tmp_path):
    import dataclasses

    from pipelines import score
    from serving import policy as P

    with pytest.raises(SystemExit):
        score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "m",
                          "--endpoint", "127.0.0.1:1"])
    opts, _ = score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "m"])
    assert opts.decision_overrides == ()  # no flag: the model's recorded policy decides as it is
    builtin = score.ModelInfo(name="m", version=1, policy=P.policy_from_settings(default_model.score_settings()))
    assert score.run_policy(builtin, opts) == builtin.policy.decision
    opts, _ = score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                "--rotate-threshold", "0.7"])
    assert opts.decision_overrides == (("rotate_threshold", 0.7),)
    used = score.run_policy(builtin, opts)  # an explicit threshold wins over the model's; the rest stays the model's
    recorded = builtin.policy.decision
    assert recorded.tta_agreement_below == recorded.rotate_threshold == 0.9
    # ...and the built-in agreement gate, which is its rotate threshold, moves with it
    assert used == P.DecisionPolicy(**dict(dataclasses.asdict(recorded), rotate_threshold=0.7,
                                           tta_agreement_below=0.7))
    with pytest.raises(SystemExit):  # thresholds are shares
        score.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--ok-threshold", "1.5"])


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
    from research import train_default

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
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures["serving_default"].structured_outputs) == {
        "orientation_probabilities", "orientation_degrees", "image_orientation_probabilities", "tta_agreement",
        "text_crops", "second_look", "ink", "decision"}
    from serving.policy import ScorePolicy, policy_from_settings

    policy = ScorePolicy.from_json(loaded.signatures["score_policy"](request=tf.constant([b"?"]))["policy_json"].numpy()[0])
    assert policy == policy_from_settings(default_model.score_settings(), default_model.DEFAULT_IMAGE_SIZE)


def test_score_reads_the_text_crops_with_the_built_in_model_and_says_so(monkeypatch, cache_root, tmp_path,
                                                                          turned_images):
    """The built-in model's graph reads the crops of every image its stored copy is not sure of (below 0.99):
    unsure images (below the head's recorded 0.8) always count them, surer ones when 2 sure crops agree; results
    say per page whether they counted, run.json how many, and how many were not used."""
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import score

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    archive = _archive(tmp_path, turned_images, ("coffee", "page"))
    output = tmp_path / "out"
    summary = score.run(["--input", archive, "--output", str(output), "--no-report"], test_pipeline=TestPipeline())
    rows = _rows_by_file(output)

    recorded = default_model.head_metadata()["text_crops"]
    crops = summary["policy"]["answer"]["text_crops"]
    assert crops["agree"] == default_model.ANSWER_CHOICES["agree"] == 2 and crops["below"] == recorded["below"]
    assert crops["weight"] == recorded["weight"] and crops["read_below"] == 0.99
    states = [r["text_crops"] for r in rows.values()]
    assert set(states) <= {0, 1, None}
    section = summary["text_crops"]
    assert section["enabled"] and section["counted"] >= 4
    assert (section["counted"], section["not_agreed"], section["not_read"]) == (
        states.count(1), states.count(0), states.count(None))
    assert section["counted"] + section["not_agreed"] + section["not_read"] == 8
    assert section["counted"] == sum(r["text_crops"] == 1 for r in rows.values())
    for name, row in rows.items():
        if name.startswith("page"):  # a page's crops agree under every turn and name it right
            assert row["text_crops"] == 1 and row["orientation_degrees"] == int(name.rsplit("_", 1)[1].split(".")[0])
    text = score.format_summary(summary)
    assert f"crops    evidence counted for {section['counted']} pages" in text
    unread = f"not used (the graph's gate) for {section['not_read']}"
    assert (unread in text) == (section["not_read"] > 0) and ("not used" in text) == (section["not_read"] > 0)


def test_score_answers_each_file_as_the_served_model_answers_its_bytes(monkeypatch, cache_root, tmp_path,
                                                                        turned_images):
    """score sends a JPEG or PNG page as the file itself (no EXIF turn, a mode the graph decodes alike), so its
    rows are exactly the export's answer on the original file's bytes; a page that cannot go as it is (a TIFF)
    goes as a lossless PNG of its pixels and gets the answer of those pixels."""
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines import score

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", cache_root)
    archive = tmp_path / "archive"
    archive.mkdir()
    sent = {}
    for name, degrees, data in turned_images:
        if name == "page" or (name == "astronaut" and degrees in (0, 90)):
            (archive / f"{name}_{degrees}.jpg").write_bytes(data)
            sent[f"{name}_{degrees}.jpg"] = data
        if name == "astronaut" and degrees == 180:
            pixels = Image.open(io.BytesIO(data)).convert("RGB")
            for fmt, ext in (("PNG", "png"), ("TIFF", "tif")):
                buffer = io.BytesIO()
                pixels.save(buffer, fmt)
                (archive / f"{name}_{degrees}.{ext}").write_bytes(buffer.getvalue())
            buffer = io.BytesIO()
            pixels.save(buffer, "PNG")
            sent[f"{name}_{degrees}.png"] = sent[f"{name}_{degrees}.tif"] = buffer.getvalue()
    output = tmp_path / "out"
    summary = score.run(["--input", str(archive), "--output", str(output), "--no-report"],
                        test_pipeline=TestPipeline())
    rows = _rows_by_file(output)
    assert summary["counts"]["pages_sent_as_file"] == len(sent) - 1  # all but the TIFF
    names = sorted(sent)
    serve = tf.saved_model.load(summary["model"]["source"]).signatures["serving_default"]
    graph = {k: v.numpy() for k, v in serve(images=tf.constant([sent[n] for n in names])).items()}
    np.testing.assert_allclose([rows[n]["orientation_probabilities"] for n in names],
                               graph["orientation_probabilities"], atol=1e-5)
    assert [rows[n]["orientation_degrees"] for n in names] == graph["orientation_degrees"].tolist()
    assert [rows[n]["decision"] for n in names] == [d.decode() for d in graph["decision"]]
    assert [rows[n]["tta_agreement"] for n in names] == [None if a == -1 else pytest.approx(float(a))
                                                       for a in graph["tta_agreement"]]
