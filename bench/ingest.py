"""Ingest benchmark: what a large JPEG scan costs per stage, and how the pipeline scales with workers.

    python bench/ingest.py [--images 24] [--pipeline-images 600] [--size 256]

Part 1 (one process, same files, interleaved rounds): images/s of
  (a) naive     full-resolution decode, then resize
  (b) project   DCT-domain downscaled decode (PIL draft) + resize   <- what ingest does
  (c) floor     the DCT-domain downscaled decode alone (no resize)
Part 2: the whole ingest pipeline (DirectRunner, multi-processing) with 1 and 2 workers.
Targets (issue 2): (b) >= 3.5x (a), (b) >= 0.85 (c), 2 workers >= 1.7x 1 worker.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipelines import imaging  # noqa: E402


# Scan profiles: JPEG decode cost is dominated by Huffman (entropy) decoding, which DCT-domain scaling
# cannot skip, so the speed-up depends on how many bytes a scan has per pixel.
PROFILES = {
    "typical": {"grain": 3, "quality": 85, "what": "archive scan, q85, light grain"},
    "heavy-grain": {"grain": 12, "quality": 92, "what": "noisy high-ISO camera file, q92"},
}


def make_scan(width: int, height: int, seed: int, grain: int, quality: int) -> bytes:
    """A 6000x4000 JPEG: smooth structure plus sensor-like grain of +-`grain` levels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 40, width // 40, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-grain, grain + 1, size=(height, width, 1),
                                                              dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def naive(data: bytes, size: int) -> Image.Image:
    return imaging.full_decode_then_resize(data, size, "pad")


def project(data: bytes, size: int) -> Image.Image:
    page = next(imaging.decode_pages(data, draft_for=(size, "pad")))
    return imaging.resize(page.image, size, "pad")


def floor(data: bytes, size: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", imaging.target_draft_size(image.size[0], image.size[1], size, "pad"))
    image.load()
    return image


def time_stage(fn, scans, size, rounds):
    """Median images/s over `rounds` passes over every scan."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for data in scans:
            fn(data, size)
        rates.append(len(scans) / (time.perf_counter() - start))
    return statistics.median(rates)


def run_pipeline(src: str, workers: int, size: int) -> float:
    out = tempfile.mkdtemp(prefix=f"bench-ingest-{workers}w-")
    cmd = [sys.executable, "-m", "archive_vision.cli", "ingest", "--input", src, "--output", out, "--size",
           str(size), "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="distinct 6000x4000 scans for part 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline-images", type=int, default=480, help="files in the part 2 archive")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    stages = (("naive", naive), ("project", project), ("floor", floor))
    scans_by_profile = {}
    print(f"per-image decode + resize to {args.size}px of 6000x4000 JPEGs, one core, median of {args.rounds} "
          f"interleaved rounds over {args.images} scans:")
    print(f"  {'profile':<12}{'MB/file':>8}{'(a) naive':>11}{'(b) project':>13}{'(c) floor':>11}"
          f"{'(b)/(a)':>9}{'(b)/(c)':>9}   (images/s; targets (b)/(a) >= 3.5, (b)/(c) >= 0.85)")
    for profile, spec in PROFILES.items():
        scans = [make_scan(6000, 4000, seed, spec["grain"], spec["quality"]) for seed in range(args.images)]
        scans_by_profile[profile] = scans
        for _, fn in stages:
            fn(scans[0], args.size)  # warm caches and lazy imports
        rates = {name: [] for name, _ in stages}
        for _ in range(args.rounds):  # interleave so drift on a shared machine hits all three alike
            for name, fn in stages:
                rates[name].append(time_stage(fn, scans, args.size, 1))
        a, b, c = (statistics.median(rates[k]) for k in ("naive", "project", "floor"))
        print(f"  {profile:<12}{np.mean([len(x) for x in scans]) / 1e6:>8.1f}{a:>11.1f}{b:>13.1f}{c:>11.1f}"
              f"{b / a:>8.2f}x{b / c:>9.2f}   ({spec['what']})", flush=True)
    scans = scans_by_profile["typical"]

    src = tempfile.mkdtemp(prefix="bench-ingest-src-")
    for i in range(args.pipeline_images):
        with open(os.path.join(src, f"scan{i:05d}.jpg"), "wb") as f:
            f.write(scans[i % len(scans)])
    print(f"\nwhole ingest pipeline, {args.pipeline_images} scans (DirectRunner multi-processing, incl. start-up):")
    times = {}
    for workers in (1, 2):
        times[workers] = run_pipeline(src, workers, args.size)
        print(f"  {workers} worker{'s' if workers > 1 else ' '}  {times[workers]:7.1f} s  "
              f"{args.pipeline_images / times[workers]:7.1f} images/s", flush=True)
    print(f"  2 workers / 1 worker = {times[1] / times[2]:.2f}x   (target >= 1.7x)")
    shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
