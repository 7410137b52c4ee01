"""The thread boundary between the reactor and grpc.aio.

Theory of operation
-------------------
grpcio's asyncio API runs in ONE dedicated thread with its own event loop
(``Bridge``), created in ``startService`` and never before twistd forks.
Reactor code never touches grpc objects; it holds ``StreamHandle``s:

* reactor -> grpc: ``StreamHandle.send(msgs)`` appends to a deque and wakes
  (``loop.call_soon_threadsafe``) the stream's single writer task, which
  packs what waits into one ``TunnelFrame`` per write (grpc.aio kills a call
  that two tasks write at once);
* grpc -> reactor: the reader task hands every frame's messages, as one
  item, to ``Bridge.to_reactor`` (one FIFO queue for all streams, drained
  with one wake-up per asyncio iteration); ``on_message`` and
  ``on_lost`` are looked up at delivery time on the reactor thread, so the
  reactor may attach them after the handle was announced, and FIFO ordering of
  ``callFromThread`` keeps messages behind that announcement.

The outbound queue needs no bound of its own: every body byte in it is
covered by a per-request flow-control window (window.py), and request heads
are bounded by the peer's ``max_concurrency``.

Heartbeats of an idle fleet: once the reactor sets ``answer_heartbeats``
(the server does, after the stream was accepted), a frame that is nothing but
the peer's heartbeat is answered here, in the bridge thread: the ack goes
straight into the outbound deque and the reactor is only told "heard"
(``on_heard``, so the registry sees the stream alive).  That skips the
session and the reactor->bridge hop, about half the server CPU of a
heartbeat exchange (bench/README.md, fleet simulator).  The ack is the one
the session would send; a heartbeat never touches request state.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import grpc
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from tunneld import tunnel_pb2 as pb
from tunneld.frames import DEFAULT_MAX_FRAME_SIZE, FramePacker

T = TypeVar("T")

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    # Detect a frozen or vanished peer in ~15 s, well before heartbeat_timeout:
    # a ping every 10 s, the connection closed when its ack is 5 s late.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # grpcio 1.85 does not apply keepalive_timeout_ms to a keepalive ping (its
    # chttp2 writer arms that timer only in a case that does not happen); an
    # unacknowledged ping is ended by the general ping timeout, 60 s by
    # default.  Measured (tests/test_faults.py): a SIGSTOPped peer is noticed
    # after ~5 s with this line; without it, after 60-70 s.
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


ServerCredentialsFactory = Callable[[], grpc.ServerCredentials]
ChannelCredentialsFactory = Callable[[], grpc.ChannelCredentials]


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def server_credentials(cert: str, key: str, client_ca: str = "") -> ServerCredentialsFactory:
    """Read PEM files now; build grpc's credentials later, in the bridge thread.

    (grpc objects made before twistd forks do not survive the fork.)  With
    ``client_ca`` every client must present a certificate it signed.
    """
    chain, private, ca = _read(cert), _read(key), _read(client_ca)
    return lambda: grpc.ssl_server_credentials([(private, chain)], root_certificates=ca,
                                               require_client_auth=ca is not None)


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> ChannelCredentialsFactory:
    """TLS for a channel: ``ca`` to verify the peer ("" = system roots), optional client certificate."""
    roots, chain, private = _read(ca), _read(cert), _read(key)
    return lambda: grpc.ssl_channel_credentials(root_certificates=roots, private_key=private,
                                                certificate_chain=chain)


#: A TCP connection to one of our grpc servers must send the HTTP/2 preface
#: and SETTINGS within this (grpc's default is 120 s; a silent connection was
#: held ~60 s).
HANDSHAKE_TIMEOUT_MS = 10_000


def keepalive_options(interval: float = 10.0) -> list[tuple[str, int]]:
    """KEEPALIVE_OPTIONS with a ping every ``interval`` seconds instead of 10."""
    ms = int(interval * 1000)
    return [(k, ms if k == "grpc.keepalive_time_ms" else v) for k, v in KEEPALIVE_OPTIONS]


async def start_server(listen: str, max_message_size: int, register: Callable[[grpc.aio.Server], None],
                       credentials: ServerCredentialsFactory | None = None,
                       keepalive: float = 10.0) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server (bridge thread) with the options every tunneld port uses.

    Keepalive as for the tunnel, client pings allowed every 5 s, no port
    sharing, a handshake deadline, and TLS when ``credentials`` is given.
    ``register`` adds the handlers.  Returns the server and its bound port.
    """
    options = keepalive_options(keepalive) + message_size_options(max_message_size) + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ]
    server = grpc.aio.server(options=options)
    register(server)
    if credentials is not None:
        port = server.add_secure_port(listen, credentials())
    else:
        port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return server, port


def message_size_options(limit: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class Bridge:
    """The one thread that runs an asyncio loop for grpc.aio."""

    log = Logger()

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self.reactor = reactor
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._to_bridge: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._to_bridge_scheduled = False
        self._to_reactor: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._to_reactor_scheduled = False

    @property
    def running(self) -> bool:
        return self.loop is not None

    def start(self) -> None:
        if self.loop is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            # Let cancelled tasks finish their cleanup before the loop closes.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="tunneld-grpc-bridge", daemon=True)
        self._thread.start()
        ready.wait(10)
        self.loop = loop

    def stop(self) -> None:
        """Stop the loop and join the thread (after services closed their calls)."""
        loop, thread = self.loop, self._thread
        self.loop = None
        self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        # Calls queued for the reactor by the loop's last moments (cancelled
        # tasks' cleanup) may have missed their wake-up: deliver them now.
        self._to_bridge.clear()
        self._to_bridge_scheduled = False
        if self._to_reactor:
            self.reactor.callFromThread(self._run_to_reactor)
        else:
            self._to_reactor_scheduled = False

    # Both directions batch their hops: a hop costs a pipe write and, with
    # everything on one core, a GIL hand-over to the other thread, so every
    # call queued during one iteration of a loop crosses with one wake-up.
    # Each queue is drained in order on its side; the "scheduled" flag is
    # cleared before draining, so an item queued meanwhile is either drained
    # now or wakes the other side again (never lost, never reordered).

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the bridge thread (from the reactor thread).

        The calls of one reactor iteration cross together once its events are
        handled (``callLater(0)`` runs before the reactor waits again, so no
        time passes that the reactor would not spend on those events anyway).
        """
        self._to_bridge.append((fn, args))
        if not self._to_bridge_scheduled:
            self._to_bridge_scheduled = True
            self.reactor.callLater(0, self._wake_bridge)  # type: ignore[attr-defined]

    def _wake_bridge(self) -> None:
        loop = self.loop
        if loop is None:
            self._to_bridge.clear()
            self._to_bridge_scheduled = False
            return
        try:
            loop.call_soon_threadsafe(self._run_to_bridge)
        except RuntimeError:
            pass  # loop already closed during shutdown

    def _run_to_bridge(self) -> None:
        self._to_bridge_scheduled = False
        self._drain(self._to_bridge)

    def to_reactor(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor thread (from the bridge thread).

        The calls of one asyncio iteration cross together at its end.
        """
        self._to_reactor.append((fn, args))
        if not self._to_reactor_scheduled:
            self._to_reactor_scheduled = True
            loop = self.loop
            if loop is None or not loop.is_running():
                self._wake_reactor()
            else:
                loop.call_soon(self._wake_reactor)

    def _wake_reactor(self) -> None:
        self.reactor.callFromThread(self._run_to_reactor)

    def _run_to_reactor(self) -> None:
        self._to_reactor_scheduled = False
        self._drain(self._to_reactor)

    def _drain(self, queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
        while queue:
            fn, args = queue.popleft()
            try:
                fn(*args)
            except Exception as e:  # one broken call must not strand the rest
                self.log.error("bridge call {fn!r} failed: {exc!r}", fn=fn, exc=e)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Run a coroutine on the bridge loop; its result fires a Deferred on the reactor.

        It starts in order with the ``call_soon`` calls around it.
        """
        d: Deferred[T] = Deferred()
        if self.loop is None:
            coro.close()
            d.errback(RuntimeError("grpc bridge is not running"))
            return d
        self.call_soon(self._start_submitted, coro, d)
        return d

    def _start_submitted(self, coro: Coroutine[Any, Any, T], d: Deferred[T]) -> None:
        task = asyncio.get_running_loop().create_task(coro)

        def done(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                self.to_reactor(d.errback, asyncio.CancelledError())
            elif task.exception() is not None:
                self.to_reactor(d.errback, task.exception())
            else:
                self.to_reactor(d.callback, task.result())

        task.add_done_callback(done)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start a task on the bridge loop and forget it (it reports by itself)."""
        self.call_soon(self._create_task, coro)

    def _create_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.to_reactor(lambda: self.log.error("grpc bridge task failed: {exc!r}", exc=exc))


_CLOSE = object()


def _lone_heartbeat(msgs: Any) -> pb.TunnelMessage | None:
    """The message if the frame is a single well-formed client heartbeat (not an ack), else None.

    Anything else, a misdirected heartbeat included, goes to the session, which judges it.
    """
    if len(msgs) != 1:
        return None
    msg = msgs[0]
    if (msg.WhichOneof("payload") != "heartbeat" or msg.heartbeat.ack or msg.request_id
            or msg.direction != pb.CLIENT_TO_SERVER or msg.protocol_type != pb.CONTROL):
        return None
    return msg  # type: ignore[no-any-return]


Write = Callable[[bytes], Awaitable[None]]


class StreamHandle:
    """One tunnel stream (server context or client call) seen from the reactor.

    Both directions coalesce thread hops, so a busy stream costs one hop per
    batch rather than per message.  Outbound, items wait in a deque and one
    wake-up of the writer task drains all of them: it packs everything that
    waited while its previous write was in flight into one frame (frames.py);
    it never waits for more.  Inbound, a frame's messages cross to the
    reactor as one item of the Bridge's queue, which all streams share (no
    deque of its own per stream: an idle fleet pays ~0.7 KiB per empty deque).

    The outbound deque is shared by the two threads without a lock: the
    reactor appends, the bridge thread appends only heartbeat acks, and only
    the writer pops (CPython's deque makes each of those atomic; an ack has no
    order to keep with request messages); ``_wake_pending`` keeps the
    reactor's wake-ups to one in flight.
    """

    #: Server side, set on the reactor once the stream is open: lone client heartbeats are then
    #: answered in the bridge thread.
    answer_heartbeats = False
    #: Reactor side: called for each heartbeat answered in the bridge thread.
    on_heard: Callable[[], None] | None = None
    #: Heartbeats answered in the bridge thread (read by tests and /status).
    heartbeats_answered = 0

    def __init__(self, bridge: Bridge, peer: str = "", max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.bridge = bridge
        self.peer = peer
        self.on_message: Callable[[pb.TunnelMessage], None] | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._abort: Callable[[str], object] | None = None
        self._lost = False
        self._out: deque[object] = deque()
        self._packer = FramePacker(self._out, max_frame_size, stop=_CLOSE)
        self._wake_pending = False
        # The idle writer waits on this future (made in the bridge thread: asyncio
        # objects bind to a loop); a bare future, not an asyncio.Event, whose
        # waiter deque alone costs ~0.7 KiB per stream of an idle fleet.
        self._wakeup: asyncio.Future[None] | None = None
        self._stopping = False

    @property
    def frames_out(self) -> int:
        return self._packer.frames

    # -- reactor thread --------------------------------------------------

    def send(self, msgs: list[pb.TunnelMessage]) -> None:
        if not self._lost:
            self._push_out(msgs)

    def close(self) -> None:
        """Finish writing cleanly after what is queued."""
        self._push_out([_CLOSE])

    def _push_out(self, items: list[Any]) -> None:
        self._out.extend(items)
        if not self._wake_pending:
            self._wake_pending = True
            self.bridge.call_soon(self._wake)

    def abort(self, reason: str) -> None:
        """Cancel the stream at once."""
        self.bridge.call_soon(self._do_abort, reason)

    def _deliver_frame(self, msgs: Any) -> None:
        for msg in msgs:
            self.deliver(msg)

    def _deliver_heard(self) -> None:
        if self.on_heard is not None and not self._lost:
            self.on_heard()

    def deliver(self, msg: pb.TunnelMessage) -> None:
        if self.on_message is not None and not self._lost:
            self.on_message(msg)

    def deliver_lost(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        if self.on_lost is not None:
            self.on_lost(reason)

    # -- bridge thread --------------------------------------------------------

    def attach(self, abort: Callable[[str], object]) -> None:
        self._abort = abort

    def _set_wakeup(self) -> None:
        """Wake the writer if it waits (a writer that is busy looks at the queue again anyway)."""
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        # Clear the flag before waking the writer: anything the reactor
        # appends after this line schedules another wake-up.
        self._wake_pending = False
        self._set_wakeup()

    def stop_writer(self) -> None:
        """Make the writer return after the write in progress, dropping the rest."""
        self._stopping = True
        self._set_wakeup()

    def _do_abort(self, reason: str) -> None:
        if self._abort is not None:
            result = self._abort(reason)
            if asyncio.iscoroutine(result):
                asyncio.get_running_loop().create_task(result)

    async def run_writer(self, write: Write, done_writing: Callable[[], Awaitable[None]] | None = None) -> None:
        """The only task that writes to this stream: one frame per write."""
        packer = self._packer
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not packer.waiting():
                if packer.ended:
                    if done_writing is not None:
                        await done_writing()
                    return
                # Everything that wakes us runs on this loop, so nothing can
                # slip in between this check and the wait.
                self._wakeup = loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                continue
            frame = packer.pack()
            if frame:
                await write(frame)
            # Not kept while idle: the last frame (often the stream_open
            # response with the routes) would live as long as the stream.
            del frame

    def reader_delivered(self, msgs: Any) -> None:
        """A frame's messages (a sequence; an empty frame is ignored)."""
        if self.answer_heartbeats:
            beat = _lone_heartbeat(msgs)
            if beat is not None:
                self._answer(beat)
                return
        if len(msgs):
            self.bridge.to_reactor(self._deliver_frame, msgs)

    def _answer(self, beat: pb.TunnelMessage) -> None:
        # The same ack the server's Session._receive_control sends (the server's messages carry no client_id).
        self._out.append(pb.TunnelMessage(direction=pb.SERVER_TO_CLIENT, protocol_type=pb.CONTROL,
                                          heartbeat=pb.Heartbeat(sent_at_ms=beat.heartbeat.sent_at_ms, ack=True)))
        self.heartbeats_answered += 1
        self._set_wakeup()   # we are on the writer's loop: wake it directly
        self.bridge.to_reactor(self._deliver_heard)

    def reader_lost(self, reason: str) -> None:
        self.bridge.to_reactor(self.deliver_lost, reason)


class BridgeService(MultiService):
    """Starts the bridge thread before its children and stops it after them.

    ``MultiService`` does not wait between children; nesting the grpc
    services here makes sure their own ``stopService`` (drain, close calls,
    stop servers) is done before the loop stops and the thread is joined.
    """

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self.bridge = bridge

    def startService(self) -> None:
        self.bridge.start()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        d: Deferred[Any] = super().stopService()  # type: ignore[assignment]

        def stop_thread(result: object) -> object:
            self.bridge.stop()
            return result

        return d.addBoth(stop_thread)
