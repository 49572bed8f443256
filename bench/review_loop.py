"""The review loop, measured: a person answers the least-sure review items of an archive, the built-in model is tuned
on the answers with the archive's own images, and the photos of the same sources it never saw are scored again.

    python bench/review_loop.py --corpus /work/corpus/data [--out bench-out/review_loop] [--stage all] [--ks 0,50,200]

Stages (each reuses what an earlier run wrote, so the bench runs in parts on a busy machine):
  prepare  the corpus' held-out photos (test and val splits: the shipped model never trained on them) of the chosen
           sources, split by image into a review half and a measure half (disjoint images); each image written in its
           four turns (JPEG q95, as bench/served.py does). Beside them, for the checks on other sources: the held-out
           test photos of every other package and a sample of held-out test pages, four turns each.
  base     `archive-vision score` with the built-in model over the four sets (once; every K reuses it).
  tune     for each K: a simulated reviewer answers the K least-sure items of the review half from the truth (the
           review queue first, least sure first; then, when K is larger than the queue, the least sure of the rest)
           into RUN/corrections_K.parquet (pipelines.corrections' schema, as the review page writes it); the review
           half is ingested once as the product would (`ingest --assume-upright`, every file stored as upright, its
           four turns in one split) and `train --init default --tasks orientation --cache-features --corrections`
           tunes the shipped model on it; K = 0 is the same tuning without answers (the default model's check alone).
  measure  every tuned export scores the measure half and the other-source checks; accuracy (images with an up),
           the review share, the auto_rotate band's precision and the calibration in truth (mean confidence, the
           negative log-likelihood of the true turn), before and after, into WORK/review_loop.json with each tuned
           head's temperature and the val records it was fitted on, and a Markdown table on stdout. A tuned export
           that does not answer and decide under the built-in model's policy stops it (the shares would not compare).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
from typing import Dict, List, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TURNS = (0, 90, 180, 270)
SETS = ("review", "measure", "other_photos", "pages")
LABEL_OF_TURN = {0: "accept", 90: "turn_right", 180: "turn_180", 270: "turn_left"}


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _cli(args: Sequence[str], log: str) -> None:
    """archive-vision ARGS in a child process (this checkout first on the path), its output kept in `log`."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "archive_vision", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"archive-vision {' '.join(args[:1])} failed ({done.returncode}); see {log}")


def prepare(corpus_root: str, work: str, sources: Sequence[str], pages: int) -> None:
    """The four sets as files (each image in four turns) and truth.csv per set."""
    from PIL import Image

    from research import orientation_corpus as corpus

    if os.path.exists(os.path.join(work, "sets.json")):
        print("[prepare] reusing", os.path.join(work, "sets.json"))
        return
    every = corpus.load_corpus(corpus_root)
    ups = dict(zip((i.path for i in every), corpus.has_up(every, corpus_root, corpus.load_no_up())))
    chosen: Dict[str, List] = {name: [] for name in SETS}
    for image in every:
        if image.kind == corpus.PHOTO and image.package in sources and image.split in (corpus.TEST, corpus.VAL):
            chosen["review" if _hash(image.path) % 2 == 0 else "measure"].append(image)
        elif image.kind == corpus.PHOTO and image.split == corpus.TEST:
            chosen["other_photos"].append(image)
        elif image.kind == corpus.PAGE and image.split == corpus.TEST:
            chosen["pages"].append(image)
    chosen["pages"] = sorted(chosen["pages"], key=lambda i: _hash(i.path))[:pages]
    ops = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    counts = {}
    for name, images in chosen.items():
        folder = os.path.join(work, "files", name)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for index, image in enumerate(images):
            with Image.open(image.path) as opened:
                upright = opened.convert("RGB")
            ext = "jpg" if image.kind == corpus.PHOTO else "png"
            for turn in TURNS:
                path = os.path.join(folder, f"{index:04d}-{turn:03d}.{ext}")
                (upright if turn == 0 else upright.transpose(ops[turn])).save(
                    path, "JPEG" if ext == "jpg" else "PNG", **({"quality": 95} if ext == "jpg" else {}))
                rows.append({"uri": path, "orientation": turn, "image": f"{name}-{index:04d}",
                             "source": image.package if image.kind == corpus.PHOTO else "pages",
                             "up": int(ups[image.path]), "corpus_path": image.path})
        with open(os.path.join(work, f"truth_{name}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        counts[name] = {"images": len(images), "files": len(rows)}
    # The review half as the product ingests an archive: no orientation column (--assume-upright stores every file
    # as upright), the four turns of an image in one split (no image both trained on and validated).
    with open(os.path.join(work, "review_ingest.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "split"])
        for row in _truth(work, "review"):
            writer.writerow([row["uri"], "val" if _hash(row["image"]) % 100 < 15 else "train"])
    with open(os.path.join(work, "sets.json"), "w") as f:
        json.dump({"sources": list(sources), "counts": counts}, f, indent=2)
    print("[prepare]", json.dumps(counts))


def _truth(work: str, name: str) -> List[dict]:
    with open(os.path.join(work, f"truth_{name}.csv"), newline="") as f:
        return [dict(r, orientation=int(r["orientation"]), up=int(r["up"])) for r in csv.DictReader(f)]


def score_set(work: str, model: str, name: str, model_dir: str = "") -> str:
    """`archive-vision score` of one set with one model (cached); returns the run dir."""
    run = os.path.join(work, "runs", model, name)
    if os.path.exists(os.path.join(run, "run.json")):
        return run
    os.makedirs(run, exist_ok=True)
    args = ["score", "--input", os.path.join(work, "files", name), "--output", run, "--no-report"]
    _cli(args + (["--model", model_dir] if model_dir else []), os.path.join(run, "score.log"))
    return run


def _results(run: str) -> Dict[str, dict]:
    import pyarrow.parquet as pq

    return {r["uri"]: r for r in pq.read_table(os.path.join(run, "results.parquet")).to_pylist()}


def write_answers(work: str, k: int) -> str:
    """RUN/corrections_K.parquet: a simulated reviewer's answers to the K least-sure items of the review half."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.corrections import CORRECTIONS_SCHEMA, corrected_orientation

    run = os.path.join(work, "runs", "base", "review")
    path = os.path.join(run, f"corrections_{k}.parquet")
    results = _results(run)
    truth = {r["uri"]: r for r in _truth(work, "review")}
    queue = sorted(results.values(), key=lambda r: (r["decision"] != "review", r["orientation_confidence"] or 0.0))
    start = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    rows = []
    for index, row in enumerate(queue[:k]):
        fact = truth[row["uri"]]
        label = (LABEL_OF_TURN[(row["orientation_degrees"] - fact["orientation"]) % 360] if fact["up"] else "no_up")
        orientation = corrected_orientation(row["orientation_degrees"], label)
        assert not fact["up"] or orientation == fact["orientation"]
        rows.append({"uri": row["uri"], "sha256": row["sha256"], "page": row["page"], "orientation": orientation,
                     "label": label, "model_orientation": row["orientation_degrees"], "model_name": row["model_name"],
                     "model_version": row["model_version"], "reviewer": "bench (from the truth)",
                     "answered_at": start + datetime.timedelta(seconds=index)})
    pq.write_table(pa.Table.from_pylist(rows, CORRECTIONS_SCHEMA), path)
    in_queue = sum(1 for r in queue[:k] if r["decision"] == "review")
    print(f"[answers] K={k}: {len(rows)} answers ({in_queue} from the review queue of "
          f"{sum(1 for r in queue if r['decision'] == 'review')}), "
          f"{sum(1 for r in rows if r['label'] != 'accept')} of them not 'accept'")
    return path


def tune(work: str, k: int, epochs: int) -> str:
    """Tune the default model on the review half with K answers (K = 0: none); returns the export dir."""
    shards = os.path.join(work, "shards")
    if not os.path.exists(os.path.join(shards, "run.json")):
        _cli(["ingest", "--input", os.path.join(work, "review_ingest.csv"), "--output", shards, "--assume-upright",
              "--labels", "none"], os.path.join(work, "ingest.log"))
    job = os.path.join(work, "jobs", f"k{k}")
    summary = os.path.join(job, "run_summary.json")
    if not os.path.exists(summary):
        os.makedirs(job, exist_ok=True)
        args = ["train", "--data", shards, "--job-dir", job, "--tasks", "orientation", "--init", "default",
                "--cache-features", "--epochs", str(epochs)]
        if k:
            args += ["--corrections", write_answers(work, k)]
        _cli(args, os.path.join(work, f"train_k{k}.log"))
    with open(summary) as f:
        return json.load(f)["export_dir"]


def figures(work: str, model: str, name: str) -> Dict[str, Dict[str, float]]:
    """Per source of a set: files, accuracy of the files with an up, review share, auto_rotate precision."""
    results = _results(os.path.join(work, "runs", model, name))
    groups: Dict[str, List] = {}
    for fact in _truth(work, name):
        row = results.get(fact["uri"])
        for group in ("all", fact["source"]):
            groups.setdefault(group, []).append((fact, row))
    out = {}
    for group, pairs in groups.items():
        up = [(f, r) for f, r in pairs if f["up"]]
        right = sum(1 for f, r in up if r and r["orientation_degrees"] == f["orientation"])
        auto = [(f, r) for f, r in up if r and r["decision"] == "auto_rotate"]
        # Calibration in truth: the mean confidence against the accuracy, and the probability given the true turn.
        truth_p = [(r["orientation_probabilities"] or [0.0] * 4)[TURNS.index(f["orientation"])] for f, r in up if r]
        out[group] = {"files": len(pairs), "accuracy": round(right / max(1, len(up)), 4),
                      "review_share": round(sum(1 for _, r in pairs if r and r["decision"] == "review")
                                            / max(1, len(pairs)), 4),
                      "auto_rotate": len(auto),
                      "auto_rotate_right": sum(1 for f, r in auto if r["orientation_degrees"] == f["orientation"]),
                      "missing": sum(1 for _, r in pairs if r is None),
                      "mean_confidence": round(sum(r["orientation_confidence"] or 0.0 for _, r in up if r)
                                               / max(1, len(truth_p)), 4),
                      "nll": round(-sum(math.log(max(p, 1e-12)) for p in truth_p) / max(1, len(truth_p)), 4)}
    return out


def _decision_policy(work: str, model: str) -> Dict[str, dict]:
    """How the model's measure run answered and decided (score's run.json: the export's own policy, as used)."""
    with open(os.path.join(work, "runs", model, "measure", "run.json")) as f:
        policy = json.load(f)["policy"]
    return {"answer": policy["answer"], "decision": policy["decision_used"]}


def _calibration(work: str, k: int) -> Dict[str, object]:
    """What calibrated the K-answer tuning's head (its run_summary.json): the temperature and the records fitted."""
    with open(os.path.join(work, "jobs", f"k{k}", "run_summary.json")) as f:
        summary = json.load(f)
    return summary.get("orientation_calibration") or {"temperature": summary.get("orientation_temperature"),
                                                       "source": "fitted on every val record (an older trainer)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="/work/corpus/data")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench-out", "review_loop"))
    parser.add_argument("--sources", default="gcompris-qt-data,tuxpaint-stamps-default",
                        help="the photo sources of the archive (packages of the corpus)")
    parser.add_argument("--ks", default="0,50,200", help="answers per tuning (0: tuned without answers)")
    parser.add_argument("--pages", type=int, default=40, help="held-out test pages in the pages check")
    parser.add_argument("--epochs", type=int, default=10, help="train's --epochs (its default)")
    parser.add_argument("--stage", choices=("prepare", "base", "tune", "measure", "all"), default="all")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.out)
    os.makedirs(work, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    stages = ("prepare", "base", "tune", "measure") if args.stage == "all" else (args.stage,)
    if "prepare" in stages:
        prepare(args.corpus, work, args.sources.split(","), args.pages)
    if "base" in stages:
        for name in SETS:
            print("[base] scored", score_set(work, "base", name), flush=True)
    exports = {}
    if "tune" in stages or "measure" in stages:
        for k in ks:
            exports[k] = tune(work, k, args.epochs)
            print(f"[tune] K={k}: {exports[k]}", flush=True)
    if "measure" in stages:
        table = {"base": {name: figures(work, "base", name) for name in SETS if name != "review"}}
        for k in ks:
            for name in SETS[1:]:
                score_set(work, f"k{k}", name, exports[k])
            table[f"k{k}"] = {name: figures(work, f"k{k}", name) for name in SETS[1:]}
            print(f"[measure] K={k} done", flush=True)
        models = {"base": {"policy": _decision_policy(work, "base")}}
        for k in ks:
            models[f"k{k}"] = {"policy": _decision_policy(work, f"k{k}"), "calibration": _calibration(work, k)}
            # Apples to apples: the tuned export answers and decides as the built-in model does (same turned copies,
            # text crops and thresholds), so the review shares compare.
            if models[f"k{k}"]["policy"] != models["base"]["policy"]:
                raise SystemExit(f"K={k}: the tuned export's policy {models[f'k{k}']['policy']} is not the built-in "
                                 f"model's {models['base']['policy']}: the review shares do not compare")
            c = models[f"k{k}"]["calibration"]
            fit = c.get("fit") or {}
            why = f"; {c['why']}" if c.get("why") else ""
            print(f"[calibration] K={k}: T {c.get('temperature')} ({c.get('source')}{why}; fit read {fit.get('records')} val records, {fit.get('answered_left_out')} answered left out)",
                  flush=True)
        with open(os.path.join(work, "review_loop.json"), "w") as f:
            json.dump({"sets": json.load(open(os.path.join(work, "sets.json"))), "models": models,
                       "figures": table}, f, indent=2)
        print(markdown(table))
    return 0


def markdown(table: Dict[str, Dict[str, Dict[str, Dict[str, float]]]]) -> str:
    """One row per model and group: accuracy (images with an up), review share, auto_rotate right/answers."""
    lines = ["| model | set | group | files | accuracy | review share | auto_rotate right | mean confidence | nll |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, sets in table.items():
        for name, groups in sets.items():
            for group, f in sorted(groups.items(), key=lambda kv: kv[0] != "all"):
                lines.append(f"| {model} | {name} | {group} | {f['files']} | {100 * f['accuracy']:.1f}% | "
                             f"{100 * f['review_share']:.1f}% | {f['auto_rotate_right']}/{f['auto_rotate']} | "
                             f"{100 * f.get('mean_confidence', 0):.1f}% | {f.get('nll', 0):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
