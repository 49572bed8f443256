"""Upright copies of the auto_rotate pages (score --write-corrected): a JPEG turned losslessly by jpegtran where it
can be, anything else re-encoded; never inside the archive, never over an original."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import imaging, sources
from pipelines.imaging import make_upright
from pipelines.score.options import COUNTER_NAMESPACE


def jpegtran_path() -> Optional[str]:
    """The jpegtran binary (Debian: libjpeg-turbo-progs), or None."""
    return shutil.which("jpegtran")


def corrected_path(uri: str, input_root: str, corrected_dir: str, page: int) -> str:
    """Where the upright copy of `uri` goes: its path under the input folder (or its full path) below the dir;
    page N > 0 of a multi-page file becomes `<stem>.pageN<ext>`."""
    rel = sources.path_under(uri, input_root)
    if page > 0:
        stem, ext = os.path.splitext(rel)
        rel = f"{stem}.page{page}{ext}"
    return FileSystems.join(corrected_dir, rel) if sources.is_remote(corrected_dir) else os.path.join(corrected_dir, rel)


_JPEGTRAN_OPS = {
    (): lambda a: a,
    ("-flip", "horizontal"): lambda a: a[:, ::-1],
    ("-flip", "vertical"): lambda a: a[::-1],
    ("-rotate", "90"): lambda a: np.rot90(a, -1),
    ("-rotate", "180"): lambda a: np.rot90(a, 2),
    ("-rotate", "270"): lambda a: np.rot90(a, 1),
    ("-transpose",): lambda a: np.swapaxes(a, 0, 1),
    ("-transverse",): lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),
}


def jpegtran_operation(exif_orientation: int, orientation_degrees: int) -> Tuple[str, ...]:
    """The one jpegtran operation equal to "apply the EXIF turn, then turn the page upright".

    Found by trying all eight on a small asymmetric picture, so it follows Pillow's own EXIF table exactly.
    """
    from PIL import Image, ImageOps

    probe = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = Image.fromarray(probe)
    if exif_orientation in range(2, 9):
        image.getexif()[imaging.EXIF_ORIENTATION_TAG] = exif_orientation  # Pillow keeps this Exif object
        image = ImageOps.exif_transpose(image)
    wanted = np.asarray(make_upright(image, orientation_degrees))
    for flags, op in _JPEGTRAN_OPS.items():
        result = op(probe)
        if result.shape == wanted.shape and np.array_equal(result, wanted):
            return flags
    raise AssertionError(f"no jpegtran operation for EXIF {exif_orientation} + {orientation_degrees}")


def reset_exif_orientation(jpeg: bytes) -> bytes:
    """The same JPEG with its EXIF Orientation tag set to 1 (pixels already upright), bytes otherwise untouched."""
    import struct

    position = 2
    while position + 4 <= len(jpeg) and jpeg[position] == 0xFF:
        marker, length = jpeg[position + 1], struct.unpack(">H", jpeg[position + 2:position + 4])[0]
        if marker == 0xDA:  # start of scan: no metadata after this
            break
        segment = position + 4
        if marker == 0xE1 and jpeg[segment:segment + 6] == b"Exif\x00\x00":
            tiff = segment + 6
            order = "<" if jpeg[tiff:tiff + 2] == b"II" else ">"
            ifd = tiff + struct.unpack(order + "I", jpeg[tiff + 4:tiff + 8])[0]
            count = struct.unpack(order + "H", jpeg[ifd:ifd + 2])[0]
            for index in range(count):
                entry = ifd + 2 + 12 * index
                if struct.unpack(order + "H", jpeg[entry:entry + 2])[0] == imaging.EXIF_ORIENTATION_TAG:
                    patched = bytearray(jpeg)
                    patched[entry + 8:entry + 10] = struct.pack(order + "H", 1)
                    return bytes(patched)
        position += 2 + length
    return jpeg


def upright_bytes(data: bytes, page: int, orientation_degrees: int, fmt: str,
                  lossless_jpeg: bool = True) -> Tuple[bytes, str, str]:
    """(bytes, extension, method) of the page turned upright, in its original format where possible.

    JPEG goes through `jpegtran -perfect` (lossless; an EXIF turn is folded into the same operation and the tag
    reset to 1); when that is impossible (no binary, partial edge blocks) or `lossless_jpeg` is False it is
    re-encoded at quality 95 and the method says so. Other formats keep every pixel (PNG/TIFF/BMP/lossless WebP;
    GIF becomes PNG).
    """
    from PIL import Image, ImageOps, ImageSequence

    if fmt == "jpeg":
        image = Image.open(io.BytesIO(data))
        exif_turn = int(image.getexif().get(imaging.EXIF_ORIENTATION_TAG, 0) or 0)
        tool = jpegtran_path()
        if tool and lossless_jpeg:
            operation = jpegtran_operation(exif_turn, orientation_degrees)
            done = subprocess.run([tool, "-copy", "all", "-perfect", *operation], input=data,
                                  capture_output=True, timeout=120)
            if done.returncode == 0 and done.stdout:
                fixed = reset_exif_orientation(done.stdout) if exif_turn not in (0, 1) else done.stdout
                return fixed, ".jpg", "jpegtran_lossless"
        upright = make_upright(ImageOps.exif_transpose(image).convert("RGB"), orientation_degrees)
        buffer = io.BytesIO()
        upright.save(buffer, "JPEG", quality=95, subsampling=0)
        why = "no_jpegtran" if not tool else ("not_mcu_aligned" if lossless_jpeg else "asked")
        return buffer.getvalue(), ".jpg", f"reencoded_q95_{why}"
    image = Image.open(io.BytesIO(data))
    if fmt == "tiff":
        for index, frame in enumerate(ImageSequence.Iterator(image)):
            if index == page:
                image = frame.copy()
                break
    upright = make_upright(ImageOps.exif_transpose(image), orientation_degrees)
    buffer = io.BytesIO()
    if fmt in ("png", "tiff", "bmp"):
        upright.save(buffer, {"png": "PNG", "tiff": "TIFF", "bmp": "BMP"}[fmt])
        return buffer.getvalue(), {"png": ".png", "tiff": ".tif", "bmp": ".bmp"}[fmt], "lossless_pixels"
    if fmt == "webp":
        upright.save(buffer, "WEBP", lossless=True)
        return buffer.getvalue(), ".webp", "lossless_pixels"
    # GIF (palette) and anything else: PNG keeps every pixel exactly.
    upright.save(buffer, "PNG")
    return buffer.getvalue(), ".png", "png_lossless_pixels"


def copy_turn(row: dict) -> Optional[int]:
    """The turn an upright copy of the row's page undoes, or None for no copy: the model's for auto_rotate, the
    person's for a page a person answered (score --corrections) with a turn (never no_up / not_image)."""
    if row["decision"] == "auto_rotate":
        return row["orientation_degrees"]
    if row["decision"] == "corrected" and (row.get("corrected_orientation") or 0) in (90, 180, 270):
        return row["corrected_orientation"]
    return None


class WriteCorrectedFn(beam.DoFn):
    """auto_rotate rows, and rows a person answered with a turn -> an upright copy under --write-corrected (never
    over an original); other rows pass."""

    def __init__(self, corrected_dir: str, input_root: str):
        self._dir = corrected_dir
        self._root = input_root
        self._written = Metrics.counter(COUNTER_NAMESPACE, "corrected_written")
        self._files = Metrics.counter(COUNTER_NAMESPACE, "files_read")
        self._bytes = Metrics.counter(COUNTER_NAMESPACE, "bytes_read")

    def process(self, row: dict):
        turn = copy_turn(row)
        # A reused row (--skip-known) keeps what the earlier run wrote: only a page answered since gets its copy.
        if row.get("reused") and (row["decision"] != "corrected" or row.get("corrected_uri")):
            turn = None
        if turn is None:
            yield row
            return
        try:
            with FileSystems.open(row["uri"], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
            self._files.inc()
            self._bytes.inc(len(data))
            if imaging.content_sha256(data) != row["sha256"]:
                raise RuntimeError("the file changed since it was scored")
            payload, ext, method = upright_bytes(data, row["page"], turn, row["format"])
            target = os.path.splitext(corrected_path(row["uri"], self._root, self._dir, row["page"]))[0] + ext
            if not sources.is_remote(target):
                if os.path.exists(target) and os.path.samefile(target, row["uri"]):
                    raise RuntimeError(f"refusing to overwrite the original {row['uri']}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Write beside, then rename: a reader never sees half a file.
                fd, temp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".corrected-")
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                os.replace(temp, target)
            else:
                with FileSystems.create(target) as handle:
                    handle.write(payload)
            self._written.inc()
            yield dict(row, corrected_uri=target, corrected_method=method)
        except Exception as e:  # a failed copy does not lose the prediction; it says why in the row
            Metrics.counter(COUNTER_NAMESPACE, "corrected_failed").inc()
            yield dict(row, corrected_method=f"failed: {type(e).__name__}: {e}"[:500])
