"""Generated test images: every format and colour mode ingest must handle, built in memory."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image


def make_random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 pixels (smooth so JPEG round trips stay close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), channels), dtype=np.uint8)
    image = Image.fromarray(small.squeeze(-1) if channels == 1 else small).resize((width, height), Image.BILINEAR)
    array = np.asarray(image)
    return array if channels != 1 else array[..., None]


def make_asymmetric_image(height: int = 120, width: int = 160) -> np.ndarray:
    """An image whose every rotation and mirror differs: a red block top-left, a blue bar along the bottom."""
    array = np.full((height, width, 3), 255, dtype=np.uint8)
    array[: height // 3, : width // 4] = (255, 0, 0)
    array[-height // 6:, :] = (0, 0, 255)
    return array


def encode_array(array: np.ndarray, fmt: str, mode: Optional[str] = None, **save_args) -> bytes:
    """Encode pixels with Pillow in `fmt` (JPEG, PNG, TIFF, BMP, GIF, WEBP), optionally converting the mode first."""
    image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def jpeg_with_exif_orientation(array: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels are `array` and whose EXIF Orientation tag is `orientation`."""
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def multipage_tiff(pages) -> bytes:
    """A multi-page TIFF from a list of Pillow images (any modes)."""
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=list(pages[1:]))
    return buffer.getvalue()


def tiff_16bit_grey(array16: np.ndarray) -> bytes:
    """A 16-bit greyscale TIFF (mode I;16)."""
    buffer = io.BytesIO()
    Image.fromarray(array16.astype(np.uint16)).save(buffer, "TIFF")
    return buffer.getvalue()


def write_sample_archive(root, n_per_class: int = 4, size=(120, 160)) -> dict:
    """A folder archive `root/<class>/...` with good images of several formats and a set of bad inputs.

    Returns {"good": [paths], "bad": {path: expected error_type}}.
    """
    import os

    good, bad = [], {}
    h, w = size
    for c, name in enumerate(("photo", "document")):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n_per_class):
            array = make_random_image(h, w, 3, seed=100 * c + i)
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("WEBP", "webp")][i % 4]
            path = os.path.join(root, name, f"{name}_{i}.{ext}")
            with open(path, "wb") as f:
                f.write(encode_array(array, fmt))
            good.append(path)
    docs = os.path.join(root, "document")
    with open(os.path.join(docs, "zero.jpg"), "wb"):
        pass
    bad[os.path.join(docs, "zero.jpg")] = "empty"
    jpeg = encode_array(make_random_image(h, w, 3, seed=7), "JPEG")
    with open(os.path.join(docs, "truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])
    bad[os.path.join(docs, "truncated.jpg")] = "truncated"
    with open(os.path.join(docs, "notes.jpg"), "wb") as f:
        f.write(b"these are typed notes, not a picture\n")
    bad[os.path.join(docs, "notes.jpg")] = "unknown_format"
    link = os.path.join(docs, "moved.png")
    os.symlink(os.path.join(root, "no-such-file.png"), link)
    bad[link] = "unreadable"
    return {"good": good, "bad": bad}
