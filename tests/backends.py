"""Controllable twisted.web origins for the loopback tests.

The general-purpose origin (``/bytes/N``, ``/upload``, ``/echo``, ...) is the
demo backend in bench/backend.py; these add what only a test needs: a
response that waits for the test's signal, and one that never answers.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server
from twisted.web.resource import Resource

from bench.backend import make_site


class Held(Resource):
    """Sends a first chunk at once, then holds the response until ``release``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[server.Request] = []
        self.disconnected: list[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: first\n\n")
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self.disconnected.append(request))
        return server.NOT_DONE_YET

    def release(self) -> None:
        for request in self.requests:
            if not request.finished and not request._disconnected:
                request.write(b"data: last\n\n")
                request.finish()
        self.requests = []


class Never(Resource):
    """Accepts the request and never answers; records disconnects."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.disconnected = 0

    def render(self, request: server.Request) -> Any:
        self.started += 1

        def gone(_: object) -> None:
            self.disconnected += 1

        request.notifyFinish().addBoth(gone)
        return server.NOT_DONE_YET


class _Root(Resource):
    """/held and /never here; every other path goes to the demo backend."""

    def __init__(self, backend: Resource, held: Held, never: Never) -> None:
        super().__init__()
        self.backend = backend
        self.putChild(b"held", held)
        self.putChild(b"never", never)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return self.backend  # it dispatches on request.path itself


def test_site() -> tuple[server.Site, Held, Never]:
    """The demo backend plus /held and /never."""
    site = make_site()
    held, never = Held(), Never()
    site.resource = _Root(site.resource, held, never)
    return site, held, never
