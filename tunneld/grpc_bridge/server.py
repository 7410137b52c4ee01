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
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from tunneld import tunnel_pb2 as pb
from tunneld import tunnel_pb2_grpc as pb_grpc
from tunneld.grpc_bridge.stream import Bridge, ServerCredentialsFactory, StreamHandle, start_server

#: An accepted Proxy call must send ``stream_open`` within this many seconds.
OPEN_TIMEOUT = 10.0

Authenticate = Callable[[str, str], bool]          # (group, token) -> ok; must be thread-safe
OnStream = Callable[[StreamHandle, pb.TunnelMessage], None]


def bearer_token(metadata: Any) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            v = value.decode() if isinstance(value, bytes) else value
            if v.lower().startswith("bearer "):
                return str(v[7:].strip())
    return ""


class _Servicer(pb_grpc.TunnelServiceServicer):
    def __init__(self, bridge: Bridge, authenticate: Authenticate, on_stream: OnStream) -> None:
        self.bridge = bridge
        self.authenticate = authenticate
        self.on_stream = on_stream
        self.calls: set[asyncio.Task[Any]] = set()

    async def Proxy(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            await self._proxy(context)
        finally:
            self.calls.discard(task)

    async def _proxy(self, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await asyncio.wait_for(context.read(), OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no stream_open within {OPEN_TIMEOUT:g} s")
        except Exception as e:  # not a TunnelMessage
            await context.abort(grpc.StatusCode.ABORTED, f"malformed first message: {e!r}")
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("payload") != "stream_open":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be stream_open")
        so = first.stream_open
        token = bearer_token(context.invocation_metadata()) or so.token
        if not token or not self.authenticate(so.group, token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"invalid token for group {so.group!r}")
        so.token = token  # the one that authenticated, so a reload can revoke it
        handle = StreamHandle(self.bridge, peer=context.peer())
        loop = asyncio.get_running_loop()
        # The reactor ends a stream (violation, heartbeat timeout) through this
        # future rather than by cancelling the handler task, so grpc always
        # sees a clean abort with our reason.
        aborting: asyncio.Future[str] = loop.create_future()
        handle.attach(lambda reason: aborting.done() or aborting.set_result(reason))
        writer = loop.create_task(handle.run_writer(context.write))
        reader = loop.create_task(self._read(context, handle))
        self.bridge.to_reactor(self.on_stream, handle, first)
        try:
            done, _ = await asyncio.wait({reader, writer, aborting}, return_when=asyncio.FIRST_COMPLETED)
            if aborting in done:
                handle.reader_lost(aborting.result())
                # Never cancel a write in progress: it breaks the call (UNKNOWN).
                handle.stop_writer()
                await asyncio.wait({writer}, timeout=5)
                await context.abort(grpc.StatusCode.ABORTED, aborting.result())
            elif reader in done:
                # The reactor closes the handle once it has failed the stream's requests.
                reason, broken = reader.result()
                handle.reader_lost(reason)
                await asyncio.wait({writer, aborting}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
                if broken:
                    # Never end a call that failed (a malformed message) with OK.
                    await context.abort(grpc.StatusCode.ABORTED, reason)
            else:
                handle.reader_lost("closed by the server")
        except asyncio.CancelledError:
            handle.reader_lost("stream cancelled")
            raise
        finally:
            reader.cancel()
            writer.cancel()

    async def _read(self, context: grpc.aio.ServicerContext, handle: StreamHandle) -> tuple[str, bool]:
        """Deliver the peer's messages; return why reading ended and whether it failed."""
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return "client closed the stream", False
                handle.reader_delivered(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a message that does not parse; grpc's errors on a vanished peer
            return f"stream broken: {e!r}", True


class TunnelServerService(Service):
    """Listens on ``tunnel_listen`` and announces authenticated streams."""

    log = Logger()

    def __init__(self, bridge: Bridge, listen: str, authenticate: Authenticate, on_stream: OnStream,
                 *, max_message_size: int, credentials: ServerCredentialsFactory | None = None,
                 before_stop: Callable[[], Deferred[None]] | None = None) -> None:
        self.bridge = bridge
        self.listen = listen
        self.authenticate = authenticate
        self.on_stream = on_stream
        self.max_message_size = max_message_size
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
        self.log.failure("tunnel port failed to start on {listen}", failure, listen=self.listen)
        self.ready.errback(failure)
        from twisted.internet import reactor
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined,misc]

    async def _start(self) -> int:
        def register(server: grpc.aio.Server) -> None:
            self._servicer = _Servicer(self.bridge, self.authenticate, self.on_stream)
            pb_grpc.add_TunnelServiceServicer_to_server(self._servicer, server)

        self._server, port = await start_server(self.listen, self.max_message_size, register, self.credentials)
        return port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = maybeDeferred(self.before_stop) if self.before_stop is not None else succeed(None)
        return d.addBoth(self._stop_server)

    def _stop_server(self, _: object) -> Deferred[None] | None:
        if self._server is None or not self.bridge.running:
            return None
        server, self._server = self._server, None
        return self.bridge.submit(server.stop(grace=1.0))
