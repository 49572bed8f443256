"""The Parquet tables the jobs write (manifest, errors, results): their schemas and Beam writers."""
from __future__ import annotations

import io
import uuid
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.imaging import CONTENT_DEFECTS

# One row per record (ingest). `fingerprint`: the source file's listing fingerprint when it was ingested
# (pipelines.sources.SourceEntry), which lets `ingest --append` keep the file's records without reading it.
# `superseded`: the record stays in its shard (shards are never rewritten) but describes a version of its file that is
# gone (changed, or moved to a uri ingested since); the trainer skips it (pipelines.ingest_append, trainer.input).
MANIFEST_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("page", pa.int64()), ("augment_index", pa.int64()), ("sha256", pa.string()),
    ("split", pa.string()), ("shard", pa.string()), ("label_index", pa.int64()), ("label_name", pa.string()),
    ("orientation", pa.int64()), ("exif_orientation", pa.int64()), ("format", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("original_height", pa.int64()),
    ("original_width", pa.int64()), ("encoded_bytes", pa.int64()), ("fingerprint", pa.string()),
    ("superseded", pa.bool_()),
])

# One row per failure. `fingerprint`: the failed file's listing fingerprint when the whole file failed for a defect of
# its bytes (imaging.CONTENT_DEFECTS; "" otherwise): an incremental run (score --skip-known, ingest --append) keeps
# such a row for a file listed again with the same fingerprint, unread (tables written before the column keep none).
ERRORS_SCHEMA = pa.schema([
    ("uri", pa.string()), ("page", pa.int64()), ("stage", pa.string()), ("error_type", pa.string()),
    ("message", pa.string()), ("sha256", pa.string()), ("fingerprint", pa.string()),
])


def error_row(uri: str, stage: str, error_type: str, message: str, page: int = -1, sha256: str = "",
              fingerprint: str = "") -> dict:
    """One row of errors.parquet (`fingerprint` kept only for a defect of the file's bytes)."""
    return {"uri": uri, "page": page, "stage": stage, "error_type": error_type, "message": message[:2000],
            "sha256": sha256, "fingerprint": fingerprint if error_type in CONTENT_DEFECTS else ""}


def whole_file_failed(pages_done: int, entry) -> str:
    """The fingerprint an error row keeps: the file's, when it failed before any of its pages was done (a file
    whose later page failed is read again by the next incremental run, for the pages it had)."""
    return entry.fingerprint if not pages_done else ""


def failure_stands(row: dict, fingerprint: str) -> bool:
    """Whether an earlier error row still holds for a file listed now with `fingerprint`: a defect of its bytes
    (the row carries the fingerprint it failed with), and the file unchanged since."""
    return bool(fingerprint) and row.get("fingerprint") == fingerprint and row.get("error_type") in CONTENT_DEFECTS


# One row per scored page (score job). Probabilities are in the model's column order: orientations 0/90/180/270
# clockwise, classes as in labels.json. `reused` rows were copied from --skip-known instead of being scored.
# `tta_agreement` and `text_crops` are the graph's own outputs (serving.answer): the share of the four turned copies
# that agreed (null: not turned), and the text-crop evidence (1: counted, 0: read and not counted, null: not read).
# `text_lines` stays for tables written before text lines left score (always null now). `corrected_orientation`: a
# person's answer (score --corrections; decision `corrected`), -1 for no up / not an image, null where none.
# `fingerprint` is the file's listing fingerprint (pipelines.sources.SourceEntry) when it was scored or reused: a
# later --skip-known run reuses the rows of a file listed again at the same uri with the same fingerprint without
# reading it (tables written before the column, or files listed without one, are matched by sha256, read).
RESULTS_SCHEMA = pa.schema([
    ("uri", pa.string()), ("page", pa.int64()), ("sha256", pa.string()), ("fingerprint", pa.string()),
    ("format", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("exif_orientation", pa.int64()),
    ("class_name", pa.string()), ("class_id", pa.int64()), ("class_confidence", pa.float64()),
    ("class_probabilities", pa.list_(pa.float32())),
    ("orientation_degrees", pa.int64()), ("orientation_confidence", pa.float64()),
    ("orientation_probabilities", pa.list_(pa.float32())), ("tta_agreement", pa.float64()),
    ("text_lines", pa.int64()), ("text_crops", pa.int64()),
    ("decision", pa.string()), ("review_reason", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.int64()), ("reused", pa.bool_()),
    ("corrected_uri", pa.string()), ("corrected_method", pa.string()), ("corrected_orientation", pa.int64()),
])

# Rows per Parquet write: what one worker holds of a table at a time (a few MB of results rows at most).
ROWS_PER_BATCH = 2048


def parquet_batches(handle, batch_size: int = ROWS_PER_BATCH, columns=None, present_only: bool = False):
    """The record batches of an open Parquet file, read as they are used. Not pre-buffered: pyarrow's default
    (pre_buffer=True) coalesces and keeps the reads of a file opened through Python (Beam's FileSystems), which
    held about 200 MB of a 3,000,000-row results table while it was read a batch at a time. `present_only`: of
    `columns`, those the file has (a table written before a column)."""
    parquet = pq.ParquetFile(handle, pre_buffer=False)
    if present_only and columns is not None:
        columns = [c for c in columns if c in parquet.schema_arrow.names]
    return parquet.iter_batches(batch_size=batch_size, columns=columns)


class ListedFile(NamedTuple):
    """A table file as it was listed when a run was built. Runs that name its rows by position (score --skip-known,
    ingest --append) read it several times, so it must not change until they end (check_unchanged)."""

    path: str
    size: int
    updated: float  # its last update, in seconds, as Beam's FileSystems.match gives it

    @property
    def is_csv(self) -> bool:
        return self.path.lower().endswith(".csv")


class TableChanged(RuntimeError):
    """A table changed while a run read it (another job rewrote it): the positions the run holds name other rows."""


def listed_files(pattern: str) -> List[ListedFile]:
    """Every file `pattern` matches, with its size and update time, in path order."""
    return sorted(ListedFile(m.path, m.size_in_bytes, m.last_updated_in_seconds)
                  for m in FileSystems.match([pattern])[0].metadata_list)


def check_unchanged(file: ListedFile) -> str:
    """The file's path, once its size and update time are still those it was listed with (else TableChanged)."""
    listed = FileSystems.match([file.path])[0].metadata_list
    now = (listed[0].size_in_bytes, listed[0].last_updated_in_seconds) if listed else None
    if now != (file.size, file.updated):
        raise TableChanged(f"{file.path} changed during the run (size, updated: {(file.size, file.updated)} -> {now});"
                           f" run again once nothing rewrites it")
    return file.path


# Row groups one worker reads in one open of a Parquet file, forward: a file on GCS opened for each row group would
# fetch a 16 MB chunk (Beam's GCS reader) and parse the whole footer (about 2 KB a row group) every time.
GROUPS_PER_SPAN = 32


def row_group_spans(path: str) -> List[Tuple[int, int]]:
    """(first, end) of each span of GROUPS_PER_SPAN consecutive row groups of a Parquet file (footer read only)."""
    with FileSystems.open(path) as handle:
        count = pq.ParquetFile(handle).num_row_groups
    return [(first, min(first + GROUPS_PER_SPAN, count)) for first in range(0, count, GROUPS_PER_SPAN)]


def span_of(group: int) -> int:
    """The first row group of the span holding `group`."""
    return group - group % GROUPS_PER_SPAN


def span_rows(path: str, first: int, end: int, columns, wanted: Optional[Dict[int, List[int]]] = None
              ) -> Iterator[Tuple[int, int, dict]]:
    """(row group, row, the row) of the rows (only `columns`) of row groups first..end-1 of a Parquet file, in order:
    one open, read forward a batch at a time (a row group of a million rows too). With `wanted` ({row group: rows,
    ascending}), only those rows, of only those groups, become Python rows."""
    import bisect

    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        for group in range(first, end):
            rows = None if wanted is None else wanted.get(group)
            if wanted is not None and not rows:
                continue
            start = 0
            for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[group], columns=list(columns)):
                if rows is None:
                    for offset, row in enumerate(batch.to_pylist()):
                        yield group, start + offset, row
                else:
                    taken = rows[bisect.bisect_left(rows, start):bisect.bisect_left(rows, start + batch.num_rows)]
                    if taken:
                        for position, row in zip(taken, batch.take(pa.array([p - start for p in taken],
                                                                            pa.int64())).to_pylist()):
                            yield group, position, row
                start += batch.num_rows


def add_value_counts(into: Dict[str, int], column) -> None:
    """Add a column's {value: rows} (nulls left out) to `into`, which keeps the order values were first seen."""
    import pyarrow.compute as pc

    for item in pc.value_counts(column.drop_null()).to_pylist():
        into[item["values"]] = into.get(item["values"], 0) + item["counts"]


class _WriteTablePartsFn(beam.DoFn):
    """Rows -> one Parquet part file per bundle, ROWS_PER_BATCH rows at a time; yields the part's path."""

    def __init__(self, temp_dir: str, schema: pa.Schema):
        self._temp_dir = temp_dir
        self._schema = schema

    def start_bundle(self):
        self._rows, self._writer, self._handle, self._path = [], None, None, ""

    def process(self, row: dict):
        self._rows.append(row)
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._path = FileSystems.join(self._temp_dir, f"part-{uuid.uuid4().hex}.parquet")
            self._handle = FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
            self._writer = pq.ParquetWriter(self._handle, self._schema)
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
        self._rows = []

    def finish_bundle(self):
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._handle.close()
            yield WindowedValue(self._path, window.GlobalWindow().max_timestamp(), [window.GlobalWindow()])
        self._writer = self._handle = None


def merge_parts(parts: List[str], path: str, schema: pa.Schema, temp_dir: str,
                renames: Optional[Tuple[str, Dict[str, str]]] = None) -> str:
    """Concatenate the part files into `path` one batch at a time (an empty table when there are none), renamed into
    place at the end; `renames` = (column, {old: new}) rewrites one column's values on the way (ingest's shard names;
    a value it does not name stays, as an `ingest --append` run's earlier rows keep their shards)."""
    merged = FileSystems.join(temp_dir, f"merged-{uuid.uuid4().hex}.parquet")
    raw = CompressionTypes.UNCOMPRESSED
    with FileSystems.create(merged, compression_type=raw) as handle:
        writer = pq.ParquetWriter(handle, schema)
        for part in sorted(parts):
            with FileSystems.open(part, compression_type=raw) as source:
                for batch in parquet_batches(source):
                    table = pa.Table.from_batches([batch], schema=schema)
                    if renames:
                        column, names = renames
                        index = schema.get_field_index(column)
                        values = pa.array([names.get(v, v) for v in table.column(column).to_pylist()],
                                          schema.field(column).type)
                        table = table.set_column(index, schema.field(column), values)
                    writer.write_table(table)
        writer.close()
    FileSystems.rename([merged], [path])
    try:
        FileSystems.delete([temp_dir])
    except Exception:  # noqa: BLE001 - the table stands; a leftover temp folder is only clutter
        pass
    return path


class WriteTable(beam.PTransform):
    """Rows (dicts; a PCollection, or a tuple of them) -> exactly one `<prefix>.parquet` file, present (with its
    schema) even when there are no rows, so readers never guess. Rows never cross a shuffle: each bundle streams its
    rows into a part file, and one step concatenates the parts batch by batch, so no process holds the table (a
    runner that keeps shuffles in memory, the DirectRunner, would hold every row of it, and a grouped single key
    would land whole on one worker). Several row PCollections are written part by part and only their part paths
    are flattened: the FnApiRunner (the DirectRunner) materializes a Flatten's inputs in its launcher, which held
    20,000 reused rows (35 MB) there before they reached the writer.

    `renames`: (column, a PCollection of one {old: new} dict) rewrites that column's values as the parts are merged.
    """

    def __init__(self, prefix: str, schema: pa.Schema, renames=None):
        super().__init__()
        self._prefix = prefix
        self._schema = schema
        self._renames = renames

    def expand(self, rows):
        folder, _, name = self._prefix.rstrip("/").rpartition("/")
        temp_dir = FileSystems.join(folder or ".", f".temp-{name}-{uuid.uuid4().hex[:12]}")
        sources = rows if isinstance(rows, (tuple, list)) else (rows,)
        parts = [source | ("WriteParts" if not index else f"WriteParts{index + 1}")
                 >> beam.ParDo(_WriteTablePartsFn(temp_dir, self._schema))
                 for index, source in enumerate(sources)]
        if len(parts) > 1:
            parts = [parts | "Parts" >> beam.Flatten()]
        parts = parts[0] | "AllParts" >> beam.combiners.ToList()
        path = f"{self._prefix}.parquet"
        if self._renames is None:
            return parts | "Merge" >> beam.Map(merge_parts, path, self._schema, temp_dir)
        column, names = self._renames
        return parts | "Merge" >> beam.Map(_merge_renamed, path, self._schema, temp_dir, column,
                                           beam.pvalue.AsSingleton(names))


def _merge_renamed(parts: List[str], path: str, schema: pa.Schema, temp_dir: str, column: str,
                   names: Dict[str, str]) -> str:
    return merge_parts(parts, path, schema, temp_dir, (column, names))


def write_table_from_rows(prefix: str, schema: pa.Schema, renames=None) -> WriteTable:
    """The Beam transform writing `<prefix>.parquet`."""
    return WriteTable(prefix, schema, renames)


def write_job_tables(outputs, output_dir: str, tables) -> None:
    """Write each `outputs[key]` PCollection of rows to `output_dir/<name>.parquet`, for (key, name, schema) in
    `tables` (or (key, name, schema, renames), see WriteTable); the step is labelled `Write<Name>` (stable labels
    keep Dataflow job updates possible)."""
    for key, name, schema, *renames in tables:
        _ = outputs[key] | f"Write{name.capitalize()}" >> write_table_from_rows(
            FileSystems.join(output_dir, name), schema, renames[0] if renames else None)


def read_table(path: str, schema: pa.Schema) -> pa.Table:
    """A table written by a job (local or gs://); an absent file reads as an empty table of `schema`."""
    if not FileSystems.exists(path):
        return schema.empty_table()
    with FileSystems.open(path) as handle:
        return pq.read_table(io.BytesIO(handle.read()))
