"""`archive-vision review`: answers given on the page land in corrections.parquet at once, with the orientation the
person meant; nothing is lost to a killed server, and two servers on one run keep each other's answers; bad input is
refused with a reason. The page itself is driven in headless Chromium (keyboard, reload after a kill, two tabs)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import corrections, imaging
from pipelines.review import session as review_session
from pipelines.tables import RESULTS_SCHEMA
from tests import devtools
from tests.image_factory import encode_array, make_asymmetric_image, multipage_tiff
from tests.score_fixtures import turned

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(uri, sha, *, page=0, model=0, confidence=0.5, decision="review", folder_class="photo", reason=None):
    row = {name: None for name in RESULTS_SCHEMA.names}
    probs = [0.1] * 4
    if model in (0, 90, 180, 270):
        probs[model // 90] = confidence
    row.update(uri=uri, page=page, sha256=sha, format="png", width=160, height=120, exif_orientation=0,
               class_name=folder_class, class_id=0, orientation_degrees=model,
               orientation_confidence=confidence if model >= 0 else None,
               orientation_probabilities=probs if model >= 0 else None, decision=decision,
               review_reason=reason if reason is not None else
               (f"orientation {model} confidence {confidence:.2f} < 0.90" if decision == "review" else ""),
               model_name="archive_vision", model_version=3, reused=False, corrected_uri="", corrected_method="")
    return row


def make_run(root, pages=12):
    """A score output folder of `pages` review pages (the asymmetric image turned; the model right on some, wrong on
    others), two ok pages, a two-page TIFF whose second page is queued and a queued file that is gone; results.parquet
    written directly. Returns (run_dir, {uri: (true turn, model turn)} of the queued single pages)."""
    run_dir = os.path.join(str(root), "run")
    os.makedirs(run_dir)
    rows, truth = [], {}
    base = make_asymmetric_image()
    for i in range(pages):
        folder = os.path.join(str(root), "archive", "box_a" if i % 3 else "box_b")
        os.makedirs(folder, exist_ok=True)
        true_turn = (0, 90, 180, 270)[i % 4]
        model = true_turn if i % 2 == 0 else (true_turn + 90) % 360  # wrong on every other page
        pixels = turned(base, true_turn).copy()
        pixels[58:61, 58:61] = 5 * i  # distinct bytes per file, away from the corners
        data = encode_array(pixels, "PNG")
        uri = os.path.join(folder, f"scan_{i:02d}.png")
        with open(uri, "wb") as f:
            f.write(data)
        rows.append(_result(uri, imaging.content_sha256(data), model=model, confidence=0.40 + 0.5 * i / pages))
        truth[uri] = (true_turn, model)
    for i in range(2):
        path = os.path.join(str(root), "archive", f"fine_{i}.png")
        data = encode_array(base[:, :, ::-1].copy() if i else base, "PNG")
        with open(path, "wb") as f:
            f.write(data)
        rows.append(_result(path, imaging.content_sha256(data), confidence=0.99, decision="ok"))
    tiff = multipage_tiff([Image.fromarray(base), Image.fromarray(turned(base, 90))])
    path = os.path.join(str(root), "archive", "book.tif")
    with open(path, "wb") as f:
        f.write(tiff)
    sha = imaging.content_sha256(tiff)
    rows.append(_result(path, sha, page=0, confidence=0.97, decision="ok"))
    rows.append(_result(path, sha, page=1, model=90, confidence=0.41))
    rows.append(_result(os.path.join(str(root), "archive", "gone.png"), "f" * 64, model=-1, confidence=0.0,
                        reason="no orientation output"))
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), os.path.join(run_dir, "results.parquet"))
    return run_dir, truth


class Server:
    """`archive-vision review` in a process of its own."""

    def __init__(self, run_dir, *args, port=0):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "archive_vision", "review", "--results", run_dir, "--port", str(port),
             "--poll-seconds", "0.3", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("review: "):
            self.process.kill()
            raise AssertionError(f"the server did not start: {line!r} {self.process.stderr.read()}")
        self.url = line.split()[1]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.status, response.read()

    def state(self, client="test"):
        return json.loads(self.get(f"api/state?client={client}")[1])

    def post(self, path, body):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def answer(self, *answers, client="test"):
        return self.post("api/answer", {"client": client, "answers": [
            {"uri": uri, "page": page, "answer": answer} for uri, page, answer in answers]})

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        return self.process.returncode, out, err


@pytest.fixture()
def servers():
    started = []

    def start(*args, **kwargs):
        server = Server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def table_rows(run_dir):
    return corrections.read_corrections(os.path.join(run_dir, corrections.CORRECTIONS_FILE)).to_pylist()


def standing(run_dir):
    return {(row["uri"], row["page"]): row for row in corrections.latest(table_rows(run_dir)).values()}


# ---------------------------------------------------------------- the queue


def test_queue_groups_pages_least_sure_first(tmp_path):
    run_dir, truth = make_run(tmp_path)
    results = pq.read_table(os.path.join(run_dir, "results.parquet")).to_pylist()
    items = review_session.build_queue(results)
    assert len(items) == len(truth) + 2  # the review pages; ok pages are not queued, the TIFF's page 1 is
    assert {(i.uri, i.page) for i in items} >= {(uri, 0) for uri in truth}
    groups = [i.group for i in items]
    assert all(groups.index(g) + groups.count(g) - 1 == max(k for k, h in enumerate(groups) if h == g)
               for g in set(groups)), "a group's pages come together"
    for group in set(groups):
        sure = [i.confidence for i in items if i.group == group]
        assert sure == sorted(sure)
    firsts = [next(i for i in items if i.group == g) for g in dict.fromkeys(groups)]
    assert [f.confidence or 0 for f in firsts] == sorted(f.confidence or 0 for f in firsts)
    assert items[0].uri.endswith("gone.png")  # no orientation at all: least sure of all
    assert review_session.build_queue(results, ("review", "ok"))[-1].confidence == 0.99


def test_two_journals_on_one_folder_keep_every_answer_and_undo(tmp_path):
    """Two writers (threads here, processes or machines in use) answering at once: every answer in the merge."""
    import threading

    run_dir, truth = make_run(tmp_path, pages=20)
    results = {r["uri"]: r for r in pq.read_table(os.path.join(run_dir, "results.parquet")).to_pylist()}
    writers = [corrections.open_journal(run_dir), corrections.open_journal(run_dir)]
    uris = list(truth)

    def answer(journal, mine, reviewer):
        for uri in mine:
            journal.record([corrections.correction_row(results[uri], "turn_left", reviewer)])
            journal.write_table()

    threads = [threading.Thread(target=answer, args=(w, uris[k::2], f"r{k}")) for k, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(table_rows(run_dir)) in range(10, 21)  # last writer wins the table for now...
    for writer in writers:
        writer.refresh()
    writers[0].write_table()
    assert set(standing(run_dir)) == {(uri, 0) for uri in uris}  # ...and the next rewrite has them all
    undone = writers[1].recent("r1", batches=1)
    assert len(undone) == 1 and undone[0]["uri"] == uris[-1]
    writers[1].retract([undone[0]["id"]], "r1")
    writers[0].refresh()
    writers[0].write_table()
    assert set(standing(run_dir)) == {(uri, 0) for uri in uris[:-1]}
    assert corrections.open_journal(run_dir).standing() == corrections.latest(table_rows(run_dir))
    with pytest.raises(corrections.CorrectionsError, match="no answer 'nope'"):
        writers[0].retract(["nope"], "r0")
    with pytest.raises(corrections.CorrectionsError, match="unknown answer"):
        writers[0].record([{**corrections.correction_row(results[uris[0]], "accept", "r0"), "label": "sideways"}])


# ---------------------------------------------------------------- the server


def test_answers_round_trip_into_corrections_with_the_orientation_meant(tmp_path, servers):
    run_dir, truth = make_run(tmp_path)
    server = servers(run_dir, "--reviewer", "ana")
    state = server.state()
    assert (state["total"], state["done"], state["left"]) == (len(truth) + 2, 0, len(truth) + 2)
    # The person answers how the page, shown turned back by the model's answer, must turn to stand up.
    needed = {0: "accept", 90: "turn_right", 180: "turn_180", 270: "turn_left"}
    answers = [(uri, 0, needed[(model - true_turn) % 360]) for uri, (true_turn, model) in truth.items()]
    for answer in answers[:-1]:
        status, body = server.answer(answer)
        assert status == 200, body
        assert len(body["recorded"]) == 1
    status, body = server.answer(answers[-1], (str(tmp_path / "archive" / "book.tif"), 1, "no_up"))
    assert status == 200 and body["done"] == len(truth) + 1 and body["left"] == 1
    assert [h["uri"] for h in body["head"]] == [str(tmp_path / "archive" / "gone.png")]
    got = standing(run_dir)  # already on disk: each answer rewrote the table
    assert {uri: row["orientation"] for (uri, _), row in got.items() if uri in truth} == \
        {uri: true_turn for uri, (true_turn, _) in truth.items()}
    for uri, (true_turn, model) in truth.items():
        row = got[(uri, 0)]
        assert row["orientation"] == corrections.corrected_orientation(model, row["label"])
        assert (row["model_orientation"], row["reviewer"], row["model_version"]) == (model, "ana", 3)
    assert got[(str(tmp_path / "archive" / "book.tif"), 1)]["orientation"] == -1
    journal = os.listdir(os.path.join(run_dir, corrections.JOURNAL_DIR))
    assert len(journal) == len(truth) + 1 and all(name.endswith(".json") for name in journal)
    code, out, _ = server.stop()
    assert code == 0 and f"({len(truth) + 1} answers)" in out


def test_pictures_show_the_page_as_the_model_would_turn_it(tmp_path, servers):
    run_dir, truth = make_run(tmp_path)
    server = servers(run_dir)
    head = server.state()["head"]
    for item in head:
        if item["model_orientation"] < 0:
            with pytest.raises(urllib.error.HTTPError) as gone:
                server.get(item["image"])
            assert gone.value.code == 404 and b"cannot be read" in gone.value.read()
            continue
        status, data = server.get(item["image"])
        picture = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
        assert status == 200 and max(picture.shape[:2]) <= 512
        true_turn = truth[item["uri"]][0] if item["page"] == 0 else 90
        # Shown turned back by the model's answer: still turned by (true - model), so its red block sits where that
        # turn puts the top-left corner.
        left_turn = (true_turn - item["model_orientation"]) % 360
        h, w = picture.shape[:2]
        corners = {0: picture[: h // 4, : w // 4], 90: picture[: h // 4, -w // 4:],
                   180: picture[-h // 4:, -w // 4:], 270: picture[-h // 4:, : w // 4]}
        redness = {turn: float(np.mean(c[..., 0] - c[..., 1])) for turn, c in corners.items()}
        assert max(redness, key=redness.get) == left_turn, (item["uri"], redness)


def test_undo_brings_the_page_back_and_leaves_the_table_without_it(tmp_path, servers):
    run_dir, truth = make_run(tmp_path)
    server = servers(run_dir, "--reviewer", "ana")
    first, second = list(truth)[:2]
    _, body = server.answer((first, 0, "turn_left"))
    _, body = server.answer((second, 0, "accept"))
    assert body["done"] == 2
    assert [[a["uri"] for a in batch["answers"]] for batch in body["recent"]] == [[first], [second]]
    status, body = server.post("api/undo", {"client": "test", "ids": [body["recorded"][0]["id"]]})
    assert status == 200 and body["done"] == 1 and second in [h["uri"] for h in body["head"]]
    assert set(standing(run_dir)) == {(first, 0)}
    status, body = server.post("api/undo", {"client": "test", "ids": ["nosuchanswer"]})
    assert status == 400 and "nosuchanswer" in body["error"]
    server.stop()
    # The undo is in the journal: a new server still has the page back in the queue.
    server = servers(run_dir, "--reviewer", "ana")
    assert server.state()["done"] == 1 and set(standing(run_dir)) == {(first, 0)}


def test_a_server_killed_after_answering_loses_nothing(tmp_path, servers):
    run_dir, truth = make_run(tmp_path)
    server = servers(run_dir)
    for uri in list(truth)[:5]:
        assert server.answer((uri, 0, "turn_180"))[0] == 200
    server.stop(signal.SIGKILL)
    # As a crash between the journal and the table would leave it: the table has lost its last rows.
    path = os.path.join(run_dir, corrections.CORRECTIONS_FILE)
    pq.write_table(pq.read_table(path).slice(0, 2), path)
    again = servers(run_dir)
    assert again.state()["done"] == 5
    assert set(standing(run_dir)) == {(uri, 0) for uri in list(truth)[:5]}


def test_two_servers_on_one_run_keep_each_others_answers(tmp_path, servers):
    run_dir, truth = make_run(tmp_path)
    one, two = servers(run_dir, "--reviewer", "ana"), servers(run_dir, "--reviewer", "ben")
    uris = list(truth)
    for a, b in zip(uris[0:6:2], uris[1:6:2]):
        assert one.answer((a, 0, "accept"))[0] == 200
        assert two.answer((b, 0, "turn_left"))[0] == 200
    # Both answered the same page: the later answer stands, the earlier stays in the table as history.
    assert one.answer((uris[6], 0, "accept"))[0] == 200
    assert two.answer((uris[6], 0, "not_image"))[0] == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and one.state()["done"] != 7:  # server one reads two's journal objects
        time.sleep(0.1)
    state = one.state("fresh")
    assert state["done"] == 7 and not {h["uri"] for h in state["head"]} & set(uris[:7])
    one.stop(), two.stop()
    got = standing(run_dir)
    assert set(got) == {(uri, 0) for uri in uris[:7]}
    assert {got[(u, 0)]["reviewer"] for u in uris[0:6:2]} == {"ana"}
    assert {got[(u, 0)]["reviewer"] for u in uris[1:6:2]} == {"ben"}
    assert got[(uris[6], 0)]["label"] == "not_image"
    assert len(table_rows(run_dir)) == 8


def test_two_tabs_get_different_pages(tmp_path, servers):
    run_dir, truth = make_run(tmp_path, pages=30)
    server = servers(run_dir)
    one, two = server.state("tab1")["head"], server.state("tab2")["head"]
    held = review_session.LEASED
    assert len(one) == len(two) == review_session.HEAD_SIZE
    assert not {h["sha256"] for h in one[:held]} & {h["sha256"] for h in two[:held]}
    assert [h["sha256"] for h in two[:held]] == [h["sha256"] for h in one[held:2 * held]]  # the next ones
    # With fewer pages left than tabs hold, a tab gets the held ones rather than nothing.
    small, _ = make_run(tmp_path / "small", pages=1)
    server = servers(small)
    one, two = server.state("tab1")["head"], server.state("tab2")["head"]
    assert len(one) == 3 and [h["sha256"] for h in two] == [h["sha256"] for h in one]


def test_bad_requests_are_refused_with_a_reason(tmp_path, servers):
    run_dir, truth = make_run(tmp_path)
    server = servers(run_dir)
    uri = next(iter(truth))
    fine = str(tmp_path / "archive" / "fine_0.png")
    cases = {
        (str(tmp_path / "elsewhere.png"), 0, "accept"): "is not in the results",
        (fine, 0, "accept"): "not in the review queue (its decision is 'ok')",
        (uri, 0, "sideways"): "unknown answer 'sideways'",
        (uri, 3, "accept"): "is not in the results",
        (str(tmp_path / "archive" / "gone.png"), 0, "accept"): "gave no orientation to accept",
    }
    for answer, reason in cases.items():
        status, body = server.answer(answer)
        assert status == 400 and reason in body["error"], (answer, body)
    # One bad answer refuses the whole request: nothing of it is recorded.
    status, body = server.answer((uri, 0, "accept"), (uri, 0, "sideways"))
    assert status == 400
    for body, reason in (({"client": "x"}, "no answers given"), ([1, 2], "must be a JSON object")):
        assert server.post("api/answer", body)[0] == 400 and reason in server.post("api/answer", body)[1]["error"]
    for data, content_type, code, reason in ((b"{not json", "application/json", 400, "not JSON"),
                                             (b'{"answers": []}', "text/plain", 415, "application/json")):
        request = urllib.request.Request(server.url + "api/answer", data=data, method="POST",
                                         headers={"Content-Type": content_type})
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(request, timeout=30)
        assert bad.value.code == code and reason in json.loads(bad.value.read())["error"]
    assert server.state()["done"] == 0
    assert table_rows(run_dir) == []


def _review(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "archive_vision", "review", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_a_folder_without_results_or_with_another_runs_corrections_is_refused(tmp_path):
    done = _review("--results", str(tmp_path), "--port", "0")
    assert done.returncode == 2 and "holds no results.parquet" in done.stderr
    run_dir, truth = make_run(tmp_path)
    other = [{"uri": "/elsewhere/x.png", "sha256": "a" * 64, "page": 0, "orientation": 90, "label": "turn_left",
              "model_orientation": 0, "model_name": "m", "model_version": 1, "reviewer": "zoe",
              "answered_at": None}]
    import datetime
    other[0]["answered_at"] = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    pq.write_table(pa.Table.from_pylist(other, schema=corrections.CORRECTIONS_SCHEMA),
                   os.path.join(run_dir, corrections.CORRECTIONS_FILE))
    done = _review("--results", run_dir, "--port", "0")
    assert done.returncode == 2 and "another run's corrections" in done.stderr and "/elsewhere/x.png" in done.stderr


def test_rebuild_adopts_a_tables_rows_and_merges_the_journal(tmp_path):
    run_dir, truth = make_run(tmp_path)
    uri = next(iter(truth))
    results = {r["uri"]: r for r in pq.read_table(os.path.join(run_dir, "results.parquet")).to_pylist()}
    row = corrections.correction_row(results[uri], "turn_right", "zoe")
    import datetime
    row["answered_at"] = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    pq.write_table(pa.Table.from_pylist([row], schema=corrections.CORRECTIONS_SCHEMA),
                   os.path.join(run_dir, corrections.CORRECTIONS_FILE))
    done = _review("--results", run_dir, "--rebuild")
    assert done.returncode == 0, done.stderr
    assert "1 answers (1 of" in done.stdout
    assert len(os.listdir(os.path.join(run_dir, corrections.JOURNAL_DIR))) == 1  # adopted into the journal
    assert table_rows(run_dir) == [row]
    assert _review("--results", run_dir, "--rebuild").returncode == 0
    assert len(os.listdir(os.path.join(run_dir, corrections.JOURNAL_DIR))) == 1  # adopted once only


# ---------------------------------------------------------------- the page, in headless Chromium

NEEDED = {0: "accept", 90: "turn_right", 180: "turn_180", 270: "turn_left"}  # the turn the shown page still needs
ANSWER_KEYS = {"accept": "Enter", "turn_right": "ArrowRight", "turn_180": "ArrowDown", "turn_left": "ArrowLeft",
               "no_up": "n", "not_image": "x"}
# The page's current item once its picture (or the note that there is none) is on screen; null before.
SHOWN = """(() => { if (!current) return null;
  const img = document.querySelector('#view img'), note = document.querySelector('#view .note');
  const on = (img && img.getAttribute('src') === current.image) || (note && note.textContent.includes('unavailable'));
  return on ? {uri: current.uri, page: current.page, sha256: current.sha256, model: current.model_orientation,
               strip: groupStrip().map((i) => [i.uri, i.page])} : null; })()"""
SETTLED = "state !== null && sending.length === 0 && !inflight"
needs_chromium = pytest.mark.skipif(devtools.CHROMIUM is None,
                                    reason="chromium is not installed (CI installs the chromium package)")


def right_answer(item, truth):
    if item["model"] < 0:
        return "not_image"
    true_turn = 90 if item["uri"].endswith("book.tif") else truth[item["uri"]][0]
    return NEEDED[(item["model"] - true_turn) % 360]


@pytest.fixture()
def browser(tmp_path):
    chromium = devtools.Browser(str(tmp_path / "profile"))
    yield chromium
    chromium.close()


def answer_shown(tab, truth, think=0.0):
    """Look at the page shown, press the key of the right answer, wait for the next page; returns (item, answer)."""
    item = tab.wait_for(SHOWN, what="a page shown")
    time.sleep(think)
    answer = right_answer(item, truth)
    tab.press(ANSWER_KEYS[answer])
    key = json.dumps([item["sha256"], item["page"]])
    tab.wait_for(f"!current || JSON.stringify([current.sha256, current.page]) !== {json.dumps(key)}",
                 what="the next page")
    return item, answer


def wait_on_disk(run_dir, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check(standing(run_dir)):
        assert time.monotonic() < deadline, "corrections.parquet never showed the answers"
        time.sleep(0.05)


@needs_chromium
def test_the_page_takes_one_keystroke_and_one_post_per_page(tmp_path, servers, browser):
    run_dir, truth = make_run(tmp_path, pages=24)
    server = servers(run_dir, "--reviewer", "ana")
    tab = browser.new_tab(server.url)
    started, answered = time.monotonic(), []
    for _ in range(20):  # a quick person: a quarter second to look at each page
        answered.append(answer_shown(tab, truth, think=0.25))
    minutes = (time.monotonic() - started) / 60
    tab.wait_for(SETTLED)
    metrics = tab.evaluate("window.__review")
    requests = tab.requests()
    answer_posts = [r for r in requests if r["method"] == "POST" and r["url"].endswith("/api/answer")]
    pictures = [r for r in requests if "/img/" in r["url"]]
    shown = sorted(metrics["shownMs"])
    print(f"\nreview page: 20 pages in {minutes * 60:.1f} s ({20 / minutes:.0f}/min with 0.25 s to look at each); "
          f"{metrics['keys'] / 20:.2f} keystrokes and {len(answer_posts) / 20:.2f} POSTs per page; "
          f"keystroke to next page shown: median {shown[len(shown) // 2]:.1f} ms, max {shown[-1]:.1f} ms, "
          f"{metrics['shownFromCache']} of {len(shown)} from the prefetched pictures; "
          f"{len(pictures)} picture GETs in all")
    assert metrics["keys"] == 20 and len(answer_posts) == 20 and metrics["errors"] == []
    assert 20 / minutes >= 20  # the page is never what keeps a person under 20 pages a minute
    assert len(shown) == 20 and metrics["shownFromCache"] >= 10  # the next picture was there before the key
    got = standing(run_dir)
    for item, answer in answered:
        row = got[(item["uri"], item["page"])]
        assert row["label"] == answer and row["reviewer"] == "ana"
        assert row["orientation"] == (-1 if answer == "not_image" else
                                      90 if item["uri"].endswith("book.tif") else truth[item["uri"]][0])
    # Undo: the last page comes back on screen and leaves the table; answered again, it is back.
    last, answer = answered[-1]
    tab.press("Backspace")
    assert tab.wait_for(SHOWN)["uri"] == last["uri"]
    wait_on_disk(run_dir, lambda rows: (last["uri"], last["page"]) not in rows)
    assert answer_shown(tab, truth)[0]["uri"] == last["uri"]
    wait_on_disk(run_dir, lambda rows: (last["uri"], last["page"]) in rows)
    tab.wait_for("state.done === 20 && sending.length === 0", what="the page counting the answer again")


@needs_chromium
def test_the_group_key_accepts_the_page_and_its_strip_in_one_post(tmp_path, servers, browser):
    run_dir, truth = make_run(tmp_path, pages=24)
    server = servers(run_dir)
    tab = browser.new_tab(server.url)
    item = tab.wait_for(SHOWN)
    while not item["strip"]:  # the first page with more of its group after it
        answer_shown(tab, truth)
        item = tab.wait_for(SHOWN)
    tab.wait_for(SETTLED)  # the answers before it on disk
    before = standing(run_dir)
    posts = len([r for r in tab.requests() if r["method"] == "POST"])
    tab.press("g")
    tab.wait_for(SETTLED)
    group = {(item["uri"], item["page"])} | {tuple(p) for p in item["strip"]}
    got = standing(run_dir)
    assert set(got) - set(before) == group and all(got[key]["label"] == "accept" for key in group)
    assert len([r for r in tab.requests() if r["method"] == "POST"]) == posts + 1
    tab.press("z")  # one undo takes the whole group back
    tab.wait_for(SETTLED)
    assert tab.wait_for(SHOWN)["uri"] == item["uri"]
    wait_on_disk(run_dir, lambda rows: set(rows) == set(before))


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_chromium
def test_a_killed_server_loses_no_answer_and_the_page_picks_up_after_a_reload(tmp_path, servers, browser):
    run_dir, truth = make_run(tmp_path)
    port = _free_port()
    server = servers(run_dir, port=port)
    tab = browser.new_tab(server.url)
    answered = [answer_shown(tab, truth)[0] for _ in range(4)]
    tab.wait_for(SETTLED)
    server.stop(signal.SIGKILL)
    answered.append(answer_shown(tab, truth)[0])  # answered while the server is gone: it waits in the tab
    tab.wait_for("document.getElementById('banner').style.display === 'block'", what="the banner")
    servers(run_dir, port=port)
    tab.wait_for(SETTLED, timeout=60, what="the waiting answer sent to the new server")
    tab.reload()
    tab.wait_for("state && state.done === 5", what="the page after a reload")
    shown = tab.wait_for(SHOWN)
    keys = {(i["uri"], i["page"]) for i in answered}
    assert (shown["uri"], shown["page"]) not in keys
    assert set(standing(run_dir)) == keys
    assert len(tab.evaluate("undoStack")) == 5  # the answers of before the reload can still be undone


@needs_chromium
def test_two_tabs_work_on_different_pages_and_see_each_others_progress(tmp_path, servers, browser):
    run_dir, truth = make_run(tmp_path, pages=30)
    server = servers(run_dir)
    tabs = [browser.new_tab(server.url), browser.new_tab(server.url)]
    answered = []
    for _ in range(5):
        for tab in tabs:
            tab.send("Page.bringToFront")
            item = answer_shown(tab, truth)[0]
            assert (item["uri"], item["page"]) not in answered
            answered.append((item["uri"], item["page"]))
    for tab in tabs:
        tab.wait_for(SETTLED)
    for tab in tabs:  # each tab's next call (a poll at the latest) says what the other did
        tab.wait_for("state.done === 10", what="both tabs' answers counted")
    assert set(standing(run_dir)) == set(answered) and len(table_rows(run_dir)) == 10
