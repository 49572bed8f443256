"""Client for TF Serving's gRPC API (the real tensorflow_model_server or serving/server/), for bulk scoring.

Shaped like TFX infra_validator's model server clients: `ModelServerClient` owns the policy (waiting for
AVAILABLE, splitting any number of images into batches under the message limit, N requests in flight,
per-call deadlines, retries with exponential backoff, mapping failures to serving.errors), and
`GrpcModelServerClient` owns the transport. The channel is created on first use and dropped when pickled,
so a client can be built on a Beam launcher and shipped to workers; call close() (or use `with`) when done.
"""
from __future__ import annotations

import abc
import concurrent.futures
import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import numpy as np

from serving.errors import (DeadlineExceededError, ImageTooLargeError, InvalidInputError, ModelNotFoundError,
                            ResourceExhaustedError, RetryableServingError, ServerUnavailableError, ServingError)

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit, which TF Serving keeps unless told
_REQUEST_OVERHEAD_BYTES = 4096
_PER_IMAGE_OVERHEAD_BYTES = 16


class ModelServerClient(abc.ABC):
    """Policy for calling a served model; subclasses implement the transport methods prefixed `_rpc_`."""

    def __init__(self, model_name: str = "archive_vision", *, signature_name: str = "serving_default",
                 input_name: str = "images", version: Optional[int] = None, version_label: Optional[str] = None,
                 max_batch_images: int = 32, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_in_flight: int = 4, timeout_s: float = 30.0, max_attempts: int = 5,
                 initial_backoff_s: float = 0.1, max_backoff_s: float = 5.0):
        if version is not None and version_label is not None:
            raise ValueError("pin a version or a version_label, not both")
        self.model_name = model_name
        self.signature_name = signature_name
        self.input_name = input_name
        self.version = version
        self.version_label = version_label
        self.max_batch_images = max(1, max_batch_images)
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max(1, max_in_flight)
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.retries = 0  # how many retries this client has made, for the caller's counters

    # --- transport, implemented by subclasses; each raises serving.errors exceptions ---

    @abc.abstractmethod
    def _rpc_predict(self, images: Sequence[bytes], timeout_s: float) -> Dict[str, np.ndarray]:
        """One Predict call over `images`; returns output alias -> array with len(images) rows."""

    @abc.abstractmethod
    def _rpc_model_states(self, timeout_s: float) -> Dict[int, str]:
        """Version -> TF Serving state name (START, LOADING, AVAILABLE, UNLOADING, END)."""

    @abc.abstractmethod
    def _rpc_metadata(self, timeout_s: float) -> Dict[str, Any]:
        """The served version's signatures: name -> {method_name, inputs, outputs}; plus "version"."""

    def close(self) -> None:
        """Release the transport; the client reconnects lazily if used again."""

    # --- policy ---

    def __enter__(self) -> "ModelServerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_states(self) -> Dict[int, str]:
        """Version -> state of every version of the model the server knows now (the pin does not filter)."""
        return self._rpc_model_states(self.timeout_s)

    def wait_until_available(self, deadline_s: float) -> Dict[int, str]:
        """Poll the model status until a (the pinned) version is AVAILABLE or deadline_s seconds pass."""
        end = time.monotonic() + deadline_s
        attempt = 0
        last: Exception | str = "no answer yet"
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"model {self.model_name!r} not AVAILABLE within {deadline_s:g}s (last: {last})")
            try:
                states = self._rpc_model_states(min(self.timeout_s, remaining))
                if self.version is not None:
                    ready = states.get(self.version) == "AVAILABLE"
                else:
                    ready = "AVAILABLE" in states.values()
                if ready:
                    return states
                last = f"states {states}"
            except (RetryableServingError, ModelNotFoundError) as error:
                # NOT_FOUND too: a server that is still loading does not know the model yet.
                last = error
            time.sleep(min(self._backoff(attempt), max(0.0, end - time.monotonic())))
            attempt += 1

    def metadata(self) -> Dict[str, Any]:
        """The served model's signature map (with retries)."""
        return self._with_retries(lambda: self._rpc_metadata(self.timeout_s))

    def score_policy(self) -> Optional[str]:
        """The served version's recorded policy (serving.policy.ScorePolicy JSON, its `score_policy` signature: one
        request row in, one copy out), or None for a version exported without one."""
        from serving.policy import POLICY_SIGNATURE

        if POLICY_SIGNATURE not in self.metadata().get("signatures", {}):
            return None
        return self._with_retries(lambda: self._rpc_policy(self.timeout_s))

    def _rpc_policy(self, timeout_s: float) -> str:
        """One call of the `score_policy` signature with one request row: its `policy_json`."""
        raise NotImplementedError(f"{type(self).__name__} cannot read a score policy")

    def predict(self, images: Sequence[bytes]) -> List[Dict[str, Any]]:
        """Predictions for any number of encoded images, one dict per image, in input order.

        Strings come back as str, scalars as Python numbers, vectors (probabilities) as numpy arrays.
        """
        batches = self.split_batches(images)
        if len(batches) <= 1:
            results = [self._predict_batch(b) for b in batches]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(self.max_in_flight, len(batches))) as pool:
                results = list(pool.map(self._predict_batch, batches))
        rows: List[Dict[str, Any]] = []
        for batch, outputs in zip(batches, results):
            rows.extend(prediction_rows(outputs, len(batch)))
        return rows

    def split_batches(self, images: Sequence[bytes]) -> List[List[bytes]]:
        """Consecutive batches of at most max_batch_images whose request stays under max_message_bytes."""
        budget = self.max_message_bytes - _REQUEST_OVERHEAD_BYTES
        batches: List[List[bytes]] = []
        current: List[bytes] = []
        size = 0
        for index, image in enumerate(images):
            cost = len(image) + _PER_IMAGE_OVERHEAD_BYTES
            if cost > budget:
                raise ImageTooLargeError(f"image {index} is {len(image)} bytes; the message limit is "
                                         f"{self.max_message_bytes} bytes")
            if current and (len(current) >= self.max_batch_images or size + cost > budget):
                batches.append(current)
                current, size = [], 0
            current.append(image)
            size += cost
        if current:
            batches.append(current)
        return batches

    def _predict_batch(self, images: List[bytes]) -> Dict[str, np.ndarray]:
        try:
            return self._with_retries(lambda: self._rpc_predict(images, self.timeout_s))
        except ResourceExhaustedError:
            # Still over a limit after retries (the server's may be lower than ours): halve and go on.
            if len(images) == 1:
                raise
            half = len(images) // 2
            first, second = self._predict_batch(images[:half]), self._predict_batch(images[half:])
            return {k: np.concatenate([first[k], second[k]], axis=0) for k in first}

    def _with_retries(self, call: Callable[[], T]) -> T:
        for attempt in range(self.max_attempts):
            try:
                return call()
            except RetryableServingError:
                if attempt == self.max_attempts - 1:
                    raise
                self.retries += 1
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        # Full jitter keeps many workers that failed together from retrying together.
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * (2 ** attempt)))


def prediction_rows(outputs: Dict[str, Any], count: int) -> List[Dict[str, Any]]:
    """Batch outputs (alias -> array of `count` rows) -> one dict per image, as `predict` returns them."""
    rows: List[Dict[str, Any]] = [{} for _ in range(count)]
    for alias, array in outputs.items():
        array = np.asarray(array)
        for i in range(count):
            value = array[i]
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, np.generic):
                value = value.item()
            rows[i][alias] = value
    return rows


def describe_signature_defs(signature_defs) -> Dict[str, Any]:
    """SignatureDef protos -> {name: {method_name, inputs, outputs}} with dtype names and shapes (-1: any)."""
    import tensorflow as tf

    def tensors(infos) -> Dict[str, Dict[str, Any]]:
        return {alias: {"dtype": tf.dtypes.as_dtype(info.dtype).name,
                        "shape": None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]}
                for alias, info in infos.items()}

    return {name: {"method_name": sig.method_name, "inputs": tensors(sig.inputs), "outputs": tensors(sig.outputs)}
            for name, sig in signature_defs.items()}


def map_grpc_error(error: Exception, what: str) -> ServingError:
    """The serving.errors exception for a grpc.RpcError (callers `raise map_grpc_error(e, ...) from e`)."""
    import grpc

    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    message = f"{what}: {code.name if code else 'error'}: {details}"
    kind = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
        grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
        grpc.StatusCode.FAILED_PRECONDITION: ModelNotFoundError,
        grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    }.get(code, ServingError)
    return kind(message)


class GrpcModelServerClient(ModelServerClient):
    """Transport over TF Serving's gRPC API (tensorflow_serving.apis stubs); optional TLS."""

    def __init__(self, address: str, model_name: str = "archive_vision", *,
                 root_certificates: Optional[bytes] = None, private_key: Optional[bytes] = None,
                 certificate_chain: Optional[bytes] = None, **policy: Any):
        super().__init__(model_name, **policy)
        self.address = address
        self._credentials = (root_certificates, private_key, certificate_chain)
        self._lock = threading.Lock()
        self._channel = None
        self._prediction_stub = None
        self._model_stub = None

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        for live in ("_lock", "_channel", "_prediction_stub", "_model_stub"):
            state[live] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _stubs(self):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        with self._lock:
            if self._channel is None:
                options = [("grpc.max_send_message_length", self.max_message_bytes),
                           ("grpc.max_receive_message_length", max(self.max_message_bytes, 64 * 1024 * 1024))]
                root, key, chain = self._credentials
                if root or chain:
                    credentials = grpc.ssl_channel_credentials(root, key, chain)
                    self._channel = grpc.secure_channel(self.address, credentials, options=options)
                else:
                    self._channel = grpc.insecure_channel(self.address, options=options)
                self._prediction_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
                self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
            return self._prediction_stub, self._model_stub

    def close(self) -> None:
        """Close the channel (a later call opens a new one)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._prediction_stub = self._model_stub = None

    def _spec(self, spec) -> None:
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label is not None:
            spec.version_label = self.version_label

    def _call(self, method: Callable, request, timeout_s: float, what: str):
        import grpc

        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as error:
            raise map_grpc_error(error, f"{what} {self.model_name} at {self.address}") from error

    def _rpc_predict(self, images: Sequence[bytes], timeout_s: float) -> Dict[str, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        prediction, _ = self._stubs()
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec)
        request.model_spec.signature_name = self.signature_name
        tensor = request.inputs[self.input_name]
        tensor.dtype = tf.string.as_datatype_enum
        tensor.tensor_shape.dim.add().size = len(images)
        tensor.string_val.extend(images)
        response = self._call(prediction.Predict, request, timeout_s, "Predict")
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def _rpc_policy(self, timeout_s: float) -> str:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        from serving.policy import POLICY_INPUT, POLICY_OUTPUT, POLICY_SIGNATURE

        prediction, _ = self._stubs()
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec)
        request.model_spec.signature_name = POLICY_SIGNATURE
        request.inputs[POLICY_INPUT].CopyFrom(tf.make_tensor_proto([b"policy"], dtype=tf.string))
        response = self._call(prediction.Predict, request, timeout_s, "Predict")
        return tf.make_ndarray(response.outputs[POLICY_OUTPUT]).reshape(-1)[0].decode("utf-8")

    def _rpc_model_states(self, timeout_s: float) -> Dict[int, str]:
        from tensorflow_serving.apis import get_model_status_pb2

        _, model = self._stubs()
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        response = self._call(model.GetModelStatus, request, timeout_s, "GetModelStatus")
        name = get_model_status_pb2.ModelVersionStatus.State.Name
        return {s.version: name(s.state) for s in response.model_version_status}

    def _rpc_metadata(self, timeout_s: float) -> Dict[str, Any]:
        from tensorflow_serving.apis import get_model_metadata_pb2

        prediction, _ = self._stubs()
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec)
        response = self._call(prediction.GetModelMetadata, request, timeout_s, "GetModelMetadata")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {"version": response.model_spec.version.value,
                "signatures": describe_signature_defs(signature_map.signature_def)}


class InProcessModelClient(ModelServerClient):
    """Transport that calls an exported SavedModel version inside this process: the same policy and rows
    as the gRPC client, for jobs that score without a server (the model loads lazily, once per process)."""

    def __init__(self, version_dir: str, model_name: str = "archive_vision", **policy: Any):
        policy.setdefault("max_in_flight", 1)
        super().__init__(model_name, **policy)
        self.version_dir = version_dir
        self._lock = threading.Lock()
        self._loaded = None

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_lock"] = state["_loaded"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _signature(self, name: str):
        import tensorflow as tf

        with self._lock:
            if self._loaded is None:
                try:
                    self._loaded = tf.saved_model.load(self.version_dir)
                except (OSError, ValueError) as error:
                    raise ModelNotFoundError(f"cannot load {self.version_dir}: {error}") from error
            signatures = self._loaded.signatures
        if name not in signatures:
            raise ModelNotFoundError(f'Serving signature key "{name}" not found in {self.version_dir}')
        return signatures[name]

    def close(self) -> None:
        """Drop the loaded model."""
        with self._lock:
            self._loaded = None

    def _rpc_predict(self, images: Sequence[bytes], timeout_s: float) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        signature = self._signature(self.signature_name)
        try:
            outputs = signature(**{self.input_name: tf.constant(list(images), tf.string)})
        except tf.errors.InvalidArgumentError as error:
            raise InvalidInputError(f"Predict {self.version_dir}: {error.message.splitlines()[0]}") from error
        return {k: v.numpy() for k, v in outputs.items()}

    def _rpc_policy(self, timeout_s: float) -> str:
        import tensorflow as tf

        from serving.policy import POLICY_INPUT, POLICY_OUTPUT, POLICY_SIGNATURE

        outputs = self._signature(POLICY_SIGNATURE)(**{POLICY_INPUT: tf.constant([b"policy"])})
        return outputs[POLICY_OUTPUT].numpy()[0].decode("utf-8")

    def _rpc_model_states(self, timeout_s: float) -> Dict[int, str]:
        self._signature(self.signature_name)
        name = self.version_dir.rstrip("/").rsplit("/", 1)[-1]
        return {int(name) if name.isdigit() else 0: "AVAILABLE"}

    def _rpc_metadata(self, timeout_s: float) -> Dict[str, Any]:
        import os

        from tensorflow.core.protobuf import saved_model_pb2

        saved = saved_model_pb2.SavedModel()
        with open(os.path.join(self.version_dir, "saved_model.pb"), "rb") as f:
            saved.ParseFromString(f.read())
        signature_defs = {k: v for k, v in saved.meta_graphs[0].signature_def.items() if not k.startswith("__")}
        return {"version": next(iter(self._rpc_model_states(timeout_s))),
                "signatures": describe_signature_defs(signature_defs)}
