"""The data contract: every tf.train.Example feature key, owned here and imported everywhere else.

Pipelines write records with `make_example`; the trainer and serving parse them with
`tf_feature_spec()`. Keys follow the `image/...` convention of the TF Object Detection / tf-recorder
datasets so that existing tools can read the shards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

# Feature keys. Changing one is a breaking change to every shard already written.
IMAGE_ENCODED = "image/encoded"          # bytes: compressed image (JPEG or PNG), never raw pixels
IMAGE_FORMAT = "image/format"            # bytes: b"jpeg" | b"png"
IMAGE_HEIGHT = "image/height"            # int64: height of the stored (resized) image
IMAGE_WIDTH = "image/width"              # int64: width of the stored (resized) image
SOURCE_URI = "image/source_uri"          # bytes: where the input came from
PAGE = "image/page"                      # int64: page / frame index inside the source file (0 for single images)
SHA256 = "image/sha256"                  # bytes: hex sha256 of the whole source file
ORIGINAL_HEIGHT = "image/original_height"  # int64: height after EXIF transpose, before resizing
ORIGINAL_WIDTH = "image/original_width"    # int64
EXIF_ORIENTATION = "image/exif_orientation"  # int64: the source's EXIF Orientation tag (1..8), 0 if absent
LABEL_INDEX = "image/class/label"        # int64: index into labels.json, -1 when unlabelled
LABEL_NAME = "image/class/text"          # bytes: class name, b"" when unlabelled
ORIENTATION = "image/orientation"        # int64: 0/90/180/270 clockwise turn of the stored image, -1 unknown
SPLIT = "image/split"                    # bytes: b"train" | b"val" | b"test"
AUGMENT_INDEX = "image/augment_index"    # int64: 0 for the original, k>0 for the k-th offline augmented copy

SPLITS = ("train", "val", "test")
ORIENTATIONS = (0, 90, 180, 270)
UNKNOWN = -1

INT_KEYS = (IMAGE_HEIGHT, IMAGE_WIDTH, PAGE, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, EXIF_ORIENTATION,
            LABEL_INDEX, ORIENTATION, AUGMENT_INDEX)
BYTES_KEYS = (IMAGE_ENCODED, IMAGE_FORMAT, SOURCE_URI, SHA256, LABEL_NAME, SPLIT)

# Defaults applied when parsing a record that lacks an optional key.
_INT_DEFAULTS = {LABEL_INDEX: UNKNOWN, ORIENTATION: UNKNOWN, PAGE: 0, EXIF_ORIENTATION: 0, AUGMENT_INDEX: 0}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One output record: the fields of a tf.train.Example in Python form."""

    encoded: bytes
    format: str
    height: int
    width: int
    source_uri: str
    page: int
    sha256: str
    original_height: int
    original_width: int
    exif_orientation: int
    label_index: int
    label_name: str
    orientation: int
    split: str
    augment_index: int = 0

    def manifest_row(self) -> Dict[str, Any]:
        """The record's columns for manifest.parquet (everything except the pixels)."""
        row = dataclasses.asdict(self)
        row.pop("encoded")
        row["encoded_bytes"] = len(self.encoded)
        return row


def make_example(record: ImageRecord):
    """Serialize-ready tf.train.Example for a record (imports TensorFlow's protos lazily)."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def b(v: bytes):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[v]))

    def i(v: int):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v)]))

    feats = {
        IMAGE_ENCODED: b(record.encoded),
        IMAGE_FORMAT: b(record.format.encode()),
        IMAGE_HEIGHT: i(record.height),
        IMAGE_WIDTH: i(record.width),
        SOURCE_URI: b(record.source_uri.encode()),
        PAGE: i(record.page),
        SHA256: b(record.sha256.encode()),
        ORIGINAL_HEIGHT: i(record.original_height),
        ORIGINAL_WIDTH: i(record.original_width),
        EXIF_ORIENTATION: i(record.exif_orientation),
        LABEL_INDEX: i(record.label_index),
        LABEL_NAME: b(record.label_name.encode()),
        ORIENTATION: i(record.orientation),
        SPLIT: b(record.split.encode()),
        AUGMENT_INDEX: i(record.augment_index),
    }
    return example_pb2.Example(features=feature_pb2.Features(feature=feats))


def record_from_example(example) -> ImageRecord:
    """Inverse of make_example, for tests and tools that read shards without tf.data."""
    f = example.features.feature

    def b(k):
        return f[k].bytes_list.value[0] if f[k].bytes_list.value else b""

    def i(k):
        return int(f[k].int64_list.value[0]) if f[k].int64_list.value else _INT_DEFAULTS.get(k, 0)

    return ImageRecord(
        encoded=b(IMAGE_ENCODED), format=b(IMAGE_FORMAT).decode(), height=i(IMAGE_HEIGHT),
        width=i(IMAGE_WIDTH), source_uri=b(SOURCE_URI).decode(), page=i(PAGE), sha256=b(SHA256).decode(),
        original_height=i(ORIGINAL_HEIGHT), original_width=i(ORIGINAL_WIDTH),
        exif_orientation=i(EXIF_ORIENTATION), label_index=i(LABEL_INDEX), label_name=b(LABEL_NAME).decode(),
        orientation=i(ORIENTATION), split=b(SPLIT).decode(), augment_index=i(AUGMENT_INDEX))


def tf_feature_spec() -> Mapping[str, Any]:
    """The tf.io.parse_example spec for every key (TensorFlow imported lazily)."""
    import tensorflow as tf

    spec = {k: tf.io.FixedLenFeature([], tf.int64, default_value=_INT_DEFAULTS.get(k, 0)) for k in INT_KEYS}
    spec.update({k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in BYTES_KEYS})
    return spec
