"""Flow-control credit for one direction of one tunnelled request.

Theory of operation (the one update rule, as in h2's windows.py):

* A sender starts with ``size`` bytes of credit.  It may send a body unit
  while its credit is positive; the unit's length is then subtracted, so one
  indivisible unit (a gRPC message, a WebSocket frame piece) may overshoot
  and leave the credit negative.  HTTP bodies are cut into chunks of at most
  64 KiB before they reach the window, so for them the overshoot is small.
* The receiver counts bytes received but not yet credited back.  It returns
  credit (``WindowUpdate``) only for bytes its consumer has really taken, in
  batches of at least half a window so small chunks do not each cost a
  message.  A sender that obeys the rule can never have sent a unit while the
  receiver already held ``size`` uncredited bytes; a unit that arrives in that
  state is a flow-control violation.

Memory per request and direction is therefore bounded by ``size`` plus one
unit, whatever the peer does.
"""

from __future__ import annotations

DEFAULT_WINDOW = 256 * 1024


class FlowControlError(Exception):
    """The peer broke the window rule (sent without credit, or over-credited)."""


class SendWindow:
    """Credit this side may still spend sending body bytes."""

    __slots__ = ("size", "available")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        self.size = size
        self.available = size

    def can_send(self) -> bool:
        return self.available > 0

    def spend(self, n: int) -> None:
        self.available -= n

    def credit(self, n: int) -> None:
        """Take back ``n`` bytes of credit from a ``WindowUpdate``."""
        if n <= 0 or self.available + n > self.size:
            raise FlowControlError(
                f"window update of {n} bytes exceeds the {self.size - self.available} bytes outstanding"
            )
        self.available += n


class ReceiveWindow:
    """Bytes received but not yet credited, and credit ready to return."""

    __slots__ = ("size", "unacked", "consumed")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        self.size = size
        self.unacked = 0    # received and not yet credited back
        self.consumed = 0   # of those, taken by the consumer (credit owed)

    def received(self, n: int) -> None:
        if n and self.unacked >= self.size:
            raise FlowControlError(
                f"peer sent {n} body bytes while {self.unacked} of a {self.size}-byte window were unacknowledged"
            )
        self.unacked += n

    def consume(self, n: int) -> int:
        """Record that the consumer took ``n`` bytes; return credit to send now (0 = wait).

        Batching at half a window cannot stall the sender: it only waits
        when ``size`` bytes are outstanding, and once the consumer has taken
        them the owed credit is far past the threshold.
        """
        self.consumed = min(self.consumed + n, self.unacked)
        if self.consumed >= max(1, self.size // 2):
            return self._flush()
        return 0

    def _flush(self) -> int:
        n = self.consumed
        self.unacked -= n
        self.consumed = 0
        return n
