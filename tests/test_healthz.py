"""GET /healthz on the server's admin port (SPEC §7.1): starting -> ok -> draining, drain_delay.

Real services on loopback in the test process (``tests.harness.Stack``);
every wait is a bounded poll.
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import Stack, wait_for
from bench.backend import make_site
from tests.test_hubs import server_config
from tunneld.server_hub import ServerHub
from twisted.internet.task import Clock


class HealthUnitTests(SynchronousTestCase):
    def test_starting_until_ready_timeout(self) -> None:
        """Without clients /healthz is "starting" until ready_timeout has passed, then "ok" for good."""
        clock = Clock()
        hub = ServerHub(server_config(ready_timeout=10), clock)
        self.assertEqual(hub.health(), (503, "starting"))
        clock.advance(9.9)
        self.assertEqual(hub.health(), (503, "starting"))
        clock.advance(0.1)
        self.assertEqual(hub.health(), (200, "ok"))
        hub.stopping = True
        self.assertEqual(hub.health(), (503, "draining"))

    def test_ready_timeout_zero(self) -> None:
        """ready_timeout = 0: ready at once."""
        self.assertEqual(ServerHub(server_config(ready_timeout=0), Clock()).health(), (200, "ok"))

    def test_drain_means_draining(self) -> None:
        """hub.drain() (the tunnel service's stop) makes /healthz "draining"."""
        hub = ServerHub(server_config(ready_timeout=0), Clock())
        hub.drain(0)
        self.assertEqual(hub.health(), (503, "draining"))


class HealthzTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def start(self, **server: Any) -> Any:
        self.backend = reactor.listenTCP(0, make_site(), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        origin = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack([{"name": "web", "group": "default", "backend": origin}],
                           server={"admin_listen": "127.0.0.1:0", **server})
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        assert self.stack.server is not None and self.stack.server.admin is not None
        self.admin_port = self.stack.server.admin.port.getHost().port

    @inlineCallbacks
    def healthz(self) -> Any:
        resp = yield treq.get(f"http://127.0.0.1:{self.admin_port}/healthz", persistent=False)
        body = yield treq.content(resp)
        return resp.code, body

    @inlineCallbacks
    def test_starting_until_the_client_connects(self) -> Any:
        """503 starting while the group with routes has no client, 200 ok once it has one; no token asked."""
        yield self.start(ready_timeout=30, admin_token="secret")
        got = yield self.healthz()
        self.assertEqual(got, (503, b"starting\n"))
        yield self.stack.add_client()
        got = yield self.healthz()
        self.assertEqual(got, (200, b"ok\n"))

    @inlineCallbacks
    def test_drain_delay_keeps_serving_with_503(self) -> Any:
        """After stop (SIGTERM) /healthz says draining while the entry still serves for drain_delay."""
        yield self.start(ready_timeout=30, drain_delay=1.5)
        yield self.stack.add_client()
        server = self.stack.server
        assert server is not None
        stopped = server.service.stopService()
        got = yield self.healthz()
        self.assertEqual(got, (503, b"draining\n"))
        resp = yield treq.get(self.stack.url("/bytes/3"), persistent=False)
        body = yield treq.content(resp)
        self.assertEqual((resp.code, len(body)), (200, 3))
        self.assertFalse(server.hub.draining)
        yield wait_for(lambda: server.hub.draining, what="the drain after drain_delay")
        yield stopped
        self.stack.server = None
        for app in list(self.stack.clients):
            yield self.stack.stop_client(app)


class ProxyProtocolTests(TestCase):
    """proxy_protocol = true on http_listen (in-process; the real-HAProxy test is in test_haproxy)."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.backend = reactor.listenTCP(0, make_site(), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        origin = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack([{"name": "web", "group": "default", "backend": origin}],
                           server={"proxy_protocol": True})
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        yield self.stack.add_client()

    def raw(self, data: bytes) -> Any:
        """Send ``data`` on a fresh connection (in a thread) and return all bytes until the server closes."""
        import socket

        from twisted.internet.threads import deferToThread

        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", self.stack.http_port), timeout=10) as sock:
                sock.sendall(data)
                chunks = []
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)

        return deferToThread(run)

    @inlineCallbacks
    def test_v1_header_address_in_x_forwarded_for(self) -> Any:
        """The address a PROXY v1 header carries is the client's: it reaches the backend in X-Forwarded-For."""
        got = yield self.raw(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 8080\r\n"
                             b"GET /echo HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        import json
        headers = dict((n.lower(), v) for n, v in json.loads(body.split(b"\r\n", 1)[-1] if b"{" not in body[:1]
                                                          else body)["headers"])
        self.assertEqual(headers["x-forwarded-for"], "198.51.100.7")

    @inlineCallbacks
    def test_no_header_closed(self) -> Any:
        """A connection that starts without a PROXY header is closed without an answer."""
        got = yield self.raw(b"GET /echo HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        self.assertEqual(got, b"")
