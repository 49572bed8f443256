"""research/gates.py recomputes the whole answer in numpy from its ungated parts: it must give what the graph
(serving.answer.WholeAnswer) gives under the same policy, or the gates it chooses are chosen for another answer.
Checked on the synthetic images, model and crop classifier of tests/test_answer_graph.py, whose every copy's answer
is a table row."""
from __future__ import annotations

import numpy as np
import pytest

from research import gates
from serving import policy as P
from tests.test_answer_graph import (CROP_IMAGE_ROWS, CROP_ROWS, GATE_ROWS, STAGE_CROP_ROWS, STAGE_IMAGE_ROWS,
                                     LookupModel, StubCropNet, answer_fn, crop_table, image_bytes, orientation_table,
                                     policy_of)

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


@pytest.mark.parametrize("read_below, tta_below, agree, sparse, first", [
    (1.0, 1.0, 3, 0.01, 0), (0.85, 0.9, 3, 0.01, 0), (0.85, 0.9, 2, 0.3, 0), (1.0, 0.9, 0, 0.01, 0),
    (0.99, 0.99, 2, 0.01, 2), (0.99, 0.99, 2, 0.3, 2), (0.9, 0.9, 1, 0.01, 3)])
def test_the_labs_answer_is_the_graphs(read_below, tta_below, agree, sparse, first):
    rows, crop_rows = (STAGED_ROWS, STAGE_CROP_ROWS) if first else (ROWS, CROP_ROWS)
    images = images_of(rows)
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=agree, sure=0.8, read_below=read_below,
                               first_crops=first)
    decision = P.DecisionPolicy(rotate_threshold=0.8, sparse_ink_below=sparse)
    policy = policy_of(tta=True, tta_below=tta_below, crops=crops, decision=decision)
    net = StubCropNet(crop_table(crop_rows))
    out = answer_fn(LookupModel(orientation_table(rows)), policy, net)([image_bytes(k, t) for k, t in images])

    lab = gates.simulate(ungated_parts(out[P.INK], rows, crop_rows), read_below=read_below, tta_below=tta_below,
                         agree=agree, first_crops=first, below=crops.below, sure=crops.sure, weight=crops.weight,
                         second_below=0.0, rotate=decision.rotate_threshold, ok=decision.ok_threshold,
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
