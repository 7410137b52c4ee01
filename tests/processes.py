"""Real ``twistd -n tunneld-server`` / ``tunneld-client`` processes for the tests.

``Twistd`` is one foreground twistd process with its output in a log file;
``ProcessStack`` writes temporary TOML configs on free 127.0.0.1 ports,
starts a server and any number of clients, and can kill, freeze and restart
them.  Every process it started is registered for cleanup on the test case
and stopped by its own PID (SIGKILL; a frozen one is killed just the same);
nothing else is ever signalled.  Readiness and recovery are polled with a
bound (``wait_for``, ``wait_http``), never slept for.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.harness import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
TOKEN = "process-test-token"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(name: str, settings: dict[str, Any], array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head] + [f"{key} = {toml_value(value)}" for key, value in settings.items()]) + "\n"


class Twistd:
    """One ``twistd -n`` process, its output (stdout and stderr) in ``log_path``."""

    def __init__(self, case: TestCase, name: str, *args: str) -> None:
        self.name = name
        self.args = args
        self.log_path = os.path.abspath(case.mktemp()) + f"-{name}.log"
        self._log = open(self.log_path, "ab")
        case.addCleanup(self._log.close)
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        self.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", *args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        case.addCleanup(self.kill)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def count(self, text: str) -> int:
        """How many lines of the log contain ``text``."""
        return sum(1 for line in self.log().splitlines() if text in line)

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL (works on a stopped process too) and reap."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def __repr__(self) -> str:
        return f"<Twistd {self.name} pid={self.pid}>"


class ProcessStack:
    """A real server process and client processes on free 127.0.0.1 ports.

    ``routes`` are ``[[routes]]`` tables (group "default" unless given);
    ``server`` overrides ``[server]`` keys.  Ports stay fixed for the life of
    the stack, so ``restart_server`` comes back on the same ones.
    """

    def __init__(self, case: TestCase, routes: list[dict[str, Any]], *, server: dict[str, Any] | None = None,
                 groups: list[dict[str, Any]] | None = None) -> None:
        self.case = case
        self.tunnel_port = free_port()
        self.http_port = free_port()
        settings: dict[str, Any] = {
            "tunnel_listen": f"127.0.0.1:{self.tunnel_port}", "http_listen": f"127.0.0.1:{self.http_port}",
            "grpc_listen": "", "admin_listen": "", "drain_timeout": 1,
            "heartbeat_interval": 1, "cleanup_interval": 1,
        }
        settings.update(server or {})
        text = toml_table("server", settings)
        for group in groups or [{"name": "default", "tokens": [TOKEN]}]:
            text += toml_table("groups", group, array=True)
        for route in routes:
            text += toml_table("routes", {"group": "default", **route}, array=True)
        self.server_toml = self._write("server.toml", text)
        self.server: Twistd | None = None
        self.servers: list[Twistd] = []
        self.clients: list[Twistd] = []

    def _write(self, name: str, text: str) -> str:
        path = os.path.abspath(self.case.mktemp()) + "-" + name
        with open(path, "w") as f:
            f.write(text)
        return path

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.http_port}{path}".encode()

    def start_server(self) -> Twistd:
        self.server = Twistd(self.case, f"server{len(self.servers)}", "tunneld-server", "-c", self.server_toml)
        self.servers.append(self.server)
        return self.server

    def add_client(self, **settings: Any) -> Twistd:
        """Start a client process (``[client]`` keys in ``settings``); does not wait."""
        values: dict[str, Any] = {"server": f"127.0.0.1:{self.tunnel_port}", "token": TOKEN, "drain_timeout": 1,
                                  "heartbeat_interval": 1}
        values.update(settings)
        n = len(self.clients)
        path = self._write(f"client{n}.toml", toml_table("client", values))
        client = Twistd(self.case, f"client{n}", "tunneld-client", "-c", path)
        self.clients.append(client)
        return client

    def restart_server(self) -> Twistd:
        """SIGKILL the server (no clean close) and start a new one on the same ports."""
        assert self.server is not None
        self.server.kill()
        return self.start_server()

    def logs(self) -> str:
        """Every process's log, for failure messages."""
        return "\n".join(f"===== {p.name} (pid {p.pid}, rc {p.returncode})\n{p.log()}"
                         for p in self.servers + self.clients)

    def wait_connected(self, client: Twistd, count: int = 1, timeout: float = 15.0) -> Any:
        """Fire once ``client`` logged its ``count``-th successful connection."""
        def check() -> bool:
            if not client.running:
                raise AssertionError(f"{client} exited\n{self.logs()}")
            return client.count("connected to ") >= count

        return wait_for(check, timeout=timeout, what=f"{client} connected ({count})")

    @inlineCallbacks
    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` through the server's HTTP entry: (status, body); status 0 if the connection failed."""
        try:
            resp = yield treq.get(self.url(path), persistent=False, timeout=timeout)
            body = yield treq.content(resp)
            return resp.code, body
        except Exception as e:
            return 0, repr(e).encode()

    @inlineCallbacks
    def wait_http(self, path: str, status: int = 200, timeout: float = 15.0) -> Any:
        """Poll ``path`` until it answers ``status``; return seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        last: Any = None
        while True:
            last = yield self.get(path, timeout=max(0.5, deadline - time.monotonic()))
            if last[0] == status:
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: no {status} within {timeout} s (last {last!r})\n{self.logs()}")
            yield deferLater(reactor, 0.05, lambda: None)
