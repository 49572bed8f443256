"""Choosing the tf.distribute strategy, and what this process's role in the cluster is."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in a (possibly one-process) training cluster."""

    task_type: str
    task_index: int
    num_workers: int

    @property
    def is_chief(self) -> bool:
        """The chief writes the shared outputs (best checkpoint, evaluation, export)."""
        # TF's own rule: without a "chief" entry in the cluster, worker 0 is the chief.
        return self.task_type == "chief" or (
            self.task_type == "worker" and self.task_index == 0 and not _has_explicit_chief())

    def private_dir(self, job_dir: str) -> str:
        """Where this worker writes files no other worker may touch (job_dir itself for the chief)."""
        if self.is_chief:
            return job_dir
        return os.path.join(job_dir, "workers", f"{self.task_type}-{self.task_index}")


def _tf_config() -> Dict[str, Any]:
    text = os.environ.get("TF_CONFIG", "")
    return json.loads(text) if text.strip() else {}


def _has_explicit_chief() -> bool:
    return bool(_tf_config().get("cluster", {}).get("chief"))


def cluster_size() -> int:
    """Number of training processes TF_CONFIG names (chief + workers), 0 when there is no cluster."""
    cluster = _tf_config().get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def worker_role() -> WorkerRole:
    """Role from TF_CONFIG; a process without TF_CONFIG is the single chief."""
    cfg = _tf_config()
    task = cfg.get("task", {})
    if not cfg.get("cluster") or not task:
        return WorkerRole("chief", 0, 1)
    return WorkerRole(task.get("type", "worker"), int(task.get("index", 0)), max(cluster_size(), 1))


class MissingGpuError(RuntimeError):
    """The job was asked for GPUs (--require-gpus N) and TensorFlow sees fewer."""


def _cuda_libraries_installed() -> bool:
    """Whether the CUDA/cuDNN wheels that `tensorflow[and-cuda]` pulls in are installed (the -gpu image has them)."""
    from importlib import metadata

    return any((dist.metadata["Name"] or "").lower().startswith("nvidia-cudnn") for dist in metadata.distributions())


def _gpu_problems() -> list:
    """Likely reasons why no GPU is visible, most basic first."""
    problems = []
    if not tf.test.is_built_with_cuda():
        problems.append("this TensorFlow build has no CUDA support")
    if not _cuda_libraries_installed():
        problems.append("the CUDA libraries are not installed, so this is the CPU image: use the -gpu image "
                        "(infra/docker/Dockerfile built with --build-arg TF_PACKAGE='tensorflow[and-cuda]==2.21.*', "
                        "tagged e.g. :0.1.0-gpu)")
    if not os.path.exists("/dev/nvidiactl"):
        problems.append("no NVIDIA driver device is visible in this container (/dev/nvidiactl is missing): the pod "
                        "needs an nvidia.com/gpu limit and a node whose NVIDIA driver is installed")
    if not problems:
        problems.append("the CUDA libraries and the driver device are present but TensorFlow found no usable GPU: "
                        "check that the node's driver supports TensorFlow's CUDA version (see TensorFlow's log "
                        "above) and CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES")
    return problems


def check_required_gpus(required: int) -> int:
    """Number of GPUs TensorFlow sees; MissingGpuError naming the likely image/driver problem if under `required`.

    Lists physical devices only, so it may run before make_strategy (TensorFlow's runtime is not initialised).
    """
    visible = len(tf.config.list_physical_devices("GPU"))
    if visible < required:
        raise MissingGpuError(
            f"this job was asked for {required} GPU(s) (--require-gpus {required}) but TensorFlow sees {visible}; "
            f"stopping instead of training on the CPU. Likely cause: {'; '.join(_gpu_problems())}.")
    return visible


def make_strategy(name: str = "auto", devices: Optional[list] = None) -> tf.distribute.Strategy:
    """Build the strategy: auto = multi-worker if TF_CONFIG names a cluster, mirrored over >1 GPU, else one device.

    Must run before any other TensorFlow op in the process: MultiWorkerMirroredStrategy configures the
    collective runtime, which cannot change once TensorFlow has initialised.
    """
    if name == "auto":
        if cluster_size() > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            # Without GPUs, mirror over the logical CPUs (tests split one CPU into several this way).
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    raise ValueError(f"unknown strategy {name!r}")


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line naming the strategy and its replica count, for the logs."""
    return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"


def prepare_model_for_strategy(model, strategy: tf.distribute.Strategy) -> None:
    """Work around Keras 3 building a model under MultiWorkerMirroredStrategy.

    Keras (3.15) builds the compiled metrics from the first distributed batch by reducing it across
    replicas with `strategy.reduce` in eager mode, which fails for a multi-worker PerReplica
    ("Attempt to convert a value (PerReplica ...) to a Tensor"). Only the batch's shapes matter for
    that build, so this replaces the step with one that takes this worker's local batch instead.
    It also makes Keras reduce the per-step scalar logs across workers with axis=None: its
    multi-worker branch reduces with axis=0, which rejects scalars ("Invalid reduction dimension 0").
    Other strategies are left untouched.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    import keras
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    if not getattr(keras_tf_trainer.reduce_per_replica, "_archive_vision_scalar_safe", False):
        keras_reduce = keras_tf_trainer.reduce_per_replica

        def reduce_per_replica(values, strat, reduction):
            if reduction not in ("auto", "mean") or not isinstance(strat, tf.distribute.MultiWorkerMirroredStrategy):
                return keras_reduce(values, strat, reduction)

            def mean(v):
                local = strat.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
                return strat.reduce("MEAN", v, axis=None if local.shape.rank == 0 else 0)

            return keras.tree.map_structure(mean, values)

        reduce_per_replica._archive_vision_scalar_safe = True
        # Keras looks the function up in its module at trace time, so replacing the attribute suffices.
        keras_tf_trainer.reduce_per_replica = reduce_per_replica

    def symbolic_build_from_local_batch(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = keras.tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build_from_local_batch
