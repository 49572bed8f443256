"""ingest's shard writer (pipelines.shards) and the job tables (pipelines.tables): records and rows stream to disk,
shards come out whole and about --shard-mb, a table is one file."""
import glob
import os
import struct
import tracemalloc

import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import ingest, schema, shards
from tests.image_factory import encode_array, make_random_image


def tfrecord_payloads(path):
    """The records of an uncompressed TFRecord file, read by its framing (no TensorFlow)."""
    out = []
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if not head:
                return out
            (length,) = struct.unpack("<Q", head[:8])
            out.append(f.read(length))
            f.read(4)


def fake_record(index, size, split="train"):
    payload = os.urandom(size)
    return schema.ImageRecord(encoded=payload, format="jpeg", height=8, width=8, source_uri=f"/a/{index}.jpg", page=0,
                              sha256=f"{index:064x}", original_height=8, original_width=8, exif_orientation=0,
                              label_index=-1, label_name="", orientation=-1, split=split)


def test_a_shard_far_larger_than_the_memory_bound_is_written_holding_one_record_at_a_time(tmp_path):
    n, size = 400, 100_000  # a 40 MB shard; the writer may hold a few records' worth
    fn = shards.WritePartsFn(str(tmp_path), "none", target_bytes=1 << 30, num_shards=0)
    tracemalloc.start()
    try:
        fn.start_bundle()
        rows = 0
        for i in range(n):
            rows += sum(1 for _ in fn.process(fake_record(i, size)))
        parts = [wv.value for wv in fn.finish_bundle()]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == n and len(parts) == 1 and parts[0]["records"] == n
    assert peak < 4 * 1024 * 1024, f"writer peaked at {peak / 1e6:.1f} MB for a {n * size / 1e6:.0f} MB shard"
    payloads = tfrecord_payloads(parts[0]["path"])
    assert len(payloads) == n and sum(len(p) for p in payloads) > n * size


def test_plan_packs_parts_into_shards_of_at_most_the_target_with_one_small_shard_at_most():
    parts = [{"part": f"p{i}", "split": "train", "bucket": 0, "path": f"/t/p{i}", "records": 1, "bytes": b}
             for i, b in enumerate([100, 100, 30, 40, 20, 60, 10, 70, 35])]
    plan = shards.plan_shards(parts + [dict(parts[0], part="v", split="val", bytes=5)], 100, 0, ".tfrecord")
    train = [s for s in plan if s["split"] == "train"]
    assert [s["name"] for s in train] == [f"train-{i:05d}-of-{len(train):05d}.tfrecord" for i in range(len(train))]
    sizes = [sum(p["bytes"] for p in s["parts"]) for s in train]
    assert max(sizes) <= 100 and sum(1 for s in sizes if s < 50) <= 1
    assert sorted(p["part"] for s in train for p in s["parts"]) == sorted(p["part"] for p in parts)  # none lost
    assert [s["name"] for s in plan if s["split"] == "val"] == ["val-00000-of-00001.tfrecord"]


def write_archive(root, n):
    os.makedirs(root)
    for i in range(n):
        with open(os.path.join(root, f"{i}.png"), "wb") as f:
            f.write(encode_array(make_random_image(48, 48, seed=i), "PNG"))


def read_shards(out, compressed):
    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(os.path.join(out, "*.tfrecord*"))):
        dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if compressed else "")
        found[os.path.basename(path)] = sorted(
            schema.record_from_example(tf.train.Example.FromString(raw.numpy())).source_uri for raw in dataset)
    return found


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_parts_from_many_bundles_become_whole_shards_the_manifest_names(tmp_path, monkeypatch, compression):
    # One open part at a time: every change of bucket closes a part, so each shard is assembled from many parts.
    monkeypatch.setattr(shards, "MAX_OPEN_PARTS", 1)
    write_archive(str(tmp_path / "in"), 24)
    out = str(tmp_path / "out")
    summary = ingest.run(["--input", str(tmp_path / "in"), "--output", out, "--size", "32", "--num-shards", "3",
                          "--split-fractions", "0.5,0.5,0", "--compression", compression],
                         test_pipeline=TestPipeline())
    found = read_shards(out, compression == "gzip")
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    assert sum(len(uris) for uris in found.values()) == len(manifest) == 24 and summary["counts"]["reconciled"]
    assert {name: sorted(r["source_uri"] for r in manifest if r["shard"] == name) for name in found} == found
    for split in ("train", "val"):
        names = sorted(n for n in found if n.startswith(split))
        assert 1 <= len(names) <= 3 and all(f"-of-{len(names):05d}" in n for n in names)
    assert summary["shard_bytes"] == {name: os.path.getsize(os.path.join(out, name)) for name in found}
    assert not glob.glob(os.path.join(out, ".temp-*"))


def test_shards_are_about_shard_mb(tmp_path):
    write_archive(str(tmp_path / "in"), 30)
    out = str(tmp_path / "out")
    target = 0.01  # ~10 KB: a few 32-px records each
    ingest.run(["--input", str(tmp_path / "in"), "--output", out, "--size", "32", "--shard-mb", str(target),
                "--split-fractions", "1,0,0", "--format", "png"], test_pipeline=TestPipeline())
    found = read_shards(out, False)
    assert sum(len(uris) for uris in found.values()) == 30
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    largest = max(r["encoded_bytes"] for r in manifest) + 200  # a part closes once it reaches the target
    sizes = [os.path.getsize(os.path.join(out, name)) for name in found]
    assert len(sizes) > 2 and max(sizes) <= target * 1024 * 1024 + largest
    assert sum(1 for s in sizes if s < target * 1024 * 1024 / 2) <= 1


def test_a_table_is_one_file_merged_from_part_files_with_names_applied_and_empty_tables_keep_their_schema(tmp_path):
    import apache_beam as beam
    import pyarrow as pa

    from pipelines import tables

    schema = pa.schema([("uri", pa.string()), ("shard", pa.string()), ("page", pa.int64())])
    rows = [{"uri": f"/a/{i}", "shard": f"part-{i % 3}", "page": i} for i in range(5000)]  # > ROWS_PER_BATCH
    with TestPipeline() as pipeline:
        names = pipeline | "Names" >> beam.Create([{f"part-{k}": f"train-{k:05d}-of-00003" for k in range(3)}])
        source = pipeline | "Rows" >> beam.Create(rows)
        _ = source | "Table" >> tables.WriteTable(str(tmp_path / "manifest"), schema, ("shard", names))
        _ = pipeline | "NoRows" >> beam.Create([]) | "Empty" >> tables.WriteTable(str(tmp_path / "errors"), schema)
    written = pq.read_table(tmp_path / "manifest.parquet")
    assert written.schema == schema
    assert sorted(written.to_pylist(), key=lambda r: r["page"]) == [
        dict(row, shard=f"train-{i % 3:05d}-of-00003") for i, row in enumerate(rows)]
    empty = pq.read_table(tmp_path / "errors.parquet")
    assert empty.num_rows == 0 and empty.schema == schema
    assert sorted(os.listdir(tmp_path)) == ["errors.parquet", "manifest.parquet"]  # no parts or temp folders left
