"""The Parquet tables the jobs write (manifest, errors, results): their schemas and Beam writers."""
from __future__ import annotations

import io

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

MANIFEST_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("page", pa.int64()), ("augment_index", pa.int64()), ("sha256", pa.string()),
    ("split", pa.string()), ("shard", pa.string()), ("label_index", pa.int64()), ("label_name", pa.string()),
    ("orientation", pa.int64()), ("exif_orientation", pa.int64()), ("format", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("original_height", pa.int64()),
    ("original_width", pa.int64()), ("encoded_bytes", pa.int64()),
])

ERRORS_SCHEMA = pa.schema([
    ("uri", pa.string()), ("page", pa.int64()), ("stage", pa.string()), ("error_type", pa.string()),
    ("message", pa.string()), ("sha256", pa.string()),
])


# One row per scored page (score job). Probabilities are in the model's column order: orientations 0/90/180/270
# clockwise, classes as in labels.json. `reused` rows were copied from --skip-known instead of being scored.
# `tta_agreement` and `text_crops` are the graph's own outputs (serving.answer): the share of the four turned copies
# that agreed (null: not turned), and the text-crop evidence (1: counted, 0: read and not counted, null: not read).
# `text_lines` stays for tables written before text lines left score (always null now). `corrected_orientation`: a
# person's answer (score --corrections; decision `corrected`), -1 for no up / not an image, null where none.
# `fingerprint` is the file's listing fingerprint (pipelines.sources.SourceEntry) when it was scored or reused: a later --skip-known run reuses
# the rows of a file listed again at the same uri with the same fingerprint without reading it (tables written
# before the column, or files listed without one, are matched by sha256, read).
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

class WriteTable(beam.PTransform):
    """Rows (dicts) -> exactly one `<prefix>.parquet` file, written atomically by Beam's file sink,
    present (with its schema) even when there are no rows, so readers never guess."""

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__()
        self._prefix = prefix
        self._schema = schema

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(self._prefix, self._schema, file_name_suffix=".parquet",
                                              num_shards=1, shard_name_template="")


def write_table_from_rows(prefix: str, schema: pa.Schema) -> WriteTable:
    """The Beam transform writing `<prefix>.parquet`."""
    return WriteTable(prefix, schema)


def write_job_tables(outputs, output_dir: str, tables) -> None:
    """Write each `outputs[key]` PCollection of rows to `output_dir/<name>.parquet`, for (key, name, schema) in
    `tables`; the step is labelled `Write<Name>` (stable labels keep Dataflow job updates possible)."""
    for key, name, schema in tables:
        _ = outputs[key] | f"Write{name.capitalize()}" >> write_table_from_rows(
            FileSystems.join(output_dir, name), schema)


def read_table(path: str, schema: pa.Schema) -> pa.Table:
    """A table written by a job (local or gs://); an absent file reads as an empty table of `schema`."""
    if not FileSystems.exists(path):
        return schema.empty_table()
    with FileSystems.open(path) as handle:
        return pq.read_table(io.BytesIO(handle.read()))
