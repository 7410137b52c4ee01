"""The server's gRPC entry: any external gRPC call, forwarded through a tunnel.

Theory of operation
-------------------
A ``grpc.aio`` server on ``grpc_listen`` runs in the bridge thread with one
generic handler that takes EVERY method as stream-stream with no
(de)serializers: messages stay raw bytes, and unary, client-, server- and
bidi-streaming calls all look the same (they are the same on the wire).
Each external call has two halves that talk only by thread hops
(``bridge.to_reactor`` one way, ``bridge.call_soon`` the other):

* ``_EntryCall`` (bridge thread) owns the ``ServicerContext``.  A reader task
  takes the caller's messages; the call's own task is the ONE writer: it
  relays what comes back from the tunnel, in order, and ends the call with the
  backend's status, details and trailing metadata.
* ``_EntryExchange`` (reactor thread) is the tunnel's ``ExchangeHandler``: it
  asks the dispatcher for a route and a tunnel, starts the request, sends the
  caller's messages (held to the route's ``max_message_size``), returns credit.

Sequence of a call: the reader reads the caller's first message and
half-close, which normally come with the call's headers; the head is built
from them -- a unary request costs ONE tunnel message -- and ONE hop takes it
to the reactor, which dispatches (no route -> ``UNIMPLEMENTED``, no client ->
``UNAVAILABLE``) and starts the tunnel request.  The bridge waits for those
first reads at most ``FIRST_MESSAGE_GRACE`` (5 ms), never for a second
message: a bidi caller may be waiting for our answer before it sends.

Flow control: caller -> tunnel, the reactor tells the reader to stop reading
(``can_read``) while ``Tunnel.send`` reports a full window and resumes it on
``writable``; tunnel -> caller, credit goes back only after
``context.write`` returned, i.e. what the caller's transport took.

Endings, each releasing both halves: the backend's status (relayed exactly;
non-OK through ``context.abort`` with a tuple of trailers, else grpc reports
UNKNOWN); the caller cancelling or its deadline passing (grpc cancels our
task; ``finally`` tells the reactor, which cancels the tunnel request, which
cancels the backend call); the tunnel stream lost or the client refusing
(``UNAVAILABLE`` with the reason, at once).

grpcio's server API does not expose the caller's ``:authority``
(grpc/grpc#38906); until it does (``experimental_authority``), gRPC routes
are matched by service alone and routes with a ``host`` are never chosen.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.grpc_bridge.stream import Bridge, ServerCredentialsFactory, start_server
from tunneld.inspector import Exchange, Inspector
from tunneld.protocols import headers as h
from tunneld.protocols.headers import filter_grpc_metadata, grpc_metadata_from_pb
from tunneld.tunnel import Tunnel

STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_EOF = grpc.aio.EOF
_CREDIT_BATCH = 64 * 1024
FIRST_MESSAGE_GRACE = 0.005


@dataclass(frozen=True)
class GrpcTarget:
    """Where a gRPC call goes: a tunnel and the route's limits."""

    tunnel: Tunnel
    route: str
    max_message_size: int
    client_id: str = field(default="", compare=False)   # the client serving it (inspector)


@dataclass(frozen=True)
class GrpcRefusal:
    """Answer the call here; ``code`` names a ``grpc.StatusCode`` member."""

    code: str
    message: str
    route: str = ""   # the route it matched, if any (logs and metrics count the refusal under it)


class GrpcDispatcher(Protocol):
    def dispatch_grpc(self, service: str, authority: str) -> GrpcTarget | GrpcRefusal:
        """Pick the tunnel for a call to ``service``, or say why not."""

    def finished(self, record: dict[str, object]) -> None:
        """A call ended (for logs and metrics)."""


def parse_method(path: str) -> tuple[str, str] | None:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``; None if malformed."""
    if not path.startswith("/"):
        return None
    service, _, method = path[1:].partition("/")
    if not service or not method or "/" in method:
        return None
    return service, method


def trace_id_of(metadata: list[tuple[str, bytes]]) -> str:
    """W3C traceparent's trace-id, else x-request-id, else a new id."""
    for key, value in metadata:
        if key == "traceparent":
            parts = value.split(b"-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                return parts[1].decode("ascii", "replace")
        elif key == "x-request-id" and value:
            return value.decode("latin-1")[:128]
    return uuid.uuid4().hex


def _authority(context: Any) -> str:
    get = getattr(context, "experimental_authority", None)  # newer grpcio only
    try:
        return str(get()) if get is not None else ""
    except Exception:
        return ""


@dataclass(frozen=True)
class _Fail:
    """End the call with ``code`` (sent by the reactor half, which is done by then)."""

    code: grpc.StatusCode
    message: str


def _set_result(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _EntryCall:
    """Bridge half of one external call (bridge thread only)."""

    def __init__(self, entry: GrpcEntryService, context: grpc.aio.ServicerContext, service: str,
                 method: str) -> None:
        self.entry = entry
        self.bridge = entry.bridge
        self.context = context
        self.service = service
        self.method = method
        self.authority = _authority(context)
        self.metadata = filter_grpc_metadata(context.invocation_metadata() or ())
        self.trace_id = trace_id_of(self.metadata)
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.early: list[object] = []        # caller messages (or _EOF) read before the start, at most 2
        self.early_waiter: asyncio.Future[None] | None = None
        self.reader_done = False
        self.started = False
        self.start_event = asyncio.Event()
        self.can_read = asyncio.Event()       # cleared by the reactor while the window is full
        self.can_read.set()
        self.finished = False                # ended by a status, or by a failure the reactor decided
        self.exchange = _EntryExchange(entry, self)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_caller())
        try:
            await self._await_request_start()
            self._start()
            await self._relay()
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except grpc.aio.InternalError:
            # A grpc operation failed under us (ExecuteBatchError): the caller's call is
            # already dead, typically cancelled while a write was in flight, before grpc
            # cancelled this task.  The finally below reports it as the caller gone.
            pass
        except Exception as e:
            # The caller's transport broke under a write; anything else is a bug worth a line.
            if not self.context.done():
                self.bridge.to_reactor(self.exchange.failed, repr(e))
        finally:
            reader.cancel()
            if not self.finished:
                remaining = self.context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code, why, status = s.TIMEOUT, "deadline exceeded", "DEADLINE_EXCEEDED"
                else:
                    code, why, status = s.CANCELLED, "caller cancelled", "CANCELLED"
                self.bridge.to_reactor(self.exchange.caller_gone, code, why, status)

    # -- caller -> tunnel ------------------------------------------------------

    async def _read_caller(self) -> None:
        context = self.context
        to_reactor = self.bridge.to_reactor
        ex = self.exchange
        try:
            while True:
                if not self.started and len(self.early) >= 2:
                    await self.start_event.wait()
                if not self.can_read.is_set():
                    await self.can_read.wait()
                msg = await context.read()
                if msg is _EOF:
                    if self.started:
                        to_reactor(ex.caller_end)
                    else:
                        self._early(_EOF)
                    return
                if self.started:
                    to_reactor(ex.caller_message, msg)
                else:
                    self._early(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            return  # the call broke; grpc cancels the call's task, whose finally reports it
        finally:
            self.reader_done = True
            self._early(None)

    def _request_start_known(self) -> bool:
        early = self.early
        return self.reader_done or len(early) >= 2 or (bool(early) and early[-1] is _EOF)

    def _early(self, item: object) -> None:
        if item is not None:
            self.early.append(item)
        waiter = self.early_waiter
        if waiter is not None and self._request_start_known():
            _set_result(waiter)

    async def _await_request_start(self) -> None:
        """Give the caller's first message and half-close ``FIRST_MESSAGE_GRACE`` to be read.

        They normally arrive with the call's headers and are read within tens
        of microseconds, so the head carries them (a unary request is one
        tunnel message); a caller that waits for us first pays the grace once.
        """
        if self._request_start_known():
            return
        loop = asyncio.get_running_loop()
        self.early_waiter = waiter = loop.create_future()
        timer = loop.call_later(FIRST_MESSAGE_GRACE, _set_result, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.early_waiter = None

    def _start(self) -> None:
        """Hand the head (and what else was read) to the reactor: it dispatches and starts."""
        early, self.early = self.early, []
        remaining = self.context.time_remaining()
        req = pb.GrpcRequest(
            service=self.service, method=self.method, host=self.authority, is_first_chunk=True,
            metadata=[pb.Header(name=k, value=v) for k, v in self.metadata],
            timeout=max(remaining, 0.001) if remaining is not None else 0.0,
        )
        if early and early[0] is not _EOF:
            req.body = early.pop(0)  # type: ignore[assignment]
            req.has_message = True
        if early and early[0] is _EOF:
            req.is_last_chunk = True
            early.pop(0)
        self.started = True
        # ``early`` holds at most one more message: the reader stops at two before the start.
        self.bridge.to_reactor(self.exchange.begin, pb.TunnelMessage(grpc_request=req, trace_id=self.trace_id), early)
        self.start_event.set()

    # -- tunnel -> caller: the one writer ------------------------------------------

    async def _relay(self) -> None:
        context = self.context
        inbox = self.inbox
        owed = 0
        while True:
            if owed and inbox.empty():
                self.bridge.to_reactor(self.exchange.consumed, owed)
                owed = 0
            item = await inbox.get()
            if type(item) is pb.GrpcResponse:
                resp = item
                if resp.is_first_chunk and (resp.initial_metadata or not (resp.has_message or resp.is_last_chunk)):
                    # Headers the backend sent alone (or with content) go out now;
                    # empty ones ride on the first message or the status.
                    await context.send_initial_metadata(grpc_metadata_from_pb(resp.initial_metadata))
                if resp.has_message:
                    await context.write(resp.body)
                    if not resp.is_last_chunk:
                        owed += s.unit_cost(len(resp.body))
                        if owed >= _CREDIT_BATCH:
                            self.bridge.to_reactor(self.exchange.consumed, owed)
                            owed = 0
                if resp.is_last_chunk:
                    self.finished = True
                    await self._finish(resp)
                    return
            elif isinstance(item, _Fail):
                self.finished = True
                await context.abort(item.code, item.message)

    async def _finish(self, resp: pb.GrpcResponse) -> None:
        context = self.context
        code = STATUS_BY_VALUE.get(resp.status_code, grpc.StatusCode.UNKNOWN)
        trailers = grpc_metadata_from_pb(resp.trailing_metadata)
        if code is grpc.StatusCode.OK:
            if trailers:
                context.set_trailing_metadata(trailers)
            if resp.details:
                context.set_details(resp.details)
            return
        # abort() needs a tuple of trailers, else grpc turns the status into UNKNOWN.
        await context.abort(code, resp.details, tuple(trailers))


class _EntryExchange:
    """Reactor half of one external call: the tunnel's ``ExchangeHandler``."""

    log = Logger()

    def __init__(self, entry: GrpcEntryService, call: _EntryCall) -> None:
        self.entry = entry
        self.bridge = entry.bridge
        self.call = call                  # only its immutable fields and loop-safe entry points are used here
        self.tunnel: Tunnel | None = None
        self.request_id = ""
        self.route = "-"
        self.limit = 0
        self.done = False
        self.paused = False
        self.status = ""
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.rec: Exchange | None = None   # the inspector's record (None: inspector off)

    # -- from the bridge ----------------------------------------------------------

    def begin(self, msg: pb.TunnelMessage, more: list[bytes]) -> None:
        """Dispatch the call and start its tunnel request with ``msg`` as head."""
        if self.done:
            return
        call = self.call
        decision = self.entry.dispatcher.dispatch_grpc(call.service, call.authority)
        if self.entry.inspector is not None:
            self._record(msg, decision)
        if isinstance(decision, GrpcRefusal):
            self.route = decision.route or "-"
            self._fail_caller(decision.code, decision.message)
            return
        self.tunnel = tunnel = decision.tunnel
        self.route = decision.route
        self.limit = decision.max_message_size
        req = msg.grpc_request
        req.route = decision.route
        if not self._fits(len(req.body)):
            return
        if not tunnel.is_open:
            self._fail_caller("UNAVAILABLE", f"tunnel to the client closed: {tunnel.lost_reason or 'closing'}")
            return
        try:
            self.request_id = tunnel.start(msg, self)
        except s.SessionError as e:
            self._fail_caller("UNAVAILABLE", f"tunnel not available: {e}")
            return
        if self.rec is not None:
            self.rec.request_id = self.request_id
        self.bytes_in += len(req.body)
        for body in more:
            self.caller_message(body)

    def caller_message(self, body: bytes) -> None:
        if self.done or not self.request_id or not self._fits(len(body)):
            return
        self.bytes_in += len(body)
        if self.rec is not None:
            self.rec.message("in", body)
        assert self.tunnel is not None
        ok = self.tunnel.send(self.request_id, pb.TunnelMessage(grpc_request=pb.GrpcRequest(body=body, has_message=True)))
        if not ok and not self.done and not self.paused:
            self.paused = True
            self.bridge.call_soon(self.call.can_read.clear)

    def caller_end(self) -> None:
        if self.done or not self.request_id:
            return
        assert self.tunnel is not None
        self.tunnel.send(self.request_id, pb.TunnelMessage(grpc_request=pb.GrpcRequest(is_last_chunk=True)))

    def caller_gone(self, code: int, message: str, status: str) -> None:
        """The caller cancelled, its deadline passed, or the call failed here."""
        if self.done:
            return
        self.done = True
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, code, message)
        self.status = status
        self._log()

    def consumed(self, n: int) -> None:
        if not self.done and self.tunnel is not None:
            self.tunnel.consumed(self.request_id, n)

    # -- ExchangeHandler ------------------------------------------------------------

    def message_received(self, msg: pb.TunnelMessage, end: bool) -> None:
        resp = msg.grpc_response
        self.bytes_out += len(resp.body)
        if self.rec is not None:
            self._record_response(resp)
        if end:
            self.done = True
            code = STATUS_BY_VALUE.get(resp.status_code)
            self.status = code.name if code is not None else str(resp.status_code)
            self._log()
        self.bridge.call_soon(self.call.inbox.put_nowait, resp)

    def writable(self) -> None:
        if self.paused:
            self.paused = False
            self.bridge.call_soon(self.call.can_read.set)

    def closed(self) -> None:
        if not self.done:
            self.done = True
            self._log()

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        if self.done:
            return
        self._fail_caller("UNAVAILABLE", message)

    def failed(self, error: str) -> None:
        self.log.warn("gRPC entry call /{service}/{method} failed: {error}", service=self.call.service,
                      method=self.call.method, error=error, request_id=self.request_id,
                      trace_id=self.call.trace_id)

    # -- helpers --------------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        """Hold a caller's message to the route's limit, as grpc would."""
        if size <= self.limit:
            return True
        self._fail_caller("RESOURCE_EXHAUSTED", f"Received message larger than max ({size} vs. {self.limit})")
        return False

    def _fail_caller(self, code: str, message: str) -> None:
        """End the call with ``code`` (and the tunnel request, if it is still on)."""
        self.done = True
        self.status = code
        if self.tunnel is not None and self.request_id:
            self.tunnel.cancel(self.request_id, s.CANCELLED, message)
        self.bridge.call_soon(self.call.inbox.put_nowait, _Fail(grpc.StatusCode[code], message))
        self._log()

    def _record(self, msg: pb.TunnelMessage, decision: GrpcTarget | GrpcRefusal) -> None:
        assert self.entry.inspector is not None
        call = self.call
        rec = self.rec = self.entry.inspector.begin("grpc")
        rec.trace_id = call.trace_id
        rec.path = call.service
        rec.method = call.method
        rec.host = call.authority
        rec.request_headers = call.metadata
        rec.route = decision.route or "-"
        if isinstance(decision, GrpcTarget):
            rec.client_id = decision.client_id
        req = msg.grpc_request
        if req.has_message:
            rec.message("in", req.body)

    def _record_response(self, resp: pb.GrpcResponse) -> None:
        rec = self.rec
        assert rec is not None
        if resp.is_first_chunk:
            rec.response_headers = h.from_pb(resp.initial_metadata)
        if resp.has_message:
            rec.message("out", resp.body)
        if resp.is_last_chunk:
            rec.details = resp.details
            rec.trailers = h.from_pb(resp.trailing_metadata)
            rec.response_status = resp.status_code

    def _log(self) -> None:
        call = self.call
        if self.rec is not None:
            self.rec.end(self.status)
        self.entry.dispatcher.finished({
            "protocol": "grpc", "method": "POST", "path": f"/{call.service}/{call.method}", "route": self.route,
            "status": self.status, "duration": time.monotonic() - self.started, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "request_id": self.request_id, "trace_id": call.trace_id,
        })


class _AnyMethod(grpc.GenericRpcHandler):
    """Every method, as stream-stream over raw bytes."""

    def __init__(self, entry: GrpcEntryService) -> None:
        self.entry = entry

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        entry = self.entry

        async def serve(_request_iterator: object, context: grpc.aio.ServicerContext) -> None:
            await entry.serve(path, context)

        return grpc.stream_stream_rpc_method_handler(serve)


class GrpcEntryService(Service):
    """Listens on ``grpc_listen`` and forwards every call through a tunnel."""

    log = Logger()

    def __init__(self, bridge: Bridge, listen: str, dispatcher: GrpcDispatcher, *, max_message_size: int,
                 grace: float = 10.0, credentials: ServerCredentialsFactory | None = None,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.bridge = bridge
        self.listen = listen
        self.dispatcher = dispatcher
        self.max_message_size = max_message_size
        self.grace = grace
        self.credentials = credentials
        self.on_failure = on_failure
        self.inspector: Inspector | None = None   # set by the tap when the inspector is on
        self.port = 0
        self.ready: Deferred[int] = Deferred()
        self._server: grpc.aio.Server | None = None

    # -- lifecycle (reactor thread) ----------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.bridge.start()
        d = self.bridge.submit(self._start())
        d.addCallbacks(self._started, self._failed)

    def _started(self, port: int) -> None:
        self.port = port
        self.log.info("gRPC entry listening on {listen} (port {port})", listen=self.listen, port=port)
        self.ready.callback(port)

    def _failed(self, failure: Any) -> None:
        self.log.failure("gRPC entry failed to start on {listen}", failure, listen=self.listen)
        self.ready.errback(failure)
        if self.on_failure is not None:
            self.on_failure()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._server is None or not self.bridge.running:
            return None
        server, self._server = self._server, None
        # In-flight calls get ``grace`` seconds (the drain), then are cancelled.
        return self.bridge.submit(server.stop(grace=self.grace))

    # -- bridge thread -------------------------------------------------------------------

    async def _start(self) -> int:
        register = lambda server: server.add_generic_rpc_handlers((_AnyMethod(self),))  # noqa: E731
        self._server, port = await start_server(self.listen, self.max_message_size, register, self.credentials)
        return port

    async def serve(self, path: str, context: grpc.aio.ServicerContext) -> None:
        parsed = parse_method(path)
        if parsed is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"malformed method name {path!r}")
            return
        await _EntryCall(self, context, *parsed).run()
