"""gRPC routes on the HTTP/2 edge over loopback: :authority routing, access rules, limits, TLS backends, drain.

Callers are grpcio sync stubs in threads; backends real ``grpc.server``s
(tests/grpc_services.py); a raw socket (tests/h2_frames.py) where grpcio would
not misbehave on purpose.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import bcrypt
import grpc
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread

from tests import h2_frames as f
from tests.certs import make_pki
from tests.grpc_services import RAW_SERVICE, GrpcBackend
from tests.harness import Stack, wait_for
from tests.test_e2e_grpc import code_of
from tests.test_e2e_http import PooledTestCase, free_port

PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
DEAD = "tunneld.test.Dead"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class GrpcEdgeTests(PooledTestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.backend = GrpcBackend(workers=8)
        self.addCleanup(deferToThread, self.backend.stop)
        live, dead = self.backend.url, f"grpc://127.0.0.1:{free_port()}"
        self.stack = Stack([
            # Same service, three hosts: exact beats wildcard beats none.
            {"name": "exact", "grpc_service": DEAD, "host": "api.example.com", "backend": dead},
            {"name": "wild", "grpc_service": DEAD, "host": "*.example.com", "backend": live},
            {"name": "denied", "grpc_service": "tunneld.test.Denied", "backend": live, "deny_ips": ["127.0.0.0/8"]},
            {"name": "allowed", "grpc_service": "tunneld.test.Allowed", "backend": live,
             "allow_ips": ["127.0.0.1/32"]},
            {"name": "raw", "grpc_service": RAW_SERVICE, "backend": live, "basic_auth": [f"alice:{HASH}"]},
        ], server={"grpc_listen": "127.0.0.1:0", "max_connections": 3})
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        yield self.stack.add_client()

    def call(self, path: str, body: bytes = b"hi", authority: str | None = None,
             metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        options = [("grpc.default_authority", authority)] if authority else []

        def run() -> Any:
            with grpc.insecure_channel(f"127.0.0.1:{self.stack.grpc_port}", options=options) as channel:
                return channel.unary_unary(path).with_call(body, metadata=metadata, timeout=10)

        return deferToThread(run)

    # -- routing ------------------------------------------------------------------------------------

    @inlineCallbacks
    def test_authority_picks_the_route(self) -> Any:
        """:authority decides among routes of one service: exact, then *. wildcard; no match is UNIMPLEMENTED."""
        # The wildcard route's backend answers (Dead is unknown there: UNIMPLEMENTED from the backend itself).
        code = yield code_of(self.call(f"/{DEAD}/Any", authority="www.example.com:443"))
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        # The exact route's backend is unreachable: UNAVAILABLE says that route was chosen.
        code = yield code_of(self.call(f"/{DEAD}/Any", authority="API.example.com"))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        code = yield code_of(self.call(f"/{DEAD}/Any", authority="example.org"))
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)

    # -- access rules ----------------------------------------------------------------------------------

    @inlineCallbacks
    def test_ip_rules_refuse_with_permission_denied_before_any_client(self) -> Any:
        """deny_ips / allow_ips: PERMISSION_DENIED at the edge, nothing crosses the tunnel."""
        code = yield code_of(self.call("/tunneld.test.Denied/Echo"))
        self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
        assert self.stack.server is not None
        self.assertEqual(self.stack.server.hub.counters["requests"], 0)
        # Allowed from 127.0.0.1: it reaches the backend (which has no such service).
        code = yield code_of(self.call("/tunneld.test.Allowed/Echo"))
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(self.stack.server.hub.counters["requests"], 1)

    @inlineCallbacks
    def test_basic_auth_unauthenticated_and_never_forwarded(self) -> Any:
        """basic_auth: none or wrong -> UNAUTHENTICATED; right -> served, authorization not forwarded."""
        path = f"/{RAW_SERVICE}/Echo"
        code = yield code_of(self.call(path))
        self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED)
        code = yield code_of(self.call(path, metadata=(("authorization", basic("alice", "wrong")),)))
        self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED)
        body, call = yield self.call(path, metadata=(("authorization", basic("alice", PASSWORD)), ("x-k", "v")))
        self.assertEqual(body, b"hi")
        echoed = dict(call.initial_metadata())
        self.assertEqual(echoed.get("x-k"), "v")
        self.assertNotIn("authorization", echoed)

    # -- limits --------------------------------------------------------------------------------------

    @inlineCallbacks
    def test_max_connections_applies_to_the_grpc_entry(self) -> Any:
        """Beyond max_connections a new connection gets GOAWAY and is closed; freeing one admits again."""
        peers = []
        for _ in range(3):
            peer = f.RawPeer()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stack.grpc_port), peer)
            peer.transport.write(f.PREFACE + f.settings())
            peers.append(peer)
        extra = f.RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stack.grpc_port), extra)
        extra.transport.write(f.PREFACE + f.settings())
        yield wait_for(lambda: extra.closed, what="the extra connection to be closed")
        self.assertEqual(extra.goaway_code(), 0xB)
        for peer in peers:
            self.assertFalse(peer.closed)
            peer.transport.loseConnection()
        yield wait_for(lambda: all(p.closed for p in peers), what="the peers to close")
        assert self.stack.server is not None and self.stack.server.grpc is not None
        yield wait_for(lambda: not self.stack.server.grpc.entry.connections, what="the entry to count them gone")
        body, _ = yield self.call(f"/{RAW_SERVICE}/Echo", metadata=(("authorization", basic("alice", PASSWORD)),))
        self.assertEqual(body, b"hi")


class GrpcPerAddressTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def test_one_address_cannot_take_every_grpc_connection(self) -> Any:
        """max_connections_per_ip on grpc_listen: 127.0.0.2 beyond its cap gets GOAWAY; 127.0.0.1 is still served."""
        backend = GrpcBackend(workers=4)
        self.addCleanup(deferToThread, backend.stop)
        stack = Stack([{"name": "raw", "grpc_service": RAW_SERVICE, "backend": backend.url}],
                      server={"grpc_listen": "127.0.0.1:0", "max_connections_per_ip": 5, "admin_listen": "127.0.0.1:0"})
        yield stack.start()
        self.addCleanup(stack.stop)
        yield stack.add_client()
        peers = []
        for _ in range(8):
            peer = f.RawPeer()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", stack.grpc_port,
                                                     bindAddress=("127.0.0.2", 0)), peer)
            peer.transport.write(f.PREFACE + f.settings())
            peers.append(peer)
        yield wait_for(lambda: sum(p.closed for p in peers) == 3, what="three connections refused")
        self.assertEqual(sorted(p.goaway_code() for p in peers if p.closed), [0xB] * 3)

        def call() -> bytes:
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
                return channel.unary_unary(f"/{RAW_SERVICE}/Echo")(b"from .1", timeout=10)  # type: ignore[no-any-return]

        self.assertEqual((yield deferToThread(call)), b"from .1")
        assert stack.server is not None
        self.assertEqual(stack.server.hub.grpc_entry.per_ip.refused, 3)
        for peer in peers:
            if not peer.closed:
                peer.transport.loseConnection()
        yield wait_for(lambda: all(p.closed for p in peers), what="the peers to close")


class GrpcsBackendTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def test_grpcs_backend_verified(self) -> Any:
        """A grpcs:// backend (TLS, ALPN h2) is served when backend_ca signs it, UNAVAILABLE when nothing does."""
        pki = make_pki(os.path.abspath(self.mktemp()))
        with open(pki.server_key, "rb") as k, open(pki.server_cert, "rb") as c:
            backend = GrpcBackend(workers=4, tls=(k.read(), c.read()))
        self.addCleanup(deferToThread, backend.stop)
        self.assertTrue(backend.url.startswith("grpcs://"))
        stack = Stack([{"name": "raw", "grpc_service": RAW_SERVICE, "backend": backend.url}],
                      server={"grpc_listen": "127.0.0.1:0"})
        yield stack.start()
        self.addCleanup(stack.stop)
        trusting = yield stack.add_client(backend_ca=pki.ca)

        def call() -> Any:
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
                return channel.unary_unary(f"/{RAW_SERVICE}/Echo")(b"over tls", timeout=10)

        body = yield deferToThread(call)
        self.assertEqual(body, b"over tls")
        yield stack.stop_client(trusting)
        yield stack.add_client()
        code = yield code_of(deferToThread(call))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)


class GrpcDrainTests(PooledTestCase):
    timeout = 60

    @inlineCallbacks
    def test_drain_lets_a_call_in_flight_finish(self) -> Any:
        """SIGTERM's drain: GOAWAY to callers, a call in flight still completes with its answer."""
        backend = GrpcBackend(workers=4)
        self.addCleanup(deferToThread, backend.stop)
        stack = Stack([{"name": "raw", "grpc_service": RAW_SERVICE, "backend": backend.url}],
                      server={"grpc_listen": "127.0.0.1:0", "drain_timeout": 20})
        yield stack.start()
        yield stack.add_client()
        channel = grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}")
        self.addCleanup(channel.close)
        gated = channel.stream_unary(f"/{RAW_SERVICE}/Gated")
        future = gated.future(iter([b"a" * 10, b"b" * 20]), timeout=30)
        yield wait_for(lambda: stack.server_in_flight() == 1, what="the call in flight")
        assert stack.server is not None
        stopping = stack.server.service.stopService()
        yield wait_for(lambda: stack.server.grpc.entry.draining, what="the drain to start")  # type: ignore[union-attr]
        backend.raw.gate.set()
        answer = yield deferToThread(future.result)
        self.assertEqual(len(answer), 16)
        yield stopping
        yield stack.stop()
