"""`train --corrections FILE`: a person's answers to the review queue (the review page's corrections.parquet) train
the pages they answered as the person said.

The answered pages are records of `--data` like any other (the archive ingested with `--assume-upright`, so each is
stored as "upright"); an answer is matched to its records by content (sha256, page) and replaces what the record is
trained as: its orientation becomes the person's, at full weight, whatever the stored orientation or the default
model's check (trainer.orientation_check) said. A page answered no_up or not_image trains no orientation (weight 0:
left out of orientation training; its class label, if any, still counts). Augmented copies of an answered page
(ingest --augment-copies) are left out of orientation training too: a copy may be mirrored, which swaps 90 and 270.
Answers of pages the shards do not hold are refused (another run's corrections?), and so are answered records stored
with an unknown orientation (their rows are laid out as unturnable: ingest with --assume-upright).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from trainer.orientation_check import QUARTERS, OrientationCheck

PERSON_WEIGHT = 1.0  # a person's answer is the truth: full weight (the check's own weights are posteriors <= 1)
ANSWERS_FILE = "corrections_used.json"


@dataclasses.dataclass
class MatchedAnswers:
    """A person's answers as the records they apply to: record key -> (quarter turns to add to the stored
    orientation, orientation weight), and the counts said in the log and JOB/corrections_used.json."""

    by_key: Dict[str, Tuple[int, float]]
    counts: Dict[str, object]


def match_answers(path: str, data_dir: str) -> MatchedAnswers:
    """The answers in `path` matched to the records of `data_dir` by (sha256, page) over every split (no image is
    decoded). Raises pipelines.corrections.CorrectionsError for a table that cannot be used or answers of pages the
    shards do not hold, trainer.input.DataError for answered records stored with an unknown orientation."""
    from pipelines import corrections, schema
    from trainer import input as train_input

    standing = corrections.load(path)
    fields = (schema.SHA256, schema.SOURCE_URI, schema.PAGE, schema.AUGMENT_INDEX, schema.ORIENTATION)
    found: Dict[Tuple[str, int], List[Tuple[str, str, int, int]]] = {}
    for split in schema.SPLITS:
        files = train_input.list_shards(data_dir, split)
        if not files:
            continue
        for batch in train_input._label_fields(files, fields):
            for sha, uri, page, augment, stored in zip(*(batch[k] for k in fields)):
                key = (sha.decode("ascii", "replace"), int(page))
                if key in standing:
                    found.setdefault(key, []).append(
                        (split, train_input.record_key(uri.decode("utf-8", "replace"), page, augment), int(stored),
                         int(augment)))
    corrections.check_known(standing, found, path, f"the shards in {data_dir}")
    by_key: Dict[str, Tuple[int, float]] = {}
    counts: Dict[str, object] = {"file": path, "answers": len(standing), "records_answered": 0, "no_orientation": 0,
                                 "augmented_copies_left_out": 0, "per_split": {}}
    unturnable = []
    for key, records in found.items():
        orientation = int(standing[key]["orientation"])
        for split, record, stored, augment in records:
            if stored < 0:
                unturnable.append(record)
                continue
            if augment > 0:
                by_key[record] = (0, 0.0)
                counts["augmented_copies_left_out"] += 1
            elif orientation == schema.UNKNOWN:
                by_key[record] = (0, 0.0)
                counts["no_orientation"] += 1
            else:
                by_key[record] = (((orientation - stored) // 90) % QUARTERS, PERSON_WEIGHT)
                counts["records_answered"] += 1
                counts["per_split"][split] = counts["per_split"].get(split, 0) + 1
    if unturnable:
        raise train_input.DataError(
            f"{len(unturnable)} records a person answered in {path} are stored in {data_dir} with an unknown "
            f"orientation, so training cannot turn them (ingest the archive with --assume-upright): "
            f"{', '.join(unturnable[:3])}")
    return MatchedAnswers(by_key, counts)


def stored_as_is(layouts: Dict[str, Tuple[List[str], np.ndarray, np.ndarray]]) -> OrientationCheck:
    """The labels of records trained as stored (no check), in the check's form, for answers to be laid over."""
    keys = {split: [k for k, r in zip(split_keys, rows) if r == QUARTERS]
            for split, (split_keys, rows, _) in layouts.items()}
    return OrientationCheck(np.array([1.0, 0.0, 0.0, 0.0]), keys,
                            {s: np.zeros(len(k), np.int64) for s, k in keys.items()},
                            {s: np.ones(len(k), np.float32) for s, k in keys.items()},
                            {s: layouts[s][1] for s in layouts})


def with_answers(check: OrientationCheck, answers: MatchedAnswers) -> OrientationCheck:
    """The check with every answered record trained as the person said (a new object; the check is unchanged)."""
    offsets = {s: o.copy() for s, o in check.offsets.items()}
    weights = {s: w.copy() for s, w in check.weights.items()}
    for split, keys in check.keys.items():
        for index, key in enumerate(keys):
            if key in answers.by_key:
                offsets[split][index], weights[split][index] = answers.by_key[key]
    return dataclasses.replace(check, offsets=offsets, weights=weights)


def apply_answers(cfg, check: Optional[OrientationCheck], answers: MatchedAnswers, private_dir: str,
                  prefix: str = "") -> OrientationCheck:
    """train --corrections: the labels training uses (the check's, or the records as stored) with the person's
    answers (match_answers) laid over them; writes JOB/corrections_used.json and says what it took."""
    import tensorflow as tf

    from trainer import input as train_input

    if check is None:
        check = stored_as_is({split: train_input.record_layout(cfg.data, split, cfg)
                              for split in ("train", "val", "test") if train_input.list_shards(cfg.data, split)})
    counts = answers.counts
    with tf.io.gfile.GFile(os.path.join(private_dir, ANSWERS_FILE), "w") as f:
        json.dump(counts, f, indent=2)
    splits = ", ".join(f"{split} {n}" for split, n in sorted(counts["per_split"].items())) or "none"
    print(f"{prefix}[answers] {counts['answers']} answers in {cfg.corrections}: {counts['records_answered']} records "
          f"trained as the person answered ({splits}); {counts['no_orientation']} with no up left out of orientation "
          f"training, {counts['augmented_copies_left_out']} augmented copies left out", flush=True)
    return with_answers(check, answers)


def record_calibration(private_dir: str, calibration: Dict[str, object]) -> None:
    """Add what calibrated the tuned head (the temperature, and the val records it was fitted on: none a person
    answered) to JOB/corrections_used.json, beside the answers it was tuned on."""
    import tensorflow as tf

    path = os.path.join(private_dir, ANSWERS_FILE)
    with tf.io.gfile.GFile(path) as f:
        used = json.load(f)
    used["calibration"] = calibration
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(used, f, indent=2)
