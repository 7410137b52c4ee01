"""WebSocket through the tunnel: autobahn at both ends, frames relayed piecewise.

Server side, an upgrade request on the HTTP entry is handed to autobahn's
``WebSocketResource``; ``EntryWebSocket.onConnect`` sends ``ws_request``
through the tunnel and answers the external handshake only once the backend
did (``ws_response``): accepted -> 101 with the backend's subprotocol,
refused -> the backend's status (502 when unreachable).  Client side,
``BackendWebSocket`` dials the route's backend with autobahn's client.

Frames are relayed with autobahn's frame API, never reassembled: incoming
message data is cut into pieces of at most 64 KiB (a small message travels in
one tunnel message), each piece becomes a ``WebSocketFrame`` (opcode on the
first piece, ``fin`` on the last) and is written on the far side as one
WebSocket frame.  Flow control is the tunnel's: a full window pauses reading
from the sending socket, and credit returns only while the receiving socket
keeps up.  Closes travel with their code and reason (codes autobahn's
``sendClose`` refuses are sent with ``sendCloseFrame``; 1006 means "dropped",
so it is relayed as a dropped connection).
"""

from __future__ import annotations

import time
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory, WebSocketClientProtocol, WebSocketServerFactory, WebSocketServerProtocol, connectWS,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.protocols import headers as h
from tunneld.inspector import Exchange, Inspector
from tunneld.protocols.http_entry import (Refusal, Target, answer_reason, backend_url, local_request_id,
                                          route_normalised, trace_id_of, without_authorization)
from tunneld.logs import ThrottledWarning
from tunneld.registry.per_address import PerAddressLimit
from tunneld.tunnel import CreditGate, Tunnel

_log = Logger()
PIECE = 64 * 1024
CLOSE_LINGER = 10.0       # seconds to wait for the far side's close before cancelling
_NO_WIRE_CODES = {1005, 1006, 1015}  # never sent in a close frame
_HANDSHAKE_HEADERS = {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                      b"sec-websocket-protocol", b"sec-websocket-accept", b"host", b"content-length"}
_PASSED_STATUS = {413, 502, 503, 504}


def _sendable(code: int) -> bool:
    return code not in _NO_WIRE_CODES and (1000 <= code <= 1014 or 3000 <= code <= 4999)


class FrameRelay:
    """Mixin for an autobahn protocol bound to one tunnel exchange.

    (No ``log`` attribute here: it would replace autobahn's own logger, which
    drops its per-frame debug lines cheaply.)
    """

    tunnel: Tunnel | None = None
    request_id = ""
    trace_id = ""
    clock: Any = None
    rec: Exchange | None = None   # the inspector's record (entry side only; None: inspector off)

    def _relay_init(self) -> None:
        self._opcode = 1
        self._first = True
        self._buf = bytearray()
        self._credit = CreditGate(self.credit)
        self._sent_close = False
        self._socket_paused = False
        self._linger: Any = None
        self.bytes_from_socket = 0   # message payload bytes relayed socket -> tunnel
        self.bytes_to_socket = 0     # and tunnel -> socket

    def attach_producer(self) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # the hijacked HTTP channel's
        transport.registerProducer(self._credit, True)

    # -- socket -> tunnel ---------------------------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)  # type: ignore[misc]
        self._opcode = 2 if isBinary else 1
        self._first = True
        self._buf = bytearray()

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.failedByMe:  # type: ignore[attr-defined]
            return
        self._buf += payload
        while len(self._buf) > PIECE:
            piece = bytes(self._buf[:PIECE])
            del self._buf[:PIECE]
            self._send_piece(piece, fin=False)

    def onMessageFrameEnd(self) -> None:
        self.frame_data = None  # nothing was kept; see onMessageFrameData

    def onMessageEnd(self) -> None:
        if self.failedByMe:  # type: ignore[attr-defined]
            return
        piece, self._buf = bytes(self._buf), bytearray()
        self._send_piece(piece, fin=True)

    def _send_piece(self, piece: bytes, fin: bool) -> None:
        frame = pb.WebSocketFrame(opcode=self._opcode if self._first else 0, fin=fin, payload=piece)
        if self.rec is not None:
            if self._first:
                self.rec.message("in", piece, self._opcode)
            else:
                self.rec.message_more("in", piece)
        self._first = False
        self.bytes_from_socket += len(piece)
        if self.tunnel is not None and not self.tunnel.send(self.request_id, pb.TunnelMessage(ws_frame=frame)):
            self._pause_socket()

    _turn_hold = False   # reading paused by the per-turn budget (EntryWebSocket's fair share)

    def _pause_socket(self) -> None:
        if not self._socket_paused and self.transport is not None:  # type: ignore[attr-defined]
            self._socket_paused = True
            if not self._turn_hold:
                self.transport.pauseProducing()  # type: ignore[attr-defined]

    def writable(self) -> None:
        if self._socket_paused and self.transport is not None:  # type: ignore[attr-defined]
            self._socket_paused = False
            if not self._turn_hold:
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            self._credit_back()

    def _credit_back(self) -> None:
        """Window credit came back (EntryWebSocket feeds what it held back)."""

    def credit(self, n: int) -> None:
        if self.tunnel is not None:
            self.tunnel.consumed(self.request_id, n)

    # -- tunnel -> socket -------------------------------------------------------------

    def relay_frame(self, frame: pb.WebSocketFrame) -> None:
        proto: Any = self
        if frame.opcode == 8:
            self._peer_close(frame.close_code, frame.close_reason)
            return
        if proto.state != WebSocketServerProtocol.STATE_OPEN:
            self._credit.took(s.frame_cost(len(frame.payload)))
            return
        payload = frame.payload
        self.bytes_to_socket += len(payload)
        if self.rec is not None:
            if frame.opcode:
                self.rec.message("out", payload, frame.opcode)
            else:
                self.rec.message_more("out", payload)
        if frame.opcode in (1, 2):
            if frame.fin:
                proto.sendMessage(payload, isBinary=frame.opcode == 2)
            else:
                proto.beginMessage(isBinary=frame.opcode == 2)
                if payload:
                    proto.beginMessageFrame(len(payload))
                    proto.sendMessageFrameData(payload)
        else:
            if payload:
                proto.beginMessageFrame(len(payload))
                proto.sendMessageFrameData(payload)
            if frame.fin:
                proto.endMessage()
        self._credit.took(s.frame_cost(len(payload)))

    def _peer_close(self, code: int, reason: str) -> None:
        """The far side closed: close this socket the same way."""
        proto: Any = self
        if proto.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if code == 1006 or code == 1015:
            proto.dropConnection(abort=True)
        elif code in (0, 1005) or not _sendable(code):
            proto.sendCloseFrame(code=1000 if code not in (0, 1005) else None, isReply=False)
        else:
            proto.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def relay_close(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """This socket closed: end our direction of the exchange with its code."""
        if self._sent_close or self.tunnel is None or self.request_id not in self.tunnel.session:
            return
        self._sent_close = True
        close_code = (code or 1005) if wasClean else 1006
        frame = pb.WebSocketFrame(opcode=8, fin=True, close_code=close_code, close_reason=(reason or "")[:123])
        self.tunnel.send(self.request_id, pb.TunnelMessage(ws_frame=frame))
        if self.request_id in self.tunnel.session and self.clock is not None:
            self._linger = self.clock.callLater(CLOSE_LINGER, self._give_up)

    def _give_up(self) -> None:
        self._linger = None
        if self.tunnel is not None:
            self.tunnel.cancel(self.request_id, s.CANCELLED, "no close from the far side")

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)  # type: ignore[misc]
        # The twisted.web request (and its channel) is no longer needed.
        self.entry_request = None

    def closed(self) -> None:
        """The exchange is released: nothing more to wait for."""
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


# -- server side: the external client's connection -------------------------------------


#: Fair share per connection: what one external WebSocket may have parsed per reactor turn.
TURN_BYTES = 64 * 1024
TURN_FRAMES = 64
_SLICE = 16 * 1024   # bytes handed to autobahn at once (it copies its buffer once per frame)


class EntryWebSocket(FrameRelay, WebSocketServerProtocol):
    """An external WebSocket; the tunnel exchange's handler on the server.

    Fair share: autobahn parses everything a socket read brought at once, so
    one client sending 7-byte frames turns each 64 KiB read into ~9,000
    frames (and tunnel messages) handled in one reactor turn while every other
    connection waits.  Here a read goes into a backlog handed to autobahn at
    most ``TURN_BYTES`` per reactor turn, and autobahn's parse loop
    (``consumeData``) stops after ``TURN_FRAMES`` frames, leaving the rest in
    its buffer.  What is left waits for the next turn (``callLater(0)``) with
    the socket paused, so a flooding WebSocket slows itself, not the others,
    and what it can make the server hold stays bounded.
    """

    factory: EntryWebSocketFactory
    _backlog = b""
    _backlog_pos = 0
    _turn_call: Any = None
    _frames = 0          # frames parsed so far (autobahn's onFrameBegin)
    _turn_start = 0      # ... when this turn began
    _capped = False      # this turn's frame budget ran out with frames left in autobahn's buffer

    def dataReceived(self, data: bytes) -> None:
        if self._backlog_pos < len(self._backlog):
            self._backlog = self._backlog[self._backlog_pos:] + data
        else:
            self._backlog = data
        self._backlog_pos = 0
        if self._turn_call is None and not self._socket_paused:
            self._feed()

    def onFrameBegin(self) -> None:
        self._frames += 1
        super().onFrameBegin()

    def consumeData(self) -> None:
        if self.state not in (WebSocketServerProtocol.STATE_OPEN, WebSocketServerProtocol.STATE_CLOSING):
            super().consumeData()   # the handshake
            return
        # autobahn's loop, with the turn's frame budget.
        while self.processData() and self.state != WebSocketServerProtocol.STATE_CLOSED:
            if self._frames - self._turn_start >= TURN_FRAMES:
                self._capped = bool(self.data)
                return

    def _feed(self) -> None:
        self._turn_call = None
        self._turn_start = self._frames
        self._capped = False
        if self.data and self.state == WebSocketServerProtocol.STATE_OPEN:
            self.consumeData()   # what the last turn's budget left in autobahn's buffer
        backlog = self._backlog
        pos = self._backlog_pos
        fed = 0
        while pos < len(backlog) and not self._socket_paused and not self._capped and fed < TURN_BYTES:
            if self.state == WebSocketServerProtocol.STATE_CLOSED or self.transport is None:
                backlog, pos = b"", 0   # nothing more will be read
                break
            piece = backlog[pos:pos + _SLICE]
            pos += len(piece)
            fed += len(piece)
            # autobahn's own entry point minus dataReceived's eager debug-log formatting.
            self._dataReceived(piece)
        self._backlog, self._backlog_pos = (backlog, pos) if pos < len(backlog) else (b"", 0)
        more = bool(self._backlog) or self._capped
        if more and not self._socket_paused:
            # Over budget: the rest next turn, the socket paused meanwhile (bounded backlog).
            self._hold(True)
            self._turn_call = self.factory.clock.callLater(0, self._feed)
        elif not more:
            self._hold(False)

    def _hold(self, on: bool) -> None:
        if on == self._turn_hold:
            return
        self._turn_hold = on
        transport = self.transport
        if transport is None or self._socket_paused:
            return   # flow control holds the socket anyway
        if on:
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    def _credit_back(self) -> None:
        if (self._backlog or self._capped) and self._turn_call is None:
            self._turn_call = self.factory.clock.callLater(0, self._feed)

    def __init__(self) -> None:
        super().__init__()
        self._relay_init()
        self.entry_request: Any = None
        self._handshake: Deferred[Any] | None = None
        self._timer: Any = None
        self.route = "-"
        self.started = time.monotonic()
        self.status = 0          # the handshake's answer: 101, or the refusal's status
        self._reported = False
        self._path = ""
        self.refusal = ""        # access refusal reason (metrics label), "" if none
        self.address = ""
        self.reason = ""         # why tunneld refused or ended the handshake itself ("" = the backend's answer)
        self.client_id = ""      # the client serving it
        self._deny_headers: list[tuple[str, str]] = []
        self._ip_slot = ""      # the address whose max_websockets_per_ip slot this WebSocket holds
        self._route_slot = ""   # the route whose max_websockets slot it holds

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # autobahn's ConnectionDeny carries no headers; a 401 needs WWW-Authenticate.
        super().failHandshake(reason, code, responseHeaders or self._deny_headers or None)

    def connectionLost(self, reason: Any) -> None:
        channel = getattr(self.entry_request, "channel", None)
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        self._turn_call = None
        self._backlog, self._backlog_pos = b"", 0
        super().connectionLost(reason)
        self._release_slots()
        release = getattr(channel, "release", None)
        if release is not None:
            release()   # the HTTP entry counted this connection (max_connections)

    def onConnect(self, request: Any) -> Deferred[Any]:
        req = self.entry_request
        factory = self.factory
        self.clock = factory.clock
        flat = [(n, v) for n, vs in req.requestHeaders.getAllRawHeaders() for v in vs]
        host = (h.get_first(flat, b"host") or b"").decode("latin-1")
        uri = req.uri.decode("latin-1")
        raw_path, _, query = uri.partition("?")
        self.trace_id = trace_id_of(flat)
        self._path = raw_path
        client_ip = h.client_ip(req)
        path, decision = route_normalised(factory.dispatcher, host, raw_path, client_ip, flat)
        if factory.inspector is not None:
            rec = self.rec = factory.inspector.begin("websocket")
            rec.trace_id = self.trace_id
            rec.method = "GET"
            rec.path = uri
            rec.host = host
            rec.scheme = factory.scheme
            rec.remote = client_ip
            rec.request_headers = flat
            rec.route = decision.route or "-"
            if isinstance(decision, Target):
                rec.client_id = decision.client_id
        if isinstance(decision, Refusal):
            self.status = decision.status
            self.route = decision.route or "-"
            self.refusal = decision.reason
            self.reason = answer_reason(decision.status, decision.message, decision.reason)
            self.address = client_ip
            self._deny_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in decision.headers]
            raise ConnectionDeny(decision.status, decision.message)
        self.route = decision.route
        self.client_id = decision.client_id
        self._take_slots(decision, client_ip)
        if decision.max_message_size:
            self.maxMessagePayloadSize = decision.max_message_size
        if decision.strip_authorization:
            flat = without_authorization(flat)
        fwd = [(n, v) for n, v in h.request_headers_for_backend(flat, client_ip=client_ip, proto=factory.scheme,
                                                                 host=host, set_host=decision.set_host)
               if n.lower() not in _HANDSHAKE_HEADERS]
        msg = pb.TunnelMessage(trace_id=self.trace_id, ws_request=pb.WebSocketRequest(
            url=backend_url(decision, uri, raw_path, path, query),
            host=host, headers=h.to_pb(fwd), subprotocols=list(request.protocols), route=decision.route,
            scheme="wss" if factory.scheme == "https" else "ws", remote_addr=client_ip,
        ))
        self.tunnel = decision.tunnel
        self._handshake = Deferred()
        try:
            self.request_id = decision.tunnel.start(msg, self)
        except s.SessionError as e:
            self.status = 502
            self.reason = "tunnel lost"
            raise ConnectionDeny(502, f"tunnel not available: {e}") from None
        self._timer = self.clock.callLater(decision.timeout, self._timed_out, decision.timeout)
        if self.rec is not None:
            self.rec.request_id = self.request_id
        return self._handshake

    def _take_slots(self, target: Target, address: str) -> None:
        """Count this WebSocket against max_websockets_per_ip and the route's max_websockets, or deny it (503)."""
        factory = self.factory
        self.address = address
        if not factory.per_ip.acquire(address):
            self.status = 503
            self.refusal = "websockets_per_ip"
            raise ConnectionDeny(503, f"too many WebSockets from your address "
                                      f"({factory.per_ip.limit} open, max_websockets_per_ip)")
        self._ip_slot = address
        limit = target.max_websockets
        held = factory.per_route.get(target.route, 0)
        if limit and held >= limit:
            self._release_slots()
            self.status = 503
            self.refusal = "route_max_websockets"
            raise ConnectionDeny(503, f"route {target.route} has {limit} WebSockets open (max_websockets)")
        factory.per_route[target.route] = held + 1
        self._route_slot = target.route

    def _release_slots(self) -> None:
        factory = self.factory
        if self._ip_slot:
            ip, self._ip_slot = self._ip_slot, ""
            factory.per_ip.release(ip)
        if self._route_slot:
            route, self._route_slot = self._route_slot, ""
            left = factory.per_route.get(route, 0) - 1
            if left > 0:
                factory.per_route[route] = left
            else:
                factory.per_route.pop(route, None)

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        if self.tunnel is not None:
            self.tunnel.cancel(self.request_id, s.TIMEOUT, "no handshake answer")
        self._deny(504, f"no handshake answer from the backend within {timeout:g} s")

    def _deny(self, status: int, reason: str, by_backend: bool = False) -> None:
        self.status = status
        if not by_backend:
            self.reason = self.reason or answer_reason(status, reason)
        d, self._handshake = self._handshake, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if d is not None:
            d.errback(ConnectionDeny(status, reason))

    def onOpen(self) -> None:
        self.attach_producer()

    # ExchangeHandler
    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        kind = msg.WhichOneof("payload")
        if kind == "ws_response":
            resp = msg.ws_response
            if self.rec is not None:
                self.rec.response_status = 101 if resp.accepted else (resp.status_code or 502)
                self.rec.response_headers = h.from_pb(resp.headers)
            if not resp.accepted:
                self._deny(resp.status_code or 502, resp.reason or "refused by the backend", by_backend=True)
                return
            d, self._handshake = self._handshake, None
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            extra: dict[str, list[str]] = {}
            for name, value in h.response_headers_for_client(h.from_pb(resp.headers)):
                if name.lower() not in _HANDSHAKE_HEADERS and not name.lower().startswith(b"sec-websocket"):
                    extra.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
            if d is not None:
                self.status = 101
                d.callback((resp.subprotocol or None, extra))
        elif kind == "ws_frame":
            self.relay_frame(msg.ws_frame)

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.tunnel = None
        self.closed()
        if self._handshake is not None:
            if by_peer and code == s.OVERLOADED:
                # A full limit at the client: said in words here too, not only to the external client.
                self.factory.refusals.note(self.clock.seconds(), message, request_id=self.request_id,
                                           trace_id=self.trace_id, route=self.route)
            self._deny(code if code in _PASSED_STATUS else 502, message)
            return
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=1011, reasonUtf8=b"tunnel lost" if not by_peer else message.encode()[:123])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._handshake is not None and self.tunnel is not None:
            self.tunnel.cancel(self.request_id, s.CANCELLED, "external client went away")
            self._handshake = None
            self.status = self.status or 499
            self.reason = self.reason or "client went away"
        self.relay_close(wasClean, code, reason)
        if self.rec is not None:
            # A WebSocket's status is its close code; a refused handshake's, the HTTP status.
            self.rec.end(((code or 1005) if wasClean else 1006) if self.status == 101 else (self.status or 502))
            if self.rec.response_status == 0:
                self.rec.response_status = self.status or 502
        self._report()

    def _report(self) -> None:
        """One ``finished`` record per external WebSocket (access log, metrics)."""
        if self._reported:
            return
        self._reported = True
        self.factory.dispatcher.finished({
            "protocol": "websocket", "method": "GET", "path": self._path, "route": self.route,
            "status": self.status or 502, "duration": time.monotonic() - self.started,
            "bytes_in": self.bytes_from_socket, "bytes_out": self.bytes_to_socket,
            "request_id": self.request_id or (self.rec.request_id if self.rec is not None else "")
            or local_request_id(), "trace_id": self.trace_id,
            "refusal": self.refusal, "address": self.address,
            "reason": self.reason, "answered_by": "tunneld" if self.reason else "backend", "client_id": self.client_id,
        })


class EntryWebSocketFactory(WebSocketServerFactory):
    protocol = EntryWebSocket

    inspector: Inspector | None = None   # set by the tap when the inspector is on

    def __init__(self, dispatcher: Any, clock: Any, *, scheme: str = "http", ping_interval: int = 0,
                 max_message_size: int = 16 * 1024 * 1024, max_websockets_per_ip: int = 64) -> None:
        super().__init__()
        # Open WebSockets per address (max_websockets_per_ip) and per route (its max_websockets).
        self.per_ip = PerAddressLimit(max_websockets_per_ip)
        self.per_route: dict[str, int] = {}
        self.refusals = ThrottledWarning(_log, "a client refused a WebSocket")
        self.dispatcher = dispatcher
        self.clock = clock
        self.scheme = scheme
        self.pending_request: Any = None
        options: dict[str, Any] = {"webStatus": False, "maxMessagePayloadSize": max_message_size,
                                   "maxFramePayloadSize": 0, "failByDrop": False}
        if ping_interval:
            options.update(autoPingInterval=ping_interval, autoPingTimeout=max(1, ping_interval))
        self.setProtocolOptions(**options)

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        proto.entry_request, self.pending_request = self.pending_request, None
        return proto


class EntryWebSocketResource(WebSocketResource):
    """autobahn's resource, told which twisted.web request it takes over."""

    def __init__(self, factory: EntryWebSocketFactory) -> None:
        super().__init__(factory)
        self.entry_factory = factory

    def render(self, request: Any) -> Any:
        self.entry_factory.pending_request = request
        return super().render(request)


# -- client side: the connection to the backend ------------------------------------------


class BackendWebSocket(FrameRelay, WebSocketClientProtocol):
    """The client's WebSocket to a route's backend."""

    factory: BackendWebSocketFactory

    def __init__(self) -> None:
        super().__init__()
        self._relay_init()
        self.opened = False
        self.subprotocol: str | None = None
        self.response_headers: dict[str, Any] = {}

    def connectionMade(self) -> None:
        exchange = self.factory.exchange
        assert exchange is not None
        exchange.protocol = self
        self.tunnel = exchange.tunnel
        self.request_id = exchange.request_id
        self.clock = exchange.clock
        super().connectionMade()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # autobahn writes ``Host: <host>:<port>`` (always with a port) from the
        # dialled address.  The backend must see the external Host (or the
        # route's set_host) exactly as an HTTP backend does: with a ``:80`` added,
        # same-origin checks (Origin vs Host, e.g. gorilla/websocket) fail.  So
        # the one Host line of the opening handshake is replaced, nothing else.
        host = self.factory.host_header
        if host and data is self.http_request_data and self.state == self.STATE_CONNECTING:
            data = self.http_request_data = replace_host_line(data, host)
        super().sendData(data, sync, chopsize)

    def onConnect(self, response: Any) -> None:
        self.subprotocol = response.protocol
        self.response_headers = dict(response.headers)

    def onOpen(self) -> None:
        self.opened = True
        self.attach_producer()
        if self.factory.exchange is not None:
            self.factory.exchange.opened(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened:
            if self.factory.exchange is not None:
                self.factory.exchange.handshake_failed(getattr(self, "http_status_line", None), reason or "")
            return
        self.relay_close(wasClean, code, reason)


def _header_safe(value: str) -> str:
    """``value`` if it can stand in a header line, else "" (never lets CR/LF split the handshake)."""
    return "" if any(c in value for c in "\r\n\0") else value


def replace_host_line(request: bytes, host: str) -> bytes:
    """The handshake request ``request`` with its (first) ``Host:`` line saying ``host``."""
    head, sep, rest = request.partition(b"\r\n")
    lines = rest.split(b"\r\n")
    for i, line in enumerate(lines):
        if line[:5].lower() == b"host:":
            lines[i] = b"Host: " + host.encode("latin-1")
            break
    return head + sep + b"\r\n".join(lines)


class BackendWebSocketFactory(WebSocketClientFactory):
    protocol = BackendWebSocket

    noisy = False  # no "Starting factory" line per WebSocket

    def __init__(self, exchange: BackendWebSocketExchange, url: str, *, host_header: str = "",
                 **kwargs: Any) -> None:
        """``host_header``: the Host the backend sees ("" = autobahn's, the dialled address)."""
        super().__init__(url, **kwargs)
        self.exchange: BackendWebSocketExchange | None = exchange
        self.host_header = host_header

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if self.exchange is not None:
            self.exchange.unreachable(reason.getErrorMessage())


class BackendWebSocketExchange:
    """A tunnelled WebSocket served by a backend (a ResponderHandler on the client)."""

    log = Logger()

    def __init__(self, tunnel: Tunnel, request_id: str, head: pb.TunnelMessage, backend: str, clock: Any,
                 *, max_message_size: int, ping_interval: int = 0, connect: Any = connectWS,
                 trust_root: Any = None, set_host: str = "") -> None:
        """``trust_root``: CA to verify wss:// backends (None = platform roots; never unverified).

        The backend sees ``Host: set_host`` when given (the route's), else the
        external request's Host, as HTTP backends do."""
        self.set_host = set_host
        self.tunnel = tunnel
        self.request_id = request_id
        self.head = head
        self.backend = backend.rstrip("/")
        self.clock = clock
        self.max_message_size = max_message_size
        self.ping_interval = ping_interval
        self.connect = connect
        self.trust_root = trust_root
        self.protocol: BackendWebSocket | None = None
        self.connector: Any = None
        self.answered = False

    def begin(self) -> None:
        req = self.head.ws_request
        scheme, _, rest = self.backend.partition("://")
        url = ("wss" if scheme in ("https", "wss") else "ws") + "://" + rest + (req.url or "/")
        pairs = h.from_pb(req.headers)
        origin = h.get_first(pairs, b"origin")
        agent = h.get_first(pairs, b"user-agent")
        extra: dict[str, str] = {}
        for name, value in pairs:
            lname = name.lower()
            if lname in _HANDSHAKE_HEADERS or lname in (b"origin", b"user-agent", b"pragma", b"cache-control"):
                continue
            key = name.decode("latin-1")
            sep = "; " if lname == b"cookie" else ", "
            extra[key] = extra[key] + sep + value.decode("latin-1") if key in extra else value.decode("latin-1")
        factory = BackendWebSocketFactory(
            self, url, origin=origin.decode("latin-1") if origin else None,
            protocols=list(req.subprotocols) or None, useragent=agent.decode("latin-1") if agent else "",
            headers=extra, host_header=_header_safe(self.set_host or req.host),
        )
        options: dict[str, Any] = {"maxMessagePayloadSize": self.max_message_size, "maxFramePayloadSize": 0,
                                   "failByDrop": False, "closeHandshakeTimeout": 5}
        if self.ping_interval:
            options.update(autoPingInterval=self.ping_interval, autoPingTimeout=max(1, self.ping_interval))
        factory.setProtocolOptions(**options)
        context = None
        if factory.isSecure:
            # autobahn's default for wss would not verify the certificate.
            context = optionsForClientTLS(factory.host, trustRoot=self.trust_root)
        self.connector = self.connect(factory, contextFactory=context)

    # -- from the backend connection ----------------------------------------------------------

    def opened(self, proto: BackendWebSocket) -> None:
        self.answered = True
        headers = [(k.encode("latin-1"), (v if isinstance(v, str) else ", ".join(v)).encode("latin-1"))
                   for k, v in proto.response_headers.items()]
        self.tunnel.send(self.request_id, pb.TunnelMessage(ws_response=pb.WebSocketResponse(
            status_code=101, accepted=True, subprotocol=proto.subprotocol or "",
            headers=h.to_pb([(n, v) for n, v in headers if n.lower() not in _HANDSHAKE_HEADERS]),
        )))

    def handshake_failed(self, status_line: str | None, reason: str) -> None:
        if self.answered:
            return
        self.answered = True
        status = 502
        if status_line:
            parts = status_line.split(None, 2)
            if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) >= 300:
                status = int(parts[1])  # a refusal passes through; a 200 to an upgrade is a bad gateway
        message = f"backend {self.backend} refused the WebSocket: {status_line or reason}"
        self.log.info("{message}", message=message, request_id=self.request_id, trace_id=self.head.trace_id)
        # The caller never learns the address behind the tunnel (SPEC §8.2).
        public = h.without_address(f"the backend refused the WebSocket: {status_line or reason}", self.backend)
        self.tunnel.send(self.request_id, pb.TunnelMessage(ws_response=pb.WebSocketResponse(
            status_code=status, accepted=False, reason=public)))

    def unreachable(self, why: str) -> None:
        if self.answered:
            return
        self.answered = True
        self.log.info("backend {backend} unreachable: {why}", backend=self.backend, why=why,
                      request_id=self.request_id, trace_id=self.head.trace_id)
        self.tunnel.cancel(self.request_id, s.BAD_GATEWAY,
                           h.without_address(f"the backend is unreachable: {why}", self.backend))

    # -- ResponderHandler --------------------------------------------------------------------

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        if self.protocol is not None and msg.WhichOneof("payload") == "ws_frame":
            self.protocol.relay_frame(msg.ws_frame)

    def writable(self) -> None:
        if self.protocol is not None:
            self.protocol.writable()

    def closed(self) -> None:
        if self.protocol is not None:
            self.protocol.closed()
        self._forget()

    def _forget(self) -> None:
        """Break the exchange/protocol/factory cycle so reference counting frees them."""
        proto, self.protocol = self.protocol, None
        self.connector = None
        if proto is not None and proto.factory is not None:
            proto.factory.exchange = None

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        proto = self.protocol
        if proto is None:
            if self.connector is not None:
                self.connector.disconnect()
            return
        proto.tunnel = None
        proto.closed()
        if proto.state == WebSocketClientProtocol.STATE_OPEN:
            proto.sendCloseFrame(code=1011 if not by_peer else 1001, reasonUtf8=message.encode()[:123])
        else:
            proto.dropConnection(abort=True)
        self._forget()
