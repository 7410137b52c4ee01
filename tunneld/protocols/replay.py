"""Replay of a captured HTTP exchange (the inspector's ``POST /inspect/<id>/replay``).

The request goes again through the same dispatcher as an external one (same
route choice and access rules, with the original client's address), with the
captured method, URI, headers (hop-by-hop ones dropped by the usual
forwarding rules) and body, as a new tunnel request.  Its answer is not sent
anywhere: it is recorded in the inspector as a new exchange (``replay_of``
names the original) and credited back to the tunnel as it arrives.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.inspector import Exchange, Inspector
from tunneld.protocols import headers as h
from tunneld.protocols.http_entry import (Refusal, answer_reason, backend_url, route_normalised, trace_id_of,
                                          without_authorization)
from tunneld.tunnel import Tunnel


class ReplayRefused(Exception):
    """The exchange cannot be replayed (HTTP status for the admin answer, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ReplayExchange:
    """The tunnel's ``ExchangeHandler`` for a replayed request: records the answer, keeps nothing else."""

    log = Logger()

    def __init__(self, rec: Exchange, dispatcher: Any, timeout: float, clock: Any) -> None:
        self.rec = rec
        self.dispatcher = dispatcher
        self.tunnel: Tunnel | None = None
        self.request_id = ""
        self.reason = ""   # why tunneld ended it itself ("" = the backend's answer)
        self.started = time.monotonic()
        self.timer = clock.callLater(timeout, self._timed_out, timeout) if clock is not None else None

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        resp = msg.http_response
        if resp.is_first_chunk or not self.rec.response_status:
            self.rec.response_status = resp.status_code
            self.rec.response_headers = h.from_pb(resp.headers)
            self._cancel_timer()
        if resp.body:
            self.rec.response_chunk(resp.body)
            if self.tunnel is not None:
                self.tunnel.consumed(self.request_id, len(resp.body))
        if end:
            self._end(self.rec.response_status)

    def writable(self) -> None:
        pass

    def closed(self) -> None:
        if not self.rec.response_status:
            self.reason = "tunnel lost"
        self._end(self.rec.response_status or 502)

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        self.tunnel = None
        self.rec.details = message
        self.reason = answer_reason(code if code >= 100 else 502, message)
        self._end(code if code >= 100 else 502)

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        if self.tunnel is not None:
            self.tunnel.cancel(self.request_id, s.TIMEOUT, "replay: no response")
        self.rec.details = f"no response from the backend within {timeout:g} s"
        self.reason = "backend timeout"
        self._end(504)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _end(self, status: int) -> None:
        if self.rec.done:
            return
        self._cancel_timer()
        self.rec.end(status)
        self.dispatcher.finished({
            "protocol": "http", "route": self.rec.route, "status": status,
            "duration": time.monotonic() - self.started, "bytes_in": self.rec.bytes_in,
            "bytes_out": self.rec.bytes_out, "request_id": self.request_id, "trace_id": self.rec.trace_id,
            "method": self.rec.method, "path": self.rec.path.partition("?")[0], "client": "replay",
            "refusal": "", "address": "", "reason": self.reason, "answered_by": "tunneld" if self.reason else "backend",
            "client_id": self.rec.client_id,
        })


def replay(original: Exchange, dispatcher: Any, inspector: Inspector, clock: Any = None) -> str:
    """Send ``original`` again through ``dispatcher``; the new exchange's request_id."""
    if original.protocol != "http":
        raise ReplayRefused(409, f"only HTTP exchanges can be replayed, not {original.protocol}")
    if not original.request_complete:
        raise ReplayRefused(409, "the request body was not captured whole (raise inspect_body_bytes)"
                            if original.done else "the exchange has not finished yet")
    body = original.request_body
    flat = list(original.request_headers)
    host = original.host
    uri = original.path
    raw_path, _, query = uri.partition("?")
    # Routed and judged as the original was: on the normalised path.
    path, decision = route_normalised(dispatcher, host, raw_path, original.remote, flat)
    if isinstance(decision, Refusal) and decision.status == 400:
        raise ReplayRefused(409, f"the path cannot be routed: {decision.message}")
    if isinstance(decision, Refusal):
        raise ReplayRefused(decision.status if decision.status != 404 else 409,
                            f"the route refuses it now: {decision.message}")
    flat = [(n, v) for n, v in flat if n.lower() != b"expect"]
    trace_id = trace_id_of(flat)
    if decision.strip_authorization:
        flat = without_authorization(flat)
    fwd = h.request_headers_for_backend(flat, client_ip=original.remote, proto=original.scheme or "http",
                                        host=host, set_host=decision.set_host)
    msg = pb.TunnelMessage(trace_id=trace_id)
    head = msg.http_request
    head.method = original.method
    head.url = backend_url(decision, uri, raw_path, path, query)
    head.host = host
    head.path = path
    head.query = query
    h.fill_pb(head.headers, fwd)
    head.is_first_chunk = True
    head.route = decision.route
    head.scheme = original.scheme or "http"
    head.remote_addr = original.remote
    head.content_length = len(body) if body or original.method not in ("GET", "HEAD") else 0
    first, rest = body[: s.MAX_CHUNK], body[s.MAX_CHUNK:]
    head.body = first
    head.is_last_chunk = not rest

    rec = inspector.begin("http")
    rec.trace_id = trace_id
    rec.method = original.method
    rec.path = uri
    rec.host = host
    rec.scheme = original.scheme
    rec.remote = original.remote
    rec.request_headers = original.request_headers
    rec.route = decision.route
    rec.client_id = decision.client_id
    rec.replay_of = original.request_id
    rec.request_chunk(body)
    handler = _ReplayExchange(rec, dispatcher, decision.timeout, clock)
    try:
        handler.request_id = decision.tunnel.start(msg, handler)
    except s.SessionError as e:
        handler.reason = "tunnel lost"
        handler._end(502)
        raise ReplayRefused(502, f"tunnel not available: {e}") from None
    handler.tunnel = decision.tunnel
    rec.request_id = handler.request_id
    if rest:
        # The tunnel's window may hold part of it back: Tunnel queues what does not fit.
        decision.tunnel.send_body(handler.request_id, rest, end=True)
    return handler.request_id
