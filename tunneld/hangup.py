"""SIGHUP as a service: while it runs, the signal calls ``reload()`` on the reactor thread.

Both taps add one (server: ``server_tap.ReloadOnHangup``, client:
``client_tap.ReloadOnHangup``); stopping it restores the previous handler.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger


class HangupService(Service):
    """Calls ``reload`` for every SIGHUP while running (subclasses define ``reload``)."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler runs between bytecodes: hand the work to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        raise NotImplementedError
