"""`ingest --append`: an unchanged file is kept by its listing (uri + fingerprint) without being opened, a new one is
added in shards of its own, a changed one supersedes its records (and keeps its split), a moved one is trained once;
the set's manifest is joined inside the pipeline; the trainer reads the set's current records, each once."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import imaging, ingest, schema
from pipelines.ingest_append import AppendError
from tests.image_factory import encode_array, make_random_image
from tests.test_score_incremental import OpenedFiles, flattens_before_writers, side_input_producers

FRACTIONS = "0.5,0.5,0"  # two splits of even odds: a changed file's new content lands in the other split half the time


def write_image(path: str, seed: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode_array(make_random_image(40, 56, 3, seed=seed), "PNG"))
    return path


def make_archive(root: str) -> dict:
    """root/photo/p<i>.png and root/document/d<i>.png, three of each: {name: path}."""
    return {f"{c[0]}{i}": write_image(os.path.join(root, c, f"{c[0]}{i}.png"), 10 * k + i)
            for k, c in enumerate(("photo", "document")) for i in range(3)}


def run_ingest(archive: str, output: str, *flags: str, graphs=None) -> dict:
    extend = (lambda outputs: graphs.append(outputs["records"].pipeline.to_runner_api())) if graphs is not None \
        else None
    return ingest.run(["--input", archive, "--output", output, *flags], test_pipeline=TestPipeline(),
                      extend_pipeline=extend)


@pytest.fixture()
def first_run(tmp_path):
    """An archive of six labelled images and a first ingest of it: (archive, {name: path}, output)."""
    archive, output = str(tmp_path / "archive"), str(tmp_path / "set")
    paths = make_archive(archive)
    summary = run_ingest(archive, output, "--size", "32", "--split-fractions", FRACTIONS)
    assert summary["counts"]["records"] == 6 and summary["counts"]["reconciled"]
    return archive, paths, output


def shard_files(output: str) -> dict:
    """{shard file name: (bytes, mtime ns)}."""
    return {name: (os.stat(os.path.join(output, name)).st_size, os.stat(os.path.join(output, name)).st_mtime_ns)
            for name in os.listdir(output) if ".tfrecord" in name}


def manifest_rows(output: str) -> list:
    return pq.read_table(os.path.join(output, "manifest.parquet")).to_pylist()


def trained_records(output: str) -> list:
    """(source uri, sha256, split) of every record the trainer's input reads, over all splits."""
    from trainer import input as train_input

    keys = (schema.SOURCE_URI, schema.SHA256)
    shards = {split: train_input.list_shards(output, split) for split in schema.SPLITS}
    return sorted((uri.decode(), sha.decode(), split) for split, files in shards.items() if files
                  for batch in train_input._label_fields(files, keys)
                  for uri, sha in zip(batch[schema.SOURCE_URI], batch[schema.SHA256]))


def split_counts(output: str) -> dict:
    """The trainer's record count per split (count_split: from the manifest when it vouches for the shards)."""
    from trainer import input as train_input
    from trainer.config import TrainConfig

    cfg = TrainConfig(data=output, job_dir="/unused", backbone="tiny", weights="none", image_size=32, batch_size=4)
    return {split: train_input.count_split(output, split, cfg).records for split in schema.SPLITS}


def test_an_unchanged_archive_appends_nothing_and_opens_no_file(first_run, monkeypatch):
    archive, _, output = first_run
    shards, rows = shard_files(output), manifest_rows(output)
    opened = OpenedFiles(monkeypatch, archive)
    graphs = []

    summary = run_ingest(archive, output, "--append", graphs=graphs)

    counts = summary["counts"]
    assert opened.paths == [] and (counts["files_read"], counts["bytes_read"]) == (0, 0)
    assert counts["inputs"] == counts["inputs_reused_by_listing"] == 6 and counts["known_rows"] == 6
    assert (counts["inputs_ingested"], counts["records_added"], counts["inputs_failed"]) == (0, 0, 0)
    assert counts["reconciled"] and summary["shard_tag"] == "a0001"
    assert shard_files(output) == shards  # no shard written, none rewritten
    key = lambda r: (r["source_uri"], r["augment_index"])  # noqa: E731
    assert sorted(manifest_rows(output), key=key) == sorted(rows, key=key)
    # The manifest is read by the workers and joined by key: no side input is built from it (the join's only one is
    # the progress line's count of the files to read).
    producers = side_input_producers(graphs[0], "Ingest/")
    from_join = {name for name in producers if name.startswith("Ingest/JoinEarlier/")}
    assert from_join and all("/Progress/" in name for name in from_join), from_join
    names = {t.unique_name for t in graphs[0].components.transforms.values()}
    assert {"Ingest/JoinEarlier/ReadDeciding", "Ingest/JoinEarlier/JoinByUri", "Ingest/JoinEarlier/JoinMoved",
            "Ingest/JoinEarlier/RewriteManifest"} <= names
    # The kept rows stream into the manifest's part files; the listing crosses one shuffle, the join's.
    assert flattens_before_writers(graphs[0], "Manifest") == set()
    assert not any(name.startswith("Ingest/Distribute") for name in names)


def test_new_files_go_into_shards_of_their_own_and_the_trainer_reads_every_record_once(first_run, monkeypatch):
    archive, paths, output = first_run
    shards = shard_files(output)
    new = [write_image(os.path.join(archive, "photo", "p9.png"), 90),
           write_image(os.path.join(archive, "document", "d9.png"), 91)]
    opened = OpenedFiles(monkeypatch, archive)

    summary = run_ingest(archive, output, "--append")

    counts = summary["counts"]
    assert sorted(opened.paths) == ["d9.png", "p9.png"] and counts["files_read"] == 2
    assert (counts["inputs"], counts["inputs_reused_by_listing"], counts["inputs_ingested"]) == (8, 6, 2)
    assert counts["records_added"] == 2 and counts["records"] == 8 and counts["reconciled"]
    after = shard_files(output)
    assert {name: after[name] for name in shards} == shards  # the earlier shards untouched
    added = sorted(set(after) - set(shards))
    assert added and all(name.split("-")[1] == "a0001" for name in added), added
    assert json.load(open(os.path.join(output, "run.json")))["shard_bytes"].keys() == after.keys()
    labels = json.load(open(os.path.join(output, "labels.json")))["classes"]
    by_uri = {r["source_uri"]: r for r in manifest_rows(output)}
    assert {by_uri[p]["label_name"] for p in new} == {"photo", "document"}
    assert all(by_uri[p]["label_index"] == labels.index(by_uri[p]["label_name"]) for p in new)
    assert all(by_uri[p]["shard"] in added for p in new)
    trained = trained_records(output)
    assert [uri for uri, _, _ in trained] == sorted(list(paths.values()) + new)  # old + new, each once
    assert sum(split_counts(output).values()) == 8


def in_row_groups(output: str, rows: int) -> None:
    """Rewrite the set's manifest in row groups of `rows` rows (its footer's tag kept): the joins name each row by its
    row group and row, and the manifest is rewritten a span of row groups at a time."""
    manifest = os.path.join(output, "manifest.parquet")
    pq.write_table(pq.read_table(manifest), manifest, row_group_size=rows)
    assert pq.ParquetFile(manifest).num_row_groups == -(-6 // rows)


@pytest.mark.parametrize("row_group", [None, 2])
def test_a_changed_file_supersedes_its_record_keeps_its_split_and_a_touched_one_is_kept(first_run, monkeypatch,
                                                                                        row_group):
    archive, paths, output = first_run
    if row_group:
        in_row_groups(output, row_group)
    before = {r["source_uri"]: r for r in manifest_rows(output)}
    changed, touched = paths["p0"], paths["d1"]
    old_split = before[changed]["split"]
    other = "val" if old_split == "train" else "train"
    seed = next(s for s in range(1000, 2000) if imaging.split_for(imaging.content_sha256(
        encode_array(make_random_image(40, 56, 3, seed=s), "PNG")), (0.5, 0.5, 0.0)) == other)
    write_image(changed, seed)  # new content whose own split would be the other one
    stat = os.stat(touched)
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new fingerprint

    summary = run_ingest(archive, output, "--append")

    counts = summary["counts"]
    assert (counts["files_read"], counts["inputs_reused_by_content"], counts["inputs_ingested"]) == (2, 1, 1)
    assert (counts["inputs_changed"], counts["records_superseded"], counts["records"]) == (1, 1, 6)
    assert counts["superseded_records"] == 1 and counts["reconciled"]
    rows = manifest_rows(output)
    old = [r for r in rows if r["source_uri"] == changed and r["superseded"]]
    new = [r for r in rows if r["source_uri"] == changed and not r["superseded"]]
    assert [r["sha256"] for r in old] == [before[changed]["sha256"]] and len(new) == 1
    assert new[0]["sha256"] != before[changed]["sha256"] and new[0]["split"] == old_split
    assert new[0]["shard"].split("-")[1] == "a0001"
    kept = [r for r in rows if r["source_uri"] == touched]
    assert len(kept) == 1 and kept[0]["sha256"] == before[touched]["sha256"] and not kept[0]["superseded"]
    assert kept[0]["fingerprint"] != before[touched]["fingerprint"]  # known by its new listing from now on
    trained = trained_records(output)
    assert [(uri, sha) for uri, sha, _ in trained if uri == changed] == [(changed, new[0]["sha256"])]
    assert len(trained) == 6 and sum(split_counts(output).values()) == 6  # the stale record is never read

    opened = OpenedFiles(monkeypatch, archive)
    again = run_ingest(archive, output, "--append")
    assert opened.paths == [] and again["counts"]["inputs_reused_by_listing"] == 6
    assert again["shard_tag"] == "a0002" and trained_records(output) == trained
    assert again["counts"]["superseded_records"] == 1  # the row superseded before is rewritten as it was


@pytest.mark.parametrize("row_group", [None, 1])
def test_a_moved_file_is_trained_once_and_a_copy_is_a_record_of_its_own(first_run, row_group):
    archive, paths, output = first_run
    if row_group:
        in_row_groups(output, row_group)
    moved_to = os.path.join(archive, "photo", "renamed.png")
    os.rename(paths["p1"], moved_to)
    copied_to = os.path.join(archive, "document", "copy.png")
    shutil.copy(paths["d2"], copied_to)

    summary = run_ingest(archive, output, "--append")

    counts = summary["counts"]
    assert (counts["inputs"], counts["inputs_ingested"], counts["inputs_moved"]) == (7, 2, 1)
    assert counts["records_superseded"] == 1 and counts["records"] == 7 and counts["reconciled"]
    trained = [uri for uri, _, _ in trained_records(output)]
    assert paths["p1"] not in trained and trained.count(moved_to) == 1
    assert trained.count(paths["d2"]) == trained.count(copied_to) == 1
    by_uri = {r["source_uri"]: r for r in manifest_rows(output) if not r["superseded"]}
    assert by_uri[moved_to]["sha256"] != "" and by_uri[copied_to]["split"] == by_uri[paths["d2"]]["split"]


def test_a_deleted_file_keeps_its_records_unless_the_append_drops_removed_files(first_run):
    archive, paths, output = first_run
    os.remove(paths["d1"])

    kept = run_ingest(archive, output, "--append")
    assert kept["counts"]["inputs_removed"] == 0 and kept["counts"]["records"] == 6
    assert paths["d1"] in [uri for uri, _, _ in trained_records(output)]  # an append removes nothing it is not shown

    dropped = run_ingest(archive, output, "--append", "--drop-removed")

    counts = dropped["counts"]
    assert (counts["inputs"], counts["inputs_removed"], counts["records_superseded"]) == (5, 1, 1)
    assert counts["records"] == 5 and counts["files_read"] == 0 and counts["reconciled"]
    trained = [uri for uri, _, _ in trained_records(output)]
    assert paths["d1"] not in trained and len(trained) == 5
    assert "1 removed" in ingest.format_summary(dropped, output)
    with pytest.raises(SystemExit):  # only with --append
        ingest.parse_args(["--input", archive, "--output", output, "--drop-removed"])


def test_a_new_class_stops_the_append_with_exit_2_and_writes_nothing(first_run, capsys):
    archive, _, output = first_run
    write_image(os.path.join(archive, "map", "m0.png"), 70)
    before = {name: open(os.path.join(output, name), "rb").read() for name in os.listdir(output)}

    code = ingest.main(["--input", archive, "--output", output, "--append", "--direct_running_mode=in_memory"])

    assert code == 2
    err = capsys.readouterr().err
    assert "classes the set does not know: map" in err and "document, photo" in err
    assert {name: open(os.path.join(output, name), "rb").read() for name in os.listdir(output)} == before


def test_an_append_refuses_other_record_options_and_a_folder_no_run_finished(first_run, tmp_path):
    archive, _, output = first_run
    with pytest.raises(AppendError, match=r"--size 64 \(the set's: 32\)"):
        run_ingest(archive, output, "--append", "--size", "64")
    with pytest.raises(SystemExit):  # --append adds, --overwrite replaces
        run_ingest(archive, output, "--append", "--overwrite")
    os.rename(os.path.join(output, "run.json"), os.path.join(output, "run.json.off"))
    with pytest.raises(AppendError, match="no run.json"):
        run_ingest(archive, output, "--append")
    os.rename(os.path.join(output, "run.json.off"), os.path.join(output, "run.json"))

    # An append that died after renaming its shards into place, before its manifest: nothing names them. The trainer
    # refuses them; the next append removes them and goes on.
    from trainer import input as train_input

    shard = sorted(name for name in shard_files(output) if name.startswith("train-"))[0]
    stray = os.path.join(output, "train-a0001-00000-of-00001.tfrecord")
    shutil.copy(os.path.join(output, shard), stray)
    with pytest.raises(train_input.DataError, match="does not record the train shards train-a0001"):
        train_input.list_shards(output, "train")
    summary = run_ingest(archive, output, "--append")
    assert not os.path.exists(stray) and summary["shard_tag"] == "a0002" and summary["counts"]["records"] == 6


def test_a_set_from_before_the_fingerprint_column_is_read_once_and_kept_by_content(first_run):
    archive, _, output = first_run
    path = os.path.join(output, "manifest.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop(["fingerprint", "superseded"]).replace_schema_metadata(None), path)
    run_json = os.path.join(output, "run.json")
    recorded = json.load(open(run_json))
    recorded.pop("shard_tag")
    json.dump(recorded, open(run_json, "w"))

    summary = run_ingest(archive, output, "--append")

    counts = summary["counts"]
    assert (counts["files_read"], counts["inputs_reused_by_content"], counts["records_added"]) == (6, 6, 0)
    assert all(r["fingerprint"].startswith("local:") and r["superseded"] is False for r in manifest_rows(output))


def test_score_skip_known_given_the_manifest_skips_no_file_for_a_superseded_record():
    from pipelines.score.known import MANIFEST, KnownTable, known_row
    from pipelines.score.options import ModelInfo

    table, model = KnownTable("set/manifest.parquet", MANIFEST, ()), ModelInfo("m", 1)
    row = {"source_uri": "/a/p0.png", "page": 0, "sha256": "ab" * 32, "fingerprint": "local:1:2"}
    assert known_row(dict(row, superseded=False), table, model)["decision"] == "skipped"
    assert known_row(dict(row, superseded=True), table, model) is None  # its file has changed since


def test_files_that_failed_for_a_defect_of_their_bytes_stay_failed_unread_and_a_fixed_one_is_ingested(tmp_path,
                                                                                                    monkeypatch):
    archive, output = str(tmp_path / "archive"), str(tmp_path / "set")
    make_archive(archive)
    truncated = os.path.join(archive, "photo", "cut.png")
    with open(truncated, "wb") as f:
        f.write(encode_array(make_random_image(40, 56, 3, seed=99), "PNG")[:300])
    with open(os.path.join(archive, "document", "empty.png"), "wb"):
        pass
    first = run_ingest(archive, output, "--size", "32", "--split-fractions", FRACTIONS)
    assert first["counts"]["records"] == 6 and first["counts"]["errors"] == 2
    before = pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    opened = OpenedFiles(monkeypatch, archive)

    summary = run_ingest(archive, output, "--append")

    counts = summary["counts"]
    assert opened.paths == [] and (counts["files_read"], counts["bytes_read"]) == (0, 0)
    assert (counts["inputs"], counts["inputs_reused_by_listing"], counts["inputs_failed"]) == (8, 6, 2)
    assert counts["inputs_failed_before"] == 2 and counts["reconciled"] and counts["errors"] == 2
    assert "2 failed before and unchanged, unread" in ingest.format_summary(summary, output)
    after = pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    key = lambda r: (r["uri"], r["error_type"])  # noqa: E731
    assert sorted(map(key, after)) == sorted(map(key, before)) == \
        sorted([(truncated, "truncated"), (os.path.join(archive, "document", "empty.png"), "empty")])

    # The truncated file is uploaded again whole: it alone is read, and becomes a record; its error row goes.
    write_image(truncated, 99)
    summary = run_ingest(archive, output, "--append")
    assert opened.paths == ["cut.png"] and summary["counts"]["inputs_ingested"] == 1
    assert summary["counts"]["inputs_failed_before"] == 1 and summary["counts"]["records"] == 7
    assert [key(r)[1] for r in pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()] == ["empty"]
