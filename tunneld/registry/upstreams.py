"""Choosing a backend of an upstream: round-robin with passive health.

A backend that refused a connection is out for ``cooldown`` seconds, then
tried again.  When every backend is cooling down there is nothing to choose
(the forward path answers 502).  Pure: time is passed in.
"""

from __future__ import annotations


class UpstreamPool:
    """The backends of one ``[[upstreams]]`` entry."""

    def __init__(self, name: str, backends: tuple[str, ...], cooldown: float = 10.0) -> None:
        self.name = name
        self.backends = backends
        self.cooldown = cooldown
        self.down_until: dict[str, float] = {}
        self._next = 0

    def healthy(self, now: float) -> list[str]:
        return [b for b in self.backends if self.down_until.get(b, 0.0) <= now]

    def choose(self, now: float, exclude: frozenset[str] = frozenset()) -> str | None:
        """The next healthy backend in turn (not in ``exclude``), or None."""
        n = len(self.backends)
        for i in range(n):
            backend = self.backends[(self._next + i) % n]
            if backend not in exclude and self.down_until.get(backend, 0.0) <= now:
                self._next = (self._next + i + 1) % n
                return backend
        return None

    def mark_down(self, backend: str, now: float) -> None:
        self.down_until[backend] = now + self.cooldown

    def mark_up(self, backend: str) -> None:
        self.down_until.pop(backend, None)
