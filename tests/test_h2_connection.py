"""The HTTP/2 connection layer (protocols/h2/connection.py) without sockets or real time: StringTransport + Clock.

The peer is raw frames (tests/h2_frames.py), so each test says exactly what
arrives in one read.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests import h2_frames as f
from tunneld.protocols import grpc_wire as gw
from tunneld.protocols.h2.connection import CONNECTION_LOST, H2Connection, H2Limits, Incoming


class Recorder:
    def __init__(self) -> None:
        self.incoming: list[Incoming] = []
        self.sent: list[int] = []
        self.closed: list[int] = []

    def incoming_(self, inc: Incoming) -> None:
        self.incoming.append(inc)


class RecordingHandler:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def incoming(self, inc: Incoming) -> None:
        self.log.append(("incoming", inc))

    def sent(self, n: int) -> None:
        self.log.append(("sent", n))

    def closed(self, error_code: int) -> None:
        self.log.append(("closed", error_code))


class Server(H2Connection):
    def __init__(self, limits: H2Limits, clock: Clock) -> None:
        super().__init__(limits, clock)
        self.streams: dict[int, list[tuple[str, Any]]] = {}

    def stream_opened(self, stream_id: int) -> RecordingHandler:
        self.streams[stream_id] = log = []
        return RecordingHandler(log)


def connect(**limits: Any) -> tuple[Server, StringTransport, Clock]:
    clock = Clock()
    conn = Server(H2Limits(**{"idle_timeout": 60.0, "header_timeout": 20.0, **limits}), clock)
    transport = StringTransport()
    conn.makeConnection(transport)
    conn.dataReceived(f.PREFACE + f.settings() + f.frame(f.SETTINGS, f.ACK, 0))
    return conn, transport, clock


def frames(transport: StringTransport) -> list[tuple[int, int, int, bytes]]:
    out = list(f.parse(transport.value()))
    transport.clear()
    return out


def request(stream_id: int, body: bytes = b"", end: bool = True) -> bytes:
    head = f.frame(f.HEADERS, f.END_HEADERS | (f.END_STREAM if end and not body else 0), stream_id,
                   f.grpc_request_block(b"/a.B/C"))
    if not body:
        return head
    return head + f.frame(f.DATA, f.END_STREAM if end else 0, stream_id, body)


class IncomingTests(SynchronousTestCase):
    def test_one_read_is_one_incoming_per_stream(self) -> None:
        """HEADERS, two DATA frames and END_STREAM in one read reach the handler as ONE Incoming."""
        conn, _, _ = connect()
        data = (request(1, b"", end=False) + f.frame(f.DATA, 0, 1, b"ab") + f.frame(f.DATA, f.END_STREAM, 1, b"cd"))
        conn.dataReceived(data)
        [(kind, inc)] = conn.streams[1]
        self.assertEqual(kind, "incoming")
        self.assertEqual((dict(inc.headers)[b":path"], inc.body, inc.end), (b"/a.B/C", b"abcd", True))

    def test_opened_and_reset_in_one_read_is_never_started(self) -> None:
        """Rapid reset: a stream opened and reset within one read never reaches a handler's incoming."""
        conn, _, _ = connect()
        conn.dataReceived(request(1, end=False) + f.frame(f.RST_STREAM, 0, 1, b"\0\0\0\x08"))
        self.assertEqual(conn.streams[1], [])
        self.assertEqual(conn.open_streams(), 0)

    def test_body_window_reopens_only_on_ack(self) -> None:
        """Manual flow control: no WINDOW_UPDATE for a stream until its bytes are acknowledged."""
        conn, transport, _ = connect(stream_window=65535)
        frames(transport)
        conn.dataReceived(request(1, end=False) + f.frame(f.DATA, 0, 1, b"x" * 15000) * 4)
        self.assertFalse([fr for fr in frames(transport) if fr[0] == f.WINDOW_UPDATE and fr[2] == 1])
        conn.ack(1, 60000)
        updates = [fr for fr in frames(transport) if fr[0] == f.WINDOW_UPDATE and fr[2] == 1]
        self.assertEqual(len(updates), 1)
        self.assertEqual(int.from_bytes(updates[0][3], "big"), 60000)


class OutputTests(SynchronousTestCase):
    def test_sent_reports_framed_body_and_waits_while_paused(self) -> None:
        """Queued body is reported as sent when framed; while the socket pushes back nothing is framed."""
        conn, transport, _ = connect()
        conn.dataReceived(request(1))
        log = conn.streams[1]
        conn.send_headers(1, [(b":status", b"200")])
        conn.pauseProducing()
        conn.send_data(1, b"y" * 1000)
        self.assertNotIn(("sent", 1000), log)
        conn.resumeProducing()
        self.assertIn(("sent", 1000), log)
        self.assertIn(f.DATA, [fr[0] for fr in frames(transport)])

    def test_trailers_end_the_stream_cleanly(self) -> None:
        """Headers, data and trailers go out; the handler hears closed(0) once both sides ended."""
        conn, transport, _ = connect()
        conn.dataReceived(request(1))
        conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(1, b"\0\0\0\0\x01z")
        conn.send_trailers(1, [(b"grpc-status", b"0")])
        kinds = [fr[0] for fr in frames(transport)]
        self.assertEqual([k for k in kinds if k in (f.HEADERS, f.DATA)], [f.HEADERS, f.DATA, f.HEADERS])
        self.assertEqual(conn.streams[1][-1], ("closed", 0))
        self.assertEqual(conn.open_streams(), 0)


class TimeoutTests(SynchronousTestCase):
    def test_no_request_within_header_timeout(self) -> None:
        """A connection that sends no request within header_timeout gets GOAWAY and is closed."""
        conn, transport, clock = connect(header_timeout=5)
        frames(transport)
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertIn(f.GOAWAY, [fr[0] for fr in frames(transport)])
        clock.advance(2.1)
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout_counts_from_the_last_stream_and_ignores_pings(self) -> None:
        """No open stream for idle_timeout closes the connection, however many PINGs come meanwhile."""
        conn, transport, clock = connect(idle_timeout=10)
        conn.dataReceived(request(1))
        clock.advance(30)
        self.assertFalse(transport.disconnecting)   # a stream is open: never idle
        conn.send_headers(1, [(b":status", b"200")], end=True)
        for _ in range(9):
            clock.advance(1)
            conn.dataReceived(f.frame(f.PING, 0, 0, b"12345678"))
        self.assertFalse(transport.disconnecting)
        clock.advance(1.1)
        self.assertIn(f.GOAWAY, [fr[0] for fr in frames(transport)])
        clock.advance(2.1)
        self.assertTrue(transport.disconnecting)

    def test_lost_connection_closes_every_stream(self) -> None:
        """The transport gone: every open stream's handler hears CONNECTION_LOST."""
        conn, _, _ = connect()
        conn.dataReceived(request(1) + request(3))
        conn.connectionLost(None)
        self.assertEqual([conn.streams[s][-1] for s in (1, 3)], [("closed", CONNECTION_LOST)] * 2)


class HostileTests(SynchronousTestCase):
    def test_garbage_after_the_preface_is_goaway(self) -> None:
        """Bytes that are no HTTP/2 frame: GOAWAY, the connection closed, further input ignored."""
        conn, transport, clock = connect()
        frames(transport)
        conn.dataReceived(b"\xff" * 64)
        self.assertIn(f.GOAWAY, [fr[0] for fr in frames(transport)])
        clock.advance(2.1)   # at the latest after the lingering close
        self.assertTrue(transport.disconnecting)
        conn.dataReceived(request(1))
        self.assertEqual(conn.streams, {})

    def test_header_list_above_the_limit_never_reaches_a_handler(self) -> None:
        """A decoded head above max_header_list_size is refused before any handler sees it."""
        conn, transport, _ = connect(max_header_list_size=4096)
        big = f.grpc_request_block(b"/a.B/C", extra=f.literal(b"x-big", b"b" * 8000))
        conn.dataReceived(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, big))
        self.assertEqual([log for log in conn.streams.values() if any(k == "incoming" for k, _ in log)], [])


class GrpcWireTests(SynchronousTestCase):
    def test_timeouts(self) -> None:
        """grpc-timeout parses every unit, refuses malformed values, and formats back within 8 digits."""
        for value, seconds in zip((b"1H", b"2M", b"3S", b"100m", b"5u", b"7n"), (3600.0, 120.0, 3.0, 0.1, 5e-6, 7e-9)):
            self.assertAlmostEqual(gw.parse_timeout(value), seconds, delta=seconds * 1e-9)
        for bad in (b"", b"S", b"1x", b"123456789S", b"-1S", b"1.5S"):
            self.assertIsNone(gw.parse_timeout(bad))
        for seconds in (0.0001, 0.1, 30, 86400 * 365):
            value = gw.format_timeout(seconds)
            self.assertLessEqual(len(value), 9)
            self.assertGreaterEqual(gw.parse_timeout(value), seconds * (1 - 1e-9))   # never shorter than asked

    def test_message_and_bin_round_trip(self) -> None:
        """grpc-message is percent-encoded UTF-8; -bin values are unpadded base64."""
        for text in ("plain", "100% sure", "héllo\n"):
            self.assertEqual(gw.decode_message(gw.encode_message(text)), text)
        self.assertEqual(gw.encode_bin(b"\x00\x01\xff"), b"AAH/")
        self.assertEqual(gw.decode_bin(b"AAH/"), b"\x00\x01\xff")
        self.assertEqual(gw.decode_bin(b"AAE"), b"\x00\x01")
        self.assertEqual(gw.decode_bin(b"not base64!"), b"not base64!")

    def test_reset_and_http_statuses(self) -> None:
        """RST_STREAM and HTTP statuses map to gRPC statuses as grpc's PROTOCOL-HTTP2.md says."""
        self.assertEqual([gw.status_name(gw.status_for_reset(c)) for c in (0x7, 0x8, 0x2, 0x1, 0xB)],
                         ["UNAVAILABLE", "CANCELLED", "INTERNAL", "INTERNAL", "RESOURCE_EXHAUSTED"])
        self.assertEqual([gw.status_name(gw.status_for_http(c)) for c in (401, 403, 404, 503, 418)],
                         ["UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED", "UNAVAILABLE", "UNKNOWN"])

    def test_scanner_reads_prefixes_across_chunks(self) -> None:
        """Message sizes and first bytes come from the prefixes, however the stream is cut."""
        stream = b"".join(b"\0" + len(m).to_bytes(4, "big") + m for m in (b"", b"abc", b"x" * 100))
        for cut in range(1, len(stream)):
            scanner = gw.MessageScanner(limit=1000, keep=4)
            sizes, kept = [], b""
            for piece in (stream[:cut], stream[cut:]):
                scanned = scanner.feed(piece)
                self.assertEqual(scanned.error, "")
                kept += scanned.more + b"".join(head for _, head in scanned.started)   # more continues the last
                sizes += [size for size, _ in scanned.started]
            self.assertEqual(sizes, [0, 3, 100], cut)
            self.assertEqual(kept, b"abcxxxx", cut)
            self.assertTrue(scanner.between_messages)

    def test_scanner_holds_the_limit(self) -> None:
        """A prefix announcing more than the limit is an error before its bytes arrive; bad flags too."""
        self.assertIn("larger than max (2000 vs. 1000)",
                      gw.MessageScanner(limit=1000).feed(b"\0" + (2000).to_bytes(4, "big")).error)
        self.assertIn("flags", gw.MessageScanner().feed(b"\x07\0\0\0\0").error)

    def test_metadata_between_fields_and_the_wire(self) -> None:
        """Pseudo-headers and transport keys never cross; -bin values are raw on the wire, base64 on HTTP/2."""
        fields = [(b":path", b"/a/b"), (b"te", b"trailers"), (b"x-a", b"1"), (b"x-b-bin", b"AAH/"),
                  (b"grpc-timeout", b"1S"), (b"x-a", b"2"), (b"authorization", b"Basic eA==")]
        wire = gw.metadata_from_h2(fields, frozenset({b"authorization"}))
        self.assertEqual([(h.name, h.value) for h in wire], [("x-a", b"1"), ("x-b-bin", b"\x00\x01\xff"), ("x-a", b"2")])
        self.assertEqual(gw.metadata_to_h2(wire), [(b"x-a", b"1"), (b"x-b-bin", b"AAH/"), (b"x-a", b"2")])
        self.assertEqual(gw.status_fields(5, "not found", wire[:1]),
                         [(b"grpc-status", b"5"), (b"grpc-message", b"not found"), (b"x-a", b"1")])
