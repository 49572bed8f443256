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
ORIENTATIONS = (0, 90, 180, 270)  # clockwise turns of the stored image relative to upright, in output column order
UNKNOWN = -1

# Facts the trainer, the exported graph and score share (defined here once).
MODEL_IMAGE_SIZE = 224  # the input side of the shipped backbones and the default orientation model
ORIENTATION_PROBABILITIES = "orientation_probabilities"  # the orientation head's output, and the graph's answer
CLASS_PROBABILITIES = "class_probabilities"
RESIZE_MODES = ("pad", "crop", "stretch")  # how ingest makes its square (and the graph's ingest view copies it)

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
    fingerprint: str = ""  # not a feature: the source's listing fingerprint, for the manifest (ingest --append)

    def manifest_row(self) -> Dict[str, Any]:
        """The record's columns for manifest.parquet (everything except the pixels; a new record is current)."""
        row = dataclasses.asdict(self)
        row.pop("encoded")
        row["encoded_bytes"] = len(self.encoded)
        row["superseded"] = False
        return row


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 negatives are ten-byte two's-complement varints on the wire
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _feature_entry(key: str, feature: bytes) -> bytes:
    # map<string, Feature> entry: key = field 1, value = field 2; Features.feature is field 1.
    return _length_delimited(1, _length_delimited(1, key.encode()) + _length_delimited(2, feature))


def _bytes_feature(value: bytes) -> bytes:
    return _length_delimited(1, _length_delimited(1, value))  # Feature.bytes_list = 1, BytesList.value = 1


def _int64_feature(value: int) -> bytes:
    packed = _varint(int(value))
    return _length_delimited(3, _length_delimited(1, packed))  # Feature.int64_list = 3, packed value = 1


def _record_fields(record: ImageRecord):
    return (
        (IMAGE_ENCODED, record.encoded), (IMAGE_FORMAT, record.format.encode()),
        (IMAGE_HEIGHT, record.height), (IMAGE_WIDTH, record.width),
        (SOURCE_URI, record.source_uri.encode()), (PAGE, record.page), (SHA256, record.sha256.encode()),
        (ORIGINAL_HEIGHT, record.original_height), (ORIGINAL_WIDTH, record.original_width),
        (EXIF_ORIENTATION, record.exif_orientation), (LABEL_INDEX, record.label_index),
        (LABEL_NAME, record.label_name.encode()), (ORIENTATION, record.orientation),
        (SPLIT, record.split.encode()), (AUGMENT_INDEX, record.augment_index),
    )


def serialize_example(record: ImageRecord) -> bytes:
    """The record as a serialized tf.train.Example, written straight in protobuf wire format.

    Beam workers use this so they never import TensorFlow (seconds of start-up and ~1 GB per worker);
    tests check it byte-for-byte against TensorFlow's own serializer and parse it with tf.io.
    """
    entries = []
    for key, value in _record_fields(record):
        feature = _bytes_feature(value) if isinstance(value, bytes) else _int64_feature(value)
        entries.append(_feature_entry(key, feature))
    return _length_delimited(1, b"".join(entries))


def make_example(record: ImageRecord):
    """Serialize-ready tf.train.Example for a record (imports TensorFlow's protos lazily)."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def b(v: bytes):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[v]))

    def i(v: int):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v)]))

    feats = {key: b(value) if isinstance(value, bytes) else i(value) for key, value in _record_fields(record)}
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
