"""Upstream backend choice: round-robin over healthy backends, passive cool-down."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.upstreams import UpstreamPool

A, B, C = "http://a:1", "http://b:1", "http://c:1"


class UpstreamPoolTests(SynchronousTestCase):
    def test_round_robin(self) -> None:
        """Healthy backends are taken in turn."""
        pool = UpstreamPool("api", (A, B, C))
        self.assertEqual([pool.choose(0) for _ in range(5)], [A, B, C, A, B])

    def test_refused_backend_cools_down_then_returns(self) -> None:
        """A backend marked down is skipped for the cool-down, then chosen again."""
        pool = UpstreamPool("api", (A, B), cooldown=10)
        pool.mark_down(A, now=100)
        self.assertEqual({pool.choose(105) for _ in range(4)}, {B})
        self.assertEqual(pool.healthy(105), [B])
        self.assertIn(A, {pool.choose(110.5) for _ in range(2)})

    def test_all_down_is_none(self) -> None:
        """With every backend cooling down there is no choice."""
        pool = UpstreamPool("api", (A, B), cooldown=5)
        pool.mark_down(A, 0)
        pool.mark_down(B, 0)
        self.assertIsNone(pool.choose(1))
        self.assertEqual(pool.choose(6), A)

    def test_exclude_skips_already_tried(self) -> None:
        """A retry never picks the backend that just failed."""
        pool = UpstreamPool("api", (A, B))
        self.assertEqual(pool.choose(0, exclude=frozenset({A})), B)
        self.assertIsNone(pool.choose(0, exclude=frozenset({A, B})))

    def test_mark_up_clears_cooldown(self) -> None:
        """A backend that answered again is healthy at once."""
        pool = UpstreamPool("api", (A,), cooldown=60)
        pool.mark_down(A, 0)
        pool.mark_up(A)
        self.assertEqual(pool.choose(1), A)
