"""The demo/benchmark backend (bench/backend.py) over a real loopback socket, with treq."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Any

import treq
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived


def _load_backend() -> ModuleType:
    """Import bench/backend.py by path (bench/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "backend.py")
    spec = importlib.util.spec_from_file_location("tunneld_bench_backend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


backend = _load_backend()
reactor: Any = _reactor


class DemoBackendTests(unittest.TestCase):
    """Each test talks to a fresh backend listening on 127.0.0.1."""

    def setUp(self) -> None:
        port = reactor.listenTCP(0, backend.make_site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)

    def get(self, path: str) -> Any:
        return treq.get(self.base + path, pool=self.pool)

    @defer.inlineCallbacks
    def test_bytes_length_and_determinism(self) -> Any:
        """/bytes/N returns exactly N bytes with Content-Length N, the same bytes every time."""
        n = 3 * backend.BLOCK_SIZE + 12345
        first = yield self.get(f"/bytes/{n}")
        self.assertEqual(first.code, 200)
        self.assertEqual(first.length, n)  # Content-Length (the Agent keeps it out of .headers)
        body1 = yield treq.content(first)
        second = yield self.get(f"/bytes/{n}")
        body2 = yield treq.content(second)
        self.assertEqual(len(body1), n)
        self.assertEqual(body1, body2)
        self.assertEqual(body1, backend.expected_bytes(n))

    @defer.inlineCallbacks
    def test_upload_sha256(self) -> Any:
        """POST /upload of 3 MiB answers the byte count and the sha256 of what was sent."""
        data = os.urandom(3 * 1024 * 1024)
        response = yield treq.post(self.base + "/upload", data=data, pool=self.pool)
        self.assertEqual(response.code, 200)
        answer = json.loads((yield treq.content(response)))
        self.assertEqual(answer, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    @defer.inlineCallbacks
    def test_stream_events(self) -> Any:
        """GET /stream?n=4 sends four SSE events as text/event-stream, then ends."""
        response = yield self.get("/stream?n=4&interval=0.01")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = yield treq.content(response)
        self.assertEqual(body, b"".join(b"data: %d\n\n" % i for i in range(4)))

    @defer.inlineCallbacks
    def test_status_204_empty(self) -> Any:
        """GET /status/204 answers 204 with an empty body."""
        response = yield self.get("/status/204")
        self.assertEqual(response.code, 204)
        body = yield treq.content(response)
        self.assertEqual(body, b"")

    @defer.inlineCallbacks
    def test_slow_timer_cancelled_on_disconnect(self) -> Any:
        """A client leaving GET /slow?delay=30 early cancels the backend's 30 s timer."""

        def backend_timers() -> list[Any]:
            return [c for c in reactor.getDelayedCalls() if "Backend." in getattr(c.func, "__qualname__", "")]

        @defer.inlineCallbacks
        def until(condition: Any) -> Any:
            for _ in range(500):
                if condition():
                    return
                yield task.deferLater(reactor, 0.01, lambda: None)
            self.fail("condition not reached within 5 s")

        request = self.get("/slow?delay=30")
        yield until(lambda: len(backend_timers()) == 1)
        request.cancel()
        yield self.assertFailure(request, ResponseNeverReceived)  # wraps CancelledError
        yield until(lambda: not backend_timers())
