"""infra/: every manifest and launch script checked against the programs it runs (their own parsers)."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

from archive_vision import __version__, cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(REPO, "infra")
K8S = os.path.join(INFRA, "k8s")
PROJECT_IMAGE_REPO = cluster.DEFAULT_IMAGE.rsplit(":", 1)[0]


def load(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_files() -> list:
    return sorted(os.path.join(K8S, name) for name in os.listdir(K8S) if name.endswith(".yaml"))


def by_kind(docs: list, kind: str) -> list:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_specs(doc: dict) -> list:
    """Every pod template spec inside a workload object."""
    kind = doc["kind"]
    if kind in ("Deployment", "Job", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "TFJob":
        return [spec["template"]["spec"] for spec in doc["spec"]["tfReplicaSpecs"].values()]
    if kind == "FlinkDeployment":
        return [doc["spec"]["taskManager"]["podTemplate"]["spec"]]
    if kind == "JobSet":
        return [rj["template"]["spec"]["template"]["spec"] for rj in doc["spec"]["replicatedJobs"]]
    return []


def containers(docs: list) -> list:
    """Containers with an image of their own (the Flink operator fills in its main container's)."""
    return [c for doc in docs for spec in pod_specs(doc) for c in spec["containers"] if "image" in c]


def after_double_dash(command: list) -> list:
    return command[command.index("--") + 1:]


def unknown_beam_flags(beam_args: list) -> list:
    """Flags no Beam PipelineOptions class defines (Beam itself would only warn and drop them)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(beam_args)
    return unknown


def serving_docs() -> list:
    return load(os.path.join(K8S, "serving.yaml"))


def serving_container() -> dict:
    return containers(by_kind(serving_docs(), "Deployment"))[0]


def test_every_manifest_parses_into_named_kubernetes_objects():
    files = manifest_files()
    assert {os.path.basename(f) for f in files} >= {"serving.yaml", "score-cronjob.yaml", "training-multiworker.yaml",
                                                    "service-account.yaml", "flink-session.yaml"}
    kinds = set()
    for path in files:
        docs = load(path)
        assert docs, path
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "archive-vision", path
            kinds.add(doc["kind"])
            for spec in pod_specs(doc):
                # every pod reaches GCS as the one service account that Workload Identity maps
                assert spec["serviceAccountName"] == "archive-vision", path
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "CronJob", "JobSet",
                     "ServiceAccount", "PodDisruptionBudget", "PodMonitoring"}


def missing_after_round_trip(original, typed, path=""):
    """Keys of `original` that the typed Kubernetes model dropped: misspelled or misplaced fields."""
    if isinstance(original, dict) and isinstance(typed, dict):
        missing = []
        for key, value in original.items():
            if key not in typed:
                missing.append(f"{path}.{key}")
            else:
                missing += missing_after_round_trip(value, typed[key], f"{path}.{key}")
        return missing
    if isinstance(original, list) and isinstance(typed, list) and len(original) == len(typed):
        return [m for i, (a, b) in enumerate(zip(original, typed))
                for m in missing_after_round_trip(a, b, f"{path}[{i}]")]
    return []


def test_every_object_matches_the_kubernetes_api_schema_field_for_field(capsys):
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.ApiClient()
    docs = [doc for path in manifest_files() for doc in load(path)]
    docs += cluster.render_training_jobs(cluster.TrainingJob(name="t", data="gs://b/d", job_dir="gs://b/j",
                                                             accelerator="nvidia-l4"))
    pod_templates = [w["template"] for d in cluster.render_tfjob(cluster.TrainingJob(
        name="t", data="gs://b/d", job_dir="gs://b/j")) for w in d["spec"]["tfReplicaSpecs"].values()]
    # custom resources have no typed model here; the pod templates inside them do
    pod_templates += [d["spec"]["taskManager"]["podTemplate"] for d in docs if d["kind"] == "FlinkDeployment"]
    jobsets = by_kind(docs, "JobSet") + cluster.render_jobset(cluster.TrainingJob(
        name="t", data="gs://b/d", job_dir="gs://b/j", num_workers=3, gpus_per_worker=0))
    assert len(jobsets) == 2  # the checked-in one and a CPU rendering
    # a JobSet's replicated Job template is a batch/v1 JobTemplateSpec, which holds the pod template
    job_templates = [rj["template"] for d in jobsets for rj in d["spec"]["replicatedJobs"]]
    pod_templates += [t["spec"]["template"] for t in job_templates]
    checked = [(f"V{doc['apiVersion'].split('/')[-1][1:]}{doc['kind']}", doc) for doc in docs
               if doc["apiVersion"].split("/")[0] in ("v1", "apps", "batch", "autoscaling", "policy")]
    assert "V1PodDisruptionBudget" in {model for model, _ in checked}
    checked += [("V1JobTemplateSpec", t) for t in job_templates]
    checked += [("V1PodTemplateSpec" if "kind" not in t else "V1Pod", t) for t in pod_templates]
    for model, doc in checked:
        typed = api.sanitize_for_serialization(api._ApiClient__deserialize(doc, model))
        assert missing_after_round_trip(doc, typed) == [], (model, doc["metadata"]["name"] if "metadata" in doc
                                                             and "name" in doc["metadata"] else model)


def test_images_are_the_project_image_at_the_package_version_or_tf_serving_at_the_api_version():
    images = [c["image"] for path in manifest_files() for c in containers(load(path))]
    vertex = load(os.path.join(INFRA, "vertex", "custom_job.yaml"))[0]
    images += [pool["containerSpec"]["imageUri"] for pool in vertex["workerPoolSpecs"]]
    serving_api = metadata.version("tensorflow-serving-api")
    beam_version = metadata.version("apache-beam")
    for image in images:
        repo, _, tag = image.rpartition(":")
        if repo == "tensorflow/serving":
            assert tag.split(".")[:2] == serving_api.split(".")[:2], image
        elif repo.startswith("apache/beam_flink"):
            assert tag == beam_version, image  # the job server speaks the launcher's Beam version
        else:
            assert (repo, tag) in {(PROJECT_IMAGE_REPO, __version__), (PROJECT_IMAGE_REPO, __version__ + "-gpu")}, image
    assert "tensorflow/serving:" in " ".join(images) and cluster.DEFAULT_IMAGE in images
    assert cluster.DEFAULT_GPU_IMAGE == f"{PROJECT_IMAGE_REPO}:{__version__}-gpu"


def gpu_workloads() -> list:
    """(image, GPUs asked for, trainer flags) of every training container and Vertex pool in infra/."""
    found = []
    for path in manifest_files():
        for c in containers(load(path)):
            if c.get("command", [])[:4] == ["python", "-m", "archive_vision.cluster", "train-staged"]:
                found.append((c["image"], c["resources"].get("limits", {}).get("nvidia.com/gpu", 0),
                              after_double_dash(c["command"])))
    vertex = load(os.path.join(INFRA, "vertex", "custom_job.yaml"))[0]
    for pool in vertex["workerPoolSpecs"]:
        spec = pool["containerSpec"]
        found.append((spec["imageUri"], pool["machineSpec"].get("acceleratorCount", 0),
                      after_double_dash(spec["command"] + spec["args"])))
    return found


def test_gpu_workloads_run_the_cuda_image_and_make_the_trainer_require_their_gpus():
    from trainer.config import config_from_args

    workloads = gpu_workloads()
    assert len(workloads) >= 3 and all(gpus > 0 for _, gpus, _ in workloads)
    with open(os.path.join(INFRA, "docker", "Dockerfile"), encoding="utf-8") as f:
        dockerfile = f.read()
    cuda_package = "tensorflow[and-cuda]"
    assert f"TF_PACKAGE='{cuda_package}==" in dockerfile  # how the -gpu tag is built
    for image, gpus, flags in workloads:
        assert image.endswith("-gpu"), image
        assert config_from_args(flags).require_gpus == gpus, flags


def test_dockerfile_builds_on_the_beam_sdk_image_of_the_installed_beam():
    import apache_beam

    with open(os.path.join(INFRA, "docker", "Dockerfile"), encoding="utf-8") as f:
        text = f.read()
    base = re.search(r"ARG BEAM_IMAGE=(\S+)", text).group(1)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert base == f"apache/beam_python3.11_sdk:{apache_beam.__version__}"
    if py != "3.11":  # the image's Python is what Dataflow workers run; the launcher should match it
        pytest.xfail(f"this venv runs Python {py}, the SDK image 3.11: pickled pipelines may not load")
    for package in ("archive_vision", "pipelines", "trainer", "serving"):
        assert f"COPY {package} ./{package}" in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text  # Dataflow starts the SDK harness through it
    # The build fails unless the text-crop classifier's ONNX weights (which export rebuilds into the graph) came with
    # the dependencies; the check it runs passes here.
    check = re.search(r'python -c "(from trainer import text_crops;[^"]*)"', text).group(1)
    assert "text_crops.check_installed()" in check
    exec(compile(check, "Dockerfile", "exec"), {})


def test_serving_deployment_flags_are_accepted_by_the_model_server_and_ports_line_up():
    from serving.server import _parse_args

    container = serving_container()
    assert container["command"] == ["tensorflow_model_server"]
    args = _parse_args(container["args"])  # the local server takes tensorflow_model_server's flags
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "http": args.rest_api_port} == {"grpc": 8500, "http": 8501}
    assert args.enable_batching is True and args.enable_model_warmup is True
    mount = container["volumeMounts"][0]["mountPath"]
    for path in (args.model_config_file, args.batching_parameters_file, args.monitoring_config_file):
        assert os.path.dirname(path) == mount
    service = by_kind(serving_docs(), "Service")[0]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (8500, "grpc"), "http": (8501, "http")}
    deployment = by_kind(serving_docs(), "Deployment")[0]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert container["livenessProbe"]["tcpSocket"]["port"] == args.port
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == args.rest_api_port
        assert container[probe]["httpGet"]["path"] == "/v1/models/archive_vision/metadata"
    hpa = by_kind(serving_docs(), "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_serving_config_files_are_what_serving_configs_writes(tmp_path):
    from serving import configs

    config_map = by_kind(serving_docs(), "ConfigMap")[0]["data"]
    names = {os.path.basename(p) for p in (configs.MODELS_CONFIG, configs.BATCHING_PARAMETERS,
                                           configs.MONITORING_CONFIG)}
    assert set(config_map) == names
    assert config_map["models.config"] == configs.models_config_text(
        {"archive_vision": "gs://BUCKET/models/archive_vision"}, num_versions=configs.SERVED_VERSIONS)
    assert config_map["batching_parameters.txt"] == configs.BatchingParameters().to_text()
    with open(configs.write_monitoring_config(str(tmp_path)), encoding="utf-8") as f:
        assert config_map["monitoring.config"] == f.read()
    annotations = by_kind(serving_docs(), "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == configs.PROMETHEUS_PATH


def test_cronjob_scores_against_the_serving_service_with_flags_score_accepts():
    from pipelines import score

    cronjob = load(os.path.join(K8S, "score-cronjob.yaml"))[0]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    command = containers([cronjob])[0]["command"]
    assert command[:4] == ["python", "-m", "archive_vision.cluster", "scheduled-score"]
    assert command[4:6] == ["--results-root", "gs://BUCKET/scores"]
    flags = after_double_dash(command)
    # No model flag: the thresholds come from the served version itself (its score_policy signature).
    assert not {"--model", "--model-settings"} & set(flags)
    opts, beam_args = score.parse_args(flags + ["--output", "gs://BUCKET/scores/run", "--skip-known", "x.parquet"])
    assert unknown_beam_flags(beam_args) == []
    service = by_kind(serving_docs(), "Service")[0]
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert opts.endpoint == f"{service['metadata']['name']}:{grpc_port}"
    config_map = by_kind(serving_docs(), "ConfigMap")[0]["data"]
    assert f'name: "{opts.model_name}"' in config_map["models.config"]


def test_cronjob_fails_a_night_that_lost_too_many_inputs_without_retrying_it():
    from pipelines import cli, score

    cronjob = load(os.path.join(K8S, "score-cronjob.yaml"))[0]
    assert cronjob["spec"]["failedJobsHistoryLimit"] >= 1  # failed nights stay listed
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a bad night is not run again
    # Only a disruption (eviction, preemption) is ignored, never the run's own exit code.
    rules = job.get("podFailurePolicy", {}).get("rules", [])
    assert all("onExitCodes" not in r and r["action"] == "Ignore" for r in rules)
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # a failed container fails the pod
    command = containers([cronjob])[0]["command"]
    assert command[:4] == ["python", "-m", "archive_vision.cluster", "scheduled-score"]
    opts, _ = score.parse_args(after_double_dash(command) + ["--output", "gs://BUCKET/scores/run"])
    assert 0 < opts.max_failed_fraction < 1.0
    assert cli.EXIT_TOO_MANY_FAILED == 3 and "3 too many failed inputs" in cli.EXIT_CODES


@pytest.mark.parametrize("code", [0, 1, 3])
def test_scheduled_score_exits_with_scores_own_code(tmp_path, monkeypatch, code):
    from pipelines import score

    seen = []
    monkeypatch.setattr(score, "main", lambda argv: seen.append(list(argv)) or code)
    status = cluster.scheduled_score(["--results-root", str(tmp_path), "--run-name", "2024-01-02T020000Z", "--",
                                      "--input", "gs://b/scans", "--max-failed-fraction", "0.05"])
    assert status == code
    assert seen == [["--input", "gs://b/scans", "--max-failed-fraction", "0.05", "--output",
                     f"{tmp_path}/2024-01-02T020000Z"]]


def test_the_pod_command_exit_status_is_scheduled_scores(tmp_path):
    """`python -m archive_vision.cluster scheduled-score` (the CronJob's command) exits with score's code."""
    script = ("import sys, runpy; from pipelines import score; score.main = lambda argv: 3; "
              "sys.argv = ['cluster', 'scheduled-score', '--results-root', sys.argv[1], '--', '--input', 'x']; "
              "runpy.run_module('archive_vision.cluster', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 3, proc.stderr[-2000:]


def test_checked_in_training_manifest_is_what_submit_renders(capsys):
    path = os.path.join(K8S, "training-multiworker.yaml")
    with open(path, encoding="utf-8") as f:
        header = re.search(r"#   archive-vision submit (.+)", f.read()).group(1)
    assert cluster.main(shlex.split(header)) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == load(path)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_worker_job_carries_a_valid_tf_config_naming_its_own_pod(workers):
    job = cluster.TrainingJob(name="av-train", data="gs://b/data", job_dir="gs://b/job", num_workers=workers,
                              gpus_per_worker=2, namespace="ml", trainer_args=("--epochs", "3"))
    docs = cluster.render_training_jobs(job)
    service, jobs = docs[0], by_kind(docs, "Job")
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert len(jobs) == workers
    port = service["spec"]["ports"][0]["port"]
    seen_indices, clusters = [], []
    for job_doc in jobs:
        spec = job_doc["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        tf_config = json.loads(env["TF_CONFIG"])
        cluster.validate_tf_config(tf_config)
        index = tf_config["task"]["index"]
        seen_indices.append(index)
        clusters.append(tf_config["cluster"])
        # this pod's own DNS name (hostname.subdomain.namespace.svc) is its entry in the worker list
        own = tf_config["cluster"]["worker"][index]
        assert own == f"{spec['hostname']}.{spec['subdomain']}.ml.svc:{port}"
        assert spec["subdomain"] == service["metadata"]["name"]
        assert job_doc["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
        assert container["ports"][0]["containerPort"] == port
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert sorted(seen_indices) == list(range(workers))
    assert all(c == clusters[0] for c in clusters) and len(clusters[0]["worker"]) == workers


def test_worker_command_is_train_staged_around_flags_the_trainer_accepts():
    from trainer.config import config_from_args

    for path in (os.path.join(K8S, "training-multiworker.yaml"),):
        for container in containers(load(path)):
            command = container["command"]
            assert command[:4] == ["python", "-m", "archive_vision.cluster", "train-staged"]
            cfg = config_from_args(after_double_dash(command))
            assert cfg.job_dir.startswith("gs://") and cfg.data.startswith("gs://")
            assert cfg.require_gpus == container["resources"]["limits"]["nvidia.com/gpu"]
    vertex = load(os.path.join(INFRA, "vertex", "custom_job.yaml"))[0]
    for pool in vertex["workerPoolSpecs"]:
        spec = pool["containerSpec"]
        assert spec["command"][:4] == ["python", "-m", "archive_vision.cluster", "train-staged"]
        config_from_args(after_double_dash(spec["command"] + spec["args"]))


def test_tfjob_leaves_tf_config_to_the_operator_and_asks_for_gpus():
    job = cluster.TrainingJob(name="av-train", data="gs://b/d", job_dir="gs://b/j", num_workers=4, gpus_per_worker=1,
                              accelerator="nvidia-l4")
    (tfjob,) = cluster.render_tfjob(job)
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4
    spec = worker["template"]["spec"]
    container = spec["containers"][0]
    assert container["name"] == "tensorflow"  # the operator's convention for the container it configures
    assert not any(e["name"] == "TF_CONFIG" for e in container["env"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


@pytest.mark.parametrize("config, problem", [
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}, "not a member"),
    ({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}, "twice"),
    ({"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}, "host:port"),
    ({"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}, "does not use"),
    ({"cluster": {"worker": ["a:1"]}}, "'task'"),
])
def test_broken_tf_configs_are_refused_with_the_reason(config, problem):
    with pytest.raises(ValueError, match=problem):
        cluster.validate_tf_config(config)


def test_build_tf_config_refuses_an_index_outside_the_cluster():
    with pytest.raises(ValueError, match="outside"):
        cluster.build_tf_config(["a:1", "b:1"], 2)


@pytest.mark.parametrize("argv, message", [
    (["--data", "/local/data", "--job-dir", "gs://b/j"], "gs://"),
    (["--data", "gs://b/d", "--job-dir", "gs://b/j", "--name", "Bad_Name"], "DNS label"),
    (["--data", "gs://b/d", "--job-dir", "gs://b/j", "--", "--no-such-trainer-flag"], "trainer rejects"),
    (["--data", "gs://b/d", "--job-dir", "gs://b/j", "--", "--job-dir", "gs://other"], "not among the trainer"),
])
def test_submit_refuses_jobs_that_could_not_run(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cluster.main(["--dry-run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_submit_pipes_the_manifest_to_kubectl_apply(tmp_path, capsys):
    record = tmp_path / "kubectl-call"
    fake = tmp_path / "kubectl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {record}.args\ncat > {record}.stdin\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    status = cluster.main(["--kubectl", str(fake), "--workers", "3", "--gpus-per-worker", "0", "--kind", "jobs",
                           "--data", "gs://b/d", "--job-dir", "gs://b/j"])
    assert status == 0
    assert (tmp_path / "kubectl-call.args").read_text().split() == ["apply", "-f", "-"]
    docs = list(yaml.safe_load_all((tmp_path / "kubectl-call.stdin").read_text()))
    assert [d["kind"] for d in docs] == ["Service", "Job", "Job", "Job"]
    assert "nvidia.com/gpu" not in docs[1]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_submit_without_kubectl_prints_the_manifest_and_says_so(capsys):
    status = cluster.main(["--kubectl", "no-such-kubectl-binary", "--data", "gs://b/d", "--job-dir", "gs://b/j"])
    out, err = capsys.readouterr()
    assert status == 3 and "not found" in err
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["JobSet"]  # 2 workers: restarted as one group


def _dry_run(script: str, args: list, **env) -> list:
    result = subprocess.run(["bash", os.path.join(INFRA, script), *args], capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", **env}, timeout=30, check=True)
    return shlex.split(result.stdout)


@pytest.mark.parametrize("image", ["us-docker.pkg.dev/p/archive-vision/archive-vision:0.1.0", ""])
def test_dataflow_launch_builds_an_ingest_command_ingest_and_beam_accept(image):
    from pipelines import ingest

    argv = _dry_run("dataflow/launch.sh", ["ingest", "--input", "gs://b/scans", "--output", "gs://b/out dir"],
                    PROJECT="proj", REGION="europe-west4", BUCKET="b", IMAGE=image, SERVICE_ACCOUNT="sa@p.iam",
                    USE_PUBLIC_IPS="false")
    assert argv[:2] == ["archive-vision", "ingest"]
    opts, beam_args = ingest.parse_args(argv[2:])
    assert opts.output == "gs://b/out dir"
    assert unknown_beam_flags(beam_args) == []
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions, \
        StandardOptions, WorkerOptions

    options = PipelineOptions(beam_args)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location, gcp.staging_location) == (
        "proj", "europe-west4", "gs://b/dataflow/temp", "gs://b/dataflow/staging")
    workers = options.view_as(WorkerOptions)
    assert workers.autoscaling_algorithm == "THROUGHPUT_BASED" and workers.max_num_workers >= workers.num_workers
    assert workers.use_public_ips is False
    if image:
        assert workers.sdk_container_image == image
    else:
        assert options.view_as(SetupOptions).setup_file == os.path.join(REPO, "setup.py")


def test_flink_launch_builds_a_portable_runner_command_score_and_beam_accept():
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions
    from pipelines import score

    argv = _dry_run("flink/launch.sh", ["score", "--input", "gs://b/scans", "--output", "gs://b/scores",
                                        "--model", "gs://b/models/archive_vision"], JOB_ENDPOINT="flink-js:8099")
    assert argv[:2] == ["archive-vision", "score"]
    opts, beam_args = score.parse_args(argv[2:])
    assert opts.model == "gs://b/models/archive_vision"
    assert unknown_beam_flags(beam_args) == []
    portable = PipelineOptions(beam_args).view_as(PortableOptions)
    assert (portable.job_endpoint, portable.environment_type, portable.environment_config) == (
        "flink-js:8099", "EXTERNAL", "localhost:50000")


def test_flink_session_serves_the_launch_scripts_defaults():
    docs = load(os.path.join(K8S, "flink-session.yaml"))
    (flink,) = by_kind(docs, "FlinkDeployment")
    jobserver = containers(by_kind(docs, "Deployment"))[0]
    flink_version = re.search(r"beam_flink(\d+\.\d+)_job_server", jobserver["image"]).group(1)
    assert flink["spec"]["flinkVersion"] == "v" + flink_version.replace(".", "_")
    assert flink["spec"]["image"] == f"flink:{flink_version}"
    master = [a for a in jobserver["args"] if a.startswith("--flink-master=")][0]
    assert master.split("=")[1].split(":")[0] == f"{flink['metadata']['name']}-rest"  # the operator's REST Service
    pool = [c for c in containers([flink]) if c["name"] == "beam-worker-pool"][0]
    assert pool["image"] == cluster.DEFAULT_IMAGE and pool["args"] == ["--worker_pool"]
    argv = _dry_run("flink/launch.sh", ["ingest", "--input", "a", "--output", "b"])
    assert argv[argv.index("--environment_config") + 1] == f"localhost:{pool['ports'][0]['containerPort']}"
    (service,) = by_kind(docs, "Service")
    job_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["job"]
    assert argv[argv.index("--job_endpoint") + 1] == f"localhost:{job_port}"  # through kubectl port-forward


def test_launch_scripts_refuse_unknown_jobs_and_missing_settings():
    env = {**os.environ, "DRY_RUN": "1"}
    bad_job = subprocess.run(["bash", os.path.join(INFRA, "flink/launch.sh"), "train"], capture_output=True,
                             text=True, env=env, timeout=30)
    assert bad_job.returncode == 2 and "unknown job" in bad_job.stderr
    env.pop("PROJECT", None)
    no_project = subprocess.run(["bash", os.path.join(INFRA, "dataflow/launch.sh"), "ingest"], capture_output=True,
                                text=True, env=env, timeout=30)
    assert no_project.returncode != 0 and "PROJECT" in no_project.stderr


# --------------------------------------------------------------------------------------------- JobSet, GPUs

# The JobSet fields (jobset.x-k8s.io/v1alpha2) the kubernetes client has no model for: a small schema of our own.
JOBSET_SPEC_FIELDS = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
                      "coordinator", "managedBy", "ttlSecondsAfterFinished"}
JOBSET_NETWORK_FIELDS = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
JOBSET_FAILURE_POLICY_FIELDS = {"maxRestarts", "restartStrategy", "rules"}
JOBSET_FAILURE_RULE_FIELDS = {"name", "action", "onJobFailureReasons", "targetReplicatedJobs"}
JOBSET_FAILURE_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}
JOBSET_REPLICATED_JOB_FIELDS = {"name", "groupName", "template", "replicas", "dependsOn"}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def check_jobset_schema(doc: dict) -> None:
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= JOBSET_SPEC_FIELDS and spec["replicatedJobs"], set(spec) - JOBSET_SPEC_FIELDS
    network = spec["network"]
    assert set(network) <= JOBSET_NETWORK_FIELDS and all(
        isinstance(network[k], bool) for k in ("enableDNSHostnames", "publishNotReadyAddresses") if k in network)
    assert DNS_LABEL.match(network.get("subdomain", doc["metadata"]["name"]))
    policy = spec["failurePolicy"]
    assert set(policy) <= JOBSET_FAILURE_POLICY_FIELDS
    assert isinstance(policy["maxRestarts"], int) and policy["maxRestarts"] >= 0
    for rule in policy.get("rules", []):
        assert set(rule) <= JOBSET_FAILURE_RULE_FIELDS and rule["action"] in JOBSET_FAILURE_ACTIONS
        assert re.match(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", rule["name"])
        assert set(rule.get("targetReplicatedJobs", [])) <= {rj["name"] for rj in spec["replicatedJobs"]}
    assert isinstance(spec.get("ttlSecondsAfterFinished", 0), int)
    for rj in spec["replicatedJobs"]:
        assert set(rj) <= JOBSET_REPLICATED_JOB_FIELDS and DNS_LABEL.match(rj["name"])
        assert isinstance(rj["replicas"], int) and rj["replicas"] >= 1
        assert set(rj["template"]) <= {"metadata", "spec"}  # a batch/v1 JobTemplateSpec (round-tripped above)


def expand_env(env: list, annotations: dict) -> dict:
    """The env Kubernetes gives the container: fieldRefs to annotations read, `$(VAR)` of earlier vars expanded."""
    values: dict = {}
    for var in env:
        if "valueFrom" in var:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path).group(1)
            values[var["name"]] = annotations[key]
        else:
            values[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                         lambda m: values.get(m.group(1), m.group(0)), var["value"])
    return values


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_jobset_pods_each_get_a_tf_config_naming_its_own_jobset_dns_name(workers):
    job = cluster.TrainingJob(name="av-train", data="gs://b/data", job_dir="gs://b/job", num_workers=workers,
                              gpus_per_worker=2, namespace="ml", trainer_args=("--epochs", "3"))
    (jobset,) = cluster.render_jobset(job)
    check_jobset_schema(jobset)
    spec = jobset["spec"]
    # every worker restarts with the group: a failed pod fails its Job, and JobSet recreates all of them
    assert spec["network"]["enableDNSHostnames"] is True and spec["network"]["publishNotReadyAddresses"] is True
    assert spec["failurePolicy"]["maxRestarts"] == job.max_restarts
    (rj,) = spec["replicatedJobs"]
    job_spec = rj["template"]["spec"]
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job_spec["backoffLimit"] == 0
    assert job_spec["completionMode"] == "Indexed" and job_spec["completions"] == job_spec["parallelism"] == workers
    # exit 2 (usage or setup error) ends the JobSet instead of restarting it
    (pod_rule,) = job_spec["podFailurePolicy"]["rules"]
    assert pod_rule["action"] == "FailJob" and pod_rule["onExitCodes"]["values"] == [2]
    assert pod_rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
    (set_rule,) = spec["failurePolicy"]["rules"]
    assert set_rule["action"] == "FailJobSet" and set_rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    container = pod["containers"][0]
    port = container["ports"][0]["containerPort"]
    # JobSet's DNS names: <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>(.<namespace>.svc)
    subdomain = spec["network"]["subdomain"]
    expected = [f"{jobset['metadata']['name']}-{rj['name']}-{j}-{p}.{subdomain}.ml.svc:{port}"
                for j in range(rj["replicas"]) for p in range(job_spec["completions"])]
    clusters = []
    for index in range(workers):
        env = expand_env(container["env"], {"batch.kubernetes.io/job-completion-index": str(index)})
        tf_config = json.loads(env["TF_CONFIG"])
        cluster.validate_tf_config(tf_config)
        assert tf_config["task"] == {"type": "worker", "index": index}
        assert tf_config["cluster"]["worker"][index] == expected[index]
        clusters.append(tf_config["cluster"])
    assert all(c == {"worker": expected} for c in clusters)
    assert max(len(a.split(".")[0]) for a in expected) <= 63
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 and container["image"].endswith(":0.1.0-gpu")
    assert after_double_dash(container["command"])[4:6] == ["--require-gpus", "2"]


def test_checked_in_jobset_passes_the_schema_check():
    (jobset,) = by_kind(load(os.path.join(K8S, "training-multiworker.yaml")), "JobSet")
    check_jobset_schema(jobset)
    with pytest.raises(AssertionError):
        check_jobset_schema({**jobset, "spec": {**jobset["spec"], "failurePolicy": {"maxRestart": 3}}})


@pytest.mark.parametrize("argv, kinds", [
    (["--workers", "2"], ["JobSet"]),
    (["--workers", "1"], ["Service", "Job"]),
    (["--workers", "2", "--kind", "jobs"], ["Service", "Job", "Job"]),
    (["--workers", "1", "--kind", "jobset"], ["JobSet"]),
    (["--workers", "2", "--kind", "tfjob"], ["TFJob"]),
])
def test_submit_restarts_multi_worker_jobs_as_a_group_by_default(argv, kinds, capsys):
    assert cluster.main(["--dry-run", "--data", "gs://b/d", "--job-dir", "gs://b/j", *argv]) == 0
    assert [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)] == kinds


def _rendered_container(argv: list, capsys) -> dict:
    assert cluster.main(["--dry-run", "--data", "gs://b/d", "--job-dir", "gs://b/j", *argv]) == 0
    return containers(list(yaml.safe_load_all(capsys.readouterr().out)))[0]


def test_submit_picks_the_cuda_image_for_gpus_and_the_cpu_image_without(capsys):
    gpu = _rendered_container(["--gpus-per-worker", "2"], capsys)
    assert gpu["image"] == cluster.DEFAULT_GPU_IMAGE
    assert after_double_dash(gpu["command"])[4:6] == ["--require-gpus", "2"]
    cpu = _rendered_container(["--gpus-per-worker", "0"], capsys)
    assert cpu["image"] == cluster.DEFAULT_IMAGE and "--require-gpus" not in cpu["command"]
    mine = _rendered_container(["--image", "eu.gcr.io/p/av:7-gpu"], capsys)
    assert mine["image"] == "eu.gcr.io/p/av:7-gpu"
    # a CUDA image under another tag is taken when told so; the trainer still checks the GPUs it sees
    digest = "eu.gcr.io/p/av@sha256:" + "0" * 64
    taken = _rendered_container(["--image", digest, "--allow-non-gpu-tag"], capsys)
    assert taken["image"] == digest and after_double_dash(taken["command"])[4:6] == ["--require-gpus", "1"]


@pytest.mark.parametrize("argv, message", [
    (["--image", "us-docker.pkg.dev/p/r/archive-vision:0.1.0"], "not a '-gpu' one"),
    (["--image", "localhost:5000/archive-vision"], "not a '-gpu' one"),
    (["--image", "eu.gcr.io/p/av@sha256:" + "0" * 64, "--gpus-per-worker", "2"], "--allow-non-gpu-tag"),
    (["--", "--require-gpus", "0"], "set from --gpus-per-worker"),
    (["--max-restarts", "-1"], "--max-restarts"),
])
def test_submit_refuses_a_cpu_image_for_a_gpu_job_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cluster.main(["--dry-run", "--data", "gs://b/d", "--job-dir", "gs://b/j", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "'-gpu'" in message:
        assert "tensorflow[and-cuda]" in err


# --------------------------------------------------------------------------------------------- serving extras

POD_MONITORING_ENDPOINT_FIELDS = {"port", "scheme", "interval", "timeout", "path", "params", "proxyUrl",
                                  "metricRelabeling", "authorization", "basicAuth", "oauth2", "tls"}


def test_serving_has_a_pod_monitoring_on_the_annotated_metrics_port_and_a_disruption_budget():
    from serving import configs

    deployment = by_kind(serving_docs(), "Deployment")[0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in serving_container()["ports"]}
    (monitoring,) = by_kind(serving_docs(), "PodMonitoring")
    assert monitoring["apiVersion"] == "monitoring.googleapis.com/v1"
    assert set(monitoring["spec"]) <= {"selector", "endpoints", "targetLabels", "limits", "filterRunning"}
    assert set(monitoring["spec"]["selector"]) <= {"matchLabels", "matchExpressions"}
    assert monitoring["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitoring["spec"]["endpoints"]
    assert set(endpoint) <= POD_MONITORING_ENDPOINT_FIELDS
    port = ports[endpoint["port"]] if isinstance(endpoint["port"], str) else endpoint["port"]
    assert port == int(annotations["prometheus.io/port"])
    assert endpoint["path"] == annotations["prometheus.io/path"] == configs.PROMETHEUS_PATH
    assert re.fullmatch(r"\d+(ms|s|m)", endpoint["interval"])
    (budget,) = by_kind(serving_docs(), "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1" and budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # the budget never blocks every drain: the autoscaler keeps more replicas than it protects
    hpa = by_kind(serving_docs(), "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["minReplicas"] > budget["spec"]["minAvailable"]
