"""The client's calls to gRPC backends: tunnelled calls relayed as HTTP/2 streams (h2c or TLS with ALPN h2).

Theory of operation
-------------------
``GrpcBackends`` keeps persistent HTTP/2 connections per backend
(``grpc://host:port`` h2c, ``grpcs://`` TLS verified against ``backend_ca``
or the system roots).  A call takes the first connection with a free stream
(below the backend's ``SETTINGS_MAX_CONCURRENT_STREAMS``), else opens another;
a connection that dies or says GOAWAY takes no new calls and is dialled anew
by the next call that needs one.

``GrpcBackendCall`` is one tunnelled call: the tunnel's ``ResponderHandler``
and its HTTP/2 stream's handler.  The request head becomes HEADERS
(``:path /service/method``, metadata, ``te: trailers``, ``grpc-timeout`` from
the caller's remaining deadline); request body chunks (the gRPC byte stream,
wire v3) are queued to nghttp2 and credited to the tunnel as they are framed
(``sent``).  Response HEADERS, DATA and trailers that arrive in one read
travel as one tunnel message when they fit (a unary answer: ONE message);
body bytes are acknowledged to the backend only once the tunnel took them,
so a slow caller at the entry slows this call's backend stream and nothing
else.  Response messages are held to the route's ``max_message_size`` by
their length prefixes (``RESOURCE_EXHAUSTED``), as grpc would.

Endings: the backend's trailers (status relayed exactly); a non-200 HTTP
status or RST_STREAM mapped to a gRPC status (PROTOCOL-HTTP2.md); the
connection lost (``UNAVAILABLE``); the tunnel's ErrorMessage (caller
cancelled, deadline, stream lost) resets the stream with CANCEL, so the
backend learns at once.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.protocols import grpc_wire as gw
from tunneld.protocols.headers import without_address
from tunneld.protocols.h2.connection import (CANCEL, CONNECTION_LOST, H2ClientConnection, H2Connection, H2Limits,
                                             Headers, Incoming, StreamRefused)
from tunneld.tunnel import Tunnel

_MAX_CHUNK = s.MAX_CHUNK
_CONTENT_TYPE = frozenset({b"content-type"})
#: The start of an answer to a finished request waits this long for the rest (its status) to join it.
HOLD_GRACE = 0.002


def backend_target(url: str) -> tuple[str, int, bool]:
    """``grpc://host:port`` -> (host, port, secure?); the port defaults by scheme (80 / 443)."""
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    secure = scheme == "grpcs"
    default = 443 if secure else 80
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port = int(tail[1:]) if tail.startswith(":") else default
    elif ":" in hostport:
        host, _, port_text = hostport.rpartition(":")
        port = int(port_text)
    else:
        host, port = hostport, default
    return host, port, secure


class _Origin:
    """The connections to one backend."""

    def __init__(self, backends: GrpcBackends, url: str) -> None:
        self.backends = backends
        self.url = url
        self.host, self.port, self.secure = backend_target(url)
        self.connections: list[BackendConnection] = []
        self.dialling: Deferred[H2ClientConnection] | None = None
        self.waiters: list[Deferred[H2ClientConnection]] = []

    def connection(self) -> Deferred[H2ClientConnection]:
        for conn in self.connections:
            if not conn.goaway and conn.open_streams() < conn.max_concurrent_streams:
                d: Deferred[H2ClientConnection] = Deferred()
                d.callback(conn)
                return d
        waiter: Deferred[H2ClientConnection] = Deferred()
        self.waiters.append(waiter)
        if self.dialling is None:
            self._dial()
        return waiter

    def _dial(self) -> None:
        reactor = self.backends.reactor
        endpoint: Any = HostnameEndpoint(reactor, self.host, self.port, timeout=self.backends.connect_timeout)
        if self.secure:
            options = optionsForClientTLS(self.host, trustRoot=self.backends.trust_root,
                                          acceptableProtocols=[b"h2"])
            endpoint = wrapClientTLS(options, endpoint)
        conn = BackendConnection(self.backends.limits, reactor)
        self.dialling = d = connectProtocol(endpoint, conn)
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, conn: BackendConnection) -> None:
        self.dialling = None
        conn.on_lost = self._lost
        self.connections.append(conn)
        waiters, self.waiters = self.waiters, []
        # The backend's SETTINGS may not be in yet: nghttp2 queues streams beyond its limit.
        for waiter in waiters:
            waiter.callback(conn)

    def _failed(self, failure: Any) -> None:
        self.dialling = None
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def _lost(self, conn: H2Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)  # type: ignore[arg-type]

    def close(self) -> None:
        for conn in list(self.connections):
            conn.terminate()
        self.connections.clear()


class BackendConnection(H2ClientConnection):
    """A connection to one backend; it takes no new streams after the backend's GOAWAY."""

    def __init__(self, limits: H2Limits, clock: Any) -> None:
        super().__init__(limits, clock)
        self.goaway = False

    def goaway_received(self, last_stream_id: int, error_code: int) -> None:
        self.goaway = True

    def connectionLost(self, reason: Any = None) -> None:
        self.goaway = True
        super().connectionLost(reason)


class GrpcBackends:
    """Persistent HTTP/2 connections to the gRPC backends (reactor thread)."""

    def __init__(self, reactor: Any, *, trust_root: Any = None, limits: H2Limits = H2Limits(idle_timeout=0),
                 connect_timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.trust_root = trust_root
        self.limits = limits
        self.connect_timeout = connect_timeout
        self._origins: dict[str, _Origin] = {}

    def connection(self, url: str) -> Deferred[H2ClientConnection]:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = _Origin(self, url)
        return origin.connection()

    def authority(self, url: str) -> bytes:
        host, port, secure = backend_target(url)
        shown = f"[{host}]" if ":" in host else host
        return (shown if port == (443 if secure else 80) else f"{shown}:{port}").encode("idna")

    def __len__(self) -> int:
        return sum(len(o.connections) for o in self._origins.values())

    def close(self) -> None:
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()


class GrpcBackendsService(Service):
    """Closes the backend connections when the client stops (after the drain)."""

    def __init__(self, backends: GrpcBackends) -> None:
        self.backends = backends

    def stopService(self) -> None:
        super().stopService()
        self.backends.close()


class GrpcBackendCall:
    """One tunnelled call served by a backend: a ``ResponderHandler`` and an HTTP/2 stream handler."""

    log = Logger()

    def __init__(self, tunnel: Tunnel, request_id: str, head: pb.TunnelMessage, route: pb.Route,
                 backends: GrpcBackends, *, finished: Callable[[dict[str, object]], None] | None = None) -> None:
        self.tunnel = tunnel
        self.request_id = request_id
        self.trace_id = head.trace_id
        self.route = route
        self.backends = backends
        self.finished_cb = finished
        self.req = head.grpc_request
        self.path = f"/{self.req.service}/{self.req.method}"
        self.conn: H2ClientConnection | None = None
        self.stream_id = 0
        self.pending: list[tuple[bytes, bool]] = []   # request body that came before the connection
        self.done = False            # the tunnel request is over (our status sent, or the caller went away)
        self.head_sent = False
        self.held = 0                # backend bytes the tunnel has not taken yet (acknowledged at writable)
        self.scanner = gw.MessageScanner(route.max_message_size or 0)
        self.waiting: pb.GrpcResponse | None = None    # the answer's start, waiting to travel with what follows
        self.waiting_body = b""
        self.waited_once = False
        self.hold_timer: Any = None
        self.request_ended = False
        self.status = ""
        self.bytes_out = 0
        self.started = time.monotonic()

    # -- ResponderHandler (the tunnel) ----------------------------------------------------------

    def begin(self) -> None:
        req = self.req
        self.pending.append((req.body, req.is_last_chunk))
        d = self.backends.connection(self.route.backend)
        d.addCallbacks(self._connected, self._unreachable)

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        body = msg.grpc_request.body
        if self.done:
            return
        if self.conn is None:
            self.pending.append((body, end))
            return
        self._send(body, end)

    def writable(self) -> None:
        if self.held and self.conn is not None:
            n, self.held = self.held, 0
            self.conn.ack(self.stream_id, n)

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        # The caller went away, its deadline passed, or the tunnel was lost: the backend learns now.
        self._release_hold()
        self.waiting = None
        if not self.done:
            self.done = True
            self.status = self.status or f"aborted {code}: {message}"
            self.pending.clear()
            if self.conn is not None and self.stream_id:
                self.conn.reset(self.stream_id, CANCEL)
            self._finish()

    # -- the connection ---------------------------------------------------------------------------

    def _connected(self, conn: H2ClientConnection) -> None:
        if self.done:
            return
        req = self.req
        headers: Headers = [
            (b":method", b"POST"),
            (b":scheme", b"https" if self.route.backend.startswith("grpcs:") else b"http"),
            (b":path", self.path.encode("latin-1")),
            (b":authority", self.route.set_host.encode("idna") if self.route.set_host
             else self.backends.authority(self.route.backend)),
            (b"te", b"trailers"),
        ]
        content_type = next((h.value for h in req.metadata if h.name.lower() == "content-type"), b"application/grpc")
        headers.append((b"content-type", content_type))
        metadata = gw.metadata_to_h2(req.metadata, _CONTENT_TYPE)
        if req.timeout > 0:
            headers.append((b"grpc-timeout", gw.format_timeout(req.timeout)))
        headers.extend(metadata)
        pending, self.pending = self.pending, []
        end_now = len(pending) == 1 and pending[0] == (b"", True)
        self.request_ended = end_now
        try:
            self.stream_id = conn.open_stream(headers, _StreamSide(self), end=end_now)
        except (StreamRefused, ValueError, TypeError) as e:
            self._answer(gw.STATUS["INTERNAL" if not isinstance(e, StreamRefused) else "UNAVAILABLE"],
                         f"tunneld client could not call the backend: {e}")
            return
        self.conn = conn
        if not end_now:
            for body, end in pending:
                self._send(body, end)

    def _unreachable(self, failure: Any) -> None:
        if not self.done:
            why = failure.getErrorMessage() if hasattr(failure, "getErrorMessage") else str(failure)
            self.log.info("gRPC backend {backend} of route {route} unreachable: {why}", backend=self.route.backend,
                          route=self.route.name, why=why, request_id=self.request_id, trace_id=self.trace_id)
            # The caller sees the route, never the address behind the tunnel (SPEC §8.2).
            self._answer(gw.STATUS["UNAVAILABLE"], without_address(
                f"backend of route {self.route.name!r} unreachable: {why}", self.route.backend))

    def _send(self, body: bytes, end: bool) -> None:
        conn = self.conn
        assert conn is not None
        if end:
            self.request_ended = True
        try:
            if body or end:
                conn.send_data(self.stream_id, body, end=end)
        except Exception:
            # The stream is already closed (the backend answered or reset): its own close ends the call.
            pass

    # -- the stream (backend -> tunnel) ------------------------------------------------------------

    def stream_incoming(self, inc: Incoming) -> None:
        if self.done:
            if inc.body and self.conn is not None:
                self.conn.ack(self.stream_id, len(inc.body))
            return
        resp = self.waiting
        body = inc.body
        if resp is not None:
            # What waited (headers, perhaps the first message) joins what came now.
            self._release_hold()
            self.waiting, self.waited_once = None, True
            body, self.waiting_body = self.waiting_body + body, b""
        else:
            resp = pb.GrpcResponse()
        if inc.headers is not None:
            fields = dict(inc.headers)
            http_status = fields.get(b":status", b"")
            if http_status != b"200":
                code = int(http_status) if http_status.isdigit() else 0
                self._cancel_stream()
                self._answer(gw.status_for_http(code), f"backend answered HTTP {http_status.decode('latin-1')}")
                return
            resp.is_first_chunk = True
            self.head_sent = True
            if inc.end and inc.trailers is None and b"grpc-status" in fields:
                # Trailers-only: the status (and all metadata, as trailers) came in the head.
                self._status_into(resp, [(n, v) for n, v in inc.headers if n != b"content-type"])
                self._relay(resp, b"")
                return
            resp.initial_metadata.extend(gw.metadata_from_h2(inc.headers))
        if inc.body:
            scanned = self.scanner.feed(inc.body)
            if scanned.error:
                self._cancel_stream()
                if self.conn is not None:
                    self.conn.ack(self.stream_id, len(body))
                self._answer(gw.STATUS["RESOURCE_EXHAUSTED"], f"backend sent a {scanned.error}")
                return
        if inc.trailers is not None or inc.end:
            self._status_into(resp, inc.trailers or [])
        elif self._worth_holding(resp, body):
            # Backends write headers, a message and the status separately: when the caller has said
            # everything (unary, server-streaming), wait a moment so they travel as ONE tunnel message.
            self.waiting, self.waiting_body = resp, body
            self.hold_timer = self.backends.reactor.callLater(HOLD_GRACE, self._send_held)
            return
        self._relay(resp, body)

    def _worth_holding(self, resp: pb.GrpcResponse, body: bytes) -> bool:
        """Only the start of an answer to a finished request, and only small: a stream never waits twice."""
        return self.request_ended and not self.waited_once and len(body) <= _MAX_CHUNK

    def _send_held(self) -> None:
        """Nothing followed in time: what waited goes alone."""
        self.hold_timer = None
        self.waited_once = True
        resp, self.waiting = self.waiting, None
        body, self.waiting_body = self.waiting_body, b""
        if resp is not None and not self.done:
            self._relay(resp, body)

    def _release_hold(self) -> None:
        if self.hold_timer is not None and self.hold_timer.active():
            self.hold_timer.cancel()
        self.hold_timer = None

    def _status_into(self, resp: pb.GrpcResponse, trailers: Headers) -> None:
        fields = dict(trailers)
        raw = fields.get(b"grpc-status")
        if raw is not None and raw.isdigit():
            resp.status_code = int(raw)
            resp.details = gw.decode_message(fields.get(b"grpc-message", b""))
        else:
            resp.status_code = gw.STATUS["INTERNAL" if raw is not None else "UNKNOWN"]
            resp.details = "backend sent no grpc-status" if raw is None else f"malformed grpc-status {raw!r}"
        resp.trailing_metadata.extend(gw.metadata_from_h2(trailers, gw.STATUS_KEYS))
        resp.is_last_chunk = True

    def _relay(self, resp: pb.GrpcResponse, body: bytes) -> None:
        """Send what one read brought as few tunnel messages as fit (one for a small unary answer)."""
        last = resp.is_last_chunk
        tunnel, rid = self.tunnel, self.request_id
        n = len(body)
        self.bytes_out += n
        if last:
            self.done = True
            self.status = gw.status_name(resp.status_code)
        if n <= _MAX_CHUNK:
            resp.body = body
            ok = tunnel.send(rid, pb.TunnelMessage(grpc_response=resp))
        else:
            # Head (if any) with the first chunk; the rest chunked; the status last.
            end_msg = None
            if last:
                end_msg = pb.GrpcResponse(is_last_chunk=True, status_code=resp.status_code, details=resp.details,
                                          trailing_metadata=resp.trailing_metadata)
                resp.is_last_chunk = False
                resp.ClearField("trailing_metadata")
                resp.status_code = 0
                resp.details = ""
            resp.body = body[:_MAX_CHUNK]
            tunnel.send(rid, pb.TunnelMessage(grpc_response=resp))
            ok = tunnel.send_body(rid, body[_MAX_CHUNK:])
            if end_msg is not None:
                ok = tunnel.send(rid, pb.TunnelMessage(grpc_response=end_msg)) and ok
        if self.conn is not None and n:
            if ok or last:
                self.conn.ack(self.stream_id, n)
            else:
                self.held += n
        if last:
            self._finish()

    def stream_sent(self, n: int) -> None:
        """Request bytes were framed for the backend: the caller may send that much more."""
        if not self.done:
            self.tunnel.consumed(self.request_id, n)

    def stream_closed(self, error_code: int) -> None:
        """The HTTP/2 stream is gone; without a status yet, the reset or lost connection is the answer."""
        if self.done:
            return
        if error_code == CONNECTION_LOST:
            self._answer(gw.STATUS["UNAVAILABLE"], f"connection to the backend of route {self.route.name!r} lost")
        elif error_code == 0:
            self._answer(gw.STATUS["INTERNAL"], "backend ended the stream without a status")
        else:
            self._answer(gw.status_for_reset(error_code), f"backend reset the stream (HTTP/2 error {error_code})")

    # -- endings ---------------------------------------------------------------------------------

    def _answer(self, code: int, details: str) -> None:
        """End the tunnel request with a status made here."""
        self._release_hold()
        resp = pb.GrpcResponse(is_first_chunk=self.waiting is not None and self.waiting.is_first_chunk,
                               initial_metadata=self.waiting.initial_metadata if self.waiting is not None else ())
        self.waiting, self.waiting_body = None, b""
        resp.is_last_chunk, resp.status_code, resp.details = True, code, details
        if not self.head_sent:
            resp.is_first_chunk = True
            self.head_sent = True
        self._relay(resp, b"")

    def _cancel_stream(self) -> None:
        if self.conn is not None and self.stream_id:
            self.conn.reset(self.stream_id, CANCEL)

    def _finish(self) -> None:
        self.done = True
        if self.finished_cb is not None:
            cb, self.finished_cb = self.finished_cb, None
            cb({
                "protocol": "grpc", "route": self.route.name, "status": self.status or "-",
                "duration": time.monotonic() - self.started, "bytes_out": self.bytes_out,
                "request_id": self.request_id, "trace_id": self.trace_id, "path": self.path,
            })

    def closed(self) -> None:
        """Both directions of the tunnel request ended normally (the status went out)."""


class _StreamSide:
    """The HTTP/2 stream's view of a call (its ``closed`` is the stream's, not the tunnel request's)."""

    __slots__ = ("call",)

    def __init__(self, call: GrpcBackendCall) -> None:
        self.call = call

    def incoming(self, inc: Incoming) -> None:
        self.call.stream_incoming(inc)

    def sent(self, n: int) -> None:
        self.call.stream_sent(n)

    def closed(self, error_code: int) -> None:
        self.call.stream_closed(error_code)
