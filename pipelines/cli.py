"""Command-line conventions every archive-vision command shares, as users know them from Beam, TFX and OCRmyPDF:
kebab-case flags, `@file` for flags kept in a file (one per line), `-q` / `-v`, grouped help with examples, and one
set of exit codes."""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
from typing import Optional, Sequence

EXIT_OK = 0
EXIT_FAILED = 1  # an internal error, or counts that do not reconcile
EXIT_USAGE = 2  # a bad flag or setup (argparse's own code)
EXIT_TOO_MANY_FAILED = 3  # more inputs failed than --max-failed-fraction allows (every table still written)
EXIT_CODES = ("exit codes: 0 ok; 1 internal error or counts that do not reconcile; 2 usage or setup error; "
              "3 too many failed inputs (over --max-failed-fraction; every table is still written)")
# A healthy archive loses well under 1% of its scans (truncated uploads, odd formats, decompression bombs); when
# more than 5% fail, something systematic broke (a wrong --input, lost permissions, a decoder or model server
# failing), and a scheduled run must not report success on a night that dropped that many scans.
DEFAULT_MAX_FAILED_FRACTION = 0.05
NOISY_LOGGERS = ("apache_beam", "absl", "tensorflow", "h5py")
# glibc's malloc returns freed memory above this much at the top of a heap to the system, and keeps its mmap
# threshold here instead of raising it after each large free (pipelines.cli.return_freed_memory).
MALLOC_TRIM_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt's parameter number (malloc.h)


def command_parser(prog: str, description: str, examples: Sequence[str] = (), **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with `@flagfile` support, -q/-v, and the examples and exit codes after the flags."""
    epilog = ""
    if examples:
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) + "\n\n"
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog + EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     fromfile_prefix_chars="@", **kwargs)
    add_verbosity(parser)
    return parser


def add_max_failed_fraction(parser: argparse.ArgumentParser) -> None:
    """--max-failed-fraction F: the share of inputs that may fail before the command exits 3."""
    def fraction(text: str) -> float:
        value = float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
        return value

    parser.add_argument("--max-failed-fraction", type=fraction, default=DEFAULT_MAX_FAILED_FRACTION,
                        metavar="F",
                        help=f"exit {EXIT_TOO_MANY_FAILED} (after writing every table and run.json) when more than "
                             f"this share of the inputs failed (default {DEFAULT_MAX_FAILED_FRACTION}: a healthy "
                             f"archive loses well under 1%%, so more than 5%% means something systematic broke, "
                             f"e.g. a wrong --input, lost permissions or a failing decoder or server); 1.0 turns "
                             f"the check off")


def failed_inputs_check(counts: dict, max_fraction: float) -> dict:
    """run.json's `failed_inputs`: the share of inputs that failed, the limit, and whether it was exceeded."""
    inputs = int(counts.get("inputs") or 0)
    failed = int(counts.get("inputs_failed") or 0)
    share = failed / inputs if inputs else 0.0
    return {"inputs_failed": failed, "inputs": inputs, "fraction": round(share, 6),
            "max_fraction": max_fraction, "exceeded": share > max_fraction}


def exit_code(summary: dict) -> int:
    """A finished run's exit code from its run.json: 1 when the counts do not reconcile, 3 when more inputs
    failed than allowed, else 0."""
    if not summary["counts"]["reconciled"]:
        return EXIT_FAILED
    if summary.get("failed_inputs", {}).get("exceeded"):
        return EXIT_TOO_MANY_FAILED
    return EXIT_OK


def failed_inputs_line(summary: dict) -> str:
    """The line printed under the summary when a run failed too many inputs ('' otherwise)."""
    check = summary.get("failed_inputs") or {}
    if not check.get("exceeded"):
        return ""
    return (f"  FAILED   {check['inputs_failed']} of {check['inputs']} inputs failed ({check['fraction']:.1%}), over "
            f"--max-failed-fraction {check['max_fraction']}: exit {EXIT_TOO_MANY_FAILED} (see errors.parquet)")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-q (warnings and errors only) and -v (debug, Beam's and TensorFlow's logs too)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print warnings, errors and the summary only")
    group.add_argument("-v", "--verbose", dest="verbose_logs", action="store_true",
                       help="print debug logs, Beam's and TensorFlow's too")


def log_level(argv: Optional[Sequence[str]]) -> int:
    """The logging level -q / -v ask for in `argv` (INFO when neither)."""
    args = set(argv or ())
    if args & {"-q", "--quiet"}:
        return logging.WARNING
    if args & {"-v", "--verbose"}:
        return logging.DEBUG
    return logging.INFO


def return_freed_memory() -> None:
    """Make this process and the processes it starts (the DirectRunner's workers read it at their start) give freed
    memory back to the system. glibc's default raises its mmap threshold after each large free, so the runner's
    multi-megabyte data-plane buffers (a shuffle's, a stage's output) land in thread heaps that keep the pages: a
    `--skip-known` re-run over 20,000 unchanged scans peaked at 431-490 MB in the launcher against 250-284 MB at
    4,000, and at about 300 MB with a fixed threshold (bench/scale.py). A threshold already in the environment is
    kept (one glibc cannot read is left to glibc); not glibc (macOS, musl): no threshold. Arrow allocates from the
    system allocator too (below)."""
    # Arrow's default pool (mimalloc) keeps the pages of the buffers it frees: counting a 1,000,000-row results table
    # a batch at a time for run.json peaked 90 MB higher with it than with the system allocator, whose frees the
    # threshold below hands back. A pool already chosen in the environment is kept.
    if os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system") == "system":
        import pyarrow

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    value = os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(MALLOC_TRIM_THRESHOLD))
    try:
        threshold = int(value)
        if 0 <= threshold < 2 ** 31:  # mallopt takes an int
            ctypes.CDLL("libc.so.6").mallopt(_M_TRIM_THRESHOLD, threshold)
    except (OSError, AttributeError, ValueError):
        pass  # not glibc, or a value glibc would not take either: its own default stands


def configure_logging(argv: Optional[Sequence[str]]) -> None:
    """Logging for a command run from the shell: timestamps, the level -q / -v ask for, other libraries quiet
    unless -v."""
    level = log_level(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)
