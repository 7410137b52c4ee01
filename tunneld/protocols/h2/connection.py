"""One HTTP/2 connection on the reactor, driven through ngh2 (libnghttp2): the only module importing ngh2.

Theory of operation
-------------------
``H2Connection`` is a Twisted ``Protocol`` around a sans-IO
``ngh2.Connection``.  It knows HTTP/2, not gRPC or the tunnel: everything
above it is a ``StreamHandler`` per stream.

Input: ``dataReceived`` feeds nghttp2 and walks the events it produced.  The
events of one read are grouped per stream into ONE ``Incoming`` (head, body,
trailers, end), handed to the stream's handler once: a unary call's HEADERS,
DATA and END_STREAM that arrive together are one call, and many small DATA
frames of one read are one body chunk (what a peer sent in one read travels
on as one chunk).  Receive windows are manual: a handler calls ``ack`` for
body bytes only once its consumer (the tunnel) took them, so a peer can have
at most one stream window of unconsumed data per stream in this process.

Output: handlers queue headers, body and trailers with the ``send_*``
methods; nghttp2 keeps the body until the peer's windows allow it.  After
each write the connection asks nghttp2 how much of each stream's queued body
it has framed and reports that to the handler (``sent``): that is the credit
the tunnel gets back, so a slow peer holds the tunnel's window, never
memory.  The connection is the transport's push producer: while the socket
pushes back, nothing more is framed (so no credit returns either).

Limits (``H2Limits``): concurrent streams, header list size, and nghttp2's
own defences (rapid reset, CONTINUATION floods, SETTINGS/PING floods,
glitches) end the connection with GOAWAY and one log line; a connection with
no stream open for ``idle_timeout`` (PINGs do not count) or that sends no
request within ``header_timeout`` is closed with GOAWAY.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Final, Protocol as TypingProtocol

import ngh2
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

Headers = list[tuple[bytes, bytes]]

NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB
#: ``closed()`` code when the connection itself went away (not an HTTP/2 code).
CONNECTION_LOST: Final = -1

_BIG_WINDOW: Final = 2**31 - 1
_LINGER: Final = 2.0   # seconds a terminated connection discards input before it is cut
_Errors = (ngh2.NGH2Error,)


@dataclass(frozen=True)
class H2Limits:
    """What one connection may hold; the defaults suit a public gRPC entry."""

    max_concurrent_streams: int = 256
    stream_window: int = 256 * 1024          # per-stream receive window (unconsumed bytes a peer may send)
    max_frame_size: int = 64 * 1024          # largest DATA frame we accept (fewer, larger chunks)
    max_header_list_size: int = 16 * 1024    # decoded request/response head, bytes (RFC 9113 sizing)
    idle_timeout: float = 60.0               # no stream open this long -> GOAWAY (0 = never)
    header_timeout: float = 20.0             # first request head within this (server; 0 = never)


@dataclass
class Incoming:
    """What one read brought for one stream."""

    headers: Headers | None = None   # the request (server) or response (client) head
    body: bytes = b""
    trailers: Headers | None = None
    end: bool = False                 # the peer ended its direction
    _parts: list[bytes] = field(default_factory=list)


class StreamHandler(TypingProtocol):
    """The owner of one HTTP/2 stream."""

    def incoming(self, inc: Incoming) -> None:
        """Head, body and/or trailers arrived; ``ack`` the body once it was consumed."""

    def sent(self, n: int) -> None:
        """``n`` queued body bytes were framed for the peer (they left our memory)."""

    def closed(self, error_code: int) -> None:
        """The stream is gone: 0 = both sides ended cleanly, else the RST/GOAWAY code or CONNECTION_LOST."""


@implementer(IPushProducer)
class H2Connection(Protocol):
    """A server or client HTTP/2 connection; subclasses say what a new stream is (``stream_opened``)."""

    log = Logger()
    client_side = False

    def __init__(self, limits: H2Limits, clock: Any) -> None:
        self.limits = limits
        self.clock = clock
        config = ngh2.Configuration(
            auto_window_update=False,
            max_inbound_header_list_size=limits.max_header_list_size,
            peer_max_concurrent_streams=100,
        )
        self.h2 = ngh2.Connection(ngh2.Role.CLIENT if self.client_side else ngh2.Role.SERVER, config)
        self.handlers: dict[int, StreamHandler] = {}
        self._unacked: dict[int, int] = {}   # body bytes handed to a handler, not acknowledged yet
        self._queued: dict[int, int] = {}    # our body bytes still in nghttp2's queue, per stream
        self._receiving = False
        self._paused = False
        self._closing = False
        self._lingering = False              # GOAWAY written, write side closed, input discarded
        self._timer: IDelayedCall | None = None
        self.peer_resets = 0                 # streams the peer reset (logged once, at the end)
        self.last_stream_id = 0              # the highest stream the peer opened
        self.ended_by = ""                   # why we ended the connection, if we did
        self.on_lost: Callable[[H2Connection], None] | None = None

    # -- Twisted ------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Without it, Nagle + delayed ACK cost 40 ms per small call (measured: 44 calls/s).
            set_no_delay(True)
        transport.registerProducer(self, True)
        limits = self.limits
        self.h2.initiate_connection({
            ngh2.Setting.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            ngh2.Setting.INITIAL_WINDOW_SIZE: limits.stream_window,
            ngh2.Setting.MAX_FRAME_SIZE: limits.max_frame_size,
            ngh2.Setting.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            ngh2.Setting.ENABLE_PUSH: 0,
        })
        # The connection window never limits: each stream's own window does (per-stream back-pressure).
        self.h2.set_local_window_size(_BIG_WINDOW)
        if not self.client_side:
            self._arm(self.limits.header_timeout, "no request within header_timeout")
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self._lingering or (self._closing and not self.handlers):
            return
        self._receiving = True
        try:
            try:
                self.h2.receive_data(data)
            except _Errors as e:
                self._fail(e)
                return
            self._handle(self.h2.events())
        finally:
            self._receiving = False
        self.flush()

    def connectionLost(self, reason: Any = None) -> None:
        self._closing = True
        self._disarm()
        handlers, self.handlers = self.handlers, {}
        self._queued.clear()
        self._unacked.clear()
        for handler in handlers.values():
            self._call(handler.closed, CONNECTION_LOST)
        if self.peer_resets:
            self.log.info("HTTP/2 connection from {peer}: {n} streams reset by the peer", peer=self.peer, n=self.peer_resets)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- IPushProducer: the socket's back-pressure -------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.flush()

    def stopProducing(self) -> None:
        self._paused = True

    # -- what handlers call --------------------------------------------------------------

    @property
    def peer(self) -> str:
        transport = self.transport
        if transport is None:
            return "-"
        address = transport.getPeer()
        return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None:
        """A response head (server); a client opens streams with ``open_stream``."""
        self.h2.send_response(stream_id, headers, end_stream=end)
        self.flush()

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if data:
            self._queued[stream_id] = self._queued.get(stream_id, 0) + len(data)
        self.h2.send_data(stream_id, data, end_stream=end)
        self.flush()

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        self.h2.send_trailers(stream_id, headers)
        self.flush()

    def end_stream(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)
        self.flush()

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Reset one stream; its handler gets no further calls."""
        self._forget(stream_id)
        try:
            self.h2.reset_stream(stream_id, error_code)
        except _Errors:
            pass   # already closed on the wire
        self.flush()

    def ack(self, stream_id: int, n: int) -> None:
        """``n`` body bytes of ``stream_id`` were consumed: the peer may send that much more."""
        left = self._unacked.get(stream_id)
        if left is None or n <= 0:
            return
        n = min(n, left)
        self._unacked[stream_id] = left - n
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except _Errors:
            return
        self.flush()

    def open_streams(self) -> int:
        return len(self.handlers)

    # -- output ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what nghttp2 has framed, report each stream's framed body as ``sent``, and handle the
        events that writing produced (streams that closed once their last frame went out, GOAWAY done)."""
        if self._receiving or self._paused or self._lingering or self.transport is None:
            return
        h2 = self.h2
        while True:
            try:
                out = h2.data_to_send()
            except _Errors as e:
                self._fail(e)
                return
            if out:
                self.transport.write(out)
            if self._queued:
                self._report_sent()
            if self.transport is None:
                return
            # Sending can close streams (our END_STREAM after the peer's): nghttp2 reports that as
            # events now, not at the next read, so the stream's handler is told and the idle timer
            # armed even if the peer sends nothing more.
            events = h2.events()
            if not events:
                break
            self._receiving = True
            try:
                self._handle(events)
            finally:
                self._receiving = False
            if self._lingering or self.transport is None:
                return
        if not h2.want_read and not h2.want_write:
            # nghttp2 is done with this connection (GOAWAY sent and no stream left, or a protocol error).
            self._linger(b"")
        elif self._closing and not self.handlers and not h2.want_write:
            self.transport.loseConnection()

    def _report_sent(self) -> None:
        for stream_id, before in list(self._queued.items()):
            try:
                now = self.h2.queued_body_size(stream_id)
            except _Errors:
                now = 0
            if now < before:
                if now:
                    self._queued[stream_id] = now
                else:
                    del self._queued[stream_id]
                handler = self.handlers.get(stream_id)
                if handler is not None:
                    self._call(handler.sent, before - now)

    # -- input --------------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        batch: dict[int, Incoming] = {}
        for e in events:
            t = type(e)
            if t is ngh2.DataReceived:
                inc = batch.get(e.stream_id) or batch.setdefault(e.stream_id, Incoming())
                if e.data:
                    inc._parts.append(e.data)
                    self._unacked[e.stream_id] = self._unacked.get(e.stream_id, 0) + len(e.data)
                inc.end = inc.end or e.end_stream
            elif t is ngh2.RequestReceived or t is ngh2.ResponseReceived:
                inc = batch.setdefault(e.stream_id, Incoming())
                inc.headers = list(e.headers)
                inc.end = e.end_stream
                if t is ngh2.RequestReceived:
                    self._disarm()
                    self.last_stream_id = max(self.last_stream_id, e.stream_id)
                    if not self._stream_opened(e.stream_id):
                        batch.pop(e.stream_id, None)
            elif t is ngh2.TrailersReceived:
                inc = batch.setdefault(e.stream_id, Incoming())
                inc.trailers = list(e.headers)
                inc.end = True
            elif t is ngh2.StreamClosed or t is ngh2.StreamReset:
                if t is ngh2.StreamReset:
                    self.peer_resets += 1
                    continue
                inc = batch.pop(e.stream_id, None)
                if inc is not None and inc.headers is not None and e.error_code:
                    # Opened and reset in the same read (rapid reset): never started, nothing to tell.
                    self._forget(e.stream_id)
                else:
                    self._deliver(inc, e.stream_id)
                self._stream_closed(e.stream_id, e.error_code)
            elif t is ngh2.ConnectionClosed:
                # nghttp2 ended the connection itself (a flood it detected, or the peer's GOAWAY done).
                batch.clear()
                if e.error_code:
                    self.ended_by = f"HTTP/2 error {e.error_code} ({bytes(e.debug_data)[:100]!r})"
                    self.log.warn("HTTP/2 connection from {peer} closed with GOAWAY: {why}", peer=self.peer,
                                  why=self.ended_by)
                self.terminate(e.error_code)
                return
            elif t is ngh2.GoAwayReceived:
                self.goaway_received(e.last_stream_id, e.error_code)
            elif t is ngh2.SettingsReceived:
                self.settings_received(e.settings)
        self._deliver_all(batch)

    def _deliver_all(self, batch: dict[int, Incoming]) -> None:
        for stream_id, inc in list(batch.items()):
            self._deliver(inc, stream_id)
        batch.clear()

    def _deliver(self, inc: Incoming | None, stream_id: int) -> None:
        if inc is None:
            return
        handler = self.handlers.get(stream_id)
        if handler is None:
            return
        parts = inc._parts
        if parts:
            inc.body = parts[0] if len(parts) == 1 else b"".join(parts)
            inc._parts = []
        self._call(handler.incoming, inc)

    def _stream_opened(self, stream_id: int) -> bool:
        """Server: a request arrived on a new stream; register its handler (False: refused)."""
        handler = self.stream_opened(stream_id)
        if handler is None:
            return False
        self.handlers[stream_id] = handler
        return True

    def _stream_closed(self, stream_id: int, error_code: int) -> None:
        handler = self._forget(stream_id)
        if handler is not None:
            self._call(handler.closed, error_code)
        if not self.handlers:
            if self._closing:
                self.flush()
            elif not self.client_side:
                self._arm(self.limits.idle_timeout, "idle for idle_timeout")
            self.became_idle()

    def _forget(self, stream_id: int) -> StreamHandler | None:
        handler = self.handlers.pop(stream_id, None)
        self._queued.pop(stream_id, None)
        left = self._unacked.pop(stream_id, 0)
        if left:
            # Unconsumed data of a dead stream still counts against the connection window.
            try:
                self.h2.acknowledge_received_data(left, stream_id)
            except _Errors:
                pass
        return handler

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.failure("HTTP/2 stream handler failed (peer {peer})", peer=self.peer)

    # -- ending the connection -------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        """The peer broke HTTP/2 or a limit: GOAWAY and close, one log line."""
        code = ENHANCE_YOUR_CALM if isinstance(error, ngh2.DenialOfServiceError) else PROTOCOL_ERROR
        self.ended_by = f"{type(error).__name__}: {error}"
        self.log.warn("HTTP/2 connection from {peer} closed with GOAWAY: {why}", peer=self.peer, why=self.ended_by)
        self.terminate(code)

    def terminate(self, error_code: int = NO_ERROR) -> None:
        """Final GOAWAY now and close; streams in flight are cut (CONNECTION_LOST to their handlers)."""
        if self._lingering:
            return
        self._closing = True
        try:
            self.h2.terminate_connection(error_code)
        except _Errors:
            pass   # already terminating (nghttp2 queued its own GOAWAY) or unusable
        try:
            out = self.h2.data_to_send()
        except _Errors:
            # After a fatal receive error nghttp2 is unusable (a flood it refused): the GOAWAY is ours to write.
            out = _goaway_frame(self.last_stream_id, error_code)
        self._linger(out)

    def _linger(self, last: bytes) -> None:
        """Write the last bytes, then half-close and discard input for a moment before closing.

        Closing a socket with unread input makes the kernel send RST, and the
        peer may then lose the GOAWAY that explains why; a flooding peer
        always has unread input.
        """
        transport = self.transport
        if transport is None:
            return
        self._lingering = True
        self._disarm()
        if last:
            transport.write(last)
        try:
            transport.loseWriteConnection()
        except Exception:
            transport.loseConnection()
            return
        abort = getattr(transport, "abortConnection", transport.loseConnection)
        self._timer = self.clock.callLater(_LINGER, abort)

    def shutdown(self) -> None:
        """Graceful: GOAWAY (no new streams), streams in flight finish, then close."""
        if self._closing:
            return
        self._closing = True
        self._disarm()
        try:
            self.h2.send_goaway(NO_ERROR)
        except _Errors:
            pass
        self.flush()
        if not self.handlers and self.transport is not None:
            self.transport.loseConnection()

    def _arm(self, seconds: float, why: str) -> None:
        if self._lingering:
            return
        self._disarm()
        if seconds > 0:
            self._timer = self.clock.callLater(seconds, self._expire, why)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _expire(self, why: str) -> None:
        self._timer = None
        if not self.handlers:
            self.ended_by = why
            self.terminate(NO_ERROR)

    # -- for subclasses ----------------------------------------------------------------------

    def stream_opened(self, stream_id: int) -> StreamHandler | None:
        """Server: the handler for a new request stream (None refuses it with REFUSED_STREAM)."""
        self.h2.reset_stream(stream_id, REFUSED_STREAM)
        return None

    def goaway_received(self, last_stream_id: int, error_code: int) -> None:
        """The peer will take no new streams (client: stop opening streams here)."""

    def settings_received(self, settings: Any) -> None:
        """The peer's SETTINGS (client: its MAX_CONCURRENT_STREAMS)."""

    def became_idle(self) -> None:
        """No stream is open any more."""


def _goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    """A GOAWAY frame (RFC 9113 §6.8), for when nghttp2 can no longer make one."""
    payload = last_stream_id.to_bytes(4, "big") + error_code.to_bytes(4, "big")
    return len(payload).to_bytes(3, "big") + b"\x07\x00" + b"\x00\x00\x00\x00" + payload


class H2ClientConnection(H2Connection):
    """The client role: ``open_stream`` starts a request."""

    client_side = True

    def open_stream(self, headers: Headers, handler: StreamHandler, end: bool = False) -> int:
        """Send a request head; raises ``StreamRefused`` when this connection can take no new stream."""
        try:
            stream_id = self.h2.send_request(headers, end_stream=end)
        except _Errors as e:
            raise StreamRefused(str(e)) from None
        self.handlers[stream_id] = handler
        self.flush()
        return stream_id

    @property
    def max_concurrent_streams(self) -> int:
        return self.h2.remote_settings.get(ngh2.Setting.MAX_CONCURRENT_STREAMS, 100)


class StreamRefused(Exception):
    """A client connection could not open a stream (GOAWAY, no ids left, closing)."""
