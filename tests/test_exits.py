"""Truthful exits and idempotent stop signals, with the real ``twistd`` (and the runtime path in-process).

A listener that cannot bind, or a TLS pair that cannot be loaded, ends the
process with status 1 and one line naming the key, the address, the reason
and the fix; a second SIGTERM/SIGINT during a drain is one info line and
changes nothing.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.certs import make_pki
from tests.harness import wait_for
from tests.processes import TOKEN, ProcessStack, Twistd, free_port, toml_table
from tunneld.endpoints import ListenService
from tunneld.lifecycle import ProcessExit, listen_error


def taken_port(case: Any) -> int:
    """A 127.0.0.1 port this test process listens on (so nobody else can bind it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    case.addCleanup(sock.close)
    return int(sock.getsockname()[1])


def server_settings(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "tunnel_listen": f"127.0.0.1:{free_port()}", "http_listen": f"127.0.0.1:{free_port()}",
        "grpc_listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}",
    }
    settings.update(overrides)
    return settings


class TwistdExitTests(TestCase):
    """Each listener's busy port, and broken TLS files, through a real ``twistd -n`` process."""

    timeout = 60

    def write(self, name: str, text: str) -> str:
        path = os.path.abspath(self.mktemp()) + "-" + name
        with open(path, "w") as f:
            f.write(text)
        return path

    def server_toml(self, settings: dict[str, Any]) -> str:
        return self.write("server.toml", toml_table("server", settings)
                          + toml_table("groups", {"name": "default", "tokens": [TOKEN]}, array=True))

    @inlineCallbacks
    def exited(self, proc: Twistd) -> Any:
        yield wait_for(lambda: not proc.running, timeout=30, what=f"{proc} exit")
        return proc.returncode, proc.log()

    @inlineCallbacks
    def assert_busy_port_exit(self, program: str, key: str, settings: dict[str, Any], port: int) -> Any:
        path = self.server_toml(settings) if program == "tunneld-server" else self.write(
            "client.toml", toml_table("client", settings))
        code, log = yield self.exited(Twistd(self, key, program, "-c", path))
        self.assertEqual(code, 1, log)
        line = (f"{key} 127.0.0.1:{port}: address already in use "
                f"(is another tunneld running? change {key} in {path})")
        self.assertEqual([x for x in log.splitlines() if line in x], [f"{program}: {line}"], log)
        self.assertEqual(len(log.splitlines()), 1, log)   # that line and nothing else: no traceback
        self.assertNotIn("Traceback", log)

    def test_server_listeners_busy(self) -> Any:
        """tunnel_listen, http_listen, grpc_listen, admin_listen: a taken port is status 1 and one line."""
        @inlineCallbacks
        def run() -> Any:
            for key in ("tunnel_listen", "http_listen", "grpc_listen", "admin_listen"):
                port = taken_port(self)
                yield self.assert_busy_port_exit("tunneld-server", key,
                                                 server_settings(**{key: f"127.0.0.1:{port}"}), port)
        return run()

    def test_client_listeners_busy(self) -> Any:
        """The client's http_entry and admin_listen: a taken port is status 1 and one line."""
        @inlineCallbacks
        def run() -> Any:
            for key in ("http_entry", "admin_listen"):
                port = taken_port(self)
                settings = {"server": f"127.0.0.1:{free_port()}", "token": TOKEN, key: f"127.0.0.1:{port}"}
                yield self.assert_busy_port_exit("tunneld-client", key, settings, port)
        return run()

    @inlineCallbacks
    def test_tls_file_that_cannot_be_loaded(self) -> Any:
        """A TLS key that does not parse, or a missing TLS file: status 1, one line naming key, file and fix."""
        pki = make_pki(os.path.abspath(self.mktemp()))
        broken = self.write("broken.pem", "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        path = self.server_toml(server_settings(http_tls_cert=pki.server_cert, http_tls_key=broken))
        code, log = yield self.exited(Twistd(self, "tls-broken", "tunneld-server", "-c", path))
        self.assertEqual(code, 1, log)
        self.assertEqual(len(log.splitlines()), 1, log)
        self.assertIn(f"tunneld-server: http_tls_cert cannot load {pki.server_cert} with {broken}", log)
        self.assertIn(f"(check http_tls_cert and http_tls_key in {path})", log)

        missing = os.path.abspath(self.mktemp()) + "-missing.pem"
        path = self.server_toml(server_settings(tls_cert=missing, tls_key=pki.server_key))
        code, log = yield self.exited(Twistd(self, "tls-missing", "tunneld-server", "-c", path))
        self.assertEqual(code, 1, log)
        self.assertEqual(log.splitlines(), [f"tunneld-server: {path}: [server] key 'tls_cert': cannot read "
                                            f"{missing}: No such file or directory"])

    @inlineCallbacks
    def test_second_sigterm_during_drain(self) -> Any:
        """SIGTERM, then SIGTERM and SIGINT during the drain: one info line, same clean exit, nothing critical."""
        stack = ProcessStack(self, [], server={"drain_delay": 2, "admin_listen": f"127.0.0.1:{free_port()}"})
        srv = stack.start_server()
        yield wait_for(lambda: srv.count("tunnel port listening") == 1, timeout=20, what="server up")
        srv.signal(signal.SIGTERM)
        yield wait_for(lambda: srv.count("entries keep serving for drain_delay") == 1, timeout=10,
                       what="drain started")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            srv.signal(sig)
        yield wait_for(lambda: not srv.running, timeout=20, what="server exit")
        log = srv.log()
        self.assertEqual(srv.returncode, -signal.SIGTERM, log)   # twistd re-raises the first signal
        self.assertEqual(srv.count("again while shutting down"), 1, log)
        self.assertEqual(srv.count("#info] Received SIG"), 2, log)
        self.assertNotIn("#critical", log)
        self.assertNotIn("ReactorNotRunning", log)
        self.assertNotIn("Traceback", log)
        self.assertIn("Server Shut Down.", log)


class FakeReactor:
    running = True

    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1

    def callWhenRunning(self, f: Any, *a: Any) -> None:
        f(*a)


class ListenFailedTests(TestCase):
    """The runtime path (a bind that fails after the preflight check): one line, status 1, one reactor stop."""

    @inlineCallbacks
    def test_listen_service_reports_through_process_exit(self) -> Any:
        """A ListenService on a taken port calls ProcessExit: key, address, reason, fix; status 1."""
        port = taken_port(self)
        fake = FakeReactor()
        hooks: list[Any] = []
        ending = ProcessExit(fake, "etc/server.toml", at_exit=hooks.append)
        events: list[dict[str, Any]] = []
        ending.log = Logger(observer=events.append)   # type: ignore[misc]
        service = ListenService(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), Factory.forProtocol(Protocol))
        service.on_failure = ending.listen_failed("http_listen", f"127.0.0.1:{port}")
        service.startService()
        yield service.stopService()
        self.assertEqual(ending.status, 1)
        self.assertEqual(fake.stops, 1)
        self.assertEqual(len(hooks), 1)
        self.assertEqual([e["line"] for e in events], [
            f"http_listen 127.0.0.1:{port}: address already in use (is another tunneld running? "
            "change http_listen in etc/server.toml)"])

    @inlineCallbacks
    def test_taps_wire_every_listener(self) -> Any:
        """build_server with a ProcessExit: a taken tunnel_listen (grpc binds in the bridge thread, after the
        preflight) or grpc_listen ends in the one line and status 1."""
        from tunneld.config import parse_server_config
        from tunneld.server_tap import build_server

        for key in ("tunnel_listen", "grpc_listen"):
            port = taken_port(self)
            settings = {"tunnel_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "grpc_listen": "127.0.0.1:0",
                        "admin_listen": "", key: f"127.0.0.1:{port}"}
            config = parse_server_config({"server": settings, "groups": [{"name": "default", "tokens": [TOKEN]}]},
                                         "etc/server.toml")
            fake = FakeReactor()
            ending = ProcessExit(fake, config.path, at_exit=lambda f: None)
            lines: list[str] = []
            ending.log = Logger(observer=lambda e: lines.append(e.get("line", "")))   # type: ignore[misc]
            app = build_server(config, reactor, ending)
            app.service.startService()
            try:
                yield wait_for(lambda: ending.status == 1, timeout=20, what=f"{key} failure")
            finally:
                yield app.service.stopService()
            self.flushLoggedErrors(RuntimeError, OSError)
            self.assertEqual(fake.stops, 1)
            self.assertIn(f"{key} 127.0.0.1:{port}: address already in use (is another tunneld running? "
                          f"change {key} in etc/server.toml)", lines)

    def test_without_on_failure_raises_at_start(self) -> None:
        """Without a ProcessExit (in-process use), a busy port raises at start as before."""
        port = taken_port(self)
        service = ListenService(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), Factory.forProtocol(Protocol))
        self.assertRaises(CannotListenError, service.startService)


class ListenErrorTests(SynchronousTestCase):
    """The line's words for each kind of bind error."""

    def test_reasons(self) -> None:
        """In use, permission, foreign address, and an error without errno (probed)."""
        import errno

        def err(code: int) -> CannotListenError:
            return CannotListenError("127.0.0.1", 80, OSError(code, os.strerror(code)))

        self.assertEqual(listen_error("admin_listen", "127.0.0.1:80", err(errno.EACCES), "f.toml"),
                         "admin_listen 127.0.0.1:80: permission denied (ports below 1024 need root or "
                         "CAP_NET_BIND_SERVICE; change admin_listen in f.toml)")
        self.assertEqual(listen_error("http_listen", "10.9.9.9:80", err(errno.EADDRNOTAVAIL), ""),
                         "http_listen 10.9.9.9:80: no interface of this machine has that address (use one of "
                         "this machine's addresses, 127.0.0.1 or 0.0.0.0; set http_listen in a config file "
                         "given with -c)")
        port = taken_port(self)
        self.assertEqual(listen_error("grpc_listen", f"127.0.0.1:{port}", RuntimeError("Failed to bind"), "f"),
                         f"grpc_listen 127.0.0.1:{port}: address already in use (is another tunneld running? "
                         "change grpc_listen in f)")

    def test_signal_repeat_is_one_line(self) -> None:
        """A second and third stop signal log one line between them and stop nothing more."""
        fake = FakeReactor()
        calls: list[Any] = []
        fake.callFromThread = lambda f, *a: calls.append((f, a))   # type: ignore[attr-defined]
        ending = ProcessExit(fake, "f", at_exit=lambda f: None)
        events: list[dict[str, Any]] = []
        ending.log = Logger(observer=events.append)   # type: ignore[misc]
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            ending._on_signal(sig, None)
        for f, a in calls:
            f(*a)
        self.assertEqual(fake.stops, 1)
        self.assertEqual(fake._exitSignal, signal.SIGTERM)   # type: ignore[attr-defined]
        self.assertEqual(len(events), 2)
        self.assertIn("again while shutting down", events[1]["log_format"])
