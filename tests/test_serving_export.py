"""Export: the SavedModel answers like the in-memory model, lists its signatures, and brings TF Serving's files."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from serving import configs, export
from serving import policy as P
from serving.errors import ExportError
from serving.policy import ScorePolicy

IMAGE_SIZE = 32
CLASS_NAMES = ["document", "photo", "map"]


def limit_tf_threads() -> None:
    """Keep TF to one thread each way: the test machine's two cores are shared."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised by an earlier test module
        pass


limit_tf_threads()


def make_tiny_model(image_size: int = IMAGE_SIZE, num_classes: int | None = 3, seed: int = 0):
    """A few conv layers following the MODEL CONTRACT: float pixels in [0,255] -> dict of softmax heads."""
    import keras

    keras.utils.set_random_seed(seed)
    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(pixels)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = {"orientation_probabilities": keras.layers.Dense(4, activation="softmax", name="orientation")(x)}
    if num_classes:
        outputs["class_probabilities"] = keras.layers.Dense(num_classes, activation="softmax", name="classes")(x)
    return keras.Model(pixels, outputs)


def encoded_image(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A structured (not flat) picture encoded as JPEG/PNG/GIF/BMP, so that wrong resizing changes outputs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                       rng.integers(0, 255, size=(height, width))], axis=-1).astype(np.uint8)
    pixels[: height // 3, : width // 4] = [255, 0, 0]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def sample_images() -> list[bytes]:
    """Real encoded JPEG, PNG, GIF and BMP bytes of different aspect ratios."""
    return [encoded_image(48, 30, "JPEG", 1), encoded_image(20, 40, "PNG", 2),
            encoded_image(64, 64, "JPEG", 3), encoded_image(33, 17, "PNG", 4),
            encoded_image(40, 24, "GIF", 5), encoded_image(24, 40, "BMP", 6)]


ORIENTATION_OUTPUTS = {P.ORIENTATION_PROBABILITIES, P.ORIENTATION_DEGREES, P.IMAGE_ORIENTATION_PROBABILITIES,
                       P.TTA_AGREEMENT, P.TEXT_CROPS, P.INK, P.DECISION}


def assert_graph_decides_like_the_policy(outputs, decision: "P.DecisionPolicy") -> None:
    """The `decision` output is serving.policy.decide on the graph's own outputs, row by row."""
    out = {k: np.asarray(v) for k, v in outputs.items()}
    classes = out.get("class_probabilities")
    want = [P.decide(decision, out[P.ORIENTATION_PROBABILITIES][i], float(out[P.TTA_AGREEMENT][i]),
                     None if classes is None else classes[i], float(out[P.INK][i]), int(out[P.TEXT_CROPS][i]))[0]
            for i in range(len(out[P.DECISION]))]
    assert [d.decode() for d in out[P.DECISION]] == want


def served_policy(loaded) -> "ScorePolicy":
    """The `score_policy` signature's answer (one copy per request row, whatever the rows hold)."""
    out = loaded.signatures["score_policy"](request=tf.constant([b"a", b"b"]))["policy_json"].numpy()
    assert len(out) == 2 and out[0] == out[1]
    return ScorePolicy.from_json(out[0])


def expected_outputs(model, images: list[bytes]) -> dict:
    """The in-memory model's answer through the shared preprocessing path."""
    from trainer.preprocessing import preprocess_batch

    raw = model(preprocess_batch(tf.constant(images), IMAGE_SIZE), training=False)
    return {k: v.numpy() for k, v in raw.items()}


def test_saved_model_matches_in_memory_model_on_jpeg_png_gif_bmp(tmp_path):
    model = make_tiny_model()
    version_dir = export.export_model(model, str(tmp_path), class_names=CLASS_NAMES, image_size=IMAGE_SIZE)
    images = sample_images()
    want = expected_outputs(model, images)

    got = tf.saved_model.load(version_dir).signatures["serving_default"](images=tf.constant(images))

    assert set(got) == {"class_probabilities", "class_ids", "class_names", *ORIENTATION_OUTPUTS}
    np.testing.assert_allclose(got["class_probabilities"].numpy(), want["class_probabilities"], rtol=1e-5, atol=1e-6)
    # No score settings: the generic policy, no turned copies, no text crops: the answer is the model's own.
    for key in ("orientation_probabilities", "image_orientation_probabilities"):
        np.testing.assert_allclose(got[key].numpy(), want["orientation_probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["tta_agreement"].numpy(), -1.0)
    np.testing.assert_array_equal(got["text_crops"].numpy(), -1)
    assert_graph_decides_like_the_policy(got, ScorePolicy().decision)
    ids = want["class_probabilities"].argmax(-1)
    np.testing.assert_array_equal(got["class_ids"].numpy(), ids)
    assert [n.decode() for n in got["class_names"].numpy()] == [CLASS_NAMES[i] for i in ids]
    np.testing.assert_array_equal(got["orientation_degrees"].numpy(),
                                  want["orientation_probabilities"].argmax(-1) * 90)
    assert got["orientation_degrees"].dtype == tf.int64 and got["class_ids"].dtype == tf.int64


def test_export_records_its_score_policy_and_the_graph_answers_under_it(tmp_path):
    """score_settings become the version's ScorePolicy: in the metadata file, behind the `score_policy` signature,
    and in the graph, which turns every image (tta, no gate), rolls the copies' answers back and averages them."""
    model = make_tiny_model()
    settings = {"tta": True, "rotate_threshold": 0.7, "origin": "a test's settings"}
    version_dir = export.export_model(model, str(tmp_path), class_names=CLASS_NAMES, image_size=IMAGE_SIZE,
                                      score_settings=settings)
    policy = P.policy_from_settings(settings, IMAGE_SIZE)
    loaded = tf.saved_model.load(version_dir)

    with open(os.path.join(version_dir, "assets.extra", export.EXPORT_METADATA)) as f:
        metadata = json.load(f)
    assert ScorePolicy.from_dict(metadata["score_policy"]) == policy and metadata["score_settings"] == settings
    assert "score_policy" in metadata["signatures"]
    served = served_policy(loaded)
    assert served == policy and served.answer.tta and served.decision.rotate_threshold == 0.7
    assert served.origin == "a test's settings"

    images = sample_images()
    got = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(images)).items()}

    from trainer.preprocessing import preprocess_batch

    views = preprocess_batch(tf.constant(images), IMAGE_SIZE)
    # The copy turned j quarters clockwise (rot90 k = -j) answers for the stored image at column (d + j) % 4.
    copies = [model(tf.image.rot90(views, k=(4 - j) % 4), training=False) for j in range(4)]
    shifted = np.stack([np.roll(c["orientation_probabilities"].numpy(), -j, axis=-1) for j, c in enumerate(copies)])
    mean = shifted.mean(0)
    np.testing.assert_allclose(got["orientation_probabilities"], mean, atol=1e-5)
    np.testing.assert_allclose(got["image_orientation_probabilities"], shifted[0], atol=1e-5)
    np.testing.assert_allclose(got["tta_agreement"], (shifted.argmax(-1) == mean.argmax(-1)).mean(0), atol=1e-6)
    np.testing.assert_allclose(got["class_probabilities"],
                               np.mean([c["class_probabilities"].numpy() for c in copies], 0), atol=1e-5)
    assert_graph_decides_like_the_policy(got, policy.decision)


def test_an_export_without_score_settings_records_the_generic_policy(tmp_path):
    version_dir = export.export_model(make_tiny_model(num_classes=None), str(tmp_path), class_names=None,
                                      image_size=IMAGE_SIZE)
    with open(os.path.join(version_dir, "assets.extra", export.EXPORT_METADATA)) as f:
        metadata = json.load(f)
    generic = ScorePolicy(answer=P.AnswerSettings(image_size=IMAGE_SIZE))
    assert "score_settings" not in metadata and ScorePolicy.from_dict(metadata["score_policy"]) == generic
    assert served_policy(tf.saved_model.load(version_dir)) == generic


def test_export_folds_batch_norms_and_still_answers_like_the_trained_model(tmp_path):
    import keras

    keras.utils.set_random_seed(7)
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(pixels)
    for _ in range(2):
        x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(x)
        x = keras.layers.BatchNormalization(epsilon=1e-3)(x)
        x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(pixels, {"orientation_probabilities": keras.layers.Dense(4, activation="softmax")(x)})
    rng = np.random.default_rng(0)
    for layer in model.layers:  # trained-looking statistics: fresh BNs are an identity and hide a wrong fold
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.3, 8))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, 8))
            layer.gamma.assign(rng.uniform(0.5, 2.0, 8))

    version_dir = export.export_model(model, str(tmp_path), class_names=None, image_size=IMAGE_SIZE)
    loaded = tf.saved_model.load(version_dir)
    got = loaded.signatures["serving_default"](images=tf.constant(sample_images()))

    with open(os.path.join(version_dir, "assets.extra", export.EXPORT_METADATA)) as f:
        metadata = json.load(f)
    assert metadata["batch_norms_folded"] == 2 and metadata["export_format"] == export.EXPORT_FORMAT
    saved = [name for name, _ in tf.train.list_variables(os.path.join(version_dir, "variables", "variables"))]
    unfolded = tf.train.Checkpoint(model=model)
    unfolded_dir = str(tmp_path / "unfolded")
    unfolded.write(os.path.join(unfolded_dir, "ckpt"))
    trained = [name for name, _ in tf.train.list_variables(os.path.join(unfolded_dir, "ckpt"))]
    saved, trained = ([n for n in names if n.startswith("model/") and "VARIABLE_VALUE" in n] for names in (saved, trained))
    assert not [n for n in saved if "moving_" in n] and len([n for n in trained if "moving_" in n]) == 4
    assert len(saved) == len(trained) - 2 * 4 + 2  # each BN's 4 variables gone, each folded conv gained a bias
    np.testing.assert_allclose(got["orientation_probabilities"].numpy(),
                               expected_outputs(model, sample_images())["orientation_probabilities"],
                               rtol=1e-4, atol=1e-5)


def test_a_fold_that_fails_its_check_exports_the_model_unfolded(tmp_path, monkeypatch, caplog):
    import keras

    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="pixels")
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, strides=2, use_bias=False)(pixels / 255.0))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(pixels, {"orientation_probabilities": keras.layers.Dense(4, activation="softmax")(x)})
    monkeypatch.setattr(export, "FOLD_TOLERANCE", -1.0)  # no fold can pass: as if folding had gone wrong

    version_dir = export.export_model(model, str(tmp_path), class_names=None, image_size=IMAGE_SIZE)

    with open(os.path.join(version_dir, "assets.extra", export.EXPORT_METADATA)) as f:
        assert json.load(f)["batch_norms_folded"] == 0
    assert "exporting the model unfolded" in caplog.text
    got = tf.saved_model.load(version_dir).signatures["serving_default"](images=tf.constant(sample_images()))
    np.testing.assert_allclose(got["orientation_probabilities"].numpy(),
                               expected_outputs(model, sample_images())["orientation_probabilities"],
                               rtol=1e-5, atol=1e-6)


def test_example_and_classify_signatures_agree_with_bytes_signature(tmp_path):
    from pipelines import schema

    model = make_tiny_model()
    loaded = tf.saved_model.load(export.export_model(model, str(tmp_path), class_names=CLASS_NAMES,
                                                     image_size=IMAGE_SIZE))
    images = sample_images()[:3]
    examples = [tf.train.Example(features=tf.train.Features(feature={
        schema.IMAGE_ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(value=[img])),
        schema.ORIENTATION: tf.train.Feature(int64_list=tf.train.Int64List(value=[90]))})).SerializeToString()
        for img in images]

    by_bytes = loaded.signatures["serving_default"](images=tf.constant(images))
    by_example = loaded.signatures["tf_example"](examples=tf.constant(examples))
    classified = loaded.signatures["classify"](inputs=tf.constant(examples))

    np.testing.assert_allclose(by_example["class_probabilities"], by_bytes["class_probabilities"], rtol=1e-6)
    np.testing.assert_allclose(classified["scores"], by_bytes["class_probabilities"], rtol=1e-6)
    assert classified["classes"].numpy().tolist() == [[n.encode() for n in CLASS_NAMES]] * 3


def test_orientation_only_model_lacks_class_outputs(tmp_path):
    model = make_tiny_model(num_classes=None)
    loaded = tf.saved_model.load(export.export_model(model, str(tmp_path), class_names=None, image_size=IMAGE_SIZE))
    images = sample_images()[:2]

    got = loaded.signatures["serving_default"](images=tf.constant(images))
    classified = loaded.signatures["classify"](inputs=tf.constant([
        tf.train.Example(features=tf.train.Features(feature={"image/encoded": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[images[0]]))})).SerializeToString()]))

    assert set(got) == ORIENTATION_OUTPUTS
    np.testing.assert_allclose(got["orientation_probabilities"], expected_outputs(model, images)[
        "orientation_probabilities"], rtol=1e-5, atol=1e-6)
    assert_graph_decides_like_the_policy(got, ScorePolicy().decision)
    assert classified["classes"].numpy().tolist() == [[b"0", b"90", b"180", b"270"]]


def test_saved_model_cli_lists_signatures_and_classify_method(tmp_path):
    version_dir = export.export_model(make_tiny_model(), str(tmp_path), class_names=CLASS_NAMES,
                                      image_size=IMAGE_SIZE)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")

    shown = subprocess.run([cli, "show", "--all", "--dir", version_dir], capture_output=True, text=True,
                           timeout=120, check=True).stdout

    for signature in ("serving_default", "tf_example", "classify", "score_policy"):
        assert f"signature_def['{signature}']" in shown
    assert "inputs['images'] tensor_info:" in shown and "outputs['orientation_degrees'] tensor_info:" in shown
    classify_block = shown.split("signature_def['classify']")[1].split("signature_def[")[0]
    assert "Method name is: tensorflow/serving/classify" in classify_block
    default_block = shown.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert "Method name is: tensorflow/serving/predict" in default_block


def test_versions_increase_past_existing_ones(tmp_path):
    model = make_tiny_model()
    future = 9_999_999_999
    os.makedirs(tmp_path / "archive_vision" / str(future))

    first = export.export_model(model, str(tmp_path), class_names=CLASS_NAMES, image_size=IMAGE_SIZE)
    second = export.export_model(model, str(tmp_path), class_names=CLASS_NAMES, image_size=IMAGE_SIZE)

    assert int(os.path.basename(first)) == future + 1
    assert int(os.path.basename(second)) == future + 2
    assert not [n for n in os.listdir(tmp_path / "archive_vision") if n.startswith(".tmp")]
    with pytest.raises(ExportError):
        export.export_model(model, str(tmp_path), class_names=CLASS_NAMES, image_size=IMAGE_SIZE, version=future)


def test_tf_serving_side_files_are_written_and_readable(tmp_path):
    version_dir = export.export_model(make_tiny_model(), str(tmp_path), model_name="scans",
                                      class_names=CLASS_NAMES, image_size=IMAGE_SIZE,
                                      extra_assets={"labels.json": json.dumps({"classes": CLASS_NAMES})})
    export.export_model(make_tiny_model(num_classes=None), str(tmp_path), model_name="orient", class_names=None,
                        image_size=IMAGE_SIZE)

    config = configs.read_models_config(str(tmp_path / "models.config"))
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == {"scans", "orient"}
    assert entries["scans"].base_path == str(tmp_path / "scans") and entries["scans"].model_platform == "tensorflow"
    params = configs.parse_batching_parameters((tmp_path / "batching_parameters.txt").read_text())
    assert params == configs.BatchingParameters()
    assert "prometheus_config" in (tmp_path / "monitoring.config").read_text()
    warmup = list(configs.read_warmup_requests(version_dir))
    assert warmup and warmup[0].predict_log.request.model_spec.name == "scans"
    assert len(warmup[0].predict_log.request.inputs["images"].string_val) == 2
    assert json.loads(open(os.path.join(version_dir, "assets.extra", "labels.json")).read())["classes"] == CLASS_NAMES


def test_batching_parameters_parse_tf_serving_text(tmp_path):
    text = ("# tuned for CPU\nmax_batch_size { value: 64 }\nbatch_timeout_micros { value: 500 }\n"
            "num_batch_threads { value: 4 }\nallowed_batch_sizes: 16\nallowed_batch_sizes: 64\n")
    params = configs.parse_batching_parameters(text)
    assert (params.max_batch_size, params.batch_timeout_micros, params.num_batch_threads) == (64, 500, 4)
    assert params.allowed_batch_sizes == (16, 64)
    assert configs.parse_batching_parameters(params.to_text()) == params


def test_cli_exports_a_trainer_keras_file_with_its_labels(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    make_tiny_model().save(str(job_dir / "model.keras"))
    (job_dir / "labels.json").write_text(json.dumps({"classes": CLASS_NAMES, "source": "folders"}))

    assert export.main(["--model", str(job_dir), "--export_base", str(tmp_path / "export")]) == 0

    (version,) = export.existing_versions(str(tmp_path / "export" / "archive_vision"))
    loaded = tf.saved_model.load(str(tmp_path / "export" / "archive_vision" / str(version)))
    names = loaded.signatures["serving_default"](images=tf.constant(sample_images()[:2]))["class_names"]
    assert set(n.decode() for n in names.numpy()) <= set(CLASS_NAMES)


def test_cli_labels_flag_names_the_classes_and_is_the_versions_label_map(tmp_path, capsys):
    """--labels stands in for the labels.json beside the model: the class names and the asset both come from it; a
    missing one is an error, not a silent fall back to the file beside the model."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    make_tiny_model().save(str(job_dir / "model.keras"))
    (job_dir / "labels.json").write_text(json.dumps({"classes": CLASS_NAMES}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"classes": ["letter", "portrait", "plan"]}))
    assert export.main(["--model", str(job_dir), "--export_base", str(tmp_path / "export"), "--labels", str(other),
                        "--version", "1"]) == 0
    version = tmp_path / "export" / "archive_vision" / "1"
    carried = json.loads((version / "assets.extra" / "labels.json").read_text())
    assert carried["classes"] == ["letter", "portrait", "plan"]
    names = tf.saved_model.load(str(version)).signatures["serving_default"](
        images=tf.constant(sample_images()[:3]))["class_names"]
    assert set(n.decode() for n in names.numpy()) <= {"letter", "portrait", "plan"}
    assert export.main(["--model", str(job_dir), "--export_base", str(tmp_path / "export"), "--labels",
                        str(tmp_path / "missing.json")]) == 2
    assert f"labels file {tmp_path / 'missing.json'} does not exist" in capsys.readouterr().err


def test_model_without_contract_outputs_is_refused(tmp_path):
    import keras

    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    model = keras.Model(pixels, {"logits": keras.layers.Dense(2)(keras.layers.Flatten()(pixels))})
    with pytest.raises(ExportError, match="neither"):
        export.export_model(model, str(tmp_path), class_names=None, image_size=IMAGE_SIZE)


PYTHON_CALLBACK_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def saved_graph_ops(saved_model) -> set[str]:
    """Every op type in a SavedModel proto: each MetaGraphDef's graph nodes and every function of its library.

    A node whose op is the name of a library function (a direct function call) is a call, not an op: left out.
    """
    ops = set()
    for meta_graph in saved_model.meta_graphs:
        library = meta_graph.graph_def.library
        function_names = {f.signature.name for f in library.function}
        ops |= {n.op for n in meta_graph.graph_def.node}
        for function in library.function:
            ops |= {n.op for n in function.node_def}
        ops -= function_names
    return ops


def non_standard_ops(ops: set[str]) -> list[str]:
    """Ops TF Serving's stock server could not run: Python callbacks, or types TensorFlow itself does not register."""
    from tensorflow.python.framework import op_def_registry

    return sorted(op for op in ops if op in PYTHON_CALLBACK_OPS
                  or op_def_registry.get(op) is None or not hasattr(tf.raw_ops, op))


def read_saved_model(directory: str):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    return saved


def test_exported_graph_has_only_standard_tf_ops(tmp_path):
    # README (Export): the whole answer runs inside the graph (decoding, letterboxing, turned copies, the text-crop
    # classifier rebuilt from ONNX, fusion, decision) with "only standard TF ops", so a stock
    # tensorflow_model_server (no Python, no custom op libraries) can load every version we write.
    settings = {"tta": True, "tta_below": 0.9, "readers": ["text_crops"],
                "text_crops": {"weight": 0.7, "below": 0.8, "agree": 4, "sure": 0.8}}
    version_dir = export.export_model(make_tiny_model(), str(tmp_path), class_names=CLASS_NAMES,
                                      image_size=IMAGE_SIZE, score_settings=settings)
    saved = read_saved_model(version_dir)
    ops = saved_graph_ops(saved)

    # the walk reached the signatures' functions: decoding (JPEGs DCT-scaled), both nets, the gates'
    # gather/scatter, the ink's median, the decision
    assert {"DecodeImage", "DecodeJpeg", "ExtractJpegShape", "Conv2D", "DepthwiseConv2dNative", "ParseExampleV2",
            "TensorScatterUpdate", "GatherV2", "NthElement"} <= ops
    assert non_standard_ops(ops) == []


def test_standard_op_check_catches_python_callbacks_and_unregistered_ops(tmp_path):
    # the check above must be able to fail: a graph calling back into Python, or an op TF does not know
    module = tf.Module()
    module.serve = tf.function(lambda x: tf.numpy_function(lambda v: v * 2, [x], tf.float32),
                               input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "py"), signatures=module.serve.get_concrete_function())
    saved = read_saved_model(str(tmp_path / "py"))
    assert non_standard_ops(saved_graph_ops(saved)) == ["PyFunc"]

    saved.meta_graphs[0].graph_def.library.function[0].node_def.add(name="custom", op="ArchiveVisionCustomOp")
    assert non_standard_ops(saved_graph_ops(saved)) == ["ArchiveVisionCustomOp", "PyFunc"]
