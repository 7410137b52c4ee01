"""A lean persistent HTTP/1.1 client for origins (the client's backends, the server's upstreams).

Why this exists instead of Twisted's ``Agent``: with small GETs through the
tunnel at 64 connections, py-spy put ~70 % of the client reactor's time per
request in ``Agent`` / ``HTTPConnectionPool`` / ``HTTP11ClientProtocol``:
writing the head through ``Request._writeHeaders`` and ``Headers``, line
parsing in ``HTTPClientParser`` (``LineReceiver``, one call per line), the
``Response`` object and ``deliverBody``, the ``_newclient`` state machines
with their many Deferreds, and an epoll unregister/register pair per
response (the parser pauses the socket after the head and ``deliverBody``
resumes it).  A tunnelled request needs none of that generality: one origin
per route, one request at a time per connection, the body streamed both
ways.  Here a request costs one ``send`` for its head, one ``find`` and
one ``split`` for the response head, and plain method calls.  Measured
(wrk -c64 GET /small, all processes on one CPU): the client reactor's CPU
per request fell from ~200-240 µs to ~95-115 µs, from ~0.90 to ~0.43 of
the (unchanged) server reactor's.

Theory of operation
-------------------

``OriginPool`` keeps, per origin (``scheme://host:port``), the endpoint
(built once: ``HostnameEndpoint``, wrapped in TLS with the same
``BrowserLikePolicyForHTTPS`` for https) and a LIFO list of idle
connections, at most ``pool_size`` (more are closed as they come back;
concurrency itself is not limited, as with ``Agent``).  ``request()``
returns an ``OriginRequest`` at once: it takes an idle connection, or dials
one (failing over to another origin is the caller's choice, with
``redial``, while no byte was sent).

``OriginRequest`` holds the request head (validated and joined once), the
body the tunnel delivers (held, without returning credit, until there is a
connection), and the ``CreditGate`` that returns credit only for bytes
handed to the origin's socket.  Body framing is Content-Length when the
length is known, else chunked; a body longer or shorter than its declared
length fails the request.

``OriginConnection`` is one socket, IDLE (in the pool) or BUSY (one
request).  It parses the response head in one piece (status line and
headers from the buffer), then the body by Content-Length, chunked
(Twisted's ``_ChunkedTransferDecoder``) or until close.  It goes back to
the pool only when the request was written entirely, the response was read
entirely and cleanly, the response allows keep-alive (HTTP/1.1 without
``Connection: close``) and nothing is left over; otherwise it is closed.
It never replays a request: a pooled connection the origin closed while
idle has left the pool before anyone can pick it (its close is read first),
and one that closes under a request fails that request.  It is the
transport's streaming producer for its whole life (no register/unregister
per request), and pauses the socket's reading only while the request's
tunnel window is exhausted.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Client as TCPClient
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError
from zope.interface import implementer

from tunneld.tunnel import CreditGate

Pairs = list[tuple[bytes, bytes]]

#: The largest response head (status line and headers) accepted.
MAX_HEAD = 64 * 1024
#: Idle pooled connections are closed after this long (Twisted's HTTPConnectionPool default).
IDLE_TIMEOUT = 240.0

NO_LENGTH = -2   # OriginRequest length: no body at all
CHUNKED = -1     # OriginRequest length: a body of unknown length, sent chunked

_NO_BODY_STATUS = frozenset({204, 304})

# What an OriginConnection is reading.
_READ_HEAD, _READ_LENGTH, _READ_CHUNKED, _READ_TO_CLOSE, _READ_DONE = range(5)
_VERSION = re.compile(rb"HTTP/\d\.\d\Z")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")

# Request header names seen before -> what to do with them (names come from a
# small vocabulary, so validating each once is enough).
_KEEP, _HOST, _DROP = 0, 1, 2
_NAME_KIND: dict[bytes, int] = {}
# Framing is ours: the caller's Content-Length / Transfer-Encoding never reach the origin.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class BadResponse(Exception):
    """The origin's response broke HTTP/1.1 (the message says how)."""


class OriginError(Exception):
    """Why a request to an origin failed.

    ``kind``: ``"unreachable"`` (the connection could not be made: refused,
    no such host, connect timeout; nothing was sent), ``"failed"`` (no usable
    response head: closed before answering, malformed head, TLS, a request
    that could not be sent) or ``"broke_off"`` (the response body did not
    complete).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class ResponseHead:
    """A parsed response head.  ``headers`` are as received, in order, minus
    Content-Length and Transfer-Encoding (framing is described by ``length``
    and ``chunked``)."""

    __slots__ = ("version", "code", "reason", "headers", "length", "chunked", "keep_alive")

    def __init__(self, version: bytes, code: int, reason: bytes, headers: Pairs, length: int | None,
                 chunked: bool, keep_alive: bool) -> None:
        self.version = version
        self.code = code
        self.reason = reason
        self.headers = headers
        self.length = length        # Content-Length (None: absent, or chunked)
        self.chunked = chunked
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"<ResponseHead {self.version!r} {self.code} length={self.length} chunked={self.chunked}>"


def parse_head(block: bytes) -> ResponseHead:
    """The response head in ``block`` (everything before the blank line).

    Raises ``BadResponse`` naming what is wrong.  Obsolete line folding is
    replaced by a space (RFC 9112 §5.2), except in framing headers, where it
    is refused; conflicting Content-Length values and transfer codings other
    than ``chunked`` are refused, as Twisted's client does.
    """
    lines = block.split(b"\r\n")
    status = lines[0]
    version, _, rest = status.partition(b" ")
    code_text, _, reason = rest.partition(b" ")
    if (version != b"HTTP/1.1" and not _VERSION.match(version)) or len(code_text) != 3 or not code_text.isdigit():
        raise BadResponse(f"malformed status line {status[:200]!r}")
    headers: Pairs = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    close = version != b"HTTP/1.1"   # HTTP/1.0 connections are not reused
    last_low = b""
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if not headers or last_low in _FRAMING or last_low == b"connection":
                raise BadResponse(f"folded header line {line[:200]!r}")
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name or b"\t" in name:
            raise BadResponse(f"malformed header line {line[:200]!r}")
        value = value.strip(b" \t")
        last_low = low = name.lower()
        if low == b"content-length":
            lengths.append(value)
            continue
        if low == b"transfer-encoding":
            codings.append(value)
            continue
        if low == b"connection" and b"close" in value.lower():
            close = close or b"close" in [token.strip() for token in value.lower().split(b",")]
        headers.append((name, value))
    length: int | None = None
    chunked = False
    if codings:
        coding = b",".join(codings).strip().lower()
        if coding != b"chunked":
            raise BadResponse(f"unsupported Transfer-Encoding {coding[:100]!r}")
        chunked = True
    elif lengths:
        values = {v.strip() for v in b",".join(lengths).split(b",")}
        if len(values) != 1 or not all(v.isdigit() for v in values):
            raise BadResponse(f"invalid Content-Length {b', '.join(lengths)[:100]!r}")
        length = int(values.pop())
    return ResponseHead(version, int(code_text), reason, headers, length, chunked, not close)


def request_head(method: bytes, target: bytes, pairs: Pairs) -> tuple[bytes, int]:
    """The header block for ``pairs`` and how many Host headers it has.

    Content-Length and Transfer-Encoding are left out (the body's framing is
    written by ``OriginRequest``).  Names must be tokens; CR, LF and NUL in
    values become spaces (as Twisted's ``Headers`` does), so a header can
    never split into two.  Raises ValueError for a bad method, target or name.
    """
    if not _TOKEN.match(method):
        raise ValueError(f"invalid method {method[:50]!r}")
    if not _TARGET.match(target):
        raise ValueError(f"invalid request target {target[:200]!r}")
    parts: list[bytes] = []
    hosts = 0
    kinds = _NAME_KIND
    for name, value in pairs:
        kind = kinds.get(name)
        if kind is None:
            if not _TOKEN.match(name):
                raise ValueError(f"invalid header name {name[:50]!r}")
            low = name.lower()
            kind = _DROP if low in _FRAMING else _HOST if low == b"host" else _KEEP
            if len(kinds) < 4096:
                kinds[name] = kind
        if kind:
            if kind == _DROP:
                continue
            hosts += 1
        parts.append(name + b": " + value + b"\r\n")
    block = b"".join(parts)
    # One check for the common case: exactly one CR and one LF per line, no NUL.
    if block.count(b"\n") != len(parts) or block.count(b"\r") != len(parts) or b"\0" in block:
        block = b"".join(name + b": " + _clean(value) + b"\r\n" for name, value in pairs
                         if kinds.get(name, _KEEP) != _DROP and name.lower() not in _FRAMING)
    return block, hosts


def _write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` at once when the TCP transport has nothing queued.

    ``transport.write`` only queues: it registers the socket for writing
    (an ``epoll_ctl``), sends on the next reactor turn, then unregisters it
    (another ``epoll_ctl``).  For a request head on an idle keep-alive
    connection a direct ``send`` nearly always takes it all, saving both
    calls and a turn (measured: ~10 % of the client reactor per small
    request).  Anything unsent, any error and any other transport (TLS) take
    Twisted's ordinary path, which also meets the error and closes properly.
    """
    if (type(transport) is TCPClient and transport.connected and not transport.disconnecting
            and not transport._tempDataBuffer and not transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _clean(value: bytes) -> bytes:
    return b" ".join(value.replace(b"\0", b" ").splitlines())


class Responder(TypingProtocol):
    """What an ``OriginRequest`` tells its owner (``BackendExchange``).

    After ``origin_done`` or ``origin_failed`` nothing more is said; after
    ``cancel()`` nothing at all."""

    def origin_response(self, head: ResponseHead, body: bytes, complete: bool) -> None:
        """The final response head, with the body bytes that came with it;
        ``complete``: that was the whole body (then no ``origin_done``)."""

    def origin_data(self, data: bytes) -> None:
        """More response body."""

    def origin_done(self) -> None:
        """The response body is complete."""

    def origin_failed(self, error: OriginError) -> None:
        """The request failed (see ``OriginError.kind``)."""


class Origin:
    """One origin: its endpoint, its Host value and its idle connections."""

    def __init__(self, pool: OriginPool, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported origin scheme in {url!r}")
        host = parts.hostname or ""
        if not host:
            raise ValueError(f"no host in origin {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        self.pool = pool
        self.url = url
        netloc_host = f"[{host}]" if ":" in host else host
        default = (scheme, port) in (("http", 80), ("https", 443))
        self.host_value = (netloc_host if default else f"{netloc_host}:{port}").encode("idna" if not host.isascii()
                                                                                      else "ascii")
        endpoint: Any = HostnameEndpoint(pool.reactor, host, port)
        if scheme == "https":
            endpoint = wrapClientTLS(pool.tls_policy.creatorForNetloc(host.encode("idna"), port), endpoint)
        self.endpoint = endpoint
        self.idle: list[OriginConnection] = []
        self.factory = _ConnectionFactory(self)

    def take(self) -> OriginConnection | None:
        """The most recently used idle connection (LIFO keeps few connections warm)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    def release(self, conn: OriginConnection) -> None:
        """``conn`` finished a request cleanly: keep it, unless the pool is full."""
        if len(self.idle) >= self.pool.pool_size or not conn.usable():
            conn.close()
            return
        conn.idle_since = self.pool.reactor.seconds()
        self.idle.append(conn)
        self.pool.schedule_sweep()

    def forget(self, conn: OriginConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass


class _ConnectionFactory(Factory):
    noisy = False   # no "Starting factory" line per dial

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    def buildProtocol(self, addr: Any) -> OriginConnection:
        return OriginConnection(self.origin)


class OriginPool:
    """Keep-alive connections to origins, per origin; see the module docstring."""

    def __init__(self, reactor: Any, *, pool_size: int = 64, tls_policy: Any = None,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.pool_size = pool_size
        self.tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        self.idle_timeout = idle_timeout
        self.origins: dict[str, Origin] = {}
        self._sweep: Any = None

    def origin(self, url: str) -> Origin:
        known = self.origins.get(url)
        if known is None:
            if len(self.origins) >= 1024:   # origins come from routes: few; stay bounded anyway
                for old in self.origins.values():
                    for conn in list(old.idle):
                        conn.close()
                self.origins.clear()
            known = self.origins[url] = Origin(self, url)
        return known

    def request(self, url: str, method: bytes, target: bytes, headers: Pairs, responder: Responder,
                credit: Callable[[int], None], *, length: int = NO_LENGTH, body: bytes = b"",
                end: bool = False) -> OriginRequest:
        """Start ``method target`` on the origin at ``url`` (``scheme://host[:port]``).

        ``length``: ``NO_LENGTH`` (no body; PUT and POST still say
        ``Content-Length: 0``), ``CHUNKED`` or the body's length.  ``body`` /
        ``end``: the first body bytes and whether they are all of it.
        ``credit(n)`` is called as body bytes are handed to the socket.
        Nothing is sent before ``start()`` (so the caller holds the request
        before any callback).  Raises ``OriginError`` ("failed") for a request
        that cannot be written.
        """
        try:
            origin = self.origin(url)
            block, hosts = request_head(method, target, headers)
        except ValueError as exc:
            raise OriginError("failed", str(exc)) from None
        if hosts > 1:
            raise OriginError("failed", f"request has {hosts} Host headers")
        if length == NO_LENGTH and method in (b"PUT", b"POST"):
            length = 0
        request = OriginRequest(self, origin, method, target, block, hosts == 1, length, responder, credit)
        if body:
            request.write(body)
        if end or length == NO_LENGTH:
            request.end()
        return request

    def close_idle(self) -> Deferred[None]:
        """Close every idle connection; fires when they are all closed."""
        waits: list[Deferred[None]] = []
        for origin in self.origins.values():
            idle, origin.idle = origin.idle, []
            for conn in idle:
                waits.append(conn.close())
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        done: Deferred[Any] = DeferredList(waits)
        return done.addCallback(lambda _: None)

    def schedule_sweep(self) -> None:
        # One timer for the whole pool, only while something is idle.
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_timeout, self._sweep_idle)

    def check(self) -> None:
        """Raise AssertionError when the bookkeeping is off (for tests): idle
        connections are open, unique, request-less, reading heads, and at most
        ``pool_size`` per origin."""
        for origin in self.origins.values():
            assert len(origin.idle) <= self.pool_size, (origin.url, len(origin.idle))
            assert len(set(map(id, origin.idle))) == len(origin.idle), origin.url
            for conn in origin.idle:
                assert conn.request is None and conn.mode == _READ_HEAD and not conn.lost and not conn.buffer, conn
                assert not conn.reading_paused, conn

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        oldest = None
        for origin in self.origins.values():
            for conn in list(origin.idle):
                if now - conn.idle_since >= self.idle_timeout:
                    origin.forget(conn)
                    conn.close()
                elif oldest is None or conn.idle_since < oldest:
                    oldest = conn.idle_since
        if oldest is not None:
            self._sweep = self.reactor.callLater(oldest + self.idle_timeout - now, self._sweep_idle)


class OriginRequest:
    """One request to an origin; what ``BackendExchange`` holds.  See the module docstring."""

    def __init__(self, pool: OriginPool, origin: Origin, method: bytes, target: bytes, block: bytes,
                 has_host: bool, length: int, responder: Responder, credit: Callable[[int], None]) -> None:
        self.pool = pool
        self.origin = origin
        self.method = method
        self.target = target
        self.block = block
        self.has_host = has_host
        self.length = length            # NO_LENGTH, CHUNKED or the declared length
        self.unsent = length if length > 0 else 0   # declared body bytes not yet seen
        self.responder: Responder | None = responder
        self.gate = CreditGate(credit)
        self.pending: list[bytes] = []  # body before there is a connection (credit held)
        self.ended = False              # the caller ended the body
        self.conn: OriginConnection | None = None
        self.dialing: Deferred[Any] | None = None
        self.finished = False           # response complete, failed or cancelled: no more callbacks
        self.dropping = False           # the connection is gone after a complete response: drop body, return credit
        self.redialed = False

    # -- the caller's side -------------------------------------------------------------------

    def start(self) -> None:
        """Take an idle connection (and write the head at once) or dial one."""
        conn = self.origin.take()
        if conn is not None:
            conn.attach(self)
        else:
            self._dial()

    def redial(self, url: str) -> None:
        """Try the origin at ``url`` instead; only from ``origin_failed("unreachable")``."""
        self.origin = self.pool.origin(url)
        self.redialed = True
        self._dial()

    def write(self, data: bytes) -> None:
        if not data or (self.finished and not self.dropping):
            return
        if self.dropping:
            self.gate.credit(len(data))
            return
        if self.length >= 0:
            self.unsent -= len(data)
            if self.unsent < 0:
                self._fail_request(f"request body longer than its Content-Length {self.length}")
                return
        conn = self.conn
        if conn is None:
            self.pending.append(data)
            return
        if self.length == CHUNKED:
            conn.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            conn.transport.write(data)
        self.gate.took(len(data))

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.finished:
            return
        if self.length > 0 and self.unsent > 0:
            self._fail_request(f"request body ended {self.unsent} bytes short of its Content-Length {self.length}")
            return
        conn = self.conn
        if conn is not None:
            if self.length == CHUNKED:
                conn.transport.write(b"0\r\n\r\n")
            conn.request_written()

    def pause_reading(self) -> None:
        """The tunnel window is exhausted: stop reading the origin's socket."""
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_reading(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    def cancel(self) -> None:
        """Abandon the request: the connection is closed, never pooled; no more callbacks."""
        self.finished = True
        self.dropping = False
        self.responder = None
        self.gate.stopProducing()
        if self.dialing is not None:
            dialing, self.dialing = self.dialing, None
            dialing.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    @property
    def sent_all(self) -> bool:
        return self.ended and not self.pending

    # -- connection side -------------------------------------------------------------------

    def _dial(self) -> None:
        d = self.origin.endpoint.connect(self.origin.factory)
        self.dialing = d
        d.addCallbacks(self._connected, self._dial_failed)

    def _connected(self, conn: OriginConnection) -> None:
        self.dialing = None
        if self.finished:
            self.origin.release(conn)   # fresh and unused: keep it for the next request
            return
        conn.attach(self)

    def _dial_failed(self, failure: Failure) -> None:
        self.dialing = None
        if self.finished:
            return
        if failure.check(CancelledError):
            return
        message = failure.getErrorMessage()
        responder = self.responder
        if failure.check(ConnectionRefusedError, DNSLookupError, TimeoutError) and responder is not None:
            # Nothing was sent: the responder may ``redial`` another origin from its callback.
            self.redialed = False
            responder.origin_failed(OriginError("unreachable", message))
            if not self.redialed:
                self.finished = True
                self.responder = None
                self.gate.stopProducing()
            return
        self._failed(OriginError("failed", message))

    def attached(self, conn: OriginConnection) -> None:
        """``conn`` is ours: write the head and whatever body came already."""
        self.conn = conn
        length = self.length
        if length >= 0:
            framing = b"Content-Length: %d\r\n\r\n" % length
        elif length == CHUNKED:
            framing = b"Transfer-Encoding: chunked\r\n\r\n"
        else:
            framing = b"\r\n"
        host = b"" if self.has_host else b"Host: " + self.origin.host_value + b"\r\n"
        head = b"%s %s HTTP/1.1\r\n%s%s%s" % (self.method, self.target, host, self.block, framing)
        pending, self.pending = self.pending, []
        if conn.writes_paused:
            self.gate.pauseProducing()
        if not pending:
            _write_now(conn.transport, head)
        else:
            size = 0
            if length == CHUNKED:
                chunks = [head]
                for data in pending:
                    chunks += (b"%x\r\n" % len(data), data, b"\r\n")
                    size += len(data)
                conn.transport.writeSequence(chunks)
            else:
                size = sum(len(data) for data in pending)
                conn.transport.writeSequence([head, *pending])
            self.gate.took(size)
        if self.ended:
            if length == CHUNKED:
                conn.transport.write(b"0\r\n\r\n")
            conn.request_written()

    def _fail_request(self, message: str) -> None:
        """The caller's body broke its own framing: the origin must not see a short or long body as complete."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.dialing is not None:
            dialing, self.dialing = self.dialing, None
            dialing.cancel()
        self._failed(OriginError("failed", message))

    def _failed(self, error: OriginError) -> None:
        self.finished = True
        self.dropping = False
        responder, self.responder = self.responder, None
        self.gate.stopProducing()
        if responder is not None:
            responder.origin_failed(error)

    def _response(self, head: ResponseHead, body: bytes, complete: bool) -> None:
        if complete:
            self._complete()
        responder = self.responder
        if complete:
            self.responder = None
        if responder is not None:
            responder.origin_response(head, body, complete)

    def _data(self, data: bytes) -> None:
        if self.responder is not None:
            self.responder.origin_data(data)

    def _done(self) -> None:
        self._complete()
        responder, self.responder = self.responder, None
        if responder is not None:
            responder.origin_done()

    def _complete(self) -> None:
        self.finished = True
        self.conn = None
        if not self.sent_all:
            # The origin answered before the body was all sent (an early 413,
            # say); its connection is closed.  The rest of the body is dropped
            # with credit returned, so the tunnel's request direction can end.
            self.dropping = True
            self.gate.resumeProducing()


@implementer(IPushProducer)
class OriginConnection(Protocol):
    """One HTTP/1.1 connection to an origin; see the module docstring."""

    log = Logger()
    transport: Any   # TCP or TLS: write, writeSequence, producers, abortConnection

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.request: OriginRequest | None = None
        self.buffer = b""
        self.head: ResponseHead | None = None      # the current response's head, once read
        self.remaining = 0                         # body bytes still due (Content-Length)
        self.mode = _READ_HEAD                     # what is being read
        self.decoder: _ChunkedTransferDecoder | None = None
        self.collect: list[bytes] | None = None    # chunked body bytes of the read that carried the head
        self.chunks_done: bytes | None = None      # what followed the last chunk
        self.keep = False                          # this response allows reuse
        self.reading_paused = False                # we paused the socket (tunnel window)
        self.writes_paused = False                 # the socket paused us (its send buffer is full)
        self.request_done = False
        self.lost = False
        self.registered = False
        self.idle_since = 0.0
        self.waiting: list[Deferred[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        # Producer for the connection's whole life: pause/resume go to the current request's gate.
        self.transport.registerProducer(self, True)
        self.registered = True

    def usable(self) -> bool:
        return not self.lost and not getattr(self.transport, "disconnecting", False)

    def attach(self, request: OriginRequest) -> None:
        self.request = request
        self.head = None
        self.mode = _READ_HEAD
        self.request_done = False
        self.keep = False
        request.attached(self)

    def request_written(self) -> None:
        self.request_done = True

    def close(self) -> Deferred[None]:
        """Close (politely); fires when closed."""
        d: Deferred[None] = Deferred()
        if self.lost:
            d.callback(None)
            return d
        self.waiting.append(d)
        self._lose()
        return d

    def _lose(self) -> None:
        # TLS holds its close_notify (and so the close) until the producer
        # is unregistered; TCP does not mind either way.
        if self.registered:
            self.registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self) -> None:
        self.request = None
        if not self.lost:
            self.transport.abortConnection()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost:
            self.reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if not self.lost:
                self.transport.resumeProducing()

    # -- IPushProducer (for the socket's send buffer) --------------------------------------------

    def pauseProducing(self) -> None:
        self.writes_paused = True
        if self.request is not None:
            self.request.gate.pauseProducing()

    def resumeProducing(self) -> None:
        self.writes_paused = False
        if self.request is not None:
            self.request.gate.resumeProducing()

    def stopProducing(self) -> None:
        self.writes_paused = True

    # -- the response ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        request = self.request
        if request is None:
            # An idle connection has nothing to say: an origin that talks
            # anyway is out of step with us, so it is not reused.
            self.log.info("origin {origin} sent {n} bytes on an idle connection; closing it",
                          origin=self.origin.url, n=len(data))
            self.origin.forget(self)
            self.transport.abortConnection()
            return
        mode = self.mode
        if mode == _READ_LENGTH:
            self._body_length(request, data)
        elif mode == _READ_CHUNKED:
            self._body_chunked(request, data)
        elif mode == _READ_TO_CLOSE:
            request._data(data)
        elif mode == _READ_HEAD:
            self._head(request, data)
        else:
            # Bytes after a complete response, before the request was all sent.
            self._abandon()

    def _head(self, request: OriginRequest, data: bytes) -> None:
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self._bad(request, f"response head larger than {MAX_HEAD} bytes")
                else:
                    self.buffer = data
                return
            try:
                head = parse_head(data[:end])
            except BadResponse as exc:
                self._bad(request, str(exc))
                return
            data = data[end + 4:]
            if head.code >= 200 or head.code == 101:
                break
            # 100 Continue, 102, 103: interim, the final head follows.
        self.head = head
        code = head.code
        if code < 200 or code in _NO_BODY_STATUS or request.method == b"HEAD":
            # No body whatever the headers say; 101 (never asked for) is not reused.
            self.keep = head.keep_alive and code >= 200 and not data
            self.mode = _READ_DONE
            request._response(head, b"", True)
            self._finish()
        elif head.chunked:
            self.keep = head.keep_alive
            self.mode = _READ_CHUNKED
            self.collect = []
            self.chunks_done = None
            self.decoder = _ChunkedTransferDecoder(self._chunk, self._last_chunk)
            try:
                self.decoder.dataReceived(data)
            except _MalformedChunkedDataError as exc:
                self.collect = None
                self._bad(request, f"malformed chunked body: {exc}")
                return
            collected, self.collect = self.collect, None
            body = b"".join(collected)
            if self.chunks_done is not None:
                self.keep = self.keep and not self.chunks_done
                self.mode = _READ_DONE
                request._response(head, body, True)
                self._finish()
            else:
                request._response(head, body, False)
        elif head.length is not None:
            self.keep = head.keep_alive
            length = head.length
            if len(data) >= length:
                self.keep = self.keep and len(data) == length
                self.mode = _READ_DONE
                request._response(head, data[:length] if len(data) > length else data, True)
                self._finish()
            else:
                self.remaining = length - len(data)
                self.mode = _READ_LENGTH
                request._response(head, data, False)
        else:
            self.keep = False
            self.mode = _READ_TO_CLOSE
            request._response(head, data, False)

    def _body_length(self, request: OriginRequest, data: bytes) -> None:
        remaining = self.remaining - len(data)
        if remaining > 0:
            self.remaining = remaining
            request._data(data)
            return
        self.remaining = 0
        if remaining < 0:
            self.keep = False
            data = data[:remaining]
        self.mode = _READ_DONE
        if data:
            request._data(data)
        if self.request is request:
            request._done()
            self._finish()

    def _body_chunked(self, request: OriginRequest, data: bytes) -> None:
        assert self.decoder is not None
        try:
            self.decoder.dataReceived(data)
        except _MalformedChunkedDataError as exc:
            self._bad(request, f"malformed chunked body: {exc}", broke_off=True)
            return
        if self.chunks_done is not None and self.request is request:
            self.keep = self.keep and not self.chunks_done
            self.mode = _READ_DONE
            request._done()
            self._finish()

    def _chunk(self, data: bytes) -> None:
        if self.collect is not None:
            self.collect.append(data)
        elif self.request is not None:
            self.request._data(data)

    def _last_chunk(self, rest: bytes) -> None:
        self.chunks_done = rest

    def _finish(self) -> None:
        """The response is complete (the request's callbacks already ran): pool or close."""
        request, self.request = self.request, None
        self.decoder = None
        self.head = None
        if request is None or self.lost:
            return
        if self.keep and self.request_done:
            self.mode = _READ_HEAD
            self.resume_reading()
            self.origin.release(self)
        else:
            self._lose()

    def _abandon(self) -> None:
        self.request = None
        self.transport.abortConnection()

    def _bad(self, request: OriginRequest, message: str, broke_off: bool = False) -> None:
        self.request = None
        self.transport.abortConnection()
        request.conn = None
        request._failed(OriginError("broke_off" if broke_off else "failed", f"bad response: {message}"))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # type: ignore[assignment]
        self.lost = True
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)
        request, self.request = self.request, None
        if request is None:
            self.origin.forget(self)
            return
        request.conn = None
        mode = self.mode
        if mode == _READ_TO_CLOSE:
            request._done()       # close-delimited: the close is the end
        elif mode == _READ_HEAD:
            request._failed(OriginError("failed", "connection closed before a response"
                                        f" ({reason.getErrorMessage()})"))
        elif mode in (_READ_LENGTH, _READ_CHUNKED):
            left = f"{self.remaining} bytes short" if mode == _READ_LENGTH else "in a chunked body"
            request._failed(OriginError("broke_off", f"response broke off {left} ({reason.getErrorMessage()})"))
