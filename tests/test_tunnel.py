"""Tests for tunneld.tunnel: the reactor-side handler table over a sans-IO Session.

Two ``Tunnel``s are wired back to back over an opened ``SessionPair``
(tests/session_pair.py).  The wire is either queued (``flush()`` moves
messages until both sides are quiet) or synchronous (``send`` feeds the peer
at once, the hardest case for reentrancy).  Every test ends by checking that
both request tables and both handler tables are empty.
"""

from __future__ import annotations

# Events come back as the ``Event`` union; tests read the fields of the kind they expect.
# mypy: disable-error-code="union-attr"

from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.session_pair import (
    http_head,
    http_request_body,
    http_response_body,
    http_response_head,
    kinds,
    opened,
)
from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.tunnel import CreditGate, Tunnel
from tunneld.window import DEFAULT_WINDOW


class Boom(Exception):
    """Raised by handlers that are meant to fail."""


class Recorder:
    """An ExchangeHandler that records every call; optional hooks act inside them."""

    def __init__(self, on_message: Callable[[pb.TunnelMessage, bool], None] | None = None,
                 raise_on_message: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.on_message = on_message
        self.raise_on_message = raise_on_message

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        self.calls.append(("message", msg, end))
        if self.raise_on_message:
            raise Boom("handler failed")
        if self.on_message is not None:
            self.on_message(msg, end)

    def writable(self) -> None:
        self.calls.append(("writable",))

    def closed(self) -> None:
        self.calls.append(("closed",))

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.calls.append(("aborted", code, message, by_peer))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def messages(self) -> list[pb.TunnelMessage]:
        return [c[1] for c in self.calls if c[0] == "message"]


class Responder(Recorder):
    """A ResponderHandler; ``on_begin`` runs inside ``begin()``."""

    def __init__(self, tunnel: Tunnel, event: s.RequestReceived,
                 on_begin: Callable[[Responder], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tunnel = tunnel
        self.request_id = event.request_id
        self.head = event.message
        self.on_begin = on_begin
        self.registered_at_begin: bool | None = None
        self.registered_in_constructor = event.request_id in tunnel.handlers

    def begin(self) -> None:
        self.calls.append(("begin",))
        self.registered_at_begin = self.tunnel.handlers.get(self.request_id) is self
        if self.on_begin is not None:
            self.on_begin(self)


Make = Callable[[Tunnel, s.RequestReceived], Any]


class Owner:
    """A StreamOwner that records stream events and builds responders with ``make``."""

    def __init__(self, make: Make | None = None) -> None:
        self.events: list[s.Event] = []
        self.requests: list[s.RequestReceived] = []
        self.responders: list[Any] = []
        self.make = make

    def stream_event(self, tunnel: Tunnel, event: s.Event) -> None:
        self.events.append(event)

    def request_received(self, tunnel: Tunnel, event: s.RequestReceived) -> Any:
        self.requests.append(event)
        if self.make is None:
            return None
        handler = self.make(tunnel, event)
        if handler is not None:
            self.responders.append(handler)
        return handler


class TunnelPair:
    """A server and a client Tunnel over an opened SessionPair."""

    def __init__(self, *, window: int = DEFAULT_WINDOW, sync: bool = False,
                 client_make: Make | None = None, server_make: Make | None = None) -> None:
        self.sessions = opened(window)
        self.sync = sync
        self.server_owner = Owner(server_make)
        self.client_owner = Owner(client_make)
        self.sent_by_server: list[pb.TunnelMessage] = []
        self.sent_by_client: list[pb.TunnelMessage] = []
        self.batches_by_server: list[list[pb.TunnelMessage]] = []
        self._to_client: list[pb.TunnelMessage] = []
        self._to_server: list[pb.TunnelMessage] = []
        self.server = Tunnel(self.sessions.server, self._server_send, self.server_owner, name="server")
        self.client = Tunnel(self.sessions.client, self._client_send, self.client_owner, name="client")

    def _server_send(self, msgs: list[pb.TunnelMessage]) -> None:
        self.sent_by_server.extend(msgs)
        self.batches_by_server.append(list(msgs))
        if self.sync:
            for m in msgs:
                self.client.receive(m)
        else:
            self._to_client.extend(msgs)

    def _client_send(self, msgs: list[pb.TunnelMessage]) -> None:
        self.sent_by_client.extend(msgs)
        if self.sync:
            for m in msgs:
                self.server.receive(m)
        else:
            self._to_server.extend(msgs)

    def flush(self) -> None:
        """Deliver queued messages both ways until the wire is quiet."""
        while self._to_client or self._to_server:
            while self._to_client:
                self.client.receive(self._to_client.pop(0))
            while self._to_server:
                self.server.receive(self._to_server.pop(0))

    def assert_empty(self, test: SynchronousTestCase) -> None:
        for t in (self.server, self.client):
            test.assertEqual(len(t.session), 0, t.name)
            test.assertEqual(t.handlers, {}, t.name)
            test.assertEqual(t.trace_ids, {}, t.name)
            t.session.check_invariants()


def answer_ok(body: bytes = b"ok") -> Callable[[Responder], None]:
    """on_begin: answer the request at once with a complete 200."""

    def begin(r: Responder) -> None:
        r.tunnel.send(r.request_id, http_response_head(200, end=True, body=body))

    return begin


def responders(on_begin: Callable[[Responder], None] | None = None, **kwargs: Any) -> Make:
    return lambda tunnel, event: Responder(tunnel, event, on_begin, **kwargs)


def errors_in(messages: list[pb.TunnelMessage]) -> list[tuple[str, int, str]]:
    return [(m.request_id, m.error_message.code, m.error_message.message)
            for m in messages if m.WhichOneof("payload") == "error_message"]


class HandlerEventsTests(SynchronousTestCase):
    def test_message_received_then_closed(self) -> None:
        """The initiator's handler gets each response message with its end flag, then closed()."""
        chunks: list[Responder] = []

        def begin(r: Responder) -> None:
            chunks.append(r)
            r.tunnel.send(r.request_id, http_response_head(200, body=b"he"))

        pair = TunnelPair(client_make=responders(begin))
        handler = Recorder()
        rid = pair.server.start(http_head("GET", "/a"), handler)
        pair.flush()
        self.assertEqual(handler.names(), ["message"])
        self.assertEqual(handler.calls[0][2], False)
        self.assertEqual(handler.messages()[0].http_response.status_code, 200)
        self.assertIn(rid, pair.server.handlers)
        pair.client.send_body(rid, b"llo", end=True)
        pair.flush()
        self.assertEqual(handler.names(), ["message", "message", "closed"])
        self.assertEqual(handler.calls[1][2], True)
        self.assertEqual(handler.messages()[1].http_response.body, b"llo")
        self.assertEqual(chunks[0].names(), ["begin", "closed"])
        pair.assert_empty(self)

    def test_request_body_reaches_responder(self) -> None:
        """The responder's handler receives later request body messages, the last one with end=True."""
        pair = TunnelPair(client_make=responders())
        handler = Recorder()
        rid = pair.server.start(http_head("POST", "/up", end=False), handler)
        pair.server.send_body(rid, b"abc", end=True)
        pair.flush()
        responder = pair.client_owner.responders[0]
        self.assertEqual(responder.names(), ["begin", "message"])
        self.assertEqual(responder.messages()[0].http_request.body, b"abc")
        self.assertTrue(responder.calls[1][2])
        pair.client.send(rid, http_response_head(204, end=True))
        pair.flush()
        self.assertEqual(handler.names(), ["message", "closed"])
        self.assertEqual(responder.names(), ["begin", "message", "closed"])
        pair.assert_empty(self)

    def test_writable_after_window_credit(self) -> None:
        """A send that runs out of window returns False; writable() comes once the peer credits it."""
        window = 65536
        pair = TunnelPair(window=window, client_make=responders())
        handler = Recorder()
        rid = pair.server.start(http_head("POST", "/big", end=False), handler)
        ok = pair.server.send_body(rid, b"x" * (window + 10))
        self.assertFalse(ok)
        pair.flush()
        self.assertNotIn(("writable",), handler.calls)
        responder = pair.client_owner.responders[0]
        received = sum(len(m.http_request.body) for m in responder.messages())
        self.assertEqual(received, window)
        pair.client.consumed(rid, received)
        pair.flush()
        self.assertEqual(handler.names(), ["writable"])
        # Everything queued went out once credit returned.
        self.assertEqual(sum(len(m.http_request.body) for m in responder.messages()), window + 10)
        pair.server.send_body(rid, b"", end=True)
        pair.client.send(rid, http_response_head(200, end=True))
        pair.flush()
        self.assertEqual(handler.names(), ["writable", "message", "closed"])
        pair.assert_empty(self)

    def test_peer_error_aborts_handler(self) -> None:
        """An ErrorMessage from the peer reaches the handler as aborted(code, message, by_peer=True)."""
        pair = TunnelPair(client_make=responders(lambda r: r.tunnel.cancel(r.request_id, 503, "busy")))
        handler = Recorder()
        pair.server.start(http_head(), handler)
        pair.flush()
        self.assertEqual(handler.calls, [("aborted", 503, "busy", True)])
        pair.assert_empty(self)


class CancelTests(SynchronousTestCase):
    def test_cancel_removes_handler_and_sends_error(self) -> None:
        """cancel() drops the handler at once, sends an ErrorMessage, and the handler hears nothing more."""
        pair = TunnelPair(client_make=responders())
        handler = Recorder()
        rid = pair.server.start(http_head("POST", "/x", end=False), handler)
        pair.flush()
        pair.server.cancel(rid, 499, "client went away")
        self.assertNotIn(rid, pair.server.handlers)
        self.assertNotIn(rid, pair.server.session)
        self.assertEqual(errors_in(pair.sent_by_server), [(rid, 499, "client went away")])
        # A late response for the cancelled request is dropped quietly.
        pair.client.send(rid, http_response_head(200, end=True))
        pair.flush()
        self.assertEqual(handler.calls, [])
        responder = pair.client_owner.responders[0]
        self.assertEqual(responder.names(), ["begin", "aborted"])
        self.assertEqual(responder.calls[-1], ("aborted", 499, "client went away", True))
        pair.assert_empty(self)

    def test_cancel_unknown_request_is_harmless(self) -> None:
        """cancel() of an unknown request_id sends nothing and raises nothing."""
        pair = TunnelPair()
        pair.server.cancel("no-such-request")
        self.assertEqual(pair.sent_by_server, [])
        pair.assert_empty(self)

    def test_send_after_release_returns_false(self) -> None:
        """send()/send_body() on a released request return False and send nothing."""
        pair = TunnelPair()
        self.assertFalse(pair.server.send("gone", http_response_head(200)))
        self.assertFalse(pair.server.send_body("gone", b"x", end=True))
        self.assertEqual(pair.sent_by_server, [])
        pair.assert_empty(self)


class LostTests(SynchronousTestCase):
    def test_lost_aborts_every_handler_at_once(self) -> None:
        """lost() calls aborted(502, ..., by_peer=False) on every handler within the one call and empties the session."""
        pair = TunnelPair(client_make=responders())
        handlers = [Recorder() for _ in range(3)]
        for h in handlers:
            pair.server.start(http_head("POST", "/x", end=False), h)
        pair.flush()
        sent_before = len(pair.sent_by_server)
        pair.server.lost("connection reset")
        for h in handlers:
            self.assertEqual(h.calls, [("aborted", 502, "tunnel stream lost: connection reset", False)])
        self.assertEqual(len(pair.server.session), 0)
        self.assertEqual(pair.server.handlers, {})
        self.assertFalse(pair.server.is_open)
        self.assertEqual(pair.server.lost_reason, "connection reset")
        # Nothing is written to a lost stream.
        self.assertEqual(len(pair.sent_by_server), sent_before)
        pair.client.lost("connection reset")
        for r in pair.client_owner.responders:
            self.assertEqual(r.names(), ["begin", "aborted"])
            self.assertEqual(r.calls[-1][1], 502)
            self.assertFalse(r.calls[-1][3])
        pair.assert_empty(self)

    def test_lost_twice_is_a_noop(self) -> None:
        """A second lost() keeps the first reason and calls no handler again."""
        pair = TunnelPair(client_make=responders())
        handler = Recorder()
        pair.server.start(http_head(), handler)
        pair.server.lost("first")
        pair.server.lost("second")
        self.assertEqual(pair.server.lost_reason, "first")
        self.assertEqual(len(handler.calls), 1)

    def test_start_after_lost_raises(self) -> None:
        """start() on a lost tunnel raises SessionError and registers nothing."""
        pair = TunnelPair()
        pair.server.lost("gone")
        self.assertRaises(s.SessionError, pair.server.start, http_head(), Recorder())
        self.assertEqual(pair.server.handlers, {})

    def test_lost_from_inside_a_handler(self) -> None:
        """lost() called by a handler mid-dispatch still aborts the other handlers and sends nothing more."""
        def begin(r: Responder) -> None:
            if r.head.http_request.path == "/fast":
                answer_ok()(r)

        pair = TunnelPair(client_make=responders(begin))
        other = Recorder()
        pair.server.start(http_head("POST", "/slow", end=False), other)
        first = Recorder(on_message=lambda msg, end: pair.server.lost("handler gave up"))
        pair.server.start(http_head("GET", "/fast"), first)
        sent_before = len(pair.sent_by_server)
        pair.flush()
        # Its own response was complete, so it closed normally before the loss.
        self.assertEqual(first.names(), ["message", "closed"])
        self.assertEqual(other.calls, [("aborted", 502, "tunnel stream lost: handler gave up", False)])
        self.assertEqual(len(pair.sent_by_server), sent_before)
        self.assertEqual(len(pair.server.session), 0)
        self.assertEqual(pair.server.handlers, {})


class FailingHandlerTests(SynchronousTestCase):
    def test_raising_handler_is_cancelled_others_continue(self) -> None:
        """A handler that raises is cancelled with 502 towards the peer; the other requests complete."""
        pair = TunnelPair(client_make=responders())
        bad = Recorder(raise_on_message=True)
        good = Recorder()
        bad_rid = pair.server.start(http_head("GET", "/bad"), bad)
        good_rid = pair.server.start(http_head("GET", "/good"), good)
        pair.flush()
        bad_resp, good_resp = pair.client_owner.responders
        pair.client.send(bad_rid, http_response_head(200, body=b"partial"))
        pair.client.send(good_rid, http_response_head(200, body=b"fine"))
        pair.flush()
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(bad.names(), ["message"])
        self.assertNotIn(bad_rid, pair.server.handlers)
        self.assertIn((bad_rid, 502, "internal error"), errors_in(pair.sent_by_server))
        self.assertEqual(bad_resp.calls[-1], ("aborted", 502, "internal error", True))
        # The good one keeps working.
        pair.client.send_body(good_rid, b"!", end=True)
        pair.flush()
        self.assertEqual(good.names(), ["message", "message", "closed"])
        self.assertEqual(good_resp.names(), ["begin", "closed"])
        pair.assert_empty(self)

    def test_raising_begin_cancels_with_502(self) -> None:
        """A responder whose begin() raises is cancelled with 502; the initiator gets aborted(502, by_peer=True)."""

        def begin(r: Responder) -> None:
            raise Boom("backend exploded")

        pair = TunnelPair(client_make=responders(begin))
        handler = Recorder()
        rid = pair.server.start(http_head(), handler)
        pair.flush()
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(errors_in(pair.sent_by_client), [(rid, 502, "internal error")])
        self.assertEqual(handler.calls, [("aborted", 502, "internal error", True)])
        pair.assert_empty(self)

    def test_raising_owner_refuses_with_502(self) -> None:
        """An owner whose request_received raises refuses the request with 502."""

        def make(tunnel: Tunnel, event: s.RequestReceived) -> Any:
            raise Boom("no factory")

        pair = TunnelPair(client_make=make)
        handler = Recorder()
        rid = pair.server.start(http_head(), handler)
        pair.flush()
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(errors_in(pair.sent_by_client), [(rid, 502, "request refused")])
        self.assertEqual(handler.calls, [("aborted", 502, "request refused", True)])
        pair.assert_empty(self)

    def test_owner_returning_none_refuses_with_502(self) -> None:
        """An owner that returns no handler refuses the request with 502."""
        pair = TunnelPair()
        handler = Recorder()
        pair.server.start(http_head(), handler)
        pair.flush()
        self.assertEqual(len(pair.client_owner.requests), 1)
        self.assertEqual(handler.calls, [("aborted", 502, "request refused", True)])
        pair.assert_empty(self)


class ResponderOrderTests(SynchronousTestCase):
    def test_begin_runs_after_registration(self) -> None:
        """The responder is not in the table in its constructor but is when begin() runs."""
        pair = TunnelPair(client_make=responders(answer_ok()))
        pair.server.start(http_head(), Recorder())
        pair.flush()
        responder = pair.client_owner.responders[0]
        self.assertFalse(responder.registered_in_constructor)
        self.assertTrue(responder.registered_at_begin)
        pair.assert_empty(self)

    def test_answer_inside_begin_reaches_closed(self) -> None:
        """A complete answer sent synchronously inside begin() still ends with the responder's closed()."""
        pair = TunnelPair(client_make=responders(answer_ok(b"hello")))
        handler = Recorder()
        pair.server.start(http_head(), handler)
        pair.flush()
        responder = pair.client_owner.responders[0]
        self.assertEqual(responder.names(), ["begin", "closed"])
        self.assertEqual(handler.names(), ["message", "closed"])
        self.assertEqual(handler.messages()[0].http_response.body, b"hello")
        pair.assert_empty(self)

    def test_answer_inside_begin_on_sync_wire(self) -> None:
        """On a synchronous wire, begin() answering at once still gives closed() on both sides."""
        pair = TunnelPair(sync=True, client_make=responders(answer_ok(b"sync")))
        handler = Recorder()
        pair.server.start(http_head(), handler)
        responder = pair.client_owner.responders[0]
        self.assertEqual(responder.names(), ["begin", "closed"])
        self.assertEqual(handler.names(), ["message", "closed"])
        pair.assert_empty(self)


class ReentrancyTests(SynchronousTestCase):
    def _echo_pair(self, sync: bool) -> tuple[TunnelPair, Recorder, str]:
        """The client echoes every request body chunk back from inside message_received."""

        def make(tunnel: Tunnel, event: s.RequestReceived) -> Responder:
            def echo(msg: pb.TunnelMessage, end: bool) -> None:
                tunnel.send_body(event.request_id, b"echo:" + msg.http_request.body, end=end)
                tunnel.consumed(event.request_id, len(msg.http_request.body))

            def begin(r: Responder) -> None:
                r.tunnel.send(r.request_id, http_response_head(200, body=b"head"))

            return Responder(tunnel, event, begin, on_message=echo)

        pair = TunnelPair(sync=sync, client_make=make)
        replies: list[bytes] = []

        def on_response(msg: pb.TunnelMessage, end: bool) -> None:
            replies.append(msg.http_response.body)
            # Send more request body from inside message_received.
            n = len(replies)
            if n <= 3:
                pair.server.send_body(msg.request_id, b"%d" % n, end=n == 3)

        handler = Recorder(on_message=on_response)
        rid = pair.server.start(http_head("POST", "/echo", end=False), handler)
        pair.flush()
        return pair, handler, rid

    def _check(self, pair: TunnelPair, handler: Recorder) -> None:
        bodies = [m.http_response.body for m in handler.messages()]
        self.assertEqual(bodies, [b"head", b"echo:1", b"echo:2", b"echo:3"])
        self.assertEqual(handler.names(), ["message"] * 4 + ["closed"])
        self.assertEqual([m.http_request.body for m in pair.sent_by_server if m.HasField("http_request")],
                         [b"", b"1", b"2", b"3"])
        pair.assert_empty(self)

    def test_send_inside_message_received_keeps_order(self) -> None:
        """A handler sending from inside message_received keeps message order on a queued wire."""
        pair, handler, _ = self._echo_pair(sync=False)
        self._check(pair, handler)

    def test_send_inside_message_received_keeps_order_sync(self) -> None:
        """A handler sending from inside message_received keeps message order when the peer answers synchronously."""
        pair, handler, _ = self._echo_pair(sync=True)
        self._check(pair, handler)

    def test_batch_of_messages_dispatched_in_order(self) -> None:
        """Several messages in one delivery reach the handler in wire order, each once."""
        pair = TunnelPair(client_make=responders())
        handler = Recorder()
        rid = pair.server.start(http_head("GET", "/stream"), handler)
        pair.flush()
        pair.client.send(rid, http_response_head(200, body=b"0"))
        for i in range(1, 6):
            pair.client.send_body(rid, b"%d" % i, end=i == 5)
        pair.flush()
        self.assertEqual([m.http_response.body for m in handler.messages()], [b"0", b"1", b"2", b"3", b"4", b"5"])
        self.assertEqual(handler.names()[-1], "closed")
        pair.assert_empty(self)


class ControlTests(SynchronousTestCase):
    def test_stream_events_go_to_owner(self) -> None:
        """Heartbeats and their acks reach the owners as stream events, and control() flushes."""
        pair = TunnelPair()
        pair.server.control(lambda: pair.server.session.heartbeat(1234))
        self.assertEqual(kinds(pair.sent_by_server), ["heartbeat"])
        pair.flush()
        self.assertEqual(pair.client_owner.events, [s.HeartbeatReceived(1234, False)])
        self.assertEqual(pair.server_owner.events, [s.HeartbeatReceived(1234, True)])
        self.assertEqual(pair.client.messages_in, 1)
        self.assertEqual(pair.server.messages_out, 1)
        pair.assert_empty(self)

    def test_trace_ids_tracked_and_released(self) -> None:
        """A request's trace_id is kept while it is in flight on both sides and dropped when it ends."""
        pair = TunnelPair(client_make=responders())
        head = http_head()
        head.trace_id = "trace-1"
        rid = pair.server.start(head, Recorder())
        pair.flush()
        self.assertEqual(pair.server.trace_ids, {rid: "trace-1"})
        self.assertEqual(pair.client.trace_ids, {rid: "trace-1"})
        pair.client.send(rid, http_response_head(200, end=True))
        pair.flush()
        pair.assert_empty(self)

    def test_request_body_then_response_unrelated_request_unaffected(self) -> None:
        """An error on one request leaves a concurrent request's handler untouched."""
        pair = TunnelPair(client_make=responders())
        a, b = Recorder(), Recorder()
        rid_a = pair.server.start(http_head("POST", "/a", end=False), a)
        rid_b = pair.server.start(http_head("POST", "/b", end=False), b)
        pair.flush()
        pair.client.cancel(rid_a, 413, "too large")
        pair.server.send(rid_b, http_request_body(b"x", end=True))
        pair.flush()
        self.assertEqual(a.calls, [("aborted", 413, "too large", True)])
        self.assertEqual(b.calls, [])
        pair.client.send(rid_b, http_response_head(200, end=True))
        pair.flush()
        self.assertEqual(b.names(), ["message", "closed"])
        pair.assert_empty(self)

    def test_response_body_helper_roundtrip(self) -> None:
        """A response sent as head then body message arrives as two messages and closes."""
        pair = TunnelPair(client_make=responders())
        handler = Recorder()
        rid = pair.server.start(http_head(), handler)
        pair.flush()
        pair.client.send(rid, http_response_head(200))
        pair.client.send(rid, http_response_body(b"tail", end=True))
        pair.flush()
        self.assertEqual(handler.names(), ["message", "message", "closed"])
        pair.assert_empty(self)


class CreditGateTests(SynchronousTestCase):
    def test_credit_flows_while_the_socket_keeps_up(self) -> None:
        """Bytes taken while not paused are credited at once."""
        credited: list[int] = []
        gate = CreditGate(credited.append)
        gate.took(10)
        gate.took(0)
        self.assertEqual(credited, [10])

    def test_credit_held_while_paused_and_returned_on_resume(self) -> None:
        """While the socket pushes back, credit is owed; resuming returns it in one piece."""
        credited: list[int] = []
        gate = CreditGate(credited.append)
        gate.pauseProducing()
        gate.took(5)
        gate.took(7)
        self.assertEqual(credited, [])
        gate.resumeProducing()
        self.assertEqual(credited, [12])
        gate.resumeProducing()
        self.assertEqual(credited, [12])
