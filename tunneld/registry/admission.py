"""How fast the server accepts new tunnel streams: a token bucket (pure; callers pass ``now``).

After a server restart every client redials at once.  Accepting them all at
the same moment makes every open slow (TLS, the handshake, a registry entry,
the routes pushed), so opens time out and are redialled, which makes the storm
longer.  The tunnel port asks :meth:`OpenRateLimiter.allow` before it reads a
new stream's first message; a refused open ends at once with
``RESOURCE_EXHAUSTED`` and the client retries after its backoff (never lost:
it is the client's ordinary reconnect loop).  ``rate`` opens per second on
average, up to ``burst`` at once; ``rate`` 0 means no limit.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


class OpenRateLimiter:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.stamp = now
        self.allowed = 0
        self.refused = 0

    def allow(self, now: float) -> bool:
        """Take one token if there is one (an open may proceed)."""
        if self.rate <= 0:
            self.allowed += 1
            return True
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.allowed += 1
            return True
        self.refused += 1
        return False


# -- who knocks: refused opens per address (SPEC §8.2) ----------------------------------------

#: The ``result`` label values of ``tunneld_tunnel_opens_total``.
RESULTS = ("accepted", "unauthenticated", "malformed", "rate_limited", "throttled")
#: Refusals that count toward an address's throttle (its own fault; a full
#: ``open_rate`` or the throttle itself are not).
_FAULTS = frozenset({"unauthenticated", "malformed"})
#: At most one log line per address per this many seconds.
LOG_INTERVAL = 10.0
#: Addresses remembered (throttle and log state); the least recently seen is forgotten first.
MAX_ADDRESSES = 10000


class _Knocker:
    """What the guard remembers about one address."""

    __slots__ = ("fails", "pending", "by_result", "group", "detail", "logged_at")

    def __init__(self) -> None:
        self.fails: deque[float] = deque()   # times of its last (up to limit) faulty opens
        self.pending = 0                      # refusals not yet in a log line
        self.by_result: dict[str, int] = {}   # ... by result
        self.group = ""
        self.detail = ""
        self.logged_at: float | None = None


@dataclass(frozen=True)
class RefusalLine:
    """One log line: ``count`` refused opens from ``address`` since its previous line."""

    address: str
    count: int
    by_result: dict[str, int]
    group: str
    detail: str   # the last refusal's reason, e.g. "wrong token"


class OpenGuard:
    """Counts tunnel opens by result, throttles addresses that keep failing, batches the log lines.

    Pure (callers pass ``now``, monotonic seconds) and single-threaded: the
    tunnel port calls it from the bridge thread only.  ``limit`` refused opens
    (wrong token, unknown group, malformed first message) from one address
    within ``window`` seconds throttle it: :meth:`throttled` says so until
    ``window`` seconds after the first of those ``limit`` refusals, and the
    tunnel port then refuses at once, before it takes an ``open_rate`` token
    or compares a token.  ``limit`` 0 never throttles.

    Log lines: the first refusal from an address is a line at once; later
    ones within ``LOG_INTERVAL`` only count, and :meth:`due` (called about
    once a second) turns the count into one line when the interval has
    passed.  The table holds at most ``max_addresses`` addresses, least
    recently seen forgotten first (with their unlogged count: bounded memory
    beats a complete log under a flood from many addresses).
    """

    def __init__(self, limit: int, window: float, *, max_addresses: int = MAX_ADDRESSES,
                 log_interval: float = LOG_INTERVAL) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max(1, max_addresses)
        self.log_interval = log_interval
        self.counts: dict[str, int] = {r: 0 for r in RESULTS}   # fixed keys: safe to read from another thread
        self.table: OrderedDict[str, _Knocker] = OrderedDict()
        self.forgotten = 0

    def configure(self, limit: int, window: float) -> None:
        """A config reload: new limit and window from now on."""
        self.limit = limit
        self.window = window

    def _knocker(self, address: str) -> _Knocker:
        k = self.table.get(address)
        if k is None:
            k = self.table[address] = _Knocker()
            while len(self.table) > self.max_addresses:
                self.table.popitem(last=False)
                self.forgotten += 1
        else:
            self.table.move_to_end(address)
        return k

    def throttled(self, address: str, now: float) -> bool:
        """Is ``address`` throttled now? (Does not count anything.)"""
        k = self.table.get(address)
        if k is None or self.limit <= 0 or len(k.fails) < self.limit:
            return False
        return now < k.fails[-self.limit] + self.window

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address``'s throttle ends (0 when it is not throttled)."""
        if not self.throttled(address, now):
            return 0.0
        return self.table[address].fails[-self.limit] + self.window - now

    def accepted(self) -> None:
        self.counts["accepted"] += 1

    def refused(self, address: str, result: str, now: float, *, group: str = "",
                detail: str = "") -> RefusalLine | None:
        """Count one refused open; return a line to log now, if one is due."""
        assert result in RESULTS and result != "accepted", result
        self.counts[result] += 1
        k = self._knocker(address)
        if result in _FAULTS and self.limit > 0:
            k.fails.append(now)
            while len(k.fails) > self.limit:
                k.fails.popleft()
        k.pending += 1
        k.by_result[result] = k.by_result.get(result, 0) + 1
        k.group = group
        k.detail = detail
        if k.logged_at is None or now - k.logged_at >= self.log_interval:
            return self._line(address, k, now)
        return None

    def _line(self, address: str, k: _Knocker, now: float) -> RefusalLine:
        line = RefusalLine(address, k.pending, k.by_result, k.group, k.detail)
        k.pending = 0
        k.by_result = {}
        k.logged_at = now
        return line

    def due(self, now: float) -> list[RefusalLine]:
        """Lines for the counts held back whose interval has passed; forgets addresses with nothing left.

        An address is forgotten once it has nothing to log and is not
        throttled (its failures older than ``window``), so a quiet table empties.
        """
        lines = []
        for address in list(self.table):
            k = self.table[address]
            if k.pending and (k.logged_at is None or now - k.logged_at >= self.log_interval):
                lines.append(self._line(address, k, now))
            while k.fails and now >= k.fails[0] + self.window:
                k.fails.popleft()
            if (not k.pending and not k.fails
                    and (k.logged_at is None or now - k.logged_at >= self.log_interval)):
                del self.table[address]
        return lines
