"""The review page's HTTP server (the standard library's ThreadingHTTPServer): the page, its state and answers as
JSON, and the pages' pictures as cached JPEG thumbnails, made ahead of the reviewer.

    GET  /                          the page (pipelines/review/page.html; nothing fetched from elsewhere)
    GET  /api/state?client=ID       progress, pace, the reviewer's latest answers, the next pages for this tab
    POST /api/answer  {client, answers: [{uri, page, answer}, ...]}   -> the state, with the recorded answers' ids
    POST /api/undo    {client, ids: [...]}                              -> the state
    GET  /img/SHA256/PAGE.jpg       the page as the model would turn it (a few hundred px)

A bad request is answered 400 with {"error": why} (a POST that is not application/json 415); an unknown path 404.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, Optional
from urllib.parse import parse_qs, urlparse

from pipelines import imaging
from pipelines.pictures import load_page
from pipelines.review.session import Item, ReviewError, ReviewSession
from pipelines.schema import ORIENTATIONS

PICTURE_SIDE = 512  # the shown page's longer side; the four turns are drawn from it by the page
CACHED_PICTURES = 800  # about 40 KB each
MAX_BODY = 1 << 20
PAGE_FILE = "page.html"


def page_html() -> str:
    """The page's HTML, script and style (package data)."""
    from importlib import resources

    return resources.files("pipelines.review").joinpath(PAGE_FILE).read_text(encoding="utf-8")


def picture_jpeg(item: Item, side: int = PICTURE_SIDE) -> Optional[bytes]:
    """The page as the model would turn it (upright by its answer), `side` px at most, as JPEG; None when the
    original cannot be read."""
    image = load_page(item.uri, item.page, max_side=side)
    if image is None:
        return None
    if item.model_orientation in ORIENTATIONS:
        image = imaging.make_upright(image, item.model_orientation)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


class Pictures:
    """Thumbnails made once, kept (least recently used out), and made ahead for the pages a tab will show next."""

    def __init__(self, side: int = PICTURE_SIDE, capacity: int = CACHED_PICTURES, workers: int = 2):
        self.side = side
        self.capacity = capacity
        self._done: "collections.OrderedDict[tuple, Optional[bytes]]" = collections.OrderedDict()
        self._making: Dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="thumbnail")

    def _make(self, item: Item) -> Optional[bytes]:
        try:
            data = picture_jpeg(item, self.side)
        except Exception:  # a picture is a courtesy: the page says it is unavailable and can still be answered
            logging.exception("thumbnail of %s (page %d) failed", item.uri, item.page)
            data = None
        with self._lock:
            self._done[item.key] = data
            self._making.pop(item.key, None)
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
        return data

    def _future(self, item: Item) -> Optional[Future]:
        with self._lock:
            if item.key in self._done:
                self._done.move_to_end(item.key)
                return None
            future = self._making.get(item.key)
            if future is None:
                future = self._making[item.key] = self._pool.submit(self._make, item)
            return future

    def get(self, item: Item) -> Optional[bytes]:
        future = self._future(item)
        if future is not None:
            return future.result()
        with self._lock:
            return self._done.get(item.key)

    def warm(self, items: Iterable[Item]) -> None:
        for item in items:
            self._future(item)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, session: ReviewSession, pictures: Pictures):
        self.session = session
        self.pictures = pictures
        self.page = page_html()
        super().__init__(address, ReviewHandler)


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"  # keep-alive: one connection carries a tab's answers

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        logging.debug("review %s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _state(self, state: dict) -> None:
        # The pages this tab will show next: made now, so they are ready when it asks.
        self.server.pictures.warm(self.server.session.item(h["sha256"], h["page"]) for h in state["head"][:8])
        self._json(200, state)

    def do_GET(self):  # noqa: N802 (BaseHTTPRequestHandler's name)
        url = urlparse(self.path)
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, self.server.page.encode("utf-8"), "text/html; charset=utf-8")
            elif url.path == "/api/state":
                client = (parse_qs(url.query).get("client") or [""])[0]
                self._state(self.server.session.state(client))
            elif url.path.startswith("/img/"):
                self._picture(url.path)
            elif url.path == "/favicon.ico":
                self._send(204, b"", "image/x-icon", cache="max-age=86400")
            else:
                self._error(404, f"no such page: {url.path}")
        except Exception as e:  # the server stays up; the page says what went wrong
            logging.exception("GET %s failed", self.path)
            self._error(500, f"{type(e).__name__}: {e}")

    def _picture(self, path: str) -> None:
        parts = path.split("/")  # "", "img", sha256, "PAGE.jpg"
        item = None
        if len(parts) == 4 and parts[3].endswith(".jpg") and parts[3][:-4].isdigit():
            item = self.server.session.item(parts[2], int(parts[3][:-4]))
        if item is None:
            self._error(404, f"no page in the review queue at {path}")
            return
        data = self.server.pictures.get(item)
        if data is None:
            self._error(404, f"{item.uri} (page {item.page}) cannot be read now")
            return
        # A (sha256, page) names the file's content: the picture never changes, so the browser keeps it.
        self._send(200, data, "image/jpeg", cache="private, max-age=86400, immutable")

    def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        try:
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                # Only JSON: a form on another web site cannot post to this page without the browser asking first.
                self._error(415, "send the answers as application/json")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._error(413, f"request body over {MAX_BODY} bytes")
                return
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError as e:
                raise ReviewError(f"the request body is not JSON: {e}") from e
            if not isinstance(body, dict):
                raise ReviewError("the request body must be a JSON object")
            client = str(body.get("client") or "")
            session = self.server.session
            if url.path == "/api/answer":
                self._state(session.answer(client, body.get("answers")))
            elif url.path == "/api/undo":
                self._state(session.undo(client, body.get("ids")))
            else:
                self._error(404, f"no such endpoint: POST {url.path}")
        except ReviewError as e:
            self._error(400, str(e))
        except Exception as e:
            logging.exception("POST %s failed", self.path)
            self._error(500, f"{type(e).__name__}: {e}")


def poll_journal(session: ReviewSession, stop: threading.Event, every: float) -> None:
    """Read the other writers' answers every `every` seconds until `stop` (a tab sees them on its next call)."""
    while not stop.wait(every):
        try:
            session.refresh()
        except Exception:  # a slow or failing bucket must not stop the server; the next poll tries again
            logging.exception("reading the corrections journal failed")
