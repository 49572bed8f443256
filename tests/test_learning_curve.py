"""research.learning_curve: the photo learning curve docs/orientation.md's data-scaling figures come from."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from PIL import Image

from research import learning_curve
from research import orientation_corpus as corpus
from research import orientation_features


def test_group_subsets_are_nested_whole_groups_and_repeatable():
    groups = [f"g{i // 3}" for i in range(60)]  # 20 groups of 3 images
    subsets = learning_curve.nested_group_subsets(groups, (0.125, 0.25, 0.5, 1.0), seed=4)
    sizes = [len(subsets[f]) for f in (0.125, 0.25, 0.5, 1.0)]
    assert sizes == [2, 5, 10, 20]
    assert subsets[0.125] < subsets[0.25] < subsets[0.5] < subsets[1.0] == frozenset(groups)
    assert learning_curve.nested_group_subsets(groups, (0.25,), seed=4)[0.25] == subsets[0.25]
    assert learning_curve.nested_group_subsets(groups, (0.25,), seed=5)[0.25] != subsets[0.25]


def _features(path: str, signal: float) -> np.ndarray:
    """[4 turns, 3, 3, 1280]: noise plus a bright top row on the first channels, turned with the image."""
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    upright = rng.normal(size=(3, 3, 1280)).astype(np.float32)
    upright[0, :, :16] += signal
    return np.stack([np.rot90(upright, k=-k, axes=(0, 1)) for k in range(4)])


def test_curve_trains_on_nested_photo_subsets_and_scores_every_held_out_photo(monkeypatch):
    images = ([corpus.CorpusImage(f"p{i}.jpg", corpus.PHOTO, "pkg", f"p{i}", f"g{i // 4}", corpus.TRAIN)
               for i in range(48)]
              + [corpus.CorpusImage(f"d{i}.png", corpus.PAGE, "pkg", f"d{i}", f"d{i}", corpus.TRAIN)
                 for i in range(8)]
              + [corpus.CorpusImage(f"h{i}.jpg", corpus.PHOTO, "pkg", f"h{i}", f"h{i}",
                                    corpus.VAL if i % 2 else corpus.TEST) for i in range(20)])
    asked = []

    def fake_cached_features(paths, variant, cache_dir, progress=True, **_):
        asked.append(variant)
        return np.stack([_features(p, 3.0) for p in paths]) if paths else np.zeros((0, 4, 3, 3, 1280), np.float32)

    monkeypatch.setattr(orientation_features, "cached_features", fake_cached_features)
    rows = learning_curve.photo_learning_curve(images, "unused", fractions=(0.25, 1.0), seeds=(0, 1), epochs=4)
    assert [(r["fraction"], r["seed"]) for r in rows] == [(0.25, 0), (1.0, 0), (0.25, 1), (1.0, 1)]
    assert [r["photos"] for r in rows] == [12, 48, 12, 48] and all(r["held_out"] == 20 for r in rows)
    assert {"pad224", "flip224", "crop224", "pad320"} <= set(asked)  # the shipped training views
    full = [r for r in rows if r["fraction"] == 1.0]
    assert all(r["accuracy"] > 0.9 and r["accuracy_turns"] > 0.9 for r in full)  # the turned signal is learnt


def _made_up_rows():
    rows = []
    for seed, wobble in enumerate((-0.01, 0.0, 0.01)):
        for fraction in (0.125, 0.25, 0.5, 1.0):
            photos = int(400 * fraction)
            rows.append({"fraction": fraction, "seed": seed, "photos": photos,
                         "accuracy": 0.5 + 0.04 * math.log2(photos) + wobble,
                         "accuracy_turns": 0.6 + 0.03 * math.log2(photos) + wobble})
    return rows


def test_summary_gives_points_per_doubling_and_a_straight_line_bound():
    summary = learning_curve.curve_summary(_made_up_rows())
    assert summary["accuracy"]["per_doubling"] == pytest.approx(0.04)
    assert summary["accuracy_turns"]["per_doubling"] == pytest.approx(0.03)
    at_all = 0.5 + 0.04 * math.log2(400)
    assert summary["accuracy"]["at_all"] == pytest.approx(at_all)
    assert summary["accuracy"]["photos_for_target"] == pytest.approx(400 * 2 ** ((0.95 - at_all) / 0.04))
    means = learning_curve.fraction_means(_made_up_rows())
    assert [m["photos"] for m in means] == [50, 100, 200, 400]
    assert means[-1]["accuracy"] == pytest.approx(at_all)


def test_flat_curve_never_reaches_the_target():
    rows = [dict(r, accuracy=0.7, accuracy_turns=0.75) for r in _made_up_rows()]
    assert learning_curve.curve_summary(rows)["accuracy"]["photos_for_target"] == math.inf


def test_the_picture_draws_both_measures_and_the_target(tmp_path):
    path = learning_curve.draw_learning_curve(_made_up_rows(), str(tmp_path / "curve.png"))
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert {(31, 119, 180), (44, 160, 44), (214, 39, 40)} <= colours
