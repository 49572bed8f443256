"""ingest's shard writer: records stream into temporary part files as they come, and a finalize step turns the parts
into `<split>-NNNNN-of-MMMMM.tfrecord[.gz]` shards of about --shard-mb each.

    records -> WriteParts (one open part per split, or per split and bucket under --num-shards, in each bundle;
               a part closes at --shard-mb)  -> manifest rows (keyed by part) + part descriptors
            -> PlanShards (parts -> shards: first-fit packing by size, or by bucket)
            -> AssembleShards (a lone part stays as it is; several are concatenated: TFRecord framing and gzip
               members both concatenate) -> RenameShards (every shard into place at once)
            -> {part id: shard name}, which the manifest's writer applies as it merges its parts (pipelines.tables)

Memory is bounded by one record, never by a shard or the archive: no step groups records. Only small things cross a
shuffle or a side input (part descriptors, shard plans, manifest rows), so a runner that keeps its shuffles in memory
(the DirectRunner) holds rows, not pixels. Which records share a shard depends on how the runner bundles them, so
shard contents are not the same from run to run; under --num-shards a record's bucket is a hash of its key, as before.
"""
from __future__ import annotations

import collections
import hashlib
import uuid
from typing import Dict, Iterable, List, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from pipelines import schema

# Per record in a TFRecord file: length (8 bytes) + its CRC (4) + the data's CRC (4).
TFRECORD_FRAMING_BYTES = 16
COPY_CHUNK_BYTES = 4 * 1024 * 1024
# Most part files one bundle keeps open (under --num-shards N a bundle may meet 3N (split, bucket) pairs): past it the
# least recently written part is closed, and its bucket starts a new part when it comes again.
MAX_OPEN_PARTS = 32


def shard_name(split: str, index: int, total: int, suffix: str, tag: str = "") -> str:
    """`train-00003-of-00010.tfrecord`: the naming tf.data users and TFDS expect; an `ingest --append` run's shards
    carry its tag (`train-a0002-00000-of-00003.tfrecord`), so each run's set is whole on its own and no name is ever
    taken twice."""
    return f"{split}-{tag + '-' if tag else ''}{index:05d}-of-{total:05d}{suffix}"


def record_key(record: schema.ImageRecord) -> str:
    """A record's identity within a run: content, file, page, augmented copy."""
    return f"{record.sha256}:{record.source_uri}:{record.page}:{record.augment_index}"


def bucket_of(record: schema.ImageRecord, num_shards: int) -> int:
    """The --num-shards bucket of a record: a hash of its key, so the same record always lands in the same bucket."""
    if num_shards <= 0:
        return 0
    return int(hashlib.sha256(record_key(record).encode()).hexdigest()[:8], 16) % num_shards


class _Part:
    """One open temporary part file: where it is and what went in."""

    def __init__(self, temp_dir: str, split: str, bucket: int, compression: str):
        self.split, self.bucket = split, bucket
        self.part_id = f"{split}-{bucket:05d}-{uuid.uuid4().hex}"
        self.path = FileSystems.join(temp_dir, f"part-{self.part_id}")
        kind = CompressionTypes.GZIP if compression == "gzip" else CompressionTypes.UNCOMPRESSED
        self.handle = FileSystems.create(self.path, compression_type=kind)
        self.records = 0
        self.bytes = 0

    def write(self, serialized: bytes) -> None:
        from apache_beam.io.tfrecordio import _TFRecordUtil  # the same framing WriteToTFRecord uses

        _TFRecordUtil.write_record(self.handle, serialized)
        self.records += 1
        self.bytes += len(serialized) + TFRECORD_FRAMING_BYTES

    def close(self) -> dict:
        """Close the file; its descriptor (what PlanShards needs)."""
        self.handle.close()
        return {"part": self.part_id, "split": self.split, "bucket": self.bucket, "path": self.path,
                "records": self.records, "bytes": self.bytes}


class WritePartsFn(beam.DoFn):
    """Records -> manifest rows (tagged ROWS, keyed by part) + descriptors of the closed part files (main).

    Each record is written to its part file as it arrives and then let go: the DoFn holds at most MAX_OPEN_PARTS
    open files (one per split, or per split and bucket), never a list of records.
    """

    ROWS = "rows"

    def __init__(self, temp_dir: str, compression: str, target_bytes: int, num_shards: int):
        self._temp_dir = temp_dir
        self._compression = compression
        self._target_bytes = max(1, int(target_bytes))
        self._num_shards = num_shards

    def start_bundle(self):
        self._open: "collections.OrderedDict[Tuple[str, int], _Part]" = collections.OrderedDict()

    def process(self, record: schema.ImageRecord):
        key = (record.split, bucket_of(record, self._num_shards))
        part = self._open.get(key)
        if part is None:
            if len(self._open) >= MAX_OPEN_PARTS:
                yield self._open.popitem(last=False)[1].close()
            part = self._open[key] = _Part(self._temp_dir, record.split, key[1], self._compression)
        self._open.move_to_end(key)
        part.write(schema.serialize_example(record))
        row = record.manifest_row()
        row["shard"] = part.part_id  # the shard's final name replaces it when the manifest is merged
        yield beam.pvalue.TaggedOutput(self.ROWS, row)
        if not self._num_shards and part.bytes >= self._target_bytes:  # full: it becomes a shard of its own
            yield self._open.pop(key).close()

    def finish_bundle(self):
        for key in sorted(self._open):
            yield WindowedValue(self._open[key].close(), window.GlobalWindow().max_timestamp(),
                                [window.GlobalWindow()])
        self._open = collections.OrderedDict()


def plan_shards(parts: List[dict], target_bytes: int, num_shards: int, suffix: str, tag: str = "") -> List[dict]:
    """Parts -> shards [{name, split, parts: [descriptor...]}]: under --num-shards one shard per bucket that has
    records (as many as were asked for, or fewer), else the parts of each split packed first-fit, largest first,
    into shards of at most `target_bytes` (a part that reached it alone), so at most one shard per split is under
    half of it."""
    by_split: Dict[str, List[dict]] = {}
    for part in parts:
        by_split.setdefault(part["split"], []).append(part)
    plan = []
    for split in sorted(by_split):
        split_parts = sorted(by_split[split], key=lambda p: (p["bucket"], -p["bytes"], p["part"]))
        groups: List[List[dict]] = []
        if num_shards:
            buckets: Dict[int, List[dict]] = {}
            for part in split_parts:
                buckets.setdefault(part["bucket"], []).append(part)
            groups = [buckets[b] for b in sorted(buckets)]
        else:
            sizes: List[int] = []
            for part in sorted(split_parts, key=lambda p: (-p["bytes"], p["part"])):
                for index, size in enumerate(sizes):
                    if size + part["bytes"] <= target_bytes:
                        groups[index].append(part)
                        sizes[index] += part["bytes"]
                        break
                else:
                    groups.append([part])
                    sizes.append(part["bytes"])
        for index, group in enumerate(groups):
            plan.append({"name": shard_name(split, index, len(groups), suffix, tag), "split": split, "parts": group})
    return plan


class AssembleShardFn(beam.DoFn):
    """One planned shard -> (its complete file in the temp folder, its final path, its parts' ids).

    A lone part is the shard already; several are copied one after another into one file, a few MB at a time
    (TFRecord framing concatenates, and so do gzip members, which tf.data reads as one stream).
    """

    def __init__(self, temp_dir: str, output: str):
        self._temp_dir = temp_dir
        self._output = output

    def process(self, shard: dict) -> Iterable[Tuple[str, str, List[str]]]:
        paths = [part["path"] for part in shard["parts"]]
        ids = [part["part"] for part in shard["parts"]]
        final = FileSystems.join(self._output, shard["name"])
        if len(paths) == 1:
            yield paths[0], final, ids
            return
        assembled = FileSystems.join(self._temp_dir, f"shard-{uuid.uuid4().hex}-{shard['name']}")
        raw = CompressionTypes.UNCOMPRESSED
        with FileSystems.create(assembled, compression_type=raw) as out:
            for path in paths:
                with FileSystems.open(path, compression_type=raw) as handle:
                    while True:
                        chunk = handle.read(COPY_CHUNK_BYTES)
                        if not chunk:
                            break
                        out.write(chunk)
        FileSystems.delete(paths)
        yield assembled, final, ids


def rename_shards(assembled: List[Tuple[str, str, List[str]]]) -> Dict[str, str]:
    """Rename every assembled shard into place in one call (shards only ever appear complete); {part id: name}."""
    if assembled:
        FileSystems.rename([source for source, _, _ in assembled], [final for _, final, _ in assembled])
    return {part: final.rstrip("/").split("/")[-1] for _, final, ids in assembled for part in ids}


class WriteShards(beam.PTransform):
    """Records -> `<split>-NNNNN-of-MMMMM<suffix>` shards of about `shard_mb` each (or `num_shards` per split) in
    `output`; returns {rows: one manifest row per record, its `shard` the id of the part holding it, shard_names: one
    {part id: shard file name} dict, ready once every shard is in place} (the manifest writer applies the names).
    `tag` names an `ingest --append` run's shards (shard_name)."""

    def __init__(self, temp_dir: str, output: str, *, compression: str, shard_mb: float, num_shards: int,
                 suffix: str, tag: str = ""):
        super().__init__()
        self._temp_dir = temp_dir
        self._output = output
        self._compression = compression
        self._target = max(1, int(shard_mb * 1024 * 1024))
        self._num_shards = num_shards
        self._suffix = suffix
        self._tag = tag

    def expand(self, records):
        written = records | "WriteParts" >> beam.ParDo(
            WritePartsFn(self._temp_dir, self._compression, self._target, self._num_shards)).with_outputs(
            WritePartsFn.ROWS, main="parts")
        names = (written.parts
                 | "AllParts" >> beam.combiners.ToList()
                 | "PlanShards" >> beam.FlatMap(plan_shards, self._target, self._num_shards, self._suffix, self._tag)
                 | "SpreadShards" >> beam.Reshuffle()
                 | "AssembleShards" >> beam.ParDo(AssembleShardFn(self._temp_dir, self._output))
                 | "AllShards" >> beam.combiners.ToList()
                 | "RenameShards" >> beam.Map(rename_shards))
        return {"rows": written[WritePartsFn.ROWS], "shard_names": names}
