"""`train --init default`: the default model reads the archive's turns before it is tuned on them.

`ingest --assume-upright` stores every image of an archive as upright. An archive worth tuning on is one with
sideways and upside-down scans in it, and each of those, taken as upright, teaches the head a wrong answer under
all four of its turns: on the corpus' held-out photos, tuning on a half in which a quarter of the images were
turned made photos worse than not tuning at all (research/quality.py's "archive with turned scans" rows).

So before tuning, the default model (the head as shipped, calibrated) answers each record's four turns, fused as
score's test-time turns fuse them: q[i, k], the probability that record i is stored turned k quarter turns from
the orientation it carries (0 for `--assume-upright`). How often each turn occurs in this archive is not known;
it is estimated with the EM of Saerens, Latinne and Decaestecker (2002, "Adjusting the outputs of a classifier to
new a priori probabilities"): the model's answers assume the four turns equally likely (it was trained on all
four turns of each image), so the posterior under a prior pi is q * pi / (1/4), renormalised, and pi is then the
mean posterior, until it settles. The user's word that the archive is mostly upright counts as ten records stored
as they say (a Dirichlet prior: pi is the posterior mean over the records plus ten pseudo-records at turn 0), which
a large archive outweighs and which keeps a small one from settling on a turn that only unsure answers lean to
(seven photos, three of them turned, settled at 57% turned by 90 without it). Each record is then trained as
stored turned by its most probable turn under that posterior, with its posterior as the sample weight.

What that does: in an archive that is all upright, pi comes out at nearly (1, 0, 0, 0), and an image the model is
sure and wrong about keeps its upright label (it is what tuning learns from). In an archive with a quarter
turned, pi finds that quarter, and the images the model is sure are turned are trained as turned.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.calibration import with_temperature

QUARTERS = 4
EM_ITERATIONS = 500
EM_TOLERANCE = 1e-9
UPRIGHT_PSEUDO_RECORDS = 10.0  # the prior's weight on "stored as they say" (see above)
# Records trained as stored whose posterior for that is below this are listed as doubted, for a person to look at:
# in a CLI run on the bench's tuning half with a quarter of its 284 files turned, 6 of the 9 records below 0.7 were
# turned ones the check had left as stored (9 of 18 below 0.8).
DOUBTED_BELOW = 0.7


def stored_turn_probabilities(row_probs: np.ndarray, rows_per_record: np.ndarray, stored: np.ndarray
                              ) -> np.ndarray:
    """[R, 4] answers of every example row, in the order the records make them -> [n, 4] q of each record with a
    known orientation: q[i, k], that record i is stored turned k quarter turns from the orientation it carries.

    A record with a known orientation s (quarter turns) makes 4 rows, row j its stored image turned j more and
    labelled (s + j) % 4; other records make 1 row (rows_per_record 1) and get no q. Were the record really stored
    turned s + k, row j's right answer would be s + k + j: the four rows' answers for that are averaged, as score's
    --tta averages the turned copies.
    """
    rows_per_record = np.asarray(rows_per_record)
    if int(rows_per_record.sum()) != len(row_probs):
        raise ValueError(f"{len(row_probs)} answer rows for records that make {int(rows_per_record.sum())}")
    known = rows_per_record == QUARTERS
    starts = (np.cumsum(rows_per_record) - rows_per_record)[known]
    s = np.asarray(stored)[known] % QUARTERS
    block = row_probs[starts[:, None] + np.arange(QUARTERS)]          # [n, row j, answer]
    j = np.arange(QUARTERS)
    q = np.zeros((len(starts), QUARTERS))
    for k in range(QUARTERS):
        q[:, k] = block[np.arange(len(starts))[:, None], j[None, :], (s[:, None] + k + j[None, :]) % QUARTERS].mean(1)
    return q


def estimate_turn_mix(q: np.ndarray, pseudo_records: float = UPRIGHT_PSEUDO_RECORDS,
                      iterations: int = EM_ITERATIONS, tolerance: float = EM_TOLERANCE
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(pi, posterior): the archive's share of each turn and each record's posterior under it (EM, see above).

    q's answers assume the four turns equally likely, so the posterior under pi is proportional to q * pi;
    `pseudo_records` records at turn 0 join the posteriors' sum when pi is re-estimated.
    """
    if len(q) == 0:
        return np.array([1.0, 0.0, 0.0, 0.0]), np.zeros((0, QUARTERS))
    pi = np.full(QUARTERS, 1.0 / QUARTERS)
    posterior = q
    for _ in range(iterations):
        posterior = q * pi
        posterior = posterior / np.maximum(posterior.sum(axis=1, keepdims=True), 1e-300)
        counts = posterior.sum(axis=0)
        counts[0] += pseudo_records
        new_pi = counts / counts.sum()
        if np.abs(new_pi - pi).max() < tolerance:
            pi = new_pi
            break
        pi = new_pi
    return pi, posterior


@dataclasses.dataclass
class OrientationCheck:
    """Per split: the keys of its records with a known orientation, the quarter turns to add to what each carries,
    and each one's sample weight (its posterior)."""

    turn_mix: np.ndarray                                  # [4] estimated share of stored turns 0/90/180/270
    keys: Dict[str, List[str]]                            # split -> record keys (source_uri#page)
    offsets: Dict[str, np.ndarray]                        # split -> [n] quarter turns added to the stored one
    weights: Dict[str, np.ndarray]                        # split -> [n] posterior of that turn
    rows_per_record: Dict[str, np.ndarray]                # split -> rows each usable record makes (4 or 1)

    def summary(self) -> str:
        """One line for the log: the estimated mix and how many records were relabelled, per split."""
        mix = ", ".join(f"{90 * k}: {100 * p:.1f}%" for k, p in enumerate(self.turn_mix))
        parts = []
        for split, offsets in self.offsets.items():
            turned = np.bincount(offsets, minlength=QUARTERS)
            parts.append(f"{split}: {int((offsets > 0).sum())} of {len(offsets)} trained as turned "
                         f"({int(turned[1])} by 90, {int(turned[2])} by 180, {int(turned[3])} by 270 more "
                         f"than stored), mean weight {float(self.weights[split].mean()) if len(offsets) else 0:.3f}")
        return f"the default model puts this archive's stored turns at {mix}; " + "; ".join(parts)

    def relabel_rows(self, split: str, labels: np.ndarray, weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """A feature cache's per-row orientation labels and weights with the check applied (new arrays)."""
        rows = self.rows_per_record[split]
        if int(rows.sum()) != len(labels):
            raise ValueError(f"{split}: the feature cache has {len(labels)} rows, the records make {int(rows.sum())}")
        per_row_offset = np.zeros(len(labels), np.int64)
        per_row_weight = np.ones(len(labels), np.float32)
        starts = (np.cumsum(rows) - rows)[rows == QUARTERS]
        index = (starts[:, None] + np.arange(QUARTERS)).ravel()
        per_row_offset[index] = np.repeat(self.offsets[split], QUARTERS)
        per_row_weight[index] = np.repeat(self.weights[split], QUARTERS)
        new_labels = ((labels + per_row_offset) % QUARTERS).astype(labels.dtype)
        return new_labels, (weights * per_row_weight).astype(weights.dtype)

    def table(self) -> Dict[str, Tuple[int, float]]:
        """key -> (quarter turns to add, weight) over every split (the pixel input path looks records up by key)."""
        out: Dict[str, Tuple[int, float]] = {}
        for split, keys in self.keys.items():
            for key, offset, weight in zip(keys, self.offsets[split], self.weights[split]):
                out.setdefault(key, (int(offset), float(weight)))
        return out

    def turned_records(self) -> List[Dict[str, object]]:
        """The records trained as turned, most sure first: split, record key, turned_more_degrees, posterior."""
        turned = []
        for split, keys in self.keys.items():
            for key, offset, weight in zip(keys, self.offsets[split], self.weights[split]):
                if offset:
                    turned.append({"split": split, "record": key, "turned_more_degrees": 90 * int(offset),
                                   "posterior": round(float(weight), 4)})
        return sorted(turned, key=lambda r: -r["posterior"])

    def doubted_records(self, below: float = DOUBTED_BELOW) -> List[Dict[str, object]]:
        """The records trained as stored although the posterior for that is below `below` (the model leans to a
        turn, not enough to relabel them), least sure first: split, record key, posterior."""
        doubted = [{"split": split, "record": key, "posterior": round(float(weight), 4)}
                   for split, keys in self.keys.items()
                   for key, offset, weight in zip(keys, self.offsets[split], self.weights[split])
                   if not offset and weight < below]
        return sorted(doubted, key=lambda r: r["posterior"])

    def write(self, path: str, listed: int = 1000) -> str:
        """JSON: the mix, the counts, the records trained as turned (most sure first, at most `listed`) and the
        records trained as stored that the model doubts (least sure first, at most `listed`)."""
        import tensorflow as tf

        turned, doubted = self.turned_records(), self.doubted_records()
        payload = {"turn_mix": {str(90 * k): round(float(p), 5) for k, p in enumerate(self.turn_mix)},
                   "records": {split: len(keys) for split, keys in self.keys.items()},
                   "trained_as_turned": {split: int((o > 0).sum()) for split, o in self.offsets.items()},
                   "turned_records": turned[:listed], "turned_records_listed": min(len(turned), listed),
                   "turned_records_total": len(turned), "doubted_below": DOUBTED_BELOW,
                   "doubted_records": doubted[:listed], "doubted_records_total": len(doubted)}
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(payload, f, indent=2)
        return path


def write_html(result: OrientationCheck, data_dir: str, path: str, shown: int = 120) -> str:
    """A page a person can look through: the records trained as turned (the archive's sideways and upside-down
    scans, found on the way), most sure first, each as ingest stored it and turned upright as the check reads it,
    at most `shown` of them (the JSON lists more). Pictures come from the shards, inlined (pipelines.report's
    style); the originals are not needed."""
    import html
    import io

    import tensorflow as tf
    from PIL import Image

    from pipelines import imaging, report
    from trainer import input as train_input

    turned, doubted = result.turned_records(), result.doubted_records()
    wanted: Dict[str, List[str]] = {}
    for row in turned[:shown] + doubted[:shown]:
        wanted.setdefault(str(row["split"]), []).append(str(row["record"]))
    images = train_input.record_images(data_dir, wanted)

    def stored_picture(row):
        """(the stored picture as a thumbnail, its stored orientation in degrees), or (None, 0) when not found."""
        if row["record"] not in images:
            return None, 0
        data, stored = images[row["record"]]
        with Image.open(io.BytesIO(data)) as opened:
            picture = opened.convert("RGB")
        picture.thumbnail((report.THUMB_SIZE, report.THUMB_SIZE))
        return picture, max(stored, 0)

    tiles = []
    for row in turned[:shown]:
        before, stored = stored_picture(row)
        after = None if before is None else imaging.make_upright(before, (stored + int(row["turned_more_degrees"]))
                                                                  % 360)
        caption = (f"{html.escape(str(row['record']))}<br>{row['split']}: turned {row['turned_more_degrees']}° "
                   f"more than stored (posterior {float(row['posterior']):.3f})")
        tiles.append(f'<figure class="thumb pair">{report.before_after(before, after)}'
                     f'<figcaption>{caption}</figcaption></figure>')
    doubts = []
    for row in doubted[:shown]:
        picture, stored = stored_picture(row)
        upright = None if picture is None else imaging.make_upright(picture, stored)
        caption = (f"{html.escape(str(row['record']))}<br>{row['split']}: trained as stored, posterior "
                   f"{float(row['posterior']):.3f}")
        doubts.append(f'<figure class="thumb doubted">{report.img_tag(upright, "as stored")}'
                      f'<figcaption>{caption}</figcaption></figure>')
    mix = ", ".join(f"{90 * k}°: {100 * p:.1f}%" for k, p in enumerate(result.turn_mix))
    counts = "; ".join(f"{split}: {int((o > 0).sum())} of {len(o)} records trained as turned"
                       for split, o in result.offsets.items())
    body = (f"<p class=meta>The default model's reading of this archive's stored turns before tuning: {mix}. "
            f"{html.escape(counts)}. Each scan below is shown as stored and turned upright as the check reads it, "
            f"most sure first{f'; the first {shown} of {len(turned)} (all in orientation_check.json)' if len(turned) > shown else ''}."
            f"</p><div class=\"sheet\">{''.join(tiles) or '<p>none: every record is trained as stored</p>'}</div>"
            f"<h2 id=\"doubted\">Trained as stored, but doubted ({len(doubted)}"
            f"{f', first {shown} shown' if len(doubted) > shown else ''})</h2><p class=meta>The model leans to a turn "
            f"for these (its posterior for the stored turn is below {DOUBTED_BELOW}), not enough to relabel them: "
            f"worth a person's look. Each is shown the way up its stored label says.</p>"
            f"<div class=\"sheet\">{''.join(doubts) or '<p>none</p>'}</div>")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(report.html_page("Scans the orientation check found turned", body))
    return path


def save(result: OrientationCheck, path: str) -> str:
    """The whole check (every record's key, turn and weight) as .npz, for a restarted job to reuse (local or gs://)."""
    import io

    import tensorflow as tf

    arrays = {"turn_mix": result.turn_mix, "splits": np.array(list(result.keys), dtype=str)}
    for split in result.keys:
        arrays[f"{split}/keys"] = np.array(result.keys[split], dtype=str)
        arrays[f"{split}/offsets"] = result.offsets[split]
        arrays[f"{split}/weights"] = result.weights[split]
        arrays[f"{split}/rows_per_record"] = result.rows_per_record[split]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def load_matching(path: str, layouts: Dict[str, Tuple[List[str], np.ndarray, np.ndarray]]
                  ) -> Optional[OrientationCheck]:
    """The check saved at path when it was made for exactly these records (same splits, keys and layout), else
    None (no file, or the data changed since)."""
    import io

    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f, np.load(io.BytesIO(f.read())) as z:
        if sorted(z["splits"].tolist()) != sorted(layouts):
            return None
        keys, offsets, weights, rows = {}, {}, {}, {}
        for split, (split_keys, split_rows, _) in layouts.items():
            known = [k for k, r in zip(split_keys, split_rows) if r == QUARTERS]
            if z[f"{split}/keys"].tolist() != known or not np.array_equal(z[f"{split}/rows_per_record"], split_rows):
                return None
            keys[split], rows[split] = known, split_rows
            offsets[split], weights[split] = z[f"{split}/offsets"], z[f"{split}/weights"]
        return OrientationCheck(z["turn_mix"], keys, offsets, weights, rows)


def check(answers: Dict[str, np.ndarray], layouts: Dict[str, Tuple[List[str], np.ndarray, np.ndarray]],
          temperature: float) -> OrientationCheck:
    """answers: split -> [R, 4] the head's answers (at T = 1) for every example row of that split, in record order;
    layouts: split -> (keys, rows_per_record, stored quarter turns) of its usable records (train_input.
    record_layout). The turn mix is estimated over all splits together (one archive)."""
    qs, known_keys = {}, {}
    for split, (keys, rows, stored) in layouts.items():
        qs[split] = stored_turn_probabilities(with_temperature(answers[split], temperature), rows, stored)
        known_keys[split] = [k for k, r in zip(keys, rows) if r == QUARTERS]
    splits = list(qs)
    pi, posterior = estimate_turn_mix(np.concatenate([qs[s] for s in splits]) if splits else np.zeros((0, QUARTERS)))
    offsets, weights, at = {}, {}, 0
    for split in splits:
        part = posterior[at:at + len(qs[split])]
        at += len(qs[split])
        offsets[split] = part.argmax(axis=1).astype(np.int64)
        weights[split] = part.max(axis=1).astype(np.float32) if len(part) else np.zeros(0, np.float32)
    return OrientationCheck(pi, known_keys, offsets, weights, {s: layouts[s][1] for s in splits})


def head_answers(model, batches, output: str) -> np.ndarray:
    """[R, 4] the model's `output` for every batch of inputs (a model returning a dict of outputs)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(x):
        out = model(x, training=False)
        return out[output] if isinstance(out, dict) else out

    parts = [run(x).numpy() for x in batches]
    return np.concatenate(parts) if parts else np.zeros((0, QUARTERS), np.float32)


def cache_batches(features: np.ndarray, batch_size: int = 512) -> Sequence[np.ndarray]:
    """A feature cache's rows in batches (read from its memmap a batch at a time)."""
    return (np.asarray(features[i:i + batch_size], np.float32) for i in range(0, len(features), batch_size))


def check_path(job_private_dir: str, suffix: str = ".json") -> str:
    """Where the job writes what the check found: .json for people, .npz (every record) for a restart."""
    return os.path.join(job_private_dir, "orientation_check" + suffix)
