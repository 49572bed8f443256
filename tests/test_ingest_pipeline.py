"""The ingest Beam job: records, error rows, counts, shards, manifests; read back with tf.data."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines import imaging, ingest, schema
from tests.image_factory import encode_array, make_asymmetric_image, make_random_image, multipage_tiff, \
    write_sample_archive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ingest(args, extend=None):
    pipeline = TestPipeline()
    summary = ingest.run(args, test_pipeline=pipeline, extend_pipeline=extend)
    return summary, pipeline


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    archive = write_sample_archive(str(root / "in"))
    out = str(root / "out")
    checks = {}

    def extend(outputs):
        error_kinds = outputs["errors"] | "ErrorKinds" >> __import__("apache_beam").Map(
            lambda row: (row["uri"], row["error_type"]))
        assert_that(error_kinds, equal_to(sorted(archive["bad"].items())), label="ErrorsAsExpected")
        checks["asserted"] = True

    summary, pipeline = run_ingest(["--input", str(root / "in"), "--output", out, "--size", "64",
                                    "--num-shards", "2"], extend)
    return {"archive": archive, "out": out, "summary": summary, "checks": checks}


def test_every_input_is_a_record_or_an_error_row(sample):
    counts = sample["summary"]["counts"]
    n_good, n_bad = len(sample["archive"]["good"]), len(sample["archive"]["bad"])
    assert counts["inputs"] == n_good + n_bad
    assert counts["inputs_ok"] == n_good and counts["inputs_failed"] == n_bad
    assert counts["records"] == n_good and counts["errors"] == n_bad
    assert counts["reconciled"] is True
    assert sample["checks"]["asserted"]


def test_error_table_says_uri_stage_type_and_why(sample):
    errors = pq.read_table(os.path.join(sample["out"], "errors.parquet")).to_pylist()
    by_uri = {row["uri"]: row for row in errors}
    assert set(by_uri) == set(sample["archive"]["bad"])
    for uri, kind in sample["archive"]["bad"].items():
        row = by_uri[uri]
        assert row["error_type"] == kind
        assert row["stage"] in ("read", "decode")
        assert row["message"]
    assert "No such file" in by_uri[[u for u, k in sample["archive"]["bad"].items() if k == "unreadable"][0]]["message"]


def test_labels_come_from_folder_names_in_stable_order(sample):
    labels = json.load(open(os.path.join(sample["out"], "labels.json")))
    assert labels == {"classes": ["document", "photo"], "source": "folders"}
    manifest = pq.read_table(os.path.join(sample["out"], "manifest.parquet")).to_pylist()
    for row in manifest:
        expected = os.path.basename(os.path.dirname(row["source_uri"]))
        assert row["label_name"] == expected
        assert row["label_index"] == labels["classes"].index(expected)
        assert row["orientation"] == schema.UNKNOWN


def test_manifest_names_each_records_shard_and_the_shards_hold_them(sample):
    import tensorflow as tf

    manifest = pq.read_table(os.path.join(sample["out"], "manifest.parquet")).to_pylist()
    shard_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(sample["out"], "*.tfrecord")))
    assert set(row["shard"] for row in manifest) == set(shard_files)
    for name in shard_files:
        split, _, rest = name.partition("-")
        index, _, total = rest.split(".")[0].partition("-of-")
        assert split in schema.SPLITS and int(index) < int(total)
    for name in shard_files:
        uris = sorted(schema.record_from_example(tf.train.Example.FromString(raw.numpy())).source_uri
                      for raw in tf.data.TFRecordDataset(os.path.join(sample["out"], name)))
        assert uris == sorted(row["source_uri"] for row in manifest if row["shard"] == name)
    assert not glob.glob(os.path.join(sample["out"], ".temp-*"))  # temp shards renamed away


def test_shards_read_back_with_tf_data_give_the_pure_function_pixels(sample):
    import tensorflow as tf

    from trainer.preprocessing import decode_image_bytes

    files = sorted(glob.glob(os.path.join(sample["out"], "*.tfrecord")))
    dataset = tf.data.TFRecordDataset(files).map(lambda raw: tf.io.parse_single_example(raw, schema.tf_feature_spec()))
    seen = 0
    for features in dataset:
        uri = features[schema.SOURCE_URI].numpy().decode()
        pixels = decode_image_bytes(features[schema.IMAGE_ENCODED]).numpy().astype(float)
        assert pixels.shape == (64, 64, 3)
        assert features[schema.IMAGE_HEIGHT].numpy() == 64 and features[schema.IMAGE_FORMAT].numpy() == b"jpeg"
        with open(uri, "rb") as f:
            data = f.read()
        assert features[schema.SHA256].numpy().decode() == imaging.content_sha256(data)
        page = next(imaging.decode_pages(data, draft_for=(64, "pad")))
        expected = np.asarray(imaging.resize(page.image, 64, "pad"), dtype=float)
        assert np.abs(pixels - expected).mean() < 5.0, uri  # JPEG q90 with 4:2:0 chroma at 64 px; a wrong image is ~50
        seen += 1
    assert seen == len(sample["archive"]["good"])


def test_run_json_records_options_versions_and_counts(sample):
    run = json.load(open(os.path.join(sample["out"], "run.json")))
    assert run["options"]["size"] == 64
    assert run["versions"]["apache_beam"]
    assert run["counts"]["inputs"] == sample["summary"]["counts"]["inputs"]
    assert run["elapsed_seconds"] > 0


def test_a_second_run_refuses_to_mix_with_earlier_shards(sample):
    with pytest.raises(SystemExit, match="--overwrite"):
        ingest.run(["--input", os.path.dirname(sample["archive"]["good"][0]), "--output", sample["out"]],
                   test_pipeline=TestPipeline())


def test_manifest_input_with_labels_splits_orientation_and_bad_rows(tmp_path):
    images = tmp_path / "scans"
    images.mkdir()
    rows = []
    for i in range(6):
        name = f"scan{i}.png"
        (images / name).write_bytes(encode_array(make_random_image(40, 30, seed=i), "PNG"))
        rows.append({"uri": f"scans/{name}", "label": ["map", "letter"][i % 2], "split": ["train", "test"][i % 2],
                     "orientation": [0, 90, 180, 270, "", 0][i]})
    rows.append({"uri": "", "label": "map", "split": "train", "orientation": 0})
    rows.append({"uri": "scans/scan6.png", "label": "map", "split": "holdout", "orientation": 0})
    rows.append({"uri": "scans/scan7.png", "label": "map", "split": "train", "orientation": 45})
    rows.append({"uri": "scans/scan0.png", "label": "letter", "split": "test", "orientation": 0})
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w") as f:
        f.write("uri,label,split,orientation\n")
        for row in rows:
            f.write(f"{row['uri']},{row['label']},{row['split']},{row['orientation']}\n")
    out = str(tmp_path / "out")
    summary, pipeline = run_ingest(["--input", str(manifest), "--output", out, "--size", "32"])
    assert summary["counts"]["records"] == 6 and summary["counts"]["errors"] == 4
    assert summary["counts"]["reconciled"]
    table = {r["source_uri"]: r for r in pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()}
    for i in range(6):
        row = table[str(images / f"scan{i}.png")]
        assert row["label_name"] == ["map", "letter"][i % 2]
        assert row["split"] == ["train", "test"][i % 2]
        assert row["orientation"] == [0, 90, 180, 270, -1, 0][i]
    assert json.load(open(os.path.join(out, "labels.json")))["classes"] == ["letter", "map"]
    messages = " | ".join(r["message"] for r in pq.read_table(os.path.join(out, "errors.parquet")).to_pylist())
    assert "empty uri" in messages and "holdout" in messages and "45" in messages
    assert "duplicate uri, first listed on manifest row 1" in messages


def test_parquet_manifest_and_pinned_class_order(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode_array(make_random_image(30, 30), "JPEG"))
    (tmp_path / "b.jpg").write_bytes(encode_array(make_random_image(30, 30, seed=3), "JPEG"))
    pq.write_table(pa.table({"uri": [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], "label": ["z", "unknown"]}),
                   tmp_path / "m.parquet")
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", str(tmp_path / "m.parquet"), "--output", out, "--classes", "z,y"])
    assert json.load(open(os.path.join(out, "labels.json")))["classes"] == ["z", "y"]
    assert summary["counts"]["records"] == 1
    assert pq.read_table(os.path.join(out, "errors.parquet")).to_pylist()[0]["error_type"] == "unknown_label"


def test_multipage_tiff_pages_become_records_in_one_split(tmp_path):
    pages = [Image.fromarray(make_random_image(50, 40, seed=s)) for s in range(3)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bundle.tif").write_bytes(multipage_tiff(pages))
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", str(tmp_path / "in"), "--output", out, "--size", "32"])
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    assert sorted(r["page"] for r in manifest) == [0, 1, 2]
    assert len({r["split"] for r in manifest}) == 1
    assert summary["counts"]["inputs"] == 1 and summary["counts"]["reconciled"]


def test_duplicates_share_a_split_and_augmented_copies_only_in_train(tmp_path):
    (tmp_path / "in").mkdir()
    data = [encode_array(make_random_image(40, 40, seed=s), "PNG") for s in range(12)]
    for i, d in enumerate(data):
        (tmp_path / "in" / f"img{i}.png").write_bytes(d)
        (tmp_path / "in" / f"copy_of_img{i}.png").write_bytes(d)
    out = str(tmp_path / "out")
    summary, pipeline = run_ingest(["--input", str(tmp_path / "in"), "--output", out, "--size", "32",
                                    "--augment-copies", "2", "--split-fractions", "0.5,0.25,0.25"])
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    splits_by_hash = {}
    for row in manifest:
        splits_by_hash.setdefault(row["sha256"], set()).add(row["split"])
        if row["augment_index"] > 0:
            assert row["split"] == "train"
    assert all(len(s) == 1 for s in splits_by_hash.values())
    originals = [r for r in manifest if r["augment_index"] == 0]
    train_originals = sum(1 for r in originals if r["split"] == "train")
    assert len(originals) == 24
    assert summary["counts"]["augmented_records"] == 2 * train_originals
    assert summary["counts"]["inputs"] == 24


def test_gzip_shards_are_readable_by_tf_data(tmp_path):
    import tensorflow as tf

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(encode_array(make_random_image(30, 30, seed=i), "JPEG"))
    out = str(tmp_path / "out")
    run_ingest(["--input", str(tmp_path / "in"), "--output", out, "--compression", "gzip",
                "--split-fractions", "1,0,0"])
    files = glob.glob(os.path.join(out, "train-*.tfrecord.gz"))
    assert len(files) == 1
    assert sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP")) == 3


def test_stored_pixels_are_upright_after_exif(tmp_path):
    from tests.image_factory import jpeg_with_exif_orientation

    upright = make_asymmetric_image(60, 80)
    stored = np.asarray(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270))  # camera held sideways: tag 8
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "sideways.jpg").write_bytes(jpeg_with_exif_orientation(stored, 8))
    out = str(tmp_path / "out")
    run_ingest(["--input", str(tmp_path / "in"), "--output", out, "--size", "80", "--resize-mode", "stretch",
                "--assume-upright"])
    row = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()[0]
    assert row["exif_orientation"] == 8 and row["orientation"] == 0
    assert (row["original_width"], row["original_height"]) == (80, 60)
    import tensorflow as tf

    raw = next(iter(tf.data.TFRecordDataset(glob.glob(os.path.join(out, "*.tfrecord")))))
    pixels = tf.io.decode_jpeg(tf.io.parse_single_example(raw, schema.tf_feature_spec())[schema.IMAGE_ENCODED])
    top_left = pixels.numpy()[5, 5]
    assert top_left[0] > 200 and top_left[2] < 80  # the red block is back in the top-left corner


def test_cli_runs_multiprocess_direct_runner_and_prints_a_summary(tmp_path):
    archive = write_sample_archive(str(tmp_path / "in"), n_per_class=2)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "archive_vision.cli", "ingest", "--input", str(tmp_path / "in"),
                           "--output", str(out), "--size", "48"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "ARCHIVE_VISION_PROGRESS_SECONDS": "0"})
    n = len(archive["good"]) + len(archive["bad"])
    # The sample's bad inputs are far over the default --max-failed-fraction: exit 3, the tables all written.
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "reconciled" in proc.stdout and f"{len(archive['bad'])} of {n} inputs failed" in proc.stdout
    assert re.search(rf"inputs done, [\d.]+ inputs/s; {n} listed for \d+ worker", proc.stderr)  # per-worker progress
    assert f"inputs   {n}" in proc.stdout
    run = json.load(open(out / "run.json"))
    assert run["counts"]["errors"] == len(archive["bad"])
    # Where it ran: one DirectRunner worker process per core this test may use.
    from archive_vision.local_processes import usable_cores
    assert run["runner"] == {"runner": "DirectRunner", "direct_running_mode": "multi_processing",
                             "direct_num_workers": usable_cores()}


def test_help_lists_the_job_flags():
    proc = subprocess.run([sys.executable, "-m", "archive_vision.cli", "ingest", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0
    for flag in ("--input", "--output", "--resize-mode", "--augment-copies", "--max-pixels", "--split-fractions"):
        assert flag in proc.stdout


def test_files_over_the_size_limit_are_refused_before_reading(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "small.png").write_bytes(encode_array(make_random_image(8, 8), "PNG"))
    (tmp_path / "in" / "huge.bmp").write_bytes(encode_array(make_random_image(400, 400), "BMP"))  # ~480 KB
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", str(tmp_path / "in"), "--output", out, "--max-file-mb", "0.1"])
    errors = pq.read_table(os.path.join(out, "errors.parquet")).to_pylist()
    assert [(os.path.basename(e["uri"]), e["stage"], e["error_type"]) for e in errors] == \
        [("huge.bmp", "read", "too_large")]
    assert "--max-file-mb" in errors[0]["message"]
    assert summary["counts"]["records"] == 1 and summary["counts"]["reconciled"]


def _turn_cw(array, degrees):
    """Pixels turned `degrees` clockwise (np.rot90 turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(array, k=(4 - degrees // 90) % 4))


def read_records(out):
    """Every record in `out`'s shards with its decoded pixels: [(ImageRecord, HxWx3 uint8 array)]."""
    import io

    import tensorflow as tf

    found = []
    for raw in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(out, "*.tfrecord")))):
        record = schema.record_from_example(tf.train.Example.FromString(raw.numpy()))
        found.append((record, np.asarray(Image.open(io.BytesIO(record.encoded)).convert("RGB"))))
    return found


def mirrored_copies(out):
    """{label_name: [was each augmented copy a mirror of its original?]} (copies made with --max-shift 0)."""
    records = read_records(out)
    originals = {(r.source_uri, r.page): pixels for r, pixels in records if r.augment_index == 0}
    found = {}
    for record, pixels in records:
        if record.augment_index:
            original = originals[(record.source_uri, record.page)]
            assert np.array_equal(pixels, original) or np.array_equal(pixels, original[:, ::-1])
            found.setdefault(record.label_name, []).append(np.array_equal(pixels, original[:, ::-1]))
    return found


def test_flipped_copies_of_turned_scans_carry_the_mirrored_orientation_label(tmp_path):
    upright = make_asymmetric_image(48, 48)
    (tmp_path / "scans").mkdir()
    with open(tmp_path / "manifest.csv", "w") as f:
        f.write("uri,label,split,orientation\n")
        for degrees in (0, 90, 180, 270):
            (tmp_path / "scans" / f"turned{degrees}.png").write_bytes(encode_array(_turn_cw(upright, degrees), "PNG"))
            f.write(f"scans/turned{degrees}.png,photo,train,{degrees}\n")
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", str(tmp_path / "manifest.csv"), "--output", out, "--size", "48",
                             "--format", "png", "--augment-copies", "6", "--max-shift", "0"])
    assert summary["counts"]["records"] == 4 * 7 and summary["counts"]["reconciled"]
    mirrored_sideways = 0
    for record, pixels in read_records(out):
        stored = int(os.path.basename(record.source_uri)[len("turned"):-len(".png")])
        is_mirror = not np.array_equal(pixels, _turn_cw(upright, stored))
        # Turning the record back by its label gives the upright picture, or its mirror for a flipped copy.
        back_upright = np.array_equal(pixels, _turn_cw(upright[:, ::-1] if is_mirror else upright,
                                                       record.orientation))
        assert back_upright, (record.source_uri, record.augment_index, is_mirror, record.orientation)
        assert record.orientation == ((360 - stored) % 360 if is_mirror else stored)
        mirrored_sideways += is_mirror and stored in (90, 270)
    assert mirrored_sideways > 0  # the case the old labels got wrong is really exercised


@pytest.fixture(scope="module")
def photo_and_document_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("flip_archive") / "in"
    for name in ("photo", "document"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            seed = 10 * len(name) + i
            (root / name / f"{name}{i}.png").write_bytes(encode_array(make_random_image(40, 40, seed=seed), "PNG"))
    return str(root)


FLIP_RUN_ARGS = ["--size", "40", "--format", "png", "--augment-copies", "6", "--max-shift", "0",
                 "--split-fractions", "1,0,0"]


def test_by_default_document_copies_are_never_mirrored_and_photo_copies_are(photo_and_document_archive, tmp_path):
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", photo_and_document_archive, "--output", out] + FLIP_RUN_ARGS)
    mirrored = mirrored_copies(out)
    assert len(mirrored["document"]) == 18 and not any(mirrored["document"])
    assert len(mirrored["photo"]) == 18 and any(mirrored["photo"])
    assert summary["augmentation"]["never_flipped_classes"] == ["document"]
    assert json.load(open(os.path.join(out, "run.json")))["augmentation"]["never_flipped_classes"] == ["document"]


@pytest.mark.parametrize("flags,never_flipped", [(["--text-archive"], ["document", "photo"]),
                                                 (["--no-flip-classes", "photo"], ["document", "photo"])])
def test_text_archive_and_no_flip_classes_stop_every_mirror(photo_and_document_archive, tmp_path, flags,
                                                            never_flipped):
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", photo_and_document_archive, "--output", out] + FLIP_RUN_ARGS + flags)
    mirrored = mirrored_copies(out)
    assert len(mirrored["photo"]) == 18 and not any(mirrored["photo"])
    assert not any(mirrored["document"])
    assert summary["augmentation"]["never_flipped_classes"] == never_flipped


@pytest.mark.parametrize("name,document", [("document", True), ("Documents", True), ("handwritten_letters", True),
                                           ("NewsPapers", True), ("page", True), ("photo", False),
                                           ("urban", False), ("rural", False), ("textile", False)])
def test_which_class_names_count_as_documents(name, document):
    assert ingest.is_document_class(name) is document


def test_an_unlistable_folder_is_a_failed_input_in_the_errors_table(tmp_path, monkeypatch):
    for name in ("photo", "document"):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "a.png").write_bytes(encode_array(make_random_image(30, 30), "PNG"))
    (tmp_path / "in" / "document" / "boxes").mkdir()
    (tmp_path / "in" / "document" / "boxes" / "b.png").write_bytes(encode_array(make_random_image(30, 30), "PNG"))
    locked = str(tmp_path / "in" / "document" / "boxes")
    real_scandir = os.scandir

    def scandir(path="."):  # what an unreadable folder does (chmod 000 cannot stop root, so simulate it)
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = str(tmp_path / "out")
    summary, _ = run_ingest(["--input", str(tmp_path / "in"), "--output", out, "--size", "32"])
    errors = pq.read_table(os.path.join(out, "errors.parquet")).to_pylist()
    assert [(e["uri"], e["stage"], e["error_type"]) for e in errors] == [(locked, "list", "unreadable_dir")]
    assert "Permission denied" in errors[0]["message"]
    counts = summary["counts"]
    assert (counts["inputs"], counts["records"], counts["inputs_failed"]) == (3, 2, 1) and counts["reconciled"]


def third_corrupt_archive(root):
    """Six good scans and three corrupt ones: a third of the inputs fail."""
    os.makedirs(root)
    for i in range(6):
        with open(os.path.join(root, f"good_{i}.png"), "wb") as f:
            f.write(encode_array(make_random_image(40, 40, 3, seed=i), "PNG"))
    for i in range(3):
        with open(os.path.join(root, f"corrupt_{i}.jpg"), "wb") as f:
            f.write(b"not a scan %d\n" % i)
    return root


def test_a_run_losing_a_third_of_its_inputs_exits_3_with_every_table_written(tmp_path, capfd, monkeypatch,
                                                                              restore_logging):
    from pipelines import cli

    archive = third_corrupt_archive(str(tmp_path / "in"))
    monkeypatch.setenv("ARCHIVE_VISION_PROGRESS_SECONDS", "0")
    out = tmp_path / "out"
    code = ingest.main(["-q", "--input", archive, "--output", str(out), "--size", "32",
                        "--direct_running_mode=in_memory"])
    assert code == cli.EXIT_TOO_MANY_FAILED == 3
    assert {"manifest.parquet", "errors.parquet", "labels.json", "run.json"} <= set(os.listdir(out))
    assert glob.glob(str(out / "*.tfrecord"))
    assert pq.read_table(out / "manifest.parquet").num_rows == 6
    assert pq.read_table(out / "errors.parquet").num_rows == 3
    run = json.load(open(out / "run.json"))
    assert run["counts"]["reconciled"] and run["options"]["max_failed_fraction"] == 0.05
    assert run["failed_inputs"] == {"inputs_failed": 3, "inputs": 9, "fraction": round(3 / 9, 6),
                                    "max_fraction": 0.05, "exceeded": True}
    printed = capfd.readouterr()
    assert "FAILED   3 of 9 inputs failed" in printed.out
    assert "[ingest worker" not in printed.err  # -q: no progress lines

    again = tmp_path / "again"
    assert ingest.main(["--input", archive, "--output", str(again), "--size", "32", "--max-failed-fraction", "1.0",
                        "--direct_running_mode=in_memory"]) == 0
    run = json.load(open(again / "run.json"))
    assert run["failed_inputs"]["max_fraction"] == 1.0 and not run["failed_inputs"]["exceeded"]
    # Without -q each worker says how far it is: done, rate, and the ETA from the listing's size.
    assert re.search(r"\[ingest worker \d+\] \d+ inputs done, [\d.]+ inputs/s; 9 listed for 1 worker, ETA",
                     capfd.readouterr().err)


def test_max_failed_fraction_must_be_a_share():
    with pytest.raises(SystemExit):
        ingest.parse_args(["--input", "a", "--output", "b", "--max-failed-fraction", "1.5"])
    opts, _ = ingest.parse_args(["--input", "a", "--output", "b", "--max-failed-fraction", "0.2"])
    assert opts.max_failed_fraction == 0.2


def test_progress_line_gives_done_rate_and_eta():
    from pipelines.progress import ProgressLine, duration

    line = ProgressLine("score", every=10.0, workers=2)
    line.start(now=100.0)
    assert [line.tick(total=200, now=100.0 + t) for t in (1, 2, 3)] == [None, None, None]
    text = line.tick(total=200, now=112.0)  # 4 done in 12 s; this worker's share is 100
    assert text.endswith("4 inputs done, 0.3 inputs/s; 200 listed for 2 workers, ETA 4m48s")
    assert ProgressLine("ingest", enabled=False, every=0).tick(total=5) is None
    assert (duration(42), duration(185), duration(7620)) == ("42s", "3m05s", "2h07m")
