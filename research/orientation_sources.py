"""Write the record of every orientation-corpus source and its licence (trainer/data/ORIENTATION_SOURCES.md).

    python -m research.orientation_sources --corpus /work/corpus/data --work /work/corpus/work \
        --out trainer/data/ORIENTATION_SOURCES.md

Licences are read from where each package states them: a Debian package's usr/share/doc/<pkg>/copyright
(read straight out of the downloaded .deb), an npm package's package.json `license`, a PyPI wheel's
METADATA (License / License-Expression / classifiers). Only images the corpus split keeps are counted
(non-free and reserved items are left out by research.orientation_corpus).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from research import orientation_corpus as corpus


def _deb_member(deb_path: str, member: str) -> bytes:
    """One file out of a .deb's data archive (b'' when it is not there)."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb_path], capture_output=True, check=False)
    return subprocess.run(["tar", "-xO", member], input=tar.stdout, capture_output=True, check=False).stdout


def _deb_doc_link(deb_path: str, package: str) -> str:
    """The package whose doc dir /usr/share/doc/<package> links to ('' if it is a real dir): Debian lets
    binary packages of one source share the copyright file of one of them (groff -> groff-base)."""
    listing = subprocess.run(["dpkg-deb", "-c", deb_path], capture_output=True, text=True, check=False).stdout
    match = re.search(rf"\./usr/share/doc/{re.escape(package)} -> (\S+)", listing)
    return match.group(1).rstrip("/") if match else ""


def deb_copyright(debs_dir: str, package: str) -> Tuple[str, str]:
    """(deb file name, copyright text) of a downloaded package; text is '' when the .deb has none. A doc dir
    that links to a sibling package's reads that package's copyright (when its .deb was downloaded) or says so."""
    matches = sorted(glob.glob(os.path.join(debs_dir, f"{package}_*.deb")))
    if not matches:
        return "", ""
    text = _deb_member(matches[-1], f"./usr/share/doc/{package}/copyright").decode("utf-8", "replace")
    if not text:
        target = _deb_doc_link(matches[-1], package)
        if target:
            _, text = deb_copyright(debs_dir, target)
            text = text or f"License: see the {target} package's copyright (/usr/share/doc/{package} links to it)"
    return os.path.basename(matches[-1]), text


# Licences named in free-text (non-DEP-5) copyright files: (short name, pattern), first match order kept.
KNOWN_LICENCES = (
    ("LGPL", r"GNU (Library|Lesser) General Public Licen[cs]e|\bLGPL"),
    ("GPL-3", r"GNU General Public Licen[cs]e,? (as published [^.]*?)?version 3|\bGPL-?v?3"),
    ("GPL-2", r"GNU General Public Licen[cs]e,? (as published [^.]*?)?version 2|\bGPL-?v?2|GNU GPL, version 2"),
    ("GPL", r"GNU General Public Licen[cs]e|\bGPL\b"),
    ("GFDL", r"GNU Free Documentation Licen[cs]e|\bGFDL"),
    ("LPPL", r"LaTeX Project Public Licen[cs]e|\bLPPL"),
    ("OFL-1.1", r"SIL Open Font Licen[cs]e|\bOFL\b"),
    ("MIT/X11", r"MIT/X11|\bExpat\b|Permission is hereby granted, free of charge"),
    ("BSD", r"\bBSD\b|Redistribution and use in source and binary forms"),
    ("Apache-2.0", r"Apache Licen[cs]e"),
    ("MPL", r"Mozilla Public Licen[cs]e|\bMPL\b"),
    ("Artistic", r"Artistic Licen[cs]e"),
    ("CC-BY-SA", r"Creative Commons Attribution[- ]Share[- ]?Alike|CC[- ]BY[- ]SA"),
    ("CC0", r"\bCC0\b"),
    ("public-domain", r"public domain"),
    ("verbatim-copying permission notice", r"Permission is granted to make and distribute verbatim copies"),
)


def licence_names(copyright_text: str) -> List[str]:
    """The distinct `License:` short names of a DEP-5 copyright file; for a free-text one, the known licences
    it names (KNOWN_LICENCES; GPL only when no versioned GPL is named)."""
    names = []
    for line in copyright_text.splitlines():
        match = re.match(r"^License:\s*(\S.*)$", line)
        if match and match.group(1).strip() not in names:
            names.append(match.group(1).strip())
    if names:
        return names
    found = [(m.start(), name) for name, pattern in KNOWN_LICENCES
             for m in [re.search(pattern, copyright_text, re.I)] if m]
    named = [name for _, name in sorted(found)]
    if "GPL" in named and ({"GPL-2", "GPL-3"} & set(named)):
        named.remove("GPL")
    return named


def tally_texlive_licences(licenses_text: str, members: Sequence[str]) -> collections.Counter:
    """Count the TeX Catalogue licence of each used document (members under usr/share/doc/texlive-doc/), from a
    TeX Live package's Licenses list: `name: licence...` headers, each followed by its texmf-dist/ paths (a
    trailing `*`: the folder's files). A package under several licences reads `lppl1.3c/ofl`."""
    patterns: List[Tuple[str, str]] = []  # (texmf path, or folder prefix ending in /, licence)
    licence = ""
    for line in licenses_text.splitlines():
        header = re.match(r"^([^\s:]+):\s*(.*)$", line)
        if header and not line.startswith("texmf"):
            licence = "/".join(header.group(2).split()) or "unstated"
        elif line.startswith("texmf-dist/"):
            patterns.append((line[:-1] if line.endswith("*") else line, licence))
    tally: collections.Counter = collections.Counter()
    for member in members:
        path = "texmf-dist/doc/" + member.split("!")[0].split("usr/share/doc/texlive-doc/", 1)[-1]
        # The file itself, else the deepest listed folder holding it (a package's doc folder covers its subfolders).
        hits = sorted(((len(pattern), lic) for pattern, lic in patterns
                       if path == pattern or (pattern.endswith("/") and path.startswith(pattern))), reverse=True)
        tally[hits[0][1] if hits else "not in the list"] += 1
    return tally


def texlive_licences(debs_dir: str, package: str, members: Sequence[str]) -> str:
    """For a TeX Live package, the licences (per the package's usr/share/doc/<pkg>/Licenses.gz, the TeX
    Catalogue's per-CTAN-package list) of the documents the corpus used, with how many used each."""
    import gzip

    matches = sorted(glob.glob(os.path.join(debs_dir, f"{package}_*.deb")))
    raw = _deb_member(matches[-1], f"./usr/share/doc/{package}/Licenses.gz") if matches else b""
    if not raw:
        return ""
    tally = tally_texlive_licences(gzip.decompress(raw).decode("utf-8", "replace"), members)
    return "TeX Catalogue: " + ", ".join(f"{lic} ({n})" for lic, n in tally.most_common())


def npm_licence(npm_dir: str, spec: str) -> str:
    """The `license` field of an unpacked npm package's package.json."""
    path = os.path.join(npm_dir, spec, "package", "package.json")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    licence = data.get("license") or data.get("licenses") or ""
    return licence if isinstance(licence, str) else json.dumps(licence)


def pypi_licence(pypi_dir: str, spec: str) -> str:
    """License-Expression / License / licence classifiers from an unpacked wheel's METADATA."""
    found = glob.glob(os.path.join(pypi_dir, spec, "*.dist-info", "METADATA"))
    if not found:
        return ""
    fields = []
    with open(found[0], encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                break  # headers end at the first blank line
            if line.startswith(("License-Expression:", "License:", "Classifier: License")):
                value = line.split(":", 1)[1].strip()[:160]
                if value and value not in fields:
                    fields.append(value)
    return "; ".join(fields)


def collect(corpus_root: str, work: str) -> List[Dict[str, object]]:
    """One row per package: kind of registry, version file, images used per kind/split, licences."""
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    members: Dict[str, List[str]] = collections.defaultdict(list)
    for image in corpus.load_corpus(corpus_root):
        counts[image.package][f"{image.kind}s"] += 1
        counts[image.package][image.split] += 1
        members[image.package].append(image.member)
    rows = []
    for package in sorted(counts):
        if "@" in package:
            registry, version, licence = "npm", package, npm_licence(os.path.join(work, "npm"), package)
        elif "==" in package:
            registry, version, licence = "PyPI", package, pypi_licence(os.path.join(work, "pypi"), package)
        else:
            registry = "Debian"
            version, text = deb_copyright(os.path.join(work, "debs"), package)
            names = licence_names(text)
            licence = ", ".join(names) if names else f"see /usr/share/doc/{package}/copyright"
            if package.startswith("texlive-"):
                # The bundle's copyright file names every licence in TeX Live; the per-package list is exact.
                licence = texlive_licences(os.path.join(work, "debs"), package, members[package]) or licence
        rows.append({"package": package, "registry": registry, "version": version, "licence": licence,
                     **{k: counts[package][k] for k in ("photos", "pages", "train", "val", "test")}})
    return rows


def render(rows: Sequence[Dict[str, object]]) -> str:
    """The markdown record."""
    lines = [
        "# Sources of the default orientation model's training data",
        "",
        "Generated by `python -m research.orientation_sources` from the corpus that",
        "`data/orientation_corpus/build_train.sh` (`make corpus`) builds (nothing here is committed as images). Licences are as each",
        "package states them (Debian `usr/share/doc/<package>/copyright`, npm `package.json`, PyPI `METADATA`);",
        "a Debian line lists every licence named in the package's copyright file, not only the images'.",
        "",
        "Left out of training and of the benchmark: the CC-BY-NC-SA penguin puzzle in jigzo-data and the",
        "Microsoft sample photos (Tulips, Penguins) embedded in uestcthesis-doc.pdf (texlive-publishers-doc);",
        "the demo photos of the npm package jquery.fancybox@2.1.5 (its licence is CC-BY-NC-3.0);",
        "packages reserved for independent evaluation (scratch, mate-backgrounds, lomiri-wallpapers,",
        "plasma-workspace-wallpapers, palapeli-data, opencv-doc, python3-skimage, texlive-humanities-doc,",
        "texlive-latex-recommended-doc, and the sample images of scikit-image, scikit-learn, matplotlib).",
        "",
        "Splits are by source (photos: archive file + folder; pages: PDF): `train` + `val` trained the shipped",
        "head and its fine-tuned backbone blocks (val also chose the settings and fitted the temperature); `test` is held",
        "out for `research/quality.py`. TeX Live rows give the TeX Catalogue's licence of each document used (pd: public",
        "domain, lppl: LaTeX Project Public License, other-free: free but not one of the named ones), with counts.",
        "",
        "| package | registry | version | photos | pages | train | val | test | licence(s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        licence = str(r["licence"]).replace("|", "/")
        lines.append(f"| {r['package']} | {r['registry']} | {r['version']} | {r['photos']} | {r['pages']} | "
                     f"{r['train']} | {r['val']} | {r['test']} | {licence} |")
    totals = {k: sum(int(r[k]) for r in rows) for k in ("photos", "pages", "train", "val", "test")}
    lines.append(f"| **total** | | | {totals['photos']} | {totals['pages']} | {totals['train']} | "
                 f"{totals['val']} | {totals['test']} | |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the sources + licences record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder build_train.sh wrote (photos/, docs/)")
    parser.add_argument("--work", required=True, help="build_train.sh's WORK folder (debs/, npm/, pypi/)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    text = render(collect(args.corpus, args.work))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
