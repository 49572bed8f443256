"""TF Serving's REST API (model status, metadata, :predict) and the Prometheus metrics page, on --rest_api_port."""
from __future__ import annotations

import base64
import json
from http.server import BaseHTTPRequestHandler
from typing import Dict, Optional, Tuple

import grpc
import numpy as np

from serving import configs
from serving.server.common import LOG, RpcFailure
from serving.server.grpc_api import ModelServicer, PredictionServicer
from serving.server.metrics import Metrics


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



def _metrics_path(monitoring_config_file: Optional[str]) -> str:
    if monitoring_config_file:
        import re
        with open(monitoring_config_file, encoding="utf-8") as f:
            found = re.search(r'path\s*:\s*"([^"]+)"', f.read())
        if found:
            return found.group(1)
    return configs.PROMETHEUS_PATH

