"""tf.data input: shards -> parsed records -> pixels with exact rot90 orientation labels -> batches.

Orientation convention (shared with serving): label d means the stored image is the upright image turned
d degrees clockwise. A record stored with known orientation d and turned a further r degrees clockwise is
labelled (d + r) % 360. `tf.image.rot90(x, k)` turns counter-clockwise, so a clockwise turn by d is
`rot90(x, (4 - d // 90) % 4)`. Records whose orientation is unknown (-1) are never turned and only train
the class head (orientation sample weight 0); records without a class label (-1) only train orientation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pipelines import schema
from trainer import preprocessing
from trainer.config import TrainConfig

CLASS_OUTPUT = schema.CLASS_PROBABILITIES
ORIENTATION_OUTPUT = schema.ORIENTATION_PROBABILITIES
TURNS = schema.ORIENTATIONS
LABELS_FILENAME = "labels.json"
MANIFEST_FILENAME = "manifest.parquet"
RUN_FILENAME = "run.json"  # ingest writes it last: its presence says the manifest describes a finished run


class DataError(ValueError):
    """The data directory cannot feed the requested training (no shards, no usable records, no classes)."""


@dataclasses.dataclass(frozen=True)
class SplitSize:
    """How many records a split holds and how many examples they make once turned.

    class_records / orientation_records: how many of the usable records carry a label for that head
    (a class index >= 0, a known stored orientation >= 0), counted for the active heads only.
    """

    records: int
    examples: int
    class_records: int = 0
    orientation_records: int = 0


def list_shards(data_dir: str, split: str) -> List[str]:
    """Sorted shard files of one split: DIR/<split>-NNNNN-of-MMMMM.tfrecord[.gz], and the sets `ingest --append`
    adds beside them, DIR/<split>-a<N>-NNNNN-of-MMMMM.tfrecord[.gz] (one per append).

    Each numbered set must be whole: ingest renames its shards into place one by one at the end, so a job that died
    there (or a copy that stopped half way) leaves some of them, and training on those would silently drop data. An
    appended set must also be one the folder's run.json records (where there is one): an append that did not finish
    (or is still running) has not yet marked the records its files replace as superseded.
    """
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{split}-*.tfrecord")) +
                   tf.io.gfile.glob(os.path.join(data_dir, f"{split}-*.tfrecord.gz")))
    pattern = rf"^{re.escape(split)}-(?:(a\d+)-)?(\d+)-of-(\d+)\.tfrecord(\.gz)?$"
    sets: Dict[str, List[Tuple[int, int]]] = {}
    appended = []
    for path in files:
        match = re.match(pattern, os.path.basename(path))
        if match:
            sets.setdefault(match.group(1) or "", []).append((int(match.group(2)), int(match.group(3))))
            appended += [os.path.basename(path)] if match.group(1) else []
    for tag, numbers in sorted(sets.items()):
        totals = {total for _, total in numbers}
        missing = sorted(set(range(max(totals))) - {index for index, _ in numbers})
        if len(totals) > 1 or missing:
            shown = ", ".join(f"{i:05d}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(f"{data_dir}: the {split} shards{f' of append {tag}' if tag else ''} are not a whole set "
                            f"(of {sorted(totals)}; missing: {shown or 'none'}): an ingest that did not finish, or an "
                            f"incomplete copy; rerun ingest into an empty folder")
    if appended:
        _check_appended(data_dir, split, appended)
    return files


def _check_appended(data_dir: str, split: str, appended: List[str]) -> None:
    """Refuse appended shards (file names) the folder's run.json does not record (ingest writes it last)."""
    path = os.path.join(data_dir, RUN_FILENAME)
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        recorded = json.load(f).get("shard_bytes") or {}
    unrecorded = [name for name in appended if name not in recorded]
    if unrecorded:
        raise DataError(f"{data_dir}: its run.json does not record the {split} shards {', '.join(unrecorded[:5])}"
                        f"{' ...' if len(unrecorded) > 5 else ''}: an `ingest --append` that did not finish (its next "
                        f"run removes them) or is still running")


def read_class_names(data_dir: str) -> List[str]:
    """Class names from DIR/labels.json (index = position); [] for an unlabelled archive or no file."""
    path = os.path.join(data_dir, LABELS_FILENAME)
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        return list(json.load(f).get("classes", []))


def superseded_records(data_dir: str) -> List[str]:
    """The records `ingest --append` marked superseded in DIR's manifest, as keys of their shard file name, sha256
    and source uri joined by newlines ([] when none): they stay in their shards, never rewritten, but describe a
    version of their file that is gone.

    Only the row groups whose statistics show a superseded row are read (a local manifest is read in place; a remote
    one is fetched first, as a staged training job has it locally: archive_vision.cluster)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = os.path.join(data_dir, MANIFEST_FILENAME)
    if not tf.io.gfile.exists(path):
        return []
    if "://" in path:
        with tf.io.gfile.GFile(path, "rb") as f:
            manifest = pq.ParquetFile(pa.BufferReader(f.read()))
    else:
        manifest = pq.ParquetFile(path)
    if "superseded" not in manifest.schema_arrow.names:
        return []
    column = manifest.schema_arrow.get_field_index("superseded")
    keys = set()
    for group in range(manifest.num_row_groups):
        stats = manifest.metadata.row_group(group).column(column).statistics
        if stats is not None and stats.has_min_max and not stats.max:
            continue
        table = manifest.read_row_group(group, columns=["shard", "sha256", "source_uri", "superseded"])
        table = table.filter(pc.fill_null(table["superseded"], False))
        keys.update(f"{shard}\n{sha}\n{uri}" for shard, sha, uri in zip(
            *(table[name].to_pylist() for name in ("shard", "sha256", "source_uri"))))
    return sorted(keys)


def _read_records(files: List[str], shuffle_files: bool, seed: int) -> tf.data.Dataset:
    """Interleaved raw records of the given files (all in one data dir); GZIP detected per file by its suffix. The
    records the manifest marks superseded (superseded_records) are left out."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    superseded = superseded_records(os.path.dirname(files[0])) if files else []
    table = None
    if superseded:
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(superseded), tf.ones([len(superseded)], tf.int64)), default_value=0)
    spec = schema.tf_feature_spec()
    identity = {key: spec[key] for key in (schema.SHA256, schema.SOURCE_URI)}

    def open_file(path: tf.Tensor) -> tf.data.Dataset:
        compression = tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")
        records = tf.data.TFRecordDataset(path, compression_type=compression)
        if table is None:
            return records
        shard = tf.strings.regex_replace(path, r"^.*/", "")

        def current(serialized: tf.Tensor) -> tf.Tensor:
            parsed = tf.io.parse_single_example(serialized, identity)
            key = tf.strings.join([shard, parsed[schema.SHA256], parsed[schema.SOURCE_URI]], separator="\n")
            return tf.equal(table.lookup(key), 0)

        return records.filter(current)

    # Deterministic order (given the seed): runs are reproducible and strategies comparable.
    return ds.interleave(open_file, cycle_length=max(1, min(len(files), 8)),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _parse(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    spec = schema.tf_feature_spec()
    keys = (schema.IMAGE_ENCODED, schema.LABEL_INDEX, schema.ORIENTATION, schema.SOURCE_URI, schema.PAGE,
            schema.AUGMENT_INDEX)
    parsed = tf.io.parse_single_example(serialized, {k: spec[k] for k in keys})
    return {
        "encoded": parsed[schema.IMAGE_ENCODED],
        "class_label": tf.cast(parsed[schema.LABEL_INDEX], tf.int32),
        "stored_orientation": tf.cast(parsed[schema.ORIENTATION], tf.int32),
        "source_uri": parsed[schema.SOURCE_URI],
        "page": tf.cast(parsed[schema.PAGE], tf.int32),
        "augment_index": tf.cast(parsed[schema.AUGMENT_INDEX], tf.int32),
    }


def _usable(record: Dict[str, tf.Tensor], cfg: TrainConfig) -> tf.Tensor:
    """A record is used when at least one active head has a label for it."""
    has_class = tf.logical_and(tf.constant(cfg.uses_classes), record["class_label"] >= 0)
    has_turn = tf.logical_and(tf.constant(cfg.uses_orientation), record["stored_orientation"] >= 0)
    return tf.logical_or(has_class, has_turn)


def turn_clockwise(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Exact clockwise turn of an [H, W, C] image by a multiple of 90 degrees (no interpolation)."""
    return tf.image.rot90(image, k=(4 - (degrees // 90) % 4) % 4)


def _shift(image: tf.Tensor, max_shift: float, size: int) -> tf.Tensor:
    """Random translation by up to max_shift of the side: mirror-pad, then crop back at a random offset."""
    pad = int(round(max_shift * size))
    if pad <= 0:
        return image
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
    return tf.image.random_crop(padded, [size, size, 3])


def record_key(source_uri, page, augment_index=0):
    """A record's key, source_uri#page (and +k for ingest's k-th augmented copy, which may be mirrored: a mirror
    swaps 90 and 270, so a copy is judged on its own), for numpy/str or tf.string values alike."""
    if isinstance(source_uri, tf.Tensor):
        key = tf.strings.join([source_uri, tf.strings.as_string(page)], separator="#")
        return tf.where(augment_index > 0, tf.strings.join([key, tf.strings.as_string(augment_index)], "+"), key)
    return f"{source_uri}#{int(page)}" + (f"+{int(augment_index)}" if augment_index > 0 else "")


class Corrections:
    """Orientation corrections by record key (trainer.orientation_check): quarter turns to add to the stored
    orientation, and a factor on the orientation weight; records not in it are used as stored."""

    def __init__(self, table: Dict[str, Tuple[int, float]]):
        keys = tf.constant(list(table) or [""], tf.string)
        offsets = tf.constant([v[0] for v in table.values()] or [0], tf.int32)
        weights = tf.constant([v[1] for v in table.values()] or [1.0], tf.float32)
        self.offsets = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, offsets), 0)
        self.weights = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, weights), 1.0)

    def apply(self, record: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
        """(stored orientation in degrees, corrected where known, orientation weight factor) of a parsed record."""
        key = record_key(record["source_uri"], record["page"], record["augment_index"])
        stored = record["stored_orientation"]
        corrected = tf.where(stored >= 0, (stored + 90 * self.offsets.lookup(key)) % 360, stored)
        return corrected, self.weights.lookup(key)


def _examples_of_record(record: Dict[str, tf.Tensor], cfg: TrainConfig, training: bool,
                        all_turns: bool, corrections: Optional[Corrections] = None) -> Dict[str, tf.Tensor]:
    """Stack of the examples one record makes: up to 4 turned copies, each with labels and weights."""
    size = cfg.image_size
    pixels = preprocessing.preprocess_image_bytes(record["encoded"], size)
    stored = record["stored_orientation"]
    weight_factor = tf.constant(1.0)
    if corrections is not None:
        stored, weight_factor = corrections.apply(record)
    known = tf.logical_and(tf.constant(cfg.uses_orientation), stored >= 0)
    stored_or_zero = tf.where(stored >= 0, stored, 0)
    # Augment the upright image, so a mirror or shift cannot disagree with the orientation label.
    upright = tf.image.rot90(pixels, k=(stored_or_zero // 90) % 4)
    if training and cfg.allow_flip:
        upright = tf.image.random_flip_left_right(upright)
    if training and cfg.max_shift > 0:
        upright = _shift(upright, cfg.max_shift, size)

    if all_turns:
        extra = tf.constant(TURNS, tf.int32)
    else:
        extra = tf.random.uniform([1], 0, 4, dtype=tf.int32) * 90
    # Unknown orientation: keep the record as stored (one copy, no turn), class head only.
    extra = tf.cond(known, lambda: extra, lambda: tf.zeros([1], tf.int32))
    final = (stored_or_zero + extra) % 360
    images = tf.map_fn(lambda t: turn_clockwise(upright, t), final, fn_output_signature=tf.float32)
    n = tf.shape(extra)[0]
    class_label = record["class_label"]
    has_class = tf.logical_and(tf.constant(cfg.uses_classes), class_label >= 0)
    return {
        "pixels": tf.ensure_shape(images, [None, size, size, 3]),
        "class_label": tf.fill([n], tf.maximum(class_label, 0)),
        "class_weight": tf.fill([n], tf.cast(has_class, tf.float32)),
        "orientation_label": tf.where(known, final // 90, tf.zeros_like(final)),
        "orientation_weight": tf.fill([n], tf.cast(known, tf.float32) * weight_factor),
        "turn": tf.where(known, extra, tf.zeros_like(extra)),
        "stored_orientation": tf.fill([n], stored),
        "source_uri": tf.fill([n], record["source_uri"]),
        "page": tf.fill([n], record["page"]),
    }


def example_dataset(data_dir: str, split: str, cfg: TrainConfig, training: bool,
                    all_turns: Optional[bool] = None, files: Optional[List[str]] = None,
                    corrections: Optional[Corrections] = None) -> tf.data.Dataset:
    """Unbatched examples (dicts: pixels, labels, weights, source_uri, page, turn) of one split; `corrections`
    (from the orientation check of `train --init default`) change records' stored orientations and weights."""
    files = files if files is not None else list_shards(data_dir, split)
    if not files:
        raise DataError(f"no {split}-*.tfrecord[.gz] shards in {data_dir}")
    all_turns = (cfg.rotations == "all" or not training) if all_turns is None else all_turns
    ds = _read_records(files, shuffle_files=training, seed=cfg.seed)
    ds = ds.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.filter(lambda r: _usable(r, cfg))
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda r: _examples_of_record(r, cfg, training, all_turns, corrections),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.unbatch()


def record_layout(data_dir: str, split: str, cfg: TrainConfig) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(keys, rows each makes, stored quarter turns) of the split's usable records, in the order
    example_dataset(training=False, all_turns=True) and the feature cache take them; a record with a known
    orientation makes 4 rows, any other 1. Reads the label fields only (no image is decoded)."""
    keys = (schema.LABEL_INDEX, schema.ORIENTATION, schema.SOURCE_URI, schema.PAGE, schema.AUGMENT_INDEX)
    names, rows, stored = [], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch in _label_fields(list_shards(data_dir, split), keys):
        turn = batch[schema.ORIENTATION]
        _, known, usable = _label_masks(batch[schema.LABEL_INDEX], turn, cfg)
        names.extend(record_key(u.decode("utf-8", "replace"), p, a) for u, p, a in zip(
            batch[schema.SOURCE_URI][usable], batch[schema.PAGE][usable], batch[schema.AUGMENT_INDEX][usable]))
        rows.append(np.where(known, 4, 1)[usable])
        stored.append((np.maximum(turn, 0) // 90)[usable])
    return names, np.concatenate(rows), np.concatenate(stored)


def record_images(data_dir: str, wanted: Dict[str, Sequence[str]]) -> Dict[str, Tuple[bytes, int]]:
    """{record key: (its stored image's encoded bytes, stored orientation in degrees)} for the keys `wanted` per
    split (record_key); one pass over those splits' shards, stopping once every key is found."""
    keys = (schema.SOURCE_URI, schema.PAGE, schema.AUGMENT_INDEX, schema.IMAGE_ENCODED, schema.ORIENTATION)
    found: Dict[str, Tuple[bytes, int]] = {}
    for split, split_keys in wanted.items():
        left = set(split_keys) - set(found)
        if not left:
            continue
        for batch in _label_fields(list_shards(data_dir, split), keys):
            for uri, page, augment, data, turn in zip(*(batch[k] for k in keys)):
                key = record_key(uri.decode("utf-8", "replace"), page, augment)
                if key in left:
                    found[key] = (bytes(data), int(turn))
                    left.discard(key)
            if not left:
                break
    return found


def ingest_options(data_dir: str) -> Dict[str, Any]:
    """The options of the finished ingest run that wrote these shards (its run.json), {} when there is none or it
    cannot be read."""
    path = os.path.join(data_dir, RUN_FILENAME)
    try:
        with tf.io.gfile.GFile(path) as f:
            return dict(json.load(f).get("options") or {})
    except Exception:  # noqa: BLE001 - shards written by something else: nothing known about how
        return {}


def _label_masks(label, turn, cfg: TrainConfig):
    """(has_class, has_turn, usable) of records with these class indices and stored orientations (numpy): the
    numpy twin of _usable."""
    has_class = (label >= 0) & cfg.uses_classes
    has_turn = (turn >= 0) & cfg.uses_orientation
    return has_class, has_turn, has_class | has_turn


def _label_fields(files: List[str], keys: Sequence[str]):
    """The records' fields `keys` (no pixels are decoded), a batch of arrays at a time, in the order
    example_dataset reads them when not training."""
    spec = schema.tf_feature_spec()
    ds = _read_records(files, shuffle_files=False, seed=0).batch(1024).map(
        lambda s: tf.io.parse_example(s, {k: spec[k] for k in keys}))
    return ds.as_numpy_iterator()


def _tally(label, turn, cfg: TrainConfig, all_turns: bool) -> SplitSize:
    """SplitSize of records with these class indices and stored orientations (numpy int arrays)."""
    has_class, has_turn, usable = _label_masks(label, turn, cfg)
    return SplitSize(int(usable.sum()), int((has_turn * (4 if all_turns else 1)).sum() + (usable & ~has_turn).sum()),
                     int(has_class.sum()), int(has_turn.sum()))


def _manifest_labels(data_dir: str, split: str, files: List[str]):
    """(label_index, orientation) arrays of the split from ingest's manifest.parquet, or None when the manifest
    cannot vouch for these shards: no finished ingest run here (run.json), shard sizes other than that run
    recorded, or a manifest naming other shard files."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest_path, run_path = os.path.join(data_dir, MANIFEST_FILENAME), os.path.join(data_dir, RUN_FILENAME)
    if not (tf.io.gfile.exists(manifest_path) and tf.io.gfile.exists(run_path)):
        return None
    try:
        with tf.io.gfile.GFile(run_path) as f:
            recorded = json.load(f).get("shard_bytes") or {}
        # Each shard as that run wrote it (a shard rewritten or cut short since then has another size).
        if any(recorded.get(os.path.basename(f)) != tf.io.gfile.stat(f).length for f in files):
            print(f"[data] {run_path} does not describe the {split} shards now in {data_dir}; counting from them")
            return None
        with tf.io.gfile.GFile(manifest_path, "rb") as f:  # local or gs://; the manifest has no pixels
            manifest = pq.ParquetFile(pa.BufferReader(f.read()))
            columns = ["split", "shard", "label_index", "orientation"] + \
                (["superseded"] if "superseded" in manifest.schema_arrow.names else [])
            table = manifest.read(columns=columns)
    except Exception as e:  # noqa: BLE001 - an unreadable manifest or run.json only costs the reading pass
        print(f"[data] {manifest_path} unreadable ({type(e).__name__}: {e}); counting {split} from the shards")
        return None
    table = table.filter(pc.equal(table["split"], split))
    if set(table["shard"].to_pylist()) != {os.path.basename(f) for f in files}:
        print(f"[data] {manifest_path} names other {split} shards than {data_dir} holds; counting from the shards")
        return None
    if "superseded" in table.column_names:  # records `ingest --append` replaced stay in their shards, unread
        table = table.filter(pc.invert(pc.fill_null(table["superseded"], False)))
    return (table["label_index"].to_numpy(zero_copy_only=False).astype(np.int64),
            table["orientation"].to_numpy(zero_copy_only=False).astype(np.int64))


def count_split(data_dir: str, split: str, cfg: TrainConfig, all_turns: Optional[bool] = None) -> SplitSize:
    """Records and examples of a split: from ingest's manifest when it vouches for the shards (one small Parquet
    read instead of a pass over every shard), else from the records' label fields (no image decoding)."""
    files = list_shards(data_dir, split)
    if not files:
        return SplitSize(0, 0)
    all_turns = (cfg.rotations == "all" or split != "train") if all_turns is None else all_turns
    labels = _manifest_labels(data_dir, split, files)
    if labels is not None:
        return _tally(labels[0], labels[1], cfg, all_turns)
    labels, turns = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch in _label_fields(files, (schema.LABEL_INDEX, schema.ORIENTATION)):
        labels.append(batch[schema.LABEL_INDEX])
        turns.append(batch[schema.ORIENTATION])
    return _tally(np.concatenate(labels), np.concatenate(turns), cfg, all_turns)


def check_task_labels(cfg: TrainConfig, split: str = "train") -> SplitSize:
    """Refuse a job in which an active head would never see a label, before anything is trained.

    Orientation labels exist only for records stored with a known orientation (>= 0): `ingest --assume-upright`
    (or an orientation column in the manifest) gives them; the trainer then turns each such image into its
    four exact rot90 copies. A plain ingest stores -1 everywhere, and training would export an orientation
    head that never saw a label. Likewise a class head with no class-labelled record. The one exception:
    `--init default` starts the orientation head from the shipped one, which then ships unchanged (the
    caller says so). Returns the split's counts.
    """
    if not list_shards(cfg.data, split):
        raise DataError(f"no {split}-*.tfrecord[.gz] shards in {cfg.data}")
    size = count_split(cfg.data, split, cfg)

    def others(task: str) -> str:
        rest = [t for t in cfg.tasks if t != task]
        return f", or train without this head: --tasks {','.join(rest)}" if rest else ""

    if cfg.uses_orientation and size.orientation_records == 0 and cfg.init == "none":
        raise DataError(
            f"task 'orientation': no {split} record in {cfg.data} has a known orientation (all are stored with "
            f"orientation -1), so the orientation head would never see a label and would be exported untrained. "
            f"Re-run `archive-vision ingest` with --assume-upright if the scans are upright (or give an "
            f"orientation column in the manifest){others('orientation')}")
    if cfg.uses_classes and size.class_records == 0:
        raise DataError(
            f"task 'classes': no {split} record in {cfg.data} has a class label, so the class head would never "
            f"see a label and would be exported untrained. Ingest with class labels (class folders or a label "
            f"column){others('classes')}")
    if size.records == 0:
        raise DataError(f"no usable {split} records in {cfg.data} for tasks {','.join(cfg.tasks)}")
    return size


def training_tuple(example: Dict[str, tf.Tensor], cfg: TrainConfig, features_key: str = "pixels"
                   ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    """(inputs, targets, sample_weights) keyed by the model's output names, active heads only."""
    targets, weights = {}, {}
    if cfg.uses_classes:
        targets[CLASS_OUTPUT] = example["class_label"]
        weights[CLASS_OUTPUT] = example["class_weight"]
    if cfg.uses_orientation:
        targets[ORIENTATION_OUTPUT] = example["orientation_label"]
        weights[ORIENTATION_OUTPUT] = example["orientation_weight"]
    return example[features_key], targets, weights


def padding_examples(element_spec: Dict[str, tf.TensorSpec], count: int) -> tf.data.Dataset:
    """`count` all-zero examples with weight 0: fill the last batch so every replica gets a full one."""
    zeros = {k: tf.zeros([d if d is not None else 1 for d in s.shape], s.dtype)
             for k, s in element_spec.items()}
    return tf.data.Dataset.from_tensors(zeros).repeat(count)


def batch_for_replicas(ds: tf.data.Dataset, global_batch: int, training: bool) -> tf.data.Dataset:
    """Batch with no partial batch ever: training repeats forever, evaluation pads with weight-0 examples.

    A partial final batch leaves some replicas of a MirroredStrategy empty, which crashes the step.
    Appending global_batch - 1 padding examples and dropping the remainder keeps every real example
    while only padding can be dropped.
    """
    if training:
        return ds.repeat().batch(global_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    ds = ds.concatenate(padding_examples(ds.element_spec, global_batch - 1))
    return ds.batch(global_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def with_shard_policy(ds: tf.data.Dataset, policy: tf.data.experimental.AutoShardPolicy) -> tf.data.Dataset:
    """Set how a multi-worker strategy splits the dataset between workers."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return ds.with_options(options)


def make_fit_datasets(cfg: TrainConfig, global_batch: int, num_workers: int,
                      train_size: Optional[SplitSize] = None, corrections: Optional[Corrections] = None
                      ) -> Tuple[tf.data.Dataset, int, Optional[tf.data.Dataset], Optional[int]]:
    """(train dataset, steps per epoch, val dataset or None, val steps) of (x, y, w) batches for fit().

    train_size: the train split's count_split when the caller already has it (check_task_labels), saving a pass.
    corrections: the orientation check's (train --init default), for both splits.
    """
    train_size = train_size or count_split(cfg.data, "train", cfg)
    if train_size.examples == 0:
        raise DataError(f"no usable train records in {cfg.data} for tasks {','.join(cfg.tasks)}")
    train = example_dataset(cfg.data, "train", cfg, training=True, corrections=corrections)
    train = batch_for_replicas(train, global_batch, training=True)
    train = train.map(lambda e: training_tuple(e, cfg))
    # By file, so workers read disjoint shards; fall back to by-record when there are too few files.
    n_train_files = len(list_shards(cfg.data, "train"))
    policy = tf.data.experimental.AutoShardPolicy
    train = with_shard_policy(train, policy.FILE if n_train_files >= num_workers else policy.DATA)
    steps = max(1, train_size.examples // global_batch)

    val_size = count_split(cfg.data, "val", cfg)
    if val_size.examples == 0:
        return train, steps, None, None
    val = example_dataset(cfg.data, "val", cfg, training=False, corrections=corrections)
    val = batch_for_replicas(val, global_batch, training=False).map(lambda e: training_tuple(e, cfg))
    val_steps = math.ceil(val_size.examples / global_batch)
    # Keras keeps one validation iterator across epochs when validation_steps is given, so the stream
    # repeats; one pass is exactly val_steps padded batches, so every epoch sees each example once.
    val = val.repeat()
    if num_workers > 1:
        # Workers may hold different shard counts: a fixed step count on a repeated stream keeps their
        # collective ops in lock step (the exact val/test metrics come from evaluate.py on the chief).
        val = with_shard_policy(val, policy.DATA)
    return train, steps, val, val_steps
