"""`archive-vision demo`: the whole chain on a sample archive, offline, in a few minutes on two cores.

    sample archive (skimage photos + rendered pages, some turned on purpose, some corrupt)
      -> ingest -> train (frozen pretrained backbone, cached features) -> export
      -> local gRPC server (subprocess on a free 127.0.0.1 port) -> score through gRPC -> report.html

It prints where the report is and how many turned images the model found against how many were turned on
purpose, and exits non-zero when a step fails, the counts do not reconcile, or (with the pretrained backbone) the
rotation results are useless: no turned image found, an upright image marked auto_rotate, or fewer than half of
the auto-rotated turns right.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence
from pipelines.cli import command_parser
from archive_vision.local_processes import free_port, stop_process

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BACKBONE = "mobilenet_v2_torchvision"
DEFAULT_WEIGHTS = "imagenet"
DEMO_MARKER = ".archive-vision-demo"  # in a folder the demo made: the only kind it ever clears


class LocalServer:
    """`python -m serving.server` over one model's version folders, as a subprocess on a free local port."""

    def __init__(self, model_base_path: str, model_name: str, log_path: str, *, threads: int = 0,
                 extra_flags: Sequence[str] = ()):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.model_name = model_name
        self.log_path = log_path
        command = [sys.executable, "-m", "serving.server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--model_name", model_name, "--model_base_path", os.path.abspath(model_base_path),
                   "--file_system_poll_wait_seconds", "0", *extra_flags]
        if threads:
            command += ["--tensorflow_intra_op_parallelism", str(threads),
                        "--tensorflow_inter_op_parallelism", str(threads)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_until_available(self, deadline_s: float = 180.0) -> None:
        """Block until the model answers; raise RuntimeError with the server log if it does not."""
        from serving.client import GrpcModelServerClient
        from serving.errors import ServerUnavailableError

        end = time.monotonic() + deadline_s
        with GrpcModelServerClient(self.address, self.model_name, timeout_s=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
                try:
                    client.wait_until_available(min(10.0, max(0.1, end - time.monotonic())))
                    return
                except ServerUnavailableError:
                    if time.monotonic() >= end:
                        raise RuntimeError(f"server not available within {deadline_s:g}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """What the server printed so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not leave within 20 s."""
        stop_process(self.process)
        self._log.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _step(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.monotonic()


def _done(started: float, what: str) -> None:
    print(f"   {what} ({time.monotonic() - started:.1f}s)", flush=True)


def latest_export(job_dir: str, model_name: str) -> str:
    """The newest version dir under JOB/export/<model_name>/."""
    model_dir = os.path.join(job_dir, "export", model_name)
    versions = sorted(int(v) for v in os.listdir(model_dir) if v.isdigit()) if os.path.isdir(model_dir) else []
    if not versions:
        raise RuntimeError(f"the trainer exported nothing under {model_dir}")
    return os.path.join(model_dir, str(versions[-1]))


def rotation_outcome(results: List[dict], truth_rows: Dict[str, int]) -> Dict[str, int]:
    """How the auto_rotate decisions compare with the turns given on purpose (page 0 of each known file)."""
    outcome = {"turned_on_purpose": sum(1 for d in truth_rows.values() if d not in (0, -1)),
               "found": 0, "found_right_turn": 0, "false_alarms": 0, "sent_to_review": 0, "missed": 0}
    for row in results:
        if row["page"] != 0 or row["uri"] not in truth_rows:
            continue
        truth = truth_rows[row["uri"]]
        if row["decision"] == "auto_rotate":
            if truth not in (0, -1):
                outcome["found"] += 1
                outcome["found_right_turn"] += int(row["orientation_degrees"] == truth)
            else:
                outcome["false_alarms"] += 1
        elif truth not in (0, -1):
            outcome["sent_to_review" if row["decision"] == "review" else "missed"] += 1
    return outcome


def rotation_problems(outcome: Dict[str, int]) -> List[str]:
    """Why the rotation results are useless (empty when they are usable), from rotation_outcome's counts.

    The bars are deliberately low: a normal run finds 18 of 22 turned images, 17 with the right turn, and marks no
    upright image auto_rotate, so it clears them by a wide margin and a slightly different training run (threads,
    library versions) does not fail the demo. They catch a chain that is wired wrong (e.g. turns labelled or
    undone the wrong way, a head that learned nothing), not a model that is a little worse than last time.
    """
    problems = []
    turned, found, right = outcome["turned_on_purpose"], outcome["found"], outcome["found_right_turn"]
    if turned and found == 0:
        # not one of the turned images reached auto_rotate: the demo shows nothing of what it is for
        problems.append(f"no turned image was found: 0 of {turned} turned on purpose were marked auto_rotate "
                        f"({outcome['sent_to_review']} sent to review, {outcome['missed']} missed)")
    if outcome["false_alarms"] > 0:
        # zero on a normal run, and the one mistake a user cannot shrug off: --write-corrected would turn an
        # upright original the wrong way. No tolerance here.
        problems.append(f"{outcome['false_alarms']} upright image(s) wrongly marked auto_rotate")
    if found and 2 * right < found:
        # a normal run gets 17 of 18 right (94%); under half right means the turn direction itself is broken
        problems.append(f"only {right} of the {found} images marked auto_rotate got the right turn "
                        f"(fewer than half)")
    return problems


def rotation_checked(args: argparse.Namespace) -> bool:
    """Whether rotation_problems fail the demo: --check-rotation/--no-check-rotation, else only when training the
    pretrained default backbone (a `tiny` or random-weight smoke run learns too little to find turns)."""
    if args.check_rotation is not None:
        return args.check_rotation
    return args.backbone == DEFAULT_BACKBONE and args.weights == DEFAULT_WEIGHTS


def held_out_accuracy(results: List[dict], truth_rows: Dict[str, int], manifest_path: str) -> Dict[str, int]:
    """How often the predicted turn is right on the images ingest put in val/test (never trained on)."""
    import pyarrow.parquet as pq

    manifest = pq.read_table(manifest_path, columns=["source_uri", "split"]).to_pylist()
    held = {os.path.normpath(r["source_uri"]) for r in manifest if r["split"] in ("val", "test")}
    rows = [r for r in results if r["page"] == 0 and os.path.normpath(r["uri"]) in held and r["uri"] in truth_rows]
    return {"images": len(rows),
            "right_turn": sum(1 for r in rows if r["orientation_degrees"] == truth_rows[r["uri"]])}


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser("archive-vision demo", __doc__.split("\n")[0],
                            examples=("archive-vision demo --output demo-out",
                                      "archive-vision demo --output smoke --backbone tiny --weights none"))
    parser.add_argument("--output", default="demo-out", help="folder for everything the demo writes (a folder an "
                                                             "earlier demo made is cleared; any other must be empty)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help="trainer backbone (default: the pretrained one; `tiny` for a quick smoke run)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="backbone weights (imagenet | none | PATH)")
    parser.add_argument("--epochs", type=int, default=30, help="head training epochs on cached features")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--documents", type=int, default=30, help="rendered pages in the sample archive")
    parser.add_argument("--photo-variants", type=int, default=3, help="framings of each skimage photo")
    parser.add_argument("--threads", type=int, default=2, help="TF threads for training and serving")
    parser.add_argument("--keep", action="store_true", help="do not clear an existing --output first")
    parser.add_argument("--check-rotation", action=argparse.BooleanOptionalAction, default=None,
                        help="fail when the rotation results are useless: no turned image found, an upright one "
                             "marked auto_rotate, or under half of the auto-rotated turns right (default: on with "
                             f"--backbone {DEFAULT_BACKBONE} --weights {DEFAULT_WEIGHTS}, off otherwise)")
    return parser.parse_args(argv)


def run_demo(args: argparse.Namespace) -> int:
    """The chain; returns the exit code."""
    from archive_vision import sample_archive
    from pipelines import ingest, report, score

    out = os.path.abspath(args.output)
    if os.path.exists(out) and not args.keep:
        if os.path.exists(os.path.join(out, DEMO_MARKER)):
            shutil.rmtree(out)
        elif os.listdir(out):  # never delete a folder the demo did not make
            print(f"archive-vision demo: {out} exists and was not made by the demo; pick an empty or new --output "
                  f"(or --keep to write into it)", file=sys.stderr)
            return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, DEMO_MARKER), "w", encoding="utf-8") as f:
        f.write("made by archive-vision demo: the next demo run with this --output clears this folder\n")
    overall = time.monotonic()
    beam_flags = ["--direct_running_mode=in_memory"]  # a few dozen files: worker processes cost more than they save

    t = _step("1/6 build the sample archive")
    sample = sample_archive.build_sample_archive(out, photo_variants=args.photo_variants, documents=args.documents)
    _done(t, f"{sample_archive.summary_line(sample)} in {sample.archive}")

    t = _step("2/6 ingest")
    ingest_dir = os.path.join(out, "ingest")
    ingested = ingest.run(["--input", sample.manifest, "--output", ingest_dir, "--overwrite", *beam_flags])
    print(ingest.format_summary(ingested, ingest_dir))
    if not ingested["counts"]["reconciled"]:
        print("demo FAILED: ingest counts do not reconcile", file=sys.stderr)
        return 1

    t = _step("3/6 train (frozen pretrained backbone, cached features) and export")
    job_dir = os.path.join(out, "train")
    command = [sys.executable, "-m", "trainer.task", "--data", ingest_dir, "--job-dir", job_dir,
               "--backbone", args.backbone, "--weights", args.weights, "--image-size", str(args.image_size),
               "--tasks", "classes,orientation", "--epochs", str(args.epochs), "--batch-size", "32",
               "--cache-features", "--early-stopping-patience", "8", "--threads", str(args.threads),
               "--model-name", "archive_vision"]
    print("   " + " ".join(command[1:]), flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    trained = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if trained.returncode != 0:
        print(f"demo FAILED: training exited with {trained.returncode}", file=sys.stderr)
        return 1
    version_dir = latest_export(job_dir, "archive_vision")
    _done(t, f"exported {version_dir}")

    t = _step("4/6 start the local gRPC server")
    server = LocalServer(os.path.dirname(version_dir), "archive_vision", os.path.join(out, "server.log"),
                         threads=args.threads)
    try:
        server.wait_until_available()
        _done(t, f"serving archive_vision at {server.address}")

        t = _step("5/6 score the archive through gRPC, write the report")
        scored = score.run(["--input", sample.archive, "--output", os.path.join(out, "score"), "--endpoint",
                            server.address, "--truth", sample.truth, "--labels",
                            os.path.join(ingest_dir, "labels.json"), "--write-corrected",
                            os.path.join(out, "corrected"), *beam_flags])
        print(score.format_summary(scored))
    finally:
        t6 = _step("6/6 stop the server")
        server.stop()
        _done(t6, "stopped")

    results, errors, _ = report.read_run(os.path.join(out, "score"))
    truth_rows = {}
    with open(sample.truth, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            truth_rows[os.path.normpath(os.path.join(out, row["uri"]))] = int(row["orientation"])
    outcome = rotation_outcome(results, truth_rows)
    counts = scored["counts"]
    failed_uris = {e["uri"] for e in errors}
    problems = []
    if not counts["reconciled"]:
        problems.append("score counts do not reconcile (inputs != results + errors)")
    if counts["inputs"] != len(sample.files) + len(sample.corrupt):
        problems.append(f"score saw {counts['inputs']} inputs, the archive holds "
                        f"{len(sample.files) + len(sample.corrupt)}")
    if set(sample.corrupt) - failed_uris:
        problems.append(f"corrupt files missing from errors.parquet: {sorted(set(sample.corrupt) - failed_uris)}")
    if counts["inputs_ok"] != len(sample.files):
        problems.append(f"{counts['inputs_ok']} good inputs scored, expected {len(sample.files)}")
    if not scored.get("report"):
        problems.append(f"no report: {scored.get('report_error')}")
    check_rotation = rotation_checked(args)
    if check_rotation:
        problems += rotation_problems(outcome)

    held_out = held_out_accuracy(results, truth_rows, os.path.join(ingest_dir, "manifest.parquet"))
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump({"outcome": outcome, "held_out": held_out, "rotation_checked": check_rotation,
                   "problems": problems, "seconds": round(time.monotonic() - overall, 1),
                   "export": version_dir}, f, indent=2)
    print("\n== result")
    print(f"   report: {scored.get('report')}")
    print(f"   turned images found: {outcome['found']} of {outcome['turned_on_purpose']} turned on purpose "
          f"({outcome['found_right_turn']} with the right turn); {outcome['sent_to_review']} more sent to review, "
          f"{outcome['missed']} missed; {outcome['false_alarms']} upright images wrongly marked auto_rotate")
    if not check_rotation:
        why = ("--no-check-rotation" if args.check_rotation is False else
               f"--backbone {args.backbone} --weights {args.weights} is a smoke run; --check-rotation checks them")
        print(f"   rotation results not checked ({why})")
    print(f"   corrupt inputs in errors.parquet: {len(set(sample.corrupt) & failed_uris)} of {len(sample.corrupt)}")
    print(f"   the model trained on this archive's train split, so the figures above flatter it; on the "
          f"{held_out['images']} images ingest held out (val+test) the predicted turn was right for "
          f"{held_out['right_turn']}")
    print(f"   whole demo: {time.monotonic() - overall:.0f}s")
    if problems:
        for problem in problems:
            print(f"demo FAILED: {problem}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision demo`."""
    import logging

    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run_demo(args)
    except Exception as e:  # the demo's promise is a clear verdict: say which step broke
        import traceback

        traceback.print_exc()
        print(f"demo FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
