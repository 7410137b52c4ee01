"""HTTP/2 on the HTTP entry (server ``http_listen``, client ``http_entry``), beside HTTP/1.1.

Theory of operation
-------------------
The switch (switch.py) hands a connection that speaks HTTP/2 to an
``H2EntryConnection`` (HTTP/2 server role over connection.py).  Each
request stream is an ``H2EntryStream``: the stream's handler and, through
``_TunnelSide``, its tunnel request's handler.  All on the reactor thread.

A stream is the HTTP/1.1 entry's exchange (http_entry.py) in HTTP/2 form:
the same dispatcher (routes, access rules, 404/502/503/403/401/429
refusals with the same bodies), the same header rules (hop-by-hop headers
dropped, ``X-Forwarded-*`` added, ``Authorization`` kept here when basic
auth checked it), the same limits (``max_body_size`` -> 413, the route's
timeout -> 504), the same inspector record and finished record.  The
backend still gets HTTP/1.1: the tunnel carries the same ``HttpRequest`` /
``HttpResponse`` messages, with ``:authority`` as the Host header and the
cookie fields joined into one (RFC 9113 §8.2.3).

Flow control, external client -> tunnel: body bytes are acknowledged to
HTTP/2 only once the tunnel took them (``send_body`` returned True, else at
``writable``), so a client has at most one stream window in flight.  Tunnel
-> client: credit returns to the tunnel as HTTP/2 frames the bytes
(``sent``).  A slow reader stalls its own stream only.

Unlike HTTP/1.1, a response may stream while the request body still
arrives.  Once the answer is complete, a request body still coming is read
and dropped (as HTTP/1.1 reads it before answering).  Response
headers are lower-cased; hop-by-hop ones (connection, keep-alive,
transfer-encoding, upgrade, ...) are not valid in HTTP/2 and are dropped.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http import RESPONSES

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.inspector import Exchange
from tunneld.protocols import headers as h
from tunneld.protocols.h2.connection import (CANCEL, ENHANCE_YOUR_CALM, INTERNAL_ERROR, H2Connection, H2Limits, Headers,
                                             Incoming, StreamHandler)
from tunneld.protocols.http_entry import (_NOT_FORWARDED, _NOT_FORWARDED_AUTH, _PASSED_CODES, Refusal, Target,
                                          backend_url, route_normalised, trace_id_of)

_MAX_CHUNK = s.MAX_CHUNK


def request_fields(headers: Headers) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]:
    """Pseudo-headers, and the regular fields as HTTP/1.1 has them: Host first, cookies joined."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host = b""
    for name, value in headers:
        if name[:1] == b":":
            pseudo[name] = value
        elif name == b"cookie":
            if not cookies:
                regular.append((b"cookie", b""))   # its place in the order
            cookies.append(value)
        elif name == b"host":
            host = host or value
        else:
            regular.append((name, value))
    if cookies:
        regular[[n for n, _ in regular].index(b"cookie")] = (b"cookie", b"; ".join(cookies))
    authority = pseudo.get(b":authority") or host
    if authority:
        regular.insert(0, (b"host", authority))
    return pseudo, regular


def response_head(status: int, pairs: list[tuple[bytes, bytes]]) -> Headers:
    """An HTTP/2 response head: ``:status``, lower-case names, nothing hop-by-hop."""
    out = [(b":status", str(status).encode("ascii"))]
    for name, value in h.response_headers_for_client(pairs):
        low = name.lower()
        if low in h.HOP_BY_HOP or low[:1] == b":":
            continue
        out.append((low, value))
    return out


def error_body(status: int, message: str) -> bytes:
    """The HTTP/1.1 entry's answer body, byte for byte."""
    return f"{status} {RESPONSES.get(status, b'').decode()}: {message}\n".encode()


class H2EntryStream:
    """One external request on an HTTP/2 stream, travelling through a tunnel."""

    log = Logger()

    def __init__(self, conn: H2EntryConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.tunnel: Any = None          # the Tunnel while the request is on it
        self.target: Target | None = None
        self.refusal: Refusal | None = None
        self.request_id = ""
        self.trace_id = ""
        self.method = "-"
        self.path = "-"
        self.status = 0
        self.head_sent = False
        self.done = False                # our answer is complete (or the stream is gone)
        self.request_ended = False       # the client ended its body
        self.response_ended = False      # the tunnel delivered the last response message
        self.held = 0                    # request bytes the tunnel has not taken yet (acked at writable)
        self.timer: IDelayedCall | None = None
        self.started = time.monotonic()
        self.body_in = 0
        self.body_out = 0
        self.rec: Exchange | None = None

    # -- from the external client (StreamHandler) -------------------------------------------

    def incoming(self, inc: Incoming) -> None:
        if inc.headers is not None:
            self._begin(inc.headers, inc.body, inc.end)
        elif inc.body or inc.end:
            self._body(inc.body, inc.end)

    def _begin(self, headers: Headers, body: bytes, end: bool) -> None:
        conn = self.conn
        site = conn.site
        pseudo, flat = request_fields(headers)
        host = flat[0][1].decode("latin-1") if flat and flat[0][0] == b"host" else ""
        self.method = pseudo.get(b":method", b"-").decode("latin-1")
        uri = pseudo.get(b":path", b"").decode("latin-1")
        self.path, _, query = uri.partition("?")
        self.trace_id = trace_id_of(flat)
        self.request_ended = end
        if not uri.startswith("/"):
            # CONNECT (RFC 8441 WebSocket included) and asterisk forms: this entry does not tunnel them.
            self.refusal = Refusal(400, f"{self.method} {uri or '(no path)'} is not served over HTTP/2")
            self._answer_error(self.refusal.status, self.refusal.message)
            conn.ack(self.stream_id, len(body))
            return
        client_ip = conn.address
        raw_path = self.path
        self.path, decision = route_normalised(site.dispatcher, host, raw_path, client_ip, flat)
        if site.inspector is not None:
            self._record(site.inspector, flat, host, uri, client_ip, decision)
        if isinstance(decision, Refusal):
            self.refusal = decision
            conn.ack(self.stream_id, len(body))
            self._answer_error(decision.status, decision.message, decision.headers)
            return
        length = _content_length(flat)
        if end:
            length = len(body)
        if decision.max_body_size and length is not None and length > decision.max_body_size:
            self.refusal = Refusal(413, f"request body of {length} bytes exceeds {decision.max_body_size}")
            conn.ack(self.stream_id, len(body))
            self._answer_error(413, self.refusal.message)
            return
        self.target = decision
        fwd = h.request_headers_for_backend(
            flat, client_ip=client_ip, proto=site.scheme, host=host, set_host=decision.set_host,
            drop=_NOT_FORWARDED_AUTH if decision.strip_authorization else _NOT_FORWARDED,
        )
        first, rest = body[:_MAX_CHUNK], body[_MAX_CHUNK:]
        msg = pb.TunnelMessage(trace_id=self.trace_id)
        head = msg.http_request
        head.method = self.method
        head.url = backend_url(decision, uri, raw_path, self.path, query)
        head.host = host
        head.path = self.path
        if query:
            head.query = query
        h.fill_pb(head.headers, fwd)
        head.is_first_chunk = True
        head.route = decision.route
        head.scheme = site.scheme
        head.remote_addr = client_ip
        head.body = first
        if end and not rest:
            head.is_last_chunk = True
        else:
            head.content_length = -1 if length is None else length
        tunnel = decision.tunnel
        try:
            self.request_id = tunnel.start(msg, _TunnelSide(self))
        except s.SessionError as e:
            self.refusal = Refusal(502, f"tunnel not available: {e}")
            conn.ack(self.stream_id, len(body))
            self._answer_error(502, self.refusal.message)
            return
        self.tunnel = tunnel
        if self.rec is not None:
            self.rec.request_id = self.request_id
            if first:
                self.rec.request_chunk(first)
        self.body_in = len(first)
        self.timer = site.clock.callLater(decision.timeout, self._timed_out)
        conn.ack(self.stream_id, len(first))
        if rest:
            self._body(rest, end)

    def _body(self, data: bytes, end: bool) -> None:
        if end:
            self.request_ended = True
        if self.tunnel is None or self.done:
            self.conn.ack(self.stream_id, len(data))   # after our answer: drained, never relayed
            return
        self.body_in += len(data)
        if self.rec is not None and data:
            self.rec.request_chunk(data)
        target = self.target
        if target is not None and target.max_body_size and self.body_in > target.max_body_size:
            self.conn.ack(self.stream_id, len(data))
            self._fail_request(413, f"request body exceeds {target.max_body_size} bytes")
            return
        if self.tunnel.send_body(self.request_id, data, end):
            self.conn.ack(self.stream_id, len(data))
        else:
            self.held += len(data)

    def sent(self, n: int) -> None:
        """Response bytes were framed for the client: the tunnel may send that much more."""
        if self.tunnel is not None and not self.response_ended:
            self.tunnel.consumed(self.request_id, n)

    def closed(self, error_code: int) -> None:
        """The HTTP/2 stream is gone; if our answer was not complete, the client went away."""
        self._cancel_timer()
        if self.done:
            return
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.CANCELLED, "external client went away")
        self.tunnel = None
        self.status = self.status or 499
        self._end()

    # -- from the tunnel (ExchangeHandler, through _TunnelSide) --------------------------------

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        if self.done:
            return
        try:
            self._relay(msg, end)
        except Exception:
            # nghttp2 refused what we queued (a stream it already closed, a head it will not send):
            # the stream goes, the tunnel request with it; never a stream left hanging.
            self.log.failure("HTTP/2 response on {route} failed", route=self._route(), request_id=self.request_id,
                             trace_id=self.trace_id)
            if self.tunnel is not None and self.request_id:
                self.tunnel.cancel(self.request_id, s.CANCELLED, "HTTP/2 response failed")
            self.tunnel = None
            self.conn.reset(self.stream_id, INTERNAL_ERROR)
            self.status = self.status or 502
            self._end()

    def _relay(self, msg: pb.TunnelMessage, end: bool) -> None:
        resp = msg.http_response
        conn, sid = self.conn, self.stream_id
        data = resp.body
        if end:
            self.response_ended = True
        if not self.head_sent:
            self._cancel_timer()
            pairs = h.from_pb(resp.headers)
            conn.send_headers(sid, response_head(resp.status_code, pairs), end=end and not data)
            self.head_sent = True
            self.status = resp.status_code
            if self.rec is not None:
                self.rec.response_status = resp.status_code
                self.rec.response_headers = pairs
        elif end and not data:
            conn.end_stream(sid)
        if data:
            self.body_out += len(data)
            if self.rec is not None:
                self.rec.response_chunk(data)
            conn.send_data(sid, data, end=end)
        if end:
            self._finish()

    def writable(self) -> None:
        if self.held:
            n, self.held = self.held, 0
            self.conn.ack(self.stream_id, n)

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.tunnel = None
        if self.done:
            return
        if self.head_sent:
            # Mid-body: the honest signal is to reset the stream (HTTP/1.1 cuts the connection).
            self.log.warn("{route} response aborted mid-body: {message}", route=self._route(), message=message,
                          request_id=self.request_id, trace_id=self.trace_id)
            self.conn.reset(self.stream_id, INTERNAL_ERROR)
            self._end()
            return
        self._answer_error(code if code in _PASSED_CODES else 502, message)

    # -- endings ------------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.timer = None
        if self.head_sent or self.done:
            return
        timeout = self.target.timeout if self.target else 0
        self._fail_request(504, f"no response from the backend within {timeout:g} s")

    def _fail_request(self, status: int, message: str) -> None:
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.TIMEOUT if status == 504 else s.CANCELLED, message)
        self.tunnel = None
        if self.head_sent:
            self.conn.reset(self.stream_id, CANCEL)
            self._end()
            return
        self.refusal = Refusal(status, message)
        self._answer_error(status, message)

    def _answer_error(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if self.done:
            return
        self.status = status
        self.head_sent = True
        self._cancel_timer()
        body = error_body(status, message)
        head = [(b":status", str(status).encode("ascii")), (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("ascii"))]
        head.extend((name.lower(), value) for name, value in headers)
        if self.rec is not None:
            self.rec.response_status = status
            self.rec.response_headers = [(b"content-type", b"text/plain; charset=utf-8"), *headers]
            self.rec.response_chunk(body)
        conn, sid = self.conn, self.stream_id
        conn.send_headers(sid, head)
        conn.send_data(sid, body, end=True)
        self._finish()

    def _finish(self) -> None:
        self._end()
        self._stop_upload()

    def _stop_upload(self) -> None:
        """Our answer is out: a request body still coming is read and dropped, as the HTTP/1.1 entry does.

        (RFC 9113 §8.1 would allow RST_STREAM(NO_ERROR) here, but curl 7.88
        then drops the answer it has already received: measured, a 413 became
        "stream error".)  The tunnel request, if still on, ends here.
        """
        if self.held:
            n, self.held = self.held, 0
            self.conn.ack(self.stream_id, n)
        if not self.request_ended and self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.CANCELLED, "response complete before the request body")
            self.tunnel = None

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if self.rec is not None:
            self.rec.end(self.status)
        conn = self.conn
        refusal = self.refusal
        conn.site.dispatcher.finished({
            "protocol": "http", "route": self._route(), "status": self.status,
            "duration": time.monotonic() - self.started, "bytes_in": self.body_in, "bytes_out": self.body_out,
            "request_id": self.request_id, "trace_id": self.trace_id,
            "method": self.method, "path": self.path,
            "client": conn.address,
            "refusal": refusal.reason if refusal is not None else "",
            "address": conn.address if refusal is not None and refusal.reason else "",
        })

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _route(self) -> str:
        if self.target is not None:
            return self.target.route
        return self.refusal.route if self.refusal is not None and self.refusal.route else "-"

    def _record(self, inspector: Any, flat: list[tuple[bytes, bytes]], host: str, uri: str, client_ip: str,
                decision: Target | Refusal) -> None:
        rec = self.rec = inspector.begin("http")
        rec.trace_id = self.trace_id
        rec.method = self.method
        rec.path = uri
        rec.host = host
        rec.scheme = self.conn.site.scheme
        rec.remote = client_ip
        rec.request_headers = flat
        rec.route = decision.route or "-"
        if isinstance(decision, Target):
            rec.client_id = decision.client_id


def _content_length(pairs: list[tuple[bytes, bytes]]) -> int | None:
    value = h.get_first(pairs, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None   # nghttp2 refuses a malformed one before we see it


class _TunnelSide:
    """The tunnel's view of a stream: its ``closed()`` means the exchange ended normally."""

    __slots__ = ("stream",)

    def __init__(self, stream: H2EntryStream) -> None:
        self.stream = stream

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        self.stream.message_received(msg, end)

    def writable(self) -> None:
        self.stream.writable()

    def closed(self) -> None:
        self.stream.tunnel = None

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.stream.aborted(code, message, by_peer)


class H2EntryConnection(H2Connection):
    """One external client's HTTP/2 connection to the HTTP entry."""

    def __init__(self, entry: H2Entry, place: Any, since: float | None = None) -> None:
        super().__init__(entry.limits, entry.site.clock)
        self.entry = entry
        self.site = entry.site
        self.place = place      # the site's unused HTTP/1.1 channel: this connection's place in its count
        self.since = since      # when the connection came (before the switch read the preface)
        self.address = ""
        self.ip_slot = ""       # the address whose max_connections_per_ip slot this connection holds

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.address = h.address_ip(self.transport.getPeer())
        self.entry.connections.add(self)
        super().connectionMade()
        # The switch counted the connection at connect, unless a PROXY header hid the address then; it has
        # read the preface since, so the header (if any) was read too: the address is the caller's.
        if getattr(self.place, "ip_slot", ""):
            pass
        elif self.site.per_ip.acquire(self.address):
            self.ip_slot = self.address
        else:
            self.site.log_per_ip_refusal(self.address)
            self.ended_by = "max_connections_per_ip"
            self.terminate(ENHANCE_YOUR_CALM)
            return
        timeout = self.limits.header_timeout
        if timeout > 0 and self.since is not None and not self.handlers:
            # header_timeout counts from the connect, as on HTTP/1.1, not from the preface.
            self._arm(max(timeout - (self.clock.seconds() - self.since), 0.001), "no request within header_timeout")

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.entry.connections.discard(self)
        if self.ip_slot:
            ip, self.ip_slot = self.ip_slot, ""
            self.site.per_ip.release(ip)
        release = getattr(self.place, "release", None)
        self.place = None
        if release is not None:
            release()

    def stream_opened(self, stream_id: int) -> StreamHandler | None:
        if self.entry.draining:
            return super().stream_opened(stream_id)
        return H2EntryStream(self, stream_id)


class H2Entry:
    """The HTTP/2 side of an HTTP entry (``EntrySite``): builds its connections, GOAWAY to them on stop."""

    def __init__(self, site: Any, *, idle_timeout: float = 60.0) -> None:
        self.site = site
        self.limits = H2Limits(max_header_list_size=site.max_header_size, header_timeout=site.header_timeout,
                               idle_timeout=idle_timeout)
        self.connections: set[H2EntryConnection] = set()
        self.draining = False

    def build(self, addr: Any, place: Any, since: float | None = None) -> H2EntryConnection:
        return H2EntryConnection(self, place, since)

    def doStart(self) -> None:
        self.draining = False

    def doStop(self) -> None:
        """The port stopped listening: GOAWAY to every connection; streams in flight finish."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()
