"""How a tunneld process ends: truthful exit statuses and idempotent stop signals.

``ProcessExit`` is one small service per process (both taps add it):

* ``fatal(line)``: something the process cannot run without failed at start
  (a listener that cannot bind, a TLS file that cannot be loaded).  The line
  is logged once, the reactor is stopped once (the normal, orderly shutdown
  follows) and the process exits with status 1 when twistd is done, so
  systemd's ``Restart=on-failure``, init scripts and shells see the failure.
  twistd itself always exits 0 after its reactor stopped, so the status is
  applied by an ``atexit`` hook that runs after twistd's own shutdown
  (services stopped, pid file removed, "Server Shut Down." logged).
* SIGTERM / SIGINT: the first one stops the reactor as Twisted's own handler
  does (twistd re-raises it on exit); any later one, while the drain runs, is
  logged once at info and changes nothing (Twisted's handler would call
  ``reactor.stop()`` again and log a critical ``ReactorNotRunning``).

``listen_error`` turns a failed listen into the one line: key, address,
reason in words, and what to do.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.endpoints import load_tls_pair, probe_bind

#: errno -> (reason in words, hint before "change KEY in FILE")
_REASONS: dict[int, tuple[str, str]] = {
    errno.EADDRINUSE: ("address already in use", "is another tunneld running? "),
    errno.EACCES: ("permission denied", "ports below 1024 need root or CAP_NET_BIND_SERVICE; "),
    errno.EADDRNOTAVAIL: ("no interface of this machine has that address",
                          "use one of this machine's addresses, 127.0.0.1 or 0.0.0.0; "),
}


def _errno_of(error: BaseException | None) -> int | None:
    while error is not None:
        if isinstance(error, CannotListenError):
            error = error.socketError
            continue
        if isinstance(error, OSError) and error.errno:
            return int(error.errno)
        return None
    return None


def listen_error(key: str, address: str, error: BaseException | None, config_file: str) -> str:
    """One line: ``KEY ADDRESS: reason (what to do)``.

    ``error``: what the listen raised (a ``CannotListenError`` from Twisted,
    or grpc's reason-less error, in which case the address is probed).
    """
    code = _errno_of(error)
    if code is None:
        probed = probe_bind(address)
        code = probed.errno if probed is not None else None
        if probed is not None and code not in _REASONS:
            error = probed
    where = f"change {key} in {config_file}" if config_file else f"set {key} in a config file given with -c"
    if code in _REASONS:
        reason, hint = _REASONS[code]
        return f"{key} {address}: {reason} ({hint}{where})"
    if isinstance(error, CannotListenError) and error.socketError is not None:
        error = error.socketError
    words = (os.strerror(code) if code else str(error or "")) or "cannot listen"
    return f"{key} {address}: {words.rstrip('.')} ({where})"


class ProcessExit(Service):
    """The process's exit status and its stop signals (see the module docstring)."""

    log = Logger()

    def __init__(self, reactor: Any, config_file: str, at_exit: Callable[[Callable[[], None]], Any] = atexit.register
                 ) -> None:
        self.reactor = reactor
        self.at_exit = at_exit   # tests pass their own: the real hook ends the process with ``status``
        self.config_file = config_file
        self.status = 0
        self.stopping = False          # a stop signal arrived (or a fatal error stopped the reactor)
        self._repeat_logged = False
        self._previous: dict[int, Any] = {}
        self._exit_hooked = False

    # -- fatal start errors -----------------------------------------------------------------------

    def fatal(self, line: str) -> None:
        """Log ``line`` (the only line about it), stop the reactor once, exit with status 1."""
        self.log.critical("{line}", line=line)
        self.status = 1
        if not self._exit_hooked:
            self._exit_hooked = True
            self.at_exit(self._exit)
        self._stop_once()

    def listen_failed(self, key: str, address: str) -> Any:
        """A callback for a listener's failure (a ``Failure`` or an exception): the one line, then ``fatal``."""
        def failed(reason: Failure | BaseException | None = None) -> None:
            error = reason.value if isinstance(reason, Failure) else reason
            if self.stopping and _errno_of(error) is None and probe_bind(address) is None:
                # Cancelled because the process is already ending (another listener failed, or a signal).
                return
            self.fatal(listen_error(key, address, error, self.config_file))
        return failed

    def _stop_once(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.reactor.running:
            self.reactor.stop()
        else:
            # A listener failed while twistd was still starting services.
            self.reactor.callWhenRunning(self._stop_running)

    def _stop_running(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def _exit(self) -> None:
        if self.status:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(self.status)

    # -- SIGTERM / SIGINT ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # The reactor installs its own handlers as it starts running: replace them after that.
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        # Keep our handlers until the process ends: a signal during the drain must stay harmless.

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler runs between bytecodes: only flags here, the rest on the reactor thread.
        if not self.stopping:
            self.stopping = True
            self.reactor._exitSignal = signum   # twistd re-raises it once shut down, as with its own handler
            self.reactor.callFromThread(self._first_signal, signum)
        elif not self._repeat_logged:
            self._repeat_logged = True
            self.reactor.callFromThread(self._repeat_signal, signum)

    def _first_signal(self, signum: int) -> None:
        self.log.info("Received {signal}, shutting down.", signal=signal.Signals(signum).name)
        if self.reactor.running:
            self.reactor.stop()

    def _repeat_signal(self, signum: int) -> None:
        self.log.info("Received {signal} again while shutting down: already stopping (in-flight work drains "
                      "up to drain_timeout); ignored", signal=signal.Signals(signum).name)


def check_tls_files(config_file: str, pairs: list[tuple[tuple[str, str], str, str]], program: str) -> None:
    """Load every configured certificate/key pair now: one that cannot be loaded is one line and status 1.

    (The config check read the files; this also parses them and matches each
    key to its certificate, before anything listens.)
    """
    for (cert_key, key_key), cert, key in pairs:
        if not cert:
            continue
        try:
            load_tls_pair(cert, key)
        except ValueError as e:
            sys.stderr.write(f"{program}: {cert_key} {e} (check {cert_key} and {key_key} in {config_file})\n")
            raise SystemExit(1) from None


def preflight(program: str, config_file: str, listeners: list[tuple[str, str]]) -> None:
    """Before anything starts: every ``(key, address)`` that cannot be bound is one line, then status 1.

    Checked while twistd is still in the foreground (before it forks and
    before grpc exists), so a busy port never gets as far as a grpc error
    line or a half-started process; a bind that fails later anyway (a race)
    goes through ``ProcessExit.listen_failed``.
    """
    lines = [listen_error(key, address, error, config_file) for key, address in listeners if address
             for error in [probe_bind(address)] if error is not None]
    if lines:
        sys.stderr.write("".join(f"{program}: {line}\n" for line in lines))
        raise SystemExit(1)
