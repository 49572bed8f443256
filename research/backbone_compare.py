"""Which frozen ImageNet backbone reads orientation best: `python -m research.train_default --experiments
backbones`.

The shipped model stands on the torchvision MobileNetV2. The learning curve (research.learning_curve) says
more photos of the same kind would carry photos only slowly, so the other lever is what the head reads. This
trains the curve's full-size point (the head on the frozen backbone, the shipped training views of every training
photo and page, no fine-tuned blocks) once per backbone and seed, and scores every held-out image (val and test,
photos and pages: nothing is chosen from this, it is a measurement) alone and with test-time turns. Then, from the
same answers, two kinds of averaging: each backbone's heads of several seeds averaged (the backbone run once, a
head per seed: nearly free), and the answers of several backbones averaged (one pass of each backbone per image).
`backbone_cost` times each backbone's forward pass on the machine's current threads.
"""
from __future__ import annotations

import itertools
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from research import orientation_corpus as corpus
from research import orientation_features as features
from research import recipe

BACKBONES = ("mobilenet_v2_torchvision", "efficientnet_lite0", "efficientnet_lite2")
SEEDS = (0, 1, 2)


def held_out(images: Sequence[corpus.CorpusImage]) -> List[corpus.CorpusImage]:
    """The images every backbone is scored on: val and test, photos and pages, in corpus order."""
    return [i for i in images if i.split in (corpus.VAL, corpus.TEST)]


def backbone_answers(images: Sequence[corpus.CorpusImage], cache: str, backbone: str,
                     seeds: Sequence[int] = SEEDS, epochs: Optional[int] = None) -> List[np.ndarray]:
    """Per seed, [N held-out, 4 turns, 4] probabilities of a head trained on `backbone`'s frozen features."""
    epochs = recipe.DEFAULT_EPOCHS if epochs is None else epochs
    train_feats, _ = recipe.training_views(images, (corpus.TRAIN,), cache, backbone)
    held_feats = features.cached_features([i.path for i in held_out(images)], "pad224", cache, backbone=backbone)
    answers = []
    for seed in seeds:
        model, _, _ = recipe.fit_head(train_feats, epochs=epochs, seed=seed)
        answers.append(recipe.predict_turns(model, held_feats))
    return answers


def accuracy_row(name: str, per_seed: Sequence[np.ndarray], kinds: np.ndarray) -> Dict[str, object]:
    """Accuracy per kind, alone and with test-time turns, each the mean over the seeds' answers."""
    row: Dict[str, object] = {"name": name, "runs": len(per_seed)}
    for kind in (corpus.PHOTO, corpus.PAGE):
        mask = kinds == kind
        row[f"{kind}s"] = int(mask.sum())
        row[f"{kind}_accuracy"] = float(np.mean([recipe.accuracy(p[mask]) for p in per_seed]))
        row[f"{kind}_accuracy_turns"] = float(np.mean([recipe.accuracy(recipe.test_time_turns(p[mask]))
                                                       for p in per_seed]))
    return row


def compare_backbones(answers: Dict[str, List[np.ndarray]], kinds: np.ndarray) -> List[Dict[str, object]]:
    """Rows: each backbone (mean over its seeds), each backbone's seeds averaged into one answer, and every
    combination of two or more backbones with seed s of each averaged (mean over s)."""
    names = list(answers)
    rows = [accuracy_row(name, answers[name], kinds) for name in names]
    rows += [accuracy_row(f"{name}, {len(answers[name])} seeds' heads averaged", [np.mean(answers[name], axis=0)],
                          kinds) for name in names if len(answers[name]) > 1]
    seeds = min(len(a) for a in answers.values())
    for size in range(2, len(names) + 1):
        for combo in itertools.combinations(names, size):
            rows.append(accuracy_row(" + ".join(combo), [np.mean([answers[n][s] for n in combo], axis=0)
                                                 for s in range(seeds)], kinds))
    return rows


def backbone_cost(backbone: str, size: int = 224, batch: int = 16, repeats: int = 5) -> float:
    """Milliseconds per image of the backbone's forward pass (batch `batch`, the best of `repeats` timed calls
    after one warm-up), on the threads TensorFlow has now."""
    import tensorflow as tf

    from trainer.backbones import build_backbone

    model = build_backbone(backbone, "imagenet", size)
    call = tf.function(lambda x: model(x, training=False))
    pixels = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    call(pixels).numpy()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call(pixels).numpy()
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / batch


def format_table(rows: Sequence[Dict[str, object]], costs: Optional[Dict[str, float]] = None) -> str:
    """A Markdown table of the rows (and, where given, each row's summed backbone cost per image)."""
    head = ("| heads on frozen features | photos | with turns | pages | with turns |" +
            (" backbone ms per image |" if costs else ""))
    lines = [head, "| --- " + "| ---: " * (head.count("|") - 2) + "|"]
    for r in rows:
        cells = [str(r["name"])] + [f"{100 * float(r[k]):.1f}%" for k in (
            "photo_accuracy", "photo_accuracy_turns", "page_accuracy", "page_accuracy_turns")]
        if costs:
            used = [n for n in costs if n in str(r["name"]).split(",")[0].split(" + ")]
            cells.append(f"{sum(costs[n] for n in used):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
