"""Inference-only rewrites of a trained Keras model: what export and in-process scoring run.

`fold_batch_norms` folds every BatchNormalization that directly follows a linear Conv2D / DepthwiseConv2D
into that convolution's kernel and bias (the classic "fold batch norms" of TF's optimize_for_inference, done
on the Keras graph because Keras 3 emits BatchNormalization as plain multiply/add ops that Grappler does not
fold). In inference BN is the per-channel affine map y = (x - mean) * gamma / sqrt(var + eps) + beta, so

    kernel' = kernel * scale,  bias' = (bias - mean) * scale + beta,  scale = gamma / sqrt(var + eps)

gives the same outputs up to float rounding with two fewer passes over every activation map. On the shipped
MobileNetV2 (52 BNs) this takes the model from about 16 to 11 ms per image on one core (research/quality.py
prints the ratio). The pad before each of torchvision's stride-2 depthwise convolutions is folded the same way,
into a 'SAME' convolution with a kernel one larger (_padded_depthwise). Training never uses the folded model: it
shares the unfolded layers' variables and has no BN statistics left to update.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def _passthrough_layer():
    import keras

    class Folded(keras.layers.Layer):
        """What is left of a layer folded into the convolution next to it: a BatchNormalization whose affine map
        moved into the convolution before it, a pad the convolution after it now makes itself."""

        def call(self, inputs, mask=None, training=None):  # noqa: ARG002 - BN's call signature
            return inputs

    return Folded


def _per_channel_rescaling(layer) -> bool:
    """A Rescaling of channels-last images whose scale and offset are vectors of one value per channel
    (torchvision's ImageNet mean and std)."""
    import keras

    if not isinstance(layer, keras.layers.Rescaling) or keras.config.image_data_format() != "channels_last":
        return False
    shape = layer.input.shape
    return (len(shape) == 4 and shape[-1] is not None and np.ndim(layer.scale) == np.ndim(layer.offset) == 1
            and len(layer.scale) == len(layer.offset) == shape[-1])


def _row_rescaling(layer):
    """The same Rescaling (x * scale + offset in its compute dtype, bit for bit), computed row by row
    (trainer.preprocessing.channelwise: TF's broadcast over 3 channels is about three times slower)."""
    import keras
    import tensorflow as tf

    from trainer.preprocessing import channelwise

    # float64, as the Python numbers Rescaling casts to its compute dtype
    scale, offset = np.asarray(layer.scale, np.float64), np.asarray(layer.offset, np.float64)

    class RowRescaling(keras.layers.Layer):
        def call(self, inputs):
            dtype = self.compute_dtype
            return channelwise(tf.cast(inputs, dtype), lambda rows, s, o: rows * s + o, tf.cast(scale, dtype),
                               tf.cast(offset, dtype))

    return RowRescaling(name=layer.name, dtype=layer.dtype_policy)


def _edges(model):
    """(edges [(source, consumer)], {id(layer): how many inputs it feeds}, {id(layer) of the model's outputs})."""
    import keras

    if isinstance(model, keras.Sequential):
        edges = list(zip(model.layers, model.layers[1:]))
        consumers = {id(a): 1 for a, _ in edges}
    else:
        # Keras keeps the graph in each layer's inbound nodes (one node per call of the layer in a model).
        # model.operations, not model.layers: a raw keras.ops call (x * 0.1, ops.add) consumes a tensor too.
        edges, consumers = [], {}
        for layer in model.operations:
            for node in layer._inbound_nodes:  # noqa: SLF001 - Keras 3 has no public graph walk
                for tensor in node.input_tensors:
                    source = tensor._keras_history.operation  # noqa: SLF001
                    consumers[id(source)] = consumers.get(id(source), 0) + 1
                    edges.append((source, layer))
    return edges, consumers, {id(t._keras_history.operation) for t in model.outputs}  # noqa: SLF001


def _single(layer, consumers, outputs) -> bool:
    """`layer` is called once and its output feeds exactly one input (and is not a model output)."""
    return (len(layer._inbound_nodes) <= 1 and consumers.get(id(layer), 0) == 1  # noqa: SLF001
            and id(layer) not in outputs)


def _foldable_pairs(model) -> Dict[int, Tuple[object, object]]:
    """{id(conv): (conv, bn)} for each BN fed only by a linear, channels-last conv used once in `model`."""
    import keras

    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)  # exactly these: a subclass may change the kernel
    edges, consumers, outputs = _edges(model)
    pairs = {}
    for conv, bn in edges:
        if not (type(conv) in convs and isinstance(bn, keras.layers.BatchNormalization)
                and not getattr(conv, "lora_enabled", False)):
            continue
        linear = conv.activation in (None, keras.activations.linear)
        channels_last = conv.data_format == "channels_last" and bn.axis in (-1, 3, [3], [-1])
        single = _single(conv, consumers, outputs) and len(bn._inbound_nodes) <= 1  # noqa: SLF001
        if linear and channels_last and single:
            pairs[id(conv)] = (conv, bn)
    return pairs


def _padded_depthwise(model) -> Dict[int, object]:
    """{id(conv): its ZeroPadding2D} for each stride-2 'valid' DepthwiseConv2D fed only by a pad of half its odd
    kernel on every side (torchvision's stride-2 convolutions): the pair is TF's 'SAME' convolution with the kernel
    grown by a zero row and column at its end (trainer.onnx_graph.same_when_grown says why), which saves the copy of
    the feature map the pad makes (grappler fuses a pad into a Conv2D, not into a depthwise convolution)."""
    import keras

    from trainer.onnx_graph import same_when_grown

    edges, consumers, outputs = _edges(model)
    found = {}
    for pad, conv in edges:
        if not (type(pad) is keras.layers.ZeroPadding2D and type(conv) is keras.layers.DepthwiseConv2D):
            continue
        if (conv.padding == "valid" and conv.data_format == pad.data_format == "channels_last"
                and same_when_grown(conv.strides, conv.dilation_rate, conv.kernel_size, pad.padding)
                and _single(pad, consumers, outputs) and len(conv._inbound_nodes) <= 1):  # noqa: SLF001
            found[id(conv)] = pad
    return found


def _grown_same(conv, input_shape):
    """A copy of the stride-2 DepthwiseConv2D `conv` as 'SAME' with its kernel grown by a zero row and column, built
    for `input_shape` (the unpadded map its pad was fed)."""
    from trainer.onnx_graph import grown_kernel

    weights = conv.get_weights()
    weights[0] = grown_kernel(weights[0], (0, 1))  # Keras kernels are [H, W, in, multiplier]
    config = {**conv.get_config(), "padding": "same", "kernel_size": tuple(k + 1 for k in conv.kernel_size)}
    grown = conv.__class__.from_config(config)
    grown.build(input_shape)
    grown.set_weights(weights)
    return grown


def _folded_conv(conv, bn):
    """A copy of `conv` with bias, holding conv then bn as one affine map."""
    import keras

    kernel = keras.ops.convert_to_numpy(conv.kernel).astype(np.float64)
    out_channels = kernel.shape[2] * kernel.shape[3] if isinstance(conv, keras.layers.DepthwiseConv2D) \
        else kernel.shape[3]
    bias = keras.ops.convert_to_numpy(conv.bias).astype(np.float64) if conv.use_bias else np.zeros(out_channels)

    def stat(variable, default):
        return np.full(out_channels, default) if variable is None else \
            keras.ops.convert_to_numpy(variable).astype(np.float64)

    scale = stat(bn.gamma, 1.0) / np.sqrt(stat(bn.moving_variance, 1.0) + bn.epsilon)
    shift = stat(bn.beta, 0.0) - stat(bn.moving_mean, 0.0) * scale
    # DepthwiseConv2D: kernel [kh, kw, in, multiplier], output channel c * multiplier + m.
    kernel = kernel * scale.reshape(kernel.shape[2:] if isinstance(conv, keras.layers.DepthwiseConv2D) else (-1,))
    folded = conv.__class__.from_config({**conv.get_config(), "use_bias": True})
    folded.build(conv.input.shape)
    folded.set_weights([kernel.astype(np.float32), (bias * scale + shift).astype(np.float32)])
    return folded


def fold_batch_norms(model):
    """(model', folded): an inference copy of a functional/Sequential Keras model with conv+BN pairs folded (and
    the pads of torchvision's stride-2 depthwise convolutions, _padded_depthwise; a per-channel Rescaling computed
    row by row, _row_rescaling); `folded` counts the BNs. model' is `model` itself when there was nothing to fold.

    Nested functional models are folded too; subclassed models and other layers are shared as they are.
    A model that cannot be cloned (subclassed) comes back unchanged with folded == 0.
    """
    import keras

    graph = isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")  # functional
    if not isinstance(model, keras.Model) or not graph or not model.built:
        return model, 0
    pairs = _foldable_pairs(model)
    padded = _padded_depthwise(model)
    folded_bns = {id(bn) for _, bn in pairs.values()}
    folded_pads = {id(pad) for pad in padded.values()}
    passthrough = _passthrough_layer()
    count = [len(pairs)]

    def clone(layer):
        if id(layer) in pairs or id(layer) in padded:
            conv = _folded_conv(*pairs[id(layer)]) if id(layer) in pairs else layer
            return _grown_same(conv, padded[id(layer)].input.shape) if id(layer) in padded else conv
        if id(layer) in folded_bns or id(layer) in folded_pads:
            return passthrough(name=layer.name, dtype=layer.dtype_policy)
        if _per_channel_rescaling(layer):
            return _row_rescaling(layer)
        if isinstance(layer, keras.Model):
            inner, n = fold_batch_norms(layer)
            count[0] += n
            return inner
        return layer

    if not pairs and not padded and not any(isinstance(layer, keras.Model) for layer in model.layers):
        return model, 0
    folded = keras.models.clone_model(model, clone_function=clone)
    return folded, count[0]
