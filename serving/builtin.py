"""The built-in orientation model as a servable version: exported once (in the launcher) and reused.

score and the demo call this when no model is named; it is the one place outside `trainer/` that knows how the
shipped default model is built, so Beam code never imports the trainer: workers only load the SavedModel.
"""
from __future__ import annotations


def builtin_model_dir() -> str:
    """The shipped default orientation model as a SavedModel version dir (trainer.default_model.default_export_dir:
    exported on first use into $ARCHIVE_VISION_CACHE, keyed by the weights and the export format)."""
    from trainer.default_model import default_export_dir

    return default_export_dir()
