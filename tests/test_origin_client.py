"""The lean origin client: head parsing, request framing and the connection state machine, without sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tunneld.protocols.origin_client import (CHUNKED, BadResponse, OriginConnection, OriginError,
                                             OriginPool, OriginRequest, ResponseHead, parse_head, request_head)

URL = "http://origin.test:8080"
OTHER = "http://other.test"


class FakeEndpoint:
    """Records dials; the test decides when and how each one ends."""

    def __init__(self) -> None:
        self.dials: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.dials.append((factory, d))
        return d

    def accept(self, index: int = -1) -> tuple[OriginConnection, StringTransport]:
        factory, d = self.dials[index]
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        d.callback(conn)
        return conn, transport


class Recorder:
    """A Responder that writes down what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.head: ResponseHead | None = None
        self.on_failed: Any = None

    def origin_response(self, head: ResponseHead, body: bytes, complete: bool) -> None:
        self.head = head
        self.events.append(("response", head.code, body, complete))

    def origin_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def origin_done(self) -> None:
        self.events.append(("done",))

    def origin_failed(self, error: OriginError) -> None:
        self.events.append(("failed", error.kind, error.message))
        if self.on_failed is not None:
            self.on_failed(error)


def lost(conn: OriginConnection, transport: StringTransport, reason: Exception = ConnectionDone()) -> None:
    transport.disconnected = True
    conn.connectionLost(Failure(reason))


class ParseHeadTests(SynchronousTestCase):
    def test_status_headers_and_length(self) -> None:
        """Status, reason and headers in order (repeats kept); Content-Length becomes ``length``."""
        head = parse_head(b"HTTP/1.1 200 OK fine\r\nSet-Cookie: a=1\r\nContent-Length: 12\r\nset-cookie:  b=2 \r\n"
                          b"X-Empty:")
        self.assertEqual((head.code, head.reason, head.length, head.chunked, head.keep_alive),
                         (200, b"OK fine", 12, False, True))
        self.assertEqual(head.headers, [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"X-Empty", b"")])

    def test_status_line_without_reason(self) -> None:
        """A status line with no reason phrase is accepted (some servers omit it)."""
        head = parse_head(b"HTTP/1.1 204")
        self.assertEqual((head.code, head.reason, head.length), (204, b"", None))

    def test_keep_alive_rules(self) -> None:
        """Only HTTP/1.1 without a ``close`` token in Connection keeps the connection."""
        self.assertFalse(parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0").keep_alive)
        self.assertFalse(parse_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close").keep_alive)
        self.assertTrue(parse_head(b"HTTP/1.1 200 OK\r\nConnection: closed-caption").keep_alive)

    def test_chunked_wins_over_content_length(self) -> None:
        """Transfer-Encoding: chunked frames the body; a Content-Length beside it is dropped."""
        head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: Chunked\r\nA: b")
        self.assertEqual((head.chunked, head.length, head.headers), (True, None, [(b"A", b"b")]))

    def test_repeated_equal_lengths_are_one(self) -> None:
        """``42, 42`` and two equal headers are one length (RFC 9110 §8.6)."""
        self.assertEqual(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 42, 42").length, 42)
        self.assertEqual(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\nContent-Length: 42").length, 42)

    def test_bad_heads_name_what_is_wrong(self) -> None:
        """Malformed status lines, header lines, lengths and codings raise BadResponse saying which."""
        cases = [
            (b"HTTP/1.1 2000 OK", "malformed status line"),
            (b"HTTX/1.1 200 OK", "malformed status line"),
            (b"<html>", "malformed status line"),
            (b"HTTP/1.1 200 OK\r\nno colon here", "malformed header line"),
            (b"HTTP/1.1 200 OK\r\nBad Name: x", "malformed header line"),
            (b"HTTP/1.1 200 OK\r\nContent-Length : 1", "malformed header line"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2", "invalid Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1", "invalid Content-Length"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", "unsupported Transfer-Encoding"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n 2", "folded header line"),
            (b"HTTP/1.1 200 OK\r\n folded: first", "folded header line"),
        ]
        for block, words in cases:
            with self.assertRaises(BadResponse, msg=block) as caught:
                parse_head(block)
            self.assertIn(words, str(caught.exception), block)

    def test_obsolete_folding_becomes_a_space(self) -> None:
        """A folded header line joins the previous value with one space (RFC 9112 §5.2)."""
        head = parse_head(b"HTTP/1.1 200 OK\r\nX-Long: one\r\n\t two\r\nY: z")
        self.assertEqual(head.headers, [(b"X-Long", b"one two"), (b"Y", b"z")])


class RequestHeadTests(SynchronousTestCase):
    def test_framing_dropped_hosts_counted(self) -> None:
        """Content-Length and Transfer-Encoding never pass (framing is ours); Host headers are counted."""
        block, hosts = request_head(b"GET", b"/a?b", [(b"Host", b"h"), (b"Content-Length", b"3"),
                                                      (b"transfer-encoding", b"chunked"), (b"X", b"1")])
        self.assertEqual((block, hosts), (b"Host: h\r\nX: 1\r\n", 1))

    def test_line_breaks_in_values_become_spaces(self) -> None:
        """CR, LF and NUL in a value cannot start a new header line."""
        block, _ = request_head(b"GET", b"/", [(b"X", b"a\r\nInjected: 1"), (b"Y", b"b\nc\0d")])
        self.assertEqual(block, b"X: a Injected: 1\r\nY: b c d\r\n")

    def test_invalid_method_target_or_name_is_refused(self) -> None:
        """A method or name that is not a token, or a target with spaces or controls, raises ValueError."""
        for method, target, pairs in [(b"G ET", b"/", []), (b"GET", b"/a b", []), (b"GET", b"", []),
                                      (b"GET", b"/", [(b"Bad:Name", b"x")]), (b"GET", b"/", [(b"", b"x")])]:
            with self.assertRaises(ValueError):
                request_head(method, target, pairs)


class PoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = OriginPool(self.reactor, pool_size=2)
        self.endpoint = FakeEndpoint()
        self.pool.origin(URL).endpoint = self.endpoint
        self.credit: list[int] = []

    def tearDown(self) -> None:
        self.pool.check()

    def start(self, method: bytes = b"GET", target: bytes = b"/x", headers: Any = None, **kwargs: Any
              ) -> tuple[OriginRequest, Recorder]:
        recorder = Recorder()
        request = self.pool.request(URL, method, target, headers if headers is not None else [(b"Host", b"h")],
                                    recorder, self.credit.append, **kwargs)
        request.start()
        return request, recorder

    def idle(self, url: str = URL) -> list[OriginConnection]:
        return self.pool.origin(url).idle


class KeepAliveTests(PoolTestCase):
    def test_content_length_response_then_reuse(self) -> None:
        """A GET goes out in one write; a Content-Length response in one read completes it; the next request reuses the connection."""
        request, recorder = self.start(headers=[(b"Accept", b"*/*")])
        conn, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), b"GET /x HTTP/1.1\r\nHost: origin.test:8080\r\nAccept: */*\r\n\r\n")
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello")
        self.assertEqual(recorder.events, [("response", 200, b"hello", True)])
        self.assertEqual(self.idle(), [conn])
        transport.clear()
        second, recorder2 = self.start(target=b"/y")
        self.assertEqual(len(self.endpoint.dials), 1)
        self.assertEqual(transport.value(), b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n")
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        conn.dataReceived(b"o")
        conn.dataReceived(b"k")
        self.assertEqual(recorder2.events, [("response", 200, b"", False), ("data", b"o"), ("data", b"k"), ("done",)])
        self.assertEqual(self.idle(), [conn])

    def test_head_split_across_reads(self) -> None:
        """A response head arriving byte by byte is parsed once complete."""
        request, recorder = self.start()
        conn, _ = self.endpoint.accept()
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz":
            conn.dataReceived(bytes([byte]))
        self.assertEqual(recorder.events, [("response", 200, b"", False), ("data", b"z"), ("done",)])
        self.assertEqual(self.idle(), [conn])

    def test_chunked_response(self) -> None:
        """A chunked body is decoded across reads; the connection is reused after the last chunk."""
        request, recorder = self.start()
        conn, _ = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde")
        conn.dataReceived(b"\r\n1;ext=1\r\nf\r\n0\r\n")
        self.assertEqual(self.idle(), [])
        conn.dataReceived(b"\r\n")
        self.assertEqual(recorder.events, [("response", 200, b"abcde", False), ("data", b"f"), ("done",)])
        self.assertIsNone(recorder.head.length)   # type: ignore[union-attr]
        self.assertEqual(self.idle(), [conn])

    def test_whole_chunked_response_in_one_read(self) -> None:
        """Head and every chunk in one read make one complete callback."""
        request, recorder = self.start()
        conn, _ = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
        self.assertEqual(recorder.events, [("response", 200, b"abc", True)])
        self.assertEqual(self.idle(), [conn])

    def test_close_delimited_response(self) -> None:
        """Without length or chunking the body runs until the origin closes; that connection is never pooled."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart")
        conn.dataReceived(b"more")
        lost(conn, transport)
        self.assertEqual(recorder.events, [("response", 200, b"part", False), ("data", b"more"), ("done",)])
        self.assertEqual(self.idle(), [])

    def test_connection_close_is_not_pooled(self) -> None:
        """``Connection: close`` and HTTP/1.0 responses end with the connection closed."""
        for status in (b"HTTP/1.1 200 OK\r\nConnection: close", b"HTTP/1.0 200 OK"):
            request, recorder = self.start()
            conn, transport = self.endpoint.accept()
            conn.dataReceived(status + b"\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(recorder.events, [("response", 200, b"", True)])
            self.assertTrue(transport.disconnecting)
            self.assertEqual(self.idle(), [])
            lost(conn, transport)

    def test_extra_bytes_after_the_body_close_the_connection(self) -> None:
        """Bytes beyond Content-Length are dropped and the connection is not reused."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
        self.assertEqual(recorder.events, [("response", 200, b"ok", True)])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.idle(), [])

    def test_pool_keeps_at_most_pool_size_idle(self) -> None:
        """Connections coming back to a full pool are closed (pool_size = 2 here)."""
        started = [self.start() for _ in range(3)]
        accepted = [self.endpoint.accept(i) for i in range(3)]
        for conn, _ in accepted:
            conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.idle(), [accepted[0][0], accepted[1][0]])
        self.assertTrue(accepted[2][1].disconnecting)
        self.assertEqual([r.events for _, r in started], [[("response", 204, b"", True)]] * 3)

    def test_idle_close_by_origin_leaves_the_pool(self) -> None:
        """An idle connection the origin closes is forgotten; the next request dials (nothing is replayed)."""
        self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        lost(conn, transport)
        self.assertEqual(self.idle(), [])
        self.start()
        self.assertEqual(len(self.endpoint.dials), 2)

    def test_unsolicited_bytes_on_an_idle_connection_close_it(self) -> None:
        """An origin talking while nothing was asked is out of step: the connection is dropped."""
        self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.idle(), [])

    def test_idle_connections_time_out(self) -> None:
        """An idle connection is closed after idle_timeout; one timer serves the pool."""
        self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(self.pool.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual((self.idle(), self.reactor.getDelayedCalls()), ([], []))

    def test_close_idle_fires_when_closed(self) -> None:
        """close_idle() closes idle connections and fires once they are gone."""
        self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        closed = self.pool.close_idle()
        self.assertNoResult(closed)
        self.assertTrue(transport.disconnecting)
        lost(conn, transport)
        self.successResultOf(closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class NoBodyTests(PoolTestCase):
    def test_head_ignores_content_length(self) -> None:
        """A HEAD response has no body whatever Content-Length says, and the length is reported."""
        request, recorder = self.start(method=b"HEAD")
        conn, _ = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(recorder.events, [("response", 200, b"", True)])
        self.assertEqual(recorder.head.length, 100)   # type: ignore[union-attr]
        self.assertEqual(self.idle(), [conn])

    def test_204_and_304_have_no_body(self) -> None:
        """204 and 304 end at the head."""
        conn = None
        for status in (b"204 No Content", b"304 Not Modified"):
            request, recorder = self.start()
            if conn is None:
                conn, _ = self.endpoint.accept()
            conn.dataReceived(b"HTTP/1.1 " + status + b"\r\nContent-Length: 7\r\n\r\n")
            self.assertEqual(recorder.events, [("response", int(status[:3]), b"", True)])
            self.assertEqual(self.idle(), [conn])
        self.assertEqual(len(self.endpoint.dials), 1)

    def test_interim_responses_are_skipped(self) -> None:
        """100 Continue and 103 Early Hints are skipped; the final response follows."""
        request, recorder = self.start()
        conn, _ = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        self.assertEqual(recorder.events, [])
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(recorder.events, [("response", 200, b"x", True)])

    def test_unasked_101_ends_the_connection(self) -> None:
        """A 101 nobody asked for is passed on without a body; the connection is not reused."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.assertEqual(recorder.events, [("response", 101, b"", True)])
        self.assertTrue(transport.disconnecting)


class FailureTests(PoolTestCase):
    def test_malformed_status_line_is_a_clear_failure(self) -> None:
        """A bad status line fails the request naming it; the connection is aborted, not pooled."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 OK 200\r\n\r\n")
        self.assertEqual(recorder.events, [("failed", "failed", "bad response: malformed status line b'HTTP/1.1 OK 200'")])
        self.assertTrue(transport.disconnected)
        lost(conn, transport, ConnectionLost())
        self.assertEqual((len(recorder.events), self.idle()), (1, []))

    def test_malformed_header_and_oversized_head(self) -> None:
        """A bad header line, or a head past MAX_HEAD bytes, fails the request."""
        request, recorder = self.start()
        conn, _ = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n")
        self.assertEqual(recorder.events[0][:2], ("failed", "failed"))
        self.assertIn("malformed header line b'broken'", recorder.events[0][2])
        request, recorder = self.start()
        conn, _ = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
        self.assertIn("response head larger than", recorder.events[0][2])

    def test_malformed_chunked_body_after_the_head_breaks_off(self) -> None:
        """Chunked data that is not chunked fails the request as a broken-off response."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.dataReceived(b"zz\r\n")
        self.assertEqual(recorder.events[-1][:2], ("failed", "broke_off"))
        self.assertTrue(transport.disconnected)

    def test_closed_before_any_response(self) -> None:
        """A connection lost before the response head fails the request ("failed", never retried)."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        lost(conn, transport, ConnectionLost())
        self.assertEqual(recorder.events[0][:2], ("failed", "failed"))
        self.assertIn("closed before a response", recorder.events[0][2])
        self.assertEqual(len(self.endpoint.dials), 1)

    def test_lost_mid_body_breaks_off(self) -> None:
        """A connection lost before Content-Length bytes came is a broken-off response."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        lost(conn, transport)
        self.assertEqual(recorder.events[-1][:2], ("failed", "broke_off"))
        self.assertIn("7 bytes short", recorder.events[-1][2])

    def test_unreachable_then_redial_elsewhere(self) -> None:
        """A refused dial is "unreachable"; redial() from the callback sends the held body to another origin."""
        other = FakeEndpoint()
        self.pool.origin(OTHER).endpoint = other
        request, recorder = self.start(method=b"POST", headers=[], length=5, body=b"he")
        recorder.on_failed = lambda error: request.redial(OTHER)
        request.write(b"llo")
        request.end()
        self.endpoint.dials[0][1].errback(ConnectionRefusedError())
        self.assertEqual(recorder.events[0][:2], ("failed", "unreachable"))
        self.assertEqual(self.credit, [])
        conn, transport = other.accept()
        self.assertEqual(transport.value(), b"POST /x HTTP/1.1\r\nHost: other.test\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(self.credit, [5])
        conn.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(recorder.events[-1], ("response", 201, b"", True))
        self.assertEqual(self.idle(OTHER), [conn])

    def test_unreachable_without_redial_is_final(self) -> None:
        """Without a redial the unreachable request is over: later body is ignored."""
        request, recorder = self.start(length=CHUNKED)
        self.endpoint.dials[0][1].errback(ConnectionRefusedError())
        request.write(b"late")
        request.end()
        self.assertEqual([e[:2] for e in recorder.events], [("failed", "unreachable")])
        self.assertEqual(self.credit, [])

    def test_two_host_headers_are_refused(self) -> None:
        """A request with two Host headers cannot be written: OriginError("failed")."""
        with self.assertRaises(OriginError) as caught:
            self.pool.request(URL, b"GET", b"/", [(b"Host", b"a"), (b"host", b"b")], Recorder(), self.credit.append)
        self.assertEqual(caught.exception.kind, "failed")


class RequestBodyTests(PoolTestCase):
    def test_known_length_body_with_credit_as_written(self) -> None:
        """Body held before the connection is credited when written; Content-Length frames it."""
        request, recorder = self.start(method=b"PUT", length=6, body=b"ab")
        self.assertEqual(self.credit, [])
        conn, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nab")
        self.assertEqual(self.credit, [2])
        request.write(b"cd")
        conn.pauseProducing()          # the socket's send buffer is full
        request.write(b"ef")
        self.assertEqual(self.credit, [2, 2])
        conn.resumeProducing()
        self.assertEqual(self.credit, [2, 2, 2])
        request.end()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.idle(), [conn])

    def test_unknown_length_body_is_chunked(self) -> None:
        """A body of unknown length goes out chunked; empty writes never end it early."""
        request, recorder = self.start(method=b"POST", length=CHUNKED)
        conn, transport = self.endpoint.accept()
        request.write(b"abc")
        request.write(b"")
        request.write(b"0123456789")
        request.end()
        self.assertEqual(transport.value(), b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            b"3\r\nabc\r\na\r\n0123456789\r\n0\r\n\r\n")

    def test_post_without_body_says_length_zero(self) -> None:
        """PUT and POST without a body carry Content-Length: 0; GET carries no framing."""
        self.start(method=b"POST")
        _, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")

    def test_body_longer_than_declared_fails(self) -> None:
        """More body than Content-Length fails the request and aborts its connection."""
        request, recorder = self.start(method=b"PUT", length=2)
        conn, transport = self.endpoint.accept()
        request.write(b"abc")
        self.assertEqual(recorder.events[0][:2], ("failed", "failed"))
        self.assertIn("longer than its Content-Length", recorder.events[0][2])
        self.assertTrue(transport.disconnected)

    def test_body_shorter_than_declared_fails(self) -> None:
        """A body ending short of its Content-Length fails instead of leaving the origin waiting."""
        request, recorder = self.start(method=b"PUT", length=5, body=b"ab")
        conn, transport = self.endpoint.accept()
        request.end()
        self.assertIn("3 bytes short", recorder.events[0][2])
        self.assertTrue(transport.disconnected)

    def test_early_response_closes_and_drops_the_rest_with_credit(self) -> None:
        """An answer before the body is all sent closes the connection; later body is dropped but credited."""
        request, recorder = self.start(method=b"PUT", length=CHUNKED)
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(recorder.events, [("response", 413, b"", True)])
        self.assertTrue(transport.disconnecting)
        transport.clear()
        request.write(b"more")
        request.end()
        self.assertEqual((transport.value(), self.credit), (b"", [4]))
        self.assertEqual(self.idle(), [])


class FlowControlTests(PoolTestCase):
    def test_pause_and_resume_reading(self) -> None:
        """pause_reading pauses the socket once; resume_reading resumes only what was paused."""
        calls: list[str] = []
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        transport.pauseProducing = lambda: calls.append("pause")     # type: ignore[method-assign]
        transport.resumeProducing = lambda: calls.append("resume")   # type: ignore[method-assign]
        request.resume_reading()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        request.pause_reading()
        request.pause_reading()
        self.assertEqual(calls, ["pause"])
        request.resume_reading()
        request.resume_reading()
        self.assertEqual(calls, ["pause", "resume"])
        conn.dataReceived(b"cd")
        self.assertEqual(recorder.events[-1], ("done",))
        self.assertEqual(self.idle(), [conn])

    def test_completed_while_paused_is_resumed_in_the_pool(self) -> None:
        """A response that completes while reading is paused goes back to the pool reading again."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        request.pause_reading()
        self.assertEqual(transport.producerState, "paused")
        conn.dataReceived(b"cd")   # already read before the pause took effect
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.idle(), [conn])

    def test_cancel_mid_body_never_pools(self) -> None:
        """cancel() aborts the connection; nothing more is reported and it never returns to the pool."""
        request, recorder = self.start()
        conn, transport = self.endpoint.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        request.cancel()
        self.assertTrue(transport.disconnected)
        conn.dataReceived(b"defghij")
        lost(conn, transport, ConnectionLost())
        self.assertEqual(recorder.events, [("response", 200, b"abc", False)])
        self.assertEqual(self.idle(), [])

    def test_cancel_while_dialing_cancels_the_dial(self) -> None:
        """Cancelling before the dial ends cancels the dial; nothing is reported."""
        request, recorder = self.start()
        request.cancel()
        self.assertTrue(self.endpoint.dials[0][1].called)
        self.assertEqual((recorder.events, request.dialing), ([], None))

    def test_connection_lost_while_request_body_pending_write(self) -> None:
        """Body written after the response failed is ignored (no credit, no error)."""
        request, recorder = self.start(method=b"PUT", length=CHUNKED)
        conn, transport = self.endpoint.accept()
        lost(conn, transport, ConnectionLost())
        request.write(b"x")
        request.end()
        self.assertEqual(([e[:2] for e in recorder.events], self.credit), ([("failed", "failed")], []))

