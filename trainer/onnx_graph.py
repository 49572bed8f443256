"""An ONNX CNN rebuilt as a TensorFlow computation from the file's weights, so it can live inside a SavedModel.

The text-crop classifier (trainer.text_crops: PaddleClas' PP-LCNet, an ONNX file run with onnxruntime) is wanted
inside the exported TF SavedModel, where neither onnxruntime nor py_function is available to the server. The ONNX
graph is small and uses few op types, so it is translated op by op into standard TF ops (Conv2D,
DepthwiseConv2dNative, BiasAdd, Mean, MatMul, Softmax, ...); `onnx` is needed only when building the net.

- Layout: the net takes and computes NHWC (TF's CPU kernels are channels-last). Every runtime tensor of rank 4 is a
  feature map held NHWC; constants meeting one are moved from NCHW to NHWC, and axis attributes are mapped.
- Weights become non-trainable tf.Variables held by the module, so a SavedModel keeps them once, for all traces.
- A BatchNormalization that directly follows a Conv is folded into the Conv's kernel and bias (exact maths).
- With `pixels` (PixelScaling), the net takes the pixels its caller has (e.g. RGB in [0, 255]) instead of the ONNX
  input, which is a per-channel scaling of them (e.g. BGR, ImageNet-normalised). When only ordinary Convs read the
  input, the scaling and the channel order are folded into their kernels, and the net subtracts the mean pixel
  once: a pad of zeros is then the mean pixel, which is what the ONNX input's zero pad is (exact maths). Else the
  input is computed as the ONNX file wants it, first.
- Shape arithmetic (Shape, Slice, Concat feeding Reshape) is done when building, on symbolic dims; the only Reshape
  of a feature map supported is the flatten of a [N, C, 1, 1] map, where NCHW and NHWC orders agree.
- Anything else (another op type, a grouped but not depthwise Conv, an other Reshape) raises rather than guessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from trainer.preprocessing import channelwise

_NHWC_AXIS = (0, 3, 1, 2)  # an NCHW axis -> the same axis in NHWC
_BINARY = {"Add": tf.add, "Sub": tf.subtract, "Mul": tf.multiply, "Div": tf.divide}
_BINARY_NP = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
Step = Tuple[Callable[..., tf.Tensor], Tuple[str, ...], str]


@dataclass(frozen=True)
class PixelScaling:
    """The ONNX input as a function of the caller's pixels: (pixels, channels reversed when `reverse_channels`,
    / `scale` - mean) / std, mean and std in the ONNX input's channel order."""
    scale: float
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    reverse_channels: bool = False

    def order(self) -> np.ndarray:
        """[C]: the pixel channel that each ONNX input channel is."""
        count = len(self.mean)
        return np.arange(count)[::-1].copy() if self.reverse_channels else np.arange(count)

    def onnx_input(self, pixels: tf.Tensor) -> tf.Tensor:
        """The ONNX input of NHWC pixels, step by step as the file's own preprocessing makes it."""
        if self.reverse_channels:
            pixels = tf.reverse(pixels, axis=[-1])
        return (pixels / self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


@dataclass(frozen=True)
class _Dim:
    """One dimension (ONNX axis order) of a runtime tensor, as an ONNX Shape op yields it: known when running."""
    tensor: str
    axis: int


class OnnxConvNet(tf.Module):
    """The rebuilt net: call it on float32 NHWC images [N, H, W, C] (the ONNX input's values, channels last, or the
    pixels they are a scaling of when built with from_onnx's `pixels`); it returns the ONNX output (a rank-4 output
    would come back NHWC)."""

    def __init__(self, steps: Sequence[Step], variables: Sequence[tf.Variable], input_name: str, output_name: str,
                 name: str = "onnx_conv_net"):
        super().__init__(name=name)
        self.weights = list(variables)  # tracked: tf.saved_model.save keeps them
        self._steps = tuple(steps)
        self._input, self._output = input_name, output_name

    @tf.autograph.experimental.do_not_convert  # a plain loop over the steps: nothing for autograph to rewrite
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        values = {self._input: tf.convert_to_tensor(images, tf.float32)}
        for fn, inputs, output in self._steps:
            values[output] = fn(*(values[name] for name in inputs))
        return values[self._output]


def from_onnx(path: str, pixels: Optional[PixelScaling] = None) -> OnnxConvNet:
    """The TF net of an ONNX CNN file with one float input [N, C, H, W] and one output; with `pixels`, of the pixels
    the ONNX input is a scaling of (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    static = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in static]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{path}: expected one input and one output, got {inputs} and {len(graph.output)}")
    outputs = {o.name for o in graph.output}
    consumers: Dict[str, List] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    net_input = inputs[0] if pixels is None else inputs[0] + ":pixels"
    builder = _Builder(static, opset, net_input)
    if pixels is not None:
        readers = consumers.get(inputs[0], [])
        if readers and all(n.op_type == "Conv" and _attrs(n).get("group", 1) == 1 for n in readers):
            builder.fold_pixels(net_input, inputs[0], pixels)
        else:
            builder.step(pixels.onnx_input, (net_input,), inputs[0], 4)
    folded = set()
    for node in graph.node:
        if id(node) in folded:
            continue
        attrs = _attrs(node)
        if node.op_type == "Constant":
            builder.static[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        if node.op_type == "Conv":
            after = consumers.get(node.output[0], [])
            bn = after[0] if len(after) == 1 and node.output[0] not in outputs else None
            if bn is not None and bn.op_type == "BatchNormalization" and builder.foldable(bn):
                folded.add(id(bn))
                builder.conv(node, attrs, bn, _attrs(bn).get("epsilon", 1e-5))
                continue
        handler = getattr(builder, "op_" + node.op_type, None)
        if handler is None:
            raise NotImplementedError(f"ONNX op {node.op_type} (node {node.name!r}) is not supported")
        handler(node, attrs)
    output = builder.resolve(graph.output[0].name)
    if output not in builder.rank:
        raise ValueError(f"{path}: the output {output!r} is not computed from the input")
    return OnnxConvNet(builder.steps, builder.variables, net_input, output)


def _attrs(node) -> dict:
    """An ONNX node's attributes by name, as Python values."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pointwise_of_vector(x: tf.Tensor, weight_shape: Sequence[int], strides: Sequence[int], pads) -> bool:
    """True where a Conv (OIHW `weight_shape`) is a matrix product: a 1 x 1 kernel, stride 1, no padding, on an input
    whose spatial size is 1 x 1 when traced."""
    return (tuple(weight_shape[2:]) == (1, 1) and tuple(strides) == (1, 1) and pads is None
            and tuple(x.shape[1:3]) == (1, 1))


def _fold_batch_norm(w: np.ndarray, b: np.ndarray, gamma, beta, mean, var, eps: float):
    """Conv weights [O, ...] and bias [O] with the following BatchNormalization folded in (float64 maths)."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    w = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b = (b.astype(np.float64) - mean) * scale + beta
    return w.astype(np.float32), b.astype(np.float32)


def _padding(attrs: dict, kernel: Sequence[int], node_name: str):
    """(explicit NHWC pads to apply first with tf.pad, or None; the TF padding then, 'SAME' or 'VALID').

    'SAME' is used only where it is exact: ONNX SAME_UPPER, or stride 1 with pads of half the dilated kernel on
    each side (a depthwise convolution at stride 2 also, with its kernel grown: same_when_grown, in the caller).
    Other pads go through tf.pad, not the ops' explicit padding: TF 2.21's grappler aborts the process in
    DepthwiseConv2dNative's shape function when that op has explicit paddings."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("VALID", "SAME_UPPER"):
        return None, auto_pad[:4]
    if auto_pad != "NOTSET":
        raise NotImplementedError(f"Conv {node_name!r}: auto_pad {auto_pad} is not supported")
    top, left, bottom, right = attrs.get("pads", (0, 0, 0, 0))
    if not any((top, left, bottom, right)):
        return None, "VALID"
    strides, dilations = attrs.get("strides", (1, 1)), attrs.get("dilations", (1, 1))
    half = [(k - 1) * d / 2 for k, d in zip(kernel, dilations)]
    if tuple(strides) == (1, 1) and [top, left] == [bottom, right] == half:
        return None, "SAME"
    return [[0, 0], [top, bottom], [left, right], [0, 0]], "VALID"


def same_when_grown(strides: Sequence[int], dilations: Sequence[int], kernel: Sequence[int],
                    pads: Sequence[Sequence[int]]) -> bool:
    """Whether a 2-D convolution padded by `pads` ((before, after) per spatial axis) first equals TF's 'SAME'
    convolution with the kernel grown by a zero row and column at its end: stride 2, no dilation, an odd kernel k and
    pads of (k - 1) / 2 on every side. SAME at stride 2 pads k - 1 (even size) or k (odd size) in all, the smaller
    half first; with k + 1 taps that is (k - 1) / 2 before, and each window's last row and column meet the zero taps.
    For a depthwise convolution, which grappler cannot fuse with a pad, this saves the copy of the whole feature map
    the pad makes (the outputs the same up to summation order). Used here and by trainer.inference's fold."""
    return (tuple(strides) == (2, 2) and tuple(dilations) == (1, 1) and all(k % 2 == 1 for k in kernel)
            and tuple(map(tuple, pads)) == tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel))


def grown_kernel(kernel: np.ndarray, spatial: Tuple[int, int]) -> np.ndarray:
    """`kernel` with a zero row and column added at the end of its two spatial axes (same_when_grown)."""
    widths = [(0, 0)] * kernel.ndim
    widths[spatial[0]] = widths[spatial[1]] = (0, 1)
    return np.pad(kernel, widths)


class _Builder:
    """Turns ONNX nodes into runtime steps. `static` holds values known when building (weights, symbolic shapes,
    as numpy arrays); `rank` holds the ranks of runtime tensors; `alias` maps Identity outputs to their inputs."""

    def __init__(self, static: Dict[str, np.ndarray], opset: int, input_name: str):
        self.static, self.opset = static, opset
        self.rank = {input_name: 4}
        self.alias: Dict[str, str] = {}
        self.steps: List[Step] = []
        self.variables: List[tf.Variable] = []
        self.pixels: Optional[Tuple[str, PixelScaling]] = None  # (the centred pixels' name, their scaling)

    def fold_pixels(self, pixels_name: str, onnx_input: str, pixels: PixelScaling) -> None:
        """The Convs that read `onnx_input` read the mean-centred pixels instead, their kernels scaled and their
        input channels put in the pixels' order (conv()): one subtraction replaces the whole scaling."""
        order = pixels.order()
        mean_pixel = np.empty(len(order), np.float64)
        mean_pixel[order] = np.asarray(pixels.mean, np.float64) * pixels.scale
        shift = self.variable(mean_pixel, "mean_pixel")
        centred = onnx_input + ":centred"
        self.step(lambda x: channelwise(x, tf.subtract, shift), (pixels_name,), centred, 4)
        self.alias[onnx_input] = centred
        self.pixels = (centred, pixels)

    def resolve(self, name: str) -> str:
        return self.alias.get(name, name)

    def const(self, name: str, node) -> np.ndarray:
        name = self.resolve(name)
        if name not in self.static:
            raise NotImplementedError(f"{node.op_type} {node.name!r}: input {name!r} must be a constant")
        return self.static[name]

    def foldable(self, bn) -> bool:
        return len(bn.output) == 1 and all(self.resolve(n) in self.static for n in bn.input[1:5])

    def variable(self, array: np.ndarray, name: str) -> tf.Variable:
        v = tf.Variable(np.asarray(array, np.float32), trainable=False, name=f"w{len(self.variables)}_{name}")
        self.variables.append(v)
        return v

    def step(self, fn: Callable[..., tf.Tensor], inputs: Sequence[str], output: str, rank: int) -> None:
        inputs = tuple(self.resolve(n) for n in inputs)
        for name in inputs:
            if name not in self.rank:
                raise NotImplementedError(f"input {name!r} of {output!r} is not a runtime tensor")
        self.steps.append((fn, inputs, output))
        self.rank[output] = rank

    def _is_static(self, name: str) -> bool:
        return self.resolve(name) in self.static

    def _runtime_axis(self, name: str, axis: int) -> int:
        rank = self.rank[self.resolve(name)]
        axis = axis % rank
        return _NHWC_AXIS[axis] if rank == 4 else axis

    # -- ops ----------------------------------------------------------------------------------------------------
    def conv(self, node, attrs: dict, bn=None, eps: float = 1e-5) -> None:
        w = self.const(node.input[1], node).astype(np.float32)
        if w.ndim != 4:
            raise NotImplementedError(f"Conv {node.name!r}: only 2-D convolutions are supported, weight {w.shape}")
        has_bias = len(node.input) > 2 and node.input[2]
        b = self.const(node.input[2], node).astype(np.float32) if has_bias else np.zeros(w.shape[0], np.float32)
        output = node.output[0]
        if bn is not None:
            w, b = _fold_batch_norm(w, b, *(self.const(n, bn) for n in bn.input[1:5]), eps)
            output = bn.output[0]
        if self.pixels is not None and self.resolve(node.input[0]) == self.pixels[0]:
            # input channel c of the ONNX file is pixel channel order[c], divided by scale * std[c]
            scaling = self.pixels[1]
            if not w.shape[1] == len(scaling.mean) == len(scaling.std):
                raise ValueError(f"Conv {node.name!r} reads {w.shape[1]} input channels; the pixel scaling has "
                                 f"{len(scaling.mean)} means and {len(scaling.std)} stds")
            per_channel = w.astype(np.float64) / (scaling.scale * np.asarray(scaling.std, np.float64))[None, :, None,
                                                                                                         None]
            w = np.empty_like(per_channel)
            w[:, scaling.order()] = per_channel
            w = w.astype(np.float32)
        group = attrs.get("group", 1)
        strides = list(attrs.get("strides", (1, 1)))
        dilations = list(attrs.get("dilations", (1, 1)))
        pads, padding = _padding(attrs, w.shape[2:], node.name)
        if group == 1:
            kernel = self.variable(w.transpose(2, 3, 1, 0), "kernel")  # OIHW -> HWIO

            def run(x, bias, kernel=kernel):
                if _pointwise_of_vector(x, w.shape, strides, pads):
                    # [N, 1, 1, C] (after a global pool: the squeeze-excite and head convolutions) as a matrix
                    # product: oneDNN's convolution costs about 0.1 ms a sample here (a 512 -> 1280 head), the
                    # product a third of that (the same sums in another order: the head's outputs within 5e-6,
                    # the classifier's probabilities within 1e-7)
                    product = tf.matmul(tf.reshape(x, [-1, w.shape[1]]), tf.reshape(kernel, w.shape[1::-1]))
                    return tf.reshape(tf.nn.bias_add(product, bias), [-1, 1, 1, w.shape[0]])
                return tf.nn.bias_add(tf.nn.conv2d(x, kernel, [1] + strides + [1], padding, dilations=dilations),
                                      bias)
        elif w.shape[1] == 1 and w.shape[0] == group:  # depthwise: one filter per input channel
            top, left, bottom, right = attrs.get("pads", (0, 0, 0, 0))
            if pads is not None and same_when_grown(attrs.get("strides", (1, 1)), attrs.get("dilations", (1, 1)),
                                                    w.shape[2:], ((top, bottom), (left, right))):
                w, pads, padding = grown_kernel(w, (2, 3)), None, "SAME"
            kernel = self.variable(w.transpose(2, 3, 0, 1), "depthwise_kernel")  # [C, 1, H, W] -> [H, W, C, 1]

            def run(x, bias, kernel=kernel):
                return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, kernel, [1] + strides + [1], padding,
                                                             dilations=dilations), bias)
        else:
            raise NotImplementedError(f"Conv {node.name!r}: group={group} with weight {w.shape} (only ordinary "
                                      f"and depthwise convolutions are supported)")
        bias = self.variable(b, "bias")
        self.step(lambda x: run(x if pads is None else tf.pad(x, pads), bias), node.input[:1], output, 4)

    def op_Conv(self, node, attrs: dict) -> None:
        self.conv(node, attrs)

    def op_BatchNormalization(self, node, attrs: dict) -> None:
        """A BN not folded into a Conv: a per-channel scale and shift (channel axis last for NHWC and [N, C])."""
        gamma, beta, mean, var = (self.const(n, node).astype(np.float64) for n in node.input[1:5])
        if self.rank[self.resolve(node.input[0])] not in (2, 4) or len(node.output) != 1:
            raise NotImplementedError(f"BatchNormalization {node.name!r}: only inference on [N, C] or NCHW")
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        scale_v, shift_v = self.variable(scale, "bn_scale"), self.variable(beta - mean * scale, "bn_shift")
        self.step(lambda x: x * scale_v + shift_v, node.input[:1], node.output[0], self.rank[node.input[0]])

    def op_Identity(self, node, attrs: dict) -> None:
        source = self.resolve(node.input[0])
        if source in self.static:
            self.static[node.output[0]] = self.static[source]
        else:
            self.alias[node.output[0]] = source

    def _unary(self, node, fn: Callable[[tf.Tensor], tf.Tensor]) -> None:
        self.step(fn, node.input[:1], node.output[0], self.rank[self.resolve(node.input[0])])

    def op_Relu(self, node, attrs: dict) -> None:
        self._unary(node, tf.nn.relu)

    def op_HardSwish(self, node, attrs: dict) -> None:
        self._unary(node, lambda x: x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0))

    def op_HardSigmoid(self, node, attrs: dict) -> None:
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        self._unary(node, lambda x: tf.clip_by_value(alpha * x + beta, 0.0, 1.0))

    def op_GlobalAveragePool(self, node, attrs: dict) -> None:
        if self.rank[self.resolve(node.input[0])] != 4:
            raise NotImplementedError(f"GlobalAveragePool {node.name!r}: only on NCHW feature maps")
        self._unary(node, lambda x: tf.reduce_mean(x, axis=[1, 2], keepdims=True))

    def op_Softmax(self, node, attrs: dict) -> None:
        rank = self.rank[self.resolve(node.input[0])]
        axis = attrs.get("axis", -1 if self.opset >= 13 else 1) % rank
        if self.opset < 13 and axis != rank - 1:  # before opset 13 Softmax flattened the axes from `axis` on
            raise NotImplementedError(f"Softmax {node.name!r}: opset {self.opset} with axis {axis} of rank {rank}")
        self._unary(node, lambda x, axis=self._runtime_axis(node.input[0], axis): tf.nn.softmax(x, axis=axis))

    def _binary(self, node) -> None:
        a, b = node.input[:2]
        if self._is_static(a) and self._is_static(b):
            self.static[node.output[0]] = _BINARY_NP[node.op_type](self.const(a, node), self.const(b, node))
            return
        fn = _BINARY[node.op_type]
        if not self._is_static(a) and not self._is_static(b):
            ranks = {self.rank[self.resolve(a)], self.rank[self.resolve(b)]}
            if len(ranks) > 1 and 4 in ranks:
                raise NotImplementedError(f"{node.op_type} {node.name!r}: a feature map with a tensor of rank "
                                          f"{min(ranks)} (their broadcast differs in NHWC)")
            self.step(fn, (a, b), node.output[0], max(ranks))
            return
        runtime, constant = (b, a) if self._is_static(a) else (a, b)
        rank, value = self.rank[self.resolve(runtime)], self.const(constant, node)
        if value.ndim > rank:
            raise NotImplementedError(f"{node.op_type} {node.name!r}: constant {value.shape} outranks its operand")
        if rank == 4:  # NCHW-broadcast constant ([C, 1, 1], [1, C, 1, 1], scalar, ...) -> NHWC
            value = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(0, 2, 3, 1)
        v = self.variable(value, node.op_type.lower())
        step = (lambda x: fn(x, v)) if runtime == a else (lambda x: fn(v, x))
        self.step(step, (runtime,), node.output[0], rank)

    op_Add = op_Sub = op_Mul = op_Div = lambda self, node, attrs: self._binary(node)

    def op_MatMul(self, node, attrs: dict) -> None:
        rank = self.rank.get(self.resolve(node.input[0]))
        if rank in (None, 4) or self._is_static(node.input[0]) or not self._is_static(node.input[1]):
            raise NotImplementedError(f"MatMul {node.name!r}: only a runtime [N, K] times a constant matrix")
        weight = self.variable(self.const(node.input[1], node), "matmul")
        self.step(lambda x: tf.matmul(x, weight), node.input[:1], node.output[0], rank)

    def op_Shape(self, node, attrs: dict) -> None:
        name = self.resolve(node.input[0])
        dims = np.array([_Dim(name, axis) for axis in range(self.rank[name])], dtype=object)
        self.static[node.output[0]] = dims[attrs.get("start", 0):attrs.get("end", len(dims))]

    def op_Slice(self, node, attrs: dict) -> None:
        if self.opset < 10:
            raise NotImplementedError(f"Slice {node.name!r}: opset {self.opset} (attributes) is not supported")
        data = self.const(node.input[0], node)
        starts, ends, axes, steps = ([self.const(n, node) if n else None for n in node.input[1:5]] + [None] * 2)[:4]
        axes = range(len(starts)) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        index = [slice(None)] * data.ndim
        for start, end, axis, stride in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(end), int(stride))
        self.static[node.output[0]] = data[tuple(index)]

    def op_Concat(self, node, attrs: dict) -> None:
        axis = attrs["axis"]
        if all(self._is_static(n) for n in node.input):
            self.static[node.output[0]] = np.concatenate([self.const(n, node) for n in node.input], axis)
        elif any(self._is_static(n) for n in node.input):
            raise NotImplementedError(f"Concat {node.name!r}: of runtime tensors and constants")
        else:
            self.step(lambda *xs, axis=self._runtime_axis(node.input[0], axis): tf.concat(xs, axis), node.input,
                      node.output[0], self.rank[self.resolve(node.input[0])])

    def op_Reshape(self, node, attrs: dict) -> None:
        """Only the flatten of a [N, C, 1, 1] feature map to [N, C] (same element order in NCHW and NHWC)."""
        name, target = self.resolve(node.input[0]), list(self.const(node.input[1], node))
        flatten = (self.rank.get(name) == 4 and len(target) == 2 and target[0] in (0, _Dim(name, 0))
                   and isinstance(target[1], (int, np.integer)) and target[1] != 0)
        if not flatten:
            raise NotImplementedError(f"Reshape {node.name!r} to {target}: only the flatten of an [N, C, 1, 1] "
                                      f"feature map to [N, C] is supported")
        width = int(target[1])

        def run(x):
            if tuple(x.shape[1:3]) != (1, 1):
                raise NotImplementedError(f"Reshape {node.name!r}: spatial dims {tuple(x.shape[1:3])}, not 1x1")
            return tf.reshape(x, tf.stack([tf.shape(x)[0], width]))
        self.step(run, (name,), node.output[0], 2)
