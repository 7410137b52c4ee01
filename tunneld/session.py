"""Sans-IO state machine for one tunnel stream (no reactor, no grpc, no clock).

Theory of operation
-------------------
A ``Session`` is one end of one ``TunnelService.Proxy`` stream.  The adapter
feeds it every message the peer sent (``receive``) and calls its action
methods (``start``, ``send``, ``send_body``, ``consumed``, ``cancel`` ...).
Both produce two things the adapter drains after every call:

* ``take_outgoing()``: ``TunnelMessage``s to write to the stream, in order;
* ``take_events()``: frozen event objects saying what happened.

Stream lifecycle: the client's first message is ``stream_open``; the server
must see it first (anything else is fatal), answers with ``accept`` or
``reject``, and only then does traffic flow.  States: ``AWAIT_OPEN`` (server)
/ ``IDLE`` (client) -> ``OPENING`` -> ``OPEN`` -> ``CLOSED``.

Request table: every request is an ``Exchange`` keyed by ``request_id``.  The
side that starts it is the initiator; its direction carries the request kind
(``http_request`` / ``grpc_request`` / ``ws_request`` then ``ws_frame``), the
responder's the response kind.  Each direction has a window (see window.py);
messages that do not fit wait in the exchange's outbox and go out when credit
returns (``Writable`` tells the adapter to resume its producer); the first
body unit sent after such a wait carries ``window_limited``.  When a marked
unit arrives while the consumer had taken everything before it, the receive
window doubles (up to ``max_window`` per request, within ``window_budget``
for the whole stream's growth) and a ``WindowUpdate.grow`` says so.  An
exchange is released when both directions ended, on an ``ErrorMessage``
either way, on a protocol violation for that request, or by ``fail_all``
when the stream is lost.  Because the table belongs to one stream, a
response for a request that went out on another stream is simply an unknown
``request_id`` here: it is dropped, counted and answered with an
``ErrorMessage``.

Errors the peer causes are reported as ``ProtocolViolation`` events (one log
line each in the adapter); ``fatal=True`` means the stream must be closed.
A request refused because a limit of ours is full (``max_concurrency`` for
HTTP and gRPC, ``max_websockets`` for WebSockets, counted apart so idle
WebSockets never starve requests) is no violation: it is a
``RequestRefused`` event, and the peer gets ``OVERLOADED`` with the limit
named in words.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import AbstractSet, Callable, Final

from tunneld import tunnel_pb2 as pb
from tunneld.window import DEFAULT_WINDOW, FlowControlError, ReceiveWindow, SendWindow

MAX_CHUNK: Final = 64 * 1024

# ErrorMessage codes (HTTP-flavoured so they map straight onto entry answers).
PROTOCOL_ERROR: Final = 400
CANCELLED: Final = 499
BAD_GATEWAY: Final = 502
OVERLOADED: Final = 503
TIMEOUT: Final = 504

_RECENT_LIMIT: Final = 4096
_NO_IDS: Final[frozenset[str]] = frozenset()

# payload field -> protocol of the exchange, for the two directions.
_REQUEST_KINDS: Final = {"http_request": pb.HTTP, "grpc_request": pb.GRPC, "ws_request": pb.WEBSOCKET}
_RESPONSE_KINDS: Final = {"http_response": pb.HTTP, "grpc_response": pb.GRPC, "ws_response": pb.WEBSOCKET}
_RESPONSE_KIND_OF: Final[dict[int, str]] = {protocol: kind for kind, protocol in _RESPONSE_KINDS.items()}
_BODY_KINDS: Final[dict[tuple[int, bool], str]] = {
    # (protocol, sent by initiator?) -> payload field of later messages
    (pb.HTTP, True): "http_request",
    (pb.HTTP, False): "http_response",
    (pb.GRPC, True): "grpc_request",
    (pb.GRPC, False): "grpc_response",
    (pb.WEBSOCKET, True): "ws_frame",
    (pb.WEBSOCKET, False): "ws_frame",
}
_CONTROL_KINDS: Final = frozenset(
    {"config_sync", "config_sync_response", "stream_open", "stream_open_response", "heartbeat"}
)


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    IDLE = "idle"                # client, before open()
    AWAIT_OPEN = "await_open"    # server, before the peer's stream_open
    OPENING = "opening"          # handshake sent / received, not answered yet
    OPEN = "open"
    CLOSED = "closed"


class SessionError(Exception):
    """The adapter called an action that is not valid in this state."""


# -- events ----------------------------------------------------------------


@dataclass(frozen=True)
class OpenRequested:
    """Server: the peer opened the stream; call ``accept`` or ``reject``."""

    request: pb.StreamOpenRequest


@dataclass(frozen=True)
class OpenAccepted:
    """Client: the server accepted the stream."""

    response: pb.StreamOpenResponse


@dataclass(frozen=True)
class OpenRejected:
    """Client: the server refused the stream; the session is closed."""

    message: str


@dataclass(frozen=True)
class RequestReceived:
    """The peer started a request; ``message`` is its head."""

    request_id: str
    protocol: int
    message: pb.TunnelMessage


@dataclass(frozen=True)
class MessageReceived:
    """A later message of an exchange (response head, body, frame, trailers).

    ``end`` is True when it ended the peer's direction.  Body bytes in it must
    be reported back through ``consumed`` once the consumer took them.
    """

    request_id: str
    message: pb.TunnelMessage
    end: bool


@dataclass(frozen=True)
class Writable:
    """Queued messages of this exchange went out; its producer may resume."""

    request_id: str


@dataclass(frozen=True)
class RequestClosed:
    """Both directions ended normally; the exchange is released."""

    request_id: str


@dataclass(frozen=True)
class RequestAborted:
    """The exchange was released abnormally.

    ``by_peer`` is True when the peer sent the ``ErrorMessage``; False when this
    side ended it (protocol violation, stream loss).  Local ``cancel`` calls do
    not produce this event.
    """

    request_id: str
    code: int
    message: str
    by_peer: bool


@dataclass(frozen=True)
class HeartbeatReceived:
    sent_at_ms: int
    ack: bool


@dataclass(frozen=True)
class ConfigSyncRequested:
    """Server: the client asks whether its config (``version``) is current."""

    version: str


@dataclass(frozen=True)
class ConfigReceived:
    """Client: routes pushed or answered by the server."""

    config: pb.ConfigSyncResponse


@dataclass(frozen=True)
class RequestRefused:
    """A peer's new request was refused because one of our limits is full (not the peer's fault)."""

    message: str
    request_id: str = ""
    protocol: int = 0


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer broke the protocol; ``fatal`` means the stream must close."""

    message: str
    request_id: str = ""
    fatal: bool = False


Event = (
    OpenRequested | OpenAccepted | OpenRejected | RequestReceived | MessageReceived | Writable
    | RequestClosed | RequestAborted | HeartbeatReceived | ConfigSyncRequested | ConfigReceived
    | ProtocolViolation | RequestRefused
)


# -- the request table ------------------------------------------------------


@dataclass(eq=False)
class Exchange:
    request_id: str
    protocol: int
    initiated_here: bool
    send_window: SendWindow
    recv_window: ReceiveWindow
    local_ended: bool = False
    remote_ended: bool = False
    head_received: bool = False
    blocked: bool = False          # the adapter was told to pause its producer
    outbox: deque[tuple[pb.TunnelMessage, int]] = field(default_factory=deque)   # (message, window cost)


UNIT_COST: Final = 64
#: The least a WebSocket frame piece costs: the work per frame (parse, relay,
#: a tunnel message each way) is worth kilobytes of payload, so a flood of
#: tiny frames gets at most window / MIN_FRAME_COST frames in flight (16 in a
#: 256 KiB window) instead of thousands queued ahead of everyone else.
MIN_FRAME_COST: Final = 16384
#: Receive windows grow only for units at least this big: growth is for
#: bandwidth, and tiny messages would only queue more of them.
GROW_MIN_UNIT: Final = 4096


def unit_cost(n: int) -> int:
    """Window cost of one gRPC message or WebSocket piece of ``n`` bytes.

    Each unit costs a little more than its bytes, so a flood of empty
    messages still runs out of credit instead of queueing without bound.
    Receivers credit exactly this for each unit their consumer took.
    """
    return n + UNIT_COST


def frame_cost(n: int) -> int:
    """Window cost of one WebSocket frame piece of ``n`` payload bytes (both sides use this)."""
    return max(n + UNIT_COST, MIN_FRAME_COST)


def window_cost(msg: pb.TunnelMessage) -> int:
    """What a message spends from its direction's window."""
    kind = msg.WhichOneof("payload") or ""
    return _cost(kind, msg, len(body_of(msg)))


def _cost(kind: str, msg: pb.TunnelMessage, n: int) -> int:
    """``window_cost`` for a message whose body length ``n`` is known.

    Every read of a protobuf bytes field copies it (64 KiB per HTTP chunk), so
    the hot paths measure a body once and pass its length around.
    """
    if kind == "ws_frame":
        return 0 if msg.ws_frame.opcode == 8 else frame_cost(n)
    return n


def body_of(msg: pb.TunnelMessage) -> bytes:
    """The body bytes a message carries (what windows count)."""
    kind = msg.WhichOneof("payload")
    if kind == "ws_frame":
        return msg.ws_frame.payload
    if kind in ("http_request", "http_response", "grpc_request", "grpc_response"):
        return getattr(msg, kind).body  # type: ignore[no-any-return]
    return b""


def _is_head(kind: str, msg: pb.TunnelMessage) -> bool:
    """Does this message open its direction (a request or response head)?"""
    if kind in ("http_request", "http_response", "grpc_request", "grpc_response"):
        return bool(getattr(msg, kind).is_first_chunk)
    return kind in ("ws_request", "ws_response")


def _ends_direction(kind: str, msg: pb.TunnelMessage) -> bool:
    if kind in ("http_request", "http_response", "grpc_request", "grpc_response"):
        return bool(getattr(msg, kind).is_last_chunk)
    if kind == "ws_frame":
        return msg.ws_frame.opcode == 8
    if kind == "ws_response":
        return not msg.ws_response.accepted
    return False


class Session:
    """One end of one tunnel stream."""

    def __init__(
        self,
        role: Role,
        *,
        client_id: str = "",
        window: int = DEFAULT_WINDOW,
        max_window: int = 0,
        window_budget: int = 0,
        max_concurrency: int = 1000,
        max_chunk: int = MAX_CHUNK,
        max_websockets: int = 1000,
    ) -> None:
        self.role = role
        self.client_id = client_id
        self.window = window              # initial window of each request direction (the server's announces it)
        self.max_window = max_window      # receive windows grow up to this (0, or <= window: never)
        self.window_budget = window_budget  # growth of all receive windows together, at most this
        self.grown = 0                    # growth of the receive windows of the exchanges in the table
        self.max_concurrency = max_concurrency   # the peer's HTTP and gRPC requests open at once
        self.max_websockets = max_websockets     # the peer's WebSockets open at once (counted apart)
        self.max_chunk = max_chunk
        self.state = State.IDLE if role is Role.CLIENT else State.AWAIT_OPEN
        self.my_direction = pb.CLIENT_TO_SERVER if role is Role.CLIENT else pb.SERVER_TO_CLIENT
        self.peer_direction = pb.SERVER_TO_CLIENT if role is Role.CLIENT else pb.CLIENT_TO_SERVER
        self._exchanges: dict[str, Exchange] = {}
        # Told the table's size whenever it changes (the server's registry keeps
        # its streams ordered by load this way instead of asking every stream).
        self.on_load: Callable[[int], None] | None = None
        self._remote_count = 0
        self._remote_websockets = 0   # of _remote_count: WebSockets (not held to max_concurrency)
        # Made on the first released request: an idle fleet's streams never need them
        # (an empty deque costs ~0.6 KiB; bench/README.md, fleet memory).
        self._recent: deque[str] | None = None
        self._recent_set: AbstractSet[str] = _NO_IDS
        self._outgoing: list[pb.TunnelMessage] = []
        self._events: list[Event] = []
        self.dropped = 0               # peer messages dropped as invalid
        # Messages about requests received from the peer (bodies, heads, window
        # updates, errors; not heartbeats or config): the stall watch's sign that
        # the peer makes progress.
        self.progress = 0
        # Each side numbers its own requests; the role letter keeps the two
        # sides' ids apart in the one table.
        self._id_prefix = f"{role.value[0]}{os.urandom(3).hex()}-"
        self._ids = itertools.count(1)

    # -- draining -------------------------------------------------------

    def take_outgoing(self) -> list[pb.TunnelMessage]:
        out, self._outgoing = self._outgoing, []
        return out

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- the table --------------------------------------------------------

    def __len__(self) -> int:
        return len(self._exchanges)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._exchanges

    def request_ids(self) -> list[str]:
        return list(self._exchanges)

    def exchange(self, request_id: str) -> Exchange | None:
        return self._exchanges.get(request_id)

    def blocked(self) -> int:
        """Requests whose data waits for window credit from the peer (their producers are paused)."""
        return sum(1 for ex in self._exchanges.values() if ex.blocked)

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests)."""
        remote = sum(1 for ex in self._exchanges.values() if not ex.initiated_here)
        assert remote == self._remote_count, (remote, self._remote_count)
        websockets = sum(1 for ex in self._exchanges.values() if not ex.initiated_here and ex.protocol == pb.WEBSOCKET)
        assert websockets == self._remote_websockets, (websockets, self._remote_websockets)
        for ex in self._exchanges.values():
            assert not (ex.local_ended and ex.remote_ended and not ex.outbox), ex.request_id
            assert ex.recv_window.unacked <= ex.recv_window.size + (1 << 26)
            assert ex.send_window.available <= ex.send_window.size
            assert ex.recv_window.grown == 0 or ex.recv_window.size <= self.max_window, ex.request_id
        grown = sum(ex.recv_window.grown for ex in self._exchanges.values())
        assert grown == self.grown, (grown, self.grown)
        assert 0 <= self.grown <= max(self.window_budget, 0), (self.grown, self.window_budget)

    # -- handshake --------------------------------------------------------

    def open(self, request: pb.StreamOpenRequest) -> None:
        """Client: send the stream's first message."""
        if self.role is not Role.CLIENT or self.state is not State.IDLE:
            raise SessionError(f"open() in state {self.state.value}")
        self.state = State.OPENING
        self._emit_control(stream_open=request)

    def accept(self, response: pb.StreamOpenResponse) -> None:
        """Server: accept the peer's stream_open."""
        if self.role is not Role.SERVER or self.state is not State.OPENING:
            raise SessionError(f"accept() in state {self.state.value}")
        response.success = True
        response.window = self.window
        self.state = State.OPEN
        self._emit_control(stream_open_response=response)

    def reject(self, message: str) -> None:
        """Server: refuse the peer's stream_open; the session closes."""
        self._emit_control(stream_open_response=pb.StreamOpenResponse(success=False, message=message))
        self.state = State.CLOSED

    # -- control ----------------------------------------------------------

    def heartbeat(self, now_ms: int) -> None:
        if self.state is State.OPEN:
            self._emit_control(heartbeat=pb.Heartbeat(sent_at_ms=now_ms))

    def request_config(self, version: str) -> None:
        """Client: ask the server for the current routes."""
        if self.state is State.OPEN:
            self._emit_control(config_sync=pb.ConfigSyncRequest(config_version=version))

    def push_config(self, config: pb.ConfigSyncResponse) -> None:
        """Server: send the group's routes (answer or push)."""
        if self.state is State.OPEN:
            self._emit_control(config_sync_response=config)

    def _emit_control(self, **payload: object) -> None:
        msg = pb.TunnelMessage(
            client_id=self.client_id, direction=self.my_direction, protocol_type=pb.CONTROL, **payload  # type: ignore[arg-type]
        )
        self._outgoing.append(msg)

    # -- starting and sending -------------------------------------------------

    def start(self, msg: pb.TunnelMessage) -> str:
        """Start a request whose head is ``msg``; returns its request_id.

        ``msg`` carries one of the request kinds; request_id is generated when
        empty.  The head may carry body and may end the direction.
        """
        if self.state is not State.OPEN:
            raise SessionError(f"start() in state {self.state.value}")
        kind = msg.WhichOneof("payload")
        if kind not in _REQUEST_KINDS:
            raise SessionError(f"start() needs a request head, not {kind}")
        if not msg.request_id:
            # Unique on this stream is enough (SPEC §3); the random prefix
            # keeps ids from different streams apart in logs.
            msg.request_id = f"{self._id_prefix}{next(self._ids):x}"
        if msg.request_id in self._exchanges:
            raise SessionError(f"request_id {msg.request_id} is in use")
        protocol = _REQUEST_KINDS[kind]
        ex = Exchange(msg.request_id, protocol, True, SendWindow(self.window), ReceiveWindow(self.window))
        self._exchanges[msg.request_id] = ex
        if self.on_load is not None:
            self.on_load(len(self._exchanges))
        msg.protocol_type = protocol  # type: ignore[assignment]
        msg.client_id = self.client_id
        self._queue(ex, msg)
        return msg.request_id

    def send(self, request_id: str, msg: pb.TunnelMessage) -> bool:
        """Queue one message of an exchange (response head, body, frame, trailers).

        Returns True when everything queued for the exchange went out, False
        when the adapter should pause its producer until ``Writable``.
        An unknown request_id (already released) is ignored and returns False.
        """
        ex = self._exchanges.get(request_id)
        if ex is None:
            return False
        if ex.local_ended:
            raise SessionError(f"send() after the end of request {request_id}")
        msg.request_id = request_id
        msg.protocol_type = ex.protocol  # type: ignore[assignment]
        return self._queue(ex, msg)

    def send_body(self, request_id: str, data: bytes, end: bool = False) -> bool:
        """HTTP and gRPC (wire v3): send body bytes, cut into chunks of at most ``max_chunk``."""
        ex = self._exchanges.get(request_id)
        if ex is None:
            return False
        kind = _BODY_KINDS[(ex.protocol, ex.initiated_here)]
        if kind == "ws_frame":
            raise SessionError("send_body() is for HTTP and gRPC exchanges")
        if ex.local_ended:
            raise SessionError(f"send_body() after the end of request {request_id}")
        view = memoryview(data)
        ok = True
        offset = 0
        while True:
            piece = data if offset == 0 and len(data) <= self.max_chunk else bytes(view[offset:offset + self.max_chunk])
            offset += len(piece)
            last = end and offset >= len(data)
            if piece or last:
                msg = pb.TunnelMessage()
                part = getattr(msg, kind)
                part.body = piece
                part.is_last_chunk = last
                msg.request_id = request_id
                msg.protocol_type = ex.protocol  # type: ignore[assignment]
                ok = self._queue(ex, msg, len(piece))
            if offset >= len(data):
                return ok

    def _queue(self, ex: Exchange, msg: pb.TunnelMessage, cost: int | None = None) -> bool:
        msg.direction = self.my_direction  # type: ignore[assignment]
        kind = msg.WhichOneof("payload") or ""
        if _ends_direction(kind, msg):
            ex.local_ended = True
            if kind == "ws_response":
                ex.remote_ended = True  # refused: the initiator sends nothing more
        ex.outbox.append((msg, _cost(kind, msg, len(body_of(msg))) if cost is None else cost))
        self._flush(ex)
        if ex.outbox:
            ex.blocked = True
            return False
        self._maybe_release(ex)
        return True

    def _flush(self, ex: Exchange) -> None:
        window = ex.send_window
        while ex.outbox:
            msg, cost = ex.outbox[0]
            if cost and not window.can_send():
                window.hold()
                return
            ex.outbox.popleft()
            if window.spend(cost):
                msg.window_limited = True
            self._outgoing.append(msg)

    def consumed(self, request_id: str, n: int) -> None:
        """The consumer took ``n`` body bytes of this exchange: return credit."""
        ex = self._exchanges.get(request_id)
        if ex is None or n <= 0:
            return
        credit = ex.recv_window.consume(n)
        if credit and not ex.remote_ended:
            self._window_update(ex, credit)

    def _window_update(self, ex: Exchange, increment: int, grow: int = 0) -> None:
        self._outgoing.append(
            pb.TunnelMessage(
                request_id=ex.request_id,
                direction=self.my_direction,
                protocol_type=ex.protocol,  # type: ignore[arg-type]
                window_update=pb.WindowUpdate(increment=increment, grow=grow),
            )
        )

    def _grow(self, ex: Exchange) -> None:
        """The window limited a consumer that keeps up: double it, within max_window and the budget."""
        window = ex.recv_window
        grow = min(window.size, self.max_window - window.size, self.window_budget - self.grown)
        if grow <= 0:
            return
        window.grow(grow)
        self.grown += grow
        # Owed credit (below the batch threshold) rides along for free.
        self._window_update(ex, window.flush(), grow)

    def cancel(self, request_id: str, code: int = CANCELLED, message: str = "cancelled") -> None:
        """End an exchange from this side: tell the peer and release it."""
        ex = self._exchanges.get(request_id)
        if ex is None:
            return
        self._send_error(request_id, code, message, ex.protocol)
        self._release(ex)

    def fail_all(self, message: str, code: int = BAD_GATEWAY) -> None:
        """The stream is gone: release every exchange with ``RequestAborted``."""
        for ex in list(self._exchanges.values()):
            self._release(ex)
            self._events.append(RequestAborted(ex.request_id, code, message, by_peer=False))
        self.state = State.CLOSED

    def close(self) -> None:
        self.state = State.CLOSED

    # -- receiving ----------------------------------------------------------

    def receive(self, msg: pb.TunnelMessage) -> list[Event]:
        """Feed one message from the peer; returns all pending events."""
        if self.state is State.CLOSED:
            return self.take_events()
        kind = msg.WhichOneof("payload")
        if self.state is not State.OPEN:
            self._receive_handshake(kind, msg)
        elif kind is None:
            self._violation("message without payload", msg.request_id)
        elif kind == "error_message":
            self.progress += 1
            self._receive_error(msg)  # checked first: an error is never answered
        elif msg.direction != self.peer_direction:
            self._violation(f"{kind} has the wrong direction", msg.request_id)
        elif kind in _CONTROL_KINDS:
            self._receive_control(kind, msg)
        else:
            self.progress += 1
            self._receive_exchange(kind, msg)
        return self.take_events()

    def _receive_handshake(self, kind: str | None, msg: pb.TunnelMessage) -> None:
        if self.role is Role.SERVER and self.state is State.AWAIT_OPEN and kind == "stream_open":
            self.state = State.OPENING
            self._events.append(OpenRequested(msg.stream_open))
        elif self.role is Role.CLIENT and self.state is State.OPENING and kind == "stream_open_response":
            resp = msg.stream_open_response
            if resp.success:
                self.state = State.OPEN
                if resp.window:
                    self.window = resp.window
                self._events.append(OpenAccepted(resp))
            else:
                self.state = State.CLOSED
                self._events.append(OpenRejected(resp.message or "refused"))
        else:
            self.dropped += 1
            self._events.append(
                ProtocolViolation(f"{kind or 'empty message'} before the stream was open", msg.request_id, fatal=True)
            )
            self.state = State.CLOSED

    def _receive_control(self, kind: str, msg: pb.TunnelMessage) -> None:
        if kind == "heartbeat":
            hb = msg.heartbeat
            if not hb.ack:
                self._emit_control(heartbeat=pb.Heartbeat(sent_at_ms=hb.sent_at_ms, ack=True))
            self._events.append(HeartbeatReceived(hb.sent_at_ms, hb.ack))
        elif kind == "config_sync" and self.role is Role.SERVER:
            self._events.append(ConfigSyncRequested(msg.config_sync.config_version))
        elif kind == "config_sync_response" and self.role is Role.CLIENT:
            self._events.append(ConfigReceived(msg.config_sync_response))
        else:
            self.dropped += 1
            self._events.append(ProtocolViolation(f"unexpected {kind} on an open stream", fatal=True))
            self.state = State.CLOSED

    def _receive_error(self, msg: pb.TunnelMessage) -> None:
        ex = self._exchanges.get(msg.request_id)
        if ex is None:
            # Never answer an error; late errors for released requests are normal.
            return
        self._release(ex)
        err = msg.error_message
        self._events.append(RequestAborted(ex.request_id, err.code, err.message, by_peer=True))

    def _receive_exchange(self, kind: str, msg: pb.TunnelMessage) -> None:
        rid = msg.request_id
        ex = self._exchanges.get(rid)
        if ex is None:
            if kind in _REQUEST_KINDS and rid and rid not in self._recent_set and _is_head(kind, msg):
                self._receive_new_request(kind, msg)
            elif rid in self._recent_set:
                pass  # in flight when we released it: expected, drop quietly
            else:
                self.dropped += 1
                self._events.append(ProtocolViolation(f"{kind} for unknown request_id", rid))
                if rid:
                    self._send_error(rid, PROTOCOL_ERROR, "unknown request_id", msg.protocol_type)
            return
        if kind == "window_update":
            try:
                ex.send_window.credit(msg.window_update.increment, msg.window_update.grow)
            except FlowControlError as e:
                self._fail(ex, str(e))
                return
            self._flush(ex)
            if ex.blocked and not ex.outbox:
                ex.blocked = False
                self._events.append(Writable(rid))
                self._maybe_release(ex)
            return
        expected = self._expected_kind(ex)
        if kind != expected:
            self._fail(ex, f"{kind} not valid here (expected {expected})")
            return
        if msg.protocol_type != ex.protocol:
            self._fail(ex, f"protocol_type {msg.protocol_type} does not match the request's {ex.protocol}")
            return
        if ex.remote_ended:
            self._fail(ex, f"{kind} after the end of the peer's direction")
            return
        expect_head = ex.initiated_here and not ex.head_received
        if _is_head(kind, msg) != expect_head:
            self._fail(ex, f"{kind} {'without' if expect_head else 'with'} a head where {'one' if expect_head else 'none'} belongs")
            return
        size = len(body_of(msg))
        if ex.protocol != pb.WEBSOCKET and size > self.max_chunk:
            self._fail(ex, f"body chunk of {size} bytes exceeds {self.max_chunk}")
            return
        # Checked before this unit counts: did the consumer take all before it?
        idle = ex.recv_window.idle()
        try:
            ex.recv_window.received(_cost(kind, msg, size))
        except FlowControlError as e:
            self._fail(ex, str(e))
            return
        if expect_head:
            ex.head_received = True
        end = _ends_direction(kind, msg)
        if end:
            ex.remote_ended = True
            if kind == "ws_response":
                ex.local_ended = True  # a refused WebSocket never sends frames
        elif msg.window_limited and idle and size >= GROW_MIN_UNIT:
            self._grow(ex)
        self._events.append(MessageReceived(rid, msg, end))
        if end and ex.initiated_here and (not ex.local_ended or ex.outbox) and ex.protocol != pb.WEBSOCKET:
            # The response is complete while we still send the request (an
            # early 413, a refused WebSocket, a gRPC server that finished
            # first): stop our direction and let the peer release too.
            self._send_error(rid, CANCELLED, "response complete", ex.protocol)
            self._release(ex)
            self._events.append(RequestClosed(rid))
            return
        self._maybe_release(ex)

    def _expected_kind(self, ex: Exchange) -> str:
        if ex.initiated_here and not ex.head_received:
            return _RESPONSE_KIND_OF[ex.protocol]
        return _BODY_KINDS[(ex.protocol, not ex.initiated_here)]

    def _receive_new_request(self, kind: str, msg: pb.TunnelMessage) -> None:
        rid = msg.request_id
        protocol = _REQUEST_KINDS[kind]
        if msg.protocol_type != protocol:
            self.dropped += 1
            self._events.append(ProtocolViolation(f"{kind} with protocol_type {msg.protocol_type}", rid))
            self._send_error(rid, PROTOCOL_ERROR, "protocol_type does not match the payload", protocol)
            return
        if protocol == pb.WEBSOCKET:
            if self._remote_websockets >= self.max_websockets:
                self._refuse(rid, protocol, f"{self.max_websockets} WebSockets open (max_websockets)")
                return
        elif self._remote_count - self._remote_websockets >= self.max_concurrency:
            self._refuse(rid, protocol, f"{self.max_concurrency} requests in flight (max_concurrency)")
            return
        size = len(body_of(msg))
        if protocol != pb.WEBSOCKET and size > self.max_chunk:
            self.dropped += 1
            self._events.append(ProtocolViolation(f"body chunk of {size} bytes exceeds {self.max_chunk}", rid))
            self._send_error(rid, PROTOCOL_ERROR, "body chunk too large", protocol)
            return
        ex = Exchange(rid, protocol, False, SendWindow(self.window), ReceiveWindow(self.window))
        ex.recv_window.received(_cost(kind, msg, size))
        ex.remote_ended = _ends_direction(kind, msg)
        self._exchanges[rid] = ex
        if self.on_load is not None:
            self.on_load(len(self._exchanges))
        self._remote_count += 1
        if protocol == pb.WEBSOCKET:
            self._remote_websockets += 1
        self._events.append(RequestReceived(rid, protocol, msg))

    def _refuse(self, rid: str, protocol: int, full: str) -> None:
        who = "client" if self.role is Role.CLIENT else "server"
        message = f"{who} is at its limit: {full}"
        self._send_error(rid, OVERLOADED, message, protocol)
        self._remember(rid)
        self._events.append(RequestRefused(message, rid, protocol))

    # -- release ----------------------------------------------------------------

    def _maybe_release(self, ex: Exchange) -> None:
        if ex.local_ended and ex.remote_ended and not ex.outbox and ex.request_id in self._exchanges:
            self._release(ex)
            self._events.append(RequestClosed(ex.request_id))

    def _release(self, ex: Exchange) -> None:
        if self._exchanges.pop(ex.request_id, None) is None:
            return
        if self.on_load is not None:
            self.on_load(len(self._exchanges))
        if not ex.initiated_here:
            self._remote_count -= 1
            if ex.protocol == pb.WEBSOCKET:
                self._remote_websockets -= 1
        self.grown -= ex.recv_window.grown   # the stream's budget gets it back
        ex.outbox.clear()
        self._remember(ex.request_id)

    def _remember(self, request_id: str) -> None:
        """Keep a released id for a while: late messages for it are dropped quietly."""
        recent = self._recent
        if recent is None:
            recent = self._recent = deque(maxlen=_RECENT_LIMIT)
            self._recent_set = set()
        ids = self._recent_set
        assert isinstance(ids, set)
        if len(recent) == recent.maxlen:
            ids.discard(recent[0])
        recent.append(request_id)
        ids.add(request_id)

    def _fail(self, ex: Exchange, message: str) -> None:
        """A protocol violation on one exchange: end it on both sides."""
        self.dropped += 1
        self._events.append(ProtocolViolation(message, ex.request_id))
        self._send_error(ex.request_id, PROTOCOL_ERROR, message, ex.protocol)
        self._release(ex)
        self._events.append(RequestAborted(ex.request_id, PROTOCOL_ERROR, message, by_peer=False))

    def _send_error(self, request_id: str, code: int, message: str, protocol: int) -> None:
        self._outgoing.append(
            pb.TunnelMessage(
                request_id=request_id,
                direction=self.my_direction,
                protocol_type=protocol,  # type: ignore[arg-type]
                error_message=pb.ErrorMessage(code=code, message=message),
            )
        )

    def _violation(self, message: str, request_id: str = "") -> None:
        self.dropped += 1
        ex = self._exchanges.get(request_id)
        if ex is not None:
            self._fail(ex, message)
        else:
            self._events.append(ProtocolViolation(message, request_id))
