"""`archive-vision publish`: a good version is validated in the local server and copied whole; a version whose
answers differ from those its export recorded, or that lacks a signature, is refused (exit 3) and nothing copied."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from archive_vision import cli
from serving import export, publish
from tests.score_fixtures import encode_array, make_asymmetric_image, make_red_corner_model, turned
from tests.test_infra_gcs import BUCKET, bucket, emulator  # noqa: F401 - fixtures
from tests.test_serving_export import limit_tf_threads

pytestmark = pytest.mark.slow
IMAGE_SIZE = 32
MODEL = "redcorner"

limit_tf_threads()


def tree(root: str) -> set:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return export.export_model(make_red_corner_model(IMAGE_SIZE), str(base), model_name=MODEL,
                               class_names=["photo", "document"], image_size=IMAGE_SIZE, version=7)


def copy_of(version_dir: str, tmp_path) -> str:
    target = tmp_path / "copy" / MODEL / os.path.basename(version_dir)
    shutil.copytree(version_dir, target)
    return str(target)


def test_export_records_its_canary_answers(version_dir):
    with open(os.path.join(version_dir, "assets.extra", export.CANARY_ANSWERS)) as f:
        recorded = json.load(f)
    assert recorded["signature"] == "serving_default"
    answers = recorded["answers"]
    assert set(answers) == set(export.canary_images(IMAGE_SIZE))
    for name, answer in answers.items():
        assert os.path.isfile(os.path.join(version_dir, "assets.extra", export.CANARY_DIR, name))
        assert len(answer["orientation_probabilities"]) == 4
        assert answer["decision"] in ("auto_rotate", "ok", "review")


def test_publish_copies_a_good_version_whole(version_dir, tmp_path, capsys):
    canary = tmp_path / "canary"
    canary.mkdir()
    for degrees in (0, 90):
        (canary / f"turned_{degrees}.png").write_bytes(encode_array(turned(make_asymmetric_image(), degrees), "PNG"))
    base = tmp_path / "served" / MODEL
    code = cli.main(["publish", "--version-dir", version_dir, "--to", str(base), "--canary", str(canary), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    target = base / os.path.basename(version_dir)
    assert captured.out.strip() == str(target)
    files = tree(str(target))
    assert files == tree(version_dir)
    for must in ("saved_model.pb", "variables/variables.index", "assets.extra/tf_serving_warmup_requests",
                 "assets.extra/canary_answers.json", "assets.extra/archive_vision_export.json"):
        assert must in files
    assert os.listdir(base) == [os.path.basename(version_dir)]  # no temporary folder left behind

    # the same version again is a usage error, and the published copy is untouched
    assert cli.main(["publish", "--version-dir", version_dir, "--to", str(base)]) == 2
    assert tree(str(target)) == files


def test_tampered_canary_answers_are_refused(version_dir, tmp_path, capsys):
    bad = copy_of(version_dir, tmp_path)
    path = os.path.join(bad, "assets.extra", export.CANARY_ANSWERS)
    with open(path) as f:
        recorded = json.load(f)
    name = sorted(recorded["answers"])[0]
    probs = recorded["answers"][name]["orientation_probabilities"]
    recorded["answers"][name]["orientation_probabilities"] = [p + (0.01 if i == 0 else -0.01 / 3)
                                                              for i, p in enumerate(probs)]
    with open(path, "w") as f:
        json.dump(recorded, f)
    base = tmp_path / "served"
    code = cli.main(["publish", "--version-dir", bad, "--to", str(base), "-q"])
    err = capsys.readouterr().err
    assert code == publish.EXIT_REFUSED
    assert "canary answer(s) differ" in err and name in err
    assert not base.exists() or not os.listdir(base)


def test_a_version_without_score_policy_is_refused(version_dir, tmp_path, capsys):
    from tensorflow.core.protobuf import saved_model_pb2

    bad = copy_of(version_dir, tmp_path)
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(bad, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    del saved.meta_graphs[0].signature_def["score_policy"]
    with open(os.path.join(bad, "saved_model.pb"), "wb") as f:
        f.write(saved.SerializeToString())
    base = tmp_path / "served"
    assert cli.main(["publish", "--version-dir", bad, "--to", str(base)]) == publish.EXIT_REFUSED
    assert "no 'score_policy' signature" in capsys.readouterr().err
    assert not base.exists()


def test_usage_errors_exit_2(tmp_path, version_dir):
    assert cli.main(["publish", "--version-dir", str(tmp_path / "nothing" / "1"), "--to", str(tmp_path)]) == 2
    assert cli.main(["publish", "--version-dir", version_dir, "--to", str(tmp_path),
                     "--canary", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as stop:
        cli.main(["publish", "--to", str(tmp_path)])
    assert stop.value.code == 2


def test_answer_differences():
    want = {"decision": "ok", "orientation_probabilities": [0.9, 0.05, 0.03, 0.02]}
    assert publish.answer_differences("a", want, dict(want), "recorded") == []
    near = dict(want, orientation_probabilities=[0.900005, 0.05, 0.03, 0.02])
    assert publish.answer_differences("a", want, near, "recorded") == []
    far = dict(want, orientation_probabilities=[0.9001, 0.05, 0.03, 0.02])
    assert publish.answer_differences("a", want, far, "recorded")
    assert publish.answer_differences("a", want, dict(want, decision="review"), "recorded")


def test_publish_to_gcs_writes_saved_model_pb_last(version_dir, emulator, bucket, capsys, monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    written = []
    create = FileSystems.create
    monkeypatch.setattr(FileSystems, "create", staticmethod(lambda path, *a, **k: written.append(path)
                                                            or create(path, *a, **k)))
    to = f"gs://{BUCKET}/models/{MODEL}"
    code = cli.main(["publish", "--version-dir", version_dir, "--to", to, "-q"])
    assert code == 0, capsys.readouterr().err
    version = os.path.basename(version_dir)
    assert written[-1] == f"{to}/{version}/saved_model.pb"
    names = {b.name for b in bucket.list_blobs(prefix=f"models/{MODEL}/{version}/")}
    assert names == {f"models/{MODEL}/{version}/{rel}" for rel in tree(version_dir)}
    assert cli.main(["publish", "--version-dir", version_dir, "--to", to]) == 2  # never overwritten
