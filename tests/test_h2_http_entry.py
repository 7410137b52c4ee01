"""The HTTP/2 entry's pure parts: the preface/ALPN switch and one stream against fakes (no sockets, Clock time)."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.registry.per_address import PerAddressLimit
from tunneld.protocols.h2.connection import CANCEL, Incoming
from tunneld.protocols.h2.http_entry import H2EntryStream, error_body, request_fields, response_head
from tunneld.protocols.h2.switch import PREFACE, EntrySwitchFactory, sniff
from tunneld.protocols.http_entry import Refusal, Target


class Recording(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class FakeChannel:
    def __init__(self, site: FakeSite, counted: bool = True) -> None:
        self.site = site
        self.counted = counted
        self.head_since: float | None = None
        self.ip_slot = ""

    def release(self) -> None:
        if self.counted:
            self.counted = False
            self.site.count -= 1
        if self.ip_slot:
            ip, self.ip_slot = self.ip_slot, ""
            self.site.per_ip.release(ip)


class FakeHttp1(Recording):
    def __init__(self, channel: FakeChannel) -> None:
        super().__init__()
        self._channel = channel

    def connectionMade(self) -> None:
        super().connectionMade()
        self._channel.head_since = self._channel.site.clock.seconds()


class FakeSite:
    """The EntrySite surface the switch uses."""

    def __init__(self, clock: Clock, refuse: bool = False) -> None:
        self.clock = clock
        self.header_timeout = 5.0
        self.count = 0
        self.refuse = refuse
        self.header_timeouts = 0
        self.proxy_protocol = False
        self.per_ip = PerAddressLimit(0)

    def buildProtocol(self, addr: Any) -> FakeHttp1:
        if self.refuse:
            return FakeHttp1(FakeChannel(self, counted=False))
        self.count += 1
        return FakeHttp1(FakeChannel(self))

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class FakeH2:
    def __init__(self) -> None:
        self.built: list[tuple[Recording, Any]] = []

    def build(self, addr: Any, place: Any, since: float) -> Recording:
        protocol = Recording()
        self.built.append((protocol, place))
        self.since = since
        return protocol

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class SniffTests(TestCase):
    def test_whole_preface_only(self) -> None:
        self.assertTrue(sniff(PREFACE))
        self.assertTrue(sniff(PREFACE + b"\x00\x00"))
        self.assertIsNone(sniff(b""))
        self.assertIsNone(sniff(PREFACE[:23]))
        self.assertFalse(sniff(b"GET / HTTP/1.1\r\n"))
        self.assertFalse(sniff(b"PRI * HTTP/1.1\r\n"))       # differs at byte 9: decided at once
        self.assertFalse(sniff(PREFACE[:23] + b"X"))


class SwitchTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.site = FakeSite(self.clock)
        self.h2 = FakeH2()
        self.factory = EntrySwitchFactory(self.site, self.h2)

    def connect(self, negotiated: bytes | None = None) -> tuple[Any, StringTransport]:
        switch = self.factory.buildProtocol(None)
        transport = StringTransport()
        transport.protocol = switch   # as a TCP transport has it
        if negotiated is not None:
            transport.negotiatedProtocol = negotiated
        switch.makeConnection(transport)
        return switch, transport

    def test_preface_in_pieces_waits_then_is_http2(self) -> None:
        """A prefix of the preface waits; the whole preface picks HTTP/2, which gets every byte read."""
        switch, transport = self.connect()
        switch.dataReceived(PREFACE[:3])
        switch.dataReceived(PREFACE[3:20])
        self.assertEqual(self.h2.built, [])
        self.clock.advance(3)
        switch.dataReceived(PREFACE[20:] + b"SETTINGS")
        [(protocol, place)] = self.h2.built
        self.assertIs(transport.protocol, protocol)   # the switch stepped out of the way
        self.assertEqual(protocol.data, PREFACE + b"SETTINGS")
        self.assertTrue(protocol.made)
        self.assertEqual((self.site.count, place.counted), (1, True))   # the unused channel holds the place
        self.assertEqual(self.h2.since, 100)   # its header_timeout counts from the connect
        self.clock.advance(10)
        self.assertFalse(transport.disconnecting)   # the undecided timer is gone

    def test_anything_else_is_http11_with_its_header_clock_from_the_connect(self) -> None:
        switch, transport = self.connect()
        self.clock.advance(2)
        switch.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.h2.built, [])
        protocol = transport.protocol
        self.assertIsInstance(protocol, FakeHttp1)
        self.assertEqual(protocol.data, b"GET / HTTP/1.1\r\n")
        self.assertEqual(protocol._channel.head_since, 100)

    def test_alpn_decides_on_tls(self) -> None:
        switch, transport = self.connect(b"h2")
        switch.dataReceived(b"P")   # no need to wait for the preface
        self.assertEqual(len(self.h2.built), 1)
        switch, transport = self.connect(b"http/1.1")
        switch.dataReceived(PREFACE)
        self.assertIsInstance(transport.protocol, FakeHttp1)
        self.assertEqual(len(self.h2.built), 1)

    def test_undecided_connection_is_closed_after_header_timeout_and_released(self) -> None:
        switch, transport = self.connect()
        switch.dataReceived(b"PRI * HTTP/2")
        self.assertEqual(self.site.count, 1)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.header_timeouts, 1)
        switch.connectionLost(None)
        self.assertEqual(self.site.count, 0)

    def test_refused_by_the_site_gets_its_answer_at_once(self) -> None:
        self.site.refuse = True
        switch, transport = self.connect()
        self.assertIsInstance(transport.protocol, FakeHttp1)
        self.assertTrue(transport.protocol.made)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeaderTests(TestCase):
    def test_request_fields(self) -> None:
        """Host from :authority first; cookie fields joined at the first one's place; pseudo-headers apart."""
        pseudo, flat = request_fields([(b":method", b"GET"), (b":authority", b"a.test"), (b":path", b"/x"),
                                       (b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")])
        self.assertEqual(pseudo[b":path"], b"/x")
        self.assertEqual(flat, [(b"host", b"a.test"), (b"cookie", b"a=1; b=2"), (b"accept", b"*/*")])
        _, flat = request_fields([(b":path", b"/"), (b"host", b"h.test")])
        self.assertEqual(flat, [(b"host", b"h.test")])

    def test_response_head_drops_hop_by_hop_and_lowercases(self) -> None:
        head = response_head(200, [(b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive, X-Drop"),
                                   (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"),
                                   (b"Upgrade", b"h2c"), (b"X-Drop", b"1"), (b"Set-Cookie", b"a=1"),
                                   (b"Set-Cookie", b"b=2")])
        self.assertEqual(head, [(b":status", b"200"), (b"content-type", b"text/plain"), (b"set-cookie", b"a=1"),
                                (b"set-cookie", b"b=2")])


class FakeTunnel:
    def __init__(self) -> None:
        self.started: list[pb.TunnelMessage] = []
        self.bodies: list[tuple[bytes, bool]] = []
        self.consumed_bytes = 0
        self.cancelled: list[tuple[int, str]] = []
        self.take = True
        self.handler: Any = None

    def start(self, msg: pb.TunnelMessage, handler: Any) -> str:
        self.started.append(msg)
        self.handler = handler
        return "r1"

    def send_body(self, request_id: str, data: bytes, end: bool = False) -> bool:
        self.bodies.append((data, end))
        return self.take

    def consumed(self, request_id: str, n: int) -> None:
        self.consumed_bytes += n

    def cancel(self, request_id: str, code: int = 0, message: str = "") -> None:
        self.cancelled.append((code, message))


class FakeDispatcher:
    def __init__(self, decision: Any) -> None:
        self.decision = decision
        self.records: list[dict[str, object]] = []
        self.asked: list[tuple[Any, ...]] = []

    def dispatch(self, host: str, path: str, address: str = "", headers: Any = None) -> Any:
        self.asked.append((host, path, address, headers))
        return self.decision

    def finished(self, record: dict[str, object]) -> None:
        self.records.append(record)


class FakeSiteForStreams:
    def __init__(self, dispatcher: FakeDispatcher, clock: Clock) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.inspector = None
        self.scheme = "https"
        self.per_ip = PerAddressLimit(0)   # no cap: counted only

    def log_per_ip_refusal(self, ip: str) -> None:
        raise AssertionError(f"{ip} refused without a cap")


class FakeConn:
    def __init__(self, site: FakeSiteForStreams) -> None:
        self.site = site
        self.address = "10.1.2.3"
        self.acked = 0
        self.heads: list[tuple[list[tuple[bytes, bytes]], bool]] = []
        self.data: list[tuple[bytes, bool]] = []
        self.resets: list[int] = []

    def ack(self, stream_id: int, n: int) -> None:
        self.acked += n

    def send_headers(self, stream_id: int, headers: Any, end: bool = False) -> None:
        self.heads.append((headers, end))

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.data.append((data, end))

    def end_stream(self, stream_id: int) -> None:
        self.data.append((b"", True))

    def reset(self, stream_id: int, code: int) -> None:
        self.resets.append(code)


HEAD = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"app.test"), (b":path", b"/up?q=1"),
        (b"content-length", b"10"), (b"authorization", b"Basic x"), (b"te", b"trailers")]


class StreamTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.tunnel = FakeTunnel()
        self.target = Target(self.tunnel, "web", 30.0, strip_authorization=True)   # type: ignore[arg-type]
        self.dispatcher = FakeDispatcher(self.target)
        self.conn = FakeConn(FakeSiteForStreams(self.dispatcher, self.clock))
        self.stream = H2EntryStream(self.conn, 1)   # type: ignore[arg-type]

    def test_head_becomes_the_http11_request_message(self) -> None:
        self.stream.incoming(Incoming(headers=HEAD, body=b"abc"))
        self.assertEqual(self.dispatcher.asked[0][:3], ("app.test", "/up", "10.1.2.3"))
        [msg] = self.tunnel.started
        req = msg.http_request
        self.assertEqual((req.method, req.url, req.path, req.query, req.host, req.scheme, req.body),
                         ("POST", "/up?q=1", "/up", "q=1", "app.test", "https", b"abc"))
        self.assertEqual((req.content_length, req.is_last_chunk), (10, False))
        names = [(h.name.lower(), h.value) for h in req.headers]
        self.assertIn(("host", b"app.test"), names)
        self.assertIn(("x-forwarded-for", b"10.1.2.3"), names)
        self.assertIn(("x-forwarded-proto", b"https"), names)
        self.assertNotIn("authorization", [n for n, _ in names])   # basic auth checked here
        self.assertNotIn("te", [n for n, _ in names])
        self.assertEqual(self.conn.acked, 3)

    def test_request_body_is_acknowledged_only_when_the_tunnel_took_it(self) -> None:
        self.stream.incoming(Incoming(headers=HEAD))
        self.tunnel.take = False
        self.stream.incoming(Incoming(body=b"12345"))
        self.assertEqual(self.conn.acked, 0)
        self.stream.incoming(Incoming(body=b"67890", end=True))
        self.assertEqual(self.conn.acked, 0)
        self.assertEqual(self.tunnel.bodies[-1], (b"67890", True))
        self.tunnel.handler.writable()
        self.assertEqual(self.conn.acked, 10)

    def test_response_credit_returns_as_bytes_are_framed(self) -> None:
        self.stream.incoming(Incoming(headers=HEAD, end=True))
        resp = pb.TunnelMessage()
        resp.http_response.status_code = 200
        resp.http_response.is_first_chunk = True
        resp.http_response.body = b"x" * 100
        resp.http_response.headers.add(name="Connection", value=b"close")
        self.tunnel.handler.message_received(resp, False)
        self.assertEqual(self.conn.heads, [([(b":status", b"200")], False)])
        self.stream.sent(60)
        self.assertEqual(self.tunnel.consumed_bytes, 60)
        last = pb.TunnelMessage()
        last.http_response.body = b"y" * 10
        last.http_response.is_last_chunk = True
        self.tunnel.handler.message_received(last, True)
        self.assertEqual(self.conn.data[-1], (b"y" * 10, True))
        self.stream.sent(50)
        self.assertEqual(self.tunnel.consumed_bytes, 60)   # the peer has ended: credit would go nowhere
        [record] = self.dispatcher.records
        self.assertEqual((record["status"], record["bytes_out"], record["route"]), (200, 110, "web"))

    def test_client_reset_cancels_the_tunnel_request(self) -> None:
        self.stream.incoming(Incoming(headers=HEAD))
        self.stream.closed(CANCEL)
        self.assertEqual(self.tunnel.cancelled, [(s.CANCELLED, "external client went away")])
        self.assertEqual(self.dispatcher.records[0]["status"], 499)

    def test_no_response_head_in_time_is_504(self) -> None:
        self.stream.incoming(Incoming(headers=HEAD, end=True))
        self.clock.advance(30)
        message = "no response from the backend within 30 s"
        self.assertEqual(self.tunnel.cancelled, [(s.TIMEOUT, message)])
        self.assertEqual(self.conn.heads[0][0][0], (b":status", b"504"))
        self.assertEqual(self.conn.data, [(error_body(504, message), True)])

    def test_refusal_answers_with_the_http11_body_and_headers(self) -> None:
        self.dispatcher.decision = Refusal(401, "credentials required", "web", "no_credentials",
                                           ((b"WWW-Authenticate", b'Basic realm="web"'),))
        self.stream.incoming(Incoming(headers=HEAD, body=b"abc"))
        head, end = self.conn.heads[0]
        self.assertEqual(head[0], (b":status", b"401"))
        self.assertIn((b"www-authenticate", b'Basic realm="web"'), head)
        self.assertEqual(self.conn.data, [(error_body(401, "credentials required"), True)])
        self.assertEqual(self.tunnel.started, [])
        self.stream.incoming(Incoming(body=b"more", end=True))   # the rest of the body is drained
        self.assertEqual(self.conn.acked, 7)
        self.assertEqual(self.dispatcher.records[0]["refusal"], "no_credentials")

    def test_declared_body_over_max_body_size_is_413(self) -> None:
        self.dispatcher.decision = Target(self.tunnel, "web", 30.0, max_body_size=5)   # type: ignore[arg-type]
        self.stream.incoming(Incoming(headers=HEAD))
        self.assertEqual(self.conn.heads[0][0][0], (b":status", b"413"))
        self.assertEqual(self.tunnel.started, [])

    def test_streamed_body_over_max_body_size_is_413_and_cancelled(self) -> None:
        self.dispatcher.decision = Target(self.tunnel, "web", 30.0, max_body_size=5)   # type: ignore[arg-type]
        self.stream.incoming(Incoming(headers=[h for h in HEAD if h[0] != b"content-length"], body=b"123"))
        self.stream.incoming(Incoming(body=b"456"))
        self.assertEqual(self.conn.heads[0][0][0], (b":status", b"413"))
        self.assertEqual(self.tunnel.cancelled[0][0], s.CANCELLED)

    def test_a_response_http2_refuses_resets_the_stream_and_cancels(self) -> None:
        self.stream.incoming(Incoming(headers=HEAD, end=True))

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a response is already pending")

        self.conn.send_headers = refuse   # type: ignore[method-assign]
        resp = pb.TunnelMessage()
        resp.http_response.status_code = 200
        resp.http_response.is_first_chunk = True
        self.tunnel.handler.message_received(resp, False)
        self.assertEqual(self.conn.resets, [0x2])   # INTERNAL_ERROR
        self.assertEqual(self.tunnel.cancelled[0][0], s.CANCELLED)
        self.assertEqual(self.dispatcher.records[0]["status"], 502)   # the head never went out
        self.flushLoggedErrors(RuntimeError)

    def test_the_inspector_records_an_http2_exchange_like_an_http11_one(self) -> None:
        from tunneld.inspector import make

        inspector = make(10, 1024)
        self.conn.site.inspector = inspector   # type: ignore[assignment]
        self.stream.incoming(Incoming(headers=HEAD, body=b"0123456789", end=True))
        resp = pb.TunnelMessage()
        resp.http_response.status_code = 201
        resp.http_response.is_first_chunk = True
        resp.http_response.is_last_chunk = True
        resp.http_response.body = b"done"
        self.tunnel.handler.message_received(resp, True)
        assert inspector is not None
        [rec] = list(inspector)
        self.assertEqual((rec.protocol, rec.method, rec.path, rec.host, rec.scheme, rec.remote, rec.route),
                         ("http", "POST", "/up?q=1", "app.test", "https", "10.1.2.3", "web"))
        self.assertEqual((rec.request_id, rec.response_status, rec.done), ("r1", 201, True))
        self.assertEqual((bytes(rec.request_body), bytes(rec.response_body)), (b"0123456789", b"done"))


class ConnectionTests(TestCase):
    def test_header_timeout_counts_from_the_connect_not_the_preface(self) -> None:
        """The switch waited 0.8 s for the preface: the HTTP/2 connection has 0.2 s left for its first request."""
        from tunneld.protocols.h2.http_entry import H2Entry

        clock = Clock()
        clock.advance(50)
        site = FakeSiteForStreams(FakeDispatcher(None), clock)
        site.max_header_size = 16384   # type: ignore[attr-defined]
        site.header_timeout = 1.0      # type: ignore[attr-defined]
        entry = H2Entry(site)
        place = FakeChannel(FakeSite(clock))
        place.site.count = 1
        conn = entry.build(None, place, since=49.2)
        transport = StringTransport()
        conn.makeConnection(transport)
        self.assertIn(conn, entry.connections)
        clock.advance(0.15)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        conn.connectionLost(None)
        self.assertEqual((place.counted, place.site.count, entry.connections), (False, 0, set()))


class SwitchPerAddressTests(SynchronousTestCase):
    def test_undecided_connections_count_against_their_address(self) -> None:
        """Connections that never send a byte still hold their address's max_connections_per_ip slots."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        site = FakeSite(Clock())
        site.per_ip = PerAddressLimit(2)
        factory = EntrySwitchFactory(site, None)  # type: ignore[arg-type]
        switches = []
        for _ in range(3):
            switch = factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1234))
            switch.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.2", 1234)))
            switches.append(switch)
        self.assertEqual(site.per_ip.held("127.0.0.2"), 2)
        self.assertIsNotNone(switches[2].chosen)   # the third went to the HTTP/1.1 side at once (its 503)
        switches[0].connectionLost(None)
        self.assertEqual(site.per_ip.held("127.0.0.2"), 1)
