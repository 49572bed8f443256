"""The whole answer's gates and crop rule, chosen on data the shipped head never saw.

    python -m research.gates --served bench-out/served --corpus CORPUS [--parts bench-out/gates-parts.npz]
        [--cost] [--crop-sizes 384,320]
    python -m research.gates --served /tmp/archive-unseen-check/pages/check   # a check set: no cross-fitting

The shipped head was trained on train and val, so val overrates its stored copy and cannot choose how much the
graph should trust it. This lab works on the files bench/served.py writes (the held-out split, each file in four turns,
with truth.csv) or a checkset folder (images/ and truth.csv):

1. every part of the answer for every file, ungated, with the export's own graph pieces (serving.answer): the stored
   copy's probabilities, the three turned copies', the five text crops', the second look's ten, and the ink;
2. the answer under any gates, recomputed in numpy from those parts exactly as serving.answer.WholeAnswer computes
   it, in its float types (checked against the served rows of bench/served.py's score run when present: the same
   degrees and decisions for all 2,224 held-out files; tests/test_gates_lab.py on synthetic tables);
3. a sweep of the cost gates (crops read below `read_below`, turned copies below `tta_below`) and of the crops read
   first (`first_crops`): accuracy, the bands, and a page's modelled cost from one-core op times
   (docs/performance.md);
4. two-fold cross-fitting by source group (a PDF, a photo's source file): the crop rule (`agree`), the second
   look's gate and the crops' settle_first are chosen on one half's sources and measured on the other's, both ways;
5. the crops read before the image model (settle_first, and a second round: settle_crops) against the image model
   first, also with the crops read from smaller copies (--crop-sizes), and the modelled costs measured on this
   machine (--cost).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from trainer import text_crops

KINDS = ("photo", "page", "sparse page")
PARTS = ("p0", "turned", "crops", "second", "ink")
# One core, ms (`research/gates.py --cost` measures them here; docs/performance.md): what every page's preparation
# makes (serving.answer.prepare_first: decode, reading copy, ink, the first crops cut, and the view of an image the
# copy barely reduces), the image model's view cut from the copy (for the images the image model reads),
# MobileNetV2 per image, PP-LCNet per crop, the second look per image (2026-12-07, an AMD EPYC 2-core machine).
COST_MS = {"prep": 17.4, "view": 1.3, "model": 4.8, "crop": 2.1, "second": 44.0}


def read_truth(folder: str) -> List[Dict[str, object]]:
    """truth.csv rows of bench/served.py (uri, orientation, label, up) or of a checkset (path, orientation, label)."""
    with open(os.path.join(folder, "truth.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        uri = row.get("uri") or os.path.join(folder, "images", row["path"])
        label = row.get("label", "page")
        out.append({"uri": uri, "turn": int(row["orientation"]) // 90,
                    "kind": label if label in KINDS else "page", "up": row.get("up", "True") == "True"})
    return out


def _default_policy():
    """The default model's ScorePolicy (serving.policy), as its export records it."""
    from serving.policy import policy_from_settings
    from trainer import default_model

    return policy_from_settings(default_model.score_settings(), default_model.DEFAULT_IMAGE_SIZE)


def _default_pieces(with_model: bool = True):
    """(the default model's policy, its image model as exported (or None), the crop classifier in TF)."""
    from serving.export import crop_net_for, inference_model
    from trainer import default_model

    policy = _default_policy()
    model = (inference_model(default_model.build_default_orientation_model(), default_model.DEFAULT_IMAGE_SIZE)[0]
             if with_model else None)
    return policy, model, crop_net_for(policy)


def compute_parts(uris: Sequence[str], batch: int = 8) -> Dict[str, np.ndarray]:
    """Every part of the default model's answer for each file, ungated (the export's graph pieces)."""
    import tensorflow as tf

    from serving import answer as A

    policy, model, crop_net = _default_pieces()
    settings, crops = policy.answer, policy.answer.text_crops
    side = crops.crop

    def per_image(data):
        return {**A.prepare_image(data, settings, crops), "second": A.second_look_batch(data, crops)}

    spec = {**A.prepared_spec(settings, crops), "second": tf.TensorSpec([10, side, side, 3], tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def parts(data):
        prepared = tf.map_fn(per_image, data, fn_output_signature=spec)
        views, n = prepared["view"], tf.shape(data)[0]

        def orientation(pixels):
            return tf.cast(model(pixels, training=False)["orientation_probabilities"], tf.float32)

        turned = orientation(tf.concat([tf.image.rot90(views, k) for k in (3, 2, 1)], 0))

        def read(key, count):
            crops_read = tf.reshape(prepared[key], [-1, side, side, 3])
            return tf.reshape(crop_net(crops_read), [n, count, 4])

        return (orientation(views), tf.transpose(tf.reshape(turned, [3, n, 4]), [1, 0, 2]), read("crops", 5),
                read("second", 10), prepared["ink"])

    return dict(zip(PARTS, _over_files(parts, uris, batch, "parts")))


def _over_files(fn, uris: Sequence[str], batch: int, label: str) -> List[np.ndarray]:
    """fn's outputs (a tuple of tensors) over the files' bytes in batches, each output concatenated."""
    import tensorflow as tf

    out: List[List[np.ndarray]] = []
    for start in range(0, len(uris), batch):
        blobs = []
        for uri in uris[start:start + batch]:
            with open(uri, "rb") as f:
                blobs.append(f.read())
        values = fn(tf.constant(blobs))
        out = out or [[] for _ in values]
        for kept, value in zip(out, values):
            kept.append(value.numpy())
        print(f"\r  {label}: {min(start + batch, len(uris))}/{len(uris)} files", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return [np.concatenate(value) for value in out]


def compute_crops(uris: Sequence[str], copy_short: int, batch: int = 8) -> np.ndarray:
    """[N, 5, 4]: the five text crops' probabilities with the reading copy at a short side of `copy_short` and crops
    of half that side (the same part of the page as the default's 224 px crops of a 448 px copy, in fewer pixels)."""
    import dataclasses

    import tensorflow as tf

    from serving import answer as A

    policy, _, crop_net = _default_pieces(with_model=False)
    crops = dataclasses.replace(policy.answer.text_crops, copy_short=copy_short, crop=copy_short // 2)

    def per_image(data):  # as the graph would prepare the image with these crops
        return A.prepare_image(data, policy.answer, crops)["crops"]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def read(data):
        cut = tf.map_fn(per_image, data, fn_output_signature=tf.TensorSpec([5, crops.crop, crops.crop, 3],
                                                                             tf.float32))
        flat = tf.reshape(cut, [-1, crops.crop, crops.crop, 3])
        return (tf.reshape(tf.cast(crop_net(flat), tf.float32), [tf.shape(data)[0], 5, 4]),)

    return _over_files(read, uris, batch, f"crops of a {copy_short} px copy")[0]


def measure_costs(uris: Sequence[str]) -> Dict[str, float]:
    """COST_MS measured on this machine's first core, in a child process (TF's threads, once set, stay set): see
    _measure_costs_here."""
    import subprocess

    if not uris:
        raise ValueError("no upright pages to time the costs on")
    code = ("import json, sys; from research.gates import _measure_costs_here; "
            "print(json.dumps(_measure_costs_here(json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(list(uris))], capture_output=True, text=True,
                            check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure_costs_here(uris: Sequence[str], batch: int = 8) -> Dict[str, float]:
    """On the first core of this process, which it pins (run it where TensorFlow has run nothing yet): a page's
    preparation over `uris` as the graph makes it for every image (prepare_first: decode, reading copy, ink, the
    first crops cut, an early view), the view cut from a reading copy, the second look per image over them, and
    MobileNetV2 per image and PP-LCNet per crop in batches of `batch`, in ms."""
    import time

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from serving import answer as A

    policy, model, crop_net = _default_pieces()
    settings, crops = policy.answer, policy.answer.text_crops
    side = crops.crop

    def prepare(data):
        # What the graph prepares for every image of a batch, with its own pieces, summed so that nothing is pruned:
        # prepare_first where the crops are read first (the early views read back), else prepare_image.
        if crops.settle_first > 0:
            ink, first_crops, kept = A.prepare_first(data, settings, crops, crops.first_crops)
            early = kept.views(A._rows(kept.early))
            return tf.add_n([tf.reduce_sum(ink), tf.reduce_sum(first_crops), tf.reduce_sum(early)])
        prepared = tf.map_fn(lambda one: A.prepare_image(one, settings, crops), data,
                             fn_output_signature=A.prepared_spec(settings, crops))
        return tf.add_n([tf.reduce_sum(value) for value in prepared.values()])

    def second(data):
        looks = A.second_look_batch(data, crops)
        return tf.reduce_sum(crop_net(looks))

    def per_file(fn):
        return tf.function(lambda data: tf.map_fn(fn, data, fn_output_signature=tf.float32), autograph=False)

    pixels = tf.random.uniform([batch, settings.image_size, settings.image_size, 3], 0.0, 255.0, seed=1)
    crop_pixels = tf.random.uniform([batch, side, side, 3], 0.0, 255.0, seed=2)
    blobs = []
    for uri in uris:
        with open(uri, "rb") as f:
            blobs.append(f.read())
    batches = [tf.constant(blobs[i:i + batch]) for i in range(0, len(blobs), batch)]

    def ms_each(fn, inputs, count):
        fn(inputs[0])  # traced off the clock
        started = time.perf_counter()
        for value in inputs:
            fn(value)
        return 1000 * (time.perf_counter() - started) / count

    copies = [A.decoded_and_copy(blob, settings, crops.copy_short)[1] for blob in blobs]
    run_view = tf.function(lambda copy: tf.reduce_sum(A.model_view(copy, settings)), autograph=False,
                           input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    run_model = tf.function(lambda x: model(x, training=False), autograph=False)
    run_crops = tf.function(crop_net, autograph=False)
    return {"prep": ms_each(tf.function(prepare, autograph=False), batches, len(blobs)),
            "view": ms_each(run_view, copies, len(copies)),
            "model": ms_each(run_model, [pixels] * 8, 8 * batch),
            "crop": ms_each(run_crops, [crop_pixels] * 8, 8 * batch),
            "second": ms_each(per_file(second), batches, len(blobs))}


def _evidence(probabilities: np.ndarray, sure: float) -> np.ndarray:
    """serving.answer.crop_evidence's evidence, in float32 as the graph computes it."""
    p = probabilities.astype(np.float32)
    counted = (p.max(-1, keepdims=True) >= np.float32(sure)).astype(np.float32)
    return (np.log(np.clip(p, np.float32(1e-6), np.float32(1.0))) * counted).sum(-2, dtype=np.float32)


def _fuse(probabilities: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """serving.answer.fuse: softmax(log p + evidence) in float64, returned as float32."""
    logits = np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0)) + evidence.astype(np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return (exp / exp.sum(-1, keepdims=True)).astype(np.float32)


def _below(probabilities: np.ndarray, gate: float) -> np.ndarray:
    """serving.answer._below: the top probability (float32) below `gate`, compared in float64."""
    return probabilities.max(-1).astype(np.float64) < gate


def _crops_count(crops: np.ndarray, unsure: np.ndarray, sure: float, agree: int) -> np.ndarray:
    """serving.answer._crops_count: an image's crops count when it is unsure, or when `agree` sure crops agree."""
    return unsure | (text_crops.agreement(crops, sure) >= max(agree, 1))


def _first_crops_settle(p0: np.ndarray, head: np.ndarray, unsure: np.ndarray, sparse: np.ndarray, *, agree: int,
                        sure: float, weight: np.float32, read_below: float) -> np.ndarray:
    """serving.answer.WholeAnswer._crop_probabilities' rule: the images whose first crops (`head`) settle them."""
    counted = _crops_count(head, unsure, sure, agree)
    fused = _fuse(p0, weight * _evidence(head, sure))
    naming = (head.astype(np.float32).max(-1) >= np.float32(sure)) & (head.argmax(-1) == fused.argmax(-1)[:, None])
    return counted & naming.all(-1) & ~_below(fused, read_below) & ~sparse


def _decide(final: np.ndarray, agreement: np.ndarray, sparse: np.ndarray, counted: np.ndarray, *, rotate: float,
            ok: float, min_agreement: float, agreement_below: float):
    """(degrees index, decision): serving.answer.decide on the answers (comparisons in float64)."""
    confidence, degrees = final.max(-1).astype(np.float64), final.argmax(-1)
    review = confidence < np.where(degrees == 0, ok, rotate)
    disagree = (agreement >= 0) & (agreement < min_agreement)
    review |= disagree & (confidence < agreement_below) if agreement_below < 1.0 else disagree
    review |= sparse & ~counted
    return degrees, np.where(review, "review", np.where(degrees == 0, "ok", "auto_rotate"))


def simulate(parts: Dict[str, np.ndarray], *, read_below: float = 1.0, tta_below: float = 1.0, agree: int = 4,
             first_crops: int = 0, below: float = 0.8, sure: float = 0.8, weight: float = 0.7,
             second_below: float = 0.5, rotate: float = 0.9, ok: float = 0.5, min_agreement: float = 0.75,
             agreement_below: float = 0.9, sparse_ink_below: float = 0.01) -> Dict[str, np.ndarray]:
    """The whole answer (serving.answer.WholeAnswer, the default's policy shape) from ungated parts, step by step and
    in the graph's own float types (a probability of exactly 0.5 sits on the ok threshold): final probabilities,
    degrees index, decision, which steps ran (read, turned, second) and how many crops each image read."""
    p0 = parts["p0"].astype(np.float32)
    n = len(p0)
    weight32 = np.float32(weight)
    sparse = parts["ink"].astype(np.float64) < sparse_ink_below
    unsure = _below(p0, below)
    if agree <= 0:
        read = unsure
    else:
        read = np.ones(n, bool) if read_below >= 1.0 else unsure | _below(p0, read_below) | sparse
    crops, total = parts["crops"].astype(np.float32), parts["crops"].shape[1]
    crops_read = np.where(read, total, 0)
    if agree > 0 and read_below < 1.0 and 0 < first_crops < total:
        settled = read & _first_crops_settle(p0, crops[:, :first_crops], unsure, sparse, agree=agree, sure=sure,
                                             weight=weight32, read_below=read_below)
        crops = np.where(settled[:, None, None], np.concatenate([crops[:, :first_crops], np.zeros_like(
            crops[:, first_crops:])], 1), crops)  # a crop not read: zeros, never sure
        crops_read = np.where(settled, first_crops, crops_read)
    counted = read & _crops_count(crops, unsure, sure, agree)
    evidence = np.where(counted[:, None], weight32 * _evidence(crops, sure), np.float32(0.0))
    so_far = np.where(counted[:, None], _fuse(p0, evidence), p0)
    turned = np.ones(n, bool) if tta_below >= 1.0 else _below(so_far, tta_below)
    copies = parts["turned"].astype(np.float32)
    shifted = np.stack([p0] + [np.roll(copies[:, i], -(i + 1), axis=-1) for i in range(3)])
    mean = shifted.mean(0, dtype=np.float32)
    agrees = (shifted.argmax(-1) == mean.argmax(-1)[None]).mean(0, dtype=np.float32)
    combined = np.where(turned[:, None], mean, p0)
    agreement = np.where(turned, agrees, np.float32(-1.0)).astype(np.float64)
    final = np.where(counted[:, None], _fuse(combined, evidence), combined)
    second = _below(final, second_below) if second_below > 0 else np.zeros(n, bool)
    final = np.where(second[:, None], _fuse(final, weight32 * _evidence(parts["second"], sure)), final)
    degrees, decision = _decide(final, agreement, sparse, counted, rotate=rotate, ok=ok, min_agreement=min_agreement,
                                agreement_below=agreement_below)
    return {"final": final, "degrees": degrees, "decision": decision, "read": read, "turned": turned,
            "second": second, "crops_read": crops_read}


def _settles(head: np.ndarray, needed: int, settle: float, sure: float) -> np.ndarray:
    """serving.answer._settles: at least `needed` of the crops read [N, c, 4] are at least `settle` sure (float64) and
    name one turn, and no sure crop (at least `sure` in float32, as _evidence) names another."""
    confidence, top = head.astype(np.float32).max(-1), head.argmax(-1)
    votes = np.stack([((confidence.astype(np.float64) >= settle) & (top == turn)).sum(-1) for turn in range(4)], -1)
    against = ((confidence >= np.float32(sure)) & (top != votes.argmax(-1)[:, None])).any(-1)
    return (votes.max(-1) >= needed) & ~against


def simulate_crops_first(parts: Dict[str, np.ndarray], *, settle_first: float = 0.9, settle_crops: int = 0,
                         **policy) -> Dict[str, np.ndarray]:
    """serving.answer.WholeAnswer._crops_first: the first crops read before the image model. An image that is not
    nearly blank, and whose first `first_crops` crops are all at least `settle_first` (in float64) and name one
    turn, takes their answer alone (their weighted evidence fused into no prior; review below the bands'
    thresholds) and skips the image model, its turned copies and the second look. With `settle_crops`, an image
    they leave open reads the next crops, up to that many, and settles on them alike (_settles). Every other image
    is answered as simulate() answers it under `policy` (its defaults for what is not given), the crops it read
    first included. `model_run` says which images ran the image model."""
    from serving.policy import TextCropSettings

    settings = {name: value.default for name, value in inspect.signature(simulate).parameters.items()
                if value.kind is value.KEYWORD_ONLY}
    settings.update(policy)
    # The policy's own check: the first crops read apart, able to count alone, and sure enough to be evidence.
    TextCropSettings(agree=settings["agree"], read_below=settings["read_below"], sure=settings["sure"],
                     first_crops=settings["first_crops"], settle_first=settle_first, settle_crops=settle_crops)
    answer = simulate(parts, **settings)
    first = settings["first_crops"]
    more = max(settle_crops, first)
    crops = parts["crops"][:, :more].astype(np.float32)
    sparse = parts["ink"].astype(np.float64) < settings["sparse_ink_below"]
    settled = ~sparse & _settles(crops[:, :first], first, settle_first, settings["sure"])
    width = np.where(settled, first, more)  # the crops each image read before the image model
    settled |= ~sparse & _settles(crops, first, settle_first, settings["sure"])
    head = np.where(np.arange(more)[None, :, None] < width[:, None, None], crops, np.float32(0.0))
    alone = _fuse(np.full(answer["final"].shape, 0.25, np.float32),
                  np.float32(settings["weight"]) * _evidence(head, settings["sure"]))
    degrees, decision = _decide(alone, np.full(len(alone), -1.0), sparse, np.ones(len(alone), bool),
                                **{key: settings[key] for key in ("rotate", "ok", "min_agreement", "agreement_below")})
    return {"final": np.where(settled[:, None], alone, answer["final"]),
            "degrees": np.where(settled, degrees, answer["degrees"]),
            "decision": np.where(settled, decision, answer["decision"]),
            "read": answer["read"] | settled, "turned": answer["turned"] & ~settled,
            "second": answer["second"] & ~settled,
            "crops_read": np.where(settled, width, np.maximum(answer["crops_read"], more)),
            "model_run": ~settled}


def simulate_policy(parts: Dict[str, np.ndarray], settle_first: float = 0.0, settle_crops: int = 0,
                    **policy) -> Dict[str, np.ndarray]:
    """The answer under a whole policy (_simulated_policy's terms): with settle_first, the crops first."""
    if settle_first > 0:
        return simulate_crops_first(parts, settle_first=settle_first, settle_crops=settle_crops, **policy)
    if settle_crops:
        raise ValueError("settle_crops needs settle_first")
    return simulate(parts, **policy)


def summary(answer: Dict[str, np.ndarray], truth: List[Dict[str, object]], mask: Optional[np.ndarray] = None,
            costs: Optional[Dict[str, float]] = None) -> Dict[str, Dict[str, float]]:
    """Per kind: files, right with an up, the bands (answers, wrong), review share, and the modelled ms a file
    (`costs`, COST_MS by default)."""
    costs = costs or COST_MS
    kinds = np.array([t["kind"] for t in truth])
    turns = np.array([t["turn"] for t in truth])
    up = np.array([t["up"] for t in truth])
    right = answer["degrees"] == turns
    out = {}
    for kind in KINDS:
        m = kinds == kind if mask is None else (kinds == kind) & mask
        if not m.any():
            continue
        bands = {band: (int((m & (answer["decision"] == band)).sum()),
                        int((m & (answer["decision"] == band) & ~right).sum())) for band in ("auto_rotate", "ok")}
        model_run = answer.get("model_run", np.ones(len(m), bool))
        cost = (costs["prep"] + (costs["view"] + costs["model"]) * model_run[m].mean()
                + 3 * costs["model"] * answer["turned"][m].mean()
                + costs["crop"] * answer["crops_read"][m].mean() + costs["second"] * answer["second"][m].mean())
        out[kind] = {"files": int(m.sum()), "with_up": int((m & up).sum()),
                     "wrong_with_up": int((m & up & ~right).sum()), "right_with_up": float(right[m & up].mean()),
                     "auto_rotate": bands["auto_rotate"], "ok": bands["ok"],
                     "review": float((answer["decision"][m] == "review").mean()), "ms": float(cost)}
    return out


def line(label: str, stats: Dict[str, Dict[str, float]]) -> str:
    cells = []
    for kind, s in stats.items():
        cells.append(f"{kind}: up {s['right_with_up']:.2%} ({s['wrong_with_up']} wrong of {s['with_up']}), "
                     f"auto_rotate {s['auto_rotate'][0]} ({s['auto_rotate'][1]} wrong), ok {s['ok'][0]} "
                     f"({s['ok'][1]} wrong), review {s['review']:.1%}, {s['ms']:.0f} ms")
    return f"{label}\n    " + "\n    ".join(cells)


def utility(answer: Dict[str, np.ndarray], truth: List[Dict[str, object]], mask: np.ndarray) -> float:
    """What the cross-fitting maximises: photos and pages right (with an up), less five per wrong answer in a band
    that acts (auto_rotate or ok), so accuracy is not bought with confidently wrong answers."""
    kinds = np.array([t["kind"] for t in truth])
    right = answer["degrees"] == np.array([t["turn"] for t in truth])
    up = np.array([t["up"] for t in truth])
    acting = np.isin(answer["decision"], ("auto_rotate", "ok"))
    real = mask & (kinds != "sparse page")
    return float((real & up & right).sum() - 5 * (real & acting & ~right).sum())


def groups_of(truth: List[Dict[str, object]], corpus_root: Optional[str]) -> np.ndarray:
    """The source group of each file (bench/served.py names a file <kind>-<index of the held-out image>-<turn>)."""
    held_out = None
    if corpus_root:
        from research import orientation_corpus as corpus

        held_out = corpus.select(corpus.load_corpus(corpus_root), splits=(corpus.TEST,))
    out = []
    for t in truth:
        name = os.path.basename(str(t["uri"]))
        index = int(name.split("-")[-2]) if name.count("-") >= 2 else 0
        out.append(held_out[index].group if held_out is not None and t["kind"] != "sparse page"
                   else f"{t['kind']}-{index}")
    return np.array(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--served", required=True, help="bench/served.py's --out folder, or a checkset folder")
    parser.add_argument("--corpus", help="the built corpus (source groups for the cross-fitting)")
    parser.add_argument("--parts", help="npz cache of the parts (computed when missing)")
    parser.add_argument("--gates", default="1.0/1.0,0.99/0.99,0.99/1.0,1.0/0.99,0.95/0.95,0.9/0.9",
                        help="read_below/tta_below pairs to sweep")
    parser.add_argument("--cost", action="store_true",
                        help="first measure COST_MS on this machine's first core (the upright pages) and model with it")
    parser.add_argument("--crop-sizes", default="",
                        help="reading copies' short sides (e.g. 384,320) to read the crops at, beside the 448 of the "
                             "parts (crops half the side; cached beside the parts)")
    args = parser.parse_args(argv)

    truth = read_truth(args.served)
    costs = dict(COST_MS)
    if args.cost:
        pages = [str(t["uri"]) for t in truth if t["kind"] == "page" and t["turn"] == 0][:96]
        costs = measure_costs(pages)
        print("one core, ms: " + ", ".join(f"{key} {value:.1f} (COST_MS {COST_MS[key]})"
                                            for key, value in costs.items()))
    path = args.parts or os.path.join(args.served, "gates-parts.npz")
    if os.path.exists(path):
        with np.load(path) as data:
            parts = {key: data[key] for key in PARTS}
    else:
        parts = compute_parts([str(t["uri"]) for t in truth])
        np.savez(path, **parts)
    served = os.path.join(args.served, "score", "results.parquet")
    if os.path.exists(served):
        import pyarrow.parquet as pq

        rows = {r["uri"]: r for r in pq.read_table(served, columns=["uri", "orientation_degrees", "decision"])
                .to_pylist()}
        with open(os.path.join(args.served, "score", "run.json")) as f:
            policy = json.load(f)["policy"]
        scored = simulate_policy(parts, **_simulated_policy(policy))
        same = sum(rows[t["uri"]]["orientation_degrees"] // 90 == d for t, d in zip(truth, scored["degrees"])
                   if t["uri"] in rows)
        decided = sum(rows[t["uri"]]["decision"] == d for t, d in zip(truth, scored["decision"]) if t["uri"] in rows)
        print(f"the simulation of score's policy ({policy['from']}) gives its degrees for {same} and its decisions "
              f"for {decided} of {len(rows)} files")

    print("\nthe cost gates (read_below/tta_below), the crop rule as recorded in the head (agree 4):")
    for pair in args.gates.split(","):
        read_below, tta_below = (float(x) for x in pair.split("/"))
        print(line(f"  {pair}", summary(simulate(parts, read_below=read_below, tta_below=tta_below), truth,
                                        costs=costs)))
    print("\nthe crop rule at gates 0.99/0.99:")
    for agree in (4, 3, 2, 1):
        print(line(f"  agree {agree}", summary(simulate(parts, read_below=0.99, tta_below=0.99, agree=agree),
                                                truth, costs=costs)))
    print("\nthe first crops read before the rest (gates 0.99/0.99, agree 2):")
    for first in (0, 1, 2, 3):
        print(line(f"  first_crops {first}", summary(simulate(parts, read_below=0.99, tta_below=0.99, agree=2,
                                                               first_crops=first), truth, costs=costs)))
    if args.corpus:
        groups = groups_of(truth, args.corpus)
        fold = np.array([int(hashlib.sha256(g.encode()).hexdigest(), 16) % 2 for g in groups])
        grid = [{"agree": a, "second_below": s} for a in (1, 2, 3, 4, 5) for s in (0.5, 0.6, 0.7)]
        print("\ntwo-fold cross-fitting by source group (chosen on one half, measured on the other):")
        for half in (0, 1):
            scores = {json.dumps(p): utility(simulate(parts, read_below=0.99, tta_below=0.99, **p), truth,
                                             fold != half) for p in grid}
            best = json.loads(max(scores, key=scores.get))
            measured = fold == half
            print(line(f"  half {half}: chosen {best}",
                       summary(simulate(parts, read_below=0.99, tta_below=0.99, **best), truth, measured, costs)))
            print(line("          as the head recorded (agree 4, second_below 0.5)",
                       summary(simulate(parts, read_below=0.99, tta_below=0.99), truth, measured, costs)))
        print("\nsettle_first by two-fold cross-fitting (each half chooses the loosest value of its highest utility; "
              "measured on the other half):")
        from trainer.default_model import ANSWER_CHOICES

        answers = {settle: simulate_policy(parts, **dict(ANSWER_CHOICES, settle_first=settle))
                   for settle in (0.8, 0.85, 0.9, 0.95)}
        for half in (0, 1):
            scores = {settle: utility(answer, truth, fold == half) for settle, answer in answers.items()}
            best = min(settle for settle, score in scores.items() if score == max(scores.values()))
            measured = fold != half
            others = ", ".join(f"{settle}: {utility(answer, truth, measured):.0f}" for settle, answer in answers.items())
            print(f"  half {half} chooses {best} (its utilities {scores}); on the other half: {others}")
    settle_rounds(parts, truth, costs)
    readers(parts, truth, costs, args.crop_sizes, path)
    return 0


def settle_rounds(parts: Dict[str, np.ndarray], truth: List[Dict[str, object]], costs: Dict[str, float]) -> None:
    """The crops read before the image model for the images the first crops leave open (settle_crops: a second
    round), against the first crops alone: a cost choice, which should move no answer."""
    from trainer.default_model import ANSWER_CHOICES

    shipped = dict(ANSWER_CHOICES)
    base = simulate_policy(parts, **shipped)
    print(f"\nthe crops read before the image model (first_crops {shipped['first_crops']}, then up to settle_crops):")
    for more in (0, 3, 4, 5):
        answer = simulate_policy(parts, **dict(shipped, settle_crops=more))
        moved = int((answer["degrees"] != base["degrees"]).sum())
        decided = int((answer["decision"] != base["decision"]).sum())
        print(line(f"  settle_crops {more}: {int((~answer['model_run']).sum())} of {len(truth)} files skip the image "
                   f"model; {moved} degrees and {decided} decisions differ from the shipped policy's",
                   summary(answer, truth, costs=costs)))


def readers(parts: Dict[str, np.ndarray], truth: List[Dict[str, object]], costs: Dict[str, float], sizes: str,
            parts_path: str) -> None:
    """The crops before the image model (settle_first, the shipped policy) against the image model first (export
    format 11), with the crops read at the parts' copy (the policy's copy_short) and at each of `sizes` (cheaper
    crops of the same part of the page: computed once and cached beside the parts; a crop's modelled cost scales
    with its pixels)."""
    from trainer.default_model import ANSWER_CHOICES

    shipped = dict(ANSWER_CHOICES)
    base = simulate_policy(parts, **shipped)
    print(f"\nthe crops before the image model (settle_first {shipped['settle_first']}), or the image model first:")
    native = _default_policy().answer.text_crops.copy_short  # at which compute_parts reads the crops
    for short in [native] + [int(x) for x in sizes.split(",") if x.strip()]:
        crops = parts["crops"]
        if short != native:
            cache = f"{os.path.splitext(parts_path)[0]}-crops{short}.npy"
            if not os.path.exists(cache):
                np.save(cache, compute_crops([str(t["uri"]) for t in truth], short))
            crops = np.load(cache)
        sized = dict(parts, crops=crops)
        scaled = dict(costs, crop=costs["crop"] * (short / native) ** 2)
        for label, answer in (("the image model first", simulate_policy(sized, **dict(shipped, settle_first=0.0,
                                                                                                settle_crops=0))),
                              ("the crops first", simulate_policy(sized, **shipped))):
            moved = int((answer["degrees"] != base["degrees"]).sum())
            decided = int((answer["decision"] != base["decision"]).sum())
            print(line(f"  {short} px copy, {label}: {moved} degrees and {decided} decisions differ from the "
                       "shipped policy's", summary(answer, truth, costs=scaled)))


def _simulated_policy(policy: Dict[str, object]) -> Dict[str, float]:
    """A run.json's policy (the default's shape) in simulate's terms."""
    answer, crops, decision = policy["answer"], policy["answer"]["text_crops"], policy["decision_used"]
    out = {key: crops[key] for key in ("agree", "below", "sure", "weight", "second_below")}
    out["read_below"] = crops.get("read_below", 1.0)  # an export before format 8 read every image's crops
    out["first_crops"] = crops.get("first_crops", 0)  # before format 10 all five at once
    out["settle_first"] = crops.get("settle_first", 0.0)  # before format 12 the image model first
    out["settle_crops"] = crops.get("settle_crops", 0)  # before format 13 the first crops alone
    out.update(tta_below=answer["tta_below"], rotate=decision["rotate_threshold"], ok=decision["ok_threshold"],
               min_agreement=decision["tta_min_agreement"], agreement_below=decision["tta_agreement_below"],
               sparse_ink_below=decision["sparse_ink_below"])
    return out


if __name__ == "__main__":
    sys.exit(main())
