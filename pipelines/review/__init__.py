"""`archive-vision review`: a local web page on which a person clears a score run's review queue with the keyboard,
every answer saved at once to RUN_DIR/corrections.parquet (through the journal in RUN_DIR/corrections.journal/).

    archive-vision review --results RUN_DIR [--host 127.0.0.1] [--port 8765] [--reviewer NAME] [--open]

session: the queue, its order and groups, progress, the tabs' leases; server: HTTP and the thumbnails; page.html: the
page (docs/review.md).
"""
from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from pipelines.cli import EXIT_USAGE, command_parser, configure_logging

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
POLL_SECONDS = 2.0


class SetupError(Exception):
    """RUN_DIR cannot be reviewed as asked (exit 2)."""


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser(
        "archive-vision review",
        description="Serve a local page for clearing a score run's review queue with the keyboard: each page shown "
                    "as the model would turn it, least sure first, grouped; every answer is saved at once to "
                    "RUN_DIR/corrections.parquet (score --write-corrected and train --corrections read it). "
                    "Keys: Enter/A accept, Left/Right turn left/right, Down/U turn 180, N no up, X not an image, "
                    "G accept the group strip, S skip, Backspace/Z undo. Reference: docs/review.md.",
        examples=("archive-vision review --results out --open          # then answer in the browser tab",
                  "archive-vision review --results gs://bucket/runs/2026-01-01 --reviewer ana --port 0",
                  "archive-vision review --results out --rebuild   # corrections.parquet from the journal, no page"))
    where = parser.add_argument_group("what to review")
    where.add_argument("--results", required=True, metavar="RUN_DIR",
                       help="a score --output folder (local or gs://) holding results.parquet")
    where.add_argument("--decisions", default=",".join(("review",)), metavar="D[,D]",
                       help="which decisions form the queue (default review; e.g. review,auto_rotate to check the "
                            "automatic turns too)")
    where.add_argument("--reviewer", default=None,
                       help="the name each answer is recorded with (default: the login name)")
    serving = parser.add_argument_group("the server")
    serving.add_argument("--host", default=DEFAULT_HOST,
                         help=f"address to listen on (default {DEFAULT_HOST}: this machine only; the page has no "
                              f"login, so think before opening it wider)")
    serving.add_argument("--port", type=int, default=DEFAULT_PORT,
                         help=f"port (default {DEFAULT_PORT}; 0 picks a free one, printed on start)")
    serving.add_argument("--open", action="store_true", help="open the page in the default browser")
    serving.add_argument("--poll-seconds", type=float, default=POLL_SECONDS, metavar="S",
                         help=f"how often to read other reviewers' answers from the journal (default {POLL_SECONDS})")
    serving.add_argument("--rebuild", action="store_true",
                         help="only rewrite corrections.parquet from the journal (e.g. after a crash), then exit")
    return parser.parse_args(argv)


def open_session(run_dir: str, decisions: Sequence[str], reviewer: str):
    """(the ReviewSession of RUN_DIR, its results rows); SetupError for a folder that cannot be reviewed."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines import corrections
    from pipelines.review.session import ReviewSession, build_queue
    from pipelines.tables import RESULTS_SCHEMA, read_table

    path = FileSystems.join(run_dir, "results.parquet")
    if not FileSystems.exists(path):
        raise SetupError(f"{run_dir} holds no results.parquet: --results takes a score --output folder")
    try:
        results = read_table(path, RESULTS_SCHEMA).to_pylist()
    except Exception as e:
        raise SetupError(f"{path} cannot be read as a Parquet table: {type(e).__name__}: {e}") from e
    needed = ("uri", "page", "sha256", "orientation_degrees", "decision")
    missing = [c for c in needed if results and c not in results[0]]
    if missing:
        raise SetupError(f"{path} is not a score results table: no {', '.join(missing)} column")
    try:
        journal = corrections.open_journal(run_dir, known={(r["sha256"], int(r["page"])) for r in results},
                                           against=path)
    except corrections.CorrectionsError as e:
        raise SetupError(str(e)) from e
    items = build_queue(results, decisions)
    return ReviewSession(run_dir, items, journal, reviewer, results=results), results


def serve(session, host: str, port: int, poll_seconds: float = POLL_SECONDS, ready=None,
          stop: Optional[threading.Event] = None) -> None:
    """Serve the page until `stop` is set (or SIGINT/SIGTERM in the main thread); `ready(url)` once listening."""
    from pipelines.review.server import Pictures, ReviewServer, poll_journal

    stop = stop or threading.Event()
    pictures = Pictures()
    try:
        server = ReviewServer((host, port), session, pictures)
    except OSError as e:
        pictures.close()
        raise SetupError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                         + (" (--port 0 picks a free port)" if port else "")) from e
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}/"
    threads = [threading.Thread(target=server.serve_forever, name="review-http", daemon=True),
               threading.Thread(target=poll_journal, args=(session, stop, poll_seconds), name="review-poll",
                                daemon=True)]
    for thread in threads:
        thread.start()
    pictures.warm(session.items[:8])
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    if ready is not None:
        ready(url)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        pictures.close()
        session.refresh()  # the others' latest answers into the table this server leaves behind


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision review`."""
    args = _parse_args(argv)
    configure_logging(argv)
    reviewer = args.reviewer or os.environ.get("USER") or getpass.getuser()
    decisions = tuple(d.strip() for d in args.decisions.split(",") if d.strip())
    from serving.policy import DECISIONS  # no TensorFlow (importing pipelines.score would load it)

    SKIPPED = "skipped"  # pipelines.score.options.SKIPPED: rows a --skip-known manifest listed unscored

    unknown = [d for d in decisions if d not in DECISIONS + (SKIPPED,)]
    if unknown or not decisions:
        print(f"archive-vision review: --decisions {args.decisions!r}: each must be one of "
              f"{', '.join(DECISIONS + (SKIPPED,))}", file=sys.stderr)
        return EXIT_USAGE
    try:
        session, results = open_session(args.results, decisions, reviewer)
        if args.rebuild:
            print(f"corrections: {session.journal.table_path}: {len(session.journal.rows())} answers "
                  f"({session.state()['done']} of {len(session.items)} queued pages answered)")
            return 0
        state = session.state()

        def ready(url: str) -> None:
            print(f"review: {url}  ({state['left']} of {state['total']} pages to review, {state['done']} answered; "
                  f"{len(results)} results; reviewer {reviewer}; Ctrl-C stops)", flush=True)
            if args.open:
                import webbrowser

                webbrowser.open(url)

        serve(session, args.host, args.port, args.poll_seconds, ready=ready)
    except SetupError as e:
        print(f"archive-vision review: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"corrections: {session.journal.table_path} ({len(session.journal.rows())} answers)")
    return 0
