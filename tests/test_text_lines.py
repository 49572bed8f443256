"""Text-line evidence (trainer.text_lines): the real PP-OCR networks read a rendered page under every turn, the
evidence maps onto the right turns, and its weights and gate are fitted the way the docstrings say."""
from __future__ import annotations

import numpy as np
import pytest

from research import orientation_corpus as corpus
from research.train_default import choose_text_lines
from trainer import text_lines

TURNS = (0, 90, 180, 270)


def _turned(array: np.ndarray, degrees: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(array, k=-(degrees // 90)))  # np.rot90 turns counter-clockwise


@pytest.fixture(scope="module")
def reader():
    if not text_lines.available():
        pytest.fail("the text-line models are part of the install (setup.py): pip install -e .")
    return text_lines.TextLineReader()


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    from archive_vision.sample_archive import render_page

    return np.asarray(render_page(seed=5).convert("RGB"))


@pytest.mark.parametrize("degrees", TURNS)
def test_the_lines_of_a_turned_page_say_which_turn_it_is(reader, page, degrees):
    evidence = reader.read(_turned(page, degrees))
    assert evidence.lines >= 5 and evidence.pieces >= evidence.lines
    assert evidence.vertical == (degrees in (90, 270))
    # On its own (a model with no opinion: uniform probabilities), the evidence names the turn, and surely.
    fused = text_lines.fuse(np.full(4, 0.25), evidence, 1.0, 1.0)
    assert int(np.argmax(fused)) * 90 == degrees
    assert fused.max() > 0.99


def test_an_image_without_text_gives_no_evidence_and_leaves_the_model_alone(reader):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(60, 200, size=(6, 8, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    evidence = reader.read(smooth)
    assert (evidence.lines, evidence.pieces, evidence.vote) == (0, 0, 0.0)
    model = np.array([0.1, 0.6, 0.2, 0.1])
    np.testing.assert_allclose(text_lines.fuse(model, evidence, 0.3, 0.3), model, atol=1e-9)


def test_grey_and_tiny_images_are_read_without_error(reader, page):
    grey = page[:, :, 0]
    assert reader.read(grey).lines >= 5
    assert reader.read(np.full((5, 7, 3), 255, np.uint8)).pieces == 0


def test_evidence_terms_favour_the_turns_the_lines_point_to():
    def best(**kw):
        return int(np.argmax(sum(text_lines.terms(text_lines.evidence_array(text_lines.TextLineEvidence(**kw))))))

    assert best(axis=3.0, vote=-8.0) == 0  # lines across, upright glyphs
    assert best(axis=3.0, vote=8.0) == 2  # lines across, upside-down glyphs
    # Lines running down were turned a quarter counter-clockwise to be read: upright glyphs then mean the image
    # was turned 90 clockwise, upside-down ones 270.
    assert best(axis=-3.0, vote=-8.0, vertical=True) == 1
    assert best(axis=-3.0, vote=8.0, vertical=True) == 3
    row = text_lines.evidence_array(text_lines.TextLineEvidence(1.5, -2.0, True, 4, 9))
    assert text_lines.from_array(row) == text_lines.TextLineEvidence(1.5, -2.0, True, 4, 9)


def _constructed(n: int, seed: int, informative: bool):
    """A model unsure between upright and upside down (half of its answers wrong that way), and evidence that
    knows (informative) or is noise."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n)
    probs = np.full((n, 4), 0.02)
    flipped = (truth + 2 * (rng.random(n) < 0.5)) % 4
    probs[np.arange(n), flipped] = 0.55
    probs[np.arange(n), (flipped + 2) % 4] = 0.41
    vote = np.where(truth >= 2, 6.0, -6.0) if informative else rng.normal(0, 6.0, n)
    rows = np.stack([np.where(truth % 2 == 0, 2.0, -2.0), vote, (truth % 2 == 1).astype(float),
                     np.full(n, 5.0), np.full(n, 10.0)], axis=1)
    return probs / probs.sum(1, keepdims=True), rows, truth


def test_weights_are_fitted_by_likelihood_and_stay_at_zero_for_noise():
    probs, rows, truth = _constructed(400, 0, informative=True)
    (axis_w, vote_w), sweep = text_lines.fit_weights(probs, rows, truth)
    assert vote_w > 0 and sweep[(axis_w, vote_w)][1] > 0.99 > sweep[(0.0, 0.0)][1] + 0.4
    # Noise: at most the smallest weight tried, which changes next to nothing.
    probs, rows, truth = _constructed(400, 1, informative=False)
    (axis_w, vote_w), sweep = text_lines.fit_weights(probs, rows, truth)
    assert vote_w <= 0.02
    assert sweep[(axis_w, vote_w)][0] > sweep[(axis_w, 0.0)][0] - 0.01


def test_the_gate_reads_only_unsure_images_when_that_keeps_the_accuracy():
    # [N, 4 turns, 4] (row turn d is right at column d). Half the pages are sure and right (p 0.97) and show no
    # lines; the other half are unsure between d and d + 180 (wrong half of the time), and their lines know.
    n = 100
    probs = np.full((2 * n, 4, 4), 0.01)
    rows = np.zeros((2 * n, 4, 5))
    wrong = np.random.default_rng(3).random((n, 4)) < 0.5
    for d in range(4):
        probs[n:, d, d] = 0.97
        said = np.where(wrong[:, d], (d + 2) % 4, d)
        probs[np.arange(n), d, said] = 0.55
        probs[np.arange(n), d, (said + 2) % 4] = 0.43
        rows[:n, d] = (2.0 if d % 2 == 0 else -2.0, 6.0 if d >= 2 else -6.0, d % 2, 5, 10)
    kinds = np.array([corpus.PAGE] * (2 * n))
    weights, below, sweep = choose_text_lines(probs, rows, kinds)
    assert weights[1] > 0
    assert sweep[1.0]["pages"] == 1.0 and sweep[0.5]["pages"] < 0.9  # reading nobody keeps the mistakes
    assert below == 0.7 and sweep[below]["pages"] == 1.0  # the lowest gate that reads every unsure page
    assert sweep[below]["pages_read"] == pytest.approx(0.5)  # the sure half is never read
    assert sweep[below]["band_right"] == 1.0


def test_missing_models_name_the_package_to_install(monkeypatch):
    monkeypatch.setattr(text_lines.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(text_lines.TextLinesUnavailable, match="pip install rapidocr_onnxruntime"):
        text_lines.models_dir()
    assert not text_lines.available()


def test_train_default_reads_val_once_and_records_the_chosen_settings(tmp_path, monkeypatch, page):
    """_choose_text_lines_on_val (train_default's step): reads val's images under four turns into the feature cache,
    fits the weights and gate, and returns what the head records; a second run reads nothing again."""
    from research import train_default
    from archive_vision.sample_archive import render_page

    paths = []
    for seed in (1, 2):
        path = tmp_path / f"page{seed}.png"
        render_page(seed=seed).save(path)
        paths.append(str(path))
    images = [corpus.CorpusImage(path=p, kind=corpus.PAGE, package="t", member=p, group=p, split=corpus.VAL)
              for p in paths]
    # The model is unsure between each turn and its opposite (wrong half the time): the lines must decide.
    probs = np.full((2, 4, 4), 0.02)
    for d in range(4):
        probs[0, d, d], probs[0, d, (d + 2) % 4] = 0.49, 0.47
        probs[1, d, (d + 2) % 4], probs[1, d, d] = 0.49, 0.47
    kinds = np.array([corpus.PAGE, corpus.PAGE])
    meta = train_default._choose_text_lines_on_val(images, str(tmp_path / "cache"), probs, kinds, tta_below=1.0)
    assert meta["weights"][1] > 0 and meta["val_accuracy_pages"] == 1.0 and meta["val_accuracy_photos"] is None
    assert meta["side"] == text_lines.DEFAULT_SIDE and meta["fitted_on"] == "val"
    assert len(list((tmp_path / "cache" / f"text_lines@{text_lines.DEFAULT_SIDE}").iterdir())) == 2

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached evidence should have been used")

    monkeypatch.setattr(text_lines, "TextLineReader", no_reading)
    assert train_default._choose_text_lines_on_val(images, str(tmp_path / "cache"), probs, kinds, 1.0) == meta
