"""WebSocket end to end over loopback: `websockets` client -> server -> tunnel -> client -> autobahn backend."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.backends import test_site
from tests.harness import Stack, rss_bytes, wait_for
from tunneld.protocols.websocket import _header_safe, replace_host_line

MiB = 1024 * 1024


class EchoBackend(WebSocketServerProtocol):
    """Echo; /deny refuses with 403; 'close-me' closes with 4000; big binary messages are hashed piecewise."""

    def onConnect(self, request: Any) -> Any:
        self.factory.connects += 1
        if request.path == "/deny":
            raise ConnectionDeny(403, "forbidden here")
        self.counting = request.path == "/count"
        if "chat.v2" in request.protocols:
            return "chat.v2"
        return None

    def onOpen(self) -> None:
        self.factory.open.add(self)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if self.counting:
            self.sha = hashlib.sha256()
            self.n = 0
            self.frames = 0

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.counting:
            self.sha.update(payload)
            self.n += len(payload)
        else:
            super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if self.counting:
            self.frames += 1
        else:
            super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        if self.counting:
            self.sendMessage(f"{self.n} {self.sha.hexdigest()} {self.frames}".encode())
        else:
            super().onMessageEnd()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"close-me":
            self.sendClose(4000, "backend bye")
        else:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.open.discard(self)
        self.factory.closes.append((code, reason))

    def onPing(self, payload: bytes) -> None:
        self.factory.pings += 1
        super().onPing(payload)


def handshake_status(url: str) -> int:
    """The HTTP status a WebSocket handshake to ``url`` gets (101 when accepted)."""
    try:
        connect(url).close()
    except InvalidStatus as e:
        return int(e.response.status_code)
    return 101


class NotWebSocket(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"plain http"


class WebSocketEndToEndTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        self.factory = WebSocketServerFactory()
        self.factory.protocol = EchoBackend
        self.factory.setProtocolOptions(maxMessagePayloadSize=0)
        self.factory.connects = 0
        self.factory.open = set()
        self.factory.closes = []
        self.factory.pings = 0
        self.backend = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        plain = reactor.listenTCP(0, server.Site(NotWebSocket()), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        site, _, _ = test_site()
        http = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(http.stopListening)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        ws_backend = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack([
            {"name": "ws", "group": "default", "backend": ws_backend, "host": "127.0.0.1",
             "max_message_size": 16 * MiB},
            {"name": "small", "group": "default", "backend": ws_backend, "host": "127.0.0.1",
             "path_prefix": "/small", "max_message_size": 1024},
            {"name": "down", "group": "default", "backend": f"http://127.0.0.1:{dead}", "host": "127.0.0.1",
             "path_prefix": "/down"},
            {"name": "plain", "group": "default", "backend": f"http://127.0.0.1:{plain.getHost().port}",
             "host": "127.0.0.1", "path_prefix": "/plain"},
            {"name": "http", "group": "default", "backend": f"http://127.0.0.1:{http.getHost().port}",
             "host": "127.0.0.1", "path_prefix": "/bytes"},
        ], server={"max_websockets_per_ip": 256})   # 200 concurrent WebSockets come from one address here
        yield self.stack.start()
        self.client = yield self.stack.add_client()
        self.pool = ThreadPool(minthreads=1, maxthreads=220, name="ws-clients")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.stack.stop()
        yield self.backend.stopListening()
        # autobahn's batched timers outlive closed connections by up to a second.
        yield wait_for(lambda: not any("_notify_bucket" in repr(c) for c in reactor.getDelayedCalls()),
                       what="autobahn timers to expire")

    def ws_url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.stack.http_port}{path}"

    def in_thread(self, fn: Any, *args: Any) -> Any:
        from twisted.internet.threads import deferToThreadPool
        return deferToThreadPool(reactor, self.pool, fn, *args)

    @inlineCallbacks
    def assertReleased(self) -> Any:
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

    @inlineCallbacks
    def test_text_and_binary_echo(self) -> Any:
        """Text and binary messages echo through the tunnel with their type kept."""
        def run() -> list[Any]:
            with connect(self.ws_url("/echo")) as ws:
                ws.send("héllo")
                a = ws.recv()
                ws.send(b"\x00\x01\x02")
                b = ws.recv()
                ws.send("")
                c = ws.recv()
            return [a, b, c]

        a, b, c = yield self.in_thread(run)
        self.assertEqual((a, b, c), ("héllo", b"\x00\x01\x02", ""))
        yield self.assertReleased()

    @inlineCallbacks
    def test_subprotocol_negotiated_by_backend(self) -> Any:
        """The backend's chosen subprotocol reaches the external client."""
        def run() -> Any:
            with connect(self.ws_url("/"), subprotocols=["chat.v1", "chat.v2"]) as ws:
                return ws.subprotocol

        self.assertEqual((yield self.in_thread(run)), "chat.v2")
        yield self.assertReleased()

    @inlineCallbacks
    def test_8_mib_message_relayed_piecewise_with_bounded_memory(self) -> Any:
        """An 8 MiB binary message arrives whole (hash equal) without the tunnel holding it."""
        payload = os.urandom(8 * MiB)
        before = rss_bytes()

        def run() -> str:
            with connect(self.ws_url("/count"), max_size=None) as ws:
                ws.send(payload)
                return str(ws.recv())

        answer = yield self.in_thread(run)
        n, digest, frames = answer.split()
        self.assertEqual((int(n), digest), (len(payload), hashlib.sha256(payload).hexdigest()))
        self.assertGreater(int(frames), 1)  # relayed as pieces, not one reassembled frame
        self.assertLess(rss_bytes() - before, 40 * MiB)
        yield self.assertReleased()

    @inlineCallbacks
    def test_backend_close_code_and_reason_reach_client(self) -> Any:
        """A close 4000 'backend bye' from the backend reaches the external client."""
        def run() -> Any:
            ws = connect(self.ws_url("/"))
            ws.send("close-me")
            try:
                ws.recv()
            except ConnectionClosed as e:
                return (e.rcvd.code, e.rcvd.reason) if e.rcvd else None
            return None

        self.assertEqual((yield self.in_thread(run)), (4000, "backend bye"))
        yield self.assertReleased()

    @inlineCallbacks
    def test_client_close_code_and_reason_reach_backend(self) -> Any:
        """A close 4001 'client bye' from the external client reaches the backend."""
        def run() -> None:
            ws = connect(self.ws_url("/"))
            ws.send("x")
            ws.recv()
            ws.close(4001, "client bye")

        yield self.in_thread(run)
        yield wait_for(lambda: (4001, "client bye") in self.factory.closes, what="backend close")
        yield self.assertReleased()

    @inlineCallbacks
    def test_refused_handshake_keeps_status(self) -> Any:
        """A backend refusing the handshake with 403 gives the external client 403, not 101."""
        self.assertEqual((yield self.in_thread(handshake_status, self.ws_url("/deny"))), 403)
        yield self.assertReleased()

    @inlineCallbacks
    def test_backend_down_is_502(self) -> Any:
        """A WebSocket route whose backend is down answers 502."""
        self.assertEqual((yield self.in_thread(handshake_status, self.ws_url("/down"))), 502)
        yield self.assertReleased()

    @inlineCallbacks
    def test_plain_http_backend_answering_200_is_502(self) -> Any:
        """A backend that answers an upgrade with 200 is a bad gateway."""
        self.assertEqual((yield self.in_thread(handshake_status, self.ws_url("/plain"))), 502)
        yield self.assertReleased()

    @inlineCallbacks
    def test_over_limit_message_closes_1009(self) -> Any:
        """A message over the route's max_message_size closes that connection with 1009."""
        def run() -> Any:
            ws = connect(self.ws_url("/small"))
            ws.send(b"x" * 4096)
            try:
                ws.recv()
            except ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
            return None

        self.assertEqual((yield self.in_thread(run)), 1009)
        yield self.assertReleased()

    @inlineCallbacks
    def test_invalid_utf8_closes_1007(self) -> Any:
        """Invalid UTF-8 in a text message closes that connection with 1007; others go on."""
        def run() -> Any:
            with connect(self.ws_url("/")) as good:
                ws = connect(self.ws_url("/"))
                with ws.send_context():
                    ws.protocol.send_text(b"\xff\xfe")  # sans-I/O layer: no UTF-8 check
                try:
                    ws.recv()
                    code = None
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                good.send("still here")
                return code, good.recv()

        self.assertEqual((yield self.in_thread(run)), (1007, "still here"))
        yield self.assertReleased()

    @inlineCallbacks
    def test_killing_the_client_closes_all_websockets(self) -> Any:
        """With 20 WebSockets open, losing the tunnel closes all of them promptly."""
        opened = threading.Barrier(21)
        results: list[Any] = []

        def run() -> None:
            ws = connect(self.ws_url("/"), open_timeout=10)
            ws.send("hi")
            ws.recv()
            opened.wait(20)
            started = time.monotonic()
            try:
                ws.recv(timeout=10)
            except ConnectionClosed as e:
                results.append((e.rcvd.code if e.rcvd else None, time.monotonic() - started))
            except TimeoutError:
                results.append(("timeout", 0))

        ds = [self.in_thread(run) for _ in range(20)]
        yield deferToThread(opened.wait, 20)
        assert self.client.dial.handle is not None
        self.client.dial.handle.abort("test kills the tunnel")
        yield DeferredList(ds)
        self.assertEqual(len(results), 20)
        self.assertTrue(all(code == 1011 for code, _ in results), results)
        yield self.assertReleased()

    @inlineCallbacks
    def test_slow_websocket_reader_does_not_block_http(self) -> Any:
        """A WebSocket whose reader stalls leaves HTTP on the same tunnel prompt."""
        import treq
        stop = threading.Event()

        def stalled() -> None:
            ws = connect(self.ws_url("/"), max_size=None)
            # Send a lot and never read: the echo fills every window on the way back.
            for _ in range(64):
                if stop.is_set():
                    break
                ws.send(b"y" * 256 * 1024)
            stop.wait(30)
            ws.close()

        d = self.in_thread(stalled)
        yield wait_for(lambda: len(self.factory.open) == 1, what="stalled socket open")
        for _ in range(10):
            started = time.monotonic()
            resp = yield treq.get(f"http://127.0.0.1:{self.stack.http_port}/bytes/1000".encode(), persistent=False)
            self.assertEqual(len((yield treq.content(resp))), 1000)
            self.assertLess(time.monotonic() - started, 1.0)
        stop.set()
        yield d
        yield self.assertReleased()

    @inlineCallbacks
    def test_200_concurrent_websockets(self) -> Any:
        """200 WebSockets at once each get their own messages back."""
        def run(i: int) -> bool:
            with connect(self.ws_url("/"), open_timeout=30) as ws:
                for j in range(3):
                    ws.send(f"{i}-{j}")
                    if ws.recv(timeout=30) != f"{i}-{j}":
                        return False
            return True

        results = yield DeferredList([self.in_thread(run, i) for i in range(200)], consumeErrors=True)
        ok = [r for success, r in results if success and r]
        self.assertEqual(len(ok), 200, [r for r in results if not (r[0] and r[1])][:3])
        yield self.assertReleased()


class WebSocketLimitsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.factory = WebSocketServerFactory()
        self.factory.protocol = EchoBackend
        self.factory.connects = 0
        self.factory.open = set()
        self.factory.closes = []
        self.factory.pings = 0
        self.backend = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.stack = Stack([{"name": "ws", "group": "default",
                             "backend": f"http://127.0.0.1:{self.backend.getHost().port}"}])
        yield self.stack.start()
        self.client = yield self.stack.add_client(max_websockets=2, max_concurrency=1, websocket_ping_interval=1)
        self.url = f"ws://127.0.0.1:{self.stack.http_port}/"

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.stack.stop()
        yield self.backend.stopListening()
        yield wait_for(lambda: not any("_notify_bucket" in repr(c) for c in reactor.getDelayedCalls()),
                       what="autobahn timers to expire")

    @inlineCallbacks
    def test_pings_answered_and_client_auto_pings_backend(self) -> Any:
        """The entry answers an external ping, and the client pings its idle backend connection."""
        def run() -> bool:
            with connect(self.url) as ws:
                ws.send("x")
                ws.recv()
                pong = ws.ping(b"are you there")
                answered = pong.wait(5)
                deadline = time.monotonic() + 10
                while self.factory.pings == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                return bool(answered)

        self.assertTrue((yield deferToThread(run)))
        self.assertGreater(self.factory.pings, 0)

    @inlineCallbacks
    def test_websockets_beyond_max_websockets_are_refused_503(self) -> Any:
        """With the client's max_websockets at 2 (max_concurrency 1, which WebSockets do not use), a third WebSocket is refused with 503."""
        release = threading.Event()
        opened = threading.Barrier(3)

        def hold() -> None:
            with connect(self.url) as ws:
                ws.send("x")
                ws.recv()
                opened.wait(10)
                release.wait(20)

        holders = [deferToThread(hold) for _ in range(2)]
        yield deferToThread(opened.wait, 10)

        status = yield deferToThread(handshake_status, self.url)
        release.set()
        yield DeferredList(holders)
        self.assertEqual(status, 503)
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")


class HostRecorder(WebSocketServerProtocol):
    """Records the raw Host lines of each opening handshake it accepts."""

    def onConnect(self, request: Any) -> None:
        raw = self.http_request_data.split(b"\r\n")
        self.factory.hosts.append([line.split(b":", 1)[1].strip().decode() for line in raw[1:]
                                   if line.lower().startswith(b"host:")])


class WebSocketHostTests(TestCase):
    """WebSocket backends see the external Host, or the route's set_host, as HTTP backends do."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.factory = WebSocketServerFactory()
        self.factory.protocol = HostRecorder
        self.factory.hosts = []
        self.backend = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        backend = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack([
            {"name": "plain", "group": "default", "backend": backend},
            {"name": "renamed", "group": "default", "backend": backend, "path_prefix": "/renamed",
             "set_host": "internal.example"},
        ])
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        yield self.stack.add_client()

    def handshake(self, path: str) -> Any:
        def run() -> None:
            with connect(f"ws://127.0.0.1:{self.stack.http_port}{path}") as ws:
                ws.send("x")   # the backend answers nothing; the handshake is what counts

        return deferToThread(run)

    @inlineCallbacks
    def test_backend_sees_external_host(self) -> Any:
        """Without set_host the backend gets the Host the external client sent, once, not its own address."""
        yield self.handshake("/ws")
        self.assertEqual(self.factory.hosts, [[f"127.0.0.1:{self.stack.http_port}"]])

    @inlineCallbacks
    def test_backend_sees_set_host(self) -> Any:
        """With set_host the backend gets exactly that Host (no port added), once."""
        yield self.handshake("/renamed/ws")
        self.assertEqual(self.factory.hosts, [["internal.example"]])


class HostLineTests(SynchronousTestCase):
    """The handshake's Host line rewrite (pure)."""

    def test_only_the_host_line_changes(self) -> None:
        """replace_host_line rewrites the one Host line (any case) and nothing else."""
        request = b"GET /x HTTP/1.1\r\nUser-Agent: a\r\nhost: 127.0.0.1:9\r\nX-Host: keep\r\n\r\n"
        self.assertEqual(replace_host_line(request, "app.example.com"),
                         b"GET /x HTTP/1.1\r\nUser-Agent: a\r\nHost: app.example.com\r\nX-Host: keep\r\n\r\n")

    def test_unsafe_host_falls_back(self) -> None:
        """A Host value that could split the handshake is not used (autobahn's own Host stays)."""
        self.assertEqual(_header_safe("a.example\r\nX-Evil: 1"), "")
        self.assertEqual(_header_safe("a.example:8080"), "a.example:8080")
