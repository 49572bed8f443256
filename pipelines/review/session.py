"""The review queue of a score run and the state every reviewer's page shares: which pages are left, who holds which,
the answers (through corrections.CorrectionsJournal), progress and pace.

Order: least sure first, in groups. A group is the pages with the same answer from the model (how the page is shown),
in the same source folder, of the same class: scans of one box or batch, fed the same way and of one kind, which a
person judges alike at a glance, so the page offers to accept the shown part of a group with one key. Groups come
in the order of their least sure page, and pages within a group least sure first.
"""
from __future__ import annotations

import dataclasses
import datetime
import posixpath
import threading
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from pipelines import corrections
from pipelines.schema import ORIENTATIONS

DEFAULT_DECISIONS = ("review",)
HEAD_SIZE = 24  # the pages a tab holds ahead (shown, prefetched, offered as the group strip)
LEASED = 4  # of those, the first few (the shown page and the next) are kept from the other tabs...
LEASE_SECONDS = 90.0  # ...until this long after the tab's last call (a closed tab lets them go then)
PACE_ANSWERS = 20  # the pace figure: items per minute over this many latest answers


class ReviewError(ValueError):
    """A request the queue cannot honour (an unknown page or answer): the page is told why (HTTP 400)."""


@dataclasses.dataclass
class Item:
    """One page to review: a (sha256, page) of the results (duplicate files are one item)."""

    index: int
    uri: str
    page: int
    sha256: str
    model_orientation: int  # -1: the model gave no orientation (the page is shown as stored)
    confidence: Optional[float]
    reason: str
    class_name: str
    decision: str
    group: str
    result: dict
    also_at: List[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> corrections.Key:
        return (self.sha256, self.page)

    def public(self) -> dict:
        """What the page needs to show and answer it."""
        return {"index": self.index, "uri": self.uri, "page": self.page, "sha256": self.sha256,
                "model_orientation": self.model_orientation, "confidence": self.confidence, "reason": self.reason,
                "class_name": self.class_name, "decision": self.decision, "group": self.group,
                "also_at": self.also_at[:5], "also_at_count": len(self.also_at),
                "image": f"img/{self.sha256}/{self.page}.jpg"}


def _folder(uri: str) -> str:
    return posixpath.dirname(uri.replace("\\", "/")) or "."


def _group_name(model_orientation: int, folder: str, class_name: str) -> str:
    shown = (f"model: turned {model_orientation}°" if model_orientation in ORIENTATIONS and model_orientation
             else "model: upright" if model_orientation == 0 else "model: no orientation")
    return " · ".join(part for part in (shown, folder, class_name) if part)


def build_queue(results: Iterable[Mapping], decisions: Sequence[str] = DEFAULT_DECISIONS) -> List[Item]:
    """The pages of `results` whose decision is one of `decisions`, grouped and least sure first."""
    by_key: Dict[corrections.Key, Item] = {}
    for row in results:
        if row.get("decision") not in decisions:
            continue
        key = (row["sha256"], int(row["page"]))
        held = by_key.get(key)
        if held is not None:
            if row["uri"] != held.uri and row["uri"] not in held.also_at:
                held.also_at.append(row["uri"])
            continue
        orientation = row.get("orientation_degrees")
        orientation = int(orientation) if orientation is not None and int(orientation) in ORIENTATIONS else -1
        confidence = row.get("orientation_confidence")
        class_name = row.get("class_name") or ""
        by_key[key] = Item(index=-1, uri=row["uri"], page=key[1], sha256=key[0], model_orientation=orientation,
                           confidence=None if confidence is None else float(confidence),
                           reason=row.get("review_reason") or "", class_name=class_name,
                           decision=row["decision"], group=_group_name(orientation, _folder(row["uri"]), class_name),
                           result=dict(row))

    def sureness(item: Item) -> float:
        return -1.0 if item.confidence is None else item.confidence

    groups: Dict[str, List[Item]] = {}
    for item in sorted(by_key.values(), key=lambda i: (sureness(i), i.uri, i.page)):
        groups.setdefault(item.group, []).append(item)
    ordered = [item for _, members in sorted(groups.items(), key=lambda g: (sureness(g[1][0]), g[0]))
               for item in members]
    for index, item in enumerate(ordered):
        item.index = index
    return ordered


def _pace(times: List[datetime.datetime]) -> Optional[float]:
    """Items per minute over the latest PACE_ANSWERS answer times (None with fewer than two)."""
    times = sorted(times)[-PACE_ANSWERS:]
    if len(times) < 2:
        return None
    span = (times[-1] - times[0]).total_seconds()
    return round((len(times) - 1) * 60.0 / span, 1) if span > 0 else None


class ReviewSession:
    """The queue, the journal and the tabs' leases behind one review server."""

    def __init__(self, run_dir: str, items: List[Item], journal: corrections.CorrectionsJournal, reviewer: str,
                 results: Sequence[Mapping] = (), head_size: int = HEAD_SIZE, lease_seconds: float = LEASE_SECONDS):
        self.run_dir = run_dir
        self.items = items
        self.journal = journal
        self.reviewer = reviewer
        self.head_size = head_size
        self.lease_seconds = lease_seconds
        self._by_key = {item.key: item for item in items}
        self._by_uri: Dict[Tuple[str, int], Item] = {(item.uri, item.page): item for item in items}
        for item in items:
            for uri in item.also_at:
                self._by_uri.setdefault((uri, item.page), item)
        self._decisions = {(row["uri"], int(row["page"])): row.get("decision") for row in results}
        self._leases: Dict[int, Tuple[str, float]] = {}  # item index -> (client, expires at, monotonic)
        self._lock = threading.Lock()
        self._table_version = journal.version

    def item(self, sha256: str, page: int) -> Optional[Item]:
        return self._by_key.get((sha256, page))

    def _resolve(self, answer: Mapping) -> Item:
        uri, page = answer.get("uri"), answer.get("page", 0)
        if not isinstance(uri, str) or not uri:
            raise ReviewError("each answer needs the page's uri")
        try:
            page = int(page)
        except (TypeError, ValueError):
            raise ReviewError(f"page must be a whole number, got {page!r}") from None
        item = self._by_uri.get((uri, page))
        if item is None:
            decision = self._decisions.get((uri, page))
            if decision is None:
                raise ReviewError(f"{uri} (page {page}) is not in the results of {self.run_dir}")
            raise ReviewError(f"{uri} (page {page}) is not in the review queue (its decision is {decision!r})")
        label = answer.get("answer")
        if label not in corrections.ANSWERS:
            raise ReviewError(f"unknown answer {label!r} for {uri} (one of {', '.join(corrections.ANSWERS)})")
        if label == "accept" and item.model_orientation not in ORIENTATIONS:
            raise ReviewError(f"{uri} (page {page}): the model gave no orientation to accept; say how it turns")
        return item

    def answer(self, client: str, answers: Sequence[Mapping]) -> dict:
        """Record the answers (all or none: every one is checked first); returns their entries and the state."""
        if not isinstance(answers, (list, tuple)) or not answers:
            raise ReviewError("no answers given (answers: [{uri, page, answer}, ...])")
        items = [self._resolve(a) for a in answers]
        rows = [corrections.correction_row(item.result, a["answer"], self.reviewer) for item, a in zip(items, answers)]
        for item, row in zip(items, rows):  # the item's first URI and page, as the results name it
            row.update(uri=item.uri, page=item.page)
        entries = self.journal.record(rows)
        self._write_table()
        state = self.state(client)
        state["recorded"] = [{"id": e["id"], "batch": e["batch"], "uri": e["uri"], "sha256": e["sha256"],
                              "page": e["page"], "answer": e["label"]} for e in entries]
        return state

    def undo(self, client: str, ids: Sequence[str]) -> dict:
        """Retract answers by id; their pages come back to the queue unless another answer of theirs stands."""
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
            raise ReviewError("undo needs ids: [answer id, ...]")
        try:
            self.journal.retract(list(ids), self.reviewer)
        except corrections.CorrectionsError as e:
            raise ReviewError(str(e)) from e
        self._write_table()
        return self.state(client)

    def _write_table(self) -> None:
        version = self.journal.version
        self.journal.write_table()
        self._table_version = version

    def refresh(self) -> int:
        """Read the other writers' new answers; rewrite the table if any came (it is last-writer-wins between
        processes, so each converges it to the whole journal). Returns how many journal objects were new."""
        new = self.journal.refresh()
        if new or self.journal.version != self._table_version:
            self._write_table()
        return len(new)

    def _head(self, client: str, answered) -> List[Item]:
        """This tab's next pages: those no other tab holds first, then (rather than nothing) those they hold; the
        first LEASED of them become this tab's to hold."""
        now = time.monotonic()
        free: List[Item] = []
        held: List[Item] = []
        with self._lock:
            for item in self.items:
                if item.key in answered:
                    continue
                holder = self._leases.get(item.index)
                if holder is not None and holder[0] != client and holder[1] > now:
                    if len(held) < self.head_size:
                        held.append(item)
                    continue
                free.append(item)
                if len(free) >= self.head_size:
                    break
            for index, holder in list(self._leases.items()):
                if holder[0] == client or holder[1] <= now:
                    del self._leases[index]
            for item in free[:LEASED]:
                self._leases[item.index] = (client, now + self.lease_seconds)
        return (free + held)[:self.head_size]

    def state(self, client: str = "") -> dict:
        """What a page shows: progress, pace, its reviewer's latest answers (for undo) and its next pages."""
        rows = self.journal.rows()
        standing = corrections.latest(rows)
        answered = {key for key in standing if key in self._by_key}
        mine = [r for r in rows if r["reviewer"] == self.reviewer]
        recent: Dict[str, dict] = {}
        for entry in self.journal.recent(self.reviewer):
            recent.setdefault(entry["batch"], {"batch": entry["batch"], "answers": []})["answers"].append(
                {"id": entry["id"], "uri": entry["uri"], "sha256": entry["sha256"], "page": entry["page"],
                 "answer": entry["label"]})
        head = self._head(client, answered) if client else []
        return {"run_dir": self.run_dir, "reviewer": self.reviewer, "total": len(self.items),
                "done": len(answered), "left": len(self.items) - len(answered),
                "pace": _pace([r["answered_at"] for r in rows]),
                "pace_reviewer": _pace([r["answered_at"] for r in mine]),
                "answers": len(rows), "recent": list(recent.values()),
                "head": [item.public() for item in head]}
