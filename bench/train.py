"""Trainer benchmark: head training with the frozen-feature cache vs recomputing the frozen backbone every epoch.

    python bench/train.py [--train 48] [--val 16] [--epochs 20] [--image-size 128] [--backbone mobilenet_v2_torchvision]

Both runs train the same heads on the same generated archive (every image in its four turns each epoch,
no pixel augmentation, same seed) through `trainer.task.main`, each in its own fresh process, one after the
other; the time is the wall time of main() inside that process after the imports (backbone build, feature
extraction or not, fit with all callbacks; evaluation and export off). Target (issue 3): cached <= 1/10 of the time at equal val accuracy (+-1 point).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _child(argv) -> None:
    """Run one training in this process and print its wall time as JSON (imports are not timed)."""
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from trainer import backbones, evaluate, features, input, model, task  # noqa: F401

    started = time.perf_counter()
    rc = task.main(argv)
    print("BENCH " + json.dumps({"rc": rc, "seconds": time.perf_counter() - started}), flush=True)


def _last_val_accuracies(job: str) -> dict:
    with open(os.path.join(job, "history_heads.csv"), newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return {k[len("val_"):].replace("_probabilities_accuracy", ""): float(v) for k, v in last.items()
            if k.startswith("val_") and k.endswith("accuracy")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=48, help="train images (each trained in 4 turns)")
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="mobilenet_v2_torchvision")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args.child)
        return 0

    from tests.test_trainer_data import write_archive

    work = tempfile.mkdtemp(prefix="bench-train-")
    data = write_archive(os.path.join(work, "data"), {"train": args.train, "val": args.val},
                         size=args.image_size, stored_turns=(0, 90, 180, 270), shards_per_split=4)
    common = ["--data", data, "--backbone", args.backbone, "--weights", args.weights,
              "--image-size", str(args.image_size), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--early-stopping-patience", "0", "--dropout", "0.2",
              "--evaluate", "false", "--export", "false", "--threads", str(args.threads)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    results = {}
    for name, extra in (("recompute", []), ("cache", ["--cache-features"])):
        job = os.path.join(work, name)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *common, "--job-dir", job,
                               *extra], cwd=REPO, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode != 0 or not line or json.loads(line[-1][6:])["rc"] != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[name] = {"seconds": json.loads(line[-1][6:])["seconds"], "val": _last_val_accuracies(job)}

    rec, cac = results["recompute"], results["cache"]
    ratio = cac["seconds"] / rec["seconds"]
    heads = sorted(rec["val"])
    print(f"\ntrainer bench: {args.train} train / {args.val} val images x 4 turns, {args.epochs} epochs, "
          f"backbone {args.backbone} ({args.weights}) at {args.image_size}px, {args.threads} threads")
    print(f"{'run':<12}{'wall s':>10}" + "".join(f"{'val ' + h + ' acc':>24}" for h in heads))
    for name in ("recompute", "cache"):
        r = results[name]
        print(f"{name:<12}{r['seconds']:>10.1f}" + "".join(f"{r['val'][h]:>24.4f}" for h in heads))
    gaps = {h: abs(cac["val"][h] - rec["val"][h]) * 100 for h in heads}
    print(f"\ncache / recompute time: {ratio:.3f} (1/{1 / ratio:.1f})   target <= 0.100: "
          f"{'met' if ratio <= 0.1 else 'NOT met'}")
    print("val accuracy gap (points): " + ", ".join(f"{h} {g:.1f}" for h, g in gaps.items())
          + f"   target <= 1.0: {'met' if all(g <= 1.0 for g in gaps.values()) else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
