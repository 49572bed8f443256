"""`archive-vision score`: the Beam job that classifies and orients every image of an archive through a model.

    archive -> ListArchive [-> JoinByListing: reused unread] -> ReadInputs [-> JoinByContent: reused by sha256]
            -> PrepareImages (items | errors) -> ScoreImages (scored | errors)
            -> Decide (+ corrected copies) -> results.parquet/.csv, errors.parquet, run.json, report.html

(the joins only with --skip-known: pipelines.score.known).

score is a client of the exported model: the SavedModel computes the whole answer (serving.answer: the model's
view, test-time turns, text crops, fusion, calibration), and score lists and limits the inputs, sends each page's
bytes, turns the answers into decisions under the model's own recorded policy (serving.policy, read from the
export or over gRPC from the served version), and writes the tables. Scoring is remote (batched gRPC Predict,
`--endpoint`) or in-process (Beam RunInference on the same SavedModel, `--model`); both call the same
`serving_default` signature on the same bytes, so they write the same rows. Every input file ends in the results
or in errors: run.json says whether they reconcile.

What is sent: a JPEG or PNG file of one page whose pixels stand as stored (no EXIF turn) goes as it is, so any
TF Serving client sending the file gets score's answer; any other page (TIFF, WebP, BMP, GIF, EXIF-turned, CMYK,
16-bit, later pages of a file) goes as a lossless PNG of its upright pixels.

The job lives in pipelines/score/: options (flags, the run's policy), models (which model, which policy), answers
(pure functions), transforms (the Beam graph), corrected (upright copies), summary (run.json and the printout); this
module runs it. review joins a person's answers (--corrections) to the decided rows.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from typing import Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import sources
from pipelines.cli import EXIT_USAGE, configure_logging, return_freed_memory, exit_code
from pipelines.imaging import make_upright, turn_clockwise  # noqa: F401 - part of score's interface (tests, report)
from pipelines.ingest import default_pipeline_options, runner_record
from pipelines.score.answers import (SENT_AS_IS, decide, draft_side, page_payload,  # noqa: F401
                                     predict_isolating, result_row)
from pipelines.score.corrected import (WriteCorrectedFn, corrected_path, jpegtran_operation,  # noqa: F401
                                       jpegtran_path, reset_exif_orientation, upright_bytes)
from pipelines.score.known import KnownTable, inspect_known, known_row  # noqa: F401
from pipelines.score.models import (ScorePolicyError, builtin_model_dir, export_metadata,  # noqa: F401
                                    _class_names_file, local_model_info, recorded_policy, remote_model_info,
                                    uses_builtin_model)
from pipelines.score import review
from pipelines.score.options import (BUILTIN_MODEL, COUNTER_NAMESPACE, DECISION_FLAGS, LOG, SKIPPED,  # noqa: F401
                                     TURNS, ModelInfo, ScoreOptions, parse_args, run_policy)
from pipelines.score.summary import format_summary, summarize, write_results_csv, _metric_totals  # noqa: F401
from pipelines.score.transforms import (PinnedVersionGoneError, PrepareImagesFn, ReadInputFn,  # noqa: F401
                                        RemotePredictFn, ScoreArchive, ScoreImages, ServingSignatureModelHandler,
                                        build_pipeline, version_gone_message)
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA  # noqa: F401
from serving.export import EXPORT_METADATA, resolve_version_dir  # noqa: F401
from serving.policy import DECISIONS, DecisionPolicy, ScorePolicy  # noqa: F401

__all__ = [
    'BUILTIN_MODEL', 'COUNTER_NAMESPACE', 'DECISIONS', 'DECISION_FLAGS', 'DecisionPolicy', 'ERRORS_SCHEMA',
    'EXPORT_METADATA', 'KnownTable', 'LOG', 'ModelInfo', 'PinnedVersionGoneError', 'PrepareImagesFn',
    'RESULTS_SCHEMA', 'ReadInputFn', 'RemotePredictFn', 'SENT_AS_IS', 'SKIPPED', 'ScoreArchive', 'ScoreImages',
    'ScoreOptions', 'ScorePolicy', 'ScorePolicyError', 'ServingSignatureModelHandler', 'TURNS', 'WriteCorrectedFn',
    '_class_names_file', '_metric_totals', 'build_pipeline', 'builtin_model_dir', 'corrected_path', 'decide',
    'draft_side', 'export_metadata', 'format_summary', 'inspect_known', 'jpegtran_operation', 'jpegtran_path',
    'known_row', 'local_model_info', 'make_upright', 'page_payload', 'parse_args', 'predict_isolating',
    'recorded_policy', 'remote_model_info', 'reset_exif_orientation', 'resolve_version_dir', 'result_row',
    'run_policy', 'summarize', 'turn_clockwise', 'upright_bytes', 'uses_builtin_model', 'version_gone_message',
    'write_results_csv', 'main', 'resolve_model',
    'run', 'run_failure_reason'
]


def resolve_model(opts: ScoreOptions, beam_args: Sequence[str] = (),
                  test_pipeline: Optional[beam.Pipeline] = None) -> Tuple[ScoreOptions, ModelInfo]:
    """The run's options (the built-in model's path filled in: where the runner's workers can read it) and the model
    that answers (launcher side)."""
    if uses_builtin_model(opts.endpoint, opts.model):
        options = getattr(test_pipeline, "_options", None) or PipelineOptions(list(beam_args))
        opts = dataclasses.replace(opts, model=builtin_model_dir(options, opts.output))
        LOG.info("no --model/--endpoint: scoring with the built-in orientation model %s", opts.model)
    model = remote_model_info(opts) if opts.endpoint else local_model_info(opts.model)
    if not model.class_names and opts.labels:
        model = dataclasses.replace(model, class_names=_class_names_file(opts.labels))
    if model.policy_from:
        LOG.info("decision policy: %s's (%s)", model.policy_from, model.policy.origin or "recorded at export")
    else:
        LOG.warning("%s records no score policy (exported before policies were recorded?): the generic "
                    "thresholds apply", model.endpoint or model.version_dir)
    return opts, model


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None,
        extend_pipeline=None) -> dict:
    """Run the score job (and the report) and return the run.json summary."""
    opts, beam_args = parse_args(argv)
    # A person's answers are read and checked before anything is scored (pipelines.score.review).
    answered = review.launch_check(opts.corrections, opts.input) if opts.corrections else None
    if not FileSystems.exists(opts.output):
        FileSystems.mkdirs(opts.output)
    opts, model = resolve_model(opts, beam_args, test_pipeline)
    known = inspect_known(opts.skip_known) if opts.skip_known else None  # its schema; the workers read its rows
    LOG.info("scoring %s with %s v%d (%s)%s", opts.input, model.name, model.version,
             model.endpoint or model.version_dir,
             f"; reusing the {known.kind} {known.path}" if known else "")
    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=default_pipeline_options(beam_args))
    outputs = build_pipeline(pipeline, opts, model, known)
    if extend_pipeline is not None:
        extend_pipeline(outputs)
    result = pipeline.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    write_results_csv(opts.output)
    tool = ("jpegtran" if jpegtran_path() else "none (JPEG re-encoded at quality 95)") if opts.write_corrected else ""
    summary = summarize(opts, model, elapsed, _metric_totals(result), tool, runner_record(pipeline))
    if answered is not None:
        from pipelines.tables import read_table

        results = read_table(FileSystems.join(opts.output, "results.parquet"), RESULTS_SCHEMA).to_pylist()
        summary["corrections"] = review.unmatched_record(answered[1], answered[0], results)
    truth = opts.truth or _labelled_input(opts.input)
    metrics = tables = None  # the score tables read and the truth figures computed once, for run.json and the report
    if truth:
        from pipelines import report

        try:
            tables = report.read_run(opts.output)
            metrics = report.truth_metrics(tables[0], report.read_truth(truth))
            summary["truth"] = {"manifest": truth, **report.truth_summary(metrics)}
        except Exception as e:  # a truth manifest that cannot be read is said, not fatal: the tables stand
            LOG.exception("the truth figures failed (reading the truth manifest or the score tables)")
            summary["truth"] = {"manifest": truth, "error": f"{type(e).__name__}: {e}"}
    run_json = json.dumps(summary, indent=2, default=str)
    with FileSystems.create(FileSystems.join(opts.output, "run.json")) as handle:
        handle.write(run_json.encode())
    if opts.report:
        from pipelines import report

        try:
            if tables is not None:  # the results and errors read above, with the run.json just written
                tables = (tables[0], tables[1], json.loads(run_json))
            summary["report"] = report.write_report(opts.output, truth=truth, metrics=metrics, tables=tables)
        except Exception as e:  # the tables are the product; a report failure is said, not fatal
            LOG.exception("report failed")
            summary["report_error"] = f"{type(e).__name__}: {e}"
    return summary


def _labelled_input(src: str) -> Optional[str]:
    """The input manifest itself, when it carries a label or orientation column (the report's truth)."""
    if not sources.is_manifest(src):
        return None
    try:
        columns = set(sources.read_manifest_table(src).column_names)
    except Exception:  # an unreadable manifest already failed the listing; no truth then
        return None
    return src if columns & {"label", "label_name", "orientation"} else None


def run_failure_reason(error: BaseException) -> str:
    """One line for a run that failed for a reason the user can act on (no server, no model, the pinned version
    gone), '' otherwise. Runners wrap a worker's exception (the multi-process DirectRunner re-raises it as a
    RuntimeError holding the worker's traceback text), so the chain and, failing that, the text are searched."""
    from serving.errors import ServingError

    seen = error
    while seen is not None:
        if isinstance(seen, (ServingError, FileNotFoundError, ValueError)):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    match = re.search(rf"{PinnedVersionGoneError.__name__}: (.+)", str(error))
    return f"{PinnedVersionGoneError.__name__}: {match.group(1).strip()}" if match else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_logging(argv if argv is not None else sys.argv[1:])
    return_freed_memory()  # before the runner starts its workers
    try:
        summary = run(argv)
    except Exception as e:  # a chain that cannot start (no server, no model) says why and exits non-zero
        reason = run_failure_reason(e)
        if reason:
            print(f"archive-vision score: {reason}", file=sys.stderr)
            return EXIT_USAGE
        raise
    print(format_summary(summary))
    # run() wrote every table, run.json and the report first: 1 when the counts do not reconcile, 3 when more
    # inputs failed than --max-failed-fraction allows (the nightly CronJob's pod then fails).
    return exit_code(summary)
