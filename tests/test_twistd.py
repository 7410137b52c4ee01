"""The real ``twistd -n tunneld-server`` and ``twistd -n tunneld-client`` commands carry a request."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tests.harness import wait_for
from tests.processes import ProcessStack


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello from the backend\n"


class TwistdCommandTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_twistd_server_and_client_carry_a_request(self) -> Any:
        """A GET through real twistd processes reaches the backend; SIGTERM stops both cleanly."""
        backend = reactor.listenTCP(0, server.Site(Hello()), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        stack = ProcessStack(self, [{"name": "web", "backend": f"http://127.0.0.1:{backend.getHost().port}"}],
                             server={"drain_timeout": 2, "heartbeat_interval": 10, "cleanup_interval": 30})
        srv = stack.start_server()
        cli = stack.add_client(drain_timeout=2, heartbeat_interval=30)
        yield stack.wait_http("/hi", timeout=30)
        status, body = yield stack.get("/hi")
        self.assertEqual((status, body), (200, b"hello from the backend\n"))
        for proc in (cli, srv):
            proc.signal(signal.SIGTERM)
        yield wait_for(lambda: not cli.running and not srv.running, timeout=20, what="twistd exit")
        # twistd re-raises the terminating signal on exit once it shut down cleanly.
        self.assertIn(cli.returncode, (0, -signal.SIGTERM))
        self.assertIn(srv.returncode, (0, -signal.SIGTERM))
        client_log, server_log = cli.log(), srv.log()
        self.assertIn("connected to", client_log)
        self.assertIn("Server Shut Down.", client_log)
        self.assertIn("Server Shut Down.", server_log)
        self.assertNotIn("Traceback", client_log + server_log)
