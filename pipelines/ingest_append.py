"""`ingest --append`: add an archive's new and changed files to an existing set of shards, deciding what the set
already holds from the listing before a byte is read, by keyed joins inside the pipeline.

    listed files --uri--> JoinByUri <-- the set's current manifest rows (what decides, and where each row is) and its
                                        error rows
        same fingerprint, label, split and orientation: its rows stay as they are; the file is never opened
        not listed now: its rows stay (an append never drops what it was not shown), unless it moved (below)
        otherwise (a new uri, another fingerprint, or none) -> read and hashed, carrying its earlier rows:
            the same content and labels (a touched file): its rows stay, with the new fingerprint
            else: its rows are marked superseded, and the file is decoded into new records, in its earlier split
    new content --sha256--> JoinMoved <-- the rows of the files not listed now
        an earlier uri holding that content that no longer exists (a moved file): its rows are marked superseded
    every span of the manifest's row groups --(first group)--> RewriteManifest <-- the changes the joins decided
        the span read once more, whole, its rows changed where decided: the new manifest's rows

The joins carry the few columns that decide (ReadDeciding), not whole rows: what crosses them is a change to a row
(a new fingerprint, or superseded), named by its row group and row, and only for the rows that change. An unchanged
archive's append so shuffles no manifest row at all after the join by uri. The manifest is read a span of row groups
at a time (pipelines.tables.span_rows), and a manifest rewritten by another job while this one runs stops it
(TableChanged).

The content sha256 stays the records' identity (their split is a hash of it); the listing fingerprint only decides
what need not be read. Content already in the set at a uri that still exists (a copy) becomes records of its own, as
a fresh ingest would make them, in the same split. New records go into shards named with the run's tag
(pipelines.shards.shard_name) beside the earlier ones, which are never rewritten; the manifest and errors tables are
rewritten whole, each a temporary file renamed into place. Superseded rows stay in the manifest, since their records
stay in their shards: the trainer skips them (trainer.input). What the launcher reads of the set is small (run.json,
labels.json, the manifest's footer: prepare_append); the workers read the rows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import imaging, schema, sources
from pipelines.progress import ShowProgress
from pipelines.tables import (ERRORS_SCHEMA, MANIFEST_SCHEMA, ListedFile, TableChanged,
                              check_unchanged, error_row, failure_stands, listed_files, parquet_batches,
                              row_group_spans, span_of, span_rows)

LOG = logging.getLogger("archive_vision.ingest")
COUNTER_NAMESPACE = "ingest"  # the ingest job's counters (pipelines.ingest)
# In the manifest's Parquet footer: the tag of the run that wrote it ("" for a first run), which tells an append
# whether a run that did not finish got as far as replacing the manifest (prepare_append).
SHARD_TAG_KEY = b"archive_vision.shard_tag"
TAGGED_SHARD = re.compile(rf"^(?:{'|'.join(schema.SPLITS)})-a(\d+)-\d+-of-\d+\.tfrecord(?:\.gz)?$")
# The options a record is made with: an appended set keeps its first run's, so its records stay alike.
RECORD_OPTIONS = ("size", "resize_mode", "image_format", "quality", "labels", "classes", "assume_upright",
                  "split_fractions", "augment_copies", "max_shift", "text_archive", "no_flip_classes", "compression")
FLAG_NAMES = {"image_format": "--format"}
ADDED_COLUMNS = {"fingerprint": "", "superseded": False}  # manifests written before them read with these values


class AppendError(ValueError):
    """--append cannot extend this output as asked (exit 2): no finished run in it, shards no run recorded, or a
    flag that would make records unlike the set's."""


class NewClassesError(ValueError):
    """The files to append bring classes the set's labels.json does not know (exit 2): the class order is the set's."""


@dataclasses.dataclass(frozen=True)
class EarlierRun:
    """What an append knows of the set it extends, read from small files only (launcher side)."""

    output: str
    tag: str  # the tag this run's shards get: one above every tag the folder has seen
    classes: Tuple[str, ...]  # labels.json's, in its order
    pinned: bool  # the set's classes were pinned (--classes): other labels are error rows, not new classes
    options: Dict[str, object]  # the record options the set was made with (RECORD_OPTIONS)
    manifest_columns: Tuple[str, ...]
    errors_columns: Tuple[str, ...]  # of its errors.parquet (none: there is none; no fingerprint: written before it)
    manifest_file: ListedFile  # as listed at launch: the joins name its rows by position

    @property
    def manifest(self) -> str:
        return FileSystems.join(self.output, "manifest.parquet")

    @property
    def errors(self) -> str:
        return FileSystems.join(self.output, "errors.parquet")


def _tag_number(name: str) -> int:
    match = TAGGED_SHARD.match(name) or re.match(r"^a(\d+)$", name)
    return int(match.group(1)) if match else 0


def _footer(path: str) -> Tuple[List[str], str]:
    """(column names, the shard tag of the run that wrote it) of a Parquet table, from its footer alone."""
    import pyarrow.parquet as pq

    with FileSystems.open(path) as handle:
        arrow_schema = pq.ParquetFile(handle).schema_arrow
    return list(arrow_schema.names), ((arrow_schema.metadata or {}).get(SHARD_TAG_KEY) or b"").decode()


def _errors_columns(output: str) -> Tuple[str, ...]:
    path = FileSystems.join(output, "errors.parquet")
    if not FileSystems.exists(path):
        return ()
    columns = set(_footer(path)[0])
    return tuple(c for c in ERRORS_SCHEMA.names if c in columns)


def _read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode())


def prepare_append(output: str, present: Dict[str, int]) -> Optional[EarlierRun]:
    """The finished run `output` holds, checked before anything is written; None when it holds no run at all (an
    append into an empty folder is a first ingest). `present`: {shard file: bytes} now in `output`.

    Shards that no finished run recorded (run.json's shard_bytes) come from an append that did not finish: removed
    when they carry a later tag and the manifest is still the last finished run's (so nothing names them), refused
    (AppendError) otherwise, as are recorded shards that are gone or changed."""
    run_path = FileSystems.join(output, "run.json")
    if not FileSystems.exists(run_path):
        if present:
            raise AppendError(f"{output} holds {len(present)} shards but no run.json, so no finished ingest run to "
                              f"append to (one that did not finish?); rebuild it with --overwrite")
        return None
    run = _read_json(run_path)
    recorded = run["shard_bytes"] if "shard_bytes" in run else dict(present)  # a run.json from before the record
    run_tag = run.get("shard_tag") or ""
    manifest = FileSystems.join(output, "manifest.parquet")
    if not FileSystems.exists(manifest):
        raise AppendError(f"{output} holds a run.json but no manifest.parquet to append to; rebuild it with "
                          f"--overwrite")
    columns, manifest_tag = _footer(manifest)
    altered = sorted(name for name, size in recorded.items() if present.get(name) != size)
    if altered:
        raise AppendError(f"{output}: shards its run.json recorded are gone or changed since ({', '.join(altered[:5])}"
                          f"{' ...' if len(altered) > 5 else ''}): an incomplete copy? rebuild it with --overwrite")
    strays = sorted(name for name in present if name not in recorded)
    if strays:
        unfinished = all(_tag_number(name) > _tag_number(run_tag) for name in strays)
        if not unfinished or manifest_tag != run_tag:
            raise AppendError(f"{output} holds shards its run.json does not record ({', '.join(strays[:5])}"
                              f"{' ...' if len(strays) > 5 else ''}), from a run that did not finish"
                              f"{' after replacing manifest.parquet' if manifest_tag != run_tag else ''}; "
                              f"rebuild it with --overwrite")
        LOG.warning("removing %d shards of an append that did not finish (no table names them): %s", len(strays),
                    ", ".join(strays[:5]))
        FileSystems.delete([FileSystems.join(output, name) for name in strays])
    missing = [name for name in MANIFEST_SCHEMA.names if name not in columns and name not in ADDED_COLUMNS]
    if missing:
        raise AppendError(f"{output}/manifest.parquet lacks the columns {missing}: not an ingest manifest")
    labels_path = FileSystems.join(output, "labels.json")
    classes = tuple(_read_json(labels_path)["classes"]) if FileSystems.exists(labels_path) else ()
    options = {name: value for name, value in (run.get("options") or {}).items() if name in RECORD_OPTIONS}
    tag_number = max([_tag_number(name) for name in present] + [_tag_number(run_tag)]) + 1
    return EarlierRun(output=output, tag=f"a{tag_number:04d}", classes=classes, pinned=bool(options.get("classes")),
                      options=options, manifest_columns=tuple(c for c in MANIFEST_SCHEMA.names if c in columns),
                      errors_columns=_errors_columns(output), manifest_file=listed_files(manifest)[0])


def _comparable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def inherited_options(requested: Dict[str, object], defaults: Dict[str, object], earlier: EarlierRun
                      ) -> Dict[str, object]:
    """The record options an append runs with: the set's. A flag asking for another value than the set's (anything
    but its default, or --classes in another order than labels.json) is refused: the records would differ."""
    conflicts, chosen = [], {}
    for name, was in earlier.options.items():
        was, asked = _comparable(was), _comparable(requested[name])
        same = asked == was or (name == "classes" and asked == earlier.classes)
        if not same and asked != _comparable(defaults[name]):
            flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            shown, set_value = (",".join(map(str, v)) if isinstance(v, tuple) else str(v)
                                for v in (asked, earlier.classes if name == "classes" else was))
            conflicts.append(f"{flag} {shown} (the set's: {set_value or 'none'})")
        chosen[name] = was
    if conflicts:
        raise AppendError(f"{earlier.output} was ingested with other options than asked: {'; '.join(conflicts)}; an "
                          f"append makes its records as the set's were made (leave those flags out), or --overwrite "
                          f"rebuilds it")
    return chosen


def checked_classes(labels: List[str], classes: Sequence[str], pinned: bool) -> List[str]:
    """The set's classes, in its order, for the labels the listing found; new ones fail the run (NewClassesError)
    unless the set pinned its classes, whose other labels are error rows (`unknown_label`), as in its first run."""
    new = sorted(set(labels) - set(classes))
    if new and not pinned:
        raise NewClassesError(f"the files to append bring classes the set does not know: {', '.join(new)} (its "
                              f"classes, in order: {', '.join(classes) or 'none'}); a class can only be added by "
                              f"ingesting the whole archive again (--overwrite), or keep those files out (--exclude)")
    return list(classes)


def new_classes_message(error: BaseException) -> str:
    """The NewClassesError behind a failed run, '' when none: runners wrap a worker's exception (the multi-process
    DirectRunner re-raises it as a RuntimeError holding the worker's traceback text), so the chain and the text are
    searched."""
    seen = error
    while seen is not None:
        if isinstance(seen, NewClassesError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    match = re.search(rf"{NewClassesError.__name__}: (.+)", str(error))
    return match.group(1).strip() if match else ""


def entry_agrees(entry: sources.SourceEntry, rows: Sequence[dict], assume_upright: bool) -> bool:
    """Whether a file's earlier records carry what the listing says of it now: its label, and its split and
    orientation where the listing gives them (a manifest relabelled since makes new records)."""
    orientation = entry.orientation
    if orientation == schema.UNKNOWN and assume_upright:
        orientation = 0
    for row in rows:
        if row["label_name"] != entry.label or (entry.split and row["split"] != entry.split):
            return False
        if row["augment_index"] == 0 and row["orientation"] != orientation:  # copies may carry a mirrored turn
            return False
    return True


# The columns that decide what becomes of a manifest row (entry_agrees, the joins), as a tuple in this order, then
# where the row is in the manifest: (row group, row).
DECIDING = ("source_uri", "sha256", "fingerprint", "label_name", "split", "augment_index", "orientation")


def _filled(row: dict, names: Sequence[str]) -> dict:
    """A manifest row's `names` as this run writes them: a manifest written before a column was added reads with
    its ADDED_COLUMNS value, and no fingerprint is ""."""
    out = {name: row.get(name, ADDED_COLUMNS.get(name)) for name in names}
    out["fingerprint"] = out["fingerprint"] or ""
    return out


def _deciding(row: dict, at: Tuple[int, int]) -> tuple:
    return tuple(_filled(row, DECIDING).values()) + (at,)


def _decided(values: tuple) -> dict:
    """A deciding tuple as a dict of its columns, with `at` (row group, row)."""
    return dict(zip(DECIDING + ("at",), values))


def _manifest_spans(earlier: EarlierRun) -> List[Tuple[int, int]]:
    return row_group_spans(check_unchanged(earlier.manifest_file))


def _manifest_rows(earlier: EarlierRun, first: int, end: int, columns: Sequence[str]):
    """(row group, row, the row) of the manifest's row groups first..end-1 (pipelines.tables.span_rows)."""
    return span_rows(check_unchanged(earlier.manifest_file), first, end, columns)


class _DecidingRowsFn(beam.DoFn):
    """A span of manifest row groups (first, end) -> the deciding tuple of each of its current rows (those superseded
    before are untouched by this run: RewriteManifest copies them as they are)."""

    def __init__(self, earlier: EarlierRun):
        self._earlier = earlier
        self._rows = Metrics.counter(COUNTER_NAMESPACE, "known_rows")

    def process(self, span: Tuple[int, int]):
        columns = [c for c in DECIDING + ("superseded",) if c in self._earlier.manifest_columns]
        for group, position, row in _manifest_rows(self._earlier, *span, columns):
            self._rows.inc()
            if not row.get("superseded"):
                yield _deciding(row, (group, position))


def _change(row: dict, **change) -> Tuple[int, Tuple[int, int, dict]]:
    """A change the joins decided for one manifest row, keyed by its span: (span, (row group, row, {column: value}))."""
    group, position = row["at"]
    return span_of(group), (group, position, change)


class _RewriteSpanFn(beam.DoFn):
    """(span's first row group, {end, changes}) -> every row of those manifest row groups (every column; older
    manifests gain the columns added since), with the changes the joins decided applied."""

    def __init__(self, earlier: EarlierRun):
        self._earlier = earlier

    def process(self, element):
        first, grouped = element
        changes: Dict[Tuple[int, int], dict] = {}
        for group, position, change in grouped["changes"]:
            changes.setdefault((group, position), {}).update(change)
        applied = 0
        for end in grouped["end"]:
            for group, position, row in _manifest_rows(self._earlier, first, end, self._earlier.manifest_columns):
                out = _filled(row, MANIFEST_SCHEMA.names)
                change = changes.get((group, position))
                if change:
                    out.update(change)
                    applied += 1
                yield out
        if applied != len(changes):
            raise TableChanged(f"{self._earlier.manifest}: {len(changes) - applied} of the rows this append changes "
                               f"are not there now")


class ReuseByListingFn(beam.DoFn):
    """uri -> {listed, rows (deciding tuples), errors}: a file listed with its rows' fingerprint and labels keeps them
    unread (nothing changes), and so does a file whose earlier failure stands (a defect of its unchanged bytes: its
    error rows, ERRORS); the others are read (TO_READ, with their rows and error rows); the rows of files not listed
    go to the moved check (main: (sha256, deciding tuple)), and their error rows stay (ERRORS)."""

    TO_READ, ERRORS = "to_read", "errors"

    def __init__(self, assume_upright: bool):
        self._assume_upright = assume_upright
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._by_listing = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused_by_listing")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, "failed_inputs")
        self._failed_before = Metrics.counter(COUNTER_NAMESPACE, "inputs_failed_before")

    def process(self, element):
        _, grouped = element
        listed = [sources.SourceEntry.from_fields(fields) for fields in grouped["listed"]]
        rows, errors = [_decided(values) for values in grouped["rows"]], list(grouped["errors"])
        if not listed:
            for row, values in zip(rows, grouped["rows"]):
                yield row["sha256"], values
            for row in errors:
                yield beam.pvalue.TaggedOutput(self.ERRORS, row)
            return
        entry = listed[0]  # a listing names a uri once (a manifest's repeated uri is an error row of its own name)
        if rows and not entry.error and entry.fingerprint and \
                all(row["fingerprint"] == entry.fingerprint for row in rows) and \
                entry_agrees(entry, rows, self._assume_upright):
            self._inputs.inc()  # the reading step counts the others
            self._reused.inc()
            self._by_listing.inc()
            for row in errors:
                yield beam.pvalue.TaggedOutput(self.ERRORS, row)
            return
        if not rows and errors and not entry.error and all(failure_stands(row, entry.fingerprint) for row in errors):
            self._inputs.inc()
            self._failed.inc()
            self._failed_before.inc()
            for row in errors:
                yield beam.pvalue.TaggedOutput(self.ERRORS, row)
            return
        yield beam.pvalue.TaggedOutput(self.TO_READ, {"entry": entry, "rows": rows, "errors": errors})


class ReadAgainstEarlierFn(beam.DoFn):
    """A listed file the listing could not match -> its bytes, compared with its earlier rows by content. The same
    content and labels: the rows stay with the new fingerprint (main: the changes, _change), and so do its earlier
    error rows. Otherwise the rows are marked superseded (main) and the file goes on to be decoded (FRESH: {entry,
    data, sha256}, the entry carrying its earlier split), its content to the moved check (NEW_CONTENT). A listing or
    read failure is an error row (ERRORS); the file's rows then stay, as nothing is known of its content now."""

    FRESH, NEW_CONTENT, ERRORS = "fresh", "new_content", "errors"

    def __init__(self, assume_upright: bool, max_file_mb: float):
        self._assume_upright = assume_upright
        self._max_file_mb = max_file_mb
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, "failed_inputs")
        self._files = Metrics.counter(COUNTER_NAMESPACE, "files_read")
        self._bytes = Metrics.counter(COUNTER_NAMESPACE, "bytes_read")
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._by_content = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused_by_content")
        self._changed = Metrics.counter(COUNTER_NAMESPACE, "inputs_changed")
        self._superseded = Metrics.counter(COUNTER_NAMESPACE, "records_superseded")

    def _failure(self, uri: str, stage: str, kind: str, message: str):
        self._failed.inc()
        Metrics.counter(COUNTER_NAMESPACE, "errors").inc()
        Metrics.counter(COUNTER_NAMESPACE, f"errors_{kind}").inc()
        return beam.pvalue.TaggedOutput(self.ERRORS, error_row(uri, stage, kind, message))

    def process(self, element: dict):
        entry, rows, errors = element["entry"], element["rows"], element["errors"]
        self._inputs.inc()
        if entry.error:
            yield self._failure(entry.uri, "list", entry.error_type, entry.error)
            return
        try:
            data = sources.read_input(entry, self._max_file_mb)
        except imaging.ImageError as e:
            yield self._failure(entry.uri, "read", e.kind, str(e))
            return
        self._files.inc()
        self._bytes.inc(len(data))
        sha = imaging.content_sha256(data)
        if rows and all(row["sha256"] == sha for row in rows) and entry_agrees(entry, rows, self._assume_upright):
            self._reused.inc()
            self._by_content.inc()
            yield from (_change(row, fingerprint=entry.fingerprint) for row in rows)
            for row in errors:
                yield beam.pvalue.TaggedOutput(self.ERRORS, row)
            return
        if rows:
            self._changed.inc()
            self._superseded.inc(len(rows))
        yield from (_change(row, superseded=True) for row in rows)
        split = entry.split or (rows[0]["split"] if rows else "")  # a file keeps its split when its content changes
        yield beam.pvalue.TaggedOutput(self.FRESH, {"entry": dataclasses.replace(entry, split=split), "data": data,
                                                    "sha256": sha})
        yield beam.pvalue.TaggedOutput(self.NEW_CONTENT, (sha, entry.uri))


class SupersedeMovedFn(beam.DoFn):
    """sha256 -> {unlisted, fresh}: the rows of files not listed now whose content this run ingests at another uri
    are marked superseded (changes, _change) where their uri no longer exists (a moved file, trained once, at its
    new uri); a copy at a uri that still exists keeps its records. With `drop_removed` (--drop-removed), so are the
    rows of any file not listed whose uri no longer exists (deleted, taken down): the trainer stops reading them."""

    def __init__(self, drop_removed: bool = False):
        self._drop_removed = drop_removed
        self._moved = Metrics.counter(COUNTER_NAMESPACE, "inputs_moved")
        self._removed = Metrics.counter(COUNTER_NAMESPACE, "inputs_removed")
        self._superseded = Metrics.counter(COUNTER_NAMESPACE, "records_superseded")

    def process(self, element):
        _, grouped = element
        rows = [_decided(values) for values in grouped["unlisted"]]
        moved = bool(list(grouped["fresh"]))
        gone = set()
        if rows and (moved or self._drop_removed):
            gone = {uri for uri in {row["source_uri"] for row in rows} if not FileSystems.exists(uri)}
            (self._moved if moved else self._removed).inc(len(gone))
        for row in rows:
            if row["source_uri"] in gone:
                self._superseded.inc()
                yield _change(row, superseded=True)


class JoinEarlier(beam.PTransform):
    """Listed entries -> {fresh: files to decode ({entry, data, sha256}), rows: the set's manifest rows as this run
    leaves them, errors: the set's error rows this run keeps and its own listing and read failures}."""

    def __init__(self, earlier: EarlierRun, assume_upright: bool, max_file_mb: float, drop_removed: bool = False):
        super().__init__()
        self._drop_removed = drop_removed
        self._earlier = earlier
        self._assume_upright = assume_upright
        self._max_file_mb = max_file_mb

    def expand(self, entries) -> Dict[str, beam.PCollection]:
        earlier, pipeline = self._earlier, entries.pipeline
        spans = (pipeline
                 | "Manifest" >> beam.Create([earlier])
                 | "Spans" >> beam.FlatMap(_manifest_spans)
                 | "SpreadSpans" >> beam.Reshuffle())
        deciding = spans | "ReadDeciding" >> beam.ParDo(_DecidingRowsFn(earlier))
        if earlier.errors_columns:
            errors = pipeline | "ReadErrors" >> beam.io.ReadFromParquet(earlier.errors,
                                                                        columns=list(earlier.errors_columns))
        else:
            errors = pipeline | "NoErrors" >> beam.Create([])
        by_uri = ({"listed": entries | "ListedByUri" >> beam.Map(lambda entry: (entry.uri, entry.fields())),
                   "rows": deciding | "RowsByUri" >> beam.Map(lambda values: (values[0], values)),
                   "errors": errors | "ErrorsByUri" >> beam.Map(lambda row: (row["uri"], row))}
                  | "JoinByUri" >> beam.CoGroupByKey()
                  | "ReuseByListing" >> beam.ParDo(ReuseByListingFn(self._assume_upright)).with_outputs(
                      ReuseByListingFn.TO_READ, ReuseByListingFn.ERRORS, main="unlisted"))
        # The progress line counts the files read: those kept unread are not work.
        reader = ReadAgainstEarlierFn(self._assume_upright, self._max_file_mb)
        read = (by_uri[ReuseByListingFn.TO_READ]
                | "Progress" >> ShowProgress("ingest")
                | "ReadChanged" >> beam.ParDo(reader).with_outputs(
                    ReadAgainstEarlierFn.FRESH, ReadAgainstEarlierFn.NEW_CONTENT, ReadAgainstEarlierFn.ERRORS,
                    main="changes"))
        moved = ({"unlisted": by_uri.unlisted, "fresh": read[ReadAgainstEarlierFn.NEW_CONTENT]}
                 | "JoinMoved" >> beam.CoGroupByKey()
                 | "SupersedeMoved" >> beam.ParDo(SupersedeMovedFn(self._drop_removed)))
        # Every span of the manifest is read once more, whole, with the changes the joins decided: the
        # manifest's rows stream into its part files (a Flatten before the writer would make the DirectRunner hold
        # every row in its launcher), and only changes cross a shuffle.
        changes = (read.changes, moved) | "AllChanges" >> beam.Flatten()
        rows = ({"end": spans, "changes": changes}  # spans: (first, end), keyed by their first row group
                | "JoinChanges" >> beam.CoGroupByKey()
                | "RewriteManifest" >> beam.ParDo(_RewriteSpanFn(earlier)))
        kept_errors = (by_uri[ReuseByListingFn.ERRORS], read[ReadAgainstEarlierFn.ERRORS])
        return {"fresh": read[ReadAgainstEarlierFn.FRESH], "rows": (rows,), "errors": kept_errors}


def table_counts(output: str) -> dict:
    """The set's records (current ones, per split, augmented), superseded records and error rows as its tables hold
    them now, read a few columns a batch at a time (the launcher never holds a table)."""
    import pyarrow.compute as pc

    per_split: Dict[str, int] = {}
    per_kind: Dict[str, int] = {}
    counts = {"records": 0, "superseded_records": 0, "augmented_records": 0, "errors": 0}
    with FileSystems.open(FileSystems.join(output, "manifest.parquet")) as handle:
        for batch in parquet_batches(handle, 65_536, ["split", "augment_index", "superseded"]):
            gone = pc.fill_null(batch.column(2), False)
            current = batch.filter(pc.invert(gone))
            counts["superseded_records"] += batch.num_rows - current.num_rows
            counts["records"] += current.num_rows
            counts["augmented_records"] += pc.sum(pc.greater(current.column(1), 0)).as_py() or 0
            for item in pc.value_counts(current.column(0)).to_pylist():
                per_split[item["values"]] = per_split.get(item["values"], 0) + item["counts"]
    with FileSystems.open(FileSystems.join(output, "errors.parquet")) as handle:
        for batch in parquet_batches(handle, 65_536, ["error_type"]):
            counts["errors"] += batch.num_rows
            for item in pc.value_counts(batch.column(0)).to_pylist():
                per_kind[item["values"]] = per_kind.get(item["values"], 0) + item["counts"]
    return dict(counts, records_per_split=per_split, errors_per_type=per_kind)


def append_counts(metrics: Dict[str, int], tables: dict) -> dict:
    """run.json's counts for an append: this run's inputs from the counters (they reconcile when every listed file
    was kept unread, kept once read, ingested, or failed), the set's records and errors from its tables."""
    by_listing, by_content = metrics.get("inputs_reused_by_listing", 0), metrics.get("inputs_reused_by_content", 0)
    ingested, failed = metrics.get("inputs_ingested", 0), metrics.get("failed_inputs", 0)
    counts = {
        "inputs": metrics.get("inputs", 0), "inputs_ok": by_listing + by_content + ingested, "inputs_failed": failed,
        "inputs_reused": by_listing + by_content, "inputs_reused_by_listing": by_listing,
        "inputs_reused_by_content": by_content, "inputs_ingested": ingested,
        "inputs_changed": metrics.get("inputs_changed", 0), "inputs_moved": metrics.get("inputs_moved", 0),
        "inputs_removed": metrics.get("inputs_removed", 0),
        "inputs_failed_before": metrics.get("inputs_failed_before", 0),
        "known_rows": metrics.get("known_rows", 0), "files_read": metrics.get("files_read", 0),
        "bytes_read": metrics.get("bytes_read", 0), "records_added": metrics.get("records", 0),
        "records_superseded": metrics.get("records_superseded", 0), **tables,
    }
    counts["reconciled"] = counts["inputs"] == by_listing + by_content + ingested + failed
    return counts
