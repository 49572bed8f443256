"""What a score run says when it ends: results.csv, run.json's figures, and the lines a person reads."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.cli import failed_inputs_check, failed_inputs_line
from pipelines.ingest import metric_totals
from pipelines.report import text_crops_summary, truth_label_lines, truth_summary_line, tta_summary
from pipelines.score.options import COUNTER_NAMESPACE, ModelInfo, ScoreOptions, run_policy
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, read_table
from serving import policy as policies


def _metric_totals(result) -> Dict[str, int]:
    """The score job's counters (pipelines.ingest.metric_totals in score's namespace)."""
    return metric_totals(result, COUNTER_NAMESPACE)


def write_results_csv(output: str) -> str:
    """results.csv beside results.parquet, probability lists flattened to `p0;p1;...` for spreadsheets; written a
    batch of rows at a time, so a table of millions of rows is never held whole."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

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
                for batch in pq.ParquetFile(parquet).iter_batches(batch_size=4096):
                    writer.write_table(flattened(pa.Table.from_batches([batch])).cast(header.schema))
        writer.close()
    return path


def summarize(opts: ScoreOptions, model: ModelInfo, elapsed: float, metrics: Dict[str, int],
              corrected_tool: str, runner: Optional[Dict[str, object]] = None) -> dict:
    """run.json: options, model and its policy, counts per decision/class/error kind, what the graph's readers did,
    timings, reconciliation."""
    import platform

    results = read_table(FileSystems.join(opts.output, "results.parquet"), RESULTS_SCHEMA)
    errors = read_table(FileSystems.join(opts.output, "errors.parquet"), ERRORS_SCHEMA)
    rows = results.to_pylist()
    ok_uris = {r["uri"] for r in rows}
    error_uris = set(errors.column("uri").to_pylist())
    failed_uris = error_uris - ok_uris
    per_decision: Dict[str, int] = {}
    per_class: Dict[str, int] = {}
    for r in rows:
        per_decision[r["decision"]] = per_decision.get(r["decision"], 0) + 1
        if r["class_name"]:
            per_class[r["class_name"]] = per_class.get(r["class_name"], 0) + 1
    per_kind: Dict[str, int] = {}
    for kind in errors.column("error_type").to_pylist():
        per_kind[kind] = per_kind.get(kind, 0) + 1
    inputs = metrics.get("inputs", len(ok_uris) + len(failed_uris))
    scored = [r for r in rows if not r["reused"]]
    tta = [r["tta_agreement"] for r in scored if r["tta_agreement"] is not None]
    counts = {
        "inputs": inputs, "inputs_ok": len(ok_uris), "inputs_failed": len(failed_uris),
        "inputs_reused": len({r["uri"] for r in rows if r["reused"]}),
        "results": len(rows), "pages_scored": len(scored), "pages_reused": len(rows) - len(scored),
        "pages_sent_as_file": metrics.get("pages_sent_as_file", 0),
        "errors": errors.num_rows, "errors_per_type": per_kind, "per_decision": per_decision,
        "per_class": per_class,
        # --skip-known (Beam counters): the earlier rows this model version may reuse, and the inputs that reused
        # them unread (same uri and listing fingerprint) or once read (same sha256).
        "known_rows": metrics.get("known_rows", 0),
        "inputs_reused_by_listing": metrics.get("inputs_reused_by_listing", 0),
        "inputs_reused_by_content": metrics.get("inputs_reused_by_content", 0),
        # What score read of the archive: files opened and their bytes (to score them, and again for upright copies).
        "files_read": metrics.get("files_read", 0), "bytes_read": metrics.get("bytes_read", 0),
        # Copies written this run (Beam counter): a reused row's copy was written by the run that made it, unless a
        # person answered the page since.
        "corrected_written": metrics.get("corrected_written", 0),
        "corrected_failed": sum(1 for r in rows if (r["corrected_method"] or "").startswith("failed")),
        "inputs_with_some_failed_page": len(error_uris & ok_uris),
    }
    counts["reconciled"] = counts["inputs"] == counts["inputs_ok"] + counts["inputs_failed"]
    predict_s = metrics.get("predict_ms", 0) / 1000.0
    with_orientation = [r for r in scored if r["orientation_probabilities"] is not None]
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
        "tta": {"enabled": model.policy.answer.tta, "images": len(tta), "below": model.policy.answer.tta_below,
                "single_copy": len(with_orientation) - len(tta) if model.policy.answer.tta else 0,
                "disagreement_rate": round(sum(1 for a in tta if a < 1.0) / len(tta), 4) if tta else None,
                "mean_agreement": round(float(np.mean(tta)), 4) if tta else None},
        "text_crops": {"enabled": model.policy.answer.text_crops is not None,
                       "counted": sum(1 for r in scored if r.get("text_crops") == 1),
                       "not_agreed": sum(1 for r in scored if r.get("text_crops") == 0)},
        "timings": {"elapsed_seconds": round(elapsed, 3),
                    "pages_per_second": round(len(scored) / elapsed, 2) if elapsed > 0 else None,
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
        f"  inputs   {c['inputs']}  (ok {c['inputs_ok']}, failed {c['inputs_failed']}, reused {c['inputs_reused']})"
        f"  {'reconciled' if c['reconciled'] else 'NOT RECONCILED'}",
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
