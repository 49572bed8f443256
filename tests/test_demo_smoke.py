"""A smoke run of `archive-vision demo` with the tiny random backbone (the real demo runs in CI via `make demo`)."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from archive_vision import demo, sample_archive


def test_sample_archive_is_deterministic_and_knows_its_turns(tmp_path):
    first = sample_archive.build_sample_archive(str(tmp_path / "a"), photo_variants=1, documents=3)
    second = sample_archive.build_sample_archive(str(tmp_path / "b"), photo_variants=1, documents=3)
    assert len(first.files) == len(second.files) and len(first.corrupt) == 3
    for one, two in zip(first.files, second.files):
        assert one["orientation"] == two["orientation"]
        with open(one["uri"], "rb") as f, open(two["uri"], "rb") as g:
            assert f.read() == g.read()
    assert first.rotated and all(f["orientation"] in (0, 90, 180, 270) for f in first.files)


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code = demo.main(["--output", out, "--backbone", "tiny", "--weights", "none", "--documents", "4",
                      "--photo-variants", "1", "--epochs", "1", "--image-size", "64", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "turned images found:" in printed and os.path.exists(os.path.join(out, "score", "report.html"))
    with open(os.path.join(out, "demo.json")) as f:
        result = json.load(f)
    assert result["problems"] == [] and result["outcome"]["turned_on_purpose"] > 0
    rows = pq.read_table(os.path.join(out, "score", "results.parquet")).num_rows
    errors = pq.read_table(os.path.join(out, "score", "errors.parquet")).num_rows
    assert (rows, errors) == (len(rows_truth(out)), 3)  # every good image scored, every corrupt one an error


def rows_truth(out: str):
    import csv

    with open(os.path.join(out, "truth.csv"), newline="") as f:
        return [int(r["orientation"]) for r in csv.DictReader(f)]
