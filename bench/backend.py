"""Demo and benchmark origin server on twisted.web: the backend behind the tunnel.

Run it with ``python bench/backend.py --port 3000 [--host 127.0.0.1]`` (what
``make demo`` and the benchmark do), or import :func:`make_site` (what the
tests do). Endpoints:

``GET /``                  small page listing the endpoints; sends two
                           ``Set-Cookie`` headers (repeated headers must survive)
``GET /small``             ``ok\\n`` with Content-Length: the cheapest answer, for req/s
``GET /bytes/N``           N deterministic bytes, produced 64 KiB at a time by a
                           pull producer (never N bytes in memory)
``POST|PUT /upload``       hashes the body as it arrives (never spooled) and answers
                           ``{"bytes": n, "sha256": "..."}``
``GET /stream?n=5&interval=0.2``
                           Server-Sent Events, ``data: i`` every interval, n events
``GET /slow?delay=S``      answers after S seconds
``GET /status/N``          status N, empty body
``ANY /echo``              JSON: method, path, query, headers as [name, value]
                           pairs in order, body length and sha256

Request bodies are never stored: :class:`BackendRequest` replaces twisted.web's
"buffer the body, spool it to a temp file" step with an incremental sha256 and
a byte count, for every request.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
from typing import Any, Callable
from urllib.parse import parse_qsl

from twisted.web import http, server
from twisted.web.resource import Resource

#: Size of one write of /bytes/N.
BLOCK_SIZE = 64 * 1024
#: The content of /bytes/N is this block repeated, cut at N bytes. Seeded, so
#: every process (server, tests, benchmark) produces the same bytes.
BLOCK = random.Random(0x70E11D).randbytes(BLOCK_SIZE)

#: Largest N accepted by /bytes/N (1 TiB).
MAX_BYTES = 1 << 40

ENDPOINTS = (
    ("GET /", "this page"),
    ("GET /small", "2 bytes, for requests per second"),
    ("GET /bytes/N", "N deterministic bytes, streamed 64 KiB at a time"),
    ("POST|PUT /upload", "hashes the body as it arrives, answers {bytes, sha256}"),
    ("GET /stream?n=5&interval=0.2", "Server-Sent Events: data: i every interval"),
    ("GET /slow?delay=S", "answers after S seconds"),
    ("GET /status/N", "status N, empty body"),
    ("ANY /echo", "the request as JSON: method, path, query, headers, body size"),
)


def expected_bytes(n: int) -> bytes:
    """Return the body of ``/bytes/n`` (for tests and benchmark checks; builds it in memory)."""
    whole, rest = divmod(n, BLOCK_SIZE)
    return BLOCK * whole + BLOCK[:rest]


class BackendRequest(server.Request):
    """A Request that hashes and counts its body as it arrives instead of storing it."""

    body_bytes: int
    body_sha256: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_bytes = 0
        self.body_sha256 = hashlib.sha256()

    def gotLength(self, length: int | None) -> None:
        self.body_bytes = 0
        self.body_sha256 = hashlib.sha256()
        self.content = io.BytesIO()  # type: ignore[assignment]  # stays empty: nothing is buffered

    def handleContentChunk(self, data: bytes) -> None:
        self.body_bytes += len(data)
        self.body_sha256.update(data)


class BytesProducer:
    """Pull producer writing ``n`` bytes of the repeated :data:`BLOCK` to a request."""

    def __init__(self, request: server.Request, n: int) -> None:
        self.request = request
        self.remaining = n
        self.stopped = False

    def start(self) -> None:
        """Register with the request; the transport pulls blocks as it drains."""
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.remaining >= BLOCK_SIZE:
            self.request.write(BLOCK)
            self.remaining -= BLOCK_SIZE
        elif self.remaining > 0:
            self.request.write(BLOCK[: self.remaining])
            self.remaining = 0
        if self.remaining == 0:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:  # only streaming producers are paused
        pass


class Backend(Resource):
    """The whole backend as one leaf resource dispatching on the path."""

    isLeaf = True

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock

    def render(self, request: server.Request) -> bytes | int:
        path = request.path
        method = request.method
        if path == b"/small":
            request.setHeader(b"content-type", b"text/plain")
            return b"ok\n"
        if path == b"/echo":
            return self.echo(request)
        parts = path.split(b"/")
        if path == b"/upload":
            if method not in (b"POST", b"PUT"):
                return self.not_allowed(request, b"POST, PUT")
            return self.upload(request)
        if method not in (b"GET", b"HEAD"):
            return self.not_allowed(request, b"GET, HEAD")
        if path == b"/":
            return self.index(request)
        if path == b"/stream":
            return self.stream(request)
        if path == b"/slow":
            return self.slow(request)
        if len(parts) == 3 and parts[1] == b"bytes":
            return self.download(request, parts[2])
        if len(parts) == 3 and parts[1] == b"status":
            return self.status(request, parts[2])
        return self.error(request, http.NOT_FOUND, "no such endpoint: %s" % path.decode("latin-1"))

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def error(request: server.Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return message.encode() + b"\n"

    def not_allowed(self, request: server.Request, allow: bytes) -> bytes:
        request.setHeader(b"allow", allow)
        return self.error(request, http.NOT_ALLOWED, "method not allowed")

    @staticmethod
    def number(request: server.Request, name: bytes, default: float, low: float, high: float) -> float:
        """Query argument ``name`` as a number in [low, high]; ValueError otherwise."""
        args: dict[Any, list[bytes]] = request.args or {}
        values = args.get(name)
        if not values:
            return default
        try:
            value = float(values[0])
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise ValueError(f"{name.decode()} must be between {low:g} and {high:g}")
        return value

    @staticmethod
    def reply_json(request: server.Request, obj: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(obj).encode() + b"\n"

    # -- endpoints -------------------------------------------------------------

    def index(self, request: server.Request) -> bytes:
        request.responseHeaders.addRawHeader(b"set-cookie", b"demo=1; Path=/")
        request.responseHeaders.addRawHeader(b"set-cookie", b"demo=2; Path=/; HttpOnly")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        rows = "\n".join(f"<li><code>{name}</code> — {what}</li>" for name, what in ENDPOINTS)
        page = (
            "<!doctype html>\n<html><head><title>tunneld demo backend</title></head>\n"
            f"<body><h1>tunneld demo backend</h1>\n<ul>\n{rows}\n</ul></body></html>\n"
        )
        return page.encode()

    def download(self, request: server.Request, arg: bytes) -> bytes | int:
        if not arg.isdigit() or int(arg) > MAX_BYTES:
            return self.error(request, http.BAD_REQUEST, f"N must be an integer from 0 to {MAX_BYTES}")
        n = int(arg)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % n)
        if request.method == b"HEAD":
            return b""
        BytesProducer(request, n).start()
        return server.NOT_DONE_YET

    def upload(self, request: server.Request) -> bytes:
        assert isinstance(request, BackendRequest)
        return self.reply_json(request, {"bytes": request.body_bytes, "sha256": request.body_sha256.hexdigest()})

    def echo(self, request: server.Request) -> bytes:
        query = request.uri.partition(b"?")[2].decode("latin-1")
        headers = [
            [name.decode("latin-1"), value.decode("latin-1")]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        body = {
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "query": [list(pair) for pair in parse_qsl(query, keep_blank_values=True)],
            "headers": headers,
            "body_bytes": getattr(request, "body_bytes", 0),
            "body_sha256": request.body_sha256.hexdigest() if isinstance(request, BackendRequest) else "",
        }
        return self.reply_json(request, body)

    def status(self, request: server.Request, arg: bytes) -> bytes:
        if not arg.isdigit() or not 200 <= int(arg) <= 599:
            return self.error(request, http.BAD_REQUEST, "N must be a status from 200 to 599")
        request.setResponseCode(int(arg))
        return b""

    def later(self, request: server.Request, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` after ``delay`` seconds unless the client goes away first."""
        call: list[Any] = []

        def fire() -> None:
            call.clear()
            action()

        def gone(_: object) -> None:
            if call and call[0].active():
                call[0].cancel()

        call.append(self.clock.callLater(delay, fire))
        request.notifyFinish().addErrback(gone)

    def slow(self, request: server.Request) -> bytes | int:
        try:
            delay = self.number(request, b"delay", 1.0, 0, 3600)
        except ValueError as e:
            return self.error(request, http.BAD_REQUEST, str(e))

        def answer() -> None:
            request.setHeader(b"content-type", b"text/plain")
            body = b"slept %g\n" % delay
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        self.later(request, delay, answer)
        return server.NOT_DONE_YET

    def stream(self, request: server.Request) -> bytes | int:
        try:
            n = int(self.number(request, b"n", 5, 0, 1_000_000))
            interval = self.number(request, b"interval", 0.2, 0, 3600)
        except ValueError as e:
            return self.error(request, http.BAD_REQUEST, str(e))
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        sent = 0
        call: Any = None

        def tick() -> None:
            nonlocal sent, call
            call = None
            if sent < n:
                request.write(b"data: %d\n\n" % sent)
                sent += 1
            if sent >= n:
                request.finish()
            else:
                call = self.clock.callLater(interval, tick)

        def gone(_: object) -> None:
            if call is not None and call.active():
                call.cancel()

        request.notifyFinish().addErrback(gone)
        tick()
        return server.NOT_DONE_YET


class BackendSite(server.Site):
    """The backend's Site: streaming-body requests; access log only when asked."""

    requestFactory = BackendRequest
    displayTracebacks = False

    def __init__(self, resource: Resource, access_log: bool = False) -> None:
        super().__init__(resource)
        self.access_log = access_log

    def log(self, request: http.Request) -> None:
        if self.access_log:
            super().log(request)


def make_site(clock: Any = None, access_log: bool = False) -> server.Site:
    """Build the backend's Site; timers use ``clock`` (an IReactorTime; default: the global reactor)."""
    if clock is None:
        from twisted.internet import reactor as clock
    return BackendSite(Backend(clock), access_log=access_log)


def main(argv: list[str] | None = None) -> int:
    """Serve the backend until SIGINT/SIGTERM; return the exit status."""
    parser = argparse.ArgumentParser(description="tunneld demo / benchmark backend (twisted.web)")
    parser.add_argument("--port", type=int, default=3000, help="TCP port (default 3000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--access-log", action="store_true", help="log every request to stdout")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as _reactor
    from twisted.internet.error import CannotListenError

    if args.access_log:
        from twisted.python import log

        log.startLogging(sys.stdout)  # type: ignore[no-untyped-call]
    reactor: Any = _reactor
    try:
        port = reactor.listenTCP(
            args.port, make_site(access_log=args.access_log), backlog=1024, interface=args.host
        )
    except CannotListenError as e:
        print(f"backend: cannot listen on {args.host}:{args.port}: {e.socketError}", file=sys.stderr)
        return 1
    print(f"tunneld demo backend on http://{args.host}:{port.getHost().port}/", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
