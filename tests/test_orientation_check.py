"""trainer.orientation_check: what `train --init default` makes of an archive's stored turns before tuning."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import input as train_input
from trainer import orientation_check as oc


def _rows_for(stored: int, true_turn: int, sure: float = 1.0) -> np.ndarray:
    """The 4 answer rows a record stored with orientation `stored` (quarter turns) makes when it is really stored
    turned `true_turn` more: row j (turned j more) answers (stored + true_turn + j) with probability `sure`."""
    rows = np.full((4, 4), (1 - sure) / 3)
    for j in range(4):
        rows[j, (stored + true_turn + j) % 4] = sure
    return rows


def test_stored_turn_probabilities_follow_the_record_layout():
    # Records: stored 0 really turned 1; a class-only record (one row); stored 2 (180) really as stored; stored 3
    # really turned 2 more.
    row_probs = np.concatenate([_rows_for(0, 1), np.full((1, 4), 0.25), _rows_for(2, 0, 0.7), _rows_for(3, 2)])
    q = oc.stored_turn_probabilities(row_probs, np.array([4, 1, 4, 4]), np.array([0, 0, 2, 3]))
    assert q.shape == (3, 4)
    assert q.argmax(1).tolist() == [1, 0, 2]
    np.testing.assert_allclose(q[1], [0.7, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError):
        oc.stored_turn_probabilities(row_probs[:-1], np.array([4, 1, 4, 4]), np.array([0, 0, 2, 3]))


def _archive(n: int, mix, seed: int = 0):
    """q of n records and their true turns (drawn from `mix`), from a calibrated model: its answer leans to the
    true turn with probability top (0.9 for half the records, 0.4 for the rest), else to one of the other three,
    and gives the turn it leans to probability top and the others (1 - top) / 3. With the four turns equally
    likely, as in its training, that is the true posterior."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(4, n, p=mix)
    top = np.where(rng.random(n) < 0.5, 0.9, 0.4)
    lean = np.where(rng.random(n) < top, truth, (truth + rng.integers(1, 4, n)) % 4)
    q = np.repeat(((1 - top) / 3)[:, None], 4, axis=1)
    q[np.arange(n), lean] = top
    return q, truth


def test_the_turn_mix_is_found_and_turned_records_are_relabelled():
    q, truth = _archive(4000, [0.7, 0.1, 0.15, 0.05])
    pi, posterior = oc.estimate_turn_mix(q)
    np.testing.assert_allclose(pi, [0.7, 0.1, 0.15, 0.05], atol=0.03)
    # Under the estimated mix, more records get their true turn than by taking them as stored or by q alone.
    assert (posterior.argmax(1) == truth).mean() > max((truth == 0).mean(), (q.argmax(1) == truth).mean())


def test_an_upright_archive_keeps_its_labels_even_where_the_model_leans_elsewhere():
    q, truth = _archive(500, [1.0, 0.0, 0.0, 0.0])
    assert (truth == 0).all() and (q.argmax(1) != 0).mean() > 0.25  # the model is wrong about a quarter
    pi, posterior = oc.estimate_turn_mix(q)
    assert pi[0] > 0.97
    assert (posterior.argmax(1) == 0).mean() > 0.99


def test_the_upright_prior_keeps_a_small_unsure_archive_from_drifting():
    """Seven records whose unsure answers lean to 90: the plain maximum-likelihood mix drifts there."""
    q = np.array([[0.37, 0.25, 0.16, 0.22], [0.33, 0.31, 0.17, 0.19], [0.21, 0.37, 0.28, 0.14],
                  [0.03, 0.84, 0.09, 0.04], [0.09, 0.20, 0.55, 0.16], [0.58, 0.13, 0.18, 0.11],
                  [0.03, 0.04, 0.10, 0.83]])
    drifted, _ = oc.estimate_turn_mix(q, pseudo_records=0)
    assert drifted[0] < 0.5
    pi, posterior = oc.estimate_turn_mix(q)
    assert pi[0] > 0.7
    assert posterior.argmax(1).tolist() == [0, 0, 0, 1, 0, 0, 3]


def test_check_relabels_cache_rows_and_builds_the_lookup_table():
    layouts = {"train": (["a#0", "b#0", "c#0"], np.array([4, 1, 4]), np.array([0, 0, 1])),
               "val": (["d#0"], np.array([4]), np.array([0]))}
    answers = {"train": np.concatenate([_rows_for(0, 2, 0.97), np.full((1, 4), 0.25), _rows_for(1, 0, 0.97)]),
               "val": _rows_for(0, 0, 0.97)}
    result = oc.check(answers, layouts, temperature=1.0)
    assert result.offsets["train"].tolist() == [2, 0] and result.offsets["val"].tolist() == [0]
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
    weights = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1], np.float32)
    new_labels, new_weights = result.relabel_rows("train", labels, weights)
    assert new_labels.tolist() == [2, 3, 0, 1, 0, 1, 2, 3, 0]
    assert new_weights[4] == 0 and 0.5 < new_weights[0] < 1
    assert result.table()["a#0"][0] == 2 and result.table()["c#0"][0] == 0
    with pytest.raises(ValueError):
        result.relabel_rows("train", labels[:-1], weights[:-1])
    assert "train: 1 of 2 trained as turned" in result.summary()


def test_augmented_copies_are_judged_on_their_own():
    """ingest's augmented copies share source_uri#page, and a mirrored copy of an image turned 90 is turned 270:
    each copy gets its own key (+k) and its own answer."""
    assert train_input.record_key("file:///a.png", 0, 0) == "file:///a.png#0"
    assert train_input.record_key("file:///a.png", 0, 2) == "file:///a.png#0+2"
    assert train_input.record_key(tf.constant("file:///a.png"), tf.constant(0), tf.constant(2)).numpy() == \
        b"file:///a.png#0+2"
    keys = ["a#0", "a#0+1", "b#0", "c#0", "d#0"]
    layouts = {"train": (keys, np.full(5, 4), np.zeros(5, np.int64))}
    answers = [_rows_for(0, 1, 0.97), _rows_for(0, 3, 0.97)] + [_rows_for(0, 1, 0.97)] * 3
    result = oc.check({"train": np.concatenate(answers)}, layouts, temperature=1.0)
    assert result.offsets["train"].tolist() == [1, 3, 1, 1, 1]
    assert result.table()["a#0+1"][0] == 3


def test_corrections_turn_a_record_in_the_input_pipeline():
    corrections = train_input.Corrections({"file:///x.png#0": (1, 0.5)})
    record = {"source_uri": tf.constant("file:///x.png"), "page": tf.constant(0), "augment_index": tf.constant(0),
              "stored_orientation": tf.constant(0)}
    stored, factor = corrections.apply(record)
    assert int(stored) == 90 and float(factor) == 0.5
    other = dict(record, source_uri=tf.constant("file:///y.png"))
    stored, factor = corrections.apply(other)
    assert int(stored) == 0 and float(factor) == 1.0
    unknown = dict(record, stored_orientation=tf.constant(-1))
    assert int(corrections.apply(unknown)[0]) == -1


def test_corrections_reach_the_training_and_validation_examples(tmp_path):
    """What the trainer's pixel path feeds fit(): records in the corrections are turned and weighted as the check
    said, the others are as stored."""
    from tests.test_trainer_data import write_archive
    from trainer.config import TrainConfig

    data = write_archive(str(tmp_path / "data"), {"train": 8, "val": 4}, labelled=False, shards_per_split=1)
    cfg = TrainConfig(data=data, job_dir=str(tmp_path / "job"), tasks=("orientation",), image_size=32, batch_size=8)
    corrections = train_input.Corrections({f"file:///archive/{split}/{i:04d}.png#0": (1, 0.5)
                                           for split, n in (("train", 8), ("val", 4)) for i in range(0, n, 2)})
    rows = list(train_input.example_dataset(data, "val", cfg, training=False, all_turns=True,
                                            corrections=corrections).as_numpy_iterator())
    by_record = {}
    for row in rows:
        by_record.setdefault(row["source_uri"].decode(), []).append((int(row["orientation_label"]),
                                                                     float(row["orientation_weight"])))
    assert by_record["file:///archive/val/0000.png"] == [(1, 0.5), (2, 0.5), (3, 0.5), (0, 0.5)]
    assert by_record["file:///archive/val/0001.png"] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]

    train, steps, _, _ = train_input.make_fit_datasets(cfg, 8, 1, corrections=corrections)
    weights = np.concatenate([w[train_input.ORIENTATION_OUTPUT].numpy() for _, _, w in train.take(steps)])
    assert set(np.unique(weights).tolist()) == {0.5, 1.0}


def test_records_trained_as_stored_that_the_model_doubts_are_listed_for_a_person(tmp_path):
    """In an archive where some scans are turned 90, a record the model leans to call turned 90 too, not enough to
    relabel it (its posterior for the stored turn below DOUBTED_BELOW), keeps its label and is listed as doubted
    for a person to look at; sure ones, and the ones trained as turned, are not."""
    import json

    lean = np.zeros((4, 4))
    for j in range(4):  # row j (turned j more): upright at 0.2, turned 90 at 0.7
        lean[j] = 0.05
        lean[j, j], lean[j, (j + 1) % 4] = 0.2, 0.7
    answers = [_rows_for(0, 0, 0.97), _rows_for(0, 0, 0.97), _rows_for(0, 1, 0.97), _rows_for(0, 1, 0.97), lean,
               _rows_for(0, 0, 0.97)]
    layouts = {"train": ([f"r{i}#0" for i in range(6)], np.full(6, 4), np.zeros(6, np.int64))}
    result = oc.check({"train": np.concatenate(answers)}, layouts, temperature=1.0)
    assert result.offsets["train"].tolist() == [0, 0, 1, 1, 0, 0]
    doubted = result.doubted_records()
    assert [r["record"] for r in doubted] == ["r4#0"] and 0.5 < doubted[0]["posterior"] < oc.DOUBTED_BELOW
    with open(result.write(str(tmp_path / "check.json"))) as f:
        written = json.load(f)
    assert written["doubted_records_total"] == 1 and written["doubted_records"][0]["record"] == "r4#0"
    assert [r["record"] for r in written["turned_records"]] == ["r2#0", "r3#0"]
