"""`archive-vision ingest`: the Beam job that turns an image archive into TFRecord shards.

    archive -> ListArchive [-> JoinEarlier] -> DecodeImages (records | errors)
    records -> WriteShards (pipelines.shards) -> shards, manifest.parquet
    errors  -> errors.parquet

Outputs in DST: `<split>-NNNNN-of-MMMMM.tfrecord[.gz]`, manifest.parquet (one row per record, with its
shard), errors.parquet (one row per failed input or page), labels.json, run.json.
Every input file ends in the manifest or in errors: the run checks that and says so in run.json.
With --append, the files DST already holds are kept without being read and only new and changed ones are decoded,
into shards of their own (the joins: pipelines.ingest_append).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from archive_vision.local_processes import usable_cores
from pipelines import imaging, ingest_append, schema, sources
from pipelines.cli import (DEFAULT_MAX_FAILED_FRACTION, EXIT_USAGE, add_max_failed_fraction, command_parser,
                           configure_logging, exit_code, failed_inputs_check, failed_inputs_line,
                           return_freed_memory)
from pipelines.ingest_append import COUNTER_NAMESPACE, AppendError, EarlierRun, JoinEarlier
from pipelines.progress import ShowProgress
from pipelines.shards import WriteShards
from pipelines.tables import (ERRORS_SCHEMA, MANIFEST_SCHEMA, error_row, read_table, whole_file_failed,
                              write_job_tables)

LOG = logging.getLogger("archive_vision.ingest")
ERROR_STAGES = ("list", "read", "decode", "resize", "encode")

# Words that make a class a document class: its pictures hold text, and mirrored text is not a real
# scan, so its augmented copies are never flipped (the issue: "flip off by default for documents").
# Matched per word of the class name, plural "s" dropped: "handwritten_letters", "NewsPapers", "docs".
# Erring towards "document" only costs a flip augmentation; the other way trains on mirrored text.
DOCUMENT_CLASS_WORDS = frozenset({
    "document", "doc", "page", "text", "letter", "newspaper", "magazine", "manuscript", "typescript",
    "handwriting", "handwritten", "book", "form", "receipt", "invoice", "certificate", "map",
})


def is_document_class(name: str) -> bool:
    """Whether a class name says its images are documents (any word of it is in DOCUMENT_CLASS_WORDS)."""
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name) + re.findall(r"[a-z]+", name.lower())
    for word in words:  # camel-case words ("HandwrittenLetters") and whole runs of letters ("NewsPapers")
        word = word.lower()
        if word in DOCUMENT_CLASS_WORDS or (word.endswith("s") and word[:-1] in DOCUMENT_CLASS_WORDS):
            return True
    return False


def flip_allowed(label_name: str, text_archive: bool, no_flip_classes: Sequence[str]) -> bool:
    """May augmented copies of an image of class `label_name` be mirrored?

    Never in a text archive, for a class in --no-flip-classes, or for a document class (by name).
    Unlabelled images ("") are flipped unless the archive is declared text.
    """
    if text_archive or label_name in no_flip_classes:
        return False
    return not (label_name and is_document_class(label_name))


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """The job's own flags (everything else on the command line is a Beam pipeline option)."""

    input: str
    output: str
    size: int = 256
    resize_mode: str = "pad"
    image_format: str = "jpeg"
    quality: int = 90
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    max_file_mb: float = 1024.0
    max_pages: int = 1000
    labels: str = "auto"
    classes: Tuple[str, ...] = ()
    assume_upright: bool = False
    split_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    augment_copies: int = 0
    max_shift: float = 0.1
    text_archive: bool = False
    no_flip_classes: Tuple[str, ...] = ()
    compression: str = "none"
    shard_mb: float = 128.0
    num_shards: int = 0
    exclude: Tuple[str, ...] = ()
    overwrite: bool = False
    append: bool = False
    drop_removed: bool = False
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION

    def __post_init__(self):
        if self.resize_mode not in imaging.RESIZE_MODES:
            raise ValueError(f"--resize-mode must be one of {imaging.RESIZE_MODES}")
        if self.image_format not in imaging.OUTPUT_FORMATS:
            raise ValueError(f"--format must be one of {imaging.OUTPUT_FORMATS}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"--split-fractions must be three non-negative numbers summing to 1, got {self.split_fractions}")
        if self.compression not in ("none", "gzip"):
            raise ValueError("--compression must be none or gzip")
        if self.size < 8:
            raise ValueError("--size must be at least 8 pixels")

    @property
    def shard_suffix(self) -> str:
        return ".tfrecord.gz" if self.compression == "gzip" else ".tfrecord"


class DecodeImagesFn(beam.DoFn):
    """Read one input file and emit a record per page (plus augmented copies), or error rows.

    A thin shell over `pipelines.imaging`: it adds counters and failure routing (the progress line is
    pipelines.progress.ShowProgress, just before it). Under --append its inputs come read and counted already
    ({entry, data, sha256}: pipelines.ingest_append.ReadAgainstEarlierFn).
    """

    ERRORS = "errors"

    def __init__(self, options: IngestOptions):
        self._options = options
        self._inputs = Metrics.counter(COUNTER_NAMESPACE, "inputs")
        self._records = Metrics.counter(COUNTER_NAMESPACE, "records")
        self._errors = Metrics.counter(COUNTER_NAMESPACE, "errors")
        self._failed_inputs = Metrics.counter(COUNTER_NAMESPACE, "failed_inputs")
        self._files_read = Metrics.counter(COUNTER_NAMESPACE, "files_read")
        self._bytes_read = Metrics.counter(COUNTER_NAMESPACE, "bytes_read")
        self._ingested = Metrics.counter(COUNTER_NAMESPACE, "inputs_ingested")

    def _fail(self, uri, stage, kind, message, page=-1, sha="", fingerprint=""):
        self._errors.inc()
        Metrics.counter(COUNTER_NAMESPACE, f"errors_{kind}").inc()
        return beam.pvalue.TaggedOutput(self.ERRORS, error_row(uri, stage, kind, message, page, sha, fingerprint))

    def process(self, element, classes: Sequence[str]):
        opts = self._options
        if isinstance(element, sources.SourceEntry):
            entry, data, sha = element, None, None
            self._inputs.inc()
            if entry.error:
                self._failed_inputs.inc()
                yield self._fail(entry.uri, "list", entry.error_type, entry.error)
                return
        else:
            entry, data, sha = element["entry"], element["data"], element["sha256"]
        label_index = schema.UNKNOWN
        if entry.label:
            if entry.label not in classes:
                self._failed_inputs.inc()
                yield self._fail(entry.uri, "list", "unknown_label",
                                 f"label {entry.label!r} is not one of --classes {list(classes)}")
                return
            label_index = list(classes).index(entry.label)
        if data is None:
            try:
                data = sources.read_input(entry, opts.max_file_mb)
            except imaging.ImageError as e:
                self._failed_inputs.inc()
                yield self._fail(entry.uri, "read", e.kind, str(e))
                return
            self._files_read.inc()
            self._bytes_read.inc(len(data))
            sha = imaging.content_sha256(data)
        split = entry.split or imaging.split_for(sha, opts.split_fractions)
        orientation = entry.orientation
        if orientation == schema.UNKNOWN and opts.assume_upright:
            orientation = 0
        emitted = 0
        try:
            for page in imaging.decode_pages(data, max_pixels=opts.max_pixels, max_pages=opts.max_pages,
                                             draft_for=(opts.size, opts.resize_mode)):
                for record in self._records_for_page(entry, page, sha, split, label_index,
                                                     classes, orientation):
                    emitted += 1
                    self._records.inc()
                    yield record
        except imaging.ImageError as e:
            if emitted == 0:
                self._failed_inputs.inc()
            yield self._fail(entry.uri, "decode", e.kind, str(e), e.page, sha, whole_file_failed(emitted, entry))
        except Exception as e:  # anything Pillow throws that we did not foresee still becomes a row
            if emitted == 0:
                self._failed_inputs.inc()
            yield self._fail(entry.uri, "decode", "corrupt", f"{type(e).__name__}: {e}", -1, sha,
                        whole_file_failed(emitted, entry))
        if emitted:
            self._ingested.inc()

    def _records_for_page(self, entry, page, sha, split, label_index, classes, orientation):
        opts = self._options
        resized = imaging.resize(page.image, opts.size, opts.resize_mode)
        label_name = classes[label_index] if label_index >= 0 else ""
        copies = opts.augment_copies if split == "train" else 0
        allow_flip = flip_allowed(label_name, opts.text_archive, opts.no_flip_classes)
        for index in range(copies + 1):
            pixels, copy_orientation = resized, orientation
            if index:
                seed = int(hashlib.sha256(f"{sha}:{page.page}:{index}".encode()).hexdigest()[:12], 16)
                pixels, mirrored = imaging.augment_copy(resized, seed, allow_flip=allow_flip,
                                                        max_shift=opts.max_shift)
                if mirrored:
                    # A mirrored copy of a page stored turned 90 is a mirrored upright turned 270.
                    copy_orientation = imaging.mirrored_orientation(orientation)
            yield schema.ImageRecord(
                encoded=imaging.encode(pixels, opts.image_format, opts.quality), format=opts.image_format,
                height=pixels.size[1], width=pixels.size[0], source_uri=entry.uri, page=page.page, sha256=sha,
                original_height=page.original_height, original_width=page.original_width,
                exif_orientation=page.exif_orientation, label_index=label_index, label_name=label_name,
                orientation=copy_orientation, split=split, augment_index=index, fingerprint=entry.fingerprint)


def _write_labels(classes: Sequence[str], output: str, source: str) -> None:
    payload = json.dumps({"classes": list(classes), "source": source}, indent=2).encode()
    with FileSystems.create(FileSystems.join(output, "labels.json")) as handle:
        handle.write(payload)


class DistributeEntries(beam.PTransform):
    """Listed entries -> the same entries spread over the workers (a Reshuffle: the listing is one element's work).

    They cross the shuffle as plain tuples (SourceEntry.fields).
    """

    def expand(self, entries):
        return (entries
                | "AsFields" >> beam.Map(sources.SourceEntry.fields)
                | "Reshuffle" >> beam.Reshuffle()
                | "AsEntries" >> beam.Map(sources.SourceEntry.from_fields))


def _distinct_labels(listed):
    """The labels of the listed files (those the listing could not read left out), each once."""
    return (listed
            | "Labels" >> beam.FlatMap(lambda e: [e.label] if e.label and not e.error else [])
            | "DistinctLabels" >> beam.Distinct())


class IngestArchive(beam.PTransform):
    """archive path -> {records, errors, manifest_rows (shard: a part id, or an earlier shard's name), shard_names
    ({part id: shard file}), classes}: the whole ingest graph but the table writes. With `earlier` (--append), the
    set's rows join the listing (pipelines.ingest_append.JoinEarlier) and only what it does not hold is decoded."""

    def __init__(self, options: IngestOptions, temp_dir: str, earlier: Optional[EarlierRun] = None):
        super().__init__()
        self._options = options
        self._temp_dir = temp_dir
        self._earlier = earlier

    def expand(self, pbegin) -> Dict[str, beam.PCollection]:
        opts, earlier = self._options, self._earlier
        label_mode = sources.resolve_label_mode(opts.input, opts.labels)
        listed = (pbegin
                  | "Source" >> beam.Create([opts.input])
                  | "ListArchive" >> beam.FlatMap(sources.list_archive, label_mode, list(opts.exclude)))
        if earlier is not None:  # its join spreads the entries over the workers: no Reshuffle before it
            return self._append(listed, earlier)
        entries = listed | "Distribute" >> DistributeEntries()
        # The classes and the progress line's total come from the listing before its Reshuffle, not from the
        # entries the decoding reads: side inputs made from those would make the runner hold every entry until
        # they are known.
        if opts.classes:
            classes = pbegin | "PinnedClasses" >> beam.Create([list(opts.classes)])
        else:
            classes = (_distinct_labels(listed)
                       | "SortedClasses" >> beam.combiners.ToList()
                       | "Sort" >> beam.Map(sorted))
        _ = classes | "WriteLabels" >> beam.Map(_write_labels, opts.output, label_mode)
        decoded = entries | "Progress" >> ShowProgress("ingest", counted=listed) | "DecodeImages" >> beam.ParDo(
            DecodeImagesFn(opts), beam.pvalue.AsSingleton(classes)).with_outputs(DecodeImagesFn.ERRORS,
                                                                                 main="records")
        written = decoded.records | "WriteShards" >> WriteShards(
            self._temp_dir, opts.output, compression=opts.compression, shard_mb=opts.shard_mb,
            num_shards=opts.num_shards, suffix=opts.shard_suffix)
        return {"records": decoded.records, "errors": decoded[DecodeImagesFn.ERRORS], "manifest_rows": written["rows"],
                "shard_names": written["shard_names"], "classes": classes}

    def _append(self, listed, earlier: EarlierRun) -> Dict[str, beam.PCollection]:
        """The --append graph: the set's classes (checked against the listing's labels, before anything is decoded:
        DecodeImages waits for them), the joins, then decoding and shards for what the set does not hold."""
        opts = self._options
        classes = (_distinct_labels(listed)
                   | "AllLabels" >> beam.combiners.ToList()
                   | "CheckClasses" >> beam.Map(ingest_append.checked_classes, earlier.classes, earlier.pinned))
        joined = listed | "JoinEarlier" >> JoinEarlier(earlier, opts.assume_upright, opts.max_file_mb,
                                                       opts.drop_removed)
        decoded = joined["fresh"] | "DecodeImages" >> beam.ParDo(
            DecodeImagesFn(opts), beam.pvalue.AsSingleton(classes)).with_outputs(DecodeImagesFn.ERRORS,
                                                                                 main="records")
        written = decoded.records | "WriteShards" >> WriteShards(
            self._temp_dir, opts.output, compression=opts.compression, shard_mb=opts.shard_mb,
            num_shards=opts.num_shards, suffix=opts.shard_suffix, tag=earlier.tag)
        rows = (written["rows"], *joined["rows"])  # written part by part (pipelines.tables.WriteTable)
        errors = (decoded[DecodeImagesFn.ERRORS], *joined["errors"])
        return {"records": decoded.records, "errors": errors, "manifest_rows": rows,
                "shard_names": written["shard_names"], "classes": classes}


def build_pipeline(pipeline: beam.Pipeline, opts: IngestOptions, temp_dir: str,
                   earlier: Optional[EarlierRun] = None) -> Dict[str, beam.PCollection]:
    """Wire ingest and its table writes onto `pipeline`; returns the IngestArchive outputs for tests. An append's
    manifest names its run's tag in its footer (pipelines.ingest_append.prepare_append reads it)."""
    outputs = pipeline | "Ingest" >> IngestArchive(opts, temp_dir, earlier)
    manifest_schema = MANIFEST_SCHEMA.with_metadata({ingest_append.SHARD_TAG_KEY: earlier.tag.encode()}) \
        if earlier is not None else MANIFEST_SCHEMA
    write_job_tables(outputs, opts.output, [("manifest_rows", "manifest", manifest_schema,
                                             ("shard", outputs["shard_names"])),
                                            ("errors", "errors", ERRORS_SCHEMA)])
    return outputs


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[IngestOptions, List[str]]:
    """Split the job's flags from Beam's pipeline options (`parse_known_args`, as Beam examples do)."""
    parser = command_parser(
        "archive-vision ingest",
        examples=("archive-vision ingest --input /scans --output shards --labels folders",
                  "archive-vision ingest --input scans.csv --output gs://b/ingested --assume-upright \\",
                  "    --runner DataflowRunner --project P --region R --temp_location gs://b/tmp"),
        description="Turn an image archive (folder, gs:// prefix, glob, or CSV/Parquet manifest with a 'uri' "
                    "column) into TFRecord shards + manifest.parquet + errors.parquet. Unknown flags are passed "
                    "to Beam (e.g. --runner DataflowRunner --project P --region R --temp_location gs://...).")
    parser.add_argument("--input", required=True, help="folder, gs://bucket/prefix, glob, or manifest .csv/.parquet")
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (square; default 256)")
    parser.add_argument("--resize-mode", choices=imaging.RESIZE_MODES, default="pad",
                        help="pad: letterbox, whole image kept (default); crop: centre crop; stretch")
    parser.add_argument("--format", dest="image_format", choices=imaging.OUTPUT_FORMATS, default="jpeg")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of stored images")
    parser.add_argument("--max-pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS,
                        help="refuse images larger than this many pixels before decoding (decompression bombs)")
    parser.add_argument("--max-file-mb", type=float, default=1024.0, help="refuse input files larger than this")
    parser.add_argument("--max-pages", type=int, default=1000, help="most pages taken from one multi-page TIFF")
    parser.add_argument("--labels", choices=sources.LABEL_MODES, default="auto",
                        help="where class labels come from (auto: manifest column, or folder names when the "
                             "input folder holds only sub-folders)")
    parser.add_argument("--classes", default="", help="comma-separated class names, pinning their order")
    parser.add_argument("--assume-upright", action="store_true",
                        help="the archive is upright: record orientation 0 where the manifest does not say")
    parser.add_argument("--split-fractions", default="0.8,0.1,0.1", help="train,val,test fractions")
    parser.add_argument("--augment-copies", type=int, default=0, help="extra augmented copies per train image")
    parser.add_argument("--max-shift", type=float, default=0.1, help="largest augmentation shift, fraction of size")
    parser.add_argument("--text-archive", action="store_true", help="the archive is text: never flip")
    parser.add_argument("--no-flip-classes", default="",
                        help="comma-separated classes holding text, never flipped; added to the document classes "
                             "that are never flipped anyway (names with a word such as document, page, text, "
                             "letter, newspaper, manuscript, book, form, map)")
    parser.add_argument("--compression", choices=("none", "gzip"), default="none")
    parser.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MB")
    parser.add_argument("--num-shards", type=int, default=0, help="fixed shards per split (0: from --shard-mb)")
    parser.add_argument("--exclude", action="append", default=[], help="file-name glob to skip (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in --output")
    parser.add_argument("--append", action="store_true",
                        help="add the input's new and changed files to the set in --output: files it holds (same "
                             "uri, same listing fingerprint) are not read, new records go into shards of their own, "
                             "the records of changed files are marked superseded; the set's record options apply")
    parser.add_argument("--drop-removed", action="store_true",
                        help="with --append: also mark superseded the records of files that no longer exist (deleted "
                             "or taken down), so training stops reading them; without it an append never removes "
                             "what it is not shown")
    add_max_failed_fraction(parser)
    known, beam_args = parser.parse_known_args(argv)
    unknown = unknown_beam_args(beam_args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither ingest's flags nor Beam pipeline options)")
    if known.append and known.overwrite:
        parser.error("--append adds to the set in --output, --overwrite replaces it: pass one")
    if known.drop_removed and not known.append:
        parser.error("--drop-removed goes with --append (a first run or --overwrite holds only what it lists)")
    fractions = tuple(float(x) for x in known.split_fractions.split(","))
    if len(fractions) != 3:
        parser.error("--split-fractions takes three numbers")

    def names(text):
        return tuple(x.strip() for x in text.split(",") if x.strip())

    try:
        opts = IngestOptions(
            input=known.input, output=known.output.rstrip("/"), size=known.size, resize_mode=known.resize_mode,
            image_format=known.image_format, quality=known.quality, max_pixels=known.max_pixels,
            max_file_mb=known.max_file_mb, max_pages=known.max_pages, labels=known.labels,
            classes=names(known.classes), assume_upright=known.assume_upright, split_fractions=fractions,
            augment_copies=known.augment_copies, max_shift=known.max_shift, text_archive=known.text_archive,
            no_flip_classes=names(known.no_flip_classes), compression=known.compression, shard_mb=known.shard_mb,
            num_shards=known.num_shards, exclude=tuple(known.exclude), overwrite=known.overwrite, append=known.append,
            drop_removed=known.drop_removed, max_failed_fraction=known.max_failed_fraction)
    except ValueError as e:
        parser.error(str(e))
    return opts, beam_args


def unknown_beam_args(beam_args: Sequence[str]) -> List[str]:
    """The flags among a command's leftover arguments that no Beam PipelineOptions class knows: a mistyped or
    removed flag of the command itself, which Beam would drop with a warning and the run would go on without."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - how PipelineOptions itself builds its parser
    _, unknown = parser.parse_known_args(list(beam_args))
    return [arg for arg in unknown if arg.startswith("-")]


def default_pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam options; on the DirectRunner default to multi-processing, one worker per core this job may use
    (archive_vision.local_processes.usable_cores: its CPU affinity and container quota, not the host's count)."""
    beam_args = list(beam_args)
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "direct") and not any(a.startswith("--direct_running_mode") for a in beam_args):
        beam_args += ["--direct_running_mode=multi_processing"]
        if not any(a.startswith("--direct_num_workers") for a in beam_args):
            beam_args += [f"--direct_num_workers={usable_cores()}"]
        options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False  # every DoFn lives in an importable module
    return options


def runner_record(pipeline: beam.Pipeline) -> Dict[str, object]:
    """run.json's `runner`: which Beam runner ran the job and, on the DirectRunner, its mode and worker count."""
    options = getattr(pipeline, "_options", None) or PipelineOptions([])
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    record: Dict[str, object] = {"runner": runner if isinstance(runner, str) else type(runner).__name__}
    if record["runner"] in ("DirectRunner", "direct"):
        chosen = options.get_all_options()
        record.update(direct_running_mode=chosen.get("direct_running_mode"),
                      direct_num_workers=chosen.get("direct_num_workers"))
    return record


def shard_sizes(output: str) -> Dict[str, int]:
    """{shard file name: bytes} of the shards in `output`."""
    found = {}
    for split in schema.SPLITS:
        for match in FileSystems.match([FileSystems.join(output, f"{split}-*-of-*.tfrecord*")]):
            found.update({m.path.rstrip("/").split("/")[-1]: int(m.size_in_bytes) for m in match.metadata_list})
    return found


def existing_shards(output: str) -> List[str]:
    """Shard files an earlier run left in `output`."""
    return [FileSystems.join(output, name) for name in sorted(shard_sizes(output))]


def summarize(output: str, opts: IngestOptions, elapsed: float, metrics: Dict[str, int],
              runner: Optional[Dict[str, object]] = None, shard_tag: str = "") -> dict:
    """run.json: options, versions, counts per split and error kind, and whether they reconcile (an append's: its
    inputs from the counters, the set's records from its tables, pipelines.ingest_append.append_counts)."""
    import platform

    import PIL

    counts = ingest_append.append_counts(metrics, ingest_append.table_counts(output)) if shard_tag \
        else _run_counts(output, metrics)
    classes: List[str] = []
    labels_path = FileSystems.join(output, "labels.json")
    if FileSystems.exists(labels_path):
        with FileSystems.open(labels_path) as handle:
            classes = json.loads(handle.read().decode())["classes"]
    # Which classes' copies may be mirrored, resolved from the flags and the document-class rule.
    never_flipped = [c for c in classes if not flip_allowed(c, opts.text_archive, opts.no_flip_classes)]
    return {
        "job": "ingest", "options": dataclasses.asdict(opts), "runner": runner or {}, "counts": counts,
        "failed_inputs": failed_inputs_check(counts, opts.max_failed_fraction),
        "elapsed_seconds": round(elapsed, 3),
        "augmentation": {"copies_per_train_image": opts.augment_copies,
                         "flip_unlabelled": flip_allowed("", opts.text_archive, opts.no_flip_classes),
                         "never_flipped_classes": never_flipped},
        "images_per_second": round(counts["inputs"] / elapsed, 2) if elapsed > 0 else None,
        # What the trainer checks before it takes its split sizes from the manifest (trainer.input.count_split); an
        # append also checks that every shard in the folder is one of them (ingest_append.prepare_append).
        "shard_bytes": shard_sizes(output),
        "shard_tag": shard_tag,  # the tag of this run's shards ("" for a first run), as the manifest's footer says
        "versions": {"archive_vision": _version(), "apache_beam": beam.__version__, "pillow": PIL.__version__,
                     "python": platform.python_version()},
    }


def _run_counts(output: str, metrics: Dict[str, int]) -> dict:
    """A first run's counts: its tables hold exactly its inputs."""
    manifest = read_table(FileSystems.join(output, "manifest.parquet"), MANIFEST_SCHEMA)
    errors = read_table(FileSystems.join(output, "errors.parquet"), ERRORS_SCHEMA)
    ok_uris = set(manifest.column("source_uri").to_pylist())
    failed_uris = set(errors.column("uri").to_pylist()) - ok_uris
    per_split: Dict[str, int] = {}
    for split in manifest.column("split").to_pylist():
        per_split[split] = per_split.get(split, 0) + 1
    per_kind: Dict[str, int] = {}
    for kind in errors.column("error_type").to_pylist():
        per_kind[kind] = per_kind.get(kind, 0) + 1
    inputs = metrics.get("inputs", len(ok_uris) + len(failed_uris))
    counts = {
        "inputs": inputs, "inputs_ok": len(ok_uris), "inputs_failed": len(failed_uris),
        "records": manifest.num_rows, "errors": errors.num_rows, "records_per_split": per_split,
        "errors_per_type": per_kind,
        "augmented_records": sum(1 for i in manifest.column("augment_index").to_pylist() if i > 0),
        "files_read": metrics.get("files_read", 0), "bytes_read": metrics.get("bytes_read", 0),
    }
    counts["reconciled"] = counts["inputs"] == counts["inputs_ok"] + counts["inputs_failed"]
    return counts


def _version() -> str:
    from archive_vision import __version__
    return __version__


def metric_totals(result, namespace: str = COUNTER_NAMESPACE) -> Dict[str, int]:
    """A finished pipeline's counters in `namespace`, summed over steps ({} where the runner reports none)."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))
    except Exception:  # some runners do not report metrics; the tables are the ground truth anyway
        return {}
    totals: Dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None,
        extend_pipeline=None) -> dict:
    """Run the ingest job and return the run.json summary.

    `extend_pipeline(outputs)` may add checks (e.g. `assert_that`) to the graph before it runs.
    """
    opts, beam_args = parse_args(argv)
    FileSystems.mkdirs(opts.output) if not FileSystems.exists(opts.output) else None
    run_json = FileSystems.join(opts.output, "run.json")
    earlier = ingest_append.prepare_append(opts.output, shard_sizes(opts.output)) if opts.append else None
    if earlier is not None:
        defaults = {field.name: field.default for field in dataclasses.fields(IngestOptions)}
        opts = dataclasses.replace(opts, **ingest_append.inherited_options(dataclasses.asdict(opts), defaults,
                                                                           earlier))
        LOG.info("appending to %s (%d classes); this run's shards are tagged %s", opts.output, len(earlier.classes),
                 earlier.tag)
    stale = existing_shards(opts.output) if earlier is None else []
    if stale and opts.overwrite and FileSystems.exists(run_json):
        # Gone before any shard changes: an earlier run's run.json must never vouch for this run's shards.
        FileSystems.delete([run_json])
    if stale:
        if not opts.overwrite:
            raise SystemExit(f"archive-vision ingest: {opts.output} already holds {len(stale)} shards from an earlier "
                             f"run; pass --overwrite to replace them")
        FileSystems.delete(stale)
    temp_dir = FileSystems.join(opts.output, f".temp-ingest-{uuid.uuid4().hex[:12]}")
    FileSystems.mkdirs(temp_dir)
    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=default_pipeline_options(beam_args))
    outputs = build_pipeline(pipeline, opts, temp_dir, earlier)
    if extend_pipeline is not None:
        extend_pipeline(outputs)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        try:
            FileSystems.delete([temp_dir])
        except Exception:  # nothing left to clean once every shard was renamed
            pass
    summary = summarize(opts.output, opts, time.time() - started, metric_totals(result), runner_record(pipeline),
                        earlier.tag if earlier is not None else "")
    with FileSystems.create(run_json) as handle:
        handle.write(json.dumps(summary, indent=2, default=str).encode())
    return summary


def format_summary(summary: dict, output: str) -> str:
    """The few lines a person reads after the run (after an append: what it kept, added and superseded, and the
    set's records)."""
    c = summary["counts"]
    splits = ", ".join(f"{k} {v}" for k, v in sorted(c["records_per_split"].items())) or "none"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["errors_per_type"].items())) or "none"
    reconciled = "reconciled" if c["reconciled"] else "NOT RECONCILED"
    lines = [f"ingest finished in {summary['elapsed_seconds']:.1f}s ({summary['images_per_second']} inputs/s)"]
    if summary.get("shard_tag"):
        lines += [
            f"  inputs   {c['inputs']}  (kept unread {c['inputs_reused_by_listing']}, kept once read "
            f"{c['inputs_reused_by_content']}, ingested {c['inputs_ingested']}, failed {c['inputs_failed']}"
            + (f" ({c['inputs_failed_before']} failed before and unchanged, unread)"
               if c.get("inputs_failed_before") else "") + f")  {reconciled}",
            f"  appended {c['records_added']} records in {summary['shard_tag']} shards, {c['records_superseded']} "
            f"superseded ({c['inputs_changed']} files changed, {c['inputs_moved']} moved, "
            f"{c.get('inputs_removed', 0)} removed), {c['files_read']} files read",
            f"  set      {c['records']} records  ({splits}; {c['augmented_records']} augmented; "
            f"{c['superseded_records']} superseded)"]
    else:
        lines += [f"  inputs   {c['inputs']}  (ok {c['inputs_ok']}, failed {c['inputs_failed']})  {reconciled}",
                  f"  records  {c['records']}  ({splits}; {c['augmented_records']} augmented)"]
    lines += [f"  errors   {c['errors']}  ({kinds})",
              f"  output   {output}  (manifest.parquet, errors.parquet, labels.json, run.json)"]
    failed = failed_inputs_line(summary)
    return "\n".join(lines + ([failed] if failed else []))


def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_logging(argv if argv is not None else sys.argv[1:])
    return_freed_memory()  # before the runner starts its workers
    # Worker-side warnings relayed by the local job service are start-up chatter; errors still show.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    try:
        summary = run(argv)
    except AppendError as e:
        print(f"archive-vision ingest: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a run stopped by new classes says why (the runner may have wrapped the exception)
        message = ingest_append.new_classes_message(e)
        if not message:
            raise
        print(f"archive-vision ingest: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(summary, summary["options"]["output"]))
    # run() wrote every table and run.json first: 1 when the counts do not reconcile, 3 over --max-failed-fraction.
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
