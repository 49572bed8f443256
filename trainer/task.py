"""`archive-vision train` / `python -m trainer.task`: train the heads (and optionally fine-tune), evaluate, export.

Job dir layout (the chief's; other workers of a cluster write under JOB/workers/<type>-<index>/):
  training_config.json  resolved config + replicas      labels.json       copy of the archive's label map
  backup/<phase>/       BackupAndRestore state           checkpoints/      best_<phase>.weights.h5, phase markers
  tensorboard/<phase>/  TensorBoard logs                 history_<phase>.csv   per-epoch metrics
  feature_cache/        with --cache-features (disk)     eval/             metrics JSON, PNGs, misclassified
  export/<model>/<version>/  the SavedModel (serving.export)   run_summary.json
  model.keras           the trained model as exported: `archive-vision export --model JOB_DIR` exports it again
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("trainer")

PHASE_HEADS = "heads"
PHASE_FINE_TUNE = "fine_tune"


def _progress_callback_class():
    import keras

    class EpochProgress(keras.callbacks.Callback):
        """One line per epoch on stdout (placed after BackupAndRestore, so a printed epoch is backed up)."""

        def __init__(self, phase: str, epochs: int, tasks: Sequence[str], prefix: str = ""):
            super().__init__()
            self.phase, self.epochs, self.tasks, self.prefix = phase, epochs, tuple(tasks), prefix
            self._started = 0.0

        def on_train_begin(self, logs=None):
            start = getattr(self.model, "_initial_epoch", None) or 0
            if start:
                print(f"{self.prefix}[{self.phase}] resuming from backup at epoch {start + 1}/{self.epochs}",
                      flush=True)

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"{k}={float(v):.4f}" for k, v in sorted(logs.items()) if isinstance(v, (int, float))
                     or hasattr(v, "__float__")]
            print(f"{self.prefix}[{self.phase}] epoch {epoch + 1}/{self.epochs} " + " ".join(parts)
                  + f" ({time.time() - self._started:.1f}s)", flush=True)

    return EpochProgress


def _stop_at_accuracy_class():
    import keras

    from trainer.model import mean_accuracy

    class StopAtAccuracy(keras.callbacks.Callback):
        """Stop once the mean accuracy of the active heads (val when present) reaches the threshold."""

        def __init__(self, threshold: float, tasks: Sequence[str], validation: bool):
            super().__init__()
            self.threshold, self.tasks, self.validation = threshold, tuple(tasks), validation

        def on_epoch_end(self, epoch, logs=None):
            accuracy = mean_accuracy(logs or {}, self.tasks, self.validation)
            if accuracy is not None and accuracy >= self.threshold:
                print(f"[stop] accuracy {accuracy:.4f} >= {self.threshold}: stopping after epoch {epoch + 1}",
                      flush=True)
                self.model.stop_training = True

    return StopAtAccuracy


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _callbacks(cfg, phase: str, epochs: int, private_dir: str, has_val: bool, prefix: str) -> List[Any]:
    import keras

    monitor = "val_loss" if has_val else "loss"
    callbacks: List[Any] = [
        # First, so that every later callback (and the progress line) runs after the epoch is backed up.
        keras.callbacks.BackupAndRestore(os.path.join(private_dir, "backup", phase)),
        keras.callbacks.ModelCheckpoint(os.path.join(private_dir, "checkpoints", f"best_{phase}.weights.h5"),
                                        monitor=monitor, save_best_only=True, save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(private_dir, f"history_{phase}.csv"), append=True),
    ]
    if _tensorboard_installed():
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(private_dir, "tensorboard", phase),
                                                     write_graph=False, profile_batch=0))
    else:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    if cfg.early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.early_stopping_patience))
    if cfg.stop_at_accuracy is not None:
        callbacks.append(_stop_at_accuracy_class()(cfg.stop_at_accuracy, cfg.tasks, has_val))
    callbacks.append(_progress_callback_class()(phase, epochs, cfg.tasks, prefix))
    return callbacks


def read_history(private_dir: str) -> List[Dict[str, float]]:
    """Per-epoch metrics of all phases in order, epochs numbered 1.. across phases."""
    import tensorflow as tf

    rows: List[Dict[str, float]] = []
    for phase in (PHASE_HEADS, PHASE_FINE_TUNE):
        path = os.path.join(private_dir, f"history_{phase}.csv")
        if not tf.io.gfile.exists(path):
            continue
        with tf.io.gfile.GFile(path) as f:
            for row in csv.DictReader(f):
                if row.get("epoch") in (None, "", "epoch"):
                    continue
                clean: Dict[str, Any] = {"phase": phase}
                for k, v in row.items():
                    try:
                        clean[k] = float(v)
                    except (TypeError, ValueError):
                        pass
                clean["epoch"] = len(rows) + 1
                rows.append(clean)
    return rows


def _marker(private_dir: str, phase: str) -> str:
    return os.path.join(private_dir, "checkpoints", f"{phase}.done")


def _run_phase(fit_model, cfg, phase: str, epochs: int, train_ds, steps: int, val_ds, val_steps,
               private_dir: str, prefix: str) -> None:
    """fit() one phase with backup/restore, then keep its best weights (by val loss, or train loss)."""
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.join(private_dir, "checkpoints"))
    callbacks = _callbacks(cfg, phase, epochs, private_dir, val_ds is not None, prefix)
    fit_model.fit(train_ds, epochs=epochs, steps_per_epoch=steps, validation_data=val_ds,
                  validation_steps=val_steps, callbacks=callbacks, verbose=cfg.verbose)
    best = os.path.join(private_dir, "checkpoints", f"best_{phase}.weights.h5")
    if tf.io.gfile.exists(best):
        fit_model.load_weights(best)


def _check_orientation_labels(cfg, heads, full_model, caches: Dict[str, Any], private_dir: str, prefix: str,
                              role_is_chief: bool = True):
    """trainer.orientation_check on the train, val and test records, with the head as initialised (the shipped
    one): from the feature caches where there are any, else from one pass of the full model over the records'
    turns. Writes JOB/orientation_check.json (for people; on the chief also orientation_check.html, the records
    trained as turned as pictures) and .npz (every record: a restarted job reuses it when the records are the
    same, so its later phases train on the same labels) and prints what it found."""
    from trainer import evaluate
    from trainer import input as train_input
    from trainer import orientation_check
    from trainer.default_model import head_metadata, init_weights

    started = time.time()
    layouts = {split: train_input.record_layout(cfg.data, split, cfg) for split in ("train", "val", "test")
               if train_input.list_shards(cfg.data, split)}
    # A restarted job (e.g. into its fine-tuning phase, with no feature cache built this time) reuses its check.
    saved = orientation_check.load_matching(orientation_check.check_path(private_dir, ".npz"), layouts)
    if saved is not None:
        print(f"{prefix}[check] {saved.summary()} (reused from this job's earlier run)", flush=True)
        return saved
    answers = {}
    for split in layouts:
        cache = caches.get(split)
        if cache is not None:
            answers[split] = orientation_check.head_answers(heads, orientation_check.cache_batches(cache.features),
                                                            train_input.ORIENTATION_OUTPUT)
        else:
            answers[split] = evaluate.predict_split(full_model, cfg, split)[train_input.ORIENTATION_OUTPUT]
    result = orientation_check.check(answers, layouts, float(head_metadata(init_weights(cfg.init))["temperature"]))
    orientation_check.save(result, orientation_check.check_path(private_dir, ".npz"))
    written = [result.write(orientation_check.check_path(private_dir))]
    if role_is_chief:  # and a contact sheet of what it found (the other workers' dirs are scratch)
        try:
            written.append(orientation_check.write_html(result, cfg.data,
                                                        orientation_check.check_path(private_dir, ".html")))
        except Exception as e:  # noqa: BLE001 - pictures for people: never worth stopping the training for
            log.warning("orientation_check.html not written: %s: %s", type(e).__name__, e)
    print(f"{prefix}[check] {result.summary()} ({time.time() - started:.1f}s; {', '.join(written)})", flush=True)
    return result


def _calibrate_orientation(plain_model, plain_heads, cfg, corrections, answered=frozenset()
                           ) -> Tuple[Optional[float], Optional[Dict], Dict[str, Any]]:
    """Fit the orientation head's temperature on every turn of the val records (with the labels training used)
    and fold it into the head (trainer.calibration). `answered`: the record keys a person answered (train
    --corrections), left out of the fit: the answers are the review queue's hardest pages, not a sample of the
    archive (calibration.fit_unanswered). With too few val records left for a fit (MIN_RECORDS), or a fit that runs
    to the end of the range (a val split the head gets all right says only "more confident", never how much): the
    initial head's temperature under --init default (or PATH), else none. Returns the temperature folded in, val's
    predictions (evaluate.predict_split) at that temperature when they were made, for evaluation to reuse, and what
    calibrated the head (run_summary's orientation_calibration)."""
    from trainer import calibration, evaluate
    from trainer import input as train_input

    head = plain_heads.get_layer(train_input.ORIENTATION_OUTPUT)

    def fall_back(why: str, fit: Optional[calibration.Fit] = None):
        said = {"temperature": None, "source": "none", "why": why, **({"fit": fit.summary()} if fit else {})}
        if cfg.init == "none":
            print(f"[calibrate] {why}: the orientation head is not calibrated", flush=True)
            return None, None, said
        from trainer.default_model import head_metadata, init_weights

        shipped = float(head_metadata(init_weights(cfg.init))["temperature"])
        calibration.fold_temperature(head, shipped)
        print(f"[calibrate] {why}: the initial head's temperature {shipped:.2f} is folded in", flush=True)
        return shipped, None, dict(said, temperature=shipped, source="the initial head's (--init)")

    records = train_input.count_split(cfg.data, "val", cfg).orientation_records \
        if train_input.list_shards(cfg.data, "val") else 0
    if records < calibration.MIN_RECORDS:
        return fall_back(f"{records} val records have an orientation, a temperature needs {calibration.MIN_RECORDS}")
    pred = evaluate.predict_split(plain_model, cfg, "val", corrections=corrections)
    keys = [train_input.record_key(uri.decode("utf-8", "replace"), page)
            for uri, page in zip(pred["source_uri"], pred["page"])]
    fit = calibration.fit_unanswered(pred[train_input.ORIENTATION_OUTPUT], pred["orientation_label"],
                                     pred["orientation_weight"], keys, answered)
    if fit.temperature is None:
        return fall_back(fit.why_not, fit)
    temperature = fit.temperature
    calibration.fold_temperature(head, temperature)
    left_out = (f"; {fit.answered_left_out} val records a person answered left out of the fit"
                if fit.answered_left_out else "")
    print(f"[calibrate] orientation temperature {temperature:.2f} fitted on {fit.examples} val examples "
          f"(negative log-likelihood {fit.nll_before:.3f} -> {fit.nll_after:.3f}){left_out}; folded into the "
          f"exported head", flush=True)
    # What the folded head now answers on val (argmax unchanged), so evaluation need not run val again.
    pred[train_input.ORIENTATION_OUTPUT] = calibration.with_temperature(pred[train_input.ORIENTATION_OUTPUT],
                                                                        temperature).astype(np.float32)
    return temperature, pred, {"temperature": temperature, "why": "",
                               "source": "fitted on the val records no one answered" if answered
                               else "fitted on the val records", "fit": fit.summary()}


def _relabelled(cache, check, split: str):
    """A feature cache with the orientation check's labels and weights (a new FeatureCache; the disk is unchanged)."""
    import dataclasses

    labels = dict(cache.labels)
    labels["orientation_label"], labels["orientation_weight"] = check.relabel_rows(
        split, cache.labels["orientation_label"], cache.labels["orientation_weight"])
    return dataclasses.replace(cache, labels=labels)


def score_settings(cfg) -> Optional[Dict[str, Any]]:
    """How `archive-vision score` should score this job's export unless told otherwise (recorded in it, see
    serving.export). A head tuned from the default model (--init default) is scored as the default model is: its
    input, test-time turns, thresholds and the text readers' gates and weights (chosen on the default's val; the
    tuned head is calibrated on the archive's val, so its probabilities mean what the gates assume). Any other model
    gets the ingest settings of the shards it learnt from (size, resize mode, JPEG quality), so score sends it the
    same pixels; None when the shards' ingest run is unknown."""
    from trainer import input as train_input

    if cfg.init != "none":
        from trainer.default_model import init_weights
        from trainer.default_model import score_settings as default_settings

        return dict(default_settings(cfg.image_size, init_weights(cfg.init)),
                    origin="the default orientation model's, which this head was tuned from (its val chose them; "
                           "the cost gates and the crop rule research.gates on held-out sources)")
    options = train_input.ingest_options(cfg.data)
    if not options.get("size"):
        return None
    # An orientation head is scored with test-time turns (the exported graph averages the four copies): a turn
    # the head reads from a cue that turns with the image is then read the same way from every copy.
    settings = {"origin": f"the ingest run that wrote {cfg.data}", "input_prep": "ingest",
                "size": int(options["size"]), "resize_mode": str(options.get("resize_mode") or "pad"),
                "tta": bool(cfg.uses_orientation)}
    if options.get("image_format", "jpeg") == "jpeg" and options.get("quality"):
        settings["quality"] = int(options["quality"])
    return settings


MODEL_FILE = "model.keras"  # the chief's trained model in the job dir, as exported


def _save_keras(model, path: str) -> str:
    """model.save to `path`, local or gs:// (Keras writes a local file; it is copied up, then replaced atomically
    where the file system can)."""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        model.save(local)
        tf.io.gfile.copy(local, path + ".tmp", overwrite=True)
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    return path


def train_and_export(cfg, strategy, role) -> Dict[str, Any]:
    """The whole job after the strategy exists: fit, evaluate and export (the last two on the chief only)."""
    import keras
    import tensorflow as tf

    from trainer import backbones, evaluate, features
    from trainer import input as train_input
    from trainer import model as model_lib
    from trainer import strategy as strategy_lib

    class_names = train_input.read_class_names(cfg.data)
    if cfg.uses_classes and len(class_names) < 2:
        raise train_input.DataError(f"{cfg.data}/labels.json names {len(class_names)} classes; the class head needs 2 or "
                         f"more (train an unlabelled archive with --tasks orientation)")
    num_classes = len(class_names) if cfg.uses_classes else 0
    # Before any model is built or trained: every active head must have labelled train records.
    train_size = train_input.check_task_labels(cfg, "train")
    answers = None
    if cfg.corrections:  # read and matched before anything is built: a table that cannot be used stops the job here
        from trainer import review

        answers = review.match_answers(cfg.corrections, cfg.data)
    if cfg.uses_orientation and train_size.orientation_records == 0:  # only reached with --init default
        print(f"[data] no train record in {cfg.data} has a known orientation: the orientation head is not tuned "
              f"on this archive and ships as the default model's head (--init default)", flush=True)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    private_dir = role.private_dir(cfg.job_dir)
    tf.io.gfile.makedirs(private_dir)
    prefix = "" if role.is_chief else f"({role.task_type}-{role.task_index}) "
    log.info("strategy: %s, global batch %d, role %s-%d", strategy_lib.describe(strategy), global_batch,
             role.task_type, role.task_index)
    facts = {"replicas": replicas, "global_batch": global_batch, "num_workers": role.num_workers,
             "strategy_class": type(strategy).__name__, "class_names": class_names}
    config_path = cfg.write(private_dir, facts)
    if role.is_chief and tf.io.gfile.exists(os.path.join(cfg.job_dir, MODEL_FILE)):
        # An earlier run's model must not be exported later beside this run's labels and config.
        tf.io.gfile.remove(os.path.join(cfg.job_dir, MODEL_FILE))
    labels_path = os.path.join(private_dir, "labels.json")
    with tf.io.gfile.GFile(labels_path, "w") as f:
        json.dump({"classes": class_names, "orientations": evaluate.ORIENTATION_NAMES}, f, indent=2)

    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        backbone = backbones.build_backbone(cfg.backbone, cfg.weights, cfg.image_size)
        full_model, heads = model_lib.build_model(
            backbone, num_classes, cfg.tasks, cfg.dropout, cfg.orientation_grid, cfg.orientation_hidden_units,
            name=cfg.model_name)
    log.info("backbone %s: feature map %s", cfg.backbone, tuple(backbone.output.shape[1:]))
    if cfg.init != "none":
        # The initial head's weights at temperature 1 (its folded calibration undone): the start of the
        # archive tuning. A resumed job then overwrites them from its backup or finished-phase weights.
        from trainer.default_model import init_weights, load_backbone_overrides, load_head_weights

        weights = init_weights(cfg.init)
        load_head_weights(heads.get_layer(model_lib.ORIENTATION_OUTPUT), weights, calibrated=False)
        replaced = load_backbone_overrides(backbone, weights)
        source = "the shipped default model" if cfg.init == "default" else cfg.init
        print(f"{prefix}[init] orientation head (and {replaced} fine-tuned backbone layers) from {source}",
              flush=True)

    heads_weights = os.path.join(private_dir, "checkpoints", "heads_final.weights.h5")
    heads_done = tf.io.gfile.exists(_marker(private_dir, PHASE_HEADS)) and tf.io.gfile.exists(heads_weights)
    caches: Dict[str, Any] = {}
    if cfg.epochs > 0 and not heads_done and cfg.cache_features:
        if cfg.augments_pixels:
            log.warning("--cache-features: flip/shift augmentation cannot be cached and is ignored")
        root = private_dir if cfg.cache_location == "disk" and "://" not in private_dir else None
        if cfg.cache_location == "disk" and root is None:
            log.info("--cache-location disk needs a local job dir; keeping the feature cache in memory")
        started = time.time()
        extract = features.make_extractor(backbone)
        caches = {split: features.compute_feature_cache(backbone, cfg, split, root, extract=extract)
                  for split in ("train", "val")}
        print(f"{prefix}[cache] features of {len(caches['train'])} train and "
              f"{len(caches['val']) if caches['val'] else 0} val examples in {time.time() - started:.1f}s",
              flush=True)
    # Before any tuning (and before a finished phase's weights are loaded): the shipped model reads the turns.
    check = _check_orientation_labels(cfg, heads, full_model, caches, private_dir, prefix, role.is_chief) \
        if cfg.checks_orientation_labels else None
    if answers is not None:  # a person's answers over the check's labels (or the stored ones)
        check = review.apply_answers(cfg, check, answers, private_dir, prefix)
    corrections = train_input.Corrections(check.table()) if check is not None else None

    if heads_done:
        print(f"{prefix}[{PHASE_HEADS}] already complete in this job dir; loading its weights", flush=True)
        heads.load_weights(heads_weights)
    elif cfg.epochs > 0:
        if cfg.cache_features:
            train_cache, val_cache = caches["train"], caches["val"]
            if check is not None:
                train_cache = _relabelled(train_cache, check, "train")
                val_cache = _relabelled(val_cache, check, "val") if val_cache is not None else None
            train_ds, steps = features.cache_dataset(train_cache, cfg, global_batch, training=True)
            val_ds, val_steps = (features.cache_dataset(val_cache, cfg, global_batch, training=False)
                                 if val_cache is not None and len(val_cache) else (None, None))
            fit_model = heads
        else:
            train_ds, steps, val_ds, val_steps = train_input.make_fit_datasets(cfg, global_batch, role.num_workers,
                                                                               train_size, corrections)
            fit_model = full_model
        with strategy.scope():
            model_lib.compile_for_tasks(fit_model, cfg.tasks, cfg.learning_rate,
                                        steps_per_execution=min(steps, 32) if cfg.cache_features else 1)
        strategy_lib.prepare_model_for_strategy(fit_model, strategy)
        _run_phase(fit_model, cfg, PHASE_HEADS, cfg.epochs, train_ds, steps, val_ds, val_steps, private_dir,
                   prefix)
        heads.save_weights(heads_weights)
        with tf.io.gfile.GFile(_marker(private_dir, PHASE_HEADS), "w") as f:
            f.write("done\n")

    if cfg.fine_tune_layers > 0 and cfg.fine_tune_epochs > 0:
        with strategy.scope():
            unfrozen = backbones.unfreeze_top_layers(backbone, cfg.fine_tune_layers)
            model_lib.compile_for_tasks(full_model, cfg.tasks, cfg.fine_tune_learning_rate)
        strategy_lib.prepare_model_for_strategy(full_model, strategy)
        print(f"{prefix}[{PHASE_FINE_TUNE}] {unfrozen} backbone layers trainable, "
              f"learning rate {cfg.fine_tune_learning_rate}", flush=True)
        train_ds, steps, val_ds, val_steps = train_input.make_fit_datasets(cfg, global_batch, role.num_workers,
                                                                           train_size, corrections)
        _run_phase(full_model, cfg, PHASE_FINE_TUNE, cfg.fine_tune_epochs, train_ds, steps, val_ds, val_steps,
                   private_dir, prefix)

    # Copy the trained values into a plain model built outside the strategy: evaluation and export then
    # involve no distributed variables and no collective ops, so only the chief needs to do them.
    trained = full_model.get_weights()
    summary: Dict[str, Any] = {"job_dir": cfg.job_dir, "is_chief": role.is_chief, "replicas": replicas,
                               "history": read_history(private_dir)}
    if not role.is_chief:
        print(f"{prefix}training done; evaluation and export are left to the chief", flush=True)
        return summary
    plain_backbone = backbones.build_backbone(cfg.backbone, "none", cfg.image_size)
    plain_model, plain_heads = model_lib.build_model(plain_backbone, num_classes, cfg.tasks, cfg.dropout,
                                                     cfg.orientation_grid, cfg.orientation_hidden_units,
                                                     name=cfg.model_name)
    plain_model.set_weights(trained)
    predictions: Dict[str, Dict] = {}  # split -> evaluate.predict_split of the model as exported, when made
    if cfg.uses_orientation:  # None: exported as trained (not calibrated)
        answered = frozenset(key for key, (_, weight) in answers.by_key.items() if weight > 0) if answers else ()
        summary["orientation_temperature"], val_pred, summary["orientation_calibration"] = (
            _calibrate_orientation(plain_model, plain_heads, cfg, corrections, answered) if cfg.calibrate
            else (None, None, {"temperature": None, "source": "none", "why": "--calibrate false"}))
        if val_pred is not None:
            predictions["val"] = val_pred
        if answers is not None:  # the person's answers and what calibrated the head they tuned, side by side
            review.record_calibration(private_dir, summary["orientation_calibration"])

    eval_dir = os.path.join(cfg.job_dir, "eval")
    if cfg.evaluate:
        summary["eval"] = {}
        for split in ("val", "test"):
            report = evaluate.evaluate_split(plain_model, cfg, split, class_names, eval_dir, corrections,
                                             pred=predictions.get(split))
            if report is not None:
                summary["eval"][split] = {task: report[task]["accuracy"] for task in ("classes", "orientation")
                                          if task in report}
                print(f"[eval] {split}: " + " ".join(f"{k}_accuracy={v:.4f}" for k, v in
                                                     summary["eval"][split].items() if v is not None)
                      + ((" (orientation against the labels the check made" if cfg.checks_orientation_labels
                          else " (orientation against the stored labels")
                         + (" and a person's answers)" if answers is not None else ")")
                         if corrections is not None else ""),
                      flush=True)
        evaluate.draw_training_curves(summary["history"], os.path.join(eval_dir, "training_curves.png"))

    # The trained model as exported (calibration folded in), beside labels.json and run_summary.json: what
    # `archive-vision export --model JOB_DIR` exports again later (another export base, a job run with --export false).
    try:
        summary["model_file"] = _save_keras(plain_model, os.path.join(cfg.job_dir, MODEL_FILE))
    except Exception as e:  # the export below does not need it: said, not fatal to a finished training
        summary["model_file"], summary["model_file_error"] = None, f"{type(e).__name__}: {e}"
        print(f"[save] {MODEL_FILE} not written ({summary['model_file_error']}); the job goes on", flush=True)
    summary["score_settings"] = score_settings(cfg)
    summary["export_dir"] = None
    if cfg.export:
        try:
            from serving import export as serving_export
        except ImportError as e:
            print(f"[export] skipped: serving.export is not available ({e})", flush=True)
        else:
            # export_model takes file contents (name -> text), so the version carries the files themselves.
            assets = {}
            for name, path in (("training_config.json", config_path), ("labels.json", labels_path)):
                with tf.io.gfile.GFile(path) as f:
                    assets[name] = f.read()
            # A gs:// job dir's export is written locally and copied up (serving.export.export_to).
            summary["export_dir"] = serving_export.export_to(
                os.path.join(cfg.job_dir, "export"), cfg.model_name, None,
                lambda base, version: serving_export.export_model(
                    plain_model, base, model_name=cfg.model_name, class_names=class_names or None,
                    image_size=cfg.image_size, version=version, extra_assets=assets,
                    score_settings=summary["score_settings"]))
            print(f"[export] {summary['export_dir']}", flush=True)
    with tf.io.gfile.GFile(os.path.join(cfg.job_dir, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """Parse flags, pick the strategy (before any other TF op), train, evaluate, export."""
    from trainer.config import config_from_args

    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        print(f"archive-vision train: {e}", file=sys.stderr)
        return 2
    from pipelines.cli import configure_logging

    configure_logging(argv if argv is not None else sys.argv[1:])
    import tensorflow as tf

    if cfg.threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
            tf.config.threading.set_inter_op_parallelism_threads(cfg.threads)
        except RuntimeError:  # TF already initialised in this process (e.g. main() called twice)
            log.warning("--threads ignored: TensorFlow is already initialised in this process")
    from trainer import strategy as strategy_lib
    from pipelines.corrections import CorrectionsError
    from trainer.input import DataError

    if cfg.require_gpus > 0:
        try:
            visible = strategy_lib.check_required_gpus(cfg.require_gpus)
        except strategy_lib.MissingGpuError as e:
            print(f"archive-vision train: {e}", file=sys.stderr)
            return 2
        log.info("GPUs visible: %d (--require-gpus %d)", visible, cfg.require_gpus)
    strategy = strategy_lib.make_strategy(cfg.strategy)
    role = strategy_lib.worker_role()
    try:
        train_and_export(cfg, strategy, role)
    except (DataError, CorrectionsError) as e:
        log.debug("usage error", exc_info=True)
        print(f"archive-vision train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
