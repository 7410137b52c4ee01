"""A back-to-back pair of sans-IO sessions for tests (like h11's tests/helpers.py).

``SessionPair`` wires a server ``Session`` to a client ``Session`` through
in-memory lists: ``pump()`` moves each side's ``take_outgoing()`` into the
other's ``receive()`` until both are quiet and returns the events each side
produced.  Fault tests intercept the wire with ``pump(drop=...)`` or drive it
by hand with ``take()`` / ``deliver()``.  The builders below make the head and
body messages of each exchange kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from tunneld import tunnel_pb2 as pb
from tunneld.session import Event, Role, Session, State
from tunneld.window import DEFAULT_WINDOW

E = TypeVar("E")

Filter = Callable[[pb.TunnelMessage], bool]


class SessionPair:
    """A server and a client session connected back to back."""

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        *,
        client_window: int | None = None,
        max_window: int = 0,
        window_budget: int = 0,
        server_max_concurrency: int = 1000,
        client_max_concurrency: int = 1000,
        client_max_websockets: int = 1000,
        client_id: str = "c1",
    ) -> None:
        # max_window / window_budget: both sides' receive windows may grow (0: never).
        self.server = Session(Role.SERVER, window=window, max_window=max_window, window_budget=window_budget,
                              max_concurrency=server_max_concurrency)
        self.client = Session(
            Role.CLIENT,
            client_id=client_id,
            window=window if client_window is None else client_window,
            max_window=max_window,
            window_budget=window_budget,
            max_concurrency=client_max_concurrency,
            max_websockets=client_max_websockets,
        )
        self.client_id = client_id
        # Messages delivered by the last pump(), per receiving side.
        self.to_client: list[pb.TunnelMessage] = []
        self.to_server: list[pb.TunnelMessage] = []
        # Messages a drop filter removed during the last pump().
        self.dropped: list[pb.TunnelMessage] = []

    # -- wiring -----------------------------------------------------------

    def peer(self, session: Session) -> Session:
        return self.client if session is self.server else self.server

    def take(self, session: Session) -> list[pb.TunnelMessage]:
        """Take what ``session`` wants to send, without delivering it."""
        return session.take_outgoing()

    def deliver(self, session: Session, messages: Iterable[pb.TunnelMessage]) -> list[Event]:
        """Feed ``messages`` to ``session``; return the events it produced."""
        events: list[Event] = list(session.take_events())
        for msg in messages:
            events.extend(session.receive(msg))
        events.extend(session.take_events())
        return events

    def pump(self, drop: Filter | None = None) -> tuple[list[Event], list[Event]]:
        """Exchange messages until both sides are quiet; return (server_events, client_events).

        Events already pending from local actions are included.  ``drop(msg)``
        returning True removes a message from the wire (kept in ``dropped``).
        """
        self.to_client, self.to_server, self.dropped = [], [], []
        server_events: list[Event] = list(self.server.take_events())
        client_events: list[Event] = list(self.client.take_events())
        while True:
            moved = False
            for src, dst, events, log in (
                (self.server, self.client, client_events, self.to_client),
                (self.client, self.server, server_events, self.to_server),
            ):
                for msg in src.take_outgoing():
                    moved = True
                    if drop is not None and drop(msg):
                        self.dropped.append(msg)
                        continue
                    log.append(msg)
                    events.extend(dst.receive(msg))
            if not moved:
                break
        server_events.extend(self.server.take_events())
        client_events.extend(self.client.take_events())
        return server_events, client_events

    # -- handshake -------------------------------------------------------

    def open(self, stream_id: str = "s1", group: str = "default") -> tuple[list[Event], list[Event]]:
        """Run the open handshake; both sides end OPEN.  Returns the events of both pumps."""
        self.client.open(pb.StreamOpenRequest(client_id=self.client_id, group=group, stream_id=stream_id))
        s1, c1 = self.pump()
        self.server.accept(pb.StreamOpenResponse())
        s2, c2 = self.pump()
        assert self.server.state is State.OPEN, self.server.state
        assert self.client.state is State.OPEN, self.client.state
        return s1 + s2, c1 + c2


def opened(window: int = DEFAULT_WINDOW, **kwargs: object) -> SessionPair:
    """A SessionPair that has completed its handshake (events discarded)."""
    pair = SessionPair(window, **kwargs)  # type: ignore[arg-type]
    pair.open()
    return pair


# -- event helpers ----------------------------------------------------------


def of_type(events: Sequence[object], cls: type[E]) -> list[E]:
    """The events of one type, in order."""
    return [e for e in events if isinstance(e, cls)]


def kinds(messages: Iterable[pb.TunnelMessage]) -> list[str | None]:
    """The payload kind of each message."""
    return [m.WhichOneof("payload") for m in messages]


def body_bytes(messages: Iterable[pb.TunnelMessage]) -> int:
    """Total body bytes carried by messages (what windows count)."""
    from tunneld.session import body_of

    return sum(len(body_of(m)) for m in messages)


# -- message builders -------------------------------------------------------


def _headers(pairs: Iterable[tuple[str, bytes]]) -> list[pb.Header]:
    return [pb.Header(name=n, value=v) for n, v in pairs]


def http_head(
    method: str = "GET",
    path: str = "/",
    end: bool = True,
    body: bytes = b"",
    *,
    request_id: str = "",
    host: str = "app.example.com",
    headers: Iterable[tuple[str, bytes]] = (),
) -> pb.TunnelMessage:
    """An HTTP request head (is_first_chunk=True) for ``Session.start``."""
    return pb.TunnelMessage(
        request_id=request_id,
        http_request=pb.HttpRequest(
            method=method,
            url=path,
            path=path,
            host=host,
            headers=_headers(headers),
            body=body,
            is_first_chunk=True,
            is_last_chunk=end,
            route="web",
            scheme="http",
            content_length=-1,
        ),
    )


def http_request_body(body: bytes, end: bool = False) -> pb.TunnelMessage:
    """A later HTTP request message carrying only body."""
    return pb.TunnelMessage(http_request=pb.HttpRequest(body=body, is_last_chunk=end))


def http_response_head(
    status: int = 200,
    end: bool = False,
    body: bytes = b"",
    *,
    headers: Iterable[tuple[str, bytes]] = (),
    reason: str = "",
) -> pb.TunnelMessage:
    """An HTTP response head (is_first_chunk=True) for ``Session.send``."""
    return pb.TunnelMessage(
        http_response=pb.HttpResponse(
            status_code=status,
            headers=_headers(headers),
            body=body,
            is_first_chunk=True,
            is_last_chunk=end,
            reason=reason,
        )
    )


def http_response_body(body: bytes, end: bool = False) -> pb.TunnelMessage:
    """A later HTTP response message carrying only body."""
    return pb.TunnelMessage(http_response=pb.HttpResponse(body=body, is_last_chunk=end))


def grpc_head(
    service: str = "helloworld.Greeter",
    method: str = "SayHello",
    body: bytes | None = None,
    end: bool = False,
    *,
    request_id: str = "",
    timeout: float = 0.0,
) -> pb.TunnelMessage:
    """A gRPC call head; ``body`` (if not None) is its first message."""
    return pb.TunnelMessage(
        request_id=request_id,
        grpc_request=pb.GrpcRequest(
            service=service,
            method=method,
            metadata=_headers([("x-token", b"t")]),
            body=body or b"",
            is_first_chunk=True,
            is_last_chunk=end,
            route="greeter",
            timeout=timeout,
        ),
    )


def grpc_request_message(body: bytes | None, end: bool = False) -> pb.TunnelMessage:
    """A later gRPC request message (one gRPC message, or a bare half-close)."""
    return pb.TunnelMessage(
        grpc_request=pb.GrpcRequest(body=body or b"", is_last_chunk=end)
    )


def grpc_response_head(body: bytes | None = None) -> pb.TunnelMessage:
    """The first gRPC response message (initial metadata, optionally a message)."""
    return pb.TunnelMessage(
        grpc_response=pb.GrpcResponse(
            initial_metadata=_headers([("x-server", b"s")]),
            body=body or b"",
            is_first_chunk=True,
        )
    )


def grpc_response_message(body: bytes) -> pb.TunnelMessage:
    """A later gRPC response message."""
    return pb.TunnelMessage(grpc_response=pb.GrpcResponse(body=body))


def grpc_response_end(status: int = 0, details: str = "") -> pb.TunnelMessage:
    """The last gRPC response message: status, details, trailing metadata."""
    return pb.TunnelMessage(
        grpc_response=pb.GrpcResponse(
            status_code=status,
            details=details,
            trailing_metadata=_headers([("x-trailer", b"t")]),
            is_last_chunk=True,
        )
    )


def ws_head(path: str = "/ws", subprotocols: Sequence[str] = ("chat",), *, request_id: str = "") -> pb.TunnelMessage:
    """A WebSocket upgrade request."""
    return pb.TunnelMessage(
        request_id=request_id,
        ws_request=pb.WebSocketRequest(
            url=path, host="app.example.com", subprotocols=list(subprotocols), route="web", scheme="http"
        ),
    )


def ws_accept(subprotocol: str = "chat") -> pb.TunnelMessage:
    """The backend accepted the WebSocket upgrade."""
    return pb.TunnelMessage(ws_response=pb.WebSocketResponse(status_code=101, accepted=True, subprotocol=subprotocol))


def ws_refuse(status: int = 403, body: bytes = b"forbidden") -> pb.TunnelMessage:
    """The backend refused the WebSocket upgrade."""
    return pb.TunnelMessage(
        ws_response=pb.WebSocketResponse(status_code=status, accepted=False, reason="Forbidden", body=body)
    )


def ws_frame(payload: bytes, opcode: int = 2, fin: bool = True) -> pb.TunnelMessage:
    """A WebSocket data frame piece."""
    return pb.TunnelMessage(ws_frame=pb.WebSocketFrame(fin=fin, opcode=opcode, payload=payload))


def ws_close(code: int = 1000, reason: str = "bye") -> pb.TunnelMessage:
    """A WebSocket close frame (opcode 8)."""
    return pb.TunnelMessage(ws_frame=pb.WebSocketFrame(fin=True, opcode=8, close_code=code, close_reason=reason))


def on_wire(
    msg: pb.TunnelMessage,
    sender: Session,
    request_id: str,
    protocol: int = pb.HTTP,
    *,
    client_id: str = "",
) -> pb.TunnelMessage:
    """Stamp ``msg`` as ``sender`` would put it on the wire, bypassing its checks.

    Used to forge what a misbehaving peer sends.
    """
    out = pb.TunnelMessage()
    out.CopyFrom(msg)
    out.request_id = request_id
    out.direction = sender.my_direction
    out.protocol_type = protocol  # type: ignore[assignment]
    out.client_id = client_id or sender.client_id
    return out


def window_update(sender: Session, request_id: str, increment: int, protocol: int = pb.HTTP,
                  *, grow: int = 0) -> pb.TunnelMessage:
    """A WindowUpdate as ``sender`` would put it on the wire."""
    return pb.TunnelMessage(
        request_id=request_id,
        direction=sender.my_direction,
        protocol_type=protocol,  # type: ignore[arg-type]
        window_update=pb.WindowUpdate(increment=increment, grow=grow),
    )


def error_message(sender: Session, request_id: str, code: int = 499, message: str = "x") -> pb.TunnelMessage:
    """An ErrorMessage as ``sender`` would put it on the wire."""
    return pb.TunnelMessage(
        request_id=request_id,
        direction=sender.my_direction,
        protocol_type=pb.HTTP,
        error_message=pb.ErrorMessage(code=code, message=message),
    )


def control(direction: int, **payload: object) -> pb.TunnelMessage:
    """A control message with an explicit direction."""
    return pb.TunnelMessage(direction=direction, protocol_type=pb.CONTROL, **payload)  # type: ignore[arg-type]
