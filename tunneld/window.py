"""Flow-control credit for one direction of one tunnelled request.

Theory of operation (the one update rule, as in h2's windows.py):

* A sender starts with ``size`` bytes of credit.  It may send a body unit
  while its credit is positive; the unit's length is then subtracted, so one
  indivisible unit (a gRPC message, a WebSocket frame piece) may overshoot
  and leave the credit negative.  HTTP bodies are cut into chunks of at most
  64 KiB before they reach the window, so for them the overshoot is small.
* The receiver counts bytes received but not yet credited back.  It returns
  credit (``WindowUpdate.increment``) only for bytes its consumer has really
  taken, in batches of half a window (at most ``CREDIT_BATCH``, so big
  windows still stream smoothly) so small chunks do not each cost a message.
  A sender that obeys the rule can never have sent a unit while the receiver
  already held ``size`` uncredited bytes; a unit that arrives in that state is
  a flow-control violation.

Growing (wire v2).  A window that is too small for a long link caps a request
at one window per round trip (256 KiB over 50 ms is 5 MB/s).  So windows grow,
and only where that cannot cost memory that a slow reader would hold:

* A sender that had to hold a unit for lack of credit marks the first unit it
  sends once credit came back (``spend`` returns True: the session sets
  ``TunnelMessage.window_limited``).
* When such a unit arrives and the receiver's consumer had taken everything
  received before it (``idle()``: every uncredited byte was reported through
  ``consume``), the window, not the consumer, was the bottleneck.  The
  receiver then enlarges its window (the session doubles it, within its
  per-request ``max_window`` and its per-stream ``window_budget``) with
  ``grow`` and announces it with ``WindowUpdate.grow``; the sender adds that
  to both its size and its credit (``credit(0, grow)``).
* A slow consumer still holds bytes when the marked unit arrives, and a
  stalled one returns no credit so the sender never sends again: neither
  window grows.  A window never shrinks; its growth is given back to the
  stream's budget when the request ends.

Memory per request and direction is therefore bounded by its current ``size``
(at most ``max_window``) plus one unit, whatever the peer does, and the growth
of all of a stream's windows together by ``window_budget``.
"""

from __future__ import annotations

from typing import Final

DEFAULT_WINDOW: Final = 256 * 1024
DEFAULT_MAX_WINDOW: Final = 16 * 1024 * 1024      # per request and direction, when windows grow
DEFAULT_WINDOW_BUDGET: Final = 64 * 1024 * 1024   # growth beyond the initial windows, per stream
MAX_WINDOW_CAP: Final = 1 << 30   # no window grows past 1 GiB, whatever a peer announces
CREDIT_BATCH: Final = 1024 * 1024  # credit goes back at half a window, or at this, whichever is smaller


class FlowControlError(Exception):
    """The peer broke the window rule (sent without credit, over-credited, grew too far)."""


class SendWindow:
    """Credit this side may still spend sending body bytes."""

    __slots__ = ("size", "available", "starved")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        self.size = size
        self.available = size
        self.starved = False   # a unit was held for lack of credit: mark the next one sent

    def can_send(self) -> bool:
        return self.available > 0

    def hold(self) -> None:
        """A unit must wait for credit: the window limits this sender."""
        self.starved = True

    def spend(self, n: int) -> bool:
        """Spend ``n``; True when this is the first unit sent after a ``hold`` (mark it window_limited)."""
        self.available -= n
        if n and self.starved:
            self.starved = False
            return True
        return False

    def credit(self, n: int, grow: int = 0) -> None:
        """Apply a ``WindowUpdate``: ``n`` bytes of credit back, the window ``grow`` bytes larger.

        Growth adds to the size and to the credit alike.  Credit beyond what is
        outstanding, an update that changes nothing, or a window beyond
        ``MAX_WINDOW_CAP`` is a FlowControlError and changes nothing.
        """
        if n < 0 or grow < 0 or n == grow == 0:
            raise FlowControlError(f"window update of {n} bytes (grow {grow}) is empty or negative")
        if self.available + n > self.size:
            raise FlowControlError(
                f"window update of {n} bytes exceeds the {self.size - self.available} bytes outstanding"
            )
        if self.size + grow > MAX_WINDOW_CAP:
            raise FlowControlError(f"window growth of {grow} bytes takes the {self.size}-byte window past 1 GiB")
        self.size += grow
        self.available += n + grow


class ReceiveWindow:
    """Bytes received but not yet credited, and credit ready to return."""

    __slots__ = ("size", "initial", "unacked", "consumed")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        self.size = size
        self.initial = size
        self.unacked = 0    # received and not yet credited back
        self.consumed = 0   # of those, taken by the consumer (credit owed)

    @property
    def grown(self) -> int:
        """How far this window grew beyond its initial size."""
        return self.size - self.initial

    def received(self, n: int) -> None:
        if n and self.unacked >= self.size:
            raise FlowControlError(
                f"peer sent {n} body bytes while {self.unacked} of a {self.size}-byte window were unacknowledged"
            )
        self.unacked += n

    def idle(self) -> bool:
        """Has the consumer taken every byte received so far (none held unconsumed)?"""
        return self.consumed == self.unacked

    def consume(self, n: int) -> int:
        """Record that the consumer took ``n`` bytes; return credit to send now (0 = wait).

        Batching at half a window (or ``CREDIT_BATCH``) cannot stall the
        sender: it only waits when ``size`` bytes are outstanding, and once
        the consumer has taken them the owed credit is past the threshold.
        """
        self.consumed = min(self.consumed + n, self.unacked)
        if self.consumed >= max(1, min(self.size // 2, CREDIT_BATCH)):
            return self.flush()
        return 0

    def flush(self) -> int:
        """Return all credit owed now, whatever the batch threshold (0 when none)."""
        n = self.consumed
        self.unacked -= n
        self.consumed = 0
        return n

    def grow(self, n: int) -> None:
        """Enlarge the window by ``n`` bytes (announced to the sender as ``WindowUpdate.grow``)."""
        self.size += n
