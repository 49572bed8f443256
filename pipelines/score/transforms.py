"""score's Beam transforms: list and read the archive (reusing earlier rows through pipelines.score.known), send
each page to the model (gRPC or RunInference), route the answers to result rows or error rows."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines import imaging, sources
from pipelines.ingest import DistributeEntries
from pipelines.progress import ShowProgress
from pipelines.score.answers import draft_side, page_payload, predict_isolating, result_row
from pipelines.score.corrected import WriteCorrectedFn
from pipelines.score.known import (CONTENT, LISTING, FetchKnownRows, KeyFilter, KnownTable, ReadKnown,
                                   ReadKnownFailures, ReuseByContentFn, ReuseByListingFn, content_key,
                                   entry_listing_key)
from pipelines.score.options import COUNTER_NAMESPACE, ModelInfo, ScoreOptions, run_policy
from pipelines.score.review import ApplyCorrections
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, error_row, whole_file_failed, write_job_tables
from serving.configs import SERVED_VERSIONS
from serving.errors import ModelNotFoundError, RetryableServingError


def _failure(uri, stage, kind, message, page=-1, sha="", fingerprint=""):
    """An errors.parquet row on the `errors` output, counted by its kind."""
    Metrics.counter(COUNTER_NAMESPACE, f"errors_{kind}").inc()
    return beam.pvalue.TaggedOutput("errors", error_row(uri, stage, kind, message, page, sha, fingerprint))


class ReadInputFn(beam.DoFn):
    """Read one listed input and hash its content: {entry, data, sha256}; listing errors and unreadable inputs leave
    as error rows. The only step that reads the archive's bytes to score them (counters files_read, bytes_read)."""

    ERRORS = "errors"

    def __init__(self, options: ScoreOptions):
        self._options = options
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._files = Metrics.counter(COUNTER_NAMESPACE, "files_read")
        self._bytes = Metrics.counter(COUNTER_NAMESPACE, "bytes_read")

    def process(self, entry: sources.SourceEntry):
        self._inputs.inc()
        if entry.error:
            yield _failure(entry.uri, "list", entry.error_type, entry.error)
            return
        try:
            data = sources.read_input(entry, self._options.max_file_mb)
        except imaging.ImageError as e:
            yield _failure(entry.uri, "read", e.kind, str(e))
            return
        self._files.inc()
        self._bytes.inc(len(data))
        yield {"entry": entry, "data": data, "sha256": imaging.content_sha256(data)}


class PrepareImagesFn(beam.DoFn):
    """One read input file that is to be scored -> one item per page carrying the bytes sent to the model
    (page_payload); a file that does not decode leaves as error rows."""

    ERRORS = "errors"

    def __init__(self, options: ScoreOptions, draft_side: int = 448):
        self._options = options
        self._draft_side = draft_side
        self._items = Metrics.counter(COUNTER_NAMESPACE, "pages_prepared")
        self._as_file = Metrics.counter(COUNTER_NAMESPACE, "pages_sent_as_file")
        self._failed = Metrics.counter(COUNTER_NAMESPACE, "inputs_failed_decode")

    def process(self, read: dict):
        opts = self._options
        entry, data, sha = read["entry"], read["data"], read["sha256"]
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
                yield {"uri": entry.uri, "page": page.page, "sha256": sha, "fingerprint": entry.fingerprint,
                       "format": fmt, "width": page.original_width, "height": page.original_height,
                       "exif_orientation": page.exif_orientation, "image": image}
        except imaging.ImageError as e:
            if emitted == 0:
                self._failed.inc()
            yield _failure(entry.uri, "decode", e.kind, str(e), e.page, sha, whole_file_failed(emitted, entry))
        except Exception as e:  # anything Pillow throws that we did not foresee still becomes a row
            if emitted == 0:
                self._failed.inc()
            yield _failure(entry.uri, "decode", "corrupt", f"{type(e).__name__}: {e}", -1, sha,
                        whole_file_failed(emitted, entry))


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


class _LoadedOnFirstBatch:
    """The SavedModel, loaded when its first batch arrives: RunInference loads its model when a worker sets the stage
    up, and a worker that sees no image (a --skip-known re-run that reuses every row) need not load it at all."""

    def __init__(self, load):
        self._load = load
        self._model = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:  # the worker's threads share one model
            if self._model is None:
                self._model = self._load()
                Metrics.counter(COUNTER_NAMESPACE, "models_loaded").inc()
            return self._model


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
        return _LoadedOnFirstBatch(self._load)

    def _load(self):
        import tensorflow as tf

        from serving.model_files import local_copy

        if self._tf_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self._tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._tf_threads)
            except RuntimeError:  # TF already initialised in this process; keep its pools
                pass
        # A gs:// version is copied into this worker's cache first (once per machine; TensorFlow's own gs:// reader
        # cannot be pointed at an emulator). The loaded object keeps the variables alive; the signature is looked
        # up per call.
        return tf.saved_model.load(local_copy(self._version_dir))

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        import tensorflow as tf

        from serving.client import prediction_rows

        signature = model.get().signatures["serving_default"]

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


class ScoreArchive(beam.PTransform):
    """archive path -> {results, errors}, each a tuple of PCollections of rows: the whole score graph but the table
    writes.

    With an earlier table (`known`), two keyed joins decide what is reused before anything is decoded (see
    pipelines.score.known): listed files by (uri, fingerprint), unread; the rest, once read, by sha256 (with only the
    earlier rows whose content may be among them). The joins carry references to the earlier rows; the rows reused
    are then read again, a span of row groups at a time."""

    def __init__(self, options: ScoreOptions, model: ModelInfo, known: Optional[KnownTable] = None):
        super().__init__()
        self._options = options
        self._model = model
        self._known = known

    def expand(self, pbegin) -> Dict[str, beam.PCollection]:
        opts = self._options
        listed = (pbegin
                  | "Source" >> beam.Create([opts.input])
                  | "ListArchive" >> beam.FlatMap(sources.list_archive, "none", list(opts.exclude)))
        reuse, known_errors = [], []  # requests for earlier rows, from each join
        known = self._known
        if known is None:
            entries = listed | "Distribute" >> DistributeEntries()
        else:  # the join spreads the entries over the workers: no Reshuffle before it
            keyed = listed | "KeyByListing" >> beam.Map(entry_listing_key)
            # Only the earlier rows of files that may be listed now cross this join (KeyFilter).
            listing = keyed | "ListingKeys" >> beam.Keys() | "ListingFilter" >> beam.CombineGlobally(KeyFilter())
            by_listing = (
                {"entries": keyed,
                 "known": pbegin | "Known" >> ReadKnown(known, self._model, LISTING, listing),
                 "failed": pbegin | "KnownFailures" >> ReadKnownFailures(known)}
                | "JoinByListing" >> beam.CoGroupByKey()
                | "ReuseByListing" >> beam.ParDo(ReuseByListingFn()).with_outputs(
                    ReuseByListingFn.UNMATCHED, ReuseByListingFn.ERRORS, main="rows"))
            reuse.append(by_listing.rows)
            known_errors.append(by_listing[ReuseByListingFn.ERRORS])
            entries = by_listing[ReuseByListingFn.UNMATCHED]
        # The progress line counts the files read (fused with the reading): those reused unread are not work.
        # Without earlier rows every listed input is read: its total is the listing's, counted before the Reshuffle
        # (a count of the entries read here would make the runner hold them all until it is known).
        read = (entries
                | "Progress" >> ShowProgress("score", counted=listed if known is None else None)
                | "ReadInputs" >> beam.ParDo(ReadInputFn(opts)).with_outputs(ReadInputFn.ERRORS, main="read"))
        fresh = read.read
        if known is not None:
            # Only the earlier rows whose content may be among the files read cross this join (KeyFilter).
            keyed = read.read | "KeyByContent" >> beam.Map(content_key)
            contents = keyed | "ContentKeys" >> beam.Keys() | "ContentFilter" >> beam.CombineGlobally(KeyFilter())
            by_content = (
                {"read": keyed, "known": pbegin | "KnownContents" >> ReadKnown(known, self._model, CONTENT, contents)}
                | "JoinByContent" >> beam.CoGroupByKey()
                | "ReuseByContent" >> beam.ParDo(ReuseByContentFn()).with_outputs(
                    ReuseByContentFn.UNMATCHED, main="rows"))
            reuse.append(by_content.rows)
            fresh = by_content[ReuseByContentFn.UNMATCHED]
        reused = [tuple(reuse) | "AllReuse" >> beam.Flatten()
                  | "ReusedRows" >> FetchKnownRows(known, self._model)] if reuse else []
        prepared = fresh | "PrepareImages" >> beam.ParDo(
            PrepareImagesFn(opts, draft_side(self._model.policy))).with_outputs(PrepareImagesFn.ERRORS, main="items")
        scored = prepared.items | "Score" >> ScoreImages(self._model, opts)
        rows = scored["rows"]
        if reused and (opts.corrections or opts.write_corrected):
            rows = (rows, *reused) | "ScoredAndReused" >> beam.Flatten()
            reused = []
        if opts.corrections:  # a person's answers decide the pages they answered (pipelines.score.review)
            rows = rows | "ApplyCorrections" >> ApplyCorrections(opts.corrections)
        if opts.write_corrected:
            root = os.path.abspath(opts.input) if not sources.is_remote(opts.input) and os.path.isdir(opts.input) \
                else ""
            rows = rows | "WriteCorrected" >> beam.ParDo(WriteCorrectedFn(opts.write_corrected, root))
        # Tuples of PCollections, written part by part (pipelines.tables.WriteTable): a Flatten here would make the
        # DirectRunner hold every row in its launcher.
        results = (rows, *reused)
        errors = (read[ReadInputFn.ERRORS], prepared[PrepareImagesFn.ERRORS], scored["errors"], *known_errors)
        return {"results": results, "errors": errors}


def build_pipeline(pipeline: beam.Pipeline, opts: ScoreOptions, model: ModelInfo,
                   known: Optional[KnownTable] = None) -> Dict[str, beam.PCollection]:
    """Wire the score job and its table writes onto `pipeline`; returns the ScoreArchive outputs for tests."""
    outputs = pipeline | "ScoreArchive" >> ScoreArchive(opts, model, known)
    write_job_tables(outputs, opts.output,
                     [("results", "results", RESULTS_SCHEMA), ("errors", "errors", ERRORS_SCHEMA)])
    return outputs
