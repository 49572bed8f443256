"""Frozen-backbone features of corpus images under all four turns, cached on disk once per image x variant.

Feature extraction is the whole cost of training an orientation head on a CPU (the head itself trains in
seconds), so every image is decoded with the shared serving path (trainer.preprocessing), turned 0/90/180/270
degrees clockwise, run through the frozen MobileNetV2 and pooled to the OrientationHead's grid, and the
result [4, grid, grid, 1280] float16 is saved as one .npy per image and variant. Pooling first is exact:
the head's first step is that same average pooling, so a head trained on the pooled grid runs unchanged on
the full [7, 7, 1280] map inside the model.

Variants (each measured in research.train_default's experiments):
- "pad224": the whole image letterboxed to 224 (the serving path; what the shipped model sees);
- "flip224": the mirror image, letterboxed to 224 (a mirrored upright photo is still upright: augmentation);
- "pad320": the same at 320 (the backbone is fully convolutional; the grid pooling absorbs the size);
- "crop224": the central square cropped, resized to 224 (no padding, loses the edges);
- "tiles448": pages only: the image letterboxed to 448 and cut into four 224 tiles (2x2), so glyphs keep
  twice the resolution; the four tiles' grids are stored side by side as [4, 4 tiles, grid, grid, 1280].
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

GRID = 3
# Output of MobileNetV2's block 14 (7x7x160 at 224 px): what the fine-tuned top blocks 15-18 start from.
CUT_LAYER = "features_14_conv_3"
# The shipped model's backbone (trainer.torchvision_mobilenet). Features of another backbone (`backbone=` a name
# of trainer.backbones' registry, compared by research.backbone_compare) are cached under `<name>/<variant>`.
DEFAULT_BACKBONE = "mobilenet_v2_torchvision"
VARIANTS = ("pad224", "flip224", "pad320", "crop224", "tiles448")


def turn_clockwise_tf(pixels, degrees: int):
    """[..., H, W, C] tensor turned `degrees` clockwise (the MODEL CONTRACT's label direction)."""
    import tensorflow as tf

    return tf.image.rot90(pixels, k=(4 - degrees // 90) % 4)


def _variant_pixels(image, variant: str):
    """The decoded uint8 image -> float32 [n_views, S, S, 3] in [0, 255] for the variant (upright)."""
    import tensorflow as tf

    from trainer.preprocessing import resize_for_model

    if variant == "pad224":
        return resize_for_model(image, 224)[None]
    if variant == "flip224":
        return resize_for_model(image[:, ::-1], 224)[None]
    if variant == "pad320":
        return resize_for_model(image, 320)[None]
    if variant == "crop224":
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
        square = image[top:top + side, left:left + side]
        return tf.clip_by_value(tf.image.resize(tf.cast(square, tf.float32), (224, 224), antialias=True),
                                0.0, 255.0)[None]
    if variant == "tiles448":
        big = resize_for_model(image, 448)
        return tf.stack([big[r:r + 224, c:c + 224] for r in (0, 224) for c in (0, 224)])
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")


def cache_path(cache_dir: str, variant: str, image_path: str) -> str:
    """Where one image's features for a variant live."""
    key = hashlib.sha1(os.path.abspath(image_path).encode("utf-8")).hexdigest()[:20]
    return os.path.join(cache_dir, variant, key + ".npy")


class FeatureExtractor:
    """A frozen backbone (the torchvision MobileNetV2 unless `backbone` names another of trainer.backbones' registry,
    with its ImageNet weights) followed by the head's grid pooling, one compiled call per batch.

    With `cut` (a layer name, e.g. CUT_LAYER) it returns that layer's full feature map instead, unpooled: the
    input of the top blocks when those are fine-tuned on cached activations.
    """

    def __init__(self, grid: int = GRID, cut: Optional[str] = None, backbone: str = DEFAULT_BACKBONE):
        import tensorflow as tf

        if cut and backbone != DEFAULT_BACKBONE:
            raise ValueError(f"cut={cut!r} names a layer of {DEFAULT_BACKBONE}, not of {backbone}")

        from trainer.model import AdaptiveGridPooling

        self.backbones: Dict[int, object] = {}
        if backbone == DEFAULT_BACKBONE:
            from trainer.torchvision_mobilenet import build_mobilenet_v2_torchvision

            self._build = build_mobilenet_v2_torchvision
        else:
            from trainer.backbones import build_backbone

            self._build = lambda weights, include_top, input_size: build_backbone(backbone, "imagenet", input_size)
        self.pool = AdaptiveGridPooling(grid)
        self.cut = cut
        self.backbone = backbone
        self._calls: Dict[int, Callable] = {}
        self._tf = tf

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, S, S, 3] -> float16 [N, grid, grid, 1280]."""
        size = int(pixels.shape[1])
        if size not in self._calls:
            import keras

            backbone = self._build(weights="default", include_top=False, input_size=size)
            backbone.trainable = False
            if self.cut:
                bottom = keras.Model(backbone.input, backbone.get_layer(self.cut).output)
                self._calls[size] = self._tf.function(lambda x: bottom(x, training=False), reduce_retracing=True)
            else:
                pool = self.pool
                self._calls[size] = self._tf.function(
                    lambda x: pool(backbone(x, training=False)), reduce_retracing=True)
        out = []
        for start in range(0, len(pixels), 32):
            out.append(self._calls[size](self._tf.constant(pixels[start:start + 32])).numpy())
        return np.concatenate(out).astype(np.float16)


def image_features(extractor: FeatureExtractor, image_bytes: bytes, variant: str) -> np.ndarray:
    """Features of one image under the four clockwise turns: [4, (tiles,) grid, grid, C] float16."""
    import tensorflow as tf

    from trainer.preprocessing import decode_image_bytes

    views = _variant_pixels(decode_image_bytes(tf.constant(image_bytes)), variant)  # [V, S, S, 3]
    batch = []
    for degrees in (0, 90, 180, 270):
        turned = turn_clockwise_tf(views, degrees)
        if variant == "tiles448" and degrees:
            # Tiles of the turned page = the turned tiles, moved: rebuild the page, turn it, re-cut.
            page = tf.concat([tf.concat([views[0], views[1]], axis=1), tf.concat([views[2], views[3]], axis=1)], 0)
            page = turn_clockwise_tf(page, degrees)
            turned = tf.stack([page[r:r + 224, c:c + 224] for r in (0, 224) for c in (0, 224)])
        batch.append(turned)
    features = extractor(tf.concat(batch, axis=0).numpy())
    views_per_turn = int(views.shape[0])
    features = features.reshape((4, views_per_turn) + features.shape[1:])
    return features[:, 0] if views_per_turn == 1 else features


def cached_features(paths: Sequence[str], variant: str, cache_dir: str,
                    extractor: Optional[FeatureExtractor] = None, progress: bool = True,
                    cut: Optional[str] = None, backbone: str = DEFAULT_BACKBONE) -> np.ndarray:
    """[N, 4, ...] features of the images (computed and saved where missing), in the order of paths.

    cut: the unpooled map of that backbone layer instead (cached apart, as `<variant>@<cut>`).
    backbone: another backbone's features (cached apart, under `<backbone>/`)."""
    rows: List[np.ndarray] = []
    folder = f"{variant}@{cut}" if cut else variant
    if backbone != DEFAULT_BACKBONE:
        folder = f"{backbone}/{folder}"
    if extractor is not None and getattr(extractor, "backbone", backbone) != backbone:
        raise ValueError(f"an extractor of {extractor.backbone} cannot fill the {backbone} cache")
    os.makedirs(os.path.join(cache_dir, folder), exist_ok=True)
    for index, path in enumerate(paths):
        target = cache_path(cache_dir, folder, path)
        if os.path.exists(target):
            rows.append(np.load(target))
            continue
        if extractor is None:
            extractor = FeatureExtractor(cut=cut, backbone=backbone)
        with open(path, "rb") as f:
            features = image_features(extractor, f.read(), variant)
        np.save(target + ".tmp.npy", features)
        os.replace(target + ".tmp.npy", target)
        rows.append(features)
        if progress and index % 100 == 0:
            print(f"  features {folder}: {index + 1}/{len(paths)}", flush=True)
    return np.stack(rows) if rows else np.zeros((0, 4), np.float16)


def _cached_evidence(paths: Sequence[str], cache_dir: str, folder: str, make_reader, read, empty: Tuple[int, ...],
                     label: str, progress: bool) -> np.ndarray:
    """[N, ...] per-image arrays `read(reader, path)`, cached like features under `folder`; the reader is made
    (make_reader()) only if some image is missing."""
    os.makedirs(os.path.join(cache_dir, folder), exist_ok=True)
    reader = None
    rows: List[np.ndarray] = []
    for index, path in enumerate(paths):
        target = cache_path(cache_dir, folder, path)
        if not os.path.exists(target):
            reader = reader or make_reader()
            np.save(target + ".tmp.npy", read(reader, path))
            os.replace(target + ".tmp.npy", target)
            if progress and index % 100 == 0:
                print(f"  {label}: {index + 1}/{len(paths)}", flush=True)
        rows.append(np.load(target))
    return np.stack(rows) if rows else np.zeros((0,) + empty)


def cached_text_lines(paths: Sequence[str], cache_dir: str, side: Optional[int] = None,
                      progress: bool = True) -> np.ndarray:
    """[N, 4 turns, 5] text-line evidence rows (trainer.text_lines.read_turns) of the images, cached like
    features under `text_lines@<detector side>`; the reader loads only if some image is missing."""
    from trainer import text_lines

    side = side or text_lines.DEFAULT_SIDE
    return _cached_evidence(paths, cache_dir, f"text_lines@{side}", lambda: text_lines.TextLineReader(side=side),
                            text_lines.read_turns, (4, 5), "text lines", progress)


def cached_text_crops(paths: Sequence[str], cache_dir: str, progress: bool = True) -> np.ndarray:
    """[N, 4 turns, crops, 4] the text-crop classifier's probabilities (trainer.text_crops.read_turns_probabilities)
    for the images turned 0/90/180/270, cached like features under `text_crops@<copy short side>`."""
    from trainer import text_crops

    return _cached_evidence(paths, cache_dir, f"text_crops@{text_crops.COPY_SHORT}", text_crops.TextCropReader,
                            text_crops.read_turns_probabilities, (4, len(text_crops.CROP_CENTRES), 4), "text crops",
                            progress)
