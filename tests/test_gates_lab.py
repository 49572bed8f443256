"""research/gates.py recomputes the whole answer in numpy from its ungated parts: it must give what the graph
(serving.answer.WholeAnswer) gives under the same policy, or the gates it chooses are chosen for another answer.
Checked on the synthetic images, model and crop classifier of tests/test_answer_graph.py, whose every copy's answer
is a table row."""
from __future__ import annotations

import numpy as np
import pytest

from research import gates
from serving import policy as P
from tests.test_answer_graph import (CROP_IMAGE_ROWS, CROP_ROWS, GATE_ROWS, SETTLE_CROPS_INK, SETTLE_CROPS_P0,
                                     SETTLE_CROPS_TABLE, STAGE_CROP_ROWS, STAGE_IMAGE_ROWS, LookupModel, StubCropNet,
                                     answer_fn, crop_table, image_bytes, orientation_table, policy_of,
                                     settle_crops_run)

ROWS = {**GATE_ROWS, **CROP_IMAGE_ROWS}
# With first_crops the stub's crops must answer one row at every position (StubCropNet): the staged tables.
STAGED_ROWS = {**GATE_ROWS, **STAGE_IMAGE_ROWS}


def images_of(rows: dict) -> list:
    return [(key, turn) for key in sorted(rows) for turn in range(4)]


def ungated_parts(ink: np.ndarray, rows: dict, crop_rows: dict) -> dict:
    """The parts research.gates.compute_parts would compute for images_of(rows): each copy's table row, each crop's."""
    images = images_of(rows)
    crops = {key: crop_rows.get(key, np.full((5, 4), 0.25)) for key in rows}
    return {"p0": np.stack([rows[k][t] for k, t in images]).astype(np.float32),
            # copy i is the image turned (i + 1) quarters more clockwise
            "turned": np.stack([[rows[k][(t + i + 1) % 4] for i in range(3)] for k, t in images]).astype(np.float32),
            "crops": np.stack([crops[k] for k, _ in images]).astype(np.float32),
            "second": np.full((len(images), 10, 4), 0.25, np.float32), "ink": ink}


@pytest.mark.parametrize("read_below, tta_below, agree, sparse, first, settle", [
    (1.0, 1.0, 3, 0.01, 0, 0.0), (0.85, 0.9, 3, 0.01, 0, 0.0), (0.85, 0.9, 2, 0.3, 0, 0.0), (1.0, 0.9, 0, 0.01, 0, 0.0),
    (0.99, 0.99, 2, 0.01, 2, 0.0), (0.99, 0.99, 2, 0.3, 2, 0.0), (0.9, 0.9, 1, 0.01, 3, 0.0),
    (0.99, 0.99, 2, 0.01, 2, 0.85), (0.99, 0.99, 2, 0.3, 2, 0.85), (0.9, 0.9, 1, 0.01, 3, 0.85)])
def test_the_labs_answer_is_the_graphs(read_below, tta_below, agree, sparse, first, settle):
    rows, crop_rows = (STAGED_ROWS, STAGE_CROP_ROWS) if first else (ROWS, CROP_ROWS)
    images = images_of(rows)
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=agree, sure=0.8, read_below=read_below,
                               first_crops=first, settle_first=settle)
    decision = P.DecisionPolicy(rotate_threshold=0.8, sparse_ink_below=sparse)
    policy = policy_of(tta=True, tta_below=tta_below, crops=crops, decision=decision)
    net = StubCropNet(crop_table(crop_rows))
    out = answer_fn(LookupModel(orientation_table(rows)), policy, net)([image_bytes(k, t) for k, t in images])

    lab = gates.simulate_policy(ungated_parts(out[P.INK], rows, crop_rows), read_below=read_below,
                                tta_below=tta_below, agree=agree, first_crops=first, settle_first=settle,
                                below=crops.below, sure=crops.sure, weight=crops.weight, second_below=0.0,
                                rotate=decision.rotate_threshold, ok=decision.ok_threshold,
                                min_agreement=decision.tta_min_agreement, agreement_below=decision.tta_agreement_below,
                                sparse_ink_below=sparse)

    np.testing.assert_allclose(lab["final"], out[P.ORIENTATION_PROBABILITIES], atol=1e-5)
    assert lab["degrees"].tolist() == (out[P.ORIENTATION_DEGREES] // 90).tolist()
    assert lab["decision"].tolist() == [d.decode() for d in out[P.DECISION]]
    assert lab["read"].tolist() == (out[P.TEXT_CROPS] != -1).tolist()
    assert lab["turned"].tolist() == (out[P.TTA_AGREEMENT] != -1).tolist()
    # The cases differ where they should: some images gated out, some counted (at read_below 0.99 the staged tables
    # read every image).
    if read_below < 0.99 and sparse < 0.25:
        assert 0 < lab["read"].sum() < len(images)
    if tta_below < 1.0:
        assert 0 < lab["turned"].sum() < len(images)
    # The lab counts the crops the graph's classifier read; with first_crops some images settle on their first.
    assert lab["crops_read"].sum() == int(net.crops_seen.numpy())
    if first and sparse < 0.25:
        assert 0 < (lab["crops_read"] == first).sum() < lab["read"].sum()
    if settle:  # the crops first: some images skip the image model, never a nearly blank page
        model_run = (out[P.IMAGE_ORIENTATION_PROBABILITIES] >= 0).all(-1)
        assert lab["model_run"].tolist() == model_run.tolist()
        assert (0 < (~model_run).sum() < len(images)) if sparse < 0.25 else model_run.all()


def _crops_first_parts(first_two: list, ink: float) -> dict:
    """One image per row of `first_two` (its first two crops' probabilities): an unsure stored copy reading 90, turned
    copies that agree, the other three crops and the second look uniform."""
    n = len(first_two)
    p0 = np.tile(np.array([[0.2, 0.6, 0.1, 0.1]], np.float32), (n, 1))
    turned = np.stack([[np.roll(p0[0], i + 1) for i in range(3)]] * n).astype(np.float32)
    crops = np.full((n, 5, 4), 0.25, np.float32)
    crops[:, :2] = np.array(first_two, np.float32)
    return {"p0": p0, "turned": turned, "crops": crops, "second": np.full((n, 10, 4), 0.25, np.float32),
            "ink": np.full(n, ink, np.float32)}


def test_crops_first_skips_the_image_model_only_where_two_sure_crops_agree():
    sure_180 = [0.02, 0.02, 0.94, 0.02]
    parts = _crops_first_parts([[sure_180, sure_180],  # settled: 180 from the crops alone
                                [sure_180, [0.02, 0.94, 0.02, 0.02]],  # sure but naming two turns
                                [sure_180, [0.05, 0.05, 0.85, 0.05]]], ink=0.05)  # one below 0.9
    policy = dict(read_below=0.99, tta_below=0.99, agree=2, first_crops=2)
    shipped, first = gates.simulate(parts, **policy), gates.simulate_crops_first(parts, **policy)

    assert first["model_run"].tolist() == [False, True, True]
    assert first["degrees"][0] == 2 and first["decision"][0] == "auto_rotate" and first["final"][0].max() > 0.9
    assert not first["turned"][0] and not first["second"][0] and first["crops_read"][0] == 2
    # The others are the shipped graph's answers, having read at least their first two crops.
    for key in ("degrees", "decision", "turned"):
        assert first[key][1:].tolist() == shipped[key][1:].tolist()
    assert (first["crops_read"][1:] >= 2).all()
    # The image model skipped is a cheaper modelled page.
    truth = [{"kind": "page", "turn": 2, "up": True}] * 3
    assert gates.summary(first, truth)["page"]["ms"] < gates.summary(shipped, truth)["page"]["ms"]


def test_crops_first_never_settles_a_nearly_blank_page():
    sure_180 = [0.02, 0.02, 0.94, 0.02]
    parts = _crops_first_parts([[sure_180, sure_180]], ink=0.001)
    first = gates.simulate_crops_first(parts, read_below=0.99, tta_below=0.99, agree=2, first_crops=2)
    assert first["model_run"].tolist() == [True]
    assert first["degrees"].tolist() == gates.simulate(parts, read_below=0.99, tta_below=0.99, agree=2,
                                                        first_crops=2)["degrees"].tolist()


def test_crops_first_refuses_what_the_policy_refuses():
    parts = _crops_first_parts([[[0.02, 0.02, 0.94, 0.02]] * 2], ink=0.05)
    for bad in (dict(first_crops=0), dict(settle_first=0.7), dict(agree=3)):
        with pytest.raises(ValueError, match="settle_first"):
            gates.simulate_crops_first(parts, **{**dict(read_below=0.99, tta_below=0.99, agree=2, first_crops=2),
                                                 **bad})


@pytest.mark.parametrize("settle_crops", [0, 3])
def test_the_labs_second_round_is_the_graphs(settle_crops):
    """settle_crops: the lab settles, answers and counts the crops of the images as the graph's _crops_first does
    (tests/test_answer_graph.py's five images, whose crops name their position)."""
    out, _, crops_seen = settle_crops_run(settle_crops)
    count = len(SETTLE_CROPS_TABLE)
    p0 = np.tile(np.asarray([SETTLE_CROPS_P0], np.float32), (count, 1))
    parts = {"p0": p0, "turned": np.stack([p0] * 3, 1), "crops": SETTLE_CROPS_TABLE,
             "second": np.full((count, 10, 4), 0.25, np.float32), "ink": np.asarray(SETTLE_CROPS_INK, np.float32)}
    lab = gates.simulate_policy(parts, read_below=0.99, tta_below=0.99, agree=2, first_crops=2, settle_first=0.9,
                                settle_crops=settle_crops, second_below=0.0, rotate=0.9)
    np.testing.assert_allclose(lab["final"], out[P.ORIENTATION_PROBABILITIES], atol=1e-6)
    assert lab["decision"].tolist() == [d.decode() for d in out[P.DECISION]]
    assert lab["model_run"].tolist() == (out[P.IMAGE_ORIENTATION_PROBABILITIES] >= 0).all(-1).tolist()
    assert lab["turned"].tolist() == (out[P.TTA_AGREEMENT] != -1).tolist()
    assert lab["crops_read"].sum() == crops_seen
    with pytest.raises(ValueError, match="settle"):
        gates.simulate_policy(parts, settle_crops=3)
