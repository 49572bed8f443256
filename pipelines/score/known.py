"""`score --skip-known`: which earlier rows a run reuses, decided by keyed joins inside the pipeline.

    listed files --(uri, fingerprint)--> JoinByListing <-- earlier rows that carry a fingerprint
        matched: the earlier rows are copied (reused=True); the file is never opened
        unmatched --> read and hashed --sha256--> JoinByContent <-- earlier rows by sha256
            matched: copied too (a touched, moved or copied file whose content was scored)
            unmatched: decoded and scored

The earlier table is read by the workers (ReadFromParquet with only the columns reuse needs; a CSV streamed in
batches), so nothing in the launcher grows with it: the launcher reads its schema only (inspect_known), to know
whether it is a results table (rows of this model name and version are reused) or an ingest manifest (its files
become `skipped` rows). A table written before the fingerprint column joins by sha256 only.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.sources import SourceEntry
from pipelines.score.options import COUNTER_NAMESPACE, SKIPPED, ModelInfo
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, failure_stands
from pipelines.score.review import CORRECTED
from serving.policy import DECISIONS

RESULTS = "results"
MANIFEST = "manifest"
ERRORS_TABLE = "errors.parquet"  # beside a results table: its run's failures
RESULT_MARKERS = {"model_name", "model_version", "decision"}
# Rows a file may reuse: the model's own decisions, and a person's (a page answered is known: pipelines.score.review).
KNOWN_DECISIONS = frozenset(DECISIONS) | {CORRECTED}
# An ingest manifest's columns that a `skipped` row takes (augmented copies collapse onto their page), and whether
# `ingest --append` superseded the record (its file has changed since: not known).
MANIFEST_COLUMNS = ("source_uri", "uri", "page", "sha256", "fingerprint", "format", "original_width",
                    "original_height", "exif_orientation", "superseded")
LIST_COLUMNS = ("class_probabilities", "orientation_probabilities")  # results.csv writes them as `p0;p1;...`


@dataclasses.dataclass(frozen=True)
class KnownTable:
    """An earlier table given to --skip-known: where it is, what it is, and the columns a run reads of it."""

    path: str  # a file or a Beam file pattern (every match is read)
    kind: str  # RESULTS or MANIFEST
    columns: Tuple[str, ...]
    errors: Tuple[str, ...] = ()  # the errors.parquet beside each results table, where it records fingerprints

    @property
    def is_csv(self) -> bool:
        return self.path.lower().endswith(".csv")


def _columns_of(path: str) -> List[str]:
    """A table's column names from its Parquet footer or its CSV header, without reading its rows."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with FileSystems.open(path) as handle:
        if path.lower().endswith(".csv"):
            return list(pacsv.open_csv(handle).schema.names)
        return list(pq.ParquetFile(handle).schema_arrow.names)


def inspect_known(path: str) -> KnownTable:
    """What --skip-known names (launcher side: schemas only, never rows)."""
    matched = sorted(m.path for m in FileSystems.match([path])[0].metadata_list)
    if not matched:
        raise FileNotFoundError(f"--skip-known {path}: no such file")
    columns = _columns_of(matched[0])
    for other in matched[1:]:
        names = set(_columns_of(other))
        columns = [c for c in columns if c in names]
    if "sha256" not in columns:
        raise ValueError(f"--skip-known {path} has no sha256 column (columns: {sorted(columns)})")
    kind = RESULTS if RESULT_MARKERS <= set(columns) else MANIFEST
    wanted = RESULTS_SCHEMA.names if kind == RESULTS else MANIFEST_COLUMNS
    errors = tuple(sorted({FileSystems.join(FileSystems.split(m)[0], ERRORS_TABLE) for m in matched})) \
        if kind == RESULTS else ()
    errors = tuple(e for e in errors if FileSystems.exists(e) and set(ERRORS_SCHEMA.names) <= set(_columns_of(e)))
    return KnownTable(path, kind, tuple(c for c in wanted if c in columns), errors)


def known_row(row: dict, table: KnownTable, model: ModelInfo) -> Optional[dict]:
    """An earlier table's row as a results row a file may reuse, or None when it may not be reused (another model
    name or version, not a decision of its own: a `skipped` row was never scored, or a superseded manifest row)."""
    if table.kind == MANIFEST:
        return None if row.get("superseded") else _skipped_row(row, int(row.get("page") or 0), model)
    if row.get("model_name") != model.name or row.get("model_version") is None \
            or int(row["model_version"]) != model.version or row.get("decision") not in KNOWN_DECISIONS:
        return None
    out = {name: _csv_value(name, row.get(name)) for name in RESULTS_SCHEMA.names}
    out["fingerprint"] = out["fingerprint"] or ""
    return out


def _skipped_row(row: dict, page: int, model: ModelInfo) -> dict:
    out = {name: None for name in RESULTS_SCHEMA.names}
    out.update(uri=row.get("source_uri") or row.get("uri") or "", page=page, sha256=row["sha256"],
               fingerprint=row.get("fingerprint") or "", format=row.get("format") or "",
               width=row.get("original_width") or -1, height=row.get("original_height") or -1,
               exif_orientation=row.get("exif_orientation") or 0, class_name="", class_id=-1,
               orientation_degrees=-1, decision=SKIPPED, review_reason="already in the --skip-known manifest",
               model_name=model.name, model_version=model.version, corrected_uri="", corrected_method="")
    return out


def _csv_value(name: str, value):
    """Undo results.csv's flattening of probability lists (a ;-joined string) when a CSV is reused."""
    if name in LIST_COLUMNS and isinstance(value, str):
        return [float(x) for x in value.split(";") if x] or None
    return value


def packed(row: dict) -> tuple:
    """An earlier row as the tuple of its values in RESULTS_SCHEMA's order: how it crosses the joins' shuffles
    (Beam's primitive coder writes a tuple without a dict's key names, and the DirectRunner holds a shuffle in its
    launcher's memory)."""
    return tuple(row[name] for name in RESULTS_SCHEMA.names)


def unpacked(values: tuple) -> dict:
    return dict(zip(RESULTS_SCHEMA.names, values))


def reused_rows(entry, known: Iterable[tuple]) -> List[dict]:
    """The rows a listed file reuses (`known`: earlier rows, packed): one earlier row per page (page order; of
    several, the one with the smallest earlier uri), carrying this file's uri and fingerprint."""
    pages = {}
    for row in sorted(map(unpacked, known), key=lambda r: (r["page"], r["uri"] or "")):
        pages.setdefault(row["page"], row)
    return [dict(row, uri=entry.uri, fingerprint=entry.fingerprint, reused=True)
            for _, row in sorted(pages.items())]


def _csv_types(columns: Iterable[str]) -> dict:
    """Every column of a CSV read as the table wrote it (probability lists as their `;`-joined text), so a streamed
    block never guesses differently from the first one."""
    import pyarrow as pa

    manifest_only = {"source_uri": pa.string(), "original_width": pa.int64(), "original_height": pa.int64(),
                     "superseded": pa.bool_()}
    return {name: pa.string() if name in LIST_COLUMNS else
            RESULTS_SCHEMA.field(name).type if name in RESULTS_SCHEMA.names else manifest_only[name]
            for name in columns}


def _csv_rows(path: str, columns: Tuple[str, ...]) -> Iterable[dict]:
    """A CSV table's rows (only `columns`), streamed in blocks."""
    import pyarrow.csv as pacsv

    options = pacsv.ConvertOptions(include_columns=list(columns), column_types=_csv_types(columns))
    with FileSystems.open(path) as handle:
        for batch in pacsv.open_csv(handle, convert_options=options):
            yield from batch.to_pylist()


def _matched_paths(pattern: str) -> List[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


class _KnownRowFn(beam.DoFn):
    def __init__(self, table: KnownTable, model: ModelInfo):
        self._table = table
        self._model = model
        self._rows = Metrics.counter(COUNTER_NAMESPACE, "known_rows")

    def process(self, row: dict):
        out = known_row(row, self._table, self._model)
        if out is not None and out["sha256"]:
            self._rows.inc()
            yield out


class ReadKnown(beam.PTransform):
    """pbegin -> the earlier table's reusable rows (results rows of this model version, or `skipped` rows)."""

    def __init__(self, table: KnownTable, model: ModelInfo):
        super().__init__()
        self._table = table
        self._model = model

    def expand(self, pbegin):
        table = self._table
        if table.is_csv:
            rows = (pbegin
                    | "Pattern" >> beam.Create([table.path])
                    | "Match" >> beam.FlatMap(_matched_paths)
                    | "ReadCsv" >> beam.FlatMap(_csv_rows, table.columns))
        else:
            rows = pbegin | "ReadParquet" >> beam.io.ReadFromParquet(table.path, columns=list(table.columns))
        return rows | "Reusable" >> beam.ParDo(_KnownRowFn(table, self._model))


def _failure_keys(row: dict) -> Iterable[Tuple[Tuple[str, str], tuple]]:
    """An earlier error row keyed by (uri, fingerprint), as a tuple in ERRORS_SCHEMA's order; none unless it can
    stand (the join then matches its fingerprint with the file's now: pipelines.tables.failure_stands)."""
    if failure_stands(row, row["fingerprint"]):
        yield (row["uri"], row["fingerprint"]), tuple(row[name] for name in ERRORS_SCHEMA.names)


class ReadKnownFailures(beam.PTransform):
    """pbegin -> the earlier run's failures that stand while their file is unchanged (a corrupt, truncated, empty or
    unknown file), keyed by (uri, fingerprint): read by the workers from the errors.parquet beside the earlier
    results (none when it has no fingerprint column: written before it)."""

    def __init__(self, table: KnownTable):
        super().__init__()
        self._table = table

    def expand(self, pbegin):
        return (pbegin
                | "Tables" >> beam.Create(list(self._table.errors))
                | "ReadErrors" >> beam.io.ReadAllFromParquet(columns=list(ERRORS_SCHEMA.names))
                | "Defects" >> beam.FlatMap(_failure_keys))


def listing_key(row: dict) -> Iterable[Tuple[Tuple[str, str], tuple]]:
    """An earlier row (packed) keyed by (uri, fingerprint); none for a row without a fingerprint (an older
    table's)."""
    if row["fingerprint"] and row["uri"]:
        yield (row["uri"], row["fingerprint"]), packed(row)


def known_content_key(row: dict) -> Tuple[str, tuple]:
    """An earlier row (packed) keyed by its content's sha256."""
    return row["sha256"], packed(row)


def content_key(element: dict) -> Tuple[str, dict]:
    """A read file ({entry, data, sha256}) keyed by its content's sha256."""
    return element["sha256"], element


def entry_listing_key(entry: SourceEntry) -> Tuple[Tuple[str, str], tuple]:
    """A listed file keyed by (uri, fingerprint), as a tuple of its fields (SourceEntry.fields)."""
    return (entry.uri, entry.fingerprint), entry.fields()


def _failure_order(row: dict) -> tuple:
    return row["page"], row["stage"], row["error_type"], row["message"] or "", row["uri"] or ""


class ReuseByListingFn(beam.DoFn):
    """(uri, fingerprint) -> {entries, known, failed}: a listed file with earlier rows reuses them unread, and one
    whose earlier failure stands (a defect of its unchanged bytes) keeps its error rows unread (ERRORS; it is still
    a failed input); the others go on (UNMATCHED) to be read. Earlier rows of files not listed now are dropped."""

    UNMATCHED, ERRORS = "unmatched", "errors"

    def __init__(self):
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._by_listing = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused_by_listing")
        self._failed_before = Metrics.counter(COUNTER_NAMESPACE, "inputs_failed_before")

    def process(self, element):
        (_, fingerprint), grouped = element
        entries = [SourceEntry.from_fields(fields) for fields in grouped["entries"]]
        # no fingerprint: nothing to match by listing
        known = list(grouped["known"]) if fingerprint else []
        failed = [dict(zip(ERRORS_SCHEMA.names, values)) for values in grouped["failed"]] if fingerprint else []
        for entry in entries:
            if not (known or failed) or entry.error:
                yield beam.pvalue.TaggedOutput(self.UNMATCHED, entry)
                continue
            self._inputs.inc()  # the reading step counts the others
            if known:
                self._reused.inc()
                self._by_listing.inc()
                yield from reused_rows(entry, known)
            else:
                self._failed_before.inc()
            # One row per failure: several earlier tables (a --skip-known pattern) may each hold the same one.
            kept = {(r["page"], r["stage"], r["error_type"]): r for r in sorted(failed, key=_failure_order)}
            for row in kept.values():
                yield beam.pvalue.TaggedOutput(self.ERRORS, dict(row, uri=entry.uri))


class ReuseByContentFn(beam.DoFn):
    """sha256 -> {read, known}: a read file whose content has earlier rows reuses them; the others go on
    (UNMATCHED) to be decoded and scored."""

    UNMATCHED = "unmatched"

    def __init__(self):
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._by_content = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused_by_content")

    def process(self, element):
        _, grouped = element
        known = list(grouped["known"])
        for read in grouped["read"]:
            if not known:
                yield beam.pvalue.TaggedOutput(self.UNMATCHED, read)
                continue
            self._reused.inc()
            self._by_content.inc()
            yield from reused_rows(read["entry"], known)
