"""score's options: its flags, the model that answers, and the run's decision policy."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

from pipelines import imaging, sources
from pipelines.cli import DEFAULT_MAX_FAILED_FRACTION, add_max_failed_fraction, command_parser
from pipelines.ingest import unknown_beam_args
from serving import policy as policies
from serving.policy import DecisionPolicy, ScorePolicy

LOG = logging.getLogger("archive_vision.score")
COUNTER_NAMESPACE = "score"
SKIPPED = "skipped"  # a file an ingest manifest already knew: listed, not scored, no prediction
TURNS = policies.TURNS
BUILTIN_MODEL = "default"  # `--model default` (or no --model/--endpoint): the shipped default orientation model
# The decision flags a user may set over the model's recorded policy.
DECISION_FLAGS = tuple(f.name for f in dataclasses.fields(DecisionPolicy))


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """The job's own flags (everything else on the command line is a Beam pipeline option)."""

    input: str
    output: str
    endpoint: str = ""
    model: str = ""
    model_name: str = "archive_vision"
    labels: str = ""
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    max_file_mb: float = 1024.0
    max_pages: int = 1000
    exclude: Tuple[str, ...] = ()
    batch_size: int = 32
    timeout_s: float = 30.0
    max_attempts: int = 5
    wait_s: float = 120.0
    decision_overrides: Tuple[Tuple[str, float], ...] = ()  # (DecisionPolicy field, value) given on the command line
    write_corrected: str = ""
    corrections: str = ""
    skip_known: str = ""
    truth: str = ""
    report: bool = True
    tf_threads: int = 0
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION

    def __post_init__(self):
        if self.endpoint and self.model:
            raise ValueError("pass at most one of --endpoint HOST:PORT and --model PATH (neither: the built-in "
                             "orientation model)")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        DecisionPolicy(**dict(self.decision_overrides))  # every threshold between 0 and 1


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Which model answers: name, version, class names (when known), where it lives, and its recorded policy."""

    name: str
    version: int
    class_names: Tuple[str, ...] = ()
    version_dir: str = ""
    endpoint: str = ""
    policy: ScorePolicy = ScorePolicy()
    policy_from: str = ""  # where the policy was read ("": none recorded, generic defaults)


def run_policy(model: ModelInfo, opts: ScoreOptions) -> DecisionPolicy:
    """The decision policy of a run: the model's, with the thresholds given on the command line. A model whose
    agreement gate is its rotate threshold (answers that sure stand when the turned copies disagree) keeps it so
    when --rotate-threshold moves."""
    changes = dict(opts.decision_overrides)
    recorded = model.policy.decision
    if ("rotate_threshold" in changes and "tta_agreement_below" not in changes
            and recorded.tta_agreement_below == recorded.rotate_threshold < 1.0):
        changes["tta_agreement_below"] = changes["rotate_threshold"]
    return model.policy.with_decision(**changes).decision


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[ScoreOptions, List[str]]:
    """Split the job's flags from Beam's pipeline options."""
    parser = command_parser(
        "archive-vision score",
        examples=("archive-vision score --input /scans --output out            # the built-in model, in-process",
                  "archive-vision score --input gs://b/scans --output gs://b/scores/today --endpoint serving:8500 \\",
                  "    --skip-known gs://b/scores/yesterday/results.parquet --write-corrected gs://b/fixed",
                  "archive-vision score --input /scans --output out2 --corrections out1/corrections.parquet "
                  "--write-corrected fixed",
                  "archive-vision score @nightly.flags --runner DataflowRunner --project P --region R"),
        description="Classify and orient every image of an archive through an exported model: remotely over "
                    "TF Serving's gRPC API (--endpoint) or in-process with Beam RunInference (--model). The model "
                    "computes the whole answer (test-time turns, text crops, fusion); score sends each page's "
                    "bytes and decides under the model's own recorded policy (thresholds given here override "
                    "it). Writes results.parquet/.csv, errors.parquet, run.json and report.html in --output. "
                    "Unknown flags go to Beam (e.g. --runner DataflowRunner --project P --region R "
                    "--temp_location gs://...).")
    parser.add_argument("--input", required=True, help="folder, gs://bucket/prefix, glob, or manifest .csv/.parquet")
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", default="", help="HOST:PORT of TF Serving or `archive-vision serve`; the "
                                                      "served version's policy is read from it")
    where.add_argument("--model", default="", help="exported SavedModel: a version dir, or a dir whose latest "
                                                   "numeric version is taken. Neither flag nor `--model default`: "
                                                   "the built-in orientation model (exported once into "
                                                   "$ARCHIVE_VISION_CACHE)")
    parser.add_argument("--model-name", default="archive_vision", help="served model name (with --endpoint)")
    parser.add_argument("--labels", default="", help="labels.json naming the classes (with --endpoint, for the "
                                                    "report's top guesses; the in-process model knows its own)")
    parser.add_argument("--max-pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-file-mb", type=float, default=1024.0)
    parser.add_argument("--max-pages", type=int, default=1000)
    parser.add_argument("--exclude", action="append", default=[], help="file-name glob to skip (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Predict call / RunInference batch")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of one Predict call")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per Predict call (retryable errors)")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the server's model")
    decision = parser.add_argument_group("decision policy (default: the model's recorded one)")
    decision.add_argument("--rotate-threshold", type=float, default=None,
                          help="auto_rotate when a non-zero turn has at least this confidence, else review")
    decision.add_argument("--ok-threshold", type=float, default=None,
                          help="ok when upright with at least this confidence (else review)")
    decision.add_argument("--class-threshold", type=float, default=None,
                          help="review when the class confidence is below this (0: class never sends to review)")
    decision.add_argument("--tta-min-agreement", type=float, default=None,
                          help="review when fewer than this share of the four turned copies agree")
    decision.add_argument("--tta-agreement-below", type=float, default=None,
                          help="apply --tta-min-agreement only to answers whose confidence is below this")
    decision.add_argument("--sparse-ink-below", type=float, default=None,
                          help="review a nearly blank page (ink on less than this share of it) unless its text "
                               "crops settled it (0: off). The graph reads every page under the export's own value; "
                               "a sure page above it has its crops unread, so a higher value sends it to review")
    parser.add_argument("--write-corrected", default="", help="write upright copies of auto_rotate images here")
    parser.add_argument("--corrections", default="", metavar="FILE",
                        help="a person's answers to the review queue (the review page's corrections.parquet, e.g. "
                             "PREV_RUN/corrections.parquet): each page answered is decided `corrected` by the "
                             "answer (--write-corrected turns it by the person's turn; no_up/not_image pages are "
                             "never turned). Default: none")
    parser.add_argument("--skip-known", default="", help="previous results.parquet/.csv or a pattern of them (or "
                                                         "an ingest manifest): files this model version scored are "
                                                         "copied over (reused=True), not scored again; unchanged "
                                                         "ones (same uri and listed size+mtime / GCS MD5) unread, "
                                                         "the others matched by sha256")
    parser.add_argument("--truth", default="", help="labelled manifest (uri + label and/or orientation) for the "
                                                    "report's confusion matrices")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write report.html")
    parser.add_argument("--tf-threads", type=int, default=0, help="cap TF threads per worker (0: TF's default)")
    add_max_failed_fraction(parser)
    known, beam_args = parser.parse_known_args(argv)
    unknown = unknown_beam_args(beam_args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither score's flags nor Beam pipeline options; "
                     f"the answer's settings, turned copies and text crops, are the model's own)")
    overrides = tuple((name, float(getattr(known, name))) for name in DECISION_FLAGS
                      if getattr(known, name) is not None)
    try:
        opts = ScoreOptions(
            input=known.input, output=known.output.rstrip("/"), endpoint=known.endpoint, model=known.model,
            model_name=known.model_name, labels=known.labels, max_pixels=known.max_pixels,
            max_file_mb=known.max_file_mb, max_pages=known.max_pages, exclude=tuple(known.exclude),
            batch_size=known.batch_size, timeout_s=known.timeout_s, max_attempts=known.max_attempts,
            wait_s=known.wait_s, decision_overrides=overrides, write_corrected=known.write_corrected.rstrip("/"),
            corrections=known.corrections,
            skip_known=known.skip_known, truth=known.truth, report=known.report, tf_threads=known.tf_threads,
            max_failed_fraction=known.max_failed_fraction)
    except ValueError as e:
        parser.error(str(e))
    _check_corrected_dir(opts, parser)
    return opts, beam_args


def _check_corrected_dir(opts: ScoreOptions, parser: argparse.ArgumentParser) -> None:
    """Corrected copies must never land on the originals, nor inside the archive (the next run would score them)."""
    if not opts.write_corrected or sources.is_remote(opts.write_corrected) or sources.is_remote(opts.input):
        return
    if sources.inside_archive(opts.write_corrected, opts.input):
        parser.error(f"--write-corrected {opts.write_corrected} is inside the input archive {opts.input}; "
                     f"pick a folder outside it (originals are never overwritten)")
