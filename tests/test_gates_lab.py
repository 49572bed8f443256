"""research/gates.py recomputes the whole answer in numpy from its ungated parts: it must give what the graph
(serving.answer.WholeAnswer) gives under the same policy, or the gates it chooses are chosen for another answer.
Checked on the synthetic images, model and crop classifier of tests/test_answer_graph.py, whose every copy's answer
is a table row."""
from __future__ import annotations

import numpy as np
import pytest

from research import gates
from serving import policy as P
from tests.test_answer_graph import (CROP_IMAGE_ROWS, CROP_ROWS, GATE_ROWS, LookupModel, StubCropNet, answer_fn,
                                     crop_table, image_bytes, orientation_table, policy_of)

ROWS = {**GATE_ROWS, **CROP_IMAGE_ROWS}
IMAGES = [(key, turn) for key in sorted(ROWS) for turn in range(4)]


def ungated_parts(ink: np.ndarray) -> dict:
    """The parts research.gates.compute_parts would compute for IMAGES: each copy's table row, each crop's."""
    crops = {key: CROP_ROWS.get(key, np.full((5, 4), 0.25)) for key in ROWS}
    return {"p0": np.stack([ROWS[k][t] for k, t in IMAGES]).astype(np.float32),
            # copy i is the image turned (i + 1) quarters more clockwise
            "turned": np.stack([[ROWS[k][(t + i + 1) % 4] for i in range(3)] for k, t in IMAGES]).astype(np.float32),
            "crops": np.stack([crops[k] for k, _ in IMAGES]).astype(np.float32),
            "second": np.full((len(IMAGES), 10, 4), 0.25, np.float32), "ink": ink}


@pytest.mark.parametrize("read_below, tta_below, agree, sparse", [(1.0, 1.0, 3, 0.01), (0.85, 0.9, 3, 0.01),
                                                                   (0.85, 0.9, 2, 0.3), (1.0, 0.9, 0, 0.01)])
def test_the_labs_answer_is_the_graphs(read_below, tta_below, agree, sparse):
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=agree, sure=0.8, read_below=read_below)
    decision = P.DecisionPolicy(rotate_threshold=0.8, sparse_ink_below=sparse)
    policy = policy_of(tta=True, tta_below=tta_below, crops=crops, decision=decision)
    out = answer_fn(LookupModel(orientation_table(ROWS)), policy, StubCropNet(crop_table(CROP_ROWS)))(
        [image_bytes(k, t) for k, t in IMAGES])

    lab = gates.simulate(ungated_parts(out[P.INK]), read_below=read_below, tta_below=tta_below, agree=agree,
                         below=crops.below, sure=crops.sure, weight=crops.weight, second_below=0.0,
                         rotate=decision.rotate_threshold, ok=decision.ok_threshold,
                         min_agreement=decision.tta_min_agreement, agreement_below=decision.tta_agreement_below,
                         sparse_ink_below=sparse)

    np.testing.assert_allclose(lab["final"], out[P.ORIENTATION_PROBABILITIES], atol=1e-5)
    assert lab["degrees"].tolist() == (out[P.ORIENTATION_DEGREES] // 90).tolist()
    assert lab["decision"].tolist() == [d.decode() for d in out[P.DECISION]]
    assert lab["read"].tolist() == (out[P.TEXT_CROPS] != -1).tolist()
    assert lab["turned"].tolist() == (out[P.TTA_AGREEMENT] != -1).tolist()
    # The cases differ where they should: some images gated out, some counted.
    if read_below < 1.0 and sparse < 0.25:
        assert 0 < lab["read"].sum() < len(IMAGES)
    if tta_below < 1.0:
        assert 0 < lab["turned"].sum() < len(IMAGES)
