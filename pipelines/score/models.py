"""Which model a score run asks, and with which recorded policy: an export on disk (or gs://), a served version, or
the built-in model (exported once, in the launcher)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

from apache_beam.io.filesystems import FileSystems

from pipelines.score.options import BUILTIN_MODEL, ModelInfo, ScoreOptions
from serving import policy as policies
from serving.export import EXPORT_METADATA, resolve_version_dir
from serving.policy import ScorePolicy


def uses_builtin_model(endpoint: str, model: str) -> bool:
    """Whether the job scores with the shipped default orientation model (no --endpoint, --model empty/default)."""
    return not endpoint and model in ("", BUILTIN_MODEL)


class ScorePolicyError(ValueError):
    """An export's recorded policy exists but cannot be read."""


def export_metadata(version_dir: str) -> Dict[str, Any]:
    """serving.export's metadata file of a version dir (local or gs://), {} when it has none."""
    path = FileSystems.join(version_dir, "assets.extra", EXPORT_METADATA)
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def recorded_policy(metadata: Dict[str, Any], where: str) -> Tuple[ScorePolicy, str]:
    """(the policy an export's metadata records, where from): its `score_policy` (what the graph computes, exports
    since the whole answer moved into the graph), else the decision part of its older `score_settings`, else the
    generic defaults ("" as where from). Raises ScorePolicyError when a recorded policy cannot be read: scoring on
    without it would quietly use other thresholds than the model's."""
    try:
        if metadata.get("score_policy"):
            return ScorePolicy.from_dict(metadata["score_policy"]), where
        if metadata.get("score_settings"):
            image_size = int(metadata.get("image_size") or 224)
            return policies.policy_from_settings(metadata["score_settings"], image_size), where
    except (TypeError, ValueError, KeyError) as e:
        raise ScorePolicyError(f"{where}: its recorded score policy cannot be read ({type(e).__name__}: {e})") from e
    return ScorePolicy(), ""


def builtin_model_dir() -> str:
    """The shipped default orientation model as a SavedModel version dir (exported on first use, then reused). The
    export runs in the launcher: workers only load the SavedModel."""
    from serving.builtin import builtin_model_dir as export_once

    return export_once()


def local_model_info(path: str) -> ModelInfo:
    """Name, version, class names and policy of an exported version, from serving.export's metadata file."""
    version_dir = resolve_version_dir(path)
    try:
        meta = export_metadata(version_dir)
    except (OSError, ValueError) as e:
        raise ScorePolicyError(f"{version_dir}: its export metadata cannot be read ({type(e).__name__}: {e})") from e
    name = meta.get("model_name") or os.path.basename(os.path.dirname(version_dir))
    version = int(meta.get("version") or os.path.basename(version_dir))
    policy, where = recorded_policy(meta, version_dir)
    return ModelInfo(name=name, version=version, class_names=tuple(meta.get("class_names") or ()),
                     version_dir=os.path.abspath(version_dir), policy=policy, policy_from=where)


def remote_model_info(opts: ScoreOptions) -> ModelInfo:
    """Wait for the served model, then ask it which version answers and with which policy (its `score_policy`
    signature): the served version's own, so an endpoint needs no other flag."""
    from serving.client import GrpcModelServerClient

    with GrpcModelServerClient(opts.endpoint, opts.model_name, timeout_s=opts.timeout_s,
                               max_attempts=opts.max_attempts) as client:
        client.wait_until_available(opts.wait_s)
        version = int(client.metadata()["version"])
        pinned = GrpcModelServerClient(opts.endpoint, opts.model_name, version=version, timeout_s=opts.timeout_s,
                                       max_attempts=opts.max_attempts)
        with pinned:
            text = pinned.score_policy()
    where = f"{opts.model_name} v{version} at {opts.endpoint}"
    try:
        policy = ScorePolicy.from_json(text) if text else ScorePolicy()
    except (TypeError, ValueError, KeyError) as e:
        raise ScorePolicyError(f"{where}: its score policy cannot be read ({type(e).__name__}: {e})") from e
    return ModelInfo(name=opts.model_name, version=version, class_names=_class_names_file(opts.labels),
                     endpoint=opts.endpoint, policy=policy, policy_from=where if text else "")


def _class_names_file(path: str) -> Tuple[str, ...]:
    if not path:
        return ()
    with FileSystems.open(path) as handle:
        data = json.loads(handle.read())
    return tuple(data["classes"] if isinstance(data, dict) else data)
