"""One gRPC entry call (protocols/h2/grpc_entry.py) against fakes: deadline, limits, refusals, credit, on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.dispatch import GrpcRefusal, GrpcTarget
from tunneld.protocols.h2.connection import Incoming
from tunneld.protocols.h2.grpc_entry import GrpcEntryCall


class FakeTunnel:
    is_open = True
    lost_reason = None

    def __init__(self, window_full: bool = False) -> None:
        self.started: list[pb.TunnelMessage] = []
        self.bodies: list[tuple[bytes, bool]] = []
        self.cancelled: list[tuple[int, str]] = []
        self.credited = 0
        self.window_full = window_full
        self.handler: Any = None

    def start(self, msg: pb.TunnelMessage, handler: Any) -> str:
        self.started.append(msg)
        self.handler = handler
        return "r1"

    def send_body(self, request_id: str, data: bytes, end: bool = False) -> bool:
        self.bodies.append((data, end))
        return not self.window_full

    def cancel(self, request_id: str, code: int = 0, message: str = "") -> None:
        self.cancelled.append((code, message))

    def consumed(self, request_id: str, n: int) -> None:
        self.credited += n


class FakeConnection:
    def __init__(self, decision: Any) -> None:
        self.clock = Clock()
        self.address = "192.0.2.7"
        self.inspector = None
        self.cancelled = 0
        self.decision = decision
        self.asked: list[tuple[Any, ...]] = []
        self.records: list[dict[str, object]] = []
        self.out: list[tuple[str, Any]] = []
        self.acked = 0
        self.dispatcher = self

    def dispatch_grpc(self, *args: Any) -> Any:
        self.asked.append(args)
        return self.decision

    def finished(self, record: dict[str, object]) -> None:
        self.records.append(record)

    def send_headers(self, sid: int, headers: Any, end: bool = False) -> None:
        self.out.append(("headers", (dict(headers), end)))

    def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        self.out.append(("data", data))

    def send_trailers(self, sid: int, headers: Any) -> None:
        self.out.append(("trailers", dict(headers)))

    def ack(self, sid: int, n: int) -> None:
        self.acked += n

    def reset(self, sid: int, code: int) -> None:
        self.out.append(("reset", code))


def head(path: bytes = b"/pkg.Svc/Do", *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"api.example.com:443"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *extra]


def message(body: bytes) -> bytes:
    return b"\0" + len(body).to_bytes(4, "big") + body


def call(decision: Any, headers: Any, body: bytes = b"", end: bool = True) -> tuple[GrpcEntryCall, FakeConnection]:
    conn = FakeConnection(decision)
    c = GrpcEntryCall(conn, 1)  # type: ignore[arg-type]
    c.incoming(Incoming(headers=headers, body=body, end=end))
    return c, conn


class EntryCallTests(SynchronousTestCase):
    def test_unary_head_carries_everything(self) -> None:
        """One tunnel message: service, method, :authority, metadata (-bin decoded), the body, the half-close."""
        tunnel = FakeTunnel()
        _, conn = call(GrpcTarget(tunnel, "r", 1000), head(b"/pkg.Svc/Do", (b"x-a", b"1"), (b"x-b-bin", b"AAH/")),
                       message(b"hi"))
        [msg] = tunnel.started
        req = msg.grpc_request
        self.assertEqual((req.service, req.method, req.host, req.body, req.is_last_chunk),
                         ("pkg.Svc", "Do", "api.example.com:443", message(b"hi"), True))
        meta = [(h.name, h.value) for h in req.metadata]
        self.assertIn(("x-b-bin", b"\x00\x01\xff"), meta)
        self.assertIn(("x-forwarded-for", b"192.0.2.7"), meta)
        self.assertNotIn("te", [n for n, _ in meta])
        self.assertEqual(conn.asked, [("pkg.Svc", "api.example.com:443", "192.0.2.7", None)])
        self.assertEqual(conn.acked, len(message(b"hi")))

    def test_deadline_is_enforced_at_the_entry(self) -> None:
        """grpc-timeout passes: DEADLINE_EXCEEDED to the caller and the tunnel request cancelled, whatever the backend does."""
        tunnel = FakeTunnel()
        c, conn = call(GrpcTarget(tunnel, "r", 1000), head(b"/pkg.Svc/Do", (b"grpc-timeout", b"250m")), message(b"x"))
        self.assertAlmostEqual(tunnel.started[0].grpc_request.timeout, 0.25)
        conn.clock.advance(0.24)
        self.assertEqual(conn.out, [])
        conn.clock.advance(0.02)
        [(kind, (fields, end))] = conn.out
        self.assertEqual((kind, fields[b"grpc-status"], end), ("headers", b"4", True))
        self.assertEqual(tunnel.cancelled[0][0], s.TIMEOUT)
        self.assertEqual(conn.records[-1]["status"], "DEADLINE_EXCEEDED")

    def test_refusal_is_trailers_only_and_nothing_starts(self) -> None:
        """A refusal from the router is one HEADERS frame with the status; no tunnel request."""
        _, conn = call(GrpcRefusal("PERMISSION_DENIED", "address 192.0.2.7 refused", "r", "ip_denied"), head())
        [(kind, (fields, end))] = conn.out
        self.assertEqual((kind, fields[b":status"], fields[b"grpc-status"], end), ("headers", b"200", b"7", True))
        self.assertEqual(conn.records[-1]["refusal"], "ip_denied")

    def test_message_over_the_limit_is_resource_exhausted(self) -> None:
        """A request message above the route's limit ends the call from its prefix; the tunnel request is cancelled."""
        tunnel = FakeTunnel()
        c, conn = call(GrpcTarget(tunnel, "r", 10), head(), message(b"small"), end=False)
        c.incoming(Incoming(body=message(b"x" * 11), end=True))
        self.assertEqual(conn.out[-1][1][0][b"grpc-status"], b"8")
        self.assertEqual(len(tunnel.cancelled), 1)

    def test_caller_bytes_acknowledged_only_when_the_tunnel_took_them(self) -> None:
        """A full tunnel window holds the caller's HTTP/2 credit until writable()."""
        tunnel = FakeTunnel(window_full=True)
        c, conn = call(GrpcTarget(tunnel, "r", 1 << 20), head(), message(b"a"), end=False)
        acked = conn.acked
        c.incoming(Incoming(body=message(b"b" * 100), end=False))
        self.assertEqual(conn.acked, acked)
        tunnel.handler.writable()
        self.assertEqual(conn.acked, acked + len(message(b"b" * 100)))

    def test_response_credit_follows_the_caller(self) -> None:
        """The answer's bytes are credited to the tunnel only as HTTP/2 frames them (sent)."""
        tunnel = FakeTunnel()
        c, conn = call(GrpcTarget(tunnel, "r", 1000), head(), message(b"q"))
        tunnel.handler.message_received(pb.TunnelMessage(grpc_response=pb.GrpcResponse(
            is_first_chunk=True, body=message(b"answer"))), False)
        self.assertEqual(tunnel.credited, 0)
        c.sent(len(message(b"answer")))
        self.assertEqual(tunnel.credited, len(message(b"answer")))

    def test_caller_reset_cancels_the_tunnel_request(self) -> None:
        """RST_STREAM from the caller (or its connection gone) cancels the request through the tunnel."""
        tunnel = FakeTunnel()
        c, conn = call(GrpcTarget(tunnel, "r", 1000), head(), message(b"q"), end=False)
        c.closed(0x8)
        self.assertEqual(tunnel.cancelled, [(s.CANCELLED, "caller cancelled")])
        self.assertEqual(conn.records[-1]["status"], "CANCELLED")

    def test_not_grpc_is_415(self) -> None:
        """A request that is not gRPC (wrong content-type) gets HTTP 415, as grpc servers answer."""
        _, conn = call(GrpcTarget(FakeTunnel(), "r", 1000),
                       [(b":method", b"GET"), (b":path", b"/"), (b"content-type", b"text/html")])
        self.assertEqual(conn.out[0][1][0][b":status"], b"415")
