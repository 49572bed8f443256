"""gs:// end to end against gcp-storage-emulator on 127.0.0.1: ingest gs:// -> gs:// through Beam's GCS IO,
training from gs:// shards into a gs:// job dir through the staging cache (train-staged), and the nightly
incremental score run writing gs:// results (scheduled-score). Everything is checked with the real
google-cloud-storage client, which (like Beam's GCS IO, built on it) honours STORAGE_EMULATOR_HOST.

TensorFlow's own gs:// filesystem cannot be pointed at an emulator (its endpoint is fixed), which is why the
trainer sees the gs:// data through the local cache that archive_vision.cluster.train_staged fills."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import pipelines
from archive_vision import cluster
from tests.image_factory import write_sample_archive
from archive_vision.local_processes import free_port, stop_process

pytestmark = pytest.mark.slow
BUCKET = "archive-vision-test"
TINY = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "16", "--epochs", "2",
        "--threads", "1", "--early-stopping-patience", "0"]



@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A gcp-storage-emulator process with one bucket; STORAGE_EMULATOR_HOST points this process at it."""
    port = free_port()
    root = tmp_path_factory.mktemp("gcs")
    binary = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    log = open(root / "emulator.log", "wb")
    process = subprocess.Popen([binary, "-d", str(root / "data"), "start", "--host", "127.0.0.1", "--port", str(port),
                                "--default-bucket", BUCKET, "-q"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"gcp-storage-emulator did not start: {(root / 'emulator.log').read_text()[-2000:]}")
        time.sleep(0.2)
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    pipelines.gcs_emulator_connects_anonymously()  # as every process started with it set does on importing pipelines
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        stop_process(process, grace_s=10)
        log.close()


@pytest.fixture(scope="module")
def bucket(emulator):
    """The test bucket through the real google-cloud-storage client."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials()).bucket(BUCKET)


def upload_dir(bucket, local: str, prefix: str) -> dict:
    """Upload the regular files of `local` (symlinks have no GCS equivalent) -> {local path: gs:// uri}."""
    uris = {}
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            key = f"{prefix}/{os.path.relpath(path, local)}"
            bucket.blob(key).upload_from_filename(path)
            uris[path] = f"gs://{BUCKET}/{key}"
    return uris


def names_under(bucket, prefix: str) -> list:
    return sorted(b.name[len(prefix) + 1:] for b in bucket.client.list_blobs(bucket, prefix=prefix + "/"))


def read_parquet(bucket, key: str) -> list:
    return pq.read_table(io.BytesIO(bucket.blob(key).download_as_bytes())).to_pylist()


def test_ingest_reads_a_gs_archive_and_writes_shards_and_tables_to_gs(bucket, tmp_path):
    from pipelines import ingest

    archive = write_sample_archive(str(tmp_path / "scans"))
    uris = upload_dir(bucket, str(tmp_path / "scans"), "scans")
    summary = ingest.run(["--input", f"gs://{BUCKET}/scans", "--output", f"gs://{BUCKET}/ingested", "--labels",
                          "folders", "--size", "48", "--num-shards", "2", "--direct_running_mode=in_memory"])

    names = names_under(bucket, "ingested")
    assert {"manifest.parquet", "errors.parquet", "labels.json", "run.json"} <= set(names)
    assert any(n.startswith("train-") and n.endswith(".tfrecord") for n in names)
    assert not [n for n in names if n.startswith(".temp-ingest-")]  # temp shards were renamed or cleaned up
    manifest = read_parquet(bucket, "ingested/manifest.parquet")
    assert sorted(r["source_uri"] for r in manifest) == sorted(uris[p] for p in archive["good"])
    assert all(r["label_name"] == r["source_uri"].split("/")[-2] for r in manifest)
    errors = {r["uri"]: r["error_type"] for r in read_parquet(bucket, "ingested/errors.parquet")}
    assert errors == {uris[p]: kind for p, kind in archive["bad"].items() if p in uris}
    assert json.loads(bucket.blob("ingested/labels.json").download_as_bytes())["classes"] == ["document", "photo"]
    assert summary["counts"]["reconciled"] and json.loads(
        bucket.blob("ingested/run.json").download_as_bytes())["counts"] == summary["counts"]


def test_checkset_reads_a_gs_archive_and_writes_its_turned_copies_and_truth_to_gs(bucket, tmp_path):
    import csv

    from archive_vision import check_set

    archive = write_sample_archive(str(tmp_path / "upright"))
    uris = upload_dir(bucket, str(tmp_path / "upright"), "upright")
    assert check_set.main(["--input", f"gs://{BUCKET}/upright", "--output", f"gs://{BUCKET}/check",
                           "--turns", "0,90"]) == 0
    truth = list(csv.DictReader(io.StringIO(bucket.blob("check/truth.csv").download_as_text())))
    assert sorted({r["source_uri"] for r in truth}) == sorted(uris[p] for p in archive["good"])
    assert len(truth) == 2 * len(archive["good"])
    names = names_under(bucket, "check")
    assert all(r["uri"].startswith(f"gs://{BUCKET}/check/images/") and r["uri"][len(f"gs://{BUCKET}/"):]
               in {f"check/{n}" for n in names} for r in truth)
    errors = {r["uri"]: r["error_type"]
              for r in csv.DictReader(io.StringIO(bucket.blob("check/errors.csv").download_as_text()))}
    # every bad file but the broken symlink, which has no GCS equivalent and is not uploaded
    expected = {uris[p]: kind for p, kind in archive["bad"].items() if not os.path.islink(p)}
    assert len(expected) == len(archive["bad"]) - 1 and errors == expected


def wait_while_progressing(processes, logs, stall_s: float = 240.0, cap_s: float = 1800.0):
    """The processes' exit codes, waiting as long as their logs keep growing: a slow, busy machine is given the time
    it needs, and only a run that prints nothing for `stall_s` (stuck, e.g. in a collective op) fails, as does one
    past the hard cap."""
    started = last_change = time.monotonic()
    sizes = None
    while any(p.poll() is None for p in processes):
        now = time.monotonic()
        current = [os.path.getsize(log) if os.path.exists(log) else 0 for log in logs]
        if current != sizes:
            sizes, last_change = current, now
        if now - last_change > stall_s or now - started > cap_s:
            raise AssertionError(f"no progress for {now - last_change:.0f}s ({now - started:.0f}s in all):\n\n"
                                 + "\n\n".join(open(log, errors="replace").read()[-3000:] for log in logs))
        time.sleep(1.0)
    return [p.returncode for p in processes]


def test_two_pods_train_from_gs_shards_into_one_gs_job_dir_and_a_restart_resumes(bucket, emulator, tmp_path):
    from tests.test_trainer_data import write_archive

    shards = write_archive(str(tmp_path / "shards"), {"train": 32, "val": 8, "test": 8},
                           stored_turns=(0, 90, 180, 270))
    upload_dir(bucket, shards, "shards")
    job = f"gs://{BUCKET}/jobs/run1"
    trainer_flags = ["--data", f"gs://{BUCKET}/shards", "--job-dir", job, *TINY]
    # What each worker pod runs (the container command of the rendered Jobs), with the TF_CONFIG it gets.
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    pods = []
    for index in range(2):
        env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator, "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps(cluster.build_tf_config(addresses, index))}
        log = open(tmp_path / f"pod-{index}.log", "wb")
        pods.append((subprocess.Popen([sys.executable, "-m", "archive_vision.cluster", "train-staged", "--cache",
                                       str(tmp_path / f"cache-{index}"), "--", *trainer_flags],
                                      env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = wait_while_progressing([pod for pod, _ in pods], [tmp_path / f"pod-{i}.log" for i in range(2)])
    finally:
        for pod, log in pods:
            if pod.poll() is None:
                pod.kill()
                pod.wait(timeout=10)
            log.close()
    assert codes == [0, 0], "\n\n".join((tmp_path / f"pod-{i}.log").read_text(errors="replace")[-3000:]
                                        for i in range(2))

    names = names_under(bucket, "jobs/run1")
    exported = [n for n in names if n.endswith("/saved_model.pb")]
    assert len(exported) == 1 and exported[0].startswith("export/archive_vision/")
    assert {"training_config.json", "run_summary.json", "labels.json", "eval/test_metrics.json", "model.keras",
            "workers/worker-1/history_heads.csv"} <= set(names)
    assert not [n for n in names if n.startswith("workers/") and n.endswith(".keras")]  # the chief's model only
    assert not [n for n in names if n.startswith("workers/worker-1/export")]
    config = json.loads(bucket.blob("jobs/run1/training_config.json").download_as_bytes())
    assert config["num_workers"] == 2 and config["replicas"] == 2 and config["class_names"] == ["warm", "cool"]
    assert sorted(os.listdir(tmp_path / "cache-0" / "data")) == sorted(os.listdir(shards))  # shards + labels.json
    assert os.listdir(tmp_path / "cache-1" / "job") == ["workers"]  # worker 1 staged only its own part

    # A restarted chief starts from what the gs:// job dir holds: the finished phase is not trained again.
    cache = str(tmp_path / "cache-restart")
    assert cluster.train_staged(["--cache", cache, "--", "--data", f"gs://{BUCKET}/shards", "--job-dir", job,
                                 *TINY]) == 0
    history = bucket.blob("jobs/run1/history_heads.csv").download_as_text().strip().splitlines()
    assert len(history) == 1 + 2  # header + the 2 epochs of the first run, none added by the restart
    assert not os.path.exists(os.path.join(cache, "job", "workers"))  # the chief leaves the workers' files alone


def test_nightly_score_writes_gs_results_and_reuses_the_previous_night(bucket, tmp_path):
    from serving import export
    from tests import score_fixtures as sf

    model_base = str(tmp_path / "export")
    export.export_model(sf.make_red_corner_model(), model_base, class_names=sf.CLASS_NAMES,
                        image_size=sf.IMAGE_SIZE, version=3)
    local = str(tmp_path / "night-archive")
    sf.write_turned_archive(local, {"a": 0, "b": 90})
    upload_dir(bucket, local, "nightly")
    flags = ["--", "--input", f"gs://{BUCKET}/nightly", "--model", model_base, "--no-report",
             "--direct_running_mode=in_memory"]
    root = f"gs://{BUCKET}/scores"

    assert cluster.scheduled_score(["--results-root", root, "--run-name", "2026-01-01", *flags]) == 0
    first = {r["uri"].rsplit("/", 1)[1]: r for r in read_parquet(bucket, "scores/2026-01-01/results.parquet")}
    assert {n: r["orientation_degrees"] for n, r in first.items()} == {"a.png": 0, "b.png": 90}
    assert not any(r["reused"] for r in first.values())

    assert all(r["fingerprint"].startswith("gs:") for r in first.values())

    sf.write_turned_archive(local, {"c": 270})
    upload_dir(bucket, local, "nightly")  # a and b uploaded again: new generations, the same bytes (and MD5)
    assert cluster.scheduled_score(["--results-root", root, "--run-name", "2026-01-02", *flags]) == 0
    second = {r["uri"].rsplit("/", 1)[1]: r for r in read_parquet(bucket, "scores/2026-01-02/results.parquet")}
    assert {n for n, r in second.items() if r["reused"]} == {"a.png", "b.png"}
    assert {n for n, r in second.items() if not r["reused"]} == {"c.png"} and second["c.png"][
        "orientation_degrees"] == 270
    # a and b were reused from the listing alone (their MD5 did not change): only c was read.
    counts = json.loads(bucket.blob("scores/2026-01-02/run.json").download_as_text())["counts"]
    assert (counts["inputs_reused_by_listing"], counts["files_read"]) == (2, 1)
    assert counts["bytes_read"] == os.path.getsize(os.path.join(local, "c.png"))
    assert {"results.csv", "errors.parquet", "run.json"} <= set(names_under(bucket, "scores/2026-01-02"))
    assert cluster.latest_results(root, "2026-01-03") == f"{root}/2026-01-02/results.parquet"


def test_a_gs_listing_fingerprints_each_object_from_the_listing_itself(bucket, tmp_path):
    from pipelines import sources

    local = str(tmp_path / "fp")
    os.makedirs(local)
    for name, data in (("x.png", b"one"), ("y.png", b"two"), ("z.txt", b"one")):
        with open(os.path.join(local, name), "wb") as f:
            f.write(data)
    upload_dir(bucket, local, "fingerprints")
    listed = {e.uri.rsplit("/", 1)[1]: e for e in sources.list_archive(f"gs://{BUCKET}/fingerprints")}
    assert sorted(listed) == ["x.png", "y.png", "z.txt"] and all(e.size_bytes == 3 for e in listed.values())
    blobs = {b.name.rsplit("/", 1)[1]: b for b in bucket.client.list_blobs(bucket, prefix="fingerprints/")}
    assert {n: e.fingerprint for n, e in listed.items()} == {n: sources.gcs_fingerprint(b) for n, b in blobs.items()}
    assert listed["x.png"].fingerprint == listed["z.txt"].fingerprint != listed["y.png"].fingerprint  # by content
    globbed = list(sources.list_archive(f"gs://{BUCKET}/fingerprints/*.png"))
    assert [e.fingerprint for e in globbed] == [listed["x.png"].fingerprint, listed["y.png"].fingerprint]


def test_an_exports_recorded_policy_is_read_from_gs(bucket):
    """A version's metadata on gs:// (where TF Serving's base path lives) gives its recorded policy: the newer
    `score_policy`, else the decision part of an older export's `score_settings`."""
    from pipelines.score import export_metadata, recorded_policy
    from serving.export import EXPORT_METADATA
    from serving.policy import DecisionPolicy, ScorePolicy

    policy = ScorePolicy(decision=DecisionPolicy(rotate_threshold=0.95, ok_threshold=0.6))
    bucket.blob(f"models/archive_vision/12/assets.extra/{EXPORT_METADATA}").upload_from_string(json.dumps(
        {"version": 12, "score_policy": json.loads(policy.to_json()), "score_settings": {"rotate_threshold": 0.7}}))
    bucket.blob(f"models/archive_vision/3/assets.extra/{EXPORT_METADATA}").upload_from_string(json.dumps(
        {"version": 3, "score_settings": {"rotate_threshold": 0.85, "tta": True}}))
    newer = f"gs://{BUCKET}/models/archive_vision/12"
    assert recorded_policy(export_metadata(newer), newer) == (policy, newer)
    older = f"gs://{BUCKET}/models/archive_vision/3"
    read, where = recorded_policy(export_metadata(older), older)
    assert (read.decision.rotate_threshold, read.decision.tta_agreement_below, read.answer.tta, where) == (
        0.85, 0.85, True, older)
    assert export_metadata(f"gs://{BUCKET}/models/archive_vision/99") == {}  # no metadata: the generic policy


def test_review_answers_land_in_a_gs_run_and_survive_a_killed_server(bucket, tmp_path):
    """archive-vision review on a gs:// RUN_DIR: one journal object per answer, corrections.parquet as their merge,
    and a server killed after answering loses nothing (the next one rebuilds the table from the journal)."""
    import signal

    from tests.test_review import Server, make_run, right_answer

    run_dir, truth = make_run(tmp_path)
    prefix = "runs/review"
    bucket.blob(f"{prefix}/results.parquet").upload_from_filename(os.path.join(run_dir, "results.parquet"))
    gs_run = f"gs://{BUCKET}/{prefix}"
    server = Server(gs_run, "--reviewer", "ana")
    try:
        answered = []
        for item in server.state()["head"][:4]:
            answer = right_answer({"uri": item["uri"], "model": item["model_orientation"]}, truth)
            status, body = server.answer((item["uri"], item["page"], answer))
            assert status == 200, body
            answered.append((item["uri"], item["page"], answer))
        assert len([n for n in names_under(bucket, prefix) if n.startswith("corrections.journal/")]) == 4
        rows = read_parquet(bucket, f"{prefix}/corrections.parquet")
        assert sorted((r["uri"], r["page"], r["label"]) for r in rows) == sorted(answered)
    finally:
        server.stop(signal.SIGKILL)
    bucket.blob(f"{prefix}/corrections.parquet").delete()  # as if the kill came between the journal and the table
    again = Server(gs_run, "--reviewer", "ana")
    try:
        assert again.state()["done"] == 4
        rows = read_parquet(bucket, f"{prefix}/corrections.parquet")
        assert sorted((r["uri"], r["page"], r["label"]) for r in rows) == sorted(answered)
    finally:
        again.stop()
