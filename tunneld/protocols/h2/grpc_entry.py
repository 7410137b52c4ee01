"""The server's gRPC entry on ``grpc_listen``: every gRPC call, relayed as HTTP/2 into a tunnel.

Theory of operation
-------------------
Each caller connection is a ``GrpcEntryConnection`` (HTTP/2 server role over
connection.py); each call a ``GrpcEntryCall``, which is both the stream's
handler and the tunnel's ``ExchangeHandler``.  All on the reactor thread;
nothing here knows grpcio.

A call's head (``:path`` = ``/service/method``, ``:authority``, metadata,
``grpc-timeout``) is dispatched by the hub (route by service and authority,
access rules on the caller's address and ``authorization``) before anything
reaches a client.  Refusals are trailers-only answers (UNIMPLEMENTED,
UNAVAILABLE, PERMISSION_DENIED, UNAUTHENTICATED).  Otherwise the head and
the body that came with it (a unary request: ONE tunnel message) start the
tunnel request; the body is the gRPC byte stream itself (wire v3), whose
length prefixes are read only to hold messages to the route's
``max_message_size`` and to show them in the inspector.

Flow control, caller -> tunnel: body bytes are acknowledged to HTTP/2 only
once the tunnel took them (``send_body`` returned True, else at
``writable``).  Tunnel -> caller: credit returns to the tunnel as the HTTP/2
connection frames the bytes for the caller (``sent``).  A slow caller thus
stalls its own call only.

Endings: the backend's status and trailers (relayed exactly); the caller's
RST_STREAM or lost connection (the tunnel request is cancelled, which cancels
the backend call); the deadline (``DEADLINE_EXCEEDED`` here, the backend is
cancelled); the tunnel lost or refusing (``UNAVAILABLE``).
"""

from __future__ import annotations

import time
from typing import Any

from typing import Callable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.dispatch import GrpcDispatcher, GrpcRefusal, GrpcTarget
from tunneld.endpoints import ListenService
from tunneld.inspector import Exchange, Inspector
from tunneld.protocols import grpc_wire as gw
from tunneld.protocols import headers as hd
from tunneld.protocols.h2.connection import (CANCEL, NO_ERROR, H2Connection, H2Limits, Headers, Incoming,
                                             StreamHandler)
from tunneld.protocols.http_entry import trace_id_of
from tunneld.registry.per_address import PerAddressLimit
from tunneld.tunnel import Tunnel

_MAX_CHUNK = s.MAX_CHUNK
_AUTHORIZATION = frozenset({b"authorization"})   # checked here by basic_auth: never forwarded


def parse_method(path: str) -> tuple[str, str] | None:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``; None if malformed."""
    if not path.startswith("/"):
        return None
    service, _, method = path[1:].partition("/")
    if not service or not method or "/" in method:
        return None
    return service, method


class GrpcEntryCall:
    """One external call: its HTTP/2 stream's handler and its tunnel request's handler."""

    log = Logger()

    def __init__(self, conn: GrpcEntryConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.tunnel: Tunnel | None = None
        self.request_id = ""
        self.trace_id = ""
        self.service = "-"
        self.method = "-"
        self.route = "-"
        self.client_id = ""
        self.status = ""
        self.done = False             # our answer (status) is decided
        self.head_sent = False
        self.held = 0                 # caller bytes the tunnel has not taken yet (acknowledged at writable)
        self.scanner: gw.MessageScanner | None = None
        self.out_scanner: gw.MessageScanner | None = None   # responses, only while the inspector records
        self.deadline: IDelayedCall | None = None
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.rec: Exchange | None = None

    # -- from the caller (StreamHandler) ------------------------------------------------------

    def incoming(self, inc: Incoming) -> None:
        if inc.headers is not None:
            self._begin(inc.headers, inc.body, inc.end)
        elif inc.body or inc.end:
            self._caller_body(inc.body, inc.end)

    def _begin(self, headers: Headers, body: bytes, end: bool) -> None:
        fields = dict(headers)
        parsed = parse_method(fields.get(b":path", b"").decode("latin-1"))
        metadata_in = [(n.decode("latin-1"), v) for n, v in headers if n[:1] != b":"]
        self.trace_id = trace_id_of([(n, v) for n, v in headers if n[:1] != b":"])
        content_type = fields.get(b"content-type", b"")
        if fields.get(b":method") != b"POST" or not content_type.startswith(b"application/grpc"):
            # Not a gRPC request at all: an HTTP answer, as grpc servers give.
            self.status = "415"
            self.done = True
            self.conn.send_headers(self.stream_id, [(b":status", b"415"), (b"content-type", b"text/plain")], end=True)
            self.conn.ack(self.stream_id, len(body))
            self._log()
            return
        if parsed is None:
            self._refuse(GrpcRefusal("UNIMPLEMENTED", f"malformed method name {fields.get(b':path', b'')!r}"),
                         body, metadata_in)
            return
        self.service, self.method = parsed
        authority = fields.get(b":authority", b"").decode("latin-1")
        address = self.conn.address
        decision = self.conn.dispatcher.dispatch_grpc(self.service, authority, address,
                                                      fields.get(b"authorization"))
        inspector = self.conn.inspector
        if inspector is not None:
            self._record(inspector, authority, metadata_in, decision)
        if isinstance(decision, GrpcRefusal):
            self._refuse(decision, body, metadata_in)
            return
        timeout = 0.0
        raw_timeout = fields.get(b"grpc-timeout")
        if raw_timeout is not None:
            parsed_timeout = gw.parse_timeout(raw_timeout)
            if parsed_timeout is None:
                self._refuse(GrpcRefusal("INTERNAL", f"malformed grpc-timeout {raw_timeout!r}", decision.route),
                             body, metadata_in)
                return
            timeout = max(parsed_timeout, 0.001)
            self.deadline = self.conn.clock.callLater(timeout, self._deadline_passed)
        self.tunnel = tunnel = decision.tunnel
        self.route = decision.route
        self.client_id = decision.client_id
        self.scanner = gw.MessageScanner(decision.max_message_size,
                                         inspector.body_bytes if self.rec is not None and inspector is not None else 0)
        metadata = gw.metadata_from_h2(headers, _AUTHORIZATION if decision.strip_authorization else frozenset())
        if address:
            metadata.append(pb.Header(name="x-forwarded-for", value=address.encode("latin-1")))
        first, rest = body[:_MAX_CHUNK], body[_MAX_CHUNK:]
        if not self._scan_in(first):
            return
        req = pb.GrpcRequest(
            service=self.service, method=self.method, host=authority, is_first_chunk=True, route=decision.route,
            metadata=metadata,
            timeout=timeout, remote_addr=address, body=first, is_last_chunk=end and not rest,
        )
        if not tunnel.is_open:
            self._fail("UNAVAILABLE", f"tunnel to the client closed: {tunnel.lost_reason or 'closing'}")
            return
        try:
            self.request_id = tunnel.start(pb.TunnelMessage(grpc_request=req, trace_id=self.trace_id),
                                           _TunnelSide(self))
        except s.SessionError as e:
            self._fail("UNAVAILABLE", f"tunnel not available: {e}")
            return
        if self.rec is not None:
            self.rec.request_id = self.request_id
        self.bytes_in += len(first)
        self.conn.ack(self.stream_id, len(first))
        if rest:
            self._caller_body(rest, end)

    def _caller_body(self, body: bytes, end: bool) -> None:
        if self.done or self.tunnel is None:
            self.conn.ack(self.stream_id, len(body))   # after our answer: drained, never relayed
            return
        if not self._scan_in(body):
            return
        self.bytes_in += len(body)
        if self.tunnel.send_body(self.request_id, body, end):
            self.conn.ack(self.stream_id, len(body))
        else:
            self.held += len(body)

    def _scan_in(self, body: bytes) -> bool:
        """Hold the caller's messages to the route's limit (read from the prefixes), as grpc would."""
        if not body or self.scanner is None:
            return True
        scanned = self.scanner.feed(body)
        if self.rec is not None:
            self._record_messages("in", scanned)
        if scanned.error:
            self._fail("RESOURCE_EXHAUSTED", f"Received {scanned.error}" if "larger" in scanned.error
                       else scanned.error)
            return False
        return True

    def sent(self, n: int) -> None:
        """Response bytes were framed for the caller: the tunnel may send that much more."""
        if self.tunnel is not None and self.request_id:
            self.tunnel.consumed(self.request_id, n)

    def closed(self, error_code: int) -> None:
        """The HTTP/2 stream is gone; if our answer was not complete, the caller went away."""
        self._stop_deadline()
        if self.done and self.status:
            return
        self.done = True
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.CANCELLED, "caller cancelled")
        self.status = self.status or "CANCELLED"
        self.conn.cancelled += 1
        self._log()

    # -- from the tunnel (ExchangeHandler) ----------------------------------------------------

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        if self.done:
            return
        resp = msg.grpc_response
        conn, sid = self.conn, self.stream_id
        if self.rec is not None:
            self._record_response(resp)
        if resp.is_first_chunk and not self.head_sent:
            self.head_sent = True
            head = [(b":status", b"200")]
            meta = gw.metadata_to_h2(resp.initial_metadata, gw.STATUS_KEYS)
            if not any(name == b"content-type" for name, _ in meta):
                head.append((b"content-type", b"application/grpc"))
            head.extend(meta)
            if resp.is_last_chunk and not resp.body:
                self._end(resp.status_code, resp.details)
                conn.send_headers(sid, head + gw.status_fields(resp.status_code, resp.details, resp.trailing_metadata),
                                  end=True)
                return
            conn.send_headers(sid, head)
        if resp.body:
            self.bytes_out += len(resp.body)
            conn.send_data(sid, resp.body)
        if resp.is_last_chunk:
            self._end(resp.status_code, resp.details)
            conn.send_trailers(sid, gw.status_fields(resp.status_code, resp.details, resp.trailing_metadata))

    def writable(self) -> None:
        if self.held:
            n, self.held = self.held, 0
            self.conn.ack(self.stream_id, n)

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        if not self.done:
            self._fail("DEADLINE_EXCEEDED" if code == s.TIMEOUT else "UNAVAILABLE", message, cancel_tunnel=False)

    # -- endings -------------------------------------------------------------------------------

    def _deadline_passed(self) -> None:
        self.deadline = None
        if not self.done:
            if self.tunnel is not None and self.request_id:
                self.tunnel.cancel(self.request_id, s.TIMEOUT, "deadline exceeded")
                self.tunnel = None
            self._fail("DEADLINE_EXCEEDED", "Deadline Exceeded", cancel_tunnel=False)

    def _refuse(self, refusal: GrpcRefusal, body: bytes, metadata: list[tuple[str, bytes]]) -> None:
        self.route = refusal.route or "-"
        self.conn.ack(self.stream_id, len(body))
        self._fail(refusal.code, refusal.message, refusal=refusal.reason or refusal.code.lower())

    def _fail(self, code: str, message: str, *, cancel_tunnel: bool = True, refusal: str = "") -> None:
        """Answer the caller with ``code`` now (and end the tunnel request, if it is still on)."""
        if self.done:
            return
        if cancel_tunnel and self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.CANCELLED, message)
        value = gw.STATUS[code]
        if self.rec is not None:
            self.rec.response_status = value
            self.rec.details = message
        self._end(value, message, refusal)
        conn, sid = self.conn, self.stream_id
        try:
            if self.head_sent:
                conn.send_trailers(sid, gw.status_fields(value, message))
            else:
                self.head_sent = True
                conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                                  + gw.status_fields(value, message), end=True)
        except Exception:
            conn.reset(sid, CANCEL)
        if self.held:
            n, self.held = self.held, 0
            conn.ack(sid, n)

    def _end(self, code: int, details: str, refusal: str = "") -> None:
        self.done = True
        self.status = gw.status_name(code)
        self._stop_deadline()
        self._log(refusal)

    def _stop_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    # -- the inspector and the finished record ---------------------------------------------------

    def _record(self, inspector: Inspector, authority: str, metadata: list[tuple[str, bytes]],
                decision: GrpcTarget | GrpcRefusal) -> None:
        rec = self.rec = inspector.begin("grpc")
        rec.trace_id = self.trace_id
        rec.path = self.service
        rec.method = self.method
        rec.host = authority
        rec.request_headers = metadata
        rec.route = decision.route or "-"
        if isinstance(decision, GrpcTarget):
            rec.client_id = decision.client_id
        self.out_scanner = gw.MessageScanner(0, inspector.body_bytes)

    def _record_messages(self, direction: str, scanned: gw.Scanned) -> None:
        rec = self.rec
        assert rec is not None
        if scanned.more:
            rec.message_more(direction, scanned.more, count=False)
        for size, head in scanned.started:
            rec.message(direction, head, size=size)

    def _record_response(self, resp: pb.GrpcResponse) -> None:
        rec = self.rec
        assert rec is not None
        if resp.is_first_chunk:
            rec.response_headers = hd.from_pb(resp.initial_metadata)
        if resp.body and self.out_scanner is not None:
            self._record_messages("out", self.out_scanner.feed(resp.body))
        if resp.is_last_chunk:
            rec.details = resp.details
            rec.trailers = hd.from_pb(resp.trailing_metadata)
            rec.response_status = resp.status_code

    def _log(self, refusal: str = "") -> None:
        if self.rec is not None:
            self.rec.end(self.status)
        record: dict[str, object] = {
            "protocol": "grpc", "method": "POST", "path": f"/{self.service}/{self.method}", "route": self.route,
            "status": self.status, "duration": time.monotonic() - self.started, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "request_id": self.request_id, "trace_id": self.trace_id,
            "client": self.client_id or "-", "address": self.conn.address,
        }
        if refusal and self.status in ("PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"):
            record["refusal"] = refusal
        self.conn.dispatcher.finished(record)


class _TunnelSide:
    """The tunnel's view of a call: its ``closed()`` means the exchange ended normally (not the HTTP/2 stream)."""

    __slots__ = ("call",)

    def __init__(self, call: GrpcEntryCall) -> None:
        self.call = call

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        self.call.message_received(msg, end)

    def writable(self) -> None:
        self.call.writable()

    def closed(self) -> None:
        pass

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.call.aborted(code, message, by_peer)


class GrpcEntryConnection(H2Connection):
    """One caller's HTTP/2 connection to ``grpc_listen``."""

    def __init__(self, factory: GrpcEntryFactory) -> None:
        super().__init__(factory.limits, factory.clock)
        self.factory = factory
        self.dispatcher = factory.dispatcher
        self.inspector = factory.inspector
        self.address = ""
        self.peer_known = False
        self.ip_slot = ""       # the address whose max_connections_per_ip slot this connection holds
        self.cancelled = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.address = hd.address_ip(self.transport.getPeer())
        super().connectionMade()
        refusal = self.factory.admit(self)
        if refusal:
            self.ended_by = refusal
            self.terminate(0xB)   # ENHANCE_YOUR_CALM: GOAWAY, then close

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.factory.release(self)
        if self.ip_slot:
            ip, self.ip_slot = self.ip_slot, ""
            self.factory.per_ip.release(ip)

    def dataReceived(self, data: bytes) -> None:
        if not self.peer_known:
            # Behind the PROXY protocol the caller's address is known only once its header was read,
            # which is before the first byte reaches this protocol.
            self.peer_known = True
            assert self.transport is not None
            self.address = hd.address_ip(self.transport.getPeer())
            if not self.factory.take_ip_slot(self):
                return
        super().dataReceived(data)

    def stream_opened(self, stream_id: int) -> StreamHandler | None:
        if self.factory.draining:
            return super().stream_opened(stream_id)
        return GrpcEntryCall(self, stream_id)


class GrpcEntryFactory(ServerFactory):
    """Builds the caller connections of ``grpc_listen``; counts them (``max_connections``) and drains them."""

    log = Logger()

    def __init__(self, dispatcher: GrpcDispatcher, clock: Any, *, limits: H2Limits = H2Limits(),
                 max_connections: int = 10000, max_connections_per_ip: int = 256,
                 inspector: Inspector | None = None) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.limits = limits
        self.max_connections = max_connections
        self.per_ip = PerAddressLimit(max_connections_per_ip)
        self._per_ip_logged: dict[str, float] = {}
        self.inspector = inspector
        self.connections: set[GrpcEntryConnection] = set()
        self.refused = 0
        self.draining = False
        self.on_change: Callable[[], None] | None = None   # told when a connection goes (the drain waits)

    def buildProtocol(self, addr: Any) -> GrpcEntryConnection:
        return GrpcEntryConnection(self)

    def admit(self, conn: GrpcEntryConnection) -> str:
        """"" to serve ``conn``, else why it is refused (it still counts until it is gone)."""
        self.connections.add(conn)
        if len(self.connections) > self.max_connections:
            self.refused += 1
            return f"max_connections {self.max_connections} reached"
        return ""

    def take_ip_slot(self, conn: GrpcEntryConnection) -> bool:
        """Count ``conn`` against its address's ``max_connections_per_ip``; beyond it: GOAWAY and close."""
        if self.per_ip.acquire(conn.address):
            conn.ip_slot = conn.address
            return True
        now = self.clock.seconds()
        if now - self._per_ip_logged.get(conn.address, -60.0) >= 10.0:   # one line per address per 10 s
            if len(self._per_ip_logged) > 1024:
                self._per_ip_logged = {a: t for a, t in self._per_ip_logged.items() if now - t < 10.0}
            self._per_ip_logged[conn.address] = now
            self.log.warn("{address} holds max_connections_per_ip ({limit}) gRPC connections: new ones get GOAWAY",
                          address=conn.address, limit=self.per_ip.limit)
        conn.ended_by = "max_connections_per_ip"
        conn.terminate(0xB)
        return False

    def release(self, conn: GrpcEntryConnection) -> None:
        self.connections.discard(conn)
        if self.on_change is not None:
            self.on_change()

    def drain(self) -> None:
        """GOAWAY to every connection: no new calls, calls in flight finish."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()

    def cut(self) -> None:
        """The drain is over: close what is left."""
        for conn in list(self.connections):
            conn.terminate(NO_ERROR)


class GrpcEntryService(ListenService):
    """``grpc_listen``: listens; on stop, GOAWAY to every caller, calls in flight get ``grace`` seconds."""

    def __init__(self, endpoint: Any, factory: GrpcEntryFactory, clock: Any, grace: float) -> None:
        super().__init__(endpoint, factory)
        self.entry = factory
        self.clock = clock
        self.grace = grace
        self.port = 0
        self.ready: Deferred[int] = Deferred()   # fires with the bound port

    def startService(self) -> None:
        super().startService()
        assert self._waitingForPort is not None

        def listening(port: Any) -> Any:
            if port is not None:   # None: the listen failed and went to on_failure
                self.port = port.getHost().port
                self.ready.callback(self.port)
            return port

        self._waitingForPort.addCallback(listening)

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()      # no new connections
        factory = self.entry
        factory.drain()
        done: Deferred[None] = Deferred()
        timer = self.clock.callLater(self.grace, lambda: check())

        def check() -> None:
            if done.called:
                return
            if factory.connections and timer.active():
                return
            factory.on_change = None
            if timer.active():
                timer.cancel()
            factory.cut()
            done.callback(None)

        factory.on_change = check
        check()
        return DeferredList([maybeDeferred(lambda: stopped), done]).addCallback(lambda _: None)
