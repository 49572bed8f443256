"""Command-line conventions every archive-vision command shares, as users know them from Beam, TFX and OCRmyPDF:
kebab-case flags, `@file` for flags kept in a file (one per line), `-q` / `-v`, grouped help with examples, and one
set of exit codes."""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

EXIT_OK = 0
EXIT_FAILED = 1  # an internal error, or counts that do not reconcile
EXIT_USAGE = 2  # a bad flag or setup (argparse's own code)
EXIT_CODES = "exit codes: 0 ok; 1 internal error or counts that do not reconcile; 2 usage or setup error"
NOISY_LOGGERS = ("apache_beam", "absl", "tensorflow", "h5py")


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


def configure_logging(argv: Optional[Sequence[str]]) -> None:
    """Logging for a command run from the shell: timestamps, the level -q / -v ask for, other libraries quiet
    unless -v."""
    level = log_level(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)
