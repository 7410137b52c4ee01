"""The tunnel port: a grpc.aio server for ``TunnelService.Proxy``, as a Service.

Each Proxy call is authenticated here, in the bridge thread, before anything
reaches the reactor: the first message must be ``stream_open``, and the
group's token (``authorization: Bearer …`` metadata, else the message's
``token``) is compared in constant time.  A refused call ends with
``UNAUTHENTICATED`` and is never registered.  Accepted calls are announced to
the reactor as a ``StreamHandle`` plus their first message.

Connections that never become a tunnel are not kept: one that does not
finish the HTTP/2 preface and SETTINGS within ``stream.HANDSHAKE_TIMEOUT_MS`` is
closed by grpc, a Proxy call whose first message does not arrive within
``OPEN_TIMEOUT`` is ended with ``DEADLINE_EXCEEDED``, and a call whose peer
sends bytes that are not a ``TunnelMessage`` is ended with ``ABORTED``.

Who knocks (SPEC §8.2): every open is counted by result in an ``OpenGuard``
(registry/admission.py) and every refusal logged, at most one line per
address per ``admission.LOG_INTERVAL`` (10 s) carrying a count.  An address that keeps
failing is throttled: its opens end with ``RESOURCE_EXHAUSTED`` before the
server-wide ``open_rate`` is asked, so a flood from one address never uses
up the opens of clients elsewhere, and before any token is compared.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from tunneld import tunnel_pb2 as pb
from tunneld.frames import DEFAULT_MAX_FRAME_SIZE
from tunneld.grpc_bridge.stream import Bridge, ServerCredentialsFactory, StreamHandle, start_server
from tunneld.registry.admission import OpenGuard, OpenRateLimiter, RefusalLine

#: An accepted Proxy call must send ``stream_open`` within this many seconds.
OPEN_TIMEOUT = 10.0

Authenticate = Callable[[str, str], bool]          # (group, token) -> ok; must be thread-safe
OnStream = Callable[[StreamHandle, pb.TunnelMessage], None]


def peer_address(peer: str) -> str:
    """The address part of grpc's ``context.peer()``: "ipv4:1.2.3.4:5" -> "1.2.3.4", "ipv6:[::1]:5" -> "::1"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")] if "]" in rest else rest[1:]
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer   # unix sockets and anything else: the whole string


def bearer_token(metadata: Any) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            v = value.decode() if isinstance(value, bytes) else value
            if v.lower().startswith("bearer "):
                return str(v[7:].strip())
    return ""


#: ``tunneld.v2.TunnelService``, from the generated descriptor.
SERVICE = pb.DESCRIPTOR.services_by_name["TunnelService"].full_name
OLD_SERVICES = ("tunneld.v1.TunnelService",)


def _raw(data: bytes) -> bytes:
    return data  # frames are serialized by the writer (frames.py)


class _Servicer:
    log = Logger()

    def __init__(self, bridge: Bridge, authenticate: Authenticate, on_stream: OnStream,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, limiter: OpenRateLimiter | None = None,
                 guard: OpenGuard | None = None) -> None:
        self.bridge = bridge
        self.limiter = limiter   # touched on the bridge thread only
        self.guard = guard if guard is not None else OpenGuard(0, 60.0)   # likewise
        self.authenticate = authenticate
        self.on_stream = on_stream
        self.max_frame_size = max_frame_size
        self.calls: set[asyncio.Task[Any]] = set()

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """Proxy with frames as raw bytes outbound; a clear refusal for older wire versions."""
        proxy = grpc.stream_stream_rpc_method_handler(
            self.Proxy, request_deserializer=pb.TunnelFrame.FromString, response_serializer=_raw)
        old = grpc.stream_stream_rpc_method_handler(self.OldProxy)
        return (grpc.method_handlers_generic_handler(SERVICE, {"Proxy": proxy}),
                *(grpc.method_handlers_generic_handler(name, {"Proxy": old}) for name in OLD_SERVICES))

    async def OldProxy(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        self.bridge.to_reactor(lambda: self.log.warn(
            "refused a client from {peer} speaking an older tunnel protocol (tunneld.v1); "
            "this server speaks {service}: upgrade the client", peer=peer, service=SERVICE))
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"this server speaks tunnel protocol {SERVICE}, not tunneld.v1: upgrade the client")

    async def Proxy(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            await self._proxy(context)
        finally:
            self.calls.discard(task)

    async def _first_message(self, context: grpc.aio.ServicerContext) -> tuple[pb.TunnelMessage | None, list[pb.TunnelMessage]]:
        """The stream's first message and the rest of its frame (None: the peer closed)."""
        while True:
            frame = await context.read()
            if frame is grpc.aio.EOF:
                return None, []
            if frame.messages:  # an empty frame is ignored
                msgs = list(frame.messages)
                return msgs[0], msgs[1:]

    def log_refusal(self, line: RefusalLine) -> None:
        """One line for ``line.count`` refused opens from one address (reactor thread).

        The text starts "refused tunnel open from <address>:" in text and JSON
        logs alike (etc/fail2ban/ matches it)."""
        results = ", ".join(f"{k} {v}" for k, v in sorted(line.by_result.items()))
        self.log.warn("refused tunnel open from {address}: {reason} (group {group!r}); "
                      "{count} refused since this address's last line ({results})",
                      address=line.address, reason=line.detail, group=line.group, count=line.count,
                      results=results, by_result=line.by_result)

    async def _refuse(self, context: grpc.aio.ServicerContext, address: str, result: str,
                      code: grpc.StatusCode, message: str, *, group: str = "", detail: str = "") -> None:
        """Count and (maybe) log a refused open, then end the call with ``code``."""
        # The group name comes from the peer: a bounded piece of it in the log.
        line = self.guard.refused(address, result, asyncio.get_running_loop().time(), group=group[:64],
                                  detail=detail or message)
        if line is not None:
            self.bridge.to_reactor(self.log_refusal, line)
        await context.abort(code, message)

    async def flush_refusals(self) -> None:
        """Log the refusal counts held back, about once a second (a task on the bridge loop)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            for line in self.guard.due(loop.time()):
                self.bridge.to_reactor(self.log_refusal, line)

    async def _proxy(self, context: grpc.aio.ServicerContext) -> None:
        address = peer_address(context.peer())
        now = asyncio.get_running_loop().time()
        if self.guard.throttled(address, now):
            # Before the server-wide open_rate and before any token is compared.
            wait = self.guard.retry_after(address, now)
            await self._refuse(context, address, "throttled", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many refused tunnel opens from {address}: retry in {wait:.0f} s",
                               detail="throttled after repeated refused opens")
        if self.limiter is not None and not self.limiter.allow(now):
            # Before anything is read or allocated: the client retries after its backoff.
            await self._refuse(context, address, "rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many new tunnel streams (open_rate {self.limiter.rate:g}/s): retry later",
                               detail="open_rate limit")
        try:
            first, rest = await asyncio.wait_for(self._first_message(context), OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            await self._refuse(context, address, "malformed", grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no stream_open within {OPEN_TIMEOUT:g} s", detail="no stream_open in time")
        except Exception as e:  # not a TunnelFrame
            await self._refuse(context, address, "malformed", grpc.StatusCode.ABORTED,
                               f"malformed first message: {e!r}", detail="malformed first message")
        if first is None:
            return
        if first.WhichOneof("payload") != "stream_open":
            await self._refuse(context, address, "malformed", grpc.StatusCode.FAILED_PRECONDITION,
                               "the first message must be stream_open", detail="first message not stream_open")
        so = first.stream_open
        token = bearer_token(context.invocation_metadata()) or so.token
        if not token or not self.authenticate(so.group, token):
            await self._refuse(context, address, "unauthenticated", grpc.StatusCode.UNAUTHENTICATED,
                               f"invalid token for group {so.group!r}", group=so.group,
                               detail="no token" if not token else "wrong token or unknown group")
        self.guard.accepted()
        so.token = token  # the one that authenticated, so a reload can revoke it
        handle = StreamHandle(self.bridge, peer=context.peer(), max_frame_size=self.max_frame_size)
        task = asyncio.current_task()
        assert task is not None
        call = _ProxyCall(task, handle)
        # The reactor ends a stream (violation, heartbeat timeout) through
        # call.end, which interrupts the read below; the abort itself happens
        # in this task, so grpc always sees a clean abort with our reason.
        handle.attach(call.end)
        writer = asyncio.get_running_loop().create_task(handle.run_writer(context.write))
        writer.add_done_callback(call.writer_done)
        self.bridge.to_reactor(self.on_stream, handle, first)
        handle.reader_delivered(rest)
        # This coroutine lives as long as the stream: its locals would keep the
        # first frame's protobuf arena (decoded strings and blocks, ~1 KiB) alive
        # for every idle stream after the reactor has copied what it needs.
        del first, rest, so
        try:
            # This task reads (no reader task of its own: one task and one
            # coroutine frame fewer per idle stream, bench/README.md).
            ended = await self._read(context, handle, call)
            if call.aborted is not None:
                handle.reader_lost(call.aborted)
                # Never cancel a write in progress: it breaks the call (UNKNOWN).
                handle.stop_writer()
                await asyncio.wait({writer}, timeout=5)
                await context.abort(grpc.StatusCode.ABORTED, call.aborted)
            elif ended is None:
                # The writer finished: the reactor closed the stream (or a write failed).
                handle.reader_lost("closed by the server")
            else:
                # The reactor closes the handle once it has failed the stream's requests
                # (an abort meanwhile stops the writer, which ends this wait).
                reason, broken = ended
                handle.reader_lost(reason)
                await asyncio.wait({writer}, timeout=5)
                if broken:
                    # Never end a call that failed (a malformed message) with OK.
                    await context.abort(grpc.StatusCode.ABORTED, reason)
        except asyncio.CancelledError:
            handle.reader_lost("stream cancelled")
            raise
        finally:
            writer.cancel()

    async def _read(self, context: grpc.aio.ServicerContext, handle: StreamHandle,
                    call: _ProxyCall) -> tuple[str, bool] | None:
        """Deliver the peer's messages; return why reading ended and whether it failed.

        None: ``call`` interrupted the read (an abort, or the writer ended).
        """
        call.reading = True
        try:
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    return "client closed the stream", False
                handle.reader_delivered(frame.messages)
                # Not kept while this waits for the next one (idle streams).
                del frame
        except asyncio.CancelledError:
            if not call.interrupted:
                raise  # grpc's own cancel (the peer went away, the server stops)
            call.task.uncancel()
            return None
        except Exception as e:  # a message that does not parse; grpc's errors on a vanished peer
            return f"stream broken: {e!r}", True
        finally:
            call.reading = False


class _ProxyCall:
    """What ends one Proxy call's read from outside it (bridge thread, loop callbacks only)."""

    __slots__ = ("task", "handle", "reading", "interrupted", "aborted")

    def __init__(self, task: asyncio.Task[Any], handle: StreamHandle) -> None:
        self.task = task
        self.handle = handle
        self.reading = False
        self.interrupted = False
        self.aborted: str | None = None

    def _interrupt(self) -> None:
        if self.reading and not self.interrupted:
            self.interrupted = True
            self.task.cancel()   # lands in context.read(); _read turns it into a return

    def end(self, reason: str) -> None:
        """The reactor ends the stream with ``reason`` (StreamHandle.abort)."""
        if self.aborted is not None:
            return
        self.aborted = reason
        if self.reading:
            self._interrupt()
        else:
            self.handle.stop_writer()   # cuts short the wait for the writer

    def writer_done(self, _: object) -> None:
        self._interrupt()


class TunnelServerService(Service):
    """Listens on ``tunnel_listen`` and announces authenticated streams."""

    log = Logger()

    def __init__(self, bridge: Bridge, listen: str, authenticate: Authenticate, on_stream: OnStream,
                 *, max_message_size: int, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, credentials: ServerCredentialsFactory | None = None,
                 before_stop: Callable[[], Deferred[None]] | None = None,
                 limiter: OpenRateLimiter | None = None, keepalive: float = 10.0,
                 guard: OpenGuard | None = None, on_failure: Callable[[Any], None] | None = None) -> None:
        self.bridge = bridge
        self.on_failure = on_failure   # the tap's one-line, exit-status path; without it: log and stop
        self.limiter = limiter
        self.guard = guard if guard is not None else OpenGuard(0, 60.0)
        self._flusher: asyncio.Task[None] | None = None
        self.keepalive = keepalive
        self.listen = listen
        self.authenticate = authenticate
        self.on_stream = on_stream
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.credentials = credentials
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._servicer: _Servicer | None = None
        self.ready: Deferred[int] = Deferred()
        self.before_stop = before_stop

    def startService(self) -> None:
        super().startService()
        self.bridge.start()
        d = self.bridge.submit(self._start())
        d.addCallback(self._started)
        d.addErrback(self._failed)

    def _started(self, port: int) -> None:
        self.port = port
        self.log.info("tunnel port listening on {listen} (port {port})", listen=self.listen, port=port)
        self.ready.callback(port)

    def _failed(self, failure: Any) -> None:
        if self.on_failure is not None:
            self.on_failure(failure)
            self.ready.errback(failure)
            self.ready.addErrback(lambda _: None)   # reported by on_failure, not as an unhandled error
            return
        self.log.failure("tunnel port failed to start on {listen}", failure, listen=self.listen)
        self.ready.errback(failure)
        from twisted.internet import reactor
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined,misc]

    async def _start(self) -> int:
        def register(server: grpc.aio.Server) -> None:
            self._servicer = _Servicer(self.bridge, self.authenticate, self.on_stream, self.max_frame_size,
                                       self.limiter, self.guard)
            server.add_generic_rpc_handlers(self._servicer.handlers())

        self._server, port = await start_server(self.listen, self.max_message_size, register, self.credentials,
                                                keepalive=self.keepalive)
        assert self._servicer is not None
        self._flusher = asyncio.get_running_loop().create_task(self._servicer.flush_refusals())
        return port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = maybeDeferred(self.before_stop) if self.before_stop is not None else succeed(None)
        return d.addBoth(self._stop_server)

    def _stop_server(self, _: object) -> Deferred[None] | None:
        if self._server is None or not self.bridge.running:
            return None
        server, self._server = self._server, None
        flusher, self._flusher = self._flusher, None
        return self.bridge.submit(self._stop(server, flusher))

    async def _stop(self, server: grpc.aio.Server, flusher: asyncio.Task[None] | None) -> None:
        if flusher is not None:
            flusher.cancel()
        await server.stop(grace=1.0)
