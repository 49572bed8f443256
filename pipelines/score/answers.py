"""The pure parts of score (tested without Beam): what a page sends, and how an answer becomes a row and a decision
(which earlier rows a run reuses: pipelines.score.known)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipelines import imaging
from pipelines.score.options import ModelInfo
from serving import policy as policies
from serving.policy import DecisionPolicy, ScorePolicy

# Pages sent as the file's own bytes: formats the graph decodes exactly as stored, in modes it reads as Pillow does.
SENT_AS_IS = {"jpeg": ("RGB", "L"), "png": ("RGB", "RGBA", "L", "LA", "P")}


def decide(prediction: Dict[str, Any], policy: DecisionPolicy) -> Tuple[str, str]:
    """(decision, reason): auto_rotate when rotated and sure, ok when upright and sure, else review."""
    agreement = prediction.get(policies.TTA_AGREEMENT)
    ink = prediction.get(policies.INK)
    return policies.decide(policy, prediction.get(policies.ORIENTATION_PROBABILITIES),
                           -1.0 if agreement is None else float(agreement), prediction.get("class_probabilities"),
                           None if ink is None else float(ink), prediction.get(policies.TEXT_CROPS))


def predict_isolating(items: Sequence[dict], predict: Callable[[List[bytes]], List[Dict[str, Any]]],
                      fatal: Tuple[type, ...] = (), abort: Tuple[type, ...] = ()
                      ) -> List[Tuple[dict, Optional[Dict[str, Any]], str]]:
    """(item, the model's answer or None, error) for every item, in order; a failing batch is halved until the bad
    image is alone, so one bad image never fails its neighbours. Errors of a `fatal` type (server gone) are not
    split. Errors of an `abort` type (the model itself is gone: no image could be scored) are raised, not turned
    into rows: the run fails instead of writing an error row for every remaining image."""
    if not items:  # nothing to send (a model may fail on an empty batch, and halving it would never end)
        return []
    try:
        rows = predict([item["image"] for item in items])
        if len(rows) != len(items):
            raise RuntimeError(f"{len(rows)} predictions for {len(items)} images")
    except Exception as error:  # any failure is data; split to find the culprit
        if isinstance(error, abort):
            raise
        message = f"{type(error).__name__}: {error}"
        if len(items) == 1 or isinstance(error, fatal):
            return [(item, None, message) for item in items]
        half = len(items) // 2
        return (predict_isolating(items[:half], predict, fatal, abort)
                + predict_isolating(items[half:], predict, fatal, abort))
    return [(item, row, "") for item, row in zip(items, rows)]


def _optional(value, missing: float = -1):
    """A graph output that uses -1 for 'not done' as a nullable column value."""
    if value is None:
        return None
    value = value.item() if isinstance(value, np.generic) else value
    return None if value == missing else value


def result_row(item: dict, prediction: Dict[str, Any], model: ModelInfo, policy: DecisionPolicy) -> dict:
    """One row of results.parquet from a prepared item and the model's answer."""
    decision, reason = decide(prediction, policy)
    row = {key: item[key] for key in ("uri", "page", "sha256", "format", "width", "height", "exif_orientation")}
    row["fingerprint"] = item.get("fingerprint") or ""
    agreement = _optional(prediction.get(policies.TTA_AGREEMENT))
    crops = _optional(prediction.get(policies.TEXT_CROPS))
    row.update(class_name="", class_id=-1, class_confidence=None, class_probabilities=None,
               orientation_degrees=-1, orientation_confidence=None, orientation_probabilities=None,
               tta_agreement=None if agreement is None else float(agreement),
               text_crops=None if crops is None else int(crops),
               decision=decision, review_reason=reason,
               model_name=model.name, model_version=model.version, reused=False, corrected_uri="",
               corrected_method="", corrected_orientation=None)
    if "class_probabilities" in prediction:
        probs = np.asarray(prediction["class_probabilities"], np.float32)
        class_id = int(prediction.get("class_ids", int(np.argmax(probs))))
        name = prediction.get("class_names") or ""
        if not name and 0 <= class_id < len(model.class_names):
            name = model.class_names[class_id]
        row.update(class_name=name or f"class_{class_id}", class_id=class_id,
                   class_confidence=float(probs[class_id]), class_probabilities=probs.tolist())
    if policies.ORIENTATION_PROBABILITIES in prediction:
        probs = np.asarray(prediction[policies.ORIENTATION_PROBABILITIES], np.float32)
        degrees = int(prediction.get(policies.ORIENTATION_DEGREES, int(np.argmax(probs)) * 90))
        row.update(orientation_degrees=degrees, orientation_confidence=float(probs[degrees // 90]),
                   orientation_probabilities=probs.tolist())
    return row


def page_payload(data: bytes, fmt: str, page: imaging.DecodedPage) -> Tuple[bytes, str]:
    """(the bytes sent for a page, how: 'file' or 'png'): the file itself when the graph decodes it to the pixels
    score means (SENT_AS_IS: a JPEG or PNG, one page, no EXIF turn), else a lossless PNG of the page's upright
    pixels."""
    if fmt in SENT_AS_IS and page.exif_orientation in (0, 1) and page.mode in SENT_AS_IS[fmt]:
        return data, "file"
    image = page.image if page.image.mode in ("RGB", "L") else page.image.convert("RGB")
    return imaging.encode(image, "png", 0, 1), "png"


def draft_side(policy: ScorePolicy) -> int:
    """The smallest short side a page must keep for the graph to read it as from the full file: the model's input,
    or the text crops' reading copy."""
    crops = policy.answer.text_crops
    return max(policy.answer.image_size, crops.copy_short if crops else 0)
