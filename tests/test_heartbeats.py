"""Tests for tunneld.registry.heartbeats: the server's spread heartbeat schedule."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.heartbeats import HeartbeatSchedule
from tunneld.registry.streams import StreamEntry, StreamRegistry


def fleet(n: int, heard: float = 0.0) -> tuple[StreamRegistry, list[StreamEntry]]:
    registry = StreamRegistry(heartbeat_timeout=60)
    entries = [StreamEntry(group="g", client_id=f"c{i}", stream_id="s", handle=None, connected_at=0.0,
                           last_heartbeat=heard) for i in range(n)]
    for e in entries:
        registry.add(e)
    return registry, entries


class HeartbeatScheduleTests(SynchronousTestCase):
    def test_slots_from_interval(self) -> None:
        """A 10 s interval with 1 s ticks has 10 slices; a short interval has one, ticking at the interval."""
        self.assertEqual((HeartbeatSchedule(10).slots, HeartbeatSchedule(10).tick), (10, 1.0))
        self.assertEqual((HeartbeatSchedule(0.5).slots, HeartbeatSchedule(0.5).tick), (1, 0.5))
        self.assertEqual(HeartbeatSchedule(30, tick=2).slots, 15)

    def test_every_quiet_stream_once_per_interval_spread_evenly(self) -> None:
        """Over one interval each of 10,000 quiet streams is due exactly once, 1,000 per tick."""
        registry, entries = fleet(10_000)
        schedule = HeartbeatSchedule(10)
        seen: list[StreamEntry] = []
        for tick in range(10):
            due = schedule.due(registry.streams(), 100.0 + tick)
            self.assertEqual(len(due), 1_000)
            seen += due
        self.assertEqual(sorted(e.client_id for e in seen), sorted(e.client_id for e in entries))
        # The next interval starts over.
        self.assertEqual(len(schedule.due(registry.streams(), 110.0)), 1_000)

    def test_recently_heard_streams_skipped(self) -> None:
        """A stream heard within half the interval gets no heartbeat; cancelled ones neither."""
        registry, entries = fleet(4)
        schedule = HeartbeatSchedule(10, tick=10)
        entries[0].last_heartbeat = 96.0   # 4 s ago: alive
        entries[1].last_heartbeat = 95.0   # exactly half the interval: asked
        entries[2].cancelled = True
        self.assertEqual(schedule.due(registry.streams(), 100.0), [entries[1], entries[3]])

    def test_longest_silence_is_bounded(self) -> None:
        """A stream that answers every heartbeat is never silent for more than 1.5 intervals when asked."""
        registry, (e,) = fleet(1)
        schedule = HeartbeatSchedule(10)
        silences = []
        for t in range(0, 200):
            if schedule.due(registry.streams(), float(t)):
                silences.append(t - e.last_heartbeat)
                e.last_heartbeat = float(t)   # the ack
        self.assertTrue(silences)
        self.assertLessEqual(max(silences), 15.0)
