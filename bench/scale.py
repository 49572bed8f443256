"""Scale benchmark: do ingest's and score's time per image and memory stay flat as the archive grows?

    python bench/scale.py [--sizes 500,4000,20000] [--builtin-images 500] [--out bench-out/scale] [--json FILE]
    python bench/scale.py --quick          # a smoke test: 100 and 400 scans, no built-in model run

For each size N, an archive of N small scans (320x240 or 240x320 JPEGs: 8 distinct pictures, typed pages and smooth
photos, each file made unique by a JPEG comment, 1,000 to a folder), then, each as a subprocess whose process tree is
watched through /proc (Linux) every 0.2 s:

  ingest        archive-vision ingest --input A --output O           (DirectRunner, one worker per usable core)
  score         archive-vision score --input A --model TINY          (the red-corner test model at 32 px, see below)
  re-run        archive-vision score ... --skip-known <score's results.parquet>: the unchanged archive again

then the second-largest archive's re-run again, against its results plus the rows of files no longer listed
(--history-rows in all): the same archive against a longer history. And once, at --builtin-images scans:
score with the built-in model (no --model), the real per-image cost.

TINY is tests/score_fixtures.make_red_corner_model exported at 32 px: the whole answer graph around a model that
costs next to nothing, so the figures show how the pipeline grows with the archive rather than MobileNetV2's fixed
per-image compute (which the built-in run shows once).

Per run: wall s, s/image, the launcher's peak RSS (its VmHWM as it exits: see LAUNCHER), the largest worker's peak
RSS (DirectRunner workers are child processes), the whole tree's peak RSS, and bytes read: the run.json counters
`bytes_read`/`files_read` where the job writes them, and always the tree's storage reads (/proc/<pid>/io
read_bytes) with the archive first evicted from the page cache (posix_fadvise DONTNEED), so they count the archive
bytes the run really read.
Targets (issue 26): s/image at every size within 1.2x of the smallest size's; launcher and worker peaks at the
largest size within 1.3x of the next largest's (a re-run's too), and a re-run's against the longer history within
1.3x of the same archive's re-run (it must not grow with the earlier results).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_SIZES = (500, 4000, 20000)
QUICK_SIZES = (100, 400)
DISTINCT_PICTURES = 8
PER_FOLDER = 1000
POLL_SECONDS = 0.2


# --- the archive -------------------------------------------------------------------------------------------------

def base_pictures() -> List[bytes]:
    """DISTINCT_PICTURES small JPEGs: typed pages (portrait 240x320) and smooth photos (landscape 320x240)."""
    from PIL import Image

    from archive_vision.sample_archive import render_page
    from tests.image_factory import make_random_image

    out = []
    for index in range(DISTINCT_PICTURES):
        if index % 2:
            image = Image.fromarray(make_random_image(240, 320, seed=index))
        else:
            image = render_page(seed=index).resize((240, 320), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def unique_copy(jpeg: bytes, index: int) -> bytes:
    """The same JPEG with a comment segment (COM) naming `index` right after SOI: new bytes, the same pixels."""
    text = f"bench scan {index}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def write_archive(root: str, count: int, pictures: List[bytes]) -> int:
    """`count` scans under root/bNNN/; returns the archive's bytes."""
    total = 0
    for index in range(count):
        folder = os.path.join(root, f"b{index // PER_FOLDER:03d}")
        if index % PER_FOLDER == 0:
            os.makedirs(folder, exist_ok=True)
        data = unique_copy(pictures[index % len(pictures)], index)
        with open(os.path.join(folder, f"scan{index:06d}.jpg"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


def evict_from_page_cache(root: str) -> None:
    """Drop the archive's pages from the page cache, so a run's storage reads count the archive bytes it reads."""
    os.sync()
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def export_tiny_model(base: str) -> str:
    """The red-corner test model exported at 32 px under `base` (once)."""
    if os.path.isdir(os.path.join(base, "archive_vision")):
        return base
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from serving import export
    from tests import score_fixtures as sf

    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=1)
    return base


# --- watching a process tree -------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process ended between the listing and the read
        return ""


def _children() -> Dict[int, List[int]]:
    found: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read(f"/proc/{name}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                found.setdefault(ppid, []).append(int(name))
    return found


def _status_kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class TreeWatch:
    """Peak RSS of a process and of each of its descendants (VmHWM), the tree's peak summed RSS, and its storage
    reads (/proc/<pid>/io read_bytes, the last value seen of each process)."""

    def __init__(self, root: int):
        self.root = root
        self.peak_kb: Dict[int, int] = {}
        self.read_bytes: Dict[int, int] = {}
        self.tree_peak_kb = 0

    def poll(self) -> None:
        children = _children()
        pids, stack = [], [self.root]
        while stack:
            pid = stack.pop()
            pids.append(pid)
            stack.extend(children.get(pid, []))
        total = 0
        for pid in pids:
            status = _read(f"/proc/{pid}/status")
            if not status:
                continue
            total += _status_kb(status, "VmRSS")
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), _status_kb(status, "VmHWM"))
            for line in _read(f"/proc/{pid}/io").splitlines():
                if line.startswith("read_bytes:"):
                    self.read_bytes[pid] = int(line.split()[1])
        self.tree_peak_kb = max(self.tree_peak_kb, total)

    def launcher_mb(self) -> float:
        return self.peak_kb.get(self.root, 0) / 1024

    def worker_mb(self) -> float:
        return max([kb for pid, kb in self.peak_kb.items() if pid != self.root] or [0]) / 1024


def find_counters(value, names=("bytes_read", "files_read")) -> Dict[str, int]:
    """run.json's read counters wherever they sit (another branch adds them to run.json)."""
    found: Dict[str, int] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key in names and isinstance(item, (int, float)):
                found[key] = int(item)
            else:
                for inner, number in find_counters(item, names).items():
                    found.setdefault(inner, number)
    elif isinstance(value, list):
        for item in value:
            for inner, number in find_counters(item, names).items():
                found.setdefault(inner, number)
    return found


# The launcher: archive-vision's main(), then its own peak RSS (VmHWM) written to a file, then exit as the console
# script does. A launcher's last steps (results.csv, run.json, report.html) take a few tenths of a second at the
# end of its life, which a 0.2 s poll of /proc misses or catches by chance.
LAUNCHER = """
import os, sys
from archive_vision.cli import main
code = 1
try:
    code = main(sys.argv[2:])
finally:
    with open('/proc/self/status') as status, open(sys.argv[1], 'w') as out:
        out.write(next(line.split()[1] for line in status if line.startswith('VmHWM:')))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
"""


def run_watched(args: List[str], output: str, images: int, label: str) -> dict:
    """Run `archive-vision ARGS` as a subprocess, watching its process tree; the figures of the run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path = os.path.join(os.path.dirname(output), f"{os.path.basename(output)}.log")
    peak_path = f"{log_path}.launcher-peak-kb"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, peak_path, *args, "-q"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        watch = TreeWatch(proc.pid)
        while proc.poll() is None:
            watch.poll()
            time.sleep(POLL_SECONDS)
    wall = time.perf_counter() - started
    if os.path.exists(peak_path):
        with open(peak_path) as f:
            watch.peak_kb[proc.pid] = max(watch.peak_kb.get(proc.pid, 0), int(f.read().strip() or 0))
        os.remove(peak_path)
    if proc.returncode != 0:
        with open(log_path) as f:
            raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{f.read()[-3000:]}")
    run_json = {}
    if os.path.exists(os.path.join(output, "run.json")):
        with open(os.path.join(output, "run.json")) as f:
            run_json = json.load(f)
    return {"run": label, "images": images, "wall_s": round(wall, 2), "s_per_image": wall / images,
            "launcher_mb": round(watch.launcher_mb(), 1), "worker_mb": round(watch.worker_mb(), 1),
            "tree_mb": round(watch.tree_peak_kb / 1024, 1), "processes": len(watch.peak_kb),
            "read_bytes": sum(watch.read_bytes.values()), "counters": find_counters(run_json)}


# --- the runs ----------------------------------------------------------------------------------------------------

def bench_size(work: str, count: int, pictures: List[bytes], model: str) -> List[dict]:
    archive = os.path.join(work, f"archive-{count}")
    if not os.path.isdir(archive):
        write_archive(archive, count, pictures)
    archive_bytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(archive) for n in files)
    rows = []
    for label, args in (
            ("ingest", ["ingest", "--input", archive, "--size", "256"]),
            ("score", ["score", "--input", archive, "--model", model]),
            ("score re-run", ["score", "--input", archive, "--model", model, "--skip-known",
                              os.path.join(work, f"score-{count}", "results.parquet")])):
        output = os.path.join(work, f"{label.replace(' ', '-')}-{count}")
        shutil.rmtree(output, ignore_errors=True)
        evict_from_page_cache(archive)
        row = run_watched([*args, "--output", output], output, count, label)
        row["archive_bytes"] = archive_bytes
        rows.append(row)
        print_row(row)
    return rows


def bench_history(work: str, count: int, rows: int, model: str) -> dict:
    """The `count`-scan archive's unchanged re-run again, against its first run's results plus the rows of files no
    longer listed (synthetic_results), `rows` in all: does a re-run grow with the earlier results, the archive
    unchanged?"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.tables import RESULTS_SCHEMA, ROWS_PER_BATCH

    first = os.path.join(work, f"score-{count}")
    history = os.path.join(work, f"history-{rows}")
    synthetic_results(os.path.join(history, "gone"), rows - count)
    tables = [pq.read_table(os.path.join(folder, "results.parquet")).cast(RESULTS_SCHEMA)
              for folder in (first, os.path.join(history, "gone"))]
    pq.write_table(pa.concat_tables(tables), os.path.join(history, "results.parquet"), row_group_size=ROWS_PER_BATCH)
    shutil.copy(os.path.join(first, "errors.parquet"), history)
    output = os.path.join(work, f"history-rerun-{count}")
    shutil.rmtree(output, ignore_errors=True)
    archive = os.path.join(work, f"archive-{count}")
    evict_from_page_cache(archive)
    row = run_watched(["score", "--input", archive, "--model", model, "--output", output, "--skip-known",
                       os.path.join(history, "results.parquet")], output, count, f"re-run, {rows} known")
    row["known_rows"] = rows
    print_row(row)
    return row


def bench_builtin(work: str, count: int, pictures: List[bytes]) -> dict:
    """score with the built-in model: a 4-scan warm-up (the built-in model's first export is cached), then timed."""
    warm = os.path.join(work, "archive-warmup")
    if not os.path.isdir(warm):
        write_archive(warm, 4, pictures)
    run_watched(["score", "--input", warm, "--output", os.path.join(work, "builtin-warmup")],
                os.path.join(work, "builtin-warmup"), 4, "warm-up")
    archive = os.path.join(work, f"archive-{count}")
    if not os.path.isdir(archive):
        write_archive(archive, count, pictures)
    output = os.path.join(work, f"builtin-{count}")
    shutil.rmtree(output, ignore_errors=True)
    row = run_watched(["score", "--input", archive, "--output", output], output, count, "score, built-in model")
    print_row(row)
    # The nightly case: the same archive again, unchanged, against the first run's results.
    again = os.path.join(work, f"builtin-rerun-{count}")
    shutil.rmtree(again, ignore_errors=True)
    evict_from_page_cache(archive)
    rerun = run_watched(["score", "--input", archive, "--output", again, "--skip-known",
                         os.path.join(output, "results.parquet")], again, count, "re-run, built-in model")
    print_row(rerun)
    print(f"  built-in model: re-run time / first run's = {rerun['wall_s'] / row['wall_s']:.2f}  (target <= 0.15)")
    return row


def synthetic_results(folder: str, count: int) -> None:
    """A score output folder whose results.parquet holds `count` rows shaped like a nightly run's (a third each
    auto_rotate, review, ok; uris of files that are not there: the report shows grey tiles), and its run.json."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, ROWS_PER_BATCH

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    n = count
    decisions = np.array(["auto_rotate", "review", "ok"])[rng.integers(0, 3, n)]
    orientation = rng.dirichlet(np.ones(4), n).astype(np.float32)
    classes = rng.dirichlet(np.ones(2), n).astype(np.float32)
    columns = {
        "uri": [f"/nonexistent/archive/b{i // 1000:05d}/scan{i:08d}.jpg" for i in range(n)],
        "page": np.zeros(n, np.int64), "sha256": [f"{i:064x}" for i in range(n)],
        "fingerprint": [f"local:3100000:{1796600000000000000 + i}" for i in range(n)],
        "format": ["jpeg"] * n, "width": np.full(n, 6000), "height": np.full(n, 4000),
        "exif_orientation": np.ones(n, np.int64), "class_name": np.array(["page", "photo"])[classes.argmax(1)],
        "class_id": classes.argmax(1).astype(np.int64), "class_confidence": classes.max(1).astype(np.float64),
        "class_probabilities": pa.FixedSizeListArray.from_arrays(classes.ravel(), 2).cast(pa.list_(pa.float32())),
        "orientation_degrees": orientation.argmax(1).astype(np.int64) * 90,
        "orientation_confidence": orientation.max(1).astype(np.float64),
        "orientation_probabilities": pa.FixedSizeListArray.from_arrays(orientation.ravel(), 4).cast(
            pa.list_(pa.float32())),
        "tta_agreement": np.full(n, 1.0), "text_lines": pa.nulls(n, pa.int64()), "text_crops": np.ones(n, np.int64),
        "decision": decisions, "review_reason": np.where(decisions == "review", "orientation unsure (p 0.61)", ""),
        "model_name": ["archive_vision"] * n, "model_version": np.ones(n, np.int64), "reused": np.zeros(n, bool),
        "corrected_uri": pa.nulls(n, pa.string()), "corrected_method": pa.nulls(n, pa.string()),
        "corrected_orientation": pa.nulls(n, pa.int64()),
    }
    table = pa.table({name: pa.array(columns[name], RESULTS_SCHEMA.field(name).type)
                      if not isinstance(columns[name], pa.Array) else columns[name] for name in RESULTS_SCHEMA.names})
    # Row groups of ROWS_PER_BATCH rows, as the jobs write them (pipelines.tables.merge_parts).
    pq.write_table(table.cast(RESULTS_SCHEMA), os.path.join(folder, "results.parquet"), row_group_size=ROWS_PER_BATCH)
    pq.write_table(ERRORS_SCHEMA.empty_table(), os.path.join(folder, "errors.parquet"))
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"model": {"name": "archive_vision", "version": 1, "class_names": ["page", "photo"]},
                   "counts": {"inputs": n, "inputs_ok": n, "inputs_failed": 0, "reconciled": True}}, f)


def bench_report(work: str, counts: List[int]) -> List[dict]:
    """`archive-vision report` over synthetic results tables of each size: the launcher's peak RSS."""
    rows = []
    for count in counts:
        folder = os.path.join(work, f"report-{count}")
        if not os.path.exists(os.path.join(folder, "results.parquet")):
            synthetic_results(folder, count)
        row = run_watched(["report", folder], folder, count, "report")
        rows.append(row)
        print_row(row)
    if len(rows) > 1:
        ratio = rows[-1]["launcher_mb"] / rows[0]["launcher_mb"]
        print(f"  report: peak at {counts[-1]} rows / at {counts[0]} = {ratio:.2f}  (a batch at a time: ~1)")
    return rows


HEADER = (f"  {'run':<24}{'images':>8}{'wall s':>9}{'ms/image':>10}{'launcher MB':>13}{'worker MB':>11}"
          f"{'tree MB':>9}{'read MB':>9}  run.json counters")


def print_row(row: dict) -> None:
    counters = ", ".join(f"{k} {v}" for k, v in sorted(row["counters"].items())) or "-"
    print(f"  {row['run']:<24}{row['images']:>8}{row['wall_s']:>9.1f}{row['s_per_image'] * 1000:>10.2f}"
          f"{row['launcher_mb']:>13.0f}{row['worker_mb']:>11.0f}{row['tree_mb']:>9.0f}"
          f"{row['read_bytes'] / 1e6:>9.1f}  {counters}", flush=True)


def check_targets(rows: List[dict], sizes: List[int]) -> List[str]:
    """The issue's targets, one line each."""
    lines = []
    history = [r for r in rows if "known_rows" in r]
    for row in history:  # the same archive re-run against more earlier rows
        same = next(r for r in rows if r["run"] == "score re-run" and r["images"] == row["images"])
        for what in ("launcher_mb", "worker_mb"):
            lines.append(f"  score re-run: {what.split('_')[0]} peak with {row['known_rows']} earlier rows / with "
                         f"{row['images']} = {row[what] / same[what]:.2f}  (target <= 1.3)")
    for job in ("ingest", "score", "score re-run"):
        by_size = {r["images"]: r for r in rows if r["run"] == job}
        if len(by_size) < 2:
            continue
        small, large = by_size[sizes[0]], by_size[sizes[-1]]
        for size in sizes[1:] if job != "score re-run" else ():  # a re-run's time: against the first run's
            ratio = by_size[size]["s_per_image"] / small["s_per_image"]
            lines.append(f"  {job}: s/image at {size} / at {sizes[0]} = {ratio:.2f}  (target <= 1.2)")
        prior = by_size[sizes[-2]]
        for what in ("launcher_mb", "worker_mb"):
            ratio = large[what] / max(prior[what], 1e-9)
            lines.append(f"  {job}: {what.split('_')[0]} peak at {sizes[-1]} / at {sizes[-2]} = {ratio:.2f}"
                         f"  (target <= 1.3)")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="archive sizes, comma-separated")
    parser.add_argument("--builtin-images", type=int, default=500, help="scans scored with the built-in model "
                        "(0: skip)")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: sizes {QUICK_SIZES}, no built-in run")
    parser.add_argument("--out", default=os.path.join(REPO, "bench-out", "scale"), help="work folder")
    parser.add_argument("--json", default="", help="also write every row here")
    parser.add_argument("--keep", action="store_true", help="keep the archives and outputs")
    parser.add_argument("--history-rows", type=int, default=400_000,
                        help="re-run the second-largest archive against this many earlier rows (0: skip)")
    parser.add_argument("--report-rows", default="100000,1000000",
                        help="`archive-vision report` over synthetic results tables of these sizes ('': none)")
    args = parser.parse_args(argv)
    sizes = sorted(QUICK_SIZES if args.quick else {int(s) for s in args.sizes.split(",") if s.strip()})
    builtin = 0 if args.quick else args.builtin_images
    os.makedirs(args.out, exist_ok=True)
    pictures = base_pictures()
    model = export_tiny_model(os.path.join(args.out, "tiny-model"))
    print(f"archives of {', '.join(map(str, sizes))} scans ({DISTINCT_PICTURES} distinct 320x240 JPEGs, "
          f"{sum(map(len, pictures)) // len(pictures) // 1000} KB on average); peaks are RSS high-water marks")
    print(HEADER)
    rows = []
    try:
        for count in sizes:
            rows += bench_size(args.out, count, pictures, model)
        history = sizes[-2] if len(sizes) > 1 else sizes[0]
        if args.history_rows > history and not args.quick:
            rows.append(bench_history(args.out, history, args.history_rows, model))
        if builtin:
            rows.append(bench_builtin(args.out, builtin, pictures))
        report_rows = [] if args.quick else sorted(int(r) for r in args.report_rows.split(",") if r.strip())
        if report_rows:
            rows += bench_report(args.out, report_rows)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        if not args.keep:
            for name in os.listdir(args.out):
                if name != "tiny-model":
                    path = os.path.join(args.out, name)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    for line in check_targets(rows, sizes):
        print(line)


if __name__ == "__main__":
    main()
