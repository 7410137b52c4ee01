"""HTTP entry edges over loopback (SPEC §8.2): impossible chunk sizes and two Transfer-Encodings are 400 at once;
tunneld's own error bodies never name a backend address."""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web import server

from tests.harness import Stack, wait_for
from tests.test_e2e_inspect import Recorder


def answer_and_close(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, float, bool]:
    """Send ``data``; (everything received, seconds until the server closed, whether it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        started = time.monotonic()
        s.sendall(data)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return received, time.monotonic() - started, False
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received, time.monotonic() - started, True


HEAD = b"POST /upload HTTP/1.1\r\nHost: app.test\r\n"


class EntryEdgeTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.recorder = Recorder()
        self.backend = reactor.listenTCP(0, server.Site(self.recorder), interface="127.0.0.1")
        self.origin = f"127.0.0.1:{self.backend.getHost().port}"
        # A port nobody listens on, for a backend that refuses.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.closed_port = probe.getsockname()[1]
        probe.close()
        self.stack = Stack([
            {"name": "web", "group": "default", "backend": f"http://{self.origin}", "max_body_size": 1000},
            {"name": "gone", "group": "default", "backend": f"http://127.0.0.1:{self.closed_port}",
             "path_prefix": "/gone"},
        ])
        yield self.stack.start()
        yield self.stack.add_client()
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="entry-edges")
        self.pool.start()

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.pool.stop()
        yield self.stack.stop()
        yield self.backend.stopListening()

    def send(self, data: bytes) -> Any:
        return deferToThreadPool(reactor, self.pool, answer_and_close, self.stack.http_port, data)

    @inlineCallbacks
    def assert_400_at_once(self, data: bytes) -> Any:
        received, took, closed = yield self.send(data)
        self.assertTrue(received.startswith(b"HTTP/1.1 400 "), received)
        self.assertTrue(closed, "the connection stayed open")
        self.assertLess(took, 1.0)

    @inlineCallbacks
    def test_impossible_chunk_sizes_are_400_and_closed_at_once(self) -> Any:
        """More than 16 hex digits, not hex, or one chunk above the route's max_body_size: 400 within 1 s."""
        chunked = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        for line in (b"1" * 20 + b"\r\n", b"F" * 17, b"zz\r\n", b"-5\r\n", b"3e9\r\n"):   # 0x3e9 = 1001 > 1000
            yield self.assert_400_at_once(chunked + line)
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="tables empty")
        self.assertEqual([s for s in self.recorder.seen if s[2]], [])   # nothing reached the backend
        # 16 digits is still a size (here: too big for the route, so 400 too); a fitting chunk is served.
        yield self.assert_400_at_once(chunked + b"0" * 13 + b"3e9\r\n")
        received, _, _ = yield self.send(chunked + b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\nGET")
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received[:200])

    @inlineCallbacks
    def test_two_transfer_encoding_lines_are_400(self) -> Any:
        """chunked + identity, identity + chunked, chunked twice: 400 and closed, as the README says."""
        for first, second in ((b"chunked", b"identity"), (b"identity", b"chunked"), (b"chunked", b"chunked")):
            yield self.assert_400_at_once(HEAD + b"Transfer-Encoding: " + first + b"\r\nTransfer-Encoding: "
                                          + second + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(self.recorder.seen, [])

    @inlineCallbacks
    def test_error_bodies_never_name_the_backend(self) -> Any:
        """502 for a request with two Host headers, and for a refusing backend: no backend address in the body."""
        received, _, _ = yield self.send(b"GET / HTTP/1.1\r\nHost: app.test\r\nHost: other.test\r\n"
                                         b"Connection: close\r\n\r\n")
        self.assertRegex(received[:12], rb"HTTP/1.1 [45]\d\d")
        self.assertNotIn(self.origin.encode(), received)
        self.assertNotIn(b"127.0.0.1", received)
        received, _, _ = yield self.send(b"GET /gone HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 502 "), received)
        self.assertNotIn(str(self.closed_port).encode(), received)
        self.assertNotIn(b"127.0.0.1", received)
        self.assertIn(b"route 'gone'", received)
