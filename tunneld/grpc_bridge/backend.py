"""The client's side of a tunnelled gRPC call: a raw-bytes call to the backend.

Theory of operation
-------------------
``GrpcBackendExchange`` is the tunnel's ``ResponderHandler`` for a
``GRPC`` request (reactor thread); ``_BackendCall`` is its other half in the
bridge thread and owns the ``grpc.aio`` call.  They talk only by hops.

* The call goes to a cached channel for the route's backend (``grpc://``
  plaintext, ``grpcs://`` with the default SSL roots), with identity
  (de)serializers, the caller's metadata and its remaining deadline.  A
  request that came whole in the head (one message and the half-close: unary
  and server-streaming calls) is sent as ``unary_stream`` -- one batch,
  nothing to write; otherwise ``stream_stream`` and a writer task feeds the
  messages as they arrive, crediting each to the tunnel only after
  ``call.write`` returned.
* The response: initial metadata, each message, then code, details and
  trailing metadata, in as few tunnel messages as is free: the headers ride
  with the first message, and the last message with the status when the call
  is already done (for the first message after one loop turn, which lets a
  unary answer's status that already arrived be processed).  Headers the backend sends alone are relayed alone
  after a short grace (``HEADERS_ALONE_GRACE``), so a unary call costs one
  tunnel message and a server that answers "ready" first is still seen.
  While the tunnel reports a full window the reader stops reading the
  backend until ``writable``.
* An ``ErrorMessage`` (caller cancelled, deadline, stream lost) cancels the
  backend call; ``finally`` always cancels it too, so cancellation reaches
  the backend whatever ended the task.  A backend that cannot be reached
  ends the call with grpc's own status (UNAVAILABLE), relayed as is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tunneld import tunnel_pb2 as pb
from tunneld.session import unit_cost
from tunneld.grpc_bridge.stream import Bridge, ChannelCredentialsFactory, channel_credentials, message_size_options
from tunneld.protocols.headers import grpc_metadata_from_pb
from tunneld.tunnel import Tunnel

HEADERS_ALONE_GRACE = 0.005
_CREDIT_BATCH = 64 * 1024
_END = object()
_STATUS_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}

# Backend servers refuse pings more often than every 5 minutes by default
# (GOAWAY "too_many_pings"), so backend channels ping only that often, and
# only while calls are open.
BACKEND_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # A transparent proxy must not replay a call on its own (the caller
    # decides); grpc's retry layer would also copy every message sent.
    ("grpc.enable_retries", 0),
]


def backend_target(url: str) -> tuple[str, bool]:
    """``grpc://host:port`` -> (``host:port``, secure?); the port defaults by scheme."""
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    secure = scheme == "grpcs"
    bracketed = hostport.startswith("[")
    if (bracketed and "]:" not in hostport) or (not bracketed and ":" not in hostport):
        hostport = f"{hostport}:{443 if secure else 80}"
    return hostport, secure


class GrpcChannels:
    """One cached ``grpc.aio`` channel per backend and message limit (bridge thread only)."""

    def __init__(self, tls: ChannelCredentialsFactory | None = None) -> None:
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self.tls = tls or channel_credentials()  # grpcs:// peers verified against backend_ca or system roots

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, backend: str, max_message_size: int) -> grpc.aio.Channel:
        key = (backend, max_message_size)
        channel = self._channels.get(key)
        if channel is None:
            target, secure = backend_target(backend)
            options = BACKEND_KEEPALIVE_OPTIONS + message_size_options(max_message_size)
            if secure:
                channel = grpc.aio.secure_channel(target, self.tls(), options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[key] = channel
        return channel

    async def close(self, grace: float | None) -> None:
        """Let open calls finish for up to ``grace`` seconds, then cancel them and close."""
        channels, self._channels = list(self._channels.values()), {}
        if channels:
            await asyncio.gather(*(channel.close(grace) for channel in channels), return_exceptions=True)


class GrpcChannelsService(Service):
    """Closes the backend channels when the client stops (after the drain)."""

    def __init__(self, bridge: Bridge, channels: GrpcChannels, grace: float) -> None:
        self.bridge = bridge
        self.channels = channels
        self.grace = grace

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if not self.bridge.running:
            return None
        return self.bridge.submit(self.channels.close(self.grace))


class _BackendCall:
    """Bridge half of one tunnelled call (bridge thread only)."""

    def __init__(self, exchange: GrpcBackendExchange, head: pb.GrpcRequest, backend: str,
                 max_message_size: int, channels: GrpcChannels) -> None:
        self.exchange = exchange
        self.bridge = exchange.bridge
        self.head = head
        self.backend = backend
        self.max_message_size = max_message_size
        self.channels = channels
        self.requests: asyncio.Queue[object] | None = None
        self.can_send: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.call: Any = None
        self.cancelled = False
        self.head_pending = True

    # -- entry points (call_soon from the reactor) ---------------------------------

    def begin(self) -> None:
        if self.cancelled:
            return
        self.requests = asyncio.Queue()
        self.can_send = asyncio.Event()
        self.can_send.set()
        self.task = asyncio.get_running_loop().create_task(self._run())
        self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.bridge.to_reactor(self.exchange.failed, repr(task.exception()))

    def request(self, body: bytes | None, end: bool) -> None:
        if self.requests is None or self.cancelled:
            return
        if body is not None:
            self.requests.put_nowait(body)
        if end:
            self.requests.put_nowait(_END)

    def pause(self) -> None:
        if self.can_send is not None:
            self.can_send.clear()

    def resume(self) -> None:
        if self.can_send is not None:
            self.can_send.set()

    def cancel(self) -> None:
        self.cancelled = True
        if self.call is not None:
            self.call.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.requests is not None:
            self.requests = None  # drop what was queued

    # -- the call ------------------------------------------------------------------

    async def _run(self) -> None:
        head = self.head
        writer: asyncio.Task[None] | None = None
        call: Any = None
        try:
            try:
                channel = self.channels.get(self.backend, self.max_message_size)
                path = f"/{head.service}/{head.method}"
                metadata = grpc_metadata_from_pb(head.metadata)
                timeout = head.timeout or None
                if head.has_message and head.is_last_chunk:
                    call = channel.unary_stream(path)(head.body, metadata=metadata, timeout=timeout)
                else:
                    call = channel.stream_stream(path)(metadata=metadata, timeout=timeout)
                    first = head.body if head.has_message else None
                    writer = asyncio.get_running_loop().create_task(self._write(call, first, head.is_last_chunk))
                self.call = call
            except Exception as e:  # bad metadata and the like: grpc refuses before the call exists
                self._send(pb.GrpcResponse(is_first_chunk=True, is_last_chunk=True,
                                           status_code=grpc.StatusCode.INTERNAL.value[0],
                                           details=f"tunneld client could not call the backend: {e}"))
                return
            await self._relay(call)
        finally:
            if writer is not None:
                writer.cancel()
            if call is not None:
                call.cancel()  # a no-op when it ended; otherwise the backend learns now

    async def _write(self, call: Any, first: bytes | None, end: bool) -> None:
        queue = self.requests
        assert queue is not None
        to_reactor = self.bridge.to_reactor
        ex = self.exchange
        owed = 0
        try:
            if first is not None:
                await call.write(first)
                owed += unit_cost(len(first))
            if end:
                await call.done_writing()
                return
            while True:
                if owed and queue.empty():
                    to_reactor(ex.credit, owed)
                    owed = 0
                item = await queue.get()
                if item is _END:
                    await call.done_writing()
                    return
                await call.write(item)
                owed += unit_cost(len(item))  # type: ignore[arg-type]
                if owed >= _CREDIT_BATCH:
                    to_reactor(ex.credit, owed)
                    owed = 0
        except asyncio.CancelledError:
            raise
        except Exception:
            return  # the call is over; the reader relays its status

    async def _relay(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        self.head_pending = True
        # Normally the headers come with the first message (or the status) and
        # leave in one tunnel message; a watcher relays headers sent alone.
        timer = loop.call_later(HEADERS_ALONE_GRACE, self._watch_headers, call)
        try:
            item = await self._read_one(call)
        finally:
            timer.cancel()
        while True:
            resp = pb.GrpcResponse()
            if self.head_pending:
                self.head_pending = False
                resp.is_first_chunk = True
                resp.initial_metadata.extend(_to_pb(await call.initial_metadata()))
            if item is not _END:
                resp.body = item  # type: ignore[assignment]
                resp.has_message = True
                if resp.is_first_chunk and not call.done():
                    await asyncio.sleep(0)  # a unary answer's status that already arrived lands now
                if not call.done():
                    self._send(resp)
                    assert self.can_send is not None
                    if not self.can_send.is_set():
                        await self.can_send.wait()
                    item = await self._read_one(call)
                    continue
            # The call is over: status, details, trailers (with the last message, if any).
            code = await call.code()
            resp.is_last_chunk = True
            resp.status_code = code.value[0]
            resp.details = await call.details() or ""
            resp.trailing_metadata.extend(_to_pb(await call.trailing_metadata()))
            self._send(resp)
            return

    def _watch_headers(self, call: Any) -> None:
        """The first message is slow: relay the headers alone if they come first by a margin."""
        if self.head_pending and not call.done():
            asyncio.get_running_loop().create_task(self._headers_alone(call))

    async def _headers_alone(self, call: Any) -> None:
        metadata = await call.initial_metadata()
        await asyncio.sleep(HEADERS_ALONE_GRACE)  # a message right behind them still joins them
        if self.head_pending and not call.done() and not self.cancelled:
            self.head_pending = False
            self._send(pb.GrpcResponse(is_first_chunk=True, initial_metadata=_to_pb(metadata)))

    @staticmethod
    async def _read_one(call: Any) -> object:
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError:
            return _END  # a non-OK status; code() and friends have it
        return _END if msg is grpc.aio.EOF else msg

    def _send(self, resp: pb.GrpcResponse) -> None:
        self.bridge.to_reactor(self.exchange.respond, resp)


def _to_pb(metadata: Any) -> list[pb.Header]:
    out = []
    for key, value in metadata or ():
        out.append(pb.Header(name=key, value=value if isinstance(value, bytes) else value.encode("utf-8")))
    return out


class GrpcBackendExchange:
    """One tunnelled gRPC call served by a backend (a ``ResponderHandler``, reactor thread)."""

    log = Logger()

    def __init__(self, tunnel: Tunnel, request_id: str, head: pb.TunnelMessage, route: pb.Route, bridge: Bridge,
                 channels: GrpcChannels, *, finished: Callable[[dict[str, object]], None] | None = None) -> None:
        self.tunnel = tunnel
        self.request_id = request_id
        self.trace_id = head.trace_id
        self.route = route
        self.bridge = bridge
        self.finished_cb = finished
        req = head.grpc_request
        self.path = f"/{req.service}/{req.method}"
        self.call = _BackendCall(self, req, route.backend, route.max_message_size or 16 * 1024 * 1024, channels)
        self.done = False
        self.paused = False
        self.status = ""
        self.bytes_out = 0
        self.started = time.monotonic()

    # -- ResponderHandler ---------------------------------------------------------

    def begin(self) -> None:
        if not self.bridge.running:
            self.done = True
            self.tunnel.cancel(self.request_id, 502, "grpc bridge is not running")
            return
        self.bridge.call_soon(self.call.begin)

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        req = msg.grpc_request
        self.bridge.call_soon(self.call.request, req.body if req.has_message else None, end)

    def writable(self) -> None:
        if self.paused:
            self.paused = False
            self.bridge.call_soon(self.call.resume)

    def closed(self) -> None:
        self._finish()

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        # A peer's "response complete" after our status is the normal end of a
        # call whose caller was still streaming.
        if not self.done:
            self.status = self.status or f"aborted {code}: {message}"
        self.bridge.call_soon(self.call.cancel)
        self._finish()

    # -- from the bridge ------------------------------------------------------------

    def respond(self, resp: pb.GrpcResponse) -> None:
        if self.done:
            return
        self.bytes_out += len(resp.body)
        if resp.is_last_chunk:
            self.status = _STATUS_NAMES.get(resp.status_code, str(resp.status_code))
        ok = self.tunnel.send(self.request_id, pb.TunnelMessage(grpc_response=resp))
        if not ok and not self.done and not resp.is_last_chunk and not self.paused:
            self.paused = True
            self.bridge.call_soon(self.call.pause)

    def credit(self, n: int) -> None:
        if not self.done:
            self.tunnel.consumed(self.request_id, n)

    def failed(self, error: str) -> None:
        """The bridge half broke (a bug): end the request rather than leave it hanging."""
        self.log.error("gRPC backend call {path} failed: {error}", path=self.path, error=error,
                       request_id=self.request_id, trace_id=self.trace_id)
        if not self.done:
            self.status = "INTERNAL"
            self.tunnel.cancel(self.request_id, 502, f"tunneld client error: {error}")
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.finished_cb is not None:
            self.finished_cb({
                "protocol": "grpc", "route": self.route.name, "status": self.status or "-",
                "duration": time.monotonic() - self.started, "bytes_out": self.bytes_out,
                "request_id": self.request_id, "trace_id": self.trace_id, "path": self.path,
            })
