"""The whole answer inside the graph (serving.answer.WholeAnswer): turned copies rolled back and averaged, the
tta_below gate, the text-crop evidence and its gates, the fusion, the class outputs and the `decision` output,
each checked against the numpy/Python code that defines it (trainer.text_crops, serving.policy.decide).

The image model here is a tiny Keras model that reads two things off a synthetic PNG: a key (the uniform green and
blue levels) and a turn (which quadrant carries the red marker: top-left when upright). It answers the row of a
table chosen by (key, turn), so each test says exactly what every copy of every image answers. The crop classifier
is a stub that reads the key off its crops the same way and answers a chosen row per crop. The last tests use the
real default model's export.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from serving import answer as A
from serving import policy as P
from tests.test_serving_export import limit_tf_threads
from trainer import text_crops
from trainer.preprocessing import decode_image_bytes

SIZE = 32  # the tiny model's input side
KEYS = 256
QUADRANTS = ((0, 0), (0, 1), (1, 1), (1, 0))  # (row, column) halves of TL, TR, BR, BL: the marker under turns 0..3


limit_tf_threads()


# ---------------------------------------------------------------- synthetic images, model and crop classifier


def image_bytes(key: int, turn: int, side: int = 64) -> bytes:
    """A PNG whose green/blue levels name `key` and whose red top-left marker is turned `turn` quarters clockwise."""
    array = np.zeros((side, side, 3), np.uint8)
    array[..., 1] = 16 * (key // 16) + 8
    array[..., 2] = 16 * (key % 16) + 8
    array[: side // 2, : side // 2, 0] = 255
    array = np.ascontiguousarray(np.rot90(array, k=-turn))  # np.rot90 turns counter-clockwise for positive k
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _key(green, blue):
    """The key from the mean green and blue levels (0..255) of each image."""
    return tf.cast(tf.floor(green / 16.0), tf.int32) * 16 + tf.cast(tf.floor(blue / 16.0), tf.int32)


class LookupModel:
    """Builds the tiny Keras model: pixels [N, S, S, 3] -> {"orientation_probabilities": table[key * 4 + turn]}
    (and "class_probabilities" from `class_table` the same way). Counts the images it is run on."""

    def __new__(cls, table: np.ndarray, class_table: np.ndarray | None = None, orientation: bool = True):
        import keras

        class Lookup(keras.Model):
            def __init__(self):
                super().__init__()
                self.table = tf.constant(table, tf.float32)
                self.class_table = None if class_table is None else tf.constant(class_table, tf.float32)
                self.images_seen = tf.Variable(0, dtype=tf.int64, trainable=False)

            def call(self, pixels, training=False):
                half = SIZE // 2
                red = pixels[..., 0]
                quadrants = tf.stack([tf.reduce_mean(red[:, r * half:(r + 1) * half, c * half:(c + 1) * half],
                                                     axis=[1, 2]) for r, c in QUADRANTS], -1)
                turn = tf.argmax(quadrants, -1, output_type=tf.int32)
                key = _key(tf.reduce_mean(pixels[..., 1], [1, 2]), tf.reduce_mean(pixels[..., 2], [1, 2]))
                row = key * 4 + turn
                self.images_seen.assign_add(tf.cast(tf.shape(pixels)[0], tf.int64))
                out = {}
                if orientation:
                    out[P.ORIENTATION_PROBABILITIES] = tf.gather(self.table, row)
                if self.class_table is not None:
                    out["class_probabilities"] = tf.gather(self.class_table, row)
                return out

        return Lookup()


class StubCropNet(tf.Module):
    """[M, 224, 224, 3] RGB crops in [0, 255] (5 per image, in order; the classifier takes the pixels,
    serving.answer.crop_pixels) -> crop_table[key * 5 + crop index]. The index is
    the position in the call mod 5, so a policy that reads the first crops apart (first_crops) needs tables whose
    five rows are one row (STAGE_CROP_ROWS)."""

    def __init__(self, crop_table: np.ndarray):
        super().__init__()
        self.table = tf.constant(crop_table, tf.float32)
        self.crops_seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, crops):
        blue = tf.reduce_mean(crops[..., 2], [1, 2])
        green = tf.reduce_mean(crops[..., 1], [1, 2])
        position = tf.range(tf.shape(crops)[0]) % 5
        self.crops_seen.assign_add(tf.cast(tf.shape(crops)[0], tf.int64))
        return tf.gather(self.table, _key(green, blue) * 5 + position)


def orientation_table(rows: dict) -> np.ndarray:
    """[KEYS * 4, 4]: rows[key] is [4 turns, 4] (what the model answers for the key's image seen at each turn)."""
    table = np.tile(np.array([0.4, 0.3, 0.2, 0.1], np.float32), (KEYS * 4, 1))
    for key, answers in rows.items():
        table[key * 4:(key + 1) * 4] = np.asarray(answers, np.float32)
    return table


def equivariant(base) -> np.ndarray:
    """A model that sees through turns: the copy turned t answers `base` turned t."""
    return np.stack([np.roll(np.asarray(base, np.float32), t) for t in range(4)])


def crop_table(rows: dict) -> np.ndarray:
    table = np.full((KEYS * 5, 4), 0.25, np.float32)
    for key, crops in rows.items():
        table[key * 5:(key + 1) * 5] = np.asarray(crops, np.float32)
    return table


def answer_fn(model, policy: P.ScorePolicy, crop_net=None, has_class: bool = False, has_orientation: bool = True):
    """The answer as the export builds it: a tf.function over a batch of image bytes, outputs as numpy."""
    whole = A.WholeAnswer(model, policy, has_class, has_orientation, crop_net)
    graph = tf.function(whole, input_signature=[tf.TensorSpec([None], tf.string)])

    def run(images):
        return {k: v.numpy() for k, v in graph(tf.constant(images)).items()}

    return run


def policy_of(tta=False, tta_below=1.0, crops: P.TextCropSettings | None = None,
              decision: P.DecisionPolicy = P.DecisionPolicy()) -> P.ScorePolicy:
    return P.ScorePolicy(answer=P.AnswerSettings(image_size=SIZE, tta=tta, tta_below=tta_below, text_crops=crops),
                         decision=decision)


# ---------------------------------------------------------------- the reference, in numpy


def reference(rows: dict, crops: dict, key: int, turn: int, answer: P.AnswerSettings, sparse: bool = False) -> dict:
    """What the graph must answer for the image (key, turn), computed with trainer.text_crops' numpy code (`sparse`:
    the image is nearly blank under the decision policy)."""
    copies = np.asarray(rows[key], np.float64)[[(turn + j) % 4 for j in range(4)]]  # copy j: turned j more
    p0 = copies[0]
    settings = answer.text_crops
    evidence, counted, state = np.zeros(4), False, -1
    if settings is not None:
        unsure = p0.max() < settings.below
        read = settings.read_below >= 1.0 or p0.max() < settings.read_below or sparse
        if unsure or (settings.agree > 0 and read):
            probabilities = np.asarray(crops[key], np.float32)
            first = settings.first_crops if settings.agree > 0 and settings.read_below < 1.0 else 0
            if 0 < first < len(probabilities) and not sparse:  # the first crops settle it, or all five are read
                head = probabilities[:first]
                fused = text_crops.fuse(p0, text_crops.evidence(head, settings.sure), settings.weight)
                if ((unsure or text_crops.agreement(head, settings.sure) >= max(settings.agree, 1))
                        and fused.max() >= settings.read_below and (head.max(-1) >= settings.sure).all()
                        and (head.argmax(-1) == fused.argmax()).all()):
                    probabilities = head
            counted = bool(unsure or text_crops.agreement(probabilities, settings.sure) >= max(settings.agree, 1))
            state = int(counted)
            evidence = text_crops.evidence(probabilities, settings.sure)
    weight = settings.weight if settings is not None else 0.0
    so_far = text_crops.fuse(p0, evidence, weight) if counted else p0
    combined, agreement = p0, -1.0
    if answer.tta and (answer.tta_below >= 1.0 or so_far.max() < answer.tta_below):
        shifted = np.stack([np.roll(copies[j], -j) for j in range(4)])  # each copy's answer for the stored image
        combined = shifted.mean(0)
        agreement = float(np.mean(shifted.argmax(-1) == combined.argmax()))
    final = text_crops.fuse(combined, evidence, weight) if counted else combined
    return {"probabilities": final, "agreement": agreement, "text_crops": state, "p0": p0}


def python_decision(decision: P.DecisionPolicy, out: dict, i: int) -> str:
    """serving.policy.decide on row i of the graph's own outputs."""
    classes = out.get("class_probabilities")
    return P.decide(decision, out.get(P.ORIENTATION_PROBABILITIES, [None] * (i + 1))[i],
                    float(out[P.TTA_AGREEMENT][i]) if P.TTA_AGREEMENT in out else -1.0,
                    None if classes is None else classes[i],
                    float(out[P.INK][i]) if P.INK in out else None,
                    int(out[P.TEXT_CROPS][i]) if P.TEXT_CROPS in out else None)[0]


def assert_decisions_match_python(out: dict, decision: P.DecisionPolicy) -> None:
    got = [d.decode() for d in out[P.DECISION]]
    assert got == [python_decision(decision, out, i) for i in range(len(got))]


def assert_matches_reference(out: dict, rows: dict, crops: dict, images: list, answer: P.AnswerSettings,
                             sparse: bool = False) -> list:
    want = [reference(rows, crops, key, turn, answer, sparse) for key, turn in images]
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES], np.stack([w["probabilities"] for w in want]),
                               atol=1e-5)
    np.testing.assert_allclose(out[P.IMAGE_ORIENTATION_PROBABILITIES], np.stack([w["p0"] for w in want]), atol=1e-6)
    np.testing.assert_allclose(out[P.TTA_AGREEMENT], [w["agreement"] for w in want], atol=1e-6)
    assert out[P.TEXT_CROPS].tolist() == [w["text_crops"] for w in want]
    assert out[P.ORIENTATION_DEGREES].tolist() == [int(np.argmax(w["probabilities"])) * 90 for w in want]
    return want


# ---------------------------------------------------------------- turned copies


STEADY = 1  # the model sees through turns: every copy names the same upright
DISSENT = 2  # its copy turned 180 more dissents; alone, the stored copy of the image turned 180 is wrong
ROWS = {
    STEADY: equivariant([0.6, 0.2, 0.15, 0.05]),
    DISSENT: np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]]),
}


def test_turned_copies_are_turned_back_before_they_are_averaged():
    images = [(STEADY, t) for t in range(4)] + [(DISSENT, t) for t in range(4)]
    policy = policy_of(tta=True)
    out = answer_fn(LookupModel(orientation_table(ROWS)), policy)([image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, ROWS, {}, images, policy.answer)
    # Copies that all point to the same upright give the image's turn, all four agreeing.
    assert out[P.ORIENTATION_DEGREES][:4].tolist() == [0, 90, 180, 270]
    np.testing.assert_allclose(out[P.TTA_AGREEMENT][:4], 1.0)
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][:4], [np.roll(ROWS[STEADY][0], t) for t in range(4)],
                               atol=1e-6)
    # One copy of four dissents: three quarters agree, and the turns settle the image whose stored copy alone
    # would have been read as 270.
    np.testing.assert_allclose(out[P.TTA_AGREEMENT][4:], 0.75)
    assert out[P.ORIENTATION_DEGREES][4:].tolist() == [0, 90, 180, 270]
    assert int(np.argmax(out[P.IMAGE_ORIENTATION_PROBABILITIES][6])) == 3
    assert out[P.TEXT_CROPS].tolist() == [-1] * 8
    assert_decisions_match_python(out, policy.decision)


def test_without_turns_the_stored_copy_answers_and_agreement_is_minus_one():
    images = [(DISSENT, t) for t in range(4)]
    policy = policy_of(tta=False)
    model = LookupModel(orientation_table(ROWS))
    out = answer_fn(model, policy)([image_bytes(k, t) for k, t in images])

    np.testing.assert_array_equal(out[P.TTA_AGREEMENT], -1.0)
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES], ROWS[DISSENT], atol=1e-6)
    np.testing.assert_allclose(out[P.IMAGE_ORIENTATION_PROBABILITIES], ROWS[DISSENT], atol=1e-6)
    assert out[P.ORIENTATION_DEGREES].tolist() == [0, 90, 270, 270]
    assert int(model.images_seen.numpy()) == 4  # no turned copies were scored
    assert_decisions_match_python(out, policy.decision)


SURE = 3  # the stored copy is sure (0.95), but its turned copies disagree: averaging would change it
UNSURE = 4  # below tta_below at every turn
GATE_ROWS = {
    SURE: np.array([[0.95, 0.02, 0.02, 0.01], [0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.3, 0.3, 0.35, 0.05]]),
    UNSURE: np.array([[0.55, 0.25, 0.15, 0.05], [0.3, 0.45, 0.15, 0.1], [0.1, 0.2, 0.6, 0.1], [0.2, 0.1, 0.1, 0.6]]),
}


def test_tta_below_turns_only_the_unsure_images_of_a_batch():
    images = [(SURE, 0), (UNSURE, 0), (SURE, 0), (UNSURE, 2), (UNSURE, 3)]
    policy = policy_of(tta=True, tta_below=0.9)
    model = LookupModel(orientation_table(GATE_ROWS))
    out = answer_fn(model, policy)([image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, GATE_ROWS, {}, images, policy.answer)
    # The sure images keep their stored copy's answer, unturned; the unsure ones get the average of four.
    assert out[P.TTA_AGREEMENT][[0, 2]].tolist() == [-1.0, -1.0]
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][[0, 2]], [GATE_ROWS[SURE][0]] * 2, atol=1e-6)
    assert all(a >= 0.25 for a in out[P.TTA_AGREEMENT][[1, 3, 4]])
    assert not np.allclose(out[P.ORIENTATION_PROBABILITIES][1], GATE_ROWS[UNSURE][0], atol=1e-3)
    assert int(model.images_seen.numpy()) == 5 + 3 * 3  # the stored copies, and three turns of the three unsure
    assert_decisions_match_python(out, policy.decision)

    # Without the gate the sure image is turned too, and its disagreeing copies move its answer.
    ungated = answer_fn(LookupModel(orientation_table(GATE_ROWS)), policy_of(tta=True, tta_below=1.0))(
        [image_bytes(SURE, 0)])
    assert ungated[P.TTA_AGREEMENT][0] >= 0 and ungated[P.ORIENTATION_PROBABILITIES][0].max() < 0.9


def test_a_batch_of_sure_images_scores_no_turned_copies():
    policy = policy_of(tta=True, tta_below=0.9)
    model = LookupModel(orientation_table(GATE_ROWS))
    out = answer_fn(model, policy)([image_bytes(SURE, 0), image_bytes(SURE, 0)])

    np.testing.assert_array_equal(out[P.TTA_AGREEMENT], -1.0)
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES], [GATE_ROWS[SURE][0]] * 2, atol=1e-6)
    assert int(model.images_seen.numpy()) == 2


# ---------------------------------------------------------------- text crops

CROPS_SETTINGS = P.TextCropSettings(weight=0.7, below=0.8, agree=3, sure=0.8)
READ_UNSURE = 5  # stored copy unsure: its crops count, whatever they agree on
READ_AGREED = 6  # stored copy sure of 0; four sure crops agree on 90
READ_SPLIT = 7  # stored copy sure of 0 (0.92); three sure crops, only two agreeing
READ_BLANK = 8  # stored copy unsure; no crop is sure: nothing to add, so its turned copies decide
CROP_IMAGE_ROWS = {
    READ_UNSURE: equivariant([0.6, 0.25, 0.1, 0.05]),
    READ_AGREED: equivariant([0.9, 0.06, 0.02, 0.02]),
    READ_SPLIT: equivariant([0.92, 0.04, 0.02, 0.02]),
    READ_BLANK: np.array([[0.5, 0.3, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1], [0.3, 0.1, 0.1, 0.5]]),
}
CROP_ROWS = {
    READ_UNSURE: [[0.9, 0.05, 0.03, 0.02], [0.85, 0.05, 0.05, 0.05], [0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.2, 0.2],
                  [0.3, 0.35, 0.2, 0.15]],
    READ_AGREED: [[0.02, 0.95, 0.02, 0.01], [0.05, 0.85, 0.05, 0.05], [0.1, 0.8, 0.05, 0.05], [0.01, 0.97, 0.01, 0.01],
                  [0.4, 0.3, 0.2, 0.1]],
    READ_SPLIT: [[0.05, 0.05, 0.88, 0.02], [0.02, 0.02, 0.94, 0.02], [0.9, 0.05, 0.03, 0.02], [0.4, 0.3, 0.2, 0.1],
                 [0.35, 0.3, 0.25, 0.1]],
    READ_BLANK: [[0.4, 0.3, 0.2, 0.1], [0.3, 0.4, 0.2, 0.1], [0.25, 0.35, 0.3, 0.1], [0.5, 0.2, 0.2, 0.1],
                 [0.3, 0.3, 0.3, 0.1]],
}


def test_text_crop_evidence_is_trainer_text_crops_evidence_and_agreement():
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.full(4, 0.3), size=(40, 5)).astype(np.float32)
    probabilities[0, :, :] = [0.8, 0.1, 0.05, 0.05]  # exactly at `sure` (as float32): counted in both
    probabilities[1, :2] = [0.0, 1.0, 0.0, 0.0]  # log of 0 clipped alike
    evidence, agreeing = A.crop_evidence(tf.constant(probabilities), 0.8)

    np.testing.assert_allclose(evidence.numpy(), text_crops.evidence(probabilities, 0.8), atol=1e-5)
    assert agreeing.numpy().tolist() == text_crops.agreement(probabilities, 0.8).tolist()
    assert agreeing.numpy()[0] == 5


def test_text_crops_count_for_unsure_images_and_for_sure_ones_only_when_enough_sure_crops_agree():
    images = [(READ_UNSURE, 0), (READ_AGREED, 0), (READ_SPLIT, 0), (READ_UNSURE, 1)]
    policy = policy_of(crops=CROPS_SETTINGS)
    net = StubCropNet(crop_table(CROP_ROWS))
    out = answer_fn(LookupModel(orientation_table(CROP_IMAGE_ROWS)), policy, net)(
        [image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, CROP_IMAGE_ROWS, CROP_ROWS, images, policy.answer)
    assert out[P.TEXT_CROPS].tolist() == [1, 1, 0, 1]
    # The fused answer is trainer.text_crops.fuse of the stored copy's answer and the crops' numpy evidence.
    for i, (key, turn) in enumerate(images):
        p = CROP_IMAGE_ROWS[key][turn]
        evidence = text_crops.evidence(np.asarray(CROP_ROWS[key], np.float32), CROPS_SETTINGS.sure)
        want = text_crops.fuse(p, evidence, CROPS_SETTINGS.weight) if out[P.TEXT_CROPS][i] == 1 else p
        np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][i], want, atol=1e-5)
    # Four agreeing sure crops overrule a sure stored answer; two of three do not, and it stands as it was.
    assert out[P.ORIENTATION_DEGREES][1] == 90
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][2], CROP_IMAGE_ROWS[READ_SPLIT][0], atol=1e-6)
    assert int(net.crops_seen.numpy()) == 5 * 4  # agree > 0: every image's crops are read
    assert_decisions_match_python(out, policy.decision)


def test_with_agree_zero_only_the_unsure_images_crops_are_read():
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=0, sure=0.8)
    images = [(READ_AGREED, 0), (READ_UNSURE, 2), (READ_SPLIT, 0)]
    policy = policy_of(crops=crops)
    net = StubCropNet(crop_table(CROP_ROWS))
    out = answer_fn(LookupModel(orientation_table(CROP_IMAGE_ROWS)), policy, net)(
        [image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, CROP_IMAGE_ROWS, CROP_ROWS, images, policy.answer)
    assert out[P.TEXT_CROPS].tolist() == [-1, 1, -1]
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][[0, 2]],
                               [CROP_IMAGE_ROWS[READ_AGREED][0], CROP_IMAGE_ROWS[READ_SPLIT][0]], atol=1e-6)
    assert int(net.crops_seen.numpy()) == 5  # one image read


@pytest.mark.parametrize("nearly_blank", [False, True])
def test_with_read_below_a_sure_images_crops_are_read_only_when_it_is_nearly_blank(nearly_blank):
    """The cost gate: crops are read below read_below, and for a nearly blank page at any confidence (its answer
    stands only when they settle it)."""
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=3, sure=0.8, read_below=0.85)
    images = [(READ_AGREED, 0), (READ_UNSURE, 2), (READ_SPLIT, 0)]
    # Every synthetic image has ink on a quarter of it (the red marker): "nearly blank" below 0.3, never below 0.01.
    decision = P.DecisionPolicy(sparse_ink_below=0.3 if nearly_blank else 0.01)
    policy = policy_of(crops=crops, decision=decision)
    net = StubCropNet(crop_table(CROP_ROWS))
    out = answer_fn(LookupModel(orientation_table(CROP_IMAGE_ROWS)), policy, net)(
        [image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, CROP_IMAGE_ROWS, CROP_ROWS, images, policy.answer, sparse=nearly_blank)
    if nearly_blank:
        assert out[P.TEXT_CROPS].tolist() == [1, 1, 0] and int(net.crops_seen.numpy()) == 5 * 3
        assert out[P.ORIENTATION_DEGREES][0] == 90  # its four agreeing sure crops overrule it, as without the gate
    else:
        assert out[P.TEXT_CROPS].tolist() == [-1, 1, -1] and int(net.crops_seen.numpy()) == 5
        assert out[P.ORIENTATION_DEGREES][0] == 0  # sure (0.9) and not read: the stored copy's answer stands
    assert_decisions_match_python(out, decision)


def test_an_unsure_image_reads_and_counts_its_crops_whatever_read_below_says():
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=3, sure=0.8, read_below=0.5)
    images = [(READ_UNSURE, 0), (READ_AGREED, 0)]
    policy = policy_of(crops=crops)
    net = StubCropNet(crop_table(CROP_ROWS))
    out = answer_fn(LookupModel(orientation_table(CROP_IMAGE_ROWS)), policy, net)(
        [image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, CROP_IMAGE_ROWS, CROP_ROWS, images, policy.answer)
    assert out[P.TEXT_CROPS].tolist() == [1, -1] and int(net.crops_seen.numpy()) == 5


STAGE_SETTLED = 9  # stored copy 0.9 on 90, its crops sure of 90: the first two settle it
STAGE_AGAINST = 10  # stored copy 0.95 on 0, its crops sure of 90: two leave it at 0.64, so all five are read
STAGE_VAGUE = 11  # stored copy 0.85 on 0, no crop sure: nothing settles it, all five read, none counted
STAGE_IMAGE_ROWS = {
    STAGE_SETTLED: equivariant([0.06, 0.9, 0.02, 0.02]),
    STAGE_AGAINST: equivariant([0.95, 0.03, 0.01, 0.01]),
    STAGE_VAGUE: equivariant([0.85, 0.05, 0.05, 0.05]),
}
STAGE_CROP_ROWS = {  # one row for all five crops of an image (see StubCropNet)
    STAGE_SETTLED: [[0.02, 0.9, 0.04, 0.04]] * 5,
    STAGE_AGAINST: [[0.05, 0.9, 0.03, 0.02]] * 5,
    STAGE_VAGUE: [[0.5, 0.3, 0.1, 0.1]] * 5,
}


@pytest.mark.parametrize("nearly_blank", [False, True])
def test_with_first_crops_the_rest_are_read_only_for_the_images_the_first_do_not_settle(nearly_blank):
    """first_crops 2: an image whose first two crops are sure, name its answer and take it to read_below reads two
    crops and keeps their evidence; the others read all five and answer as if read at once. A nearly blank page
    always reads five (its rule wants them)."""
    images = [(STAGE_SETTLED, 0), (STAGE_AGAINST, 0), (STAGE_VAGUE, 0)]
    decision = P.DecisionPolicy(sparse_ink_below=0.3 if nearly_blank else 0.01)
    answers = {}
    for first in (0, 2):
        crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=first)
        policy = policy_of(crops=crops, decision=decision)
        net = StubCropNet(crop_table(STAGE_CROP_ROWS))
        out = answer_fn(LookupModel(orientation_table(STAGE_IMAGE_ROWS)), policy, net)(
            [image_bytes(k, t) for k, t in images])
        assert_matches_reference(out, STAGE_IMAGE_ROWS, STAGE_CROP_ROWS, images, policy.answer, sparse=nearly_blank)
        assert_decisions_match_python(out, decision)
        assert out[P.TEXT_CROPS].tolist() == [1, 1, 0]
        assert out[P.ORIENTATION_DEGREES].tolist() == [90, 90, 0]
        answers[first] = (out, int(net.crops_seen.numpy()))
    (five, seen_five), (staged, seen_staged) = answers[0], answers[2]
    assert seen_five == 15 and seen_staged == (15 if nearly_blank else 2 * 3 + 3 * 2)
    np.testing.assert_array_equal(staged[P.ORIENTATION_PROBABILITIES][1:], five[P.ORIENTATION_PROBABILITIES][1:])
    settled = staged[P.ORIENTATION_PROBABILITIES][0]
    if nearly_blank:
        np.testing.assert_array_equal(settled, five[P.ORIENTATION_PROBABILITIES][0])
    else:  # two crops' evidence, not five: sure enough, but less sure than five
        assert 0.99 <= settled.max() < five[P.ORIENTATION_PROBABILITIES][0].max()


@pytest.mark.parametrize("images, crops_read", [([(SURE, 0)], 0), ([(STAGE_SETTLED, 0)], 2),
                                                 ([(STAGE_SETTLED, 0), (SURE, 0)], 2)])
def test_first_crops_on_a_batch_that_reads_no_crop_or_settles_every_image(images, crops_read):
    """The classifier's two calls skip an empty batch: no image read (a sure one), or none left after the first
    crops (every image settled)."""
    rows = {**GATE_ROWS, **STAGE_IMAGE_ROWS}
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.9, first_crops=2)
    policy = policy_of(crops=crops)
    net = StubCropNet(crop_table(STAGE_CROP_ROWS))
    out = answer_fn(LookupModel(orientation_table(rows)), policy, net)([image_bytes(k, t) for k, t in images])

    assert_matches_reference(out, rows, STAGE_CROP_ROWS, images, policy.answer)
    assert int(net.crops_seen.numpy()) == crops_read
    assert out[P.TEXT_CROPS].tolist() == [1 if key == STAGE_SETTLED else -1 for key, _ in images]


@pytest.mark.parametrize("images, images_seen, crops_seen", [
    # VAGUE and SURE are read (below 0.99), settled by nothing (all five crops) and turned: 2 x (1 + 3) model calls
    ([(STAGE_SETTLED, 0), (STAGE_AGAINST, 1), (STAGE_VAGUE, 0), (SURE, 0)], 8, 4 * 2 + 2 * 3),
    ([(STAGE_SETTLED, 0), (STAGE_AGAINST, 3)], 0, 2 * 2)])  # every image settled: the image model is never called
def test_settle_first_answers_from_two_sure_crops_without_the_image_model(images, images_seen, crops_seen):
    """settle_first: the first two crops of every image are read first; an image whose two are sure (>= 0.85) and
    name one turn takes their answer and never reaches the image model; the others are answered as without
    settle_first, their first crops not read twice."""
    rows = {**GATE_ROWS, **STAGE_IMAGE_ROWS}
    outs, seen = {}, {}
    for settle in (0.0, 0.85):
        crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2,
                                   settle_first=settle, second_below=0.5)
        policy = policy_of(tta=True, tta_below=0.99, crops=crops, decision=P.DecisionPolicy(rotate_threshold=0.9))
        model, net = LookupModel(orientation_table(rows)), StubCropNet(crop_table(STAGE_CROP_ROWS))
        outs[settle] = answer_fn(model, policy, net)([image_bytes(k, t) for k, t in images])
        seen[settle] = int(model.images_seen.numpy()), int(net.crops_seen.numpy())
        assert_decisions_match_python(outs[settle], policy.decision)
    first, before = outs[0.85], outs[0.0]
    settled = np.array([key in (STAGE_SETTLED, STAGE_AGAINST) for key, _ in images])
    # Settled: the crops' answer alone (both read 90 at 0.9), sure, read and counted, nothing else run.
    assert first[P.ORIENTATION_DEGREES][settled].tolist() == [90] * settled.sum()
    assert (first[P.ORIENTATION_PROBABILITIES][settled].max(-1) > 0.95).all()
    assert first[P.DECISION][settled].tolist() == [b"auto_rotate"] * settled.sum()
    assert (first[P.IMAGE_ORIENTATION_PROBABILITIES][settled] == -1).all()
    assert (first[P.TTA_AGREEMENT][settled] == -1).all() and (first[P.SECOND_LOOK][settled] == -1).all()
    assert (first[P.TEXT_CROPS][settled] == 1).all()
    # The others: exactly the answer the image model first gives.
    for key in (P.ORIENTATION_PROBABILITIES, P.IMAGE_ORIENTATION_PROBABILITIES, P.TTA_AGREEMENT, P.TEXT_CROPS,
                P.SECOND_LOOK, P.DECISION, P.INK):
        np.testing.assert_array_equal(first[key][~settled], before[key][~settled])
    looks = 10 * int((first[P.SECOND_LOOK] == 1).sum())  # the second look's crops, for the unsettled alone
    assert seen[0.85] == (images_seen, crops_seen + looks) and seen[0.0][0] > images_seen


def test_settled_images_answer_every_output_the_others_do(monkeypatch):
    """With settle_first the graph's outputs are the ones it has without; an output that only the images still open
    would make fails the trace instead of being dropped from the signature."""
    images = [image_bytes(STAGE_SETTLED, 0), image_bytes(SURE, 0)]
    outs = {}
    for settle in (0.0, 0.85):
        crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2,
                                   settle_first=settle, second_below=0.5)
        policy = policy_of(tta=True, tta_below=0.99, crops=crops)
        outs[settle] = answer_fn(LookupModel(orientation_table({**GATE_ROWS, **STAGE_IMAGE_ROWS})), policy,
                                 StubCropNet(crop_table(STAGE_CROP_ROWS)))(images)
    assert sorted(outs[0.85]) == sorted(outs[0.0])
    answer = A.WholeAnswer._answer
    monkeypatch.setattr(A.WholeAnswer, "_answer",
                        lambda self, *args: {**answer(self, *args), "new_output": args[1]["ink"]})
    with pytest.raises(ValueError, match="new_output"):
        answer_fn(LookupModel(orientation_table({**GATE_ROWS, **STAGE_IMAGE_ROWS})), policy,
                  StubCropNet(crop_table(STAGE_CROP_ROWS)))(images)


def test_settle_first_is_off_for_a_model_with_classes_and_needs_the_first_crops_apart():
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2,
                               settle_first=0.85)
    images = [(STAGE_SETTLED, 0), (STAGE_AGAINST, 0)]
    model = LookupModel(orientation_table(STAGE_IMAGE_ROWS), class_table=np.full((KEYS * 4, 2), 0.5, np.float32))
    out = answer_fn(model, policy_of(crops=crops), StubCropNet(crop_table(STAGE_CROP_ROWS)), has_class=True)(
        [image_bytes(k, t) for k, t in images])
    assert int(model.images_seen.numpy()) == 2 and (out[P.IMAGE_ORIENTATION_PROBABILITIES] >= 0).all()
    for bad in (dict(first_crops=0), dict(read_below=1.0), dict(agree=0), dict(agree=3), dict(settle_first=1.5),
                dict(settle_first=0.7)):  # agree above first_crops, or settle_first below sure (0.8): refused
        with pytest.raises(ValueError, match="settle_first"):
            dataclasses.replace(crops, **bad)


@pytest.mark.parametrize("crop_top, settle, rotate, settled, decision", [
    (0.9, 0.9, 0.9, False, None),  # float32 0.9 is below 0.9 in float64, as every gate compares
    (0.91, 0.9, 0.9, True, b"auto_rotate"),
    (0.91, 0.9, 0.99, True, b"review")])  # settled, but less sure than the rotate threshold: review
def test_settle_first_compares_in_float64_and_a_settled_answer_can_go_to_review(crop_top, settle, rotate, settled,
                                                                                   decision):
    rest = (1.0 - crop_top) / 3
    row = [rest, crop_top, rest, rest]
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2,
                               settle_first=settle)
    policy = policy_of(crops=crops, decision=P.DecisionPolicy(rotate_threshold=rotate))
    model = LookupModel(orientation_table(STAGE_IMAGE_ROWS))
    out = answer_fn(model, policy, StubCropNet(crop_table({STAGE_VAGUE: [row] * 5})))(
        [image_bytes(STAGE_VAGUE, 0)])
    assert int(model.images_seen.numpy()) == (0 if settled else 1)
    if settled:
        assert out[P.ORIENTATION_DEGREES].tolist() == [90] and out[P.DECISION].tolist() == [decision]
        assert_decisions_match_python(out, policy.decision)


class PositionCropNet(tf.Module):
    """Crops whose red level is 10 * (position + 1) and green level 10 * (image + 1) -> table[image, position]: which
    crop of which image was read, whatever the order of the calls (StubCropNet only knows the call's order)."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = tf.constant(np.asarray(table, np.float32).reshape(-1, 4))
        self.crops_seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, crops):
        red = tf.reduce_mean(crops[..., 0], [1, 2])  # the classifier takes RGB pixels (serving.answer.crop_pixels)
        green = tf.reduce_mean(crops[..., 1], [1, 2])
        position = tf.cast(tf.round(red / 10.0), tf.int32) - 1
        image = tf.cast(tf.round(green / 10.0), tf.int32) - 1
        self.crops_seen.assign_add(tf.cast(tf.shape(crops)[0], tf.int64))
        return tf.gather(self.table, image * 5 + position)


def test_first_crops_reads_the_first_crops_first_and_then_the_rest_of_the_unsettled_images_in_order():
    """The crops read first are the first ones (the centre, then the top left), and an unsettled image's other
    three come back in their own places; a settled image's other three are never read (zeros)."""
    sure_90, sure_180, vague = [0.02, 0.9, 0.04, 0.04], [0.02, 0.04, 0.9, 0.04], [0.4, 0.3, 0.2, 0.1]
    table = np.array([[sure_90, sure_90, sure_180, sure_180, sure_180],  # settled by its first two (on 90)
                      [vague, vague, sure_90, sure_90, sure_90]])  # first two unsure: all five read
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2)
    net = PositionCropNet(table)
    whole = A.WholeAnswer(None, policy_of(crops=crops), has_class=False, has_orientation=True, crop_net=net)
    chosen = np.zeros((2, 5, 8, 8, 3), np.float32)
    for image in range(2):
        for position in range(5):
            chosen[image, position, ..., 0] = 10 * (position + 1)
            chosen[image, position, ..., 1] = 10 * (image + 1)
    p0 = tf.constant([[0.06, 0.9, 0.02, 0.02]] * 2)

    batch = tf.constant(chosen)
    probabilities = whole._crop_probabilities(  # noqa: SLF001
        lambda rows, start, stop: A._crops_at(batch, rows, start, stop), 2, p0,  # noqa: SLF001
        tf.constant([False, False]), tf.constant([False, False]), crops).numpy()

    np.testing.assert_allclose(probabilities[0], [sure_90, sure_90] + [[0.0] * 4] * 3, atol=1e-6)
    np.testing.assert_allclose(probabilities[1], table[1], atol=1e-6)
    assert int(net.crops_seen.numpy()) == 2 + 2 + 3


class ConstantModel(tf.Module):
    """Answers `probabilities` for every view (so its turned copies agree), counting the images it sees."""

    def __init__(self, probabilities):
        super().__init__()
        self.probabilities = tf.constant([probabilities], tf.float32)
        self.images_seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, pixels, training=False):
        self.images_seen.assign_add(tf.cast(tf.shape(pixels)[0], tf.int64))
        return {P.ORIENTATION_PROBABILITIES: tf.tile(self.probabilities, [tf.shape(pixels)[0], 1])}


SURE_90, SURE_180, VAGUE = [0.02, 0.94, 0.02, 0.02], [0.02, 0.02, 0.94, 0.02], [0.4, 0.3, 0.2, 0.1]
SURE_BUT_BELOW_SETTLE_180 = [0.05, 0.05, 0.85, 0.05]
SETTLE_CROPS_TABLE = np.array([  # each image's five crops
    [SURE_90, SURE_90, VAGUE, VAGUE, VAGUE],  # settled by its first two
    [SURE_90, VAGUE, SURE_90, VAGUE, VAGUE],  # settled by the third: two of three at 0.94 name 90
    [SURE_90, VAGUE, SURE_180, SURE_90, VAGUE],  # the third names another turn: open
    [SURE_90, SURE_BUT_BELOW_SETTLE_180, SURE_90, SURE_90, SURE_90],  # a sure crop (0.85) names 180: open
    [SURE_90, VAGUE, SURE_90, VAGUE, VAGUE],  # as the second, but nearly blank: never settled
    # open after both rounds (one crop at 0.9 a turn); then its first two settle it with the image model's 90 (the
    # first-crops rule), and its third, read in the second round, must not count
    [SURE_90, [0.05, 0.85, 0.05, 0.05], SURE_180, VAGUE, VAGUE]], np.float32)
SETTLE_CROPS_INK = [0.05, 0.05, 0.05, 0.05, 0.001, 0.05]
SETTLE_CROPS_P0 = [0.06, 0.9, 0.02, 0.02]


def settle_crops_run(settle_crops: int):
    """(outputs, images the model saw, crops the classifier read) of the five SETTLE_CROPS_TABLE images through
    _crops_first, with crops that name their image and position (PositionCropNet)."""
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2,
                               settle_first=0.9, settle_crops=settle_crops)
    policy = policy_of(tta=True, tta_below=0.99, crops=crops, decision=P.DecisionPolicy(rotate_threshold=0.9))
    model, net = ConstantModel(SETTLE_CROPS_P0), PositionCropNet(SETTLE_CROPS_TABLE)
    count = len(SETTLE_CROPS_TABLE)
    chosen = np.zeros((count, 5, 8, 8, 3), np.float32)
    for image in range(count):
        for position in range(5):
            chosen[image, position, ..., 0] = 10 * (position + 1)
            chosen[image, position, ..., 1] = 10 * (image + 1)
    stacked = A.StackedCrops({"view": tf.zeros([count, SIZE, SIZE, 3]), "crops": tf.constant(chosen)})
    whole = A.WholeAnswer(model, policy, has_class=False, has_orientation=True, crop_net=net)
    ink = tf.constant(SETTLE_CROPS_INK, tf.float32)
    run = tf.function(lambda data: whole._crops_first(data, ink, chosen[:, :2], stacked, crops, 0.9),  # noqa: SLF001
                      input_signature=[tf.TensorSpec([None], tf.string)])  # traced, as the export runs it
    out = run(tf.constant([b""] * count))
    return ({key: value.numpy() for key, value in out.items()}, int(model.images_seen.numpy()),
            int(net.crops_seen.numpy()))


def test_settle_crops_reads_a_third_crop_before_the_image_model_for_the_images_still_open():
    """settle_crops 3: an image its first two crops leave open reads its third before the image model, and settles
    when two of the three are at least settle_first sure and name one turn and no sure crop names another; the
    others are answered exactly as with the first two alone, their crops not read twice."""
    out, images_seen, crops_seen = settle_crops_run(3)
    before, images_before, crops_before = settle_crops_run(0)

    model_run = (out[P.IMAGE_ORIENTATION_PROBABILITIES] >= 0).all(-1)
    assert model_run.tolist() == [False, False, True, True, True, True]
    assert (before[P.IMAGE_ORIENTATION_PROBABILITIES][1:] >= 0).all()  # the first two alone settle the first only
    assert out[P.ORIENTATION_DEGREES][:2].tolist() == [90, 90] and out[P.TEXT_CROPS][:2].tolist() == [1, 1]
    # settled by three crops: the evidence of the two sure ones (the third, vague, is no evidence): as the first
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][1], out[P.ORIENTATION_PROBABILITIES][0], atol=1e-7)
    for key in before:  # the open images: bit for bit the answer without the second round
        np.testing.assert_array_equal(out[key][2:], before[key][2:])
    assert out[P.ORIENTATION_DEGREES][5] == 90 and out[P.TEXT_CROPS][5] == 1  # its third crop (180) left out
    # The model sees the four open images, not the second; no crop is read twice: 2 each, the third of the five
    # left open by the first two, then the other two of the three the first-crops rule leaves open.
    assert (images_seen, images_before) == (4, 5)
    assert crops_seen == 2 * 6 + 5 + 2 * 3 and crops_before == 2 * 6 + 3 * 4


def test_settle_crops_needs_settle_first_and_more_crops_than_the_first():
    base = dict(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2, settle_first=0.9)
    assert P.TextCropSettings(**base, settle_crops=3).settle_crops == 3
    for bad in (dict(settle_crops=2), dict(settle_crops=6), dict(settle_first=0.0, settle_crops=3)):
        with pytest.raises(ValueError, match="settle"):
            P.TextCropSettings(**{**base, **bad})


def test_a_policy_recorded_before_read_below_reads_every_images_crops():
    recorded = json.loads(P.ScorePolicy(answer=P.AnswerSettings(text_crops=P.TextCropSettings(agree=4))).to_json())
    del recorded["answer"]["text_crops"]["read_below"]  # an export before format 8
    del recorded["answer"]["text_crops"]["first_crops"]  # ... and before format 10: all five crops at once
    read = P.ScorePolicy.from_dict(recorded).answer.text_crops
    assert (read.read_below, read.first_crops) == (1.0, 0)


def test_crops_and_turns_together_gate_on_the_fused_answer_and_fuse_the_average():
    """An unsure image its crops make sure is not turned; one they leave unsure is, and its final answer is the
    average of the four copies fused with the crops' evidence."""
    images = [(READ_UNSURE, 0), (READ_BLANK, 1), (READ_SPLIT, 0), (READ_AGREED, 3)]
    policy = policy_of(tta=True, tta_below=0.9, crops=CROPS_SETTINGS)
    out = answer_fn(LookupModel(orientation_table(CROP_IMAGE_ROWS)), policy, StubCropNet(crop_table(CROP_ROWS)))(
        [image_bytes(k, t) for k, t in images])

    want = assert_matches_reference(out, CROP_IMAGE_ROWS, CROP_ROWS, images, policy.answer)
    assert out[P.TEXT_CROPS].tolist() == [1, 1, 0, 1]
    assert out[P.TTA_AGREEMENT][0] == -1.0 and CROP_IMAGE_ROWS[READ_UNSURE][0].max() < 0.9  # settled by its crops
    assert out[P.TTA_AGREEMENT][1] >= 0 and want[1]["probabilities"].max() < 0.9  # still unsure: turned
    assert out[P.ORIENTATION_DEGREES][1] == 90
    assert out[P.TTA_AGREEMENT][2] == -1.0  # sure of itself, crops not counted
    assert_decisions_match_python(out, policy.decision)


def _gradient(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 127 + 100 * np.sin(x / 97 + y / 131)], -1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("height, width", [(400, 600), (900, 1300), (150, 100), (3000, 500)])
def test_crop_batch_cuts_the_crops_trainer_text_crops_cuts(height, width):
    image = _gradient(height, width)
    graph = A.crop_pixels().onnx_input(A.crop_batch(tf.constant(np.asarray(image)), P.TextCropSettings())).numpy()
    numpy = text_crops.crops(text_crops.reading_copy(image)).transpose(0, 2, 3, 1)

    assert graph.shape == numpy.shape == (5, 224, 224, 3)
    assert float(np.abs(graph - numpy).mean()) < 0.05  # resampling differs (Pillow's reduce and bilinear)
    # Each crop is cut from the same place: the crops differ from one another far more than from their twin.
    assert min(float(np.abs(graph[i] - numpy[j]).mean()) for i in range(5) for j in range(5) if i != j) > 0.1


# ---------------------------------------------------------------- decoding, the model's view, the ink


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _page_scan(width: int, height: int) -> Image.Image:
    """A typed page (sample_archive.render_page) scanned at width x height."""
    from archive_vision.sample_archive import render_page

    return render_page(seed=5).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("width, height, ratio", [(2480, 3508, 2), (6000, 4000, 4), (1800, 1800, 2),
                                                  (1400, 2000, 1), (3000, 500, 1), (800, 600, 1)])
def test_a_jpeg_is_decoded_dct_scaled_as_far_as_its_reading_copy_allows(width, height, ratio):
    """The copy the readers and the view start from keeps its size and is still an area reduction of at least 2x;
    only the decode before it is cheaper. A 150 dpi page, a strip whose long side binds (3000 x 500 at most 2048
    long) and a small scan are decoded at full size, as before."""
    data = _encoded(_page_scan(width, height), "JPEG", quality=90)
    full = decode_image_bytes(tf.constant(data))
    got = A.decode_for_copy(tf.constant(data), 448, 2048, view_side=224)

    assert tuple(got.shape) == (-(-height // ratio), -(-width // ratio), 3)
    if ratio == 1:
        assert np.array_equal(got.numpy(), full.numpy())
    want, copy = A.reading_copy(full, 448).numpy(), A.reading_copy(got, 448).numpy()
    assert copy.shape == want.shape
    assert float(np.abs(copy - want).mean()) < 2.5  # levels of 255: the same page, DCT-scaled first


def test_a_jpeg_whose_copy_is_too_small_for_the_view_is_decoded_at_full_size():
    """A copy under twice the view's side cannot make the view: the view then needs the full-size pixels."""
    data = _encoded(_page_scan(1000, 1400), "JPEG", quality=90)
    assert tuple(A.decode_for_copy(tf.constant(data), 160, 2048, view_side=224).shape) == (1400, 1000, 3)
    assert tuple(A.decode_for_copy(tf.constant(data), 160, 2048).shape) == (700, 500, 3)  # no view: 1/2


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("GIF", {}), ("BMP", {}), ("JPEG", {"quality": 95})])
def test_other_images_and_small_jpegs_decode_as_the_training_path_decodes_them(fmt, options):
    data = _encoded(_page_scan(420, 600), fmt, **options)
    got = A.decode_for_copy(tf.constant(data), 448, 2048, view_side=224).numpy()
    assert np.array_equal(got, decode_image_bytes(tf.constant(data)).numpy())


@pytest.mark.parametrize("width, height", [(1241, 1754), (2000, 1500), (460, 470)])
def test_the_view_from_the_reading_copy_is_the_view_from_the_full_size_pixels(width, height):
    image = tf.constant(np.asarray(_page_scan(width, height)))
    settings = P.AnswerSettings()
    want = A.model_view(image, settings).numpy()
    got = A.model_view_of(image, A.reading_copy(image, 448), settings).numpy()

    assert got.shape == want.shape == (224, 224, 3)
    assert float(np.abs(got - want).mean()) < 0.5
    assert np.array_equal(got.max(axis=(1, 2)) > 0, want.max(axis=(1, 2)) > 0)  # the same letterbox margins
    assert np.array_equal(got.max(axis=(0, 2)) > 0, want.max(axis=(0, 2)) > 0)


def test_a_small_image_keeps_the_exact_view():
    """Under twice the model's side the reading copy is the image itself: the view is the one training made."""
    image = tf.constant(np.asarray(_page_scan(300, 420)))
    settings = P.AnswerSettings()
    assert np.array_equal(A.model_view_of(image, A.reading_copy(image, 448), settings).numpy(),
                          A.model_view(image, settings).numpy())


def test_the_first_crops_and_the_kept_copies_make_what_prepare_image_makes_bit_for_bit():
    """prepare_first makes the ink and the first crops of every image, and KeptCopies the views and the other crops
    of the images asked for, in any order, from reading copies kept by reference: the same pixels as prepare_image
    (a page whose view is cut from its copy, a small image and a barely reduced one whose views need the decoded
    pixels, a DCT-scaled JPEG, a landscape strip)."""
    settings = P.AnswerSettings(text_crops=P.TextCropSettings())
    crops = settings.text_crops
    files = [_encoded(_page_scan(1241, 1754), "PNG"), _encoded(_page_scan(300, 420), "PNG"),
             _encoded(_page_scan(600, 850), "PNG"), _encoded(_page_scan(3000, 2200), "JPEG", quality=90),
             _encoded(_page_scan(2600, 700), "PNG"), _encoded(_page_scan(150, 100), "PNG")]
    data = tf.constant(files)
    want = [A.prepare_image(tf.constant(f), settings, crops) for f in files]
    early = [not bool(A.view_from_copy(image, A.reading_copy(image, 448), settings))
             for image in (A.decode_for_copy(tf.constant(f), 448, 2048, 224) for f in files)]
    assert early == [False, True, True, False, True, True]  # both kinds of view are checked

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)])
    def run(data, rows):
        ink, first, kept = A.prepare_first(data, settings, crops, 2)
        return ink, first, kept.views(rows), kept.crops(rows, 2, 5), kept.crops(rows[:0], 2, 3)

    rows = [4, 0, 5, 2, 3, 1]
    ink, first, views, later, none = (value.numpy() for value in run(data, tf.constant(rows)))
    assert none.shape == (0, 1, crops.crop, crops.crop, 3)  # no image asked for: no crop cut
    nothing = run(tf.constant([], tf.string), tf.constant([], tf.int32))  # an empty batch
    assert [value.shape[0] for value in nothing] == [0] * 5
    for i, expected in enumerate(want):
        assert ink[i] == expected["ink"].numpy()
        assert np.array_equal(first[i], expected["crops"].numpy()[:2])
    for at, i in enumerate(rows):
        assert np.array_equal(views[at], want[i]["view"].numpy())
        assert np.array_equal(later[at], want[i]["crops"].numpy()[2:])


class PixelNet(tf.Module):
    """A classifier (or, with `model`, an image model) whose answer follows its input's pixels: the image model the
    softmax of the four quadrants' mean red levels, sharpened (its turns and views answer differently); the crop
    classifier upright, the surer the more its crop's red level varies (a crop of text is sure, a margin vague)."""

    def __init__(self, sharpness: float, model: bool = False):
        super().__init__()
        self.sharpness, self.model = sharpness, model

    def __call__(self, pixels, training=False):
        red = pixels[..., 0]
        if not self.model:
            spread = tf.math.reduce_std(red, [1, 2])
            return tf.nn.softmax(tf.stack([self.sharpness * spread] + [tf.zeros_like(spread)] * 3, -1))
        half_h, half_w = tf.shape(pixels)[1] // 2, tf.shape(pixels)[2] // 2
        quads = [red[:, :half_h, :half_w], red[:, :half_h, half_w:], red[:, half_h:, half_w:], red[:, half_h:, :half_w]]
        levels = tf.stack([tf.reduce_mean(q, [1, 2]) for q in quads], -1)
        logits = self.sharpness * (levels - tf.reduce_mean(levels, -1, keepdims=True)) / 255.0
        return {P.ORIENTATION_PROBABILITIES: tf.nn.softmax(logits)}


@pytest.mark.parametrize("settle_crops", [3, 5])
def test_the_whole_answer_from_kept_copies_is_the_answer_from_every_image_prepared(settle_crops):
    """WholeAnswer (prepare_first, the copies kept) answers every output bit for bit as _crops_first over what
    prepare_image made for every image (StackedCrops), with nets whose answers follow the pixels, on pages of
    several sizes and formats (some settled by their crops, some open: turned, and looked at a second time),
    including settle_crops 5 (every crop read before the image model) and an empty batch."""
    crops = P.TextCropSettings(weight=0.7, below=0.8, agree=2, sure=0.8, read_below=0.99, first_crops=2,
                               settle_first=0.9, settle_crops=settle_crops, second_below=0.5)
    policy = P.ScorePolicy(answer=P.AnswerSettings(image_size=64, tta=True, tta_below=0.99, text_crops=crops),
                           decision=P.DecisionPolicy(rotate_threshold=0.9))
    from archive_vision.sample_archive import render_page, render_sparse_page

    pages = [(render_page(seed=seed).convert("RGB"), size, fmt) for seed, size, fmt in
             [(1, (1241, 1754), "PNG"), (2, (1754, 1241), "PNG"), (3, (600, 850), "PNG"), (4, (150, 100), "PNG"),
              (5, (2000, 1500), "JPEG"), (6, (900, 1300), "JPEG"), (7, (1240, 1754), "JPEG"), (8, (700, 2600), "PNG")]]
    pages.append((render_sparse_page(2).convert("RGB"), (1240, 1754), "PNG"))
    files = [_encoded(page.resize(size, Image.Resampling.BICUBIC), fmt) for page, size, fmt in pages]
    whole = A.WholeAnswer(PixelNet(60.0, model=True), policy, has_class=False, has_orientation=True,
                          crop_net=PixelNet(0.07))
    kept = tf.function(whole, input_signature=[tf.TensorSpec([None], tf.string)])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def stacked(data):
        prepared = tf.map_fn(lambda d: A.prepare_image(d, policy.answer, crops), data,
                             fn_output_signature=A.prepared_spec(policy.answer, crops))
        return whole._crops_first(data, prepared["ink"], prepared["crops"][:, :2],  # noqa: SLF001
                                  A.StackedCrops(prepared), crops, 0.9)

    got, want = kept(tf.constant(files)), stacked(tf.constant(files))
    assert set(got) == set(want)
    for key in want:
        assert np.array_equal(got[key].numpy(), want[key].numpy()), key
    model_run = (want[P.IMAGE_ORIENTATION_PROBABILITIES].numpy() >= 0).all(-1)
    assert 0 < model_run.sum() < len(files)  # settled and open images in one batch ...
    assert (want[P.TTA_AGREEMENT].numpy() >= 0).any() and (want[P.SECOND_LOOK].numpy() == 1).any()  # ... turned, looked at
    empty = kept(tf.constant([], tf.string))
    assert all(value.shape[0] == 0 for value in empty.values())


def test_ink_is_measured_against_the_middle_level_and_tells_a_nearly_blank_page_from_a_typed_one():
    from archive_vision.sample_archive import render_page, render_sparse_page

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 400, 3)).astype(np.float32)
    grey = tf.reshape(tf.reduce_mean(tf.image.resize(pixels, [224, 224], method="area"), -1), [-1]).numpy()
    median = np.sort(grey)[224 * 224 // 2]
    assert float(A.ink_share(tf.constant(pixels))) == pytest.approx(np.mean(np.abs(grey - median) > 48.0), abs=1e-7)

    def ink(image: Image.Image) -> float:
        return float(A.ink_share(A.reading_copy(tf.constant(np.asarray(image.convert("RGB"))), 448)))

    sparse = [ink(render_sparse_page(seed)) for seed in range(6)]
    typed = [ink(_page_scan(1240, 1754)), ink(render_page(seed=8))]
    assert max(sparse) < 0.01 < 0.03 < min(typed)


# ---------------------------------------------------------------- decisions

DECISION_POLICIES = [
    P.DecisionPolicy(),
    P.DecisionPolicy(rotate_threshold=0.9, ok_threshold=0.5, tta_min_agreement=0.75, tta_agreement_below=0.9),
    P.DecisionPolicy(rotate_threshold=0.75, ok_threshold=0.625, class_threshold=0.5, tta_min_agreement=1.0),
    P.DecisionPolicy(rotate_threshold=0.8, ok_threshold=0.8, class_threshold=0.0, tta_min_agreement=0.5,
                     tta_agreement_below=0.75, sparse_ink_below=0.0),
]


@pytest.mark.parametrize("decision", DECISION_POLICIES)
def test_the_graphs_decision_is_serving_policy_decide(decision):
    rng = np.random.default_rng(11)
    n = 400
    probabilities = rng.dirichlet(np.full(4, 0.5), size=n).astype(np.float32)
    # Rows whose top value is exactly a threshold (as float32), upright and turned.
    thresholds = [decision.rotate_threshold, decision.ok_threshold, decision.tta_agreement_below, 0.5, 0.75]
    for i, value in enumerate(thresholds * 8):
        column = i % 4
        rest = (1.0 - value) / 3
        probabilities[i] = rest
        probabilities[i, column] = value
    agreement = rng.choice(np.array([-1.0, 0.25, 0.5, 0.75, 1.0], np.float32), size=n)
    classes = rng.dirichlet(np.full(3, 0.7), size=n).astype(np.float32)
    classes[:20, 0] = np.float32(decision.class_threshold or 0.5)
    ink = rng.choice(np.array([0.0, 0.004, 0.01, decision.sparse_ink_below, 0.2], np.float32), size=n)
    counted = rng.random(n) < 0.5

    got = A.decide(decision, tf.constant(probabilities), tf.constant(agreement), tf.constant(classes),
                   tf.constant(ink), tf.constant(counted)).numpy()

    want = [P.decide(decision, probabilities[i], float(agreement[i]), classes[i], float(ink[i]),
                     1 if counted[i] else 0)[0] for i in range(n)]
    assert [d.decode() for d in got] == want
    assert set(want) == {"auto_rotate", "ok", "review"}


# ---------------------------------------------------------------- class outputs

CLASS_ROWS = {  # [4 turns, 3 classes], by key; the class answer moves with the turn, so averaging shows
    SURE: np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]]),
    UNSURE: np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]),
}


def class_table(rows: dict, classes: int = 3) -> np.ndarray:
    table = np.full((KEYS * 4, classes), 1.0 / classes, np.float32)
    for key, answers in rows.items():
        table[key * 4:(key + 1) * 4] = answers
    return table


def test_class_outputs_are_averaged_over_the_turned_copies_of_the_turned_images():
    images = [(SURE, 0), (UNSURE, 1), (UNSURE, 0)]
    policy = policy_of(tta=True, tta_below=0.9)
    out = answer_fn(LookupModel(orientation_table(GATE_ROWS), class_table(CLASS_ROWS)), policy, has_class=True)(
        [image_bytes(k, t) for k, t in images])

    want = np.stack([CLASS_ROWS[SURE][0],  # sure: its stored copy's classes
                     CLASS_ROWS[UNSURE][[1, 2, 3, 0]].mean(0), CLASS_ROWS[UNSURE].mean(0)])
    np.testing.assert_allclose(out["class_probabilities"], want, atol=1e-6)
    assert out["class_ids"].tolist() == want.argmax(-1).tolist()
    assert_decisions_match_python(out, policy.decision)


def test_a_class_only_model_averages_every_images_classes_over_four_turns():
    images = [(SURE, 0), (UNSURE, 3)]
    decision = P.DecisionPolicy(class_threshold=0.45)
    rows = {SURE: np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.3, 0.5, 0.2]]),
            UNSURE: CLASS_ROWS[UNSURE]}
    model = LookupModel(orientation_table({}), class_table(rows), orientation=False)
    out = answer_fn(model, policy_of(tta=True, decision=decision), has_class=True, has_orientation=False)(
        [image_bytes(k, t) for k, t in images])

    want = np.stack([rows[SURE].mean(0), rows[UNSURE].mean(0)])
    np.testing.assert_allclose(out["class_probabilities"], want, atol=1e-6)
    assert P.ORIENTATION_PROBABILITIES not in out
    # No orientation: ok unless the averaged class is unsure (0.5 passes 0.45; 0.375 does not)
    assert [d.decode() for d in out[P.DECISION]] == [
        P.decide(decision, None, -1.0, row)[0] for row in want] == ["ok", "review"]


# ---------------------------------------------------------------- the real default model's export


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    from serving.builtin import export_default_model

    limit_tf_threads()
    version_dir = export_default_model(str(tmp_path_factory.mktemp("default_export")), version=1)
    return version_dir, tf.saved_model.load(version_dir)


def _real_images() -> list[bytes]:
    from skimage import data as skimage_data

    from archive_vision.sample_archive import render_page

    images = []
    for array in (skimage_data.astronaut(), np.asarray(render_page(seed=3).convert("RGB"))):
        for turn in (0, 1, 2):
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(np.rot90(array, -turn))).save(buffer, "JPEG", quality=90)
            images.append(buffer.getvalue())
    return images


def test_the_default_export_decides_under_its_own_policy(default_export):
    from trainer import default_model

    version_dir, loaded = default_export
    out = loaded.signatures[P.POLICY_SIGNATURE](**{P.POLICY_INPUT: tf.constant([b"?"])})[P.POLICY_OUTPUT]
    policy = P.ScorePolicy.from_json(out.numpy()[0])
    assert policy == P.policy_from_settings(default_model.score_settings(), default_model.DEFAULT_IMAGE_SIZE)
    assert policy.answer.tta and policy.answer.text_crops is not None
    with open(os.path.join(version_dir, "assets.extra", "archive_vision_export.json")) as f:
        assert P.ScorePolicy.from_dict(json.load(f)["score_policy"]) == policy

    out = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(_real_images())).items()}

    assert {P.ORIENTATION_PROBABILITIES, P.ORIENTATION_DEGREES, P.IMAGE_ORIENTATION_PROBABILITIES, P.TTA_AGREEMENT,
            P.TEXT_CROPS, P.DECISION} <= set(out)
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES].sum(-1), 1.0, atol=1e-5)
    assert out[P.ORIENTATION_DEGREES].tolist() == (out[P.ORIENTATION_PROBABILITIES].argmax(-1) * 90).tolist()
    assert set(out[P.TEXT_CROPS].tolist()) <= {-1, 0, 1}
    assert all(a == -1.0 or a in (0.25, 0.5, 0.75, 1.0) for a in out[P.TTA_AGREEMENT].tolist())
    # Crops are read for the images the stored copy is not sure of (below read_below) and for nearly blank ones.
    crops = policy.answer.text_crops
    # With settle_first, an image its first crops settled has no image model answer (-1), its crops counted.
    settled = (out[P.IMAGE_ORIENTATION_PROBABILITIES] == -1).all(-1)
    assert (out[P.TEXT_CROPS][settled] == 1).all() and (out[P.TTA_AGREEMENT][settled] == -1).all()
    read = settled | (out[P.IMAGE_ORIENTATION_PROBABILITIES].max(-1).astype(np.float64) < crops.read_below) | (
        out[P.INK].astype(np.float64) < policy.decision.sparse_ink_below)
    assert ((out[P.TEXT_CROPS] != -1) == read).all()
    # The page's crops count under every turn, and the page is named right under every turn.
    assert out[P.TEXT_CROPS][3:].tolist() == [1, 1, 1]
    assert out[P.ORIENTATION_DEGREES][3:].tolist() == [0, 90, 180]
    assert_decisions_match_python(out, policy.decision)
