"""What a score run says when it ends: results.csv, run.json's figures, and the lines a person reads."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from typing import Dict, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa  # noqa: F401 - the tables' type
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.cli import failed_inputs_check, failed_inputs_line
from pipelines.ingest import metric_totals
from pipelines.report import text_crops_summary, truth_label_lines, truth_summary_line, tta_summary
from pipelines.score.options import COUNTER_NAMESPACE, ModelInfo, ScoreOptions, run_policy
from pipelines.tables import RESULTS_SCHEMA, add_value_counts, parquet_batches
from serving import policy as policies


def _metric_totals(result) -> Dict[str, int]:
    """The score job's counters (pipelines.ingest.metric_totals in score's namespace)."""
    return metric_totals(result, COUNTER_NAMESPACE)


def write_results_csv(output: str) -> str:
    """results.csv beside results.parquet, probability lists flattened to `p0;p1;...` for spreadsheets; written a
    batch of rows at a time, so a table of millions of rows is never held whole."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    def flattened(table):
        columns = {}
        for name in table.column_names:
            column = table.column(name)
            if pa.types.is_list(column.type):
                column = pa.array([";".join(f"{p:.6f}" for p in v) if v is not None else None
                                   for v in column.to_pylist()], pa.string())
            columns[name] = column
        return pa.table(columns)

    source = FileSystems.join(output, "results.parquet")
    path = FileSystems.join(output, "results.csv")
    raw = CompressionTypes.UNCOMPRESSED
    with FileSystems.create(path, compression_type=raw) as handle:
        header = flattened(RESULTS_SCHEMA.empty_table())
        writer = pacsv.CSVWriter(handle, header.schema)
        if FileSystems.exists(source):
            with FileSystems.open(source, compression_type=raw) as parquet:
                for batch in parquet_batches(parquet, 4096):
                    writer.write_table(flattened(pa.Table.from_batches([batch])).cast(header.schema))
        writer.close()
    return path



# The results columns run.json counts (summarize reads only these).
SUMMARY_COLUMNS = ("uri", "decision", "class_name", "reused", "tta_agreement", "text_crops", "corrected_method",
                   "orientation_probabilities")


def _uri_hashes(column) -> np.ndarray:
    """64-bit hashes of a string column's distinct values (nulls left out)."""
    return np.fromiter((hash(uri) for uri in pc.unique(column.drop_null()).to_pylist()), np.int64)


def _table_batches(output: str, name: str, columns):
    """`columns` of a job table (local or gs://), a Table per batch; none when the file is absent."""
    path = FileSystems.join(output, name)
    if not FileSystems.exists(path):
        return
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for batch in parquet_batches(handle, 65_536, list(columns)):
            yield pa.Table.from_batches([batch])


# Distinct uris are counted in parts of about this many rows each: a table of more rows has its uri hashes split
# by value into parts spilled to a temporary folder and counted one part at a time, so run.json's counts need the
# same memory for ten million rows as for one million (8 bytes a row held, against about 60 before).
ROWS_PER_PART = 1 << 20


def _table_rows(output: str, name: str) -> int:
    """A job table's rows, from its Parquet footer (0 when the file is absent)."""
    path = FileSystems.join(output, name)
    if not FileSystems.exists(path):
        return 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


class _HashParts:
    """64-bit uri hashes, split by value into `count` parts: equal uris land in the same part, so each part's
    distinct values can be counted (and compared with another table's same part) on their own. One part is kept in
    memory; more are appended to files under `folder` as they come."""

    def __init__(self, count: int, folder: str, name: str):
        self.count = count
        self._held = []
        self._paths = [os.path.join(folder, f"{name}-{i}.bin") for i in range(count)] if count > 1 else []
        for path in self._paths:
            open(path, "wb").close()

    def add(self, hashes: np.ndarray) -> None:
        if not self._paths:
            self._held.append(hashes)
            return
        part = hashes % self.count
        order = np.argsort(part, kind="stable")
        sizes = np.bincount(part, minlength=self.count)
        for path, chunk in zip(self._paths, np.split(hashes[order], np.cumsum(sizes)[:-1])):
            if len(chunk):
                with open(path, "ab") as f:
                    chunk.tofile(f)

    def distinct(self):
        """Each part's distinct hashes, one array at a time."""
        if not self._paths:
            yield np.unique(np.concatenate(self._held)) if self._held else np.zeros(0, np.int64)
            return
        for path in self._paths:
            hashes = np.fromfile(path, np.int64)
            os.remove(path)
            yield np.unique(hashes)


class _ResultsCounts:
    """What run.json counts of results.parquet, a batch at a time: rows, distinct uris (as 64-bit hashes: two of ten
    million colliding is about a 1 in 400,000 chance; in _HashParts), counts per decision and class, and the scored
    rows' test-time-turn and text-crop figures."""

    def __init__(self, output: str, parts: int, folder: str):
        self.rows = self.scored = self.with_orientation = self.corrected_failed = 0
        self.tta_images = self.tta_disagreeing = self.text_crops_counted = self.text_crops_not_agreed = 0
        self.tta_sum = 0.0
        self.per_decision: Dict[str, int] = {}
        self.per_class: Dict[str, int] = {}
        self.uris, self.reused_uris = _HashParts(parts, folder, "uris"), _HashParts(parts, folder, "reused")
        for table in _table_batches(output, "results.parquet", SUMMARY_COLUMNS):
            self.rows += table.num_rows
            self.uris.add(_uri_hashes(table["uri"]))
            add_value_counts(self.per_decision, table["decision"])
            add_value_counts(self.per_class, table["class_name"])
            reused = pc.fill_null(table["reused"], False)
            self.reused_uris.add(_uri_hashes(table.filter(reused)["uri"]))
            scored = table.filter(pc.invert(reused))
            self.scored += scored.num_rows
            self.with_orientation += scored.num_rows - scored["orientation_probabilities"].null_count
            tta = np.asarray(scored["tta_agreement"].drop_null().to_numpy(), dtype=np.float64)
            self.tta_images += len(tta)
            self.tta_disagreeing += int((tta < 1.0).sum())
            self.tta_sum += float(tta.sum())
            self.text_crops_counted += _true(pc.equal(scored["text_crops"], 1))
            self.text_crops_not_agreed += _true(pc.equal(scored["text_crops"], 0))
            self.corrected_failed += _true(pc.starts_with(pc.fill_null(table["corrected_method"], ""), "failed"))


class _ErrorCounts:
    """What run.json counts of errors.parquet, a batch at a time: rows, distinct uris (hashes), counts per kind."""

    def __init__(self, output: str, parts: int, folder: str):
        self.rows = 0
        self.per_kind: Dict[str, int] = {}
        self.uris = _HashParts(parts, folder, "errors")
        for table in _table_batches(output, "errors.parquet", ("uri", "error_type")):
            self.rows += table.num_rows
            self.uris.add(_uri_hashes(table["uri"]))
            add_value_counts(self.per_kind, table["error_type"])


def _input_counts(results: _ResultsCounts, errors: _ErrorCounts) -> Dict[str, int]:
    """Distinct inputs with a result, reused, failed (errors and no result), and with a result and some failed page,
    counted part by part."""
    counts = {"ok": 0, "reused": 0, "failed": 0, "some_failed": 0}
    for ok, reused, failed in zip(results.uris.distinct(), results.reused_uris.distinct(), errors.uris.distinct()):
        of_ok = int(np.isin(failed, ok).sum())
        counts["ok"] += len(ok)
        counts["reused"] += len(reused)
        counts["failed"] += len(failed) - of_ok
        counts["some_failed"] += of_ok
    return counts


def count_tables(output: str) -> Tuple[_ResultsCounts, _ErrorCounts, Dict[str, int]]:
    """results.parquet's and errors.parquet's counts, and the distinct inputs (_input_counts), with the uri hashes in
    parts of about ROWS_PER_PART rows (spilled to a temporary folder when there are several)."""
    rows = max(_table_rows(output, "results.parquet"), _table_rows(output, "errors.parquet"))
    parts = max(1, -(-rows // ROWS_PER_PART))
    spill = tempfile.TemporaryDirectory(prefix="archive-vision-counts-") if parts > 1 else contextlib.nullcontext("")
    with spill as folder:  # one part is held in memory: no folder
        results = _ResultsCounts(output, parts, folder)
        errors = _ErrorCounts(output, parts, folder)
        return results, errors, _input_counts(results, errors)


def _true(mask) -> int:
    """How many of a boolean column are true (nulls are not)."""
    return int(pc.sum(pc.fill_null(mask, False).cast("int64")).as_py() or 0)


def text_crops_section(crops, results: _ResultsCounts) -> Dict[str, object]:
    """run.json's `text_crops`: for the pages the graph answered, how many had their crops' evidence counted, read and
    not counted, and not used (sure on the stored copy: at or above the policy's `read_below`; with settle_first
    their first crops were read and left out)."""
    if crops is None:
        return {"enabled": False, "counted": 0, "not_agreed": 0, "not_read": 0}
    return {"enabled": True, "counted": results.text_crops_counted, "not_agreed": results.text_crops_not_agreed,
            "not_read": results.with_orientation - results.text_crops_counted - results.text_crops_not_agreed,
            "read_below": crops.read_below}


def summarize(opts: ScoreOptions, model: ModelInfo, elapsed: float, metrics: Dict[str, int],
              corrected_tool: str, runner: Optional[Dict[str, object]] = None) -> dict:
    """run.json: options, model and its policy, counts per decision/class/error kind, what the graph's readers did,
    timings, reconciliation."""
    import platform

    # Counted a batch at a time from the columns run.json needs (a results table of millions of rows is never held
    # in the launcher, not even as columns): files are told apart by 64-bit hashes of their uris, split into parts
    # of about ROWS_PER_PART rows (spilled to a temporary folder when there are several).
    results, errors, inputs_of = count_tables(opts.output)
    failed_count = inputs_of["failed"]
    per_decision, per_kind = results.per_decision, errors.per_kind
    per_class = {k: v for k, v in results.per_class.items() if k}
    inputs = metrics.get("inputs", inputs_of["ok"] + failed_count)
    counts = {
        "inputs": inputs, "inputs_ok": inputs_of["ok"], "inputs_failed": failed_count,
        "inputs_reused": inputs_of["reused"],
        "results": results.rows, "pages_scored": results.scored,
        "pages_reused": results.rows - results.scored,
        "pages_sent_as_file": metrics.get("pages_sent_as_file", 0),
        "errors": errors.rows, "errors_per_type": per_kind, "per_decision": per_decision,
        "per_class": per_class,
        # --skip-known (Beam counters): the earlier rows this model version may reuse, and the inputs that reused
        # them unread (same uri and listing fingerprint) or once read (same sha256); the failed inputs whose earlier
        # error rows stand, unread (a corrupt, truncated, empty or unknown file, unchanged since); and the earlier
        # rows that crossed each join (those of files that may be listed now, and of contents that may be among
        # the files read: pipelines.score.known.KeyFilter).
        "known_rows": metrics.get("known_rows", 0),
        "known_rows_by_listing": metrics.get("known_rows_by_listing", 0),
        "known_rows_by_content": metrics.get("known_rows_by_content", 0),
        "inputs_reused_by_listing": metrics.get("inputs_reused_by_listing", 0),
        "inputs_reused_by_content": metrics.get("inputs_reused_by_content", 0),
        "inputs_failed_before": metrics.get("inputs_failed_before", 0),
        # What score read of the archive: files opened and their bytes (to score them, and again for upright copies).
        "files_read": metrics.get("files_read", 0), "bytes_read": metrics.get("bytes_read", 0),
        # Workers that loaded the SavedModel in process (on their first image: a re-run that reuses every row loads
        # it nowhere).
        "models_loaded": metrics.get("models_loaded", 0),
        # Copies written this run (Beam counter): a reused row's copy was written by the run that made it, unless a
        # person answered the page since.
        "corrected_written": metrics.get("corrected_written", 0),
        "corrected_failed": results.corrected_failed,
        "inputs_with_some_failed_page": inputs_of["some_failed"],
    }
    counts["reconciled"] = counts["inputs"] == counts["inputs_ok"] + counts["inputs_failed"]
    predict_s = metrics.get("predict_ms", 0) / 1000.0
    tta_images = results.tta_images
    return {
        "job": "score", "options": dataclasses.asdict(opts), "runner": runner or {},
        "model": {"name": model.name, "version": model.version, "class_names": list(model.class_names),
                  "source": model.endpoint or model.version_dir, "mode": "grpc" if model.endpoint else "in_process"},
        "policy": {"from": model.policy_from or "none recorded (generic defaults)",
                   **policies.policy_as_dict(model.policy),
                   "decision_used": dataclasses.asdict(run_policy(model, opts))},
        "counts": counts,
        "failed_inputs": failed_inputs_check(counts, opts.max_failed_fraction),
        # What the graph did for the pages it answered (its tta_agreement and text_crops outputs).
        "tta": {"enabled": model.policy.answer.tta, "images": tta_images, "below": model.policy.answer.tta_below,
                "single_copy": results.with_orientation - tta_images if model.policy.answer.tta else 0,
                # A model with a class head never settles an image without it (serving.answer).
                "settle_first": (model.policy.answer.text_crops.settle_first
                                 if model.policy.answer.text_crops is not None and not model.class_names else 0.0),
                "disagreement_rate": round(results.tta_disagreeing / tta_images, 4) if tta_images else None,
                "mean_agreement": round(results.tta_sum / tta_images, 4) if tta_images else None},
        "text_crops": text_crops_section(model.policy.answer.text_crops, results),
        "timings": {"elapsed_seconds": round(elapsed, 3),
                    "pages_per_second": round(results.scored / elapsed, 2) if elapsed > 0 else None,
                    "predict_seconds_total": round(predict_s, 3) if predict_s else None,
                    "rpc_retries": metrics.get("rpc_retries", 0)},
        "corrected": {"dir": opts.write_corrected, "jpeg_tool": corrected_tool},
        "versions": {"apache_beam": beam.__version__, "python": platform.python_version()},
    }


def format_summary(summary: dict) -> str:
    """The few lines a person reads after the run."""
    c = summary["counts"]
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(c["per_decision"].items())) or "none"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["errors_per_type"].items())) or "none"
    m = summary["model"]
    lines = [
        f"score finished in {summary['timings']['elapsed_seconds']:.1f}s "
        f"({summary['timings']['pages_per_second']} pages/s) with {m['name']} v{m['version']} ({m['mode']})",
        f"  inputs   {c['inputs']}  (ok {c['inputs_ok']}, failed {c['inputs_failed']}, reused {c['inputs_reused']}"
        + (f", failed before and unchanged {c['inputs_failed_before']}" if c.get("inputs_failed_before") else "")
        + f")  {'reconciled' if c['reconciled'] else 'NOT RECONCILED'}",
        f"  results  {c['results']}  ({decisions})",
        f"  errors   {c['errors']}  ({kinds})",
    ]
    if summary["tta"]["enabled"]:
        lines.append(f"  tta      {tta_summary(summary['tta'])}")
    if summary.get("text_crops", {}).get("enabled"):
        lines.append(f"  crops    {text_crops_summary(summary['text_crops'])}")
    if summary.get("truth"):
        truth = summary["truth"]
        line = (f"FAILED: {truth['error']}" if truth.get("error") else
                truth_summary_line(truth) or f"no result matched a labelled row of {truth['manifest']}")
        lines.append(f"  truth    {line}")
        lines.extend(f"           {label_line}" for label_line in truth_label_lines(truth))
    if summary.get("corrections"):
        answered = summary["corrections"]
        lines.append(f"  answers  {answered['pages_corrected']} pages decided by a person's answer "
                     f"({answered['file']}: {answered['answers']} answers, {answered['unmatched']} matched no page "
                     f"of this run, {answered['outside_input']} of files outside its input)")
    if summary["corrected"]["dir"]:
        lines.append(f"  corrected {c['corrected_written']} upright copies in {summary['corrected']['dir']} "
                     f"(JPEG: {summary['corrected']['jpeg_tool']})")
    out = summary["options"]["output"]
    lines.append(f"  output   {out}  (results.parquet, results.csv, errors.parquet, run.json"
                 f"{', report.html' if summary.get('report') else ''})")
    if summary.get("report_error"):
        lines.append(f"  report   FAILED: {summary['report_error']}")
    if failed_inputs_line(summary):
        lines.append(failed_inputs_line(summary))
    return "\n".join(lines)
