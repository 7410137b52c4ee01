"""twisted.web entry for external HTTP requests, forwarded through a tunnel.

Used by the server's ``http_listen`` (reverse direction) and, later, the
client's ``http_entry`` (forward direction): a ``Dispatcher`` decides which
tunnel a request goes to.

twisted.web normally reads the whole request body (spooling it to a temp
file) before ``render``.  ``EntryRequest`` instead starts the tunnel request as
soon as the headers are in (``gotLength``), forwards every body chunk as it
arrives and pauses the socket while the request's window is exhausted.  The
response is written from ``render`` on, i.e. once the upload is complete; a
response that arrives earlier waits, uncredited, so the window bounds it.
Response bytes are credited back to the tunnel only while the external
socket is not pushing back (we are the request's push producer).
"""

from __future__ import annotations

import re
import time
import uuid
import random
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as Protocol_
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import failure
from twisted.web import http, server
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.inspector import Exchange, Inspector
from tunneld.protocols import headers as h
from tunneld.registry.paths import PathError, normalise_path
from tunneld.registry.per_address import PerAddressLimit
from tunneld.tunnel import CreditGate, Tunnel

_log = Logger()

# Codes an ErrorMessage may carry that the external client sees unchanged.
_PASSED_CODES = {404, 413, 502, 503, 504}


@dataclass(frozen=True)
class Target:
    """Where a request goes: a tunnel and the route's limits."""

    tunnel: Tunnel
    route: str
    timeout: float
    max_body_size: int = 0
    set_host: str = ""
    max_message_size: int = 0   # WebSocket / gRPC message limit of the route
    strip_authorization: bool = False   # basic auth was checked here: the credentials stay here
    client_id: str = field(default="", compare=False)   # the client serving it (inspector)
    max_websockets: int = 0   # open WebSockets the route allows on this entry (0: no limit)
    preserve_path: bool = False   # the backend gets the raw path (else the normalised one)


@dataclass(frozen=True)
class Refusal:
    """Answer the request locally (no route, no client)."""

    status: int
    message: str
    route: str = ""   # the route it matched, if any (for logs and metrics)
    reason: str = ""  # access refusals: ip_denied, ip_not_allowed, no_credentials, ... (metrics label)
    headers: tuple[tuple[bytes, bytes], ...] = ()   # e.g. WWW-Authenticate with a 401


def answer_reason(status: int, message: str, access: str = "") -> str:
    """Why tunneld itself answered ``status`` (the finished record's ``reason``; the dashboard's failure rows).

    ``message`` is the text of the answer (a Refusal's, or the tunnel's
    ErrorMessage); ``access`` an access refusal's metrics reason.
    """
    if access:
        return f"access refused ({access})"
    text = message.lower()
    if "shutting down" in text:
        return "shutting down"
    if status == 404:
        return "no route"
    if "no client connected" in text or "not connected to the server" in text:
        return "no client connected"
    if status == 413:
        return "body too large"
    if "tunnel stream lost" in text or "tunnel not available" in text:
        return "tunnel lost"   # the client's stream ended with the request in flight
    if status == 504 or "timed out" in text or "within" in text:
        return "backend timeout"
    if "unreachable" in text or "refused" in text:
        return "backend refused"
    if "broke off" in text:
        return "backend broke off"
    if "backend" in text:
        return "backend failed"
    if "tunnel" in text or "stream" in text or "client" in text:
        return "tunnel lost"
    return message or f"answered {status}"


class Dispatcher(Protocol):
    def dispatch(self, host: str, path: str, address: str = "",
                 headers: list[tuple[bytes, bytes]] | None = None) -> Target | Refusal:
        """Pick the tunnel for a request from ``address`` (the client's IP), or say why not."""

    def finished(self, record: dict[str, object]) -> None:
        """A request ended (for logs and metrics)."""


def route_normalised(dispatcher: Dispatcher, host: str, raw_path: str, address: str,
                     headers: list[tuple[bytes, bytes]]) -> tuple[str, Target | Refusal]:
    """(path, decision): routes and access rules judge the path as the backend will understand it
    (RFC 3986 normalised); a path that cannot be normalised is a 400 and reaches no route.

    The one place every entry (HTTP/1.1, HTTP/2, the WebSocket handshake, replay) asks it."""
    try:
        path = normalise_path(raw_path)
    except PathError as e:
        return raw_path, Refusal(400, str(e))
    return path, dispatcher.dispatch(host, path, address, headers)


def backend_url(target: Target, uri: str, raw_path: str, path: str, query: str) -> str:
    """The origin-form target the backend gets: the normalised path, or the raw one with ``preserve_path``."""
    if target.preserve_path or path == raw_path:
        return uri
    return f"{path}?{query}" if query else path


def without_authorization(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``pairs`` minus every ``Authorization`` header (checked here, never forwarded)."""
    return [(n, v) for n, v in pairs if n.lower() != b"authorization"]


def trace_id_of(pairs: list[tuple[bytes, bytes]]) -> str:
    """W3C traceparent's trace-id, else X-Request-Id, else a new id."""
    return trace_id_from(h.get_first(pairs, b"traceparent"), h.get_first(pairs, b"x-request-id"))


def trace_id_from(traceparent: bytes | None, request_id: bytes | None) -> str:
    """``trace_id_of`` given the first ``traceparent`` and ``X-Request-Id`` values (None: absent)."""
    if traceparent:
        parts = traceparent.split(b"-")
        if len(parts) >= 4 and len(parts[1]) == 32:
            return parts[1].decode("ascii", "replace")
    if request_id:
        return request_id.decode("latin-1")[:128]
    # Not a secret, only unique: much cheaper than uuid4 on every request.
    return f"{random.getrandbits(128):032x}"


# Names never forwarded by the HTTP entry, beyond the hop-by-hop ones: Expect
# was answered here (twisted sends 100 Continue itself); Authorization when
# the route's basic auth checked it here.
_NOT_FORWARDED = frozenset({b"expect"})
_NOT_FORWARDED_AUTH = frozenset({b"expect", b"authorization"})


@implementer(IPushProducer)
class HttpExchange:
    """One external HTTP request travelling through a tunnel."""

    log = Logger()

    # Per-request state starts as these class-level defaults: __init__ runs
    # for every request, so it stores only what differs per instance.
    tunnel: Tunnel | None = None
    target: Target | None = None
    request_id = ""
    trace_id = ""
    refusal: Refusal | None = None
    pending_head: pb.TunnelMessage | None = None
    rendered = False
    head_received = False
    done = False
    early: list[tuple[pb.TunnelMessage, bool]] | None = None   # messages that came before render
    body_in = 0
    body_out = 0
    status = 0
    timer = False   # the channel's head deadline is armed for this exchange
    socket_paused = False
    request_ended = False
    rec: Exchange | None = None   # the inspector's record (None: inspector off)
    reason = ""        # why tunneld answered itself ("" = the backend's answer)
    made_here = False  # the status is tunneld's own answer, not the backend's

    def __init__(self, request: EntryRequest, dispatcher: Dispatcher, clock: IReactorTime, scheme: str,
                 inspector: Inspector | None = None) -> None:
        self.request = request
        self.channel: EntryChannel = cast(EntryChannel, request.channel)   # kept: the request lets go of it when done
        self.inspector = inspector
        self.dispatcher = dispatcher
        self.clock = clock
        self.scheme = scheme
        self.started = time.monotonic()
        self.gate = CreditGate(self._credit)

    # -- request side (called by EntryRequest) ---------------------------------

    def head(self, length: int | None) -> None:
        req = self.request
        headers = req.requestHeaders
        flat = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
        # twisted's Headers finds a name in any case with one dict look-up.
        hosts = headers.getRawHeaders(b"host")
        host = hosts[0].decode("latin-1") if hosts else ""
        uri = req.uri.decode("latin-1")
        raw_path, _, query = uri.partition("?")
        traceparent = headers.getRawHeaders(b"traceparent")
        request_id = headers.getRawHeaders(b"x-request-id")
        self.trace_id = trace_id_from(traceparent[0] if traceparent else None, request_id[0] if request_id else None)
        client_ip = req.client_ip
        path, decision = route_normalised(self.dispatcher, host, raw_path, client_ip, flat)
        if self.inspector is not None:
            self._record(req, flat, host, uri, client_ip, decision)
        if isinstance(decision, Refusal):
            self.refusal = decision
            return
        if decision.max_body_size and length is not None and length > decision.max_body_size:
            self.refusal = Refusal(413, f"request body of {length} bytes exceeds {decision.max_body_size}")
            return
        self.target = decision
        fwd = h.request_headers_for_backend(
            flat, client_ip=client_ip, proto=self.scheme, host=host, set_host=decision.set_host,
            drop=_NOT_FORWARDED_AUTH if decision.strip_authorization else _NOT_FORWARDED,
        )
        msg = pb.TunnelMessage(trace_id=self.trace_id)
        head = msg.http_request
        head.method = req.method.decode("latin-1")
        head.url = backend_url(decision, uri, raw_path, path, query)
        head.host = host
        head.path = path
        if query:
            head.query = query
        h.fill_pb(head.headers, fwd)
        head.is_first_chunk = True
        head.route = decision.route
        head.scheme = self.scheme
        head.remote_addr = client_ip
        self.tunnel = decision.tunnel
        if length == 0:
            head.is_last_chunk = True
            self.request_ended = True
            self._start(msg)
        else:
            head.content_length = -1 if length is None else length
            # Hold the head for the first body chunk: one message instead of two.
            self.pending_head = msg

    def _start(self, msg: pb.TunnelMessage) -> None:
        assert self.tunnel is not None and self.target is not None
        try:
            self.request_id = self.tunnel.start(msg, self)
        except s.SessionError as e:
            self.refusal = Refusal(502, f"tunnel not available: {e}")
            self.tunnel = None
            return
        self.timer = True
        self.channel.await_head(self, self.target.timeout)
        if self.rec is not None:
            self.rec.request_id = self.request_id

    def _record(self, req: EntryRequest, flat: list[tuple[bytes, bytes]], host: str, uri: str, client_ip: str,
                decision: Target | Refusal) -> None:
        assert self.inspector is not None
        rec = self.rec = self.inspector.begin("http")
        rec.trace_id = self.trace_id
        rec.method = req.method.decode("latin-1")
        rec.path = uri
        rec.host = host
        rec.scheme = self.scheme
        rec.remote = client_ip
        rec.request_headers = flat
        rec.route = decision.route or "-"
        if isinstance(decision, Target):
            rec.client_id = decision.client_id

    def body(self, data: bytes) -> None:
        if self.refusal is not None or self.done:
            return
        self.body_in += len(data)
        if self.rec is not None:
            self.rec.request_chunk(data)
        assert self.target is not None
        if self.target.max_body_size and self.body_in > self.target.max_body_size:
            self._fail_request(413, f"request body exceeds {self.target.max_body_size} bytes")
            return
        if self.pending_head is not None:
            msg, self.pending_head = self.pending_head, None
            first = data[: s.MAX_CHUNK]
            msg.http_request.body = first
            self._start(msg)
            data = data[len(first):]
            if not data:
                return
        if self.tunnel is not None and not self.tunnel.send_body(self.request_id, data):
            self._pause_socket()

    def body_end(self) -> None:
        if self.refusal is not None or self.done or self.request_ended:
            return
        self.request_ended = True
        if self.pending_head is not None:
            msg, self.pending_head = self.pending_head, None
            msg.http_request.is_last_chunk = True
            self._start(msg)
        elif self.tunnel is not None:
            self.tunnel.send_body(self.request_id, b"", end=True)

    def _pause_socket(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self.socket_paused:
            self.socket_paused = True
            transport.pauseProducing()

    def _resume_socket(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and self.socket_paused:
            self.socket_paused = False
            transport.resumeProducing()

    def render(self) -> None:
        """Called from the resource once the whole request was read."""
        self.rendered = True
        if self.refusal is not None:
            self._answer_error(self.refusal.status, self.refusal.message, self.refusal.headers, self.refusal.reason)
            return
        early, self.early = self.early, None
        for msg, end in early or ():
            self.message_received(msg, end)

    # -- tunnel side (ExchangeHandler) -------------------------------------------

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        if not self.rendered:
            if self.early is None:
                self.early = []
            self.early.append((msg, end))
            return
        resp = msg.http_response
        req = self.request
        data = resp.body
        if not self.head_received:
            self.head_received = True
            self._cancel_timer()
            self.status = resp.status_code
            req.setResponseCode(resp.status_code, resp.reason.encode("latin-1") if resp.reason else None)
            headers = req.responseHeaders = Headers()
            add = headers.addRawHeader
            pairs = h.from_pb(resp.headers)
            for name, value in h.response_headers_for_client(pairs):
                add(name, value)
            if self.rec is not None:
                self.rec.response_status = resp.status_code
                self.rec.response_headers = pairs
            if not end:
                # More is coming: from now on the socket's push-back holds the request's credit.
                req.registerProducer(self, True)
            if not data:
                req.write(b"")  # the head goes out now, even before any body
        if data:
            self.body_out += len(data)
            if self.rec is not None:
                self.rec.response_chunk(data)
            req.write(data)
            if not end:
                # (The last message's credit would go nowhere: the peer has ended.)
                self.gate.took(len(data))
        if end:
            self._finish()

    def writable(self) -> None:
        self._resume_socket()

    def closed(self) -> None:
        self._finish()

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.tunnel = None
        if not self.rendered:
            # Answer once the request has been read; stop forwarding its body.
            self.refusal = Refusal(code if code in _PASSED_CODES else 502, message)
            self._resume_socket()
            self._cancel_timer()
            return
        if self.head_received:
            # Mid-body: the only honest signal left is to cut the connection.
            self.log.warn("{route} response aborted mid-body: {message}", route=self._route(), message=message,
                          request_id=self.request_id, trace_id=self.trace_id)
            self._end(abort=True)
        else:
            self._answer_error(code if code in _PASSED_CODES else 502, message)

    # -- IPushProducer for the response body ----------------------------------------

    def pauseProducing(self) -> None:
        self.gate.pauseProducing()

    def resumeProducing(self) -> None:
        self.gate.resumeProducing()

    def _credit(self, n: int) -> None:
        if self.tunnel is not None:
            self.tunnel.consumed(self.request_id, n)

    def stopProducing(self) -> None:
        self._client_gone()

    def connection_lost(self) -> None:
        """The external client's connection closed before the response was complete."""
        self._client_gone()

    # -- endings ---------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.timer = False
        if self.head_received or self.done:
            return
        timeout = self.target.timeout if self.target else 0
        self._fail_request(504, f"no response from the backend within {timeout:g} s")

    def _fail_request(self, status: int, message: str) -> None:
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.TIMEOUT if status == 504 else s.CANCELLED, message)
        self.tunnel = None
        self.pending_head = None
        if self.rendered:
            self._answer_error(status, message)
        else:
            self.refusal = Refusal(status, message)
            self._resume_socket()

    def _client_gone(self) -> None:
        if self.done:
            return
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.CANCELLED, "external client went away")
        self.tunnel = None
        self.pending_head = None
        if not self.head_received:
            self.made_here, self.reason = True, self.reason or "client went away"
        self.status = self.status or 499
        self._end(abort=False, write=False)

    def _answer_error(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = (),
                      access: str = "") -> None:
        if self.done:
            return
        req = self.request
        self.status = status
        self.made_here = True
        self.reason = self.reason or answer_reason(status, message, access)
        body = f"{status} {RESPONSES.get(status, b'').decode()}: {message}\n".encode()
        req.setResponseCode(status)
        req.responseHeaders = Headers()
        req.setHeader(b"content-type", b"text/plain; charset=utf-8")
        req.setHeader(b"content-length", str(len(body)).encode())
        for name, value in headers:
            req.setHeader(name, value)
        if self.rec is not None:
            self.rec.response_status = status
            self.rec.response_headers = [(b"content-type", b"text/plain; charset=utf-8"), *headers]
            self.rec.response_chunk(body)
        req.write(body)
        self._finish()

    def _finish(self) -> None:
        self._end(abort=False)

    def _end(self, abort: bool, write: bool = True) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        req = self.request
        if write and self.rendered and not req.finished and not req._disconnected:
            if req.producer is not None:
                req.unregisterProducer()
            if abort:
                if req.channel is not None and req.channel.transport is not None:
                    req.channel.transport.abortConnection()
            else:
                req.finish()
        if self.rec is not None:
            self.rec.end(self.status)
        client_ip = req.client_ip
        request_id = self.request_id or (self.rec.request_id if self.rec is not None else "") or local_request_id()
        self.dispatcher.finished({
            "protocol": "http", "route": self._route(), "status": self.status,
            "duration": time.monotonic() - self.started, "bytes_in": self.body_in, "bytes_out": self.body_out,
            "request_id": request_id, "trace_id": self.trace_id,
            "reason": self.reason, "answered_by": "tunneld" if self.made_here else "backend",
            "client_id": self.target.client_id if self.target is not None else "",
            "method": req.method.decode("latin-1"), "path": req.path.decode("latin-1", "replace"),
            "client": client_ip,
            "refusal": self.refusal.reason if self.refusal is not None else "",
            "address": client_ip if self.refusal is not None and self.refusal.reason else "",
        })
        # Break the request <-> exchange and exchange <-> gate cycles, so
        # refcounting frees a finished request at once: as cyclic garbage
        # (some 20 objects a request) it fed the collector's pauses.
        req.exchange = None
        self.gate.credit = _discard_credit

    def _cancel_timer(self) -> None:
        if self.timer:
            self.timer = False
            self.channel.head_came(self)

    def _route(self) -> str:
        if self.target is not None:
            return self.target.route
        return self.refusal.route if self.refusal is not None and self.refusal.route else "-"


def local_request_id() -> str:
    """A request_id for a request tunneld answered before it reached any tunnel (logs, failure rows)."""
    return f"local-{uuid.uuid4().hex[:12]}"


def _discard_credit(n: int) -> None:
    """Credit of an exchange that has ended: the tunnel has forgotten the request."""


def is_websocket_upgrade(request: server.Request) -> bool:
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade")
    if upgrade is None:   # nearly every request: no generator built
        return False
    return request.method == b"GET" and any(b"websocket" in v.lower() for v in upgrade)


class EntryRequest(server.Request):
    """A twisted.web request whose body streams into the tunnel.

    WebSocket upgrades get no HTTP exchange: the site's WebSocket resource
    takes the connection over in ``render``, through twisted.web's usual
    ``requestReceived`` / ``process`` / ``render`` path.

    An HTTP exchange skips the per-request work twisted.web does for
    resources we do not have (the profile showed it as a large part of a
    small request's CPU): no peer/host address look-ups per request (the
    channel keeps them; ``getsockname`` is a system call), no cookie parsing,
    no query or form decoding, no resource traversal, no ``Server``/``Date``
    headers that the backend's own head replaces, no ``notifyFinish``
    Deferred (``connectionLost`` tells the exchange directly).
    """

    exchange: HttpExchange | None = None   # None again once the exchange has ended
    upgrade = False   # a WebSocket upgrade: twisted.web's own path to the WebSocket resource
    saw_transfer_encoding = False   # a Transfer-Encoding line was read (a second one is 400)
    defaultContentType = None  # never invent a Content-Type the backend did not send

    def __init__(self, channel: EntryChannel, *args: object, **kwargs: object) -> None:
        # What http.Request.__init__ and Componentized.__init__ set, minus the
        # per-request address look-ups and anything only form parsing reads.
        self.notifications: list[Any] = []
        self.channel = channel
        self.client, self.host, self.client_ip = channel.addresses()
        self.requestHeaders = Headers()
        self.received_cookies: dict[bytes, bytes] = {}   # never filled: cookies travel as headers
        self.responseHeaders = Headers()
        self.cookies: list[bytes] = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False
        self._adapterCache: dict[Any, Any] = {}

    def parseCookies(self) -> None:
        pass  # cookies are forwarded as the Cookie header; nobody here reads them

    def gotLength(self, length: int | None) -> None:
        self.content = _NullContent()
        channel = self.channel
        self.method = channel._command  # twisted fills these only after the body
        self.uri = channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        site: EntrySite = channel.site
        if site.websocket is not None and is_websocket_upgrade(self):
            self.upgrade = True
            return
        self.exchange = HttpExchange(self, site.dispatcher, site.clock, site.scheme, site.inspector)
        self.exchange.head(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.upgrade:
            super().requestReceived(command, path, version)
            return
        exchange = self.exchange
        if exchange is None:
            return   # ended already (its connection is going away)
        exchange.body_end()
        # method, uri, path and clientproto were set in gotLength; the query
        # is forwarded as it came, so nothing is decoded here.
        self.args = {}   # type: ignore[assignment]  # twisted declares None until parsed
        self.site = self.channel.site
        self.prepath = []
        self.postpath = []
        try:
            exchange.render()
        except BaseException:
            self.processingFailed(failure.Failure())

    def connectionLost(self, reason: failure.Failure) -> None:
        super().connectionLost(reason)
        if self.exchange is not None:
            # Before the response is done (finished requests are no longer the
            # channel's): cancel travels to the client at once, mid-upload too.
            self.exchange.connection_lost()


class _NullContent:
    """Stands in for twisted.web's spooled body: we never keep it."""

    def tell(self) -> int:
        return 0

    def seek(self, *args: object) -> int:
        return 0

    def read(self, *args: object) -> bytes:
        return b""

    def close(self) -> None:
        pass


class EntryResource(Resource):
    isLeaf = True

    def render(self, request: EntryRequest) -> object:  # type: ignore[override]
        if request.exchange is None:
            site: EntrySite = request.channel.site
            assert site.websocket is not None
            # The WebSocket protocol takes the transport over; the channel
            # keeps counting until it ends (EntryWebSocket.connectionLost),
            # but its timers go now (its connectionLost never comes).
            request.channel.stop_timers()
            return site.websocket.render(request)
        request.exchange.render()
        return server.NOT_DONE_YET


#: A chunk size of more hex digits than this cannot be a size anyone sends (2**64 bytes).
MAX_CHUNK_SIZE_DIGITS = 16
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]*")


class _StrictChunkedDecoder(http._ChunkedTransferDecoder):  # type: ignore[misc]
    """twisted's chunked decoder, refusing a chunk-size line that cannot be a chunk size at once.

    twisted reads any number of hex digits and then waits for that many bytes
    (a 20-digit size held the connection until a timeout): more than
    ``MAX_CHUNK_SIZE_DIGITS`` digits, or a size ``too_big`` says the route
    will never take, raise the decoder's own error, which the channel answers
    with 400 and a close."""

    def __init__(self, data_callback: Any, finish_callback: Any, too_big: Any) -> None:
        super().__init__(data_callback, finish_callback)
        self.too_big = too_big

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        digits = _HEX_RUN.match(self._buffer)
        if digits is not None and digits.end() > MAX_CHUNK_SIZE_DIGITS:
            raise http._MalformedChunkedDataError("chunk size of more than 16 hex digits")
        done: bool = super()._dataReceived_CHUNK_LENGTH()
        if done and self.length and self.too_big(self.length):
            raise http._MalformedChunkedDataError("chunk size above the route's body limit")
        return done


class EntryChannel(http.HTTPChannel):
    """An HTTPChannel that owes its site a complete request head within ``header_timeout``.

    twisted.web's idle timeout restarts with every byte, so a client sending
    one header line every few seconds (slowloris) would hold the connection
    for ever.  ``head_since`` is when the channel started waiting for the
    current request head (at connect, and when a keep-alive request is done)
    and None while a request is being handled; the site's sweep closes
    channels that waited longer than ``header_timeout``.  The hot path pays
    one attribute store per request and one clock read per keep-alive request.
    """

    site: EntrySite
    head_since: float | None = None
    counted = False
    ip_slot = ""   # the address whose max_connections_per_ip slot this connection holds ("" none yet)
    refused = False   # over max_connections_per_ip: answered 503, closing, nothing parsed
    _addresses: tuple[Any, Any, str] | None = None

    def addresses(self) -> tuple[Any, Any, str]:
        """(peer, host, client IP) of this connection, asked of the transport once (not per request)."""
        if self._addresses is None:
            peer = self.getPeer()
            self._addresses = (peer, self.getHost(), h.address_ip(peer))
        return self._addresses

    def connectionMade(self) -> None:
        super().connectionMade()
        self.head_since = self.site.clock.seconds()
        if not self.site.proxy_protocol and not self.ip_slot:   # the HTTP/2 switch may have taken it at connect
            self._take_ip_slot()

    def _take_ip_slot(self) -> bool:
        """Count this connection against its address's ``max_connections_per_ip``; False: refused and closing.

        With the PROXY protocol the address is known only once the header
        was read, i.e. at the first bytes the wrapper hands on."""
        ip = self.addresses()[2]
        if self.site.per_ip.acquire(ip):
            self.ip_slot = ip
            return True
        self.refused = True
        self.head_since = None
        self.site.log_per_ip_refusal(ip)
        transport = self.transport
        if transport is not None:
            transport.write(_OVERLOADED_IP)
            transport.loseConnection()
        return False

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if not self.ip_slot and not self._take_ip_slot():
            return
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self.head_since = None
        super().allHeadersReceived()

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Transfer-Encoding":
            # twisted takes "chunked" then "identity" as chunked (the README
            # promises 400): a second Transfer-Encoding line is refused.
            request = self.requests[-1]
            if getattr(request, "saw_transfer_encoding", False):
                return self._failChooseTransferDecoder()  # type: ignore[no-any-return]
            request.saw_transfer_encoding = True
        ok: bool = super()._maybeChooseTransferDecoder(header, data)
        if ok and type(self._transferDecoder) is http._ChunkedTransferDecoder:
            request = self.requests[-1]
            self._transferDecoder = _StrictChunkedDecoder(request.handleContentChunk, self._finishRequestBody,
                                                          lambda size: _chunk_too_big(request, size))
        return ok

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            # Before the buffered (pipelined) bytes are replayed, which may
            # complete the next head at once.
            self.head_since = self.site.clock.seconds()
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self.release()
        super().connectionLost(reason)
        self.stop_timers()

    def stop_timers(self) -> None:
        """The connection closed or was handed over (WebSocket): neither timer may keep it alive."""
        self._idle_on = False
        for call in (self._deadline_call, self._idle_call):
            if call is not None and call.active():
                call.cancel()
        self._deadline_call = self._idle_call = None
        self._waiting = None

    # -- timers --------------------------------------------------------------
    #
    # One request at a time waits for its response head on a channel (twisted
    # reads a pipelined request only once the previous one is done), and the
    # idle timeout of twisted's TimeoutMixin is off exactly while a request is
    # handled.  Cancelling a DelayedCall and making a new one for every
    # request is a heap insert plus a cancellation each; instead each timer
    # is one DelayedCall per channel that is moved (``DelayedCall.reset``,
    # cheap when later) and, when "off", left to fire into a flag.  A busy
    # keep-alive connection makes one DelayedCall per period, not per request.

    _deadline_call: IDelayedCall | None = None
    _waiting: HttpExchange | None = None   # the exchange whose response head is due
    _idle_call: IDelayedCall | None = None
    _idle_on = False

    def await_head(self, exchange: HttpExchange, timeout: float) -> None:
        """``exchange`` times out unless ``head_came(exchange)`` within ``timeout`` seconds."""
        self._waiting = exchange
        call = self._deadline_call
        if call is not None and call.active():
            call.reset(timeout)
        else:
            self._deadline_call = self.site.clock.callLater(timeout, self._deadline_passed)

    def head_came(self, exchange: HttpExchange) -> None:
        if self._waiting is exchange:
            self._waiting = None

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        exchange, self._waiting = self._waiting, None
        if exchange is not None:
            exchange._timed_out()

    def setTimeout(self, period: float | None) -> float | None:
        """TimeoutMixin.setTimeout, keeping its DelayedCall when turned off (see above)."""
        previous = self.timeOut
        self.timeOut = period   # type: ignore[assignment]  # TimeoutMixin says int; floats work
        if period is None:
            self._idle_on = False
            return previous
        self._idle_on = True
        call = self._idle_call
        if call is not None and call.active():
            call.reset(period)
        else:
            self._idle_call = self.callLater(period, self._idle_passed)
        return previous

    def resetTimeout(self) -> None:
        call = self._idle_call
        if self._idle_on and call is not None and self.timeOut is not None and call.active():
            call.reset(self.timeOut)

    def _idle_passed(self) -> None:
        self._idle_call = None
        if self._idle_on:
            self._idle_on = False
            self.timeoutConnection()

    def release(self) -> None:
        """This connection no longer counts (closed, or handed to a WebSocket that ended)."""
        if self.counted:
            self.counted = False
            self.site.connection_closed(self)
        if self.ip_slot:
            ip, self.ip_slot = self.ip_slot, ""
            self.site.per_ip.release(ip)


def _chunk_too_big(request: Any, size: int) -> bool:
    """Is one chunk of ``size`` bytes alone above ``request``'s route ``max_body_size``?

    (A body that grows past the limit over several chunks gets 413 as before.)"""
    exchange = getattr(request, "exchange", None)
    target = exchange.target if exchange is not None else None
    if target is None or not target.max_body_size:
        return False
    return size > target.max_body_size


class _EntryProtocol(http._GenericHTTPChannelProtocol):  # type: ignore[misc]
    """twisted.web's protocol switcher, releasing our channel's count whatever channel ends up serving."""

    def __init__(self, channel: EntryChannel) -> None:
        super().__init__(channel)
        self._entry_channel = channel

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._entry_channel.release()   # idempotent; covers a switch to another channel (h2)


_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 28\r\n"
               b"Connection: close\r\n\r\n503 too many connections\r\n\r\n")


_OVERLOADED_IP = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 44\r\n"
                  b"Connection: close\r\n\r\n503 too many connections from your address\r\n")


class _Overloaded(Protocol_):
    """Beyond ``max_connections``: answer 503 and close, nothing parsed, nothing kept."""

    def connectionMade(self) -> None:
        self.transport.write(_OVERLOADED)
        self.transport.loseConnection()


class EntrySite(server.Site):
    """The HTTP entry: every request goes to the dispatcher.

    Limits against abuse live here: ``max_connections`` (a new connection
    beyond it gets a canned 503 and is closed) and ``header_timeout`` (a
    sweep every ``header_timeout / 4`` seconds, at most 1 s, closes
    connections that have waited longer for a complete request head).
    """

    requestFactory = EntryRequest

    def protocol(self) -> Any:  # type: ignore[override]
        return _EntryProtocol(EntryChannel())

    def __init__(self, dispatcher: Dispatcher, clock: IReactorTime, *, scheme: str = "http",
                 max_header_size: int = 16384, websocket: Any = None, header_timeout: float = 20.0,
                 max_connections: int = 10000, inspector: Inspector | None = None,
                 max_connections_per_ip: int = 256, proxy_protocol: bool = False) -> None:
        super().__init__(EntryResource(), reactor=clock)   # twisted.web's own timers on the same clock
        self.inspector = inspector   # None: the inspector is off, nothing recorded
        self.websocket = websocket  # renders upgrade requests (autobahn's WebSocketResource)
        self.dispatcher = dispatcher
        self.clock = clock
        self.scheme = scheme
        self.max_header_size = max_header_size
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.displayTracebacks = False
        self.channels: set[EntryChannel] = set()
        self.refused_connections = 0
        self.header_timeouts = 0
        # max_connections_per_ip: counted on the channel once its address is
        # known (at connect; after the PROXY header when proxy_protocol is on).
        self.per_ip = PerAddressLimit(max_connections_per_ip)
        self.proxy_protocol = proxy_protocol
        self._per_ip_logged: dict[str, float] = {}
        self._sweeper: LoopingCall | None = None

    def startFactory(self) -> None:
        super().startFactory()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(min(1.0, self.header_timeout / 4), now=False)

    def stopFactory(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        super().stopFactory()

    def buildProtocol(self, addr: object) -> object:
        if len(self.channels) >= self.max_connections:
            self.refused_connections += 1
            return _Overloaded()
        protocol = super().buildProtocol(addr)
        # Site wraps the HTTPChannel (to allow protocol switching); the limit
        # belongs on the channel itself.
        channel = getattr(protocol, "_channel", protocol)
        channel.totalHeadersSize = self.max_header_size
        channel.counted = True
        self.channels.add(channel)
        return protocol

    def connection_closed(self, channel: EntryChannel) -> None:
        self.channels.discard(channel)

    @property
    def refused_per_ip(self) -> int:
        """Connections answered 503 for ``max_connections_per_ip``."""
        return self.per_ip.refused

    def log_per_ip_refusal(self, ip: str) -> None:
        """One warning per address per 10 s: an attack must not flood the log as well."""
        now = self.clock.seconds()
        last = self._per_ip_logged.get(ip)
        if last is not None and now - last < 10.0:
            return
        if len(self._per_ip_logged) > 1024:
            self._per_ip_logged = {a: t for a, t in self._per_ip_logged.items() if now - t < 10.0}
        self._per_ip_logged[ip] = now
        _log.warn("{address} holds max_connections_per_ip ({limit}) connections: new ones get 503",
                  address=ip, limit=self.per_ip.limit)

    @property
    def connections(self) -> int:
        return len(self.channels)

    def sweep(self) -> None:
        """Close every connection that has waited longer than ``header_timeout`` for a request head."""
        now = self.clock.seconds()
        late = now - self.header_timeout
        for channel in [c for c in self.channels if c.head_since is not None and c.head_since <= late]:
            if channel._waitingForTransport:
                # Still writing the last response to a slow reader: its head is not due yet.
                channel.head_since = now
                continue
            self.header_timeouts += 1
            channel.head_since = None
            transport = channel.transport
            if transport is None:
                continue
            if channel._receivedHeaderSize or getattr(channel, "_buffer", b""):
                transport.abortConnection()   # a head begun and not finished: slowloris, no courtesy
            else:
                transport.loseConnection()    # an idle keep-alive connection: a clean close

    def log(self, request: object) -> None:
        pass  # one line per request comes from the dispatcher's ``finished``
