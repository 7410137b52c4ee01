"""The gRPC entry under hostile HTTP/2 (SPEC §8.1): each attack ends its own connection, nobody else notices.

Every test runs one attack from a raw socket (tests/h2_frames.py) against a
real server + client + gRPC backend on loopback, and a normal grpcio call is
answered during and after it.
"""

from __future__ import annotations

import struct
from typing import Any

import grpc
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread

from tests import h2_frames as f
from tests.grpc_services import RAW_SERVICE, GrpcBackend
from tests.harness import Stack, rss_bytes, wait_for
from tests.test_e2e_http import PooledTestCase

ECHO = f"/{RAW_SERVICE}/Echo".encode()


class HostileH2Tests(PooledTestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.backend = GrpcBackend()
        self.stack = Stack([
            {"name": "raw", "group": "default", "grpc_service": RAW_SERVICE, "backend": self.backend.url},
        ], server={"grpc_listen": "127.0.0.1:0", "idle_timeout": 2, "header_timeout": 2, "max_header_size": 8192})
        yield self.stack.start()
        self.client = yield self.stack.add_client()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.stack.grpc_port}")

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield deferToThread(self.channel.close)
        yield self.stack.stop()
        yield deferToThread(self.backend.stop)

    @inlineCallbacks
    def normal_call(self) -> Any:
        """A well-behaved caller on its own connection is answered."""
        body = yield deferToThread(self.channel.unary_unary(f"/{RAW_SERVICE}/Echo"), b"still here", timeout=10)
        self.assertEqual(body, b"still here")

    @inlineCallbacks
    def attacker(self, *chunks: bytes) -> Any:
        peer = f.RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stack.grpc_port), peer)
        assert peer.transport is not None
        for chunk in chunks:
            peer.transport.write(chunk)
        return peer

    @inlineCallbacks
    def assertGoaway(self, peer: f.RawPeer, code: int | None = None) -> Any:
        yield wait_for(lambda: peer.closed, timeout=20, what="the server to close the attacking connection")
        got = peer.goaway_code()
        self.assertIsNotNone(got, "no GOAWAY before the close")
        if code is not None:
            self.assertEqual(got, code)

    @inlineCallbacks
    def assertReleased(self) -> Any:
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

    # -- the attacks -------------------------------------------------------------------------------

    @inlineCallbacks
    def test_rapid_reset_gets_goaway(self) -> Any:
        """CVE-2023-44487: thousands of streams opened and reset at once end that connection with GOAWAY."""
        block = f.grpc_request_block(b"/nope.Service/Method")
        flood = b"".join(f.frame(f.HEADERS, f.END_HEADERS, sid, block) + f.frame(f.RST_STREAM, 0, sid, b"\0\0\0\x08")
                         for sid in range(1, 2 * 5000, 2))
        peer = yield self.attacker(f.PREFACE, f.settings(), flood)
        yield self.normal_call()
        yield self.assertGoaway(peer)
        self.assertEqual(self.stack.server_in_flight(), 0)
        yield self.normal_call()
        yield self.assertReleased()

    @inlineCallbacks
    def test_continuation_flood_is_cut(self) -> Any:
        """CVE-2024-27316: a header block that never ends (CONTINUATION after CONTINUATION) is cut off."""
        start = f.frame(f.HEADERS, 0, 1, f.grpc_request_block(ECHO))
        flood = f.frame(f.CONTINUATION, 0, 1, f.literal(b"x-pad", b"a" * 1000)) * 2000
        peer = yield self.attacker(f.PREFACE, f.settings(), start, flood)
        yield self.assertGoaway(peer)
        yield self.normal_call()
        self.assertEqual(self.stack.server_in_flight(), 0)

    @inlineCallbacks
    def test_hpack_bomb_never_reaches_a_client(self) -> Any:
        """A small block that decodes to megabytes (one 4 KiB entry referenced 4,000 times) is refused at the edge."""
        rss_before = rss_bytes()
        entry = f.literal(b"x-bomb", b"b" * 4000, index=True)
        bomb = f.grpc_request_block(ECHO, extra=entry + f.indexed(62) * 4000)
        self.assertLess(len(bomb), 16 * 1024)
        peers = []
        for _ in range(5):
            peer = yield self.attacker(f.PREFACE, f.settings(), f.frame(f.HEADERS, f.END_HEADERS, 1, bomb))
            peers.append(peer)
        yield self.normal_call()
        for peer in peers:
            yield wait_for(lambda peer=peer: peer.closed or any(k == f.RST_STREAM for k, *_ in peer.frames()),
                           what="the bomb refused")
            peer.transport.loseConnection()
        self.assertEqual(self.stack.server_in_flight(), 0)   # nothing crossed the tunnel
        self.assertLess(rss_bytes() - rss_before, 64 * 1024 * 1024)
        yield self.normal_call()

    @inlineCallbacks
    def test_settings_flood_is_cut(self) -> Any:
        """SETTINGS frames faster than their ACKs are read end that connection."""
        peer = yield self.attacker(f.PREFACE, f.settings(), f.settings(initial_window_size=65535) * 20000)
        yield self.assertGoaway(peer)
        yield self.normal_call()

    @inlineCallbacks
    def test_ping_flood_is_cut(self) -> Any:
        """PINGs faster than their ACKs are read end that connection."""
        peer = yield self.attacker(f.PREFACE, f.settings(), f.frame(f.PING, 0, 0, b"12345678") * 50000)
        yield self.assertGoaway(peer)
        yield self.normal_call()

    @inlineCallbacks
    def test_preface_then_garbage(self) -> Any:
        """The HTTP/2 preface followed by garbage: GOAWAY (PROTOCOL_ERROR), then the connection is closed."""
        peer = yield self.attacker(f.PREFACE, b"\xff" * 64)
        yield self.assertGoaway(peer)
        yield self.normal_call()

    @inlineCallbacks
    def test_idle_connection_closes_even_with_pings(self) -> Any:
        """No stream for idle_timeout closes the connection; PINGs do not keep it open."""
        peer = yield self.attacker(f.PREFACE, f.settings())
        for _ in range(6):
            if peer.closed:
                break
            peer.transport.write(f.frame(f.PING, 0, 0, b"keepme!!"))
            yield deferLater(0.5)
        yield self.assertGoaway(peer, 0)

    @inlineCallbacks
    def test_zero_window_caller_stalls_only_itself(self) -> Any:
        """A caller that never opens its window gets nothing; other calls are answered; its close ends the call."""
        call = f.frame(f.HEADERS, f.END_HEADERS, 1, f.grpc_request_block(f"/{RAW_SERVICE}/Count".encode()))
        body = f.frame(f.DATA, f.END_STREAM, 1, f.grpc_message(struct.pack("!II", 1_000_000, 1024)))
        peer = yield self.attacker(f.PREFACE, f.settings(initial_window_size=0), call, body)
        yield wait_for(lambda: self.stack.server_in_flight() == 1, what="the stalled call in flight")
        for _ in range(3):
            yield self.normal_call()
        self.assertEqual(self.stack.server_in_flight(), 1)
        peer.transport.loseConnection()
        yield self.assertReleased()


def deferLater(seconds: float) -> Any:
    from twisted.internet.task import deferLater as later
    return later(reactor, seconds, lambda: None)
