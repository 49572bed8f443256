"""Listing an archive: a local folder (recursive), a gs:// prefix, a glob, or a CSV/Parquet manifest.

Listing is pure (no Beam transforms) so it is unit-tested directly; the ingest and score jobs run it
inside the pipeline. Each file carries what the listing gives without reading it: its size and a fingerprint of
its version (local: size and mtime; gs://: size and the object's MD5, else generation and CRC32C), which lets
`score --skip-known` tell an unchanged file from a changed one without opening it. A row that cannot become an
input (a manifest row without a URI, an unknown orientation value, a folder that cannot be listed) is still
returned, with `error` set, so it reaches errors.parquet.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import logging
import os
import posixpath
from typing import Iterator, List, Optional, Sequence

from pipelines import schema

LOG = logging.getLogger("archive_vision.sources")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
SPLIT_DIR_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
LABEL_MODES = ("auto", "folders", "manifest", "none")


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One input file (or one bad manifest row) with what the archive says about it."""

    uri: str
    label: str = ""
    split: str = ""
    orientation: int = schema.UNKNOWN
    size_bytes: int = -1
    error: str = ""
    error_type: str = "bad_manifest_row"  # errors.parquet's error_type for `error` (read only when error is set)
    fingerprint: str = ""  # the file's version as its listing gives it (local_fingerprint, gcs_fingerprint; "": none)

    def fields(self) -> tuple:
        """The entry as a plain tuple: how it crosses a shuffle (Beam's primitive coder writes a tuple compactly,
        a dataclass only pickled; the DirectRunner holds a shuffle in its launcher: 20,000 listed files took 57 MB
        there as dataclasses, 27 MB as tuples)."""
        return dataclasses.astuple(self)

    @classmethod
    def from_fields(cls, fields: tuple) -> "SourceEntry":
        return cls(*fields)


def local_fingerprint(info: os.stat_result) -> str:
    """A local file's listing fingerprint: size and mtime in ns (rsync's quick check: a rewrite moves the mtime)."""
    return f"local:{info.st_size}:{info.st_mtime_ns}"


def gcs_fingerprint(blob) -> str:
    """A GCS object's listing fingerprint, from its listing entry (a google.cloud.storage Blob): the size and the
    MD5 GCS keeps of the content (the same bytes uploaded again keep it), else, for composite objects that have no
    MD5, the generation (a new one on every write) and the CRC32C; '' when the listing carried neither."""
    if blob.md5_hash:
        return f"gs:{blob.size}:md5:{blob.md5_hash}"
    if blob.generation:
        return f"gs:{blob.size}:{blob.generation}:{blob.crc32c or ''}"
    return ""


def _stat_local(path: str) -> tuple:
    """(size, listing fingerprint) of a local file, without opening it; (-1, '') when it cannot be stat'ed
    (a broken symlink, a vanished file: reading it fails later, as a read error)."""
    try:
        info = os.stat(path)  # follows symlinks: the fingerprint is the target's
    except OSError:
        return -1, ""
    return info.st_size, local_fingerprint(info)


def is_manifest(src: str) -> bool:
    """A CSV/Parquet manifest of URIs rather than a folder of images."""
    return src.lower().endswith(MANIFEST_SUFFIXES)


def is_remote(src: str) -> bool:
    return "://" in src


def resolve_label_mode(src: str, mode: str) -> str:
    """`auto`: the manifest's label column, else folder names when a local root holds only folders."""
    if mode not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {LABEL_MODES}")
    if mode != "auto":
        return mode
    if is_manifest(src):
        return "manifest"
    if is_remote(src) or any(ch in src for ch in "*?["):
        return "none"
    if not os.path.isdir(src):
        return "none"
    entries = list(os.scandir(src))
    has_dirs = any(e.is_dir() for e in entries)
    # is_dir() follows links: a link to a folder is a folder (listing follows it), a broken link is a file.
    has_files = any(not e.is_dir() for e in entries if not e.name.startswith("."))
    return "folders" if has_dirs and not has_files else "none"


def _folder_label_and_split(rel_path: str) -> tuple:
    """Keras flow_from_directory layout: <label>/file or <split>/<label>/file."""
    parts = rel_path.replace(os.sep, "/").split("/")[:-1]
    split = ""
    if parts and parts[0].lower() in SPLIT_DIR_NAMES:
        split = SPLIT_DIR_NAMES[parts[0].lower()]
        parts = parts[1:]
    return (parts[0] if parts else ""), split


def _excluded(path: str, exclude: Sequence[str]) -> bool:
    name = posixpath.basename(path.replace(os.sep, "/"))
    return any(fnmatch.fnmatch(name, pattern) for pattern in exclude)


def _list_local_dir(root: str, label_mode: str, exclude: Sequence[str]) -> Iterator[SourceEntry]:
    """Every file under `root`, plus one error entry (`unreadable_dir`) per folder that cannot be listed.

    A folder os.walk cannot read (permissions, I/O error, a vanished mount) would otherwise drop its
    files without a trace; here it becomes one failed input, so the run's counts still reconcile and
    errors.parquet names the folder and the OS error.

    Symlinked folders are followed: archives are often assembled from links (`SRC/photo -> /mnt/nas/...`),
    and not following them would lose those files silently. Loops (a link to an ancestor) and second
    paths to a folder already listed are not descended again, keyed on the real (device, inode), so
    every file is listed once, under the first path the sorted walk reaches it by.
    """
    root = os.path.abspath(root)
    walk_errors: List[OSError] = []
    seen = set()
    try:
        info = os.stat(root)
        seen.add((info.st_dev, info.st_ino))
    except OSError:
        pass  # os.walk reports it through onerror below
    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_errors.append, followlinks=True):
        yield from _unlisted_dirs(walk_errors, root)
        dirnames.sort()
        for name in list(dirnames):
            child = os.path.join(dirpath, name)
            try:
                info = os.stat(child)
            except OSError:
                continue  # os.walk meets the same failure when it lists the child, and reports it
            key = (info.st_dev, info.st_ino)
            if key in seen:
                LOG.warning("not listing %s again: it is a link to a folder already listed (%s)",
                            child, os.path.realpath(child))
                dirnames.remove(name)
            else:
                seen.add(key)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if _excluded(path, exclude):
                continue
            label, split = _folder_label_and_split(os.path.relpath(path, root))
            size, fingerprint = _stat_local(path)
            yield SourceEntry(uri=path, label=label if label_mode == "folders" else "", split=split, size_bytes=size,
                              fingerprint=fingerprint)
    yield from _unlisted_dirs(walk_errors, root)


def _unlisted_dirs(walk_errors: List[OSError], root: str) -> Iterator[SourceEntry]:
    """Drain os.walk's onerror list into error entries (one per folder that could not be listed)."""
    while walk_errors:
        error = walk_errors.pop(0)
        path = error.filename or root
        yield SourceEntry(uri=os.fspath(path), error_type="unreadable_dir",
                          error=f"folder could not be listed, its files are not in this run: "
                                f"{type(error).__name__}: {error}")


def _matched_files(pattern: str) -> Iterator[tuple]:
    """(path, size, listing fingerprint) of every file `pattern` matches, as Beam's FileSystems.match lists them.

    gs:// is listed once through Beam's own GCS client, whose listing entries carry each object's generation,
    CRC32C and MD5 (FileSystems.match keeps only size and time); local files are stat'ed (mtime in ns); any other
    filesystem's fingerprint is its size and last-updated time, where it gives one."""
    from apache_beam.io.filesystems import FileSystems

    if pattern.startswith("gs://"):
        listed = _gcs_matched_files(pattern)
        if listed is not None:
            yield from listed
            return
    for match in FileSystems.match([pattern]):
        for meta in match.metadata_list:
            if not is_remote(meta.path):
                size, fingerprint = _stat_local(meta.path)
                yield meta.path, meta.size_in_bytes, fingerprint
                continue
            updated = getattr(meta, "last_updated_in_seconds", 0.0) or 0.0
            scheme = meta.path.split("://", 1)[0]
            yield meta.path, meta.size_in_bytes, f"{scheme}:{meta.size_in_bytes}:{updated!r}" if updated else ""


def _gcs_matched_files(pattern: str) -> Optional[List[tuple]]:
    """gs:// files matching `pattern` with their fingerprints, in one listing call (None: Beam's GCS filesystem
    exposes no client here, so the caller falls back to FileSystems.match, without fingerprints)."""
    import re

    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    filesystem = FileSystems.get_filesystem(pattern)
    if not hasattr(filesystem, "_gcsIO"):
        return None
    gcs = filesystem._gcsIO()  # Beam's own client, configured by the pipeline options as its reads are
    if pattern.endswith("/"):
        pattern += "*"  # as FileSystem.match does
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    bucket, name_prefix = parse_gcs_path(prefix, object_optional=True)
    retry = getattr(gcs, "_storage_client_retry", None)
    kwargs = {"retry": retry} if retry is not None else {}
    blobs = {f"gs://{bucket}/{blob.name}": blob
             for blob in gcs.client.list_blobs(bucket, prefix=name_prefix, **kwargs)}
    metas = [FileMetadata(path, blob.size or 0) for path, blob in blobs.items()]
    return [(meta.path, meta.size_in_bytes, gcs_fingerprint(blobs[meta.path]))
            for meta in filesystem.match_files(metas, pattern)]


def _list_pattern(pattern: str, root: str, label_mode: str, exclude: Sequence[str]) -> Iterator[SourceEntry]:
    for path, size, fingerprint in sorted(_matched_files(pattern)):
        if path.endswith("/") or _excluded(path, exclude):
            continue
        rel = path[len(root):].lstrip("/") if root and path.startswith(root) else posixpath.basename(path)
        label, split = _folder_label_and_split(rel)
        yield SourceEntry(uri=path, label=label if label_mode == "folders" else "", split=split,
                          size_bytes=size, fingerprint=fingerprint)


def read_manifest_table(src: str):
    """The manifest as a pyarrow Table (local or gs://), every column read as given."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(src) as handle:
        data = handle.read()
    if src.lower().endswith(".csv"):
        # Strings stay strings: a label "01" must not become the integer 1.
        options = pacsv.ConvertOptions(column_types={"uri": "string", "label": "string", "split": "string"})
        return pacsv.read_csv(io.BytesIO(data), convert_options=options)
    return pq.read_table(io.BytesIO(data))


def _manifest_orientation(value) -> tuple:
    if value is None or value == "":
        return schema.UNKNOWN, ""
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return schema.UNKNOWN, f"orientation {value!r} is not a number"
    if number not in schema.ORIENTATIONS and number != schema.UNKNOWN:
        return schema.UNKNOWN, f"orientation {number} is not one of 0/90/180/270 (or -1 for unknown)"
    return number, ""


def _list_manifest(src: str, label_mode: str) -> Iterator[SourceEntry]:
    table = read_manifest_table(src)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {src} has no 'uri' column (columns: {table.column_names})")
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    rows = table.to_pylist()
    first_row = {}
    for number, row in enumerate(rows, start=1):
        uri = row.get("uri")
        uri = "" if uri is None else str(uri).strip()
        if not uri:
            yield SourceEntry(uri=f"{src}#row={number}", error="manifest row has an empty uri")
            continue
        if not is_remote(uri) and not os.path.isabs(uri):
            uri = posixpath.join(base, uri) if is_remote(base) else os.path.normpath(os.path.join(base, uri))
        if uri in first_row:
            # Two rows for one file would give it two labels or splits: the later row is an error.
            yield SourceEntry(uri=f"{uri}#row={number}",
                              error=f"duplicate uri, first listed on manifest row {first_row[uri]}")
            continue
        first_row[uri] = number
        split = str(row.get("split") or "").strip().lower()
        error = ""
        if split and split not in SPLIT_DIR_NAMES:
            error = f"split {split!r} is not one of train/val/test"
        split = SPLIT_DIR_NAMES.get(split, "")
        orientation, orientation_error = _manifest_orientation(row.get("orientation"))
        label = row.get("label")
        label = "" if label is None or label_mode != "manifest" else str(label).strip()
        # A local file is stat'ed here (cheap, no content read); a remote one would cost a request per file, so it
        # has no fingerprint and is read (and matched by its content hash) instead.
        size, fingerprint = (-1, "") if is_remote(uri) else _stat_local(uri)
        yield SourceEntry(uri=uri, label=label, split=split, orientation=orientation,
                          error=error or orientation_error, size_bytes=size, fingerprint=fingerprint)


def list_archive(src: str, label_mode: str = "auto", exclude: Sequence[str] = ()) -> Iterator[SourceEntry]:
    """Every input of an archive, in a stable order."""
    label_mode = resolve_label_mode(src, label_mode)
    if is_manifest(src):
        yield from _list_manifest(src, label_mode)
    elif not is_remote(src) and os.path.isdir(src):
        yield from _list_local_dir(src, label_mode, exclude)
    elif any(ch in src for ch in "*?["):
        root = src.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        root = root.rsplit("/", 1)[0] + "/" if "/" in root else ""
        yield from _list_pattern(src, root, label_mode, exclude)
    elif is_remote(src):
        prefix = src.rstrip("/") + "/"
        yield from _list_pattern(prefix + "**", prefix, label_mode, exclude)
    elif os.path.isfile(src) or os.path.islink(src):
        size, fingerprint = _stat_local(src)
        yield SourceEntry(uri=os.path.abspath(src), size_bytes=size, fingerprint=fingerprint)
    else:
        raise FileNotFoundError(f"input {src!r} is not a folder, file, glob, gs:// prefix or manifest")


def path_under(uri: str, root: str) -> str:
    """The input's path below `root` (the folder it was listed from), or, for a file elsewhere (a manifest's, a
    glob's, or with no root), its whole path with the scheme dropped: copies named by it never share a name."""
    if root:
        prefix = root.rstrip("/") + "/"
        listed = uri if is_remote(uri) else os.path.abspath(uri)
        if listed.startswith(prefix):
            return listed[len(prefix):]
    return uri.split("://", 1)[-1].lstrip("/")


def inside_archive(target: str, src: str) -> bool:
    """True when `target` is the archive's folder (a folder input, or the folder of a file or glob input) or below
    it, so that files written there would join the archive; never for a manifest, whose files are anywhere."""
    if is_manifest(src):
        return False
    if is_remote(src) or is_remote(target):
        return target.rstrip("/") == src.rstrip("/") or target.startswith(src.rstrip("/") + "/")
    root = os.path.realpath(src if os.path.isdir(src) else os.path.dirname(src) or ".")
    target = os.path.realpath(target)
    return target == root or target.startswith(root + os.sep)


def read_input(entry: SourceEntry, max_file_mb: float) -> bytes:
    """The bytes of one listed input, never more than --max-file-mb of them (MiB, as ingest and score count).

    Raises imaging.ImageError: `too_large` (listed over the limit, so never opened, or found over it while reading:
    a manifest gives no size), `unreadable` (a missing file, broken symlink, permission or network failure)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipelines.imaging import ImageError

    max_bytes = int(max_file_mb * 1024 * 1024)
    if entry.size_bytes > max_bytes:
        raise ImageError("too_large", f"file is {entry.size_bytes / 1e6:.1f} MB, over --max-file-mb {max_file_mb}")
    try:
        with FileSystems.open(entry.uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = handle.read(max_bytes + 1)
    except Exception as e:  # a missing file, broken symlink, permission or network failure is data here
        raise ImageError("unreadable", f"{type(e).__name__}: {e}") from e
    if len(data) > max_bytes:
        raise ImageError("too_large", f"file is over --max-file-mb {max_file_mb}")
    return data


def class_names(entries: Sequence[SourceEntry], pinned: Optional[Sequence[str]] = None) -> List[str]:
    """Stable class order: the pinned list, else sorted label names (as Keras does for folders)."""
    if pinned:
        return list(pinned)
    return sorted({e.label for e in entries if e.label and not e.error})
