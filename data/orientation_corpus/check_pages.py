"""The pages of unseen_check.sh's page check, picked without looking at any model's answer.

    python check_pages.py PKGS_DIR OUT_DIR PACKAGE...

For each package (unpacked under PKGS_DIR/<package>), its PDFs under usr/share/doc are ordered by the SHA-1 of their
path inside the package, and the first four that give a page are taken. Of each, the first, middle and last page
are rendered at 150 dpi (pdftoppm), as the corpus renders its pages, into OUT_DIR/<package>/<pdf>_p<N>.png. A page
is left out when it is blank (under 0.4% of its pixels darker than 200: the corpus' filter) or is a figure cropped
to its own PDF rather than a page (short side under 5 inches).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

PDFS_PER_PACKAGE = 4
DPI = 150
MIN_SHORT_SIDE_INCHES = 5
MIN_INK = 0.004


def pdf_pages(path: str) -> int:
    info = subprocess.run(["pdfinfo", path], capture_output=True, text=True, timeout=60).stdout
    pages = [int(line.split()[-1]) for line in info.splitlines() if line.startswith("Pages:")]
    return pages[0] if pages else 0


def render(path: str, page: int, workdir: str) -> Image.Image | None:
    """The page at DPI, or None (and a line on stderr) when pdftoppm cannot render it."""
    prefix = os.path.join(workdir, f"p{page}")
    try:
        done = subprocess.run(["pdftoppm", "-r", str(DPI), "-f", str(page), "-l", str(page), "-png", path, prefix],
                              capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        print(f"check_pages: {path} page {page}: pdftoppm timed out", file=sys.stderr)
        return None
    made = glob.glob(prefix + "*.png")
    if done.returncode != 0 or not made:
        print(f"check_pages: {path} page {page}: pdftoppm failed ({done.stderr.decode(errors='replace')[-200:]})",
              file=sys.stderr)
        return None
    return Image.open(made[0])


def is_page(image: Image.Image) -> bool:
    grey = np.asarray(image.convert("L"))
    return min(grey.shape) >= MIN_SHORT_SIDE_INCHES * DPI and np.mean(grey < 200) >= MIN_INK


def pick(package_dir: str, out_dir: str) -> int:
    """Render the package's pages into out_dir; returns how many."""
    pdfs = glob.glob(f"{package_dir}/usr/share/doc/**/*.pdf", recursive=True) + glob.glob(
        f"{package_dir}/usr/share/doc/**/*.pdf.gz", recursive=True)
    pdfs.sort(key=lambda p: hashlib.sha1(os.path.relpath(p, package_dir).encode()).hexdigest())
    os.makedirs(out_dir, exist_ok=True)
    taken = written = 0
    for pdf in pdfs:
        if taken == PDFS_PER_PACKAGE:
            break
        with tempfile.TemporaryDirectory() as workdir:
            path = pdf
            if pdf.endswith(".gz"):
                path = os.path.join(workdir, "document.pdf")
                with gzip.open(pdf) as source, open(path, "wb") as target:
                    shutil.copyfileobj(source, target)
            count = pdf_pages(path)
            stem = os.path.basename(pdf).split(".pdf")[0]
            if any(name.startswith(stem + "_p") for name in os.listdir(out_dir)):  # same name, another folder
                stem += "_" + hashlib.sha1(os.path.relpath(pdf, package_dir).encode()).hexdigest()[:6]
            kept = 0
            for page in sorted({1, (count + 1) // 2, count} - {0}):
                image = render(path, page, workdir)
                if image is not None and is_page(image):
                    image.save(os.path.join(out_dir, f"{stem}_p{page}.png"))
                    kept += 1
            taken += kept > 0
            written += kept
    return written


def main(argv: list[str]) -> int:
    pkgs, out, packages = argv[0], argv[1], argv[2:]
    for package in packages:
        print(f"{package}: {pick(os.path.join(pkgs, package), os.path.join(out, package))} pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
