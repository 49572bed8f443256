"""The score report: one self-contained page that headless Chromium renders with every contact sheet, and the
confusion matrices when the truth is known; plus the activation pictures."""
from __future__ import annotations

import collections
import csv
import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

from pipelines import report, score
from serving import export
from tests import score_fixtures as sf
from tests.image_factory import encode_array, make_asymmetric_image
from tests.test_serving_export import limit_tf_threads

limit_tf_threads()

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
TURNS = {"upright_a": 0, "upright_b": 0, "turned90": 90, "turned180": 180, "turned270": 270}


@pytest.fixture(scope="module")
def red_corner_export(tmp_path_factory):
    """Export v2 of the red-corner model (it really finds the turn of the asymmetric image)."""
    base = str(tmp_path_factory.mktemp("export"))
    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=2)
    return base


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, red_corner_export):
    """A score output over five turned asymmetric images and three bad files, with a truth manifest."""
    root = tmp_path_factory.mktemp("report")
    base = red_corner_export
    archive = str(root / "archive")
    sf.write_turned_archive(archive, TURNS)
    sf.write_bad_files(archive)
    truth = str(root / "truth.csv")
    with open(truth, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label", "orientation"])
        for name, degrees in TURNS.items():
            # One wrong label on purpose, so the class matrix has an off-diagonal cell.
            writer.writerow([f"archive/{name}.png", "photo" if name == "upright_b" else "document", degrees])
    output = str(root / "out")
    summary = score.run(["--input", archive, "--output", output, "--model", base, "--truth", truth],
                        test_pipeline=TestPipeline())
    return {"output": output, "summary": summary, "truth": truth, "archive": archive}


def test_score_writes_a_self_contained_report(scored_run):
    path = scored_run["summary"]["report"]
    assert path == os.path.join(scored_run["output"], "report.html")
    page = open(path, encoding="utf-8").read()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', page)
    assert page.count('class="thumb pair"') == 3  # the three auto_rotate images, before/after
    assert page.count('class="confusion"') == 2  # orientation and class matrices
    assert "8 inputs: 5 scored or reused, 3 failed, 0 reused; counts reconcile" in page  # the run.json just written
    # Orientation right per label of the truth, worst first, as run.json records it.
    by_label = scored_run["summary"]["truth"]["orientation"]["by_label"]
    assert {label: v["images"] for label, v in by_label.items()} == {"document": 4, "photo": 1}
    table = re.search(r'<table class="by-label">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=n>(\d+)</td><td class=n>([\d.]+)</td><td class=n>([\d.]+)"
                      r"</td></tr>", table)
    assert rows == [(label, str(v["images"]), f"{v['right'] / v['images']:.3f}", f"{v['at_least']:.4f}"[:-1])
                    for label, v in by_label.items()]  # in run.json's order: worst first


@pytest.fixture(scope="module")
def review_run(tmp_path_factory, red_corner_export):
    """A score output with every decision band and errors, at the default thresholds: one upright (ok), one turned
    (auto_rotate), two the model cannot call (review): a blank page, where every turn is equally likely, and the
    asymmetric image with red blocks in three corners, where three turns tie; plus three unreadable files."""
    archive = str(tmp_path_factory.mktemp("review_archive"))
    paths = sf.write_turned_archive(archive, {"upright": 0, "turned90": 90})
    bad = sf.write_bad_files(archive)
    blank = os.path.join(archive, "blank.png")
    with open(blank, "wb") as f:
        f.write(encode_array(np.full((120, 160, 3), 255, np.uint8), "PNG"))
    corners = make_asymmetric_image()
    corners[:40, -40:] = (255, 0, 0)
    corners[-40:, -40:] = (255, 0, 0)
    three_corners = os.path.join(archive, "three_corners.png")
    with open(three_corners, "wb") as f:
        f.write(encode_array(corners, "PNG"))
    output = str(tmp_path_factory.mktemp("review_out"))
    summary = score.run(["--input", archive, "--output", output, "--model", red_corner_export],
                        test_pipeline=TestPipeline())
    results, errors, _ = report.read_run(output)
    with open(summary["report"], encoding="utf-8") as f:
        page = f.read()
    return {"page": page, "results": {r["uri"]: r for r in results}, "errors": errors, "bad": bad,
            "review": [blank, three_corners], "ok": paths["upright"], "auto_rotate": paths["turned90"]}


def _section(page: str, section_id: str) -> str:
    """The page from <h2 id=section_id> to the next <h2> (or the end)."""
    start = page.index(f'<h2 id="{section_id}"')
    end = page.find("<h2 ", start + 1)
    return page[start:end if end >= 0 else len(page)]


def _figures(section: str) -> dict:
    """data-uri -> the figure's html, in page order."""
    return {html.unescape(uri): body for uri, body in
            re.findall(r'<figure class="thumb[^"]*" data-uri="([^"]+)">(.*?)</figure>', section, re.S)}


def _expected_guesses(probabilities, names) -> str:
    probs = np.asarray(probabilities, np.float64)
    return ", ".join(f"{names[i]} {probs[i]:.2f}" for i in np.argsort(-probs, kind="stable")[:3])


def _count_tables(page: str) -> dict:
    """{table heading: {key: count}} of the summary's count tables."""
    tables = {}
    for heading, body in re.findall(r'<table class="counts"><tr><th>([^<]+)</th><th>count</th></tr>(.*?)</table>',
                                    page, re.S):
        rows = re.findall(r"<tr><td>(?:<span[^>]*>)?([^<]+)(?:</span>)?</td><td class=n>(\d+)</td></tr>", body)
        tables[heading] = {key: int(count) for key, count in rows}
    return tables


def test_report_review_sheet_shows_each_uncertain_image_with_its_guesses_and_reason(review_run):
    page, results = review_run["page"], review_run["results"]
    assert [results[uri]["decision"] for uri in review_run["review"]] == ["review", "review"]
    section = _section(page, "review")
    figures = _figures(section)

    assert section.startswith('<h2 id="review">For a person to look at (2)</h2>')
    # Least sure first: the blank page (0.25 for every turn) before the three-corner image (about a third each).
    assert list(figures) == review_run["review"]
    for uri, figure in figures.items():
        row = results[uri]
        assert "<span class='pill review'>review</span>" in figure
        assert re.search(r'<img src="data:image/jpeg;base64,[^"]+" alt="review">', figure)  # a real thumbnail
        assert 'class="missing"' not in figure
        assert f"<i>{html.escape(row['review_reason'])}</i>" in figure
        turns = _expected_guesses(row["orientation_probabilities"], [f"{d}°" for d in report.ORIENTATION_NAMES])
        assert f"turn: {turns}<br>" in figure
        assert f"class: {html.escape(_expected_guesses(row['class_probabilities'], sf.CLASS_NAMES))}<br>" in figure
    blank, corners = (figures[uri] for uri in review_run["review"])
    # the blank page is also nearly blank to the graph's ink measure, and this model reads no text crops
    assert ("<i>orientation 0 confidence 0.25 &lt; 0.50; nearly blank (ink on 0.0%) and its text crops were not "
            "used</i>") in blank
    assert "turn: 0° 0.25, 90° 0.25, 180° 0.25" in blank and "class: photo 0.50, document 0.50" in blank
    assert re.search(r"<i>orientation (0|90|180) confidence 0\.3\d &lt; 0\.[58]0</i>", corners)
    assert "class: photo 0.98, document 0.02" in corners  # three red blocks: surely the red class
    # The other sheets do not show them, and the review sheet shows nothing else.
    for other in ("auto-rotate", "ok"):
        assert not set(_figures(_section(page, other))) & set(review_run["review"])
    assert list(_figures(_section(page, "auto-rotate"))) == [review_run["auto_rotate"]]
    assert list(_figures(_section(page, "ok"))) == [review_run["ok"]]


def test_report_lists_errors_and_counts_decisions_and_classes(review_run):
    page, results, errors = review_run["page"], review_run["results"], review_run["errors"]
    section = _section(page, "errors")
    rows = [re.findall(r"<td>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(<td>.*?)</tr>", section, re.S)]

    assert section.startswith('<h2 id="errors">Errors (3)</h2>')
    assert re.findall(r"<th>([^<]+)</th>", section) == ["uri", "page", "stage", "type", "message"]
    by_uri = {html.unescape(cells[0]): cells for cells in rows}
    assert set(by_uri) == set(review_run["bad"])
    for error in errors:
        cells = by_uri[error["uri"]]
        assert cells[3] == review_run["bad"][error["uri"]] == error["error_type"]
        assert html.unescape(cells[4]) == error["message"][:200] and error["message"]

    tables = _count_tables(_section(page, "summary"))
    assert tables["decision"] == {"ok": 1, "auto_rotate": 1, "review": 2}
    assert tables["class"] == dict(collections.Counter(r["class_name"] for r in results.values()))
    assert sum(tables["class"].values()) == 4 and set(tables["class"]) <= set(sf.CLASS_NAMES)
    assert tables["error"] == {"empty": 1, "truncated": 1, "unknown_format": 1}
    assert "7 inputs: 4 scored or reused, 3 failed, 0 reused; counts reconcile" in page


def test_truth_metrics_count_what_matched():
    results = [{"uri": "/a", "page": 0, "decision": "ok", "orientation_degrees": 0, "class_name": "photo"},
               {"uri": "/b", "page": 0, "decision": "auto_rotate", "orientation_degrees": 90, "class_name": "photo"},
               {"uri": "/c", "page": 0, "decision": "review", "orientation_degrees": 180, "class_name": "doc"}]
    truth = {("/a", 0): {"label": "photo", "orientation": 0}, ("/b", 0): {"label": "doc", "orientation": 270},
             ("/c", 0): {"label": "doc", "orientation": -1}}
    metrics = report.truth_metrics(results, truth)
    assert metrics["orientation"]["matrix"].tolist() == [[1, 0, 0, 0], [0] * 4, [0] * 4, [0, 1, 0, 0]]
    assert metrics["class"]["labels"] == ["doc", "photo"]
    assert metrics["class"]["matrix"].tolist() == [[1, 1], [0, 1]]


def _chromium(*args: str, user_dir: str, timeout: int = 90) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={user_dir}", *args]
    return subprocess.run(command, capture_output=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs the chromium package)")
def test_report_renders_in_headless_chromium(scored_run, tmp_path):
    url = "file://" + os.path.abspath(os.path.join(scored_run["output"], "report.html"))
    shot = str(tmp_path / "report.png")

    done = _chromium("--window-size=1200,1800", f"--screenshot={shot}", url, user_dir=str(tmp_path / "profile1"))
    dom = _chromium("--dump-dom", url, user_dir=str(tmp_path / "profile2"))

    assert done.returncode == 0 and os.path.exists(shot), done.stderr.decode(errors="replace")[-2000:]
    rendered = dom.stdout.decode("utf-8", errors="replace")
    assert "<title>archive-vision report:" in rendered
    assert rendered.count('class="thumb pair"') == 3
    assert len(re.findall(r"<figure", rendered)) == 5  # 3 turned + 2 upright (no review)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1800, 1200)
    background = pixels[5, 5]
    not_background = np.any(np.abs(pixels.astype(int) - background) > 30, axis=-1).mean()
    assert not_background > 0.03  # text, thumbnails and tables, not an empty page
    # The red blocks of the thumbnails and the orange auto_rotate pills really were drawn.
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 500


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs the chromium package)")
def test_review_sheet_renders_in_headless_chromium(review_run, tmp_path):
    path = str(tmp_path / "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(review_run["page"])

    dom = _chromium("--dump-dom", "file://" + path, user_dir=str(tmp_path / "profile"))

    rendered = _section(dom.stdout.decode("utf-8", errors="replace"), "review")
    assert list(_figures(rendered)) == review_run["review"], dom.stderr.decode(errors="replace")[-2000:]
    assert rendered.count("<i>orientation ") == 2 and rendered.count("turn: ") == 2


def test_report_command_rewrites_the_page(scored_run, tmp_path, capsys):
    os.remove(os.path.join(scored_run["output"], "report.html"))
    assert report.main([scored_run["output"], "--truth", scored_run["truth"], "--per-section", "1"]) == 0
    page = open(os.path.join(scored_run["output"], "report.html"), encoding="utf-8").read()
    assert page.count('class="thumb pair"') == 1 and "first 1 shown" in page
    printed = capsys.readouterr().out  # the truth figures, as score printed them, without scoring again
    truth = scored_run["summary"]["truth"]
    assert f"truth:  {report.truth_summary_line(truth)}\n" in printed
    assert [line.strip() for line in printed.splitlines()[2:]] == report.truth_label_lines(truth)
    # Against another manifest (here: only the upright images), the figures are that manifest's.
    upright = str(tmp_path / "upright.csv")
    with open(scored_run["truth"], newline="") as f, open(upright, "w", newline="") as g:
        rows = list(csv.reader(f))
        base = os.path.dirname(scored_run["truth"])  # its URIs are relative to its folder
        csv.writer(g).writerows([rows[0]] + [[os.path.join(base, r[0])] + r[1:] for r in rows[1:] if r[2] == "0"])
    assert report.main([scored_run["output"], "--truth", upright]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("truth:")]
    assert line and line[0].startswith("truth:  orientation ") and " right of 2 (" in line[0]
    assert line[0].endswith("; 3 of 5 results have no truth row")  # the turned images are not in this one
    page = open(os.path.join(scored_run["output"], "report.html"), encoding="utf-8").read()
    assert ('<p class="coverage">2 of 5 results have a truth row; 0 of 2 truth rows match no result' in page)


def test_activations_show_feature_maps_of_chosen_layers(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3), name="pixels")
    x = keras.layers.Conv2D(6, 3, name="early")(inputs)
    inner = keras.Sequential([keras.Input((30, 30, 6)), keras.layers.Conv2D(5, 3, name="late")], name="block")
    outputs = {"orientation_probabilities": keras.layers.Dense(4, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inner(x)))}
    path = str(tmp_path / "tiny.keras")
    keras.Model(inputs, outputs).save(path)
    image = str(tmp_path / "scan.png")
    sf.write_turned_archive(str(tmp_path), {"scan": 90})

    from trainer.activations import write_activations

    html_path = write_activations([image], str(tmp_path / "act"), model_path=path, layers=["early", "late"])

    page = open(html_path, encoding="utf-8").read()
    assert "early 30x30x6" in page and "late 28x28x5" in page
    strip = Image.open(os.path.join(tmp_path, "act", "scan.png.activations.png"))
    assert strip.height == 280 and strip.width > 4 * 280


def test_report_says_whose_decision_policy_the_run_used():
    run = {"policy": {"from": "gs://b/models/archive_vision/12", "decision_used": {"rotate_threshold": 0.95,
                                                                                  "ok_threshold": 0.5}}}
    told = report.build_report_html([], [], run, title="t")
    assert "decision policy: gs://b/models/archive_vision/12's; rotate at p >= 0.95, ok at p >= 0.5" in told
    assert "decision policy" not in report.build_report_html([], [], {"options": {}}, title="t")


def test_a_results_table_is_read_a_batch_at_a_time_and_shows_what_the_whole_table_would(tmp_path, monkeypatch):
    """ResultsDigest over a Parquet file read in batches of 7 rows shows the same rows as ranking and sampling the
    whole table at once would: the surest auto_rotate rows, the least sure review rows (nulls as 0, ties in table
    order), the seeded sample of ok rows, the counts; a table written before a column reads it as empty."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.tables import ERRORS_SCHEMA, RESULTS_SCHEMA

    rng = random.Random(5)
    rows = []
    for i in range(120):
        row = {name: None for name in RESULTS_SCHEMA.names}
        row.update(uri=f"/a/{i:03d}.png", page=i % 3, decision=rng.choice(["auto_rotate", "review", "ok", "ok"]),
                   class_name=rng.choice(["letter", "photo", ""]), class_id=rng.choice([0, 1, -1]),
                   orientation_confidence=rng.choice([None, 0.5, 0.75, 0.9, rng.random()]))
        rows.append(row)
    path = str(tmp_path / "results.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA).drop(["corrected_orientation"]), path)
    monkeypatch.setattr(report, "BATCH_ROWS", 7)

    digest = report.ResultsDigest(path, per_section=10, seed=3)

    def ranked(decision, descending):
        chosen = [(i, r) for i, r in enumerate(rows) if r["decision"] == decision]
        key = lambda item: (-(item[1]["orientation_confidence"] or 0.0) if descending  # noqa: E731
                            else (item[1]["orientation_confidence"] or 0.0), item[0])
        return [r["uri"] for _, r in sorted(chosen, key=key)[:10]]

    assert [r["uri"] for r in digest.auto_rows] == ranked("auto_rotate", True)
    assert [r["uri"] for r in digest.review_rows] == ranked("review", False)
    ok = [r for r in rows if r["decision"] == "ok"]
    picked = random.Random(3).sample(range(len(ok)), 10)
    assert [r["uri"] for r in digest.ok_rows] == sorted(ok[i]["uri"] for i in picked)
    assert digest.ok_count == len(ok) and digest.rows == 120
    assert digest.per_decision == dict(collections.Counter(r["decision"] for r in rows).most_common())
    assert digest.per_class == {k: v for k, v in collections.Counter(r["class_name"] for r in rows).most_common() if k}
    assert all(r["corrected_orientation"] is None for r in digest.auto_rows)  # the column the file lacks
    assert digest.class_pairs == {(r["class_id"], r["class_name"]) for r in rows
                                  if r["class_id"] >= 0 and r["class_name"]}

    errors = [dict(uri=f"/a/bad{i}.jpg", page=-1, stage="decode", error_type=["corrupt", "empty"][i % 2],
                   message="m", sha256="", fingerprint="") for i in range(230)]
    errors_path = str(tmp_path / "errors.parquet")
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), errors_path)
    failures = report.ErrorsDigest(errors_path)
    assert failures.rows == 230 and failures.per_error == {"corrupt": 115, "empty": 115}
    assert [e["uri"] for e in failures.first] == [e["uri"] for e in errors[:report.ERRORS_SHOWN]]
