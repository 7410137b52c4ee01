"""HTTP end to end over loopback: external client -> server -> tunnel -> client -> backend."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

import treq as _treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from tests.backends import test_site
from tests.harness import Stack, rss_bytes, wait_for

MiB = 1024 * 1024


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class HashingReader(Protocol):
    """Consumes a response body incrementally; can be paused to act as a slow reader."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.n = 0
        self.done: Deferred[None] = Deferred()
        self.chunks: list[bytes] = []
        self.keep = False

    def dataReceived(self, data: bytes) -> None:
        self.sha.update(data)
        self.n += len(data)
        if self.keep:
            self.chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class RawClient(Protocol):
    """A bare TCP client that sends one request and keeps what comes back."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@implementer(IBodyProducer)
class PatternProducer:
    """Uploads ``length`` deterministic bytes in 64 KiB writes, honouring pauses."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.sha = hashlib.sha256()
        self.block = os.urandom(64 * 1024)
        self.sent = 0
        self.paused = False
        self.consumer: Any = None
        self.finished: Deferred[None] = Deferred()

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        self._pump()
        return self.finished

    def _pump(self) -> None:
        while not self.paused and self.sent < self.length:
            chunk = self.block[: min(len(self.block), self.length - self.sent)]
            self.sha.update(chunk)
            self.sent += len(chunk)
            self.consumer.write(chunk)
        if self.sent >= self.length and not self.finished.called:
            self.finished.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.paused = True


class PooledTestCase(TestCase):
    """A treq client whose keep-alive connections are closed after each test."""

    def setUp(self) -> Any:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.addCleanup(self.pool.closeCachedConnections)


class HttpEndToEndTests(PooledTestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        site, self.held, self.never = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        backend = f"http://127.0.0.1:{self.backend.getHost().port}"
        dead = f"http://127.0.0.1:{free_port()}"
        self.stack = Stack([
            {"name": "web", "group": "default", "backend": backend, "host": "127.0.0.1"},
            {"name": "slow", "group": "default", "backend": backend, "path_prefix": "/never", "timeout": 0.5, "host": "127.0.0.1"},
            {"name": "refused", "group": "default", "backend": dead, "path_prefix": "/refused", "host": "127.0.0.1"},
            {"name": "other", "group": "lonely", "backend": backend, "host": "lonely.example"},
        ], groups=[{"name": "default", "tokens": ["test-token"]}, {"name": "lonely", "tokens": ["x"]}])
        yield self.stack.start()
        self.client = yield self.stack.add_client()

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.held.release()
        yield self.stack.stop()
        yield self.backend.stopListening()

    @inlineCallbacks
    def assertReleased(self) -> Any:
        """Both ends' request tables drain once a test's traffic is over."""
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

    @inlineCallbacks
    def test_get_keeps_repeated_headers_and_adds_forwarded(self) -> Any:
        """A GET comes back with repeated Set-Cookie in order; the backend sees X-Forwarded-*."""
        resp = yield self.http.get(self.stack.url("/"), headers={"X-Forwarded-For": "10.1.1.1"})
        self.assertEqual(resp.code, 200)
        cookies = resp.headers.getRawHeaders(b"set-cookie")
        self.assertEqual(len(cookies), 2)
        yield _treq.content(resp)
        echo = yield self.http.get(self.stack.url("/echo?x=1"), headers={"X-Forwarded-For": "10.1.1.1"})
        body = json.loads((yield _treq.content(echo)))
        headers = [(k.lower(), v) for k, v in body["headers"]]
        self.assertIn(("x-forwarded-for", "10.1.1.1, 127.0.0.1"), headers)
        self.assertIn(("x-forwarded-proto", "http"), headers)
        self.assertIn(("x-forwarded-host", f"127.0.0.1:{self.stack.http_port}"), headers)
        self.assertEqual(body["path"], "/echo")
        yield self.assertReleased()

    @inlineCallbacks
    def test_head_and_204_have_no_body(self) -> Any:
        """HEAD keeps the backend's Content-Length with no body; 204 has no body."""
        resp = yield self.http.head(self.stack.url("/bytes/1000"))
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.headers.getRawHeaders(b"content-length"), [b"1000"])
        self.assertEqual((yield _treq.content(resp)), b"")
        resp = yield self.http.get(self.stack.url("/status/204"))
        self.assertEqual(resp.code, 204)
        self.assertEqual((yield _treq.content(resp)), b"")
        yield self.assertReleased()

    @inlineCallbacks
    def test_upload_10_mib_streams_with_equal_hash(self) -> Any:
        """A 10 MiB upload arrives whole at the backend (sha256 equal)."""
        producer = PatternProducer(10 * MiB)
        resp = yield self.http.put(self.stack.url("/upload"), data=producer)
        self.assertEqual(resp.code, 200)
        body = json.loads((yield _treq.content(resp)))
        self.assertEqual(body["bytes"], 10 * MiB)
        self.assertEqual(body["sha256"], producer.sha.hexdigest())
        yield self.assertReleased()

    @inlineCallbacks
    def test_chunked_upload_of_unknown_length(self) -> Any:
        """An upload without Content-Length (chunked) also arrives whole."""
        producer = PatternProducer(3 * MiB + 17)
        producer.length = UNKNOWN_LENGTH  # type: ignore[assignment]
        producer.limit = 3 * MiB + 17  # type: ignore[attr-defined]
        real = 3 * MiB + 17

        def pump() -> None:
            while not producer.paused and producer.sent < real:
                chunk = producer.block[: min(len(producer.block), real - producer.sent)]
                producer.sha.update(chunk)
                producer.sent += len(chunk)
                producer.consumer.write(chunk)
            if producer.sent >= real and not producer.finished.called:
                producer.finished.callback(None)

        producer._pump = pump  # type: ignore[method-assign]
        resp = yield self.http.post(self.stack.url("/upload"), data=producer)
        body = json.loads((yield _treq.content(resp)))
        self.assertEqual((body["bytes"], body["sha256"]), (real, producer.sha.hexdigest()))
        yield self.assertReleased()

    @inlineCallbacks
    def test_download_100_mib_with_bounded_memory(self) -> Any:
        """A 100 MiB download streams through with equal sha256 while RSS stays bounded."""
        size = 100 * MiB
        direct = HashingReader()
        resp = yield self.http.get(f"http://127.0.0.1:{self.backend.getHost().port}/bytes/{size}".encode(),
                              unbuffered=True)
        resp.deliverBody(direct)
        yield direct.done
        before = rss_bytes()
        peak = [before]

        sampler = LoopingCall(lambda: peak.__setitem__(0, max(peak[0], rss_bytes())))

        reader = HashingReader()
        resp = yield self.http.get(self.stack.url(f"/bytes/{size}"), unbuffered=True)
        self.assertEqual(resp.code, 200)
        sampler.start(0.05)
        resp.deliverBody(reader)
        yield reader.done
        sampler.stop()
        self.assertEqual(reader.n, size)
        self.assertEqual(reader.sha.hexdigest(), direct.sha.hexdigest())
        growth = peak[0] - before
        self.assertLess(growth, 40 * MiB, f"RSS grew by {growth / MiB:.1f} MiB during a 100 MiB download")
        yield self.assertReleased()

    @inlineCallbacks
    def test_streaming_response_arrives_before_backend_finishes(self) -> Any:
        """The first chunk of a streaming response reaches the external client while the backend still holds it."""
        reader = HashingReader()
        reader.keep = True
        resp = yield self.http.get(self.stack.url("/held"), unbuffered=True)
        resp.deliverBody(reader)
        yield wait_for(lambda: reader.n > 0, what="first chunk")
        self.assertEqual(b"".join(reader.chunks), b"data: first\n\n")
        self.assertFalse(reader.done.called)
        self.assertEqual(len(self.held.requests), 1)  # the backend has not finished
        self.held.release()
        yield reader.done
        self.assertEqual(b"".join(reader.chunks), b"data: first\n\ndata: last\n\n")
        yield self.assertReleased()

    @inlineCallbacks
    def test_no_route_is_404_naming_host_and_path(self) -> Any:
        """A host no route matches gets 404 naming host and path."""
        resp = yield self.http.get(self.stack.url("/x"), headers={"Host": "nowhere.example"})
        self.assertEqual(resp.code, 404)
        text = (yield _treq.content(resp)).decode()
        self.assertIn("nowhere.example", text)
        self.assertIn("/x", text)

    @inlineCallbacks
    def test_group_without_client_is_502(self) -> Any:
        """A route whose group has no connected client answers 502."""
        resp = yield self.http.get(self.stack.url("/"), headers={"Host": "lonely.example"})
        self.assertEqual(resp.code, 502)
        self.assertIn(b"lonely", (yield _treq.content(resp)))

    @inlineCallbacks
    def test_backend_refused_is_502(self) -> Any:
        """A backend that refuses connections gives 502 and releases state."""
        resp = yield self.http.get(self.stack.url("/refused"))
        self.assertEqual(resp.code, 502)
        self.assertIn(b"unreachable", (yield _treq.content(resp)))
        yield self.assertReleased()

    @inlineCallbacks
    def test_backend_silent_is_504_and_backend_request_cancelled(self) -> Any:
        """No response head within the route timeout gives 504; the client aborts its backend request."""
        resp = yield self.http.get(self.stack.url("/never"))
        self.assertEqual(resp.code, 504)
        yield _treq.content(resp)
        yield wait_for(lambda: self.never.disconnected == 1, what="backend request aborted")
        yield self.assertReleased()

    @inlineCallbacks
    def test_external_disconnect_cancels_backend_request(self) -> Any:
        """An external client that goes away cancels the request at the backend."""
        proto = RawClient(b"GET /held HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stack.http_port), proto)
        yield wait_for(lambda: b"data: first" in proto.received, what="first chunk")
        proto.transport.loseConnection()
        yield wait_for(lambda: len(self.held.disconnected) == 1, what="backend saw the disconnect")
        yield self.assertReleased()

    @inlineCallbacks
    def test_tunnel_loss_mid_request_is_502_at_once(self) -> Any:
        """Killing the client's stream mid-request answers 502 long before the timeout."""
        d = self.http.get(self.stack.url("/never/forever"))
        yield wait_for(lambda: self.never.started == 1, what="backend request")
        started = time.monotonic()
        assert self.client.dial.handle is not None
        self.client.dial.handle.abort("test kills the tunnel")
        resp = yield d
        elapsed = time.monotonic() - started
        self.assertEqual(resp.code, 502)
        self.assertLess(elapsed, 1.0)
        yield _treq.content(resp)
        self.assertEqual(self.stack.server_in_flight(), 0)

    @inlineCallbacks
    def test_slow_reader_does_not_block_other_requests(self) -> Any:
        """A request whose reader is stalled leaves other requests on the same tunnel prompt."""
        stalled = HashingReader()
        resp = yield self.http.get(self.stack.url(f"/bytes/{64 * MiB}"), unbuffered=True)
        resp.deliverBody(stalled)
        yield wait_for(lambda: stalled.n > 0, what="first bytes")
        stalled.transport.pauseProducing()
        before = stalled.n
        for i in range(20):
            started = time.monotonic()
            small = yield self.http.get(self.stack.url("/echo"))
            self.assertEqual(small.code, 200)
            yield _treq.content(small)
            self.assertLess(time.monotonic() - started, 1.0)
        # The stalled one received at most a bounded amount beyond what it had.
        self.assertLess(stalled.n - before, 32 * MiB)
        self.assertEqual(len(self.stack.server.hub.registry.streams()), 1)  # type: ignore[union-attr]
        stalled.transport.resumeProducing()
        yield stalled.done
        self.assertEqual(stalled.n, 64 * MiB)
        yield self.assertReleased()


class TokenTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def test_wrong_token_is_refused_and_never_registered(self) -> Any:
        """A client with a wrong token is refused (UNAUTHENTICATED) and keeps retrying."""
        stack = Stack([{"name": "web", "group": "default", "backend": "http://127.0.0.1:9"}])
        yield stack.start()
        try:
            app = yield stack.add_client(token="wrong", wait=False)
            yield wait_for(lambda: app.dial.attempts >= 2, what="a retry after refusal")
            self.assertFalse(app.hub.is_connected)
            self.assertEqual(len(stack.server.hub.registry), 0)  # type: ignore[union-attr]
        finally:
            yield stack.stop()


class DrainTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def test_stop_drains_in_flight_requests_then_closes(self) -> Any:
        """Stopping the server (what SIGTERM does) refuses new work but lets an in-flight request finish."""
        site, held, _ = test_site()
        backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        stack = Stack([{"name": "web", "group": "default", "backend": f"http://127.0.0.1:{backend.getHost().port}"}],
                      server={"drain_timeout": 30})
        yield stack.start()
        yield stack.add_client()
        reader = HashingReader()
        reader.keep = True
        resp = yield self.http.get(stack.url("/held"), unbuffered=True)
        resp.deliverBody(reader)
        yield wait_for(lambda: reader.n > 0, what="first chunk")
        assert stack.server is not None
        hub = stack.server.hub
        stopped = stack.server.service.stopService()
        self.assertTrue(hub.draining)
        self.assertFalse(stopped.called)  # the held request keeps the drain open
        self.assertEqual(len(hub.registry.streams()), 1)
        held.release()
        yield reader.done
        self.assertEqual(b"".join(reader.chunks), b"data: first\n\ndata: last\n\n")
        yield stopped
        self.assertEqual(len(hub.registry.streams()), 0)
        stack.server = None
        yield stack.stop()


class LimitTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        site, _, _ = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.stack = Stack([{"name": "web", "group": "default", "max_body_size": 1000,
                             "backend": f"http://127.0.0.1:{self.backend.getHost().port}"}],
                           server={"max_header_size": 2048})
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        yield self.stack.add_client()

    @inlineCallbacks
    def test_oversized_headers_are_refused(self) -> Any:
        """A request whose headers exceed max_header_size gets 400 and never reaches the tunnel."""
        proto = RawClient(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stack.http_port), proto)
        yield wait_for(lambda: proto.received.startswith(b"HTTP/1.1 400"), what="400 answer")
        proto.transport.loseConnection()
        self.assertEqual(self.stack.server.hub.counters["requests"], 0)  # type: ignore[union-attr]

    @inlineCallbacks
    def test_body_over_route_limit_is_413(self) -> Any:
        """A body over the route's max_body_size gets 413, with or without Content-Length."""
        resp = yield self.http.post(self.stack.url("/upload"), data=b"x" * 5000)
        self.assertEqual(resp.code, 413)
        yield _treq.content(resp)
        producer = PatternProducer(5000)
        producer.length = UNKNOWN_LENGTH  # type: ignore[assignment]
        producer.block = producer.block[:1000]
        real = 5000

        def pump() -> None:
            while not producer.paused and producer.sent < real:
                chunk = producer.block[: min(len(producer.block), real - producer.sent)]
                producer.sent += len(chunk)
                producer.consumer.write(chunk)
            if producer.sent >= real and not producer.finished.called:
                producer.finished.callback(None)

        producer._pump = pump  # type: ignore[method-assign]
        resp = yield self.http.post(self.stack.url("/upload"), data=producer)
        self.assertEqual(resp.code, 413)
        yield _treq.content(resp)
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="tables empty")
        resp = yield self.http.post(self.stack.url("/upload"), data=b"x" * 500)
        self.assertEqual(resp.code, 200)
        yield _treq.content(resp)


class WindowGrowthTests(PooledTestCase):
    """Windows over real sockets: a fast download's grows, a stalled one's stays put."""

    timeout = 60
    MAX_WINDOW = 4 * MiB

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        site, _, _ = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.stack = Stack([{"name": "web", "group": "default",
                             "backend": f"http://127.0.0.1:{self.backend.getHost().port}"}],
                           server={"max_window": self.MAX_WINDOW, "window_budget": 2 * self.MAX_WINDOW})
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        yield self.stack.add_client()

    def session(self) -> Any:
        assert self.stack.server is not None
        [stream] = self.stack.server.hub.streams.values()
        return stream.tunnel

    def exchange(self, path: bytes) -> Any:
        """The server's exchange of the request for ``path`` (None until it is in flight)."""
        tunnel = self.session()
        for rid, handler in tunnel.handlers.items():
            if getattr(handler, "request", None) is not None and handler.request.uri == path:
                return tunnel.session.exchange(rid)
        return None

    @inlineCallbacks
    def stalled_download(self, path: bytes) -> Any:
        """A raw socket that asks for ``path`` and never reads; both ends' kernel buffers kept tiny.

        Without that the kernel would take megabytes before the socket pushes
        back: a reader that keeps up, as far as the tunnel can tell.
        """
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.stack.http_port))
        self.addCleanup(sock.close)
        local = sock.getsockname()[1]
        found: list[Any] = []

        def accepted() -> bool:
            found[:] = [r for r in reactor.getReaders()
                        if isinstance(r, tcp.Server) and r.getPeer().port == local]
            return bool(found)

        yield wait_for(accepted, what="the entry to accept the stalled connection")
        found[0].getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return sock

    @inlineCallbacks
    def test_stalled_download_keeps_its_window_while_a_fast_one_grows(self) -> Any:
        """A stalled reader's window stays at 256 KiB while a concurrent fast download's grows to max_window."""
        before = rss_bytes()
        peak = [before]
        sampler = LoopingCall(lambda: peak.__setitem__(0, max(peak[0], rss_bytes())))
        sampler.start(0.05)
        self.addCleanup(lambda: sampler.running and sampler.stop())

        stalled_path = f"/bytes/{1024 * MiB}".encode()
        sock = yield self.stalled_download(stalled_path)
        yield wait_for(lambda: self.exchange(stalled_path) is not None, what="stalled request in flight")
        stalled = self.exchange(stalled_path)
        # Its window fills and no credit comes back: the client's sender waits.
        yield wait_for(lambda: stalled.recv_window.unacked >= stalled.recv_window.size, what="stalled window full")

        fast_path = f"/bytes/{64 * MiB}".encode()
        reader = HashingReader()
        resp = yield self.http.get(self.stack.url(fast_path.decode()), unbuffered=True)
        self.assertEqual(resp.code, 200)
        fast = self.exchange(fast_path)
        self.assertIsNotNone(fast)
        resp.deliverBody(reader)
        # Other requests keep answering while one reader is stalled and one downloads.
        for _ in range(10):
            small = self.http.get(self.stack.url("/echo"))
            yield wait_for(lambda: small.called, timeout=2.0, what="a small request's answer")
            answer = yield small
            self.assertEqual(answer.code, 200)
            yield _treq.content(answer)
        yield reader.done
        sampler.stop()
        self.assertEqual(reader.n, 64 * MiB)

        self.assertEqual(fast.recv_window.size, self.MAX_WINDOW)   # grew all the way while it kept up
        self.assertEqual(stalled.recv_window.size, 256 * 1024)     # never grew
        self.assertIs(self.exchange(stalled_path), stalled)         # still in flight, still stalled
        self.assertLessEqual(self.session().session.grown, 2 * self.MAX_WINDOW)
        growth = peak[0] - before
        self.assertLess(growth, 40 * MiB, f"RSS grew by {growth / MiB:.1f} MiB")

        sock.close()
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")
        self.assertEqual(self.session().session.grown, 0)
