"""The client's origin connections over loopback: keep-alive reuse and clear 502s for broken origins."""

from __future__ import annotations

from typing import Any

import treq as _treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol

from tests.harness import Stack, wait_for
from tests.test_e2e_http import PooledTestCase


class ScriptedOrigin(Protocol):
    """Answers each request by its path: ``/ok`` keep-alive, ``/garbage`` a bad status line,
    ``/short`` a body that stops short of its Content-Length."""

    def connectionMade(self) -> None:
        self.factory.connections += 1   # type: ignore[attr-defined]
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            path = head.split(b" ")[1]
            if path == b"/ok":
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            elif path == b"/garbage":
                self.transport.write(b"HTTP/1.1 OK 200\r\n\r\n")
            elif path == b"/short":
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                self.transport.loseConnection()


class OriginConnectionTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        factory = Factory.forProtocol(ScriptedOrigin)
        factory.connections = 0   # type: ignore[attr-defined]
        self.origin = factory
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.stack = Stack([{"name": "web", "group": "default", "host": "127.0.0.1",
                             "backend": f"http://127.0.0.1:{self.port.getHost().port}"}])
        yield self.stack.start()
        yield self.stack.add_client()

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.stack.stop()
        yield self.port.stopListening()

    @inlineCallbacks
    def test_sequential_requests_share_one_origin_connection(self) -> Any:
        """Requests one after another reach the origin over one keep-alive connection."""
        for _ in range(5):
            resp = yield self.http.get(self.stack.url("/ok"))
            self.assertEqual((resp.code, (yield _treq.content(resp))), (200, b"ok\n"))
        self.assertEqual(self.origin.connections, 1)   # type: ignore[attr-defined]

    @inlineCallbacks
    def test_malformed_status_line_is_502_naming_it(self) -> Any:
        """An origin answering a bad status line gives 502 whose body says what was wrong."""
        resp = yield self.http.get(self.stack.url("/garbage"))
        self.assertEqual(resp.code, 502)
        self.assertIn(b"malformed status line", (yield _treq.content(resp)))
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

    @inlineCallbacks
    def test_body_short_of_its_length_breaks_the_response(self) -> Any:
        """A body that stops short of Content-Length is not passed off as complete."""
        # The head and the cancel may reach the entry together: either the
        # response never starts or its body fails; it never looks complete.
        try:
            resp = yield self.http.get(self.stack.url("/short"))
            body = yield _treq.content(resp)
        except Exception:
            pass
        else:
            self.fail(f"a broken-off response passed as complete: {resp.code} {body!r}")
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")
