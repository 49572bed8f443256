"""Model files wherever they live: a local folder or gs:// (any Apache Beam filesystem).

TensorFlow loads a SavedModel from a local folder here: a gs:// version is first copied into a local cache, through
Beam's FileSystems (google-cloud-storage underneath), keyed by its path and its files' sizes and times, so a worker
that loads it again (every RunInference setup, every run) reuses the copy and a version rewritten in place is copied
afresh. Two reasons not to hand TensorFlow the gs:// path: its own GCS filesystem has a fixed endpoint
(https://www.googleapis.com), so it can never be pointed at an emulator, while google-cloud-storage honours
STORAGE_EMULATOR_HOST; and a copy makes every later load a local read. What is written to gs:// (an export, a
training job dir) is written locally first and copied up with upload_tree, saved_model.pb last, so a TF Serving that
polls the folder never loads half a version.

Only the standard library at import: Beam workers, the launcher, the trainer and publish all use it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import List, Sequence, Tuple

SAVED_MODEL = "saved_model.pb"
# Files are copied byte for byte: Beam's default (AUTO) would gunzip a *.gz file it reads and gzip one it writes.
RAW = "uncompressed"  # apache_beam.io.filesystem.CompressionTypes.UNCOMPRESSED, without importing Beam here


def is_remote(path: str) -> bool:
    """Whether `path` names a Beam filesystem other than the local one (gs://, s3://, ...)."""
    return "://" in path


def cache_root() -> str:
    """Where archive-vision keeps what it makes or copies once per machine: $ARCHIVE_VISION_CACHE, else
    $XDG_CACHE_HOME/archive_vision, else ~/.cache/archive_vision."""
    return os.environ.get("ARCHIVE_VISION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "archive_vision")


def _skipped(relative: str, skip_prefixes: Sequence[str]) -> bool:
    return any(relative.startswith(prefix) for prefix in skip_prefixes)


def download_prefix(remote: str, local: str, patterns: Sequence[str] = ("*",), recursive: bool = False,
                    skip_prefixes: Sequence[str] = ()) -> List[str]:
    """Copy the files under `remote` (gs://..., any Beam filesystem) matching `patterns` into `local`.

    `recursive` takes every file below `remote` instead; relative paths starting with one of `skip_prefixes`
    are left out.
    """
    from apache_beam.io.filesystems import FileSystems

    remote = remote.rstrip("/")
    os.makedirs(local, exist_ok=True)
    globs = [f"{remote}/**"] if recursive else [f"{remote}/{p}" for p in patterns]
    copied = []
    for match in FileSystems.match(globs):
        for meta in match.metadata_list:
            relative = meta.path[len(remote) + 1:]
            if not relative or relative.endswith("/") or _skipped(relative, skip_prefixes):
                continue
            target = os.path.join(local, *relative.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with FileSystems.open(meta.path, compression_type=RAW) as src, open(target + ".partial", "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.replace(target + ".partial", target)
            copied.append(target)
    return copied


def upload_tree(local: str, remote: str, skip_prefixes: Sequence[str] = (), last: Sequence[str] = ()) -> List[str]:
    """Copy every file under the local dir `local` to the same relative path under `remote`; the relative paths in
    `last` go after all the others (saved_model.pb, what TF Serving looks for, so it never sees half a version)."""
    from apache_beam.io.filesystems import FileSystems

    remote = remote.rstrip("/")
    found = []
    for root, _, files in os.walk(local, followlinks=True):
        found += [os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/") for name in files]
    written = []
    for relative in sorted(found, key=lambda rel: (rel in last, rel)):
        if _skipped(relative, skip_prefixes):
            continue
        with open(os.path.join(local, *relative.split("/")), "rb") as src:
            dst = FileSystems.create(f"{remote}/{relative}", compression_type=RAW)
            try:
                shutil.copyfileobj(src, dst, 8 << 20)
            finally:
                dst.close()
        written.append(f"{remote}/{relative}")
    return written


def _remote_files(remote: str) -> List[Tuple[str, int, float]]:
    """(relative path, size, last update) of every file under `remote`, sorted."""
    from apache_beam.io.filesystems import FileSystems

    files = []
    for meta in FileSystems.match([f"{remote}/**"])[0].metadata_list:
        relative = meta.path[len(remote) + 1:]
        if relative and not relative.endswith("/"):
            files.append((relative, int(meta.size_in_bytes), float(meta.last_updated_in_seconds or 0.0)))
    return sorted(files)


def resolve_version_dir(path: str) -> str:
    """`--model` as a version dir (holds saved_model.pb), a model dir of numeric versions (the latest taken), or an
    export base holding one model dir; local or gs://."""
    path = path.rstrip("/")
    if is_remote(path):
        return _resolve_remote(path)
    if os.path.exists(os.path.join(path, SAVED_MODEL)):
        return path
    versions = sorted((int(n) for n in os.listdir(path) if n.isdigit()
                       and os.path.exists(os.path.join(path, n, SAVED_MODEL)))) if os.path.isdir(path) else []
    if versions:
        return os.path.join(path, str(versions[-1]))
    models = [n for n in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, n)) and not n.startswith(".")] \
        if os.path.isdir(path) else []
    candidates = [m for m in models if any(v.isdigit() for v in os.listdir(os.path.join(path, m)))]
    if len(candidates) == 1:
        return resolve_version_dir(os.path.join(path, candidates[0]))
    raise _no_version(path)


def _no_version(path: str) -> FileNotFoundError:
    return FileNotFoundError(f"--model {path}: no SavedModel version there (want a version dir with saved_model.pb, "
                             f"a model dir of numeric versions, or an export base with one model)")


def _resolve_remote(path: str) -> str:
    """resolve_version_dir's rules on a Beam filesystem, from one listing: saved_model.pb at depth 0, 1 or 2."""
    models: dict = {}
    for relative, _, _ in _remote_files(path):
        parts = relative.split("/")
        if parts == [SAVED_MODEL]:
            return path
        if len(parts) == 2 and parts[1] == SAVED_MODEL and parts[0].isdigit():
            models.setdefault("", set()).add(int(parts[0]))
        elif len(parts) == 3 and parts[2] == SAVED_MODEL and parts[1].isdigit() and not parts[0].startswith("."):
            models.setdefault(parts[0], set()).add(int(parts[1]))
    if "" in models:
        return f"{path}/{max(models[''])}"
    if len(models) == 1:
        (name, versions), = models.items()
        return f"{path}/{name}/{max(versions)}"
    raise _no_version(path)


def local_copy(version_dir: str, cache_dir: str = "") -> str:
    """A local folder holding the SavedModel version `version_dir`: itself when local, else a copy in the cache
    (cache_dir, default <cache_root>/models), made once and reused while the remote files stay as they are.

    The copy is written under a temporary name and renamed whole, so processes and threads loading the same version
    at once (a worker's RunInference instances) never read half a copy; the one that renames last throws its own
    away."""
    if not is_remote(version_dir):
        return version_dir
    remote = version_dir.rstrip("/")
    files = _remote_files(remote)
    if not any(relative == SAVED_MODEL for relative, _, _ in files):
        raise FileNotFoundError(f"{remote}: no {SAVED_MODEL} there (not a SavedModel version)")
    key = hashlib.sha256(json.dumps([remote, files]).encode()).hexdigest()[:16]
    parent = cache_dir or os.path.join(cache_root(), "models")
    name = "-".join(remote.split("://", 1)[1].split("/")[-2:])  # <model>-<version>, for whoever looks in the cache
    target = os.path.join(parent, f"{name}-{key}")
    if os.path.isfile(os.path.join(target, SAVED_MODEL)):
        return target
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".partial-{name}-", dir=parent)
    try:
        copied = download_prefix(remote, partial, recursive=True)
        if len(copied) != len(files):
            raise OSError(f"{remote}: {len(copied)} of its {len(files)} files copied (changed while copying?)")
        try:
            os.rename(partial, target)
        except OSError:  # another process or thread renamed its copy first: use that one
            if not os.path.isfile(os.path.join(target, SAVED_MODEL)):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def local_file(path: str, cache_dir: str = "") -> str:
    """A local copy of one file (gs:// or any Beam filesystem), cached like local_copy; a local path as is."""
    if not is_remote(path):
        return path
    from apache_beam.io.filesystems import FileSystems

    matched = FileSystems.match([path])[0].metadata_list
    if not matched:
        raise FileNotFoundError(f"{path}: no such file")
    meta = matched[0]
    key = hashlib.sha256(json.dumps([path, meta.size_in_bytes, meta.last_updated_in_seconds]).encode()).hexdigest()
    parent = os.path.join(cache_dir or os.path.join(cache_root(), "files"), key[:16])
    target = os.path.join(parent, path.rstrip("/").rsplit("/", 1)[-1])
    if not os.path.isfile(target):
        os.makedirs(parent, exist_ok=True)
        with FileSystems.open(path, compression_type=RAW) as src, tempfile.NamedTemporaryFile("wb", dir=parent, delete=False) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(dst.name, target)
    return target
