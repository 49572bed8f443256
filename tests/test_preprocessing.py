"""The shared bytes -> pixels path: uint8 pixels go into the antialiased letterbox without a full-size cast."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from trainer import preprocessing  # noqa: E402


def cast_first_letterbox(image, size):
    """The obvious path: a float32 copy of the whole image, then the antialiased letterbox."""
    resized = tf.image.resize_with_pad(tf.cast(image, tf.float32), size, size, method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0).numpy()


@pytest.mark.parametrize("shape", [(1754, 1241), (934, 1246), (224, 224), (100, 60), (3, 500)])
def test_uint8_pixels_give_the_same_square_as_casting_first(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    image[: shape[0] // 3] = 250  # a bright band: clipping and the letterbox edge both matter

    got = preprocessing.resize_for_model(tf.constant(image), 224)

    assert got.dtype == tf.float32 and tuple(got.shape) == (224, 224, 3)
    np.testing.assert_allclose(got.numpy(), cast_first_letterbox(image, 224), atol=1e-3)


@pytest.mark.parametrize("dtype", [tf.float32, tf.uint16, tf.float16])
def test_other_dtypes_are_letterboxed_as_float(dtype):
    image = tf.cast(tf.constant(np.full((40, 20, 3), 200, np.uint8)), dtype)
    got = preprocessing.resize_for_model(image, 32).numpy()

    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:, 8:24], 200.0, atol=0.5)  # 40x20 letterboxes to 32x16, 8 px each side
    assert np.all(got[:, :8] == 0) and np.all(got[:, 24:] == 0)
