"""A person's answers to the review queue: `RUN_DIR/corrections.parquet`, the table the review page writes and
`score` (--write-corrected, --skip-known) and `train --corrections` read.

One row per answer; the latest answer (by `answered_at`) for a (sha256, page) stands. `orientation` is in the
results' own convention (pipelines.schema.ORIENTATIONS: the clockwise turn of the stored page relative to upright,
so `make_upright(page, orientation)` stands it up), -1 where the person said the page has no up or is not an image.
`label` is the person's answer as given (ANSWERS), relative to the model's turn (`model_orientation`), which is what
the review page showed.
"""
from __future__ import annotations

import io
from typing import Dict, Iterable, Mapping, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.schema import ORIENTATIONS, UNKNOWN

CORRECTIONS_FILE = "corrections.parquet"

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
