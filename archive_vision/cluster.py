"""Multi-worker training on a cluster: TF_CONFIG per worker, the Kubernetes manifest, and `submit`.

`archive-vision submit` (this module's `main`) renders the training job and pipes the YAML to
`kubectl apply -f -` (or prints it with `--dry-run`). Three kinds:

- `jobset` (the default for more than one worker): one JobSet (jobset.x-k8s.io/v1alpha2) holding one Indexed
  Job of N pods. Any pod failing fails that Job and the JobSet controller recreates all the workers together
  (`failurePolicy.maxRestarts`), so a restarted worker never leaves its peers stuck in collective ops; exit
  code 2 (usage or setup error, e.g. no GPU visible) fails the JobSet at once instead of restarting it.
  Each pod's TF_CONFIG names every pod's JobSet DNS name, its own index coming from the Job's completion index.
- `jobs` (the default for one worker): a headless Service plus one Job per worker, each with its own TF_CONFIG
  (works without the JobSet controller, but a worker restarts alone).
- `tfjob`: a Kubeflow TFJob (the training operator writes TF_CONFIG).

With `--gpus-per-worker N > 0` the pods run the CUDA image (the `-gpu` tag, infra/docker/Dockerfile built
with `TF_PACKAGE='tensorflow[and-cuda]==...'`) and the trainer gets `--require-gpus N`, so a pod that sees no
GPU stops with the reason instead of training on the CPU.

Each pod runs `python -m archive_vision.cluster train-staged -- <trainer flags>`: gs:// data is copied to a
local cache and the job dir is trained locally, then uploaded to its gs:// location, through Beam's
FileSystems (google-cloud-storage underneath). Two reasons: the trainer writes parts of its job dir
(labels.json, markers, run_summary.json, export side files) with plain `open()`, which cannot write gs://,
and TensorFlow's own gs:// filesystem has a fixed endpoint (https://www.googleapis.com), so it can never
be pointed at a GCS emulator, while google-cloud-storage honours STORAGE_EMULATOR_HOST.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from serving.model_files import download_prefix, upload_tree  # noqa: F401 - the staging copies, part of this API

DEFAULT_IMAGE = "us-docker.pkg.dev/PROJECT/archive-vision/archive-vision:0.1.0"
GPU_TAG_SUFFIX = "-gpu"  # the CUDA build of the same image (README: --build-arg TF_PACKAGE='tensorflow[and-cuda]...')
DEFAULT_GPU_IMAGE = DEFAULT_IMAGE + GPU_TAG_SUFFIX
JOBSET_REPLICATED_JOB = "worker"
# The index Kubernetes gives each pod of an Indexed Job (JOB_COMPLETION_INDEX is the same value, but it is
# appended after the template's env vars, so TF_CONFIG could not refer to it).
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
WORKER_INDEX_ENV = "WORKER_INDEX"
# Exit codes that no restart can fix (trainer.task: 2 = usage or setup error, e.g. no GPU visible).
NON_RETRYABLE_EXIT_CODES = (2,)
TRAINING_PORT = 2222
DEFAULT_CACHE = "/var/cache/archive-vision"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The trainer files a worker needs from an ingest output dir: the shards, the classes, and the manifest and run.json
# (which records `ingest --append` superseded, and the split sizes without a pass over the shards; errors are not read).
_DATA_PATTERNS = ("*.tfrecord", "*.tfrecord.gz", "labels.json", "manifest.parquet", "run.json")


# --------------------------------------------------------------------------------------------- TF_CONFIG

def worker_addresses(name: str, num_workers: int, namespace: str = "default", port: int = TRAINING_PORT) -> List[str]:
    """`host:port` of every worker pod: `<name>-worker-<i>.<name>.<namespace>.svc` via the headless Service."""
    if num_workers < 1:
        raise ValueError("a training cluster needs at least one worker")
    return [f"{name}-worker-{i}.{name}.{namespace}.svc:{port}" for i in range(num_workers)]


def jobset_worker_addresses(name: str, num_workers: int, namespace: str = "default",
                            port: int = TRAINING_PORT) -> List[str]:
    """`host:port` of every pod of a JobSet `name` whose one replicated Job is an Indexed Job of `num_workers` pods.

    JobSet's DNS names: `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>` (subdomain = the JobSet's name,
    served by the headless Service the JobSet controller creates); here jobIndex is always 0.
    """
    if num_workers < 1:
        raise ValueError("a training cluster needs at least one worker")
    return [f"{name}-{JOBSET_REPLICATED_JOB}-0-{i}.{name}.{namespace}.svc:{port}" for i in range(num_workers)]


def build_tf_config(addresses: Sequence[str], task_index: int) -> Dict[str, object]:
    """TF_CONFIG of worker `task_index` in a cluster of `addresses` (worker 0 is the chief, as TF assumes)."""
    addresses = list(addresses)
    if not addresses:
        raise ValueError("a training cluster needs at least one worker address")
    if not 0 <= task_index < len(addresses):
        raise ValueError(f"task index {task_index} is outside the {len(addresses)} workers")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"worker addresses repeat: {addresses}")
    return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": task_index}}


def validate_tf_config(config: Dict[str, object]) -> None:
    """Raise ValueError unless `config` is a TF_CONFIG MultiWorkerMirroredStrategy can start from."""
    cluster = config.get("cluster")
    task = config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError("TF_CONFIG needs a 'cluster' and a 'task' object")
    unknown = set(cluster) - {"chief", "worker"}
    if unknown:
        raise ValueError(f"TF_CONFIG cluster has job types MultiWorkerMirroredStrategy does not use: {unknown}")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError("TF_CONFIG may name at most one chief")
    members = [a for kind in ("chief", "worker") for a in cluster.get(kind, [])]
    if not members:
        raise ValueError("TF_CONFIG cluster names no workers")
    for address in members:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"TF_CONFIG address {address!r} is not host:port")
    if len(set(members)) != len(members):
        raise ValueError("TF_CONFIG names one address twice")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ValueError(f"TF_CONFIG task {task} is not a member of the cluster")


# --------------------------------------------------------------------------------------------- manifests

@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """What one multi-worker training run on Kubernetes needs."""

    name: str
    data: str
    job_dir: str
    image: str = ""                 # empty: the project image, its -gpu tag when gpus_per_worker > 0
    num_workers: int = 2
    gpus_per_worker: int = 1
    namespace: str = "default"
    port: int = TRAINING_PORT
    trainer_args: Tuple[str, ...] = ()
    service_account: str = "archive-vision"
    accelerator: str = ""           # GKE node label value, e.g. nvidia-l4; empty: any GPU node
    cpu: str = "4"
    memory: str = "16Gi"
    cache_size: str = "100Gi"
    allow_non_gpu_tag: bool = False  # take an explicit image whose tag does not end in -gpu for a GPU job
    max_restarts: int = 3            # JobSet: how often the whole group is recreated after a worker fails

    @property
    def container_image(self) -> str:
        """The image the pods run: --image, else the project image (its CUDA build when GPUs are asked for)."""
        return self.image or (DEFAULT_GPU_IMAGE if self.gpus_per_worker else DEFAULT_IMAGE)

    def validate(self) -> None:
        """Raise ValueError for a job Kubernetes or the trainer would refuse."""
        longest = max(f"{self.name}-worker-{self.num_workers - 1}",
                      f"{self.name}-{JOBSET_REPLICATED_JOB}-0-{self.num_workers - 1}", key=len)
        if not _DNS_LABEL.match(self.name) or len(longest) > 63:
            raise ValueError(f"--name {self.name!r} must be a DNS label (a-z, 0-9, '-') short enough for {longest!r} "
                             f"to fit 63 characters")
        if self.num_workers < 1 or self.gpus_per_worker < 0:
            raise ValueError("--workers >= 1 and --gpus-per-worker >= 0 are required")
        if self.max_restarts < 0:
            raise ValueError("--max-restarts >= 0 is required")
        if self.gpus_per_worker and not _is_gpu_image(self.container_image) and not self.allow_non_gpu_tag:
            raise ValueError(
                f"--gpus-per-worker {self.gpus_per_worker} with --image {self.container_image}: that tag is not a "
                f"'{GPU_TAG_SUFFIX}' one, and the CPU image's TensorFlow cannot use the GPUs (each pod would stop "
                f"at start). Use the CUDA image (infra/docker/Dockerfile built with --build-arg "
                f"TF_PACKAGE='tensorflow[and-cuda]==2.21.*', tagged e.g. :0.1.0{GPU_TAG_SUFFIX}), or pass "
                f"--allow-non-gpu-tag if this image has CUDA under another tag")
        for flag, value in (("--data", self.data), ("--job-dir", self.job_dir)):
            if not value.startswith("gs://"):
                raise ValueError(f"{flag} must be a gs:// location every pod can reach, got {value!r}")
        trainer_flags = {a.split("=", 1)[0] for a in self.trainer_args if a.startswith("--")}
        if trainer_flags & {"--data", "--job-dir"}:
            raise ValueError("pass --data and --job-dir to submit itself, not among the trainer flags")
        if "--require-gpus" in trainer_flags:
            raise ValueError("--require-gpus is set from --gpus-per-worker; do not pass it among the trainer flags")
        from trainer.config import config_from_args

        config_from_args(self.trainer_command_flags())  # the trainer's own parser: a bad flag fails here, not in a pod

    def trainer_command_flags(self) -> List[str]:
        """The flags `python -m trainer.task` gets (through train-staged)."""
        gpus = ["--require-gpus", str(self.gpus_per_worker)] if self.gpus_per_worker else []
        return ["--data", self.data, "--job-dir", self.job_dir, *gpus, *self.trainer_args]

    def container_command(self) -> List[str]:
        """The command each worker container runs."""
        return ["python", "-m", "archive_vision.cluster", "train-staged", "--cache", DEFAULT_CACHE, "--",
                *self.trainer_command_flags()]


def _is_gpu_image(image: str) -> bool:
    """Whether `image`'s tag is a CUDA build's (`...:<version>-gpu`); a digest or no tag is not."""
    last = image.rsplit("/", 1)[-1]
    return "@" not in last and ":" in last and last.rsplit(":", 1)[1].endswith(GPU_TAG_SUFFIX)


def _labels(job: TrainingJob, **extra: str) -> Dict[str, str]:
    labels = {"app.kubernetes.io/name": "archive-vision", "app.kubernetes.io/component": "train",
              "archive-vision/training-job": job.name}
    labels.update(extra)
    return labels


def _worker_resources(job: TrainingJob) -> Dict[str, Dict[str, object]]:
    requests: Dict[str, object] = {"cpu": job.cpu, "memory": job.memory}
    limits: Dict[str, object] = {"memory": job.memory}
    if job.gpus_per_worker:
        # Extended resources are requested through limits; Kubernetes copies them to requests.
        limits["nvidia.com/gpu"] = job.gpus_per_worker
    return {"requests": requests, "limits": limits}


def _pod_placement(job: TrainingJob) -> Dict[str, object]:
    placement: Dict[str, object] = {}
    if job.gpus_per_worker:
        placement["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if job.accelerator:
            placement["nodeSelector"] = {"cloud.google.com/gke-accelerator": job.accelerator}
    return placement


def _worker_container(job: TrainingJob, env: List[Dict[str, str]], command: List[str]) -> Dict[str, object]:
    return {
        "name": "trainer", "image": job.container_image, "imagePullPolicy": "IfNotPresent", "command": command,
        "env": env + [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": "tf-worker", "containerPort": job.port}],
        "resources": _worker_resources(job),
        "volumeMounts": [{"name": "cache", "mountPath": DEFAULT_CACHE}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _volumes(job: TrainingJob) -> List[Dict[str, object]]:
    return [{"name": "cache", "emptyDir": {"sizeLimit": job.cache_size}},
            # tf.data and NCCL use shared memory; the container runtime's 64 MiB default is too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]


def render_training_jobs(job: TrainingJob) -> List[Dict[str, object]]:
    """Headless Service + one Job per worker, each with its own TF_CONFIG."""
    job.validate()
    addresses = worker_addresses(job.name, job.num_workers, job.namespace, job.port)
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": _labels(job)},
        "spec": {"clusterIP": "None", "selector": {"archive-vision/training-job": job.name},
                 # Workers must resolve each other while still starting, before any of them is Ready.
                 "publishNotReadyAddresses": True,
                 "ports": [{"name": "tf-worker", "port": job.port, "targetPort": job.port}]},
    }
    documents: List[Dict[str, object]] = [service]
    for index in range(job.num_workers):
        worker = f"{job.name}-worker-{index}"
        tf_config = build_tf_config(addresses, index)
        pod_spec: Dict[str, object] = {
            "hostname": worker, "subdomain": job.name,  # gives the pod the DNS name in `addresses`
            "serviceAccountName": job.service_account,
            "restartPolicy": "OnFailure",
            "containers": [_worker_container(job, [{"name": "TF_CONFIG", "value": json.dumps(tf_config)}],
                                             job.container_command())],
            "volumes": _volumes(job),
        }
        pod_spec.update(_pod_placement(job))
        documents.append({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": worker, "namespace": job.namespace,
                         "labels": _labels(job, **{"archive-vision/task-index": str(index)})},
            "spec": {"backoffLimit": 4, "ttlSecondsAfterFinished": 7 * 24 * 3600,
                     "template": {"metadata": {"labels": _labels(job, **{"archive-vision/task-index": str(index)})},
                                  "spec": pod_spec}},
        })
    return documents


def jobset_tf_config_template(addresses: Sequence[str]) -> str:
    """TF_CONFIG text whose task index is `$(WORKER_INDEX)`, which Kubernetes expands from the pod's earlier env var."""
    placeholder = "__worker_index__"
    text = json.dumps({"cluster": build_tf_config(addresses, 0)["cluster"],
                       "task": {"type": "worker", "index": placeholder}})
    return text.replace(json.dumps(placeholder), f"$({WORKER_INDEX_ENV})")


def render_jobset(job: TrainingJob) -> List[Dict[str, object]]:
    """A JobSet whose one Indexed Job runs every worker: the workers fail and restart as one group."""
    job.validate()
    addresses = jobset_worker_addresses(job.name, job.num_workers, job.namespace, job.port)
    env = [{"name": WORKER_INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
           {"name": "TF_CONFIG", "value": jobset_tf_config_template(addresses)}]
    pod_spec: Dict[str, object] = {
        "serviceAccountName": job.service_account,
        # A failed pod fails its Job (backoffLimit 0) and JobSet recreates all workers; never restart one alone.
        "restartPolicy": "Never",
        "containers": [_worker_container(job, env, job.container_command())],
        "volumes": _volumes(job),
    }
    pod_spec.update(_pod_placement(job))
    job_spec = {
        "completionMode": "Indexed", "completions": job.num_workers, "parallelism": job.num_workers,
        "backoffLimit": 0,
        # A usage or setup error (exit 2: bad flags or data, no GPU visible) fails the Job by this rule, and the
        # JobSet's rule below then fails the whole set rather than restarting it.
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": "trainer", "operator": "In", "values": list(NON_RETRYABLE_EXIT_CODES)}}]},
        "template": {"metadata": {"labels": _labels(job)}, "spec": pod_spec},
    }
    return [{
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": _labels(job)},
        "spec": {
            # The controller creates the headless Service `subdomain`; pods resolve each other before Ready.
            "network": {"enableDNSHostnames": True, "subdomain": job.name, "publishNotReadyAddresses": True},
            "failurePolicy": {"maxRestarts": job.max_restarts, "rules": [
                {"name": "UsageOrSetupError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "replicatedJobs": [{"name": JOBSET_REPLICATED_JOB, "replicas": 1,
                                "template": {"metadata": {"labels": _labels(job)}, "spec": job_spec}}],
        },
    }]


def render_tfjob(job: TrainingJob) -> List[Dict[str, object]]:
    """A Kubeflow TFJob (kubeflow.org/v1): the training operator creates the pods and writes TF_CONFIG."""
    job.validate()
    pod_spec: Dict[str, object] = {
        "serviceAccountName": job.service_account,
        # The operator finds the TensorFlow container by this name.
        "containers": [dict(_worker_container(job, [], job.container_command()), name="tensorflow")],
        "volumes": _volumes(job),
    }
    pod_spec.update(_pod_placement(job))
    return [{
        "apiVersion": "kubeflow.org/v1", "kind": "TFJob",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": _labels(job)},
        "spec": {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 4},
                 "tfReplicaSpecs": {"Worker": {"replicas": job.num_workers, "restartPolicy": "OnFailure",
                                               "template": {"metadata": {"labels": _labels(job)},
                                                            "spec": pod_spec}}}},
    }]


def to_yaml(documents: Iterable[Dict[str, object]]) -> str:
    """Multi-document YAML, keys in the order written (what `kubectl apply -f -` reads)."""
    import yaml

    return yaml.safe_dump_all(list(documents), sort_keys=False, default_flow_style=False, width=120)


def apply_manifest(text: str, kubectl: str = "kubectl") -> int:
    """Pipe `text` to `kubectl apply -f -`; returns kubectl's exit status."""
    return subprocess.run([kubectl, "apply", "-f", "-"], input=text.encode(), check=False).returncode


# --------------------------------------------------------------------------------------------- staging

def _is_remote(path: str) -> bool:
    return "://" in path


def _replace_flag(argv: List[str], flag: str, value: str) -> List[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            out += [flag, value]
            skip = True
        elif arg.startswith(flag + "="):
            out.append(f"{flag}={value}")
        else:
            out.append(arg)
    return out


def _flag_value(argv: Sequence[str], flag: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise ValueError(f"the trainer flags need {flag}")


def _private_job_part() -> Tuple[str, Tuple[str, ...]]:
    """(this pod's part of the job dir, relative; sub-paths of it that belong to other pods).

    The chief owns the job dir but the workers/ tree; worker i owns workers/worker-i (trainer.strategy's rule).
    Each pod stages only its own part, so a late worker never writes stale copies of the chief's files back.
    """
    from trainer.strategy import worker_role

    role = worker_role()
    if role.is_chief:
        return "", ("workers/",)
    return f"workers/{role.task_type}-{role.task_index}", ()


def train_staged(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m archive_vision.cluster train-staged [--cache DIR] -- <trainer flags>`.

    gs:// --data is downloaded into the cache; a gs:// --job-dir is trained locally, starting from what this
    pod's part of the gs:// job dir already holds (a restarted pod resumes from its backup), and uploaded when
    training ends (only the backup state when it fails).
    """
    parser = argparse.ArgumentParser(prog="python -m archive_vision.cluster train-staged",
                                     description="Run trainer.task with gs:// --data and --job-dir staged "
                                                 "through a local cache (what each training pod runs).")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="local dir for the staged data and job dir")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="-- then the flags of trainer.task")
    args = parser.parse_args(argv)
    flags = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else list(args.trainer_flags)
    data, job_dir = _flag_value(flags, "--data"), _flag_value(flags, "--job-dir").rstrip("/")
    if _is_remote(data):
        local_data = os.path.join(args.cache, "data")
        copied = download_prefix(data, local_data, _DATA_PATTERNS)
        print(f"[staging] {len(copied)} files of {data} -> {local_data}", flush=True)
        flags = _replace_flag(flags, "--data", local_data)
    from trainer import task

    if not _is_remote(job_dir):
        return int(task.main(flags) or 0)
    local_job = os.path.join(args.cache, "job")
    part, others = _private_job_part()
    remote_part = f"{job_dir}/{part}" if part else job_dir
    local_part = os.path.join(local_job, *part.split("/")) if part else local_job
    resumed = download_prefix(remote_part, local_part, recursive=True, skip_prefixes=others)
    if resumed:
        print(f"[staging] resuming from {len(resumed)} files already in {remote_part}", flush=True)
    status = 1
    try:
        status = int(task.main(_replace_flag(flags, "--job-dir", local_job)) or 0)
    finally:
        if status == 0:
            written = upload_tree(local_part, remote_part, skip_prefixes=others)
            print(f"[staging] {len(written)} files of the job dir -> {remote_part}", flush=True)
        elif os.path.isdir(os.path.join(local_part, "backup")):
            # A failed run still leaves its backup state where a restarted pod will look for it.
            upload_tree(os.path.join(local_part, "backup"), f"{remote_part}/backup")
    return status


# --------------------------------------------------------------------------------------------- scheduled score

def latest_results(results_root: str, before: str) -> Optional[str]:
    """`results.parquet` of the newest run dir under `results_root` named before `before` (run dirs sort by name)."""
    from apache_beam.io.filesystems import FileSystems

    root = results_root.rstrip("/")
    runs = sorted({m.path[len(root) + 1:].split("/")[0]
                   for m in FileSystems.match([f"{root}/*/results.parquet"])[0].metadata_list})
    earlier = [run for run in runs if run < before]
    return f"{root}/{earlier[-1]}/results.parquet" if earlier else None


def scheduled_score(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m archive_vision.cluster scheduled-score --results-root R [--run-name N] -- <score flags>`.

    One incremental scoring run: `archive-vision score <flags> --output R/<run> --skip-known <the newest earlier
    run's results.parquet>` (no --skip-known on the first run). Every results.parquet holds the reused rows too,
    so each night's table is the whole archive and the next night needs only that one file.
    """
    import datetime

    parser = argparse.ArgumentParser(prog="python -m archive_vision.cluster scheduled-score",
                                     description="One incremental `archive-vision score` run: output in "
                                                 "RESULTS_ROOT/<run>, --skip-known at the newest earlier run's "
                                                 "results.parquet (what the nightly CronJob runs).")
    parser.add_argument("--results-root", required=True, help="dir (gs://...) holding one sub-dir per run")
    parser.add_argument("--run-name", default="", help="this run's sub-dir (default: UTC date-time, sortable)")
    parser.add_argument("score_flags", nargs=argparse.REMAINDER, help="-- then the flags of archive-vision score")
    args = parser.parse_args(argv)
    flags = args.score_flags[1:] if args.score_flags[:1] == ["--"] else list(args.score_flags)
    given = {a.split("=", 1)[0] for a in flags if a.startswith("--")}
    if given & {"--output", "--skip-known"}:
        parser.error("--output and --skip-known are chosen from --results-root; do not pass them")
    run_name = args.run_name or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    root = args.results_root.rstrip("/")
    previous = latest_results(root, run_name)
    command = [*flags, "--output", f"{root}/{run_name}"]
    if previous:
        command += ["--skip-known", previous]
    print(f"[scheduled-score] run {run_name}; previous results: {previous or 'none (first run)'}", flush=True)
    from pipelines import score

    return int(score.main(command) or 0)


# --------------------------------------------------------------------------------------------- submit

def parse_submit_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, TrainingJob]:
    """`archive-vision submit` flags -> the TrainingJob they describe (validated)."""
    parser = argparse.ArgumentParser(
        prog="archive-vision submit",
        description="Render (and apply) the Kubernetes manifest of a multi-worker training job: a JobSet whose "
                    "workers restart together, one Job per worker plus a headless Service, or a Kubeflow TFJob. "
                    "Flags after `--` go to the trainer (python -m trainer.task).")
    parser.add_argument("--name", default="archive-vision-train", help="job name (DNS label)")
    parser.add_argument("--image", default="",
                        help=f"the pipeline/trainer image (infra/docker/Dockerfile); default {DEFAULT_IMAGE}, or "
                             f"its CUDA build {DEFAULT_GPU_IMAGE} with --gpus-per-worker > 0, where a tag not "
                             f"ending in '{GPU_TAG_SUFFIX}' is refused")
    parser.add_argument("--allow-non-gpu-tag", action="store_true",
                        help="take --image for a GPU job although its tag does not end in -gpu (CUDA under another "
                             "tag or a digest); the trainer still stops if it sees fewer GPUs than asked for")
    parser.add_argument("--workers", type=int, default=2, help="number of worker pods (worker 0 is the chief)")
    parser.add_argument("--gpus-per-worker", type=int, default=1, help="nvidia.com/gpu per pod (0: CPU only)")
    parser.add_argument("--accelerator", default="", help="GKE accelerator node label, e.g. nvidia-l4")
    parser.add_argument("--data", required=True, help="gs:// ingest output dir")
    parser.add_argument("--job-dir", required=True, help="gs:// job dir (checkpoints, evaluation, export/)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--service-account", default="archive-vision",
                        help="Kubernetes service account (Workload Identity: bound to a GCP SA with bucket access)")
    parser.add_argument("--port", type=int, default=TRAINING_PORT, help="port the workers' collective ops use")
    parser.add_argument("--cpu", default="4", help="CPU request per worker")
    parser.add_argument("--memory", default="16Gi", help="memory per worker")
    parser.add_argument("--kind", choices=("auto", "jobset", "jobs", "tfjob"), default="auto",
                        help="jobset: a JobSet (needs the JobSet controller) whose workers fail and restart as one "
                             "group; jobs: one Job per worker + headless Service (a worker restarts alone, its "
                             "peers may hang); tfjob: Kubeflow training operator; auto: jobset for more than one "
                             "worker, else jobs")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="jobset: how many times the whole group is recreated after a worker fails (each "
                             "restart resumes from the job dir's backup)")
    parser.add_argument("--dry-run", action="store_true", help="print the YAML instead of applying it")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl binary")
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args: List[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, trainer_args = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    job = TrainingJob(name=args.name, data=args.data, job_dir=args.job_dir.rstrip("/"), image=args.image,
                      allow_non_gpu_tag=args.allow_non_gpu_tag, max_restarts=args.max_restarts,
                      num_workers=args.workers, gpus_per_worker=args.gpus_per_worker, namespace=args.namespace,
                      port=args.port, trainer_args=tuple(trainer_args), service_account=args.service_account,
                      accelerator=args.accelerator, cpu=args.cpu, memory=args.memory)
    try:
        job.validate()
    except ValueError as e:
        parser.error(str(e))
    except SystemExit:  # the trainer's parser already printed why
        parser.error(f"the trainer rejects the flags after `--`: {' '.join(trainer_args)}")
    return args, job


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision submit`: render the training manifest; apply it with kubectl unless --dry-run."""
    args, job = parse_submit_args(argv)
    kind = args.kind if args.kind != "auto" else ("jobset" if job.num_workers > 1 else "jobs")
    render = {"jobset": render_jobset, "jobs": render_training_jobs, "tfjob": render_tfjob}[kind]
    documents = render(job)
    text = to_yaml(documents)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    if shutil.which(args.kubectl) is None:
        sys.stdout.write(text)
        print(f"archive-vision submit: {args.kubectl!r} not found; printed the manifest instead "
              f"(pipe it to `kubectl apply -f -`)", file=sys.stderr)
        return 3
    return apply_manifest(text, args.kubectl)


# `python -m archive_vision.cluster <helper> ...`: what the pods run; no helper name means `submit`.
POD_COMMANDS = {"train-staged": train_staged, "scheduled-score": scheduled_score}

if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in POD_COMMANDS:
        sys.exit(POD_COMMANDS[sys.argv[1]](sys.argv[2:]))
    sys.exit(main())
