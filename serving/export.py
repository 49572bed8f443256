"""Export a trained Keras model as a TF Serving SavedModel version, with bytes-in signatures.

Layout written (what `tensorflow_model_server` expects):

    EXPORT_BASE/models.config, batching_parameters.txt, monitoring.config
    EXPORT_BASE/<model_name>/<version>/saved_model.pb, variables/, assets.extra/tf_serving_warmup_requests
    .../assets.extra/canary/, canary_answers.json: a canary set and this version's answers on it (for publish)

Signatures (the whole answer inside the graph, serving.answer: decoding, the model's view, test-time turns, text
crops, fusion and the decision under the recorded policy, serving.policy):

- `serving_default`: `images` DT_STRING [-1] encoded JPEG/PNG/GIF/BMP bytes ->
  `class_probabilities` [-1,N], `class_ids` [-1], `class_names` [-1] (when the model has a class head),
  `orientation_probabilities` [-1,4] (fused, calibrated), `orientation_degrees` [-1] (= argmax * 90, clockwise turn
  of the input), `image_orientation_probabilities` [-1,4] (the image model alone; -1 where the text crops read
  before it settled the image), `tta_agreement` [-1] (-1: not turned), `text_crops` [-1] (1 counted, 0 read, -1 not
  used), `decision` [-1] (auto_rotate / ok / review).
- `tf_example`: `examples` DT_STRING [-1] serialized tf.Example (schema `image/encoded`) -> the same outputs.
- `classify`: `inputs` serialized tf.Example -> `classes`, `scores`, method `tensorflow/serving/classify`
  (class head when present, else the four orientations), for TF Serving's Classify RPC.
- `score_policy`: `request` DT_STRING [-1] (any values) -> `policy_json` [-1] (serving.policy.ScorePolicy, one copy per
  request row): how answers become decisions.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pipelines.cli import command_parser
from pipelines.schema import CLASS_PROBABILITIES
from serving import configs
from serving.errors import ExportError
from serving.model_files import is_remote, resolve_version_dir  # noqa: F401 - resolve_version_dir: its former home
from serving.policy import (ORIENTATION_PROBABILITIES, POLICY_INPUT, POLICY_OUTPUT, POLICY_SIGNATURE, TURNS,
                            ScorePolicy, policy_from_settings)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "archive_vision"
PREDICT_SIGNATURE = "serving_default"
EXAMPLE_SIGNATURE = "tf_example"
CLASSIFY_SIGNATURE = "classify"
CLASSIFY_METHOD = "tensorflow/serving/classify"
IMAGES_INPUT = "images"
EXAMPLES_INPUT = "examples"
CLASSIFY_INPUT = "inputs"
ORIENTATION_LABELS = tuple(str(turn) for turn in TURNS)
EXPORT_METADATA = "archive_vision_export.json"
# The version's own answers on a small deterministic canary set, recorded right after saving: `archive-vision
# publish` checks that a server answers the same before it copies the version where the servers look.
CANARY_DIR = "canary"  # under assets.extra: the canary images, one file each
CANARY_ANSWERS = "canary_answers.json"  # under assets.extra: image file name -> its answer
CANARY_FORMAT = 1
# Bumped when the exported graph changes for the same weights (2: BatchNorm folded into the convolutions; 3: the
# whole answer in the graph; 4: score_policy takes a batched input; 5: the second look, the view from the full-size
# pixels; 6: the canary answers publish checks; 7: JPEGs decoded DCT-scaled, the view cut from the reading copy, the
# ink's median without a sort, MobileNetV2's stride-1 pads inside its convolutions; 8: the default's cost gates, text
# crops and turned copies only for images below 0.99; 9: crops normalised only once read; 10: the default's first two
# crops read before the other three; 11: stride-2 depthwise convolutions pad inside the convolution; 12: the
# default's first two crops read before the image model, which the images they settle skip; 13: the crop classifier
# takes the crops' pixels, its normalisation folded into its first convolution, and the default reads a third crop
# before the image model for the images the first two leave open; 14: the crop classifier's 1 x 1 convolutions of
# pooled vectors as matrix products, the default's views and later crops made only for the images that need
# them, from reading copies kept by reference, and per-channel elementwise steps computed row by row), so a cached
# export of the default model is redone.
EXPORT_FORMAT = 14
FOLD_TOLERANCE = 1e-3  # largest output difference accepted between the folded and the trained model


def next_version(model_dir: str, now: Optional[float] = None, existing: Optional[Sequence[int]] = None) -> int:
    """A timestamp version strictly greater than every numeric version already under model_dir (or in
    `existing`)."""
    existing = existing_versions(model_dir) if existing is None else existing
    stamp = int(time.time() if now is None else now)
    return max([stamp] + [v + 1 for v in existing])


def existing_versions(model_dir: str) -> List[int]:
    """The numeric version directories under model_dir, ascending (TF Serving ignores other names)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(n) for n in os.listdir(model_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def _sample_images(image_size: int) -> List[bytes]:
    """A synthetic JPEG and PNG used as warmup requests (the real server runs them before serving)."""
    import numpy as np
    import tensorflow as tf

    y, x = np.mgrid[0:image_size, 0:image_size // 2]
    pixels = np.stack([x * 2 % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    return [tf.io.encode_jpeg(pixels).numpy(), tf.io.encode_png(pixels).numpy()]


def canary_images(image_size: int) -> Dict[str, bytes]:
    """The canary set recorded with every export: the warmup samples and the same pattern turned 90/180/270
    degrees and at another aspect, all cheap and deterministic (file name -> encoded bytes)."""
    import numpy as np
    import tensorflow as tf

    y, x = np.mgrid[0:image_size, 0:image_size // 2]
    pixels = np.stack([x * 2 % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    pixels[: image_size // 4, : image_size // 8] = [255, 0, 0]  # an asymmetric block, so turns differ
    jpeg, png = _sample_images(image_size)
    images = {"warmup_0.jpg": jpeg, "warmup_1.png": png}
    for turns in (1, 2, 3):
        images[f"turned_{turns * 90}.png"] = tf.io.encode_png(np.ascontiguousarray(np.rot90(pixels, turns))).numpy()
    wide = np.ascontiguousarray(np.tile(pixels.transpose(1, 0, 2), (1, 2, 1))[: image_size // 3])
    images["wide.jpg"] = tf.io.encode_jpeg(wide, quality=90).numpy()
    return images


def canary_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """What is recorded (and compared) of each answer: the orientation probabilities and the decision (and the
    class probabilities of a class head)."""
    import numpy as np

    kept = []
    for row in rows:
        answer: Dict[str, Any] = {"decision": row.get("decision")}
        for key in (ORIENTATION_PROBABILITIES, CLASS_PROBABILITIES):
            if row.get(key) is not None:
                answer[key] = [float(v) for v in np.asarray(row[key], np.float32).reshape(-1)]
        kept.append(answer)
    return kept


def record_canary_answers(version_dir: str, image_size: int, serving_default=None) -> str:
    """Write VERSION/assets.extra/canary/ and canary_answers.json: the version's serving_default answers on
    canary_images. `serving_default` is the concrete function the version was saved from (export passes it: the same
    graph and weights, without loading the SavedModel back, which costs seconds per export); without it the saved
    version is loaded and called."""
    from serving.client import InProcessModelClient, prediction_rows

    images = canary_images(image_size)
    canary_dir = os.path.join(version_dir, "assets.extra", CANARY_DIR)
    os.makedirs(canary_dir, exist_ok=True)
    for name, data in images.items():
        with open(os.path.join(canary_dir, name), "wb") as f:
            f.write(data)
    if serving_default is not None:
        import tensorflow as tf

        outputs = serving_default(**{IMAGES_INPUT: tf.constant(list(images.values()), tf.string)})
        rows = canary_rows(prediction_rows({k: v.numpy() for k, v in outputs.items()}, len(images)))
    else:
        client = InProcessModelClient(version_dir, max_attempts=1)
        try:
            rows = canary_rows(client.predict(list(images.values())))
        finally:
            client.close()
    path = os.path.join(version_dir, "assets.extra", CANARY_ANSWERS)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"format": CANARY_FORMAT, "signature": PREDICT_SIGNATURE,
                   "answers": dict(zip(images, rows))}, f, indent=1, sort_keys=True)
    return path


def inference_model(model, image_size: int):
    """(model to serve, BatchNorms folded): `model` with its conv+BN pairs (and stride-2 depthwise pads) folded,
    checked on noise and on the warmup images to answer as it does; the model unfolded (and a warning) if it does
    not."""
    import numpy as np
    import tensorflow as tf

    from trainer.inference import fold_batch_norms
    from trainer.preprocessing import preprocess_batch

    folded, count = fold_batch_norms(model)
    if folded is not model:
        noise = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, image_size, image_size, 3)), tf.float32)
        pixels = tf.concat([noise, preprocess_batch(tf.constant(_sample_images(image_size)), image_size)], 0)
        trained, served = model(pixels, training=False), folded(pixels, training=False)
        for key in (trained if isinstance(trained, dict) else {}):
            gap = float(np.max(np.abs(np.asarray(trained[key], np.float32) - np.asarray(served[key], np.float32))))
            if gap > FOLD_TOLERANCE:
                log.warning("folding %d BatchNorm layers (and pads) changed %s by %.2g; exporting the model unfolded",
                            count, key, gap)
                return model, 0
    return folded, count


def crop_net_for(policy: ScorePolicy):
    """The text-crop classifier rebuilt in TF (trainer.onnx_graph) when the policy reads crops, else None: it takes
    the crops' RGB pixels in [0, 255] (serving.answer.crop_pixels)."""
    if policy.answer.text_crops is None:
        return None
    from trainer import onnx_graph, text_crops

    try:
        path = text_crops.model_path()
    except text_crops.TextCropsUnavailable as e:
        raise ExportError(f"the model's policy reads text crops: {e}") from None
    from serving.answer import crop_pixels

    return onnx_graph.from_onnx(path, crop_pixels())


def _build_module(model, class_names: Optional[List[str]], image_size: int, policy: ScorePolicy):
    """A tf.Module owning the model, the crop classifier and the signature functions (the whole answer of
    serving.answer, and the policy)."""
    import tensorflow as tf

    from pipelines import schema
    from serving.answer import WholeAnswer

    probe = model(tf.zeros([1, image_size, image_size, 3], tf.float32), training=False)
    if not isinstance(probe, dict):
        raise ExportError("the model must return a dict with class_probabilities and/or "
                          f"orientation_probabilities, got {type(probe).__name__}")
    has_class = CLASS_PROBABILITIES in probe
    has_orientation = ORIENTATION_PROBABILITIES in probe
    if not (has_class or has_orientation):
        raise ExportError(f"the model outputs {sorted(probe)} include neither {CLASS_PROBABILITIES} "
                          f"nor {ORIENTATION_PROBABILITIES}")
    if has_orientation and probe[ORIENTATION_PROBABILITIES].shape[-1] != 4:
        raise ExportError(f"{ORIENTATION_PROBABILITIES} must have 4 columns, "
                          f"got {probe[ORIENTATION_PROBABILITIES].shape}")
    if has_class:
        num_classes = int(probe[CLASS_PROBABILITIES].shape[-1])
        if class_names is None:
            class_names = [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ExportError(f"{len(class_names)} class names for a class head of {num_classes} outputs")

    module = tf.Module()
    module.model = model
    module.class_names = tf.Variable(class_names or [""], trainable=False, dtype=tf.string)
    module.orientation_labels = tf.Variable(list(ORIENTATION_LABELS), trainable=False, dtype=tf.string)
    module.crop_net = crop_net_for(policy) if has_orientation else None
    module.policy_json = tf.constant(policy.to_json())
    whole = WholeAnswer(module.model, policy, has_class, has_orientation, module.crop_net)

    def outputs_from_bytes(image_bytes: tf.Tensor) -> Dict[str, tf.Tensor]:
        out = whole(image_bytes)
        if has_class:
            out["class_names"] = tf.gather(module.class_names, out["class_ids"])
        return out

    def image_bytes_from_examples(serialized: tf.Tensor) -> tf.Tensor:
        spec = {schema.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string)}
        return tf.io.parse_example(serialized, spec)[schema.IMAGE_ENCODED]

    # The whole answer is traced once, in serve_images; the other signatures parse their input and call it (one
    # function in the graph, called from three places). The answer's control flow is tf.cond on tensors and Python
    # on settings, so autograph has nothing to convert (and would only slow the export's tracing).
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGES_INPUT)], autograph=False)
    def serve_images(images):
        return outputs_from_bytes(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)], autograph=False)
    def serve_examples(examples):
        return serve_images(image_bytes_from_examples(examples))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)], autograph=False)
    def classify(inputs):
        out = serve_images(image_bytes_from_examples(inputs))
        scores = out[CLASS_PROBABILITIES] if has_class else out[ORIENTATION_PROBABILITIES]
        labels = module.class_names if has_class else module.orientation_labels
        classes = tf.tile(tf.expand_dims(labels, 0), [tf.shape(scores)[0], 1])
        return {"classes": classes, "scores": scores}

    # One batched string input and output, like every other signature: TF Serving's batching (--enable_batching)
    # refuses a request with no input tensor.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=POLICY_INPUT)])
    def score_policy(request):
        return {POLICY_OUTPUT: tf.fill(tf.shape(request), module.policy_json)}

    module.serve_images = serve_images
    module.serve_examples = serve_examples
    module.classify = classify
    module.score_policy = score_policy
    signatures = {PREDICT_SIGNATURE: serve_images.get_concrete_function(),
                  EXAMPLE_SIGNATURE: serve_examples.get_concrete_function(),
                  CLASSIFY_SIGNATURE: classify.get_concrete_function(),
                  POLICY_SIGNATURE: score_policy.get_concrete_function()}
    return module, signatures, class_names if has_class else None


def set_signature_method_name(saved_model_dir: str, signature: str, method_name: str) -> None:
    """Rewrite saved_model.pb so `signature` carries `method_name` (TF2 saving always writes .../predict)."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(saved_model_dir, "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        saved.ParseFromString(f.read())
    for meta_graph in saved.meta_graphs:
        if signature not in meta_graph.signature_def:
            raise ExportError(f"signature {signature!r} not in {path}")
        meta_graph.signature_def[signature].method_name = method_name
    with open(path, "wb") as f:
        f.write(saved.SerializeToString())
    try:  # keep fingerprint.pb's checksum matching the edited graph; not every TF build exposes this
        from tensorflow.python.saved_model import fingerprinting_utils
        fingerprinting_utils.write_fingerprint(saved_model_dir)
    except Exception:  # noqa: BLE001 - the fingerprint is informational, loading never checks it
        pass


def export_model(model, export_base: str, *, model_name: str = DEFAULT_MODEL_NAME,
                 class_names: Optional[List[str]] = None, image_size: int,
                 version: Optional[int] = None, extra_assets: Optional[Dict[str, str]] = None,
                 score_settings: Optional[Dict[str, Any]] = None) -> str:
    """Write EXPORT_BASE/<model_name>/<version>/ (SavedModel + TF Serving files); return the version dir.

    `extra_assets` maps file names to text contents, written under the version's assets.extra/. `score_settings`
    (how `archive-vision score` should score this model unless told otherwise: input preparation and size,
    test-time turns, thresholds, extra readers) goes into the metadata file there, EXPORT_METADATA; score reads
    it for `--model` (and `--model-settings` with `--endpoint`).
    """
    import tensorflow as tf

    model_dir = os.path.join(export_base, model_name)
    os.makedirs(model_dir, exist_ok=True)
    if version is None:
        version = next_version(model_dir)
    elif version in existing_versions(model_dir):
        raise ExportError(f"version {version} already exists under {model_dir}")
    policy = policy_from_settings(score_settings, image_size)
    served, folded = inference_model(model, image_size)
    module, signatures, class_names = _build_module(served, list(class_names) if class_names else None, image_size,
                                                    policy)

    # Saved under a non-numeric name first: a polling server ignores it until the rename makes it whole.
    tmp_dir = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    tf.saved_model.save(module, tmp_dir, signatures=signatures)
    set_signature_method_name(tmp_dir, CLASSIFY_SIGNATURE, CLASSIFY_METHOD)
    configs.write_warmup_requests(tmp_dir, model_name, _sample_images(image_size))
    extra_dir = os.path.join(tmp_dir, "assets.extra")
    metadata = {"model_name": model_name, "version": version, "image_size": image_size,
                "export_format": EXPORT_FORMAT, "batch_norms_folded": folded,
                "class_names": class_names, "signatures": sorted(signatures)}
    if score_settings:
        metadata["score_settings"] = score_settings
    metadata["score_policy"] = json.loads(policy.to_json())
    with open(os.path.join(extra_dir, EXPORT_METADATA), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    for name, text in (extra_assets or {}).items():
        if os.path.basename(name) != name:
            raise ExportError(f"extra asset names must be plain file names, got {name!r}")
        with open(os.path.join(extra_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    record_canary_answers(tmp_dir, image_size, signatures[PREDICT_SIGNATURE])
    version_dir = os.path.join(model_dir, str(version))
    os.rename(tmp_dir, version_dir)

    configs.write_models_config(export_base, model_name, model_dir)
    if not os.path.exists(os.path.join(export_base, configs.BATCHING_PARAMETERS)):
        configs.write_batching_parameters(export_base)
    if not os.path.exists(os.path.join(export_base, configs.MONITORING_CONFIG)):
        configs.write_monitoring_config(export_base)
    return version_dir


def export_default_model(export_base: str, model_name: Optional[str] = None, version: Optional[int] = None) -> str:
    """Write the default model as `<export_base>/<model_name>/<version>` for TF Serving (`archive-vision export
    --model default`); the head's config and provenance go along as an asset, and its score_settings (the policy the
    graph is built with) in the export's metadata."""
    from trainer import default_model

    meta = default_model.head_metadata()
    return export_model(default_model.build_default_orientation_model(), export_base,
                        model_name=model_name or default_model.DEFAULT_MODEL_NAME, class_names=None,
                        image_size=default_model.DEFAULT_IMAGE_SIZE, version=version,
                        score_settings=default_model.score_settings(),
                        extra_assets={"default_orientation_head.json": json.dumps(meta, indent=1, sort_keys=True)})


def export_to(export_base: str, model_name: str, version: Optional[int],
              write: Callable[[str, Optional[int]], str]) -> str:
    """`write(base, version)` (a call of export_model or export_default_model) into `export_base`; returns the version
    dir. A gs:// base (any Beam filesystem) is written in a local folder first, holding the base's own models.config
    and server files, and copied up: the version (saved_model.pb last, so a polling TF Serving never loads half of
    it), then models.config naming the gs:// model dir. The version number is chosen against the versions there."""
    if not is_remote(export_base):
        return write(export_base, version)
    import tempfile

    from apache_beam.io.filesystems import FileSystems

    from serving.model_files import SAVED_MODEL, download_prefix, upload_tree

    base = export_base.rstrip("/")
    model_dir = f"{base}/{model_name}"
    names = [m.path[len(model_dir) + 1:].split("/")[0]
             for m in FileSystems.match([f"{model_dir}/*/{SAVED_MODEL}"])[0].metadata_list]
    taken = sorted(int(name) for name in names if name.isdigit())
    if version is None:
        version = next_version(model_dir, existing=taken)
    elif version in taken:
        raise ExportError(f"version {version} already exists under {model_dir}")
    server_files = (configs.MODELS_CONFIG, configs.BATCHING_PARAMETERS, configs.MONITORING_CONFIG)
    with tempfile.TemporaryDirectory(prefix="export-") as local_base:
        download_prefix(base, local_base, server_files)  # models.config keeps the other models it lists
        local_version = write(local_base, version)
        target = f"{model_dir}/{version}"
        upload_tree(local_version, target, last=(SAVED_MODEL,))
        configs.write_models_config(local_base, model_name, model_dir)
        upload_tree(local_base, base, skip_prefixes=(f"{model_name}/",))
    return target


def _local_job_files(path: str, folder: str) -> str:
    """A gs:// training job dir or .keras file copied into `folder` (the model file and what export reads beside
    it); returns the local path to load."""
    from serving.model_files import download_prefix

    beside = ("labels.json", "training_config.json", "run_summary.json")
    path = path.rstrip("/")
    if path.endswith(".keras"):
        parent, name = path.rsplit("/", 1)
        copied = download_prefix(parent, folder, (name, *beside))
        local = os.path.join(folder, name)
    else:
        copied = download_prefix(path, folder, ("*.keras", *beside))
        local = folder
    if not any(c.endswith(".keras") for c in copied):
        raise ExportError(f"{path}: no .keras model file there (a training job writes {JOB_MODEL_FILE} in its job "
                          f"dir once it finishes)")
    return local


def _read_text(path: str) -> str:
    """A small text file, local or gs://."""
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(path):
        raise ExportError(f"labels file {path} does not exist")
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read().decode("utf-8")


def load_keras_model(path: str, trust_saved_model: bool = False):
    """Load a trainer-saved Keras model from a .keras file or a job dir holding one (the trainer's model.keras, else
    the newest .keras under it). Keras refuses a model that loads an outside SavedModel (a hub: backbone) unless
    `trust_saved_model` (its safe_mode off)."""
    import importlib

    import keras

    if "://" in path:
        raise ExportError(f"{path}: export reads a local job dir or file; copy it down first (gsutil cp -r)")
    if os.path.isdir(path):
        candidates = sorted(glob.glob(os.path.join(path, "**", "*.keras"), recursive=True), key=os.path.getmtime)
        if os.path.isfile(os.path.join(path, JOB_MODEL_FILE)):
            candidates.append(os.path.join(path, JOB_MODEL_FILE))
        if not candidates:
            raise ExportError(f"no .keras model file under {path} (a training job writes {JOB_MODEL_FILE} in its "
                              f"job dir once it finishes)")
        path = candidates[-1]
    if not os.path.isfile(path):
        raise ExportError(f"model file {path} does not exist")
    # The trainer's custom layers register themselves with Keras when their modules are imported.
    for module_name in ("trainer.backbones", "trainer.heads", "trainer.model"):
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass
    _check_job_saved(path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust_saved_model), path
    except ValueError as e:
        if "safe_mode" not in str(e):
            raise
        raise ExportError(f"{path} holds what Keras' safe mode refuses (a hub: backbone's outside SavedModel, or "
                          f"Python code); pass --trust-saved-model if you trust the file (the training job that "
                          f"saved it)") from None
    except OSError as e:  # a hub backbone's SavedModel that is no longer where the model names it, say
        raise ExportError(f"{path} could not be loaded: {e}") from None


def _job_summary(model_path: str) -> Optional[Dict[str, Any]]:
    """The run_summary.json beside a training job's model.keras (None for any other file, or no summary)."""
    summary_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "run_summary.json")
    if os.path.basename(model_path) != JOB_MODEL_FILE or not os.path.isfile(summary_path):
        return None
    with open(summary_path, encoding="utf-8") as f:
        return json.load(f)


def _check_job_saved(path: str) -> None:
    """A job's model.keras is only the job's if its last run says it saved it (run_summary.json's model_file): a
    run that failed to save, or is still running, must not pass an older model off with its labels."""
    summary = _job_summary(path) or {}
    if "model_file" in summary and os.path.basename(str(summary["model_file"] or "")) != JOB_MODEL_FILE:
        raise ExportError(f"the job's last run did not save {path} ({summary.get('model_file_error') or 'no file'})"
                          f"; it may be an earlier run's")


JOB_MODEL_FILE = "model.keras"  # trainer.task.MODEL_FILE: where a training job leaves its model


def job_files(model_path: str) -> Tuple[Dict[str, str], Optional[Dict[str, Any]]]:
    """What the job that saved `model_path` left beside it, as the trainer's own export records it: its
    training_config.json and labels.json (the version's assets) and run_summary.json's score_settings (how score
    should score it). ({}, None) for a .keras file that no job left."""
    folder, assets = os.path.dirname(os.path.abspath(model_path)), {}
    for name in ("training_config.json", "labels.json"):
        if os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                assets[name] = f.read()
    return assets, (_job_summary(model_path) or {}).get("score_settings")


def _class_names(labels_json: Optional[str]) -> Optional[List[str]]:
    """Class names from a labels.json's text ({'classes': [...]} or a list), else None."""
    if not labels_json:
        return None
    data = json.loads(labels_json)
    return list(data["classes"] if isinstance(data, dict) else data) or None


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser(
        "archive-vision export", __doc__.split("\n")[0],
        examples=("archive-vision export --model jobs/2026-11-22 --export-base models   # a training job's model",
                  "archive-vision export --model default --export-base models          # the built-in model",
                  "archive-vision export --model gs://b/jobs/j1 --export-base gs://b/models  # from and to gs://"))
    parser.add_argument("--model", required=True, help="a training job dir (its model.keras, labels, config and "
                                                       "score settings), or a Keras .keras file, local or gs://; "
                                                       "`default`: the shipped default orientation model")
    parser.add_argument("--trust-saved-model", action="store_true",
                        help="load a model that loads an outside SavedModel (a job trained on a hub: backbone): turns "
                             "Keras' safe mode off for the whole file, which then may run any code it holds")
    # The underscore spellings are the ones TF Serving's docs use; both are accepted.
    parser.add_argument("--export-base", "--export_base", dest="export_base", required=True,
                        help="base dir, local or gs://; writes <export-base>/<model-name>/<version> (on gs:// "
                             "written locally first, then copied up with saved_model.pb last)")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=None,
                        help=f"default: the job's (its training_config.json), else {DEFAULT_MODEL_NAME}")
    parser.add_argument("--labels", help="labels.json ({'classes': [...]}), local or gs://; default: labels.json "
                                         "beside the model")
    parser.add_argument("--image-size", "--image_size", dest="image_size", type=int,
                        help="model input size; default: read from the model")
    parser.add_argument("--version", type=int, help="version number; default: a timestamp above existing ones")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision export`: write a new SavedModel version of a trained Keras model."""
    import tempfile

    args = _parse_args(argv)
    try:
        if args.model == "default":
            name = args.model_name or DEFAULT_MODEL_NAME
            print(export_to(args.export_base, name, args.version,
                            lambda base, version: export_default_model(base, name, version)))
            return 0
        with tempfile.TemporaryDirectory(prefix="export-job-") as staged:
            model_ref = _local_job_files(args.model, staged) if is_remote(args.model) else args.model
            model, model_path = load_keras_model(model_ref, trust_saved_model=args.trust_saved_model)
            image_size = args.image_size or model.inputs[0].shape[1]
            if not image_size:
                raise ExportError("the model's input size is not fixed; pass --image_size")
            assets, settings = job_files(model_path)
        if args.labels:  # instead of the labels.json beside the model: the names and the version's asset alike
            assets["labels.json"] = _read_text(args.labels)
        model_name = args.model_name or json.loads(assets.get("training_config.json") or "{}").get(
            "model_name") or DEFAULT_MODEL_NAME
        version_dir = export_to(
            args.export_base, model_name, args.version,
            lambda base, version: export_model(model, base, model_name=model_name,
                                               class_names=_class_names(assets.get("labels.json")),
                                               image_size=int(image_size), version=version,
                                               extra_assets=assets or None, score_settings=settings))
    except ExportError as e:
        print(f"archive-vision export: {e}", file=sys.stderr)
        return 2
    print(version_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
