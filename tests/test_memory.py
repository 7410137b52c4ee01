"""tunneld.memory.Trimmer: when glibc's free lists are trimmed (fake resident sizes, no real trim)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tunneld.memory import Trimmer, resident_bytes

MIB = 1024 * 1024


class TrimmerTests(SynchronousTestCase):
    def make(self, sizes: list[int], after_trim: int) -> tuple[Trimmer, list[int]]:
        """A trimmer whose resident size follows ``sizes`` (MiB), dropping to ``after_trim`` MiB on a trim."""
        state = {"rss": sizes[0] * MIB}
        calls: list[int] = []
        feed = iter(sizes[1:])

        def rss() -> int:
            return state["rss"]

        def trim(pad: int) -> int:
            calls.append(pad)
            state["rss"] = after_trim * MIB
            return 1

        trimmer = Trimmer(32 * MIB, settle=3, rss=rss, trim=trim)

        def tick() -> None:
            value = next(feed, None)
            if value is not None:
                state["rss"] = value * MIB
            trimmer.tick()

        trimmer.tick_next = tick  # type: ignore[attr-defined]
        return trimmer, calls

    def test_idle_never_trims(self) -> None:
        """A process that does not grow is never trimmed."""
        trimmer, calls = self.make([75] * 30, 75)
        for _ in range(29):
            trimmer.tick_next()  # type: ignore[attr-defined]
        self.assertEqual(calls, [])

    def test_growth_trims_and_freed_burst_trimmed_after_settle(self) -> None:
        """Growing 32 MiB trims at once; staying 32 MiB above idle trims again after `settle` ticks, then stops."""
        trimmer, calls = self.make([75, 200], 150)
        trimmer.tick_next()  # type: ignore[attr-defined]   # 200: grew by 125 -> trim, now 150
        self.assertEqual((len(calls), trimmer.baseline), (1, 150 * MIB))
        trimmer.tick_next()  # 150, one tick since
        trimmer.tick_next()
        self.assertEqual(len(calls), 1)
        trimmer.tick_next()  # third tick: still 75 MiB above idle -> trim
        self.assertEqual(len(calls), 2)
        self.assertEqual(trimmer.returned, (200 - 150) * MIB)
        state_after = trimmer.rss()
        trimmer.trim = lambda pad: calls.append(pad) or 1  # type: ignore[assignment]
        for _ in range(10):
            trimmer.tick()   # 150: above idle, at most one trim per settle
        self.assertLessEqual(len(calls), 2 + 10 // 3 + 1)
        self.assertEqual(state_after, 150 * MIB)

    def test_without_glibc_nothing_happens(self) -> None:
        """No malloc_trim (not glibc): tick is a no-op."""
        trimmer = Trimmer(rss=lambda: 10 ** 10, trim=None)
        trimmer.trim = None
        trimmer.tick()
        self.assertEqual(trimmer.trims, 0)

    def test_resident_bytes_reads_proc(self) -> None:
        """This process's resident size is read from /proc (tens of MiB for a Python test run)."""
        self.assertGreater(resident_bytes(), 10 * MIB)
