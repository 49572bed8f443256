"""The one TensorFlow preprocessing path shared by training input and the serving graph.

Contract: a model built by `trainer.backbones` takes float32 RGB pixels in [0, 255] of shape
[N, size, size, 3]; normalisation (ImageNet mean/std, [-1, 1], caffe BGR, ...) lives inside the
backbone model, so the same bytes -> pixels function serves both paths and they cannot drift.

Aspect handling is letterboxing with the same padding on both sides (resize_for_model): the whole image stays
visible and a rot90 of the padded square equals the padded square of the rotated image, so a scan turned before it
is letterboxed (a real turned scan) gives the pixels of one turned after (the turns training makes). Ingest stores
padded squares already, so at training time the pad is a no-op.
"""
from __future__ import annotations

import tensorflow as tf

from pipelines.schema import MODEL_IMAGE_SIZE as DEFAULT_IMAGE_SIZE  # noqa: E402


def decode_image_bytes(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decode one JPEG/PNG/GIF/BMP string to uint8 RGB [H, W, 3] (first frame of a GIF)."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def channelwise(images: tf.Tensor, fn, *per_channel: tf.Tensor) -> tf.Tensor:
    """fn(images, *per_channel) for NHWC images and [C] vectors (an elementwise fn: x - mean, x * scale + offset),
    bit for bit, computed on rows with each vector tiled along them: TF's broadcast over an innermost axis of 3 is
    about three times slower (a 224 px image on one core: x - mean 0.29 -> 0.10 ms, x * scale + offset 0.45 -> 0.14)."""
    shape = tf.shape(images)
    rows = tf.reshape(images, [-1, shape[2] * shape[3]])
    return tf.reshape(fn(rows, *(tf.tile(vector, shape[2:3]) for vector in per_channel)), shape)


def resize_for_model(image: tf.Tensor, image_size: int = DEFAULT_IMAGE_SIZE) -> tf.Tensor:
    """Letterbox an RGB image (any dtype) to float32 [image_size, image_size, 3] in [0, 255].

    Decoded uint8 pixels go into the resize as they are: its kernel reads uint8 and writes float32, so the
    full-size float copy a cast would make first is never written (a 150 dpi page: about 2 ms less on one
    core, the same pixels; research/quality.py times both).
    """
    if image.dtype not in (tf.uint8, tf.float32):
        image = tf.cast(image, tf.float32)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    longest = tf.cast(tf.maximum(height, width), tf.float32)

    def fitted(length):
        # The side scaled to fit, rounded to the parity of image_size so both margins are equal. An uneven split
        # (what tf.image.resize_with_pad does: 32 px left, 34 right for a 150 dpi A4 page at 224) makes the margins
        # tell a turn made after the letterbox from a real turned scan, and a model learns that tell instead of
        # the page: it read 200 of 350 upside-down test pages as upright.
        margin = tf.round((image_size - tf.cast(length, tf.float32) * image_size / longest) / 2.0)
        # Clipped so at least one row (the parity of image_size: two for 224) is left, however thin the image:
        # a 1 x 1000 strip letterboxes to a line in the middle instead of failing the resize (and, in a serving
        # batch, every image of the request).
        margin = tf.clip_by_value(tf.cast(margin, tf.int32), 0, (image_size - 1) // 2)
        return image_size - 2 * margin, margin

    new_height, top = fitted(height)
    new_width, left = fitted(width)
    image = tf.image.resize(image, tf.stack([new_height, new_width]), method="bilinear", antialias=True)
    image = tf.pad(image, [[top, top], [left, left], [0, 0]])
    image.set_shape([image_size, image_size, 3])
    return tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)


def preprocess_image_bytes(image_bytes: tf.Tensor, image_size: int = DEFAULT_IMAGE_SIZE) -> tf.Tensor:
    """Bytes -> model-ready float32 pixels [image_size, image_size, 3]; the train/serve shared path."""
    return resize_for_model(decode_image_bytes(image_bytes), image_size)


def preprocess_batch(image_bytes: tf.Tensor, image_size: int = DEFAULT_IMAGE_SIZE) -> tf.Tensor:
    """Vectorised preprocess_image_bytes over a [N] string tensor -> [N, size, size, 3] float32."""
    return tf.map_fn(lambda b: preprocess_image_bytes(b, image_size), image_bytes,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
