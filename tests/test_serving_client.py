"""Client policy (batching, in-flight limit, retries, waiting, error mapping) over a scripted fake transport."""
from __future__ import annotations

import pickle
import threading
import time

import grpc
import numpy as np
import pytest

from serving.client import GrpcModelServerClient, ModelServerClient, map_grpc_error
from serving.errors import (DeadlineExceededError, ImageTooLargeError, InvalidInputError, ModelNotFoundError,
                            ResourceExhaustedError, ServerUnavailableError)


class ScriptedClient(ModelServerClient):
    """Answers Predict with each image's length; `failures` are raised first, one per call."""

    def __init__(self, failures=(), states=(), **policy):
        policy.setdefault("initial_backoff_s", 0.001)
        super().__init__("m", **policy)
        self.failures = list(failures)
        self.states = list(states)
        self.calls: list[int] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()
        self.max_rows_accepted = None

    def _rpc_predict(self, images, timeout_s):
        with self._lock:
            self.calls.append(len(images))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            failure = self.failures.pop(0) if self.failures else None
        try:
            time.sleep(0.005)
            if failure:
                raise failure
            if self.max_rows_accepted and len(images) > self.max_rows_accepted:
                raise ResourceExhaustedError("too big")
            return {"size": np.array([len(i) for i in images], np.int64),
                    "name": np.array([i[:3] for i in images], dtype=object),
                    "probabilities": np.tile(np.array([[0.25, 0.75]], np.float32), (len(images), 1))}
        finally:
            with self._lock:
                self.active -= 1

    def _rpc_model_states(self, timeout_s):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(state, Exception):
            raise state
        return state

    def _rpc_metadata(self, timeout_s):
        return {"version": 1, "signatures": {}}


def images(n: int) -> list[bytes]:
    return [b"img" + b"x" * i for i in range(n)]


def test_predict_returns_one_row_per_image_in_order_within_the_in_flight_limit():
    client = ScriptedClient(max_batch_images=4, max_in_flight=3)
    rows = client.predict(images(30))

    assert [r["size"] for r in rows] == [len(i) for i in images(30)]
    assert rows[0]["name"] == "img" and isinstance(rows[0]["size"], int)
    np.testing.assert_allclose(rows[5]["probabilities"], [0.25, 0.75])
    assert client.calls and max(client.calls) <= 4 and sum(client.calls) == 30
    assert 1 < client.most_active <= 3


def test_batches_respect_the_message_limit_and_refuse_an_oversized_image():
    client = ScriptedClient(max_batch_images=100, max_message_bytes=4096 + 3 * 120)
    batches = client.split_batches([b"x" * 100] * 10)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    with pytest.raises(ImageTooLargeError):
        client.split_batches([b"x" * 10, b"x" * 5000])
    assert client.predict([]) == []


def test_retryable_failures_are_retried_with_backoff_then_succeed():
    client = ScriptedClient(failures=[ServerUnavailableError("down"), DeadlineExceededError("slow")])
    rows = client.predict(images(2))
    assert len(rows) == 2 and client.retries == 2 and len(client.calls) == 3


def test_retries_stop_after_max_attempts_and_bad_input_is_never_retried():
    exhausted = ScriptedClient(failures=[ServerUnavailableError("down")] * 5, max_attempts=3)
    with pytest.raises(ServerUnavailableError):
        exhausted.predict(images(1))
    assert len(exhausted.calls) == 3

    invalid = ScriptedClient(failures=[InvalidInputError("images[0] is not an image")])
    with pytest.raises(InvalidInputError):
        invalid.predict(images(1))
    assert len(invalid.calls) == 1


def test_a_batch_over_the_servers_limit_is_halved_until_it_fits():
    client = ScriptedClient(max_batch_images=8, max_attempts=1)
    client.max_rows_accepted = 2
    rows = client.predict(images(8))
    assert [r["size"] for r in rows] == [len(i) for i in images(8)]
    assert client.calls == [8, 4, 2, 2, 4, 2, 2]  # each refused batch is split in two


def test_wait_until_available_polls_through_not_found_and_loading():
    client = ScriptedClient(states=[ModelNotFoundError("not yet"), {1: "LOADING"}, {1: "AVAILABLE"}])
    assert client.wait_until_available(5.0) == {1: "AVAILABLE"}

    pinned = ScriptedClient(states=[{1: "AVAILABLE"}], version=2, max_backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="not AVAILABLE"):
        pinned.wait_until_available(0.3)
    assert time.monotonic() - start < 3.0


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "details from the server"


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError), (grpc.StatusCode.NOT_FOUND, ModelNotFoundError),
    (grpc.StatusCode.FAILED_PRECONDITION, ModelNotFoundError), (grpc.StatusCode.UNAVAILABLE, ServerUnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError)])
def test_grpc_status_codes_map_to_project_errors(code, kind):
    error = map_grpc_error(FakeRpcError(code), "Predict m")
    assert type(error) is kind and "details from the server" in str(error)


def test_grpc_client_pickles_without_a_channel_and_rejects_double_pinning():
    client = GrpcModelServerClient("127.0.0.1:1", "m", version=3)
    client._stubs()
    revived = pickle.loads(pickle.dumps(client))
    assert revived._channel is None and revived.version == 3 and revived.address == "127.0.0.1:1"
    client.close()
    with pytest.raises(ValueError):
        GrpcModelServerClient("127.0.0.1:1", "m", version=3, version_label="stable")


def test_in_process_client_gives_the_same_rows_as_the_saved_model(tmp_path):
    import tensorflow as tf

    from serving import export
    from serving.client import InProcessModelClient
    from tests.test_serving_export import CLASS_NAMES, IMAGE_SIZE, make_tiny_model, sample_images

    version_dir = export.export_model(make_tiny_model(), str(tmp_path), class_names=CLASS_NAMES,
                                      image_size=IMAGE_SIZE, version=5)
    pictures = sample_images()
    want = tf.saved_model.load(version_dir).signatures["serving_default"](images=tf.constant(pictures))
    client = pickle.loads(pickle.dumps(InProcessModelClient(version_dir, max_batch_images=4)))

    assert client.wait_until_available(10) == {5: "AVAILABLE"}
    rows = client.predict(pictures)
    assert client.metadata()["signatures"]["classify"]["method_name"] == "tensorflow/serving/classify"
    with pytest.raises(InvalidInputError):
        client.predict([b"\xff\xd8\xff\xe0broken"])
    client.close()

    np.testing.assert_allclose(np.stack([r["class_probabilities"] for r in rows]), want["class_probabilities"],
                               rtol=1e-5, atol=1e-6)
    assert [r["orientation_degrees"] for r in rows] == want["orientation_degrees"].numpy().tolist()
    assert [r["decision"] for r in rows] == [d.decode() for d in want["decision"].numpy()]
    assert all(r["tta_agreement"] == -1.0 and r["text_crops"] == -1 for r in rows)  # generic policy: neither


SETTINGS = {"tta": True, "tta_below": 0.9, "rotate_threshold": 0.7, "origin": "the client test's settings"}


def legacy_version(version_dir: str) -> str:
    """A SavedModel version with a bytes-in serving_default and no score_policy signature (an older export)."""
    import tensorflow as tf

    module = tf.Module()
    module.serve = tf.function(lambda images: {"orientation_probabilities": tf.ones([tf.shape(images)[0], 4]) / 4},
                               input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    tf.saved_model.save(module, version_dir, signatures={"serving_default": module.serve.get_concrete_function()})
    return version_dir


def test_in_process_client_reads_the_versions_score_policy_and_none_without_one(tmp_path):
    from serving import export
    from serving.client import InProcessModelClient
    from serving.policy import ScorePolicy, policy_from_settings
    from tests.test_serving_export import CLASS_NAMES, IMAGE_SIZE, make_tiny_model

    version_dir = export.export_model(make_tiny_model(), str(tmp_path), class_names=CLASS_NAMES,
                                      image_size=IMAGE_SIZE, version=2, score_settings=SETTINGS)
    with InProcessModelClient(version_dir) as client:
        assert ScorePolicy.from_json(client.score_policy()) == policy_from_settings(SETTINGS, IMAGE_SIZE)
    with InProcessModelClient(legacy_version(str(tmp_path / "legacy" / "1"))) as client:
        assert client.score_policy() is None


def test_a_client_without_a_policy_transport_still_predicts_and_says_when_a_policy_is_missing():
    # _rpc_policy is optional: a transport that cannot read policies works for everything else
    client = ScriptedClient()
    assert client.score_policy() is None  # its metadata lists no score_policy signature
    assert len(client.predict(images(3))) == 3


@pytest.mark.slow
def test_grpc_client_reads_the_served_versions_score_policy(tmp_path):
    """Over the local server: the export's policy from its `score_policy` signature (a Predict with no inputs);
    None for a served version exported without one."""
    from serving import configs, export
    from serving.policy import ScorePolicy, policy_from_settings
    from tests.test_serving_export import CLASS_NAMES, IMAGE_SIZE, make_tiny_model
    from tests.test_serving_server import RunningServer

    base = str(tmp_path)
    export.export_model(make_tiny_model(), base, model_name="scans", class_names=CLASS_NAMES,
                        image_size=IMAGE_SIZE, version=1, score_settings=SETTINGS)
    legacy_version(str(tmp_path / "legacy" / "1"))
    with open(tmp_path / configs.MODELS_CONFIG, "w") as f:
        f.write(configs.models_config_text({"scans": str(tmp_path / "scans"), "legacy": str(tmp_path / "legacy")}))
    # With batching on, as in production: TF Serving's batching refuses a request with no input tensor.
    server = RunningServer(str(tmp_path / "server.log"), ["--model_config_file", str(tmp_path / configs.MODELS_CONFIG),
                                                          "--enable_batching"])
    try:
        server.wait_until_available("scans")
        server.wait_until_available("legacy")
        with GrpcModelServerClient(server.address, "scans", version=1) as client:
            text = client.score_policy()
        assert ScorePolicy.from_json(text) == policy_from_settings(SETTINGS, IMAGE_SIZE)
        with GrpcModelServerClient(server.address, "legacy") as client:
            assert client.score_policy() is None
            assert len(client.predict([b"\x89PNG\r\n\x1a\n"])) == 1  # it still answers
    finally:
        server.stop()
