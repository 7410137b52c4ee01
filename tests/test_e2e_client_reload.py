"""The client's SIGHUP reload over real sockets: allow_backends at once, servers added and removed live."""

from __future__ import annotations

import os
import signal
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.backends import test_site
from tests.harness import TOKEN, Stack, wait_for
from tunneld.client_tap import ReloadOnHangup


class ClientReloadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        site, _, _ = test_site()
        self.backend_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.backend_port.stopListening)
        self.backend = f"127.0.0.1:{self.backend_port.getHost().port}"
        routes = [{"name": "web", "group": "default", "backend": f"http://{self.backend}", "path_prefix": "/echo"}]
        self.one, self.two = Stack(routes), Stack(routes)
        yield self.one.start()
        yield self.two.start()
        self.addCleanup(self.two.stop)
        self.addCleanup(self.one.stop)   # cleanups run last-in first: the clients stop first
        self.client = yield self.one.add_client(client_id="reloader", allow_backends=["127.0.0.1:1"])
        self.path = os.path.abspath(self.mktemp())
        self.reloader = ReloadOnHangup(self.path, self.client.hub, reactor)
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    def write(self, servers: list[Stack], allow: str) -> None:
        listed = ", ".join(f'"127.0.0.1:{s.tunnel_port}"' for s in servers)
        with open(self.path, "w") as f:
            f.write(f'[client]\nserver = [{listed}]\ntoken = "{TOKEN}"\nclient_id = "reloader"\n'
                    f'heartbeat_interval = 1\nheartbeat_timeout = 5\nallow_backends = ["{allow}"]\n')

    @inlineCallbacks
    def status(self, stack: Stack) -> Any:
        resp = yield self.http.get(stack.url("/echo"))
        yield treq.content(resp)
        return resp.code

    def registered(self, stack: Stack) -> bool:
        assert stack.server is not None
        return any(e.client_id == "reloader" for e in stack.server.hub.registry.streams())

    @inlineCallbacks
    def test_sighup_applies_allow_backends_and_adds_then_removes_a_server(self) -> Any:
        """SIGHUP: a backend allowed in the file is served at once; a server added is dialled, a removed one left."""
        self.assertEqual((yield self.status(self.one)), 502)
        self.write([self.one, self.two], self.backend)
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_for(lambda: self.registered(self.two), what="the added server to see the client")
        self.assertEqual((yield self.status(self.one)), 200)
        self.assertEqual((yield self.status(self.two)), 200)
        self.assertEqual([link.server for link in self.client.hub.links],
                         [f"127.0.0.1:{self.one.tunnel_port}", f"127.0.0.1:{self.two.tunnel_port}"])

        self.write([self.two], self.backend)
        self.reloader.reload()
        yield wait_for(lambda: not self.registered(self.one) and not self.client.hub.leaving,
                       what="the removed server's stream to close")
        self.assertEqual((yield self.status(self.one)), 502)
        self.assertEqual((yield self.status(self.two)), 200)
        self.assertFalse(self.client.hub.draining)
