"""Text-line evidence for the orientation of a page: which way its lines run, and which way up its glyphs are.

The image model reads a page at 224 px, where the difference between a page and the same page upside down is
blurred away (most of its page misses are half turns). Text lines at reading size settle both questions:

1. PP-OCRv4's text detector (a DB segmentation net) finds the text lines on the page at `side` px (smaller
   images at their own size). Lines much
   wider than tall vote for an upright or upside-down page, lines much taller than wide for a quarter turn:
   `axis` is the log ratio of their areas.
2. PP-OCR's text-line direction classifier (0 or 180 degrees, 48 x 192 px inputs) reads the largest lines, cut
   into pieces no wider than four line heights so that it sees glyphs, not a squashed line: `vote` is the summed
   log-odds of "upside down" over the pieces.

Both networks are PaddleOCR's (Apache-2.0), as ONNX files shipped inside the PyPI wheel `rapidocr_onnxruntime`,
and run with onnxruntime. Only the two files are used: the wheel is located, not imported (its own code needs
OpenCV), and the detector's post-processing is done here with scipy.

`fuse` adds the evidence to the image model's log-probabilities with two weights fitted on held-out data by
negative log-likelihood (`fit_weights`), so the result stays a calibrated probability: text lines barely move a
photo without text, and settle a page the image model was unsure of.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

MODELS_PACKAGE = "rapidocr_onnxruntime"
DETECTOR_FILE = "models/ch_PP-OCRv4_det_infer.onnx"
CLASSIFIER_FILE = "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"

DEFAULT_SIDE = 960  # the detector's input: the page's long side, in px (a multiple of 32)
COPY_SIDE = 1600  # the long side of the copy read (score keeps one per page; lines are cut from it)
MAX_LINES = 30  # the largest lines read by the classifier
PIECE_ASPECT = 4  # a line is cut into pieces at most this many line heights wide
_CLS_HEIGHT, _CLS_WIDTH = 48, 192
# DB post-processing (PaddleOCR's defaults): pixel threshold, mean score a line must reach, box growth.
_PIXEL_THRESHOLD, _LINE_THRESHOLD, _UNCLIP_RATIO, _MIN_SIZE = 0.3, 0.5, 1.6, 3
_CLS_BATCH = 32


class TextLinesUnavailable(RuntimeError):
    """The ONNX models (PyPI `rapidocr_onnxruntime`) or onnxruntime are not installed."""


def package_folder(package: str, files: Sequence[str]) -> str:
    """Folder of an installed package that holds all of `files` (found without importing the package), or ""."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if all(os.path.exists(os.path.join(location, f)) for f in files):
            return location
    return ""


def models_dir() -> str:
    """Folder of the wheel that ships the two ONNX files, found without importing the package."""
    folder = package_folder(MODELS_PACKAGE, (DETECTOR_FILE, CLASSIFIER_FILE))
    if not folder:
        raise TextLinesUnavailable(
            f"text-line reading needs the ONNX models from the PyPI package '{MODELS_PACKAGE}' and onnxruntime; "
            f"install them with: pip install {MODELS_PACKAGE}==1.4.4 onnxruntime")
    return folder


def require_onnxruntime(what: str, error: Optional[type] = None) -> None:
    """Raises `error` (TextLinesUnavailable) saying that `what` needs onnxruntime, when it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise (error or TextLinesUnavailable)(f"{what} needs onnxruntime: pip install onnxruntime")


def installed(check) -> bool:
    """True when `check()` (a module's check_installed) finds its models and onnxruntime."""
    try:
        check()
        return True
    except TextLinesUnavailable:
        return False


def check_installed() -> str:
    """The models' folder; raises TextLinesUnavailable when the models or onnxruntime are missing."""
    folder = models_dir()
    require_onnxruntime("text-line reading")
    return folder


def available() -> bool:
    """True when the models and onnxruntime are installed."""
    return installed(check_installed)


@dataclass(frozen=True)
class TextLineEvidence:
    """What the text lines of one image say about its orientation (see the module docstring)."""

    axis: float = 0.0  # log((area of wide lines + 1) / (area of tall lines + 1)), in detector pixels
    vote: float = 0.0  # summed log-odds of "upside down" over the pieces read (> 0: 180 along the lines)
    vertical: bool = False  # the lines run top to bottom (the image is a quarter turn from upright or 180 from it)
    lines: int = 0
    pieces: int = 0


def evidence_array(evidence: TextLineEvidence) -> np.ndarray:
    """[axis, vote, vertical, lines, pieces]: evidence as a row (for caching and for many at once)."""
    return np.array([evidence.axis, evidence.vote, float(evidence.vertical), evidence.lines, evidence.pieces])


def from_array(row: Sequence[float]) -> TextLineEvidence:
    """evidence_array reversed."""
    return TextLineEvidence(axis=float(row[0]), vote=float(row[1]), vertical=bool(row[2]), lines=int(row[3]),
                            pieces=int(row[4]))


def terms(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(axis term, up/down term), each [..., 4]: additive log-evidence for turns 0/90/180/270 clockwise, from
    evidence rows [..., 5] (evidence_array).

    Lines running across favour 0 and 180 by `axis`. Upside-down pieces (vote > 0) favour 180 when the lines run
    across; when they run down, the pieces were turned a quarter counter-clockwise to be read, so "upside down"
    means the image was turned 270 clockwise, and "upright" 90.
    """
    rows = np.asarray(rows, np.float64)
    axis = rows[..., :1] * np.array([0.5, -0.5, 0.5, -0.5])
    half_vote = 0.5 * rows[..., 1:2]
    across = np.concatenate([-half_vote, 0 * half_vote, half_vote, 0 * half_vote], axis=-1)
    down = np.concatenate([0 * half_vote, -half_vote, 0 * half_vote, half_vote], axis=-1)
    return axis, np.where(rows[..., 2:3] > 0.5, down, across)


def add_log_evidence(probabilities: np.ndarray, log_evidence: np.ndarray) -> np.ndarray:
    """softmax(log p + log_evidence): [..., 4] probabilities with additive log-evidence [..., 4] fused in (the
    fusion of text lines and of text crops, trainer.text_crops)."""
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)) + np.asarray(log_evidence)
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def nll_and_accuracy(fused: np.ndarray, truth: np.ndarray) -> Tuple[float, float]:
    """(mean negative log-likelihood of the true turns, accuracy) of fused answers [N, 4] for truth [N]."""
    nll = float(-np.log(np.clip(fused[np.arange(len(truth)), truth], 1e-12, 1.0)).mean())
    return nll, float((fused.argmax(-1) == truth).mean())


def fuse_rows(probabilities: np.ndarray, rows: np.ndarray, axis_weight: float, vote_weight: float) -> np.ndarray:
    """softmax(log p + axis_weight * axis term + vote_weight * up/down term): [..., 4] probabilities fused with
    evidence rows [..., 5]."""
    axis, updown = terms(rows)
    return add_log_evidence(probabilities, axis_weight * axis + vote_weight * updown)


def fuse(probabilities: Sequence[float], evidence: TextLineEvidence, axis_weight: float, vote_weight: float
         ) -> np.ndarray:
    """One image's 4 orientation probabilities with its text-line evidence fused in (fuse_rows)."""
    return fuse_rows(np.asarray(probabilities), evidence_array(evidence), axis_weight, vote_weight)


def fit_weights(probabilities: np.ndarray, rows: np.ndarray, truth: np.ndarray,
                axis_weights: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
                vote_weights: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
                ) -> Tuple[Tuple[float, float], dict]:
    """The (axis, vote) weights minimising held-out negative log-likelihood of the fused answer.

    probabilities: [N, 4] (the image model's, calibrated); rows: [N, 5] evidence; truth: [N] turn indices.
    Returns the weights and {(axis weight, vote weight): (nll, accuracy)} for every pair tried.
    """
    probabilities = np.asarray(probabilities).reshape(-1, 4)
    rows = np.asarray(rows).reshape(-1, 5)
    truth = np.asarray(truth).reshape(-1)
    sweep = {}
    for wa in axis_weights:
        for wv in vote_weights:
            sweep[(wa, wv)] = nll_and_accuracy(fuse_rows(probabilities, rows, wa, wv), truth)
    best = min(sweep, key=lambda k: (sweep[k][0], k))
    return best, sweep


def _boxes(prob: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Text-line boxes (y0, x0, y1, x1) in detector pixels and their scores from DB's probability map."""
    from scipy import ndimage

    mask = ndimage.binary_dilation(prob > _PIXEL_THRESHOLD, structure=np.ones((2, 2), bool))
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros((0, 4)), np.zeros(0)
    scores = np.asarray(ndimage.mean(prob, labels, index=np.arange(1, count + 1)))
    boxes = []
    keep = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) < _MIN_SIZE or scores[index] < _LINE_THRESHOLD:
            continue
        grow = h * w * _UNCLIP_RATIO / (2.0 * (h + w))  # DB's unclip distance for a rectangle
        boxes.append((max(0.0, rows.start - grow), max(0.0, cols.start - grow),
                      min(prob.shape[0], rows.stop + grow), min(prob.shape[1], cols.stop + grow)))
        keep.append(index)
    return np.asarray(boxes, np.float64).reshape(-1, 4), scores[keep]


def _pieces(line: np.ndarray) -> list:
    """A line image cut into pieces at most PIECE_ASPECT heights wide."""
    h, w = line.shape[:2]
    n = max(1, int(w / (PIECE_ASPECT * h)))
    step = w / n
    return [line[:, int(i * step):int((i + 1) * step)] for i in range(n)]


def _classifier_input(piece: np.ndarray) -> np.ndarray:
    """One piece as the classifier wants it: 48 px high, at most 192 wide, [-1, 1], zero-padded on the right."""
    from PIL import Image

    h, w = piece.shape[:2]
    width = max(1, min(_CLS_WIDTH, int(math.ceil(_CLS_HEIGHT * w / h))))
    resized = np.asarray(Image.fromarray(piece).resize((width, _CLS_HEIGHT), Image.Resampling.BILINEAR),
                         np.float32)
    out = np.zeros((3, _CLS_HEIGHT, _CLS_WIDTH), np.float32)
    out[:, :, :width] = (resized / 127.5 - 1.0).transpose(2, 0, 1)
    return out


def onnx_session(path: str, threads: int = 1):
    """A CPU onnxruntime session for one model file (`threads` intra-op threads; 0: onnxruntime's default)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TextLinesUnavailable(f"onnxruntime is not installed: {e}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, threads)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class TextLineReader:
    """Reads the text-line evidence of RGB images (uint8 [H, W, 3]). One per worker: the sessions are loaded once."""

    def __init__(self, side: int = DEFAULT_SIDE, max_lines: int = MAX_LINES, threads: int = 1):
        folder = models_dir()
        self._detector = onnx_session(os.path.join(folder, DETECTOR_FILE), threads)
        self._classifier = onnx_session(os.path.join(folder, CLASSIFIER_FILE), threads)
        self.side = int(round(side / 32)) * 32
        self.max_lines = max_lines

    def _detect(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = rgb.shape[:2]
        scale = min(self.side, max(h, w)) / max(h, w)  # never upscaled: that adds cost, not glyphs
        dh, dw = (max(32, int(round(v * scale / 32)) * 32) for v in (h, w))
        small = np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.Resampling.BILINEAR), np.float32)
        # PaddleOCR reads images as OpenCV does (BGR); its detector was trained that way.
        x = (small[:, :, ::-1] / 127.5 - 1.0).transpose(2, 0, 1)[None]
        return self._detector.run(None, {self._detector.get_inputs()[0].name: np.ascontiguousarray(x)})[0][0, 0]

    def read(self, rgb: np.ndarray) -> TextLineEvidence:
        """The evidence of one image (an image without lines gives all zeros)."""
        rgb = np.asarray(rgb)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
        prob = self._detect(rgb)
        boxes, _ = _boxes(prob)
        if not len(boxes):
            return TextLineEvidence()
        heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        areas = heights * widths
        wide, tall = widths > 2 * heights, heights > 2 * widths
        across, down = float(areas[wide].sum()), float(areas[tall].sum())
        vertical = down > across
        axis = math.log((across + 1.0) / (down + 1.0))
        sy, sx = rgb.shape[0] / prob.shape[0], rgb.shape[1] / prob.shape[1]
        chosen = [i for i in np.argsort(-areas) if (tall[i] if vertical else wide[i])][:self.max_lines]
        pieces = []
        lines = 0
        for i in chosen:
            y0, x0, y1, x1 = boxes[i]
            line = rgb[int(y0 * sy):int(math.ceil(y1 * sy)), int(x0 * sx):int(math.ceil(x1 * sx))]
            if min(line.shape[:2]) < 8:
                continue
            if vertical:
                line = np.rot90(line)  # counter-clockwise: lines that ran down now run across
            lines += 1
            pieces += _pieces(np.ascontiguousarray(line))
        if not pieces:
            return TextLineEvidence(axis=axis, vertical=vertical)
        batch = np.stack([_classifier_input(p) for p in pieces])
        name = self._classifier.get_inputs()[0].name
        prob_up_down = np.concatenate([self._classifier.run(None, {name: batch[i:i + _CLS_BATCH]})[0]
                                       for i in range(0, len(batch), _CLS_BATCH)])
        vote = float(np.sum(np.log(prob_up_down[:, 1] + 1e-6) - np.log(prob_up_down[:, 0] + 1e-6)))
        return TextLineEvidence(axis=axis, vote=float(np.clip(vote, -50.0, 50.0)), vertical=vertical,
                                lines=lines, pieces=len(pieces))


def reading_copy(image):
    """The copy of a (Pillow) page that is read: RGB, at most COPY_SIDE px on its long side."""
    from PIL import Image

    copy = image.convert("RGB")  # a new image, even when it already is RGB
    if max(copy.size) > COPY_SIDE:
        copy.thumbnail((COPY_SIDE, COPY_SIDE), Image.Resampling.BILINEAR)
    return copy


def read_turns(reader: TextLineReader, path: str, turns: Sequence[int] = (0, 1, 2, 3)) -> np.ndarray:
    """[4, 5]: the evidence of an image file's reading copy turned 0/90/180/270 clockwise (evidence_array rows);
    only the quarter turns in `turns` are read, the other rows stay zero (no evidence)."""
    from PIL import Image

    rows = np.zeros((4, 5))
    if not len(turns):
        return rows
    with Image.open(path) as image:
        pixels = np.asarray(reading_copy(image))
    for turn in turns:
        rows[turn] = evidence_array(reader.read(np.ascontiguousarray(np.rot90(pixels, -turn))))
    return rows
