"""The pictures of the HTML pages (report.html, activations.html): inlined images, the confusion matrix drawing, a
colour ramp, and the pages' one style sheet."""
from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

THUMB_SIZE = 160

def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _jpeg_data_uri(image: Image.Image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def load_page(uri: str, page: int, max_side: int = THUMB_SIZE) -> Optional[Image.Image]:
    """The page as the model saw it (EXIF applied, RGB), shrunk to `max_side`; None when it cannot be read."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines import imaging

    try:
        with FileSystems.open(uri) as handle:
            data = handle.read()
        for decoded in imaging.decode_pages(data, draft_for=(max_side, "pad"), max_pages=max(page, 0) + 1):
            if decoded.page == max(page, 0):
                image = decoded.image.copy()
                image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
                return image
    except Exception:  # a thumbnail is a courtesy: a missing or broken original shows as a grey tile
        return None
    return None


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def confusion_picture(matrix: np.ndarray, labels: Sequence[str], title: str, cell: int = 44) -> Image.Image:
    """A confusion matrix drawn as a picture: rows are the truth, columns the prediction, shade = row share."""
    n = len(labels)
    font, small = _font(13), _font(11)
    texts = [str(label)[:16] for label in labels]
    cell = max(cell, 10 + max(int(small.getlength(t)) for t in texts))
    margin_left = 20 + max(int(small.getlength(t)) for t in texts + ["truth (rows)"])
    margin_top = 60
    width = max(margin_left + n * cell + 20, 20 + int(font.getlength(title)),
                margin_left + 20 + int(small.getlength("predicted (columns)")))
    height = margin_top + n * cell + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black", font=font)
    draw.text((margin_left, 28), "predicted (columns)", fill="#444", font=small)
    draw.text((10, 28), "truth (rows)", fill="#444", font=small)
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    share = matrix / totals
    for j, text in enumerate(texts):
        draw.text((margin_left + j * cell + 4, margin_top - 16), text, fill="black", font=small)
    for i, text in enumerate(texts):
        y = margin_top + i * cell
        draw.text((10, y + cell // 2 - 6), text, fill="black", font=small)
        for j in range(n):
            x = margin_left + j * cell
            s = float(share[i, j])
            # Right answers shade green, wrong ones red: the eye finds the off-diagonal mass at once.
            colour = (int(255 - 200 * s), 255, int(255 - 200 * s)) if i == j else \
                (255, int(255 - 190 * s), int(255 - 190 * s))
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour, outline="#999")
            draw.text((x + 6, y + cell // 2 - 7), str(int(matrix[i, j])), fill="black", font=font)
    return image


_MAGMA = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                   [250, 193, 39], [252, 253, 191]], np.float64)


def colour_map(values: np.ndarray) -> np.ndarray:
    """[h, w] floats in [0, 1] -> [h, w, 3] uint8 through a magma-like ramp (no matplotlib needed)."""
    x = np.clip(values, 0, 1) * (len(_MAGMA) - 1)
    low = np.floor(x).astype(int).clip(0, len(_MAGMA) - 2)
    t = (x - low)[..., None]
    return (_MAGMA[low] * (1 - t) + _MAGMA[low + 1] * t).astype(np.uint8)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px} table{border-collapse:collapse;margin:6px 0;font-size:13px;background:white}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left} th{background:#f0f0f0}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.sheet{display:flex;flex-wrap:wrap;gap:10px}
figure.thumb{margin:0;background:white;border:1px solid #ddd;padding:6px;width:auto;font-size:11px}
figure.thumb img{display:block;max-width:160px;max-height:160px;margin:auto}
figure.pair .imgs{display:flex;gap:6px;align-items:center}
figcaption{max-width:330px;overflow-wrap:anywhere;margin-top:4px;color:#333}
.missing{width:120px;height:120px;background:#ccc;display:flex;align-items:center;justify-content:center;color:#555}
.pill{display:inline-block;border-radius:9px;padding:0 7px;color:white;font-size:11px}
.auto_rotate{background:#c05621}.review{background:#b7791f}.ok{background:#2f855a}.skipped{background:#718096}.corrected{background:#2b6cb0}
.bars{display:flex;height:18px;width:520px;border:1px solid #ccc;margin:6px 0}
.bars div{height:100%}
"""
