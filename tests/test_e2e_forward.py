"""Forward direction over loopback: client http_entry -> tunnel -> server -> upstream."""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.backends import test_site
from tests.harness import Stack, wait_for
from tests.test_e2e_http import PatternProducer


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class ForwardTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.sites = []
        self.ports = []
        for _ in range(2):
            site, held, never = test_site()
            site.requests_served = 0  # type: ignore[attr-defined]
            original = site.resource.getChild

            def counting(path: bytes, request: Any, original: Any = original, site: Any = site) -> Any:
                site.requests_served += 1
                return original(path, request)

            site.resource.getChild = counting  # type: ignore[method-assign]
            self.sites.append((site, held, never))
            self.ports.append(reactor.listenTCP(0, site, interface="127.0.0.1"))
        a, b = (f"http://127.0.0.1:{p.getHost().port}" for p in self.ports)
        dead = f"http://127.0.0.1:{dead_port()}"
        self.stack = Stack(
            [{"name": "unused", "group": "default", "backend": a}],
            upstreams=[{"name": "api", "backends": [a, b]},
                       {"name": "flaky", "backends": [dead, a], "cooldown": 30},
                       {"name": "gone", "backends": [dead]}],
            forward=[{"name": "api", "host": "api.internal", "upstream": "api"},
                     {"name": "flaky", "host": "flaky.internal", "upstream": "flaky"},
                     {"name": "gone", "host": "gone.internal", "upstream": "gone"},
                     {"name": "slow", "host": "api.internal", "path_prefix": "/never", "upstream": "api",
                      "timeout": 0.5},
                     {"name": "renamed", "host": "renamed.internal", "upstream": "api",
                      "set_host": "backend.example"}],
        )
        yield self.stack.start()
        self.client = yield self.stack.add_client(http_entry="127.0.0.1:0")
        self.entry = yield self.stack.entry_port(self.client)
        self.pool = HTTPConnectionPool(reactor)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.stack.stop()
        for port in self.ports:
            yield port.stopListening()

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.entry}{path}".encode()

    @inlineCallbacks
    def get(self, host: str, path: str = "/echo") -> Any:
        resp = yield self.http.get(self.url(path), headers={"Host": host})
        body = yield treq.content(resp)
        return resp.code, body

    @inlineCallbacks
    def assertReleased(self) -> Any:
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

    @inlineCallbacks
    def test_request_reaches_upstream_with_forwarded_headers(self) -> Any:
        """A request to the client's entry reaches the upstream with its path and X-Forwarded-For."""
        code, body = yield self.get("api.internal", "/echo?q=1")
        self.assertEqual(code, 200)
        echo = json.loads(body)
        self.assertEqual((echo["method"], echo["path"]), ("GET", "/echo"))
        headers = {k.lower(): v for k, v in echo["headers"]}
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(headers["host"], "api.internal")
        yield self.assertReleased()

    @inlineCallbacks
    def test_upload_streams_to_upstream(self) -> Any:
        """A 4 MiB upload through the forward direction arrives whole."""
        producer = PatternProducer(4 * 1024 * 1024)
        resp = yield self.http.put(self.url("/upload"), data=producer, headers={"Host": "api.internal"})
        body = json.loads((yield treq.content(resp)))
        self.assertEqual((body["bytes"], body["sha256"]), (producer.length, producer.sha.hexdigest()))
        yield self.assertReleased()

    @inlineCallbacks
    def test_round_robin_over_backends(self) -> Any:
        """Requests alternate between the upstream's backends."""
        seen = []
        for _ in range(4):
            resp = yield self.http.get(self.url("/echo"), headers={"Host": "api.internal"})
            yield treq.content(resp)
            seen.append(resp.code)
        self.assertEqual(seen, [200] * 4)
        counts = [site.requests_served for site, _, _ in self.sites]  # type: ignore[attr-defined]
        self.assertEqual(counts, [2, 2])
        yield self.assertReleased()

    @inlineCallbacks
    def test_refusing_backend_is_skipped_and_cooled_down(self) -> Any:
        """A backend that refuses is retried on the next one at once, then left out for its cool-down."""
        codes = []
        for _ in range(4):
            code, _ = yield self.get("flaky.internal")
            codes.append(code)
        self.assertEqual(codes, [200] * 4)
        assert self.stack.server is not None
        pool = self.stack.server.hub.upstreams["flaky"]
        self.assertEqual(len(pool.healthy(reactor.seconds())), 1)
        yield self.assertReleased()

    @inlineCallbacks
    def test_all_backends_down_is_502(self) -> Any:
        """An upstream whose only backend refuses answers 502."""
        code, body = yield self.get("gone.internal")
        self.assertEqual(code, 502)
        self.assertIn(b"unreachable", body)
        code, body = yield self.get("gone.internal")
        self.assertEqual(code, 502)
        self.assertIn(b"down", body)
        yield self.assertReleased()

    @inlineCallbacks
    def test_no_forward_rule_is_404(self) -> Any:
        """A host no forward rule matches gets 404 naming it."""
        code, body = yield self.get("nowhere.internal", "/x")
        self.assertEqual(code, 404)
        self.assertIn(b"nowhere.internal", body)
        yield self.assertReleased()

    @inlineCallbacks
    def test_rule_timeout_is_504(self) -> Any:
        """An upstream that never answers gets 504 at the rule's timeout; its state is released."""
        code, _ = yield self.get("api.internal", "/never/x")
        self.assertEqual(code, 504)
        yield wait_for(lambda: sum(n.disconnected for _, _, n in self.sites) == 1, what="upstream request aborted")
        yield self.assertReleased()

    @inlineCallbacks
    def test_set_host_rewrites_host(self) -> Any:
        """A rule's set_host replaces the Host header sent upstream."""
        code, body = yield self.get("renamed.internal")
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        self.assertEqual(headers["host"], "backend.example")

    @inlineCallbacks
    def test_disconnected_client_entry_answers_502_at_once(self) -> Any:
        """While the client has no tunnel, its entry answers 502 immediately."""
        assert self.stack.server is not None
        self.stack.server.service.stopService()
        yield wait_for(lambda: not self.client.hub.is_connected, what="client disconnected")
        code, body = yield self.get("api.internal")
        self.assertEqual(code, 502)
        self.assertIn(b"not connected", body)
        self.stack.server = None
