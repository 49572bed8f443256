"""The quality study's archive-tuning rows (research/quality.py): the default head re-fitted without labels on one
half of the held-out sources, and on archives with turned scans in them, measured on the other half."""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from research import orientation_corpus as corpus
from research import train_default


def tuning_half(image: corpus.CorpusImage) -> bool:
    """Which half of the held-out sources the archive-tuning row learns from (by source, like the split)."""
    return hashlib.sha256(("tune:" + image.group).encode()).digest()[0] < 128


TUNING_SEEDS = 3          # the archive-tuned rows are means over this many tuning runs (they move by points)
TURNED_SHARES = (0.25, 0.5)  # archives with this share of their scans turned, still taken as upright


def archive_tune(runner, feats: np.ndarray, epochs: int = 8, seed: int = 0,
                 offsets: Optional[np.ndarray] = None, weights: Optional[np.ndarray] = None
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """Re-fit a copy of the default head on unlabelled images taken as upright (their 4 turns are the labels), as
    `train --init default` does; `offsets` (quarter turns) and `weights` per image are the orientation check's
    (trainer.orientation_check), None: every image as stored (--orientation-labels stored)."""
    import keras

    from trainer.default_model import load_head_weights

    keras.utils.set_random_seed(seed)  # before the head is built: its dropout draws its seed when built
    model, head = train_default.build_pooled_head({k: runner.meta[k] for k in train_default.HEAD_CONFIG})
    load_head_weights(head)
    temperature = float(runner.meta["temperature"])
    x, y, w = train_default.turned_rows(feats, weights)
    if offsets is not None:
        y = (y + np.repeat(offsets, 4)) % 4
    # The shipped logits are divided by T; train at T = 1 and fold T back in afterwards, as train_default does
    # (`train` fits T again on the archive's val split, trainer.calibration; this half has no val of its own).
    kernel, bias = head.logits.get_weights()
    head.logits.set_weights([kernel * temperature, bias * temperature])
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss=keras.losses.SparseCategoricalCrossentropy())
    model.fit(x, y, sample_weight=w, epochs=epochs, batch_size=64, verbose=0)
    kernel, bias = head.logits.get_weights()
    head.logits.set_weights([kernel / temperature, bias / temperature])
    return lambda f: train_default.predict_turns(model, f)


def stored_turned(feats: np.ndarray, probs: np.ndarray, share: float, seed: int
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An archive with turned scans in it: a `share` of the images stored turned 90, 180 or 270 (drawn with
    `seed`). Returns its [N, 4 turns, ...] features and [N, 4, 4] answers as stored (row j: the stored image turned
    j more), and each image's true stored turn (quarter turns)."""
    rng = np.random.default_rng(1000 + seed)
    turn = np.where(rng.random(len(feats)) < share, rng.integers(1, 4, len(feats)), 0)
    order = (turn[:, None] + np.arange(4)) % 4
    rows = np.arange(len(feats))[:, None]
    return feats[rows, order], probs[rows, order], turn


def orientation_check_of(stored_probs: np.ndarray):
    """trainer.orientation_check on an archive's [N, 4, 4] calibrated answers as stored (all taken as upright)."""
    from trainer import orientation_check

    n = len(stored_probs)
    layouts = {"archive": ([str(i) for i in range(n)], np.full(n, 4), np.zeros(n, np.int64))}
    return orientation_check.check({"archive": stored_probs.reshape(-1, 4)}, layouts, temperature=1.0)


def archive_tuning_runs(runner, feats: np.ndarray, probs: np.ndarray, tune: np.ndarray,
                        evaluation: np.ndarray, kinds: np.ndarray) -> Dict[str, List[np.ndarray]]:
    """The archive-tuned heads' answers on the eval half, TUNING_SEEDS runs each: tuned on the other half as it
    is (upright), and on it with TURNED_SHARES of its images turned, labels as stored or checked."""
    runs: Dict[str, List[np.ndarray]] = {"upright": []}
    for seed in range(TUNING_SEEDS):
        runs["upright"].append(archive_tune(runner, feats[tune], seed=seed)(feats[evaluation]))
    for share in TURNED_SHARES:
        for labels in ("stored", "checked"):
            runs[f"{share}/{labels}"] = []
        found = []
        for seed in range(TUNING_SEEDS):
            stored_feats, stored_probs, truth = stored_turned(feats[tune], probs[tune], share, seed)
            runs[f"{share}/stored"].append(archive_tune(runner, stored_feats, seed=seed)(feats[evaluation]))
            result = orientation_check_of(stored_probs)
            offsets, weights = result.offsets["archive"], result.weights["archive"]
            runs[f"{share}/checked"].append(
                archive_tune(runner, stored_feats, seed=seed, offsets=offsets, weights=weights)(feats[evaluation]))
            found.append((float(np.mean(truth > 0)), 1 - float(result.turn_mix[0]), float(np.mean(offsets == truth)),
                          float(np.mean(offsets[truth > 0] == truth[truth > 0])),
                          float(np.mean(offsets[truth == 0] == 0))))
        mean = np.mean(found, axis=0)
        print(f"orientation check, tuning half with {100 * share:.0f}% turned (mean of {TUNING_SEEDS} draws): "
              f"{100 * mean[0]:.1f}% turned, estimated {100 * mean[1]:.1f}%; each image given its true turn: "
              f"{100 * mean[2]:.1f}% (turned ones {100 * mean[3]:.1f}%, upright ones {100 * mean[4]:.1f}%), against "
              f"{100 * (1 - mean[0]):.1f}% with every image taken as stored", flush=True)
    for name, answers in runs.items():
        for kind in (corpus.PHOTO, corpus.PAGE):
            each = [train_default.accuracy(train_default.test_time_turns(a)[kinds[evaluation] == kind])
                    for a in answers]
            print(f"archive-tuned ({name}) + test-time turns, eval half, {kind}s by seed: "
                  + " / ".join(f"{100 * v:.1f}%" for v in each), flush=True)
    return runs
