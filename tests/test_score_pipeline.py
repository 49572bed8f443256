"""The score job end to end with tiny exported models: decisions under the model's recorded policy (and the flags
that override it), errors that reconcile, corrected copies that are upright, --skip-known, the graph's turned copies
as run.json reports them, and the same rows through a real local gRPC server as in-process."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image, ImageOps

from pipelines import score
from serving import export
from serving.policy import DecisionPolicy, ScorePolicy
from tests import score_fixtures as sf
from tests.image_factory import encode_array, make_asymmetric_image
from tests.test_serving_export import limit_tf_threads, make_tiny_model

limit_tf_threads()


@pytest.fixture(scope="module")
def red_corner_export(tmp_path_factory):
    """Export base holding version 3 of the model that finds the asymmetric image's turn."""
    base = str(tmp_path_factory.mktemp("export"))
    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=3)
    return base


@pytest.fixture(scope="module")
def strict_export(tmp_path_factory):
    """A red-corner model that is 0.93 sure of the asymmetric image's turn, exported with a trainer's score settings
    that record an auto_rotate threshold of 0.95."""
    base = str(tmp_path_factory.mktemp("strict"))
    export.export_model(sf.make_red_corner_model(sharpness=15.0), base, class_names=sf.CLASS_NAMES,
                        image_size=sf.IMAGE_SIZE, version=5, score_settings={"rotate_threshold": 0.95,
                                                                              "origin": "tuned on val"})
    return base


@pytest.fixture(scope="module")
def tta_export(tmp_path_factory):
    """The red-corner model exported with test-time turns for every image (its recorded score settings)."""
    base = str(tmp_path_factory.mktemp("tta"))
    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=3, score_settings={"tta": True})
    return base


def run_score(args, tmp_path=None):
    return score.run(list(args) + ["--no-report"], test_pipeline=TestPipeline())


def results_by_name(output):
    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    return {os.path.basename(r["uri"]): r for r in rows}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_turns_found_and_bad_inputs_reconcile(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    turns = {"upright": 0, "turned90": 90, "turned180": 180, "turned270": 270}
    sf.write_turned_archive(archive, turns)
    bad = sf.write_bad_files(archive)
    output = str(tmp_path / "out")

    summary = run_score(["--input", archive, "--output", output, "--model", red_corner_export])

    rows = results_by_name(output)
    assert {name: rows[f"{name}.png"]["orientation_degrees"] for name in turns} == turns
    assert {name: rows[f"{name}.png"]["decision"] for name in turns} == {
        "upright": "ok", "turned90": "auto_rotate", "turned180": "auto_rotate", "turned270": "auto_rotate"}
    assert all(r["model_name"] == "archive_vision" and r["model_version"] == 3 for r in rows.values())
    assert all(r["class_name"] == "document" and not r["reused"] for r in rows.values())
    errors = pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    assert {e["uri"]: e["error_type"] for e in errors} == bad
    counts = summary["counts"]
    assert (counts["inputs"], counts["inputs_ok"], counts["inputs_failed"]) == (7, 4, 3)
    assert counts["reconciled"] and counts["per_decision"] == {"ok": 1, "auto_rotate": 3}
    with open(os.path.join(output, "run.json")) as f:
        run = json.load(f)
    assert run["model"]["version"] == 3
    assert run["runner"]["runner"] == "DirectRunner" and run["runner"]["direct_num_workers"] >= 1
    assert counts["pages_sent_as_file"] == 4  # RGB PNG files go to the model as they are
    # An export with no score settings records the generic policy, and the run used it.
    assert run["policy"]["from"].endswith(os.path.join("archive_vision", "3"))
    assert run["policy"]["decision_used"] == dataclasses.asdict(DecisionPolicy())
    assert all(r["tta_agreement"] is None and r["text_crops"] is None for r in rows.values())
    assert not run["tta"]["enabled"] and not run["text_crops"]["enabled"]
    csv_rows = pacsv.read_csv(os.path.join(output, "results.csv")).to_pylist()
    assert len(csv_rows) == 4 and all(len(r["orientation_probabilities"].split(";")) == 4 for r in csv_rows)


def test_corrected_copies_are_upright_and_originals_untouched(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    upright = make_asymmetric_image(128, 160)  # multiples of 16: JPEG can be turned losslessly
    os.makedirs(os.path.join(archive, "box"))
    paths = {}
    for degrees, (fmt, ext) in ((90, ("PNG", "png")), (180, ("JPEG", "jpg")), (270, ("TIFF", "tif"))):
        path = os.path.join(archive, "box", f"scan{degrees}.{ext}")
        with open(path, "wb") as f:
            f.write(encode_array(sf.turned(upright, degrees), fmt, **({"quality": 95} if fmt == "JPEG" else {})))
        paths[degrees] = path
    before = {p: sha(p) for p in paths.values()}
    fixed = str(tmp_path / "fixed")

    summary = run_score(["--input", archive, "--output", str(tmp_path / "out"), "--model", red_corner_export,
                         "--write-corrected", fixed])

    rows = results_by_name(str(tmp_path / "out"))
    for degrees, path in paths.items():
        row = rows[os.path.basename(path)]
        assert row["decision"] == "auto_rotate" and row["orientation_degrees"] == degrees
        assert row["corrected_uri"] == os.path.join(fixed, "box", os.path.basename(path)), row["corrected_method"]
        pixels = np.asarray(Image.open(row["corrected_uri"]).convert("RGB")).astype(int)
        assert pixels.shape == upright.shape
        if path.endswith(".jpg"):
            assert np.abs(pixels - upright).mean() < 4
        else:
            assert np.array_equal(pixels, upright)
    if shutil.which("jpegtran"):
        assert rows["scan180.jpg"]["corrected_method"] == "jpegtran_lossless"
    assert {p: sha(p) for p in paths.values()} == before
    assert summary["counts"]["corrected_written"] == 3


def test_corrected_dir_inside_the_archive_is_refused(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {"a": 90})
    with pytest.raises(SystemExit):
        score.parse_args(["--input", archive, "--output", str(tmp_path / "out"), "--model", red_corner_export,
                          "--write-corrected", os.path.join(archive, "fixed")])


def test_tta_agrees_on_a_clear_image_and_reports_the_rate(tmp_path, tta_export):
    """An export whose policy turns copies: the graph scores them, score needs no flag and reports the rate."""
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {"upright": 0, "turned90": 90, "turned270": 270})
    output = str(tmp_path / "out")

    summary = run_score(["--input", archive, "--output", output, "--model", tta_export])

    rows = results_by_name(output)
    assert {n: r["orientation_degrees"] for n, r in rows.items()} == {
        "upright.png": 0, "turned90.png": 90, "turned270.png": 270}
    assert all(r["tta_agreement"] == 1.0 for r in rows.values())
    assert summary["tta"]["enabled"] and summary["tta"]["images"] == 3 and summary["tta"]["disagreement_rate"] == 0.0
    assert summary["policy"]["answer"]["tta"] and summary["policy"]["decision_used"]["tta_agreement_below"] == 0.8


def test_pages_sure_enough_to_skip_their_turned_copies_are_answered_alone(tmp_path):
    """tta_below gates the turned copies: a batch in which every page is sure scores no turned copy at all, and its
    pages are still answered (each page alone with --batch-size 1, as halving a failed batch also ends)."""
    base = str(tmp_path / "export")
    export.export_model(sf.make_red_corner_model(), base, class_names=sf.CLASS_NAMES, image_size=sf.IMAGE_SIZE,
                        version=3, score_settings={"tta": True, "tta_below": 0.9})
    archive, output = str(tmp_path / "archive"), str(tmp_path / "out")
    turns = {"upright": 0, "turned90": 90, "turned180": 180}
    sf.write_turned_archive(archive, turns)

    summary = run_score(["--input", archive, "--output", output, "--model", base, "--batch-size", "1"])

    rows = results_by_name(output)
    assert summary["counts"]["errors"] == 0, pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    assert {name: rows[f"{name}.png"]["orientation_degrees"] for name in turns} == turns
    assert all(r["tta_agreement"] is None for r in rows.values())  # sure on the stored copy: not turned
    assert (summary["tta"]["images"], summary["tta"]["single_copy"]) == (0, 3)


def _tiny_export(tmp_path, version: int, score_settings=None, name="export"):
    """Export base of the tiny 3-class model (version `version`, the score settings its trainer recorded): a random
    model gives random photos varied answers and confidences."""
    base = str(tmp_path / name)
    export.export_model(make_tiny_model(image_size=sf.IMAGE_SIZE, seed=5), base, class_names=["a", "b", "c"],
                        image_size=sf.IMAGE_SIZE, version=version, score_settings=score_settings)
    return base


def _tiny_export_and_photos(tmp_path, version: int, photos: int, score_settings=None):
    """(_tiny_export, an archive of `photos` random photos)."""
    archive = str(tmp_path / "archive")
    sf.random_photos(archive, photos)
    return _tiny_export(tmp_path, version, score_settings), archive


def test_tta_below_keeps_sure_answers_and_turns_only_the_rest(tmp_path):
    """An export recording tta_below: its graph turns only the images less sure than that, and run.json and the
    summary line say how many went each way."""
    base, archive = _tiny_export_and_photos(tmp_path, version=1, photos=8)
    single = str(tmp_path / "single")
    run_score(["--input", archive, "--output", single, "--model", base])
    once = results_by_name(single)
    assert all(r["tta_agreement"] is None for r in once.values())  # no turned copies, nothing to agree
    below = float(np.median([r["orientation_confidence"] for r in once.values()]))
    adaptive = _tiny_export(tmp_path, 2, {"tta": True, "tta_below": below}, name="adaptive_export")
    output = str(tmp_path / "adaptive")

    summary = run_score(["--input", archive, "--output", output, "--model", adaptive])

    rows = results_by_name(output)
    sure = {n for n, r in once.items() if r["orientation_confidence"] >= below}
    assert 0 < len(sure) < len(rows)
    for name, row in rows.items():
        if name in sure:  # the stored copy's answer, untouched
            assert row["tta_agreement"] is None
            assert row["orientation_degrees"] == once[name]["orientation_degrees"]
            assert row["orientation_confidence"] == pytest.approx(once[name]["orientation_confidence"], abs=1e-6)
        else:
            assert row["tta_agreement"] is not None
    assert summary["tta"] | {"disagreement_rate": None, "mean_agreement": None} == {
        "enabled": True, "below": below, "images": len(rows) - len(sure), "single_copy": len(sure),
        "settle_first": 0.0, "disagreement_rate": None, "mean_agreement": None}
    line = next(line for line in score.format_summary(summary).splitlines() if line.strip().startswith("tta"))
    assert f"{len(rows) - len(sure)} pages in four turns, {len(sure)} sure on one copy (p >= {below})" in line


def test_the_tta_line_says_when_the_first_crops_settled_images_without_turns():
    from pipelines.report import tta_summary

    tta = {"enabled": True, "below": 0.99, "images": 5, "single_copy": 295, "disagreement_rate": 1.0}
    assert "295 sure on one copy (p >= 0.99);" in tta_summary(tta)
    line = tta_summary(dict(tta, settle_first=0.9))
    assert "295 not turned (sure on one copy at p >= 0.99, or settled by their text crops at >= 0.9);" in line


def test_skip_known_skips_exactly_the_already_scored_content(tmp_path, red_corner_export):
    archive = str(tmp_path / "archive")
    first = sf.write_turned_archive(archive, {"old_a": 0, "old_b": 90})
    first_out = str(tmp_path / "run1")
    run_score(["--input", archive, "--output", first_out, "--model", red_corner_export])
    new = sf.write_turned_archive(archive, {"new_c": 180, "new_d": 270})
    copy = os.path.join(archive, "copy_of_old_b.png")
    shutil.copyfile(first["old_b"], copy)  # same bytes under a new name: known content
    second_out = str(tmp_path / "run2")

    summary = run_score(["--input", archive, "--output", second_out, "--model", red_corner_export,
                         "--skip-known", os.path.join(first_out, "results.parquet")])

    rows = results_by_name(second_out)
    assert {n for n, r in rows.items() if r["reused"]} == {"old_a.png", "old_b.png", "copy_of_old_b.png"}
    assert {n for n, r in rows.items() if not r["reused"]} == {"new_c.png", "new_d.png"}
    assert rows["copy_of_old_b.png"]["orientation_degrees"] == 90
    assert rows["copy_of_old_b.png"]["uri"] == copy
    assert summary["counts"]["pages_scored"] == 2 and summary["counts"]["pages_reused"] == 3
    assert summary["counts"]["reconciled"] and summary["counts"]["inputs"] == 5
    assert set(new) == {"new_c", "new_d"}


def test_skip_known_ignores_results_of_another_model_version(tmp_path):
    import pyarrow as pa

    from pipelines.tables import RESULTS_SCHEMA

    row = {name: None for name in RESULTS_SCHEMA.names}
    row.update(uri="/a.png", page=0, sha256="abc", decision="ok", model_name="archive_vision", model_version=1,
               reused=False, orientation_probabilities=[1.0, 0.0, 0.0, 0.0])
    path = str(tmp_path / "old.parquet")
    pq.write_table(pa.Table.from_pylist([row], RESULTS_SCHEMA), path)
    table = score.inspect_known(path)
    assert table.kind == "results"
    assert score.known_row(row, table, score.ModelInfo("archive_vision", 2)) is None
    assert score.known_row(row, table, score.ModelInfo("other_model", 1)) is None
    assert score.known_row(row, table, score.ModelInfo("archive_vision", 1))["sha256"] == "abc"


def test_one_bad_image_does_not_fail_its_batch():
    items = [{"uri": f"u{i}", "page": 0, "sha256": str(i), "image": b"ok" if i != 3 else b"poison"}
             for i in range(7)]
    calls = []

    def predict(images):
        calls.append(len(images))
        if b"poison" in images:
            raise ValueError("cannot decode")
        return [{"orientation_probabilities": np.array([0.1, 0.7, 0.1, 0.1]), "orientation_degrees": 90}
                for _ in images]

    outcomes = score.predict_isolating(items, predict)
    assert [o[0]["uri"] for o in outcomes] == [f"u{i}" for i in range(7)]
    assert [o[2] != "" for o in outcomes] == [i == 3 for i in range(7)]
    assert "cannot decode" in outcomes[3][2] and outcomes[3][1] is None
    assert all(o[1]["orientation_degrees"] == 90 for i, o in enumerate(outcomes) if i != 3)
    # the whole batch first, then halves down to the bad image: only it and its last partner go alone
    assert calls[0] == 7 and calls.count(1) == 2
    before = len(calls)
    assert score.predict_isolating([], predict) == [] and len(calls) == before  # nothing to send: no call


def _one_image_items(n: int):
    """n scoring items of one (placeholder) image each, as PrepareImagesFn emits them."""
    return [{"uri": f"u{i}", "page": 0, "sha256": "", "image": b"x"} for i in range(n)]


def _always_failing(error: Exception):
    """(predict that raises `error` for every batch, the list of batch sizes it was called with)."""
    calls = []

    def predict(images):
        calls.append(len(images))
        raise error

    return predict, calls


def test_a_server_that_is_gone_fails_the_batch_without_splitting():
    from serving.errors import ServerUnavailableError

    items = _one_image_items(8)
    predict, calls = _always_failing(ServerUnavailableError("UNAVAILABLE"))

    outcomes = score.predict_isolating(items, predict, fatal=(ServerUnavailableError,))
    assert calls == [8] and all(o[1] is None and "UNAVAILABLE" in o[2] for o in outcomes)


def test_a_model_that_is_not_served_aborts_without_splitting_or_error_rows():
    from serving.errors import InvalidInputError, ModelNotFoundError, RetryableServingError

    items = _one_image_items(8)
    predict, calls = _always_failing(
        ModelNotFoundError("NOT_FOUND: Servable not found for request: Specific(archive_vision, 3)"))

    with pytest.raises(ModelNotFoundError, match="Specific"):
        score.predict_isolating(items, predict, fatal=(RetryableServingError,), abort=(ModelNotFoundError,))
    assert calls == [8]

    def reject_one(images):  # INVALID_ARGUMENT is about an image: still isolated with abort= given
        if b"poison" in images:
            raise InvalidInputError("INVALID_ARGUMENT: cannot decode")
        return [{"orientation_probabilities": np.array([0.7, 0.1, 0.1, 0.1]), "orientation_degrees": 0}
                for _ in images]

    items[5] = dict(items[5], image=b"poison")
    outcomes = score.predict_isolating(items, reject_one, fatal=(RetryableServingError,),
                                       abort=(ModelNotFoundError,))
    assert [o[1] is None for o in outcomes] == [i == 5 for i in range(8)]
    assert "INVALID_ARGUMENT" in outcomes[5][2]


def test_version_gone_message_says_what_happened_and_what_to_do():
    model = score.ModelInfo("archive_vision", 3, endpoint="serving:8500")
    error = "Predict archive_vision at serving:8500: NOT_FOUND: Servable not found for request: Specific(...)"
    published = score.version_gone_message(model, Exception(error), {3: "END", 4: "AVAILABLE"})
    assert published.startswith("model 'archive_vision' version 3 is no longer served at serving:8500 (version 4 "
                                "was published mid-run and the server unloaded version 3; versions served now: 4)")
    assert "Rerun" in published and "num_versions: 2" in published and "NOT_FOUND" in published
    assert "probably published mid-run" in score.version_gone_message(model, Exception(error), None)
    assert "serves no version of it now" in score.version_gone_message(model, Exception(error), {})
    signature = score.version_gone_message(model, Exception("FAILED_PRECONDITION: signature"), {3: "AVAILABLE"})
    assert "cannot score any image" in signature and "num_versions" not in signature


class _ScriptedRpcError(Exception):
    """A grpc.RpcError's code() and details(), for serving.client.map_grpc_error."""

    def __init__(self, code, details):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class ScriptedServer:
    """What a TF Serving answers, scripted: it serves `versions`, publishes version 4 (unloading the others, TF
    Serving's default policy) after `publish_after` answered Predicts, and rejects black images as
    INVALID_ARGUMENT. `predicts` records (version asked, images, answered)."""

    def __init__(self, versions=(3,), publish_after=None):
        import threading

        self.served = set(versions)
        self.publish_after = publish_after
        self.policy_json = None  # the served version's score_policy signature answers this (None: no signature)
        self.predicts = []
        self._lock = threading.Lock()

    def predict(self, client, images):
        import grpc

        from serving.client import map_grpc_error

        with self._lock:
            answered = sum(1 for _, _, ok in self.predicts if ok)
            if self.publish_after is not None and answered >= self.publish_after:
                self.served = {4}
            ok = client.version in self.served and not any(_is_black(i) for i in images)
            self.predicts.append((client.version, len(images), ok))
        where = f"Predict {client.model_name} at {client.address}"
        if client.version not in self.served:
            raise map_grpc_error(_ScriptedRpcError(grpc.StatusCode.NOT_FOUND, "Servable not found for request: "
                                                   f"Specific({client.model_name}, {client.version})"), where)
        if not ok:
            raise map_grpc_error(_ScriptedRpcError(grpc.StatusCode.INVALID_ARGUMENT, "Invalid JPEG data"), where)
        upright = np.tile(np.array([[0.97, 0.01, 0.01, 0.01]], np.float32), (len(images), 1))
        return {"orientation_probabilities": upright, "orientation_degrees": np.zeros(len(images), np.int64)}


def _is_black(jpeg: bytes) -> bool:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")).mean() < 10


@pytest.fixture()
def scripted_server(monkeypatch):
    """`--endpoint scripted:8500` reaches a ScriptedServer through the real client policy (batching, retries,
    gRPC status -> serving.errors); set `.served` / `.publish_after` on it before the run."""
    from serving import client as client_module

    server = ScriptedServer()

    class ScriptedGrpcClient(client_module.ModelServerClient):
        def __init__(self, address, model_name="archive_vision", **policy):
            policy.setdefault("initial_backoff_s", 0.001)
            super().__init__(model_name, **policy)
            self.address = address

        def _rpc_predict(self, images, timeout_s):
            return server.predict(self, images)

        def _rpc_model_states(self, timeout_s):
            return {v: "AVAILABLE" if v in server.served else "END" for v in sorted(server.served | {3})}

        def _rpc_metadata(self, timeout_s):
            from serving.policy import POLICY_SIGNATURE

            return {"version": max(server.served),
                    "signatures": {POLICY_SIGNATURE: {}} if server.policy_json is not None else {}}

        def _rpc_policy(self, timeout_s):
            return server.policy_json

    monkeypatch.setattr(client_module, "GrpcModelServerClient", ScriptedGrpcClient)
    return server


def test_remote_run_fails_clearly_when_the_pinned_version_is_unloaded_mid_run(tmp_path, scripted_server):
    archive, output = str(tmp_path / "archive"), str(tmp_path / "out")
    sf.write_turned_archive(archive, {f"scan{i}": 0 for i in range(8)})
    scripted_server.publish_after = 1  # the first batch is scored on version 3, then version 4 replaces it

    with pytest.raises(Exception) as raised:
        run_score(["--input", archive, "--output", output, "--endpoint", "scripted:8500", "--batch-size", "2",
                   "--model-name", "archive_vision"])

    message = str(raised.value)
    assert "PinnedVersionGoneError" in f"{type(raised.value).__name__} {message}"
    assert ("model 'archive_vision' version 3 is no longer served at scripted:8500 (version 4 was published "
            "mid-run and the server unloaded version 3; versions served now: 4)") in message
    assert "Rerun the job" in message and "model_version_policy { latest { num_versions: 2 } }" in message
    assert "NOT_FOUND: Servable not found for request: Specific(archive_vision, 3)" in message
    refused = [(version, n) for version, n, ok in scripted_server.predicts if not ok]
    assert refused == [(3, refused[0][1])]  # one refusal stops the run: no splitting down to single images
    assert refused[0][1] >= 1 and all(version == 3 for version, _, _ in scripted_server.predicts)
    errors_path = os.path.join(output, "errors.parquet")
    assert not os.path.exists(errors_path) or pq.read_table(errors_path).num_rows == 0


def test_remote_run_still_isolates_a_rejected_image_and_reconciles(tmp_path, scripted_server):
    archive, output = str(tmp_path / "archive"), str(tmp_path / "out")
    sf.write_turned_archive(archive, {f"scan{i}": 0 for i in range(6)})
    with open(os.path.join(archive, "black.png"), "wb") as f:
        f.write(encode_array(np.zeros((64, 64, 3), np.uint8), "PNG"))

    summary = run_score(["--input", archive, "--output", output, "--endpoint", "scripted:8500", "--batch-size",
                         "4"])

    rows = results_by_name(output)
    assert sorted(rows) == [f"scan{i}.png" for i in range(6)]
    assert all(r["decision"] == "ok" and r["model_version"] == 3 for r in rows.values())
    errors = pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    assert [(os.path.basename(e["uri"]), e["error_type"]) for e in errors] == [("black.png", "predict_failed")]
    assert "InvalidInputError" in errors[0]["message"] and "INVALID_ARGUMENT" in errors[0]["message"]
    assert all(version == 3 for version, _, _ in scripted_server.predicts)
    assert summary["counts"]["reconciled"] and summary["counts"]["inputs_failed"] == 1


def test_a_served_version_brings_its_own_policy_and_flags_override_it(tmp_path, scripted_server):
    """--endpoint needs no settings flag: score reads the served version's score_policy signature, decides under it
    (the scripted server answers upright at 0.97), and a decision flag given overrides that one field."""
    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {f"scan{i}": 0 for i in range(3)})
    scripted_server.policy_json = ScorePolicy(decision=DecisionPolicy(ok_threshold=0.98, rotate_threshold=0.9),
                                              origin="served").to_json()
    strict = str(tmp_path / "strict")

    summary = run_score(["--input", archive, "--output", strict, "--endpoint", "scripted:8500"])

    assert {(r["decision"], r["review_reason"]) for r in results_by_name(strict).values()} == {
        ("review", "orientation 0 confidence 0.97 < 0.98")}
    assert summary["policy"]["from"] == "archive_vision v3 at scripted:8500"
    assert summary["policy"]["decision_used"]["ok_threshold"] == 0.98 and summary["policy"]["origin"] == "served"
    told = str(tmp_path / "told")
    summary = run_score(["--input", archive, "--output", told, "--endpoint", "scripted:8500", "--ok-threshold", "0.9"])
    assert {r["decision"] for r in results_by_name(told).values()} == {"ok"}
    assert summary["policy"]["decision_used"]["ok_threshold"] == 0.9
    assert summary["policy"]["decision_used"]["rotate_threshold"] == 0.9  # the fields not given stay the model's
    assert summary["policy"]["decision"]["ok_threshold"] == 0.98  # what the model records is reported as recorded


def test_a_run_without_decision_flags_uses_the_models_recorded_policy(tmp_path, strict_export):
    """The export records rotate_threshold 0.95 (its trainer's score settings); the model is 0.93 sure of each turn:
    with no flag those pages go to review, and --rotate-threshold 0.9 overrides the model's threshold."""
    archive = str(tmp_path / "archive")
    turns = {"upright": 0, "turned90": 90, "turned180": 180, "turned270": 270}
    sf.write_turned_archive(archive, turns)
    recorded, told = str(tmp_path / "recorded"), str(tmp_path / "told")

    summary = run_score(["--input", archive, "--output", recorded, "--model", strict_export])

    rows = results_by_name(recorded)
    assert {name: rows[f"{name}.png"]["orientation_degrees"] for name in turns} == turns
    assert all(0.9 < r["orientation_confidence"] < 0.95 for r in rows.values())
    assert {name: rows[f"{name}.png"]["decision"] for name in turns} == {
        "upright": "ok", "turned90": "review", "turned180": "review", "turned270": "review"}
    assert rows["turned90.png"]["review_reason"] == "orientation 90 confidence 0.93 < 0.95"
    assert summary["policy"]["decision_used"]["rotate_threshold"] == 0.95
    assert summary["policy"]["origin"] == "tuned on val" and summary["policy"]["from"].endswith("5")

    summary = run_score(["--input", archive, "--output", told, "--model", strict_export, "--rotate-threshold", "0.9"])

    rows = results_by_name(told)
    assert {name: rows[f"{name}.png"]["decision"] for name in turns} == {
        "upright": "ok", "turned90": "auto_rotate", "turned180": "auto_rotate", "turned270": "auto_rotate"}
    assert summary["policy"]["decision_used"]["rotate_threshold"] == 0.9
    with open(os.path.join(told, "run.json")) as f:
        assert json.load(f)["options"]["decision_overrides"] == [["rotate_threshold", 0.9]]


def test_exported_models_config_keeps_the_previous_version_through_a_rollout(tmp_path):
    """serving.configs writes latest { num_versions: 2 }; the local server (like TF Serving) then keeps the
    version a run pinned loaded after the next one is published, and answers unpinned requests with the newest."""
    from serving import configs, server

    path = configs.write_models_config(str(tmp_path), "archive_vision", str(tmp_path / "archive_vision"))
    (entry,) = configs.read_models_config(path).model_config_list.config
    assert entry.model_version_policy.latest.num_versions == configs.SERVED_VERSIONS == 2
    (model,) = server.model_entries(server._parse_args(["--model_config_file", path]))
    assert model.wanted([3, 4]) == [3, 4] and model.wanted([3, 4, 5]) == [4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["default_latest_1", "exported_models_config"])
def test_publishing_a_version_mid_run_on_the_local_server(tmp_path, red_corner_export, monkeypatch, policy):
    """The real local server: version 4 is published after the run pinned version 3. With TF Serving's default
    policy version 3 is unloaded and the run fails with the clear error (no error row per image); with the
    models.config serving.configs writes, version 3 stays loaded and the run finishes on it."""
    from archive_vision.demo import LocalServer
    from serving import configs
    from serving.client import GrpcModelServerClient

    base = str(tmp_path / "models")
    shutil.copytree(os.path.join(red_corner_export, "archive_vision"), os.path.join(base, "archive_vision"))
    flags = ["--file_system_poll_wait_seconds", "0.2"]
    if policy == "exported_models_config":
        flags += ["--model_config_file",
                  configs.write_models_config(base, "archive_vision", os.path.join(base, "archive_vision"))]
    archive, output = str(tmp_path / "archive"), str(tmp_path / "out")
    sf.write_turned_archive(archive, {"upright": 0, "turned90": 90, "turned180": 180, "turned270": 270})
    launch = score.remote_model_info

    with LocalServer(os.path.join(base, "archive_vision"), "archive_vision", str(tmp_path / "server.log"),
                     threads=1, extra_flags=flags) as server:
        server.wait_until_available(120)

        def launch_then_publish(opts):
            model = launch(opts)  # the run pins version 3 here
            hidden = os.path.join(base, "archive_vision", ".publishing")
            shutil.copytree(os.path.join(base, "archive_vision", "3"), hidden)
            os.rename(hidden, os.path.join(base, "archive_vision", "4"))  # atomically, as serving.export does
            wanted = {3: "END" if policy == "default_latest_1" else "AVAILABLE", 4: "AVAILABLE"}
            with GrpcModelServerClient(server.address, "archive_vision", timeout_s=5.0) as client:
                deadline, states = time.monotonic() + 60, {}
                while states != wanted and time.monotonic() < deadline:
                    time.sleep(0.2)
                    states = client._rpc_model_states(5.0)
                assert states == wanted, server.log()[-3000:]
                assert int(client.metadata()["version"]) == 4  # requests that name no version get the newest
            return model

        monkeypatch.setattr(score, "remote_model_info", launch_then_publish)
        args = ["--input", archive, "--output", output, "--endpoint", server.address, "--batch-size", "2"]
        if policy == "default_latest_1":
            with pytest.raises(score.PinnedVersionGoneError, match="version 3 is no longer served at .*version 4 "
                                                                   "was published mid-run.*num_versions: 2"):
                run_score(args)
            errors_path = os.path.join(output, "errors.parquet")
            assert not os.path.exists(errors_path) or pq.read_table(errors_path).num_rows == 0
        else:
            summary = run_score(args)
            rows = results_by_name(output)
            assert {n: r["orientation_degrees"] for n, r in rows.items()} == {
                "upright.png": 0, "turned90.png": 90, "turned180.png": 180, "turned270.png": 270}
            assert all(r["model_version"] == 3 for r in rows.values())
            assert summary["counts"]["reconciled"] and summary["counts"]["errors"] == 0


@pytest.mark.slow
def test_local_grpc_server_and_in_process_write_the_same_rows(tmp_path):
    """The same folder scored in-process (--model) and through `archive-vision serve`'s server (--endpoint) writes
    the same rows: both send the same bytes to the same graph, which computes the whole answer (turned copies of
    the unsure images, their text crops, the fusion), and decide under the same recorded policy, read from the
    export in one case and over gRPC from the served version in the other."""
    from archive_vision.demo import LocalServer

    archive = str(tmp_path / "archive")
    sf.random_photos(archive, 6)
    sf.write_turned_archive(archive, {"asym90": 90, "asym180": 180}, fmt="JPEG", ext="jpg")
    sf.write_turned_archive(archive, {"asym0": 0})  # PNG
    with open(os.path.join(archive, "asym270.tif"), "wb") as f:  # sent as a PNG of its pixels
        f.write(encode_array(sf.turned(make_asymmetric_image(), 270), "TIFF"))
    sf.write_bad_files(archive)
    # The tiny model is unsure of everything (~0.27): every image is turned and its crops counted, so the gates are
    # set at the median of its confidences to send some images each way.
    probe = str(tmp_path / "probe")
    run_score(["--input", archive, "--output", probe, "--model", _tiny_export(tmp_path, 1, name="plain")])
    confidences = sorted(r["orientation_confidence"] for r in results_by_name(probe).values())
    gate = float(np.median(confidences))
    settings = {"tta": True, "tta_below": gate, "rotate_threshold": 0.26, "readers": ["text_crops"],
                "text_crops": {"below": gate, "agree": 2, "sure": 0.5, "weight": 0.7}}
    base = _tiny_export(tmp_path, 7, settings)
    local_out, remote_out = str(tmp_path / "local"), str(tmp_path / "remote")

    local = run_score(["--input", archive, "--output", local_out, "--model", base, "--batch-size", "4"])
    with LocalServer(os.path.join(base, "archive_vision"), "archive_vision", str(tmp_path / "server.log"),
                     threads=1) as server:
        server.wait_until_available(120)
        remote = run_score(["--input", archive, "--output", remote_out, "--endpoint", server.address,
                            "--batch-size", "3"])

    local_rows, remote_rows = results_by_name(local_out), results_by_name(remote_out)
    assert sorted(local_rows) == sorted(remote_rows) and len(local_rows) == 10
    floats = ("orientation_probabilities", "class_probabilities", "orientation_confidence", "class_confidence")
    for name, row in local_rows.items():
        other = remote_rows[name]
        for key in ("orientation_degrees", "decision", "review_reason", "tta_agreement", "text_crops", "class_name",
                    "class_id", "sha256", "model_name", "model_version", "format", "width", "height"):
            assert row[key] == other[key], (name, key, row[key], other[key])
        for key in floats:
            np.testing.assert_allclose(row[key], other[key], atol=1e-5, err_msg=f"{name} {key}")
    # The graph's gates did something both ways, so the comparison covers them.
    values = list(local_rows.values())
    assert {r["tta_agreement"] is None for r in values} == {True, False}
    assert {r["text_crops"] for r in values} >= {1} and {r["decision"] for r in values} >= {"review"}
    assert local["model"]["mode"] == "in_process" and remote["model"]["mode"] == "grpc"
    assert local["counts"]["errors"] == remote["counts"]["errors"] == 3
    assert remote["counts"]["reconciled"] and remote["model"]["version"] == 7
    assert local["policy"]["decision_used"] == remote["policy"]["decision_used"]
    assert remote["policy"]["decision_used"]["rotate_threshold"] == 0.26
    assert remote["policy"]["from"] == f"archive_vision v7 at {server.address}"
    assert {k: local["tta"][k] for k in ("images", "single_copy")} == \
        {k: remote["tta"][k] for k in ("images", "single_copy")}
    assert local["counts"]["pages_sent_as_file"] == remote["counts"]["pages_sent_as_file"] == 9  # not the TIFF


def test_pages_of_a_tiff_and_an_exif_turned_jpeg_are_scored_as_displayed(tmp_path, red_corner_export):
    from tests.image_factory import jpeg_with_exif_orientation, multipage_tiff

    archive = str(tmp_path / "archive")
    os.makedirs(archive)
    upright = make_asymmetric_image(128, 160)
    with open(os.path.join(archive, "two_pages.tif"), "wb") as f:
        f.write(multipage_tiff([Image.fromarray(upright), Image.fromarray(sf.turned(upright, 180))]))
    # Stored pixels turned 270 with EXIF 6 ("show turned 90 clockwise"): displayed upright, so it is ok.
    with open(os.path.join(archive, "exif_upright.jpg"), "wb") as f:
        f.write(jpeg_with_exif_orientation(sf.turned(upright, 270), 6))
    # Stored upright, EXIF 6: displayed turned 90 clockwise, which the copy must undo.
    with open(os.path.join(archive, "exif_turned.jpg"), "wb") as f:
        f.write(jpeg_with_exif_orientation(upright, 6))
    output, fixed = str(tmp_path / "out"), str(tmp_path / "fixed")

    run_score(["--input", archive, "--output", output, "--model", red_corner_export, "--write-corrected", fixed])

    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    seen = {(os.path.basename(r["uri"]), r["page"]): (r["orientation_degrees"], r["decision"]) for r in rows}
    assert seen == {("two_pages.tif", 0): (0, "ok"), ("two_pages.tif", 1): (180, "auto_rotate"),
                    ("exif_upright.jpg", 0): (0, "ok"), ("exif_turned.jpg", 0): (90, "auto_rotate")}
    page_copy = np.asarray(Image.open(os.path.join(fixed, "two_pages.page1.tif")).convert("RGB"))
    assert np.array_equal(page_copy, upright)
    exif_row = next(r for r in rows if r["uri"].endswith("exif_turned.jpg"))
    if shutil.which("jpegtran"):  # the EXIF turn folded into one lossless transform, the tag reset
        assert exif_row["corrected_method"] == "jpegtran_lossless"
    copy = Image.open(exif_row["corrected_uri"])
    assert copy.getexif().get(0x0112, 1) == 1
    exif_copy = np.asarray(ImageOps.exif_transpose(copy).convert("RGB")).astype(int)
    assert exif_copy.shape == upright.shape and np.abs(exif_copy - upright).mean() < 4


@pytest.mark.parametrize("exif", range(1, 9))
@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.skipif(shutil.which("jpegtran") is None, reason="jpegtran (libjpeg-turbo-progs) is not installed")
def test_lossless_jpeg_turn_matches_the_decoded_pixels(exif, degrees):
    """Every EXIF tag x every turn: the lossless copy shows what decoding + turning upright shows."""
    from tests.image_factory import jpeg_with_exif_orientation

    from pipelines import imaging

    data = jpeg_with_exif_orientation(make_asymmetric_image(64, 96), exif)
    expected = np.asarray(score.make_upright(next(imaging.decode_pages(data)).image, degrees)).astype(int)
    payload, _, method = score.upright_bytes(data, 0, degrees, "jpeg")
    assert method == "jpegtran_lossless"
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).convert("RGB")).astype(int)
    assert shown.shape == expected.shape and np.abs(shown - expected).mean() < 2


def test_a_run_losing_a_third_of_its_inputs_exits_3_after_writing_everything(tmp_path, red_corner_export, capfd,
                                                                             monkeypatch, restore_logging):
    """Exit 3 over --max-failed-fraction, with every table, run.json and the report written; 1.0 turns it off;
    each worker prints its progress line (done, rate, ETA), and -q keeps it quiet."""
    from pipelines import cli

    archive = str(tmp_path / "archive")
    sf.write_turned_archive(archive, {f"scan{i}": (90 * i) % 360 for i in range(6)})
    sf.write_bad_files(archive)  # three of nine inputs
    monkeypatch.setenv("ARCHIVE_VISION_PROGRESS_SECONDS", "0")
    output = tmp_path / "out"
    beam_flags = ["--direct_running_mode=in_memory"]
    code = score.main(["-q", "--input", archive, "--output", str(output), "--model", red_corner_export, *beam_flags])
    assert code == cli.EXIT_TOO_MANY_FAILED == 3
    assert {"results.parquet", "results.csv", "errors.parquet", "run.json", "report.html"} <= set(os.listdir(output))
    assert len(results_by_name(str(output))) == 6 and pq.read_table(output / "errors.parquet").num_rows == 3
    with open(output / "run.json") as f:
        run = json.load(f)
    assert run["counts"]["reconciled"] and run["options"]["max_failed_fraction"] == 0.05
    assert run["failed_inputs"] == {"inputs_failed": 3, "inputs": 9, "fraction": round(3 / 9, 6),
                                    "max_fraction": 0.05, "exceeded": True}
    printed = capfd.readouterr()
    assert "FAILED   3 of 9 inputs failed (33.3%)" in printed.out
    assert "[score worker" not in printed.err  # -q

    calm = tmp_path / "calm"
    assert score.main(["--input", archive, "--output", str(calm), "--model", red_corner_export, "--no-report",
                       "--max-failed-fraction", "1.0", *beam_flags]) == 0
    with open(calm / "run.json") as f:
        assert json.load(f)["failed_inputs"]["exceeded"] is False
    printed = capfd.readouterr()
    assert "FAILED" not in printed.out
    assert re.search(r"\[score worker \d+\] \d+ inputs done, [\d.]+ inputs/s; 9 listed for 1 worker, ETA \S+",
                     printed.err)


def test_score_help_lists_the_exit_codes_and_the_limit(capsys):
    with pytest.raises(SystemExit):
        score.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "3 too many failed inputs" in text and "--max-failed-fraction F" in text and "1.0 turns the check off" in text


@pytest.mark.parametrize("preset, seen", [((None, None), "131072 system system"),
                                          (("65536", "mimalloc"), "65536 mimalloc mimalloc")])
def test_beam_commands_make_their_worker_processes_return_freed_memory(preset, seen):
    """ingest and score call return_freed_memory before the runner starts: they and the processes they start (the
    DirectRunner's workers) get glibc's fixed trim threshold and Arrow's system allocator, unless the environment
    already chose them."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "ARROW_DEFAULT_MEMORY_POOL")}
    for name, value in zip(("MALLOC_TRIM_THRESHOLD_", "ARROW_DEFAULT_MEMORY_POOL"), preset):
        if value:
            env[name] = value
    child = ("import os, pyarrow; "
             "print(os.environ.get('MALLOC_TRIM_THRESHOLD_'), pyarrow.default_memory_pool().backend_name)")
    code = ("import subprocess, sys, pyarrow; from pipelines.cli import return_freed_memory; return_freed_memory(); "
            f"print(subprocess.check_output([sys.executable, '-c', {child!r}], text=True).strip(), "
            "pyarrow.default_memory_pool().backend_name)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == seen
