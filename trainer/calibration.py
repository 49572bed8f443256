"""Temperature scaling of the orientation head: softmax(z / T), T fitted on held-out answers by likelihood.

score's auto_rotate band (p >= --rotate-threshold) is only as trustworthy as the probabilities: a head trained
for a few epochs from the calibrated default head is over-confident again at T = 1. So `archive-vision train`
fits T on the val split's orientation answers (every turn of every val record, with the labels training used:
the orientation check's, under --init default) and folds it into the head's last layer before evaluation and
export (softmax(z / T) is the same head with the logits layer's kernel and bias divided by T), as
research.train_default does for the shipped head.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

GRID = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))  # candidate temperatures, 0.25 to 8
# Fewest val records (each under its 4 turns) `train` fits a temperature on: the demo's 3 val records, all
# answered right, fitted 0.25, the end of GRID (a head right on all of them looks best at any confidence).
MIN_RECORDS = 25


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the head's probabilities at temperature T."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Mean (weighted) -log p[label] over [R, 4] answers."""
    nll = -np.log(np.take_along_axis(probs, labels[:, None], -1)[:, 0] + 1e-12)
    return float(np.mean(nll)) if weights is None else float(np.sum(weights * nll) / max(np.sum(weights), 1e-12))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """The T on GRID minimising the held-out negative log-likelihood of [R, 4] answers (one parameter: grid
    search, no overfitting risk)."""
    best, best_nll = 1.0, np.inf
    for t in GRID:
        nll = negative_log_likelihood(with_temperature(probs, t), labels, weights)
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def fold_temperature(head, temperature: float) -> None:
    """Divide an OrientationHead's logits layer by T in place (its softmax is then at temperature T)."""
    kernel, bias = head.logits.get_weights()
    head.logits.set_weights([kernel / temperature, bias / temperature])
