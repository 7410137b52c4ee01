"""The registry of connected tunnel streams: group -> (client_id, stream_id) -> entry.

Pure bookkeeping, no clock: callers pass ``now``. A stream is healthy while it
is not cancelled and its last heartbeat is at most ``heartbeat_timeout`` old.
:meth:`StreamRegistry.choose` picks the healthy stream of a group with the
fewest in-flight requests, rotating among equally loaded ones so that idle
load spreads; :meth:`StreamRegistry.expire` removes the unhealthy ones, and the
caller fails their in-flight requests through each entry's ``handle``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable


@dataclass(eq=False)
class StreamEntry:
    """One connected tunnel stream and its health and load."""

    group: str
    client_id: str
    stream_id: str
    handle: object  # opaque: the reactor-side tunnel for this stream
    connected_at: float
    last_heartbeat: float
    address: str = ""
    version: str = ""
    in_flight: int = 0
    cancelled: bool = False
    rtt: float | None = None  # last heartbeat round trip, seconds

    @property
    def key(self) -> tuple[str, str]:
        """``(client_id, stream_id)``, unique in a registry."""
        return (self.client_id, self.stream_id)


class DuplicateStream(Exception):
    """A stream with the same ``(client_id, stream_id)`` is already registered."""


class StreamRegistry:
    """Every connected stream, by key and by group, in connection order."""

    def __init__(self, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self._entries: dict[tuple[str, str], StreamEntry] = {}
        self._groups: dict[str, dict[tuple[str, str], StreamEntry]] = {}
        # Round robin: each entry gets a rising number when added; a group
        # remembers the number of the stream it chose last.
        self._order: dict[tuple[str, str], int] = {}
        self._counter = itertools.count()
        self._last_chosen: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: StreamEntry) -> None:
        """Register ``entry``; raise DuplicateStream if its key is taken."""
        key = entry.key
        if key in self._entries:
            raise DuplicateStream(key)
        self._entries[key] = entry
        self._groups.setdefault(entry.group, {})[key] = entry
        self._order[key] = next(self._counter)

    def remove(self, key: tuple[str, str]) -> StreamEntry | None:
        """Unregister and return the entry for ``key``; None if it is not there."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        del self._order[key]
        members = self._groups[entry.group]
        del members[key]
        if not members:
            del self._groups[entry.group]
            self._last_chosen.pop(entry.group, None)
        return entry

    def get(self, key: tuple[str, str]) -> StreamEntry | None:
        return self._entries.get(key)

    def touch(self, key: tuple[str, str], now: float, rtt: float | None = None) -> None:
        """Record a heartbeat (and its round trip, if measured); unknown keys are ignored."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.last_heartbeat = now
        if rtt is not None:
            entry.rtt = rtt

    def is_healthy(self, entry: StreamEntry, now: float) -> bool:
        return not entry.cancelled and now - entry.last_heartbeat <= self.heartbeat_timeout

    def choose(self, group: str, now: float) -> StreamEntry | None:
        """The healthy stream of ``group`` with the fewest in-flight requests.

        Ties go to the next tied stream (in connection order) after the one
        chosen last time, wrapping around. None if the group has no healthy
        stream.
        """
        members = self._groups.get(group)
        if not members:
            return None
        # One pass, no lists: this runs for every request.
        order = self._order
        last = self._last_chosen.get(group, -1)
        timeout = self.heartbeat_timeout
        fewest = -1
        first: StreamEntry | None = None   # first tied entry in connection order (wrap-around)
        after: StreamEntry | None = None   # first tied entry after the last chosen
        for entry in members.values():
            if entry.cancelled or now - entry.last_heartbeat > timeout:
                continue
            load = entry.in_flight
            if fewest < 0 or load < fewest:
                fewest, first, after = load, entry, None
            elif load > fewest:
                continue
            if after is None and order[entry.key] > last:
                after = entry
        chosen = after or first
        if chosen is not None:
            self._last_chosen[group] = order[chosen.key]
        return chosen

    def acquire(self, entry: StreamEntry) -> None:
        """A request was sent on ``entry``."""
        entry.in_flight += 1

    def release(self, entry: StreamEntry) -> None:
        """A request on ``entry`` finished; the count never drops below zero."""
        entry.in_flight = max(0, entry.in_flight - 1)

    def expire(self, now: float) -> list[StreamEntry]:
        """Remove and return every unhealthy stream (cancelled or silent too long)."""
        dead = [entry for entry in self._entries.values() if not self.is_healthy(entry, now)]
        for entry in dead:
            self.remove(entry.key)
        return dead

    def members(self, group: str) -> Iterable[StreamEntry]:
        """The streams of ``group`` (a live view: do not change the registry while iterating)."""
        members = self._groups.get(group)
        return members.values() if members is not None else ()

    def streams(self, group: str | None = None) -> list[StreamEntry]:
        """All streams, or those of ``group``, in connection order."""
        if group is None:
            return list(self._entries.values())
        return list(self._groups.get(group, {}).values())

    def groups(self) -> list[str]:
        """Groups with at least one stream, sorted by name."""
        return sorted(self._groups)
