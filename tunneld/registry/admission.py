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
