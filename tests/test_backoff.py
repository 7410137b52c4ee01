"""Tests for the client's reconnect policy (grpc_bridge.client.Backoff), the dial
service's reconnect scheduling (TunnelClientService) and the reactor side of
grpc_bridge.stream.StreamHandle.

No grpc call, thread or real time: the bridge is a fake whose ``spawn`` closes
the coroutine it is given, and time is a ``task.Clock``.
"""

from __future__ import annotations

import random
from typing import Any, Coroutine

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld import tunnel_pb2 as pb
from tunneld.grpc_bridge.client import Backoff, TunnelClientService, dial_spread
from tunneld.grpc_bridge.stream import StreamHandle


class BackoffTests(SynchronousTestCase):
    def test_delays_without_jitter(self) -> None:
        """With rand()=0 the delays are 0.5, 1, 2, 4, 8, then capped at 10."""
        backoff = Backoff(rand=lambda: 0.0)
        self.assertEqual([backoff.next_delay() for _ in range(7)], [0.5, 1, 2, 4, 8, 10, 10])

    def test_jitter_only_lowers(self) -> None:
        """Jitter never raises a delay above its base and lowers it by at most half."""
        backoff = Backoff(rand=lambda: 1.0)
        self.assertEqual([backoff.next_delay() for _ in range(7)], [0.25, 0.5, 1, 2, 4, 5, 5])
        bases = [0.5, 1, 2, 4, 8] + [10] * 45
        rng = random.Random(1234)
        backoff = Backoff(rand=rng.random)
        for base in bases:
            delay = backoff.next_delay()
            self.assertLessEqual(delay, base)
            self.assertGreaterEqual(delay, base * 0.5)

    def test_jitter_spreads_a_fleet(self) -> None:
        """1,000 clients failing together spread their first retry over 0.25-0.5 s, not a 20 % sliver."""
        rng = random.Random(7)
        delays = [Backoff(rand=rng.random).next_delay() for _ in range(1000)]
        self.assertLess(min(delays), 0.27)
        self.assertGreater(max(delays), 0.48)

    def test_dial_spread(self) -> None:
        """dial_spread is uniform over 0..dial_jitter; 0 turns it off."""
        self.assertEqual(dial_spread(20.0, lambda: 0.25), 5.0)
        self.assertEqual(dial_spread(0.0, lambda: 0.9), 0.0)

    def test_reset_starts_again(self) -> None:
        """reset() makes the next delay 0.5 s again."""
        backoff = Backoff(rand=lambda: 0.0)
        for _ in range(6):
            backoff.next_delay()
        backoff.reset()
        self.assertEqual([backoff.next_delay() for _ in range(3)], [0.5, 1, 2])

    def test_delay_stays_capped_after_many_attempts(self) -> None:
        """After thousands of failed attempts (hours of outage) next_delay still returns the 10 s cap."""
        backoff = Backoff(rand=lambda: 0.0)
        delays = [backoff.next_delay() for _ in range(2000)]
        self.assertEqual(delays[-1], 10)
        self.assertEqual(max(delays), 10)


class FakeBridge:
    """The parts of grpc_bridge.stream.Bridge the dial service uses."""

    def __init__(self) -> None:
        self.running = True
        self.started = 0
        self.spawned = 0
        self.calls: list[tuple[Any, ...]] = []

    def start(self) -> None:
        self.started += 1

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.spawned += 1
        coro.close()

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.calls.append((getattr(fn, "__name__", fn), *args))


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bridge = FakeBridge()
        self.dialled: list[StreamHandle] = []
        self.lost: list[tuple[StreamHandle, str]] = []
        self.service = TunnelClientService(
            self.bridge, "tunnel.example.com:7000", "secret",  # type: ignore[arg-type]
            self.dialled.append, lambda handle, reason: self.lost.append((handle, reason)),
            self.clock, max_message_size=1 << 20, backoff=Backoff(rand=lambda: 0.0),
        )

    def lose(self, reason: str = "UNAVAILABLE: connection refused") -> None:
        """The bridge reports the current dial's stream as gone."""
        self.dialled[-1].deliver_lost(reason)

    def assert_redial_after(self, delay: float) -> None:
        n = len(self.dialled)
        self.clock.advance(delay - 0.01)
        self.assertEqual(len(self.dialled), n, f"dialled before {delay} s")
        self.clock.advance(0.01)
        self.assertEqual(len(self.dialled), n + 1, f"not dialled after {delay} s")

    def test_start_dials_once(self) -> None:
        """startService starts the bridge and dials once, announcing a handle for the target."""
        self.service.startService()
        self.assertEqual(self.bridge.started, 1)
        self.assertEqual(self.bridge.spawned, 1)
        self.assertEqual(len(self.dialled), 1)
        self.assertEqual(self.dialled[0].peer, "tunnel.example.com:7000")
        self.assertIs(self.service.handle, self.dialled[0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reconnect_delays_grow(self) -> None:
        """Each loss redials after the next backoff delay: 0.5 s, then 1 s, then 2 s."""
        self.service.startService()
        self.lose()
        self.assertEqual(self.lost, [(self.dialled[0], "UNAVAILABLE: connection refused")])
        self.assertIsNone(self.service.handle)
        self.assert_redial_after(0.5)
        self.lose()
        self.assert_redial_after(1.0)
        self.lose()
        self.assert_redial_after(2.0)
        self.assertEqual(self.service.attempts, 4)
        self.assertEqual(self.service.reconnects, 3)
        self.assertEqual(self.bridge.spawned, 4)

    def test_reset_after_success(self) -> None:
        """reset() after an accepted stream brings the next redial back to 0.5 s."""
        self.service.startService()
        for delay in (0.5, 1.0, 2.0):
            self.lose()
            self.assert_redial_after(delay)
        self.service.reset()
        self.lose()
        self.assert_redial_after(0.5)

    def test_stop_cancels_pending_retry(self) -> None:
        """stopService cancels a scheduled redial; no dial happens afterwards."""
        self.service.startService()
        self.lose()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        fired: list[object] = []
        self.service.stopService().addCallback(fired.append)
        self.assertEqual(fired, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.dialled), 1)

    def test_stop_with_live_stream_aborts_after_grace(self) -> None:
        """stopService with a live stream waits 2 s for it to end, then aborts it and reports it lost."""
        self.service.startService()
        handle = self.dialled[0]
        fired: list[object] = []
        self.service.stopService().addCallback(fired.append)
        self.assertEqual(fired, [])
        self.clock.advance(1.99)
        self.assertEqual(fired, [])
        self.clock.advance(0.01)
        self.assertEqual(fired, [None])
        self.assertEqual(self.lost, [(handle, "client stopping")])
        self.assertIn(("_do_abort", "client stopping"), self.bridge.calls)
        # The bridge's own late report starts no redial.
        handle.deliver_lost("cancelled")
        self.clock.advance(100)
        self.assertEqual(len(self.dialled), 1)

    def test_stop_ends_when_stream_ends(self) -> None:
        """stopService fires as soon as the stream reports its end, without aborting it or redialling."""
        self.service.startService()
        fired: list[object] = []
        self.service.stopService().addCallback(fired.append)
        self.lose("server closed the stream")
        self.assertEqual(fired, [None])
        self.assertNotIn("_do_abort", [c[0] for c in self.bridge.calls])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.dialled), 1)

    def test_keeps_redialling_through_a_long_outage(self) -> None:
        """After 1100 failed dials in a row (a 3-hour outage) the service still redials every 10 s."""
        self.service.startService()
        for _ in range(1100):
            self.lose()
            self.clock.advance(10)
        self.assertEqual(len(self.dialled), 1101)
        self.lose()
        self.assert_redial_after(10)

    def jittered(self, rand: float) -> TunnelClientService:
        """A dial service with dial_jitter 10 s whose random source always returns ``rand``."""
        return TunnelClientService(
            self.bridge, "tunnel.example.com:7000", "secret",  # type: ignore[arg-type]
            self.dialled.append, lambda handle, reason: self.lost.append((handle, reason)),
            self.clock, max_message_size=1 << 20, backoff=Backoff(rand=lambda: rand), dial_jitter=10.0,
        )

    def test_dial_jitter_delays_first_dial(self) -> None:
        """With dial_jitter the first dial after start waits dial_jitter * rand() (here 10 * 0.3 = 3 s)."""
        self.service = self.jittered(0.3)
        self.service.startService()
        self.assertEqual(self.dialled, [])
        self.assert_redial_after(3.0)

    def test_dial_jitter_cancelled_by_stop(self) -> None:
        """Stopping before the jittered first dial fires means no dial at all."""
        self.service = self.jittered(0.3)
        self.service.startService()
        self.service.stopService()
        self.clock.advance(100)
        self.assertEqual(self.dialled, [])

    def test_dial_jitter_after_accepted_stream_lost(self) -> None:
        """After an accepted stream is lost (server restart) the redial waits the jitter plus the backoff.

        rand() = 0.5: spread 5 s, backoff 0.5 * (1 - 0.5 * 0.5) = 0.375 s; the next failure is backoff only.
        """
        self.service = self.jittered(0.5)
        self.service.startService()
        self.clock.advance(5.0)
        self.assertEqual(len(self.dialled), 1)
        self.service.reset()      # the server accepted the stream
        self.lose("UNAVAILABLE: server restarted")
        self.assert_redial_after(5.375)
        self.lose()               # refused while the server comes back: no spread, backoff only
        self.assert_redial_after(0.75)

    def test_retry_after_stop_does_not_dial(self) -> None:
        """A redial that fires after the service stopped does nothing."""
        self.service.startService()
        self.lose()
        self.service.running = False
        self.clock.advance(0.5)
        self.assertEqual(len(self.dialled), 1)


class StreamHandleDeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = FakeBridge()
        self.handle = StreamHandle(self.bridge, peer="ipv4:10.0.0.2:1")  # type: ignore[arg-type]

    def test_deliver_looks_up_on_message_at_delivery(self) -> None:
        """deliver() calls whatever on_message is attached when the message is delivered."""
        got: list[pb.TunnelMessage] = []
        msg = pb.TunnelMessage(request_id="r1")
        self.handle.deliver(msg)   # nothing attached yet: dropped, no error
        self.handle.on_message = got.append
        self.handle.deliver(msg)
        self.assertEqual(got, [msg])

    def test_deliver_after_lost_is_dropped(self) -> None:
        """Messages delivered after the loss are not passed on."""
        got: list[pb.TunnelMessage] = []
        self.handle.on_message = got.append
        self.handle.deliver_lost("gone")
        self.handle.deliver(pb.TunnelMessage(request_id="late"))
        self.assertEqual(got, [])

    def test_deliver_lost_once(self) -> None:
        """on_lost is called once, with the first reason."""
        reasons: list[str] = []
        self.handle.on_lost = reasons.append
        self.handle.deliver_lost("first")
        self.handle.deliver_lost("second")
        self.assertEqual(reasons, ["first"])

    def test_send_after_lost_is_dropped(self) -> None:
        """send() hops to the bridge while live and does nothing once lost."""
        self.handle.send([pb.TunnelMessage(request_id="a")])
        self.assertEqual(len(self.bridge.calls), 1)
        self.handle.deliver_lost("gone")
        self.handle.send([pb.TunnelMessage(request_id="b")])
        self.assertEqual(len(self.bridge.calls), 1)
