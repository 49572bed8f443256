"""data/orientation_corpus/check_pages.py: the page check picks pages without looking at any answer."""
from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not (shutil.which("pdftoppm") and shutil.which("pdfinfo")),
                                reason="needs pdftoppm and pdfinfo (apt-get install poppler-utils)")


def _module():
    path = os.path.join(HERE, os.pardir, "data", "orientation_corpus", "check_pages.py")
    spec = importlib.util.spec_from_file_location("check_pages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(number: int, size=(1240, 1754), ink: bool = True) -> Image.Image:
    page = Image.new("RGB", size, "white")
    if ink:
        draw = ImageDraw.Draw(page)
        for line in range(40):  # lines of "text", and the page number as so many blocks
            draw.rectangle([100, 100 + 35 * line, 1100, 115 + 35 * line], fill="black")
        for block in range(number):
            draw.rectangle([100 + 30 * block, 1650, 120 + 30 * block, 1670], fill="black")
    return page


def _docs(tmp_path, extras: int):
    docs = tmp_path / "pkg" / "usr" / "share" / "doc" / "pkg"
    docs.mkdir(parents=True)
    pages = [_page(n) for n in range(1, 8)]
    pages[0].save(docs / "manual.pdf", save_all=True, append_images=pages[1:], resolution=150)
    _page(1, size=(600, 300)).save(docs / "figure.pdf", resolution=150)  # a figure cropped to its own PDF
    _page(1, ink=False).save(docs / "blank.pdf", resolution=150)
    for index in range(extras):
        _page(2).save(docs / f"extra_{index}.pdf", resolution=150)
    return str(tmp_path / "pkg")


def test_first_middle_and_last_pages_figures_and_blanks_left_out(tmp_path):
    check_pages = _module()
    written = check_pages.pick(_docs(tmp_path, extras=3), str(tmp_path / "out"))
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["extra_0_p1.png", "extra_1_p1.png", "extra_2_p1.png",
                     "manual_p1.png", "manual_p4.png", "manual_p7.png"] and written == 6
    assert np.asarray(Image.open(tmp_path / "out" / "manual_p4.png").convert("L")).shape == (1754, 1240)  # 150 dpi


def test_four_pdfs_per_package_first_by_the_hash_of_their_path(tmp_path):
    """Which four: the PDFs that give a page, ordered by the SHA-1 of their path inside the package (a fixed choice
    made without looking at any answer); the figure and the blank give none and are passed over."""
    import hashlib

    check_pages = _module()
    package = _docs(tmp_path, extras=5)
    check_pages.pick(package, str(tmp_path / "out"))
    giving = ["manual.pdf"] + [f"extra_{i}.pdf" for i in range(5)]
    expected = sorted(giving, key=lambda name: hashlib.sha1(f"usr/share/doc/pkg/{name}".encode()).hexdigest())[:4]
    assert {n.rsplit("_p", 1)[0] for n in os.listdir(tmp_path / "out")} == {name[:-4] for name in expected}


def test_two_pdfs_of_one_name_keep_both_pages(tmp_path):
    check_pages = _module()
    for folder in ("a", "b"):
        docs = tmp_path / "pkg" / "usr" / "share" / "doc" / folder
        docs.mkdir(parents=True)
        _page(1).save(docs / "manual.pdf", resolution=150)
    assert check_pages.pick(str(tmp_path / "pkg"), str(tmp_path / "out")) == 2
    assert len(os.listdir(tmp_path / "out")) == 2
