"""TensorFlow Serving's side files: models.config, batching_parameters.txt, monitoring.config, warmup records.

These are the files `tensorflow_model_server --model_config_file ... --enable_batching
--batching_parameters_file ... --monitoring_config_file ... --enable_model_warmup` reads. The local
server (serving/server/) reads the same files, so one export runs unchanged on either.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
MONITORING_CONFIG = "monitoring.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
# Versions served at once in the models.config the project writes (model_version_policy latest): publishing a
# new version keeps the previous one loaded, so a batch job that pinned it at launch (`archive-vision score
# --endpoint`) finishes on it. Requests that name no version get the newest, as with TF Serving's default of 1.
SERVED_VERSIONS = 2


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """The BatchingParameters fields (session_bundle_config.proto) that the local server honours.

    Tuned for the whole-answer graph on CPU (bench/served.py): it decodes and reads every image at full size inside
    the call, so a batch buys little and a large one costs cache (one core: 9.5 pages/s a page at a time, 9.4 in
    batches of 8, 7.9 in batches of 32). Batches of at most 8 keep what batching wins for the gated steps (one
    call of the turned copies and the crop classifier for all unsure images) without that cost."""

    max_batch_size: int = 8
    batch_timeout_micros: int = 2000
    max_enqueued_batches: int = 100
    num_batch_threads: int = 2
    allowed_batch_sizes: tuple = ()
    pad_variable_length_inputs: bool = False

    def to_text(self) -> str:
        """The text-format proto TF Serving's --batching_parameters_file expects (Int64Value wrappers)."""
        lines = [f"max_batch_size {{ value: {self.max_batch_size} }}",
                 f"batch_timeout_micros {{ value: {self.batch_timeout_micros} }}",
                 f"max_enqueued_batches {{ value: {self.max_enqueued_batches} }}",
                 f"num_batch_threads {{ value: {self.num_batch_threads} }}"]
        lines += [f"allowed_batch_sizes: {size}" for size in self.allowed_batch_sizes]
        if self.pad_variable_length_inputs:
            lines.append("pad_variable_length_inputs { value: true }")
        return "\n".join(lines) + "\n"


_WRAPPED = re.compile(r"(\w+)\s*\{\s*value\s*:\s*(\w+)\s*\}")
_PLAIN = re.compile(r"(\w+)\s*:\s*(\w+)")


def parse_batching_parameters(text: str) -> BatchingParameters:
    """Read a batching_parameters.txt (text proto, wrapped or plain scalars); unknown fields are ignored."""
    text = re.sub(r"#.*", "", text)
    values: Dict[str, object] = {}
    allowed: List[int] = []
    for name, value in _WRAPPED.findall(text):
        values[name] = value
    for name, value in _PLAIN.findall(_WRAPPED.sub("", text)):
        if name == "allowed_batch_sizes":
            allowed.append(int(value))
        elif name != "value":
            values[name] = value
    fields = {f.name for f in dataclasses.fields(BatchingParameters)}
    kwargs: Dict[str, object] = {}
    for name, value in values.items():
        if name not in fields or name == "allowed_batch_sizes":
            continue
        kwargs[name] = str(value).lower() == "true" if name == "pad_variable_length_inputs" else int(value)
    return BatchingParameters(allowed_batch_sizes=tuple(allowed), **kwargs)


def models_config_text(models: Dict[str, str], version_labels: Optional[Dict[str, Dict[str, int]]] = None,
                       num_versions: int = 1) -> str:
    """A ModelServerConfig text proto serving every `name -> base_path` in `models` (the latest `num_versions`
    versions each; 1, TF Serving's default policy, writes no model_version_policy)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if num_versions < 1:
        raise ValueError("num_versions must be at least 1")
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in sorted(models.items()):
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = base_path
        entry.model_platform = "tensorflow"
        if num_versions != 1:
            entry.model_version_policy.latest.num_versions = num_versions
        for label, version in sorted((version_labels or {}).get(name, {}).items()):
            entry.version_labels[label] = version
    return text_format.MessageToString(config)


def read_models_config(path: str):
    """Parse a models.config file into a ModelServerConfig proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())


def write_models_config(export_base: str, model_name: str, model_base_path: str,
                        num_versions: int = SERVED_VERSIONS) -> str:
    """Add or update `model_name` in EXPORT_BASE/models.config, keeping the other models listed there; every
    model serves its latest `num_versions` versions (SERVED_VERSIONS: the previous one stays through a rollout)."""
    path = os.path.join(export_base, MODELS_CONFIG)
    models: Dict[str, str] = {}
    labels: Dict[str, Dict[str, int]] = {}
    if os.path.exists(path):
        for entry in read_models_config(path).model_config_list.config:
            models[entry.name] = entry.base_path
            labels[entry.name] = dict(entry.version_labels)
    models[model_name] = model_base_path if "://" in model_base_path else os.path.abspath(model_base_path)
    _write_text(path, models_config_text(models, labels, num_versions))
    return path


def write_batching_parameters(export_base: str, params: BatchingParameters = BatchingParameters()) -> str:
    """Write EXPORT_BASE/batching_parameters.txt."""
    path = os.path.join(export_base, BATCHING_PARAMETERS)
    _write_text(path, params.to_text())
    return path


def write_monitoring_config(export_base: str, metrics_path: str = PROMETHEUS_PATH) -> str:
    """Write EXPORT_BASE/monitoring.config enabling the Prometheus endpoint on the REST port."""
    path = os.path.join(export_base, MONITORING_CONFIG)
    _write_text(path, f'prometheus_config {{\n  enable: true\n  path: "{metrics_path}"\n}}\n')
    return path


def write_warmup_requests(version_dir: str, model_name: str, images: Sequence[bytes],
                          signature_name: str = "serving_default", input_name: str = "images",
                          repeat: int = 1) -> str:
    """Write VERSION/assets.extra/tf_serving_warmup_requests: PredictionLog TFRecords of Predict requests."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for _ in range(repeat):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature_name
            request.inputs[input_name].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(version_dir: str) -> Iterable:
    """Yield the PredictionLog protos of a version's warmup file (none when it has no file)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    if not os.path.exists(path):
        return
    for raw in tf.data.TFRecordDataset(path).take(1000).as_numpy_iterator():
        yield prediction_log_pb2.PredictionLog.FromString(raw)


def _write_text(path: str, text: str) -> None:
    # Write-then-rename so a server polling the file never reads half of it.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
