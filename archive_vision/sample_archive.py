"""A small archive built offline: real photographs shipped with scikit-image and document pages rendered here
with Pillow, some turned on purpose (a known list) and some corrupt, for the demo and for tests.

    ROOT/archive/photo/*.jpg, ROOT/archive/document/*.png|*.jpg|*.tif, ROOT/archive/inbox/ (the corrupt ones)
    ROOT/manifest.csv   uri,label,orientation for ingest (orientation = the clockwise turn given on purpose)
    ROOT/truth.csv      the same, for the report's confusion matrices

Everything is deterministic from `seed`, so two builds give byte-identical files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import random
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# skimage.data pictures that ship inside the package (no download) and have a clear "up".
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "clock", "motorcycle_left",
               "motorcycle_right", "immunohistochemistry_top", "coins")
DOCUMENT_PHOTO_NAMES = ("page", "text")  # photographs of printed text
WORDS = ("archive scan record letter minutes council harbour railway station museum library survey estate "
         "parish register census deed map plan folio volume index county borough street river bridge market "
         "school church mill farm notice report committee annual account receipt ledger correspondence "
         "the of and to in for with on by from at as is was were be this that which").split()


@dataclasses.dataclass
class SampleArchive:
    """Where things are and what is true about them."""

    root: str
    archive: str
    manifest: str
    truth: str
    files: List[Dict[str, object]]  # uri, label, orientation (clockwise turn given on purpose), kind
    corrupt: List[str]

    @property
    def rotated(self) -> List[str]:
        """Files turned on purpose."""
        return [str(f["uri"]) for f in self.files if int(f["orientation"]) not in (0, -1)]


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data as data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        array = left if name.endswith("left") else right
    elif name == "immunohistochemistry_top":
        array = data.immunohistochemistry()[:320]
    else:
        array = getattr(data, name)()
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def _variants(array: np.ndarray, rng: random.Random, count: int) -> List[np.ndarray]:
    """The photo and `count - 1` crops of it (different framing, same "up"), so the archive is not tiny."""
    h, w = array.shape[:2]
    out = [array]
    for _ in range(count - 1):
        fw, fh = rng.uniform(0.6, 0.85), rng.uniform(0.6, 0.85)
        cw, ch = int(w * fw), int(h * fh)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out.append(np.ascontiguousarray(array[y:y + ch, x:x + cw]))
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an old Pillow without sizes: small but still text
        return ImageFont.load_default()


def render_page(seed: int, landscape: bool = False) -> Image.Image:
    """A typed page: letterhead and title at the top, left-aligned ragged paragraphs, a page number at the foot."""
    rng = random.Random(seed)
    width, height = (820, 600) if landscape else (600, 820)
    paper = tuple(rng.randint(236, 252) for _ in range(3))
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    ink = (rng.randint(10, 50),) * 3
    margin = rng.randint(40, 60)
    y = margin
    if rng.random() < 0.6:  # a letterhead block, always top-left: part of what "up" looks like for a page
        draw.rectangle([margin, y, margin + rng.randint(60, 110), y + 40], fill=(rng.randint(80, 160), 40, 40))
        draw.text((margin + 130, y + 4), " ".join(rng.choice(WORDS).upper() for _ in range(3)), fill=ink,
                  font=_font(20))
        y += 60
    draw.text((margin, y), " ".join(rng.choice(WORDS).capitalize() for _ in range(rng.randint(2, 5))),
              fill=ink, font=_font(rng.randint(26, 34)))
    y += 50
    draw.line([margin, y, width - margin, y], fill=ink, width=2)
    y += 20
    body = _font(rng.choice((14, 15, 16, 18)))
    line_height = int(body.size * 1.6) if hasattr(body, "size") else 18
    columns = 2 if landscape and rng.random() < 0.5 else 1
    column_width = (width - 2 * margin - (columns - 1) * 30) // columns
    top = y
    for column in range(columns):
        x0 = margin + column * (column_width + 30)
        y = top
        while y < height - margin - 50:
            if rng.random() < 0.12:
                y += line_height  # paragraph break
                continue
            indent = 24 if rng.random() < 0.15 else 0
            text = ""
            limit = column_width - indent - rng.randint(0, column_width // 3)  # ragged right edge
            while True:
                candidate = (text + " " + rng.choice(WORDS)).strip()
                if body.getlength(candidate) > limit:
                    break
                text = candidate
            draw.text((x0 + indent, y), text, fill=ink, font=body)
            y += line_height
    draw.text((width - margin - 40, height - margin), f"- {rng.randint(1, 300)} -", fill=ink, font=_font(14))
    return page


SPARSE_TEXTS = ("12 March 1953", "RECEIVED", "Box 14, folder 3", "Copy for the files", "Dear Sir,", "Invoice No. 4711",
                "Page 2", "Annual report 1962", "Not to be removed from the library", "Photograph: J. Smith",
                "CONFIDENTIAL", "Paid with thanks", "17.IV.1921", "Minutes of the meeting", "Ref. A/113/7")
SPARSE_PLACES = ("centre", "top", "top-left", "bottom-right")


def render_sparse_page(seed: int) -> Image.Image:
    """A nearly blank page: one or two short typed lines (a date, a stamp, a reference) on a 150 dpi A4 sheet, at the
    centre, the top, the top left or the foot. The layout alone says little about which way is up (a short line at
    one edge may be a heading or a page number): what an archive's cover sheets, receipts and dated backs look like."""
    rng = random.Random(seed)
    width, height = (1240, 1754)
    paper = tuple(rng.randint(236, 252) for _ in range(3))
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    ink = (rng.randint(10, 60),) * 3
    font = _font(rng.choice((24, 30, 38, 48)))
    lines = [rng.choice(SPARSE_TEXTS)] + ([rng.choice(SPARSE_TEXTS)] if rng.random() < 0.3 else [])
    place = SPARSE_PLACES[seed % len(SPARSE_PLACES)]
    line_height = int(font.size * 1.4) if hasattr(font, "size") else 20
    widest = max(draw.textlength(line, font=font) for line in lines)
    x = {"centre": (width - widest) / 2, "top": (width - widest) / 2, "top-left": 150,
         "bottom-right": width - 150 - widest}[place]
    y = {"centre": height / 2, "top": 180, "top-left": 150, "bottom-right": height - 200}[place]
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_height), line, fill=ink, font=font)
    return page


def turn_clockwise(array: np.ndarray, degrees: int) -> np.ndarray:
    """Pixels turned `degrees` clockwise (np.rot90 turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(array, k=(4 - degrees // 90) % 4))


def _save(image: Image.Image, path: str, fmt: str, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def build_sample_archive(root: str, *, photo_variants: int = 3, documents: int = 30, seed: int = 7,
                         rotate_every: int = 3) -> SampleArchive:
    """Write the sample archive under `root`; every `rotate_every`-th image is turned 90/180/270 on purpose."""
    rng = random.Random(seed)
    archive = os.path.join(root, "archive")
    files: List[Dict[str, object]] = []
    turns = (90, 180, 270)
    counter = {"n": 0}

    def next_turn() -> int:
        counter["n"] += 1
        if counter["n"] % rotate_every:
            return 0
        return turns[(counter["n"] // rotate_every) % 3]

    for name in PHOTO_NAMES:
        for index, array in enumerate(_variants(_skimage_photo(name), rng, photo_variants)):
            degrees = next_turn()
            path = os.path.join(archive, "photo", f"{name}_{index}.jpg")
            _save(Image.fromarray(turn_clockwise(array, degrees)), path, "JPEG", quality=90)
            files.append({"uri": path, "label": "photo", "orientation": degrees, "kind": "skimage"})
    for name in DOCUMENT_PHOTO_NAMES:
        for index, array in enumerate(_variants(_skimage_photo(name), rng, 2)):
            degrees = next_turn()
            path = os.path.join(archive, "document", f"{name}_photo_{index}.jpg")
            _save(Image.fromarray(turn_clockwise(array, degrees)), path, "JPEG", quality=90)
            files.append({"uri": path, "label": "document", "orientation": degrees, "kind": "skimage"})
    for index in range(documents):
        page = render_page(seed * 1000 + index, landscape=index % 4 == 3)
        degrees = next_turn()
        turned = Image.fromarray(turn_clockwise(np.asarray(page), degrees))
        ext, fmt = (("png", "PNG") if index % 3 == 0 else ("jpg", "JPEG"))
        path = os.path.join(archive, "document", f"page_{index:02d}.{ext}")
        _save(turned, path, fmt, **({"quality": 88} if fmt == "JPEG" else {}))
        files.append({"uri": path, "label": "document", "orientation": degrees, "kind": "rendered"})
    # A photo whose pixels are stored sideways with an EXIF tag saying so: upright once decoded, so truth is 0.
    sideways = Image.fromarray(turn_clockwise(_skimage_photo("chelsea"), 270))
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = os.path.join(archive, "photo", "chelsea_exif_sideways.jpg")
    _save(sideways, path, "JPEG", quality=90, exif=exif.tobytes())
    files.append({"uri": path, "label": "photo", "orientation": 0, "kind": "exif"})

    inbox = os.path.join(archive, "inbox")
    os.makedirs(inbox, exist_ok=True)
    corrupt = []
    good_jpeg = io.BytesIO()
    Image.fromarray(_skimage_photo("rocket")).save(good_jpeg, "JPEG", quality=90)
    for name, payload in (("truncated_scan.jpg", good_jpeg.getvalue()[:2000]), ("empty_scan.tif", b""),
                          ("readme_not_an_image.png", b"This folder holds the scans of box 14.\n")):
        path = os.path.join(inbox, name)
        with open(path, "wb") as f:
            f.write(payload)
        corrupt.append(path)

    manifest = os.path.join(root, "manifest.csv")
    truth = os.path.join(root, "truth.csv")
    for target, rows in ((manifest, files + [{"uri": p, "label": "document", "orientation": -1} for p in corrupt]),
                         (truth, files)):
        with open(target, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["uri", "label", "orientation"])
            for row in rows:
                writer.writerow([os.path.relpath(str(row["uri"]), root), row["label"], row["orientation"]])
    return SampleArchive(root=root, archive=archive, manifest=manifest, truth=truth, files=files, corrupt=corrupt)


def summary_line(sample: SampleArchive) -> str:
    """`62 images (29 photo, 33 document), 20 turned on purpose, 3 corrupt`."""
    per_label: Dict[str, int] = {}
    for f in sample.files:
        per_label[str(f["label"])] = per_label.get(str(f["label"]), 0) + 1
    labels = ", ".join(f"{v} {k}" for k, v in sorted(per_label.items()))
    return (f"{len(sample.files)} images ({labels}), {len(sample.rotated)} turned on purpose, "
            f"{len(sample.corrupt)} corrupt")


def counts_by_truth(sample: SampleArchive) -> Tuple[int, int]:
    """(images turned on purpose, images upright)."""
    rotated = len(sample.rotated)
    return rotated, len(sample.files) - rotated
