"""The bridge's thread hops: batched per loop iteration, in order, never lost."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld.grpc_bridge.stream import Bridge


class _Reactor(Clock):
    """A Clock whose callFromThread queues calls for the test to run."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Any, tuple[Any, ...]]] = []
        self.lock = threading.Lock()

    def callFromThread(self, fn: Any, *args: Any) -> None:  # noqa: N802 (Twisted's name)
        with self.lock:
            self.from_threads.append((fn, args))

    def run_from_threads(self) -> int:
        with self.lock:
            calls, self.from_threads = self.from_threads, []
        for fn, args in calls:
            fn(*args)
        return len(calls)


class BridgeHopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.bridge = Bridge(self.reactor)  # type: ignore[arg-type]
        self.bridge.start()
        self.addCleanup(self.bridge.stop)

    def wait_bridge(self) -> None:
        """Let the bridge loop run everything handed to it so far."""
        done = threading.Event()
        assert self.bridge.loop is not None
        self.bridge.loop.call_soon_threadsafe(done.set)
        self.assertTrue(done.wait(5))

    def test_reactor_calls_cross_once_per_iteration_in_order(self) -> None:
        """Calls made in one reactor iteration reach the bridge together, after it, in order."""
        seen: list[int] = []
        for i in range(5):
            self.bridge.call_soon(seen.append, i)
        self.wait_bridge()
        self.assertEqual(seen, [])  # nothing crosses before the iteration ends
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)  # one wake-up for all five
        self.reactor.advance(0)
        self.wait_bridge()
        self.assertEqual(seen, [0, 1, 2, 3, 4])
        self.bridge.call_soon(seen.append, 5)
        self.reactor.advance(0)
        self.wait_bridge()
        self.assertEqual(seen, [0, 1, 2, 3, 4, 5])

    def test_bridge_calls_cross_once_per_loop_iteration_in_order(self) -> None:
        """Calls made in one asyncio iteration reach the reactor in one hop, in order."""
        got: list[int] = []
        assert self.bridge.loop is not None

        def burst() -> None:
            for i in range(4):
                self.bridge.to_reactor(got.append, i)

        self.bridge.loop.call_soon_threadsafe(burst)
        self.wait_bridge()
        self.wait_bridge()
        self.assertEqual(self.reactor.run_from_threads(), 1)
        self.assertEqual(got, [0, 1, 2, 3])

    def test_a_failing_call_does_not_strand_the_rest(self) -> None:
        """An exception in one hopped call is logged; the calls after it still run."""
        seen: list[str] = []
        self.bridge.call_soon(lambda: 1 / 0)
        self.bridge.call_soon(seen.append, "after")
        self.reactor.advance(0)
        self.wait_bridge()
        self.assertEqual(seen, ["after"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)
