"""The pure parts of score (tested without Beam): what a page sends, how an answer becomes a row and a decision,
and which earlier results a run reuses."""
from __future__ import annotations

import io
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines import imaging, sources
from pipelines.score.options import SKIPPED, ModelInfo
from pipelines.tables import RESULTS_SCHEMA
from serving import policy as policies
from serving.policy import DECISIONS, DecisionPolicy, ScorePolicy

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
