"""Serving benchmark: in-process SavedModel calls vs the local gRPC server + client, side by side in one run.

    python bench/serving.py [--images 256] [--batch_size 32] [--image_size 224] [--requests 200]

Throughput: the same encoded photos (realistic sizes, 640x480-ish JPEGs) at the same batch size, in process
and through `python -m serving.server` + GrpcModelServerClient. Latency: single-image requests from 1 and
16 concurrent clients (p50/p99), the 16-client case going through server-side batching. The model is small
(a few convolutions) so the figures show the serving overhead rather than the backbone.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL = "archive_vision"


def make_photos(count: int, seed: int = 0) -> List[bytes]:
    """Encoded JPEG 'scans' of varied realistic sizes with texture (so JPEG sizes are realistic too)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    for i in range(count):
        width, height = [(640, 480), (480, 640), (800, 600), (1024, 768)][i % 4]
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
        noise = rng.integers(0, 40, size=(height, width, 3))
        buf = io.BytesIO()
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        photos.append(buf.getvalue())
    return photos


def make_small_model(image_size: int):
    """A few strided convolutions with both heads, following the trainer's model contract."""
    import keras

    keras.utils.set_random_seed(0)
    pixels = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(pixels)
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(pixels, {"class_probabilities": keras.layers.Dense(3, activation="softmax")(x),
                                "orientation_probabilities": keras.layers.Dense(4, activation="softmax")(x)})


def free_port() -> int:
    """A currently free 127.0.0.1 port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images_per_second(run_batch: Callable[[Sequence[bytes]], object], images: Sequence[bytes],
                      batch_size: int, repeats: int = 2) -> float:
    """Best of `repeats` passes over all images in batches of batch_size (first call excluded as warmup)."""
    run_batch(images[:batch_size])
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            run_batch(images[i:i + batch_size])
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def latencies_ms(call_one: Callable[[bytes], object], images: Sequence[bytes], clients: int,
                 requests: int) -> np.ndarray:
    """Per-request latency (ms) of `requests` single-image calls spread over `clients` threads."""
    results: List[float] = []
    lock = threading.Lock()
    per_client = max(1, requests // clients)

    def client(index: int) -> None:
        mine = []
        for k in range(per_client):
            start = time.perf_counter()
            call_one(images[(index * per_client + k) % len(images)])
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            results.extend(mine)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return np.array(results)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=192, help="single-image requests per latency row")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from serving import configs, export
    from serving.client import GrpcModelServerClient

    photos = make_photos(args.images)
    print(f"{len(photos)} JPEGs, mean {np.mean([len(p) for p in photos]) / 1024:.0f} KiB; model input "
          f"{args.image_size}px; batch {args.batch_size}; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as base:
        version_dir = export.export_model(make_small_model(args.image_size), base, class_names=["a", "b", "c"],
                                          image_size=args.image_size, version=1)
        configs.write_batching_parameters(base, configs.BatchingParameters(
            max_batch_size=args.batch_size, batch_timeout_micros=2000, num_batch_threads=2))
        port = free_port()
        log = open(os.path.join(base, "server.log"), "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--port", str(port), "--model_name", MODEL,
             "--model_base_path", os.path.join(base, MODEL), "--enable_batching", "--batching_parameters_file",
             os.path.join(base, configs.BATCHING_PARAMETERS), "--file_system_poll_wait_seconds", "0"],
            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT), stdout=log, stderr=subprocess.STDOUT)
        try:
            signature = tf.saved_model.load(version_dir).signatures["serving_default"]

            def in_process(batch: Sequence[bytes]):
                return {k: v.numpy() for k, v in signature(images=tf.constant(list(batch))).items()}

            client = GrpcModelServerClient(f"127.0.0.1:{port}", MODEL, max_batch_images=args.batch_size,
                                           max_in_flight=1, max_message_bytes=64 * 1024 * 1024, timeout_s=120)
            client.wait_until_available(180)

            # Interleaved so both sides see the same machine load (the cores may be shared).
            local_rate = images_per_second(in_process, photos, args.batch_size)
            grpc_rate = images_per_second(client.predict, photos, args.batch_size)
            local_rate = max(local_rate, images_per_second(in_process, photos, args.batch_size, repeats=1))
            rows = []
            for clients in (1, 16):
                local = latencies_ms(lambda image: in_process([image]), photos, clients, args.requests)
                remote = latencies_ms(lambda image: client.predict([image]), photos, clients, args.requests)
                rows.append((clients, local, remote))
            client.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()

    print()
    print(f"{'':40}{'in-process':>14}{'gRPC server':>14}{'ratio':>8}")
    print(f"{'throughput, images/s (batch ' + str(args.batch_size) + ')':40}{local_rate:14.1f}{grpc_rate:14.1f}"
          f"{grpc_rate / local_rate:8.2f}")
    for clients, local, remote in rows:
        for pct in (50, 99):
            label = f"latency p{pct}, ms ({clients} client{'s' if clients > 1 else ''}, 1 image)"
            a, b = np.percentile(local, pct), np.percentile(remote, pct)
            print(f"{label:40}{a:14.1f}{b:14.1f}{b / a:8.2f}")
    print(f"\ntarget: gRPC throughput >= 0.85 x in-process -> {'met' if grpc_rate >= 0.85 * local_rate else 'NOT met'}"
          f" ({grpc_rate / local_rate:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
