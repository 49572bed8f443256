"""A person's answers in score (`--corrections FILE`, e.g. `--corrections PREV_RUN/corrections.parquet`): the pages
a person answered on the review page are decided by that answer.

The answers are read with ReadFromParquet and joined to the decided rows by (sha256, page) (CoGroupByKey: no side
input holds the whole table). A page with an answer gets decision `corrected`, `corrected_orientation` = the person's
orientation (results' convention; -1: no up / not an image), and keeps the model's own answer in its orientation
columns (so the report still measures the model); `--write-corrected` then writes it upright by the person's turn,
and never turns a no_up / not_image page. The latest answer per page stands (pipelines.corrections.latest).

Which answers a run takes is checked at launch, before anything is scored: a table that is not a corrections table,
or holds answers a reader cannot act on, is refused (exit 2), and so is one none of whose answers is of a file in this
run's input (under its folder or prefix, in its manifest, matching its glob): another archive's corrections. Some
answers outside the input (a run over part of the archive) are said and counted (`outside_input`); they match no
page unless the same content is also inside. An answer of a file in the input that no page of this run matches by
content (the file was changed or removed since it was answered, or failed this time) is counted as `unmatched` and
named in run.json; the run goes on. With --skip-known, a page answered in an earlier run is known (its `corrected`
row is reused, unread), and the join applies to reused rows too: a reused page answered since is decided by the
answer (its upright copy is written only when it has none by that answer).
"""
from __future__ import annotations

import fnmatch
import os
from typing import Dict, List, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines import corrections as answers
from pipelines import sources
from pipelines.score.options import COUNTER_NAMESPACE, LOG

CORRECTED = "corrected"  # the decision of a page a person answered (not a model decision: serving.policy.DECISIONS)
NAMED = 20  # unmatched answers named in run.json
MODEL_SAID = "the model's decision was "


def _key(row) -> Tuple[str, int]:
    return row["sha256"], int(row["page"])


def _in_input(uri: str, src: str, listed) -> bool:
    """Whether `uri` is a file this run's input lists (or would list: prefixes and globs by their pattern)."""
    if listed is not None:  # a manifest: its own rows
        return uri in listed
    if sources.is_remote(src):
        if any(ch in src for ch in "*?["):
            return fnmatch.fnmatch(uri, src)
        return uri.startswith(src.rstrip("/") + "/")
    if any(ch in src for ch in "*?["):
        return fnmatch.fnmatch(uri, os.path.abspath(src))
    root = os.path.abspath(src)
    return uri == root or os.path.abspath(uri).startswith(root.rstrip(os.sep) + os.sep)


def launch_check(path: str, src: str) -> Tuple[Dict, Dict[str, object]]:
    """(the answers this run takes, by (sha256, page); run.json's `corrections` record so far), read and checked at
    launch. Raises pipelines.corrections.CorrectionsError for a table that cannot be used or is of another archive."""
    standing = answers.load(path)
    listed = None
    if sources.is_manifest(src):
        listed = {entry.uri for entry in sources.list_archive(src) if not entry.error}
    inside = {key: c for key, c in standing.items() if _in_input(c["uri"], src, listed)}
    outside = [c for key, c in standing.items() if key not in inside]
    if standing and not inside:
        named = ", ".join(c["uri"] for c in outside[:3])
        raise answers.CorrectionsError(
            f"none of the {len(standing)} answers in {path} is of a file in this run's input {src} (another "
            f"archive's corrections?): {named}")
    if outside:
        LOG.warning("%d of %d answers in %s are of files outside %s (a run over part of the archive): not applied",
                    len(outside), len(standing), path, src)
    record = {"file": path, "answers": len(standing), "outside_input": len(outside), "taken": len(inside)}
    return inside, record


def _apply(element) -> List[dict]:
    """One (sha256, page) group of the join -> its rows, decided by the person's latest answer where there is one
    (an answer no row matched is counted; run.json names it, from the results, after the run)."""
    _, grouped = element
    rows, found = list(grouped["rows"]), list(grouped["answers"])
    if not found:
        return rows
    if not rows:
        Metrics.counter(COUNTER_NAMESPACE, "corrections_without_page").inc()
        return []
    correction = answers.latest(found)[_key(found[0])]
    Metrics.counter(COUNTER_NAMESPACE, "corrections_applied").inc(len(rows))
    return [corrected_row(row, correction) for row in rows]


def corrected_row(row: dict, correction: dict) -> dict:
    """The row decided by a person's answer: decision `corrected`, corrected_orientation the person's, the model's
    answer kept in its own columns and its decision in review_reason."""
    orientation = int(correction["orientation"])
    if row["decision"] == CORRECTED:  # a row reused from an earlier run that took answers (--skip-known)
        if row.get("corrected_orientation") == orientation:
            return row
        said = (row.get("review_reason") or "").partition(MODEL_SAID)[2].rstrip(")") or "unknown"
        row = dict(row, corrected_uri="", corrected_method="")  # its copy stood by the earlier answer
    else:
        said = row["decision"] + (f": {row['review_reason']}" if row.get("review_reason") else "")
    who = f" by {correction['reviewer']}" if correction.get("reviewer") else ""
    return dict(row, decision=CORRECTED, corrected_orientation=orientation,
                review_reason=f"a person answered {correction['label']}{who} ({MODEL_SAID}{said})")


class ApplyCorrections(beam.PTransform):
    """Decided rows -> the same rows, those a person answered decided by the answer: the keyed join of the rows with
    the answers in `path` (read with ReadFromParquet) by (sha256, page)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, rows):
        keyed_rows = rows | "KeyRows" >> beam.Map(lambda row: (_key(row), row))
        keyed_answers = (rows.pipeline
                         | "ReadAnswers" >> beam.io.ReadFromParquet(self._path)
                         | "KeyAnswers" >> beam.Map(lambda answer: (_key(answer), answer)))
        return ({"rows": keyed_rows, "answers": keyed_answers}
                | "JoinAnswers" >> beam.CoGroupByKey()
                | "Decide" >> beam.FlatMap(_apply))


def unmatched_record(record: Dict[str, object], taken: Dict, results: List[dict]) -> Dict[str, object]:
    """run.json's `corrections` record completed from the results written: answers applied (pages decided by a
    person), and the answers of files in the input that no page of this run matched, a few named."""
    keys = {_key(r) for r in results}
    unmatched = [c for key, c in taken.items() if key not in keys]
    return dict(record, pages_corrected=sum(1 for r in results if r["decision"] == CORRECTED),
                unmatched=len(unmatched),
                unmatched_named=[f"{c['uri']} (page {c['page']})" for c in unmatched[:NAMED]])
