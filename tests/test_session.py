"""Tests for tunneld.session: the sans-IO state machine of one tunnel stream.

Every test drives a back-to-back ``SessionPair`` (tests/session_pair.py) and
ends by checking that both request tables are empty and consistent.
"""

from __future__ import annotations

# Events come back as the ``Event`` union; tests read the fields of the kind they expect.
# mypy: disable-error-code="union-attr"

from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.session_pair import (
    SessionPair,
    body_bytes,
    control,
    error_message,
    grpc_head,
    grpc_request_message,
    grpc_response_end,
    grpc_response_head,
    grpc_response_message,
    http_head,
    http_request_body,
    http_response_body,
    http_response_head,
    kinds,
    of_type,
    on_wire,
    opened,
    window_update,
    ws_accept,
    ws_close,
    ws_frame,
    ws_head,
    ws_refuse,
)
from tunneld import tunnel_pb2 as pb
from tunneld.session import (
    BAD_GATEWAY,
    CANCELLED,
    MAX_CHUNK,
    MIN_FRAME_COST,
    OVERLOADED,
    PROTOCOL_ERROR,
    ConfigReceived,
    ConfigSyncRequested,
    HeartbeatReceived,
    MessageReceived,
    OpenAccepted,
    OpenRejected,
    OpenRequested,
    ProtocolViolation,
    RequestAborted,
    RequestClosed,
    RequestReceived,
    RequestRefused,
    Session,
    SessionError,
    State,
    Writable,
    body_of,
    frame_cost,
)
from tunneld.window import DEFAULT_WINDOW

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def pattern(n: int) -> bytes:
    """``n`` bytes that differ from chunk to chunk, so reordering would show."""
    return bytes(i % 251 for i in range(n))


def received_body(events: Sequence[object], request_id: str) -> bytes:
    """Concatenated body bytes of the MessageReceived events of one request."""
    return b"".join(body_of(e.message) for e in of_type(events, MessageReceived) if e.request_id == request_id)


class SessionTestCase(SynchronousTestCase):
    def assertReleased(self, *sessions: Session) -> None:
        """Every session's request table is empty and its bookkeeping consistent."""
        for session in sessions:
            self.assertEqual(len(session), 0, session.request_ids())
            session.check_invariants()

    def errors(self, messages: list[pb.TunnelMessage]) -> list[pb.TunnelMessage]:
        return [m for m in messages if m.WhichOneof("payload") == "error_message"]

    def transfer(self, pair: SessionPair, sender: Session, request_id: str, data: bytes, end: bool) -> bytes:
        """Send ``data`` with send_body and let the receiver consume it all; return what arrived.

        Checks on the way that no pump ever puts more than one window of new
        body bytes in flight.
        """
        receiver = pair.peer(sender)
        sender.send_body(request_id, data, end=end)
        got = bytearray()
        while True:
            server_events, client_events = pair.pump()
            events = client_events if receiver is pair.client else server_events
            delivered = pair.to_client if receiver is pair.client else pair.to_server
            self.assertLessEqual(body_bytes(delivered), receiver.window)
            new = received_body(events, request_id)
            got += new
            if len(got) >= len(data):
                receiver.consumed(request_id, len(new))
                pair.pump()
                return bytes(got)
            self.assertTrue(new, "transfer stalled")
            receiver.consumed(request_id, len(new))

    def assertOverCreditAborts(self, pair: SessionPair, grow: int = 0) -> None:
        """10 body bytes sent, 11 credited back (plus ``grow``): the request is aborted on both sides."""
        rid = pair.server.start(http_head("GET", end=True))
        pair.pump()
        pair.client.send(rid, http_response_head(200, end=False, body=b"0123456789"))
        pair.pump()
        events = pair.deliver(pair.client, [window_update(pair.server, rid, 11, grow=grow)])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        server_events, _ = pair.pump()
        self.assertEqual([(e.code, e.by_peer) for e in of_type(server_events, RequestAborted)], [(PROTOCOL_ERROR, True)])
        self.assertReleased(pair.server, pair.client)


# -- handshake ------------------------------------------------------------------


class HandshakeTests(SessionTestCase):
    def test_open_accept(self) -> None:
        """open -> OpenRequested on the server; accept -> OpenAccepted on the client with the server's window."""
        pair = SessionPair(100_000, client_window=DEFAULT_WINDOW)
        self.assertIs(pair.server.state, State.AWAIT_OPEN)
        self.assertIs(pair.client.state, State.IDLE)
        pair.client.open(pb.StreamOpenRequest(client_id="c1", group="default", stream_id="s1"))
        self.assertIs(pair.client.state, State.OPENING)
        server_events, client_events = pair.pump()
        self.assertEqual(kinds(pair.to_server), ["stream_open"])
        self.assertEqual(pair.to_server[0].direction, pb.CLIENT_TO_SERVER)
        self.assertEqual(pair.to_server[0].protocol_type, pb.CONTROL)
        [opened_] = server_events
        self.assertIsInstance(opened_, OpenRequested)
        self.assertEqual((opened_.request.client_id, opened_.request.group, opened_.request.stream_id),
                         ("c1", "default", "s1"))
        self.assertEqual(client_events, [])
        self.assertIs(pair.server.state, State.OPENING)

        pair.server.accept(pb.StreamOpenResponse(message="welcome"))
        self.assertIs(pair.server.state, State.OPEN)
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [])
        [accepted] = client_events
        self.assertIsInstance(accepted, OpenAccepted)
        self.assertTrue(accepted.response.success)
        self.assertEqual(accepted.response.window, 100_000)
        self.assertEqual(accepted.response.message, "welcome")
        self.assertIs(pair.client.state, State.OPEN)
        self.assertEqual(pair.client.window, 100_000)

        rid = pair.client.start(http_head("GET", end=True))
        ex = pair.client.exchange(rid)
        assert ex is not None
        self.assertEqual(ex.send_window.size, 100_000)
        self.assertEqual(ex.recv_window.size, 100_000)
        pair.client.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_reject(self) -> None:
        """reject -> OpenRejected with the server's message, and both sides CLOSED."""
        pair = SessionPair()
        pair.client.open(pb.StreamOpenRequest(client_id="c1", group="default", stream_id="s1"))
        pair.pump()
        pair.server.reject("bad token")
        self.assertIs(pair.server.state, State.CLOSED)
        server_events, client_events = pair.pump()
        self.assertEqual(client_events, [OpenRejected("bad token")])
        self.assertFalse(pair.to_client[0].stream_open_response.success)
        self.assertIs(pair.client.state, State.CLOSED)
        self.assertRaises(SessionError, pair.client.start, http_head())
        self.assertReleased(pair.server, pair.client)

    def test_request_before_open_is_fatal(self) -> None:
        """A request head before stream_open is a fatal ProtocolViolation and closes the server session."""
        pair = SessionPair()
        msg = on_wire(http_head(), pair.client, "r1")
        events = pair.deliver(pair.server, [msg])
        self.assertEqual(len(events), 1)
        self.assertIsInstance(events[0], ProtocolViolation)
        self.assertTrue(events[0].fatal)
        self.assertIs(pair.server.state, State.CLOSED)
        self.assertEqual(pair.server.dropped, 1)
        # A closed session ignores everything, even a late stream_open.
        late = control(pb.CLIENT_TO_SERVER, stream_open=pb.StreamOpenRequest(client_id="c1"))
        self.assertEqual(pair.deliver(pair.server, [late]), [])
        self.assertEqual(pair.server.take_outgoing(), [])
        self.assertReleased(pair.server, pair.client)

    def test_heartbeat_before_open_is_fatal(self) -> None:
        """A heartbeat before stream_open is a fatal ProtocolViolation and closes the server session."""
        pair = SessionPair()
        hb = control(pb.CLIENT_TO_SERVER, heartbeat=pb.Heartbeat(sent_at_ms=1))
        [violation] = pair.deliver(pair.server, [hb])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertTrue(violation.fatal)
        self.assertIs(pair.server.state, State.CLOSED)
        self.assertEqual(pair.server.take_outgoing(), [])
        self.assertReleased(pair.server, pair.client)

    def test_client_needs_open_response_first(self) -> None:
        """A client that gets anything but stream_open_response while opening closes fatally."""
        pair = SessionPair()
        pair.client.open(pb.StreamOpenRequest(client_id="c1", group="default", stream_id="s1"))
        pair.take(pair.client)
        hb = control(pb.SERVER_TO_CLIENT, heartbeat=pb.Heartbeat(sent_at_ms=1))
        [violation] = pair.deliver(pair.client, [hb])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertTrue(violation.fatal)
        self.assertIs(pair.client.state, State.CLOSED)
        self.assertReleased(pair.server, pair.client)

    def test_second_stream_open_is_fatal(self) -> None:
        """A second stream_open on an open stream is fatal."""
        pair = opened()
        again = control(pb.CLIENT_TO_SERVER, stream_open=pb.StreamOpenRequest(client_id="c1", stream_id="s2"))
        [violation] = pair.deliver(pair.server, [again])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertTrue(violation.fatal)
        self.assertIs(pair.server.state, State.CLOSED)
        self.assertReleased(pair.server, pair.client)

    def test_actions_checked_against_state(self) -> None:
        """open twice, accept by the client and start before OPEN raise SessionError."""
        pair = SessionPair()
        self.assertRaises(SessionError, pair.server.start, http_head())
        self.assertRaises(SessionError, pair.client.accept, pb.StreamOpenResponse())
        self.assertRaises(SessionError, pair.server.accept, pb.StreamOpenResponse())
        pair.client.open(pb.StreamOpenRequest(client_id="c1"))
        self.assertRaises(SessionError, pair.client.open, pb.StreamOpenRequest(client_id="c1"))
        self.assertRaises(SessionError, pair.client.start, http_head())
        pair.client.heartbeat(5)  # ignored until OPEN
        self.assertEqual(kinds(pair.client.take_outgoing()), ["stream_open"])
        self.assertReleased(pair.server, pair.client)


# -- HTTP --------------------------------------------------------------------


class HttpReverseTests(SessionTestCase):
    """The server starts requests, the client answers (external user -> backend)."""

    def test_get_round_trip_one_message_each_way(self) -> None:
        """A GET head ending the request and a head+body+end response cost one message each way."""
        pair = opened()
        rid = pair.server.start(http_head("GET", "/x?y=1", end=True))
        self.assertTrue(rid)
        server_events, client_events = pair.pump()
        self.assertEqual(kinds(pair.to_client), ["http_request"])
        self.assertEqual(pair.to_server, [])
        wire = pair.to_client[0]
        self.assertEqual((wire.request_id, wire.direction, wire.protocol_type), (rid, pb.SERVER_TO_CLIENT, pb.HTTP))
        [received] = client_events
        self.assertIsInstance(received, RequestReceived)
        self.assertEqual((received.request_id, received.protocol), (rid, pb.HTTP))
        self.assertEqual(received.message.http_request.url, "/x?y=1")
        self.assertEqual(server_events, [])

        cookies = [("Set-Cookie", b"a=1"), ("Content-Type", b"text/plain"), ("Set-Cookie", b"b=2")]
        self.assertTrue(pair.client.send(rid, http_response_head(200, end=True, body=b"hello", headers=cookies)))
        self.assertEqual(len(pair.client), 0)
        server_events, client_events = pair.pump()
        self.assertEqual(kinds(pair.to_server), ["http_response"])
        self.assertEqual(pair.to_client, [])
        self.assertEqual(client_events, [RequestClosed(rid)])
        self.assertEqual(len(server_events), 2)
        got, closed = server_events
        self.assertIsInstance(got, MessageReceived)
        self.assertTrue(got.end)
        self.assertEqual(got.message.http_response.body, b"hello")
        self.assertEqual([(h.name, h.value) for h in got.message.http_response.headers], cookies)
        self.assertEqual(closed, RequestClosed(rid))
        self.assertReleased(pair.server, pair.client)

    def test_large_body_chunked_and_windowed(self) -> None:
        """A 1 MiB body goes in <= 64 KiB chunks, stops at the 256 KiB window and resumes on consumed()."""
        pair = opened()
        rid = pair.server.start(http_head("POST", "/upload", end=False))
        pair.pump()
        data = pattern(MIB)
        self.assertFalse(pair.server.send_body(rid, data, end=True))
        server_events, client_events = pair.pump()
        self.assertEqual(body_bytes(pair.to_client), DEFAULT_WINDOW)
        self.assertTrue(all(len(body_of(m)) <= MAX_CHUNK for m in pair.to_client))
        self.assertEqual(pair.to_server, [])
        self.assertEqual(of_type(server_events, Writable), [])
        got = bytearray(received_body(client_events, rid))

        # Nothing more moves until the receiver's consumer takes bytes.
        pair.pump()
        self.assertEqual(pair.to_client, [])

        writable: list[Writable] = []
        ended = False
        rounds = 0
        taken = len(got)  # what the consumer has not reported yet
        while not ended:
            rounds += 1
            self.assertLess(rounds, 100)
            pair.client.consumed(rid, taken)
            server_events, client_events = pair.pump()
            self.assertTrue(all(len(body_of(m)) <= MAX_CHUNK for m in pair.to_client))
            self.assertLessEqual(body_bytes(pair.to_client), DEFAULT_WINDOW)
            writable += of_type(server_events, Writable)
            new = received_body(client_events, rid)
            taken = len(new)
            got += new
            ended = any(e.end for e in of_type(client_events, MessageReceived))
        self.assertEqual(bytes(got), data)
        self.assertEqual(writable, [Writable(rid)])

        pair.client.send(rid, http_response_head(201, end=True))
        server_events, _ = pair.pump()
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(rid)])
        self.assertReleased(pair.server, pair.client)

    def test_send_body_blocked_then_writable(self) -> None:
        """send_body returns False when blocked, and Writable arrives once credit drains the queue."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        self.assertFalse(pair.server.send_body(rid, pattern(DEFAULT_WINDOW + 64 * KIB)))
        self.assertFalse(pair.server.send_body(rid, b"more"))
        server_events, _ = pair.pump()
        self.assertEqual(of_type(server_events, Writable), [])
        pair.client.consumed(rid, DEFAULT_WINDOW // 4)
        server_events, _ = pair.pump()
        self.assertEqual(kinds(pair.to_server), [])  # below half a window: credit waits
        pair.client.consumed(rid, DEFAULT_WINDOW // 4)
        server_events, _ = pair.pump()
        self.assertEqual(kinds(pair.to_server), ["window_update"])
        self.assertEqual(pair.to_server[0].window_update.increment, DEFAULT_WINDOW // 2)
        # The credit lets the queued chunk and b"more" out: writable again.
        self.assertEqual(body_bytes(pair.to_client), 64 * KIB + 4)
        self.assertEqual(of_type(server_events, Writable), [Writable(rid)])
        self.assertTrue(pair.server.send_body(rid, b"", end=True))
        pair.pump()
        pair.client.send(rid, http_response_head(204, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_credit_only_from_consumed(self) -> None:
        """Receiving bytes returns no credit, and consumed() reported before data arrives is not banked."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        pair.client.consumed(rid, DEFAULT_WINDOW)
        self.assertEqual(pair.client.take_outgoing(), [])
        pair.server.send_body(rid, pattern(DEFAULT_WINDOW))
        pair.pump()
        self.assertEqual(pair.to_server, [])
        self.assertFalse(pair.server.send_body(rid, b"x"))
        pair.pump()
        self.assertEqual(pair.to_client, [])
        pair.client.consumed(rid, DEFAULT_WINDOW)
        pair.pump()
        self.assertEqual(kinds(pair.to_server), ["window_update"])
        self.assertEqual(pair.to_server[0].window_update.increment, DEFAULT_WINDOW)
        self.assertEqual(body_bytes(pair.to_client), 1)
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_window_update_batched_at_half(self) -> None:
        """A WindowUpdate goes out only once half the window has been consumed."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        pair.server.send_body(rid, pattern(DEFAULT_WINDOW + 1))
        pair.pump()
        for _ in range(3):
            pair.client.consumed(rid, 10 * KIB)
            pair.pump()
            self.assertEqual(pair.to_server, [])
        pair.client.consumed(rid, DEFAULT_WINDOW // 2 - 30 * KIB - 1)
        pair.pump()
        self.assertEqual(pair.to_server, [])
        pair.client.consumed(rid, 1)
        pair.pump()
        self.assertEqual(kinds(pair.to_server), ["window_update"])
        self.assertEqual(pair.to_server[0].window_update.increment, DEFAULT_WINDOW // 2)
        self.assertEqual(body_bytes(pair.to_client), 1)
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_no_window_update_after_peer_ended(self) -> None:
        """Once the peer's direction ended, consumed() sends no more credit."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        self.assertTrue(pair.server.send_body(rid, pattern(100 * KIB), end=True))
        _, client_events = pair.pump()
        self.assertEqual(len(received_body(client_events, rid)), 100 * KIB)
        self.assertTrue(of_type(client_events, MessageReceived)[-1].end)
        pair.client.consumed(rid, 100 * KIB)
        pair.pump()
        self.assertEqual(pair.to_server, [])
        pair.client.send(rid, http_response_head(200, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_streamed_response_body(self) -> None:
        """A response head, streamed body chunks and a bare end each reach the server in order."""
        pair = opened()
        rid = pair.server.start(http_head("GET", "/events", end=True))
        pair.pump()
        pair.client.send(rid, http_response_head(200, end=False))
        pair.client.send_body(rid, b"data: 1\n\n")
        pair.client.send_body(rid, b"data: 2\n\n")
        server_events, _ = pair.pump()
        self.assertEqual(received_body(server_events, rid), b"data: 1\n\ndata: 2\n\n")
        self.assertFalse(any(e.end for e in of_type(server_events, MessageReceived)))
        pair.server.consumed(rid, 18)
        pair.client.send_body(rid, b"", end=True)
        server_events, client_events = pair.pump()
        self.assertEqual(pair.to_server[-1].http_response.is_last_chunk, True)
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(rid)])
        self.assertEqual(of_type(client_events, RequestClosed), [RequestClosed(rid)])
        self.assertReleased(pair.server, pair.client)

    def test_response_complete_while_request_streaming(self) -> None:
        """A complete response while the request body still streams: the initiator sends ErrorMessage, both release."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False, body=b"a" * 10))
        pair.pump()
        pair.client.send(rid, http_response_head(413, end=True, body=b"too large"))
        self.assertEqual(len(pair.client), 1)  # our request direction has not ended yet
        server_events, client_events = pair.pump()
        got = of_type(server_events, MessageReceived)
        self.assertEqual(len(got), 1)
        self.assertTrue(got[0].end)
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(rid)])
        [err] = self.errors(pair.to_client)
        self.assertEqual((err.request_id, err.error_message.code), (rid, CANCELLED))
        self.assertEqual(of_type(client_events, RequestAborted), [RequestAborted(rid, CANCELLED, err.error_message.message, by_peer=True)])
        self.assertFalse(pair.server.send_body(rid, b"late"))
        self.assertReleased(pair.server, pair.client)

    def test_response_complete_while_request_end_queued(self) -> None:
        """A complete response while the request's end still waits behind the window also releases both sides."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        self.assertFalse(pair.server.send_body(rid, pattern(2 * DEFAULT_WINDOW), end=True))
        pair.pump()
        # The backend answers 413 without reading the rest of the upload.
        pair.client.send(rid, http_response_head(413, end=True))
        server_events, client_events = pair.pump()
        self.assertTrue(of_type(server_events, MessageReceived)[-1].end)
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(rid)])
        self.assertEqual([m.error_message.code for m in self.errors(pair.to_client)], [CANCELLED])
        self.assertEqual([e.request_id for e in of_type(client_events, RequestAborted)], [rid])
        self.assertReleased(pair.server, pair.client)


class HttpForwardTests(SessionTestCase):
    """The client starts requests, the server answers (client http_entry -> upstream)."""

    def test_get_round_trip(self) -> None:
        """A client-started GET and its one-message response release both sides."""
        pair = opened()
        rid = pair.client.start(http_head("GET", "/api", end=True))
        server_events, _ = pair.pump()
        self.assertEqual(kinds(pair.to_server), ["http_request"])
        self.assertEqual(pair.to_server[0].direction, pb.CLIENT_TO_SERVER)
        self.assertEqual(pair.to_server[0].client_id, "c1")
        [received] = server_events
        self.assertIsInstance(received, RequestReceived)
        self.assertEqual(received.request_id, rid)
        pair.server.send(rid, http_response_head(200, end=True, body=b"{}"))
        server_events, client_events = pair.pump()
        self.assertEqual(kinds(pair.to_client), ["http_response"])
        self.assertEqual(pair.to_client[0].direction, pb.SERVER_TO_CLIENT)
        self.assertEqual(server_events, [RequestClosed(rid)])
        self.assertEqual([type(e) for e in client_events], [MessageReceived, RequestClosed])
        self.assertReleased(pair.server, pair.client)

    def test_large_bodies_both_ways(self) -> None:
        """A 600 KiB upload and a 600 KiB download pass intact under flow control."""
        pair = opened()
        rid = pair.client.start(http_head("PUT", "/blob", end=False))
        pair.pump()
        up = pattern(600 * KIB)
        self.assertEqual(self.transfer(pair, pair.client, rid, up, end=True), up)
        pair.server.send(rid, http_response_head(200, end=False))
        pair.pump()
        down = pattern(600 * KIB)[::-1]
        self.assertEqual(self.transfer(pair, pair.server, rid, down, end=True), down)
        self.assertReleased(pair.server, pair.client)

    def test_response_complete_while_request_streaming(self) -> None:
        """In the forward path too, an early complete response makes the client send ErrorMessage; both release."""
        pair = opened()
        rid = pair.client.start(http_head("POST", end=False))
        pair.client.send_body(rid, b"part")
        pair.pump()
        pair.server.send(rid, http_response_head(400, end=True))
        server_events, client_events = pair.pump()
        self.assertEqual(of_type(client_events, RequestClosed), [RequestClosed(rid)])
        self.assertEqual([m.error_message.code for m in self.errors(pair.to_server)], [CANCELLED])
        self.assertEqual([(e.code, e.by_peer) for e in of_type(server_events, RequestAborted)], [(CANCELLED, True)])
        self.assertReleased(pair.server, pair.client)


class IsolationTests(SessionTestCase):
    def test_blocked_request_does_not_block_others(self) -> None:
        """One request stuck on its window does not delay another on the same stream."""
        pair = opened()
        slow = pair.server.start(http_head("POST", "/slow", end=False))
        fast = pair.server.start(http_head("GET", "/fast", end=True))
        pair.pump()
        self.assertFalse(pair.server.send_body(slow, pattern(2 * DEFAULT_WINDOW)))
        pair.pump()
        pair.client.send(fast, http_response_head(200, end=True, body=b"quick"))
        server_events, _ = pair.pump()
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(fast)])
        self.assertEqual(pair.server.request_ids(), [slow])
        self.assertEqual(pair.client.request_ids(), [slow])
        # The slow request still completes once its consumer catches up.
        pair.client.consumed(slow, DEFAULT_WINDOW)
        pair.pump()
        pair.client.consumed(slow, DEFAULT_WINDOW)
        pair.pump()
        pair.server.send_body(slow, b"", end=True)
        pair.client.send(slow, http_response_head(200, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_response_on_other_stream_is_unknown(self) -> None:
        """A response for a request sent on one stream is an unknown request_id on another stream."""
        one, two = opened(), opened()
        rid = one.server.start(http_head("GET", end=True))
        one.pump()
        other = two.server.start(http_head("GET", "/other", end=False))
        two.pump()
        one.client.send(rid, http_response_head(200, end=True))
        [response] = one.take(one.client)

        [violation] = two.deliver(two.server, [response])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertEqual((violation.request_id, violation.fatal), (rid, False))
        [err] = two.take(two.server)
        self.assertEqual((err.request_id, err.error_message.code), (rid, PROTOCOL_ERROR))
        self.assertEqual(two.server.request_ids(), [other])
        self.assertEqual(two.server.dropped, 1)
        # The other stream's client never answers the ErrorMessage.
        self.assertEqual(two.deliver(two.client, [err]), [])
        self.assertEqual(two.client.take_outgoing(), [])

        # The right stream still takes it.
        server_events = one.deliver(one.server, [response])
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(rid)])
        two.server.cancel(other)
        two.pump()
        self.assertReleased(one.server, one.client, two.server, two.client)


# -- errors -------------------------------------------------------------------


class ErrorTests(SessionTestCase):
    def test_cancel_by_initiator(self) -> None:
        """cancel() sends ErrorMessage; the peer gets RequestAborted(by_peer=True); no local event."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        pair.server.cancel(rid)
        self.assertEqual(len(pair.server), 0)
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [])
        [err] = pair.to_client
        self.assertEqual((err.request_id, err.error_message.code), (rid, CANCELLED))
        self.assertEqual(client_events, [RequestAborted(rid, CANCELLED, "cancelled", by_peer=True)])
        self.assertEqual(pair.to_server, [])
        self.assertReleased(pair.server, pair.client)

    def test_cancel_by_responder(self) -> None:
        """The responder may cancel too (backend refused): the initiator gets its code."""
        pair = opened()
        rid = pair.server.start(http_head("GET", end=True))
        pair.pump()
        pair.client.cancel(rid, BAD_GATEWAY, "connection refused")
        server_events, client_events = pair.pump()
        self.assertEqual(client_events, [])
        self.assertEqual(server_events, [RequestAborted(rid, BAD_GATEWAY, "connection refused", by_peer=True)])
        self.assertReleased(pair.server, pair.client)

    def test_fail_all(self) -> None:
        """fail_all releases every exchange with RequestAborted(502), sends nothing and closes."""
        pair = opened()
        a = pair.server.start(http_head("POST", end=False))
        b = pair.server.start(ws_head())
        c = pair.client.start(http_head("GET", end=True))
        pair.pump()
        pair.server.fail_all("stream lost")
        events = pair.server.take_events()
        self.assertEqual(sorted(e.request_id for e in events), sorted([a, b, c]))
        for e in events:
            self.assertEqual(e, RequestAborted(e.request_id, BAD_GATEWAY, "stream lost", by_peer=False))
        self.assertEqual(pair.server.take_outgoing(), [])
        self.assertIs(pair.server.state, State.CLOSED)
        pair.client.fail_all("stream lost")
        self.assertEqual(len(pair.client.take_events()), 3)
        self.assertIs(pair.client.state, State.CLOSED)
        self.assertReleased(pair.server, pair.client)

    def test_response_for_unknown_request_id(self) -> None:
        """A response for an unknown request_id is a ProtocolViolation answered by ErrorMessage; the table is unchanged."""
        pair = opened()
        live = pair.server.start(http_head("GET", end=True))
        pair.pump()
        bogus = on_wire(http_response_head(200, end=True), pair.client, "nope")
        [violation] = pair.deliver(pair.server, [bogus])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertEqual((violation.request_id, violation.fatal), ("nope", False))
        [err] = pair.take(pair.server)
        self.assertEqual((err.request_id, err.error_message.code), ("nope", PROTOCOL_ERROR))
        self.assertEqual(pair.server.request_ids(), [live])
        self.assertIs(pair.server.state, State.OPEN)
        self.assertEqual(pair.server.dropped, 1)
        self.assertEqual(pair.deliver(pair.client, [err]), [])
        self.assertEqual(pair.client.take_outgoing(), [])
        pair.client.send(live, http_response_head(200, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_late_messages_after_release_dropped_quietly(self) -> None:
        """Body and credit in flight when a request was released are dropped without a violation."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        pair.client.send(rid, http_response_head(200, end=False, body=b"partial"))
        pair.server.send_body(rid, b"in flight")
        pair.server.consumed(rid, DEFAULT_WINDOW)  # nothing owed yet; just noise
        in_flight_to_client = pair.take(pair.server)
        pair.client.cancel(rid)
        in_flight_to_server = pair.take(pair.client)
        self.assertEqual(kinds(in_flight_to_server), ["http_response", "error_message"])
        late_credit = window_update(pair.server, rid, 7)
        self.assertEqual(pair.deliver(pair.client, in_flight_to_client + [late_credit]), [])
        self.assertEqual(pair.client.take_outgoing(), [])
        self.assertEqual(pair.client.dropped, 0)
        server_events = pair.deliver(pair.server, in_flight_to_server)
        self.assertEqual([type(e) for e in server_events], [MessageReceived, RequestAborted])
        # ...and after the server released it, a late body is quiet there too.
        late = on_wire(http_response_body(b"more"), pair.client, rid)
        self.assertEqual(pair.deliver(pair.server, [late]), [])
        self.assertEqual(pair.server.take_outgoing(), [])
        self.assertReleased(pair.server, pair.client)

    def test_error_for_unknown_id_never_answered(self) -> None:
        """An ErrorMessage for an unknown request_id produces no event and no answer."""
        pair = opened()
        self.assertEqual(pair.deliver(pair.server, [error_message(pair.client, "ghost")]), [])
        self.assertEqual(pair.deliver(pair.client, [error_message(pair.server, "ghost")]), [])
        self.assertEqual(pair.server.take_outgoing(), [])
        self.assertEqual(pair.client.take_outgoing(), [])
        self.assertReleased(pair.server, pair.client)

    def test_error_with_wrong_direction_never_answered(self) -> None:
        """An ErrorMessage is never answered with an ErrorMessage, even a malformed one (wrong direction)."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        forged = error_message(pair.client, rid)  # CLIENT_TO_SERVER, delivered to the client
        pair.deliver(pair.client, [forged])
        self.assertEqual(self.errors(pair.client.take_outgoing()), [])
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_wrong_direction_aborts_request(self) -> None:
        """A message with the wrong direction for a live request aborts that request on both sides."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        forged = on_wire(http_request_body(b"x"), pair.server, rid)
        forged.direction = pb.CLIENT_TO_SERVER
        events = pair.deliver(pair.client, [forged])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        self.assertEqual(events[0].request_id, rid)
        self.assertFalse(events[0].fatal)
        self.assertEqual((events[1].code, events[1].by_peer), (PROTOCOL_ERROR, False))
        server_events, _ = pair.pump()
        self.assertEqual([(e.request_id, e.code, e.by_peer) for e in server_events], [(rid, PROTOCOL_ERROR, True)])
        self.assertIs(pair.client.state, State.OPEN)
        self.assertReleased(pair.server, pair.client)

    def test_wrong_direction_control_not_fatal(self) -> None:
        """A control message with the wrong direction is a non-fatal violation that sends nothing."""
        pair = opened()
        hb = control(pb.SERVER_TO_CLIENT, heartbeat=pb.Heartbeat(sent_at_ms=1))
        [violation] = pair.deliver(pair.server, [hb])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertFalse(violation.fatal)
        self.assertIs(pair.server.state, State.OPEN)
        self.assertEqual(pair.server.take_outgoing(), [])
        self.assertReleased(pair.server, pair.client)

    def test_message_without_payload(self) -> None:
        """A message without payload is a non-fatal violation."""
        pair = opened()
        empty = pb.TunnelMessage(request_id="r", direction=pb.CLIENT_TO_SERVER, protocol_type=pb.HTTP)
        [violation] = pair.deliver(pair.server, [empty])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertFalse(violation.fatal)
        self.assertIs(pair.server.state, State.OPEN)
        self.assertReleased(pair.server, pair.client)

    def test_protocol_type_mismatch_on_exchange(self) -> None:
        """A body message whose protocol_type differs from its request's aborts the request."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        forged = on_wire(http_request_body(b"x"), pair.server, rid, pb.GRPC)
        events = pair.deliver(pair.client, [forged])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        server_events, _ = pair.pump()
        self.assertEqual([(e.code, e.by_peer) for e in of_type(server_events, RequestAborted)], [(PROTOCOL_ERROR, True)])
        self.assertReleased(pair.server, pair.client)

    def test_protocol_type_mismatch_on_new_request(self) -> None:
        """A request head whose protocol_type contradicts its payload is refused with 400 and never enters the table."""
        pair = opened()
        rid = pair.server.start(http_head("GET", end=True))
        [head] = pair.take(pair.server)
        head.protocol_type = pb.WEBSOCKET
        events = pair.deliver(pair.client, [head])
        self.assertEqual([type(e) for e in events], [ProtocolViolation])
        self.assertEqual(len(pair.client), 0)
        server_events, _ = pair.pump()
        self.assertEqual([(e.request_id, e.code) for e in server_events], [(rid, PROTOCOL_ERROR)])
        self.assertReleased(pair.server, pair.client)

    def test_oversized_chunk_on_exchange(self) -> None:
        """An HTTP body chunk over 64 KiB aborts its request."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        forged = on_wire(http_request_body(b"x" * (MAX_CHUNK + 1)), pair.server, rid)
        events = pair.deliver(pair.client, [forged])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        pair.pump()
        self.assertEqual(len(pair.server), 0)
        # Exactly 64 KiB is fine.
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        pair.deliver(pair.client, [on_wire(http_request_body(b"x" * MAX_CHUNK, end=True), pair.server, rid)])
        self.assertIn(rid, pair.client)
        pair.client.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_oversized_chunk_in_head(self) -> None:
        """A request head carrying more than 64 KiB of body is refused with 400 and no table entry."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=True, body=b"x" * (MAX_CHUNK + 1)))
        server_events, client_events = pair.pump()
        self.assertEqual([type(e) for e in client_events], [ProtocolViolation])
        self.assertEqual([(e.request_id, e.code, e.by_peer) for e in server_events], [(rid, PROTOCOL_ERROR, True)])
        self.assertReleased(pair.server, pair.client)

    def test_peer_ignoring_window(self) -> None:
        """A peer that sends past the window gets that request aborted (400); other requests go on."""
        pair = opened()
        greedy = pair.server.start(http_head("POST", "/greedy", end=False))
        other = pair.server.start(http_head("POST", "/other", end=False))
        pair.pump()
        chunk = b"x" * MAX_CHUNK
        flood = [on_wire(http_request_body(chunk), pair.server, greedy) for _ in range(DEFAULT_WINDOW // MAX_CHUNK)]
        events = pair.deliver(pair.client, flood)
        self.assertEqual(len(of_type(events, MessageReceived)), len(flood))
        self.assertEqual(of_type(events, ProtocolViolation), [])
        events = pair.deliver(pair.client, [on_wire(http_request_body(b"y"), pair.server, greedy)])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        self.assertEqual((events[1].request_id, events[1].code), (greedy, PROTOCOL_ERROR))
        server_events, _ = pair.pump()
        self.assertEqual([(e.request_id, e.code, e.by_peer) for e in server_events], [(greedy, PROTOCOL_ERROR, True)])
        # The other request on the same stream is untouched.
        self.assertEqual(pair.client.request_ids(), [other])
        self.assertIs(pair.client.state, State.OPEN)
        pair.server.send_body(other, b"fine", end=True)
        pair.pump()
        pair.client.send(other, http_response_head(200, end=True))
        server_events, _ = pair.pump()
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(other)])
        self.assertReleased(pair.server, pair.client)

    def test_over_credit_window_update(self) -> None:
        """A WindowUpdate for more than was sent aborts the request."""
        self.assertOverCreditAborts(opened())

    def test_zero_window_update(self) -> None:
        """A WindowUpdate of zero bytes aborts the request."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        events = pair.deliver(pair.server, [window_update(pair.client, rid, 0)])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_second_response_head(self) -> None:
        """A second HTTP response head (is_first_chunk again) aborts the request."""
        pair = opened()
        rid = pair.server.start(http_head("GET", end=True))
        pair.pump()
        pair.client.send(rid, http_response_head(200, end=False))
        pair.pump()
        second = on_wire(http_response_head(500, end=True), pair.client, rid)
        events = pair.deliver(pair.server, [second])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        self.assertEqual(self.errors(pair.server.take_outgoing())[0].error_message.code, PROTOCOL_ERROR)
        pair.client.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_body_chunk_for_unknown_id_is_not_a_request(self) -> None:
        """A body-only request message (is_first_chunk=False) for an unknown request_id does not start a request."""
        pair = opened()
        stray = on_wire(http_request_body(b"body only", end=True), pair.server, "stray")
        events = pair.deliver(pair.client, [stray])
        self.assertEqual(of_type(events, RequestReceived), [])
        self.assertEqual(len(pair.client), 0)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_max_concurrency(self) -> None:
        """A request past max_concurrency is refused with ErrorMessage 503 and never enters the table."""
        pair = opened(client_max_concurrency=1)
        a = pair.server.start(http_head("GET", "/a", end=True))
        b = pair.server.start(http_head("GET", "/b", end=True))
        server_events, client_events = pair.pump()
        self.assertEqual([e.request_id for e in of_type(client_events, RequestReceived)], [a])
        self.assertEqual(pair.client.request_ids(), [a])
        [err] = self.errors(pair.to_server)
        self.assertEqual((err.request_id, err.error_message.code), (b, OVERLOADED))
        self.assertEqual([(e.request_id, e.code, e.by_peer) for e in server_events], [(b, OVERLOADED, True)])
        pair.client.send(a, http_response_head(200, end=True))
        pair.pump()
        # With the slot free, a new request is accepted again.
        c = pair.server.start(http_head("GET", "/c", end=True))
        _, client_events = pair.pump()
        self.assertEqual([e.request_id for e in of_type(client_events, RequestReceived)], [c])
        pair.client.send(c, http_response_head(200, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_websockets_do_not_count_against_max_concurrency(self) -> None:
        """Open WebSockets have their own limit (max_websockets): with 3 open, an HTTP request still fits max_concurrency 1, a 4th WebSocket is refused in words, not as a violation."""
        pair = opened(client_max_concurrency=1, client_max_websockets=3)
        sockets = [pair.server.start(ws_head(f"/ws{i}")) for i in range(3)]
        _, client_events = pair.pump()
        self.assertEqual([e.request_id for e in of_type(client_events, RequestReceived)], sockets)
        http = pair.server.start(http_head("GET", "/a", end=True))
        extra = pair.server.start(ws_head("/ws4"))
        server_events, client_events = pair.pump()
        self.assertEqual([e.request_id for e in of_type(client_events, RequestReceived)], [http])
        [refused] = of_type(client_events, RequestRefused)
        self.assertEqual(refused.request_id, extra)
        self.assertIn("3 WebSockets open (max_websockets)", refused.message)
        self.assertEqual(of_type(client_events, ProtocolViolation), [])
        [aborted] = of_type(server_events, RequestAborted)
        self.assertEqual((aborted.request_id, aborted.code), (extra, OVERLOADED))
        self.assertIn("client is at its limit", aborted.message)
        pair.client.check_invariants()
        for rid in sockets:
            pair.client.cancel(rid)
        pair.client.send(http, http_response_head(200, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_max_concurrency_refusal_is_not_a_violation(self) -> None:
        """An HTTP request past max_concurrency is a RequestRefused naming the limit."""
        pair = opened(client_max_concurrency=1)
        a = pair.server.start(http_head("GET", "/a", end=True))
        b = pair.server.start(http_head("GET", "/b", end=True))
        _, client_events = pair.pump()
        self.assertEqual(of_type(client_events, ProtocolViolation), [])
        self.assertEqual([(e.request_id, e.message) for e in of_type(client_events, RequestRefused)],
                         [(b, "client is at its limit: 1 requests in flight (max_concurrency)")])
        pair.client.send(a, http_response_head(200, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_refused_request_body_in_flight(self) -> None:
        """Body chunks of a request refused with 503 that were already in flight never start a request."""
        pair = opened(client_max_concurrency=1)
        a = pair.server.start(http_head("GET", "/a", end=True))
        b = pair.server.start(http_head("POST", "/b", end=False))
        heads = pair.take(pair.server)
        pair.server.send_body(b, b"upload", end=True)
        b_body = pair.take(pair.server)
        pair.deliver(pair.client, heads)
        self.assertEqual(pair.client.request_ids(), [a])
        pair.client.send(a, http_response_head(200, end=True))  # the slot frees up
        events = pair.deliver(pair.client, b_body)
        self.assertEqual(of_type(events, RequestReceived), [])
        self.assertEqual(pair.client.request_ids(), [])
        answers = pair.take(pair.client)
        self.assertEqual([(m.request_id, m.error_message.code) for m in self.errors(answers)], [(b, OVERLOADED)])
        pair.deliver(pair.server, answers)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_send_rules(self) -> None:
        """start() numbers requests per stream and refuses a used id; send() after the end raises; unknown ids are ignored."""
        pair = opened()
        rid = pair.server.start(http_head("GET", end=True))
        self.assertTrue(rid.startswith("s"), rid)
        self.assertLessEqual(len(rid), 64)
        self.assertRaises(SessionError, pair.server.start, http_head(request_id=rid))
        self.assertRaises(SessionError, pair.server.send, rid, http_request_body(b"x"))
        self.assertRaises(SessionError, pair.server.start, http_response_head())
        self.assertFalse(pair.server.send("unknown", http_request_body(b"x")))
        self.assertFalse(pair.server.send_body("unknown", b"x"))
        pair.server.consumed("unknown", 10)
        pair.server.cancel("unknown")
        self.assertEqual(len(pair.server.take_outgoing()), 1)
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_request_ids_are_unique_per_stream(self) -> None:
        """Each side numbers its own requests; the two sides' ids never collide in the one table."""
        pair = opened()
        ours = [pair.server.start(http_head("GET", end=True)) for _ in range(3)]
        theirs = [pair.client.start(http_head("GET", end=True)) for _ in range(3)]
        self.assertEqual(len(set(ours + theirs)), 6)
        self.assertTrue(all(r.startswith("s") for r in ours) and all(r.startswith("c") for r in theirs))
        pair.pump()
        self.assertEqual(len(pair.server), 6)
        self.assertEqual(len(pair.client), 6)


# -- control ---------------------------------------------------------------------


class ControlTests(SessionTestCase):
    def test_heartbeat_acked_server_to_client(self) -> None:
        """A server heartbeat is acked automatically with the same sent_at_ms; both sides see HeartbeatReceived."""
        pair = opened()
        pair.server.heartbeat(123456)
        server_events, client_events = pair.pump()
        self.assertEqual(client_events, [HeartbeatReceived(123456, False)])
        self.assertEqual(server_events, [HeartbeatReceived(123456, True)])
        [ack] = pair.to_server
        self.assertEqual((ack.heartbeat.sent_at_ms, ack.heartbeat.ack), (123456, True))
        self.assertEqual(len(pair.to_client), 1)  # the ack is not acked again
        self.assertReleased(pair.server, pair.client)

    def test_heartbeat_acked_client_to_server(self) -> None:
        """A client heartbeat is acked by the server the same way."""
        pair = opened()
        pair.client.heartbeat(42)
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [HeartbeatReceived(42, False)])
        self.assertEqual(client_events, [HeartbeatReceived(42, True)])
        self.assertEqual(pair.to_client[0].heartbeat.sent_at_ms, 42)
        self.assertReleased(pair.server, pair.client)

    def test_config_sync_request(self) -> None:
        """request_config reaches the server as ConfigSyncRequested with the client's version."""
        pair = opened()
        pair.client.request_config("v7")
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [ConfigSyncRequested("v7")])
        self.assertEqual(client_events, [])
        self.assertReleased(pair.server, pair.client)

    def test_push_config(self) -> None:
        """push_config reaches the client as ConfigReceived with the routes."""
        pair = opened()
        config = pb.ConfigSyncResponse(config_version="v8", routes=[pb.Route(name="web", path_prefix="/")])
        pair.server.push_config(config)
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [])
        [received] = client_events
        self.assertIsInstance(received, ConfigReceived)
        self.assertEqual(received.config.config_version, "v8")
        self.assertEqual([r.name for r in received.config.routes], ["web"])
        self.assertReleased(pair.server, pair.client)

    def test_config_response_to_server_is_fatal(self) -> None:
        """A config_sync_response sent to the server is a fatal violation."""
        pair = opened()
        msg = control(pb.CLIENT_TO_SERVER, config_sync_response=pb.ConfigSyncResponse(config_version="x"))
        [violation] = pair.deliver(pair.server, [msg])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertTrue(violation.fatal)
        self.assertIs(pair.server.state, State.CLOSED)
        self.assertReleased(pair.server, pair.client)

    def test_config_request_to_client_is_fatal(self) -> None:
        """A config_sync request sent to the client is a fatal violation."""
        pair = opened()
        msg = control(pb.SERVER_TO_CLIENT, config_sync=pb.ConfigSyncRequest(config_version="x"))
        [violation] = pair.deliver(pair.client, [msg])
        self.assertIsInstance(violation, ProtocolViolation)
        self.assertTrue(violation.fatal)
        self.assertIs(pair.client.state, State.CLOSED)
        self.assertReleased(pair.server, pair.client)


# -- WebSocket -------------------------------------------------------------------


class WebSocketTests(SessionTestCase):
    def _accepted(self) -> tuple[SessionPair, str]:
        pair = opened()
        rid = pair.server.start(ws_head("/chat", ["chat", "superchat"]))
        _, client_events = pair.pump()
        [received] = client_events
        self.assertEqual((received.request_id, received.protocol), (rid, pb.WEBSOCKET))
        self.assertEqual(list(received.message.ws_request.subprotocols), ["chat", "superchat"])
        pair.client.send(rid, ws_accept("chat"))
        server_events, _ = pair.pump()
        [accepted] = server_events
        self.assertFalse(accepted.end)
        self.assertEqual(accepted.message.ws_response.subprotocol, "chat")
        return pair, rid

    def test_frames_both_ways_then_close(self) -> None:
        """ws_request -> accepted ws_response -> frames both ways -> close frames both ways -> released."""
        pair, rid = self._accepted()
        pair.server.send(rid, ws_frame(b"hello", opcode=1))
        pair.client.send(rid, ws_frame(b"\x00\x01", opcode=2, fin=False))
        pair.client.send(rid, ws_frame(b"\x02", opcode=0, fin=True))
        server_events, client_events = pair.pump()
        self.assertEqual(received_body(client_events, rid), b"hello")
        self.assertEqual([e.message.ws_frame.opcode for e in server_events], [2, 0])
        self.assertEqual(received_body(server_events, rid), b"\x00\x01\x02")
        pair.client.consumed(rid, 5)
        pair.server.consumed(rid, 3)

        pair.server.send(rid, ws_close(1001, "going away"))
        server_events, client_events = pair.pump()
        [close] = client_events
        self.assertTrue(close.end)
        self.assertEqual((close.message.ws_frame.close_code, close.message.ws_frame.close_reason), (1001, "going away"))
        # The client may still send until it closes too.
        pair.client.send(rid, ws_frame(b"last words", opcode=1))
        pair.client.send(rid, ws_close(1001, "going away"))
        server_events, client_events = pair.pump()
        self.assertEqual(client_events, [RequestClosed(rid)])
        self.assertEqual([type(e) for e in server_events], [MessageReceived, MessageReceived, RequestClosed])
        self.assertEqual(self.errors(pair.to_server + pair.to_client), [])
        self.assertReleased(pair.server, pair.client)

    def test_responder_closes_first(self) -> None:
        """When the backend closes first the initiator does not abort; its own close releases both sides."""
        pair, rid = self._accepted()
        pair.client.send(rid, ws_close(1000, "done"))
        server_events, client_events = pair.pump()
        self.assertEqual(len(server_events), 1)
        self.assertTrue(server_events[0].end)
        self.assertEqual(pair.to_client, [])
        pair.server.send(rid, ws_close(1000, "done"))
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [RequestClosed(rid)])
        self.assertEqual(of_type(client_events, RequestClosed), [RequestClosed(rid)])
        self.assertReleased(pair.server, pair.client)

    def test_refused(self) -> None:
        """A refused ws_response releases both sides without any ErrorMessage."""
        pair = opened()
        rid = pair.server.start(ws_head())
        pair.pump()
        pair.client.send(rid, ws_refuse(403, b"nope"))
        server_events, client_events = pair.pump()
        self.assertEqual(client_events, [RequestClosed(rid)])
        got, closed = server_events
        self.assertTrue(got.end)
        self.assertEqual((got.message.ws_response.status_code, got.message.ws_response.body), (403, b"nope"))
        self.assertEqual(closed, RequestClosed(rid))
        self.assertEqual(self.errors(pair.to_server + pair.to_client), [])
        self.assertReleased(pair.server, pair.client)

    def test_frame_before_response_aborts(self) -> None:
        """A frame from the responder before its ws_response aborts the request on both sides."""
        pair = opened()
        rid = pair.server.start(ws_head())
        pair.pump()
        pair.client.send(rid, ws_frame(b"too soon"))
        server_events, client_events = pair.pump()
        self.assertEqual([type(e) for e in server_events], [ProtocolViolation, RequestAborted])
        self.assertEqual([(e.code, e.by_peer) for e in of_type(client_events, RequestAborted)], [(PROTOCOL_ERROR, True)])
        self.assertReleased(pair.server, pair.client)

    def test_second_ws_response_aborts(self) -> None:
        """A second ws_response aborts the request."""
        pair, rid = self._accepted()
        events = pair.deliver(pair.server, [on_wire(ws_accept(), pair.client, rid, pb.WEBSOCKET)])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_frame_after_peer_close_aborts(self) -> None:
        """A frame after the peer's close frame aborts the request."""
        pair, rid = self._accepted()
        pair.client.send(rid, ws_close())
        pair.pump()
        late = on_wire(ws_frame(b"zombie"), pair.client, rid, pb.WEBSOCKET)
        events = pair.deliver(pair.server, [late])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_large_frames_flow_controlled(self) -> None:
        """WebSocket frame pieces count against the window like bodies and resume on credit."""
        pair, rid = self._accepted()
        piece = b"z" * (64 * KIB)
        results = [pair.client.send(rid, ws_frame(piece, opcode=2 if i == 0 else 0, fin=i == 5)) for i in range(6)]
        self.assertEqual(results, [True] * 4 + [False] * 2)
        server_events, _ = pair.pump()
        self.assertEqual(len(received_body(server_events, rid)), DEFAULT_WINDOW)
        pair.server.consumed(rid, DEFAULT_WINDOW)
        _, client_events = pair.pump()
        self.assertEqual(client_events, [Writable(rid)])
        pair.server.send(rid, ws_close())
        pair.client.send(rid, ws_close())
        pair.pump()
        self.assertReleased(pair.server, pair.client)


# -- gRPC ------------------------------------------------------------------------


class GrpcTests(SessionTestCase):
    def test_unary(self) -> None:
        """A unary call: head with message and half-close, response head+message, then status."""
        pair = opened()
        rid = pair.server.start(grpc_head(body=b"\x0a\x03bob", end=True, timeout=5.0))
        _, client_events = pair.pump()
        [received] = client_events
        self.assertEqual(received.protocol, pb.GRPC)
        self.assertEqual(received.message.grpc_request.timeout, 5.0)
        self.assertEqual(pair.to_client[0].protocol_type, pb.GRPC)
        pair.client.consumed(received.request_id, 5)
        pair.client.send(rid, grpc_response_head(b"\x0a\x05hello"))
        pair.client.send(rid, grpc_response_end(0))
        server_events, client_events = pair.pump()
        self.assertEqual(client_events, [RequestClosed(rid)])
        self.assertEqual([type(e) for e in server_events], [MessageReceived, MessageReceived, RequestClosed])
        self.assertEqual(server_events[1].message.grpc_response.trailing_metadata[0].name, "x-trailer")
        self.assertReleased(pair.server, pair.client)

    def test_bidi_finishes_while_caller_streams(self) -> None:
        """A final grpc_response while the caller still streams releases both sides (caller sends ErrorMessage)."""
        pair = opened()
        rid = pair.server.start(grpc_head("chat.Chat", "Talk", body=b"m1"))
        pair.pump()
        pair.client.send(rid, grpc_response_head())
        pair.client.send(rid, grpc_response_message(b"r1"))
        pair.server.send(rid, grpc_request_message(b"m2"))
        server_events, client_events = pair.pump()
        self.assertEqual(received_body(server_events, rid), b"r1")
        self.assertEqual(received_body(client_events, rid), b"m2")
        pair.client.send(rid, grpc_response_message(b"r2"))
        pair.client.send(rid, grpc_response_end(0, "ok"))
        server_events, client_events = pair.pump()
        self.assertEqual([type(e) for e in server_events], [MessageReceived, MessageReceived, RequestClosed])
        self.assertEqual([m.error_message.code for m in self.errors(pair.to_client)], [CANCELLED])
        self.assertEqual([(e.request_id, e.by_peer) for e in of_type(client_events, RequestAborted)], [(rid, True)])
        self.assertReleased(pair.server, pair.client)

    def test_grpc_body_is_chunked_and_held_by_the_window(self) -> None:
        """A gRPC body (wire v3) is cut into max_chunk pieces and stops at the window until credit returns."""
        pair = opened()
        rid = pair.server.start(grpc_head("big.Blob", "Put"))
        pair.pump()
        big = pattern(MIB)
        self.assertFalse(pair.server.send_body(rid, big))
        _, client_events = pair.pump()
        self.assertEqual(of_type(client_events, ProtocolViolation), [])
        got = received_body(client_events, rid)
        self.assertEqual(got, big[:DEFAULT_WINDOW])
        self.assertTrue(all(len(m.grpc_request.body) <= MAX_CHUNK for m in pair.to_client))
        while len(got) < MIB:
            pair.client.consumed(rid, MIB)
            _, client_events = pair.pump()
            got += received_body(client_events, rid)
        self.assertEqual(got, big)
        pair.server.send(rid, grpc_request_message(None, end=True))
        pair.client.send(rid, grpc_response_head())
        pair.client.send(rid, grpc_response_end(0))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_forward_call(self) -> None:
        """A gRPC call started by the client is answered by the server the same way."""
        pair = opened()
        rid = pair.client.start(grpc_head(body=b"q", end=True))
        server_events, _ = pair.pump()
        self.assertEqual([type(e) for e in server_events], [RequestReceived])
        pair.server.send(rid, grpc_response_head(b"a"))
        pair.server.send(rid, grpc_response_end(5, "not found"))
        server_events, client_events = pair.pump()
        self.assertEqual(server_events, [RequestClosed(rid)])
        self.assertEqual(client_events[1].message.grpc_response.status_code, 5)
        self.assertEqual(client_events[-1], RequestClosed(rid))
        self.assertReleased(pair.server, pair.client)


# -- growing windows --------------------------------------------------------------


class WindowGrowthTests(SessionTestCase):
    """Receive windows grow while their consumer keeps up, within max_window and the stream's budget."""

    def downloads(self, pair: SessionPair, size: int, n: int = 1) -> list[str]:
        """``n`` GETs whose ``size``-byte response bodies are queued at the client at once; returns their ids."""
        rids = [pair.server.start(http_head("GET", "/big", end=True)) for _ in range(n)]
        pair.pump()
        for rid in rids:
            pair.client.send(rid, http_response_head(200))
            pair.client.send_body(rid, b"d" * size, end=True)
        return rids

    def run_fast(self, pair: SessionPair, rids: Sequence[str], rounds: int = 200) -> dict[str, list[int]]:
        """Pump, and let the server's consumer take everything each time, until every body ended.

        Returns the growth each request's receive window announced, in order.
        """
        grows: dict[str, list[int]] = {rid: [] for rid in rids}
        received = dict.fromkeys(rids, 0)
        open_ = set(rids)
        for _ in range(rounds):
            server_events, _ = pair.pump()
            self.assertEqual(of_type(server_events, ProtocolViolation), [])
            for m in pair.to_client:
                if m.WhichOneof("payload") == "window_update" and m.window_update.grow:
                    grows[m.request_id].append(m.window_update.grow)
            for event in of_type(server_events, MessageReceived):
                received[event.request_id] += len(body_of(event.message))
                if event.end:
                    open_.discard(event.request_id)
            for rid in rids:
                pair.server.consumed(rid, received[rid])
                received[rid] = 0
            pair.server.check_invariants()
            if not open_:
                pair.pump()
                return grows
        self.fail("transfers did not finish")

    def test_fast_consumer_grows_to_max_window(self) -> None:
        """A consumer that takes everything doubles its window each limited round up to max_window, no further."""
        pair = opened(max_window=2 * MIB, window_budget=64 * MIB)
        [rid] = self.downloads(pair, 12 * MIB)
        ex, sender = pair.server.exchange(rid), pair.client.exchange(rid)
        assert ex is not None and sender is not None
        grows = self.run_fast(pair, [rid])
        self.assertEqual(grows[rid], [DEFAULT_WINDOW, 2 * DEFAULT_WINDOW, 4 * DEFAULT_WINDOW])
        self.assertEqual(ex.recv_window.size, 2 * MIB)
        self.assertEqual(sender.send_window.size, 2 * MIB)  # the sender grew along
        self.assertEqual(pair.server.grown, 0)  # given back when the request ended
        self.assertReleased(pair.server, pair.client)

    def test_sender_grows_along_and_marks_the_unit_after_a_stall(self) -> None:
        """The first unit sent after a stall carries window_limited; the sender's window grows with the receiver's."""
        pair = opened(max_window=MIB, window_budget=MIB)
        [rid] = self.downloads(pair, 4 * MIB)
        pair.pump()
        self.assertEqual([m.window_limited for m in pair.to_server], [False] * 5)  # head and the first window
        pair.server.consumed(rid, DEFAULT_WINDOW)
        pair.pump()
        # Credit lets one window out (first unit marked): the consumer had taken all, so the window doubles;
        # the growth lets another window out (marked again: the sender had stalled again), which the
        # consumer has not taken yet, so that mark grows nothing.
        marked = [i for i, m in enumerate(pair.to_server) if m.window_limited]
        self.assertEqual(marked, [0, 4])
        self.assertEqual([(m.window_update.increment, m.window_update.grow) for m in pair.to_client],
                         [(DEFAULT_WINDOW, 0), (0, DEFAULT_WINDOW)])
        client_ex, server_ex = pair.client.exchange(rid), pair.server.exchange(rid)
        assert client_ex is not None and server_ex is not None
        self.assertEqual(client_ex.send_window.size, server_ex.recv_window.size)
        self.assertEqual(client_ex.send_window.size, 2 * DEFAULT_WINDOW)
        self.assertEqual(body_bytes(pair.to_server), 2 * DEFAULT_WINDOW)  # the grown window, filled
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_stalled_consumer_window_stays(self) -> None:
        """A consumer that takes nothing returns no credit: the sender never sends again and nothing grows."""
        pair = opened(max_window=16 * MIB, window_budget=64 * MIB)
        [rid] = self.downloads(pair, 4 * MIB)
        for _ in range(5):
            pair.pump()
        ex = pair.server.exchange(rid)
        assert ex is not None
        self.assertEqual((ex.recv_window.size, ex.recv_window.unacked), (DEFAULT_WINDOW, DEFAULT_WINDOW))
        self.assertEqual(pair.server.grown, 0)
        self.assertEqual(pair.to_client, [])
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_slow_consumer_does_not_grow(self) -> None:
        """A consumer still holding bytes when the window-limited unit arrives never grows its window."""
        pair = opened(max_window=16 * MIB, window_budget=64 * MIB)
        [rid] = self.downloads(pair, 4 * MIB)
        ex = pair.server.exchange(rid)
        assert ex is not None
        held = 0
        marked = 0
        ended = False
        for _ in range(100):
            server_events, _ = pair.pump()
            marked += sum(m.window_limited for m in pair.to_server)
            self.assertEqual([m.window_update.grow for m in pair.to_client], [0] * len(pair.to_client))
            held += len(received_body(server_events, rid))
            ended = ended or any(e.end for e in of_type(server_events, MessageReceived))
            if ended and not held:
                break
            take = min(held, DEFAULT_WINDOW // 2)  # half a window per round: always some left over
            pair.server.consumed(rid, take)
            held -= take
        self.assertTrue(ended)
        self.assertGreater(marked, 1)  # the sender was window-limited over and over...
        self.assertEqual(ex.recv_window.size, DEFAULT_WINDOW)  # ...but the consumer was the bottleneck
        self.assertEqual(pair.server.grown, 0)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_budget_bounds_concurrent_growth_and_returns_on_release(self) -> None:
        """Many fast transfers grow within the stream's budget together; ended ones return it for later growth."""
        budget = 3 * MIB
        pair = opened(max_window=2 * MIB, window_budget=budget)
        rids = self.downloads(pair, 6 * MIB, 6)
        exchanges = [pair.server.exchange(rid) for rid in rids]
        peak = 0
        full_while_all_live = False

        def watch(_: pb.TunnelMessage) -> bool:
            nonlocal peak, full_while_all_live
            peak = max(peak, pair.server.grown)
            live = [ex for ex in exchanges if ex is not None and ex.request_id in pair.server]
            self.assertLessEqual(sum(ex.recv_window.grown for ex in live), budget)
            full_while_all_live |= len(live) == len(rids) and pair.server.grown == budget
            return False

        grows: dict[str, list[int]] = {rid: [] for rid in rids}
        received = dict.fromkeys(rids, 0)
        open_ = set(rids)
        for _ in range(200):
            server_events, _ = pair.pump(drop=watch)
            for m in pair.to_client:
                if m.window_update.grow:
                    grows[m.request_id].append(m.window_update.grow)
            for event in of_type(server_events, MessageReceived):
                received[event.request_id] += len(body_of(event.message))
                if event.end:
                    open_.discard(event.request_id)
            for rid in rids:
                pair.server.consumed(rid, received[rid])
                received[rid] = 0
            if not open_:
                break
        pair.pump()
        self.assertFalse(open_)
        self.assertEqual(peak, budget)  # the budget was reached, never passed
        self.assertTrue(full_while_all_live)  # the budget, not max_window, stopped six windows growing
        self.assertGreater(sum(sum(g) for g in grows.values()), budget)  # ended transfers gave theirs back
        self.assertTrue(all(ex is not None and ex.recv_window.size <= 2 * MIB for ex in exchanges))
        self.assertEqual(pair.server.grown, 0)  # everything given back
        self.assertReleased(pair.server, pair.client)
        # A later transfer can grow all the way again.
        [late] = self.downloads(pair, 8 * MIB)
        self.assertEqual(self.run_fast(pair, [late])[late], [DEFAULT_WINDOW, 2 * DEFAULT_WINDOW, 4 * DEFAULT_WINDOW])
        self.assertReleased(pair.server, pair.client)

    def test_no_growth_without_settings(self) -> None:
        """A session built without max_window (the default) keeps every window at its initial size."""
        pair = opened()
        [rid] = self.downloads(pair, 4 * MIB)
        self.assertEqual(self.run_fast(pair, [rid])[rid], [])
        self.assertReleased(pair.server, pair.client)

    def test_upload_window_grows_at_the_client(self) -> None:
        """Growth is per direction: a request body the client's backend takes at once grows the client's window."""
        pair = opened(max_window=MIB, window_budget=MIB)
        rid = pair.server.start(http_head("POST", "/upload", end=False))
        pair.pump()
        pair.server.send_body(rid, b"u" * (4 * MIB), end=True)
        grows = []
        for _ in range(100):
            _, client_events = pair.pump()
            grows += [m.window_update.grow for m in pair.to_server if m.window_update.grow]
            pair.client.consumed(rid, len(received_body(client_events, rid)))
            if any(e.end for e in of_type(client_events, MessageReceived)):
                break
        self.assertEqual(grows, [DEFAULT_WINDOW, 2 * DEFAULT_WINDOW])
        self.assertEqual(pair.server.grown, 0)  # the server's receive window (the response) never grew
        pair.client.send(rid, http_response_head(201, end=True))
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_grpc_stream_grows_like_http(self) -> None:
        """gRPC bodies (wire v3: the byte stream in chunks) cost their bytes and grow a fast consumer's window."""
        pair = opened(max_window=MIB, window_budget=MIB)
        rid = pair.client.start(grpc_head("big.Blob", "Get", body=b"q", end=True))
        server_events, _ = pair.pump()
        pair.server.consumed(rid, 1)
        pair.server.send(rid, grpc_response_head())
        for _ in range(64):
            pair.server.send_body(rid, b"g" * (64 * KIB))
        pair.server.send(rid, grpc_response_end(0))
        grows = []
        for _ in range(100):
            _, client_events = pair.pump()
            grows += [m.window_update.grow for m in pair.to_server if m.window_update.grow]
            units = [e.message for e in of_type(client_events, MessageReceived)]
            pair.client.consumed(rid, sum(len(m.grpc_response.body) for m in units))
            if of_type(client_events, RequestClosed):
                break
        self.assertEqual(grows, [DEFAULT_WINDOW, 2 * DEFAULT_WINDOW])
        self.assertReleased(pair.server, pair.client)

    def test_grpc_chunk_over_the_limit_is_a_violation(self) -> None:
        """A gRPC body chunk above max_chunk ends that call like an oversized HTTP chunk."""
        pair = opened()
        rid = pair.client.start(grpc_head("big.Blob", "Put", body=b"q"))
        pair.pump()
        big = pb.TunnelMessage(request_id=rid, direction=pb.CLIENT_TO_SERVER, protocol_type=pb.GRPC,
                               grpc_request=pb.GrpcRequest(body=b"x" * (64 * KIB + 1)))
        events = pair.server.receive(big)
        self.assertTrue(any(isinstance(e, ProtocolViolation) and "exceeds" in e.message for e in events))
        self.assertNotIn(rid, pair.server)

    def test_mark_on_the_last_unit_does_not_grow(self) -> None:
        """A window_limited unit that ends the direction grows nothing (no credit is sent after the end)."""
        pair = opened(max_window=MIB, window_budget=MIB)
        [rid] = self.downloads(pair, DEFAULT_WINDOW + 10)
        pair.pump()
        pair.server.consumed(rid, DEFAULT_WINDOW)
        server_events, _ = pair.pump()
        [last] = pair.to_server
        self.assertTrue(last.window_limited and last.http_response.is_last_chunk)
        self.assertEqual([m.window_update.grow for m in pair.to_client], [0])
        self.assertEqual(of_type(server_events, RequestClosed), [RequestClosed(rid)])
        self.assertEqual(pair.server.grown, 0)
        self.assertReleased(pair.server, pair.client)

    def test_over_credit_with_grow_aborts(self) -> None:
        """A WindowUpdate whose increment exceeds what was sent aborts the request even when it also grows."""
        self.assertOverCreditAborts(opened(max_window=MIB, window_budget=MIB), grow=DEFAULT_WINDOW)

    def test_grow_past_one_gib_aborts(self) -> None:
        """A peer growing a window past 1 GiB gets that request aborted; a grow within it is accepted."""
        pair = opened()
        rid = pair.server.start(http_head("POST", end=False))
        pair.pump()
        events = pair.deliver(pair.server, [window_update(pair.client, rid, 0, grow=GIB - DEFAULT_WINDOW)])
        self.assertEqual(events, [])
        ex = pair.server.exchange(rid)
        assert ex is not None
        self.assertEqual((ex.send_window.size, ex.send_window.available), (GIB, GIB))
        events = pair.deliver(pair.server, [window_update(pair.client, rid, 0, grow=1)])
        self.assertEqual([type(e) for e in events], [ProtocolViolation, RequestAborted])
        pair.pump()
        self.assertReleased(pair.server, pair.client)


class FrameCostTests(SessionTestCase):
    """A WebSocket frame costs at least MIN_FRAME_COST of the window, and tiny frames never grow it."""

    def opened_ws(self, **kwargs: object) -> tuple[SessionPair, str]:
        pair = opened(window=65536, **kwargs)
        rid = pair.server.start(ws_head())
        pair.pump()
        pair.client.send(rid, ws_accept())
        pair.pump()
        return pair, rid

    def test_tiny_frames_in_flight_bounded(self) -> None:
        """With a 64 KiB window, only 64 KiB / MIN_FRAME_COST one-byte frames go before the sender must wait."""
        pair, rid = self.opened_ws()
        sent = 0
        while pair.server.send(rid, ws_frame(b"x", opcode=1)):
            sent += 1
            self.assertLess(sent, 1000)
        self.assertEqual(sent, 65536 // MIN_FRAME_COST)
        self.assertEqual(frame_cost(1), MIN_FRAME_COST)
        self.assertEqual(frame_cost(65536), 65536 + 64)
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)

    def test_tiny_window_limited_frames_do_not_grow_the_window(self) -> None:
        """A consumer that keeps up with a flood of tiny frames never grows their window (growth is for bandwidth)."""
        pair, rid = self.opened_ws(max_window=1 << 22, window_budget=1 << 24)
        grows = []
        for _ in range(50):
            while pair.server.send(rid, ws_frame(b"x", opcode=1)):
                pass
            _, client_events = pair.pump()
            for event in of_type(client_events, MessageReceived):
                pair.client.consumed(rid, frame_cost(len(event.message.ws_frame.payload)))
            server_events, _ = pair.pump()
            grows += [m.window_update.grow for m in pair.to_server
                      if m.WhichOneof("payload") == "window_update" and m.window_update.grow]
        self.assertEqual(grows, [])
        pair.server.cancel(rid)
        pair.pump()
        self.assertReleased(pair.server, pair.client)
