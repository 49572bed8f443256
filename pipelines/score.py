"""`archive-vision score`: the Beam job that classifies and orients every image of an archive through a model.

    archive -> ListArchive -> PrepareImages (items | reused | errors) -> ScoreImages (scored | errors)
            -> Decide (+ corrected copies) -> results.parquet/.csv, errors.parquet, run.json, report.html

score is a client of the exported model: the SavedModel computes the whole answer (serving.answer: the model's
view, test-time turns, text crops, fusion, calibration), and score lists and limits the inputs, sends each page's
bytes, turns the answers into decisions under the model's own recorded policy (serving.policy, read from the
export or over gRPC from the served version), and writes the tables. Scoring is remote (batched gRPC Predict,
`--endpoint`) or in-process (Beam RunInference on the same SavedModel, `--model`); both call the same
`serving_default` signature on the same bytes, so they write the same rows. Every input file ends in the results
or in errors: run.json says whether they reconcile.

What is sent: a JPEG or PNG file of one page whose pixels stand as stored (no EXIF turn) goes as it is, so any
TF Serving client sending the file gets score's answer; any other page (TIFF, WebP, BMP, GIF, EXIF-turned, CMYK,
16-bit, later pages of a file) goes as a lossless PNG of its upright pixels.
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
from pipelines.ingest import default_pipeline_options, error_row, runner_record, unknown_beam_args
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, read_table, write_job_tables
from serving import policy as policies
from serving.configs import SERVED_VERSIONS
from serving.errors import ModelNotFoundError, RetryableServingError
from serving.policy import DECISIONS, DecisionPolicy, ScorePolicy

LOG = logging.getLogger("archive_vision.score")
COUNTER_NAMESPACE = "score"
SKIPPED = "skipped"  # a file an ingest manifest already knew: listed, not scored, no prediction
TURNS = policies.TURNS
EXPORT_METADATA = "archive_vision_export.json"  # written by serving.export beside each version
BUILTIN_MODEL = "default"  # `--model default` (or no --model/--endpoint): the shipped default orientation model
# Pages sent as the file's own bytes: formats the graph decodes exactly as stored, in modes it reads as Pillow does.
SENT_AS_IS = {"jpeg": ("RGB", "L"), "png": ("RGB", "RGBA", "L", "LA", "P")}
# The decision flags a user may set over the model's recorded policy.
DECISION_FLAGS = tuple(f.name for f in dataclasses.fields(DecisionPolicy))


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """The job's own flags (everything else on the command line is a Beam pipeline option)."""

    input: str
    output: str
    endpoint: str = ""
    model: str = ""
    model_name: str = "archive_vision"
    labels: str = ""
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    max_file_mb: float = 1024.0
    max_pages: int = 1000
    exclude: Tuple[str, ...] = ()
    batch_size: int = 32
    timeout_s: float = 30.0
    max_attempts: int = 5
    wait_s: float = 120.0
    decision_overrides: Tuple[Tuple[str, float], ...] = ()  # (DecisionPolicy field, value) given on the command line
    write_corrected: str = ""
    skip_known: str = ""
    truth: str = ""
    report: bool = True
    tf_threads: int = 0

    def __post_init__(self):
        if self.endpoint and self.model:
            raise ValueError("pass at most one of --endpoint HOST:PORT and --model PATH (neither: the built-in "
                             "orientation model)")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        DecisionPolicy(**dict(self.decision_overrides))  # every threshold between 0 and 1


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Which model answers: name, version, class names (when known), where it lives, and its recorded policy."""

    name: str
    version: int
    class_names: Tuple[str, ...] = ()
    version_dir: str = ""
    endpoint: str = ""
    policy: ScorePolicy = ScorePolicy()
    policy_from: str = ""  # where the policy was read ("": none recorded, generic defaults)


def run_policy(model: ModelInfo, opts: ScoreOptions) -> DecisionPolicy:
    """The decision policy of a run: the model's, with the thresholds given on the command line. A model whose
    agreement gate is its rotate threshold (answers that sure stand when the turned copies disagree) keeps it so
    when --rotate-threshold moves."""
    changes = dict(opts.decision_overrides)
    recorded = model.policy.decision
    if ("rotate_threshold" in changes and "tta_agreement_below" not in changes
            and recorded.tta_agreement_below == recorded.rotate_threshold < 1.0):
        changes["tta_agreement_below"] = changes["rotate_threshold"]
    return model.policy.with_decision(**changes).decision


# ---------------------------------------------------------------- pure functions (tested without Beam)


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
               corrected_method="")
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


class ScorePolicyError(ValueError):
    """An export's recorded policy exists but cannot be read."""


def export_metadata(version_dir: str) -> Dict[str, Any]:
    """serving.export's metadata file of a version dir (local or gs://), {} when it has none."""
    path = FileSystems.join(version_dir, "assets.extra", EXPORT_METADATA)
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def recorded_policy(metadata: Dict[str, Any], where: str) -> Tuple[ScorePolicy, str]:
    """(the policy an export's metadata records, where from): its `score_policy` (what the graph computes, exports
    since the whole answer moved into the graph), else the decision part of its older `score_settings`, else the
    generic defaults ("" as where from). Raises ScorePolicyError when a recorded policy cannot be read: scoring on
    without it would quietly use other thresholds than the model's."""
    try:
        if metadata.get("score_policy"):
            return ScorePolicy.from_dict(metadata["score_policy"]), where
        if metadata.get("score_settings"):
            image_size = int(metadata.get("image_size") or 224)
            return policies.policy_from_settings(metadata["score_settings"], image_size), where
    except (TypeError, ValueError, KeyError) as e:
        raise ScorePolicyError(f"{where}: its recorded score policy cannot be read ({type(e).__name__}: {e})") from e
    return ScorePolicy(), ""


def builtin_model_dir() -> str:
    """The shipped default orientation model as a SavedModel version dir (exported on first use, then reused). The
    export runs in the launcher: workers only load the SavedModel."""
    from serving.builtin import builtin_model_dir as export_once

    return export_once()


def local_model_info(path: str) -> ModelInfo:
    """Name, version, class names and policy of an exported version, from serving.export's metadata file."""
    version_dir = resolve_version_dir(path)
    try:
        meta = export_metadata(version_dir)
    except (OSError, ValueError) as e:
        raise ScorePolicyError(f"{version_dir}: its export metadata cannot be read ({type(e).__name__}: {e})") from e
    name = meta.get("model_name") or os.path.basename(os.path.dirname(version_dir))
    version = int(meta.get("version") or os.path.basename(version_dir))
    policy, where = recorded_policy(meta, version_dir)
    return ModelInfo(name=name, version=version, class_names=tuple(meta.get("class_names") or ()),
                     version_dir=os.path.abspath(version_dir), policy=policy, policy_from=where)


def remote_model_info(opts: ScoreOptions) -> ModelInfo:
    """Wait for the served model, then ask it which version answers and with which policy (its `score_policy`
    signature): the served version's own, so an endpoint needs no other flag."""
    from serving.client import GrpcModelServerClient

    with GrpcModelServerClient(opts.endpoint, opts.model_name, timeout_s=opts.timeout_s,
                               max_attempts=opts.max_attempts) as client:
        client.wait_until_available(opts.wait_s)
        version = int(client.metadata()["version"])
        pinned = GrpcModelServerClient(opts.endpoint, opts.model_name, version=version, timeout_s=opts.timeout_s,
                                       max_attempts=opts.max_attempts)
        with pinned:
            text = pinned.score_policy()
    where = f"{opts.model_name} v{version} at {opts.endpoint}"
    try:
        policy = ScorePolicy.from_json(text) if text else ScorePolicy()
    except (TypeError, ValueError, KeyError) as e:
        raise ScorePolicyError(f"{where}: its score policy cannot be read ({type(e).__name__}: {e})") from e
    return ModelInfo(name=opts.model_name, version=version, class_names=_class_names_file(opts.labels),
                     endpoint=opts.endpoint, policy=policy, policy_from=where if text else "")


def _class_names_file(path: str) -> Tuple[str, ...]:
    if not path:
        return ()
    with FileSystems.open(path) as handle:
        data = json.loads(handle.read())
    return tuple(data["classes"] if isinstance(data, dict) else data)


def resolve_model(opts: ScoreOptions) -> Tuple[ScoreOptions, ModelInfo]:
    """The run's options (the built-in model's path filled in) and the model that answers (launcher side)."""
    if uses_builtin_model(opts.endpoint, opts.model):
        opts = dataclasses.replace(opts, model=builtin_model_dir())
        LOG.info("no --model/--endpoint: scoring with the built-in orientation model %s", opts.model)
    model = remote_model_info(opts) if opts.endpoint else local_model_info(opts.model)
    if not model.class_names and opts.labels:
        model = dataclasses.replace(model, class_names=_class_names_file(opts.labels))
    if model.policy_from:
        LOG.info("decision policy: %s's (%s)", model.policy_from, model.policy.origin or "recorded at export")
    else:
        LOG.warning("%s records no score policy (exported before policies were recorded?): the generic "
                    "thresholds apply", model.endpoint or model.version_dir)
    return opts, model


# ---------------------------------------------------------------- Beam shells


class PrepareImagesFn(beam.DoFn):
    """Read one input file: reuse known results by content hash, else emit one item per page carrying the bytes
    sent to the model (page_payload); unreadable inputs leave as error rows."""

    ERRORS = "errors"
    REUSED = "reused"

    def __init__(self, options: ScoreOptions, draft_side: int = 448):
        self._options = options
        self._draft_side = draft_side
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._items = Metrics.counter(COUNTER_NAMESPACE, "pages_prepared")
        self._as_file = Metrics.counter(COUNTER_NAMESPACE, "pages_sent_as_file")
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
        emitted = 0
        try:
            # Decoded to check it and to know its pages; a JPEG only at the size the graph reads (its crops' copy),
            # which is also what an EXIF-turned one is sent at.
            for page in imaging.decode_pages(data, max_pixels=opts.max_pixels, max_pages=opts.max_pages,
                                             draft_for=(self._draft_side, "crop")):
                image, sent = page_payload(data, fmt, page)
                emitted += 1
                self._items.inc()
                if sent == "file":
                    self._as_file.inc()
                yield {"uri": entry.uri, "page": page.page, "sha256": sha, "format": fmt,
                       "width": page.original_width, "height": page.original_height,
                       "exif_orientation": page.exif_orientation, "image": image}
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
        self._policy = run_policy(model, options)
        self._scored = Metrics.counter(COUNTER_NAMESPACE, "pages_scored")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, "pages_failed_predict")

    def route(self, item: dict, prediction: Optional[dict], error: str):
        if prediction is None:
            self._failed.inc()
            return beam.pvalue.TaggedOutput(
                "errors", error_row(item["uri"], "predict", "predict_failed", error, item["page"], item["sha256"]))
        self._scored.inc()
        return result_row(item, prediction, self._model, self._policy)


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
        self._retries = Metrics.counter(COUNTER_NAMESPACE, "rpc_retries")
        self._rpc_ms = Metrics.counter(COUNTER_NAMESPACE, "predict_ms")

    def setup(self):
        from serving.client import GrpcModelServerClient

        opts = self._options
        self._client = GrpcModelServerClient(opts.endpoint, self._model.name, version=self._model.version,
                                             max_batch_images=opts.batch_size, timeout_s=opts.timeout_s,
                                             max_attempts=opts.max_attempts)

    def process(self, items: List[dict]):
        started = time.monotonic()
        before = self._client.retries
        try:
            # After the client's own retries, a retryable failure means the server is gone: splitting cannot
            # help. NOT_FOUND (the pinned version, the model or its signature is not served) would fail every
            # image of every batch alike: the run stops.
            outcomes = predict_isolating(items, self._client.predict, fatal=(RetryableServingError,),
                                         abort=(ModelNotFoundError,))
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

    def __init__(self, version_dir: str, *, batch_size: int = 32, tf_threads: int = 0):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self._version_dir = version_dir
        self._tf_threads = tf_threads

    def load_model(self):
        import tensorflow as tf

        if self._tf_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self._tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._tf_threads)
            except RuntimeError:  # TF already initialised in this process; keep its pools
                pass
        return tf.saved_model.load(self._version_dir)  # keeps the variables alive; the signature is looked up per call

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        import tensorflow as tf

        from serving.client import prediction_rows

        signature = model.signatures["serving_default"]

        def predict(images: List[bytes]) -> List[Dict[str, Any]]:
            outputs = signature(images=tf.constant(images, dtype=tf.string))
            return prediction_rows({k: v.numpy() for k, v in outputs.items()}, len(images))

        for item, prediction, error in predict_isolating(list(batch), predict):
            yield PredictionResult(example=item, inference=(prediction, error), model_id=self._version_dir)

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(item["image"]) for item in batch)

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
                                               tf_threads=opts.tf_threads)
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
            PrepareImagesFn(opts, draft_side(self._model.policy)), beam.pvalue.AsDict(known)).with_outputs(
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
                    "TF Serving's gRPC API (--endpoint) or in-process with Beam RunInference (--model). The model "
                    "computes the whole answer (test-time turns, text crops, fusion); score sends each page's "
                    "bytes and decides under the model's own recorded policy (thresholds given here override "
                    "it). Writes results.parquet/.csv, errors.parquet, run.json and report.html in --output. "
                    "Unknown flags go to Beam (e.g. --runner DataflowRunner --project P --region R "
                    "--temp_location gs://...).")
    parser.add_argument("--input", required=True, help="folder, gs://bucket/prefix, glob, or manifest .csv/.parquet")
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", default="", help="HOST:PORT of TF Serving or `archive-vision serve`; the "
                                                      "served version's policy is read from it")
    where.add_argument("--model", default="", help="exported SavedModel: a version dir, or a dir whose latest "
                                                   "numeric version is taken. Neither flag nor `--model default`: "
                                                   "the built-in orientation model (exported once into "
                                                   "$ARCHIVE_VISION_CACHE)")
    parser.add_argument("--model-name", default="archive_vision", help="served model name (with --endpoint)")
    parser.add_argument("--labels", default="", help="labels.json naming the classes (with --endpoint, for the "
                                                    "report's top guesses; the in-process model knows its own)")
    parser.add_argument("--max-pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-file-mb", type=float, default=1024.0)
    parser.add_argument("--max-pages", type=int, default=1000)
    parser.add_argument("--exclude", action="append", default=[], help="file-name glob to skip (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per Predict call / RunInference batch")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of one Predict call")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per Predict call (retryable errors)")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the server's model")
    decision = parser.add_argument_group("decision policy (default: the model's recorded one)")
    decision.add_argument("--rotate-threshold", type=float, default=None,
                          help="auto_rotate when a non-zero turn has at least this confidence, else review")
    decision.add_argument("--ok-threshold", type=float, default=None,
                          help="ok when upright with at least this confidence (else review)")
    decision.add_argument("--class-threshold", type=float, default=None,
                          help="review when the class confidence is below this (0: class never sends to review)")
    decision.add_argument("--tta-min-agreement", type=float, default=None,
                          help="review when fewer than this share of the four turned copies agree")
    decision.add_argument("--tta-agreement-below", type=float, default=None,
                          help="apply --tta-min-agreement only to answers whose confidence is below this")
    decision.add_argument("--sparse-ink-below", type=float, default=None,
                          help="review a nearly blank page (ink on less than this share of it) unless its text "
                               "crops settled it (0: off)")
    parser.add_argument("--write-corrected", default="", help="write upright copies of auto_rotate images here")
    parser.add_argument("--skip-known", default="", help="previous results.parquet/.csv (or an ingest manifest): "
                                                         "files whose sha256 was scored by this model version "
                                                         "are copied over (reused=True), not scored again")
    parser.add_argument("--truth", default="", help="labelled manifest (uri + label and/or orientation) for the "
                                                    "report's confusion matrices")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write report.html")
    parser.add_argument("--tf-threads", type=int, default=0, help="cap TF threads per worker (0: TF's default)")
    known, beam_args = parser.parse_known_args(argv)
    unknown = unknown_beam_args(beam_args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither score's flags nor Beam pipeline options; "
                     f"the answer's settings, turned copies and text crops, are the model's own)")
    overrides = tuple((name, float(getattr(known, name))) for name in DECISION_FLAGS
                      if getattr(known, name) is not None)
    try:
        opts = ScoreOptions(
            input=known.input, output=known.output.rstrip("/"), endpoint=known.endpoint, model=known.model,
            model_name=known.model_name, labels=known.labels, max_pixels=known.max_pixels,
            max_file_mb=known.max_file_mb, max_pages=known.max_pages, exclude=tuple(known.exclude),
            batch_size=known.batch_size, timeout_s=known.timeout_s, max_attempts=known.max_attempts,
            wait_s=known.wait_s, decision_overrides=overrides, write_corrected=known.write_corrected.rstrip("/"),
            skip_known=known.skip_known, truth=known.truth, report=known.report, tf_threads=known.tf_threads)
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
    """run.json: options, model and its policy, counts per decision/class/error kind, what the graph's readers did,
    timings, reconciliation."""
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
        "pages_sent_as_file": metrics.get("pages_sent_as_file", 0),
        "errors": errors.num_rows, "errors_per_type": per_kind, "per_decision": per_decision,
        "per_class": per_class, "known_hashes": known_count,
        "corrected_written": sum(1 for r in rows if r["corrected_uri"] and not r["reused"]),
        "corrected_failed": sum(1 for r in rows if (r["corrected_method"] or "").startswith("failed")),
        "inputs_with_some_failed_page": len(error_uris & ok_uris),
    }
    counts["reconciled"] = counts["inputs"] == counts["inputs_ok"] + counts["inputs_failed"]
    predict_s = metrics.get("predict_ms", 0) / 1000.0
    with_orientation = [r for r in scored if r["orientation_probabilities"] is not None]
    return {
        "job": "score", "options": dataclasses.asdict(opts), "runner": runner or {},
        "model": {"name": model.name, "version": model.version, "class_names": list(model.class_names),
                  "source": model.endpoint or model.version_dir, "mode": "grpc" if model.endpoint else "in_process"},
        "policy": {"from": model.policy_from or "none recorded (generic defaults)",
                   **policies.policy_as_dict(model.policy), "decision_used": dataclasses.asdict(run_policy(model, opts))},
        "counts": counts,
        # What the graph did for the pages it answered (its tta_agreement and text_crops outputs).
        "tta": {"enabled": model.policy.answer.tta, "images": len(tta), "below": model.policy.answer.tta_below,
                "single_copy": len(with_orientation) - len(tta) if model.policy.answer.tta else 0,
                "disagreement_rate": round(sum(1 for a in tta if a < 1.0) / len(tta), 4) if tta else None,
                "mean_agreement": round(float(np.mean(tta)), 4) if tta else None},
        "text_crops": {"enabled": model.policy.answer.text_crops is not None,
                       "counted": sum(1 for r in scored if r.get("text_crops") == 1),
                       "not_agreed": sum(1 for r in scored if r.get("text_crops") == 0)},
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
    opts, model = resolve_model(opts)
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


def text_crops_summary(section: dict) -> str:
    """run.json's `text_crops` section in words (the run's summary line and report.html)."""
    return (f"evidence counted for {section.get('counted', 0)} pages, read and not counted (the crops did not "
            f"agree) for {section.get('not_agreed', 0)}")


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
