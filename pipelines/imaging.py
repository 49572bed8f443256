"""Pure image functions used by the ingest and score jobs: sniff, decode, orient, convert, resize,
encode, augment. No Beam here; every failure is an `ImageError` whose `kind` lands in errors.parquet.

Colour conversion to RGB (documented contract, see README "Colour modes"):
- RGB as is; L and 1 replicated to three channels; P/PA through their palette.
- Anything with alpha (RGBA, LA, PA, P with a transparency entry) is composited over WHITE, because
  scanned material is paper: transparent regions of a PNG cut-out read as background, not ink.
- CMYK (JPEG, incl. Adobe-inverted, and TIFF) and YCbCr/LAB/HSV through Pillow's converters.
- 16-bit and 32-bit greyscale (I;16*, I) scaled by their full type range (value / 257 for 16-bit),
  so a dark 16-bit scan stays dark; float (F) images are clipped to [0, 1] then scaled to [0, 255].
  16-bit RGB TIFFs are read by Pillow keeping the high byte of each sample, which is the same scaling.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import warnings
from typing import Iterator, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from pipelines.schema import RESIZE_MODES  # noqa: E402
OUTPUT_FORMATS = ("jpeg", "png")
DEFAULT_MAX_PIXELS = 100_000_000
EXIF_ORIENTATION_TAG = 0x0112

# EXIF orientation tag -> the transpose that makes the pixels upright as a viewer shows them.
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Magic bytes -> format name. Order matters only for prefixes that overlap (none do here).
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
)
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}
SUPPORTED_FORMATS = tuple(_PIL_FORMATS)


# ImageError kinds that are a property of a file's bytes: the same bytes fail the same way on every run. The others
# (too_large, too_many_pages, unreadable) depend on the run's limits or on the storage, and are tried again.
CONTENT_DEFECTS = frozenset({"empty", "unknown_format", "corrupt", "truncated"})


class ImageError(Exception):
    """A bad input, as data: `kind` is a short machine-readable reason, the message says more."""

    def __init__(self, kind: str, message: str, page: int = -1):
        super().__init__(message)
        self.kind = kind
        self.page = page


@dataclasses.dataclass
class DecodedPage:
    """One upright RGB page (or the single image) of a source file, before the final resize."""

    page: int
    image: Image.Image
    exif_orientation: int
    original_width: int
    original_height: int
    mode: str = ""  # the decoded frame's Pillow mode before it was made RGB (score sends some files as they are)


def content_sha256(data: bytes) -> str:
    """Hex sha256 of a whole source file: identity for splits, dedup and incremental runs."""
    return hashlib.sha256(data).hexdigest()


def sniff_format(data: bytes) -> Optional[str]:
    """The image format from the leading bytes (never from the file name), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def target_draft_size(width: int, height: int, size: int, mode: str) -> Tuple[int, int]:
    """The smallest source size (w, h) from which `resize` can still make its output without upscaling."""
    if mode == "pad":
        scale = size / max(width, height)
    elif mode == "crop":
        scale = size / min(width, height)
    else:  # stretch: each axis independently
        return (min(width, size), min(height, size))
    return (max(1, min(width, int(np.ceil(width * scale)))), max(1, min(height, int(np.ceil(height * scale)))))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, by the rules in this module's docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    elif mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float64)
        full_range = 65535.0 if mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(2**32 - 1)
        grey = np.clip(np.round(array * (255.0 / full_range)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 0)
        return int(value) if isinstance(value, int) else 0
    except Exception:  # a malformed EXIF block is no reason to lose the pixels
        return 0


def _failure_kind(error: Exception) -> str:
    """Pillow says 'truncated' in several ways; everything else undecodable is 'corrupt'."""
    text = str(error).lower()
    return "truncated" if isinstance(error, EOFError) or "truncated" in text or "premature" in text else "corrupt"


def _open(data: bytes, max_pixels: int) -> Tuple[Image.Image, str]:
    if not data:
        raise ImageError("empty", "zero-byte file")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("unknown_format", f"not a supported image (leading bytes {data[:8]!r}); "
                                            f"supported: {', '.join(SUPPORTED_FORMATS)}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the policy; Pillow's warning just below its hard stop is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as e:
        # Pillow's own hard stop (2x its warning size) fires before our limit for the very largest images.
        raise ImageError("too_large", f"refused before decoding: more megapixels than Pillow's safety limit "
                                      f"({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(_failure_kind(e), f"{fmt} header unreadable: {e}") from e
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"{fmt} declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} = {width * height / 1e6:.1f} megapixels exceeds the "
                                      f"limit of {max_pixels / 1e6:.1f} megapixels; refused before decoding")
    return image, fmt


def _load_frame(image: Image.Image, fmt: str, page: int, draft_for: Optional[Tuple[int, str]]) -> Image.Image:
    """Decode the current frame, using JPEG DCT-domain downscaling when only a small output is wanted.

    The draft target is symmetric in width and height, so it is right whatever the EXIF turn.
    """
    if fmt == "jpeg" and draft_for is not None:
        size, mode = draft_for
        image.draft("RGB" if image.mode in ("RGB", "YCbCr") else image.mode,
                    target_draft_size(image.size[0], image.size[1], size, mode))
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e), page) from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError) as e:
        raise ImageError(_failure_kind(e), f"{fmt} page {page} failed to decode: {e}", page) from e
    return image


def decode_pages(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_for: Optional[Tuple[int, str]] = None,
                 max_pages: int = 10_000) -> Iterator[DecodedPage]:
    """Yield every page of a source file as upright RGB; multi-page TIFF gives all pages, GIF its first frame.

    `draft_for=(size, resize_mode)` lets JPEG decoding skip work the final resize would throw away.
    Raises ImageError for the whole file (header-level) or for the page that failed (`error.page`).
    """
    image, fmt = _open(data, max_pixels)
    frames = ImageSequence.Iterator(image) if fmt == "tiff" else iter([image])
    for page, frame in enumerate(frames):
        if page >= max_pages:
            raise ImageError("too_many_pages", f"more than {max_pages} pages", page)
        if frame.size[0] * frame.size[1] > max_pixels:
            raise ImageError("too_large", f"page {page} is {frame.size[0]}x{frame.size[1]}, over the pixel limit", page)
        full_w, full_h = frame.size
        loaded = _load_frame(frame, fmt, page, draft_for)
        # Only after the pixels loaded: Pillow's PNG getexif() loads the image itself, and an
        # error there must surface as a decode error, not be swallowed as "no EXIF".
        page_orientation = _exif_orientation(loaded)
        rgb = to_rgb(loaded)
        transpose = _EXIF_TRANSPOSE.get(page_orientation)
        if transpose is not None:
            rgb = rgb.transpose(transpose)
            if page_orientation in (5, 6, 7, 8):
                full_w, full_h = full_h, full_w
        # Copy so the next TIFF frame seek does not invalidate the pixels we hand out.
        yield DecodedPage(page=page, image=rgb.copy() if fmt == "tiff" else rgb,
                          exif_orientation=page_orientation, original_width=full_w, original_height=full_h,
                          mode=loaded.mode)


def resize(image: Image.Image, size: int, mode: str = "pad") -> Image.Image:
    """Square `size` x `size` output: letterbox (`pad`, black bars of equal width on both sides, like
    trainer.preprocessing.resize_for_model), centre `crop` after scaling the short side, or `stretch`. Antialiased
    bilinear, like the serving graph.

    Pad and crop round the scaled side to the parity of `size`, so the bars (or the cut) are equal on both sides and
    resizing a turned scan gives the turned square: orientation training turns the stored squares, and an uneven
    split would let a model tell those turns from real turned scans by the bars alone."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    w, h = image.size
    if mode == "stretch":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if mode == "crop":
        scale = size / min(w, h)
        nw, nh = (size + 2 * max(0, round((n * scale - size) / 2)) for n in (w, h))
        scaled = image.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        return scaled.crop((left, top, left + size, top + size))
    scale = size / max(w, h)
    nw, nh = (size - 2 * min(round((size - n * scale) / 2), (size - 1) // 2) for n in (w, h))
    scaled = image.resize((nw, nh), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(scaled, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 90, png_level: int = 6) -> bytes:
    """Compressed bytes for a record (never raw pixels): baseline JPEG at `quality`, or PNG at zlib `png_level`
    (1: twice as fast as 6, for bytes that are only sent, not stored)."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, "JPEG", quality=quality, optimize=False)
    elif fmt == "png":
        image.save(buffer, "PNG", compress_level=png_level)
    else:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    return buffer.getvalue()


def augment_copy(image: Image.Image, seed: int, *, allow_flip: bool,
                 max_shift: float = 0.1) -> Tuple[Image.Image, bool]:
    """A deterministic augmented copy and whether it was mirrored left-right.

    Optional horizontal flip, then a width/height shift with black fill. Flips are only allowed where
    the caller says so: mirrored text is not text. A mirrored copy needs its orientation label changed
    (see `mirrored_orientation`); the shift never changes it.
    """
    rng = random.Random(seed)
    mirrored = bool(allow_flip and rng.random() < 0.5)
    if mirrored:
        image = ImageOps.mirror(image)
    w, h = image.size
    dx = int(round(rng.uniform(-max_shift, max_shift) * w))
    dy = int(round(rng.uniform(-max_shift, max_shift) * h))
    shifted = Image.new("RGB", (w, h), (0, 0, 0))
    shifted.paste(image, (dx, dy))
    return shifted, mirrored


def augment(image: Image.Image, seed: int, *, allow_flip: bool, max_shift: float = 0.1) -> Image.Image:
    """The pixels of `augment_copy` (same seed, same copy)."""
    return augment_copy(image, seed, allow_flip=allow_flip, max_shift=max_shift)[0]


def mirrored_orientation(orientation: int) -> int:
    """The orientation label of a left-right mirrored copy of an image stored turned `orientation`.

    Labels are the clockwise turn of the stored image from upright. Mirroring reverses the sense of a
    turn: mirror(turn_cw(U, d)) == turn_cw(mirror(U), -d). The mirrored upright is a valid upright
    picture, so the copy's label is (360 - d) % 360: 90 <-> 270, while 0, 180 and unknown (-1) stay.
    (An up-down flip would instead give (180 - d) % 360; no augmentation here makes one.)
    """
    if orientation < 0:
        return orientation
    return (360 - orientation) % 360


def split_for(sha256_hex: str, fractions: Tuple[float, float, float]) -> str:
    """train/val/test from the content hash: the same bytes always land in the same split."""
    bucket = int(sha256_hex[:16], 16) / float(1 << 64)
    train, val, _ = fractions
    if bucket < train:
        return "train"
    if bucket < train + val:
        return "val"
    return "test"


def full_decode_then_resize(data: bytes, size: int, mode: str = "pad") -> Image.Image:
    """The naive path (decode at full resolution, then resize): kept as the benchmark baseline."""
    page = next(decode_pages(data, draft_for=None))
    return resize(page.image, size, mode)


def turn_clockwise(image: Image.Image, degrees: int) -> Image.Image:
    """The Pillow image turned `degrees` (0/90/180/270) clockwise."""
    ops = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    return image if degrees % 360 == 0 else image.transpose(ops[degrees % 360])


def make_upright(image: Image.Image, orientation_degrees: int) -> Image.Image:
    """Undo a clockwise turn of `orientation_degrees` (the MODEL CONTRACT's label): turn it back counter-clockwise."""
    return turn_clockwise(image, (360 - orientation_degrees) % 360)
