"""Log output of the taps: twistd's text lines (default) or JSON lines for log shippers.

``log_format = "json"`` in ``[server]`` / ``[client]`` makes twistd log one
JSON object per line through ``twisted.logger.jsonFileLogObserver``, to the
same place it would write text: ``--logfile`` (rotated on SIGUSR1 as twistd
does), or stdout with ``-n`` and no ``--logfile`` (journald under systemd).

How it gets there: twistd builds the plugin's service, adds it to a new
``Application`` and only then starts logging, preferring an ``ILogObserver``
component set on that application (``AppLogger.start``).  ``with_log_format``
wraps the tap's service in a ``MultiService`` whose ``setServiceParent`` sets
that component.  An explicit ``twistd --logger=…`` still wins, and
``--syslog`` is left alone.

Every line is Twisted's JSON form of the event (``log_namespace``,
``log_time``, ``log_format`` and the event's own fields such as
``request_id``, ``trace_id``, ``route``, ``status``), plus three flat
fields for shippers: ``time`` (ISO 8601, UTC), ``level`` ("info", "warn",
...) and ``text`` (the formatted message, as the text log would show it);
they replace event fields of the same names.
"""

from __future__ import annotations

import signal
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, LogEvent, formatEvent, jsonFileLogObserver
from twisted.python.logfile import LogFile
from zope.interface import implementer

FORMATS = ("text", "json")


@implementer(ILogObserver)
class JsonLines:
    """Writes each event as one JSON line (no record separator) with ``time``, ``level`` and ``text`` added."""

    def __init__(self, out: IO[Any]) -> None:
        self.out = out
        self._inner = jsonFileLogObserver(out, recordSeparator="")

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        stamp = event.get("log_time")
        extra = {
            "time": datetime.fromtimestamp(stamp, timezone.utc).isoformat() if stamp is not None else None,
            "level": getattr(level, "name", None),
            "text": formatEvent(event),
        }
        # A copy: other observers see the event unchanged.  The three flat fields
        # always have these types (a legacy event's own float "time" is log_time anyway).
        self._inner({**event, **extra})


def twistd_log_file(twistd_options: Any) -> IO[Any]:
    """Where twistd would write its log, given its (parent) options: a rotating LogFile or stdout."""
    logfile = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon"))
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    out = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):   # twistd's own rule: rotate on SIGUSR1 unless taken
        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return out


class _JsonLogging(MultiService):
    """The tap's service, which sets a JSON log observer on the twistd Application it joins."""

    def __init__(self, service: MultiService, twistd_options: Any) -> None:
        super().__init__()
        self.twistd_options = twistd_options
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None and not self.twistd_options.get("syslog"):
            if ILogObserver(parent, None) is None:
                set_component(ILogObserver, JsonLines(twistd_log_file(self.twistd_options)))
        super().setServiceParent(parent)


def with_log_format(service: MultiService, log_format: str, twistd_options: Any) -> MultiService:
    """``service`` as it should be handed to twistd for ``log_format`` ("text": unchanged)."""
    if log_format != "json" or twistd_options is None:
        return service
    return _JsonLogging(service, twistd_options)


class ThrottledWarning:
    """A warning said at most once per ``every`` seconds per message, with how many it stands for.

    For refusals an attacker can cause by the thousand (a full limit): each
    is worth saying in words, none is worth a line of its own.
    """

    def __init__(self, log: Any, what: str, every: float = 10.0) -> None:
        self.log = log
        self.what = what   # e.g. "refused a request from the server"
        self.every = every
        self.last: dict[str, tuple[float, int]] = {}   # message -> (when last said, folded in since)
        self.total = 0

    def note(self, now: float, message: str, **fields: Any) -> None:
        self.total += 1
        said, folded = self.last.get(message, (None, 0))
        if said is not None and now - said < self.every:
            self.last[message] = (said, folded + 1)
            return
        if len(self.last) > 64:   # a bounded table: messages name limits, not addresses
            self.last.clear()
        self.last[message] = (now, 0)
        more = f" ({folded} more since the last line)" if folded else ""
        self.log.warn("{what}: {reason}{more}", what=self.what, reason=message, more=more,
                      **{"request_id": "", "trace_id": "", **fields})
