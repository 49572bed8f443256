"""A person's answers to the review queue: `RUN_DIR/corrections.parquet`, the table the review page writes and
`score` (--write-corrected, --skip-known) and `train --corrections` read.

One row per answer; the latest answer (by `answered_at`) for a (sha256, page) stands. `orientation` is in the
results' own convention (pipelines.schema.ORIENTATIONS: the clockwise turn of the stored page relative to upright,
so `make_upright(page, orientation)` stands it up), -1 where the person said the page has no up or is not an image.
`label` is the person's answer as given (ANSWERS), relative to the model's turn (`model_orientation`), which is what
the review page showed.

The review page writes through `CorrectionsJournal`: every answer is first one small JSON object of its own in
`RUN_DIR/corrections.journal/` (written whole or not at all: fsync'd temp file + rename locally, one object on gs://),
so a killed server or a closed tab loses nothing and two writers never overwrite each other; an undo is one more
object that retracts answers by id. `corrections.parquet` is the merged view (every answer not retracted, oldest
first), rewritten atomically after each answer and rebuilt from the journal whenever a writer opens it.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines import sources
from pipelines.schema import ORIENTATIONS, UNKNOWN

CORRECTIONS_FILE = "corrections.parquet"
JOURNAL_DIR = "corrections.journal"  # one JSON object per answer or undo: the record the table is rebuilt from

CORRECTIONS_SCHEMA = pa.schema([
    ("uri", pa.string()), ("sha256", pa.string()), ("page", pa.int64()),
    ("orientation", pa.int64()), ("label", pa.string()), ("model_orientation", pa.int64()),
    ("model_name", pa.string()), ("model_version", pa.int64()),
    ("reviewer", pa.string()), ("answered_at", pa.timestamp("us", tz="UTC")),
])

# The person's answer, as the clockwise turn that stands the shown image (the page turned back by the model's
# answer) upright; None: no orientation (no up, or not an image at all).
ANSWERS: Dict[str, object] = {
    "accept": 0, "turn_right": 90, "turn_180": 180, "turn_left": 270, "no_up": None, "not_image": None,
}

Key = Tuple[str, int]


class CorrectionsError(ValueError):
    """A corrections table that cannot be used as asked (wrong columns, another run's files, unknown answers)."""


def corrected_orientation(model_orientation: int, answer: str) -> int:
    """The page's orientation (results' convention) given the model's answer and the person's.

    The page was shown turned back by `model_orientation`; if that view still needs a clockwise turn of t to
    stand up, the stored page is turned (model_orientation - t) clockwise from upright."""
    if answer not in ANSWERS:
        raise CorrectionsError(f"unknown answer {answer!r} (one of {', '.join(ANSWERS)})")
    turn = ANSWERS[answer]
    if turn is None:
        return UNKNOWN
    if model_orientation not in ORIENTATIONS:
        if answer == "accept":
            raise CorrectionsError("'accept' needs the model's orientation, and the model gave none")
        model_orientation = 0  # no model turn: the page was shown as stored
    return (model_orientation - turn) % 360


def read_corrections(path: str) -> pa.Table:
    """The corrections table at `path` (local or gs://), checked for the columns the readers need."""
    if not FileSystems.exists(path):
        raise CorrectionsError(f"no corrections table at {path}")
    with FileSystems.open(path) as handle:
        data = handle.read()
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        raise CorrectionsError(f"{path} is not a Parquet table: {type(e).__name__}: {e}") from e
    missing = [name for name in ("uri", "sha256", "page", "orientation", "label", "answered_at")
               if name not in table.column_names]
    if missing:
        raise CorrectionsError(f"{path} is not a corrections table: no {', '.join(missing)} column "
                               f"(columns: {', '.join(table.column_names)})")
    return table


def latest(rows: Iterable[Mapping]) -> Dict[Key, dict]:
    """(sha256, page) -> the latest answer (by answered_at; a later row wins a tie)."""
    out: Dict[Key, dict] = {}
    for row in rows:
        key = (row["sha256"], int(row["page"]))
        held = out.get(key)
        if held is None or row["answered_at"] >= held["answered_at"]:
            out[key] = dict(row)
    return out


def check_known(corrections: Dict[Key, dict], known: Iterable[Key], source: str, against: str) -> None:
    """Refuse corrections of pages that `against` (a run's results) does not hold: a file from another run, or
    of files since removed, is said, with a few of the strangers named."""
    known = set(known)
    strangers = [c for key, c in corrections.items() if key not in known]
    if strangers:
        named = ", ".join(f"{c['uri']} (page {c['page']})" for c in strangers[:3])
        raise CorrectionsError(f"{len(strangers)} of {len(corrections)} corrections in {source} are of pages "
                               f"{against} does not hold (another run's corrections?): {named}")


# ---------------------------------------------------------------- writing: the journal and the merged table


def correction_row(result: Mapping, answer: str, reviewer: str) -> dict:
    """A corrections row (answered_at still to be stamped) for a person's `answer` to a results row."""
    model_orientation = result.get("orientation_degrees")
    model_orientation = UNKNOWN if model_orientation is None else int(model_orientation)
    return {"uri": result["uri"], "sha256": result["sha256"], "page": int(result["page"]),
            "orientation": corrected_orientation(model_orientation, answer), "label": answer,
            "model_orientation": model_orientation, "model_name": result.get("model_name") or "",
            "model_version": result.get("model_version"), "reviewer": reviewer, "answered_at": None}


def write_atomically(path: str, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held: locally a temp file beside it, fsync'd, renamed over it and
    the folder fsync'd (so a crash or power cut after returning loses nothing); on gs:// one object upload, which
    appears complete or not at all."""
    if sources.is_remote(path):
        with FileSystems.create(path, compression_type="uncompressed") as handle:
            handle.write(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S%fZ")


def _same_answer(row: Mapping) -> tuple:
    """What identifies one answer when a table's rows are matched to the journal's entries (the schema has no id)."""
    return (row["sha256"], int(row["page"]), row["label"], row.get("reviewer") or "", row["answered_at"])


class CorrectionsJournal:
    """The review page's writer: answers and undos as journal objects, and corrections.parquet as their merge.

    Safe for several threads of one process and for several processes (or machines, on gs://) on one RUN_DIR: each
    writes only objects of its own names, and `refresh` reads what the others wrote. The table is last-writer-wins
    between processes, so each writer rewrites it after reading the others' new answers (ReviewSession polls);
    the journal is the record, and opening it rebuilds the table."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.folder = FileSystems.join(run_dir, JOURNAL_DIR)
        self.table_path = FileSystems.join(run_dir, CORRECTIONS_FILE)
        self._lock = threading.RLock()
        self._seen: set = set()  # journal object names read or written
        self._answers: Dict[str, dict] = {}  # entry id -> answer entry
        self._retracted: set = set()
        self._last: Optional[datetime.datetime] = None
        self.version = 0  # bumps whenever the standing answers may have changed

    # -- reading

    def _names(self) -> List[str]:
        if not sources.is_remote(self.folder):
            if not os.path.isdir(self.folder):
                return []
            return sorted(n for n in os.listdir(self.folder) if n.endswith(".json") and not n.startswith("."))
        found = FileSystems.match([FileSystems.join(self.folder, "*.json")])[0].metadata_list
        return sorted(m.path.rsplit("/", 1)[-1] for m in found)

    def _read(self, name: str) -> dict:
        path = FileSystems.join(self.folder, name)
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
        try:
            entry = json.loads(data)
            entry["answered_at"] = datetime.datetime.fromisoformat(entry["answered_at"])
        except (ValueError, KeyError, TypeError) as e:
            raise CorrectionsError(f"{path} is not a corrections journal entry: {type(e).__name__}: {e}") from e
        return entry

    def _apply(self, entry: dict) -> None:
        if entry.get("kind") == "undo":
            self._retracted.update(entry.get("retracts") or ())
        else:
            self._answers[entry["id"]] = entry
        self.version += 1

    def refresh(self) -> List[dict]:
        """Read the journal objects not yet seen (other writers' answers and undos); returns them, oldest first."""
        new = [name for name in self._names() if name not in self._seen]
        if not new:
            return []
        if not sources.is_remote(self.folder) or len(new) < 4:
            entries = [self._read(name) for name in new]
        else:  # one GET per object: many at once when a writer opens a long journal on gs://
            with ThreadPoolExecutor(16) as pool:
                entries = list(pool.map(self._read, new))
        with self._lock:
            for name, entry in zip(new, entries):
                if name not in self._seen:
                    self._seen.add(name)
                    self._apply(entry)
        return entries

    def rows(self) -> List[dict]:
        """Every answer not retracted, as corrections rows, oldest first."""
        with self._lock:
            kept = [e for i, e in self._answers.items() if i not in self._retracted]
        kept.sort(key=lambda e: (e["answered_at"], e["id"]))
        return [{name: e.get(name) for name in CORRECTIONS_SCHEMA.names} for e in kept]

    def recent(self, reviewer: str, batches: int = 10) -> List[dict]:
        """`reviewer`'s latest answer entries that stand (the last `batches` batches), oldest first, as stored
        (with id and batch): what their page can still undo after a reload."""
        with self._lock:
            mine = [e for i, e in self._answers.items() if e.get("reviewer") == reviewer and i not in self._retracted]
        mine.sort(key=lambda e: (e["answered_at"], e["id"]))
        keep, seen = [], set()
        for entry in reversed(mine):
            if entry.get("batch") not in seen:
                if len(seen) >= batches:
                    break
                seen.add(entry.get("batch"))
            keep.append(dict(entry))
        return keep[::-1]

    def standing(self) -> Dict[Key, dict]:
        """(sha256, page) -> the answer that stands."""
        return latest(self.rows())

    # -- writing

    def _now(self) -> datetime.datetime:
        # Strictly increasing within one writer, so 'the latest answer' is never a tie in one session.
        now = datetime.datetime.now(datetime.timezone.utc)
        if self._last is not None and now <= self._last:
            now = self._last + datetime.timedelta(microseconds=1)
        self._last = now
        return now

    def _write_entry(self, entry: dict) -> None:
        name = f"{_stamp(entry['answered_at'])}-{entry['id']}.json"
        data = json.dumps({**entry, "answered_at": entry["answered_at"].isoformat()}, sort_keys=True).encode()
        write_atomically(FileSystems.join(self.folder, name), data)
        self._seen.add(name)
        self._apply(entry)

    def record(self, rows: Sequence[Mapping], keep_time: bool = False) -> List[dict]:
        """Write each row (correction_row) as a journal object of its own, stamped now (or with its own answered_at
        when `keep_time`); returns the entries, each with its `id` and the `batch` id they share."""
        for row in rows:
            if row["label"] not in ANSWERS:
                raise CorrectionsError(f"unknown answer {row['label']!r} (one of {', '.join(ANSWERS)})")
        batch = uuid.uuid4().hex[:16]
        out = []
        with self._lock:
            for row in rows:
                entry = {name: row.get(name) for name in CORRECTIONS_SCHEMA.names}
                entry.update(kind="answer", id=uuid.uuid4().hex[:16], batch=batch)
                if not (keep_time and row.get("answered_at")):
                    entry["answered_at"] = self._now()
                self._write_entry(entry)
                out.append(entry)
        return out

    def retract(self, ids: Sequence[str], reviewer: str) -> dict:
        """Undo these answers (one journal object that names them); an id the journal does not hold is refused."""
        with self._lock:
            unknown = [i for i in ids if i not in self._answers]
            if unknown or not ids:
                raise CorrectionsError(f"no answer {', '.join(map(repr, unknown[:3]))} in {self.folder} to undo"
                                       if ids else "nothing to undo: no answer ids given")
            entry = {"kind": "undo", "id": uuid.uuid4().hex[:16], "retracts": list(ids), "reviewer": reviewer,
                     "answered_at": self._now()}
            self._write_entry(entry)
        return entry

    def write_table(self) -> int:
        """Rewrite corrections.parquet (atomically) as the merge of the journal; returns its rows."""
        with self._lock:
            rows = self.rows()
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=CORRECTIONS_SCHEMA), buffer)
            write_atomically(self.table_path, buffer.getvalue())
        return len(rows)

    def adopt_table(self) -> int:
        """Record the rows of an existing corrections.parquet that the journal holds no entry for (a table written
        by other means, or whose journal was removed), keeping their times; returns how many. A row of a retracted
        answer still in a table a crash left stale matches its entry and stays retracted."""
        if not FileSystems.exists(self.table_path):
            return 0
        table = read_corrections(self.table_path)
        with self._lock:
            held = {_same_answer(e) for e in self._answers.values()}
        strangers = [row for row in table.to_pylist() if _same_answer(row) not in held]
        if strangers:
            self.record(strangers, keep_time=True)
        return len(strangers)


def open_journal(run_dir: str, known: Optional[Iterable[Key]] = None, against: str = "") -> CorrectionsJournal:
    """The run's journal, read whole, with any answers only its corrections.parquet held adopted, and the table
    rewritten as their merge; `known` (the run's result keys) refuses another run's corrections (check_known)."""
    journal = CorrectionsJournal(run_dir)
    journal.refresh()
    if known is not None:
        known = set(known)
        check_known(journal.standing(), known, journal.folder, against or run_dir)
        if FileSystems.exists(journal.table_path):
            check_known(latest(read_corrections(journal.table_path).to_pylist()), known, journal.table_path,
                        against or run_dir)
    journal.adopt_table()
    journal.write_table()
    return journal


def check_answers(corrections: Dict[Key, dict], source: str) -> None:
    """Refuse answers a reader cannot act on: an unknown label, an orientation that is no quarter turn, or a
    label and an orientation that disagree (no_up/not_image with a turn, a turn answer with -1)."""
    bad = []
    for correction in corrections.values():
        label, orientation = correction.get("label"), correction.get("orientation")
        if label not in ANSWERS:
            bad.append(f"{correction['uri']}: unknown answer {label!r}")
        elif orientation is None or int(orientation) not in ORIENTATIONS + (UNKNOWN,):
            bad.append(f"{correction['uri']}: orientation {orientation!r} is not 0/90/180/270 or -1")
        elif (ANSWERS[label] is None) != (int(orientation) == UNKNOWN):
            bad.append(f"{correction['uri']}: answer {label!r} with orientation {orientation}")
    if bad:
        raise CorrectionsError(f"{len(bad)} of {len(corrections)} answers in {source} cannot be used "
                               f"(answers: {', '.join(ANSWERS)}): {'; '.join(bad[:3])}")


def load(path: str) -> Dict[Key, dict]:
    """The standing answer per (sha256, page) of the corrections table at `path`, checked (read_corrections,
    latest, check_answers)."""
    table = read_corrections(path)
    corrections = latest(table.to_pylist())
    check_answers(corrections, path)
    return corrections


def turns_page(correction: Mapping) -> bool:
    """Whether the answer stands the page up by a turn (never for no_up / not_image, nor an upright page)."""
    return int(correction["orientation"]) in ORIENTATIONS[1:]
