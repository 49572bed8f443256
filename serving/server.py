"""A local server speaking TensorFlow Serving's gRPC API (and its REST API), for one-machine use and tests.

`archive-vision serve` / `python -m serving.server` takes `tensorflow_model_server`'s flags where they exist,
so a command line, a models.config and a batching_parameters.txt work unchanged on either server.

Services: tensorflow.serving.PredictionService (Predict, Classify, GetModelMetadata),
tensorflow.serving.ModelService (GetModelStatus) and grpc.health.v1.Health. The newest version(s) under each
model's base path are served; new versions are loaded in the background and swapped in, and the old one is
unloaded once its in-flight requests have finished. With --enable_batching, concurrent requests for the same
signature are merged into one model call (counted on the REST port's Prometheus endpoint).
"""
from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from serving import configs

LOG = logging.getLogger("archive_vision.serving.server")

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_METHOD = "tensorflow/serving/classify"
# Inputs carrying encoded images: checked per request so one bad image cannot fail a merged batch.
IMAGE_INPUT_ALIASES = ("images", "image_bytes")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A version copied in non-atomically can fail to load at first; TF Serving also retries (max_num_load_retries).
MAX_LOAD_ATTEMPTS = 5


class RpcFailure(Exception):
    """A request failure carrying the gRPC status code TF Serving answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Metrics:
    """Counters exported in Prometheus text format; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = collections.defaultdict(float)

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add value to the counter `name{labels}`."""
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            self._counters[key] += value

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels."""
        with self._lock:
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def prometheus_text(self) -> str:
        """The counters in Prometheus exposition format."""
        with self._lock:
            items = sorted(self._counters.items())
        lines, typed = [], set()
        for (name, labels), value in items:
            if name not in typed:
                lines.append(f"# TYPE {name} counter")
                typed.add(name)
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}")
        return "\n".join(lines) + "\n"


@dataclasses.dataclass
class _Task:
    inputs: Dict[str, np.ndarray]
    rows: int
    future: concurrent.futures.Future


class RequestBatcher:
    """Merges concurrent requests of one signature into model calls of up to max_batch_size rows."""

    def __init__(self, run: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                 params: configs.BatchingParameters, name: str):
        self._run = run
        self._params = params
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        # One thread gathers a batch at a time; the others run model calls meanwhile.
        self._gather_lock = threading.Lock()
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{name}-{i}", daemon=True)
                         for i in range(max(1, params.num_batch_threads))]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Dict[str, np.ndarray], rows: int) -> concurrent.futures.Future:
        """Queue one request; its future resolves to that request's own rows of the outputs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if rows == 0 or rows >= self._params.max_batch_size:
            self._execute([_Task(inputs, rows, future)])
            return future
        with self._cond:
            if self._stopped:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the model version is being unloaded")
            if len(self._queue) >= self._params.max_enqueued_batches * self._params.max_batch_size:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                                 "The batch scheduling queue to which this task was submitted is full")
            self._queue.append(_Task(inputs, rows, future))
            self._cond.notify_all()
        return future

    def stop(self) -> None:
        """Finish the queued requests, then end the batch threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _gather(self) -> Optional[List[_Task]]:
        with self._gather_lock, self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait(0.5)
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            deadline = time.monotonic() + self._params.batch_timeout_micros / 1e6
            while rows < self._params.max_batch_size:
                if self._queue:
                    if rows + self._queue[0].rows > self._params.max_batch_size:
                        break
                    task = self._queue.popleft()
                    batch.append(task)
                    rows += task.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch: List[_Task]) -> None:
        try:
            if len(batch) == 1:
                batch[0].future.set_result(self._run(batch[0].inputs))
                return
            merged = {k: np.concatenate([t.inputs[k] for t in batch], axis=0) for k in batch[0].inputs}
            outputs = self._run(merged)
        except RpcFailure as failure:
            if len(batch) == 1 or failure.code != grpc.StatusCode.INVALID_ARGUMENT:
                for task in batch:
                    task.future.set_exception(failure)
                return
            # One request's data broke the merged call: answer each alone so only that one fails.
            for task in batch:
                self._execute([task])
            return
        except Exception as error:  # noqa: BLE001 - every waiting request must get an answer
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(error)
            return
        start = 0
        for task in batch:
            task.future.set_result({k: v[start:start + task.rows] for k, v in outputs.items()})
            start += task.rows


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class ServableVersion:
    """One loaded SavedModel version: its signature functions and SignatureDefs, batchers, in-flight count."""

    def __init__(self, model_name: str, version: int, path: str, metrics: Metrics,
                 batching: Optional[configs.BatchingParameters]):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.model_name = model_name
        self.version = version
        self.path = path
        self._metrics = metrics
        saved = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved.ParseFromString(f.read())
        self.signature_defs = {k: v for k, v in saved.meta_graphs[0].signature_def.items()
                               if not k.startswith("__")}
        self._loaded = tf.saved_model.load(path)
        self._functions = dict(self._loaded.signatures)
        self._batchers = {name: RequestBatcher(self._caller(name), batching, f"{model_name}-{version}-{name}")
                          for name in self._functions} if batching else {}
        self._inflight = 0
        self._idle = threading.Condition()

    def _caller(self, signature: str) -> Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]:
        def run(inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
            return self.call(signature, inputs)
        return run

    def call(self, signature: str, inputs: Dict[str, np.ndarray], metric: str = "model_calls") -> Dict[str, np.ndarray]:
        """One model call; TF's invalid-argument errors (undecodable bytes, ...) become INVALID_ARGUMENT."""
        import tensorflow as tf

        self._metrics.add(f"archive_vision_serving_{metric}_total", model=self.model_name,
                          version=self.version, signature=signature)
        try:
            outputs = self._functions[signature](**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            message = getattr(error, "message", str(error)).split("\n")[0]
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message) from error
        return {k: v.numpy() for k, v in outputs.items()}

    def run(self, signature: str, inputs: Dict[str, np.ndarray], rows: Optional[int],
            timeout: Optional[float]) -> Dict[str, np.ndarray]:
        """Run a validated request, through the batcher when batching is on and the inputs are batched."""
        batcher = self._batchers.get(signature)
        if batcher is None or rows is None:
            return self.call(signature, inputs)
        try:
            return batcher.submit(inputs, rows).result(timeout=timeout)
        except concurrent.futures.TimeoutError as error:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from error

    def warm_up(self) -> int:
        """Replay the version's assets.extra warmup requests (as TF Serving does with --enable_model_warmup)."""
        count = 0
        for log in configs.read_warmup_requests(self.path):
            if log.HasField("predict_log"):
                request = log.predict_log.request
                signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
                if signature in self._functions:
                    import tensorflow as tf
                    self.call(signature, {k: tf.make_ndarray(v) for k, v in request.inputs.items()}, "warmup_calls")
                    count += 1
        return count

    def acquire(self) -> None:
        """Count a request as in flight (called under the manager's lock)."""
        with self._idle:
            self._inflight += 1

    def release(self) -> None:
        """A request on this version finished."""
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def unload(self, timeout: float = 60.0) -> None:
        """Wait (bounded) for in-flight requests, then stop the batchers and drop the model."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight > 0 and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        for batcher in self._batchers.values():
            batcher.stop()
        self._functions = {}
        self._loaded = None


@dataclasses.dataclass
class ModelEntry:
    """One model of the config: where its versions live, which of them to serve, and its labels."""

    name: str
    base_path: str
    latest: int = 1
    specific: Tuple[int, ...] = ()
    all_versions: bool = False
    labels: Dict[str, int] = dataclasses.field(default_factory=dict)

    def wanted(self, on_disk: List[int]) -> List[int]:
        """The versions the policy serves, given those found on disk (ascending)."""
        if self.all_versions:
            return on_disk
        if self.specific:
            return [v for v in on_disk if v in self.specific]
        return on_disk[-self.latest:] if on_disk else []


class ModelManager:
    """Loads, serves and unloads the versions of every configured model; polls the file system for new ones."""

    def __init__(self, entries: Sequence[ModelEntry], metrics: Metrics,
                 batching: Optional[configs.BatchingParameters] = None, warmup: bool = True):
        self._entries = {e.name: e for e in entries}
        self._metrics = metrics
        self._batching = batching
        self._warmup = warmup
        self._lock = threading.Lock()
        self._available: Dict[str, Dict[int, ServableVersion]] = {e.name: {} for e in entries}
        self._states: Dict[str, Dict[int, Tuple[int, int, str]]] = {e.name: {} for e in entries}
        self._load_failures: Dict[str, Dict[int, int]] = {e.name: {} for e in entries}
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None
        self.on_change: Callable[[], None] = lambda: None

    @staticmethod
    def versions_on_disk(base_path: str) -> List[int]:
        """Numeric version dirs under base_path holding a saved_model.pb (others are ignored, as TF Serving does)."""
        if not os.path.isdir(base_path):
            return []
        return sorted(int(n) for n in os.listdir(base_path)
                      if n.isdigit() and os.path.exists(os.path.join(base_path, n, "saved_model.pb")))

    def _set_state(self, name: str, version: int, state: str, error_code: int = 0, message: str = "") -> None:
        from tensorflow_serving.apis import get_model_status_pb2

        value = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        with self._lock:
            self._states[name][version] = (value, error_code, message)

    def poll_once(self) -> None:
        """Load newly wanted versions, publish them, then unload versions no longer wanted."""
        for entry in self._entries.values():
            wanted = entry.wanted(self.versions_on_disk(entry.base_path))
            with self._lock:
                loaded = set(self._available[entry.name])
            for version in wanted:
                if version in loaded or self._load_failures[entry.name].get(version, 0) >= MAX_LOAD_ATTEMPTS:
                    continue
                self._load(entry, version)
            with self._lock:
                ready = set(self._available[entry.name])
                # Keep old versions until a wanted one is up, so a failed load never leaves the model empty.
                stale = ready - set(wanted) if ready & set(wanted) else set()
                retired = [self._available[entry.name].pop(v) for v in sorted(stale)]
            for servable in retired:
                self._set_state(entry.name, servable.version, "UNLOADING")
                servable.unload()
                self._set_state(entry.name, servable.version, "END")
                LOG.info("unloaded %s version %d", entry.name, servable.version)
        self.on_change()

    def _load(self, entry: ModelEntry, version: int) -> None:
        path = os.path.join(entry.base_path, str(version))
        self._set_state(entry.name, version, "START")
        self._set_state(entry.name, version, "LOADING")
        try:
            servable = ServableVersion(entry.name, version, path, self._metrics, self._batching)
            if self._warmup:
                servable.warm_up()
        except Exception as error:  # noqa: BLE001 - a broken version must not take the server down
            LOG.error("failed to load %s version %d: %s", entry.name, version, error)
            failures = self._load_failures[entry.name]
            failures[version] = failures.get(version, 0) + 1
            self._set_state(entry.name, version, "END", 3, f"failed to load: {error}")
            return
        with self._lock:
            self._available[entry.name][version] = servable
        self._set_state(entry.name, version, "AVAILABLE")
        LOG.info("serving %s version %d from %s", entry.name, version, path)

    def start(self, poll_wait_seconds: float) -> None:
        """Load what is on disk now, then keep polling every poll_wait_seconds (0: never)."""
        self.poll_once()
        if poll_wait_seconds > 0:
            self._poller = threading.Thread(target=self._poll_loop, args=(poll_wait_seconds,),
                                            name="version-poller", daemon=True)
            self._poller.start()

    def _poll_loop(self, wait: float) -> None:
        while not self._stop.wait(wait):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling after a transient file system error
                LOG.exception("version poll failed")

    def stop(self) -> None:
        """Stop polling and unload everything."""
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=10)
        with self._lock:
            servables = [s for versions in self._available.values() for s in versions.values()]
            for versions in self._available.values():
                versions.clear()
        for servable in servables:
            servable.unload(timeout=5)

    def model_names(self) -> List[str]:
        """Configured model names."""
        return list(self._entries)

    def has_available(self, name: Optional[str] = None) -> bool:
        """Whether a model (or every model) has at least one version serving."""
        with self._lock:
            names = [name] if name else list(self._available)
            return all(self._available.get(n) for n in names)

    def acquire(self, model_spec) -> ServableVersion:
        """Resolve a ModelSpec to a served version and mark a request in flight on it (release() after)."""
        name = model_spec.name
        if name not in self._entries:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        with self._lock:
            versions = self._available[name]
            choice = model_spec.WhichOneof("version_choice")
            if choice == "version":
                version = model_spec.version.value
                servable = versions.get(version)
                if servable is None:
                    raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                                     f"Servable not found for request: Specific({name}, {version})")
            elif choice == "version_label":
                label = model_spec.version_label
                if label not in self._entries[name].labels:
                    raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
                version = self._entries[name].labels[label]
                servable = versions.get(version)
                if servable is None:
                    raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                                     f"Servable not found for request: Specific({name}, {version})")
            else:
                if not versions:
                    raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
                servable = versions[max(versions)]
            servable.acquire()
            return servable

    def statuses(self, name: str, version: Optional[int]) -> List[Tuple[int, int, int, str]]:
        """(version, state, error_code, message) rows for GetModelStatus, TF Serving's NOT_FOUND rules."""
        if name not in self._entries:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        with self._lock:
            states = dict(self._states[name])
        if version is not None:
            if version not in states:
                raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        return [(v, *states[v]) for v in sorted(states, reverse=True)]


def _validate_inputs(signature_def, inputs_proto, model_name: str) -> Tuple[Dict[str, np.ndarray], Optional[int]]:
    """Check names, dtypes, shapes and image bytes against the SignatureDef; return arrays and the batch rows."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    wanted = set(signature_def.inputs)
    sent = set(inputs_proto)
    if sent != wanted:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                         f"Request inputs do not match required inputs for model `{model_name}`. "
                         f"Send extra: {sorted(sent - wanted)}. Missing but required: {sorted(wanted - sent)}.")
    arrays: Dict[str, np.ndarray] = {}
    batch_rows: List[int] = []
    for alias, info in signature_def.inputs.items():
        proto = inputs_proto[alias]
        if proto.dtype != info.dtype:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Expected input {alias} to be {types_pb2.DataType.Name(info.dtype)} "
                             f"but got {types_pb2.DataType.Name(proto.dtype)}")
        try:
            array = tf.make_ndarray(proto)
        except Exception as error:  # noqa: BLE001 - a malformed TensorProto is the caller's error
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"input {alias}: malformed tensor: {error}") from error
        expected = [d.size for d in info.tensor_shape.dim]
        if not info.tensor_shape.unknown_rank and (
                array.ndim != len(expected) or any(e >= 0 and e != a for e, a in zip(expected, array.shape))):
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input {alias} has shape {_shape_text(array.shape)} but the signature expects "
                             f"{_shape_text(expected)} (-1: any size)")
        if alias in IMAGE_INPUT_ALIASES and array.dtype == object:
            for index, item in enumerate(array.reshape(-1)):
                if not item.startswith(IMAGE_MAGIC):
                    raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"{alias}[{index}] is not a JPEG/PNG/GIF/BMP image "
                                     f"({len(item)} bytes starting {item[:8]!r})")
        if expected and expected[0] == -1 and array.ndim:
            batch_rows.append(array.shape[0])
        arrays[alias] = array
    # Merge into a batch only when every input is batched along axis 0 with the same row count.
    rows = batch_rows[0] if len(batch_rows) == len(arrays) and len(set(batch_rows)) == 1 else None
    return arrays, rows


def _time_left(context) -> Optional[float]:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)


def _rpc(handler):
    """Turn RpcFailure (and surprises) into gRPC status codes; the server keeps serving."""
    def wrapped(self, request, context):
        try:
            return handler(self, request, context)
        except RpcFailure as failure:
            self.metrics.add("archive_vision_serving_request_errors_total", method=handler.__name__,
                             code=failure.code.name)
            context.abort(failure.code, failure.message)
        except Exception as error:  # noqa: BLE001
            LOG.exception("%s failed", handler.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
    wrapped.__name__ = handler.__name__
    return wrapped


class PredictionServicer:
    """tensorflow.serving.PredictionService over a ModelManager."""

    def __init__(self, manager: ModelManager, metrics: Metrics):
        self.manager = manager
        self.metrics = metrics

    def predict_arrays(self, model_spec, inputs_proto, output_filter: Sequence[str],
                       timeout: Optional[float]) -> Tuple[ServableVersion, str, Dict[str, np.ndarray]]:
        """The Predict logic shared by gRPC and REST."""
        servable = self.manager.acquire(model_spec)
        try:
            signature = model_spec.signature_name or DEFAULT_SIGNATURE
            signature_def = servable.signature_defs.get(signature)
            if signature_def is None:
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
            for alias in output_filter:
                if alias not in signature_def.outputs:
                    raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"output tensor alias not found in signature: {alias} Outputs expected to be "
                                     f"in the set {{{','.join(sorted(signature_def.outputs))}}}.")
            arrays, rows = _validate_inputs(signature_def, inputs_proto, model_spec.name)
            outputs = servable.run(signature, arrays, rows, timeout)
            self.metrics.add("archive_vision_serving_requests_total", model=servable.model_name,
                             version=servable.version, signature=signature)
            wanted = list(output_filter) or list(outputs)
            return servable, signature, {k: outputs[k] for k in wanted}
        finally:
            servable.release()

    @_rpc
    def Predict(self, request, context):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        servable, signature, outputs = self.predict_arrays(request.model_spec, request.inputs,
                                                           list(request.output_filter), _time_left(context))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.model_name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for alias, array in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(array))
        return response

    @_rpc
    def Classify(self, request, context):
        from tensorflow_serving.apis import classification_pb2

        examples = _serialized_examples(request.input)
        servable = self.manager.acquire(request.model_spec)
        try:
            signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
            signature_def = servable.signature_defs.get(signature)
            if signature_def is None:
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
            if signature_def.method_name != CLASSIFY_METHOD:
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"Expected classification signature method_name to be {CLASSIFY_METHOD}. "
                                 f"Was: {signature_def.method_name}")
            (alias,) = signature_def.inputs
            outputs = servable.run(signature, {alias: np.array(examples, dtype=object)}, len(examples),
                                   _time_left(context))
        finally:
            servable.release()
        self.metrics.add("archive_vision_serving_requests_total", model=servable.model_name,
                         version=servable.version, signature=signature)
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = servable.model_name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        classes, scores = outputs.get("classes"), outputs.get("scores")
        for row in range(len(examples)):
            result = response.result.classifications.add()
            width = (classes if classes is not None else scores).shape[1]
            for column in range(width):
                entry = result.classes.add()
                if classes is not None:
                    entry.label = classes[row, column].decode()
                if scores is not None:
                    entry.score = float(scores[row, column])
        return response

    @_rpc
    def GetModelMetadata(self, request, context):
        from tensorflow_serving.apis import get_model_metadata_pb2

        for field in request.metadata_field:
            if field != "signature_def":
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        if not request.metadata_field:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one "
                             "metadata_field")
        servable = self.manager.acquire(request.model_spec)
        try:
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for name, signature_def in servable.signature_defs.items():
                signature_map.signature_def[name].CopyFrom(signature_def)
        finally:
            servable.release()
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.model_name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    @_rpc
    def Regress(self, request, context):
        raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, "Regress is not served by archive-vision models")

    @_rpc
    def MultiInference(self, request, context):
        raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not served by the local server")


def _serialized_examples(input_proto) -> List[bytes]:
    """Serialized tf.Examples of a Classify Input; context features are merged into each, as TF Serving does."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        context = input_proto.example_list_with_context.context
        examples = []
        for example in input_proto.example_list_with_context.examples:
            merged = type(example)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            examples.append(merged.SerializeToString())
    else:
        examples = []
    if not examples:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    return examples


class ModelServicer:
    """tensorflow.serving.ModelService: GetModelStatus with TF Serving's version states."""

    def __init__(self, manager: ModelManager, metrics: Metrics):
        self.manager = manager
        self.metrics = metrics

    @_rpc
    def GetModelStatus(self, request, context):
        return self.status_response(request.model_spec)

    def status_response(self, spec):
        """The GetModelStatusResponse for a ModelSpec (gRPC and REST answer with the same proto)."""
        from tensorflow_serving.apis import get_model_status_pb2

        version = spec.version.value if spec.WhichOneof("version_choice") == "version" else None
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, state, error_code, message in self.manager.statuses(spec.name, version):
            status = response.model_version_status.add()
            status.version = number
            status.state = state
            status.status.error_code = error_code
            status.status.error_message = message
        return response

    @_rpc
    def HandleReloadConfigRequest(self, request, context):
        raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, "config reload is not supported by the local server")


class RestHandler(BaseHTTPRequestHandler):
    """TF Serving's REST API subset: model status, metadata, :predict (row or columnar, {"b64": ...}), metrics."""

    server_version = "archive-vision-serving"
    predictions: PredictionServicer
    models: ModelServicer
    metrics: Metrics
    metrics_path: str = configs.PROMETHEUS_PATH

    def log_message(self, format, *args):  # noqa: A002 - keep request logs off stderr
        LOG.debug(format, *args)

    def _send(self, code: int, body, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _spec(self, path: str):
        from tensorflow_serving.apis import model_pb2

        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1", "models"]:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Malformed request: {path}")
        spec = model_pb2.ModelSpec(name=parts[2])
        if len(parts) >= 5 and parts[3] == "versions":
            if not parts[4].isdigit():  # TF Serving's path pattern takes only digits here
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: {self.command} {path}")
            spec.version.value = int(parts[4])
        elif len(parts) >= 5 and parts[3] == "labels":
            spec.version_label = parts[4]
        return spec, parts

    def _fail(self, failure: RpcFailure) -> None:
        http = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
                grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNAVAILABLE: 503}.get(failure.code, 500)
        self._send(http, {"error": failure.message})

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == self.metrics_path:
            self._send(200, self.metrics.prometheus_text(), "text/plain; version=0.0.4")
            return
        try:
            spec, parts = self._spec(self.path)
            if parts[-1] == "metadata":
                # As TF Serving prints GetModelMetadataResponse: proto field names, default values included.
                from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2
                servable = self.predictions.manager.acquire(spec)
                servable.release()
                signature_map = get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs)
                model_spec = model_pb2.ModelSpec(name=servable.model_name)
                model_spec.version.value = servable.version
                self._send(200, {"model_spec": _proto_json(model_spec),
                                 "metadata": {"signature_def": _proto_json(signature_map)}})
                return
            # TF Serving prints GetModelStatusResponse with its JSON names (model_version_status, error_code).
            self._send(200, _proto_json(self.models.status_response(spec), proto_names=False))
        except RpcFailure as failure:
            self._fail(failure)

    def do_POST(self):  # noqa: N802
        import tensorflow as tf

        try:
            path, _, verb = self.path.partition(":")
            if verb != "predict":
                raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"Malformed request: POST {self.path}")
            spec, _ = self._spec(path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            spec.signature_name = body.get("signature_name", "")
            columns, row_format = _rest_columns(body)
            inputs = {k: tf.make_tensor_proto(v) for k, v in columns.items()}
            _, _, outputs = self.predictions.predict_arrays(spec, inputs, [], timeout=None)
        except RpcFailure as failure:
            self._fail(failure)
            return
        except (ValueError, TypeError, KeyError) as error:
            self._send(400, {"error": f"Malformed request: {error}"})
            return
        listed = {k: _json_value(v) for k, v in outputs.items()}
        if not row_format:
            self._send(200, {"outputs": listed})
        elif len(listed) == 1:
            self._send(200, {"predictions": next(iter(listed.values()))})
        else:
            rows = len(next(iter(listed.values())))
            self._send(200, {"predictions": [{k: v[i] for k, v in listed.items()} for i in range(rows)]})


def _proto_json(message, proto_names: bool = True) -> dict:
    """A proto as TF Serving's REST API prints it (fields with default values included)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=proto_names,
                                     always_print_fields_with_no_presence=True)


def _decode_b64(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def _rest_columns(body: dict) -> Tuple[Dict[str, np.ndarray], bool]:
    """REST request body -> input arrays; row format ("instances") or columnar ("inputs")."""
    if "instances" in body:
        instances = [_decode_b64(i) if not (isinstance(i, dict) and "b64" not in i)
                     else {k: _decode_b64(v) for k, v in i.items()} for i in body["instances"]]
        if instances and isinstance(instances[0], dict):
            columns = {k: [i[k] for i in instances] for k in instances[0]}
        else:
            columns = {"images": instances}
        return {k: _array(v) for k, v in columns.items()}, True
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            inputs = {"images": inputs}
        return {k: _array(_decode_b64(v)) for k, v in inputs.items()}, False
    raise ValueError('the body needs "instances" or "inputs"')


def _array(values) -> np.ndarray:
    if values and isinstance(values[0], bytes):
        return np.array(values, dtype=object)
    return np.array(values)


def _json_value(array: np.ndarray):
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.reshape(-1)]
    return array.tolist()


def _flag_bool(text: str) -> bool:
    return str(text).lower() in ("1", "true", "yes", "on")


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="archive-vision serve", description=__doc__.split("\n")[0])
    bool_flag = {"nargs": "?", "const": True, "type": _flag_bool}
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    parser.add_argument("--rest_api_port", type=int, default=0, help="REST/metrics port (0: no REST server)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1 only)")
    parser.add_argument("--model_name", default="default", help="name of the single model (with --model_base_path)")
    parser.add_argument("--model_base_path", help="dir holding numeric version dirs of the single model")
    parser.add_argument("--model_config_file", help="models.config (ModelServerConfig text proto)")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="seconds between checks for new versions (0: load once)")
    parser.add_argument("--enable_batching", default=False, **bool_flag)
    parser.add_argument("--batching_parameters_file", help="batching_parameters.txt (BatchingParameters text proto)")
    parser.add_argument("--enable_model_warmup", default=True, **bool_flag,
                        help="replay assets.extra/tf_serving_warmup_requests before serving a version")
    parser.add_argument("--monitoring_config_file", help="monitoring.config; its Prometheus path is served on REST")
    parser.add_argument("--max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest gRPC request/response; larger ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--grpc_max_threads", type=int, default=32)
    parser.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0)
    parser.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0)
    parser.add_argument("--ssl_cert_file", help="PEM server certificate chain: serve gRPC over TLS")
    parser.add_argument("--ssl_key_file", help="PEM private key of --ssl_cert_file")
    parser.add_argument("--ssl_client_ca_file", help="PEM CA bundle: require client certificates signed by it")
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        parser.error("pass --model_base_path (with --model_name) or --model_config_file")
    if bool(args.ssl_cert_file) != bool(args.ssl_key_file):
        parser.error("--ssl_cert_file and --ssl_key_file go together")
    return args


def model_entries(args: argparse.Namespace) -> List[ModelEntry]:
    """The models to serve, from --model_config_file or --model_name/--model_base_path."""
    if not args.model_config_file:
        return [ModelEntry(args.model_name, os.path.abspath(args.model_base_path))]
    config = configs.read_models_config(args.model_config_file)
    entries = []
    config_dir = os.path.dirname(os.path.abspath(args.model_config_file))
    for model in config.model_config_list.config:
        policy = model.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        entries.append(ModelEntry(
            name=model.name, base_path=os.path.join(config_dir, model.base_path),
            latest=policy.latest.num_versions or 1 if choice == "latest" else 1,
            specific=tuple(policy.specific.versions) if choice == "specific" else (),
            all_versions=choice == "all", labels=dict(model.version_labels)))
    return entries


def _metrics_path(monitoring_config_file: Optional[str]) -> str:
    if monitoring_config_file:
        import re
        with open(monitoring_config_file, encoding="utf-8") as f:
            found = re.search(r'path\s*:\s*"([^"]+)"', f.read())
        if found:
            return found.group(1)
    return configs.PROMETHEUS_PATH


class ModelServer:
    """The running server: model manager, gRPC server (+ health), optional REST server."""

    def __init__(self, args: argparse.Namespace):
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.args = args
        self.metrics = Metrics()
        batching = None
        if args.enable_batching:
            batching = configs.BatchingParameters()
            if args.batching_parameters_file:
                with open(args.batching_parameters_file, encoding="utf-8") as f:
                    batching = configs.parse_batching_parameters(f.read())
        self.manager = ModelManager(model_entries(args), self.metrics, batching, warmup=args.enable_model_warmup)
        self._health = health.HealthServicer()
        self._health_pb2 = health_pb2
        self.manager.on_change = self._update_health
        options = [("grpc.max_receive_message_length", args.max_message_bytes),
                   ("grpc.max_send_message_length", args.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(args.grpc_max_threads), options=options)
        self.predictions = PredictionServicer(self.manager, self.metrics)
        self.models = ModelServicer(self.manager, self.metrics)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.predictions, self.grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.models, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.grpc_server)
        address = f"{args.host}:{args.port}"
        if args.ssl_cert_file:
            credentials = grpc.ssl_server_credentials(
                [(_read_bytes(args.ssl_key_file), _read_bytes(args.ssl_cert_file))],
                root_certificates=_read_bytes(args.ssl_client_ca_file) if args.ssl_client_ca_file else None,
                require_client_auth=bool(args.ssl_client_ca_file))
            self.port = self.grpc_server.add_secure_port(address, credentials)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.rest_server: Optional[ThreadingHTTPServer] = None
        if args.rest_api_port:
            handler = type("BoundRestHandler", (RestHandler,), {
                "predictions": self.predictions, "models": self.models, "metrics": self.metrics,
                "metrics_path": _metrics_path(args.monitoring_config_file)})
            self.rest_server = ThreadingHTTPServer((args.host, args.rest_api_port), handler)
            self.rest_server.daemon_threads = True

    def _update_health(self) -> None:
        serving = self._health_pb2.HealthCheckResponse.SERVING
        not_serving = self._health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.manager.model_names():
            self._health.set(name, serving if self.manager.has_available(name) else not_serving)
        everything = serving if self.manager.has_available() else not_serving
        for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
            self._health.set(service, everything)

    def start(self) -> None:
        """Start answering (NOT_SERVING health until models load), load models, start polling."""
        self._update_health()
        self.grpc_server.start()
        if self.rest_server:
            threading.Thread(target=self.rest_server.serve_forever, name="rest", daemon=True).start()
        self.manager.start(self.args.file_system_poll_wait_seconds)
        rest = f" REST on {self.args.host}:{self.rest_server.server_address[1]}" if self.rest_server else ""
        print(f"archive-vision serve: gRPC on {self.args.host}:{self.port}{rest}; models "
              f"{', '.join(self.manager.model_names())}", flush=True)

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, finish in-flight ones (bounded by grace), unload models."""
        self._health.enter_graceful_shutdown()
        if self.rest_server:
            self.rest_server.shutdown()
        self.grpc_server.stop(grace).wait(grace + 1)
        self.manager.stop()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision serve`: serve models over TF Serving's gRPC API until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import tensorflow as tf

    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    server = ModelServer(args)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    while not stopping.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
