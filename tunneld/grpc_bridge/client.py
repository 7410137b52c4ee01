"""The client's dial to the tunnel port, reconnecting forever, as a Service.

The reactor side decides *when* to dial (``Backoff`` with an injected clock
and random source: 0.5 s first, x2, 10 s cap, each delay jittered down to half
of it); the bridge thread owns
the grpc channel and call.  Each attempt is a fresh channel (grpc's own
reconnect backoff would fight ours) and the reactor gets a fresh
``StreamHandle``; ``connected(handle)`` attaches the session and sends
``stream_open``.  ``reset()`` is called once the server accepted the stream.

Fleets: when a server restarts, every client loses its stream at the same
instant, and when a fleet boots, every client starts at once.  ``dial_jitter``
spreads those dials: the first dial after start, and the first redial after
an accepted stream was lost, wait an extra random 0..``dial_jitter`` seconds
(uniform).  Later redials are already spread by the backoff's jitter.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Callable

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from tunneld import tunnel_pb2 as pb
from tunneld.dial_report import DialHistory
from tunneld.frames import DEFAULT_MAX_FRAME_SIZE
from tunneld.grpc_bridge.stream import Bridge, StreamHandle, keepalive_options, message_size_options
from tunneld.grpc_bridge.stream import ChannelCredentialsFactory


#: The one method of wire v2 (SPEC §3.1), from the generated descriptor.
PROXY_METHOD = "/" + pb.DESCRIPTOR.services_by_name["TunnelService"].full_name + "/Proxy"


def _raw(data: bytes) -> bytes:
    return data  # frames are serialized by the writer (frames.py)


class Backoff:
    """Reconnect delays: ``initial`` first, times ``factor``, capped, with jitter.

    Each delay is ``base * (1 - jitter * rand())``: with the default 0.5 a
    delay lies anywhere between half its base and its base ("equal jitter"),
    so clients that failed together spread over half a step instead of
    retrying in lock-step, while the first wait stays <= 0.5 s and the cap
    holds.
    """

    def __init__(self, initial: float = 0.5, factor: float = 2.0, cap: float = 10.0, jitter: float = 0.5,
                 rand: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self.jitter = jitter
        self.rand = rand
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        # Jitter only downwards, so the first wait is never above 0.5 s and the cap holds.
        return base * (1 - self.jitter * self.rand())

    def reset(self) -> None:
        self.attempt = 0


def dial_spread(dial_jitter: float, rand: Callable[[], float] = random.random) -> float:
    """The extra wait before a first dial (start, or after an accepted stream was lost): 0..dial_jitter s."""
    return dial_jitter * rand() if dial_jitter > 0 else 0.0


class TunnelClientService(Service):
    """Keeps one tunnel stream to the server open."""

    log = Logger()

    def __init__(self, bridge: Bridge, target: str, token: str, connected: Callable[[StreamHandle], None],
                 lost: Callable[[StreamHandle, str], None],
                 clock: Any, *, max_message_size: int, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, backoff: Backoff | None = None,
                 credentials: ChannelCredentialsFactory | None = None, server_name: str = "",
                 before_stop: Callable[[], Deferred[None]] | None = None, keepalive: float = 10.0,
                 dial_jitter: float = 0.0) -> None:
        self.bridge = bridge
        self.dial_jitter = dial_jitter
        self.keepalive = keepalive
        self.target = target
        self.token = token
        self.connected = connected
        self.lost = lost
        self.before_stop = before_stop
        self.clock = clock
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.backoff = backoff or Backoff()
        self.credentials = credentials
        self.server_name = server_name
        self.handle: StreamHandle | None = None
        self._retry: Any = None
        self._ended: Deferred[None] | None = None
        self.attempts = 0
        self.reconnects = 0
        # "cannot reach" vs "lost", one warning after a few failures, and /status in words.
        self.history = DialHistory(target, tls=credentials is not None)

    def startService(self) -> None:
        super().startService()
        self.bridge.start()
        delay = dial_spread(self.dial_jitter, self.backoff.rand)
        if delay > 0:
            # A fleet that boots together would otherwise hit the server in one burst.
            self._retry = self.clock.callLater(delay, self.dial)
        else:
            self.dial()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        d = maybeDeferred(self.before_stop) if self.before_stop is not None else succeed(None)
        return d.addBoth(self._abort_rest)

    def _abort_rest(self, _: object) -> Deferred[None] | None:
        handle = self.handle
        if handle is None:
            return None
        # A drained stream was closed cleanly; give the close a moment to reach
        # the server before cancelling what is left.
        ended: Deferred[None] = Deferred()
        self._ended = ended
        timer = self.clock.callLater(2.0, lambda: ended.called or ended.callback(None))

        def abort(_: object) -> None:
            if timer.active():
                timer.cancel()
            if self.handle is handle:
                self.handle = None
                handle.abort("client stopping")
                self.lost(handle, "client stopping")

        return ended.addCallback(abort)

    def reset(self) -> None:
        """The server accepted the stream."""
        self.backoff.reset()
        if self.history.failures >= 3:
            self.log.info("tunnel to {target} is up after {n} failed dials", target=self.target,
                          n=self.history.failures)
        self.history.accepted()

    def dial(self) -> None:
        self._retry = None
        if not self.running:
            return
        self.attempts += 1
        self.history.dialing()
        handle = StreamHandle(self.bridge, peer=self.target, max_frame_size=self.max_frame_size)
        handle.on_lost = lambda reason: self._lost(handle, reason)
        self.handle = handle
        self.bridge.spawn(self._run(handle))
        self.connected(handle)

    def _lost(self, handle: StreamHandle, reason: str) -> None:
        self.lost(handle, reason)
        if handle is not self.handle:
            return
        self.handle = None
        if not self.running:
            if self._ended is not None and not self._ended.called:
                self._ended.callback(None)
            return
        # attempt 0: the stream had been accepted (reset) or this is the first
        # dial's failure; after a server restart the whole fleet is here at once.
        spread = dial_spread(self.dial_jitter, self.backoff.rand) if self.backoff.attempt == 0 else 0.0
        delay = self.backoff.next_delay() + spread
        self.reconnects += 1
        report = self.history.failed(reason)
        if report.kind == "lost":
            self.log.info("tunnel to {target} lost ({reason}); reconnecting in {delay:.2f} s",
                          target=self.target, reason=report.words, delay=delay)
        elif report.kind == "cannot_reach":
            self.log.info("cannot reach the server at {target} ({reason}); retrying in {delay:.2f} s",
                          target=self.target, reason=report.words, delay=delay)
        elif report.kind == "warn":
            self.log.warn("cannot reach the server at {target}: {n} dials in a row failed; last error: {reason}"
                          "{cause_text}. Retrying quietly (at most every 10 s) until it answers; /status says the same",
                          target=self.target, n=report.failures, reason=report.words, cause=report.cause,
                          cause_text=f"; likely cause: {report.cause}" if report.cause else "")
        else:
            self.log.debug("cannot reach the server at {target} ({reason}); retrying in {delay:.2f} s",
                           target=self.target, reason=report.words, delay=delay)
        self._retry = self.clock.callLater(delay, self.dial)

    async def _run(self, handle: StreamHandle) -> None:
        options: list[tuple[str, Any]] = keepalive_options(self.keepalive) + message_size_options(self.max_message_size)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(self.target, self.credentials(), options=options)
        else:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        proxy = channel.stream_stream(PROXY_METHOD, request_serializer=_raw,
                                      response_deserializer=pb.TunnelFrame.FromString)
        call = proxy(metadata=(("authorization", f"Bearer {self.token}"),))
        handle.attach(lambda reason: call.cancel())
        writer = asyncio.get_running_loop().create_task(handle.run_writer(call.write, call.done_writing))
        reason = "server closed the stream"
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    break
                handle.reader_delivered(frame.messages)
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                reason = (f"the server speaks another tunnel protocol version ({reason}); "
                          f"this client speaks {PROXY_METHOD.split('/')[1]}")
        except asyncio.CancelledError:
            reason = "cancelled"
        except Exception as e:
            reason = repr(e)
        finally:
            writer.cancel()
            handle.reader_lost(reason)
            call.cancel()
            await channel.close()
