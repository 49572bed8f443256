"""trainer.onnx_graph: the text-crop classifier rebuilt in TF answers as onnxruntime does (random inputs and crops of
a rendered page), survives a SavedModel round trip with standard TF ops only, and a small synthetic graph checks
the parts the classifier does not exercise (asymmetric pads, dilation, a BN not after a Conv, default
HardSigmoid, [C, 1, 1] constants); unsupported graphs raise."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime  # noqa: F401  (the reference the TF net is compared with)
import pytest
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageDraw, ImageFont
from tensorflow.core.protobuf import saved_model_pb2

from serving.answer import crop_pixels
from trainer import onnx_graph, text_crops
from trainer.preprocessing import channelwise
from trainer.text_lines import onnx_session

ATOL = 1e-4
PY_FUNC_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


@pytest.fixture(scope="module")
def path() -> str:
    return text_crops.model_path()


@pytest.fixture(scope="module")
def net(path) -> onnx_graph.OnnxConvNet:
    return onnx_graph.from_onnx(path)


def _onnx(path: str, nchw: np.ndarray) -> np.ndarray:
    session = onnx_session(path)
    return session.run(None, {session.get_inputs()[0].name: nchw})[0]


def _nhwc(nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))


def _page_crops() -> np.ndarray:
    page = Image.new("RGB", (600, 800), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=22)
    words = "the quick brown fox jumps over a lazy dog while archive pages keep their words".split()
    rng = np.random.default_rng(3)
    for row in range(24):
        draw.text((40, 40 + row * 30), " ".join(rng.choice(words, 6)), fill="black", font=font)
    return text_crops.crops(text_crops.reading_copy(page))


@pytest.mark.parametrize("kind", ["random", "page crops"])
def test_the_tf_net_answers_as_onnxruntime(net, path, kind):
    if kind == "random":
        nchw = np.random.default_rng(0).normal(size=(4, 3, 224, 224)).astype(np.float32)
    else:
        nchw = _page_crops()
        assert nchw.shape == (5, 3, 224, 224)
    expected = _onnx(path, nchw)
    got = net(_nhwc(nchw)).numpy()
    assert got.shape == expected.shape == (len(nchw), 4)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def _saved_ops(folder: str) -> set:
    proto = saved_model_pb2.SavedModel()
    with open(f"{folder}/saved_model.pb", "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta in proto.meta_graphs:
        ops.update(node.op for node in meta.graph_def.node)
        for function in meta.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def test_the_net_survives_a_saved_model_with_standard_ops(net, path, tmp_path):
    holder = tf.Module()
    holder.net = net
    holder.serve = tf.function(lambda images: holder.net(images),
                               input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    holder.serve_224 = tf.function(lambda images: holder.net(images),
                                   input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
    nchw = _page_crops()
    nhwc = _nhwc(nchw)
    before = holder.serve(nhwc).numpy()
    np.testing.assert_allclose(holder.serve_224(nhwc).numpy(), before, atol=1e-6, rtol=0)
    folder = str(tmp_path / "saved")
    tf.saved_model.save(holder, folder, signatures={"serving_default": holder.serve})

    loaded = tf.saved_model.load(folder)
    np.testing.assert_allclose(loaded.serve(nhwc).numpy(), before, atol=1e-6, rtol=0)
    np.testing.assert_allclose(loaded.serve_224(nhwc).numpy(), before, atol=1e-6, rtol=0)
    signature = loaded.signatures["serving_default"]
    (answer,) = signature(images=tf.constant(nhwc)).values()
    np.testing.assert_allclose(answer.numpy(), _onnx(path, nchw), atol=ATOL, rtol=0)

    ops = _saved_ops(folder)
    assert not ops & PY_FUNC_OPS
    assert {"Conv2D", "DepthwiseConv2dNative", "BiasAdd", "MatMul", "Softmax"} <= ops


PIXELS = crop_pixels()  # the scaling serving.export builds the classifier with


def _graph_ops(fn) -> set:
    return {op.type for op in fn.get_concrete_function().graph.get_operations()}


def test_the_net_on_pixels_answers_as_the_file_on_its_preprocessed_input(path):
    """serving.export builds the classifier on the crops' RGB pixels: the BGR order and the normalisation are
    folded into the first convolution (no per-pixel pass but one subtraction), and the answer is the file's on the
    input PaddleClas' preprocessing makes."""
    rng = np.random.default_rng(4)
    # random levels, and black and white only (the ends of the normalised range)
    pixels = np.concatenate([rng.uniform(0, 255, (2, 224, 224, 3)),
                             rng.choice([0.0, 255.0], (2, 224, 224, 3))]).astype(np.float32)
    onnx_input = PIXELS.onnx_input(tf.constant(pixels)).numpy()
    expected = _onnx(path, np.ascontiguousarray(onnx_input.transpose(0, 3, 1, 2)))
    run = tf.function(onnx_graph.from_onnx(path, PIXELS), input_signature=[tf.TensorSpec([None, 224, 224, 3],
                                                                                          tf.float32)])
    np.testing.assert_allclose(run(pixels).numpy(), expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(run(pixels).numpy().argmax(1), expected.argmax(1))
    ops = _graph_ops(run)
    assert not ops & {"ReverseV2", "RealDiv"} and "Sub" in ops


@pytest.mark.parametrize("read_by", ["a conv", "a conv and a pool"])
def test_pixels_are_folded_only_where_convs_alone_read_them(tmp_path, read_by):
    """A Conv with asymmetric pads, alone or beside a pool of the same input: folded into the Conv in the first case,
    scaled step by step in the second (a pool of the centred pixels would differ), and the answers are the file's."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 0, 2, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"])]
    if read_by == "a conv and a pool":
        nodes += [helper.make_node("GlobalAveragePool", ["x"], ["gx"]),
                  helper.make_node("Concat", ["g", "gx"], ["cat"], axis=1)]
    nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], "target"], ["y"]))
    width = 4 if read_by == "a conv" else 7
    file = str(tmp_path / "pixels.onnx")
    onnx.save(_model(nodes, [_const(rng, "w", [4, 3, 3, 3]),
                             numpy_helper.from_array(np.array([0, width], np.int64), "target")]), file)
    pixels = rng.uniform(0, 255, (2, 17, 15, 3)).astype(np.float32)
    onnx_input = np.ascontiguousarray(PIXELS.onnx_input(tf.constant(pixels)).numpy().transpose(0, 3, 1, 2))
    run = tf.function(onnx_graph.from_onnx(file, PIXELS), input_signature=[tf.TensorSpec([None, 17, 15, 3],
                                                                                        tf.float32)])
    np.testing.assert_allclose(run(pixels).numpy(), _onnx(file, onnx_input), atol=1e-5, rtol=1e-5)
    assert ("ReverseV2" in _graph_ops(run)) is (read_by != "a conv")


# -- a small synthetic graph -----------------------------------------------------------------------------------------
def _const(rng, name: str, shape, positive: bool = False) -> onnx.TensorProto:
    value = rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0.0, 0.5, shape)
    return numpy_helper.from_array(value.astype(np.float32), name)


def _model(nodes, initializers, input_shape=(None, 3, 17, 15)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _bn(rng, prefix: str, channels: int, x: str, y: str):
    names = [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    inits = [_const(rng, names[0], [channels], True), _const(rng, names[1], [channels]),
             _const(rng, names[2], [channels]), _const(rng, names[3], [channels], True)]
    return helper.make_node("BatchNormalization", [x] + names, [y], epsilon=1e-3), inits


def _synthetic(rng) -> onnx.ModelProto:
    bn1, bn1_inits = _bn(rng, "bn1", 8, "c1", "b1")
    bn2, bn2_inits = _bn(rng, "bn2", 8, "r1", "b2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "bias1"], ["c1"], strides=[2, 2], pads=[1, 0, 2, 1]), bn1,
        helper.make_node("Relu", ["b1"], ["r1"]), bn2,  # a BN after a Relu: not folded
        helper.make_node("Conv", ["b2", "w2"], ["c2"], group=8, dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("HardSigmoid", ["c2"], ["h"]),  # default alpha 0.2, beta 0.5
        helper.make_node("Mul", ["h", "per_channel"], ["m"]),  # a [C, 1, 1] constant
        helper.make_node("GlobalAveragePool", ["m"], ["g"]),
        helper.make_node("Add", ["g", "se_bias"], ["ga"]),  # a [1, C, 1, 1] constant
        helper.make_node("HardSwish", ["ga"], ["gs"]),
        helper.make_node("Mul", ["m", "gs"], ["se"]),  # [N, C, H, W] * [N, C, 1, 1]
        helper.make_node("Identity", ["se"], ["se_id"]),
        helper.make_node("Conv", ["se_id", "w3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Shape", ["p"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one", "zero"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
        helper.make_node("Add", ["logits", "fc_bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["y"], axis=-1),
    ]
    inits = bn1_inits + bn2_inits + [
        _const(rng, "w1", [8, 3, 3, 3]), _const(rng, "bias1", [8]), _const(rng, "w2", [8, 1, 3, 3]),
        _const(rng, "per_channel", [8, 1, 1]), _const(rng, "se_bias", [1, 8, 1, 1]), _const(rng, "w3", [5, 8, 1, 1]),
        _const(rng, "fc", [5, 3]), _const(rng, "fc_bias", [3]),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    return _model(nodes, inits)


@pytest.mark.parametrize("on_pixels", [False, True])
def test_a_synthetic_graph_answers_as_onnxruntime(tmp_path, on_pixels):
    """Also on pixels: its first Conv (asymmetric pads, a bias, a BN folded in) takes the pixel scaling."""
    rng = np.random.default_rng(1)
    file = str(tmp_path / "synthetic.onnx")
    onnx.save(_synthetic(rng), file)
    net = onnx_graph.from_onnx(file, PIXELS if on_pixels else None)
    run = tf.function(net, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    if on_pixels:
        pixels = rng.uniform(0, 255, (3, 17, 15, 3)).astype(np.float32)
        nchw = np.ascontiguousarray(PIXELS.onnx_input(tf.constant(pixels)).numpy().transpose(0, 3, 1, 2))
        assert "ReverseV2" not in _graph_ops(run)
        np.testing.assert_allclose(run(pixels).numpy(), _onnx(file, nchw), atol=1e-5, rtol=1e-5)
        return
    nchw = rng.normal(size=(3, 3, 17, 15)).astype(np.float32)
    np.testing.assert_allclose(run(_nhwc(nchw)).numpy(), _onnx(file, nchw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 224, 224, 3), (1, 9, 4, 4)])
def test_the_centring_is_the_broadcast_subtraction_bit_for_bit(shape):
    """The pixels are centred with the mean tiled along each row (faster than TF's broadcast over 3 channels): the
    same float32 differences, for any size and channel count."""
    rng = np.random.default_rng(sum(shape))
    x = rng.uniform(0, 255, shape).astype(np.float32)
    mean = rng.uniform(90, 130, shape[-1:]).astype(np.float32)
    run = tf.function(lambda x, mean: channelwise(x, tf.subtract, mean),
                      input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                                       tf.TensorSpec([None], tf.float32)])
    assert np.array_equal(run(x, mean).numpy(), x - mean)


def test_pointwise_convs_of_pooled_vectors_are_matrix_products(tmp_path):
    """A 1 x 1 Conv of a globally pooled map (PP-LCNet's squeeze-excite and its 512 -> 1280 head) is a MatMul, which
    oneDNN runs about three times faster than its convolution of a 1 x 1 map, answering as onnxruntime; a 1 x 1 Conv
    of a larger map stays a convolution."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"]),  # 1 x 1 of the 17 x 15 map: a convolution
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Conv", ["g", "w3", "b3"], ["c3"]),
        helper.make_node("HardSwish", ["c3"], ["h"]),
        helper.make_node("Conv", ["h", "w4"], ["c4"], kernel_shape=[1, 1]),
        helper.make_node("Shape", ["c4"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one", "zero"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["c4", "target"], ["y"]),
    ]
    inits = [_const(rng, "w1", [8, 3, 3, 3]), _const(rng, "w2", [16, 8, 1, 1]), _const(rng, "b2", [16]),
             _const(rng, "w3", [32, 16, 1, 1]), _const(rng, "b3", [32]), _const(rng, "w4", [5, 32, 1, 1]),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    file = str(tmp_path / "pooled.onnx")
    onnx.save(_model(nodes, inits), file)
    run = tf.function(onnx_graph.from_onnx(file), input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    ops = [op.type for op in run.get_concrete_function().graph.get_operations()]
    assert ops.count("Conv2D") == 2 and ops.count("MatMul") == 2
    nchw = rng.normal(size=(3, 3, 17, 15)).astype(np.float32)
    np.testing.assert_allclose(run(_nhwc(nchw)).numpy(), _onnx(file, nchw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (3, 5)])
@pytest.mark.parametrize("size", [(16, 16), (17, 15)])
def test_a_stride_2_depthwise_conv_with_half_kernel_pads_needs_no_pad_op(tmp_path, kernel, size):
    """PP-LCNet's stride-2 depthwise convolutions pad half their kernel on every side: built as 'SAME' with a kernel
    grown by a zero row and column (no tf.pad, which copies the feature map), on even and odd sizes alike."""
    rng = np.random.default_rng(sum(kernel))
    half = [(k - 1) // 2 for k in kernel]
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=3, strides=[2, 2], pads=half * 2)  # top, left, ...
    graph = helper.make_graph([node], "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [None, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [_const(rng, "w", [3, 1] + list(kernel))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    file = str(tmp_path / "depthwise.onnx")
    onnx.save(model, file)
    run = tf.function(onnx_graph.from_onnx(file), input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    assert "Pad" not in {op.type for op in run.get_concrete_function().graph.get_operations()}
    nchw = rng.normal(size=(2, 3) + size).astype(np.float32)
    expected = _onnx(file, nchw)  # every output position (onnxruntime answers NCHW)
    assert expected.shape[2:] == tuple((n + 1) // 2 for n in size)
    np.testing.assert_allclose(run(_nhwc(nchw)).numpy(), _nhwc(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("node, inits, message", [
    (helper.make_node("LRN", ["x"], ["y"], size=3), [], "LRN"),
    (helper.make_node("Conv", ["x", "w"], ["y"], group=3), [np.ones((6, 1, 1, 1), np.float32)], "group=3"),
    (helper.make_node("Reshape", ["x", "s"], ["y"]), [np.array([0, -1], np.int64)], "1x1"),
])
def test_unsupported_graphs_raise(tmp_path, node, inits, message):
    names = node.input[1:]
    file = str(tmp_path / "unsupported.onnx")
    onnx.save(_model([node], [numpy_helper.from_array(v, n) for v, n in zip(inits, names)]), file)
    if node.op_type == "Reshape":  # a flatten is allowed only where the spatial dims are 1x1
        with pytest.raises(NotImplementedError, match=message):
            onnx_graph.from_onnx(file)(np.zeros((1, 17, 15, 3), np.float32))
    else:
        with pytest.raises(NotImplementedError, match=message):
            onnx_graph.from_onnx(file)
