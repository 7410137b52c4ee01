"""The real ``twistd -n tunneld-server`` and ``twistd -n tunneld-client`` commands carry a request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tests.harness import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello from the backend\n"


class TwistdCommandTests(TestCase):
    timeout = 60

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(os.path.abspath(self.mktemp()), "wb")
        self.addCleanup(log.close)
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        self.logs.append(log.name)

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(stop)
        return proc

    @inlineCallbacks
    def test_twistd_server_and_client_carry_a_request(self) -> Any:
        """A GET through real twistd processes reaches the backend; SIGTERM stops both cleanly."""
        self.logs: list[str] = []
        backend = reactor.listenTCP(0, server.Site(Hello()), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        tunnel_port, http_port = free_port(), free_port()
        server_toml = os.path.abspath(self.mktemp())
        with open(server_toml, "w") as f:
            f.write(f'''
[server]
tunnel_listen = "127.0.0.1:{tunnel_port}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = ""
admin_listen = ""
drain_timeout = 2
[[groups]]
name = "default"
tokens = ["twistd-test"]
[[routes]]
name = "web"
group = "default"
backend = "http://127.0.0.1:{backend.getHost().port}"
''')
        client_toml = os.path.abspath(self.mktemp())
        with open(client_toml, "w") as f:
            f.write(f'''
[client]
server = "127.0.0.1:{tunnel_port}"
token = "twistd-test"
drain_timeout = 2
''')
        srv = self.spawn("tunneld-server", "-c", server_toml)
        cli = self.spawn("tunneld-client", "-c", client_toml)
        url = f"http://127.0.0.1:{http_port}/hi".encode()
        answers: list[int] = []

        @inlineCallbacks
        def attempt() -> Any:
            try:
                resp = yield treq.get(url, persistent=False)
                yield treq.content(resp)
                answers.append(resp.code)
            except Exception:
                answers.append(0)

        for _ in range(300):
            yield attempt()
            if answers[-1] == 200:
                break
            self.assertIsNone(srv.poll(), open(self.logs[0]).read())
            self.assertIsNone(cli.poll(), open(self.logs[1]).read())
            from twisted.internet.task import deferLater
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(answers[-1], 200, open(self.logs[0]).read() + open(self.logs[1]).read())
        resp = yield treq.get(url, persistent=False)
        self.assertEqual((yield treq.content(resp)), b"hello from the backend\n")
        for proc in (cli, srv):
            proc.send_signal(signal.SIGTERM)
        yield wait_for(lambda: cli.poll() is not None and srv.poll() is not None, timeout=20, what="twistd exit")
        # twistd re-raises the terminating signal on exit once it shut down cleanly.
        self.assertIn(cli.returncode, (0, -signal.SIGTERM))
        self.assertIn(srv.returncode, (0, -signal.SIGTERM))
        client_log, server_log = open(self.logs[1]).read(), open(self.logs[0]).read()
        self.assertIn("connected to", client_log)
        self.assertIn("Server Shut Down.", client_log)
        self.assertIn("Server Shut Down.", server_log)
        self.assertNotIn("Traceback", client_log + server_log)
