"""The public entry against the internet, over loopback: access control per route, limits against abuse.

External clients are blocking sockets (or the ``websockets`` library) in a
thread pool, so they can bind 127.0.0.2 ("another address") and speak raw
HTTP; the server, the client and the backend run in the test's reactor.
The backend records every request head it receives, which is how the
tests prove what did (and did not) travel through the tunnel.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
from typing import Any, Callable

import bcrypt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from tests.harness import TOKEN, Stack, wait_for
from tunneld.server_tap import ReloadOnHangup

PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Recorder(resource.Resource):
    """Answers 200 with what it saw; keeps every request head (and body)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        headers = [(n.decode("latin-1").lower(), v.decode("latin-1"))
                   for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        self.seen.append({"method": request.method.decode(), "path": request.uri.decode("latin-1"),
                          "headers": headers, "body": body.decode("latin-1")})
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"path": request.uri.decode("latin-1")}).encode()

    def paths(self) -> list[str]:
        return [s["path"] for s in self.seen]


class Echo(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> Any:
        self.factory.heads.append(dict(request.headers))
        return None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def raw_exchange(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Send ``data`` from ``source``; everything the server sends until it closes (or ``timeout``)."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            received += chunk
        return received


def get(port: int, path: str, *, source: str = "127.0.0.1", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: app.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), source)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def header_of(response: bytes, name: str) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


class AccessTestCase(TestCase):
    timeout = 120
    server_settings: dict[str, Any] = {}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self) -> Any:
        self.recorder = Recorder()
        port = reactor.listenTCP(0, server.Site(self.recorder), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.ws_factory = WebSocketServerFactory()
        self.ws_factory.protocol = Echo
        self.ws_factory.heads = []
        ws_port = reactor.listenTCP(0, self.ws_factory, interface="127.0.0.1")
        self.addCleanup(ws_port.stopListening)
        self.backend = f"http://127.0.0.1:{port.getHost().port}"
        self.stack = Stack(self.routes(self.backend, f"http://127.0.0.1:{ws_port.getHost().port}"),
                           server=dict(self.server_settings))
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        self.client = yield self.stack.add_client()
        self.pool = ThreadPool(minthreads=1, maxthreads=8, name="access-clients")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        assert self.stack.server is not None
        self.hub = self.stack.server.hub
        self.site = self.hub.entry

    def in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return deferToThreadPool(reactor, self.pool, f, *args, **kwargs)

    @inlineCallbacks
    def assert_released(self) -> Any:
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="requests released")
        yield wait_for(lambda: self.site.connections == 0, what="entry connections closed")


class BasicAuthTests(AccessTestCase):
    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [
            {"name": "secret", "backend": backend, "path_prefix": "/secret", "basic_auth": [f"alice:{HASH}"]},
            {"name": "open", "backend": backend, "path_prefix": "/open"},
            {"name": "ws-secret", "backend": ws_backend, "path_prefix": "/ws-secret",
             "basic_auth": [f"alice:{HASH}"]},
            {"name": "ws-office", "backend": ws_backend, "path_prefix": "/ws-office", "allow_ips": ["127.0.0.2"]},
        ]

    @inlineCallbacks
    def test_401_without_or_with_wrong_credentials_200_with_right_ones(self) -> Any:
        """No or wrong credentials: 401 with the route's realm and nothing reaches the backend; right ones: 200, no Authorization at the backend."""
        port = self.stack.http_port
        none = yield self.in_thread(get, port, "/secret/a")
        wrong = yield self.in_thread(get, port, "/secret/b", headers={"Authorization": basic("alice", "nope")})
        stranger = yield self.in_thread(get, port, "/secret/c", headers={"Authorization": basic("mallory", "x")})
        self.assertEqual([status_of(r) for r in (none, wrong, stranger)], [401, 401, 401])
        for r in (none, wrong, stranger):
            self.assertEqual(header_of(r, "WWW-Authenticate"), 'Basic realm="secret"')
        self.assertEqual(self.recorder.seen, [])
        right = yield self.in_thread(get, port, "/secret/d", headers={"Authorization": basic("alice", PASSWORD)})
        self.assertEqual(status_of(right), 200)
        self.assertEqual(self.recorder.paths(), ["/secret/d"])
        self.assertNotIn("authorization", [n for n, _ in self.recorder.seen[0]["headers"]])
        # An open route passes Authorization through untouched (it is the backend's business there).
        other = yield self.in_thread(get, port, "/open", headers={"Authorization": "Bearer backend-token"})
        self.assertEqual(status_of(other), 200)
        self.assertIn(("authorization", "Bearer backend-token"), self.recorder.seen[-1]["headers"])
        yield self.assert_released()

    @inlineCallbacks
    def test_websocket_handshake_refused_with_401_and_403(self) -> Any:
        """A WebSocket handshake without credentials gets 401 (with the challenge), from a not-allowed address 403; with credentials it opens."""
        url = f"ws://127.0.0.1:{self.stack.http_port}"

        def handshake(path: str, headers: dict[str, str] | None = None) -> tuple[int, str | None]:
            try:
                with connect(url + path, additional_headers=headers or {}) as ws:
                    ws.send("ping")
                    assert ws.recv(timeout=10) == "ping"
                return 101, None
            except InvalidStatus as e:
                return int(e.response.status_code), e.response.headers.get("WWW-Authenticate")

        self.assertEqual((yield self.in_thread(handshake, "/ws-secret")), (401, 'Basic realm="ws-secret"'))
        self.assertEqual((yield self.in_thread(handshake, "/ws-secret", {"Authorization": basic("alice", "no")}))[0],
                         401)
        self.assertEqual((yield self.in_thread(handshake, "/ws-office"))[0], 403)
        self.assertEqual(self.ws_factory.heads, [])
        opened = yield self.in_thread(handshake, "/ws-secret", {"Authorization": basic("alice", PASSWORD)})
        self.assertEqual(opened, (101, None))
        self.assertEqual(len(self.ws_factory.heads), 1)
        self.assertNotIn("authorization", self.ws_factory.heads[0])
        yield self.assert_released()

    @inlineCallbacks
    def test_verified_credentials_are_cached_and_a_reload_forgets_them(self) -> Any:
        """The same header is verified by bcrypt once; after SIGHUP with a changed password it is refused."""
        calls: list[bytes] = []
        access = self.hub.access
        real_verify = access.verify

        def counting(password: bytes, hashed: bytes) -> bool:
            calls.append(password)
            return bool(real_verify(password, hashed))

        access.verify = counting
        port = self.stack.http_port
        header = {"Authorization": basic("alice", PASSWORD)}
        for _ in range(3):
            self.assertEqual(status_of((yield self.in_thread(get, port, "/secret", headers=header))), 200)
        self.assertEqual(len(calls), 1)
        for _ in range(2):
            self.assertEqual(status_of((yield self.in_thread(get, port, "/secret",
                                                             headers={"Authorization": basic("alice", "x")}))), 401)
        self.assertEqual(len(calls), 2)

        new_hash = bcrypt.hashpw(b"changed", bcrypt.gensalt(4)).decode()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"""
[server]
tunnel_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
grpc_listen = ""
admin_listen = ""
[[groups]]
name = "default"
tokens = ["{TOKEN}"]
[[routes]]
name = "secret"
path_prefix = "/secret"
backend = "{self.backend}"
basic_auth = ["alice:{new_hash}"]
""")
        reloader = ReloadOnHangup(path, self.hub, reactor)
        reloader.startService()
        self.addCleanup(reloader.stopService)
        version = self.hub.config.version()
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_for(lambda: self.hub.config.version() != version, what="reload")
        self.assertEqual(status_of((yield self.in_thread(get, port, "/secret", headers=header))), 401)
        self.assertEqual(status_of((yield self.in_thread(get, port, "/secret",
                                                         headers={"Authorization": basic("alice", "changed")}))), 200)
        self.assertEqual(len(calls), 4)
        yield self.assert_released()

    @inlineCallbacks
    def test_failed_logins_are_limited_per_source_address(self) -> Any:
        """After 10 failed logins from one address, more get 429 without bcrypt; another address still gets 401."""
        port = self.stack.http_port
        for i in range(10):
            r = yield self.in_thread(get, port, "/secret", headers={"Authorization": basic("alice", f"guess{i}")})
            self.assertEqual(status_of(r), 401)
        runs = self.hub.access.verifications
        limited = yield self.in_thread(get, port, "/secret", headers={"Authorization": basic("alice", "guess-x")})
        self.assertEqual(status_of(limited), 429)
        self.assertEqual(self.hub.access.verifications, runs)
        elsewhere = yield self.in_thread(get, port, "/secret", source="127.0.0.2",
                                         headers={"Authorization": basic("alice", PASSWORD)})
        self.assertEqual(status_of(elsewhere), 200)
        yield self.assert_released()


class IpRuleTests(AccessTestCase):
    server_settings = {"admin_listen": "127.0.0.1:0"}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [
            {"name": "denied", "backend": backend, "path_prefix": "/deny", "deny_ips": ["127.0.0.2/32", "::1/128"]},
            {"name": "office", "backend": backend, "path_prefix": "/allow",
             "allow_ips": ["127.0.0.2/31", "2001:db8::/32"]},
        ]

    @inlineCallbacks
    def test_403_from_denied_and_not_allowed_addresses_200_from_allowed(self) -> Any:
        """deny_ips refuses 127.0.0.2 with 403; allow_ips refuses 127.0.0.1 and serves 127.0.0.2; refusals are logged and counted."""
        port = self.stack.http_port
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if text.startswith("access refused"):
                lines.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.assertEqual(status_of((yield self.in_thread(get, port, "/deny", source="127.0.0.2"))), 403)
        self.assertEqual(status_of((yield self.in_thread(get, port, "/allow", source="127.0.0.1"))), 403)
        self.assertEqual(self.recorder.seen, [])
        self.assertEqual(status_of((yield self.in_thread(get, port, "/allow", source="127.0.0.2"))), 200)
        self.assertEqual(status_of((yield self.in_thread(get, port, "/deny", source="127.0.0.1"))), 200)
        self.assertEqual(self.recorder.paths(), ["/allow", "/deny"])
        yield self.assert_released()
        self.assertEqual(len(lines), 2)
        self.assertIn("route=denied reason=ip_denied status=403 address=127.0.0.2", lines[0])
        self.assertIn("route=office reason=ip_not_allowed status=403 address=127.0.0.1", lines[1])

        def admin(path: str) -> bytes:
            raw = raw_exchange(self.stack.server.admin.port.getHost().port,   # type: ignore[union-attr]
                               f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return raw.split(b"\r\n\r\n", 1)[1]

        metrics = (yield self.in_thread(admin, "/metrics")).decode()
        self.assertIn('tunneld_access_refusals_total{reason="ip_denied",route="denied"} 1.0', metrics)
        self.assertIn('tunneld_access_refusals_total{reason="ip_not_allowed",route="office"} 1.0', metrics)
        self.assertIn("tunneld_http_header_timeouts_total 0.0", metrics)
        self.assertIn("tunneld_http_connections_refused_total 0.0", metrics)
        status = json.loads((yield self.in_thread(admin, "/status")))
        routes = {r["name"]: r for r in status["routes"]}
        self.assertEqual((routes["denied"]["access"], routes["denied"]["refusals"]), ("deny_ips", {"ip_denied": 1}))
        self.assertEqual(routes["office"]["refusals"], {"ip_not_allowed": 1})
        self.assertEqual(status["counters"]["access_refusals"], 2)


class LimitTests(AccessTestCase):
    server_settings = {"header_timeout": 1, "max_connections": 50}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_slowloris_closed_after_header_timeout_while_others_are_served(self) -> Any:
        """A connection trickling header lines is closed after header_timeout; normal requests keep answering meanwhile."""
        port = self.stack.http_port

        def slowloris() -> float:
            with socket.socket() as s:
                s.settimeout(0.2)
                s.connect(("127.0.0.1", port))
                started = time.monotonic()
                s.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n")
                while time.monotonic() - started < 15:
                    try:
                        s.sendall(b"X-Slow: 1\r\n")
                        if s.recv(1) == b"":
                            return time.monotonic() - started
                    except socket.timeout:
                        continue
                    except OSError:
                        return time.monotonic() - started
                return -1.0

        slow = self.in_thread(slowloris)
        latencies = []
        while not slow.called:
            started = time.monotonic()
            self.assertEqual(status_of((yield self.in_thread(get, port, "/ok"))), 200)
            latencies.append(time.monotonic() - started)
        held = yield slow
        self.assertGreaterEqual(held, 1.0)      # never before header_timeout
        self.assertLess(held, 5.0)              # and soon after it (sweep every 0.25 s)
        self.assertGreater(len(latencies), 3)
        self.assertLess(max(latencies), 2.0)    # generous: only shows requests were not stuck behind it
        self.assertEqual(self.site.header_timeouts, 1)
        yield self.assert_released()

    @inlineCallbacks
    def test_idle_keep_alive_connection_owes_its_next_head_too(self) -> Any:
        """After a served request, a keep-alive connection that sends no next head is closed after header_timeout."""
        port = self.stack.http_port

        def keep_alive() -> tuple[bytes, float]:
            with socket.socket() as s:
                s.settimeout(10)
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET /first HTTP/1.1\r\nHost: app.test\r\n\r\n")
                got = b""
                while b"\r\n\r\n" not in got:
                    got += s.recv(65536)
                served = time.monotonic()
                while True:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        return got, time.monotonic() - served
                    got += chunk

        got, idle = yield self.in_thread(keep_alive)
        self.assertEqual(status_of(got), 200)
        self.assertGreater(idle, 0.5)
        self.assertLess(idle, 5.0)
        self.assertEqual(self.site.header_timeouts, 1)
        yield self.assert_released()

    @inlineCallbacks
    def test_51st_connection_refused_then_served_after_others_close(self) -> Any:
        """With max_connections = 50 the 51st connection gets 503 and is closed; once some close, new ones are served."""
        port = self.stack.http_port
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(50):
            s = socket.socket()
            s.connect(("127.0.0.1", port))
            held.append(s)
        yield wait_for(lambda: self.site.connections == 50, what="50 connections")
        refused = yield self.in_thread(raw_exchange, port, b"")
        self.assertEqual(status_of(refused), 503)
        self.assertEqual(self.site.refused_connections, 1)
        self.assertEqual(self.site.connections, 50)
        for s in held[:10]:
            s.close()
        yield wait_for(lambda: self.site.connections == 40, what="10 connections closed")
        self.assertEqual(status_of((yield self.in_thread(get, port, "/again"))), 200)
        for s in held[10:]:
            s.close()
        yield self.assert_released()


class SmugglingTests(AccessTestCase):
    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_smuggling_attempts_are_refused_or_harmless(self) -> Any:
        """CL+TE, duplicate or odd Content-Length, odd Transfer-Encoding: 400 and the backend sees nothing; obs-fold is joined, never a new header."""
        port = self.stack.http_port
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n"
        attempts = {
            "CL.TE": b"POST /a HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n" + smuggled,
            "TE.CL": b"POST /b HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                     b"0\r\n\r\n" + smuggled,
            "CL.CL": b"POST /c HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n" + smuggled,
            "CL list": b"POST /d HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0, 44\r\n\r\n" + smuggled,
            "CL sign": b"POST /e HTTP/1.1\r\nHost: app.test\r\nContent-Length: +0\r\n\r\n" + smuggled,
            "TE list": b"POST /f HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
                       + smuggled,
            "TE odd": b"POST /g HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + smuggled,
            "TE space": b"POST /h HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
                        + smuggled,
            "bad chunk": b"POST /i HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"-1\r\n\r\n" + smuggled,
        }
        for name, data in attempts.items():
            response = yield self.in_thread(raw_exchange, port, data)
            self.assertEqual(status_of(response), 400, name)
            self.assertEqual(response.count(b"HTTP/1.1 "), 1, name)
        self.assertEqual(self.recorder.seen, [])

        folded = (b"GET /folded HTTP/1.1\r\nHost: app.test\r\nX-Folded: one\r\n X-Injected: two\r\n"
                  b"Connection: close\r\n\r\n")
        response = yield self.in_thread(raw_exchange, port, folded)
        self.assertEqual(status_of(response), 200)
        headers = self.recorder.seen[0]["headers"]
        self.assertIn(("x-folded", "one X-Injected: two"), headers)
        self.assertNotIn("x-injected", [n for n, _ in headers])
        self.assertEqual(self.recorder.paths(), ["/folded"])
        yield self.assert_released()


    @inlineCallbacks
    def test_oversized_lines_and_header_floods_are_cut(self) -> Any:
        """A request line over 16 KiB closes the connection, headers over max_header_size or 500 of them get 400; the backend sees nothing."""
        port = self.stack.http_port
        long_line = yield self.in_thread(raw_exchange, port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
        self.assertIn(status_of(long_line), (0, 400))
        big = yield self.in_thread(raw_exchange, port, b"GET / HTTP/1.1\r\nHost: x\r\n" +
                                   b"X-Big: " + b"b" * 9000 + b"\r\nX-Big2: " + b"b" * 9000 + b"\r\n\r\n")
        self.assertEqual(status_of(big), 400)
        many = yield self.in_thread(raw_exchange, port, b"GET / HTTP/1.1\r\nHost: x\r\n" +
                                    b"".join(b"X-%d: 1\r\n" % i for i in range(600)) + b"\r\n")
        self.assertEqual(status_of(many), 400)
        self.assertEqual(self.recorder.seen, [])
        yield self.assert_released()

    @inlineCallbacks
    def test_pipelined_flood_is_served_one_at_a_time(self) -> Any:
        """200 pipelined requests on one connection are answered in order, never more than one in flight."""
        port = self.stack.http_port
        peak = [0]

        def sample() -> None:
            peak[0] = max(peak[0], self.stack.server_in_flight())

        from twisted.internet.task import LoopingCall
        sampler = LoopingCall(sample)
        sampler.start(0.001)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        data = b"".join(b"GET /p%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % i for i in range(199))
        data += b"GET /p199 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        response = yield self.in_thread(raw_exchange, port, data)
        sampler.stop()
        self.assertEqual(response.count(b"HTTP/1.1 200 OK"), 200)
        self.assertEqual(self.recorder.paths(), [f"/p{i}" for i in range(200)])
        self.assertLessEqual(peak[0], 1)
        yield self.assert_released()


_TOKENS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"G\x00T", b"/", b"/x?y=1", b"*", b"http://evil/", b" ", b"  ",
           b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b"\r\n", b"\n", b"\r", b":", b"Host: app.test",
           b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
           b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Connection: close", b"Expect: 100-continue",
           b"Upgrade: websocket", b"Connection: Upgrade", b"Authorization: Basic Og==", b"X: \x7f\xff",
           b"\t folded", b"0\r\n\r\n", b"5\r\nhello\r\n", b"\x16\x03\x01", b"%00", b"\xc3\x28"]


class FuzzTests(AccessTestCase):
    timeout = 300
    server_settings = {"header_timeout": 2}

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "open", "backend": backend, "path_prefix": "/"},
                {"name": "secret", "backend": backend, "path_prefix": "/x", "basic_auth": [f"alice:{HASH}"],
                 "deny_ips": ["10.0.0.0/8"]}]

    @inlineCallbacks
    def test_fuzzed_request_heads_never_crash_or_leak(self) -> Any:
        """Random request heads get an answer or a close; the entry keeps serving and keeps no state behind."""
        port = self.stack.http_port
        errors: list[Any] = []
        self.flushLoggedErrors()

        @settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=12), min_size=1, max_size=25),
               st.booleans())
        def one(parts: list[bytes], finish: bool) -> None:
            data = b"".join(parts) + (b"\r\n\r\n" if finish else b"")
            with socket.socket() as s:
                s.settimeout(5)
                s.connect(("127.0.0.1", port))
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)   # the server sees the end: answer or close, never hang
                    while s.recv(65536):
                        pass
                except OSError:
                    pass

        yield self.in_thread(one)
        for _ in range(3):
            self.assertEqual(status_of((yield self.in_thread(get, port, "/still-ok"))), 200)
        yield self.assert_released()
        self.assertEqual(self.hub.access.limiter.sources.keys() - {"127.0.0.1"}, set())
        errors.extend(self.flushLoggedErrors())
        self.assertEqual(errors, [])
