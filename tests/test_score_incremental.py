"""Incremental score runs (--skip-known): an unchanged file is reused by its listing (uri + fingerprint) without being
opened, a touched or moved one by its content hash once read, a changed one is scored again; the earlier table is
joined inside the pipeline (no side input built from it) and run.json says what was read."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines import imaging, score, sources
from pipelines.tables import MANIFEST_SCHEMA
from serving import export
from tests import score_fixtures as sf
from tests.test_serving_export import limit_tf_threads

limit_tf_threads()
TURNS = {"a": 0, "b": 90, "c": 180}


@pytest.fixture(scope="module")
def model_bases(tmp_path_factory):
    """Version 3 and version 4 of the red-corner model, in two export bases."""
    bases = {}
    for version in (3, 4):
        base = str(tmp_path_factory.mktemp(f"export{version}"))
        export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                            version=version)
        bases[version] = base
    return bases


class OpenedFiles:
    """Records every archive file score or ingest opens (FileSystems.open is how both read inputs; runs are
    in-process)."""

    def __init__(self, monkeypatch, archive: str):
        self.paths = []
        original = FileSystems.open  # a staticmethod

        def recording_open(path, *args, **kwargs):
            if os.path.abspath(path).startswith(archive + os.sep):
                self.paths.append(os.path.basename(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(FileSystems, "open", staticmethod(recording_open))


def run_score(archive, output, model_base, known=None, graphs=None):
    args = ["--input", archive, "--output", output, "--model", model_base, "--no-report"]
    if known:
        args += ["--skip-known", known]
    extend = (lambda outputs: graphs.append(outputs["results"][0].pipeline.to_runner_api())) if graphs is not None \
        else None
    return score.run(args, test_pipeline=TestPipeline(), extend_pipeline=extend)


def rows_by_name(output):
    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    return {os.path.basename(r["uri"]): r for r in rows}


@pytest.fixture()
def first_run(tmp_path, model_bases):
    """An archive of three turned images and a first run over it (version 3): (archive, its results.parquet)."""
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, TURNS)
    output = str(tmp_path / "run1")
    summary = run_score(archive, output, model_bases[3])
    assert summary["counts"]["files_read"] == 3 and summary["counts"]["pages_scored"] == 3
    assert summary["counts"]["models_loaded"] >= 1
    return archive, os.path.join(output, "results.parquet")


def side_input_producers(proto, under: str) -> set:
    """The names of the steps producing the side inputs of the steps `under` a composite of the pipeline `proto`
    (the table writes have Beam's own side inputs: the files each bundle wrote)."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    transforms = proto.components.transforms
    producer = {pcoll: t.unique_name for t in transforms.values() if not t.subtransforms
                for pcoll in t.outputs.values()}
    names = set()
    for t in transforms.values():
        if t.spec.urn == common_urns.primitives.PAR_DO.urn and t.unique_name.startswith(under):
            payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            names.update(producer[t.inputs[local]] for local in payload.side_inputs)
    return names


def flattens_before_writers(proto, table: str) -> set:
    """The Flatten steps whose output a table writer (`Write<Table>`) takes rows from directly: none, if its rows
    are to stream into part files where they are made (the DirectRunner holds a Flatten's inputs whole in its
    launcher)."""
    from apache_beam.portability import common_urns

    transforms = proto.components.transforms
    producer = {pcoll: t for t in transforms.values() if not t.subtransforms for pcoll in t.outputs.values()}
    writers = [t for t in transforms.values() if t.unique_name.startswith(f"Write{table}/WriteParts")
               and not t.subtransforms]
    assert writers, f"no Write{table}/WriteParts step"
    return {producer[pcoll].unique_name for t in writers for pcoll in t.inputs.values()
            if producer[pcoll].spec.urn == common_urns.primitives.FLATTEN.urn}


def test_an_unchanged_archive_is_reused_whole_without_opening_a_file(tmp_path, model_bases, first_run, monkeypatch):
    archive, known = first_run
    before = rows_by_name(os.path.dirname(known))
    opened = OpenedFiles(monkeypatch, archive)
    graphs = []

    summary = run_score(archive, str(tmp_path / "run2"), model_bases[3], known, graphs)

    counts = summary["counts"]
    assert (counts["files_read"], counts["bytes_read"]) == (0, 0) and opened.paths == []
    assert counts["inputs_reused_by_listing"] == 3 and counts["inputs_reused_by_content"] == 0
    assert counts["inputs"] == counts["inputs_reused"] == 3 and counts["pages_scored"] == 0
    assert counts["known_rows"] == 3 and counts["reconciled"]
    assert counts["models_loaded"] == 0  # nothing to score: no worker loads the model
    after = rows_by_name(str(tmp_path / "run2"))
    assert all(r["reused"] for r in after.values())
    ignore = {"reused"}
    assert {n: {k: v for k, v in r.items() if k not in ignore} for n, r in after.items()} == \
        {n: {k: v for k, v in r.items() if k not in ignore} for n, r in before.items()}
    assert all(r["fingerprint"].startswith("local:") for r in after.values())
    # The earlier table is read by the pipeline and joined by key: the only side inputs are the progress line's count
    # and the fixed-size filters of this run's keys (the listing's; the contents read, none: no earlier row crosses
    # the join by content).
    producers = side_input_producers(graphs[0], "ScoreArchive/")
    assert producers and all(name.split("/")[1] in ("Progress", "ListingFilter", "ContentFilter")
                             for name in producers), producers
    assert (counts["known_rows_by_listing"], counts["known_rows_by_content"]) == (3, 0)
    names = {t.unique_name for t in graphs[0].components.transforms.values()}
    assert {"ScoreArchive/Known/References", "ScoreArchive/JoinByListing", "ScoreArchive/JoinByContent",
            "ScoreArchive/ReusedRows/GroupBySpan"} <= names
    # The reused rows stream into the results' part files; the listing crosses one shuffle, the join's.
    assert flattens_before_writers(graphs[0], "Results") == set()
    assert not any(name.startswith("ScoreArchive/Distribute") for name in names)


def test_a_touched_file_is_read_once_reused_by_content_and_then_known_by_its_new_listing(tmp_path, model_bases,
                                                                                         first_run, monkeypatch):
    archive, known = first_run
    touched = os.path.join(archive, "b.png")
    info = os.stat(touched)
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))
    opened = OpenedFiles(monkeypatch, archive)

    summary = run_score(archive, str(tmp_path / "run2"), model_bases[3], known)

    counts = summary["counts"]
    assert opened.paths == ["b.png"]
    assert (counts["files_read"], counts["bytes_read"]) == (1, os.path.getsize(touched))
    assert (counts["inputs_reused_by_listing"], counts["inputs_reused_by_content"]) == (2, 1)
    assert counts["pages_scored"] == 0 and counts["reconciled"]
    assert counts["known_rows_by_content"] == 1  # of the 3 earlier rows, only the read file's content's
    rows = rows_by_name(str(tmp_path / "run2"))
    assert rows["b.png"]["reused"] and rows["b.png"]["orientation_degrees"] == 90
    assert rows["b.png"]["fingerprint"] == sources.local_fingerprint(os.stat(touched))
    # The next night knows it by its new listing: nothing is read. Given both earlier tables (a pattern), a file
    # they both hold still gets one row per page.
    third = run_score(archive, str(tmp_path / "run3"), model_bases[3], str(tmp_path / "run[12]" / "results.parquet"))
    assert third["counts"]["bytes_read"] == 0 and third["counts"]["inputs_reused_by_listing"] == 3
    assert third["counts"]["known_rows"] == 6 and third["counts"]["results"] == 3


def test_a_changed_file_is_scored_again_and_a_moved_one_reused(tmp_path, model_bases, first_run):
    archive, known = first_run
    changed = os.path.join(archive, "b.png")
    sf.write_turned_archive(archive, {"b": 270})  # new content under the old name
    os.rename(os.path.join(archive, "c.png"), os.path.join(archive, "moved_c.png"))

    summary = run_score(archive, str(tmp_path / "run2"), model_bases[3], known)

    rows = rows_by_name(str(tmp_path / "run2"))
    assert set(rows) == {"a.png", "b.png", "moved_c.png"}
    assert not rows["b.png"]["reused"] and rows["b.png"]["orientation_degrees"] == 270
    assert rows["moved_c.png"]["reused"] and rows["moved_c.png"]["orientation_degrees"] == 180
    counts = summary["counts"]
    assert (counts["inputs_reused_by_listing"], counts["inputs_reused_by_content"], counts["pages_scored"]) == (1, 1, 1)
    assert counts["files_read"] == 2
    assert counts["bytes_read"] == os.path.getsize(changed) + os.path.getsize(os.path.join(archive, "moved_c.png"))
    assert counts["reconciled"] and counts["inputs"] == 3


def test_reused_rows_are_read_back_from_the_right_row_of_each_row_group_of_each_table(tmp_path, model_bases,
                                                                                       first_run):
    """The joins carry where each earlier row is (file, row group, row); the rows reused are read back from there.
    Earlier tables in one-row and two-row groups, across two files of a pattern, each led by rows that may not be
    reused (another model version) or are of files gone (they still count in the positions), give back exactly the
    first run's rows."""
    archive, known = first_run
    table = pq.read_table(known).sort_by([("uri", "descending")])
    stale = table.slice(0, 1).set_column(table.schema.get_field_index("model_version"), "model_version",
                                         pa.array([99], pa.int64()))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    pq.write_table(pa.concat_tables([stale, table.slice(0, 2)]), str(earlier / "night1.parquet"), row_group_size=1)
    gone = table.set_column(table.schema.get_field_index("uri"), "uri",
                            pa.array([f"/gone/{i}.png" for i in range(3)]))  # files no longer listed
    pq.write_table(pa.concat_tables([stale, gone, stale, table.slice(2)]), str(earlier / "night2.parquet"),
                   row_group_size=2)

    summary = run_score(archive, str(tmp_path / "run2"), model_bases[3], str(earlier / "*.parquet"))

    counts = summary["counts"]
    assert counts["inputs_reused_by_listing"] == 3 and counts["files_read"] == 0
    # The rows of files gone are known, but none of them crosses the join (the listing's KeyFilter).
    assert (counts["known_rows"], counts["known_rows_by_listing"]) == (6, 3)
    before, after = rows_by_name(os.path.dirname(known)), rows_by_name(str(tmp_path / "run2"))
    assert {n: dict(r, reused=False) for n, r in after.items()} == before and all(r["reused"] for r in after.values())


def test_the_key_filter_holds_every_key_and_lets_few_others_through():
    import hashlib

    from pipelines.score.known import KeyFilter, may_hold, listing_digest

    def sha(i):
        return hashlib.sha256(str(i).encode()).hexdigest()

    combine = KeyFilter()
    halves = [combine.create_accumulator(), combine.create_accumulator()]
    for i in range(20_000):
        combine.add_input(halves[i % 2], sha(i))
    contents = combine.extract_output(combine.merge_accumulators(halves))
    assert len(contents) == 1 << 20  # 1 MB, however many keys
    assert all(may_hold(contents, sha(i)) for i in range(20_000))
    others = sum(may_hold(contents, sha(i)) for i in range(20_000, 120_000))
    assert others <= 2  # about 1e-8 of them expected
    one = combine.extract_output(combine.add_input(combine.create_accumulator(), listing_digest("/a/b.png", "l:1")))
    assert may_hold(one, listing_digest("/a/b.png", "l:1")) and not may_hold(one, listing_digest("/a/b.png", "l:2"))
    nothing = combine.extract_output(combine.merge_accumulators([combine.create_accumulator()]))
    assert not any(may_hold(nothing, sha(i)) for i in range(1000))


def test_a_known_table_rewritten_during_the_run_stops_it_instead_of_copying_other_rows(tmp_path, first_run):
    """The references name rows by position: a table rewritten between the joins and the copy (another job's
    write) would hand a file another file's row, so the run stops and says why."""
    from pipelines.score.known import _FetchRowsFn, inspect_known, pack_ref
    from pipelines.tables import TableChanged, check_unchanged

    _, known = first_run
    table = inspect_known(known)
    model = score.ModelInfo("archive_vision", 3)
    rows = pq.read_table(known)
    fetch = _FetchRowsFn(table, model)
    asked = [(0, 1, 0, "", "")]  # (row group, row, page, uri, fingerprint)
    assert [r["sha256"] for r in fetch.process(((0, 0), asked))] == [rows.column("sha256")[1].as_py()]
    with pytest.raises(TableChanged, match="not the row this run joined"):
        list(fetch.process(((0, 0), [(0, 1, 2, "", "")])))  # the reference said page 2
    with pytest.raises(TableChanged, match="not there now"):
        list(fetch.process(((0, 0), [(0, 99, 0, "", "")])))
    pq.write_table(rows.slice(0, 2), known)  # rewritten since the run was built
    with pytest.raises(TableChanged, match="changed during the run"):
        check_unchanged(table.files[0])
    with pytest.raises(TableChanged):
        list(fetch.process(((0, 0), [(0, 2, 0, "", "")])))
    assert pack_ref(1, 0, -1, 5) > pack_ref(0, 7, 3, 9)  # references sort by page first


def test_a_table_is_read_in_spans_of_row_groups_each_row_named_by_its_group_and_place(tmp_path):
    """span_rows: every row once, named (row group, row), across spans of GROUPS_PER_SPAN groups and across the
    batches of a row group larger than one batch; with `wanted`, exactly those rows."""
    from pipelines.tables import GROUPS_PER_SPAN, ROWS_PER_BATCH, row_group_spans, span_of, span_rows

    many, big = str(tmp_path / "many.parquet"), str(tmp_path / "big.parquet")
    rows = 5000
    table = pa.table({"n": list(range(rows)), "s": [f"row {i}" for i in range(rows)]})
    pq.write_table(table, many, row_group_size=100)  # 50 row groups: two spans
    pq.write_table(table, big, row_group_size=rows)  # one row group, three batches
    spans = row_group_spans(many)
    assert spans == [(0, GROUPS_PER_SPAN), (GROUPS_PER_SPAN, 50)] and span_of(40) == GROUPS_PER_SPAN
    read = [(g, p, r["n"]) for first, end in spans for g, p, r in span_rows(many, first, end, ["n"])]
    assert read == [(i // 100, i % 100, i) for i in range(rows)]
    assert [(g, p, r["n"]) for g, p, r in span_rows(big, 0, 1, ["n"])] == [(0, i, i) for i in range(rows)]
    edges = [0, ROWS_PER_BATCH - 1, ROWS_PER_BATCH, rows - 1]
    assert [(p, r["s"]) for _, p, r in span_rows(big, 0, 1, ["s"], {0: edges})] == [(i, f"row {i}") for i in edges]
    assert [r["n"] for _, _, r in span_rows(many, 32, 50, ["n"], {40: [7], 33: [0, 99]})] == [3300, 3399, 4007]


def test_results_of_another_model_version_reuse_nothing(tmp_path, model_bases, first_run):
    archive, known = first_run
    summary = run_score(archive, str(tmp_path / "run2"), model_bases[4], known)
    counts = summary["counts"]
    assert counts["known_rows"] == 0 and counts["inputs_reused"] == 0 and counts["pages_scored"] == 3
    assert counts["files_read"] == 3 and counts["reconciled"]
    assert {r["model_version"] for r in rows_by_name(str(tmp_path / "run2")).values()} == {4}


def test_a_table_from_before_the_fingerprint_column_reuses_by_content(tmp_path, model_bases, first_run):
    archive, known = first_run
    old = str(tmp_path / "old_results.parquet")
    pq.write_table(pq.read_table(known).drop(["fingerprint"]), old)

    summary = run_score(archive, str(tmp_path / "run2"), model_bases[3], old)

    counts = summary["counts"]
    assert (counts["inputs_reused_by_listing"], counts["inputs_reused_by_content"]) == (0, 3)
    assert counts["files_read"] == 3 and counts["pages_scored"] == 0 and counts["reconciled"]
    rows = rows_by_name(str(tmp_path / "run2"))
    assert {n: r["orientation_degrees"] for n, r in rows.items()} == {"a.png": 0, "b.png": 90, "c.png": 180}
    assert all(r["fingerprint"].startswith("local:") for r in rows.values())  # recorded now, for the next run


def test_a_results_csv_is_joined_the_same_way(tmp_path, model_bases, first_run):
    archive, known = first_run
    summary = run_score(archive, str(tmp_path / "run2"), model_bases[3], known.replace(".parquet", ".csv"))
    assert summary["counts"]["inputs_reused_by_listing"] == 3 and summary["counts"]["bytes_read"] == 0
    before, after = rows_by_name(os.path.dirname(known)), rows_by_name(str(tmp_path / "run2"))
    for name, row in after.items():
        assert row["orientation_probabilities"] == pytest.approx(before[name]["orientation_probabilities"], abs=1e-5)
        assert row["sha256"] == before[name]["sha256"] and row["reused"]


def test_an_ingest_manifest_marks_its_files_skipped_once_per_page(tmp_path, model_bases):
    archive = str(tmp_path / "archive")
    paths = sf.write_turned_archive(archive, {"known": 0, "new": 90})
    sha = imaging.content_sha256(open(paths["known"], "rb").read())
    rows = [{name: None for name in MANIFEST_SCHEMA.names} for _ in range(2)]
    for augment, row in enumerate(rows):  # an augmented copy of the same page: one skipped row
        row.update(source_uri="/elsewhere/known.png", page=0, augment_index=augment, sha256=sha, format="png",
                   original_width=64, original_height=48, exif_orientation=1, shard="train-00000")
    manifest = str(tmp_path / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rows, MANIFEST_SCHEMA), manifest)

    summary = run_score(archive, str(tmp_path / "run"), model_bases[3], manifest)

    out = rows_by_name(str(tmp_path / "run"))
    assert (out["known.png"]["decision"], out["known.png"]["reused"]) == ("skipped", True)
    assert out["known.png"]["uri"] == paths["known"] and out["known.png"]["width"] == 64
    assert not out["new.png"]["reused"] and out["new.png"]["orientation_degrees"] == 90
    assert summary["counts"]["results"] == 2 and summary["counts"]["reconciled"]


def test_a_missing_or_hashless_known_table_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--skip-known"):
        score.inspect_known(str(tmp_path / "nope.parquet"))
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"uri": ["x"]}), bad)
    with pytest.raises(ValueError, match="no sha256 column"):
        score.inspect_known(bad)


def test_files_that_failed_for_a_defect_of_their_bytes_are_not_read_again_until_they_change(tmp_path, model_bases,
                                                                                           monkeypatch):
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, TURNS)
    bad = sf.write_bad_files(archive)  # empty, truncated, not an image
    first = run_score(archive, str(tmp_path / "run1"), model_bases[3])
    assert first["counts"]["inputs_failed"] == 3 and first["counts"]["reconciled"]
    errors = pq.read_table(str(tmp_path / "run1" / "errors.parquet")).to_pylist()
    assert all(e["fingerprint"].startswith("local:") for e in errors)  # defects of the bytes carry their fingerprint
    opened = OpenedFiles(monkeypatch, archive)

    again = run_score(archive, str(tmp_path / "run2"), model_bases[3], str(tmp_path / "run1" / "results.parquet"))

    counts = again["counts"]
    assert opened.paths == [] and (counts["files_read"], counts["bytes_read"]) == (0, 0)
    assert (counts["inputs"], counts["inputs_ok"], counts["inputs_failed"]) == (6, 3, 3) and counts["reconciled"]
    assert counts["inputs_failed_before"] == 3 and counts["inputs_reused_by_listing"] == 3
    kept = pq.read_table(str(tmp_path / "run2" / "errors.parquet")).to_pylist()
    assert sorted((e["uri"], e["error_type"], e["message"]) for e in kept) == \
        sorted((e["uri"], e["error_type"], e["message"]) for e in errors)
    assert {e["uri"]: e["error_type"] for e in kept} == bad
    assert "failed before and unchanged 3" in score.format_summary(again)

    # Both earlier runs given as one pattern: each failure is kept once, not once per table that holds it.
    both = run_score(archive, str(tmp_path / "both"), model_bases[3], str(tmp_path / "run?" / "results.parquet"))
    assert both["counts"]["errors"] == 3 and both["counts"]["inputs_failed_before"] == 3 and opened.paths == []

    # The truncated file is uploaded again whole: it alone is read, and scored.
    fixed = next(path for path, kind in bad.items() if kind == "truncated")
    with open(fixed, "wb") as f:
        f.write(imaging_png(270))  # content no earlier row has
    third = run_score(archive, str(tmp_path / "run3"), model_bases[3], str(tmp_path / "run2" / "results.parquet"))
    assert opened.paths == [os.path.basename(fixed)]
    assert (third["counts"]["inputs_ok"], third["counts"]["inputs_failed"]) == (4, 2)
    assert third["counts"]["inputs_failed_before"] == 2 and third["counts"]["pages_scored"] == 1


def imaging_png(degrees: int) -> bytes:
    from tests.image_factory import encode_array

    return encode_array(sf.turned(sf.make_asymmetric_image(), degrees), "PNG")


def upstream_steps(proto, name: str) -> set:
    """The leaf steps that feed the step `name` of the pipeline `proto` (itself included), side inputs too."""
    transforms = proto.components.transforms
    producer = {pcoll: t for t in transforms.values() if not t.subtransforms for pcoll in t.outputs.values()}
    start = next(t for t in transforms.values() if t.unique_name == name)
    seen, stack = set(), [start]
    while stack:
        step = stack.pop()
        if step.unique_name in seen:
            continue
        seen.add(step.unique_name)
        stack.extend(producer[pcoll] for pcoll in step.inputs.values() if pcoll in producer)
    return seen


@pytest.mark.parametrize("job", ["score", "ingest"])
def test_the_progress_total_is_counted_from_the_listing_before_its_reshuffle(tmp_path, model_bases, job):
    """The progress line's total comes from the listing itself, not from the entries after the Reshuffle that
    spreads them (a count of those made the DirectRunner hold every listed entry in its launcher)."""
    from pipelines import ingest

    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, TURNS)
    graphs = []
    if job == "score":
        run_score(archive, str(tmp_path / "out"), model_bases[3], graphs=graphs)
        prefix = "ScoreArchive"
    else:
        ingest.run(["--input", archive, "--output", str(tmp_path / "out")], test_pipeline=TestPipeline(),
                   extend_pipeline=lambda outputs: graphs.append(outputs["records"].pipeline.to_runner_api()))
        prefix = "Ingest"
    counting = [t.unique_name for t in graphs[0].components.transforms.values()
                if t.unique_name.startswith(f"{prefix}/Progress/CountInputs/") and not t.subtransforms]
    steps = set().union(*(upstream_steps(graphs[0], name) for name in counting))
    assert counting and f"{prefix}/ListArchive" in steps
    assert not any("/Distribute/" in step for step in steps), sorted(steps)


def test_a_file_whose_later_page_failed_is_read_again_for_its_other_pages(monkeypatch):
    """Only a failure of the whole file keeps its fingerprint (and so stands on the next incremental run); a file
    with pages done before one failed must be read again, or a new model version would never score those pages."""
    from pipelines.score.options import ScoreOptions

    entry = sources.SourceEntry(uri="/a/two_pages.tif", fingerprint="local:10:1")
    page = next(imaging.decode_pages(sf.encode_array(sf.make_asymmetric_image(), "PNG")))

    def one_page_then_a_truncated_one(data, **kwargs):
        yield page
        raise imaging.ImageError("truncated", "page 1 failed to decode", 1)

    fn = score.PrepareImagesFn(ScoreOptions(input="/a", output="/o"))
    monkeypatch.setattr(imaging, "decode_pages", one_page_then_a_truncated_one)
    outputs = list(fn.process({"entry": entry, "data": b"II*\x00", "sha256": "s"}))
    errors = [o.value for o in outputs if getattr(o, "tag", None) == "errors"]
    assert len(outputs) == 2 and len(errors) == 1
    assert errors[0]["error_type"] == "truncated" and errors[0]["fingerprint"] == ""

    def truncated_at_once(data, **kwargs):
        raise imaging.ImageError("truncated", "no page decodes")
        yield

    monkeypatch.setattr(imaging, "decode_pages", truncated_at_once)
    errors = [o.value for o in fn.process({"entry": entry, "data": b"II*\x00", "sha256": "s"})]
    assert [e["fingerprint"] for e in errors] == ["local:10:1"]
