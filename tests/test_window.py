"""Tests for tunneld.window: send credit, receive accounting and credit batching."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tunneld.window import (
    CREDIT_BATCH,
    DEFAULT_WINDOW,
    MAX_WINDOW_CAP,
    FlowControlError,
    ReceiveWindow,
    SendWindow,
)

KIB = 1024
MIB = 1024 * KIB


class SendWindowTests(SynchronousTestCase):
    def test_default_size(self) -> None:
        """A new send window holds the default 256 KiB of credit."""
        w = SendWindow()
        self.assertEqual(DEFAULT_WINDOW, 256 * KIB)
        self.assertEqual(w.size, DEFAULT_WINDOW)
        self.assertEqual(w.available, DEFAULT_WINDOW)
        self.assertTrue(w.can_send())

    def test_spend_reduces_credit(self) -> None:
        """Spending subtracts the unit's length; sending stays allowed while credit is left."""
        w = SendWindow(1000)
        w.spend(300)
        self.assertEqual(w.available, 700)
        self.assertTrue(w.can_send())
        w.spend(699)
        self.assertEqual(w.available, 1)
        self.assertTrue(w.can_send())

    def test_exhausted_window_blocks(self) -> None:
        """Once exactly the whole window is spent, no further unit may be sent."""
        w = SendWindow(1000)
        w.spend(1000)
        self.assertEqual(w.available, 0)
        self.assertFalse(w.can_send())

    def test_empty_unit_costs_nothing(self) -> None:
        """A zero-length unit (an end marker, a close frame) leaves the credit unchanged."""
        w = SendWindow(1000)
        w.spend(0)
        self.assertEqual(w.available, 1000)

    def test_oversized_unit_overshoots(self) -> None:
        """An indivisible unit larger than the credit may be spent while credit > 0 and leaves it negative."""
        w = SendWindow(1000)
        w.spend(999)
        self.assertTrue(w.can_send())
        w.spend(5000)
        self.assertEqual(w.available, 1 - 5000)
        self.assertFalse(w.can_send())

    def test_oversized_unit_on_fresh_window(self) -> None:
        """A unit four times the window fits on a fresh window and leaves a deficit of three windows."""
        w = SendWindow(1000)
        w.spend(4000)
        self.assertEqual(w.available, -3000)
        self.assertFalse(w.can_send())

    def test_credit_restores(self) -> None:
        """A WindowUpdate gives back exactly its increment of credit."""
        w = SendWindow(1000)
        w.spend(1000)
        w.credit(250)
        self.assertEqual(w.available, 250)
        self.assertTrue(w.can_send())
        w.credit(750)
        self.assertEqual(w.available, 1000)

    def test_credit_after_overshoot(self) -> None:
        """Credit for an oversized unit is accepted in full and brings the window back to size."""
        w = SendWindow(1000)
        w.spend(4000)
        w.credit(3000)
        self.assertEqual(w.available, 0)
        self.assertFalse(w.can_send())
        w.credit(1000)
        self.assertEqual(w.available, 1000)

    def test_over_credit_raises(self) -> None:
        """Credit beyond the bytes outstanding is a FlowControlError and changes nothing."""
        w = SendWindow(1000)
        w.spend(100)
        self.assertRaises(FlowControlError, w.credit, 101)
        self.assertEqual(w.available, 900)

    def test_credit_on_full_window_raises(self) -> None:
        """Any credit while nothing is outstanding is a FlowControlError."""
        w = SendWindow(1000)
        self.assertRaises(FlowControlError, w.credit, 1)
        self.assertEqual(w.available, 1000)

    def test_zero_or_negative_credit_raises(self) -> None:
        """A WindowUpdate of zero or fewer bytes is a FlowControlError."""
        w = SendWindow(1000)
        w.spend(500)
        self.assertRaises(FlowControlError, w.credit, 0)
        self.assertRaises(FlowControlError, w.credit, -1)
        self.assertEqual(w.available, 500)

    def test_grow_adds_to_size_and_credit(self) -> None:
        """A WindowUpdate with grow enlarges the window and the credit by the same amount."""
        w = SendWindow(1000)
        w.spend(1000)
        w.credit(0, 1000)
        self.assertEqual((w.size, w.available), (2000, 1000))
        w.credit(400, 2000)
        self.assertEqual((w.size, w.available), (4000, 3400))
        self.assertTrue(w.can_send())

    def test_grow_on_fresh_window(self) -> None:
        """Growth alone is accepted while nothing is outstanding."""
        w = SendWindow(1000)
        w.credit(0, 500)
        self.assertEqual((w.size, w.available), (1500, 1500))

    def test_over_credit_with_grow_raises(self) -> None:
        """Growth does not excuse credit beyond the bytes outstanding: FlowControlError, nothing changes."""
        w = SendWindow(1000)
        w.spend(100)
        self.assertRaises(FlowControlError, w.credit, 101, 5000)
        self.assertEqual((w.size, w.available), (1000, 900))

    def test_grow_past_cap_raises(self) -> None:
        """A window that would grow beyond 1 GiB is a FlowControlError and changes nothing."""
        w = SendWindow(MAX_WINDOW_CAP - 10)
        self.assertRaises(FlowControlError, w.credit, 0, 11)
        self.assertEqual((w.size, w.available), (MAX_WINDOW_CAP - 10, MAX_WINDOW_CAP - 10))
        w.credit(0, 10)
        self.assertEqual(w.size, MAX_WINDOW_CAP)

    def test_empty_or_negative_update_raises(self) -> None:
        """An update with neither credit nor growth, or a negative growth, is a FlowControlError."""
        w = SendWindow(1000)
        w.spend(500)
        self.assertRaises(FlowControlError, w.credit, 0, 0)
        self.assertRaises(FlowControlError, w.credit, 10, -1)
        self.assertEqual((w.size, w.available), (1000, 500))

    def test_first_unit_after_hold_is_marked(self) -> None:
        """After a hold, spend reports the first unit with a cost (window_limited), and only that one."""
        w = SendWindow(1000)
        self.assertFalse(w.spend(1000))
        w.hold()
        w.credit(500)
        self.assertFalse(w.spend(0))  # an end marker is not a body unit
        self.assertTrue(w.spend(100))
        self.assertFalse(w.spend(100))

    def test_unheld_sender_never_marks(self) -> None:
        """A sender that never waited for credit never marks a unit."""
        w = SendWindow(1000)
        self.assertEqual([w.spend(400), w.spend(400), w.spend(400)], [False] * 3)


class ReceiveWindowTests(SynchronousTestCase):
    def test_received_counts_unacked(self) -> None:
        """Received bytes are counted as unacknowledged."""
        w = ReceiveWindow(1000)
        w.received(300)
        w.received(700)
        self.assertEqual(w.unacked, 1000)
        self.assertEqual(w.consumed, 0)

    def test_unit_while_window_full_raises(self) -> None:
        """A unit that arrives while `size` bytes are already unacked is a FlowControlError."""
        w = ReceiveWindow(1000)
        w.received(1000)
        self.assertRaises(FlowControlError, w.received, 1)
        self.assertEqual(w.unacked, 1000)

    def test_unit_overshooting_from_partial_window_allowed(self) -> None:
        """A unit that starts below `size` unacked is allowed even if it overshoots the window."""
        w = ReceiveWindow(1000)
        w.received(999)
        w.received(64 * KIB)
        self.assertEqual(w.unacked, 999 + 64 * KIB)
        self.assertRaises(FlowControlError, w.received, 1)

    def test_empty_unit_when_full_allowed(self) -> None:
        """A zero-length unit (an end marker) is allowed even when the window is full."""
        w = ReceiveWindow(1000)
        w.received(1000)
        w.received(0)
        self.assertEqual(w.unacked, 1000)

    def test_small_consumption_is_batched(self) -> None:
        """Consumption below half a window returns no credit yet."""
        w = ReceiveWindow(1000)
        w.received(1000)
        self.assertEqual(w.consume(100), 0)
        self.assertEqual(w.consume(399), 0)
        self.assertEqual(w.consumed, 499)
        self.assertEqual(w.unacked, 1000)

    def test_half_window_returns_batch(self) -> None:
        """Reaching half a window returns everything consumed so far, in one batch."""
        w = ReceiveWindow(1000)
        w.received(1000)
        self.assertEqual(w.consume(100), 0)
        self.assertEqual(w.consume(400), 500)
        self.assertEqual(w.unacked, 500)
        self.assertEqual(w.consumed, 0)
        self.assertEqual(w.consume(499), 0)
        self.assertEqual(w.consume(1), 500)
        self.assertEqual(w.unacked, 0)

    def test_batch_larger_than_half(self) -> None:
        """A single large consumption is credited in full, not clipped to half a window."""
        w = ReceiveWindow(1000)
        w.received(1000)
        self.assertEqual(w.consume(900), 900)
        self.assertEqual(w.unacked, 100)

    def test_credit_never_exceeds_received(self) -> None:
        """The consumer cannot be credited for more bytes than were received."""
        w = ReceiveWindow(1000)
        w.received(600)
        self.assertEqual(w.consume(5000), 600)
        self.assertEqual(w.unacked, 0)
        self.assertEqual(w.consume(5000), 0)
        self.assertEqual(w.unacked, 0)

    def test_consume_before_receive_gives_nothing(self) -> None:
        """Consumption reported before any bytes arrived is not banked as future credit."""
        w = ReceiveWindow(1000)
        self.assertEqual(w.consume(1000), 0)
        w.received(100)
        self.assertEqual(w.consume(0), 0)
        self.assertEqual(w.consumed, 0)
        self.assertEqual(w.unacked, 100)

    def test_credit_reopens_window(self) -> None:
        """After credit is returned a unit is accepted again on a window that was full."""
        w = ReceiveWindow(1000)
        w.received(1000)
        self.assertEqual(w.consume(500), 500)
        w.received(500)
        self.assertEqual(w.unacked, 1000)

    def test_oversized_unit_fully_creditable(self) -> None:
        """A unit larger than the window is accepted on an empty window and credited in full."""
        w = ReceiveWindow(1000)
        w.received(4000)
        self.assertRaises(FlowControlError, w.received, 1)
        self.assertEqual(w.consume(4000), 4000)
        self.assertEqual(w.unacked, 0)
        w.received(1)

    def test_tiny_window_credits_each_byte(self) -> None:
        """A window smaller than four bytes still returns credit (threshold at least one byte)."""
        w = ReceiveWindow(3)
        w.received(3)
        self.assertEqual(w.consume(1), 1)
        self.assertEqual(w.unacked, 2)

    def test_send_and_receive_agree(self) -> None:
        """A sender that only sends while credit is positive never trips the receiver's check."""
        send, recv = SendWindow(1000), ReceiveWindow(1000)
        units = [300, 300, 300, 300, 50, 2000, 10, 700]
        sent_units = 0
        for n in units:
            while not send.can_send():
                credit = recv.consume(recv.unacked)
                self.assertGreater(credit, 0)
                send.credit(credit)
            send.spend(n)
            recv.received(n)
            sent_units += 1
        self.assertEqual(sent_units, len(units))
        self.assertEqual(send.size - send.available, recv.unacked)

    def test_idle_when_everything_consumed(self) -> None:
        """idle() holds when the consumer took every byte received, credited or owed; not otherwise."""
        w = ReceiveWindow(1000)
        self.assertTrue(w.idle())
        w.received(300)
        self.assertFalse(w.idle())
        self.assertEqual(w.consume(300), 0)  # owed, below half a window
        self.assertTrue(w.idle())
        w.received(300)
        w.consume(299)
        self.assertFalse(w.idle())
        w.consume(1)
        self.assertTrue(w.idle())

    def test_grow_raises_the_limit(self) -> None:
        """A grown window accepts units until its new size is unacknowledged and counts its growth."""
        w = ReceiveWindow(1000)
        w.received(1000)
        w.grow(1000)
        self.assertEqual((w.size, w.initial, w.grown), (2000, 1000, 1000))
        w.received(1000)
        self.assertRaises(FlowControlError, w.received, 1)

    def test_flush_returns_owed_credit(self) -> None:
        """flush() returns credit owed below the batch threshold at once."""
        w = ReceiveWindow(1000)
        w.received(1000)
        self.assertEqual(w.consume(100), 0)
        self.assertEqual(w.flush(), 100)
        self.assertEqual((w.unacked, w.consumed), (900, 0))
        self.assertEqual(w.flush(), 0)

    def test_big_window_credits_in_batches_of_at_most_1_mib(self) -> None:
        """A 16 MiB window returns credit every 1 MiB, not every 8 MiB."""
        self.assertEqual(CREDIT_BATCH, MIB)
        w = ReceiveWindow(16 * MIB)
        w.received(16 * MIB)
        self.assertEqual(w.consume(MIB - 1), 0)
        self.assertEqual(w.consume(1), MIB)
        self.assertEqual(w.consume(3 * MIB), 3 * MIB)

    def test_grown_send_and_receive_agree(self) -> None:
        """Growth announced by the receiver keeps an obeying sender within the receiver's check."""
        send, recv = SendWindow(1000), ReceiveWindow(1000)
        for n in [600, 600, 2000, 10, 3000, 700, 700, 700]:
            while not send.can_send():
                credit, grow = recv.consume(recv.unacked), recv.size  # doubled
                recv.grow(grow)
                send.credit(credit, grow)
            send.spend(n)
            recv.received(n)
        self.assertEqual(send.size, recv.size)
        self.assertEqual(send.size - send.available, recv.unacked)
