"""Tests for tunneld.registry.admission: the tunnel port's open-rate limiter."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.admission import OpenGuard, OpenRateLimiter, RefusalLine


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


class OpenGuardTests(SynchronousTestCase):
    """The tunnel port's refused-open bookkeeping (SPEC §8.2), on a Clock."""

    def brute_force(self, guard: OpenGuard, clock: Clock, n: int, address: str = "10.0.0.1") -> list[str]:
        """``n`` wrong opens 0.01 s apart as the tunnel port handles them; each one's result."""
        results = []
        for _ in range(n):
            if guard.throttled(address, clock.seconds()):
                result = "throttled"
            else:
                result = "unauthenticated"
            self.lines += [line for line in [guard.refused(address, result, clock.seconds(), group="default",
                                                           detail="wrong token")] if line is not None]
            results.append(result)
            clock.advance(0.01)
        return results

    def setUp(self) -> None:
        self.lines: list[RefusalLine] = []

    def test_throttled_after_limit_until_the_window_passes(self) -> None:
        """After 10 refusals in 60 s an address is throttled; others are not; the window's end frees it."""
        clock = Clock()
        guard = OpenGuard(10, 60.0)
        results = self.brute_force(guard, clock, 200)
        self.assertEqual(results, ["unauthenticated"] * 10 + ["throttled"] * 190)
        self.assertFalse(guard.throttled("10.0.0.2", clock.seconds()))
        self.assertAlmostEqual(guard.retry_after("10.0.0.1", clock.seconds()), 60.0 - 2.0, places=6)
        clock.advance(58.0 - 0.001)
        self.assertTrue(guard.throttled("10.0.0.1", clock.seconds()))
        clock.advance(0.002)
        self.assertFalse(guard.throttled("10.0.0.1", clock.seconds()))
        self.assertEqual(guard.counts, {"accepted": 0, "unauthenticated": 10, "malformed": 0, "rate_limited": 0,
                                        "throttled": 190})

    def test_sliding_window(self) -> None:
        """Refusals spread wider than the window never throttle."""
        clock = Clock()
        guard = OpenGuard(3, 10.0)
        for _ in range(20):
            self.assertFalse(guard.throttled("a", clock.seconds()))
            guard.refused("a", "malformed", clock.seconds())
            clock.advance(5.0)
        self.assertEqual(guard.counts["malformed"], 20)

    def test_rate_limited_and_throttled_do_not_count_toward_the_throttle(self) -> None:
        """Only the address's own faults (unauthenticated, malformed) count; a full open_rate does not."""
        guard = OpenGuard(2, 60.0)
        for _ in range(50):
            guard.refused("a", "rate_limited", 0.0)
        self.assertFalse(guard.throttled("a", 0.0))
        guard.refused("a", "unauthenticated", 0.0)
        guard.refused("a", "malformed", 0.0)
        self.assertTrue(guard.throttled("a", 0.0))

    def test_zero_limit_never_throttles(self) -> None:
        """auth_fail_limit 0: counted and logged, never throttled."""
        guard = OpenGuard(0, 60.0)
        for _ in range(100):
            guard.refused("a", "unauthenticated", 0.0)
        self.assertFalse(guard.throttled("a", 0.0))
        self.assertEqual(guard.counts["unauthenticated"], 100)

    def test_one_line_per_address_per_interval_with_the_count(self) -> None:
        """200 refusals: a line at the first, the other 199 in one line once 10 s have passed."""
        clock = Clock()
        guard = OpenGuard(10, 60.0)
        self.brute_force(guard, clock, 200)   # 2 s
        self.assertEqual([(l.address, l.count) for l in self.lines], [("10.0.0.1", 1)])
        self.assertEqual(guard.due(clock.seconds()), [])   # within the interval: held back
        clock.advance(8.0)
        [line] = guard.due(clock.seconds())
        self.assertEqual((line.count, line.by_result, line.group, line.detail),
                         (199, {"unauthenticated": 9, "throttled": 190}, "default", "wrong token"))
        self.assertEqual(guard.due(clock.seconds() + 100), [])

    def test_a_refusal_after_the_interval_is_logged_at_once_with_what_was_held(self) -> None:
        """The next refusal after 10 s carries the held-back count itself."""
        guard = OpenGuard(10, 60.0)
        self.assertEqual(guard.refused("a", "unauthenticated", 0.0).count, 1)   # type: ignore[union-attr]
        self.assertIsNone(guard.refused("a", "unauthenticated", 1.0))
        line = guard.refused("a", "throttled", 10.0)
        assert line is not None
        self.assertEqual((line.count, line.by_result), (2, {"unauthenticated": 1, "throttled": 1}))

    def test_address_table_is_bounded_least_recently_seen_first(self) -> None:
        """At most max_addresses are remembered; the least recently seen goes first; a quiet table empties."""
        guard = OpenGuard(2, 60.0, max_addresses=3)
        for address in ("a", "b", "c"):
            guard.refused(address, "unauthenticated", 0.0)
            guard.refused(address, "unauthenticated", 0.0)
        guard.refused("a", "throttled", 0.0)   # "a" seen again: "b" is now the oldest
        guard.refused("d", "unauthenticated", 0.0)
        self.assertEqual(list(guard.table), ["c", "a", "d"])
        self.assertEqual(guard.forgotten, 1)
        self.assertTrue(guard.throttled("a", 1.0))
        self.assertFalse(guard.throttled("b", 1.0))   # forgotten: bounded memory beats a longer throttle
        guard.due(30.0)
        guard.due(100.0)
        self.assertEqual(len(guard.table), 0)

    def test_configure_applies_from_now_on(self) -> None:
        """A reload's new limit and window apply to the next check."""
        guard = OpenGuard(10, 60.0)
        for _ in range(3):
            guard.refused("a", "unauthenticated", 0.0)
        self.assertFalse(guard.throttled("a", 0.0))
        guard.configure(3, 60.0)
        self.assertTrue(guard.throttled("a", 0.0))
