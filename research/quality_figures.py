"""The quality study's figures beside its table (research/quality.py): calibration, confusion matrices per method,
and the misses as contact sheets."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pipelines.schema import ORIENTATIONS as TURNS
from research import orientation_corpus as corpus


def write_confusions(folder: str, methods: Dict[str, np.ndarray], kinds: np.ndarray) -> List[str]:
    """confusion_<method>_<kind>.png (rows: the turn applied, columns: the turn answered) for each method and kind;
    the 4x4 counts are printed too."""
    from trainer.evaluate import confusion_matrix, draw_confusion_matrix

    names = [f"{d} cw" for d in TURNS]
    paths = []
    for method, probs in methods.items():
        for kind in (corpus.PHOTO, corpus.PAGE):
            chosen = probs[kinds == kind]  # [N, 4 turns applied, 4 answers]
            truth = np.tile(np.arange(4), len(chosen))
            cm = confusion_matrix(truth, chosen.reshape(-1, 4).argmax(-1), 4)
            print(f"confusion, {method}, {kind}s (rows: turn applied 0/90/180/270; columns: answered):\n{cm}")
            slug = method.replace(" + ", "_").replace(" ", "_").replace("-", "_")
            paths.append(draw_confusion_matrix(
                cm, names, f"{method}, {kind}s: {100 * np.trace(cm) / cm.sum():.1f}% of {cm.sum()}",
                os.path.join(folder, f"confusion_{slug}_{kind}.png")))
    return paths


def write_misses(folder: str, images: Sequence[corpus.CorpusImage], probs: np.ndarray, method: str,
                 thumb: int = 150, columns: int = 8, no_up: Sequence[str] = ()) -> List[str]:
    """misses_<kind>.png: a contact sheet of the held-out images `method` gets wrong under at least one of the four
    turns, each shown upright with how many of its turns it got right and its source package, fewest right first
    (what the numbers alone hide: which subjects fail, and whether they would fool a person too). The images whose
    paths are in `no_up` (listed as having no up) say so on the sheet and in the list's `no_up` column."""
    from PIL import Image, ImageDraw

    right = probs.argmax(-1) == np.arange(4)  # [N, 4 turns applied]
    no_up = set(no_up)
    paths = []
    for kind in (corpus.PHOTO, corpus.PAGE):
        missed = sorted((int(right[i].sum()), images[i].package, images[i].path) for i in range(len(images))
                        if images[i].kind == kind and not right[i].all())
        rows = max(1, -(-len(missed) // columns))
        sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 16) + 20), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 4), f"{method}, {kind}s: {len(missed)} of {int(np.sum([i.kind == kind for i in images]))} "
                          f"images wrong under at least one turn (shown upright; right turns of 4, package)",
                  fill="black")
        for k, (n_right, package, path) in enumerate(missed):
            x, y = (k % columns) * thumb, 20 + (k // columns) * (thumb + 16)
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                    image.thumbnail((thumb - 4, thumb - 4))
                    sheet.paste(image, (x + 2, y + 2))
            except OSError:
                draw.rectangle((x + 2, y + 2, x + thumb - 2, y + thumb - 2), fill="grey")
            listed = path in no_up
            draw.text((x + 2, y + thumb), f"{n_right}/4 " + ("no up (listed)" if listed else package[:20]),
                      fill="grey" if listed else "red")
        out = os.path.join(folder, f"misses_{kind}.png")
        sheet.save(out)
        paths.append(out)
        listing = os.path.join(folder, f"misses_{kind}.tsv")
        root = os.path.commonpath([image.path for image in images]) if len(images) > 1 else ""
        with open(listing, "w") as f:  # the same misses as text: which files, and what was answered per turn
            f.write("right_turns\tpackage\tpath\tanswers_for_0_90_180_270\tno_up\n")
            index = {image.path: i for i, image in enumerate(images)}
            for n_right, package, path in missed:
                answers = probs[index[path]].argmax(-1) * 90
                shown = os.path.relpath(path, root) if root else path  # relative to the corpus folder
                f.write(f"{n_right}\t{package}\t{shown}\t{','.join(str(int(a)) for a in answers)}\t"
                        f"{'listed' if path in no_up else ''}\n")
        paths.append(listing)
    return paths


def calibration(probs: np.ndarray, bins: int = 15) -> Tuple[float, float]:
    """(negative log-likelihood, expected calibration error over `bins` confidence bins) of [N, 4 turns, 4]."""
    flat = probs.reshape(-1, 4)
    truth = np.tile(np.arange(4), len(probs))
    nll = float(-np.mean(np.log(np.clip(flat[np.arange(len(flat)), truth], 1e-12, 1.0))))
    confidence, right = flat.max(-1), (flat.argmax(-1) == truth)
    edges = np.linspace(0.25, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
    ece = sum(abs(confidence[which == b].mean() - right[which == b].mean()) * np.mean(which == b)
              for b in range(bins) if np.any(which == b))
    return nll, float(ece)
