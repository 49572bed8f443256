"""Evaluation after training: metrics JSON, confusion-matrix and training-curve PNGs, misclassified records.

PNGs are drawn with Pillow (matplotlib is not a dependency of the project).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from trainer import input as train_input
from trainer.config import TrainConfig
from trainer.input import CLASS_OUTPUT, ORIENTATION_OUTPUT

ORIENTATION_NAMES = ["0", "90", "180", "270"]


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (true.astype(np.int64), pred.astype(np.int64)), 1)
    return cm


def head_metrics(true: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> Dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix of one head."""
    cm = confusion_matrix(true, pred, len(names))
    total = int(cm.sum())
    per_class = {}
    for i, name in enumerate(names):
        predicted, actual = int(cm[:, i].sum()), int(cm[i, :].sum())
        per_class[name] = {
            "precision": float(cm[i, i] / predicted) if predicted else None,
            "recall": float(cm[i, i] / actual) if actual else None,
            "support": actual,
        }
    return {
        "examples": total,
        "accuracy": float(np.trace(cm) / total) if total else None,
        "per_class": per_class,
        "labels": list(names),
        "confusion_matrix": cm.tolist(),
    }


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_confusion_matrix(cm: np.ndarray, names: Sequence[str], title: str, path: str) -> str:
    """PNG of a confusion matrix: rows = true, columns = predicted, cells shaded by row share."""
    n = len(names)
    cell, left, top = 64, 130, 70
    width, height = left + n * cell + 20, top + n * cell + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    d.text((10, 10), title, fill="black", font=font)
    d.text((left, top - 40), "predicted ->", fill="gray", font=small)
    d.text((10, top - 20), "true", fill="gray", font=small)
    row_sums = cm.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(n):
        d.text((10, top + i * cell + cell // 2 - 7), str(names[i])[:16], fill="black", font=small)
        d.text((left + i * cell + 4, top - 20), str(names[i])[:8], fill="black", font=small)
        for j in range(n):
            share = float(cm[i, j] / row_sums[i, 0])
            shade = int(255 - 200 * share)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=(shade, shade, 255), outline="gray")
            d.text((x0 + 6, y0 + cell // 2 - 7), str(int(cm[i, j])), fill="black" if share < 0.6 else "white",
                   font=font)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        img.save(f, format="PNG")
    return path


def draw_training_curves(history: List[Dict[str, float]], path: str) -> Optional[str]:
    """PNG with one panel for losses and one for accuracies over epochs; None without history."""
    if not history:
        return None
    keys = sorted({k for row in history for k in row if k != "epoch" and isinstance(row.get(k), (int, float))})
    panels = [("loss", [k for k in keys if k.endswith("loss")]),
              ("accuracy", [k for k in keys if k.endswith("accuracy")])]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    pw, ph, margin = 520, 300, 50
    img = Image.new("RGB", (pw * 2, ph + 140), "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    for p, (title, series) in enumerate(panels):
        ox = p * pw
        d.text((ox + margin, 8), title, fill="black", font=_font(14))
        x0, y0, x1, y1 = ox + margin, 30, ox + pw - 20, ph
        d.rectangle([x0, y0, x1, y1], outline="black")
        values = [row[k] for k in series for row in history if isinstance(row.get(k), (int, float))
                  and math.isfinite(row[k])]
        if not values:
            continue
        lo, hi = (0.0, 1.0) if title == "accuracy" else (min(values), max(values))
        hi = hi if hi > lo else lo + 1.0
        e_lo, e_hi = min(epochs), max(max(epochs), min(epochs) + 1)
        d.text((x0 - 45, y0), f"{hi:.3g}", fill="black", font=font)
        d.text((x0 - 45, y1 - 12), f"{lo:.3g}", fill="black", font=font)
        d.text((x0, y1 + 4), f"epoch {e_lo}", fill="black", font=font)
        d.text((x1 - 60, y1 + 4), f"epoch {e_hi}", fill="black", font=font)
        for s, key in enumerate(series):
            colour = colours[s % len(colours)]
            points = [(x0 + (e - e_lo) / (e_hi - e_lo) * (x1 - x0), y1 - (row[key] - lo) / (hi - lo) * (y1 - y0))
                      for e, row in zip(epochs, history) if isinstance(row.get(key), (int, float))
                      and math.isfinite(row[key])]
            if len(points) > 1:
                d.line(points, fill=colour, width=2)
            for x, y in points:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            d.text((x0, y1 + 22 + 14 * s), key, fill=colour, font=font)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        img.save(f, format="PNG")
    return path


def predict_split(model: keras.Model, cfg: TrainConfig, split: str, batch_size: int = 64,
                  corrections: Optional[train_input.Corrections] = None) -> Optional[Dict]:
    """Model outputs with labels, weights and record identity for every example of a split (all four turns);
    `corrections`: the orientation labels as training used them (the orientation check of --init default)."""
    if not train_input.list_shards(cfg.data, split):
        return None

    @tf.function(reduce_retracing=True)
    def forward(pixels):
        return model(pixels, training=False)

    ds = train_input.example_dataset(cfg.data, split, cfg, training=False, all_turns=True,
                                     corrections=corrections).batch(batch_size)
    collected: Dict[str, List[np.ndarray]] = {}
    for batch in ds:
        outputs = forward(batch["pixels"])
        for k, v in list(batch.items()) + list(outputs.items()):
            if k != "pixels":
                collected.setdefault(k, []).append(v.numpy())
    if not collected:
        return None
    return {k: np.concatenate(v) for k, v in collected.items()}


def evaluate_split(model: keras.Model, cfg: TrainConfig, split: str, class_names: Sequence[str], out_dir: str,
                   corrections: Optional[train_input.Corrections] = None, pred: Optional[Dict] = None
                   ) -> Optional[Dict]:
    """Metrics of both heads on a split; writes <split>_metrics.json, confusion PNGs, misclassified JSONL.
    With `corrections`, orientation is scored against the labels training used (stored_orientation in the
    misclassified rows is then the corrected one). `pred`: the model's predict_split of this split (with the
    same corrections) when the caller already made it."""
    pred = pred if pred is not None else predict_split(model, cfg, split, corrections=corrections)
    if pred is None:
        return None
    report: Dict = {"split": split, "examples": int(len(pred["turn"]))}
    wrong = np.zeros(len(pred["turn"]), bool)
    heads = []
    if cfg.uses_classes and CLASS_OUTPUT in pred:
        heads.append(("classes", CLASS_OUTPUT, "class_label", "class_weight", list(class_names)))
    if cfg.uses_orientation and ORIENTATION_OUTPUT in pred:
        heads.append(("orientation", ORIENTATION_OUTPUT, "orientation_label", "orientation_weight",
                      ORIENTATION_NAMES))
    for task, output, label_key, weight_key, names in heads:
        mask = pred[weight_key] > 0
        predicted = pred[output].argmax(axis=1)
        metrics = head_metrics(pred[label_key][mask], predicted[mask], names)
        report[task] = metrics
        wrong |= mask & (predicted != pred[label_key])
        report[task]["confusion_png"] = draw_confusion_matrix(
            np.array(metrics["confusion_matrix"]), names, f"{split}: {task} (rows true, columns predicted)",
            os.path.join(out_dir, f"confusion_{split}_{task}.png"))

    rows = []
    for i in np.flatnonzero(wrong)[: cfg.max_misclassified]:
        row = {"source_uri": pred["source_uri"][i].decode("utf-8", "replace"), "page": int(pred["page"][i]),
               "stored_orientation": int(pred["stored_orientation"][i]), "extra_turn": int(pred["turn"][i])}
        for task, output, label_key, weight_key, names in heads:
            if pred[weight_key][i] > 0:
                p = pred[output][i]
                row[task] = {"true": names[int(pred[label_key][i])], "predicted": names[int(p.argmax())],
                             "confidence": float(p.max())}
        rows.append(row)
    report["misclassified_count"] = int(wrong.sum())
    mis_path = os.path.join(out_dir, f"misclassified_{split}.jsonl")
    tf.io.gfile.makedirs(out_dir)
    with tf.io.gfile.GFile(mis_path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    report["misclassified_file"] = mis_path
    with tf.io.gfile.GFile(os.path.join(out_dir, f"{split}_metrics.json"), "w") as f:
        f.write(json.dumps(report, indent=2))
    return report
