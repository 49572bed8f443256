"""fold_batch_norms: the inference copy answers like the trained model, with the conv+BN pairs merged."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from trainer.inference import fold_batch_norms  # noqa: E402


def randomise_batch_norms(model, seed: int = 0) -> int:
    """Give every BN non-trivial statistics (fresh ones are an identity map, which would hide a wrong fold)."""
    rng = np.random.default_rng(seed)
    count = 0
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.5, shape))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, shape))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.5, shape))
            count += 1
    return count


def batch_norms(model) -> int:
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())


def assert_same_answers(model, folded, shape, atol=1e-4):
    pixels = np.random.default_rng(1).uniform(0, 255, (3,) + tuple(shape)).astype(np.float32)
    want, got = model(pixels, training=False), folded(pixels, training=False)
    for key in (want if isinstance(want, dict) else [None]):
        a = np.asarray(want[key] if key else want)
        b = np.asarray(got[key] if key else got)
        np.testing.assert_allclose(b, a, atol=atol * max(1.0, float(np.abs(a).max())), rtol=1e-4)


@pytest.mark.parametrize("build", [
    lambda: keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(64, 64, 3), classes=5),
    lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=5),
], ids=["mobilenet_v2", "efficientnet_b0"])
def test_every_batch_norm_of_a_keras_backbone_is_folded_and_answers_match(build):
    model = build()
    total = randomise_batch_norms(model)

    folded, count = fold_batch_norms(model)

    assert count == total > 40
    assert batch_norms(folded) == 0
    assert batch_norms(model) == total  # the trained model is left as it was
    assert_same_answers(model, folded, model.input.shape[1:])


def test_conv_with_bias_and_depth_multiplier_folds_exactly():
    pixels = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, use_bias=True, bias_initializer="random_normal")(pixels)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-5)(x)
    model = keras.Model(pixels, keras.layers.ReLU(6.0)(x))
    randomise_batch_norms(model, seed=3)

    folded, count = fold_batch_norms(model)

    assert count == 2 and batch_norms(folded) == 0
    assert_same_answers(model, folded, (16, 16, 3), atol=1e-5)


def test_pairs_that_are_not_a_plain_affine_chain_are_kept():
    pixels = keras.Input((12, 12, 3))
    relu_conv = keras.layers.Conv2D(4, 3, activation="relu")(pixels)  # BN after a ReLU cannot go into the kernel
    after_relu = keras.layers.BatchNormalization(name="after_relu")(relu_conv)
    shared = keras.layers.Conv2D(4, 3, name="shared")(pixels)  # feeds a BN and an Add: the raw output is needed
    branch = keras.layers.BatchNormalization(name="branch")(shared)
    mixed = keras.layers.Add()([keras.layers.Cropping2D(0)(branch), shared])
    model = keras.Model(pixels, [after_relu, mixed])
    randomise_batch_norms(model, seed=4)

    folded, count = fold_batch_norms(model)

    assert count == 0 and batch_norms(folded) == 2
    for want, got in zip(model(np.ones((1, 12, 12, 3), np.float32) * 40), folded(np.ones((1, 12, 12, 3)) * 40)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_nested_backbone_and_sequential_are_folded_subclassed_models_are_returned_as_they_are():
    backbone = keras.Sequential([keras.Input((10, 10, 3)), keras.layers.Conv2D(5, 3, use_bias=False),
                                 keras.layers.BatchNormalization(), keras.layers.ReLU()], name="backbone")
    pixels = keras.Input((10, 10, 3))
    head = keras.layers.Dense(4, activation="softmax", name="orientation_probabilities")
    model = keras.Model(pixels, {"orientation_probabilities": head(
        keras.layers.GlobalAveragePooling2D()(backbone(pixels)))})
    randomise_batch_norms(model, seed=5)

    folded, count = fold_batch_norms(model)

    assert count == 1 and batch_norms(folded) == 0
    assert_same_answers(model, folded, (10, 10, 3), atol=1e-5)

    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = keras.layers.Conv2D(2, 1), keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.conv(x))

    custom = Custom()
    custom(np.zeros((1, 4, 4, 3), np.float32))
    assert fold_batch_norms(custom) == (custom, 0)


def test_a_conv_output_also_used_by_a_raw_keras_op_is_not_folded():
    """Plain keras.ops calls are graph operations, not layers: their use of the raw conv output counts too."""
    pixels = keras.Input((8, 8, 3))
    raw = keras.layers.Conv2D(4, 3)(pixels)
    normalised = keras.layers.BatchNormalization()(raw)
    model = keras.Model(pixels, keras.ops.add(normalised, raw * 0.5))
    randomise_batch_norms(model, seed=6)

    folded, count = fold_batch_norms(model)

    assert count == 0
    assert_same_answers(model, folded, (8, 8, 3), atol=1e-5)


def test_torchvision_stride_2_depthwise_pads_fold_into_same_convolutions():
    """torchvision pads every side of a stride-2 depthwise convolution by half its kernel, which Keras builds as a
    ZeroPadding2D before a 'valid' convolution: the fold makes each pair one 'SAME' convolution with a kernel one
    larger (the pad's copy of the feature map saved), answering as before, at even and odd map sizes alike."""
    from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

    for size in (64, 72):  # 72: odd feature maps (9 x 9) reach the last stride-2 convolution
        model = build_mobilenet_v2_torchvision(weights=None, input_size=size)
        total = randomise_batch_norms(model)
        pads = [layer for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
        stride_2 = [layer for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)
                    and tuple(layer.strides) == (2, 2)]
        assert len(pads) == 5 and len(stride_2) == 4  # the stem's pad feeds an ordinary Conv2D: grappler fuses it

        folded, count = fold_batch_norms(model)

        assert count == total  # BatchNorms; the pads fold too, uncounted
        grown = [layer for layer in folded.layers if isinstance(layer, keras.layers.DepthwiseConv2D)
                 and tuple(layer.strides) == (2, 2)]
        assert [(layer.padding, tuple(layer.kernel_size)) for layer in grown] == [("same", (4, 4))] * 4
        assert sum(isinstance(layer, keras.layers.ZeroPadding2D) for layer in folded.layers) == 1
        assert_same_answers(model, folded, (size, size, 3))


def test_pads_that_are_not_half_a_stride_2_kernel_or_feed_more_stay():
    """Only a symmetric pad of half the kernel, feeding one stride-2 'valid' depthwise convolution, folds: a pad
    before a stride-1 convolution, an asymmetric one (Keras' own MobileNetV2) and a shared one stay as they were."""
    pixels = keras.Input((17, 17, 4))
    a = keras.layers.DepthwiseConv2D(3, strides=1)(keras.layers.ZeroPadding2D(1)(pixels))
    b = keras.layers.DepthwiseConv2D(3, strides=2)(keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(pixels))
    shared = keras.layers.ZeroPadding2D(1)(pixels)
    c = keras.layers.DepthwiseConv2D(3, strides=2)(shared)
    d = keras.layers.DepthwiseConv2D(3, strides=2)(shared)
    pooled = [keras.layers.GlobalAveragePooling2D()(x) for x in (a, b, c, d)]
    model = keras.Model(pixels, keras.layers.Concatenate()(pooled))

    folded, count = fold_batch_norms(model)

    assert folded is model and count == 0  # nothing to fold: the model itself


def test_torchvisions_per_channel_normalisation_is_computed_row_by_row_bit_for_bit():
    """The served copy computes torchvision's ImageNet normalisation (a Rescaling with a scale and an offset per
    channel) with both tiled along each row of the image, which TF runs about three times faster than its broadcast
    over 3 channels: the same float32 pixels, at any size."""
    from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

    model = build_mobilenet_v2_torchvision(weights=None, input_size=64)
    folded, _ = fold_batch_norms(model)
    before, after = model.get_layer("imagenet_normalise"), folded.get_layer("imagenet_normalise")
    assert isinstance(before, keras.layers.Rescaling) and not isinstance(after, keras.layers.Rescaling)
    run = tf.function(after.call, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for shape in ((2, 64, 64, 3), (1, 37, 50, 3)):
        pixels = np.random.default_rng(sum(shape)).uniform(0, 255, shape).astype(np.float32)
        assert np.array_equal(run(pixels).numpy(), before(pixels).numpy())


def test_a_rescaling_that_is_not_one_value_per_channel_stays_a_rescaling():
    """A scalar scale, or a vector that does not match the channels (broadcast by Keras), is left as it was."""
    pixels = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="scalar")(pixels)
    x = keras.layers.Rescaling([0.5], offset=[1.0], name="one_value")(x)
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
    model = keras.Model(pixels, x)
    randomise_batch_norms(model, seed=8)

    folded, count = fold_batch_norms(model)

    assert count == 1
    assert all(isinstance(folded.get_layer(name), keras.layers.Rescaling) for name in ("scalar", "one_value"))
    assert_same_answers(model, folded, (8, 8, 3), atol=1e-5)
