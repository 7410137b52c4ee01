"""The HTTP entry (tunneld.protocols.http_entry) without sockets or real time.

An ``EntrySite`` channel on a ``StringTransport`` (built by ``buildProtocol``,
as the port does) dispatches to a real ``ServerHub``, whose stream is wired
to a ``ClientHub`` with fake backends (tests/test_hubs.py's ``Link``); time
is a ``task.Clock``.  These pin the entry's hot path: exact response bytes,
keep-alive and pipelining, forwarded headers, what the backend receives, and
every ending (timeout, client gone before or during the upload).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.session_pair import http_response_body, http_response_head
from tests.test_hubs import HOST, Backend, HubCase, Link
from tunneld import session as s
from tunneld.protocols.http_entry import EntrySite

PEER = IPv4Address("TCP", "192.0.2.7", 5555)
LOCAL = IPv4Address("TCP", "10.0.0.1", 8080)


class CountingTransport(StringTransport):
    """A StringTransport that counts address look-ups (getsockname is a system call on a real one)."""

    def __init__(self) -> None:
        super().__init__(hostAddress=LOCAL, peerAddress=PEER)
        self.lookups = 0

    def getHost(self) -> Any:
        self.lookups += 1
        return super().getHost()


class EntryCase(HubCase):
    """A server hub with one connected client whose backends answer only when told."""

    def setUp(self) -> None:
        super().setUp()
        self.records: list[dict[str, object]] = []
        finished = self.hub.finished

        def record(rec: dict[str, object]) -> None:
            self.records.append(rec)
            finished(rec)

        self.hub.finished = record   # type: ignore[method-assign]
        self.site = EntrySite(self.hub, self.clock)
        self.wire, _, self.backends = self.link(answer=False)

    def connect(self) -> tuple[Any, CountingTransport]:
        proto = self.site.buildProtocol(PEER)
        transport = CountingTransport()
        proto.makeConnection(transport)
        return proto, transport

    def send(self, proto: Any, data: bytes) -> None:
        proto.dataReceived(data)
        self.wire.flush()

    def answer(self, backend: Backend, body: bytes = b"ok\n", *headers: tuple[str, bytes], status: int = 200) -> None:
        backend.tunnel.send(backend.request_id, http_response_head(status, end=True, body=body, headers=headers))
        self.wire.flush()

    def request_head(self, backend: Backend) -> Any:
        return backend.event.message.http_request

    def tearDown(self) -> None:
        self.assert_quiet(self.wire)


class ResponseTests(EntryCase):
    def test_small_get_bytes_exact(self) -> None:
        """Status, headers in order and repeated, body: exactly what the backend sent, no Server/Date of ours."""
        proto, transport = self.connect()
        self.send(proto, b"GET /a?b=1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [backend] = self.backends.created
        self.answer(backend, b"ok\n", ("Content-Length", b"3"), ("X-Backend", b"a"), ("X-Backend", b"b"))
        self.assertEqual(transport.value(),
                         b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Backend: a\r\nX-Backend: b\r\n\r\nok\n")
        self.assertFalse(transport.disconnecting)
        [rec] = self.records
        self.assertEqual((rec["status"], rec["method"], rec["path"], rec["client"], rec["route"]),
                         (200, "GET", "/a", "192.0.2.7", "web"))

    def test_head_sent_to_the_backend(self) -> None:
        """Method, url, path, query, host, client address and X-Forwarded-* reach the backend; hop-by-hop do not."""
        proto, _ = self.connect()
        self.send(proto, b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: app.example.com\r\nConnection: keep-alive, X-Drop\r\n"
                         b"X-Drop: 1\r\nX-Forwarded-For: 203.0.113.9\r\nAccept: */*\r\n\r\n")
        [backend] = self.backends.created
        head = self.request_head(backend)
        self.assertEqual((head.method, head.url, head.path, head.query, head.host, head.remote_addr, head.scheme),
                         ("GET", "/a/b?x=1&y=2", "/a/b", "x=1&y=2", HOST, "192.0.2.7", "http"))
        self.assertTrue(head.is_last_chunk)
        headers = [(h.name, h.value) for h in head.headers]
        self.assertEqual(headers, [
            ("X-Forwarded-For", b"203.0.113.9, 192.0.2.7"),
            ("Accept", b"*/*"),
            ("X-Forwarded-Proto", b"http"),
            ("X-Forwarded-Host", HOST.encode()),
            ("Host", b"internal.example:8080"),   # the route's set_host replaces the caller's
        ])
        self.answer(backend)

    def test_pipelined_keep_alive_requests_in_order(self) -> None:
        """Three requests in one read are answered in order on the same connection; addresses looked up once."""
        proto, transport = self.connect()
        self.send(proto, b"".join(b"GET /%d HTTP/1.1\r\nHost: app.example.com\r\n\r\n" % i for i in range(3)))
        for i in range(3):
            backend = self.backends.created[i]
            self.assertEqual(self.request_head(backend).path, f"/{i}")
            self.answer(backend, b"%d" % i, ("Content-Length", b"1"))
        self.assertEqual(transport.value(), b"".join(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i for i in range(3)))
        self.assertEqual([r["path"] for r in self.records], ["/0", "/1", "/2"])
        self.assertEqual(transport.lookups, 1)

    def test_finished_request_freed_by_refcounting(self) -> None:
        """A finished request and its exchange are freed at once, not left as cycles for the garbage collector."""
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [request] = proto._channel.requests
        refs = [weakref.ref(request), weakref.ref(request.exchange), weakref.ref(request.exchange.gate)]
        del request
        self.answer(self.backends.created.pop(), b"ok", ("Content-Length", b"2"))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nok"))
        self.assertEqual([ref() for ref in refs], [None, None, None])

    def test_streamed_response_chunked(self) -> None:
        """A response without Content-Length streams chunked: the head at once, each body message as it comes."""
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [backend] = self.backends.created
        backend.tunnel.send(backend.request_id, http_response_head(200, end=False))
        self.wire.flush()
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        backend.tunnel.send(backend.request_id, http_response_body(b"abc", end=False))
        self.wire.flush()
        self.assertTrue(transport.value().endswith(b"3\r\nabc\r\n"))
        backend.tunnel.send(backend.request_id, http_response_body(b"", end=True))
        self.wire.flush()
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))

    def test_head_request_no_body(self) -> None:
        """HEAD: the backend's head comes back, no body bytes."""
        proto, transport = self.connect()
        self.send(proto, b"HEAD / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [backend] = self.backends.created
        self.answer(backend, b"", ("Content-Length", b"10"))
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")


class EndingTests(EntryCase):
    def test_no_response_head_in_time_504(self) -> None:
        """No head within the route's timeout: 504 to the caller, the backend request cancelled."""
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [backend] = self.backends.created
        self.clock.advance(11.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.wire.flush()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 Gateway Time-out\r\n"), transport.value())
        self.assertEqual(backend.names()[-1], "aborted")
        self.assertEqual(self.records[-1]["status"], 504)

    def test_answer_in_time_cancels_the_timeout(self) -> None:
        """A head that came in time: nothing happens at the deadline."""
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.answer(self.backends.created[0], b"ok", ("Content-Length", b"2"))
        before = transport.value()
        self.clock.advance(60)
        self.assertEqual(transport.value(), before)
        self.assertEqual([r["status"] for r in self.records], [200])

    def test_keep_alive_deadline_counts_from_each_request(self) -> None:
        """On a keep-alive connection the second request's deadline runs from its own start."""
        proto, transport = self.connect()
        self.send(proto, b"GET /1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.clock.advance(5)
        self.answer(self.backends.created[0], b"ok", ("Content-Length", b"2"))
        self.send(proto, b"GET /2 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.clock.advance(11.9)   # 16.9 s after the first request began: the first deadline is long past
        self.assertEqual([r["status"] for r in self.records], [200])
        self.clock.advance(0.1)
        self.wire.flush()
        self.assertEqual([r["status"] for r in self.records], [200, 504])
        self.assertIn(b"HTTP/1.1 504 ", transport.value())

    def test_shorter_deadline_after_a_longer_one(self) -> None:
        """A route with a shorter timeout (web, 12 s) after one with a longer (api, the default): the shorter holds."""
        proto, transport = self.connect()
        self.send(proto, b"GET /api/1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.assertGreater(self.hub.dispatch(HOST, "/api/1").timeout, 12)
        self.answer(self.backends.created[0], b"ok", ("Content-Length", b"2"))
        self.send(proto, b"GET /2 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.clock.advance(12)
        self.wire.flush()
        self.assertEqual([r["status"] for r in self.records], [200, 504])

    def test_closed_connection_leaves_no_timer(self) -> None:
        """A connection closed while its request waits leaves no DelayedCall behind (nothing keeps it alive)."""
        proto, _ = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.assertTrue(self.clock.getDelayedCalls())
        proto.connectionLost(Failure(ConnectionDone()))
        self.wire.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_between_requests_only(self) -> None:
        """twisted's idle timeout closes a quiet connection, never one whose request is being handled."""
        idle = self.site.timeOut
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.clock.advance(idle - 1)
        self.answer(self.backends.created[0], b"ok", ("Content-Length", b"2"))
        self.clock.advance(idle - 1)   # the old idle deadline has passed while the request was handled
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)          # idle for the whole period since the response
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(60)
        self.assertEqual(len(self.records), 1)

    def test_client_gone_while_waiting_cancels(self) -> None:
        """The caller disconnects before the head: the backend request is cancelled, logged as 499."""
        proto, _ = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [backend] = self.backends.created
        proto.connectionLost(Failure(ConnectionDone()))
        self.wire.flush()
        self.assertEqual(backend.names()[-1], "aborted")
        self.assertEqual(self.records[-1]["status"], 499)
        self.assertEqual(self.site.connections, 0)

    def test_client_gone_mid_upload_cancels_at_once(self) -> None:
        """The caller disconnects halfway through its upload: the cancel reaches the backend at once, not at the timeout."""
        proto, _ = self.connect()
        self.send(proto, b"PUT /upload HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        [backend] = self.backends.created
        self.assertEqual(self.request_head(backend).body, b"x" * 10)
        proto.connectionLost(Failure(ConnectionDone()))
        self.wire.flush()
        self.assertEqual(backend.names()[-1], "aborted")
        self.assertEqual(self.records[-1]["status"], 499)
        self.clock.advance(60)
        self.assertEqual(len(self.records), 1)

    def test_client_gone_before_first_body_byte(self) -> None:
        """Gone after the head, before any body: nothing reached the tunnel, one record, nothing left behind."""
        proto, _ = self.connect()
        self.send(proto, b"PUT /upload HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(self.backends.created, [])
        proto.connectionLost(Failure(ConnectionDone()))
        self.wire.flush()
        self.assertEqual([r["status"] for r in self.records], [499])
        self.assertEqual(self.backends.created, [])

    def test_body_over_route_limit_413(self) -> None:
        """A declared length over the route's max_body_size: 413 after the body, nothing sent through the tunnel."""
        proto, transport = self.connect()
        self.send(proto, b"POST /api/x HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 1001\r\n\r\n" + b"y" * 1001)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
        self.assertEqual(self.backends.created, [])

    def test_no_route_404_keeps_the_connection(self) -> None:
        """No route: a 404 naming host and path; the connection serves the next request."""
        proto, transport = self.connect()
        self.send(proto, b"GET /x HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
        self.assertIn(b"404", transport.value().split(b"\r\n")[0])
        self.assertIn(b"nowhere.example", transport.value())
        transport.clear()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.answer(self.backends.created[0], b"ok", ("Content-Length", b"2"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_stream_lost_502(self) -> None:
        """The client's stream dies while a request waits: 502 at once."""
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        self.wire.server_handle.on_lost("gone")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 502 "), transport.value())
        self.assertEqual(self.records[-1]["status"], 502)
        self.wire.client_hub.lost(self.wire.client_handle, "gone")

    def test_session_cancel_code_timeout(self) -> None:
        """The backend's cancel with the 504 code is passed on as 504."""
        proto, transport = self.connect()
        self.send(proto, b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        [backend] = self.backends.created
        backend.tunnel.cancel(backend.request_id, s.TIMEOUT, "backend too slow")
        self.wire.flush()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "), transport.value())


class AnswerReasonTests(SynchronousTestCase):
    """Why tunneld answered itself, in the words the dashboard shows."""

    def test_reasons(self) -> None:
        """Each kind of local answer gets its reason."""
        from tunneld.protocols.http_entry import answer_reason

        cases = [
            ((404, "no route for host a path /"), "no route"),
            ((502, "no client connected for group 'g' (route r)"), "no client connected"),
            ((502, "not connected to the server 127.0.0.1:7000"), "no client connected"),
            ((502, "backend http://127.0.0.1:1 unreachable: Connection refused"), "backend refused"),
            ((504, "no response from the backend within 30 s"), "backend timeout"),
            ((502, "backend response broke off"), "backend broke off"),
            ((503, "server is shutting down"), "shutting down"),
            ((413, "request body exceeds 10 bytes"), "body too large"),
            ((502, "tunnel stream lost: no heartbeat within 60 s"), "tunnel lost"),
            ((502, "tunnel not available: session closed"), "tunnel lost"),
        ]
        for (status, message), reason in cases:
            self.assertEqual(answer_reason(status, message), reason, message)
        self.assertEqual(answer_reason(403, "forbidden", "ip_denied"), "access refused (ip_denied)")


class RouteNormalisedTests(SynchronousTestCase):
    """The one place every entry turns a raw path into a routing decision and the backend's URL."""

    def test_dispatch_sees_the_normalised_path_and_escapes_are_400(self) -> None:
        """The dispatcher is asked with the normalised path; a root escape never reaches it."""
        from tunneld.protocols.http_entry import Refusal, route_normalised

        asked: list[str] = []

        class Dispatcher:
            def dispatch(self, host: str, path: str, address: str = "", headers: Any = None) -> Refusal:
                asked.append(path)
                return Refusal(404, "none")

        path, decision = route_normalised(Dispatcher(), "h", "/x/../%63hat//a", "127.0.0.1", [])  # type: ignore[arg-type]
        self.assertEqual((path, asked), ("/chat/a", ["/chat/a"]))
        path, decision = route_normalised(Dispatcher(), "h", "/../etc", "127.0.0.1", [])  # type: ignore[arg-type]
        self.assertEqual((path, getattr(decision, "status", None), len(asked)), ("/../etc", 400, 1))

    def test_backend_url_follows_preserve_path(self) -> None:
        """The backend gets the normalised path with the query as sent, or the raw URI with preserve_path."""
        from types import SimpleNamespace

        from tunneld.protocols.http_entry import backend_url

        plain, keep = SimpleNamespace(preserve_path=False), SimpleNamespace(preserve_path=True)
        self.assertEqual(backend_url(plain, "/a//b?q=1", "/a//b", "/a/b", "q=1"), "/a/b?q=1")  # type: ignore[arg-type]
        self.assertEqual(backend_url(keep, "/a//b?q=1", "/a//b", "/a/b", "q=1"), "/a//b?q=1")  # type: ignore[arg-type]
        self.assertEqual(backend_url(plain, "/a/b", "/a/b", "/a/b", ""), "/a/b")  # type: ignore[arg-type]
