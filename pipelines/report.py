"""`archive-vision report`: one self-contained HTML page about a score run, and pictures of what the backbone sees.

    archive-vision report DST [--truth manifest.csv|parquet]      -> DST/report.html

The page inlines every picture as base64 (no files beside it, nothing fetched): counts per decision and class,
contact sheets of auto_rotate images before/after, review images with their top guesses, a sample of ok
images, the errors, and, when a labelled manifest is given, confusion matrices (as pictures) and per-class
accuracy. Thumbnails are made from the original files; a file that is gone shows as a grey tile.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import math
import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pipelines.cli import command_parser, return_freed_memory
from pipelines.pictures import (THUMB_SIZE, _CSS, _jpeg_data_uri, _png_data_uri,  # noqa: F401
                                confusion_picture, load_page)

ORIENTATION_NAMES = ("0", "90", "180", "270")
DEFAULT_PER_SECTION = 48


# ---------------------------------------------------------------- tables


def read_run(output: str) -> Tuple[List[dict], List[dict], dict]:
    """(result rows, error rows, run.json) of a score output folder, every row (the truth figures need them; the
    page itself reads the tables a batch at a time: ResultsDigest, ErrorsDigest)."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, read_table

    results = read_table(FileSystems.join(output, "results.parquet"), RESULTS_SCHEMA)
    errors = read_table(FileSystems.join(output, "errors.parquet"), ERRORS_SCHEMA)
    return results.to_pylist(), errors.to_pylist(), _run_json(output)


def _run_json(output: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    run_path = FileSystems.join(output, "run.json")
    return json.loads(FileSystems.open(run_path).read()) if FileSystems.exists(run_path) else {}


def _as_table(rows, schema):
    """A pyarrow Table of `rows` (a Table already, or a list of row dicts)."""
    import pyarrow as pa

    return rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)


# Rows per batch when a report reads a table: what it holds of it at a time (a few tens of MB of results rows).
BATCH_ROWS = 65_536
ERRORS_SHOWN = 200
# The columns the report counts and ranks by; the other columns are read only for the rows it shows.
_COUNTED = ("decision", "class_name", "class_id", "orientation_confidence")


def _batches(source, schema, columns: Optional[Sequence[str]] = None):
    """The record batches of a table: `source` a Parquet path (local or gs://; absent: none) or a Table already in
    memory (or a list of row dicts). Only `columns` (those the file has) when given."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines.tables import parquet_batches

    if isinstance(source, str):
        if not FileSystems.exists(source):
            return
        with FileSystems.open(source) as handle:
            yield from parquet_batches(handle, BATCH_ROWS, columns, present_only=True)
        return
    table = _as_table(source, schema)
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    yield from table.to_batches(max_chunksize=BATCH_ROWS)


def _row_dicts(batch, schema) -> List[dict]:
    """A batch's rows as dicts with every column of `schema` (None for one a table written before it lacks)."""
    rows = batch.to_pylist()
    missing = [name for name in schema.names if name not in batch.schema.names]
    for row in rows:
        row.update(dict.fromkeys(missing))
    return rows


def _most_frequent_first(counts: Dict[str, int]) -> Dict[str, int]:
    """{value: rows}, empty values left out, most frequent first (ties in the order first seen)."""
    return dict(sorted(((k, v) for k, v in counts.items() if k), key=lambda item: -item[1]))


class _Ranked:
    """The first `n` rows of a decision by orientation_confidence (nulls as 0; ties in table order), chosen a batch
    at a time: only (confidence, row index) pairs are kept."""

    def __init__(self, decision: str, descending: bool, n: int):
        self.decision, self.descending, self.n = decision, descending, n
        self.keys = np.zeros(0, np.float64)
        self.index = np.zeros(0, np.int64)

    def add(self, decisions, confidence, offset: int) -> None:
        import pyarrow.compute as pc

        mask = pc.fill_null(pc.equal(decisions, self.decision), False).to_numpy(zero_copy_only=False)
        positions = np.flatnonzero(mask)
        if not len(positions) or not self.n:
            return
        keys = pc.fill_null(confidence, 0.0).to_numpy(zero_copy_only=False).astype(np.float64)[positions]
        keys = np.concatenate([self.keys, keys])
        index = np.concatenate([self.index, positions + offset])
        order = np.lexsort((index, -keys if self.descending else keys))[:self.n]
        self.keys, self.index = keys[order], index[order]


class ResultsDigest:
    """What the report shows of a results table, read a batch at a time, so a table of millions of rows is never
    held whole: the counts per decision and class, the class names the rows carry, and the rows of its sections
    (the surest auto_rotate rows, the least sure review rows, a seeded sample of ok rows)."""

    def __init__(self, source, per_section: int, seed: int = 0):
        from pipelines.tables import RESULTS_SCHEMA, add_value_counts

        self.rows = 0
        per_decision: Dict[str, int] = {}
        per_class: Dict[str, int] = {}
        self.class_pairs = set()
        auto, review = _Ranked("auto_rotate", True, per_section), _Ranked("review", False, per_section)
        for batch in _batches(source, RESULTS_SCHEMA, _COUNTED):
            columns = dict(zip(batch.schema.names, batch.columns))
            add_value_counts(per_decision, columns["decision"])
            add_value_counts(per_class, columns["class_name"])
            self._add_class_pairs(columns["class_id"], columns["class_name"])
            auto.add(columns["decision"], columns["orientation_confidence"], self.rows)
            review.add(columns["decision"], columns["orientation_confidence"], self.rows)
            self.rows += batch.num_rows
        self.per_decision, self.per_class = _most_frequent_first(per_decision), _most_frequent_first(per_class)
        self.auto_count, self.review_count, self.ok_count = (self.per_decision.get(decision, 0)
                                                             for decision in ("auto_rotate", "review", "ok"))
        # The positions random.sample would pick from the list of ok rows.
        picked = random.Random(seed).sample(range(self.ok_count), min(self.ok_count, per_section))
        wanted = {int(i): None for i in np.concatenate([auto.index, review.index])}
        ok_wanted = {position: None for position in picked}
        if wanted or ok_wanted:
            self._fetch(source, wanted, ok_wanted)
        self.auto_rows = [wanted[int(i)] for i in auto.index]
        self.review_rows = [wanted[int(i)] for i in review.index]
        self.ok_rows = sorted(ok_wanted.values(), key=lambda r: (r["uri"], r["page"]))

    def _add_class_pairs(self, ids, names) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pc.and_(pc.greater_equal(pc.fill_null(ids, -1), 0),
                       pc.invert(pc.equal(pc.fill_null(names, ""), "")))
        pairs = pa.table({"class_id": ids, "class_name": names}).filter(keep)
        if pairs.num_rows:
            self.class_pairs.update((r["class_id"], r["class_name"])
                                    for r in pairs.group_by(["class_id", "class_name"]).aggregate([]).to_pylist())

    def _fetch(self, source, wanted: Dict[int, Optional[dict]], ok_wanted: Dict[int, Optional[dict]]) -> None:
        """Fill `wanted` (row index -> row) and `ok_wanted` (position among the ok rows -> row): a second pass, all
        columns, a batch at a time."""
        import pyarrow as pa
        import pyarrow.compute as pc
        from pipelines.tables import RESULTS_SCHEMA

        offset = ok_seen = 0
        for batch in _batches(source, RESULTS_SCHEMA):
            is_ok = pc.fill_null(pc.equal(batch.column("decision"), "ok"), False)
            ok_positions = np.flatnonzero(is_ok.to_numpy(zero_copy_only=False))
            take = [i - offset for i in wanted if offset <= i < offset + batch.num_rows]
            take_ok = [(p, ok_positions[p - ok_seen]) for p in ok_wanted if ok_seen <= p < ok_seen + len(ok_positions)]
            if take or take_ok:
                indices = pa.array(take + [int(i) for _, i in take_ok], pa.int64())
                rows = _row_dicts(pa.Table.from_batches([batch]).take(indices), RESULTS_SCHEMA)
                for i, row in zip(take, rows):
                    wanted[i + offset] = row
                for (p, _), row in zip(take_ok, rows[len(take):]):
                    ok_wanted[p] = row
            offset += batch.num_rows
            ok_seen += len(ok_positions)

    def class_names(self, run: dict) -> List[str]:
        """The model's class names: a served model tells only the winning name, the rest are learnt from the rows."""
        names = list((run.get("model") or {}).get("class_names") or [])
        for cid, name in sorted(self.class_pairs):  # each has an id >= 0 and a name
            while len(names) <= cid:
                names.append(f"class_{len(names)}")
            if names[cid].startswith("class_"):
                names[cid] = name
        return names


class ErrorsDigest:
    """The errors table as the report shows it, read a batch at a time: the rows, the counts per error type, the
    first ERRORS_SHOWN rows."""

    def __init__(self, source):
        from pipelines.tables import ERRORS_SCHEMA, add_value_counts

        self.rows = 0
        per_error: Dict[str, int] = {}
        self.first: List[dict] = []
        for batch in _batches(source, ERRORS_SCHEMA):
            add_value_counts(per_error, batch.column("error_type"))
            if len(self.first) < ERRORS_SHOWN:
                self.first += _row_dicts(batch.slice(0, ERRORS_SHOWN - len(self.first)), ERRORS_SCHEMA)
            self.rows += batch.num_rows
        self.per_error = _most_frequent_first(per_error)


def read_truth(path: str) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """(uri, page) -> {"label": str or "", "orientation": int or -1} from a labelled manifest.

    Accepts the score/ingest column names: uri or source_uri, label or label_name, orientation, optional page;
    relative URIs are taken relative to the manifest's folder, as ingest does.
    """
    from pipelines import sources

    table = sources.read_manifest_table(path) if path.lower().endswith(".csv") else _read_parquet(path)
    cols = set(table.column_names)
    uri_col = "uri" if "uri" in cols else "source_uri"
    label_col = "label" if "label" in cols else ("label_name" if "label_name" in cols else None)
    if uri_col not in cols:
        raise ValueError(f"--truth {path} has no uri/source_uri column (columns: {sorted(cols)})")
    base = os.path.dirname(path) or "."
    truth: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for row in table.to_pylist():
        uri = str(row[uri_col] or "").strip()
        if not uri:
            continue
        if "://" not in uri and not os.path.isabs(uri):
            uri = os.path.normpath(os.path.join(base, uri))
        orientation = row.get("orientation")
        try:
            orientation = int(float(orientation)) if orientation not in (None, "") else -1
        except (TypeError, ValueError):
            orientation = -1
        label = str(row.get(label_col) or "").strip() if label_col else ""
        truth[(uri, int(row.get("page") or 0))] = {"label": label, "orientation": orientation}
    return truth


def _read_parquet(path: str):
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    return pq.read_table(io.BytesIO(FileSystems.open(path).read()))


SURE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # the confidences truth_summary tabulates


def lower_bound(right: int, n: int, z: float = 1.645) -> Optional[float]:
    """The accuracy that `right` of `n` shows with 95% confidence, one-sided (Wilson's score interval): 60 of 60
    right says "at least 95.6% right", not "100%". None for n = 0."""
    if n <= 0:
        return None
    p, z2 = right / n, z * z
    centre, spread = p + z2 / (2 * n), z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, float((centre - spread) / (1 + z2 / n)))


def truth_metrics(results: List[dict], truth: Dict[Tuple[str, int], Dict[str, Any]]) -> Dict[str, Any]:
    """Confusion matrices and per-class accuracy of the results that have a known truth."""
    out: Dict[str, Any] = {}
    oriented, pairs_c = [], []  # oriented: (truth, answer, decision, confidence, label) of each row with both turns
    matched, scored, with_truth = set(), 0, 0  # what matched what, so that a path mismatch is seen, not hidden
    for row in results:
        key = (row["uri"], row["page"])
        t = truth.get(key)
        if t is None and row["page"] == 0 and (row["uri"], 0) in truth:
            key, t = (row["uri"], 0), truth[(row["uri"], 0)]
        if t is not None:
            matched.add(key)
        if row["decision"] == "skipped":
            continue
        scored += 1
        if t is None:
            continue
        with_truth += 1
        if t["orientation"] in (0, 90, 180, 270) and row["orientation_degrees"] in (0, 90, 180, 270):
            oriented.append((t["orientation"], row["orientation_degrees"], row["decision"],
                             float(row.get("orientation_confidence") or 0.0), t["label"]))
        if t["label"] and row["class_name"]:
            pairs_c.append((t["label"], row["class_name"]))
    if oriented:
        truths, answers, decisions, confidence, labels = (np.array(column) for column in zip(*oriented))
        m = np.zeros((4, 4), int)
        np.add.at(m, (truths // 90, answers // 90), 1)
        right = truths == answers
        out["orientation"] = {"labels": list(ORIENTATION_NAMES), "matrix": m,
                              "by_decision": {str(d): (int(np.sum(decisions == d)), int(np.sum(right[decisions == d])))
                                              for d in sorted(set(decisions))},
                              "by_threshold": {answer: {t: (int(np.sum(chosen)), int(np.sum(right[chosen])))
                                                        for t in SURE_THRESHOLDS
                                                        for chosen in [(confidence >= t) & ((answers != 0) == turned)]}
                                               for answer, turned in (("turned", True), ("upright", False))},
                              "by_label": _by_label(labels, right)}
    if pairs_c:
        labels = sorted({a for a, _ in pairs_c} | {b for _, b in pairs_c})
        m = np.zeros((len(labels), len(labels)), int)
        for a, b in pairs_c:
            m[labels.index(a), labels.index(b)] += 1
        out["class"] = {"labels": labels, "matrix": m}
    out["coverage"] = {"results": scored, "with_truth": with_truth, "truth_rows": len(truth),
                       "truth_without_result": len(truth) - len(matched)}
    return out


NO_LABEL = "(no label)"  # by_label's group for the rows a partly labelled truth leaves without one


def _by_label(labels: np.ndarray, right: np.ndarray) -> Dict[str, Tuple[int, int]]:
    """label -> (images, right), worst first (by share right, then the larger group first): per label of the truth
    (a check set's source folder, a class), where the model is weak. {} when no row has a label; the unlabelled rows
    of a partly labelled truth are one more group, NO_LABEL, so that the groups add up to the whole."""
    if not np.any(labels != ""):
        return {}
    names, index = np.unique(np.where(labels == "", NO_LABEL, labels), return_inverse=True)
    images, hits = np.bincount(index, minlength=len(names)), np.bincount(index, weights=right, minlength=len(names))
    order = sorted(range(len(names)), key=lambda i: (hits[i] / images[i], -images[i], names[i]))
    return {str(names[i]): (int(images[i]), int(hits[i])) for i in order}


def _floor(x: float, digits: int) -> float:
    """x cut down to `digits` decimals: a lower bound is never shown higher than it is (0.994995 -> 0.9949)."""
    return math.floor(x * 10 ** digits + 1e-9) / 10 ** digits


def _counted(n: int, right: int) -> Dict[str, Any]:
    """run.json's entry for `right` of `n`: the counts, the share right and what they show (None for n = 0)."""
    return {"images": n, "right": right, "accuracy": round(right / n, 4) if n else None,
            "at_least": _floor(lower_bound(right, n), 4) if n else None}


def truth_summary(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """truth_metrics as run.json records it: per task images, right, accuracy; for orientation also per decision
    (auto_rotate: turned by score and how many of those turns are right; ok: left as they are; review; with
    `at_least`, the accuracy those counts show with 95% confidence, lower_bound), per label
    of the truth manifest (a check set's source folders: which part of an archive it is weak on), and per
    confidence threshold, for the images answered as turned and those answered as upright apart, the share of all
    images with that answer at or above it and how many of those are right: what --rotate-threshold and
    --ok-threshold would give on this archive (confidence alone; score's other review reasons aside)."""
    summary: Dict[str, Any] = {}
    if "coverage" in metrics:  # results with no truth row, truth rows with no result (a failed input, another path)
        summary["coverage"] = dict(metrics["coverage"])
    for key in ("orientation", "class"):
        if key in metrics:
            m = metrics[key]["matrix"]
            summary[key] = {"images": int(m.sum()), "right": int(np.trace(m)),
                            "accuracy": round(float(np.trace(m) / max(1, m.sum())), 4)}
    if "orientation" in metrics:
        for key in ("by_decision", "by_label"):
            summary["orientation"][key] = {name: _counted(n, right)
                                           for name, (n, right) in metrics["orientation"][key].items()}
        images = summary["orientation"]["images"]
        summary["orientation"]["by_threshold"] = {
            answer: {f"{t:g}": {"images": n, "share": round(n / max(1, images), 4), **_counted(n, right)}
                     for t, (n, right) in table.items()}
            for answer, table in metrics["orientation"]["by_threshold"].items()}
    return summary


def truth_summary_line(summary: Dict[str, Any]) -> str:
    """The run's truth figures in one line ('' when nothing matched the truth)."""
    parts = []
    if "orientation" in summary:
        o = summary["orientation"]
        decisions = ", ".join(  # the bands that act say what their counts show with 95% confidence
            f"{k} {v['right']}/{v['images']}" + (f" (>={_floor(100 * v['at_least'], 1):.1f}%)" if k != "review" else "")
            for k, v in o["by_decision"].items())
        parts.append(f"orientation {100 * o['accuracy']:.1f}% right of {o['images']} ({decisions})")
    if "class" in summary:
        c = summary["class"]
        parts.append(f"class {100 * c['accuracy']:.1f}% right of {c['images']}")
    coverage = summary.get("coverage") or {}
    if parts and coverage.get("results", 0) > coverage.get("with_truth", 0):
        parts.append(f"{coverage['results'] - coverage['with_truth']} of {coverage['results']} results have no truth "
                     f"row")
    if parts and coverage.get("truth_without_result"):
        parts.append(f"{coverage['truth_without_result']} of {coverage['truth_rows']} truth rows match no result "
                     f"(failed inputs, or other paths)")
    return "; ".join(parts)


def truth_label_lines(summary: Dict[str, Any], most: int = 12) -> List[str]:
    """Orientation accuracy per label of the truth, in by_label's order (worst first), one line each with what its
    counts show with 95% confidence ([] for fewer than two labels: the summary line says it all); past `most`
    labels, one line says how many more run.json holds."""
    by_label = list((summary.get("orientation", {}).get("by_label") or {}).items())
    if len(by_label) < 2:
        return []
    width = min(30, max(len(label) for label, _ in by_label[:most]))
    lines = [f"{label:{width}s} {v['right']:5d} of {v['images']:5d} turns right ({100 * v['accuracy']:.1f}%, "
             f">={_floor(100 * v['at_least'], 1):.1f}%)" for label, v in by_label[:most]]
    if len(by_label) > most:
        more = len(by_label) - most
        lines.append(f"... {more} more label{'s' if more > 1 else ''} in run.json (truth.orientation.by_label)")
    return lines


# ---------------------------------------------------------------- the page


def img_tag(image: Optional[Image.Image], alt: str) -> str:
    """An inlined JPEG of the picture, or a grey tile when there is none."""
    if image is None:
        return f'<div class="missing" title="{html.escape(alt)}">unavailable</div>'
    return f'<img src="{_jpeg_data_uri(image)}" alt="{html.escape(alt)}">'


def before_after(before: Optional[Image.Image], after: Optional[Image.Image]) -> str:
    """A contact-sheet tile's pictures: as stored, and turned upright."""
    return f'<div class="imgs">{img_tag(before, "before")}<span>→</span>{img_tag(after, "after")}</div>'


def html_page(title: str, body: str) -> str:
    """A self-contained page in the report's style (pictures inlined, nothing fetched)."""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _short(uri: str) -> str:
    return uri if len(uri) <= 60 else "…" + uri[-58:]


def _top_guesses(probabilities, names: Sequence[str], k: int = 3) -> str:
    if probabilities is None:
        return ""
    probs = np.asarray(probabilities, np.float64)
    order = np.argsort(-probs)[:k]
    return ", ".join(f"{names[i] if i < len(names) else f'class_{i}'} {probs[i]:.2f}" for i in order)


def _count_table(title: str, counts: Dict[str, int], css_pills: bool = False) -> str:
    def label(key: str) -> str:
        key = html.escape(key)
        return f'<span class="pill {key}">{key}</span>' if css_pills else key

    rows = "".join(f"<tr><td>{label(k)}</td><td class=n>{v}</td></tr>"
                   for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f'<table class="counts"><tr><th>{html.escape(title)}</th><th>count</th></tr>{rows}</table>'


def build_report_html(results: List[dict], errors: List[dict], run: dict, *, title: str,
                      metrics: Optional[Dict[str, Any]] = None,
                      per_section: int = DEFAULT_PER_SECTION, seed: int = 0) -> str:
    """The whole page as one string (thumbnails read from the original files); `results` and `errors`: pyarrow
    Tables (or lists of rows), read column-wise, so only the rows shown become Python rows; `metrics`: truth_metrics
    of these results against a truth manifest, for its section (none for an empty manifest)."""
    digest, failures = ResultsDigest(results, per_section, seed), ErrorsDigest(errors)
    names = digest.class_names(run)
    per_decision, per_class, per_error = digest.per_decision, digest.per_class, failures.per_error
    counts = run.get("counts", {})
    model = run.get("model", {})
    parts: List[str] = []
    meta = [f"model <b>{html.escape(str(model.get('name', '?')))}</b> version {model.get('version', '?')} "
            f"({html.escape(str(model.get('mode', '?')))})"]
    if counts:
        meta.append(f"{counts.get('inputs', '?')} inputs: {counts.get('inputs_ok', '?')} scored or reused, "
                    f"{counts.get('inputs_failed', '?')} failed, {counts.get('inputs_reused', 0)} reused; "
                    f"{'counts reconcile' if counts.get('reconciled') else 'COUNTS DO NOT RECONCILE'}")
    policy = run.get("policy") or {}
    if policy:
        used = policy.get("decision_used") or {}
        meta.append(f"decision policy: {html.escape(str(policy.get('from', '')))}'s; rotate at p >= "
                    f"{used.get('rotate_threshold')}, ok at p >= {used.get('ok_threshold')}")
    tta = run.get("tta") or {}
    if tta.get("enabled"):
        meta.append(f"test-time turns: {tta_summary(tta)}")
    crops = run.get("text_crops") or {}
    if crops.get("enabled"):
        meta.append(f"text crops: {text_crops_summary(crops)}")
    timings = run.get("timings") or {}
    if timings:
        meta.append(f"{timings.get('elapsed_seconds')} s, {timings.get('pages_per_second')} pages/s")
    parts.append("<p class=meta>" + "<br>".join(meta) + "</p>")

    total = max(1, digest.rows)
    colours = {"auto_rotate": "#c05621", "review": "#b7791f", "ok": "#2f855a", "skipped": "#718096",
               "corrected": "#2b6cb0"}
    bars = "".join(f'<div style="width:{100 * v / total:.2f}%;background:{colours.get(k, "#555")}" '
                   f'title="{html.escape(k)} {v}"></div>' for k, v in sorted(per_decision.items()))
    parts.append(f'<h2 id="summary">Summary</h2><div class="bars">{bars}</div><div style="display:flex;gap:24px;'
                 f'flex-wrap:wrap">{_count_table("decision", per_decision, True)}'
                 f'{_count_table("class", per_class) if per_class else ""}'
                 f'{_count_table("error", per_error) if per_error else ""}</div>')

    def figure(row: dict, body: str, extra: str, css: str = "thumb") -> str:
        caption = (f"<span class='pill {row['decision']}'>{row['decision']}</span> "
                   f"{html.escape(_short(row['uri']))}{' p' + str(row['page']) if row['page'] else ''}<br>{extra}")
        return f'<figure class="{css}" data-uri="{html.escape(row["uri"])}">{body}<figcaption>{caption}</figcaption></figure>'

    def describe(row: dict) -> str:
        bits = []
        if row["orientation_degrees"] is not None and row["orientation_degrees"] >= 0:
            bits.append(f"turned {row['orientation_degrees']}° ({row['orientation_confidence']:.2f})")
        if row["class_name"]:
            bits.append(f"{html.escape(row['class_name'])} ({row['class_confidence']:.2f})")
        if row.get("reused"):
            bits.append("reused")
        return ", ".join(bits)

    sheet = []
    for row in digest.auto_rows:
        from pipelines.imaging import make_upright

        before = load_page(row["uri"], row["page"])
        after = make_upright(before, row["orientation_degrees"]) if before is not None else None
        body = before_after(before, after)
        extra = describe(row) + (f"<br>copy: {html.escape(_short(row['corrected_uri']))}"
                                 if row.get("corrected_uri") else "")
        sheet.append(figure(row, body, extra, "thumb pair"))
    parts.append(f'<h2 id="auto-rotate">Turned upright automatically ({digest.auto_count}'
                 f'{f", first {per_section} shown" if digest.auto_count > per_section else ""})</h2>'
                 f'<p class=meta>before (as stored) and after (turned upright)</p>'
                 f'<div class="sheet">{"".join(sheet) or "<p>none</p>"}</div>')

    sheet = []
    for row in digest.review_rows:
        guesses = []
        if row["orientation_probabilities"] is not None:
            guesses.append("turn: " + _top_guesses(row["orientation_probabilities"], [f"{d}°" for d in
                                                                                      ORIENTATION_NAMES]))
        if row["class_probabilities"] is not None:
            guesses.append("class: " + html.escape(_top_guesses(row["class_probabilities"], names)))
        reason = f"<br><i>{html.escape(row['review_reason'])}</i>" if row.get("review_reason") else ""
        sheet.append(figure(row, img_tag(load_page(row["uri"], row["page"]), "review"),
                            "<br>".join(guesses) + reason))
    parts.append(f'<h2 id="review">For a person to look at ({digest.review_count}'
                 f'{f", first {per_section} shown" if digest.review_count > per_section else ""})</h2>'
                 f'<div class="sheet">{"".join(sheet) or "<p>none</p>"}</div>')

    sample = digest.ok_rows
    sheet = [figure(row, img_tag(load_page(row["uri"], row["page"]), "ok"), describe(row)) for row in sample]
    parts.append(f'<h2 id="ok">Upright and sure: a sample ({len(sample)} of {digest.ok_count})</h2>'
                 f'<div class="sheet">{"".join(sheet) or "<p>none</p>"}</div>')

    if metrics and metrics["coverage"]["truth_rows"]:
        coverage = metrics["coverage"]
        section = ['<h2 id="truth">Against the known truth</h2>',
                   f'<p class="coverage">{coverage["with_truth"]} of {coverage["results"]} results have a truth row; '
                   f'{coverage["truth_without_result"]} of {coverage["truth_rows"]} truth rows match no result '
                   f'(failed inputs, or other paths)</p>']
        for key, heading in (("orientation", "orientation (degrees clockwise)"), ("class", "class")):
            if key not in metrics:
                continue
            m, labels = metrics[key]["matrix"], metrics[key]["labels"]
            accuracy = np.trace(m) / max(1, m.sum())
            rows = "".join(f"<tr><td>{html.escape(str(label))}</td><td class=n>{int(m[i].sum())}</td>"
                           f"<td class=n>{(m[i, i] / m[i].sum() if m[i].sum() else float('nan')):.2f}</td></tr>"
                           for i, label in enumerate(labels))
            picture = confusion_picture(m, labels, f"{heading}: accuracy {accuracy:.2f} on {int(m.sum())}")
            decided = ""
            if key == "orientation":
                def counted_rows(counts: Dict[str, Tuple[int, int]]) -> str:
                    return "".join(f"<tr><td>{html.escape(name)}</td><td class=n>{n}</td><td class=n>{right / n:.3f}"
                                   f"</td><td class=n>{_floor(lower_bound(right, n), 3):.3f}</td></tr>"
                                   for name, (n, right) in counts.items())

                decided = (f'<table class="by-decision"><tr><th>decision</th><th>images</th><th>orientation right'
                           f'</th><th>at least (95% confidence)</th></tr>'
                           f'{counted_rows(metrics[key]["by_decision"])}</table>')
                n, tables = int(m.sum()), metrics[key]["by_threshold"]
                by_threshold = "".join(
                    f"<tr><td>{t:g}</td>" + "".join(
                        f"<td class=n>{tables[a][t][0] / max(1, n):.1%}</td><td class=n>"
                        + (f"{tables[a][t][1] / tables[a][t][0]:.3f} "
                           f"(&ge; {_floor(lower_bound(*tables[a][t][::-1]), 3):.3f})"
                           if tables[a][t][0] else "-") + "</td>"
                        for a in ("turned", "upright")) + "</tr>" for t in SURE_THRESHOLDS)
                decided += (f'<table class="by-threshold"><tr><th>if the threshold were</th><th>answered turned at '
                            f'or above it, share of all (--rotate-threshold)</th><th>right (&ge; at 95% confidence)'
                            f'</th><th>answered upright at or above it, share of all (--ok-threshold)</th><th>right '
                            f'(&ge; at 95% confidence)</th></tr>{by_threshold}</table>')
                by_label = metrics[key]["by_label"]  # worst first
                if len(by_label) > 1:
                    decided += ('<table class="by-label"><tr><th>label (worst first)</th><th>images</th>'
                                '<th>orientation right</th><th>at least (95% confidence)</th></tr>'
                                f'{counted_rows(by_label)}</table>')
            section.append(f'<div style="display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap">'
                           f'<img class="confusion" src="{_png_data_uri(picture)}" alt="{key} confusion matrix">'
                           f'<table><tr><th>{key} (truth)</th><th>images</th><th>accuracy</th></tr>{rows}'
                           f'</table>{decided}</div>')
        if len(section) == 2:
            section.append("<p>no result matched a labelled row of the truth manifest</p>")
        parts.append("".join(section))

    if failures.rows:
        # The whole uri: an error is acted on, and the person must find the file (contact sheets shorten theirs).
        rows = "".join(f"<tr><td>{html.escape(e['uri'])}</td><td>{e['page']}</td>"
                       f"<td>{html.escape(e['stage'])}</td><td>{html.escape(e['error_type'])}</td>"
                       f"<td>{html.escape(e['message'][:200])}</td></tr>" for e in failures.first)
        parts.append(f'<h2 id="errors">Errors ({failures.rows})</h2><table><tr><th>uri</th><th>page</th>'
                     f'<th>stage</th><th>type</th><th>message</th></tr>{rows}</table>')
    return html_page(title, "".join(parts))


def write_report(output: str, truth: Optional[str] = None, per_section: int = DEFAULT_PER_SECTION,
                 metrics: Optional[Dict[str, Any]] = None,
                 tables: Optional[Tuple[List[dict], List[dict], dict]] = None) -> str:
    """Write OUTPUT/report.html from the score tables; returns its path. `metrics`: truth_metrics against the
    manifest at `truth` already computed; `tables`: read_run(output) already done; so that a caller that has either
    does not read or compute it again."""
    from apache_beam.io.filesystems import FileSystems

    if metrics is None and truth:  # the truth figures need every row (a labelled check set, not a nightly run)
        tables = tables if tables is not None else read_run(output)
        results = tables[0]
        metrics = truth_metrics(results if isinstance(results, list) else results.to_pylist(), read_truth(truth))
    if tables is not None:
        results, errors, run = tables
    else:  # read a batch at a time (ResultsDigest, ErrorsDigest)
        results, errors = FileSystems.join(output, "results.parquet"), FileSystems.join(output, "errors.parquet")
        run = _run_json(output)
    page = build_report_html(results, errors, run, title=f"archive-vision report: {output}", metrics=metrics,
                             per_section=per_section)
    path = FileSystems.join(output, "report.html")
    with FileSystems.create(path) as handle:
        handle.write(page.encode("utf-8"))
    return path


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser(
        "archive-vision report",
        examples=("archive-vision report scores/2026-01-01",
                  "archive-vision report scores/2026-01-01 --truth labelled.csv   # the figures against a truth"),
        description="Write OUTPUT/report.html for a score run (one self-contained page), again, against another "
                    "truth manifest if asked. (What the backbone sees: archive-vision activations.)")
    parser.add_argument("output", help="the score --output folder (holds results.parquet)")
    parser.add_argument("--truth", help="labelled manifest (.csv/.parquet: uri + label and/or orientation) for "
                                        "confusion matrices and per-class accuracy")
    parser.add_argument("--per-section", type=int, default=DEFAULT_PER_SECTION, help="most thumbnails per sheet")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision report`."""
    args = _parse_args(argv)
    return_freed_memory()  # the tables are read a batch at a time; Arrow's freed buffers go back
    tables = read_run(args.output) if args.truth else None  # every row only for the truth figures
    metrics = truth_metrics(tables[0], read_truth(args.truth)) if args.truth else None
    path = write_report(args.output, truth=args.truth, per_section=args.per_section, metrics=metrics, tables=tables)
    print(f"report: {path}")
    if metrics is not None:  # the figures against this manifest, without scoring again (run.json keeps the run's)
        summary = truth_summary(metrics)
        print(f"truth:  {truth_summary_line(summary) or f'no result matched a labelled row of {args.truth}'}")
        for line in truth_label_lines(summary):
            print(f"        {line}")
    return 0


def tta_summary(tta: dict) -> str:
    """run.json's `tta` section in words (the run's summary line and report.html)."""
    if not (tta.get("images") or tta.get("single_copy")):  # no orientation output: only classes were averaged
        return "class probabilities averaged over four turns (no orientation output)"
    sure = f", {tta['single_copy']} sure on one copy (p >= {tta.get('below')})" if tta.get("single_copy") else ""
    if sure and tta.get("settle_first"):  # an image the crops read before the image model settled ran on no copy
        sure = (f", {tta['single_copy']} not turned (sure on one copy at p >= {tta.get('below')}, or settled by "
                f"their text crops at >= {tta['settle_first']})")
    return f"{tta.get('images')} pages in four turns{sure}; disagreement rate among them {tta.get('disagreement_rate')}"


def text_crops_summary(section: dict) -> str:
    """run.json's `text_crops` section in words (the run's summary line and report.html)."""
    unread = f", not used (the graph's gate) for {section['not_read']}" if section.get("not_read") else ""
    return (f"evidence counted for {section.get('counted', 0)} pages, read and not counted (the crops did not "
            f"agree) for {section.get('not_agreed', 0)}{unread}")


if __name__ == "__main__":
    sys.exit(main())
