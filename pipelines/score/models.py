"""Which model a score run asks, and with which recorded policy: an export on disk or gs://, a served version, or
the built-in model (exported once, in the launcher, and staged where the workers can read it)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, PortableOptions, StandardOptions

from pipelines.score.options import BUILTIN_MODEL, ModelInfo, ScoreOptions
from serving import policy as policies
from serving.export import EXPORT_METADATA
from serving.model_files import is_remote, resolve_version_dir
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


# Runners whose workers run on this machine (or in this process) and so can read the launcher's cache.
LOCAL_RUNNERS = ("directrunner", "direct", "bundlebaseddirectrunner", "switchingdirectrunner", "interactiverunner",
                 "prismrunner", "prism")
STAGED_BUILTIN = "archive_vision_builtin_model"  # <temp_location or --output>/<this>/<weights-format>/<model>/1


def workers_see_this_machine(options: Optional[PipelineOptions]) -> bool:
    """Whether the job's workers read this machine's files: a direct runner, or a portable one in LOOPBACK mode
    (the SDK workers run inside the launcher). Dataflow, Flink and Spark workers are other machines."""
    options = options or PipelineOptions([])
    runner = options.view_as(StandardOptions).runner
    name = (runner if isinstance(runner, str) else type(runner).__name__ if runner else "DirectRunner")
    if name.rsplit(".", 1)[-1].lower() in LOCAL_RUNNERS:
        return True
    return (options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"


def staging_root(options: Optional[PipelineOptions], output: str) -> str:
    """Where the launcher puts what the workers must read: Beam's --temp_location (gs:// on Dataflow), else the
    job's --output (which the workers write, so they can reach it)."""
    temp = (options or PipelineOptions([])).view_as(GoogleCloudOptions).temp_location
    return (temp or output).rstrip("/")


def builtin_model_dir(options: Optional[PipelineOptions] = None, output: str = "") -> str:
    """The shipped default orientation model as a SavedModel version dir the job's workers can read.

    It is exported once per launcher machine (serving.builtin, into $ARCHIVE_VISION_CACHE): building it takes the
    trainer's code, which workers never import. Workers on this machine load that export; workers elsewhere (see
    workers_see_this_machine) load a copy the launcher staged under staging_root, keyed by the shipped weights and
    the export format, so later runs reuse it. A gs:// copy is then copied into each worker's own cache before
    TensorFlow loads it (serving.model_files.local_copy)."""
    from serving.builtin import builtin_model_dir as export_once

    local = export_once()
    if workers_see_this_machine(options) or not staging_root(options, output):
        return local
    from serving.model_files import SAVED_MODEL, upload_tree

    model_dir = os.path.dirname(local)
    key = os.path.basename(os.path.dirname(model_dir))  # <weights digest>-v<export format>
    target = "/".join([staging_root(options, output), STAGED_BUILTIN, key, os.path.basename(model_dir),
                       os.path.basename(local)])
    if not FileSystems.exists(FileSystems.join(target, SAVED_MODEL)):  # written last: there means whole
        upload_tree(local, target, last=(SAVED_MODEL,))
    return target


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
                     version_dir=version_dir if is_remote(version_dir) else os.path.abspath(version_dir),
                     policy=policy, policy_from=where)


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
