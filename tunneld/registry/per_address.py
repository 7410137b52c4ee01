"""How many of something one address holds at once: a counter keyed by address (pure).

Used for ``max_connections_per_ip`` on the public listeners and
``max_websockets_per_ip`` on the HTTP entry: a listener ``acquire``s a slot
for the peer's address (the PROXY header's when that protocol is on) when a
connection or WebSocket opens and ``release``s it exactly once when it ends.
A refused ``acquire`` takes nothing and is counted in ``refused``.  Addresses
with no slot left open are forgotten, so the table never holds more keys than
there are open connections.
"""

from __future__ import annotations


class PerAddressLimit:
    """At most ``limit`` slots per address (``limit`` 0: no limit, still counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.refused = 0

    def acquire(self, address: str) -> bool:
        """Take a slot for ``address``; False (and nothing taken) when it holds ``limit`` already."""
        held = self.counts.get(address, 0)
        if self.limit and held >= self.limit:
            self.refused += 1
            return False
        self.counts[address] = held + 1
        return True

    def release(self, address: str) -> None:
        """Give back one slot of ``address`` (taken by a successful ``acquire``)."""
        held = self.counts.get(address, 0)
        if held <= 1:
            self.counts.pop(address, None)
        else:
            self.counts[address] = held - 1

    def held(self, address: str) -> int:
        """Slots ``address`` holds now."""
        return self.counts.get(address, 0)

    def __len__(self) -> int:
        """Slots held by every address together."""
        return sum(self.counts.values())
