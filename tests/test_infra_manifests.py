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
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "CronJob", "Job",
                     "ServiceAccount"}


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
    checked = [(f"V{doc['apiVersion'].split('/')[-1][1:]}{doc['kind']}", doc) for doc in docs
               if doc["apiVersion"].split("/")[0] in ("v1", "apps", "batch", "autoscaling")]
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
            assert (repo, tag) == (PROJECT_IMAGE_REPO, __version__), image
    assert "tensorflow/serving:" in " ".join(images) and cluster.DEFAULT_IMAGE in images


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
    status = cluster.main(["--kubectl", str(fake), "--workers", "3", "--gpus-per-worker", "0",
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
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["Service", "Job", "Job"]


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
