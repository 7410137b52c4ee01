"""The registry of connected tunnel streams: group -> (client_id, stream_id) -> entry.

Pure bookkeeping, no clock: callers pass ``now``. A stream is healthy while it
is not cancelled and its last heartbeat is at most ``heartbeat_timeout`` old.
:meth:`StreamRegistry.choose` picks the healthy stream of a group with the
fewest in-flight requests, rotating among equally loaded ones so that idle
load spreads; :meth:`StreamRegistry.expire` removes the unhealthy ones, and the
caller fails their in-flight requests through each entry's ``handle``.

The choice costs O(distinct loads + log n), not O(n): each group keeps its
streams in buckets by in-flight count, each bucket a sorted list of the
streams' connection numbers.  Setting ``entry.in_flight`` (the owner does it
whenever a stream's request table grows or shrinks) moves the entry between
buckets; :meth:`choose` looks at the least loaded bucket only, and finds the
next stream after the last chosen one by bisection.  Unhealthy streams in that
bucket are skipped (a scan, but :meth:`expire` removes them regularly).

Stalls: a client that heartbeats but never reads looks healthy, yet every
request sent to it waits for window credit that never comes.  The owner
calls :meth:`StreamRegistry.watch_stalls` every second or so with, for each
stream that has requests in flight, how many of them wait for credit and a
counter of request messages received from it (its progress).  A stream with
requests waiting and no progress for ``stall_timeout`` is *stalled*:
:meth:`choose` passes over it while the group has a healthy stream that is
not stalled (and still uses it when it is the last one), and it stays stalled
until it makes progress again, idle or not; :meth:`watch_stalls` returns the
streams that stayed stalled longer than ``heartbeat_timeout``, to be dropped.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
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
    cancelled: bool = False
    rtt: float | None = None  # last heartbeat round trip, seconds
    stalled_since: float | None = None   # stalled (requests waiting, no progress) since then; None: not stalled
    waiting_since: float | None = None   # requests have waited for credit without progress since then
    progress_mark: int = field(default=-1, repr=False)   # the progress counter when last looked at
    _in_flight: int = field(default=0, repr=False)
    _order: int = field(default=-1, repr=False)                           # connection number, set by add
    _registry: StreamRegistry | None = field(default=None, repr=False)   # while registered

    @property
    def in_flight(self) -> int:
        """Requests in flight on this stream; setting it keeps the registry's load order."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, n: int) -> None:
        if n == self._in_flight:
            return
        if self._registry is not None:
            self._registry._move(self, n)
        self._in_flight = n

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
        self._counter = itertools.count()
        self._last_chosen: dict[str, int] = {}
        # group -> in-flight count -> sorted connection numbers; number -> entry
        self._loads: dict[str, dict[int, list[int]]] = {}
        self._by_order: dict[int, StreamEntry] = {}
        self.stalled: set[StreamEntry] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: StreamEntry) -> None:
        """Register ``entry``; raise DuplicateStream if its key is taken."""
        key = entry.key
        if key in self._entries:
            raise DuplicateStream(key)
        self._entries[key] = entry
        self._groups.setdefault(entry.group, {})[key] = entry
        order = entry._order = next(self._counter)
        self._by_order[order] = entry
        # The newest number is the largest: appending keeps the bucket sorted.
        self._loads.setdefault(entry.group, {}).setdefault(entry._in_flight, []).append(order)
        entry._registry = self

    def remove(self, key: tuple[str, str]) -> StreamEntry | None:
        """Unregister and return the entry for ``key``; None if it is not there."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        del self._by_order[entry._order]
        self._unbucket(entry)
        entry._registry = None
        self.stalled.discard(entry)
        members = self._groups[entry.group]
        del members[key]
        if not members:
            del self._groups[entry.group]
            del self._loads[entry.group]
            self._last_chosen.pop(entry.group, None)
        return entry

    def _unbucket(self, entry: StreamEntry) -> None:
        loads = self._loads[entry.group]
        bucket = loads[entry._in_flight]
        del bucket[bisect_left(bucket, entry._order)]
        if not bucket:
            del loads[entry._in_flight]

    def _move(self, entry: StreamEntry, n: int) -> None:
        """``entry``'s in-flight count becomes ``n``: move it to that bucket."""
        self._unbucket(entry)
        bucket = self._loads[entry.group].setdefault(n, [])
        i = bisect_left(bucket, entry._order)
        bucket.insert(i, entry._order)

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
        loads = self._loads.get(group)
        if not loads:
            return None
        last = self._last_chosen.get(group, -1)
        timeout = self.heartbeat_timeout
        by_order = self._by_order
        fallback: StreamEntry | None = None   # a healthy but stalled stream: only if nothing better
        for load in (loads if len(loads) == 1 else sorted(loads)):
            bucket = loads[load]
            n = len(bucket)
            start = bisect_right(bucket, last)
            for i in range(start, start + n):
                order = bucket[i - n] if i >= n else bucket[i]
                entry = by_order[order]
                if not entry.cancelled and now - entry.last_heartbeat <= timeout:
                    if entry.stalled_since is not None:
                        if fallback is None:
                            fallback = entry
                        continue
                    self._last_chosen[group] = order
                    return entry
        if fallback is not None:
            self._last_chosen[group] = fallback._order
        return fallback

    def busy(self) -> list[StreamEntry]:
        """Streams with requests in flight, and the stalled ones (what :meth:`watch_stalls` needs to see)."""
        by_order = self._by_order
        found = [by_order[order] for loads in self._loads.values() for load, bucket in loads.items() if load
                 for order in bucket]
        found.extend(entry for entry in self.stalled if entry._in_flight == 0)
        return found

    def watch_stalls(self, now: float, observed: Iterable[tuple[StreamEntry, int, int]],
                     stall_timeout: float) -> tuple[list[StreamEntry], list[StreamEntry], list[StreamEntry]]:
        """Update stall state from ``(entry, requests waiting for credit, progress counter)`` triples.

        Returns ``(newly stalled, recovered, stalled past heartbeat_timeout)``.
        """
        started: list[StreamEntry] = []
        recovered: list[StreamEntry] = []
        overdue: list[StreamEntry] = []
        for entry, waiting, progress in observed:
            if progress != entry.progress_mark:
                entry.progress_mark = progress
                entry.waiting_since = now if waiting else None
                if entry.stalled_since is not None:
                    entry.stalled_since = None
                    self.stalled.discard(entry)
                    recovered.append(entry)
                continue
            if entry.stalled_since is not None:
                if now - entry.stalled_since > self.heartbeat_timeout:
                    overdue.append(entry)
                continue
            if not waiting:
                entry.waiting_since = None
                continue
            if entry.waiting_since is None:
                entry.waiting_since = now
            elif now - entry.waiting_since >= stall_timeout:
                entry.stalled_since = now
                self.stalled.add(entry)
                started.append(entry)
        return started, recovered, overdue

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

    def page(self, group: str | None = None, offset: int = 0, limit: int = 100) -> tuple[int, list[StreamEntry]]:
        """``(total, streams)``: ``limit`` streams from ``offset``, in connection order (all, or ``group``'s)."""
        source = self._entries if group is None else self._groups.get(group, {})
        offset = max(0, offset)
        return len(source), list(itertools.islice(source.values(), offset, offset + max(0, limit)))

    def group_size(self, group: str) -> int:
        return len(self._groups.get(group, ()))

    def groups(self) -> list[str]:
        """Groups with at least one stream, sorted by name."""
        return sorted(self._groups)
