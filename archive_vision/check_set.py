"""A labelled check set from images known to be upright: each one turned four ways, with the truth beside it.

    archive-vision checkset --input upright/ --output check/ [--sample 200] [--turns 0,90,180,270]
    archive-vision score --input check/images --output scored/ --truth check/truth.csv

An archive team's first question about the default orientation model is how well it reads *their* scans. They
rarely have labels, but they can always pick a few hundred images they know are upright. This writes every such
image in each turn (clockwise, the MODEL CONTRACT's `orientation`) under `images/`, keeping its path under the
input folder (a manifest's or a glob's files keep their whole path), and `truth.csv` (uri, orientation, the label
where the input has one, the source, and how the copy was made), so that `score --truth` prints how many turns it
got right, and of the images it would auto-rotate or leave alone, how many it got right: the figures that say
whether its `--rotate-threshold` can be trusted on this archive.

The turns are made the way `score --write-corrected` makes upright copies: JPEG through `jpegtran -perfect`
(lossless) where it can; where one turn of an image cannot be (edge blocks) all its turns are re-encoded at quality
95, so that no turn carries a compression history the others lack. Other formats keep every pixel; an EXIF turn is
applied first, as score applies it. A multi-page TIFF gives its first page. An input whose manifest gives an
`orientation` is taken as stored that way, and its truths add the turn to it. An input that cannot be read or
decoded (empty, truncated, corrupt, not an image, over the pixel or size limit, a name clash) is a row of
`errors.csv` with ingest's error kind and the reason; the counts always add up.
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import io
import os
import posixpath
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from pipelines import imaging, schema, sources
from pipelines.cli import command_parser

TURNS = schema.ORIENTATIONS
IMAGES_DIR = "images"
TRUTH_FILE = "truth.csv"
ERRORS_FILE = "errors.csv"


def parse_turns(text: str) -> Tuple[int, ...]:
    """'0,90,180,270' -> (0, 90, 180, 270); refuses anything but distinct quarter turns."""
    try:
        turns = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--turns takes quarter turns like 0,90,180,270, not {text!r}") from None
    if not turns or any(t not in TURNS for t in turns) or len(set(turns)) != len(turns):
        raise argparse.ArgumentTypeError(f"--turns takes distinct quarter turns (0, 90, 180, 270), not {text!r}")
    return turns


def sample(entries: Sequence[sources.SourceEntry], count: int, seed: int, root: str = ""
           ) -> List[sources.SourceEntry]:
    """`count` entries chosen by a hash of (seed, path under the input folder): the same choice on every run, and
    on every machine that holds the same files under another mount; in input order."""
    if count <= 0 or count >= len(entries):
        return list(entries)
    rank = sorted(entries,
                  key=lambda e: hashlib.sha1(f"{seed}:{sources.path_under(e.uri, root)}".encode()).hexdigest())
    chosen = {e.uri for e in rank[:count]}
    return [e for e in entries if e.uri in chosen]


def turned_copies(data: bytes, turns: Sequence[int], max_pixels: int = imaging.DEFAULT_MAX_PIXELS
                  ) -> List[Tuple[int, bytes, str, str]]:
    """[(turn, bytes, extension, method), ...] of an image (its first page) turned clockwise by each of `turns`.

    Decoded first as ingest and score decode it, so a bad file raises imaging.ImageError with their error kind.
    A JPEG's copies are all made the same way: all through jpegtran (lossless; turn 0 is then the file itself), or,
    when one turn cannot be (edge blocks), all re-encoded at quality 95, so that no turn carries a compression
    history the others lack."""
    from pipelines.score import upright_bytes

    next(imaging.decode_pages(data, max_pixels=max_pixels, max_pages=1))
    fmt = imaging.sniff_format(data)

    def copies(lossless: bool) -> List[Tuple[int, bytes, str, str]]:
        # upright_bytes undoes a clockwise turn; undoing (360 - t) turns the image t clockwise.
        made = [(turn, *upright_bytes(data, 0, (360 - turn) % 360, fmt, lossless_jpeg=lossless)) for turn in turns]
        if lossless and fmt == "jpeg" and len({method for *_, method in made}) > 1:
            return copies(False)
        return made

    return copies(True)


def _used(output: str) -> str:
    """Why `output` cannot take a new check set ('' when it can)."""
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.exists(FileSystems.join(output, TRUTH_FILE)):
        return f"{output} already holds a check set ({TRUTH_FILE}); choose an empty --output"
    images = FileSystems.join(output, IMAGES_DIR)
    if sources.is_remote(output):
        taken = any(m.metadata_list for m in FileSystems.match([images + "/**"], limits=[1]))
    else:
        taken = os.path.isdir(images) and any(os.scandir(images))
    return f"{images} already holds files (a run that stopped?); choose an empty --output" if taken else ""


def build(input_src: str, output: str, turns: Sequence[int] = TURNS, count: int = 0, seed: int = 0,
          max_file_mb: float = 1024.0, max_pixels: int = imaging.DEFAULT_MAX_PIXELS, progress=print
          ) -> Dict[str, int]:
    """Write the check set; returns its counts (inputs = images_written + failed, files = images * turns)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    if not sources.is_remote(output):
        output = os.path.abspath(output)  # truth.csv names the copies as score lists them
    if sources.inside_archive(output, input_src):
        raise ValueError(f"--output {output} is inside --input {input_src}: the turned copies would join the archive "
                         f"(and the next checkset or score of it); write them elsewhere")
    used = _used(output)
    if used:
        raise FileExistsError(used)
    listed = list(sources.list_archive(input_src))
    root = "" if sources.is_manifest(input_src) else (
        input_src if sources.is_remote(input_src) else os.path.abspath(input_src))
    entries = sample([e for e in listed if not e.error], count, seed, root)
    truth_rows, error_rows = [], [(e.uri, e.error_type, e.error) for e in listed if e.error]
    named: Dict[str, str] = {}  # copy path -> the input it was made from
    written = 0
    for index, entry in enumerate(entries, 1):
        try:
            copies = turned_copies(sources.read_input(entry, max_file_mb), turns, max_pixels)
            stem = posixpath.splitext(sources.path_under(entry.uri, root))[0]
            paths = [FileSystems.join(output, IMAGES_DIR, f"{stem}_t{turn}{extension}")
                     for turn, _, extension, _ in copies]
            clash = next((named[p] for p in paths if p in named), None)
            if clash:
                raise imaging.ImageError("name_clash", f"its copies would have the names of {clash}'s (the same "
                                                       f"name but for the extension); rename one of them")
        except imaging.ImageError as e:
            error_rows.append((entry.uri, e.kind, str(e)))
            continue
        except Exception as e:  # one bad input is a row of errors.csv, never the end of the run
            error_rows.append((entry.uri, "turn_failed", f"{type(e).__name__}: {e}"))
            continue
        stored = entry.orientation if entry.orientation in TURNS else 0
        for path, (turn, turned, _, method) in zip(paths, copies):
            with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                handle.write(turned)
            named[path] = entry.uri
            truth_rows.append((path, (stored + turn) % 360, entry.label, entry.uri, method))
        written += 1
        if progress and (index % 50 == 0 or index == len(entries)):
            progress(f"checkset: {index}/{len(entries)} images turned ({len(error_rows)} failed)")
    _write_csv(output, TRUTH_FILE, ("uri", "orientation", "label", "source_uri", "method"), truth_rows)
    _write_csv(output, ERRORS_FILE, ("uri", "error_type", "message"), error_rows)
    counts = {"listed": len(listed), "inputs": len(entries) + sum(1 for e in listed if e.error),
              "images_written": written, "failed": len(error_rows), "files": len(truth_rows),
              "methods": dict(sorted(collections.Counter(row[-1] for row in truth_rows).items()))}
    assert counts["inputs"] == counts["images_written"] + counts["failed"], counts
    return counts


def _write_csv(output: str, name: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from apache_beam.io.filesystems import FileSystems

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    with FileSystems.create(FileSystems.join(output, name)) as handle:
        handle.write(buffer.getvalue().encode())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = command_parser("archive-vision checkset", __doc__.splitlines()[0],
                            examples=("archive-vision checkset --input upright-sample/ --output check/",
                                      "archive-vision score --input check/images --output check-out "
                                      "--truth check/truth.csv"))
    parser.add_argument("--input", required=True,
                        help="images known to be upright: folder, gs://bucket/prefix, glob, or manifest .csv/.parquet "
                             "(a manifest's orientation column, where given, says how each is stored instead)")
    parser.add_argument("--output", required=True, help="empty folder (local or gs://) for the turned copies")
    parser.add_argument("--turns", type=parse_turns, default=TURNS, help="clockwise turns to write (default: all four)")
    parser.add_argument("--sample", type=int, default=0, help="use this many inputs, chosen by --seed (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-file-mb", type=float, default=1024.0,
                        help="larger inputs (MiB) are errors, not read (ingest's and score's limit)")
    parser.add_argument("--max-pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS,
                        help="larger images are errors, refused before decoding (ingest's limit)")
    args = parser.parse_args(argv)
    try:
        counts = build(args.input, args.output, args.turns, args.sample, args.seed, args.max_file_mb,
                       args.max_pixels)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"archive-vision checkset: {e}", file=sys.stderr)
        return 2
    out = args.output.rstrip("/")
    methods = ", ".join(f"{method} {n}" for method, n in counts["methods"].items()) or "none"
    print(f"checkset: {counts['inputs']} inputs: {counts['images_written']} turned into {counts['files']} files, "
          f"{counts['failed']} failed ({out}/{ERRORS_FILE}); truth in {out}/{TRUTH_FILE}\n"
          f"  copies made: {methods}\n"
          f"next: archive-vision score --input {out}/{IMAGES_DIR} --output SCORED --truth {out}/{TRUTH_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
