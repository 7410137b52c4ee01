"""The admin port over loopback: /metrics after real traffic, /status, the bearer token, trace ids."""

from __future__ import annotations

import json
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from websockets.sync.client import connect

from bench.backend import make_site
from tests.harness import TOKEN, Stack, wait_for
from tunneld.config import parse_server_config

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}`` in a Prometheus text exposition (KeyError if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise KeyError(f"no sample {name}{labels}")


def has_metric(text: str, name: str) -> bool:
    return any(s.name == name for f in text_string_to_metric_families(text) for s in f.samples)


class AdminTestCase(TestCase):
    """A Stack whose server (and clients) listen on an admin port; the demo backend behind route 'web'."""

    timeout = 60
    server_settings: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.backend = reactor.listenTCP(0, make_site(), interface="127.0.0.1")
        origin = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack(
            [{"name": "web", "group": "default", "backend": origin, "host": "app.test"},
             {"name": "lonely", "group": "other", "backend": origin, "host": "lonely.test"}],
            groups=[{"name": "default", "tokens": [TOKEN]}, {"name": "other", "tokens": ["other-token"]}],
            server={"admin_listen": "127.0.0.1:0", **self.server_settings},
        )
        yield self.stack.start()

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.stack.stop()
        yield self.backend.stopListening()

    def admin_url(self, app: Any, path: str) -> bytes:
        return f"http://127.0.0.1:{app.admin.port.getHost().port}{path}".encode()

    @inlineCallbacks
    def admin_get(self, app: Any, path: str, token: str | None = None) -> Any:
        headers = {b"Authorization": [f"Bearer {token}".encode()]} if token is not None else {}
        resp = yield treq.get(self.admin_url(app, path), headers=headers, persistent=False)
        body = yield treq.content(resp)
        return resp, body

    @inlineCallbacks
    def scrape(self, app: Any, token: str | None = None) -> Any:
        resp, body = yield self.admin_get(app, "/metrics", token)
        self.assertEqual(resp.code, 200, body)
        return body.decode()

    @inlineCallbacks
    def status(self, app: Any, token: str | None = None) -> Any:
        resp, body = yield self.admin_get(app, "/status", token)
        self.assertEqual(resp.code, 200, body)
        self.assertEqual(resp.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return json.loads(body)

    @inlineCallbacks
    def request(self, method: str, host: str, path: str, **kwargs: Any) -> Any:
        headers = {b"Host": [host.encode()], **kwargs.pop("headers", {})}
        resp = yield treq.request(method, self.stack.url(path), headers=headers, persistent=False, **kwargs)
        body = yield treq.content(resp)
        return resp.code, body


class MetricsTests(AdminTestCase):
    @inlineCallbacks
    def test_counters_move_by_the_traffic_sent(self) -> Any:
        """Requests, status classes, body bytes and durations on /metrics match the traffic sent, on both ends."""
        client = yield self.stack.add_client(admin_listen="127.0.0.1:0")
        server = self.stack.server
        out = 0
        for _ in range(3):
            code, body = yield self.request("GET", "app.test", "/bytes/5")
            self.assertEqual((code, len(body)), (200, 5))
            out += len(body)
        code, body = yield self.request("POST", "app.test", "/upload", data=b"u" * 1000)
        self.assertEqual(code, 200)
        out += len(body)
        code, body = yield self.request("GET", "app.test", "/status/503")
        self.assertEqual(code, 503)
        code, _ = yield self.request("GET", "nowhere.test", "/")
        self.assertEqual(code, 404)
        code, _ = yield self.request("GET", "lonely.test", "/")
        self.assertEqual(code, 502)
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

        text = yield self.scrape(server)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="web", code_class="2xx"), 4)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="web", code_class="5xx"), 1)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="-", code_class="4xx"), 1)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="lonely", code_class="5xx"), 1)
        self.assertEqual(metric(text, "tunneld_request_bytes_total", protocol="http", direction="in"), 1000)
        self.assertEqual(metric(text, "tunneld_request_bytes_total", protocol="http", direction="out"), out)
        self.assertEqual(metric(text, "tunneld_request_duration_seconds_count", protocol="http", route="web"), 5)
        self.assertEqual(metric(text, "tunneld_request_duration_seconds_bucket", protocol="http", route="web",
                                le="+Inf"), 5)
        self.assertEqual(metric(text, "tunneld_clients_connected", group="default"), 1)
        self.assertEqual(metric(text, "tunneld_clients_connected", group="other"), 0)
        self.assertEqual(metric(text, "tunneld_streams_connected", group="default"), 1)
        self.assertEqual(metric(text, "tunneld_requests_in_flight", group="default"), 0)
        self.assertEqual(metric(text, "tunneld_streams_opened_total"), 1)
        self.assertEqual(metric(text, "tunneld_tunnel_messages_dropped_total"), 0)
        self.assertEqual(metric(text, "tunneld_protocol_violations_total"), 0)
        self.assertGreaterEqual(metric(text, "tunneld_flow_control_stalls_total"), 0)
        self.assertEqual(metric(text, "tunneld_draining"), 0)
        self.assertEqual(metric(text, "tunneld_build_info", version="0.1.0", role="server"), 1)
        self.assertFalse(has_metric(text, "tunneld_requests_created"))

        # The client counts what it served: the four answered plus the backend's 503.
        yield wait_for(lambda: sum(client.hub.metrics.tally.values()) == 5, what="client-side records")
        text = yield self.scrape(client)
        server = f"127.0.0.1:{self.stack.tunnel_port}"
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="web", code_class="2xx",
                                server=server), 4)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="web", code_class="5xx",
                                server=server), 1)
        self.assertEqual(metric(text, "tunneld_client_connected", server=server), 1)
        self.assertEqual(metric(text, "tunneld_client_reconnects_total", server=server), 0)
        self.assertEqual(metric(text, "tunneld_client_routes", server=server), 1)
        self.assertEqual(metric(text, "tunneld_requests_in_flight", server=server), 0)
        self.assertEqual(metric(text, "tunneld_build_info", version="0.1.0", role="client"), 1)

    @inlineCallbacks
    def test_heartbeat_rtt_per_group(self) -> Any:
        """Once a heartbeat came back, the server exports the group's slowest round trip (no per-client series)."""
        client = yield self.stack.add_client(admin_listen="127.0.0.1:0")
        server = self.stack.server
        yield wait_for(lambda: all(e.rtt is not None for e in server.hub.registry.streams()) and
                       client.hub.links[0].rtt is not None, what="heartbeat round trips")
        text = yield self.scrape(server)
        rtt = metric(text, "tunneld_heartbeat_rtt_seconds", group="default")
        self.assertNotIn("client_id=", text)
        self.assertTrue(0 <= rtt < 5, rtt)
        text = yield self.scrape(client)
        server = f"127.0.0.1:{self.stack.tunnel_port}"
        self.assertTrue(0 <= metric(text, "tunneld_heartbeat_rtt_seconds", server=server) < 5)

    @inlineCallbacks
    def test_reconnect_counted(self) -> Any:
        """A lost stream shows as one reconnect on the client and a second opened stream on the server."""
        client = yield self.stack.add_client(admin_listen="127.0.0.1:0")
        first = client.hub.links[0].handle
        first.abort("test: cut the stream")
        yield wait_for(lambda: client.hub.links[0].handle is not first and client.hub.is_connected
                       and self.stack._registered(client), what="the client to reconnect")
        text = yield self.scrape(client)
        server = f"127.0.0.1:{self.stack.tunnel_port}"
        self.assertEqual(metric(text, "tunneld_client_reconnects_total", server=server), 1)
        self.assertEqual(metric(text, "tunneld_client_connected", server=server), 1)
        yield wait_for(lambda: len(self.stack.server.hub.registry) == 1, what="the old stream to go")
        text = yield self.scrape(self.stack.server)
        self.assertEqual(metric(text, "tunneld_streams_opened_total"), 2)
        self.assertEqual(metric(text, "tunneld_streams_connected", group="default"), 1)

    @inlineCallbacks
    def test_websocket_counted_and_logged(self) -> Any:
        """A WebSocket through the tunnel is one request: protocol websocket, 101, message bytes, an access line."""
        from autobahn.twisted.resource import WebSocketResource
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
        from twisted.web import server as web

        class Echo(WebSocketServerProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                self.sendMessage(b"echo:" + payload, isBinary)

        factory = WebSocketServerFactory()
        factory.protocol = Echo
        ws_backend = reactor.listenTCP(0, web.Site(WebSocketResource(factory)), interface="127.0.0.1")
        self.addCleanup(ws_backend.stopListening)
        yield self.stack.stop()
        self.stack = Stack([{"name": "chat", "group": "default", "backend": f"http://127.0.0.1:{ws_backend.getHost().port}"}],
                           server={"admin_listen": "127.0.0.1:0"})
        yield self.stack.start()
        yield self.stack.add_client()
        lines = capture_access_lines(self)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="ws-client")
        pool.start()
        self.addCleanup(pool.stop)

        def talk() -> str:
            with connect(f"ws://127.0.0.1:{self.stack.http_port}/chat", additional_headers={"X-Request-Id": "ws-42"}) as ws:
                ws.send("hello")
                return str(ws.recv(timeout=10))

        from twisted.internet.threads import deferToThreadPool
        answer = yield deferToThreadPool(reactor, pool, talk)
        self.assertEqual(answer, "echo:hello")
        metrics = self.stack.server.hub.metrics
        yield wait_for(lambda: metrics.tally.get(("websocket", "chat", "1xx")) == 1, what="the WebSocket record")
        text = yield self.scrape(self.stack.server)
        self.assertEqual(metric(text, "tunneld_request_bytes_total", protocol="websocket", direction="in"), 5)
        self.assertEqual(metric(text, "tunneld_request_bytes_total", protocol="websocket", direction="out"), 10)
        [line] = [e for e in lines if e.get("protocol") == "websocket"]
        self.assertEqual((line["status"], line["route"], line["trace_id"], line["path"]), (101, "chat", "ws-42", "/chat"))
        yield wait_for(lambda: not any("_notify_bucket" in repr(c) for c in reactor.getDelayedCalls()),
                       what="autobahn timers to expire")


def capture_access_lines(case: TestCase) -> list[dict[str, Any]]:
    """Collect the server's access-log events (one per finished request) for the rest of the test."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "route" in event and "duration" in event and "request_id" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class StatusTests(AdminTestCase):
    @inlineCallbacks
    def test_status_lists_clients_groups_and_routes(self) -> Any:
        """/status names each connected client with its group, address, version and load; routes show their clients."""
        a = yield self.stack.add_client(client_id="alpha", admin_listen="127.0.0.1:0")
        b = yield self.stack.add_client(client_id="beta", group="other", token="other-token")
        code, _ = yield self.request("GET", "app.test", "/status/500")
        self.assertEqual(code, 500)
        doc = yield self.status(self.stack.server)
        self.assertEqual(doc["role"], "server")
        clients = {c["client_id"]: c for c in doc["clients"]}
        self.assertEqual(set(clients), {"alpha", "beta"})
        self.assertEqual((clients["alpha"]["group"], clients["beta"]["group"]), ("default", "other"))
        for c in clients.values():
            self.assertEqual(c["version"], "0.1.0")
            self.assertTrue(c["address"])
            self.assertEqual(c["in_flight"], 0)
            self.assertTrue(c["healthy"])
            self.assertLessEqual(c["connected_at"], doc["now"])
        groups = {g["name"]: g for g in doc["groups"]}
        self.assertEqual((groups["default"]["clients"], groups["default"]["routes"]), (1, ["web"]))
        self.assertEqual((groups["other"]["clients"], groups["other"]["routes"]), (1, ["lonely"]))
        routes = {r["name"]: r for r in doc["routes"]}
        self.assertEqual(routes["web"]["clients"], ["alpha"])
        self.assertEqual(routes["web"]["requests"], {"5xx": 1})
        self.assertEqual(routes["lonely"]["clients"], ["beta"])
        self.assertEqual((doc["totals"]["clients"], doc["totals"]["requests"], doc["totals"]["errors"]), (2, 1, 1))
        [failure] = doc["recent_errors"]
        self.assertEqual((failure["route"], failure["status"], failure["path"]), ("web", 500, "/status/500"))
        self.assertTrue(failure["request_id"])
        self.assertEqual(doc["counters"]["streams_opened"], 2)

        doc = yield self.status(a)
        self.assertEqual(doc["role"], "client")
        self.assertEqual((doc["client_id"], doc["group"], doc["connected"]), ("alpha", "default", True))
        self.assertEqual(doc["server"], f"127.0.0.1:{self.stack.tunnel_port}")
        self.assertEqual([r["name"] for r in doc["routes"]], ["web"])
        self.assertEqual((doc["reconnects"], doc["in_flight"]), (0, 0))
        self.assertIsNotNone(doc["connected_since"])
        self.assertIsNone(b.admin)

    @inlineCallbacks
    def test_dashboard_page_and_unknown_paths(self) -> Any:
        """/ is an HTML page whose script and style are package files of this origin (strict CSP, nothing
        inline, nothing external); unknown paths are 404 and other methods 405."""
        resp, body = yield self.admin_get(self.stack.server, "/")
        self.assertEqual(resp.code, 200)
        self.assertIn(b'<script src="dashboard.js">', body)
        self.assertNotIn(b"<script>", body)
        self.assertNotIn(b"<style>", body)
        self.assertNotIn(b"src=\"http", body)
        csp = resp.headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"default-src 'none'", csp)
        self.assertIn(b"connect-src 'self'", csp)
        self.assertIn(b"script-src 'self'", csp)
        for path, kind in (("/dashboard.js", b"text/javascript"), ("/dashboard.css", b"text/css")):
            resp, asset = yield self.admin_get(self.stack.server, path)
            self.assertEqual(resp.code, 200)
            self.assertTrue(resp.headers.getRawHeaders(b"content-type")[0].startswith(kind))
            self.assertGreater(len(asset), 1000)
        resp, _ = yield self.admin_get(self.stack.server, "/nope")
        self.assertEqual(resp.code, 404)
        resp = yield treq.post(self.admin_url(self.stack.server, "/status"), persistent=False)
        yield treq.content(resp)
        self.assertEqual(resp.code, 405)


class TokenTests(AdminTestCase):
    server_settings = {"admin_token": "s3cret"}

    @inlineCallbacks
    def test_token_required_on_server_and_client(self) -> Any:
        """With admin_token set, /metrics and /status answer 401 without the bearer token or with a wrong one."""
        client = yield self.stack.add_client(admin_listen="127.0.0.1:0", admin_token="c-token")
        for app, good in ((self.stack.server, "s3cret"), (client, "c-token")):
            for path in ("/metrics", "/status"):
                for bad in (None, "wrong", good + "x"):
                    resp, body = yield self.admin_get(app, path, bad)
                    self.assertEqual(resp.code, 401, (path, bad))
                    self.assertEqual(resp.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="tunneld admin"'])
                    self.assertNotIn(b"tunneld_", body)
                resp, body = yield self.admin_get(app, path, good)
                self.assertEqual(resp.code, 200, (path, body))
            # The page holds no data, so it loads without the token (its script sends it).
            resp, body = yield self.admin_get(app, "/")
            self.assertEqual(resp.code, 200)
            self.assertNotIn(good.encode(), body)

    @inlineCallbacks
    def test_token_follows_a_config_reload(self) -> Any:
        """After a reload with a new admin_token, the old one is refused and the new one accepted."""
        server = self.stack.server
        data = {"server": {"tunnel_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "grpc_listen": "",
                           "admin_listen": "127.0.0.1:0", "admin_token": "rotated"},
                "groups": [{"name": "default", "tokens": [TOKEN]}]}
        server.hub.reload(parse_server_config(data, "reloaded.toml"))
        resp, _ = yield self.admin_get(server, "/status", "s3cret")
        self.assertEqual(resp.code, 401)
        resp, _ = yield self.admin_get(server, "/status", "rotated")
        self.assertEqual(resp.code, 200)


class TraceIdTests(AdminTestCase):
    @inlineCallbacks
    def test_traceparent_and_request_id_reach_backend_and_logs(self) -> Any:
        """A traceparent's trace-id (else X-Request-Id) is the request's trace_id; the header reaches the backend."""
        client = yield self.stack.add_client(access_log=True)
        lines = capture_access_lines(self)
        code, body = yield self.request("GET", "app.test", "/echo", headers={b"traceparent": [TRACEPARENT.encode()]})
        self.assertEqual(code, 200)
        seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
        self.assertEqual(seen["traceparent"], TRACEPARENT)
        code, body = yield self.request("GET", "app.test", "/echo", headers={b"X-Request-Id": [b"req-123"]})
        seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
        self.assertEqual(seen["x-request-id"], "req-123")
        yield wait_for(lambda: len(lines) == 4, what="server and client access lines")
        trace = TRACEPARENT.split("-")[1]
        self.assertEqual(sorted(e["trace_id"] for e in lines), sorted([trace, trace, "req-123", "req-123"]))
        # Each request's server line and client line share its request_id.
        by_trace: dict[str, set[str]] = {}
        for e in lines:
            by_trace.setdefault(e["trace_id"], set()).add(e["request_id"])
        self.assertEqual([len(ids) for ids in by_trace.values()], [1, 1])
        self.assertTrue(client.hub.is_connected)


class GrpcMetricsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_grpc_calls_counted_by_status_name(self) -> Any:
        """gRPC calls through the tunnel are counted with their status name as code_class."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from twisted.internet.threads import deferToThread

        from tests.grpc_services import GrpcBackend

        backend = GrpcBackend(workers=2)
        self.addCleanup(backend.stop)
        stack = Stack([{"name": "health", "group": "default", "grpc_service": "grpc.health.v1.Health",
                        "backend": backend.url}], server={"grpc_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"})
        yield stack.start()
        self.addCleanup(stack.stop)
        yield stack.add_client()
        channel = grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}")
        self.addCleanup(deferToThread, channel.close)
        stub = health_pb2_grpc.HealthStub(channel)
        reply = yield deferToThread(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=10)
        self.assertEqual(reply.status, health_pb2.HealthCheckResponse.SERVING)
        try:
            yield deferToThread(stub.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.NOT_FOUND)
        metrics = stack.server.hub.metrics
        yield wait_for(lambda: sum(metrics.tally.values()) == 2, what="two gRPC records")
        port = stack.server.admin.port.getHost().port
        resp = yield treq.get(f"http://127.0.0.1:{port}/metrics".encode(), persistent=False)
        text = (yield treq.content(resp)).decode()
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="grpc", route="health", code_class="OK"), 1)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="grpc", route="health",
                                code_class="NOT_FOUND"), 1)
        self.assertEqual(metric(text, "tunneld_request_duration_seconds_count", protocol="grpc", route="health"), 2)


class ClientDrainTests(TestCase):
    """The client's admin port outlives its drain."""

    timeout = 60

    @inlineCallbacks
    def test_admin_port_up_until_the_drain_is_done(self) -> Any:
        """While a stopping client waits for an in-flight request, its /status still answers; then the port closes."""
        from tests.backends import test_site

        site, held, _ = test_site()
        backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        self.addCleanup(held.release)
        stack = Stack([{"name": "web", "group": "default", "backend": f"http://127.0.0.1:{backend.getHost().port}"}])
        yield stack.start()
        self.addCleanup(stack.stop)
        client = yield stack.add_client(admin_listen="127.0.0.1:0", drain_timeout=20)
        pending = treq.get(stack.url("/held"), persistent=False)
        yield wait_for(lambda: len(held.requests) == 1, what="a request held at the backend")
        stack.clients.remove(client)
        stopped = client.service.stopService()
        url = f"http://127.0.0.1:{client.admin.port.getHost().port}/status".encode()
        resp = yield treq.get(url, persistent=False)
        yield treq.content(resp)
        self.assertEqual(resp.code, 200)
        self.assertFalse(stopped.called)
        held.release()
        resp = yield pending
        yield treq.content(resp)
        yield stopped
        failed = []
        yield treq.get(url, persistent=False, timeout=5).addErrback(failed.append)
        self.assertEqual(len(failed), 1)
