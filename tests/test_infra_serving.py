"""The TF Serving Deployment's own flags and config files, run by the local TF-Serving-compatible server: its
probes answer the way Kubernetes needs (ready only once the model is servable, alive on the gRPC port)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from archive_vision.local_processes import free_port, stop_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow



def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0  # nothing answers yet: a failing probe too


def deployment_pieces():
    with open(os.path.join(REPO, "infra", "k8s", "serving.yaml"), encoding="utf-8") as f:
        docs = list(yaml.safe_load_all(f))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return deployment["spec"]["template"]["spec"]["containers"][0], config_map["data"]


def test_deployment_flags_serve_the_model_and_its_probes_answer(tmp_path):
    from serving import export
    from tests import score_fixtures as sf

    container, files = deployment_pieces()
    models = tmp_path / "models"
    export.export_model(sf.make_red_corner_model(), str(models), class_names=sf.CLASS_NAMES,
                        image_size=sf.IMAGE_SIZE, version=3)
    # The ConfigMap's files, with the gs:// model base path and the mount dir pointed at this test's dirs.
    mount = container["volumeMounts"][0]["mountPath"]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name, text in files.items():
        (config_dir / name).write_text(text.replace("gs://BUCKET/models", str(models)))
    grpc_port, rest_port = free_port(), free_port()
    port_flags = {"--port": grpc_port, "--rest_api_port": rest_port}
    args = []
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        value = str(port_flags.get(flag, value)).replace(mount, str(config_dir))
        args.append(f"{flag}={value}")

    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "serving.server", *args], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    readiness = container["readinessProbe"]["httpGet"]
    ready_url = f"http://127.0.0.1:{rest_port}{readiness['path']}"
    try:
        deadline = time.monotonic() + 180
        while http_status(ready_url) != 200:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "never became ready: " + (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        with urllib.request.urlopen(ready_url, timeout=5) as response:
            metadata = json.load(response)
        # as TF Serving prints it (proto field names, defaults included)
        assert metadata["model_spec"] == {"name": "archive_vision", "signature_name": "", "version": "3"}
        # liveness: a TCP connection to the gRPC port (the probe's port is --port, see test_infra_manifests)
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass
        # a probe for a model the server does not have fails, so the path really checks the model
        assert http_status(f"http://127.0.0.1:{rest_port}/v1/models/no_such_model/metadata") == 404
        # the scrape annotation's path serves Prometheus metrics on the REST port
        scrape = (tmp_path / "config" / "monitoring.config").read_text().split('path: "')[1].split('"')[0]
        assert http_status(f"http://127.0.0.1:{rest_port}{scrape}") == 200
    finally:
        stop_process(server)
        log.close()
    # the server stopped on SIGTERM (what Kubernetes sends first) within the grace period
    assert server.returncode == 0
