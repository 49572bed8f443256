"""The orientation corpus split: by source, deterministic, non-free and reserved items left out."""
from __future__ import annotations

import csv
import os

from archive_vision import orientation_corpus as corpus

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
                                  ("reserved.jpg", "mate-backgrounds", "usr/share/backgrounds/a.jpg")):
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
    assert len(images) == 36 + 60  # non-free, reserved and not-yet-rendered items are left out
    assert not {"jigzo-data", "jquery.fancybox@2.1.5", "mate-backgrounds"} & {i.package for i in images}
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
