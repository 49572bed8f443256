"""The gRPC services: tensorflow.serving.PredictionService and ModelService, input validation, error mapping."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from serving.server.common import DEFAULT_SIGNATURE, LOG, RpcFailure
from serving.server.metrics import Metrics
from serving.server.models import ModelManager, ServableVersion

CLASSIFY_METHOD = "tensorflow/serving/classify"
# Inputs carrying encoded images: checked per request so one bad image cannot fail a merged batch.
IMAGE_INPUT_ALIASES = ("images", "image_bytes")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


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
