"""run.json's input counts over big tables: distinct uris counted in parts (pipelines.score.summary), spilled to a
temporary folder when there are several, give exactly the counts one part in memory gives."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.score import summary
from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA


def _table(schema: pa.Schema, rows: list) -> pa.Table:
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table({name: pa.array(columns[name], schema.field(name).type) for name in schema.names})


@pytest.fixture()
def run_dir(tmp_path):
    """A score output of 600 files: 500 with results (every 50th has two pages; every 3rd reused), of which every
    20th also lost a page (an error row), and 100 that failed whole (two error rows each)."""
    results, errors = [], []
    for i in range(500):
        uri = f"/archive/box{i % 7}/scan{i:05d}.tif"
        for page in range(2 if i % 50 == 0 else 1):
            results.append({"uri": uri, "page": page, "decision": "ok", "reused": i % 3 == 0, "class_name": ""})
        if i % 20 == 0:
            errors.append({"uri": uri, "page": 2, "stage": "decode", "error_type": "corrupt", "message": "bad page"})
    for i in range(100):
        uri = f"/archive/failed/scan{i:05d}.jpg"
        errors += [{"uri": uri, "page": -1, "stage": stage, "error_type": "truncated", "message": "cut short"}
                   for stage in ("read", "decode")]
    pq.write_table(_table(RESULTS_SCHEMA, results), tmp_path / "results.parquet", row_group_size=64)
    pq.write_table(_table(ERRORS_SCHEMA, errors), tmp_path / "errors.parquet", row_group_size=64)
    return str(tmp_path)


def _counts(output: str, parts: int, folder: str) -> dict:
    results = summary._ResultsCounts(output, parts, folder)
    errors = summary._ErrorCounts(output, parts, folder)
    return dict(summary._input_counts(results, errors), rows=results.rows, error_rows=errors.rows)


def test_inputs_counted_in_spilled_parts_match_the_counts_of_one_part(run_dir, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    whole = _counts(run_dir, 1, str(spill))
    assert whole == {"ok": 500, "reused": 167, "failed": 100, "some_failed": 25, "rows": 510, "error_rows": 225}
    for parts in (2, 7, 64):
        assert _counts(run_dir, parts, str(spill)) == whole
        assert os.listdir(spill) == []  # each part's file is removed once it is counted


def test_a_table_larger_than_a_part_is_counted_in_parts(run_dir, monkeypatch):
    assert summary._table_rows(run_dir, "results.parquet") == 510
    assert summary._table_rows(run_dir, "missing.parquet") == 0
    seen = []
    original = summary._HashParts.__init__

    def recording(self, count, folder, name):
        seen.append(count)
        original(self, count, folder, name)

    monkeypatch.setattr(summary._HashParts, "__init__", recording)
    monkeypatch.setattr(summary, "ROWS_PER_PART", 100)
    results, errors, counts = summary.count_tables(run_dir)
    assert set(seen) == {6}  # ceil(510 / 100), the larger table's rows
    assert counts == {"ok": 500, "reused": 167, "failed": 100, "some_failed": 25}
    assert (results.rows, errors.rows) == (510, 225)


def test_the_larger_table_sets_the_parts_and_the_spill_folder_goes_away(tmp_path, monkeypatch):
    """An errors table larger than the results (a night where most files failed) sets the part count, and
    count_tables leaves nothing in the temporary folder."""
    errors = [{"uri": f"/archive/failed/scan{i:05d}.jpg", "page": -1, "stage": "read", "error_type": "truncated",
               "message": "cut short"} for i in range(1000)]
    pq.write_table(_table(ERRORS_SCHEMA, errors), tmp_path / "errors.parquet", row_group_size=64)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(summary.tempfile, "tempdir", str(temp))
    monkeypatch.setattr(summary, "ROWS_PER_PART", 100)
    seen = []
    original = summary._HashParts.__init__

    def recording(self, count, folder, name):
        seen.append((count, os.path.dirname(folder) == str(temp)))
        original(self, count, folder, name)

    monkeypatch.setattr(summary._HashParts, "__init__", recording)
    results, _, counts = summary.count_tables(str(tmp_path))
    assert set(seen) == {(10, True)}  # ceil(1,000 / 100) parts, spilled under the temporary folder
    assert counts == {"ok": 0, "reused": 0, "failed": 1000, "some_failed": 0} and results.rows == 0
    assert os.listdir(temp) == []
