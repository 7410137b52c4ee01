"""Reactor side of one tunnel stream: the request table's handlers.

A ``Tunnel`` wraps a sans-IO ``Session`` and owns the handler of every request
in flight on that stream (``request_id`` -> ``ExchangeHandler``).  Adapters
(HTTP entry, backends, WebSocket, gRPC) talk to the tunnel only through its
action methods and receive what happens through their handler; the tunnel
hands outgoing messages to ``send`` (the grpc bridge) in batches.  It knows
nothing of grpc or threads, and everything here runs on the reactor thread.

When the stream is lost, ``lost()`` fails every request at once (as AMP's
``failAllOutgoing`` does), so no request waits for a timeout.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from tunneld import session as s
from tunneld import tunnel_pb2 as pb


class ExchangeHandler(Protocol):
    """What a tunnel tells the owner of one request."""

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        """The peer sent a message of this exchange (head, body, frame, trailers)."""

    def writable(self) -> None:
        """Queued messages went out; a paused producer may resume."""

    def closed(self) -> None:
        """Both directions ended normally; state is released."""

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        """The exchange ended abnormally (peer error, violation, stream loss)."""


class ResponderHandler(ExchangeHandler, Protocol):
    """Handler of a request the peer started.

    It must not act in its constructor: the tunnel registers it first and then
    calls ``begin()``, so every event it causes finds it in the table.
    """

    def begin(self) -> None:
        """Start serving the request (dial the backend, answer, ...)."""


class StreamOwner(Protocol):
    """What a tunnel tells the hub that owns the stream."""

    def stream_event(self, tunnel: Tunnel, event: s.Event) -> None:
        """A stream-level event: handshake, heartbeat, config, violation."""

    def request_received(self, tunnel: Tunnel, event: s.RequestReceived) -> ResponderHandler | None:
        """The peer started a request; return its handler (None: refuse with 502)."""


@implementer(IPushProducer)
class CreditGate:
    """Returns a request's window credit only while its consumer keeps up.

    Adapters report every body byte they hand to a socket with ``took``;
    registered as that socket's push producer, the gate holds the credit
    while the socket pushes back and returns it on ``resumeProducing``.
    """

    def __init__(self, credit: Callable[[int], None]) -> None:
        self.credit = credit
        self.paused = False
        self.owed = 0

    def took(self, n: int) -> None:
        if self.paused:
            self.owed += n
        elif n:
            self.credit(n)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.owed:
            n, self.owed = self.owed, 0
            self.credit(n)

    def stopProducing(self) -> None:
        self.paused = True


class Tunnel:
    """One tunnel stream seen from the reactor."""

    log = Logger()

    def __init__(self, session: s.Session, send: Callable[[list[pb.TunnelMessage]], None], owner: StreamOwner,
                 *, name: str = "") -> None:
        self.session = session
        self._send = send
        self.owner = owner
        self.name = name
        self.handlers: dict[str, ExchangeHandler] = {}
        self.trace_ids: dict[str, str] = {}
        self._pumping = False
        self._pending: list[s.Event] = []   # events returned by receive(), not yet dispatched
        self.lost_reason: str | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.stalls = 0   # sends that ran out of window (the caller pauses its producer): flow-control stalls

    # -- actions ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.session.state is s.State.OPEN and self.lost_reason is None

    def start(self, msg: pb.TunnelMessage, handler: ExchangeHandler) -> str:
        """Send a request head and register its handler; returns request_id."""
        rid = self.session.start(msg)
        self.handlers[rid] = handler
        if msg.trace_id:
            self.trace_ids[rid] = msg.trace_id
        self._pump()
        return rid

    def send(self, request_id: str, msg: pb.TunnelMessage) -> bool:
        if request_id not in self.session:
            return False
        ok = self.session.send(request_id, msg)
        self.stalls += not ok
        self._pump()
        return ok

    def send_body(self, request_id: str, data: bytes, end: bool = False) -> bool:
        if request_id not in self.session:
            return False
        ok = self.session.send_body(request_id, data, end)
        self.stalls += not ok
        self._pump()
        return ok

    def consumed(self, request_id: str, n: int) -> None:
        self.session.consumed(request_id, n)
        self._pump()

    def cancel(self, request_id: str, code: int = s.CANCELLED, message: str = "cancelled") -> None:
        """End a request from this side; its handler gets no further calls."""
        self.handlers.pop(request_id, None)
        self.trace_ids.pop(request_id, None)
        self.session.cancel(request_id, code, message)
        self._pump()

    def control(self, action: Callable[[], None]) -> None:
        """Run a session control action (heartbeat, config) and flush."""
        action()
        self._pump()

    # -- input ------------------------------------------------------------------

    def receive(self, msg: pb.TunnelMessage) -> None:
        """A message from the peer (called by the bridge on the reactor thread)."""
        self.messages_in += 1
        self._pending.extend(self.session.receive(msg))
        self._pump()

    def lost(self, reason: str) -> None:
        """The stream is gone: fail every request in flight at once."""
        if self.lost_reason is not None:
            return
        # Messages queued by the handler that decided to close (a refusal)
        # still go out; on a dead stream the handle drops them.
        out = self.session.take_outgoing()
        if out:
            self.messages_out += len(out)
            self._send(out)
        self.lost_reason = reason
        self.session.fail_all(f"tunnel stream lost: {reason}")
        self._pump(flush=False)

    # -- the pump -------------------------------------------------------------

    def _pump(self, flush: bool = True) -> None:
        # Handlers call back into the tunnel; the outermost pump drains all.
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                out = self.session.take_outgoing()
                if out and flush and self.lost_reason is None:
                    self.messages_out += len(out)
                    self._send(out)
                events = self._pending + self.session.take_events()
                self._pending = []
                if not events and not out:
                    break
                for event in events:
                    self._dispatch(event)
        finally:
            self._pumping = False

    def _dispatch(self, event: s.Event) -> None:
        if isinstance(event, s.MessageReceived):
            h = self.handlers.get(event.request_id)
            if h is not None:
                self._call(event.request_id, h.message_received, event.message, event.end)
        elif isinstance(event, s.Writable):
            h = self.handlers.get(event.request_id)
            if h is not None:
                self._call(event.request_id, h.writable)
        elif isinstance(event, s.RequestClosed):
            h = self.handlers.pop(event.request_id, None)
            self.trace_ids.pop(event.request_id, None)
            if h is not None:
                self._call(event.request_id, h.closed)
        elif isinstance(event, s.RequestAborted):
            h = self.handlers.pop(event.request_id, None)
            self.trace_ids.pop(event.request_id, None)
            if h is not None:
                self._call(event.request_id, h.aborted, event.code, event.message, event.by_peer)
        elif isinstance(event, s.RequestReceived):
            self._request_received(event)
        else:
            self.owner.stream_event(self, event)

    def _request_received(self, event: s.RequestReceived) -> None:
        rid = event.request_id
        if event.message.trace_id:
            self.trace_ids[rid] = event.message.trace_id
        try:
            handler = self.owner.request_received(self, event)
        except Exception:
            self.log.failure("request handler failed to start", request_id=rid, trace_id=event.message.trace_id)
            handler = None
        if handler is None:
            if rid in self.session:
                self.trace_ids.pop(rid, None)
                self.session.cancel(rid, s.BAD_GATEWAY, "request refused")
            return
        if rid in self.session:
            self.handlers[rid] = handler
            self._call(rid, handler.begin)

    def _call(self, request_id: str, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.failure(
                "handler for {request_id} failed", request_id=request_id, trace_id=self.trace_ids.get(request_id, "")
            )
            self.handlers.pop(request_id, None)
            self.trace_ids.pop(request_id, None)
            self.session.cancel(request_id, s.BAD_GATEWAY, "internal error")
