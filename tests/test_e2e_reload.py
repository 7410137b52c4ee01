"""Live config: SIGHUP reloads the server's file; routes reach clients at once; revoked tokens disconnect."""

from __future__ import annotations

import os
import signal
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.backends import test_site
from tests.harness import TOKEN, Stack, wait_for
from tunneld.server_tap import ReloadOnHangup

CONFIG = """
[server]
tunnel_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
grpc_listen = ""
admin_listen = ""
[[groups]]
name = "default"
tokens = [{tokens}]
[[routes]]
name = "{name}"
group = "default"
path_prefix = "{prefix}"
backend = "{backend}"
"""


class ReloadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        site, _, _ = test_site()
        self.backend_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.backend = f"http://127.0.0.1:{self.backend_port.getHost().port}"
        self.stack = Stack([{"name": "old", "group": "default", "backend": self.backend, "path_prefix": "/echo"}])
        yield self.stack.start()
        self.client = yield self.stack.add_client()
        assert self.stack.server is not None
        self.hub = self.stack.server.hub
        self.path = os.path.abspath(self.mktemp())
        self.reloader = ReloadOnHangup(self.path, self.hub, reactor)
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.pool = HTTPConnectionPool(reactor)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.errors: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.error and "error" in event:
                self.errors.append(str(event["error"]))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.stack.stop()
        yield self.backend_port.stopListening()

    def write(self, *, name: str = "new", prefix: str = "/small", tokens: str = f'"{TOKEN}"') -> None:
        with open(self.path, "w") as f:
            f.write(CONFIG.format(name=name, prefix=prefix, backend=self.backend, tokens=tokens))

    @inlineCallbacks
    def status(self, path: str) -> Any:
        resp = yield self.http.get(self.stack.url(path))
        yield treq.content(resp)
        return resp.code

    @inlineCallbacks
    def test_sighup_pushes_new_routes_to_connected_clients(self) -> Any:
        """After SIGHUP the new route serves at once and the removed one answers 404."""
        self.assertEqual((yield self.status("/echo")), 200)
        self.write()
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_for(lambda: "new" in self.client.hub.links[0].routes, what="routes pushed to the client")
        self.assertNotIn("old", self.client.hub.links[0].routes)
        self.assertEqual((yield self.status("/small")), 200)
        self.assertEqual((yield self.status("/echo")), 404)

    @inlineCallbacks
    def test_broken_file_is_refused_and_old_config_stays(self) -> Any:
        """A reload of a broken file is refused with the check error; traffic keeps the old routes."""
        with open(self.path, "w") as f:
            f.write("[server]\nhttp_listen = 8080\n")
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_for(lambda: bool(self.errors), what="the refusal logged")
        self.assertIn("http_listen", self.errors[0])
        self.assertIn(self.path, self.errors[0])
        self.assertEqual(self.hub.config.routes[0].name, "old")
        self.assertEqual((yield self.status("/echo")), 200)

    @inlineCallbacks
    def test_removed_token_disconnects_its_clients(self) -> Any:
        """A token removed from the group disconnects the clients that used it; they cannot come back."""
        self.write(name="old", prefix="/echo", tokens='"another-token"')
        self.reloader.reload()
        yield wait_for(lambda: len(self.hub.registry) == 0 and not self.client.hub.is_connected,
                       what="client disconnected")
        attempts = self.client.dial.attempts
        yield wait_for(lambda: self.client.dial.attempts > attempts, what="a refused redial")
        self.assertEqual(len(self.hub.registry), 0)
        self.assertEqual((yield self.status("/echo")), 502)
