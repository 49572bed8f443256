"""Tiny models for the score tests: one that really finds the turn of tests.image_factory's asymmetric image,
and builders for small archives of known content."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from tests.image_factory import encode_array, make_asymmetric_image, make_random_image

IMAGE_SIZE = 32
CLASS_NAMES = ["photo", "document"]


def make_red_corner_model(image_size: int = IMAGE_SIZE, sharpness: float = 40.0):
    """A model (MODEL CONTRACT) that reads the orientation of the asymmetric image from where its red block is.

    Upright the block is top-left; turned 90/180/270 degrees clockwise it is top-right/bottom-right/bottom-left.
    The class head says "document" when the picture holds more blue than red.
    """
    import keras
    from keras import ops

    class RedCorners(keras.layers.Layer):
        def call(self, pixels):
            redness = ops.relu(pixels[..., 0] - pixels[..., 1]) / 255.0  # red: 1; white, blue, black: 0
            half = image_size // 2
            tl = ops.mean(redness[:, :half, :half], axis=(1, 2))
            tr = ops.mean(redness[:, :half, half:], axis=(1, 2))
            bl = ops.mean(redness[:, half:, :half], axis=(1, 2))
            br = ops.mean(redness[:, half:, half:], axis=(1, 2))
            orientation = ops.softmax(sharpness * ops.stack([tl, tr, br, bl], axis=-1), axis=-1)
            blueness = ops.mean(ops.relu(pixels[..., 2] - pixels[..., 1]) / 255.0, axis=(1, 2))
            red = (tl + tr + bl + br) / 4
            classes = ops.softmax(sharpness * ops.stack([red, blueness], axis=-1), axis=-1)
            return {"orientation_probabilities": orientation, "class_probabilities": classes}

    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    return keras.Model(pixels, RedCorners()(pixels))


def turned(array: np.ndarray, degrees_clockwise: int) -> np.ndarray:
    """The pixels turned `degrees_clockwise` (np.rot90 turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(array, k=(4 - degrees_clockwise // 90) % 4))


def write_turned_archive(root: str, turns: Dict[str, int], fmt: str = "PNG", ext: str = "png") -> Dict[str, str]:
    """Files named after their key, each the asymmetric image turned by its value; returns name -> path."""
    os.makedirs(root, exist_ok=True)
    paths = {}
    for name, degrees in turns.items():
        path = os.path.join(root, f"{name}.{ext}")
        with open(path, "wb") as f:
            f.write(encode_array(turned(make_asymmetric_image(), degrees), fmt))
        paths[name] = path
    return paths


def write_bad_files(root: str) -> Dict[str, str]:
    """Inputs that cannot be scored, by expected error_type."""
    os.makedirs(root, exist_ok=True)
    bad = {}
    path = os.path.join(root, "empty.jpg")
    open(path, "wb").close()
    bad[path] = "empty"
    jpeg = encode_array(make_random_image(64, 64, 3, seed=3), "JPEG")
    path = os.path.join(root, "truncated.jpg")
    with open(path, "wb") as f:
        f.write(jpeg[: len(jpeg) // 3])
    bad[path] = "truncated"
    path = os.path.join(root, "notes.png")
    with open(path, "wb") as f:
        f.write(b"not an image at all\n")
    bad[path] = "unknown_format"
    return bad


def random_photos(root: str, count: int) -> List[str]:
    """`count` smooth random JPEGs (a random model gives them varied answers)."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(root, f"photo_{i}.jpg")
        with open(path, "wb") as f:
            f.write(encode_array(make_random_image(48 + 8 * i, 64, 3, seed=50 + i), "JPEG", quality=92))
        paths.append(path)
    return paths


def write_corrections(path: str, answers: List[dict]) -> str:
    """A corrections table (pipelines.corrections.CORRECTIONS_SCHEMA) as the review page writes it. Each answer gives
    uri, label and model_orientation (and optionally sha256, page, answered_at, reviewer); sha256 is the file's own
    unless given, orientation follows from the answer and the model's, answered_at counts up from 2026-01-01."""
    import datetime
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.corrections import CORRECTIONS_SCHEMA, corrected_orientation

    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    rows = []
    for index, answer in enumerate(answers):
        sha = answer.get("sha256")
        if sha is None:
            with open(answer["uri"], "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
        rows.append({"uri": answer["uri"], "sha256": sha, "page": answer.get("page", 0),
                     "orientation": answer["orientation"] if "orientation" in answer else
                     corrected_orientation(answer["model_orientation"], answer["label"]),
                     "label": answer["label"], "model_orientation": answer["model_orientation"],
                     "model_name": "archive_vision", "model_version": 1, "reviewer": answer.get("reviewer", "tester"),
                     "answered_at": answer.get("answered_at", start + datetime.timedelta(minutes=index))})
    pq.write_table(pa.Table.from_pylist(rows, CORRECTIONS_SCHEMA), path)
    return path
