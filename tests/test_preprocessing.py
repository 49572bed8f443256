"""The shared bytes -> pixels path: uint8 pixels go into the antialiased letterbox without a full-size cast, and
the letterbox turns with the image (equal margins)."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from trainer import preprocessing  # noqa: E402


def cast_first_letterbox(image, size):
    """The obvious path: a float32 copy of the whole image, then the antialiased letterbox, written out: the long
    side fills the square, the short side is rounded so that both margins are equal."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    top, left = (min(int(round((size - n * scale) / 2)), (size - 1) // 2) for n in (height, width))
    resized = tf.image.resize(tf.cast(image, tf.float32), (size - 2 * top, size - 2 * left), method="bilinear",
                              antialias=True)
    return tf.clip_by_value(tf.pad(resized, [[top, top], [left, left], [0, 0]]), 0.0, 255.0).numpy()


@pytest.mark.parametrize("shape", [(1754, 1241), (934, 1246), (224, 224), (100, 60), (3, 500), (2, 448),
                                   (1120, 5)])  # exactly 224:1 still letterboxes as it is
def test_uint8_pixels_give_the_same_square_as_casting_first(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    image[: shape[0] // 3] = 250  # a bright band: clipping and the letterbox edge both matter

    got = preprocessing.resize_for_model(tf.constant(image), 224)

    assert got.dtype == tf.float32 and tuple(got.shape) == (224, 224, 3)
    np.testing.assert_allclose(got.numpy(), cast_first_letterbox(image, 224), atol=1e-3)


@pytest.mark.parametrize("shape", [(1754, 1241), (934, 1246), (100, 37), (500, 333), (301, 299), (3, 900)])
def test_a_scan_turned_before_the_letterbox_gives_the_turned_letterbox(shape):
    """Training turns the letterboxed square; an archive holds scans turned before anything. The two must be the
    same pixels, or a model learns which it was shown instead of the picture: with unequal margins (32 px and 34
    for an A4 page at 224) the default model read 200 of 350 upside-down test pages as upright."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    square = preprocessing.resize_for_model(tf.constant(image), 224).numpy()
    for k in (1, 2, 3):
        turned_first = preprocessing.resize_for_model(tf.constant(np.ascontiguousarray(np.rot90(image, k))), 224)
        np.testing.assert_allclose(turned_first.numpy(), np.rot90(square, k), atol=0.01)
    filled = np.flatnonzero(square.max(axis=(0, 2)) > 0)
    assert filled[0] == 224 - 1 - filled[-1]  # as many black columns on the left as on the right


@pytest.mark.parametrize("dtype", [tf.float32, tf.uint16, tf.float16])
def test_other_dtypes_are_letterboxed_as_float(dtype):
    image = tf.cast(tf.constant(np.full((40, 20, 3), 200, np.uint8)), dtype)
    got = preprocessing.resize_for_model(image, 32).numpy()

    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:, 8:24], 200.0, atol=0.5)  # 40x20 letterboxes to 32x16, 8 px each side
    assert np.all(got[:, :8] == 0) and np.all(got[:, 24:] == 0)


def test_a_hair_thin_image_gets_a_square_and_does_not_fail_its_batch():
    """Wider than 224:1 the letterboxed short side would round to 0 and the resize fail: in a serving batch that
    failed every image of the request. Now the thin image is a thin line in the middle of a black square."""
    def png(pixels):
        return tf.io.encode_png(pixels).numpy()

    normal = np.random.default_rng(0).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    thin_rows = np.full((1, 1000, 3), 200, np.uint8)
    thin_cols = np.full((3000, 2, 3), 90, np.uint8)
    batch = preprocessing.preprocess_batch(tf.constant([png(normal), png(thin_rows), png(thin_cols)]), 224).numpy()

    assert batch.shape == (3, 224, 224, 3)
    np.testing.assert_allclose(batch[0], cast_first_letterbox(normal, 224), atol=1e-3)  # others untouched
    row_means = batch[1].mean(axis=(1, 2))
    # the line fills the 2 middle rows of the square (the margins stay equal), at its own grey
    assert sorted(np.flatnonzero(row_means)) == [111, 112]
    np.testing.assert_allclose(batch[1][111:113], 200.0, atol=0.01)
    col_means = batch[2].mean(axis=(0, 2))
    assert sorted(np.flatnonzero(col_means)) == [111, 112]
    np.testing.assert_allclose(batch[2][:, 111:113], 90.0, atol=0.01)
