"""The built-in orientation model as a servable version: exported once (in the launcher) and reused.

score and the demo call this when no model is named, and `archive-vision export --model default` writes it; it is the
one place that turns trainer.default_model's shipped weights into an export, so the trainer never imports serving
and Beam code never imports the trainer: workers only load the SavedModel. Workers on other machines (Dataflow, Flink)
load a copy score's launcher staged where they can read it (pipelines.score.models.builtin_model_dir).
"""
from __future__ import annotations

import fcntl
import os
from typing import Optional

from serving.export import EXPORT_FORMAT, export_default_model
from serving.model_files import cache_root


def default_cache_dir() -> str:
    """Where exports of the default model are kept: $ARCHIVE_VISION_CACHE or ~/.cache/archive_vision."""
    return os.path.join(cache_root(), "default_orientation")


def builtin_model_dir(cache_dir: Optional[str] = None) -> str:
    """The default model as a TF Serving SavedModel version dir, exported once per shipped weights file.

    The export base is keyed by the weights' hash and the export format, so a package upgrade (or a new export
    format) exports afresh and an existing export is reused as is (score and TF Serving then load it like any
    other exported model).
    """
    from trainer.default_model import DEFAULT_MODEL_NAME, HEAD_WEIGHTS, weights_digest

    base = os.path.join(cache_dir or default_cache_dir(), f"{weights_digest(HEAD_WEIGHTS)}-v{EXPORT_FORMAT}")
    version_dir = os.path.join(base, DEFAULT_MODEL_NAME, "1")
    if os.path.exists(os.path.join(version_dir, "saved_model.pb")):
        return version_dir
    # Several processes on one machine (Beam workers, parallel test runs, two scores at once) may all find it
    # missing: one exports while the others wait on the lock, then find it there.
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(os.path.join(version_dir, "saved_model.pb")):
                return version_dir
            return export_default_model(base, DEFAULT_MODEL_NAME, version=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
