"""`archive-vision publish`: validate a new SavedModel version, then copy it where the servers look.

Like TFX's InfraValidator + Pusher. Before a byte reaches the servers' base path, the version is

1. checked on disk: saved_model.pb with `serving_default` (input `images`, the answer outputs serving.policy
   names) and `score_policy`, its warmup records, and its recorded canary answers (serving.export writes them);
2. loaded in the project's local server (`python -m serving.server`, a subprocess on 127.0.0.1) until AVAILABLE;
3. asked for its signatures and its recorded policy (which must parse as serving.policy.ScorePolicy), sent its
   warmup records (assets.extra/tf_serving_warmup_requests) one by one, and asked for its answers on the canary
   set: they must match the answers the export recorded (probabilities within 1e-5, the same decisions). Images
   given with --canary are checked against the version's answers in this process (served == in-process).

Only then is the version copied to BASE_PATH/<version> (a local folder or gs://): locally under a hidden
temporary name renamed last, on gs:// every other file first and saved_model.pb last, so a polling TF Serving
never loads half a version. A refused version is reported with its reasons and exit code 3; nothing is copied.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipelines.cli import EXIT_OK, EXIT_USAGE, command_parser, configure_logging
from serving import configs
from serving import policy as P

log = logging.getLogger(__name__)

EXIT_REFUSED = 3  # the version failed validation; nothing was copied
TOLERANCE = 1e-5  # largest probability difference accepted between the served and the recorded answers
PREDICT_SIGNATURE = "serving_default"  # serving.export's names, repeated so `--help` needs no TensorFlow
IMAGES_INPUT = "images"
EXPORT_METADATA = "archive_vision_export.json"
CANARY_DIR = "canary"
CANARY_ANSWERS = "canary_answers.json"
# What every answer of serving_default carries (serving.answer), with and without an orientation head.
ANSWER_OUTPUTS = (P.DECISION,)
ORIENTATION_OUTPUTS = (P.ORIENTATION_PROBABILITIES, P.ORIENTATION_DEGREES, P.IMAGE_ORIENTATION_PROBABILITIES,
                       P.TTA_AGREEMENT, P.TEXT_CROPS, P.INK)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


class Refused(Exception):
    """The version failed a check; the message says which and why."""


class UsageError(Exception):
    """Bad flags or setup (exit 2)."""


# --- checks on disk --------------------------------------------------------------------------------------------

def read_signatures(version_dir: str) -> Dict[str, Any]:
    """The signature defs of saved_model.pb (serving.client.describe_signature_defs' shape)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from serving.client import describe_signature_defs

    saved = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
            saved.ParseFromString(f.read())
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: the version is bad
        raise Refused(f"saved_model.pb cannot be read: {error}") from None
    if not saved.meta_graphs:
        raise Refused("saved_model.pb holds no meta graph")
    defs = {k: v for k, v in saved.meta_graphs[0].signature_def.items() if not k.startswith("__")}
    return describe_signature_defs(defs)


def signature_problems(signatures: Dict[str, Any], where: str) -> List[str]:
    """Why `signatures` (name -> {inputs, outputs, ...}) cannot serve archive-vision's clients (empty: they can)."""
    problems = []
    default = signatures.get(PREDICT_SIGNATURE)
    if default is None:
        problems.append(f"{where}: no {PREDICT_SIGNATURE!r} signature (has {sorted(signatures)})")
    else:
        inputs, outputs = set(default.get("inputs", {})), set(default.get("outputs", {}))
        if IMAGES_INPUT not in inputs:
            problems.append(f"{where}: {PREDICT_SIGNATURE} has no {IMAGES_INPUT!r} input (has {sorted(inputs)})")
        wanted = list(ANSWER_OUTPUTS)
        if P.ORIENTATION_PROBABILITIES in outputs or "class_probabilities" not in outputs:
            wanted += ORIENTATION_OUTPUTS
        missing = [name for name in wanted if name not in outputs]
        if missing:
            problems.append(f"{where}: {PREDICT_SIGNATURE} lacks the outputs {missing} (has {sorted(outputs)})")
    policy = signatures.get(P.POLICY_SIGNATURE)
    if policy is None:
        problems.append(f"{where}: no {P.POLICY_SIGNATURE!r} signature: clients could not read how its answers "
                        f"become decisions")
    elif P.POLICY_OUTPUT not in policy.get("outputs", {}) or P.POLICY_INPUT not in policy.get("inputs", {}):
        problems.append(f"{where}: {P.POLICY_SIGNATURE} wants input {P.POLICY_INPUT!r} and output "
                        f"{P.POLICY_OUTPUT!r}")
    return problems


def read_canary(version_dir: str) -> Tuple[Dict[str, bytes], Dict[str, Dict[str, Any]]]:
    """(name -> image bytes, name -> recorded answer) of the canary set the export recorded."""
    extra = os.path.join(version_dir, "assets.extra")
    path = os.path.join(extra, CANARY_ANSWERS)
    if not os.path.isfile(path):
        raise Refused(f"no recorded canary answers (assets.extra/{CANARY_ANSWERS}); export the version again with "
                      f"this archive-vision")
    try:
        with open(path, encoding="utf-8") as f:
            answers = dict(json.load(f)["answers"])
        images = {}
        for name in answers:
            with open(os.path.join(extra, CANARY_DIR, os.path.basename(name)), "rb") as f:
                images[name] = f.read()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Refused(f"the recorded canary set cannot be read: {error}") from None
    if not answers:
        raise Refused(f"assets.extra/{CANARY_ANSWERS} records no answers")
    return images, answers


def user_canary(paths: Sequence[str]) -> Dict[str, bytes]:
    """--canary: image files, and the image files of folders (not recursive); name -> bytes."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UsageError(f"--canary {path}: no such file or folder")
    if not files:
        raise UsageError(f"--canary {' '.join(paths)}: no images there ({', '.join(IMAGE_EXTENSIONS)})")
    images = {}
    for path in files:
        with open(path, "rb") as f:
            images[path] = f.read()
    return images


def answer_differences(name: str, want: Dict[str, Any], got: Dict[str, Any], what: str) -> List[str]:
    """How answer `got` differs from `want` (serving.export.canary_rows' shape): probabilities beyond TOLERANCE,
    another decision."""
    import numpy as np

    problems = []
    if want.get("decision") != got.get("decision"):
        problems.append(f"{name}: decision {got.get('decision')!r}, {what} {want.get('decision')!r}")
    for key in (P.ORIENTATION_PROBABILITIES, "class_probabilities"):
        if want.get(key) is None and got.get(key) is None:
            continue
        if want.get(key) is None or got.get(key) is None:
            problems.append(f"{name}: {key} {'missing' if got.get(key) is None else 'unexpected'}")
            continue
        a, b = np.asarray(want[key], np.float64), np.asarray(got[key], np.float64)
        if a.shape != b.shape:
            problems.append(f"{name}: {key} has shape {b.shape}, {what} {a.shape}")
        elif np.max(np.abs(a - b)) > TOLERANCE:
            problems.append(f"{name}: {key} {np.round(b, 6).tolist()}, {what} {np.round(a, 6).tolist()} "
                            f"(differs by {np.max(np.abs(a - b)):.2g} > {TOLERANCE:g})")
    return problems


def version_of(version_dir: str) -> int:
    name = os.path.basename(os.path.normpath(version_dir))
    if not name.isdigit():
        raise UsageError(f"--version-dir {version_dir}: the folder must be named by its numeric version, as TF "
                         f"Serving wants (EXPORT_BASE/MODEL/VERSION)")
    return int(name)


def model_name_of(version_dir: str) -> str:
    """The name the export recorded, else the model folder's."""
    try:
        with open(os.path.join(version_dir, "assets.extra", EXPORT_METADATA), encoding="utf-8") as f:
            name = json.load(f).get("model_name")
        if name:
            return str(name)
    except (OSError, ValueError):
        pass
    return os.path.basename(os.path.dirname(os.path.abspath(version_dir)))


# --- checks on the served version ------------------------------------------------------------------------------

def replay_warmup(address: str, model_name: str, version: int, version_dir: str, timeout_s: float) -> int:
    """Send each warmup record's request to the served version; return how many. A failed call is a refusal."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    count = 0
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20),
                                                 ("grpc.max_receive_message_length", 256 << 20)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for record in configs.read_warmup_requests(version_dir):
            kind = record.WhichOneof("log_type")
            if kind not in ("predict_log", "classify_log", "regress_log", "multi_inference_log"):
                raise Refused(f"warmup record {count}: a {kind or 'empty'} record, which TF Serving cannot replay")
            request = getattr(record, kind).request
            request.model_spec.name = model_name
            request.model_spec.version.value = version
            method = {"predict_log": stub.Predict, "classify_log": stub.Classify, "regress_log": stub.Regress,
                      "multi_inference_log": stub.MultiInference}[kind]
            try:
                method(request, timeout=timeout_s)
            except grpc.RpcError as error:
                raise Refused(f"warmup record {count} ({kind}, signature "
                              f"{getattr(request.model_spec, 'signature_name', '') or PREDICT_SIGNATURE!r}) "
                              f"failed: {error.code().name}: {error.details()}") from None
            count += 1
    if not count:
        raise Refused(f"no warmup records ({configs.WARMUP_FILE}): the servers would answer the first requests "
                      f"cold")
    return count


def validate(version_dir: str, model_name: str, canary_paths: Sequence[str] = (), *, threads: int = 1,
             deadline_s: float = 300.0, workdir: Optional[str] = None) -> List[str]:
    """Run every check on `version_dir`; return what was checked (one line each). Raises Refused."""
    from archive_vision.demo import LocalServer
    from serving.client import GrpcModelServerClient, InProcessModelClient
    from serving.errors import ServingError
    from serving.export import canary_rows

    version = version_of(version_dir)
    extra_images = user_canary(canary_paths) if canary_paths else {}
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        raise Refused(f"{version_dir} holds no saved_model.pb")
    problems = signature_problems(read_signatures(version_dir), "saved_model.pb")
    if problems:
        raise Refused("; ".join(problems))
    if not os.path.isfile(os.path.join(version_dir, configs.WARMUP_FILE)):
        raise Refused(f"no warmup records ({configs.WARMUP_FILE}): the servers would answer the first requests cold")
    images, recorded = read_canary(version_dir)
    done = [f"signatures on disk: {PREDICT_SIGNATURE}, {P.POLICY_SIGNATURE}"]

    expected_extra: Dict[str, Dict[str, Any]] = {}
    if extra_images:  # the version's own answers in this process, before the server takes the cores
        local = InProcessModelClient(version_dir, model_name, max_attempts=1)
        try:
            expected_extra = dict(zip(extra_images, canary_rows(local.predict(list(extra_images.values())))))
        except ServingError as error:
            raise Refused(f"the version cannot answer the --canary images in this process: {error}") from None
        finally:
            local.close()

    with tempfile.TemporaryDirectory(prefix="publish-", dir=workdir) as stage:
        # The server sees this version alone: BASE/<model>/<version> linked to (else copied from) the version dir.
        staged = os.path.join(stage, model_name, str(version))
        os.makedirs(os.path.dirname(staged))
        try:
            os.symlink(os.path.abspath(version_dir), staged)
        except OSError:
            shutil.copytree(version_dir, staged)
        server = LocalServer(os.path.dirname(staged), model_name, os.path.join(stage, "server.log"), threads=threads,
                             extra_flags=["--enable_model_warmup", "false", "--enable_batching"])
        try:
            try:
                server.wait_until_available(deadline_s)
            except RuntimeError as error:
                raise Refused(f"the local server did not load it: {error}") from None
            done.append(f"loaded and AVAILABLE in the local server at {server.address}")
            client = GrpcModelServerClient(server.address, model_name, version=version, timeout_s=60.0,
                                           max_attempts=2)
            try:
                served = client.metadata()
                problems = signature_problems(served.get("signatures", {}), "served")
                if problems:
                    raise Refused("; ".join(problems))
                try:
                    policy = P.ScorePolicy.from_json(client.score_policy() or "")
                except (ServingError, ValueError, TypeError) as error:
                    raise Refused(f"its {P.POLICY_SIGNATURE} does not answer a readable policy: {error}") from None
                done.append(f"served signatures and policy ({policy.origin or 'no origin given'})")
                count = replay_warmup(server.address, model_name, version, version_dir, 60.0)
                done.append(f"{count} warmup record(s) replayed")
                try:
                    answers = dict(zip(images, canary_rows(client.predict(list(images.values())))))
                    extra = dict(zip(extra_images, canary_rows(client.predict(list(extra_images.values())))))
                except ServingError as error:
                    raise Refused(f"the served version failed on the canary set: {error}") from None
            finally:
                client.close()
        finally:
            server.stop()
    problems = [p for name in recorded for p in
                answer_differences(name, recorded[name], answers[name], "the export recorded")]
    problems += [p for name in extra_images for p in
                 answer_differences(name, expected_extra[name], extra[name], "in-process")]
    if problems:
        raise Refused(f"{len(problems)} canary answer(s) differ: " + "; ".join(problems[:10]))
    done.append(f"{len(recorded)} recorded canary answer(s) match")
    if extra_images:
        done.append(f"{len(extra_images)} --canary image(s) answered as in-process")
    return done


# --- the copy --------------------------------------------------------------------------------------------------

def check_target_free(version_dir: str, base_path: str) -> str:
    """BASE_PATH/<version>, which must not exist yet (UsageError)."""
    version = str(version_of(version_dir))
    if "://" not in base_path:
        target, taken = os.path.join(base_path, version), os.path.exists(os.path.join(base_path, version))
    else:
        from apache_beam.io.filesystems import FileSystems

        target = FileSystems.join(base_path.rstrip("/"), version)
        taken = FileSystems.exists(FileSystems.join(target, "saved_model.pb"))
    if taken:
        raise UsageError(f"{target} already exists: a published version is never overwritten")
    return target


def copy_version(version_dir: str, base_path: str) -> str:
    """Copy the version to BASE_PATH/<version> so that a polling server never sees half of it; return the target.
    Locally: a hidden temporary folder renamed last. On gs:// (and other Beam filesystems): every other file
    first, saved_model.pb (what TF Serving looks for) last."""
    version = str(version_of(version_dir))
    target = check_target_free(version_dir, base_path)
    if "://" not in base_path:
        os.makedirs(base_path, exist_ok=True)
        tmp = os.path.join(base_path, f".tmp-publish-{version}-{os.getpid()}")
        try:
            shutil.copytree(version_dir, tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    from serving.model_files import SAVED_MODEL, upload_tree

    upload_tree(version_dir, target, last=(SAVED_MODEL,))
    return target


# --- the command -----------------------------------------------------------------------------------------------

def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser(
        "archive-vision publish", "validate a new SavedModel version in a local server (warmup records, signatures, "
        "policy, canary answers), then copy it where the servers look; exit 3: refused, nothing copied",
        examples=("archive-vision publish --version-dir models/archive_vision/1763790000 "
                  "--to gs://my-bucket/models/archive_vision",
                  "archive-vision publish --version-dir jobs/j1/export/archive_vision/1763790000 --to /srv/models/"
                  "archive_vision --canary known-pages/"))
    # the shared epilog's exit code 3 is about failed inputs; publish's 3 is a refused version
    parser.epilog = parser.epilog.split("exit codes:")[0] + (
        "exit codes: 0 published (the target is printed); 1 internal error; 2 usage or setup error (an existing "
        "target included); 3 the version was refused (the reasons on stderr), nothing copied")
    parser.add_argument("--version-dir", "--version_dir", dest="version_dir", required=True,
                        help="the exported version: EXPORT_BASE/MODEL/VERSION (a local folder)")
    parser.add_argument("--to", required=True, help="the servers' base path for the model (TF Serving's "
                                                    "model_base_path): a local folder or gs://; the version lands "
                                                    "in <to>/<version>")
    parser.add_argument("--model-name", "--model_name", dest="model_name",
                        help="the served model's name (default: the export's, else the model folder's)")
    parser.add_argument("--canary", nargs="+", action="extend", default=[], metavar="DIR_OR_FILE",
                        help="more images to check: the served answers must equal the version's answers in this "
                             "process")
    parser.add_argument("--threads", type=int, default=1, help="TF threads of the local server")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds the local server may take to load")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    configure_logging(argv)
    version_dir = args.version_dir.rstrip("/")
    try:
        if "://" in version_dir:
            raise UsageError(f"--version-dir {version_dir}: a local folder (copy a gs:// export down first)")
        if not os.path.isdir(version_dir):
            raise UsageError(f"--version-dir {version_dir}: no such folder")
        model_name = args.model_name or model_name_of(version_dir)
        check_target_free(version_dir, args.to)
        done = validate(version_dir, model_name, args.canary, threads=args.threads, deadline_s=args.deadline)
        for line in done:
            log.info("ok: %s", line)
        target = copy_version(version_dir, args.to)
    except UsageError as error:
        print(f"archive-vision publish: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as error:
        print(f"archive-vision publish: refused {version_dir}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    print(target)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
