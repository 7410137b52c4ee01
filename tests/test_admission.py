"""Tests for tunneld.registry.admission: the tunnel port's open-rate limiter."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.admission import OpenRateLimiter


class OpenRateLimiterTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A burst is allowed at once, then opens at the rate; the rest are refused."""
        clock = Clock()
        limiter = OpenRateLimiter(rate=100, burst=50, now=clock.seconds())
        self.assertEqual(sum(limiter.allow(clock.seconds()) for _ in range(80)), 50)
        self.assertEqual(limiter.refused, 30)
        clock.advance(0.1)   # ten tokens
        self.assertEqual(sum(limiter.allow(clock.seconds()) for _ in range(20)), 10)
        clock.advance(100)   # refills only up to the burst
        self.assertEqual(sum(limiter.allow(clock.seconds()) for _ in range(80)), 50)

    def test_storm_of_10000_takes_rate_bounded_time(self) -> None:
        """10,000 clients retrying every 0.2 s are all admitted within 10000/rate seconds plus a retry."""
        clock = Clock()
        limiter = OpenRateLimiter(rate=500, burst=200, now=clock.seconds())
        waiting = 10_000
        while waiting:
            admitted = sum(limiter.allow(clock.seconds()) for _ in range(waiting))
            waiting -= admitted
            clock.advance(0.2)
        self.assertLessEqual(clock.seconds(), 10_000 / 500 + 1)
        self.assertEqual(limiter.allowed, 10_000)

    def test_zero_rate_is_no_limit(self) -> None:
        """rate 0 admits everything."""
        limiter = OpenRateLimiter(rate=0, burst=1)
        self.assertTrue(all(limiter.allow(0.0) for _ in range(1000)))

    def test_clock_going_backwards_adds_nothing(self) -> None:
        """An earlier ``now`` never refills the bucket."""
        limiter = OpenRateLimiter(rate=10, burst=1, now=5.0)
        self.assertTrue(limiter.allow(5.0))
        self.assertFalse(limiter.allow(4.0))
