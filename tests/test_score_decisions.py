"""`score.decide` under a `DecisionPolicy`: the ok / auto_rotate / review bands that README's score section documents,
and where the policy of a run comes from (the model's recorded one, with the thresholds given on the command line).

README: `auto_rotate` (turned and confidence >= the rotate threshold), `ok` (upright and confidence >= the ok
threshold), otherwise `review`; the class threshold also sends low-confidence classes to review; when the graph
scored turned copies, fewer than the minimum agreement of the four agreeing sends it to review (with an agreement
gate P, only answers less sure than P: surer ones, settled by text crops, stand). Each review carries a reason
(`review_reason` in results.parquet) naming what was short.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.score import (DECISION_FLAGS, ModelInfo, ScorePolicyError, decide, local_model_info, parse_args,
                             result_row, run_policy)
from serving.policy import DecisionPolicy, ScorePolicy, policy_from_settings

ARGS = ["--input", "in", "--output", "out"]


def policy(**fields) -> DecisionPolicy:
    """The generic policy (rotate 0.8, ok 0.5, class 0 = off, tta agreement 0.75 for every answer) with `fields`."""
    return DecisionPolicy(**fields)


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
    assert decide(prediction(0, 0.97), policy()) == ("ok", "")


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_turned_and_above_the_rotate_threshold_is_auto_rotate(degrees):
    assert decide(prediction(degrees, 0.95), policy(rotate_threshold=0.8)) == ("auto_rotate", "")


def test_turned_exactly_at_the_rotate_threshold_is_auto_rotate():
    # README: "turned and confidence >= the rotate threshold"
    assert decide(prediction(90, 0.8), policy(rotate_threshold=0.8))[0] == "auto_rotate"


def test_turned_below_the_rotate_threshold_goes_to_review_saying_why():
    decision, reason = decide(prediction(180, 0.7), policy(rotate_threshold=0.8))
    assert decision == "review"
    assert reason == "orientation 180 confidence 0.70 < 0.80"


def test_the_rotate_threshold_moves_the_band():
    # the same answer flips between bands only because of the rotate threshold
    answer = prediction(270, 0.85)
    assert decide(answer, policy(rotate_threshold=0.8))[0] == "auto_rotate"
    assert decide(answer, policy(rotate_threshold=0.9)) == ("review", "orientation 270 confidence 0.85 < 0.90")


def test_upright_below_the_ok_threshold_goes_to_review_saying_why():
    decision, reason = decide(prediction(0, 0.4), policy(ok_threshold=0.5))
    assert decision == "review"
    assert reason == "orientation 0 confidence 0.40 < 0.50"


def test_upright_is_held_to_the_ok_threshold_not_the_rotate_threshold():
    # 0.6 is under the rotate threshold 0.8 but over the ok threshold 0.5: an upright answer needs only the latter
    assert decide(prediction(0, 0.6), policy(rotate_threshold=0.8, ok_threshold=0.5)) == ("ok", "")
    assert decide(prediction(90, 0.6), policy(rotate_threshold=0.8, ok_threshold=0.5))[0] == "review"


@pytest.mark.parametrize("turn", [0, 90], ids=["confident_upright", "confident_turn"])
def test_low_class_confidence_sends_a_confident_answer_to_review(turn):
    decision, reason = decide(prediction(turn, 0.99, class_confidence=0.4), policy(class_threshold=0.6))
    assert (decision, reason) == ("review", "class confidence 0.40 < 0.60")


def test_class_confidence_is_ignored_when_the_class_threshold_is_off_or_met():
    answer = prediction(0, 0.99, class_confidence=0.4)
    assert decide(answer, policy(class_threshold=0.0)) == ("ok", "")  # the default: class never sends to review
    assert decide(answer, policy(class_threshold=0.4)) == ("ok", "")


@pytest.mark.parametrize("turn", [90, 0], ids=["confident_turn", "confident_upright"])
def test_turned_copies_disagreeing_send_a_confident_answer_to_review(turn):
    decision, reason = decide(prediction(turn, 0.99, tta_agreement=0.5), policy(tta_min_agreement=0.75))
    assert (decision, reason) == ("review", "turned copies agree 0.50 < 0.75")


def test_an_answer_the_graph_did_not_turn_is_never_sent_to_review_for_its_copies():
    # serving_default's tta_agreement is -1 for an image whose turned copies were not scored (tta off, or the image
    # was sure enough): nothing disagreed.
    for not_turned in (-1.0, None):
        assert decide(prediction(90, 0.99, tta_agreement=not_turned), policy(tta_min_agreement=1.0)) == \
            ("auto_rotate", "")


@pytest.mark.parametrize("turn", [90, 0], ids=["sure_turn", "sure_upright"])
def test_with_an_agreement_gate_a_sure_answer_stands_when_the_copies_disagree(turn):
    # The built-in model's case: text crops fused into the combined answer made it sure although the image model's
    # four copies disagree; the answer at or above the agreement gate is kept.
    gated = policy(tta_min_agreement=0.75, rotate_threshold=0.9, tta_agreement_below=0.9)
    assert decide(prediction(turn, 0.95, tta_agreement=0.5), gated) == ("ok" if turn == 0 else "auto_rotate", "")
    assert decide(prediction(turn, 0.9, tta_agreement=0.25), gated) == ("ok" if turn == 0 else "auto_rotate", "")


def test_below_the_agreement_gate_disagreeing_copies_still_send_an_answer_to_review():
    gated = policy(tta_min_agreement=0.75, rotate_threshold=0.9, tta_agreement_below=0.9)
    # upright at 0.85 clears the ok threshold 0.5, but is below the gate: the copies' disagreement counts
    assert decide(prediction(0, 0.85, tta_agreement=0.5), gated) == ("review", "turned copies agree 0.50 < 0.75")
    decision, reason = decide(prediction(90, 0.6, tta_agreement=0.5), gated)
    assert reason.split("; ") == ["turned copies agree 0.50 < 0.75", "orientation 90 confidence 0.60 < 0.90"]


def test_enough_turned_copies_agreeing_keeps_the_confident_decision():
    # three of four copies agree (0.75) meets the default minimum agreement 0.75
    assert decide(prediction(90, 0.99, tta_agreement=0.75), policy()) == ("auto_rotate", "")
    assert decide(prediction(0, 0.99, tta_agreement=1.0), policy()) == ("ok", "")


def test_every_shortfall_is_named_in_the_reason():
    decision, reason = decide(prediction(180, 0.6, class_confidence=0.4, tta_agreement=0.25),
                              policy(rotate_threshold=0.8, class_threshold=0.5))
    assert decision == "review"
    assert reason.split("; ") == ["class confidence 0.40 < 0.50", "turned copies agree 0.25 < 0.75",
                                  "orientation 180 confidence 0.60 < 0.80"]


def test_class_only_model_is_ok_unless_its_class_confidence_is_low():
    answer = {"class_probabilities": np.array([0.45, 0.35, 0.2]), "class_ids": 0}
    assert decide(answer, policy()) == ("ok", "")
    assert decide(answer, policy(class_threshold=0.5)) == ("review", "class confidence 0.45 < 0.50")


def test_a_nearly_blank_page_goes_to_review_unless_its_text_crops_settled_it():
    blank = dict(prediction(90, 0.99), ink=0.002, text_crops=-1)  # one short line on a sheet: layout misleads
    decision, reason = decide(blank, policy(sparse_ink_below=0.01))
    assert (decision, reason) == ("review", "nearly blank (ink on 0.2%) and its text crops were not used")
    read = decide(dict(blank, text_crops=0), policy(sparse_ink_below=0.01))  # read, and they did not agree
    assert read == ("review", "nearly blank (ink on 0.2%) and its text crops did not settle it")
    assert decide(dict(blank, text_crops=1), policy(sparse_ink_below=0.01)) == ("auto_rotate", "")
    assert decide(dict(blank, ink=0.08), policy(sparse_ink_below=0.01)) == ("auto_rotate", "")  # a page of text
    assert decide(blank, policy(sparse_ink_below=0.0)) == ("auto_rotate", "")  # off


def test_a_row_carries_the_graphs_answer_and_the_decision_of_the_runs_policy():
    item = {"uri": "u", "page": 0, "sha256": "s", "format": "png", "width": 1, "height": 1, "exif_orientation": 0}
    answer = dict(prediction(90, 0.85, class_confidence=0.7, tta_agreement=0.75), text_crops=1,
                  class_names="photo")
    row = result_row(item, answer, ModelInfo("m", 4), policy(rotate_threshold=0.8))
    assert (row["orientation_degrees"], row["decision"], row["review_reason"]) == (90, "auto_rotate", "")
    assert (row["tta_agreement"], row["text_crops"], row["class_name"], row["model_version"]) == \
        (0.75, 1, "photo", 4)
    assert row["orientation_confidence"] == pytest.approx(0.85)
    strict = result_row(item, answer, ModelInfo("m", 4), policy(rotate_threshold=0.9))
    assert (strict["decision"], strict["review_reason"]) == ("review", "orientation 90 confidence 0.85 < 0.90")
    # The graph's -1 ("not turned", "crops not read") is an empty cell, not a number.
    untouched = result_row(item, dict(answer, tta_agreement=-1.0, text_crops=-1), ModelInfo("m", 4), policy())
    assert (untouched["tta_agreement"], untouched["text_crops"]) == (None, None)


# ---------------------------------------------------------------- where the run's policy comes from


def _recorded(**decision) -> ModelInfo:
    """A model whose export recorded a policy with these decision fields."""
    return ModelInfo("archive_vision", 3, policy=ScorePolicy(decision=DecisionPolicy(**decision)),
                     policy_from="some/export/3")


def test_with_no_decision_flags_the_run_uses_the_models_recorded_policy():
    model = _recorded(rotate_threshold=0.95, tta_agreement_below=0.95)
    opts, _ = parse_args(ARGS + ["--model", "some/export"])
    assert opts.decision_overrides == ()
    assert run_policy(model, opts) == model.policy.decision
    assert decide(prediction(90, 0.93), run_policy(model, opts)) == \
        ("review", "orientation 90 confidence 0.93 < 0.95")


def test_command_line_flags_override_the_models_policy_field_by_field():
    model = _recorded(rotate_threshold=0.9, tta_agreement_below=0.9)
    opts, _ = parse_args(ARGS + ["--model", "some/export", "--rotate-threshold", "0.95", "--ok-threshold", "0.7",
                                 "--class-threshold", "0.5", "--tta-min-agreement", "1.0"])
    used = run_policy(model, opts)
    # the flags given win; the agreement gate, the model's rotate threshold, moves with --rotate-threshold
    assert used == DecisionPolicy(rotate_threshold=0.95, ok_threshold=0.7, class_threshold=0.5,
                                  tta_min_agreement=1.0, tta_agreement_below=0.95,
                                  sparse_ink_below=model.policy.decision.sparse_ink_below)
    gate_apart = _recorded(rotate_threshold=0.9, tta_agreement_below=0.8)
    assert run_policy(gate_apart, opts).tta_agreement_below == 0.8  # a gate of its own stays
    opts, _ = parse_args(ARGS + ["--model", "x", "--rotate-threshold", "0.95", "--tta-agreement-below", "0.6"])
    assert run_policy(model, opts).tta_agreement_below == 0.6
    assert decide(prediction(90, 0.93), used) == ("review", "orientation 90 confidence 0.93 < 0.95")
    assert decide(prediction(0, 0.65), used) == ("review", "orientation 0 confidence 0.65 < 0.70")
    assert decide(prediction(0, 0.99, class_confidence=0.45), used) == ("review", "class confidence 0.45 < 0.50")
    assert decide(prediction(90, 0.85, tta_agreement=0.75), used)[1].split("; ") == [
        "turned copies agree 0.75 < 1.00", "orientation 90 confidence 0.85 < 0.95"]
    assert decide(prediction(90, 0.99, class_confidence=0.9, tta_agreement=0.75), used) == ("auto_rotate", "")
    # the model's policy itself is not changed by a run's flags
    assert model.policy.decision.rotate_threshold == 0.9


@pytest.mark.parametrize("field", DECISION_FLAGS)
def test_thresholds_outside_zero_to_one_are_refused(field):
    with pytest.raises(ValueError, match=field):
        DecisionPolicy(**{field: 1.5})
    for wrong in ("1.5", "-0.1"):
        with pytest.raises(SystemExit):
            parse_args(ARGS + [f"--{field.replace('_', '-')}", wrong])


def test_the_builtin_models_recorded_policy_turns_copies_reads_crops_and_uses_the_stricter_rotate_band():
    # README: the built-in model reads text crops and turns copies only for the images less sure than 0.99, fuses
    # the crops with the gate and weight its training fitted on val, and auto-rotates only at 0.9 unless told
    # otherwise
    from trainer import default_model
    from trainer.default_model import head_metadata

    size = head_metadata()["image_size"]
    recorded = policy_from_settings(default_model.score_settings(), size)
    crops = head_metadata()["text_crops"]
    assert recorded.answer.tta and (recorded.answer.view, recorded.answer.image_size) == ("exact", size)
    read = recorded.answer.text_crops
    assert (read.below, read.weight) == (crops["below"], crops["weight"])
    # The crop rule and the cost gates were chosen on held-out sources instead (research/gates.py): val, which the
    # head was trained on, overrates its stored copy.
    assert (read.agree, read.read_below, recorded.answer.tta_below) == (2, 0.99, 0.99)
    assert read.weight > 0 and read.agree > 0
    # The copies' disagreement counts only below the rotate threshold: surer answers were settled by the crops.
    assert recorded.decision.rotate_threshold == recorded.decision.tta_agreement_below == 0.9
    builtin = ModelInfo("archive_vision", 1, policy=recorded, policy_from="the built-in model")
    generic = ModelInfo("archive_vision", 1)
    plain, _ = parse_args(ARGS)
    answer = prediction(90, 0.85, tta_agreement=1.0)
    assert decide(answer, run_policy(builtin, plain)) == ("review", "orientation 90 confidence 0.85 < 0.90")
    assert decide(answer, run_policy(generic, plain)) == ("auto_rotate", "")
    told, _ = parse_args(ARGS + ["--rotate-threshold", "0.8"])
    assert decide(answer, run_policy(builtin, told)) == ("auto_rotate", "")


def _export_with_metadata(root, metadata, version=3):
    """A model dir whose version `version` holds serving.export's metadata file with `metadata` added (no graph is
    needed to read the model's policy)."""
    from serving.export import EXPORT_METADATA

    version_dir = root / "archive_vision" / str(version)
    (version_dir / "assets.extra").mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"")
    (version_dir / "assets.extra" / EXPORT_METADATA).write_text(
        json.dumps({"model_name": "archive_vision", "version": version, **metadata}))
    return str(root / "archive_vision")


def test_a_local_export_brings_its_recorded_policy(tmp_path):
    """`score --model` on an export takes the decision policy recorded in it: exports since the whole answer moved
    into the graph record `score_policy`; older ones their trainer's `score_settings`, read the same way."""
    settings = {"rotate_threshold": 0.95, "origin": "tuned on val"}
    older = local_model_info(_export_with_metadata(tmp_path / "older", {"score_settings": settings}))
    assert older.policy == policy_from_settings(settings) and older.policy.decision.rotate_threshold == 0.95
    assert older.policy_from == str(tmp_path / "older" / "archive_vision" / "3") and older.version == 3
    recorded = ScorePolicy(decision=DecisionPolicy(rotate_threshold=0.97, ok_threshold=0.6), origin="export")
    newer = local_model_info(_export_with_metadata(tmp_path / "newer", {
        "score_settings": settings, "score_policy": json.loads(recorded.to_json())}))
    assert newer.policy == recorded  # the graph's own policy wins over the settings it was derived from
    opts, _ = parse_args(ARGS + ["--model", "x"])
    assert decide(prediction(90, 0.93), run_policy(older, opts))[0] == "review"
    told, _ = parse_args(ARGS + ["--model", "x", "--rotate-threshold", "0.9"])
    assert decide(prediction(90, 0.93), run_policy(older, told)) == ("auto_rotate", "")


def test_a_model_tuned_from_the_default_is_decided_like_it_without_flags(tmp_path):
    """`train --init default` records the built-in model's score settings in its export: its policy is the built-in
    model's (the same turns, crops and thresholds), with no flag on the command line."""
    from trainer import default_model

    tuned = local_model_info(_export_with_metadata(tmp_path / "tuned", {
        "score_settings": dict(default_model.score_settings(), origin="tuned"), "image_size": 224}))
    builtin = policy_from_settings(default_model.score_settings(), 224)
    assert (tuned.policy.answer, tuned.policy.decision) == (builtin.answer, builtin.decision)


def test_an_export_without_a_recorded_policy_gets_the_generic_one_and_a_broken_one_is_an_error(tmp_path):
    old = local_model_info(_export_with_metadata(tmp_path / "old", {}))
    assert (old.policy, old.policy_from) == (ScorePolicy(), "")
    plain, _ = parse_args(ARGS + ["--model", "x"])
    assert run_policy(old, plain) == DecisionPolicy()
    # Metadata that is there but broken is an error, not a quiet fall back to other thresholds.
    broken = _export_with_metadata(tmp_path / "broken", {})
    (tmp_path / "broken" / "archive_vision" / "3" / "assets.extra" / "archive_vision_export.json").write_text("{")
    with pytest.raises(ScorePolicyError):
        local_model_info(broken)
    unreadable = _export_with_metadata(tmp_path / "unreadable", {"score_policy": {"decision": {"rotate": 0.9}}})
    with pytest.raises(ScorePolicyError, match="cannot be read"):
        local_model_info(unreadable)
    out_of_range = _export_with_metadata(tmp_path / "range", {"score_settings": {"rotate_threshold": 1.5}})
    with pytest.raises(ScorePolicyError, match="rotate_threshold"):
        local_model_info(out_of_range)


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
