"""The progress line ingest and score print while they run: inputs done, rate and ETA, every few seconds.

    archive listing -> ShowProgress("score") -> the job's reading DoFn (fused: each input is counted as it goes in)

Each worker prints its own line straight to stderr: worker processes inherit the launcher's terminal, while their
logging is re-wrapped by the runner and filtered with the rest of Beam's chatter. The total comes from the listing
(a side input); the ETA assumes the workers share the inputs evenly (the Reshuffle after the listing spreads them),
with the worker count the pipeline options name (--direct_num_workers, --num_workers, --max_num_workers); where
they name none the line says what is done and how fast, without an ETA. Off under -q (decided on the launcher
from the logging level the command set, and carried to the workers with the DoFn).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

import apache_beam as beam

PROGRESS_SECONDS_ENV = "ARCHIVE_VISION_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 5.0


def progress_seconds() -> float:
    """Seconds between two lines of one worker ($ARCHIVE_VISION_PROGRESS_SECONDS, default 5)."""
    return float(os.environ.get(PROGRESS_SECONDS_ENV, DEFAULT_PROGRESS_SECONDS))


def progress_wanted() -> bool:
    """Whether the command's logging level shows progress (INFO or finer: not under -q)."""
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


def expected_workers(options) -> int:
    """How many workers share the inputs, from the pipeline options (0: not said)."""
    if options is None:
        return 0
    chosen = options.get_all_options()
    runner = chosen.get("runner") or "DirectRunner"
    runner = runner if isinstance(runner, str) else type(runner).__name__
    if runner in ("DirectRunner", "direct", "BundleBasedDirectRunner"):
        if chosen.get("direct_running_mode") in ("multi_processing", "multi_threading"):
            return int(chosen.get("direct_num_workers") or 1) or 1
        return 1
    return int(chosen.get("num_workers") or chosen.get("max_num_workers") or 0)


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """One worker's counter: `tick()` per input; every `every` seconds a line with done, rate and ETA."""

    def __init__(self, job: str, unit: str = "inputs", every: Optional[float] = None, enabled: bool = True,
                 workers: int = 0):
        self.job, self.unit, self.enabled, self.workers = job, unit, enabled, workers
        self.every = progress_seconds() if every is None else every
        self.start()

    def start(self, now: Optional[float] = None) -> None:
        self.started = time.monotonic() if now is None else now
        self.last = self.started
        self.done = 0

    def line(self, now: float, total: Optional[int] = None) -> str:
        """`[score worker 123] 120 inputs done, 3.4 inputs/s; about 1000 listed for 4 workers, ETA 3m40s`."""
        rate = self.done / max(now - self.started, 1e-9)
        text = f"  [{self.job} worker {os.getpid()}] {self.done} {self.unit} done, {rate:.1f} {self.unit}/s"
        if total and self.workers:
            share = total / self.workers
            left = max(share - self.done, 0.0)
            workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
            text += f"; {total} listed for {workers}, ETA {duration(left / rate) if rate > 0 else '?'}"
        elif total:
            text += f"; {total} listed"
        return text

    def tick(self, total: Optional[int] = None, now: Optional[float] = None) -> Optional[str]:
        """Count one input; print (and return) the line when `every` seconds have passed since the last."""
        self.done += 1
        now = time.monotonic() if now is None else now
        if not self.enabled or now - self.last < self.every:
            return None
        self.last = now
        text = self.line(now, total)
        print(text, file=sys.stderr, flush=True)
        return text


class _ProgressFn(beam.DoFn):
    """Passes every element through, counting it on this worker's ProgressLine."""

    def __init__(self, job: str, unit: str, enabled: bool, workers: int, every: float):
        self._args = (job, unit, every, enabled, workers)

    def setup(self):
        self._line = ProgressLine(*self._args)

    def process(self, element, total: int):
        self._line.tick(total)
        yield element


class ShowProgress(beam.PTransform):
    """entries -> the same entries, each worker printing its progress line (off under -q).

    Put it right before the DoFn that reads the inputs: the two fuse, so an input is counted as its reading starts.
    """

    def __init__(self, job: str, unit: str = "inputs", counted=None):
        """`counted`: the PCollection whose size is the total, when it is not the entries themselves. Give the
        listing before its Reshuffle: a side input made from the very entries this step reads makes the runner
        hold all of them (as Python objects, in the DirectRunner's launcher) until the count is known, where the
        listing's count is known by the time the shuffle's entries come out."""
        super().__init__()
        self._job = job
        self._unit = unit
        self._counted = counted

    def expand(self, entries):
        counted = entries if self._counted is None else self._counted
        total = counted | "CountInputs" >> beam.combiners.Count.Globally()
        workers = expected_workers(getattr(entries.pipeline, "_options", None))
        fn = _ProgressFn(self._job, self._unit, progress_wanted(), workers, progress_seconds())
        return entries | "Tick" >> beam.ParDo(fn, beam.pvalue.AsSingleton(total))
