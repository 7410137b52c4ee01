"""When the server sends its application heartbeats: spread out, and only to quiet streams.

Pure code (callers pass ``now``).  gRPC keepalive pings (in C, cheap) already
find a vanished peer within ~15 s; the application heartbeat is there for a
peer whose process is alive but whose tunnel is not (a stuck loop) and for the
round-trip figure.  Sending one to every stream at the same instant every
``interval`` costs a burst of Python work per stream (a message, a bridge hop,
a gRPC write, then the ack's read), so with thousands of clients:

* the streams are split into ``slots`` slices by their connection number and
  each tick (``interval / slots`` seconds apart) looks at one slice only, so
  the work is spread evenly over the interval;
* a stream heard from in the last ``interval / 2`` (any message: a request, a
  response, the client's own heartbeat) gets none: it is plainly alive.
  A stream is thus silent for at most ~1.5 × ``interval`` before it is asked.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from tunneld.registry.streams import StreamEntry

E = TypeVar("E", bound=StreamEntry)

#: Default length of one tick of the spread schedule, seconds.
TICK = 1.0


class HeartbeatSchedule:
    """Which streams get a heartbeat on each tick."""

    def __init__(self, interval: float, tick: float = TICK) -> None:
        self.interval = interval
        self.slots = max(1, round(interval / tick)) if tick > 0 else 1
        self.tick = interval / self.slots
        self.turn = 0

    def due(self, entries: Iterable[E], now: float) -> list[E]:
        """The entries of this tick's slice silent for at least ``interval / 2``; advances the turn."""
        slot, slots = self.turn, self.slots
        self.turn = (self.turn + 1) % slots
        quiet_since = now - self.interval / 2
        return [e for e in entries
                if e._order % slots == slot and e.last_heartbeat <= quiet_since and not e.cancelled]
