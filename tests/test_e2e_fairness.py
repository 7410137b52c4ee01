"""Fair under abuse, over loopback: one address, one WebSocket or one path trick cannot take the service.

Attackers are blocking sockets in a thread pool (bound to 127.0.0.2, "another
address"); a normal client on 127.0.0.1 is answered during each attack.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import grpc

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.web import server
from twisted.logger import formatEvent, globalLogPublisher

from tests.harness import TOKEN, wait_for
from tests.test_e2e_access import AccessTestCase, Recorder, get, raw_exchange, status_of
from tunneld import __version__
from tunneld import tunnel_pb2 as pb
from tunneld import tunnel_pb2_grpc
from tunneld.admin import server_status


class PerAddressTests(AccessTestCase):
    """Default max_connections_per_ip (256)."""

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_300_connections_from_one_address_refused_past_the_cap(self) -> Any:
        """300 connections from 127.0.0.2: 256 are held, the other 44 get 503 and close; 127.0.0.1 is served meanwhile."""
        port = self.stack.http_port
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])

        def attack() -> list[bytes]:
            answers = []
            for _ in range(300):
                s = socket.socket()
                s.settimeout(5)
                s.bind(("127.0.0.2", 0))
                s.connect(("127.0.0.1", port))
                held.append(s)
            for s in held:
                s.setblocking(False)
                try:
                    answers.append(s.recv(4096))
                except BlockingIOError:
                    answers.append(b"")
            return answers

        yield self.in_thread(attack)
        yield wait_for(lambda: self.site.refused_per_ip == 44, what="44 refusals")
        self.assertEqual(self.site.per_ip.held("127.0.0.2"), 256)
        for _ in range(5):
            self.assertEqual(status_of((yield self.in_thread(get, port, "/ok"))), 200)
        refused = yield self.in_thread(raw_exchange, port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n", "127.0.0.2")
        self.assertEqual(status_of(refused), 503)
        self.assertIn(b"too many connections from your address", refused)
        for s in held:
            s.close()
        yield wait_for(lambda: self.site.per_ip.held("127.0.0.2") == 0, what="slots released")
        self.assertEqual(status_of((yield self.in_thread(get, port, "/ok", source="127.0.0.2"))), 200)
        yield self.assert_released()
        self.assertEqual(self.site.per_ip.counts, {})


_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def open_websockets(port: int, n: int, source: str = "127.0.0.1", batch: int = 100,
                    request: bytes = _UPGRADE) -> tuple[list[socket.socket], list[bytes]]:
    """``n`` WebSocket handshakes from ``source`` (sent ``batch`` at a time), left open and idle: (sockets, heads)."""
    sockets: list[socket.socket] = []
    heads: list[bytes] = []
    for start in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - start)):
            s = socket.socket()
            s.settimeout(30)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            s.sendall(request)
            group.append(s)
        for s in group:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            heads.append(head)
        sockets += group
    return sockets, heads


class WebSocketLimitTests(AccessTestCase):
    """WebSockets have their own limits, apart from the requests' max_concurrency."""

    server_settings = {"max_websockets_per_ip": 2000, "max_connections_per_ip": 2000}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        # The route allows more than the client does: the client's own max_websockets is what refuses.
        return [{"name": "ws", "backend": ws_backend, "path_prefix": "/ws", "max_websockets": 2000},
                {"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_1000_idle_websockets_leave_requests_alone(self) -> Any:
        """1,000 idle WebSockets (the client's max_websockets) take no request slot: GETs are 200 meanwhile; the 1,001st WebSocket gets 503 naming max_websockets."""
        port = self.stack.http_port
        sockets, heads = yield self.in_thread(open_websockets, port, 1000)
        self.addCleanup(lambda: [s.close() for s in sockets])
        self.assertEqual({status_of(h) for h in heads}, {101})
        client_session = self.client.hub.links[0].tunnel.session
        self.assertEqual(len(client_session), 1000)
        for _ in range(20):
            self.assertEqual(status_of((yield self.in_thread(get, port, "/ok"))), 200)
        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        refused = yield self.in_thread(raw_exchange, port, _UPGRADE)
        self.assertEqual(status_of(refused), 503)
        self.assertIn(b"client is at its limit: 1000 WebSockets open (max_websockets)", refused)
        # Both sides say so in words; nobody calls it a protocol violation.
        self.assertTrue(any(line.startswith("refused a request from") and "max_websockets" in line for line in lines),
                        lines)
        self.assertTrue(any(line.startswith("a client refused a WebSocket") for line in lines), lines)
        self.assertFalse([line for line in lines if "protocol violation" in line])
        for s in sockets:
            s.close()
        yield self.assert_released()


class WebSocketPerAddressTests(AccessTestCase):
    server_settings = {"max_websockets_per_ip": 5}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "ws", "backend": ws_backend, "path_prefix": "/ws", "max_websockets": 8},
                {"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_per_address_and_per_route_websocket_caps(self) -> Any:
        """max_websockets_per_ip 5: the 6th from 127.0.0.2 gets 503 in words; the route's max_websockets 8 caps all addresses together; closing frees both."""
        port = self.stack.http_port
        held, heads = yield self.in_thread(open_websockets, port, 6, "127.0.0.2")
        self.addCleanup(lambda: [s.close() for s in held])
        self.assertEqual([status_of(h) for h in heads], [101] * 5 + [503])
        self.assertIn(b"too many WebSockets from your address", heads[5] + held[5].recv(4096))
        more, more_heads = yield self.in_thread(open_websockets, port, 4, "127.0.0.1")
        held += more
        self.assertEqual([status_of(h) for h in more_heads], [101] * 3 + [503])
        self.assertIn(b"route ws has 8 WebSockets open", more_heads[3] + more[3].recv(4096))
        self.assertEqual(status_of((yield self.in_thread(get, port, "/ok", source="127.0.0.2"))), 200)
        factory = self.site.websocket.entry_factory
        self.assertEqual((factory.per_ip.held("127.0.0.2"), factory.per_route), (5, {"ws": 8}))
        for s in held:
            s.close()
        yield self.assert_released()
        self.assertEqual((factory.per_ip.counts, factory.per_route), ({}, {}))


class PathTests(AccessTestCase):
    """Routing, access rules and the backend's path on the normalised path."""

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        self.chat = Recorder()
        port = reactor.listenTCP(0, server.Site(self.chat), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        chat = f"http://127.0.0.1:{port.getHost().port}"
        return [{"name": "web", "backend": backend},
                {"name": "chat", "backend": chat, "path_prefix": "/chat/"},
                {"name": "admin", "backend": chat, "path_prefix": "/admin/", "deny_ips": ["127.0.0.0/8"]},
                {"name": "raw", "backend": chat, "path_prefix": "/raw/", "preserve_path": True},
                {"name": "ws", "backend": ws_backend, "path_prefix": "/ws"}]

    @inlineCallbacks
    def test_path_variants_reach_the_right_route(self) -> Any:
        """/x/../chat/, /%63hat/ and //chat/ reach route chat (its backend gets /chat/); the same tricks cannot walk around admin's deny_ips."""
        port = self.stack.http_port
        for raw in ("/x/../chat/", "/%63hat/", "//chat/", "/chat/./"):
            self.assertEqual(status_of((yield self.in_thread(get, port, raw))), 200, raw)
        self.assertEqual(self.chat.paths(), ["/chat/"] * 4)
        self.assertEqual(self.recorder.paths(), [])
        for raw in ("/admin/", "/x/../admin/", "/%61dmin/", "//admin/", "/chat/../admin/"):
            self.assertEqual(status_of((yield self.in_thread(get, port, raw))), 403, raw)
        self.assertEqual(len(self.chat.seen), 4)
        yield self.assert_released()

    @inlineCallbacks
    def test_escapes_and_encoded_slash_or_nul_are_400(self) -> Any:
        """'..' above the root, %2F and %00 are 400 and reach no backend; the connection stays usable for others."""
        port = self.stack.http_port
        for raw in ("/../chat/", "/chat/../../etc/passwd", "/%2e%2e/chat/", "/chat%2Fx", "/chat/%00", "/a%zz"):
            response = yield self.in_thread(get, port, raw)
            self.assertEqual(status_of(response), 400, raw)
        self.assertEqual((self.chat.seen, self.recorder.seen), ([], []))
        refused = yield self.in_thread(raw_exchange, port, _UPGRADE.replace(b"GET /ws", b"GET /../ws"))
        self.assertEqual(status_of(refused), 400)
        self.assertEqual(status_of((yield self.in_thread(get, port, "/ok"))), 200)
        yield self.assert_released()

    @inlineCallbacks
    def test_backend_gets_normalised_path_unless_preserve_path(self) -> Any:
        """The backend gets the normalised path and the query as sent; preserve_path = true sends the raw path."""
        port = self.stack.http_port
        self.assertEqual(status_of((yield self.in_thread(get, port, "/chat//a/./b/%7e?q=%2e%2e&x=/"))), 200)
        self.assertEqual(status_of((yield self.in_thread(get, port, "/x/../raw//a/./%7e?q=1"))), 200)
        self.assertEqual(self.chat.paths(), ["/chat/a/b/~?q=%2e%2e&x=/", "/x/../raw//a/./%7e?q=1"])
        yield self.assert_released()

    @inlineCallbacks
    def test_http2_requests_are_routed_on_the_normalised_path_too(self) -> Any:
        """Over HTTP/2 (h2c) the same variants reach route chat with /chat/, and cannot walk around admin's deny_ips."""
        import shutil
        import subprocess

        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        port = self.stack.http_port

        def h2_status(path: str) -> int:
            out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "--path-as-is", "-o", "/dev/null",
                                  "-w", "%{http_code} %{http_version}", f"http://127.0.0.1:{port}{path}"],
                                 capture_output=True, text=True, timeout=30)
            code, version = out.stdout.split()
            assert version == "2", out.stdout
            return int(code)

        for raw in ("/x/../chat/", "/%63hat/", "//chat/"):
            self.assertEqual((yield self.in_thread(h2_status, raw)), 200, raw)
        self.assertEqual(self.chat.paths(), ["/chat/"] * 3)
        for raw in ("/x/../admin/", "/%61dmin/", "//admin/"):
            self.assertEqual((yield self.in_thread(h2_status, raw)), 403, raw)
        self.assertEqual((yield self.in_thread(h2_status, "/chat%2Fx")), 400)
        self.assertEqual(len(self.chat.seen), 3)
        yield self.assert_released()

    @inlineCallbacks
    def test_websocket_upgrade_on_a_path_variant(self) -> Any:
        """A WebSocket handshake to //ws or /x/../ws reaches route ws."""
        port = self.stack.http_port
        for raw in (b"//ws", b"/x/../ws"):
            sockets, heads = yield self.in_thread(open_websockets, port, 1, request=_UPGRADE.replace(b"GET /ws", b"GET " + raw))
            for s in sockets:
                s.close()
            self.assertEqual(status_of(heads[0]), 101, raw)
        self.assertEqual(len(self.ws_factory.heads), 2)
        yield self.assert_released()


def rogue_client(port: int, stop: threading.Event, client_id: str = "rogue") -> None:
    """A client with a valid token that opens its stream and heartbeats, but never reads a message."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = tunnel_pb2_grpc.TunnelServiceStub(channel)

    def frames() -> Iterator[pb.TunnelFrame]:
        yield pb.TunnelFrame(messages=[pb.TunnelMessage(
            direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL,
            stream_open=pb.StreamOpenRequest(client_id=client_id, group="default", version=__version__,
                                             stream_id="rogue-1", token=TOKEN))])
        while not stop.wait(0.3):
            yield pb.TunnelFrame(messages=[pb.TunnelMessage(
                direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL,
                heartbeat=pb.Heartbeat(sent_at_ms=int(time.time() * 1000)))])

    call = stub.Proxy(frames())   # responses never read
    try:
        stop.wait(60)
    finally:
        call.cancel()
        channel.close()


def post(port: int, path: str, size: int, timeout: float = 20.0) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n").encode()
    with socket.socket() as s:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(head)
        s.sendall(b"u" * size)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            received += chunk
        return received


class StallTests(AccessTestCase):
    """A client that heartbeats but never reads is left out after stall_timeout, and dropped later."""

    server_settings = {"stall_timeout": 1, "heartbeat_timeout": 6}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "up", "backend": backend, "timeout": 4}]

    @inlineCallbacks
    def test_never_reading_client_is_not_chosen(self) -> Any:
        """Uploads that went to the rogue stall; once it is marked stalled every upload goes to the working client (200), /status shows it, and it is dropped past heartbeat_timeout."""
        port = self.stack.http_port
        registry = self.hub.registry
        stop = threading.Event()
        self.addCleanup(stop.set)
        rogue = self.in_thread(rogue_client, self.stack.tunnel_port, stop)
        yield wait_for(lambda: len(registry) == 2, what="rogue registered")
        # Enough concurrent uploads that the least-loaded choice sends some to the rogue.
        first = [self.in_thread(post, port, "/first", 1024 * 1024) for _ in range(4)]
        yield wait_for(lambda: bool(registry.stalled), timeout=10, what="rogue marked stalled")
        [stalled] = registry.stalled
        self.assertEqual(stalled.client_id, "rogue")
        status = server_status(self.hub, None, 0.0)
        flags = {c["client_id"]: c["stalled"] for c in status["clients"]}
        self.assertEqual(flags, {"rogue": True, self.client.hub.client_id: False})
        for _ in range(12):
            self.assertEqual(status_of((yield self.in_thread(post, port, "/after", 512 * 1024))), 200)
        answers = [status_of(r) for r in (yield gatherResults(first))]
        self.assertIn(504, answers)   # the ones the rogue took before it was found out
        yield wait_for(lambda: len(registry) == 1, timeout=15, what="rogue dropped")
        self.assertEqual(registry.stalled, set())
        self.assertEqual(self.hub.counters["stalls"], 1)
        stop.set()
        yield rogue
        yield self.assert_released()


def frame(payload: bytes) -> bytes:
    """A masked client text frame (mask key 0: the payload unchanged), payload < 126 bytes."""
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def flood(port: int, count: int) -> int:
    """Open a WebSocket, send ``count`` 1-byte frames in large writes then "done"; the echoes received until "done"."""
    sockets, heads = open_websockets(port, 1)
    s = sockets[0]
    try:
        assert status_of(heads[0]) == 101, heads[0]
        s.sendall(frame(b"x") * count + frame(b"done"))
        received = b""
        while not received.endswith(b"done"):
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        return received.count(b"\x81\x01x")
    finally:
        s.close()


class FairShareTests(AccessTestCase):
    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "ws", "backend": ws_backend, "path_prefix": "/ws"}, {"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_flooding_websocket_is_parsed_a_bounded_amount_per_turn(self) -> Any:
        """30,000 tiny frames in large writes: every frame arrives, never more than TURN_FRAMES are parsed in one reactor turn, and a GET is answered meanwhile."""
        from tunneld.protocols import websocket as ws
        per_turn: list[int] = []
        feed = ws.EntryWebSocket._feed

        def counting(proto: Any) -> None:
            before = proto._frames
            feed(proto)
            per_turn.append(proto._frames - before)

        self.patch(ws.EntryWebSocket, "_feed", counting)
        port = self.stack.http_port
        flooding = self.in_thread(flood, port, 30000)
        statuses = []
        while not flooding.called:
            statuses.append(status_of((yield self.in_thread(get, port, "/ok"))))
        echoed = yield flooding
        self.assertEqual(echoed, 30000)
        self.assertEqual(set(statuses), {200})
        self.assertLessEqual(max(per_turn), ws.TURN_FRAMES)
        self.assertGreaterEqual(len(per_turn), 30000 // ws.TURN_FRAMES)
        yield self.assert_released()
