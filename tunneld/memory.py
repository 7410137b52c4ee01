"""Giving memory back after a burst: glibc's free lists trimmed when the process has grown.

After a burst of large requests CPython has freed its 64 KiB chunks and
buffers, but glibc keeps the freed heap pages (and its dynamic mmap
threshold has risen, so later big buffers land in the heap too): a process
that went 75 -> 1,800 MiB stayed there idle.  ``malloc_trim(0)`` hands the
free pages back (madvise), whatever their place in the heap.  It walks the
heap, so it runs only when the resident size has grown by ``threshold``
since the last trim, or stays ``threshold`` above the smallest size seen
(idle) and the last trim is ``settle`` seconds old (what a burst freed after
the last trim), checked every ``TRIM_INTERVAL`` seconds by a TimerService in
each tap: a few times per burst, never on an idle process, once per
``settle`` on one that holds much.  Where there is no glibc (musl, macOS)
nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable

from twisted.logger import Logger

#: Seconds between checks of the resident size (a check is one read of /proc/self/statm).
TRIM_INTERVAL = 5.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Trimmer:
    """Calls ``malloc_trim(0)`` when the resident size grew ``threshold`` bytes past the last trim."""

    log = Logger()

    def __init__(self, threshold: int = 32 * 1024 * 1024, *, settle: int = 6, rss: Callable[[], int] = resident_bytes,
                 trim: Callable[[int], int] | None = None) -> None:
        self.threshold = threshold
        self.settle = settle   # ticks between "still above idle" trims
        self.rss = rss
        self.trim = trim if trim is not None else _load_trim()
        self.baseline = rss()
        self.floor = self.baseline   # the smallest resident size seen (idle)
        self.since = 0               # ticks since the last trim
        self.trims = 0
        self.returned = 0   # bytes the trims gave back (resident size before - after), in total

    def tick(self) -> None:
        if self.trim is None:
            return
        before = self.rss()
        self.since += 1
        self.floor = min(self.floor, before)
        grew = before - self.baseline >= self.threshold
        above_idle = before - self.floor >= self.threshold and self.since >= self.settle
        if not grew and not above_idle:
            if before < self.baseline:
                self.baseline = before   # memory came back by itself: measure growth from here
            return
        self.since = 0
        self.trim(0)
        after = self.rss()
        self.trims += 1
        self.returned += max(0, before - after)
        self.baseline = after
        self.log.debug("malloc_trim: resident {before} -> {after} MiB", before=before >> 20, after=after >> 20)
