"""The served path on the held-out split: a raw TF Serving client gets score's answer, how right it is, how fast.

    python bench/served.py --corpus CORPUS [--sparse 40] [--peer-images N] [--rounds 3] [--out bench-out/served]

1. Every held-out test image of the corpus (photos split by source file, pages by PDF) is written turned
   0/90/180/270 degrees clockwise as a file (photos as JPEG q95, pages as PNG), with generated nearly blank pages
   (archive_vision.sample_archive.render_sparse_page: one or two short lines) beside them, and a truth.csv.
2. The built-in model is exported and served by `archive-vision serve` on 127.0.0.1; a raw client built on
   `tensorflow_serving.apis` alone sends each file's bytes (Predict, `serving_default`) and keeps the answers.
3. `archive-vision score` scores the same folder in-process (Beam RunInference on the same SavedModel) with the
   truth; every file's answer is compared with the raw client's: degrees, decision and probabilities.
4. Accuracy per kind (photos, pages, nearly blank pages; all, and only the images with an up), and the two bands
   that act: auto_rotate and ok, each with how many of its answers are right.
5. Speed on one core, in one child process pinned to it: the whole answer (file bytes -> the graph's answer,
   batches of 8) beside docorient and Tesseract OSD on the same images (each decoding the file on the clock): every
   upright held-out file of each kind unless --peer-images says fewer. The whole answer and docorient take turns
   for --rounds rounds (their speeds are the medians; the page ratio is the median of the rounds' ratios, each
   printed), so that a machine whose speed drifts during the run moves both alike; Tesseract runs once. Each round
   also times fixed work of the two kinds a page costs (zlib inflating PNG data; the crop classifier in
   onnxruntime), so that a ratio can be read against the machine it was measured on: the whole answer spends more
   of a page in convolutions than docorient, so a host with slow or shared vector units lowers the ratio.
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

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TURNS = (0, 90, 180, 270)
SPARSE = "sparse page"


def write_turned_files(corpus_root: str, out: str, sparse: int) -> List[Dict[str, object]]:
    """The held-out images turned four ways as files under `out`, and the truth rows (uri, orientation, kind, up)."""
    from PIL import Image

    from archive_vision.sample_archive import render_sparse_page
    from research import orientation_corpus as corpus

    ops = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    every = corpus.load_corpus(corpus_root)
    test = corpus.select(every, splits=(corpus.TEST,))
    try:
        ups = corpus.has_up(test, corpus_root, corpus.load_no_up())
    except OSError:
        ups = [True] * len(test)
    sources = [(image.path, image.kind, up) for image, up in zip(test, ups)]
    rows = []
    os.makedirs(out, exist_ok=True)
    for index, (path, kind, up) in enumerate(sources):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        for turn in TURNS:
            turned = image if turn == 0 else image.transpose(ops[turn])
            ext = "jpg" if kind == corpus.PHOTO else "png"
            name = os.path.join(out, f"{kind}-{index:04d}-{turn:03d}.{ext}")
            turned.save(name, "JPEG" if ext == "jpg" else "PNG", **({"quality": 95} if ext == "jpg" else {}))
            rows.append({"uri": name, "orientation": turn, "label": kind, "up": up})
    for seed in range(sparse):
        image = render_sparse_page(seed)
        for turn in TURNS:
            name = os.path.join(out, f"sparse-{seed:04d}-{turn:03d}.png")
            (image if turn == 0 else image.transpose(ops[turn])).save(name, "PNG")
            rows.append({"uri": name, "orientation": turn, "label": SPARSE, "up": True})
    return rows


def raw_predict(address: str, model_name: str, paths: Sequence[str], batch: int = 8) -> Dict[str, dict]:
    """Each file's bytes through TF Serving's Predict API with nothing but tensorflow_serving.apis and grpc."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20),
                                                      ("grpc.max_receive_message_length", 256 << 20)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    answers: Dict[str, dict] = {}
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = "serving_default"
        blobs = []
        for path in chunk:
            with open(path, "rb") as f:
                blobs.append(f.read())
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string))
        response = stub.Predict(request, timeout=300)
        outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        for i, path in enumerate(chunk):
            answers[path] = {"probabilities": outputs["orientation_probabilities"][i].astype(np.float32),
                             "degrees": int(outputs["orientation_degrees"][i]),
                             "decision": outputs["decision"][i].decode()}
    channel.close()
    return answers


def score_in_process(folder: str, version_dir: str, out: str, truth: str) -> Dict[str, dict]:
    """`archive-vision score --model VERSION` over the folder: uri -> its row's answer."""
    import pyarrow.parquet as pq

    command = [sys.executable, "-m", "archive_vision", "score", "--input", folder, "--output", out, "--model",
               version_dir, "--truth", truth, "--direct_num_workers", "2", "--direct_running_mode",
               "multi_processing"]
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = pq.read_table(os.path.join(out, "results.parquet")).to_pylist()
    return {r["uri"]: {"probabilities": np.asarray(r["orientation_probabilities"], np.float32),
                       "degrees": r["orientation_degrees"], "decision": r["decision"]} for r in rows}


def accuracy_table(truth: List[dict], answers: Dict[str, dict]) -> List[List[str]]:
    """Rows: kind, images, 4-way right, with an up, auto_rotate (n, right), ok (n, right), review share."""
    table = []
    for kind in ("photo", "page", SPARSE):
        rows = [t for t in truth if t["label"] == kind and t["uri"] in answers]
        if not rows:
            continue
        right = [answers[t["uri"]]["degrees"] == t["orientation"] for t in rows]
        with_up = [r for r, t in zip(right, rows) if t["up"]]
        cells = [kind, str(len(rows)), f"{np.mean(right):.1%}", f"{np.mean(with_up):.2%}" if with_up else "-"]
        for band in ("auto_rotate", "ok"):
            chosen = [r for r, t in zip(right, rows) if answers[t["uri"]]["decision"] == band]
            cells.append(f"{len(chosen)} ({sum(chosen)} right)")
        cells.append(f"{np.mean([answers[t['uri']]['decision'] == 'review' for t in rows]):.0%}")
        table.append(cells)
    return table


SPEED_CHILD = r"""
import json, os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
os.environ["OMP_NUM_THREADS"] = "1"
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
version_dir, paths_json, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
groups = json.loads(paths_json)
model = tf.saved_model.load(version_dir)
answer = model.signatures["serving_default"]
answer(images=tf.constant([open(groups["page"][0], "rb").read()]))  # traced once, off the clock


def graph(paths, size=8):
    started = time.perf_counter()
    for i in range(0, len(paths), size):
        answer(images=tf.constant([open(p, "rb").read() for p in paths[i:i + size]]))
    return len(paths) / (time.perf_counter() - started)


try:
    import docorient
    from PIL import Image

    def peer(paths):
        started = time.perf_counter()
        for p in paths:
            with Image.open(p) as im:
                docorient.detect_orientation(im.convert("RGB"))
        return len(paths) / (time.perf_counter() - started)

    with Image.open(groups["page"][0]) as im:  # its onnxruntime session made once, off the clock, as the graph's trace
        docorient.detect_orientation(im.convert("RGB"))
except ImportError:
    peer = None
# The machine in each round: the same fixed work of the two kinds a page costs, timed beside the methods. Scalar:
# zlib inflating pages' PNG data (most of either method's decode). Vector: the crop classifier in onnxruntime on
# fixed pixels (the whole answer spends most of its network time in such convolutions; docorient runs one small
# network on a page). A host whose vector units are shared or clocked down slows the whole answer more than
# docorient, and these two figures say so beside each round's ratio.
import numpy as np, zlib
sys.path.insert(0, "bench")
from served import png_data

streams = [png_data(open(p, "rb").read()) for p in groups["page"][:20]]
try:
    from trainer.text_crops import model_path, onnx_session
    crop_session = onnx_session(model_path())
    crop_feed = {crop_session.get_inputs()[0].name:
                 np.random.default_rng(0).normal(size=(8, 3, 224, 224)).astype(np.float32)}
    crop_session.run(None, crop_feed)
except RuntimeError:  # without onnxruntime or the model (TextLinesUnavailable, TextCropsUnavailable): the inflate alone
    crop_session = None


def probe(out):
    started = time.perf_counter()
    for stream in streams:
        zlib.decompress(stream)
    out.setdefault("probe inflate ms", []).append((time.perf_counter() - started) / max(1, len(streams)) * 1e3)
    if crop_session is not None:
        started = time.perf_counter()
        for _ in range(5):
            crop_session.run(None, crop_feed)
        out.setdefault("probe crop ms", []).append((time.perf_counter() - started) / 40 * 1e3)


# The whole answer and docorient take turns, kind by kind, `rounds` times: a machine whose speed drifts during the
# run (another tenant, the clock) moves both alike, and each round's ratio is one measurement of the same thing.
out = {}
for _ in range(rounds):
    probe(out)
    for kind, paths in groups.items():
        out.setdefault(f"graph {kind}", []).append(graph(paths))
        if peer is not None:
            out.setdefault(f"docorient {kind}", []).append(peer(paths))
# How the graph's throughput depends on the batch (what TF Serving's batching can win): pages, batches of 1 and 32.
pages = (groups["page"] * 2)[:32]
for size in (1, 32):
    out[f"graph page batch {size}"] = [graph(pages, size)]
import shutil, subprocess
if shutil.which("tesseract"):
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    for kind, paths in groups.items():
        started = time.perf_counter()
        for p in paths:
            subprocess.run(["tesseract", p, "-", "--psm", "0"], capture_output=True, env=env, check=False)
        out[f"tesseract {kind}"] = [len(paths) / (time.perf_counter() - started)]
print(json.dumps(out))
"""


def speeds(version_dir: str, groups: Dict[str, List[str]], rounds: int = 3) -> Dict[str, List[float]]:
    """images/s on one core, each measurement: the whole answer and docorient (taking turns, `rounds` times), then
    Tesseract OSD (when installed) once, on the same files."""
    result = subprocess.run([sys.executable, "-c", SPEED_CHILD, version_dir, json.dumps(groups), str(rounds)],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed_ratios(measured: Dict[str, List[float]], kind: str = "page") -> List[float]:
    """The whole answer's images/s over docorient's, round by round (each pair measured one after the other)."""
    return [graph / peer for graph, peer in zip(measured.get(f"graph {kind}", []),
                                                 measured.get(f"docorient {kind}", []))]


def png_data(data: bytes) -> bytes:
    """The zlib stream of a PNG file: its IDAT chunks' data, joined (what the speed child inflates as the machine's
    scalar probe)."""
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + size])
        pos += 12 + size
    return b"".join(chunks)


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or the platform's word for it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine_line(machine: Dict[str, object]) -> str:
    """The machine in each round: the fixed scalar and vector work the speed child timed beside the methods."""
    parts = []
    for key, what in (("probe inflate ms", "inflating a page's PNG data (zlib)"),
                      ("probe crop ms", "a text crop through PP-LCNet (onnxruntime)")):
        if machine.get(key):
            parts.append(f"{what} " + ", ".join(f"{value:.1f}" for value in machine[key]) + " ms")
    return f"the machine ({machine.get('cpu', '?')}), round by round: " + "; ".join(parts or ["not probed"])


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder build_train.sh wrote (photos/, docs/)")
    parser.add_argument("--sparse", type=int, default=40, help="generated nearly blank pages (each in 4 turns)")
    parser.add_argument("--peer-images", type=int, default=0,
                        help="files per kind timed on one core (0: every upright held-out file; the graph's gates make "
                             "its speed depend on the files, so a few are not a fair sample)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds in which the whole answer and docorient take turns on the same files (the "
                             "speeds are their medians, and the page ratio the median of the rounds' ratios)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench-out", "served"))
    parser.add_argument("--keep", action="store_true", help="reuse the turned files of an earlier run")
    args = parser.parse_args(argv)

    from archive_vision.demo import LocalServer
    from serving.builtin import builtin_model_dir

    files = os.path.join(args.out, "files")
    truth_path = os.path.join(args.out, "truth.csv")
    if not (args.keep and os.path.exists(truth_path)):
        shutil.rmtree(files, ignore_errors=True)
        truth = write_turned_files(args.corpus, files, args.sparse)
        with open(truth_path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["uri", "orientation", "label", "up"])
            writer.writeheader()
            writer.writerows(truth)
    with open(truth_path, newline="") as f:
        truth = [dict(r, orientation=int(r["orientation"]), up=r["up"] == "True") for r in csv.DictReader(f)]
    print(f"{len(truth)} files: " + ", ".join(f"{k} {sum(t['label'] == k for t in truth)}"
                                               for k in ("photo", "page", SPARSE)), flush=True)
    version_dir = builtin_model_dir()
    server = LocalServer(os.path.dirname(version_dir), os.path.basename(os.path.dirname(version_dir)),
                         os.path.join(args.out, "server.log"))
    try:
        server.wait_until_available()
        started = time.time()
        served = raw_predict(server.address, server.model_name, [t["uri"] for t in truth])
        print(f"raw Predict over {len(served)} files: {time.time() - started:.0f}s", flush=True)
    finally:
        server.stop()
    started = time.time()
    scored = score_in_process(files, version_dir, os.path.join(args.out, "score"), truth_path)
    print(f"score in-process over {len(scored)} files: {time.time() - started:.0f}s", flush=True)

    same_degrees = sum(served[u]["degrees"] == scored[u]["degrees"] for u in served if u in scored)
    same_decision = sum(served[u]["decision"] == scored[u]["decision"] for u in served if u in scored)
    gap = max(float(np.max(np.abs(served[u]["probabilities"] - scored[u]["probabilities"])))
              for u in served if u in scored)
    print(f"\nserved == score: degrees {same_degrees} of {len(served)}, decisions {same_decision} of {len(served)}, "
          f"largest probability difference {gap:.2g} (files score could not read: {len(served) - len(scored)})")
    header = ["raw Predict, file bytes", "files", "4-way right", "with an up", "auto_rotate", "ok", "review"]
    print("\n" + markdown(header, accuracy_table(truth, served)))
    score_rows = accuracy_table(truth, scored)
    print("\n" + markdown(["archive-vision score"] + header[1:], score_rows))

    upright = [t for t in truth if t["orientation"] == 0]
    groups = {kind: [t["uri"] for t in upright if t["label"] == kind][:args.peer_images or None]
              for kind in ("page", "photo", SPARSE)}
    measured = speeds(version_dir, groups, args.rounds)
    machine = dict(cpu=cpu_model(), **{key: measured.pop(key) for key in list(measured) if key.startswith("probe ")})
    median = {key: float(np.median(values)) for key, values in measured.items()}
    rows = []
    for method in ("graph", "docorient", "tesseract"):
        cells = [f"{median[f'{method} {k}']:.2f}" if f"{method} {k}" in median else "-" for k in groups]
        rows.append([{"graph": "whole answer (the SavedModel)", "docorient": "docorient 0.4.1",
                      "tesseract": "Tesseract OSD"}[method]] + cells)
    print(f"\nimages/s on one core (file bytes -> answer), the same files (the median of {args.rounds} rounds in "
          "which the whole answer and docorient take turns; Tesseract once):")
    print(markdown(["method"] + [f"{k}s/s" for k in groups], rows))
    print(f"whole answer on pages, batches of 1 vs 32: {median['graph page batch 1']:.2f} vs "
          f"{median['graph page batch 32']:.2f} pages/s")
    ratios = speed_ratios(measured)
    if ratios:
        print(f"whole answer / docorient on pages: {np.median(ratios):.2f}x, the median of its rounds ("
              + ", ".join(f"{g:.2f} / {d:.2f} = {r:.2f}x" for g, d, r in zip(measured["graph page"],
                                                                         measured["docorient page"], ratios)) + ")")
    print(machine_line(machine))
    for peer, install in (("docorient", "pip install -e '.[bench]'"),
                          ("tesseract", "apt-get install tesseract-ocr tesseract-ocr-osd")):
        if f"{peer} page" not in measured:  # the speed target is a ratio to docorient: say why a row is empty
            print(f"NOTE: {peer} is not installed, so its row is empty ({install})")
    with open(os.path.join(args.out, "served.json"), "w") as f:
        json.dump({"same_degrees": same_degrees, "same_decisions": same_decision, "files": len(served),
                   "largest_probability_difference": gap, "speeds": median, "rounds": measured,
                   "page_ratios": ratios, "machine": machine}, f, indent=1)
    return 0 if same_degrees == same_decision == len(served) else 1


if __name__ == "__main__":
    sys.exit(main())
