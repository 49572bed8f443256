"""Temperature scaling of the orientation head: softmax(z / T), T fitted on held-out answers by likelihood.

score's auto_rotate band (p >= --rotate-threshold) is only as trustworthy as the probabilities: a head trained
for a few epochs from the calibrated default head is over-confident again at T = 1. So `archive-vision train`
fits T on the val split's orientation answers (every turn of every val record, with the labels training used:
the orientation check's, under --init default) and folds it into the head's last layer before evaluation and
export (softmax(z / T) is the same head with the logits layer's kernel and bias divided by T), as
research.train_default does for the shipped head.

Under `train --corrections` the val records a person answered are left out of the fit (`fit_unanswered`): the
answers are the review queue's, the archive's least-sure pages, so a val split holding them is a sample biased to the
hardest images, and a temperature fitted on it makes the tuned head less sure of every page (the review loop's
bench: T 2.67 with 200 answers against 1.50 without, and a review share that rose; docs/review-loop.md). The
answers train the head; what calibrates it is the val records nobody picked.
"""
from __future__ import annotations

import dataclasses
from typing import Collection, Dict, Optional, Sequence

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


@dataclasses.dataclass
class Fit:
    """A temperature fitted on the val records no one answered (fit_unanswered), and what it was fitted on.
    temperature None: no usable fit (`why_not` says why; the caller falls back)."""

    temperature: Optional[float]
    records: int  # val records with an orientation that the fit read (none of them answered by a person)
    examples: int  # their turns (each record under its four)
    answered_left_out: int  # val records with an orientation a person answered: not read by the fit
    why_not: str = ""
    nll_before: Optional[float] = None
    nll_after: Optional[float] = None

    def summary(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def fit_unanswered(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray, record_keys: Sequence[str],
                   answered: Collection[str] = ()) -> Fit:
    """fit_temperature on the examples of [R, 4] answers with an orientation (weight > 0) whose record
    (record_keys[i], trainer.input.record_key) is not in `answered`. No fit with fewer than MIN_RECORDS such records,
    or when the fit runs to the end of GRID (a head right on all of them says only "more sure", never how much)."""
    keys = np.asarray(record_keys, dtype=object)
    known = np.asarray(weights) > 0
    by_person = np.array([key in answered for key in keys], bool) if len(answered) else np.zeros(len(keys), bool)
    use = known & ~by_person
    fit = Fit(None, len(set(keys[use])), int(use.sum()), len(set(keys[known & by_person])))
    if fit.records < MIN_RECORDS:
        fit.why_not = (f"{fit.records} val records have an orientation no one answered, a temperature needs "
                       f"{MIN_RECORDS}" + (f" ({fit.answered_left_out} answered ones left out: a person's answers "
                                           f"are the hardest pages, not a sample)" if fit.answered_left_out else ""))
        return fit
    probs, labels, weights = probs[use], np.asarray(labels)[use].astype(np.int64), np.asarray(weights)[use]
    temperature = fit_temperature(probs, labels, weights)
    if temperature in (GRID[0], GRID[-1]):
        fit.why_not = (f"the temperature fitted on {fit.examples} val examples ran to the end of its range "
                       f"({temperature:.2f}; {100 * np.mean(probs.argmax(1) == labels):.1f}% of them right)")
        return fit
    fit.temperature = temperature
    fit.nll_before = negative_log_likelihood(probs, labels, weights)
    fit.nll_after = negative_log_likelihood(with_temperature(probs, temperature), labels, weights)
    return fit
