"""The `archive-vision` console script: one subcommand per job, each module owning its own flags."""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

# subcommand -> (module with main(argv), one-line help). Imported lazily: `--help` must not load TensorFlow.
SUBCOMMANDS = {
    "ingest": ("pipelines.ingest", "Beam job: image archive -> TFRecord shards + manifest + errors"),
    "train": ("trainer.task", "fine-tune a frozen backbone with class and orientation heads"),
    "export": ("serving.export", "export a trained model as a TF Serving SavedModel version"),
    "publish": ("serving.publish", "validate an exported version in a local server, then copy it to the servers"),
    "serve": ("serving.server", "local TF-Serving-compatible gRPC server"),
    "score": ("pipelines.score", "Beam job: classify and orient an archive through a model"),
    "report": ("pipelines.report", "write the HTML report of a score run"),
    "review": ("pipelines.review", "a local page to clear a score run's review queue with the keyboard"),
    "activations": ("trainer.activations", "what the backbone sees: feature maps of a few layers for some images"),
    "checkset": ("archive_vision.check_set", "turn images known to be upright four ways, with truth.csv for score"),
    "demo": ("archive_vision.demo", "build a sample archive and run the whole chain end to end"),
    "submit": ("archive_vision.cluster", "render / submit a multi-worker training job to Kubernetes"),
}


def _usage() -> str:
    lines = ["usage: archive-vision <command> [options]   (archive-vision <command> --help)", "", "commands:"]
    for name, (module, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<11} {text}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from archive_vision import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"archive-vision: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


def entry() -> None:
    """The `archive-vision` console script: main(), then leave without interpreter teardown.

    Beam's portable runner client, gRPC and TensorFlow leave native threads behind; tearing the interpreter down
    under them can abort the process (SIGABRT, "terminate called without an active exception") after the job
    has finished and written everything, turning a good run into a failed exit status. Once main() has
    returned, its outputs are closed; flush what Python still buffers and exit with main()'s status directly.
    """
    import logging

    try:
        code = main()
    except SystemExit as stop:  # argparse --help / errors
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
