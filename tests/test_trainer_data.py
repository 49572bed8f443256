"""Generated archives for the trainer tests (`write_archive`) and tests of the trainer's input pipeline."""
from __future__ import annotations

import io
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

from pipelines import schema

CLASS_NAMES = ["warm", "cool"]


def turn_clockwise_np(image: np.ndarray, degrees: int) -> np.ndarray:
    """numpy twin of trainer.input.turn_clockwise (np.rot90 turns counter-clockwise too)."""
    return np.rot90(image, k=(4 - degrees // 90) % 4).copy()


def upright_image(rng: np.random.Generator, size: int, class_index: int) -> np.ndarray:
    """An upright picture whose class shows in its colour and whose orientation shows in a strong asymmetry.

    A bright bar along the top and a dark block in the bottom-left corner: every quarter turn moves
    both to a different side, so the turn is easy to tell apart; warm (red) vs cool (blue) is the class.
    """
    base = np.array([170, 90, 60] if class_index == 0 else [60, 100, 170], np.float32)
    img = base + rng.normal(0, 18, (size, size, 3))
    bar = max(2, size // 6)
    img[:bar, :, :] = 245
    img[size - 2 * bar:, : 2 * bar, :] = 10
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes (lossless, so exact turns stay exact)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_archive(directory: str, counts: Optional[Dict[str, int]] = None, size: int = 32,
                  labelled: bool = True, stored_turns: Sequence[int] = (0,), unknown_orientation_every: int = 0,
                  shards_per_split: int = 2, gzip: bool = False, seed: int = 0) -> str:
    """Write DIR/<split>-NNNNN-of-MMMMM.tfrecord[.gz] + labels.json like `archive-vision ingest` does.

    stored_turns: orientations the images are stored in (cycled); every `unknown_orientation_every`-th
    record gets orientation -1 (0: none does).
    """
    import tensorflow as tf

    counts = counts or {"train": 32, "val": 16, "test": 8}
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for split, n in counts.items():
        suffix = ".tfrecord.gz" if gzip else ".tfrecord"
        options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
        writers = [tf.io.TFRecordWriter(os.path.join(directory, f"{split}-{i:05d}-of-{shards_per_split:05d}{suffix}"),
                                        options) for i in range(shards_per_split)]
        for i in range(n):
            cls = i % 2
            stored = stored_turns[i % len(stored_turns)]
            pixels = turn_clockwise_np(upright_image(rng, size, cls), stored)
            if unknown_orientation_every and i % unknown_orientation_every == unknown_orientation_every - 1:
                stored = -1
            record = schema.ImageRecord(
                encoded=encode_png(pixels), format="png", height=size, width=size,
                source_uri=f"file:///archive/{split}/{i:04d}.png", page=0, sha256=f"{i:064x}",
                original_height=size, original_width=size, exif_orientation=0,
                label_index=cls if labelled else -1, label_name=CLASS_NAMES[cls] if labelled else "",
                orientation=stored, split=split)
            writers[i % shards_per_split].write(schema.make_example(record).SerializeToString())
        for w in writers:
            w.close()
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"classes": CLASS_NAMES if labelled else [], "source": "folders" if labelled else "none"}, f)
    return directory


# ------------------------------------------------------------------------------------------------
# input pipeline tests
# ------------------------------------------------------------------------------------------------

def _cfg(data: str, **kw):
    from trainer.config import TrainConfig

    base = dict(data=data, job_dir="/unused", backbone="tiny", weights="none", image_size=32, batch_size=4)
    base.update(kw)
    return TrainConfig(**base)


def test_turned_copies_carry_exact_clockwise_labels_from_any_stored_orientation(tmp_path):
    from trainer import input as train_input

    data = write_archive(str(tmp_path / "a"), {"val": 4}, stored_turns=(0, 90, 180, 270), shards_per_split=1)
    cfg = _cfg(data)
    rng = np.random.default_rng(0)
    uprights = [upright_image(rng, 32, i % 2) for i in range(4)]
    examples = list(train_input.example_dataset(data, "val", cfg, training=False).as_numpy_iterator())
    assert len(examples) == 16
    for e in examples:
        i = int(e["source_uri"].decode()[-8:-4])
        label_degrees = int(e["orientation_label"]) * 90
        # (stored + extra) % 360 and the pixels really are the upright image turned that far clockwise.
        assert label_degrees == (int(e["stored_orientation"]) + int(e["turn"])) % 360
        np.testing.assert_array_equal(e["pixels"].astype(np.uint8), turn_clockwise_np(uprights[i], label_degrees))


def test_unknown_orientation_records_train_only_the_class_head(tmp_path):
    from trainer import input as train_input

    data = write_archive(str(tmp_path / "a"), {"train": 6}, unknown_orientation_every=3, shards_per_split=1)
    cfg = _cfg(data, rotations="all")
    examples = list(train_input.example_dataset(data, "train", cfg, training=True).as_numpy_iterator())
    unknown = [e for e in examples if e["stored_orientation"] == -1]
    known = [e for e in examples if e["stored_orientation"] != -1]
    assert len(unknown) == 2 and len(known) == 16  # 2 unknown kept once, 4 known turned 4 ways
    assert all(e["orientation_weight"] == 0 and e["class_weight"] == 1 and e["turn"] == 0 for e in unknown)
    assert train_input.count_split(data, "train", cfg).examples == 18

    orientation_only = _cfg(data, tasks=("orientation",))
    assert train_input.count_split(data, "train", orientation_only).examples == 16
    assert all(e["stored_orientation"] != -1 for e in
               train_input.example_dataset(data, "train", orientation_only, training=True).as_numpy_iterator())


def test_eval_batches_are_never_partial_and_padding_carries_no_weight(tmp_path):
    from trainer import input as train_input

    data = write_archive(str(tmp_path / "a"), {"val": 5}, shards_per_split=2, gzip=True)
    cfg = _cfg(data)
    ds = train_input.example_dataset(data, "val", cfg, training=False)
    batches = list(train_input.batch_for_replicas(ds, 8, training=False).as_numpy_iterator())
    assert len(batches) == 3  # 20 examples -> 3 full batches of 8, the last one padded with 4
    assert all(b["pixels"].shape[0] == 8 for b in batches)
    assert sum(float(b["orientation_weight"].sum()) for b in batches) == 20.0


def test_flip_and_shift_augmentation_keeps_orientation_labels_true(tmp_path):
    from trainer import input as train_input

    data = write_archive(str(tmp_path / "a"), {"train": 8}, stored_turns=(0, 90, 180, 270), shards_per_split=1)
    cfg = _cfg(data, allow_flip=True, max_shift=0.1, rotations="random")
    examples = list(train_input.example_dataset(data, "train", cfg, training=True).as_numpy_iterator())
    assert len(examples) == 8
    for e in examples:
        # Turn the example back by its label: the bright bar of the upright picture must be on top again.
        upright = np.rot90(e["pixels"], k=int(e["orientation_label"])).astype(np.float32)
        top, bottom = upright[:4].mean(), upright[-4:].mean()
        assert top > bottom + 50, (int(e["stored_orientation"]), int(e["turn"]))


def test_eval_path_is_deterministic_and_unaugmented(tmp_path):
    from trainer import input as train_input

    data = write_archive(str(tmp_path / "a"), {"val": 4}, shards_per_split=2)
    cfg = _cfg(data, allow_flip=True, max_shift=0.2)
    first = [e["pixels"] for e in train_input.example_dataset(data, "val", cfg, training=False).as_numpy_iterator()]
    second = [e["pixels"] for e in train_input.example_dataset(data, "val", cfg, training=False).as_numpy_iterator()]
    assert len(first) == 16
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_every_active_head_needs_labelled_train_records(tmp_path):
    """A plain ingest (orientation -1 everywhere) must not train, and then export, an orientation head that never
    saw a label: the check names the task and both fixes; --tasks classes (or --init default) goes through."""
    import pytest

    from trainer import input as train_input

    plain = write_archive(str(tmp_path / "plain"), {"train": 6}, unknown_orientation_every=1, shards_per_split=1)
    size = train_input.count_split(plain, "train", _cfg(plain))
    assert (size.records, size.class_records, size.orientation_records) == (6, 6, 0)
    with pytest.raises(train_input.DataError) as e:
        train_input.check_task_labels(_cfg(plain))
    assert "'orientation'" in str(e.value) and "--assume-upright" in str(e.value)
    assert "--tasks classes" in str(e.value)
    assert train_input.check_task_labels(_cfg(plain, tasks=("classes",))).class_records == 6
    assert train_input.check_task_labels(_cfg(plain, init="default")).orientation_records == 0

    unlabelled = write_archive(str(tmp_path / "unlabelled"), {"train": 4}, labelled=False, shards_per_split=1)
    with pytest.raises(train_input.DataError) as e:
        train_input.check_task_labels(_cfg(unlabelled))
    assert "'classes'" in str(e.value) and "--tasks orientation" in str(e.value)
    with pytest.raises(train_input.DataError, match="shards"):
        train_input.check_task_labels(_cfg(unlabelled), "val")


def test_disk_feature_cache_streams_batch_by_batch_and_equals_the_memory_cache(tmp_path):
    """The disk cache is written into features.npy batch by batch while the backbone runs (earlier batches are on
    disk before later ones are computed, and no COMPLETE marker until the end), then read back as a memmap; its
    features, labels and training batches equal the in-memory cache's."""
    import glob

    from trainer import backbones, features

    data = write_archive(str(tmp_path / "a"), {"train": 6}, stored_turns=(0, 90, 180), unknown_orientation_every=3,
                         shards_per_split=2)
    cfg = _cfg(data, rotations="all")
    backbone = backbones.build_backbone("tiny", "none", 32)
    extract = features.make_extractor(backbone)
    memory = features.compute_feature_cache(backbone, cfg, "train", None, batch_size=4, extract=extract)
    assert len(memory) == 18 and memory.location is None  # 4 known x 4 turns + 2 unknown once

    root = str(tmp_path / "job")
    returned = []

    def watching_extract(pixels):
        on_disk = glob.glob(os.path.join(root, "feature_cache", "train-*", "features.npy"))
        if returned:
            # Every batch computed so far is already in the file, before this one is computed.
            assert len(on_disk) == 1 and not glob.glob(os.path.join(root, "feature_cache", "train-*", "COMPLETE"))
            partial = np.load(on_disk[0], mmap_mode="r")
            assert partial.shape[0] == 18
            np.testing.assert_array_equal(partial[:sum(len(b) for b in returned)], np.concatenate(returned))
        out = extract(pixels)
        returned.append(out.numpy())
        return out

    disk = features.compute_feature_cache(backbone, cfg, "train", root, batch_size=4, extract=watching_extract)
    assert len(returned) == 5  # 18 examples in batches of 4
    assert isinstance(disk.features, np.memmap) and disk.location and len(disk) == 18
    np.testing.assert_allclose(disk.features, memory.features, rtol=1e-6, atol=1e-6)
    for k in features.LABEL_FIELDS:
        np.testing.assert_array_equal(disk.labels[k], memory.labels[k])
    # A second call reuses the finished cache instead of running the backbone again.
    assert len(features.compute_feature_cache(backbone, cfg, "train", root, batch_size=4,
                                              extract=watching_extract)) == 18 and len(returned) == 5

    # Read back as tf.data batches: the same (features, targets, weights) as from memory.
    for training in (False, True):
        ds_disk, steps = features.cache_dataset(disk, cfg, 8, training=training)
        ds_memory, steps_memory = features.cache_dataset(memory, cfg, 8, training=training)
        assert steps == steps_memory == (2 if training else 3)
        for (xd, yd, wd), (xm, ym, wm) in zip(ds_disk.take(steps), ds_memory.take(steps)):
            np.testing.assert_allclose(xd.numpy(), xm.numpy(), rtol=1e-6, atol=1e-6)
            for k in yd:
                np.testing.assert_array_equal(yd[k].numpy(), ym[k].numpy())
                np.testing.assert_array_equal(wd[k].numpy(), wm[k].numpy())


def test_a_split_with_missing_shards_is_refused_not_half_read(tmp_path):
    """An ingest that died while renaming its shards into place leaves part of a numbered set."""
    import pytest

    from trainer import input as train_input

    data = write_archive(str(tmp_path / "data"), counts={"train": 12, "val": 4}, shards_per_split=3)
    assert len(train_input.list_shards(data, "train")) == 3
    os.remove(os.path.join(data, "train-00001-of-00003.tfrecord"))
    with pytest.raises(train_input.DataError, match=r"train shards are not a whole set.*missing: 00001"):
        train_input.list_shards(data, "train")
    assert len(train_input.list_shards(data, "val")) == 3  # the whole split still reads


def test_split_counts_come_from_the_ingest_manifest_without_reading_the_shards(tmp_path, monkeypatch):
    """A finished ingest's manifest gives the same counts as a pass over the records, and the pass is skipped;
    a manifest that names other shards (or no run.json) is not trusted."""
    import shutil

    from pipelines import ingest
    from tests.image_factory import write_sample_archive
    from trainer import input as train_input

    write_sample_archive(str(tmp_path / "in"), n_per_class=6, size=(40, 56))
    data = str(tmp_path / "shards")
    ingest.run(["--input", str(tmp_path / "in"), "--output", data, "--size", "32", "--assume-upright",
                "--split-fractions", "0.7,0.3,0", "--num-shards", "2"])
    configs = [_cfg(data), _cfg(data, tasks=("orientation",)), _cfg(data, rotations="one")]
    from_manifest = {(i, split): train_input.count_split(data, split, cfg)
                     for i, cfg in enumerate(configs) for split in ("train", "val")}

    reads = []
    real_read = train_input._read_records
    monkeypatch.setattr(train_input, "_read_records", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    os.rename(os.path.join(data, "run.json"), os.path.join(data, "run.json.off"))  # as if ingest never finished
    from_records = {(i, split): train_input.count_split(data, split, cfg)
                    for i, cfg in enumerate(configs) for split in ("train", "val")}

    assert len(reads) == len(from_records)  # without run.json every count read its shards
    assert from_manifest == from_records
    assert from_manifest[(0, "train")].records > 0 and from_manifest[(0, "val")].records > 0
    assert from_manifest[(0, "train")].examples == 4 * from_manifest[(2, "train")].records  # all turns vs one

    os.rename(os.path.join(data, "run.json.off"), os.path.join(data, "run.json"))
    reads.clear()
    assert train_input.count_split(data, "train", configs[0]) == from_records[(0, "train")]
    assert reads == []  # the manifest vouched for the shards: no pass over them

    stale = str(tmp_path / "stale")
    shutil.copytree(data, stale)
    shard = train_input.list_shards(data, "train")[0]
    shutil.copy(shard, os.path.join(data, "train-extra.tfrecord"))  # a file the manifest does not describe
    got = train_input.count_split(data, "train", configs[0])
    assert len(reads) == 1 and got.records > from_records[(0, "train")].records  # counted from what is there

    # A smaller archive ingested over it with --overwrite. Its run.json is gone as soon as the new run starts,
    # and even an old run.json + manifest put back (a run that died before writing its own, a copy cut short)
    # does not vouch for the new shards: their sizes differ from the ones it recorded.
    shutil.rmtree(tmp_path / "in")
    write_sample_archive(str(tmp_path / "in"), n_per_class=3, size=(40, 56))
    old_run_json_there = []  # looked at once the pipeline is built, before anything runs
    ingest.run(["--input", str(tmp_path / "in"), "--output", stale, "--size", "32", "--assume-upright",
                "--split-fractions", "0.7,0.3,0", "--num-shards", "2", "--overwrite"],
               extend_pipeline=lambda _: old_run_json_there.append(os.path.exists(os.path.join(stale, "run.json"))))
    assert old_run_json_there == [False]
    fresh = train_input.count_split(stale, "train", configs[0])
    for name in ("run.json", "manifest.parquet"):
        shutil.copy(os.path.join(data, name), os.path.join(stale, name))
    reads.clear()
    assert train_input.count_split(stale, "train", configs[0]) == fresh != from_records[(0, "train")]
    assert len(reads) == 1
