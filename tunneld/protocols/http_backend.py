"""Serve one tunnelled HTTP request by dialing the origin, streaming.

The client uses it for backends of its routes; the server (forward
direction) for upstreams.  The origin is dialled with ``origin_client``'s
lean keep-alive HTTP/1.1 client rather than Twisted's ``Agent`` (profiled:
the Agent's machinery was ~70 % of the client reactor's time per small
request; see that module).  Like the Agent it replaced, it never stores
cookies nor rewrites ``Accept-Encoding`` or bodies, as a transparent proxy
must not.

The request body arrives from the tunnel and is written to the origin as it
comes; credit goes back to the tunnel only for bytes the origin's socket
accepted (``CreditGate``).  The response body is streamed back as it is
read; the origin's socket is paused while the request's tunnel window is
exhausted.  A small response (head and body in the first read) leaves in a
single tunnel message.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.ssl import Certificate
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.protocols import headers as h
from tunneld.protocols.origin_client import (CHUNKED, NO_LENGTH, OriginError, OriginPool, OriginRequest,
                                             ResponseHead)
from tunneld.tunnel import Tunnel

_NO_BODY_STATUS = {204, 304}


class BackendExchange:
    """One request from the tunnel served by an HTTP origin (a ResponderHandler and the request's ``Responder``)."""

    log = Logger()

    def __init__(self, tunnel: Tunnel, request_id: str, head: pb.TunnelMessage, origin: str, pool: OriginPool,
                 *, set_host: str = "", finished: Callable[[dict[str, object]], None] | None = None,
                 route: str = "", clock: Any = None, timeout: float = 0.0,
                 next_origin: Callable[[str], str | None] | None = None) -> None:
        """``timeout`` (with ``clock``): 504 when no response head came in time.
        ``next_origin(failed)``: called when ``failed`` could not be reached;
        returns another origin to try while no request byte was sent, or None."""
        self.tunnel = tunnel
        self.request_id = request_id
        self.head = head
        self.origin = origin.rstrip("/")
        self.pool = pool
        self.set_host = set_host
        self.finished_cb = finished
        self.trace_id = head.trace_id
        self.request: OriginRequest | None = None
        self.head_sent = False
        self.done = False
        self.status = 0
        self.reason = ""   # why this side ended it itself ("" = the backend's own answer)
        self.bytes_out = 0
        self.bytes_in = 0
        self.started = time.monotonic()
        self.method = head.http_request.method
        self.route = route or head.http_request.route
        self.clock = clock
        self.timeout = timeout
        self.next_origin = next_origin
        self.timer: Any = None

    # -- ResponderHandler ------------------------------------------------------------

    def begin(self) -> None:
        req = self.head.http_request
        pairs = h.from_pb(req.headers)
        if self.set_host:
            pairs = h.replace_host(pairs, self.set_host.encode("latin-1"))
        body = req.body
        if req.is_last_chunk:
            # The whole body is here: its length is known whatever the entry said.
            length = len(body) if body else NO_LENGTH
        else:
            length = req.content_length if req.content_length >= 0 else CHUNKED
        self.bytes_in += len(body)
        if self.clock is not None and self.timeout:
            self.timer = self.clock.callLater(self.timeout, self._timed_out)
        try:
            self.request = self.pool.request(self.origin, self.method.encode("latin-1"),
                                             req.url.encode("latin-1"), pairs, self, self.credit,
                                             length=length, body=body, end=req.is_last_chunk)
        except (OriginError, UnicodeEncodeError) as exc:
            self.origin_failed(exc if isinstance(exc, OriginError) else OriginError("failed", str(exc)))
            return
        self.request.start()

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        request = self.request
        if request is None:
            return
        body = msg.http_request.body
        if body:
            self.bytes_in += len(body)
            request.write(body)
        if end:
            request.end()

    def writable(self) -> None:
        if self.request is not None:
            self.request.resume_reading()

    def closed(self) -> None:
        self._finished()

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.done = True
        self._stop_timer()
        if self.request is not None:
            self.request.cancel()
        if not self.status:
            self.reason = "client went away" if code == s.CANCELLED else f"ended by the server ({message})"
        self.status = self.status or code
        self._log_finished()

    # -- credit for the request body -----------------------------------------------------

    def credit(self, n: int) -> None:
        if not self.done:
            self.tunnel.consumed(self.request_id, n)

    # -- the origin's answer (Responder) ---------------------------------------------------

    def origin_response(self, head: ResponseHead, body: bytes, complete: bool) -> None:
        if self.done:
            return
        self._stop_timer()
        code = self.status = head.code
        pairs = head.headers
        no_body = self.method == "HEAD" or code in _NO_BODY_STATUS or 100 <= code < 200
        if head.length is not None and (self.method == "HEAD" or not no_body):
            # The external client should still learn the length (for HEAD: the
            # length a GET would have).
            pairs = pairs + [(b"Content-Length", b"%d" % head.length)]
        msg = pb.TunnelMessage()
        resp = msg.http_response
        resp.status_code = code
        resp.reason = head.reason.decode("latin-1")
        h.fill_pb(resp.headers, h.response_headers_for_client(pairs))
        resp.is_first_chunk = True
        self.bytes_out += len(body)
        if len(body) <= s.MAX_CHUNK:
            resp.body = body
            resp.is_last_chunk = complete
            self._send(msg)
            return
        self._send(msg)
        if not self.done and not self.tunnel.send_body(self.request_id, body, end=complete):
            self._pause_origin()

    def origin_data(self, data: bytes) -> None:
        if self.done:
            return
        self.bytes_out += len(data)
        if not self.tunnel.send_body(self.request_id, data):
            self._pause_origin()

    def origin_done(self) -> None:
        if not self.done:
            self.tunnel.send_body(self.request_id, b"", end=True)

    def origin_failed(self, error: OriginError) -> None:
        if self.done:
            return
        if error.kind == "unreachable" and self.next_origin is not None and self.request is not None:
            other = self.next_origin(self.origin)
            if other is not None:
                self.log.info("backend {origin} unreachable, trying {other}", origin=self.origin, other=other,
                              request_id=self.request_id, trace_id=self.trace_id)
                self.origin = other.rstrip("/")
                self.request.redial(self.origin)
                return
        self.done = True
        self._stop_timer()
        if self.head_sent:
            self.log.warn("backend response from {origin} broke off: {reason}", origin=self.origin,
                          reason=error.message, request_id=self.request_id, trace_id=self.trace_id)
            self.tunnel.cancel(self.request_id, s.BAD_GATEWAY, "backend response broke off")
            self.reason = "backend broke off"
            self._log_finished()
            return
        if error.kind == "unreachable":
            message = f"backend {self.origin} unreachable: {error.message}"
        else:
            message = f"backend {self.origin} failed: {error.message}"
        self.log.info("{message}", message=message, request_id=self.request_id, trace_id=self.trace_id)
        self.status = 502
        self.reason = "backend refused" if error.kind == "unreachable" else "backend failed"
        # The caller sees the route, never the address behind the tunnel (SPEC §8.2).
        public = h.without_address(f"backend of route {self.route!r} {'unreachable' if error.kind == 'unreachable' else 'failed'}: "
                                 f"{error.message}", self.origin)
        self.tunnel.cancel(self.request_id, s.BAD_GATEWAY, public)
        self._log_finished()

    def _send(self, msg: pb.TunnelMessage) -> None:
        if self.done:
            return
        self.head_sent = True
        if not self.tunnel.send(self.request_id, msg):
            self._pause_origin()

    def _pause_origin(self) -> None:
        if self.request is not None:
            self.request.pause_reading()

    def _finished(self) -> None:
        if not self.done:
            self.done = True
            self._stop_timer()
            self._log_finished()

    def _timed_out(self) -> None:
        self.timer = None
        if self.done or self.head_sent:
            return
        self.done = True
        if self.request is not None:
            self.request.cancel()
        message = f"no response from the backend of route {self.route!r} within {self.timeout:g} s"
        self.log.info("no response from {origin} within {timeout:g} s", origin=self.origin, timeout=self.timeout,
                      request_id=self.request_id, trace_id=self.trace_id)
        self.status = 504
        self.reason = "backend timeout"
        self.tunnel.cancel(self.request_id, s.TIMEOUT, message)
        self._log_finished()

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _log_finished(self) -> None:
        if self.finished_cb is not None:
            self.finished_cb({
                "protocol": "http", "route": self.route, "status": self.status,
                "duration": time.monotonic() - self.started, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "request_id": self.request_id, "trace_id": self.trace_id, "origin": self.origin,
                "method": self.method, "path": self.head.http_request.path,
                "reason": self.reason, "answered_by": "tunneld" if self.reason else "backend",
            })


def trust_root(ca: str) -> Any:
    """The CA bundle at ``ca`` as a Twisted trust root; "" = the platform's roots."""
    if not ca:
        return None
    with open(ca, "rb") as f:
        return Certificate.loadPEM(f.read())


def make_pool(reactor: Any, pool_size: int = 64, ca: str = "") -> OriginPool:
    """Keep-alive connections to origins, at most ``pool_size`` idle per origin (close them on stop).

    https:// origins are always verified: against ``ca`` when given, else the
    platform's trusted roots.
    """
    return OriginPool(reactor, pool_size=pool_size, tls_policy=BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca)))


class PoolCloser(Service):
    """Closes idle origin connections when the process stops."""

    def __init__(self, pool: OriginPool) -> None:
        self.pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self.pool.close_idle()
