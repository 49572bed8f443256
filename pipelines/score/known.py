"""`score --skip-known`: which earlier rows a run reuses, decided by keyed joins inside the pipeline.

    listed files --(uri, fingerprint)--> JoinByListing <-- earlier rows of files that may be listed now
        matched: the earlier rows are copied (reused=True); the file is never opened
        unmatched --> read and hashed --sha256--> JoinByContent <-- earlier rows whose content may have been read
            matched: copied too (a touched, moved or copied file whose content was scored)
            unmatched: decoded and scored
    copied rows: (table file, span of row groups) --> GroupBySpan --> each span read once, its chosen rows copied

The joins carry references, not rows: an earlier row crosses them as its key (a 16-byte digest of its uri and
fingerprint, or its sha256) and 20 bytes naming its page and where it is (file, row group, row). Only the rows chosen
are read again, a span of row groups at a time (FetchKnownRows). And only the earlier rows whose key this run may
hold cross a join at all: a Bloom filter of the run's own keys (KeyFilter: the listing's, then the contents read)
filters them as they are read. The shuffles so hold tens of bytes for each earlier row of a file listed now, and
nothing for the rows of files gone (the DirectRunner holds a shuffle in memory, its values decoded; Dataflow's is on
disk). A table file rewritten while the run reads it stops the run (pipelines.tables.TableChanged).

The earlier table is read by the workers, a span of row groups at a time (a CSV streamed in blocks), so nothing in the
launcher grows with it: the launcher reads its schema only (inspect_known), to know whether it is a results table
(rows of this model name and version are reused) or an ingest manifest (its files become `skipped` rows). A table
written before the fingerprint column joins by sha256 only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.sources import SourceEntry
from pipelines.score.options import COUNTER_NAMESPACE, SKIPPED, ModelInfo
from pipelines.tables import (ERRORS_SCHEMA, GROUPS_PER_SPAN, RESULTS_SCHEMA, ListedFile, TableChanged, check_unchanged,
                              failure_stands, listed_files, row_group_spans, span_of, span_rows)
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
    files: Tuple[ListedFile, ...] = ()  # every file `path` matched when the run was built: references name its index


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
    files = listed_files(path)
    matched = [f.path for f in files]
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
    return KnownTable(path, kind, tuple(c for c in wanted if c in columns), errors, tuple(files))


def known_row(row: dict, table: KnownTable, model: ModelInfo) -> Optional[dict]:
    """An earlier table's row as a results row a file may reuse, or None when it may not be reused (another model
    name or version, not a decision of its own: a `skipped` row was never scored, or a superseded manifest row)."""
    if not reusable(row, table, model):
        return None
    if table.kind == MANIFEST:
        return _skipped_row(row, int(row.get("page") or 0), model)
    out = {name: _csv_value(name, row.get(name)) for name in RESULTS_SCHEMA.names}
    out["fingerprint"] = out["fingerprint"] or ""
    return out


def reusable(row: dict, table: KnownTable, model: ModelInfo) -> bool:
    """Whether an earlier row may be reused: one of this model name and version and a decision of its own (a
    `skipped` row was never scored), or a manifest row that `ingest --append` has not superseded."""
    if table.kind == MANIFEST:
        return not row.get("superseded")
    return row.get("model_name") == model.name and row.get("model_version") is not None \
        and int(row["model_version"]) == model.version and row.get("decision") in KNOWN_DECISIONS


def _manifest_uri(row: dict) -> str:
    """The file an ingest manifest row came from (its source uri; a manifest without one: its uri)."""
    return row.get("source_uri") or row.get("uri") or ""


def _skipped_row(row: dict, page: int, model: ModelInfo) -> dict:
    out = {name: None for name in RESULTS_SCHEMA.names}
    out.update(uri=_manifest_uri(row), page=page, sha256=row["sha256"],
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


# An earlier row as the joins carry it: a reference, 20 bytes packing (page, file, row group + 1, row) big-endian,
# where the file is its index in KnownTable.files and a CSV table is one group (-1) counted from its first row. Beam
# writes bytes as they are (an int past 2^63 would be pickled), the DirectRunner's shuffle holds each value decoded,
# in memory, and references sort as the tuples they pack.
_REF = struct.Struct(">IIIQ")


def pack_ref(page: int, index: int, group: int, position: int) -> bytes:
    return _REF.pack(page, index, group + 1, position)


def unpack_ref(ref: bytes) -> Tuple[int, int, int, int]:
    """(page, file index, row group, row) of a packed reference."""
    page, index, group, position = _REF.unpack(ref)
    return page, index, group - 1, position


def listing_digest(uri: str, fingerprint: str) -> bytes:
    """The listing join's key: 16 bytes of BLAKE2b over a file's (uri, fingerprint), in place of the pair itself
    (100-200 bytes a file in the shuffle). Two files would meet by mistake with odds of about 2^-128 a pair."""
    return hashlib.blake2b(f"{uri}\0{fingerprint}".encode(), digest_size=16).digest()


LISTING, CONTENT = "listing", "content"  # the two joins


def join_key(row: dict, table: KnownTable, join: str):
    """A reusable earlier row's key in one join: the listing_digest of the uri and fingerprint a reused row carries
    (known_row's: a manifest's source uri; None without a fingerprint: an older table's), or its sha256."""
    if join == CONTENT:
        return row["sha256"]
    uri = _manifest_uri(row) if table.kind == MANIFEST else row.get("uri")
    return listing_digest(uri, row["fingerprint"]) if uri and row.get("fingerprint") else None


def chosen(refs: Iterable[bytes]) -> List[bytes]:
    """Of the earlier rows a file may reuse, one per page in page order: of several (a --skip-known pattern may hold
    the same file's rows more than once), the last in the tables (their paths sorted: of dated folders, the newest)."""
    pages = {}
    for ref in sorted(refs):
        pages[unpack_ref(ref)[0]] = ref
    return list(pages.values())


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


def _spans(index: int, table: KnownTable) -> Iterable[Tuple[int, int, int]]:
    """(file index, first row group, end) of each span of a table file's row groups (pipelines.tables.span_rows); a
    CSV is one span, (index, -1, 0)."""
    file = table.files[index]
    if file.is_csv:
        yield index, -1, 0
        return
    for first, end in row_group_spans(check_unchanged(file)):
        yield index, first, end


def _rows(table: KnownTable, span: Tuple[int, int, int], columns: Tuple[str, ...],
          wanted: Optional[Dict[int, List[int]]] = None) -> Iterable[Tuple[int, int, dict]]:
    """(row group, row, the row) of a span's rows, as pipelines.tables.span_rows gives them; a CSV's rows are group
    -1's, counted from its first row (with `wanted`, read only up to the last row wanted)."""
    index, first, end = span
    path = check_unchanged(table.files[index])
    if first >= 0:
        yield from span_rows(path, first, end, columns, wanted)
        return
    rows = None if wanted is None else set(wanted.get(-1, ()))
    last = max(rows) if rows else -1
    for position, row in enumerate(_csv_rows(path, columns)):
        if rows is None or position in rows:
            yield -1, position, row
        if rows is not None and position >= last:
            return


def _key_columns(table: KnownTable) -> Tuple[str, ...]:
    """The columns the joins need of an earlier table: the keys and what decides whether a row may be reused."""
    wanted = {"source_uri", "uri", "page", "sha256", "fingerprint", "superseded"} if table.kind == MANIFEST \
        else {"uri", "page", "sha256", "fingerprint", "model_name", "model_version", "decision"}
    return tuple(c for c in table.columns if c in wanted)


class _KnownRefsFn(beam.DoFn):
    """A span of a table file (_spans) -> (join key, reference) of each of its rows that may be reused (with a
    sha256) and whose key this run may hold (`keys`: a KeyFilter of the keys of this run's side of the join)."""

    def __init__(self, table: KnownTable, model: ModelInfo, join: str):
        self._table = table
        self._model = model
        self._join = join
        self._known = Metrics.counter(COUNTER_NAMESPACE, "known_rows") if join == LISTING else None
        self._joined = Metrics.counter(COUNTER_NAMESPACE, f"known_rows_by_{join}")

    def process(self, span: Tuple[int, int, int], keys: bytes):
        index = span[0]
        for group, position, row in _rows(self._table, span, _key_columns(self._table)):
            if not (row.get("sha256") and reusable(row, self._table, self._model)):
                continue
            if self._known:
                self._known.inc()
            key = join_key(row, self._table, self._join)
            if key is not None and may_hold(keys, key):
                self._joined.inc()
                yield key, pack_ref(int(row.get("page") or 0), index, group, position)


class ReadKnown(beam.PTransform):
    """pbegin -> (join key, reference) of the reusable rows of the earlier table (results rows of this model version,
    or manifest rows that become `skipped` rows) for one join (LISTING or CONTENT), of those whose key may be among
    `keys` (a KeyFilter of this run's keys for that join, as a PCollection of one). Key columns only, read by the
    workers a span of row groups at a time (the spans are spread over them)."""

    def __init__(self, table: KnownTable, model: ModelInfo, join: str, keys):
        super().__init__()
        self._table = table
        self._model = model
        self._join = join
        self._keys = keys

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(list(range(len(self._table.files))))
                | "Spans" >> beam.FlatMap(_spans, self._table)
                | "SpreadSpans" >> beam.Reshuffle()
                | "References" >> beam.ParDo(_KnownRefsFn(self._table, self._model, self._join),
                                             beam.pvalue.AsSingleton(self._keys)))


# A Bloom filter of one side's join keys: 2^23 bits (1 MB), 4 probes a key. The earlier rows whose key it may hold
# cross the join. At 100,000 keys it lets through about one unrelated row in 200,000, at 1,000,000 one in 50; at
# 10,000,000 most of them (a filter that full lets more rows into the join, never fewer: it only stops helping).
# The runner holds a few copies of it per worker and in the launcher while it is combined (about 10 MB in all for
# two filters under the DirectRunner; 4 MB ones cost about 30 MB).
_FILTER_BITS, _PROBES = 1 << 23, 4


def _probes(key) -> List[int]:
    digest = hashlib.blake2b(key if isinstance(key, bytes) else key.encode(), digest_size=4 * _PROBES).digest()
    return [int.from_bytes(digest[4 * i:4 * i + 4], "little") % _FILTER_BITS for i in range(_PROBES)]


def may_hold(keys: bytes, key) -> bool:
    """Whether a KeyFilter's output may hold `key` (never False for one it holds)."""
    return all(keys[bit >> 3] >> (bit & 7) & 1 for bit in _probes(key))


class KeyFilter(beam.CombineFn):
    """Join keys (str or bytes) -> a Bloom filter of them (bytes), the same size whatever their number: which earlier
    rows cross a join (a semi-join reduction), instead of every one of them crossing its shuffle. A night that reads
    no file sends none through the join by content; rows of files no longer listed skip the join by listing."""

    def create_accumulator(self):
        return bytearray(_FILTER_BITS // 8)

    def add_input(self, accumulator, key):
        for bit in _probes(key):
            accumulator[bit >> 3] |= 1 << (bit & 7)
        return accumulator

    def merge_accumulators(self, accumulators):
        import numpy as np

        merged = None
        for accumulator in accumulators:
            bits = np.frombuffer(accumulator, np.uint8)
            merged = bits.copy() if merged is None else np.bitwise_or(merged, bits, out=merged)
        return bytearray(merged.tobytes()) if merged is not None else self.create_accumulator()

    def extract_output(self, accumulator):
        return bytes(accumulator)


class _FetchRowsFn(beam.DoFn):
    """((file index, span), [(row group, row, page, uri, fingerprint)]) -> the rows asked for, each as the results row
    it becomes (known_row), reused=True, carrying the uri and fingerprint of the file that reuses it (none given: its
    own, as when the listing matched them). A row that is not the one referenced (the table changed) stops the run."""

    def __init__(self, table: KnownTable, model: ModelInfo):
        self._table = table
        self._model = model

    def process(self, element):
        (index, first), asked = element
        wanted: Dict[Tuple[int, int], List[Tuple[int, str, str]]] = {}
        for group, position, page, uri, fingerprint in asked:
            wanted.setdefault((group, position), []).append((page, uri, fingerprint))
        by_group: Dict[int, List[int]] = {}
        for group, position in sorted(wanted):
            by_group.setdefault(group, []).append(position)
        span = (index, first, first + GROUPS_PER_SPAN if first >= 0 else 0)
        found = 0
        for group, position, row in _rows(self._table, span, self._table.columns, by_group):
            found += 1
            out = known_row(row, self._table, self._model)
            for page, uri, fingerprint in wanted[group, position]:
                if out is None or out["page"] != page:
                    raise TableChanged(f"--skip-known {self._table.files[index].path}: row {position} of row group "
                                       f"{group} is not the row this run joined")
                yield dict(out, reused=True, **({"uri": uri, "fingerprint": fingerprint} if uri else {}))
        if found != len(wanted):
            raise TableChanged(f"--skip-known {self._table.files[index].path}: {len(wanted) - found} of the rows "
                               f"this run joined are not there now")


def _by_span(request: tuple) -> tuple:
    ref, uri, fingerprint = request
    page, index, group, position = unpack_ref(ref)
    return (index, span_of(group) if group >= 0 else -1), (group, position, page, uri, fingerprint)


class FetchKnownRows(beam.PTransform):
    """(reference, uri, fingerprint) requests from the joins -> the earlier rows they name, copied for their files: the
    requests are grouped by row group, and each row group is read once."""

    def __init__(self, table: KnownTable, model: ModelInfo):
        super().__init__()
        self._table = table
        self._model = model

    def expand(self, requests):
        return (requests
                | "BySpan" >> beam.Map(_by_span)
                | "GroupBySpan" >> beam.GroupByKey()
                | "Fetch" >> beam.ParDo(_FetchRowsFn(self._table, self._model)))


def _failure_keys(row: dict) -> Iterable[Tuple[bytes, tuple]]:
    """An earlier error row keyed by the listing_digest of its (uri, fingerprint), as a tuple in ERRORS_SCHEMA's
    order; none unless it can stand (the join then matches its fingerprint with the file's now:
    pipelines.tables.failure_stands)."""
    if failure_stands(row, row["fingerprint"]):
        yield listing_digest(row["uri"], row["fingerprint"]), tuple(row[name] for name in ERRORS_SCHEMA.names)


class ReadKnownFailures(beam.PTransform):
    """pbegin -> the earlier run's failures that stand while their file is unchanged (a corrupt, truncated, empty or
    unknown file), keyed by their listing_digest: read by the workers from the errors.parquet beside the earlier
    results (none when it has no fingerprint column: written before it)."""

    def __init__(self, table: KnownTable):
        super().__init__()
        self._table = table

    def expand(self, pbegin):
        return (pbegin
                | "Tables" >> beam.Create(list(self._table.errors))
                | "ReadErrors" >> beam.io.ReadAllFromParquet(columns=list(ERRORS_SCHEMA.names))
                | "Defects" >> beam.FlatMap(_failure_keys))


def content_key(element: dict) -> Tuple[str, dict]:
    """A read file ({entry, data, sha256}) keyed by its content's sha256."""
    return element["sha256"], element


def entry_listing_key(entry: SourceEntry) -> Tuple[bytes, tuple]:
    """A listed file keyed by its listing_digest, as a tuple of its fields (SourceEntry.fields)."""
    return listing_digest(entry.uri, entry.fingerprint), entry.fields()


def _failure_order(row: dict) -> tuple:
    return row["page"], row["stage"], row["error_type"], row["message"] or "", row["uri"] or ""


class ReuseByListingFn(beam.DoFn):
    """listing_digest -> {entries, known, failed}: a listed file with earlier rows reuses them unread (a request
    (reference, uri, fingerprint) for FetchKnownRows per page), and one whose earlier failure stands (a defect of its
    unchanged bytes) keeps its error rows unread (ERRORS; it is still a failed input); the others go on (UNMATCHED)
    to be read. Earlier rows of files not listed now are dropped."""

    UNMATCHED, ERRORS = "unmatched", "errors"

    def __init__(self):
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._by_listing = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused_by_listing")
        self._failed_before = Metrics.counter(COUNTER_NAMESPACE, "inputs_failed_before")

    def process(self, element):
        _, grouped = element
        entries = [SourceEntry.from_fields(fields) for fields in grouped["entries"]]
        # Earlier rows and failures are keyed only where they carry a fingerprint; a file listed without one (an
        # empty fingerprint) matches none of them.
        known = chosen(grouped["known"])
        failed = [dict(zip(ERRORS_SCHEMA.names, values)) for values in grouped["failed"]]
        for entry in entries:
            if not (known or failed) or entry.error:
                yield beam.pvalue.TaggedOutput(self.UNMATCHED, entry)
                continue
            self._inputs.inc()  # the reading step counts the others
            if known:
                self._reused.inc()
                self._by_listing.inc()
                for ref in known:  # the rows carry this uri and fingerprint already: they are the key
                    yield ref, "", ""
            else:
                self._failed_before.inc()
            # One row per failure: several earlier tables (a --skip-known pattern) may each hold the same one.
            kept = {(r["page"], r["stage"], r["error_type"]): r for r in sorted(failed, key=_failure_order)}
            for row in kept.values():
                yield beam.pvalue.TaggedOutput(self.ERRORS, dict(row, uri=entry.uri))


class ReuseByContentFn(beam.DoFn):
    """sha256 -> {read, known}: a read file whose content has earlier rows reuses them (requests, as
    ReuseByListingFn's); the others go on (UNMATCHED) to be decoded and scored."""

    UNMATCHED = "unmatched"

    def __init__(self):
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._by_content = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused_by_content")

    def process(self, element):
        _, grouped = element
        known = chosen(grouped["known"])
        for read in grouped["read"]:
            if not known:
                yield beam.pvalue.TaggedOutput(self.UNMATCHED, read)
                continue
            self._reused.inc()
            self._by_content.inc()
            entry = read["entry"]
            for ref in known:
                yield ref, entry.uri, entry.fingerprint
