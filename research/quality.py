"""Orientation quality benchmark on the corpus' held-out `test` split: the default model vs Tesseract OSD and docorient.

    python -m research.quality --corpus /work/corpus/data [--peer-images 60] [--cores 1]

Every held-out image (photos split by source file, pages by PDF; see research.orientation_corpus) is
turned 0/90/180/270 degrees clockwise and each method must name the turn (4-way accuracy over all turns).
Rows, side by side in one run:

- default model: the shipped head on the frozen MobileNetV2 (trainer.default_model), 224 px letterbox, run as
  export and score run it (BatchNorm folded into the convolutions, trainer.inference);
- + test-time turns: each image also turned 90/180/270 more, answers rolled back and averaged (score --tta);
- turned as files: the same two, with each turn made on the image file before the letterbox (as a turned scan
  arrives) instead of on the letterboxed square as everywhere else; the guard that turning the square is fair;
- + test-time turns when unsure: the turned copies only for images whose own answer is below the head's
  `tta_below` (score's built-in default, --tta-below; or this script's --tta-below); no row of its own when the
  threshold is 1.0, since every image is then turned;
- + text lines: the text-line evidence of PP-OCR's line detector and direction classifier (trainer.text_lines)
  fused into the images whose answer after the turned copies is below the head's `text_lines.below` (score's
  built-in default, --text-lines; or this script's --text-lines-below), with the head's fitted weights;
- + text crops: PaddleClas' text-image orientation classifier on five crops (trainer.text_crops), read for the
  images whose stored copy is below the head's `text_crops.below`, fused before the turned copies are decided on
  and into their answer, then the text lines below the gate chosen with them (score's built-in default,
  --text-crops); beside it the same without the text lines;
- archive-tuned: the default head re-fitted, without labels, on one half of the held-out sources (their
  images taken as upright, the usual state of an archive), measured on the other half beside the default
  model on that same half; the mean of three tuning runs (seeds 0-2), since one run's figure moves by points.
  Then the same half as an archive with turned scans in it (a quarter, a half of its images stored turned and
  still taken as upright), tuned with the labels as stored (--orientation-labels stored) and as the orientation
  check makes them (trainer.orientation_check, train --init default's default);
- images with an up: the default model, with turns, and score's built-in default again without the images listed
  as having no up (data/orientation_corpus/no_up.tsv, made blind to every model's answers);
- Tesseract OSD (`tesseract IMG - --psm 0`) and docorient, on the first --peer-images photos and pages of
  the split (they are slow), beside the default model on the same images.

images/s is end to end (file bytes -> answer) with the process pinned to --cores cores. The `auto_rotate`
columns use score's default thresholds (rotate when the turn is not 0 and p >= 0.8): the share of turned
images that land there and how many of those are right.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from research import orientation_corpus as corpus  # noqa: E402
from research import train_default  # noqa: E402
from trainer import default_model  # noqa: E402
from research.archive_tuning import (TUNING_SEEDS, TURNED_SHARES, archive_tune, archive_tuning_runs,  # noqa: E402,F401
                                     orientation_check_of, stored_turned, tuning_half)
from research.quality_figures import calibration, write_confusions, write_misses  # noqa: E402,F401

TURNS = (0, 90, 180, 270)
# Accuracy turned on the square minus turned as files above which the bench warns of a shortcut (a JPEG decoded by
# Pillow rather than TensorFlow moves photos by about half a point; the uneven letterbox moved pages by 25).
SHORTCUT_GAP = 0.02


def builtin_tta_below() -> float:
    """The turned copies' gate the shipped head's training chose on val."""
    return float(default_model.head_metadata().get("tta_below", default_model.FALLBACK_TTA_BELOW))


def builtin_text_lines() -> dict:
    """The text-line reader's gate and weights as the shipped head records them (this lab's readers run outside the
    graph: the exported model no longer reads text lines, see docs/orientation.md)."""
    from trainer import text_lines

    recorded = default_model.head_metadata().get("text_lines") or {}
    return {"available": text_lines.available(), "below": float(recorded.get("below", 1.0)),
            "weights": tuple(float(w) for w in recorded.get("weights", (0.1, 0.1)))}


def builtin_text_crops() -> dict:
    """The text-crop reader's settings as the shipped head records them (and the gates chosen with them)."""
    from trainer import text_crops

    recorded = default_model.head_metadata().get("text_crops") or {}
    return {"available": text_crops.available(), "recorded": bool(recorded),
            "weight": float(recorded.get("weight", 0.3)), "below": float(recorded.get("below", 1.0)),
            "agree": int(recorded.get("agree", 0)), "tta_below": recorded.get("tta_below"),
            "text_lines_below": recorded.get("text_lines_below"),
            "text_lines_weights": recorded.get("text_lines_weights")}


class DefaultModelRunner:
    """The shipped model as backbone + head, so the bench can also read the pooled features for tuning."""

    def __init__(self):
        import keras
        import tensorflow as tf

        from trainer import default_model
        from trainer.model import AdaptiveGridPooling

        self.tf = tf
        self.backbone = default_model.build_default_backbone()  # with the shipped fine-tuned top blocks
        self.head = default_model.build_default_orientation_head()
        self.meta = default_model.head_metadata()
        pool = AdaptiveGridPooling(int(self.meta["grid"]))
        backbone, head = self.backbone, self.head
        self._run = tf.function(lambda x: self._outputs(backbone, head, pool, x), reduce_retracing=True)
        from serving.export import inference_model
        from trainer.preprocessing import preprocess_batch

        # What score and export run: the trained graph with its BatchNorms folded into the convolutions.
        self.trained_model = default_model.build_default_orientation_model()
        model, _ = inference_model(self.trained_model, 224)
        self.served_model = model

        # One compiled graph from bytes to probabilities, as the exported serving signature runs it.
        self._answer = tf.function(lambda blobs: model(preprocess_batch(blobs, 224), training=False),
                                   reduce_retracing=True)

        def answer_tta(blobs):
            pixels = preprocess_batch(blobs, 224)
            # The copy turned j more clockwise answers "stored turn d" at column d + j: roll back by j and average.
            turned = [model(tf.image.rot90(pixels, k=(4 - j) % 4), training=False)["orientation_probabilities"]
                      for j in range(4)]
            return tf.add_n([tf.roll(p, shift=-j, axis=-1) for j, p in enumerate(turned)]) / 4.0

        self._answer_tta = tf.function(answer_tta, reduce_retracing=True)

        def answer_once(blobs):
            pixels = preprocess_batch(blobs, 224)
            return pixels, model(pixels, training=False)["orientation_probabilities"]

        def answer_turned(pixels):
            # The three further turns only (the stored copy was already answered), rolled back and summed.
            return tf.add_n([tf.roll(model(tf.image.rot90(pixels, k=4 - j), training=False)["orientation_probabilities"],
                                     shift=-j, axis=-1) for j in (1, 2, 3)])

        self._answer_once = tf.function(answer_once, reduce_retracing=True)
        self._answer_turned = tf.function(answer_turned, reduce_retracing=True)
        del keras

    @staticmethod
    def _outputs(backbone, head, pool, pixels):
        features = backbone(pixels, training=False)
        return head(features, training=False), pool(features)

    def turned_pixels(self, image_bytes: bytes):
        """[4, 224, 224, 3]: the letterboxed image turned 0/90/180/270 clockwise (exact on the square)."""
        from trainer.preprocessing import preprocess_image_bytes

        square = preprocess_image_bytes(self.tf.constant(image_bytes), 224)
        return self.tf.stack([self.tf.image.rot90(square, k=(4 - d // 90) % 4) for d in TURNS])

    def turned_file_pixels(self, path: str):
        """[4, 224, 224, 3]: the image turned 0/90/180/270 clockwise *before* anything else, saved as a PNG and read
        back as a file, the way a turned scan reaches score."""
        from trainer.preprocessing import preprocess_image_bytes

        return self.tf.stack([preprocess_image_bytes(self.tf.constant(encode_png(turned_image(path, d))), 224)
                              for d in TURNS])

    def probabilities_and_features(self, paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """([N, 4 turns, 4], [N, 4 turns, grid, grid, 1280]) for the images at paths, turned on the square."""
        probs, feats = [], []
        for path in paths:
            with open(path, "rb") as f:
                p, g = self._run(self.turned_pixels(f.read()))
            probs.append(p.numpy())
            feats.append(g.numpy().astype(np.float16))
        return np.stack(probs), np.stack(feats)

    def probabilities_of_turned_files(self, paths: Sequence[str]) -> np.ndarray:
        """[N, 4 turns, 4] for the images turned as files (turned_file_pixels)."""
        return np.stack([self._run(self.turned_file_pixels(path))[0].numpy() for path in paths])

    def answer_bytes_tta(self, images: Sequence[bytes]) -> List[int]:
        """End-to-end answers with test-time turns: each image decoded once, its four turns in one batch."""
        out = self._answer_tta(self.tf.constant(list(images)))
        return [int(i) * 90 for i in np.argmax(out.numpy(), -1)]

    def probabilities_bytes_when_unsure(self, images: Sequence[bytes], below: float) -> np.ndarray:
        """[N, 4] as score --tta --tta-below computes them: every image once, then the three turned copies of the
        images whose top probability is below `below` (decoded once); below >= 1: every image turned."""
        if below >= 1.0:
            return self._answer_tta(self.tf.constant(list(images))).numpy()
        pixels, probs = self._answer_once(self.tf.constant(list(images)))
        probs = probs.numpy()
        unsure = np.flatnonzero(train_default.needs_turns(probs, below))
        if len(unsure):
            turned = self._answer_turned(self.tf.gather(pixels, unsure)).numpy()
            probs[unsure] = (probs[unsure] + turned) / 4.0
        return probs

    def answer_bytes_when_unsure(self, images: Sequence[bytes], below: float) -> List[int]:
        """End-to-end answers as score --tta --tta-below runs them (probabilities_bytes_when_unsure)."""
        return [int(i) * 90 for i in np.argmax(self.probabilities_bytes_when_unsure(images, below), -1)]

    def answer_bytes(self, images: Sequence[bytes]) -> List[int]:
        """End-to-end answers (degrees) for encoded images, as the score job's in-process path runs them."""
        out = self._answer(self.tf.constant(list(images)))
        return [int(i) * 90 for i in np.argmax(out["orientation_probabilities"].numpy(), -1)]


def turned_image(path: str, degrees: int):
    """The corpus image (upright) turned `degrees` clockwise, as an RGB Pillow image."""
    from PIL import Image

    ops = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    image = Image.open(path).convert("RGB")
    return image if degrees == 0 else image.transpose(ops[degrees])


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def tesseract_answer(image, workdir: str) -> Optional[int]:
    """Tesseract OSD's clockwise turn of the image (None when it gives no answer, e.g. no text)."""
    path = os.path.join(workdir, "page.png")
    image.save(path, "PNG", compress_level=1)
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    result = subprocess.run(["tesseract", path, "-", "--psm", "0"], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("Orientation in degrees:"):
            return int(line.split(":")[1]) % 360  # checked: an upright page turned 90 cw reads 90
    return None


def docorient_answer(image) -> Optional[int]:
    """docorient's clockwise turn of the image (its `angle`: an upright page turned 90 cw reads 90)."""
    import docorient

    return int(docorient.detect_orientation(image).angle) % 360


def peer_accuracy(answer: Callable[[object], Optional[int]], paths: Sequence[str]) -> Tuple[float, float]:
    """(4-way accuracy, images/s) of a peer over all turns of the images (no answer counts as wrong)."""
    right, count, spent = 0, 0, 0.0
    for path in paths:
        for degrees in TURNS:
            # Decoding the file is on the clock, as it is for the default model (bytes -> answer).
            started = time.perf_counter()
            got = answer(turned_image(path, degrees))
            spent += time.perf_counter() - started
            right += int(got == degrees)
            count += 1
    return (right / count if count else float("nan")), (count / spent if spent else float("nan"))


def shortcut_warnings(square: np.ndarray, files: np.ndarray, kinds: np.ndarray, gap: float = SHORTCUT_GAP
                      ) -> List[str]:
    """A warning per kind whose accuracy turned on the square ([N, 4 turns, 4]) is more than `gap` above (or below)
    its accuracy turned as files: the model can tell the two kinds of turn apart, so the table, which turns squares,
    does not measure turned scans."""
    warnings = []
    for kind in (corpus.PHOTO, corpus.PAGE):
        mine = kinds == kind
        if not mine.any():
            continue
        difference = train_default.accuracy(square[mine]) - train_default.accuracy(files[mine])
        if abs(difference) > gap:
            warnings.append(f"WARNING: {kind}s are {100 * difference:+.1f} points more often right turned on the "
                            f"square than turned as files: the model tells the two kinds of turn apart, and this "
                            f"table does not measure turned scans")
    return warnings


def read_all(paths: Sequence[str]) -> List[bytes]:
    """The files' bytes, in order (read before any clock starts)."""
    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append(f.read())
    return blobs


def default_speed(runner: DefaultModelRunner, paths: Sequence[str], batch: int = 16, tta: bool = False,
                  below: float = 1.0) -> float:
    """images/s of the default model from encoded bytes (PNG for pages, as stored), batched like score; with
    tta, each image's four turns are scored (decoded once) and combined, as score --tta does; with below < 1,
    only the images less sure than that get the turned copies (score --tta-below)."""
    if tta and below < 1.0:
        def answer(blobs):
            return runner.answer_bytes_when_unsure(blobs, below)
    else:
        answer = runner.answer_bytes_tta if tta else runner.answer_bytes
    blobs = read_all(paths)
    # One untimed pass over the same batches: TF traces, and oneDNN builds its kernels, once per batch shape (the
    # turned copies of the unsure images come in varying counts), so every method is timed warm.
    for start in range(0, len(blobs), batch):
        answer(blobs[start:start + batch])
    started = time.perf_counter()
    for start in range(0, len(blobs), batch):
        answer(blobs[start:start + batch])
    return len(blobs) / (time.perf_counter() - started)


def text_lines_evidence(reader, paths: Sequence[str], probs: np.ndarray, below: float) -> np.ndarray:
    """[N, 4 turns, 5] text-line evidence rows (trainer.text_lines) of the images' turned copies whose top
    probability is below `below` (zeros elsewhere: not read, as score leaves them)."""
    from trainer import text_lines

    return np.stack([text_lines.read_turns(reader, path, np.flatnonzero(np.max(probs[index], -1) < below))
                     for index, path in enumerate(paths)]).reshape(probs.shape[:2] + (5,))


def text_lines_speed(runner: DefaultModelRunner, reader, paths: Sequence[str], below: float,
                     weights: Tuple[float, float], tta_below: float, batch: int = 16) -> Tuple[float, float]:
    """(images/s, share read) of score's built-in default end to end: test-time turns (for the images below
    `tta_below`), then the text lines of those whose combined top probability is below `below` (the reading copy
    decoded from the file's bytes, as score's prepare step makes it) fused in."""
    from PIL import Image

    from trainer import text_lines

    blobs = read_all(paths)
    for start in range(0, len(blobs), batch):  # trace (every batch shape) outside the clock
        runner.probabilities_bytes_when_unsure(blobs[start:start + batch], tta_below)
    read = 0
    started = time.perf_counter()
    for start in range(0, len(blobs), batch):
        chunk = blobs[start:start + batch]
        probs = runner.probabilities_bytes_when_unsure(chunk, tta_below)
        for blob, p in zip(chunk, probs):
            if float(np.max(p)) < below:
                with Image.open(io.BytesIO(blob)) as image:
                    copy = np.asarray(text_lines.reading_copy(image))
                text_lines.fuse(p, reader.read(copy), *weights)
                read += 1
    return len(blobs) / (time.perf_counter() - started), read / max(1, len(blobs))


def _speed(images_per_second: float) -> str:
    """A table cell: images/s, or n/a for a row that was not timed."""
    return f"{images_per_second:.1f}" if images_per_second == images_per_second else "n/a"


def text_crops_speed(runner: DefaultModelRunner, crop_reader, line_reader, paths: Sequence[str],
                     settings: Dict[str, object], batch: int = 16) -> Tuple[float, float, float]:
    """(images/s, share whose crops were read, share whose text lines were read) of score's built-in default end to
    end, in score's order: every image once; the crops of those below `below` (and with `agree`, of every image),
    fused below `below` or where `agree` of them agree; the turned copies of those
    still below `tta_below` (their combined answer with the crops fused again); the text lines of those still below
    `text_lines_below`. The reading copies are decoded from the file's bytes."""
    from PIL import Image

    from trainer import text_crops, text_lines

    weight, below, tta_below, agree = settings["weight"], settings["below"], settings["tta_below"], settings["agree"]
    lines_below, lines_weights = settings["text_lines_below"], settings["text_lines_weights"]
    tf = runner.tf
    blobs = read_all(paths)
    for start in range(0, len(blobs), batch):  # trace (every batch shape) outside the clock
        pixels, _ = runner._answer_once(tf.constant(blobs[start:start + batch]))
        runner._answer_turned(pixels)
    crops_read = lines_read = 0
    started = time.perf_counter()
    for start in range(0, len(blobs), batch):
        chunk = blobs[start:start + batch]
        pixels, once = runner._answer_once(tf.constant(chunk))
        once = once.numpy()
        answers = once.copy()
        evidence = {}
        for i, blob in enumerate(chunk):
            unsure = float(np.max(answers[i])) < below
            if unsure or agree > 0:
                with Image.open(io.BytesIO(blob)) as image:
                    read, agreeing = crop_reader.read_with_agreement(text_crops.reading_copy(image))
                crops_read += 1
                if unsure or agreeing >= agree:
                    evidence[i] = read
                    answers[i] = text_crops.fuse(answers[i], evidence[i], weight)
        unsure = [i for i in range(len(chunk)) if tta_below >= 1.0 or float(np.max(answers[i])) < tta_below]
        if unsure:
            turned = runner._answer_turned(tf.gather(pixels, unsure)).numpy()
            for j, i in enumerate(unsure):
                combined = (once[i] + turned[j]) / 4.0
                answers[i] = combined if i not in evidence else text_crops.fuse(combined, evidence[i], weight)
        for i, blob in enumerate(chunk):
            if lines_below is not None and float(np.max(answers[i])) < lines_below:
                with Image.open(io.BytesIO(blob)) as image:
                    copy = np.asarray(text_lines.reading_copy(image))
                text_lines.fuse(answers[i], line_reader.read(copy), *lines_weights)
                lines_read += 1
    n = max(1, len(blobs))
    return len(blobs) / (time.perf_counter() - started), crops_read / n, lines_read / n


def cast_first_letterbox(image_bytes, size: int = 224):
    """The obvious alternative to the shipped preprocessing: decode, cast the whole image to float32, then the same
    letterbox (so the two differ only by the full-size float copy)."""
    import tensorflow as tf

    from trainer.preprocessing import decode_image_bytes, resize_for_model

    return resize_for_model(tf.cast(decode_image_bytes(image_bytes), tf.float32), size)


def page_costs(runner: DefaultModelRunner, paths: Sequence[str], batch: int = 16) -> List[Tuple[str, float]]:
    """[(stage, ms per image)] for pages: each stage of the shipped path beside the obvious alternative."""
    import tensorflow as tf

    from trainer.preprocessing import decode_image_bytes, preprocess_image_bytes

    blobs = read_all(paths)
    spec = tf.TensorSpec([224, 224, 3], tf.float32)
    batch = max(1, min(batch, len(blobs)))

    def per_image(fn):
        return tf.function(lambda b: tf.map_fn(fn, b, fn_output_signature=spec), reduce_retracing=True)

    decode = tf.function(lambda b: tf.map_fn(lambda x: tf.reduce_max(decode_image_bytes(x)), b,
                                             fn_output_signature=tf.uint8), reduce_retracing=True)
    shipped_pixels, cast_first_pixels = per_image(preprocess_image_bytes), per_image(cast_first_letterbox)
    pixels = shipped_pixels(tf.constant(blobs[:batch]))
    trained = tf.function(lambda x: runner.trained_model(x, training=False))
    served = tf.function(lambda x: runner.served_model(x, training=False))

    def clock(fn, inputs) -> float:
        fn(inputs[0])  # trace outside the clock
        started = time.perf_counter()
        for item in inputs:
            fn(item)
        return 1000 * (time.perf_counter() - started) / (len(inputs) * batch)

    chunks = [tf.constant(blobs[i:i + batch]) for i in range(0, len(blobs) - batch + 1, batch)]
    rows = [("decode (PNG)", clock(decode, chunks)),
            ("decode + float32 copy + letterbox", clock(cast_first_pixels, chunks)),
            ("decode + letterbox straight from uint8 (shipped)", clock(shipped_pixels, chunks)),
            ("MobileNetV2 + head with its BatchNorm layers", clock(trained, [pixels] * len(chunks))),
            ("MobileNetV2 + head, BatchNorm folded (shipped)", clock(served, [pixels] * len(chunks)))]
    return rows


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the quality table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder build_train.sh wrote (photos/, docs/)")
    parser.add_argument("--peer-images", type=int, default=60,
                        help="photos and pages (each) the slow peers see; 0 skips the peers")
    parser.add_argument("--cores", type=int, default=1, help="pin the process to this many cores")
    parser.add_argument("--speed-images", type=int, default=48, help="images per kind timed end to end")
    parser.add_argument("--tta-below", type=float, default=None,
                        help="measure test-time turns when unsure at this threshold instead of score's built-in one "
                             "(the head's recorded tta_below)")
    parser.add_argument("--text-lines-below", type=float, default=None,
                        help="read text lines below this top probability instead of score's built-in gate (the "
                             "head's recorded text_lines.below)")
    parser.add_argument("--answers", default="",
                        help="save every method's probabilities [image, turn, 4] with the images' paths and kinds "
                             "to this .npz, for looking into the misses without another run")
    parser.add_argument("--figures", default="",
                        help="write confusion matrices (true turn x answered turn) of photos and pages as PNGs "
                             "here, and contact sheets of the images the fullest method gets wrong (misses_*.png)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
    os.environ["OMP_NUM_THREADS"] = str(args.cores)
    train_default.limit_tf_threads(args.cores)

    every_image = corpus.load_corpus(args.corpus)
    test = corpus.select(every_image, splits=(corpus.TEST,))
    # Images with no up a person could name (data/orientation_corpus/no_up.tsv, listed blind to every model's
    # answers): the 4-way question has no answer for them, so some rows are given again without them. Read first,
    # so that a broken list stops the run before the long passes.
    no_up: Optional[Dict[str, str]] = None
    try:
        no_up = corpus.load_no_up()
    except OSError as e:
        print(f"no rows for the images with an up: {e}")
    else:
        for missing in corpus.unmatched_no_up(every_image, args.corpus, no_up):
            print(f"warning: {missing} is listed as having no up but is no corpus image (counted as having an up)")
    kinds = np.array([i.kind for i in test])
    print(f"held-out test split: {int(np.sum(kinds == corpus.PHOTO))} photos, {int(np.sum(kinds == corpus.PAGE))} "
          f"pages, each under 4 turns", flush=True)
    runner = DefaultModelRunner()
    started = time.time()
    probs, feats = runner.probabilities_and_features([i.path for i in test])
    print(f"default model over the split: {time.time() - started:.0f}s", flush=True)
    tta = train_default.test_time_turns(probs)
    # The guard against a shortcut: every figure here turns the letterboxed square, which is only fair if that
    # gives what a scan turned before the letterbox gives. Were it not (an uneven letterbox did this: pages
    # 99.6% here, 74.6% as turned files), a model could learn which one it was shown instead of the picture.
    started = time.time()
    file_probs = runner.probabilities_of_turned_files([i.path for i in test])
    file_tta = train_default.test_time_turns(file_probs)
    same = np.argmax(file_probs, -1) == np.argmax(probs, -1)
    print(f"turned as files (turned, saved, read back; {time.time() - started:.0f}s): the same answer as turned on "
          f"the square for {100 * same.mean():.2f}% of turns, probabilities at most "
          f"{np.abs(file_probs - probs).max():.3f} apart", flush=True)
    for warning in shortcut_warnings(probs, file_probs, kinds):
        print(warning, flush=True)

    speed = {k: default_speed(runner, [i.path for i in test if i.kind == k][:args.speed_images])
             for k in (corpus.PHOTO, corpus.PAGE)}
    tta_speed = {k: default_speed(runner, [i.path for i in test if i.kind == k][:args.speed_images], tta=True)
                 for k in (corpus.PHOTO, corpus.PAGE)}
    below = builtin_tta_below() if args.tta_below is None else args.tta_below
    adaptive = below < 1.0  # else test-time turns when unsure are test-time turns for every image
    unsure_tta, unsure_speed = tta, tta_speed
    # (name, answers, the answered images' kinds): the auto_rotate band by threshold is printed for each at the end
    band_methods = [("default", probs, kinds), ("default + test-time turns", tta, kinds)]
    if adaptive:
        unsure_tta, _ = train_default.turns_when_unsure(probs, below)
        unsure_speed = {k: default_speed(runner, [i.path for i in test if i.kind == k][:args.speed_images],
                                         tta=True, below=below) for k in (corpus.PHOTO, corpus.PAGE)}
        band_methods.append((f"default + test-time turns when p < {below}", unsure_tta, kinds))
        _, sweep = train_default.choose_tta_below(probs, kinds, candidates=(below,))
        for kind in (corpus.PHOTO, corpus.PAGE):
            share, upright = sweep[below][f"{kind}s_turned"], sweep[below][f"{kind}s_upright_turned"]
            print(f"test-time turns when unsure (p < {below}), {kind}s: turned copies for {100 * share:.0f}% of "
                  f"all turns, {100 * upright:.0f}% of the images as stored (upright, as timed); "
                  f"{unsure_speed[kind]:.1f} img/s vs {tta_speed[kind]:.1f} with every image turned "
                  f"({unsure_speed[kind] / tta_speed[kind]:.2f}x) and {speed[kind]:.1f} without turns", flush=True)
    page_paths = [i.path for i in test if i.kind == corpus.PAGE][:args.speed_images]
    costs = page_costs(runner, page_paths)
    for stage, ms in costs:
        print(f"page cost, {stage}: {ms:.1f} ms")
    decode_ms, cast_first_ms, shipped_ms, trained_ms, folded_ms = (ms for _, ms in costs)
    print(f"page cost ratios: letterbox (after decode) cast first / from uint8 "
          f"{(cast_first_ms - decode_ms) / max(1e-9, shipped_ms - decode_ms):.2f}x, "
          f"model with BN / folded {trained_ms / folded_ms:.2f}x", flush=True)
    rows: List[Tuple[str, ...]] = []

    def add_runs(name: str, runs: Sequence[np.ndarray], k: np.ndarray, photo_speed: float, page_speed: float,
                 bands=True):
        """A row of the mean over several runs' answers (each [N, 4 turns, 4])."""
        stats = [train_default.band_stats(p) if bands else {} for p in runs]

        def mean(values):
            return float(np.mean(list(values)))

        rows.append((name, _pct(mean(train_default.accuracy(p[k == corpus.PHOTO]) for p in runs)),
                     _pct(mean(train_default.accuracy(p[k == corpus.PAGE]) for p in runs)), _speed(photo_speed),
                     _speed(page_speed),
                     _pct(mean(s.get("auto_rotate_share_of_rotated", float("nan")) for s in stats)),
                     _pct(mean(s.get("auto_rotate_right", float("nan")) for s in stats))))

    def add(name: str, p: np.ndarray, k: np.ndarray, photo_speed: float, page_speed: float, bands=True):
        add_runs(name, [p], k, photo_speed, page_speed, bands)

    add("default model", probs, kinds, speed[corpus.PHOTO], speed[corpus.PAGE])
    add("default model, turned as files", file_probs, kinds, speed[corpus.PHOTO], speed[corpus.PAGE])
    from trainer import text_crops, text_lines

    text_defaults = builtin_text_lines()
    crops_defaults = builtin_text_crops()
    with_crops = crops_defaults["available"] and crops_defaults["recorded"] and args.tta_below is None
    # score's built-in default is the last stage it runs: text crops (then text lines) when their models are
    # installed, else text lines, else the turned copies.
    default_label = (" (score's built-in default)" if args.tta_below is None and not text_defaults["available"]
                     and not with_crops else "")
    add("default + test-time turns" + ("" if adaptive else default_label), tta, kinds, tta_speed[corpus.PHOTO],
        tta_speed[corpus.PAGE])
    add("default + test-time turns, turned as files", file_tta, kinds, tta_speed[corpus.PHOTO], tta_speed[corpus.PAGE])
    if adaptive:
        add(f"default + test-time turns when p < {below}{default_label}", unsure_tta, kinds,
            unsure_speed[corpus.PHOTO], unsure_speed[corpus.PAGE])

    fused = None
    if text_defaults["available"]:
        reader = text_lines.TextLineReader(threads=args.cores)
        gate = text_defaults["below"] if args.text_lines_below is None else args.text_lines_below
        weights = text_defaults["weights"]
        started = time.time()
        evidence = text_lines_evidence(reader, [i.path for i in test], unsure_tta, gate)
        fused = np.where((np.max(unsure_tta, -1) < gate)[..., None],
                         text_lines.fuse_rows(unsure_tta, evidence, *weights), unsure_tta)
        print(f"text lines over the split (below {gate}): {time.time() - started:.0f}s", flush=True)
        text_speed = {}
        for kind in (corpus.PHOTO, corpus.PAGE):
            ips, share = text_lines_speed(runner, reader, [i.path for i in test if i.kind == kind][:args.speed_images],
                                          gate, weights, below)
            text_speed[kind] = ips
            read = np.max(unsure_tta[kinds == kind], -1) < gate
            per_read = (1.0 / ips - 1.0 / unsure_speed[kind]) / share * 1000 if share else float("nan")
            print(f"text lines, {kind}s: read for {100 * read.mean():.0f}% of all turns, {100 * share:.0f}% of the "
                  f"images as stored (upright, as timed); {ips:.1f} img/s vs {unsure_speed[kind]:.1f} without reading: "
                  f"{per_read:.0f} ms per image read", flush=True)
        label = (" (score's built-in default)" if args.tta_below is None and args.text_lines_below is None
                 and not with_crops else "")
        add(f"default + test-time turns + text lines below {gate}{label}", fused, kinds, text_speed[corpus.PHOTO],
            text_speed[corpus.PAGE])
        band_methods.append((f"default + test-time turns + text lines below {gate}", fused, kinds))
    else:
        print(f"no text-lines row: {text_defaults['why']}")

    crops_fused = None
    if with_crops:
        settings = dict(crops_defaults)
        crop_reader = text_crops.TextCropReader(threads=args.cores)
        started = time.time()
        crop_probabilities = np.stack([text_crops.read_turns_probabilities(crop_reader, i.path) for i in test])
        crop_evidence = text_crops.evidence(crop_probabilities)
        crop_agreement = text_crops.agreement(crop_probabilities)
        crops_only, crops_read, _ = train_default.crops_answers(probs, crop_evidence, settings["weight"],
                                                                settings["below"], settings["tta_below"],
                                                                crop_agreement, settings["agree"])
        print(f"text crops over the split: {time.time() - started:.0f}s; fused for "
              + ", ".join(f"{100 * crops_read[kinds == k].mean():.0f}% of {k}s' turns" for k in (corpus.PHOTO,
                                                                                                corpus.PAGE)),
              flush=True)
        agree_part = f" (agreeing >= {settings['agree']} above)" if settings["agree"] else ""
        add(f"default + text crops below {settings['below']}{agree_part} + test-time turns", crops_only, kinds,
            float("nan"), float("nan"))
        line_reader = None
        if text_defaults["available"] and settings["text_lines_below"] is not None:
            line_reader = text_lines.TextLineReader(threads=args.cores)
        else:
            settings["text_lines_below"] = None
        lines_part = (f" + text lines below {settings['text_lines_below']}"
                      if settings["text_lines_below"] is not None else "")

        def then_lines(answers: np.ndarray, label: str, mask: Optional[np.ndarray] = None) -> np.ndarray:
            """The text lines after the crops, for the images of `mask` (all when None)."""
            if line_reader is None:
                return answers
            mask = np.ones(len(test), bool) if mask is None else mask
            lines = text_lines_evidence(line_reader, [i.path for i, m in zip(test, mask) if m], answers,
                                        settings["text_lines_below"])
            fused_answers, lines_read = train_default.text_lines_answers(
                answers, lines, settings["text_lines_weights"], settings["text_lines_below"])
            print(f"text lines after the crops{label}: read for " + ", ".join(
                f"{100 * lines_read[kinds[mask] == k].mean():.1f}% of {k}s' turns" for k in (corpus.PHOTO,
                                                                                         corpus.PAGE)))
            return fused_answers

        def with_readers(answers: np.ndarray, mask: np.ndarray, label: str) -> np.ndarray:
            """score's built-in readers (the crops, then the turned copies, then the text lines) on another head's
            answers [N, 4, 4] for the images of `mask`: what score does with a head tuned from the default model
            (its export records these settings)."""
            read, _, _ = train_default.crops_answers(answers, crop_evidence[mask], settings["weight"],
                                                     settings["below"], settings["tta_below"], crop_agreement[mask],
                                                     settings["agree"])
            return then_lines(read, label, mask)

        crops_fused = then_lines(crops_only, "")
        if settings["agree"]:
            # What --text-crops-agree adds: the same settings with the sure images' crops left unread.
            gate_alone, _, _ = train_default.crops_answers(probs, crop_evidence, settings["weight"], settings["below"],
                                                           settings["tta_below"])
            alone_name = (f"default + text crops below {settings['below']} + test-time turns{lines_part}, "
                          "without --text-crops-agree")
            gate_alone = then_lines(gate_alone, " (without --text-crops-agree)")
            add(alone_name + " (not timed)", gate_alone, kinds, float("nan"), float("nan"))
            band_methods.append((alone_name, gate_alone, kinds))
        crops_speed = {}
        for kind in (corpus.PHOTO, corpus.PAGE):
            ips, crops_share, lines_share = text_crops_speed(
                runner, crop_reader, line_reader, [i.path for i in test if i.kind == kind][:args.speed_images],
                settings)
            crops_speed[kind] = ips
            print(f"text crops, {kind}s (as stored, upright, as timed): crops read for {100 * crops_share:.0f}%, "
                  f"text lines for {100 * lines_share:.0f}%; {ips:.1f} img/s vs {unsure_speed[kind]:.1f} with "
                  f"test-time turns alone ({ips / unsure_speed[kind]:.2f}x)", flush=True)
        crops_name = f"default + text crops below {settings['below']}{agree_part} + test-time turns{lines_part}"
        add(crops_name + " (score's built-in default)", crops_fused, kinds, crops_speed[corpus.PHOTO],
            crops_speed[corpus.PAGE])
        band_methods.append((crops_name, crops_fused, kinds))
    else:
        print("no text-crops row: " + (crops_defaults["why"] or "the head records no text-crops settings, or "
                                       "--tta-below was given"))

    listed_no_up: List[str] = []
    if no_up is not None:
        up = np.array(corpus.has_up(test, args.corpus, no_up))
        listed_no_up = [i.path for i, u in zip(test, up) if not u]
        left = {k: int(np.sum(~up & (kinds == k))) for k in (corpus.PHOTO, corpus.PAGE)}
        for k in (corpus.PHOTO, corpus.PAGE):
            print(f"{k}s listed as having no up: {left[k]} of the split's {int(np.sum(kinds == k))}: "
                  + ", ".join(os.path.basename(i.path) for i, u in zip(test, up) if not u and i.kind == k))
        without = f"images with an up ({left[corpus.PHOTO]} photos, {left[corpus.PAGE]} pages left out)"
        add(f"default model, turned as files, {without}", file_probs[up], kinds[up], speed[corpus.PHOTO],
            speed[corpus.PAGE])
        add(f"default + test-time turns, turned as files, {without}", file_tta[up], kinds[up],
            tta_speed[corpus.PHOTO], tta_speed[corpus.PAGE])
        if crops_fused is not None:
            add(f"score's built-in default, {without}", crops_fused[up], kinds[up], crops_speed[corpus.PHOTO],
                crops_speed[corpus.PAGE])
            band_methods.append((f"score's built-in default, {without}", crops_fused[up], kinds[up]))

    tune_mask = np.array([tuning_half(i) for i in test])
    evaluation = ~tune_mask
    add(f"default, eval half ({int(evaluation.sum())} images)", probs[evaluation], kinds[evaluation],
        speed[corpus.PHOTO], speed[corpus.PAGE])
    add("default + test-time turns, eval half", tta[evaluation], kinds[evaluation], tta_speed[corpus.PHOTO],
        tta_speed[corpus.PAGE])  # what the archive-tuned + turns rows are to be read against
    tuned = archive_tuning_runs(runner, feats, probs, tune_mask, evaluation, kinds)
    seeds = f"mean of {TUNING_SEEDS} runs"
    add_runs(f"archive-tuned on the other half, eval half ({seeds})", tuned["upright"], kinds[evaluation],
             speed[corpus.PHOTO], speed[corpus.PAGE])
    add_runs(f"archive-tuned + test-time turns, eval half ({seeds})",
             [train_default.test_time_turns(a) for a in tuned["upright"]], kinds[evaluation],
             tta_speed[corpus.PHOTO], tta_speed[corpus.PAGE])
    for share in TURNED_SHARES:
        for labels, flag in (("stored", "--orientation-labels stored"), ("checked", "checked, the default")):
            add_runs(f"archive-tuned on the other half with {100 * share:.0f}% of it turned, labels {labels} "
                     f"({flag}) + test-time turns, eval half ({seeds})",
                     [train_default.test_time_turns(a) for a in tuned[f"{share}/{labels}"]], kinds[evaluation],
                     tta_speed[corpus.PHOTO], tta_speed[corpus.PAGE])
    if crops_fused is not None:
        # What a user gets: score reads a tuned head's export settings, so it is scored with the built-in readers.
        add("score's built-in default, eval half", crops_fused[evaluation], kinds[evaluation],
            crops_speed[corpus.PHOTO], crops_speed[corpus.PAGE])
        for run, what in (("upright", "on the other half"), ("0.25/checked", "on the other half with 25% of it "
                                                                            "turned, labels checked"),
                          ("0.5/checked", "on the other half with 50% of it turned, labels checked")):
            add_runs(f"archive-tuned {what}, scored with score's built-in readers (its export's settings), eval "
                     f"half ({seeds})", [with_readers(a, evaluation, f" (tuned: {run})") for a in tuned[run]],
                     kinds[evaluation], crops_speed[corpus.PHOTO], crops_speed[corpus.PAGE])

    if args.peer_images > 0:
        subset = ([i for i, image in enumerate(test) if image.kind == corpus.PHOTO][:args.peer_images]
                  + [i for i, image in enumerate(test) if image.kind == corpus.PAGE][:args.peer_images])
        sub_paths = {k: [test[i].path for i in subset if test[i].kind == k] for k in (corpus.PHOTO, corpus.PAGE)}
        add(f"default model, peers' subset ({len(subset)} images)", probs[subset], kinds[subset],
            speed[corpus.PHOTO], speed[corpus.PAGE])
        if fused is not None:
            add("default + turns + text lines, peers' subset", fused[subset], kinds[subset],
                text_speed[corpus.PHOTO], text_speed[corpus.PAGE])
        if crops_fused is not None:
            add("default + text crops + turns + text lines, peers' subset", crops_fused[subset], kinds[subset],
                crops_speed[corpus.PHOTO], crops_speed[corpus.PAGE])
        with tempfile.TemporaryDirectory() as workdir:
            for name, answer in (("Tesseract OSD --psm 0", lambda im: tesseract_answer(im, workdir)),
                                 ("docorient", docorient_answer)):
                results = {k: peer_accuracy(answer, sub_paths[k]) for k in (corpus.PHOTO, corpus.PAGE)}
                rows.append((name + ", peers' subset", _pct(results[corpus.PHOTO][0]), _pct(results[corpus.PAGE][0]),
                             f"{results[corpus.PHOTO][1]:.1f}", f"{results[corpus.PAGE][1]:.1f}", "n/a", "n/a"))
                print(f"{name}: done", flush=True)
                turned = f"turns when p < {below}" if adaptive else "every image turned"
                ours_all = [("default model", speed), (f"test-time turns ({turned})", unsure_speed)]
                if fused is not None:
                    ours_all.append(("test-time turns + text lines", text_speed))
                if crops_fused is not None:
                    ours_all.append(("text crops + test-time turns + text lines (score's default)", crops_speed))
                for label, ours in ours_all:
                    print(f"pages, {label} vs {name}: {ours[corpus.PAGE]:.1f} vs {results[corpus.PAGE][1]:.1f} "
                          f"img/s = {ours[corpus.PAGE] / results[corpus.PAGE][1]:.2f}x", flush=True)

    if args.figures:
        figures = {"default": probs, "default + test-time turns": tta}
        if fused is not None:
            figures["default + test-time turns + text lines"] = fused
        if crops_fused is not None:
            figures["default + text crops + test-time turns + text lines"] = crops_fused
        for path in write_confusions(args.figures, figures, kinds):
            print(f"figure: {path}")
        last = list(figures)[-1]  # the fullest method: score's default when its readers are installed
        for path in write_misses(args.figures, test, figures[last], last, no_up=listed_no_up):
            print(f"figure: {path}")
    if args.answers:
        saved = {"paths": np.array([i.path for i in test]), "kinds": kinds, "default": probs,
                 "default_turned_files": file_probs, "default_tta": tta}
        saved.update({name: p for name, p in (("text_lines", fused), ("score_default", crops_fused)) if p is not None})
        np.savez_compressed(args.answers, **saved)
        print(f"answers: {args.answers}")
    temperature = float(runner.meta["temperature"])
    for name, p in (("shipped (T folded in)", probs), ("same logits at T = 1", train_default.with_temperature(
            probs, 1.0 / temperature))):
        nll, ece = calibration(p)
        print(f"calibration, {name}: NLL {nll:.3f}, ECE {100 * ece:.1f}%")
    for name, p, kinds_of in band_methods:
        # All images, then each kind alone: the target is for all, but an archive of photos only lives with the
        # photos' band, which is narrower and less often right at the same threshold.
        for label, mask in (("", np.ones(len(kinds_of), bool)), (", photos only", kinds_of == corpus.PHOTO),
                            (", pages only", kinds_of == corpus.PAGE)):
            cells = []
            for threshold in (0.8, 0.9, 0.95, 0.98):
                stats = train_default.band_stats(p[mask], rotate_threshold=threshold)
                cells.append(f"p >= {threshold}: {_pct(stats['auto_rotate_share_of_rotated'])} of turned images, "
                             f"{_pct(stats['auto_rotate_right'])} right")
            print(f"auto_rotate band, {name}{label}: " + "; ".join(cells))
    header = ("method", "photos 4-way", "pages 4-way", "photos img/s", "pages img/s",
              "turned images in auto_rotate", "auto_rotate right")
    print(f"\n{args.cores} core(s); temperature {runner.meta['temperature']:.2f} folded into the shipped head\n")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
