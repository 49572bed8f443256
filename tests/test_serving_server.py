"""The local server as a real subprocess, spoken to with the project client and with raw TF Serving stubs."""
from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import urllib.request

import urllib.error

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

from serving import configs, export
from serving.client import GrpcModelServerClient
from serving.errors import ImageTooLargeError, InvalidInputError, ModelNotFoundError, ServerUnavailableError
from tests.test_serving_export import CLASS_NAMES, IMAGE_SIZE, make_tiny_model, sample_images
from archive_vision.local_processes import free_port, stop_process

pytestmark = pytest.mark.slow

MODEL = "archive_vision"
MAX_MESSAGE_BYTES = 256 * 1024
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



class RunningServer:
    """`python -m serving.server` in a subprocess, with its ports and log."""

    def __init__(self, log_path: str, flags: list[str]):
        self.port, self.rest_port = free_port(), free_port()
        self.log_path = log_path
        command = [sys.executable, "-m", "serving.server", "--port", str(self.port),
                   "--rest_api_port", str(self.rest_port), "--max_message_bytes", str(MAX_MESSAGE_BYTES),
                   "--tensorflow_intra_op_parallelism", "1", "--tensorflow_inter_op_parallelism", "1", *flags]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"

    def wait_until_available(self, model: str = MODEL, deadline_s: float = 120.0, **client_options) -> None:
        client = GrpcModelServerClient(self.address, model, **client_options)
        try:
            client.wait_until_available(deadline_s)
        except ServerUnavailableError as error:
            pytest.fail(f"server did not come up ({error}); exit={self.process.poll()} log:\n{self.log()}")
        finally:
            client.close()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metric(self, name: str, **labels: str) -> float:
        """A counter from the Prometheus endpoint, summed over the series carrying all of `labels`."""
        url = f"http://127.0.0.1:{self.rest_port}{configs.PROMETHEUS_PATH}"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(w in line.rsplit(" ", 1)[0] for w in wanted))

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server over export v1 of a tiny two-head model, with the label `stable` -> 1."""
    base = str(tmp_path_factory.mktemp("export"))
    model = make_tiny_model(seed=1)
    version_dir = export.export_model(model, base, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, version=1)
    with open(os.path.join(base, configs.MODELS_CONFIG), "w") as f:
        f.write(configs.models_config_text({MODEL: os.path.join(base, MODEL)}, {MODEL: {"stable": 1}}))
    # A long batch window so that concurrent requests visibly merge on two shared cores.
    configs.write_batching_parameters(base, configs.BatchingParameters(max_batch_size=32,
                                                                       batch_timeout_micros=100_000))
    server = RunningServer(os.path.join(base, "server.log"), [
        "--model_config_file", os.path.join(base, configs.MODELS_CONFIG), "--file_system_poll_wait_seconds", "0.5",
        "--enable_batching", "--batching_parameters_file", os.path.join(base, configs.BATCHING_PARAMETERS)])
    try:
        server.wait_until_available()
        yield {"server": server, "base": base, "version_dir": version_dir, "model": model}
    finally:
        server.stop()


@pytest.fixture()
def stubs(served):
    channel = grpc.insecure_channel(served["server"].address)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel), health_pb2_grpc.HealthStub(channel))
    channel.close()


def predict_request(images, name: str = MODEL, signature: str = "", input_name: str = "images",
                    version: int | None = None, label: str | None = None) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def in_process_outputs(version_dir: str, images) -> dict:
    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    return {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}


def test_client_predictions_match_the_saved_model_in_process(served):
    images = sample_images()
    want = in_process_outputs(served["version_dir"], images)

    with GrpcModelServerClient(served["server"].address, MODEL, max_batch_images=4, max_in_flight=2) as client:
        rows = client.predict(images)
        metadata = client.metadata()

    assert len(rows) == len(images)
    np.testing.assert_allclose(np.stack([r["class_probabilities"] for r in rows]), want["class_probabilities"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([r["orientation_probabilities"] for r in rows]),
                               want["orientation_probabilities"], rtol=1e-5, atol=1e-6)
    assert [r["class_names"] for r in rows] == [n.decode() for n in want["class_names"]]
    assert [r["orientation_degrees"] for r in rows] == want["orientation_degrees"].tolist()
    assert metadata["version"] == 1
    assert metadata["signatures"]["serving_default"]["inputs"] == {"images": {"dtype": "string", "shape": [-1]}}
    assert metadata["signatures"]["classify"]["method_name"] == "tensorflow/serving/classify"


def test_raw_stubs_predict_classify_metadata_status_health(served, stubs):
    prediction, model_service, health = stubs
    images = sample_images()[:3]

    request = predict_request(images, label="stable")
    request.output_filter.append("orientation_degrees")
    predicted = prediction.Predict(request, timeout=30)

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = MODEL
    classify.model_spec.signature_name = "classify"
    for image in images:
        classify.input.example_list.examples.add().features.feature["image/encoded"].bytes_list.value.append(image)
    classified = prediction.Classify(classify, timeout=30)

    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata_request.model_spec.name = MODEL
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    prediction.GetModelMetadata(metadata_request, timeout=30).metadata["signature_def"].Unpack(signature_map)

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = MODEL
    status = model_service.GetModelStatus(status_request, timeout=30)

    assert list(predicted.outputs) == ["orientation_degrees"]
    assert predicted.model_spec.version.value == 1 and predicted.model_spec.signature_name == "serving_default"
    assert len(classified.result.classifications) == 3
    assert [c.label for c in classified.result.classifications[0].classes] == CLASS_NAMES
    assert sum(c.score for c in classified.result.classifications[0].classes) == pytest.approx(1.0, abs=1e-4)
    assert {"serving_default", "tf_example", "classify"} <= set(signature_map.signature_def)
    assert signature_map.signature_def["classify"].method_name == "tensorflow/serving/classify"
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    for service in ("", "tensorflow.serving.PredictionService", MODEL):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    return caught.value


def test_bad_requests_get_tf_serving_status_codes_and_the_server_stays_up(served, stubs):
    prediction, model_service, _ = stubs
    good = sample_images()[:2]
    float_request = predict_pb2.PredictRequest()
    float_request.model_spec.name = MODEL
    float_request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros([2], np.float32)))
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = MODEL
    status_request.model_spec.version.value = 7

    cases = [
        (predict_request(good, input_name="pictures"), grpc.StatusCode.INVALID_ARGUMENT, "pictures"),
        (float_request, grpc.StatusCode.INVALID_ARGUMENT, "DT_STRING"),
        (predict_request(np.array(good, dtype=object).reshape(2, 1)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (predict_request([good[0], b"not an image at all"]), grpc.StatusCode.INVALID_ARGUMENT, "images[1]"),
        (predict_request([b"\xff\xd8\xff\xe0" + b"\x00" * 64]), grpc.StatusCode.INVALID_ARGUMENT, ""),
        (predict_request(good, name="no_such_model"), grpc.StatusCode.NOT_FOUND, "no_such_model"),
        (predict_request(good, version=7), grpc.StatusCode.NOT_FOUND, "7"),
        (predict_request(good, label="canary"), grpc.StatusCode.INVALID_ARGUMENT, "canary"),
        (predict_request(good, signature="no_such_signature"), grpc.StatusCode.FAILED_PRECONDITION,
         "no_such_signature"),
        (predict_request([good[0] * (MAX_MESSAGE_BYTES // len(good[0]) + 1)]), grpc.StatusCode.RESOURCE_EXHAUSTED,
         ""),
    ]
    for request, code, mention in cases:
        error = _rpc_error(prediction.Predict, request)
        assert error.code() == code, (mention, error.details())
        assert mention in error.details()
    assert _rpc_error(model_service.GetModelStatus, status_request).code() == grpc.StatusCode.NOT_FOUND

    with GrpcModelServerClient(served["server"].address, MODEL) as client:
        with pytest.raises(InvalidInputError) as caught:
            client.predict([good[0], b"GIF89a broken"])
        assert isinstance(caught.value.__cause__, grpc.RpcError)
        with pytest.raises(ModelNotFoundError):
            GrpcModelServerClient(served["server"].address, "no_such_model").predict(good)
        assert len(client.predict(good)) == 2
    assert served["server"].process.poll() is None


def test_a_broken_image_in_a_merged_batch_fails_only_its_own_request(served):
    images = sample_images()
    broken = b"\xff\xd8\xff\xe0" + os.urandom(200)
    results: dict = {}
    barrier = threading.Barrier(9)
    channel = grpc.insecure_channel(served["server"].address)
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def call(index: int) -> None:
        payload = [broken] if index == 8 else [images[index % len(images)]]
        barrier.wait(timeout=30)
        try:
            results[index] = prediction.Predict(predict_request(payload), timeout=60).model_spec.version.value
        except grpc.RpcError as error:
            results[index] = error.code()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    channel.close()

    assert results[8] == grpc.StatusCode.INVALID_ARGUMENT
    assert [results[i] for i in range(8)] == [1] * 8


def test_server_side_batching_merges_concurrent_requests(served):
    server = served["server"]
    calls_before = server.metric("archive_vision_serving_model_calls_total")
    requests_before = server.metric("archive_vision_serving_requests_total")
    images = sample_images()
    barrier = threading.Barrier(16)
    failures = []

    def call(index: int) -> None:
        with GrpcModelServerClient(server.address, MODEL) as client:
            barrier.wait(timeout=30)
            try:
                client.predict([images[index % len(images)]])
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                failures.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)

    requests = server.metric("archive_vision_serving_requests_total") - requests_before
    calls = server.metric("archive_vision_serving_model_calls_total") - calls_before
    assert failures == []
    assert requests == 16
    assert calls < requests


def test_client_splits_any_number_of_images_under_the_message_limit(served):
    images = [sample_images()[i % 6] for i in range(50)]
    with GrpcModelServerClient(served["server"].address, MODEL) as single:
        one_by_one = [single.predict([image])[0] for image in images[:6]]
    budget = 4096 + 3 * max(len(i) + 16 for i in images)  # about three images per request

    with GrpcModelServerClient(served["server"].address, MODEL, max_batch_images=16, max_in_flight=3,
                               max_message_bytes=budget) as client:
        batches = client.split_batches(images)
        rows = client.predict(images)
        with pytest.raises(ImageTooLargeError):
            client.predict([b"\xff\xd8\xff" + b"\x00" * budget])

    assert len(batches) > 50 // 16 + 1  # the byte budget, not max_batch_images, decided the split
    assert all(4096 + sum(len(i) + 16 for i in b) <= budget for b in batches)
    assert [i for b in batches for i in b] == images
    assert len(rows) == 50
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row["orientation_probabilities"],
                                   one_by_one[i % 6]["orientation_probabilities"], rtol=1e-5, atol=1e-6)
        assert row["class_names"] == one_by_one[i % 6]["class_names"]


def test_client_survives_pickling_for_beam_workers(served):
    client = GrpcModelServerClient(served["server"].address, MODEL, max_attempts=2)
    first = client.predict(sample_images()[:1])
    revived = pickle.loads(pickle.dumps(client))
    again = revived.predict(sample_images()[:1])
    client.close()
    revived.close()
    assert again[0]["class_names"] == first[0]["class_names"]


def test_rest_api_status_and_b64_predict(served):
    server = served["server"]
    base = f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL}"
    status = json.loads(urllib.request.urlopen(base, timeout=10).read())
    body = json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in sample_images()[:2]]}).encode()
    request = urllib.request.Request(base + ":predict", data=body, headers={"Content-Type": "application/json"})
    predictions = json.loads(urllib.request.urlopen(request, timeout=30).read())["predictions"]

    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert len(predictions) == 2 and predictions[0]["class_names"] in CLASS_NAMES
    assert len(predictions[0]["orientation_probabilities"]) == 4


def rest_get(url: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def proto_json(message) -> dict:
    """A proto as TF Serving's REST API prints it: proto field names, default-valued fields included."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def test_rest_api_status_of_one_version_matches_tf_serving(served, stubs):
    _, model_service, _ = stubs
    server = served["server"]
    base = f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL}"
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = MODEL
    status_request.model_spec.version.value = 1
    grpc_status = model_service.GetModelStatus(status_request, timeout=30)

    one = rest_get(base + "/versions/1")
    every = rest_get(base)
    unknown_version = rest_get(base + "/versions/7")
    unknown_model = rest_get(f"http://127.0.0.1:{server.rest_port}/v1/models/no_such_model/versions/1")
    not_a_number = rest_get(base + "/versions/latest")

    want = {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert one == (200, want)
    assert one[1] == json_format.MessageToDict(grpc_status, always_print_fields_with_no_presence=True)
    assert every == (200, want)  # only version 1 is on disk yet
    assert unknown_version[0] == 404 and list(unknown_version[1]) == ["error"]
    assert "version 7" in unknown_version[1]["error"]
    assert unknown_model[0] == 404 and "no_such_model" in unknown_model[1]["error"]
    assert not_a_number[0] == 400 and list(not_a_number[1]) == ["error"]  # TF Serving: "Malformed request"
    assert server.process.poll() is None


def test_rest_api_metadata_matches_tf_serving(served, stubs):
    prediction, _, _ = stubs
    server = served["server"]
    base = f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL}"
    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata_request.model_spec.name = MODEL
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    prediction.GetModelMetadata(metadata_request, timeout=30).metadata["signature_def"].Unpack(signature_map)

    latest = rest_get(base + "/metadata")
    pinned = rest_get(base + "/versions/1/metadata")
    labelled = rest_get(base + "/labels/stable/metadata")
    unknown_version = rest_get(base + "/versions/7/metadata")
    unknown_label = rest_get(base + "/labels/canary/metadata")

    assert latest[0] == 200 and sorted(latest[1]) == ["metadata", "model_spec"]
    assert latest[1]["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    assert list(latest[1]["metadata"]) == ["signature_def"]
    assert latest[1]["metadata"]["signature_def"] == proto_json(signature_map)
    signatures = latest[1]["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "tf_example", "classify"} <= set(signatures)
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert signatures["classify"]["method_name"] == "tensorflow/serving/classify"
    images = signatures["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_STRING" and images["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert signatures["serving_default"]["outputs"]["orientation_probabilities"]["dtype"] == "DT_FLOAT"
    assert pinned == latest and labelled == latest
    assert unknown_version[0] == 404 and "7" in unknown_version[1]["error"]
    assert unknown_label[0] == 400 and "canary" in unknown_label[1]["error"]


def test_warmup_records_are_replayed_when_a_version_loads(served):
    """--enable_model_warmup is on by default, as in TF Serving: the fixture's server replayed the export's
    assets.extra/tf_serving_warmup_requests before version 1 went AVAILABLE."""
    records = list(configs.read_warmup_requests(served["version_dir"]))
    assert records and all(r.HasField("predict_log") for r in records)  # the export writes them

    replayed = served["server"].metric("archive_vision_serving_warmup_calls_total", model=MODEL, version="1")

    assert replayed == len(records)


def test_warmup_disabled_replays_nothing(served, tmp_path):
    server = RunningServer(str(tmp_path / "no_warmup.log"), [
        "--model_name", "scans", "--model_base_path", os.path.dirname(served["version_dir"]),
        "--file_system_poll_wait_seconds", "0", "--enable_model_warmup=false"])
    try:
        server.wait_until_available("scans")
        calls_at_load = server.metric("archive_vision_serving_model_calls_total")
        warmup_at_load = server.metric("archive_vision_serving_warmup_calls_total")
        with GrpcModelServerClient(server.address, "scans") as client:
            rows = client.predict(sample_images()[:1])
        calls_after = server.metric("archive_vision_serving_model_calls_total", model="scans", version="1")
    finally:
        server.stop()

    assert warmup_at_load == 0 and calls_at_load == 0
    assert len(rows) == 1 and calls_after == 1  # the counters do count on this server: one real call


def test_unreachable_server_raises_unavailable_within_the_deadline():
    client = GrpcModelServerClient(f"127.0.0.1:{free_port()}", MODEL, max_attempts=2, timeout_s=2,
                                   initial_backoff_s=0.01)
    with pytest.raises(ServerUnavailableError):
        client.wait_until_available(1.0)
    with pytest.raises(ServerUnavailableError) as caught:
        client.predict(sample_images()[:1])
    client.close()
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert client.retries == 1


def test_tls_server_with_single_model_flags_answers_only_tls_clients(served, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True,
                   timeout=60)
    server = RunningServer(str(tmp_path / "tls.log"), [
        "--model_name", "scans", "--model_base_path", os.path.dirname(served["version_dir"]),
        "--file_system_poll_wait_seconds", "0", "--ssl_cert_file", str(cert), "--ssl_key_file", str(key)])
    try:
        server.wait_until_available("scans", root_certificates=cert.read_bytes())
        with GrpcModelServerClient(server.address, "scans", root_certificates=cert.read_bytes()) as client:
            rows = client.predict(sample_images()[:2])
        plain = GrpcModelServerClient(server.address, "scans", max_attempts=1, timeout_s=5)
        with pytest.raises(ServerUnavailableError):
            plain.predict(sample_images()[:1])
        plain.close()
    finally:
        server.stop()
    assert [r["class_names"] in CLASS_NAMES for r in rows] == [True, True]


def test_hot_swap_under_load_fails_no_request_and_switches_version(served):
    """Runs last in this module: it leaves version 2 serving."""
    server, base = served["server"], served["base"]
    images = sample_images()
    stop = threading.Event()
    seen: dict[int, list[int]] = {i: [] for i in range(8)}
    failures: list = []
    channel = grpc.insecure_channel(server.address)
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def keep_calling(index: int) -> None:
        deadline = time.monotonic() + 180
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                response = prediction.Predict(predict_request([images[index % len(images)]]), timeout=60)
                seen[index].append(response.model_spec.version.value)
            except grpc.RpcError as error:
                failures.append((index, error.code(), error.details()))

    threads = [threading.Thread(target=keep_calling, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while not all(seen.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        export.export_model(make_tiny_model(seed=2), base, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, version=2)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not all(len([v for v in s if v == 2]) >= 3 for s in seen.values()):
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = MODEL
    deadline = time.monotonic() + 30
    states = {}
    while time.monotonic() < deadline:
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=10)
        states = {s.version: s.state for s in status.model_version_status}
        if states.get(1) == get_model_status_pb2.ModelVersionStatus.END:
            break
        time.sleep(0.2)
    pinned_old = _rpc_error(prediction.Predict, predict_request(images[:1], version=1))
    channel.close()

    assert failures == []
    for versions in seen.values():
        assert versions[0] == 1 and versions[-1] == 2
        assert versions == sorted(versions)  # once switched, a caller never sees the old version again
    assert states == {1: get_model_status_pb2.ModelVersionStatus.END,
                      2: get_model_status_pb2.ModelVersionStatus.AVAILABLE}
    assert pinned_old.code() == grpc.StatusCode.NOT_FOUND


def test_a_broken_new_version_is_reported_and_the_served_one_stays(served):
    """After the hot swap: version 2 serves; a corrupt version 3 must not replace it."""
    server, base = served["server"], served["base"]
    broken_dir = os.path.join(base, MODEL, "3")
    os.makedirs(broken_dir)
    with open(os.path.join(broken_dir, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel")
    channel = grpc.insecure_channel(server.address)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = MODEL
    status_request.model_spec.version.value = 3
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        try:
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=10)
            if status.model_version_status[0].status.error_code != 0:
                break
        except grpc.RpcError:
            pass  # version 3 not seen yet
        time.sleep(0.2)
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        predict_request(sample_images()[:1]), timeout=30)
    channel.close()
    rest = rest_get(f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL}/versions/3")

    assert status is not None and status.model_version_status[0].status.error_code != 0
    assert "failed to load" in status.model_version_status[0].status.error_message
    assert response.model_spec.version.value == 2
    # REST prints the same status as TF Serving does: the error code by its name, as in the proto's JSON.
    assert rest == (200, json_format.MessageToDict(status, always_print_fields_with_no_presence=True))
    assert rest[1]["model_version_status"][0]["state"] == "END"
    assert rest[1]["model_version_status"][0]["status"]["error_code"] not in ("OK", "0", "3")
