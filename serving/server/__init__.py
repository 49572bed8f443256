"""A local server speaking TensorFlow Serving's gRPC API (and its REST API), for one-machine use and tests.

`archive-vision serve` / `python -m serving.server` takes `tensorflow_model_server`'s flags where they exist,
so a command line, a models.config and a batching_parameters.txt work unchanged on either server.

Services: tensorflow.serving.PredictionService (Predict, Classify, GetModelMetadata),
tensorflow.serving.ModelService (GetModelStatus) and grpc.health.v1.Health. The newest version(s) under each
model's base path are served; new versions are loaded in the background and swapped in, and the old one is
unloaded once its in-flight requests have finished. With --enable_batching, concurrent requests for the same
signature are merged into one model call (counted on the REST port's Prometheus endpoint).

Modules (each imports only those above it):
  common    the logger, DEFAULT_SIGNATURE, RpcFailure
  metrics   Metrics (Prometheus counters)
  batching  RequestBatcher (--enable_batching)
  models    ServableVersion, ModelEntry, ModelManager (loading, version policy, polling), model_entries
  grpc_api  PredictionServicer, ModelServicer, input validation, RpcFailure -> gRPC status
  rest      RestHandler (TF Serving's REST API + the metrics page)
  app       the command line, ModelServer, main()
Every name the single-module server.py had is re-exported here.
"""
from serving.server.common import DEFAULT_SIGNATURE, LOG, RpcFailure
from serving.server.metrics import Metrics
from serving.server.batching import RequestBatcher, _Task
from serving.server.models import MAX_LOAD_ATTEMPTS, ModelEntry, ModelManager, ServableVersion, model_entries
from serving.server.grpc_api import (CLASSIFY_METHOD, IMAGE_INPUT_ALIASES, IMAGE_MAGIC, ModelServicer,
                                     PredictionServicer, _rpc, _serialized_examples, _shape_text, _time_left,
                                     _validate_inputs)
from serving.server.rest import (RestHandler, _array, _decode_b64, _json_value, _metrics_path, _proto_json,
                                 _rest_columns)
from serving.server.app import (DEFAULT_MAX_MESSAGE_BYTES, ModelServer, _add_flag, _flag_bool, _parse_args,
                                _read_bytes, main)

__all__ = [
    "CLASSIFY_METHOD", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_SIGNATURE", "IMAGE_INPUT_ALIASES", "IMAGE_MAGIC", "LOG",
    "MAX_LOAD_ATTEMPTS", "Metrics", "ModelEntry", "ModelManager", "ModelServer", "ModelServicer", "PredictionServicer",
    "RequestBatcher", "RestHandler", "RpcFailure", "ServableVersion", "main", "model_entries",
    # private helpers, re-exported so that `from serving.server import _parse_args` etc. keep working
    "_Task", "_add_flag", "_array", "_decode_b64", "_flag_bool", "_json_value", "_metrics_path", "_parse_args",
    "_proto_json", "_read_bytes", "_rest_columns", "_rpc", "_serialized_examples", "_shape_text", "_time_left",
    "_validate_inputs",
]
