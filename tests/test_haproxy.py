"""Two real tunneld servers behind a real HAProxy, one client process listing both (SPEC §7.1).

Everything runs on 127.0.0.1: the backends (HTTP, WebSocket echo, gRPC) in
this process, two ``twistd tunneld-server`` processes (``proxy_protocol``,
``drain_delay``, ``/healthz`` on their admin ports), one
``twistd tunneld-client`` with ``server = [A, B]``, and Debian's ``haproxy``
with a config written here on free ports in the shape of
etc/haproxy/haproxy.cfg (HTTP/WebSocket entry with ``send-proxy-v2``, gRPC
entry with ``proto h2``, checks on ``/healthz``, retries and redispatch),
plus a stats listener the test reads to know when HAProxy sees a server up.

Load is a few threads, each looping GETs on one keep-alive connection, for a
bounded time.  Every process is stopped by its own PID; every wait polls with
a bound.  Skipped when haproxy is not installed (.ci/run installs it).
"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any

import grpc
import treq
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from bench.backend import make_site
from tests import h2_frames
from tests.grpc_services import RAW_SERVICE, GrpcBackend
from tests.harness import wait_for
from tests.processes import ROOT, ProcessStack, Twistd, free_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else "")
SHIPPED_CFG = os.path.join(ROOT, "etc", "haproxy", "haproxy.cfg")
CHECK_INTER_MS = 250   # HAProxy: a server is out after fall=2 failed checks, ~0.5 s
DRAIN_DELAY = 1.5      # tunneld keeps serving this long after SIGTERM (> fall x inter)
MEASURED: dict[str, float] = {}


def measured(name: str, value: float) -> None:
    MEASURED[name] = value
    print(f"\nMEASURED {name} = {value:.3f}")


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class HAProxy:
    """``haproxy -db`` (foreground) with a config file; stopped by its PID."""

    def __init__(self, case: TestCase, config: str) -> None:
        self.path = os.path.abspath(case.mktemp()) + "-haproxy.cfg"
        with open(self.path, "w") as f:
            f.write(config)
        self.log_path = self.path + ".log"
        self._log = open(self.log_path, "ab")
        case.addCleanup(self._log.close)
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.path], stdout=self._log, stderr=subprocess.STDOUT)
        case.addCleanup(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def haproxy_config(http_port: int, grpc_port: int, stats_port: int, servers: list[ProcessStack]) -> str:
    """The test's HAProxy config: etc/haproxy/haproxy.cfg's shape on loopback ports, faster checks."""
    http_servers = "\n".join(
        f"    server s{i} 127.0.0.1:{s.http_port} send-proxy-v2 check port {s.admin_port}"
        for i, s in enumerate(servers))
    grpc_servers = "\n".join(
        f"    server s{i} 127.0.0.1:{s.grpc_port} proto h2 send-proxy-v2 source 127.0.0.4 check port {s.admin_port} "
        f"check-proto h1"
        for i, s in enumerate(servers))
    return f"""global
    maxconn 2000

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 60s
    timeout check 1s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter {CHECK_INTER_MS}ms fall 2 rise 1

frontend tunneld_http
    bind 127.0.0.1:{http_port}
    default_backend tunneld_http

backend tunneld_http
    balance leastconn
{http_servers}

frontend tunneld_grpc
    bind 127.0.0.1:{grpc_port} proto h2
    default_backend tunneld_grpc

backend tunneld_grpc
    balance leastconn
{grpc_servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class Load:
    """``conns`` threads, each GETting ``path`` on its own keep-alive connection until stopped (bounded)."""

    def __init__(self, port: int, path: str, conns: int = 4, limit: float = 40.0) -> None:
        self.port = port
        self.path = path
        self.results: list[tuple[float, float, Any]] = []   # (sent, done, status or error text)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + limit
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(conns)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            sent = time.monotonic()
            try:
                conn.request("GET", self.path, headers={"Host": "app.test"})
                resp = conn.getresponse()
                resp.read()
                outcome: Any = resp.status
                if resp.will_close:
                    conn.close()
            except Exception as e:   # connection reset, refused, timeout: the request failed
                outcome = f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self.lock:
                self.results.append((sent, time.monotonic(), outcome))
        conn.close()

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def stop(self) -> Any:
        self.stopping.set()

        def join() -> list[tuple[float, float, Any]]:
            for t in self.threads:
                t.join(15)
            return list(self.results)

        return deferToThread(join)


def ws_echo(port: int, path: str, message: bytes) -> tuple[bytes, bytes]:
    """A minimal WebSocket client on a raw socket: handshake, one masked text frame, one frame back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return buf, b""
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(message))
        sock.sendall(bytes([0x81, 0x80 | len(message)]) + mask + payload)
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
        length = rest[1] & 0x7F if len(rest) >= 2 else 0
        return head, rest[2:2 + length]


def raw_exchange(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``data`` from ``source`` and read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class FleetCase(TestCase):
    """Backends, servers A and B (each its own ProcessStack), one client on both, HAProxy in front."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        if not HAPROXY:
            raise SkipTest("haproxy is not installed (apt-get install haproxy; .ci/run does it)")
        site = reactor.listenTCP(0, make_site(), interface="127.0.0.1")
        self.addCleanup(site.stopListening)
        ws_factory = WebSocketServerFactory()
        ws_factory.protocol = Echo
        ws = reactor.listenTCP(0, ws_factory, interface="127.0.0.1")
        self.addCleanup(ws.stopListening)
        self.grpc_backend = GrpcBackend(workers=4)
        self.addCleanup(self.grpc_backend.stop)
        routes = [
            {"name": "web", "backend": f"http://127.0.0.1:{site.getHost().port}"},
            {"name": "ws", "path_prefix": "/ws", "backend": f"http://127.0.0.1:{ws.getHost().port}"},
            {"name": "raw", "grpc_service": RAW_SERVICE, "backend": self.grpc_backend.url},
        ]
        self.stacks: list[ProcessStack] = []
        for _ in range(2):
            admin_port, grpc_port = free_port(), free_port()
            stack = ProcessStack(self, routes, server={
                "admin_listen": f"127.0.0.1:{admin_port}", "grpc_listen": f"127.0.0.1:{grpc_port}",
                "proxy_protocol": True, "drain_delay": DRAIN_DELAY, "ready_timeout": 30, "drain_timeout": 2,
                "access_log": False,
            })
            stack.admin_port, stack.grpc_port = admin_port, grpc_port   # type: ignore[attr-defined]
            stack.start_server()
            self.stacks.append(stack)
        self.a, self.b = self.stacks
        self.http_port, self.grpc_port, self.stats_port = free_port(), free_port(), free_port()
        self.haproxy = HAProxy(self, haproxy_config(self.http_port, self.grpc_port, self.stats_port, self.stacks))
        # /healthz is "starting" from start until the client is connected.
        for stack in self.stacks:
            yield self.wait_health(stack, 503, b"starting\n")
        self.servers = [f"127.0.0.1:{s.tunnel_port}" for s in self.stacks]
        self.client = self.a.add_client(server=self.servers, heartbeat_interval=1)
        yield self.a.wait_connected(self.client, count=2)
        for stack in self.stacks:
            yield self.wait_health(stack, 200, b"ok\n")
            yield self.wait_up(stack)

    def logs(self) -> str:
        return "\n".join(s.logs() for s in self.stacks) + "\n===== haproxy\n" + self.haproxy.log()

    @inlineCallbacks
    def healthz(self, stack: ProcessStack) -> Any:
        try:
            resp = yield treq.get(f"http://127.0.0.1:{stack.admin_port}/healthz", persistent=False,  # type: ignore
                                  timeout=2)
            body = yield treq.content(resp)
            return resp.code, body
        except Exception as e:
            return 0, repr(e).encode()

    @inlineCallbacks
    def wait_health(self, stack: ProcessStack, code: int, body: bytes, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = yield self.healthz(stack)
            if got == (code, body):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz never answered {code} {body!r} (last {got!r})\n{self.logs()}")
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def haproxy_state(self, stack: ProcessStack, backend: str = "tunneld_http") -> Any:
        """HAProxy's status ("UP", "DOWN", ...) of ``stack`` in ``backend``, from the stats CSV."""
        name = f"s{self.stacks.index(stack)}"
        try:
            resp = yield treq.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", persistent=False, timeout=2)
            text = (yield treq.content(resp)).decode()
        except Exception:
            return ""
        for row in csv.reader(io.StringIO(text.lstrip("# "))):
            if len(row) > 17 and row[0] == backend and row[1] == name:
                return row[17]
        return ""

    @inlineCallbacks
    def wait_up(self, stack: ProcessStack, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for backend in ("tunneld_http", "tunneld_grpc"):
                state = yield self.haproxy_state(stack, backend)
                states.append(state)
            if all(state == "UP" for state in states):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy never saw {stack.server} UP (last {state!r})\n{self.logs()}")
            yield deferLater(reactor, 0.05, lambda: None)

    def get(self, path: str, source: str = "127.0.0.1") -> Any:
        def run() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10, source_address=(source, 0))
            try:
                conn.request("GET", path, headers={"Host": "app.test"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        return deferToThread(run)

    @inlineCallbacks
    def served_by(self, stack: ProcessStack) -> Any:
        resp = yield treq.get(f"http://127.0.0.1:{stack.admin_port}/status", persistent=False, timeout=5)  # type: ignore
        doc = yield treq.json_content(resp)
        return doc["totals"]["requests"]


class FleetTests(FleetCase):
    @inlineCallbacks
    def test_both_servers_serve_http_websocket_grpc_and_proxy_protocol(self) -> Any:
        """Both servers list the client; HTTP via either, WebSocket echo, gRPC unary, PROXY address in XFF."""
        for stack in self.stacks:
            resp = yield treq.get(f"http://127.0.0.1:{stack.admin_port}/status", persistent=False)  # type: ignore
            doc = yield treq.json_content(resp)
            self.assertEqual([c["healthy"] for c in doc["clients"]], [True])
        for _ in range(8):
            code, _ = yield self.get("/bytes/10")
            self.assertEqual(code, 200)
        counts = []
        for stack in self.stacks:
            n = yield self.served_by(stack)
            counts.append(n)
        self.assertTrue(all(n > 0 for n in counts), counts)   # leastconn spread them over both

        # A request from 127.0.0.3 reaches the backend with 127.0.0.3 in X-Forwarded-For (PROXY v2).
        code, body = yield self.get("/echo", source="127.0.0.3")
        self.assertEqual(code, 200)
        headers = dict((n.lower(), v) for n, v in json.loads(body)["headers"])
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.3")
        # A connection straight to a server's entry without the header is closed unanswered.
        got = yield deferToThread(raw_exchange, self.a.http_port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        self.assertEqual(got, b"")

        head, echoed = yield deferToThread(ws_echo, self.http_port, "/ws/echo", b"hello through haproxy")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        self.assertEqual(echoed, b"hello through haproxy")

        def unary() -> tuple[bytes, Any, dict[str, Any]]:
            with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
                call = channel.unary_unary(f"/{RAW_SERVICE}/Echo")
                answer, call_info = call.with_call(b"ping via h2", timeout=10)
                return answer, call_info.code(), dict(call_info.initial_metadata())

        answer, code, echoed = yield deferToThread(unary)
        self.assertEqual((answer, code), (b"ping via h2", grpc.StatusCode.OK))
        # HAProxy dials the gRPC entry from 127.0.0.4; the PROXY v2 header carries the caller's 127.0.0.1.
        self.assertEqual(echoed["x-forwarded-for"], "127.0.0.1")
        call = h2_frames.frame(h2_frames.HEADERS, h2_frames.END_HEADERS | h2_frames.END_STREAM, 1,
                               h2_frames.grpc_request_block(f"/{RAW_SERVICE}/Echo".encode()))
        got = yield deferToThread(raw_exchange, self.a.grpc_port, h2_frames.PREFACE + h2_frames.settings() + call)
        # Straight to the entry, no PROXY header: closed unanswered (the server's own preface frames only).
        self.assertEqual({kind for kind, *_ in h2_frames.parse(got)} - {h2_frames.SETTINGS, h2_frames.WINDOW_UPDATE},
                         set())

    @inlineCallbacks
    def test_rolling_restart_loses_nothing(self) -> Any:
        """Under steady GETs through HAProxy, SIGTERM+restart A then B: every request answers 200."""
        load = Load(self.http_port, "/bytes/100", conns=4)
        try:
            for stack in self.stacks:
                before = load.count()
                yield wait_for(lambda: load.count() > before + 20, timeout=10, what="load flowing")
                old = stack.server
                assert old is not None
                old.signal(signal.SIGTERM)
                # /healthz answers 503 from SIGTERM until the process is gone (then nothing listens).
                seen = []
                while old.running:
                    got = yield self.healthz(stack)
                    if got[0]:
                        seen.append(got)
                    yield deferLater(reactor, 0.05, lambda: None)
                self.assertTrue(seen, "no /healthz answer between SIGTERM and exit")
                self.assertEqual({code for code, _ in seen}, {503}, seen)
                self.assertIn(old.returncode, (0, -signal.SIGTERM), self.logs())   # twistd re-raises SIGTERM
                links = self.client.count("connected to ")
                stack.start_server()
                yield wait_for(lambda: self.client.count("connected to ") > links, timeout=20,
                               what="the client back on the restarted server")
                yield self.wait_health(stack, 200, b"ok\n")
                yield self.wait_up(stack)
            before = load.count()
            yield wait_for(lambda: load.count() > before + 20, timeout=10, what="load after the restarts")
        finally:
            results = yield load.stop()
        bad = [r for r in results if r[2] != 200]
        self.assertEqual(bad, [], f"{len(bad)} of {len(results)} failed\n{self.logs()}")
        measured("haproxy.rolling_restart.requests", len(results))

    @inlineCallbacks
    def test_kill_9_only_in_flight_may_fail(self) -> Any:
        """kill -9 of server A under load: only requests in flight then may fail; all sent 3 s later succeed."""
        load = Load(self.http_port, "/bytes/100", conns=4)
        try:
            yield wait_for(lambda: load.count() > 20, timeout=10, what="load flowing")
            assert self.a.server is not None
            killed_at = time.monotonic()
            self.a.server.kill()
            yield wait_for(lambda: time.monotonic() > killed_at + 4.5, timeout=10, what="4.5 s of load after the kill")
        finally:
            results = yield load.stop()
        failed = [r for r in results if r[2] != 200]
        late = [r for r in failed if r[0] >= killed_at + 3]
        self.assertEqual(late, [], self.logs())
        # In flight at the kill = sent before it; at most one per connection.
        self.assertTrue(all(r[0] <= killed_at for r in failed), failed)
        self.assertLessEqual(len(failed), 4, failed)
        after = [r for r in results if r[0] >= killed_at + 3]
        self.assertTrue(after, "no request sent 3 s after the kill")
        # How long the route was unavailable: from the kill to the last failure (0 when none failed).
        measured("haproxy.kill9.failed", len(failed))
        measured("haproxy.kill9.unavailable_s", max((r[1] - killed_at for r in failed), default=0.0))
        state = yield self.haproxy_state(self.a)
        self.assertTrue(state.startswith("DOWN"), state)


class ShippedConfigTests(TestCase):
    def test_shipped_haproxy_cfg_is_valid(self) -> None:
        """etc/haproxy/haproxy.cfg passes `haproxy -c`."""
        if not HAPROXY:
            raise SkipTest("haproxy is not installed")
        done = subprocess.run([HAPROXY, "-c", "-f", SHIPPED_CFG], capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
