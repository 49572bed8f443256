"""The served models: loading SavedModel versions, the version policy, polling the file system for new versions."""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from serving import configs
from serving.server.batching import RequestBatcher
from serving.server.common import DEFAULT_SIGNATURE, LOG, RpcFailure
from serving.server.metrics import Metrics

# A version copied in non-atomically can fail to load at first; TF Serving also retries (max_num_load_retries).
MAX_LOAD_ATTEMPTS = 5


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

