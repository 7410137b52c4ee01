"""Tests for tunneld.registry.streams: registration, health, choice and expiry."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.streams import DuplicateStream, StreamEntry, StreamRegistry


def entry(
    client_id: str, stream_id: str = "s1", group: str = "g", heartbeat: float = 0.0
) -> StreamEntry:
    return StreamEntry(
        group=group,
        client_id=client_id,
        stream_id=stream_id,
        handle=object(),
        connected_at=heartbeat,
        last_heartbeat=heartbeat,
    )


class RegistrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = StreamRegistry(heartbeat_timeout=60)

    def test_add_and_get(self) -> None:
        """An added entry is found by its (client_id, stream_id) key."""
        a = entry("a")
        self.registry.add(a)
        self.assertEqual(a.key, ("a", "s1"))
        self.assertIs(self.registry.get(("a", "s1")), a)
        self.assertIsNone(self.registry.get(("a", "s2")))
        self.assertEqual(len(self.registry), 1)

    def test_duplicate(self) -> None:
        """Adding a second entry with the same key raises DuplicateStream and keeps the first."""
        a = entry("a")
        self.registry.add(a)
        self.assertRaises(DuplicateStream, self.registry.add, entry("a", group="other"))
        self.assertIs(self.registry.get(("a", "s1")), a)
        self.assertEqual(self.registry.groups(), ["g"])
        self.assertEqual(len(self.registry), 1)

    def test_same_client_new_stream(self) -> None:
        """One client may hold several streams with different stream ids."""
        self.registry.add(entry("a", "s1"))
        self.registry.add(entry("a", "s2"))
        self.assertEqual(len(self.registry), 2)

    def test_remove_idempotent(self) -> None:
        """remove returns the entry once, then None; an emptied group disappears."""
        a = entry("a")
        self.registry.add(a)
        self.assertIs(self.registry.remove(a.key), a)
        self.assertIsNone(self.registry.remove(a.key))
        self.assertIsNone(self.registry.get(a.key))
        self.assertEqual(self.registry.groups(), [])
        self.assertEqual(self.registry.streams("g"), [])
        self.assertEqual(len(self.registry), 0)

    def test_readd_after_remove(self) -> None:
        """A removed key can be added again."""
        self.registry.add(entry("a"))
        self.registry.remove(("a", "s1"))
        self.registry.add(entry("a"))
        self.assertEqual(len(self.registry), 1)

    def test_streams_and_groups(self) -> None:
        """streams() lists entries in connection order; groups() names the non-empty groups."""
        a, b, c = entry("a", group="g1"), entry("b", group="g2"), entry("c", group="g1")
        for e in (a, b, c):
            self.registry.add(e)
        self.assertEqual(self.registry.streams(), [a, b, c])
        self.assertEqual(self.registry.streams("g1"), [a, c])
        self.assertEqual(self.registry.streams("nope"), [])
        self.assertEqual(self.registry.groups(), ["g1", "g2"])

    def test_touch(self) -> None:
        """touch updates the last heartbeat and the rtt when given; unknown keys are ignored."""
        a = entry("a")
        self.registry.add(a)
        self.registry.touch(a.key, 10.0, rtt=0.25)
        self.assertEqual((a.last_heartbeat, a.rtt), (10.0, 0.25))
        self.registry.touch(a.key, 20.0)
        self.assertEqual((a.last_heartbeat, a.rtt), (20.0, 0.25))
        self.registry.touch(("ghost", "s"), 30.0, rtt=1.0)

    def test_acquire_release_floor(self) -> None:
        """acquire and release count in-flight requests, never below zero."""
        a = entry("a")
        self.registry.acquire(a)
        self.registry.acquire(a)
        self.assertEqual(a.in_flight, 2)
        for _ in range(3):
            self.registry.release(a)
        self.assertEqual(a.in_flight, 0)


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = StreamRegistry(heartbeat_timeout=60)

    def test_is_healthy(self) -> None:
        """Healthy means not cancelled and a heartbeat at most heartbeat_timeout old."""
        a = entry("a", heartbeat=100.0)
        self.assertTrue(self.registry.is_healthy(a, 160.0))
        self.assertFalse(self.registry.is_healthy(a, 160.5))
        a.cancelled = True
        self.assertFalse(self.registry.is_healthy(a, 100.0))

    def test_timeout_settable(self) -> None:
        """A changed heartbeat_timeout applies at once."""
        a = entry("a", heartbeat=0.0)
        self.registry.heartbeat_timeout = 10
        self.assertFalse(self.registry.is_healthy(a, 11.0))

    def test_expire(self) -> None:
        """expire removes and returns exactly the silent and the cancelled streams."""
        fresh, silent = entry("fresh", heartbeat=50.0), entry("silent")
        cancelled = entry("cancel", heartbeat=50.0)
        cancelled.cancelled = True
        for e in (silent, fresh, cancelled):
            self.registry.add(e)
        self.assertEqual(self.registry.expire(61.0), [silent, cancelled])
        self.assertEqual(self.registry.streams(), [fresh])
        self.assertEqual(self.registry.expire(61.0), [])


class ChooseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = StreamRegistry(heartbeat_timeout=60)

    def add(self, *ids: str) -> list[StreamEntry]:
        entries = [entry(i) for i in ids]
        for e in entries:
            self.registry.add(e)
        return entries

    def test_empty_or_unknown_group(self) -> None:
        """choose on an unknown or emptied group returns None."""
        self.assertIsNone(self.registry.choose("g", 0.0))
        (a,) = self.add("a")
        self.registry.remove(a.key)
        self.assertIsNone(self.registry.choose("g", 0.0))
        self.assertIsNone(self.registry.choose("other", 0.0))

    def test_fewest_in_flight(self) -> None:
        """choose picks the healthy stream with the fewest in-flight requests."""
        a, b, c = self.add("a", "b", "c")
        a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
        for _ in range(3):
            self.assertIs(self.registry.choose("g", 0.0), b)

    def test_round_robin_ties(self) -> None:
        """Equally loaded streams are chosen in turn, in connection order."""
        a, b, c = self.add("a", "b", "c")
        chosen = [self.registry.choose("g", 0.0) for _ in range(6)]
        self.assertEqual(chosen, [a, b, c, a, b, c])

    def test_round_robin_with_load(self) -> None:
        """Acquiring the chosen stream spreads requests over all streams."""
        streams = self.add("a", "b", "c")
        for _ in range(6):
            e = self.registry.choose("g", 0.0)
            assert e is not None
            self.registry.acquire(e)
        self.assertEqual([e.in_flight for e in streams], [2, 2, 2])

    def test_round_robin_survives_removal(self) -> None:
        """Removing the last chosen stream moves the turn on to the next one."""
        a, b, c = self.add("a", "b", "c")
        self.assertIs(self.registry.choose("g", 0.0), a)
        self.assertIs(self.registry.choose("g", 0.0), b)
        self.registry.remove(b.key)
        self.assertIs(self.registry.choose("g", 0.0), c)
        self.assertIs(self.registry.choose("g", 0.0), a)

    def test_unhealthy_skipped(self) -> None:
        """Silent and cancelled streams are never chosen, even when least loaded."""
        a, b, c = self.add("a", "b", "c")
        c.in_flight = 5
        a.cancelled = True
        self.registry.touch(c.key, 100.0)
        # b is silent at now=100 (last heartbeat 0, timeout 60).
        for _ in range(3):
            self.assertIs(self.registry.choose("g", 100.0), c)
        c.cancelled = True
        self.assertIsNone(self.registry.choose("g", 100.0))

    def test_groups_separate(self) -> None:
        """choose only considers streams of the requested group."""
        self.registry.add(entry("a", group="g1"))
        b = entry("b", group="g2")
        self.registry.add(b)
        self.assertIs(self.registry.choose("g2", 0.0), b)


class _CountingDict(dict):  # type: ignore[type-arg]
    """A dict that counts lookups (how many streams a choice looked at)."""

    lookups = 0

    def __getitem__(self, key: object) -> object:
        self.lookups += 1
        return super().__getitem__(key)


class FleetScaleTests(SynchronousTestCase):
    """The registry with 10,000 streams in one group: choice, expiry, paging."""

    N = 10_000

    def setUp(self) -> None:
        self.registry = StreamRegistry(heartbeat_timeout=60)
        self.streams = [entry(f"c{i}") for i in range(self.N)]
        for e in self.streams:
            self.registry.add(e)

    def counting(self) -> _CountingDict:
        counting = _CountingDict(self.registry._by_order)
        self.registry._by_order = counting
        return counting

    def test_round_robin_over_all(self) -> None:
        """Idle streams are chosen in turn, each once per N choices, in connection order."""
        chosen = [self.registry.choose("g", 0.0) for _ in range(self.N)]
        self.assertEqual(chosen, self.streams)
        self.assertIs(self.registry.choose("g", 0.0), self.streams[0])

    def test_choice_looks_at_one_stream(self) -> None:
        """With healthy streams a choice looks up one entry, not the group."""
        counting = self.counting()
        for _ in range(1000):
            e = self.registry.choose("g", 0.0)
            assert e is not None
            self.registry.acquire(e)
        self.assertEqual(counting.lookups, 1000)

    def test_least_loaded_after_load_changes(self) -> None:
        """After every stream but one got a request, the idle one is chosen; released ones come back."""
        for e in self.streams:
            e.in_flight = 1
        idle = self.streams[7777]
        idle.in_flight = 0
        counting = self.counting()
        self.assertIs(self.registry.choose("g", 0.0), idle)
        self.assertEqual(counting.lookups, 1)
        self.registry.acquire(idle)
        self.registry.acquire(idle)
        self.registry.release(self.streams[3])
        self.assertIs(self.registry.choose("g", 0.0), self.streams[3])
        # Ties at load 1 then rotate after the last chosen number, wrapping.
        self.registry.acquire(self.streams[3])
        self.assertIs(self.registry.choose("g", 0.0), self.streams[4])

    def test_expire_half(self) -> None:
        """expire drops the silent half; the rest are still chosen in turn."""
        for e in self.streams[::2]:
            self.registry.touch(e.key, 100.0)
        dead = self.registry.expire(100.0)
        self.assertEqual(len(dead), self.N // 2)
        self.assertEqual(len(self.registry), self.N // 2)
        chosen = [self.registry.choose("g", 100.0) for _ in range(self.N // 2)]
        self.assertEqual(chosen, self.streams[::2])
        for e in self.streams[::2]:
            self.registry.remove(e.key)
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(self.registry._loads, {})
        self.assertEqual(self.registry._by_order, {})
        self.assertIsNone(self.registry.choose("g", 100.0))

    def test_paging(self) -> None:
        """page returns the total and a window of streams in connection order."""
        total, page = self.registry.page("g", offset=9_990, limit=50)
        self.assertEqual(total, self.N)
        self.assertEqual(page, self.streams[9_990:])
        self.assertEqual(self.registry.page("g", 0, 3), (self.N, self.streams[:3]))
        self.assertEqual(self.registry.page("other", 0, 3), (0, []))
        self.assertEqual(self.registry.page(None, 20_000, 3), (self.N, []))


class StallTests(SynchronousTestCase):
    """A stream whose requests wait for credit with no progress for stall_timeout is stalled (Clock-free: now passed)."""

    def setUp(self) -> None:
        self.registry = StreamRegistry(heartbeat_timeout=60)
        self.stuck, self.good = entry("stuck"), entry("good")
        for e in (self.stuck, self.good):
            self.registry.add(e)
        self.stuck.in_flight = 3
        self.good.in_flight = 5   # busier: the least-loaded choice would be the stuck one

    def watch(self, now: float, stuck: tuple[int, int], good: tuple[int, int] = (0, 0)) -> Any:
        return self.registry.watch_stalls(now, [(self.stuck, *stuck), (self.good, *good)], 10.0)

    def test_stalled_after_stall_timeout_and_passed_over(self) -> None:
        """Waiting requests and no progress for 10 s: stalled, and the busier healthy stream is chosen instead."""
        self.assertEqual(self.registry.choose("g", 0.0), self.stuck)
        self.watch(0.0, (2, 7))   # waiting from here on
        self.watch(1.0, (2, 7))
        self.assertEqual(self.watch(9.9, (2, 7))[0], [])
        started, _, _ = self.watch(10.0, (2, 7))
        self.assertEqual(started, [self.stuck])
        self.assertEqual(self.registry.stalled, {self.stuck})
        for now in (11.0, 12.0, 13.0):
            self.assertIs(self.registry.choose("g", now), self.good)
        self.assertEqual(self.registry.busy().count(self.stuck), 1)

    def test_progress_or_no_waiting_is_not_a_stall(self) -> None:
        """Progress (a counter that moves) or nothing waiting for credit never stalls a stream."""
        for now in range(0, 40):
            started, _, _ = self.watch(float(now), (2, now))   # waiting, but receiving
            self.assertEqual(started, [])
            started, _, _ = self.registry.watch_stalls(float(now), [(self.good, 0, 5)], 10.0)   # nothing waiting
            self.assertEqual(started, [])
        self.assertEqual(self.registry.stalled, set())

    def test_stalled_stream_used_when_it_is_the_only_one(self) -> None:
        """With no other healthy stream, a stalled one still serves (better slow than 502)."""
        self.watch(0.0, (1, 1))
        self.watch(10.0, (1, 1))
        self.good.last_heartbeat = -100.0   # silent: unhealthy
        self.assertIs(self.registry.choose("g", 10.0), self.stuck)

    def test_recovers_on_progress_even_after_going_idle(self) -> None:
        """A stalled stream stays stalled when its requests end (idle), until it makes progress."""
        self.watch(0.0, (1, 1))
        self.watch(10.0, (1, 1))
        self.stuck.in_flight = 0
        self.assertIn(self.stuck, self.registry.busy())
        self.assertIs(self.registry.choose("g", 20.0), self.good)
        _, recovered, _ = self.registry.watch_stalls(20.0, [(self.stuck, 0, 2)], 10.0)
        self.assertEqual(recovered, [self.stuck])
        self.assertEqual(self.registry.stalled, set())
        self.assertNotIn(self.stuck, self.registry.busy())
        self.assertIs(self.registry.choose("g", 21.0), self.stuck)

    def test_overdue_past_heartbeat_timeout_and_forgotten_on_remove(self) -> None:
        """Stalled longer than heartbeat_timeout: returned for dropping; removal forgets the stall."""
        self.watch(0.0, (1, 1))
        self.watch(10.0, (1, 1))
        self.assertEqual(self.watch(70.0, (1, 1))[2], [])
        self.assertEqual(self.watch(70.5, (1, 1))[2], [self.stuck])
        self.registry.remove(self.stuck.key)
        self.assertEqual(self.registry.stalled, set())
