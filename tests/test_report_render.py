"""The score report: one self-contained page that headless Chromium renders with every contact sheet, and the
confusion matrices when the truth is known; plus the activation pictures."""
from __future__ import annotations

import csv
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
from tests.test_serving_export import limit_tf_threads

limit_tf_threads()

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
TURNS = {"upright_a": 0, "upright_b": 0, "turned90": 90, "turned180": 180, "turned270": 270}


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A score output over five turned asymmetric images and three bad files, with a truth manifest."""
    root = tmp_path_factory.mktemp("report")
    base = str(root / "export")
    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=2)
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


def test_report_command_rewrites_the_page(scored_run):
    os.remove(os.path.join(scored_run["output"], "report.html"))
    assert report.main([scored_run["output"], "--truth", scored_run["truth"], "--per-section", "1"]) == 0
    page = open(os.path.join(scored_run["output"], "report.html"), encoding="utf-8").read()
    assert page.count('class="thumb pair"') == 1 and "first 1 shown" in page


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

    html_path = report.write_activations([image], str(tmp_path / "act"), model_path=path, layers=["early", "late"])

    page = open(html_path, encoding="utf-8").read()
    assert "early 30x30x6" in page and "late 28x28x5" in page
    strip = Image.open(os.path.join(tmp_path, "act", "scan.png.activations.png"))
    assert strip.height == 280 and strip.width > 4 * 280
