"""Frozen-feature cache: run the frozen backbone once per image and turn, then train the heads on the features.

With a frozen backbone (inference-mode BatchNorm) and no pixel augmentation, every epoch would compute the
same features again; caching them makes head training a small fraction of the work. All four turns of each
image with a known orientation are cached. On disk the cache sits in JOB/feature_cache/<split>-<fingerprint>/
and is reused by a restarted job when backbone, weights, image size, tasks, --init (and the shipped weights
it loads) and shards are unchanged. The disk
cache streams both ways: features.npy is a memmap written batch by batch while the backbone runs, and training
reads only each batch's rows from it, so a split's features never have to fit in RAM.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from trainer import input as train_input
from trainer.config import TrainConfig

log = logging.getLogger(__name__)

LABEL_FIELDS = ("class_label", "class_weight", "orientation_label", "orientation_weight")


@dataclasses.dataclass
class FeatureCache:
    """Backbone features of one split plus their labels and sample weights (row i = example i)."""

    features: np.ndarray                 # [n, h, w, C] float32 (a read-only memmap when on disk)
    labels: Dict[str, np.ndarray]        # LABEL_FIELDS -> [n]
    location: Optional[str] = None       # directory on disk, None when in memory

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _fingerprint(cfg: TrainConfig, split: str) -> str:
    shards = []
    for path in train_input.list_shards(cfg.data, split):
        stat = tf.io.gfile.stat(path)
        shards.append([path, stat.length, int(stat.mtime_nsec)])
    # --init default replaces the backbone's top layers with the shipped fine-tuned ones: other features (and
    # other ones again when the shipped weights change).
    init = cfg.init
    if init != "none":
        from trainer.default_model import init_weights, weights_digest

        init += ":" + weights_digest(init_weights(cfg.init))
    fields = {"backbone": cfg.backbone, "weights": cfg.weights, "size": cfg.image_size, "tasks": sorted(cfg.tasks),
              "shards": shards, "init": init}
    superseded = train_input.superseded_records(cfg.data)
    if superseded:  # an `ingest --append` may supersede records without adding a shard (a changed file that failed)
        fields["superseded"] = hashlib.sha256("\n".join(superseded).encode()).hexdigest()
    key = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_dir(cfg: TrainConfig, split: str, root: str) -> str:
    """Directory of a split's cache under root (the job dir's feature_cache/)."""
    return os.path.join(root, "feature_cache", f"{split}-{_fingerprint(cfg, split)}")


def _load(directory: str) -> Optional[FeatureCache]:
    if not os.path.exists(os.path.join(directory, "COMPLETE")):
        return None
    features = np.load(os.path.join(directory, "features.npy"), mmap_mode="r")
    with np.load(os.path.join(directory, "labels.npz")) as z:
        labels = {k: z[k] for k in LABEL_FIELDS}
    return FeatureCache(features, labels, directory)


def make_extractor(backbone: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """One traced inference-mode forward pass of the backbone, shared by every split's cache."""

    @tf.function(reduce_retracing=True)
    def extract(pixels):
        return backbone(pixels, training=False)

    return extract


def compute_feature_cache(backbone: keras.Model, cfg: TrainConfig, split: str, root: Optional[str] = None,
                          batch_size: int = 64, extract: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
                          ) -> Optional[FeatureCache]:
    """Features of every example (all four turns) of a split; None when the split has no shards.

    root=None keeps the cache in memory; otherwise it is written to (or reused from) a directory under root,
    batch by batch into a features.npy memmap sized from count_split, and read back as a memmap.
    Pass the same `extract` (make_extractor) for several splits to trace the backbone only once.
    """
    if not train_input.list_shards(cfg.data, split):
        return None
    directory = cache_dir(cfg, split, root) if root else None
    if directory:
        cached = _load(directory)
        if cached is not None:
            log.info("feature cache: reusing %s (%d examples)", directory, len(cached))
            return cached

    extract = extract or make_extractor(backbone)
    # The count is known from the label fields alone, so the features can go straight into a preallocated
    # array: a .npy memmap on disk (each batch written as it comes, never the whole split in RAM) or, for
    # --cache-location memory, one array in RAM (no list of chunks to concatenate, so no doubled peak).
    n = train_input.count_split(cfg.data, split, cfg, all_turns=True).examples
    if n == 0:
        return None
    ds = train_input.example_dataset(cfg.data, split, cfg, training=False, all_turns=True)
    ds = ds.map(lambda e: (e["pixels"], {k: e[k] for k in LABEL_FIELDS})).batch(batch_size)
    if directory:
        os.makedirs(directory, exist_ok=True)  # no COMPLETE marker here (_load above found none)
    features: Optional[np.ndarray] = None
    labels: Dict[str, List[np.ndarray]] = {k: [] for k in LABEL_FIELDS}
    done = 0
    for pixels, batch_labels in ds:
        batch = extract(pixels).numpy()
        if features is None:
            shape = (n,) + tuple(batch.shape[1:])
            features = (np.lib.format.open_memmap(os.path.join(directory, "features.npy"), mode="w+",
                                                  dtype=np.float32, shape=shape)
                        if directory else np.empty(shape, np.float32))
        if done + len(batch) > n:
            raise RuntimeError(f"feature cache of {split}: the shards yield more than the {n} examples counted")
        features[done:done + len(batch)] = batch
        done += len(batch)
        for k in LABEL_FIELDS:
            labels[k].append(batch_labels[k].numpy())
    if done != n:
        raise RuntimeError(f"feature cache of {split}: {done} examples computed, {n} counted")
    label_arrays = {k: np.concatenate(v) for k, v in labels.items()}
    if directory is None:
        return FeatureCache(features, label_arrays, None)
    feature_shape = list(features.shape[1:])
    features.flush()
    del features  # closes the memmap
    np.savez(os.path.join(directory, "labels.npz"), **label_arrays)
    # Written last: a job killed mid-write leaves no COMPLETE marker, so the cache is recomputed.
    with open(os.path.join(directory, "COMPLETE"), "w") as f:
        f.write(json.dumps({"examples": n, "shape": feature_shape}))
    log.info("feature cache: wrote %s", directory)
    return _load(directory)


def cache_dataset(cache: FeatureCache, cfg: TrainConfig, global_batch: int, training: bool
                  ) -> Tuple[tf.data.Dataset, int]:
    """(dataset of (features, targets, weights) batches, steps per pass) over a cache, never a partial batch.

    Each batch gathers only its own rows (from the memmap when the cache is on disk).
    """
    n = len(cache)
    feature_shape = tuple(cache.features.shape[1:])

    def gather(indices: np.ndarray):
        # Index n is the padding row: zero features, zero weights.
        real = indices < n
        safe = np.where(real, indices, 0)
        feats = np.array(cache.features[safe], np.float32)
        feats[~real] = 0.0
        out = [feats]
        for k in LABEL_FIELDS:
            values = cache.labels[k][safe]
            out.append(np.where(real, values, 0).astype(values.dtype))
        return tuple(out)

    def to_tuple(indices):
        dtypes = [tf.float32] + [tf.as_dtype(cache.labels[k].dtype) for k in LABEL_FIELDS]
        values = tf.numpy_function(gather, [indices], dtypes, stateful=False)
        values[0].set_shape((global_batch,) + feature_shape)
        example = {"features": values[0]}
        for k, v in zip(LABEL_FIELDS, values[1:]):
            v.set_shape((global_batch,))
            example[k] = v
        return train_input.training_tuple(example, cfg, features_key="features")

    indices = tf.data.Dataset.range(n)
    if training:
        ds = indices.shuffle(n, seed=cfg.seed, reshuffle_each_iteration=True).repeat()
        steps = max(1, n // global_batch)
    else:
        ds = indices.concatenate(tf.data.Dataset.from_tensors(tf.constant(n, tf.int64)).repeat(global_batch - 1))
        steps = -(-n // global_batch)
    ds = ds.batch(global_batch, drop_remainder=True)
    if not training:
        ds = ds.repeat()  # one validation iterator serves all epochs (see trainer.input.make_fit_datasets)
    ds = ds.map(to_tuple).prefetch(tf.data.AUTOTUNE)
    return train_input.with_shard_policy(ds, tf.data.experimental.AutoShardPolicy.DATA), steps
