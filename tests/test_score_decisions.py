"""`score.decide`: the ok / auto_rotate / review bands that README's score section documents.

README: `auto_rotate` (turned and confidence >= --rotate-threshold), `ok` (upright and confidence >= --ok-threshold),
otherwise `review`; --class-threshold also sends low-confidence classes to review; with --tta, fewer than
--tta-min-agreement of the four turned copies agreeing sends it to review (with --tta-agreement-below P, only
answers less sure than P: surer ones, settled by text crops or lines, stand). Each review carries a reason
(`review_reason` in results.parquet) naming what was short.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.score import ModelInfo, ScoreOptions, decide, parse_args, result_row


def options(**overrides) -> ScoreOptions:
    """The job's defaults for an explicit --model (rotate 0.8, ok 0.5, class 0 = off, tta agreement 0.75)."""
    return ScoreOptions(input="in", output="out", **overrides)


def prediction(degrees: int, confidence: float, *, class_confidence: float | None = None,
               tta_agreement: float | None = None) -> dict:
    """A model answer shaped like serving_default's: `confidence` on `degrees`, the rest spread over the others."""
    rest = (1.0 - confidence) / 3
    orientation = np.full(4, rest)
    orientation[degrees // 90] = confidence
    answer = {"orientation_probabilities": orientation, "orientation_degrees": degrees}
    if class_confidence is not None:
        answer["class_probabilities"] = np.array([class_confidence, (1 - class_confidence) / 2,
                                                  (1 - class_confidence) / 2])
        answer["class_ids"] = 0
    if tta_agreement is not None:
        answer["tta_agreement"] = tta_agreement
    return answer


def test_upright_and_confident_is_ok_without_a_reason():
    assert decide(prediction(0, 0.97), options()) == ("ok", "")


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_turned_and_above_the_rotate_threshold_is_auto_rotate(degrees):
    assert decide(prediction(degrees, 0.95), options(rotate_threshold=0.8)) == ("auto_rotate", "")


def test_turned_exactly_at_the_rotate_threshold_is_auto_rotate():
    # README: "turned and confidence >= --rotate-threshold"
    assert decide(prediction(90, 0.8), options(rotate_threshold=0.8))[0] == "auto_rotate"


def test_turned_below_the_rotate_threshold_goes_to_review_saying_why():
    decision, reason = decide(prediction(180, 0.7), options(rotate_threshold=0.8))
    assert decision == "review"
    assert reason == "orientation 180 confidence 0.70 < 0.80"


def test_the_rotate_threshold_flag_moves_the_band():
    # the same answer flips between bands only because of --rotate-threshold
    answer = prediction(270, 0.85)
    assert decide(answer, options(rotate_threshold=0.8))[0] == "auto_rotate"
    assert decide(answer, options(rotate_threshold=0.9)) == ("review", "orientation 270 confidence 0.85 < 0.90")


def test_upright_below_the_ok_threshold_goes_to_review_saying_why():
    decision, reason = decide(prediction(0, 0.4), options(ok_threshold=0.5))
    assert decision == "review"
    assert reason == "orientation 0 confidence 0.40 < 0.50"


def test_upright_is_held_to_the_ok_threshold_not_the_rotate_threshold():
    # 0.6 is under --rotate-threshold 0.8 but over --ok-threshold 0.5: an upright answer needs only the latter
    assert decide(prediction(0, 0.6), options(rotate_threshold=0.8, ok_threshold=0.5)) == ("ok", "")
    assert decide(prediction(90, 0.6), options(rotate_threshold=0.8, ok_threshold=0.5))[0] == "review"


@pytest.mark.parametrize("turn", [0, 90], ids=["confident_upright", "confident_turn"])
def test_low_class_confidence_sends_a_confident_answer_to_review(turn):
    decision, reason = decide(prediction(turn, 0.99, class_confidence=0.4), options(class_threshold=0.6))
    assert (decision, reason) == ("review", "class confidence 0.40 < 0.60")


def test_class_confidence_is_ignored_when_the_class_threshold_is_off_or_met():
    answer = prediction(0, 0.99, class_confidence=0.4)
    assert decide(answer, options(class_threshold=0.0)) == ("ok", "")  # the default: class never sends to review
    assert decide(answer, options(class_threshold=0.4)) == ("ok", "")


@pytest.mark.parametrize("turn", [90, 0], ids=["confident_turn", "confident_upright"])
def test_turned_copies_disagreeing_send_a_confident_answer_to_review(turn):
    decision, reason = decide(prediction(turn, 0.99, tta_agreement=0.5), options(tta_min_agreement=0.75))
    assert (decision, reason) == ("review", "turned copies agree 0.50 < 0.75")


@pytest.mark.parametrize("turn", [90, 0], ids=["sure_turn", "sure_upright"])
def test_with_an_agreement_gate_a_sure_answer_stands_when_the_copies_disagree(turn):
    # The built-in model's case: text crops or lines fused into the combined answer made it sure although the image
    # model's four copies disagree; the answer at or above --tta-agreement-below is kept.
    gated = options(tta_min_agreement=0.75, rotate_threshold=0.9, tta_agreement_below=0.9)
    assert decide(prediction(turn, 0.95, tta_agreement=0.5), gated) == ("ok" if turn == 0 else "auto_rotate", "")
    assert decide(prediction(turn, 0.9, tta_agreement=0.25), gated) == ("ok" if turn == 0 else "auto_rotate", "")


def test_below_the_agreement_gate_disagreeing_copies_still_send_an_answer_to_review():
    gated = options(tta_min_agreement=0.75, rotate_threshold=0.9, tta_agreement_below=0.9)
    # upright at 0.85 clears --ok-threshold 0.5, but is below the gate: the copies' disagreement counts
    assert decide(prediction(0, 0.85, tta_agreement=0.5), gated) == ("review", "turned copies agree 0.50 < 0.75")
    decision, reason = decide(prediction(90, 0.6, tta_agreement=0.5), gated)
    assert reason.split("; ") == ["turned copies agree 0.50 < 0.75", "orientation 90 confidence 0.60 < 0.90"]


def test_enough_turned_copies_agreeing_keeps_the_confident_decision():
    # three of four copies agree (0.75) meets the default --tta-min-agreement 0.75
    assert decide(prediction(90, 0.99, tta_agreement=0.75), options()) == ("auto_rotate", "")
    assert decide(prediction(0, 0.99, tta_agreement=1.0), options()) == ("ok", "")


def test_every_shortfall_is_named_in_the_reason():
    decision, reason = decide(prediction(180, 0.6, class_confidence=0.4, tta_agreement=0.25),
                              options(rotate_threshold=0.8, class_threshold=0.5))
    assert decision == "review"
    assert reason.split("; ") == ["class confidence 0.40 < 0.50", "turned copies agree 0.25 < 0.75",
                                  "orientation 180 confidence 0.60 < 0.80"]


def test_class_only_model_is_ok_unless_its_class_confidence_is_low():
    answer = {"class_probabilities": np.array([0.45, 0.35, 0.2]), "class_ids": 0}
    assert decide(answer, options()) == ("ok", "")
    assert decide(answer, options(class_threshold=0.5)) == ("review", "class confidence 0.45 < 0.50")


def test_command_line_flags_reach_the_decision():
    opts, _ = parse_args(["--input", "in", "--output", "out", "--model", "some/export", "--rotate-threshold",
                          "0.95", "--ok-threshold", "0.7", "--class-threshold", "0.5", "--tta",
                          "--tta-min-agreement", "1.0"])
    assert decide(prediction(90, 0.9), opts) == ("review", "orientation 90 confidence 0.90 < 0.95")
    assert decide(prediction(0, 0.65), opts) == ("review", "orientation 0 confidence 0.65 < 0.70")
    assert decide(prediction(0, 0.99, class_confidence=0.45), opts) == ("review", "class confidence 0.45 < 0.50")
    assert decide(prediction(90, 0.99, tta_agreement=0.75), opts) == ("review", "turned copies agree 0.75 < 1.00")
    assert decide(prediction(90, 0.99, class_confidence=0.9, tta_agreement=1.0), opts) == ("auto_rotate", "")


@pytest.mark.parametrize("flag", ["rotate_threshold", "ok_threshold", "class_threshold", "tta_min_agreement",
                                  "tta_agreement_below", "tta_below", "text_lines_below", "text_crops_below"])
def test_thresholds_outside_zero_to_one_are_refused(flag):
    with pytest.raises(ValueError, match=flag.replace("_", "-")):
        options(**{flag: 1.5})


def test_builtin_model_defaults_to_turned_copies_and_the_stricter_rotate_band():
    # README: with the built-in model, score turns on --tta (turned copies only for images less sure than the
    # head's tta_below, the one its training chose) and uses --rotate-threshold 0.9 unless told otherwise
    from pipelines.score import DEFAULT_MODEL_TTA_BELOW
    from trainer.default_model import head_metadata

    builtin, _ = parse_args(["--input", "in", "--output", "out"])
    explicit, _ = parse_args(["--input", "in", "--output", "out", "--model", "some/export"])
    assert (builtin.tta, builtin.rotate_threshold) == (True, 0.9)
    # ... reads the text crops of unsure images (and counts those of surer images where enough of them agree), and
    # the text lines of those still unsure after that, with the gates and weights its training fitted on val for
    # that combination.
    crops = head_metadata()["text_crops"]
    assert builtin.text_crops and builtin.text_crops_below == crops["below"] < 1.0
    assert builtin.text_crops_agree == crops["agree"] > 0 and explicit.text_crops_agree == 0
    assert builtin.text_crops_weight == crops["weight"] > 0
    assert builtin.tta_below == crops["tta_below"]
    assert builtin.text_lines and builtin.text_lines_below == crops["text_lines_below"] < 1.0
    assert builtin.text_lines_weights == tuple(crops["text_lines_weights"])
    # Without the crops, the text-line settings chosen for the model alone apply.
    no_crops, _ = parse_args(["--input", "in", "--output", "out", "--no-text-crops"])
    recorded = head_metadata()["text_lines"]
    assert not no_crops.text_crops and no_crops.text_lines_below == recorded["below"] <= 1.0
    assert no_crops.text_lines_weights == tuple(recorded["weights"])
    assert no_crops.tta_below == head_metadata().get("tta_below", DEFAULT_MODEL_TTA_BELOW)
    assert (explicit.tta, explicit.rotate_threshold, explicit.tta_below) == (False, 0.8, 1.0)
    # The copies' disagreement counts below the rotate threshold with the built-in model (following the threshold
    # given), for every answer with another model.
    assert builtin.tta_agreement_below == 0.9 and explicit.tta_agreement_below == 1.0
    stricter, _ = parse_args(["--input", "in", "--output", "out", "--rotate-threshold", "0.97"])
    assert stricter.tta_agreement_below == 0.97
    told, _ = parse_args(["--input", "in", "--output", "out", "--tta-agreement-below", "1.0"])
    assert told.tta_agreement_below == 1.0
    # The built-in model gets the graph's own letterbox at its input size; other models ingest's copies.
    assert (builtin.input_prep, builtin.size) == ("exact", head_metadata()["image_size"])
    assert (explicit.input_prep, explicit.size) == ("ingest", 256)
    assert not explicit.text_crops and explicit.text_crops_below == 1.0
    answer = prediction(90, 0.85, tta_agreement=1.0)
    assert decide(answer, builtin) == ("review", "orientation 90 confidence 0.85 < 0.90")
    assert decide(answer, explicit) == ("auto_rotate", "")


def test_a_failed_run_says_why_in_one_line_even_when_the_runner_wraps_the_error():
    from pipelines.score import PinnedVersionGoneError, run_failure_reason
    from serving.errors import ServingError

    gone = ("model 'archive_vision' version 3 is no longer served at 127.0.0.1:8500 (version 4 was published "
            "mid-run); rerun the job")
    # In process: the exception itself, or one chained under a runner's own.
    assert run_failure_reason(PinnedVersionGoneError(gone)) == f"PinnedVersionGoneError: {gone}"
    try:
        try:
            raise PinnedVersionGoneError(gone)
        except PinnedVersionGoneError as inner:
            raise RuntimeError("bundle failed") from inner
    except RuntimeError as wrapped:
        assert run_failure_reason(wrapped) == f"PinnedVersionGoneError: {gone}"
    # The multi-process DirectRunner re-raises only the worker's traceback text.
    text = ("Traceback (most recent call last):\n  File \"worker.py\", line 1, in process\n"
            f"pipelines.score.PinnedVersionGoneError: {gone}\n")
    assert run_failure_reason(RuntimeError(text)) == f"PinnedVersionGoneError: {gone}"
    assert issubclass(PinnedVersionGoneError, ServingError)
    assert run_failure_reason(RuntimeError("something else broke")) == ""  # not ours: the traceback stays


def test_builtin_tta_below_comes_from_the_heads_training_unless_given(monkeypatch):
    import trainer.default_model

    monkeypatch.setattr(trainer.default_model, "head_metadata", lambda: {"tta_below": 0.7})
    assert parse_args(["--input", "in", "--output", "out"])[0].tta_below == 0.7
    assert parse_args(["--input", "in", "--output", "out", "--tta-below", "1"])[0].tta_below == 1.0
    monkeypatch.setattr(trainer.default_model, "head_metadata", lambda: {})  # a head trained before it was recorded
    from pipelines.score import DEFAULT_MODEL_TTA_BELOW

    assert parse_args(["--input", "in", "--output", "out"])[0].tta_below == DEFAULT_MODEL_TTA_BELOW


def test_text_lines_are_fused_only_into_unsure_answers():
    from pipelines.score import is_unsure, with_text_lines
    from trainer.text_lines import TextLineEvidence

    unsure = {"orientation_probabilities": np.array([0.5, 0.02, 0.46, 0.02]), "orientation_degrees": 0,
              "tta_agreement": 0.75}
    assert is_unsure(unsure, 0.9) and not is_unsure(unsure, 0.5)
    assert not is_unsure({"class_probabilities": np.array([0.3, 0.7])}, 1.0)  # no orientation output
    upside_down = TextLineEvidence(axis=2.0, vote=12.0, lines=6, pieces=14)
    fused = with_text_lines(unsure, upside_down, (0.2, 0.1))
    assert fused["orientation_degrees"] == 180 and fused["text_lines"] == 14
    assert fused["tta_agreement"] == 0.75  # the rest of the prediction is kept
    np.testing.assert_allclose(np.sum(fused["orientation_probabilities"]), 1.0)
    row = result_row({"uri": "u", "page": 0, "sha256": "s", "format": "png", "width": 1, "height": 1,
                      "exif_orientation": 0}, fused, ModelInfo("m", 1), options(rotate_threshold=0.5))
    assert (row["orientation_degrees"], row["text_lines"], row["decision"]) == (180, 14, "auto_rotate")
    nothing = with_text_lines(unsure, TextLineEvidence(), (0.2, 0.1))  # a photo without lines: unchanged
    np.testing.assert_allclose(nothing["orientation_probabilities"], unsure["orientation_probabilities"])
    assert nothing["text_lines"] == 0


def test_builtin_model_reads_text_lines_with_its_heads_settings(monkeypatch):
    import trainer.default_model
    from pipelines import score

    monkeypatch.setattr(trainer.default_model, "head_metadata",
                        lambda: {"text_lines": {"below": 0.8, "weights": [0.3, 0.05]}})
    builtin, _ = parse_args(["--input", "in", "--output", "out"])
    assert (builtin.text_lines, builtin.text_lines_below, builtin.text_lines_weights) == (True, 0.8, (0.3, 0.05))
    explicit, _ = parse_args(["--input", "in", "--output", "out", "--model", "some/export"])
    assert (explicit.text_lines, explicit.text_lines_below) == (False, 1.0)
    chosen, _ = parse_args(["--input", "in", "--output", "out", "--model", "some/export", "--text-lines",
                            "--text-lines-weights", "1,0.5"])
    assert (chosen.text_lines, chosen.text_lines_weights) == (True, (1.0, 0.5))
    off, _ = parse_args(["--input", "in", "--output", "out", "--no-text-lines"])
    assert off.text_lines is False
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--text-lines-weights", "heavy"])
    # Without the ONNX models the built-in default quietly scores without them; asking for them is an error.
    monkeypatch.setattr(score, "builtin_text_lines", lambda *_: {"available": False, "why": "--text-lines: not here",
                                                              "below": 1.0, "weights": (0.2, 0.1)})
    assert parse_args(["--input", "in", "--output", "out"])[0].text_lines is False
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--text-lines"])


def test_a_page_whose_lines_cannot_be_read_keeps_the_models_answer_and_says_so(tmp_path):
    """--text-lines decodes an unsure page again from its file: a file gone, or changed since it was scored, leaves
    the model's answer and text_lines = -1; sure pages are never read."""
    import io

    from PIL import Image

    from pipelines import imaging
    from pipelines.score import _PredictionRouting, text_lines_copy

    path = tmp_path / "page.png"
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1000), "white").save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    item = {"uri": str(path), "page": 0, "sha256": imaging.content_sha256(buffer.getvalue()), "format": "png",
            "width": 2000, "height": 1000, "exif_orientation": 0}
    assert text_lines_copy(item).shape == (800, 1600, 3)  # the reading copy: at most 1600 px on its long side
    routing = _PredictionRouting(ModelInfo("m", 1), options(text_lines=True, text_lines_below=1.0))
    prediction = {"orientation_probabilities": np.array([0.1, 0.7, 0.1, 0.1]), "orientation_degrees": 90}
    assert routing.route(item, prediction, "")["text_lines"] == 0  # read: a blank page shows no lines
    for broken in (dict(item, sha256="0" * 64), dict(item, uri=str(tmp_path / "gone.png"))):
        row = routing.route(broken, prediction, "")
        assert (row["text_lines"], row["orientation_degrees"]) == (-1, 90)
    sure = {"orientation_probabilities": np.array([0.0, 1.0, 0.0, 0.0]), "orientation_degrees": 90}
    strict = _PredictionRouting(ModelInfo("m", 1), options(text_lines=True, text_lines_below=0.9))
    assert strict.route(dict(item, uri=str(tmp_path / "gone.png")), sure, "")["text_lines"] is None


def test_exact_input_prep_needs_the_graphs_letterbox():
    with pytest.raises(ValueError, match="needs --resize-mode pad"):
        options(input_prep="exact", resize_mode="crop")
    with pytest.raises(ValueError, match="--input-prep must be one of"):
        options(input_prep="bicubic")


def test_exact_model_copies_are_the_graphs_own_pixels_and_survive_sending():
    """--input-prep exact: the copy is what trainer.preprocessing computes from the full image (to rounding), and
    the PNG sent decodes to it exactly; an ingest copy is Pillow's resize with the same margins, within about a grey
    level before its JPEG encoding."""
    import io

    from PIL import Image

    from pipelines import imaging
    from pipelines.score import model_copy
    from trainer.preprocessing import resize_for_model

    from archive_vision.sample_archive import render_page

    page = render_page(seed=3).convert("RGB")  # text: sharp edges, where the two resizes differ most
    graph = resize_for_model(np.asarray(page), 224).numpy()
    exact = model_copy(page, options(input_prep="exact", size=224))
    assert exact.size == (224, 224)
    assert np.abs(np.asarray(exact, np.float64) - graph).max() <= 0.5
    sent = imaging.encode(exact, "png", png_level=1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sent)).convert("RGB")), np.asarray(exact))
    ingest = model_copy(page, options(size=224))
    assert 0 < np.abs(np.asarray(ingest, np.float64) - graph).max() <= 1.5


def _export_with_settings(root, settings, version=3):
    """A model dir whose version `version` holds serving.export's metadata file recording `settings` (no graph is
    needed to parse the flags)."""
    from serving.export import EXPORT_METADATA

    version_dir = root / "archive_vision" / str(version)
    (version_dir / "assets.extra").mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"")
    metadata = {"model_name": "archive_vision", "version": version}
    if settings is not None:
        metadata["score_settings"] = settings
    (version_dir / "assets.extra" / EXPORT_METADATA).write_text(json.dumps(metadata))
    return str(root / "archive_vision")


def test_a_model_tuned_from_the_default_is_scored_like_it_without_flags(tmp_path):
    """`train --init default` records the built-in model's score settings in its export: `score --model` on it takes
    the same turns, thresholds, input and text readers as the built-in model (before, it got score's generic
    defaults: no turns, no text readers, ingest's 256 px copies, and far worse answers). Flags given still win."""
    from trainer import default_model

    tuned = _export_with_settings(tmp_path / "tuned", dict(default_model.score_settings(), origin="tuned"))
    builtin, _ = parse_args(["--input", "in", "--output", "out"])
    scored, _ = parse_args(["--input", "in", "--output", "out", "--model", tuned])
    same = ("tta", "rotate_threshold", "tta_agreement_below", "tta_below", "input_prep", "size", "resize_mode",
            "text_crops", "text_crops_below", "text_crops_weight", "text_crops_agree", "text_lines",
            "text_lines_below", "text_lines_weights")
    assert {k: getattr(scored, k) for k in same} == {k: getattr(builtin, k) for k in same}
    assert scored.tta and scored.text_crops and scored.text_crops_agree > 0 and scored.input_prep == "exact"
    assert scored.settings_from == tuned and builtin.settings_from == "the built-in model"
    told, _ = parse_args(["--input", "in", "--output", "out", "--model", tuned, "--no-tta", "--rotate-threshold",
                          "0.8", "--no-text-crops"])
    assert (told.tta, told.rotate_threshold, told.text_crops) == (False, 0.8, False)
    # Without the crops, the text-line gate recorded for the model alone applies, as with the built-in model.
    assert told.text_lines_below == default_model.score_settings()["text_lines"].get("below", 1.0)


def test_a_model_trained_on_ingest_shards_gets_ingests_size_and_an_old_export_scores_as_before(tmp_path):
    trained = _export_with_settings(tmp_path / "trained", {"origin": "ingest", "input_prep": "ingest", "size": 320,
                                                            "resize_mode": "crop", "quality": 80})
    opts, _ = parse_args(["--input", "in", "--output", "out", "--model", trained])
    assert (opts.input_prep, opts.size, opts.resize_mode, opts.quality) == ("ingest", 320, "crop", 80)
    assert (opts.tta, opts.rotate_threshold, opts.text_crops, opts.text_lines, opts.tta_below) == \
        (False, 0.8, False, False, 1.0)
    # An export from before settings were recorded, and a path that holds none, keep score's generic defaults:
    # every option as for a served model nobody said anything about (the readers' weights the shipped head's).
    import dataclasses

    generic = dataclasses.asdict(parse_args(["--input", "in", "--output", "out", "--endpoint", "127.0.0.1:1"])[0])
    from trainer import default_model

    shipped = default_model.score_settings()
    assert generic["text_crops_weight"] == shipped["text_crops"]["weight"]
    assert generic["text_lines_weights"] == tuple(shipped["text_lines"]["weights"])
    assert (generic["text_crops_below"], generic["text_lines_below"], generic["text_crops_agree"]) == (1.0, 1.0, 0)
    for model in (_export_with_settings(tmp_path / "old", None), str(tmp_path / "nothing")):
        old = dataclasses.asdict(parse_args(["--input", "in", "--output", "out", "--model", model])[0])
        assert {k: v for k, v in old.items() if k not in ("endpoint", "model")} == \
            {k: v for k, v in generic.items() if k not in ("endpoint", "model")}
    # Metadata that is there but broken is an error, not a quiet fall back to other settings.
    broken = _export_with_settings(tmp_path / "broken", {})
    (tmp_path / "broken" / "archive_vision" / "3" / "assets.extra" / "archive_vision_export.json").write_text("{")
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--model", broken])


def test_a_served_model_takes_the_settings_of_the_export_named_by_model_settings(tmp_path):
    """TF Serving cannot tell score how its model is meant to be scored: --model-settings names the export the
    server loaded (the same version dir, local or gs://)."""
    from trainer import default_model

    tuned = _export_with_settings(tmp_path / "tuned", default_model.score_settings())
    served, _ = parse_args(["--input", "in", "--output", "out", "--endpoint", "127.0.0.1:8500",
                            "--model-settings", tuned])
    plain, _ = parse_args(["--input", "in", "--output", "out", "--endpoint", "127.0.0.1:8500"])
    assert (served.tta, served.input_prep, served.text_crops, served.rotate_threshold) == (True, "exact", True, 0.9)
    assert (plain.tta, plain.input_prep, plain.text_crops, plain.rotate_threshold) == (False, "ingest", False, 0.8)
    for wrong in (["--endpoint", "127.0.0.1:8500", "--model-settings", str(tmp_path / "nothing")],
                  ["--model", tuned, "--model-settings", tuned]):
        with pytest.raises(SystemExit):
            parse_args(["--input", "in", "--output", "out", *wrong])
    # An export from before settings were recorded still scores (a nightly job keeps running after an upgrade).
    old, _ = parse_args(["--input", "in", "--output", "out", "--endpoint", "127.0.0.1:8500", "--model-settings",
                         _export_with_settings(tmp_path / "old", None)])
    assert (old.tta, old.input_prep, old.size, old.settings_from) == (False, "ingest", 256, "")
