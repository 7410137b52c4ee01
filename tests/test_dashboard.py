"""The admin dashboard in a real browser: headless Chromium over the DevTools protocol.

Set TUNNELD_WRITE_SCREENSHOT=1 to rewrite docs/dashboard.png (the README's
picture) from this test's page.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.backends import test_site
from tests.cdp import Browser, DevTools
from tests.harness import TOKEN, Stack, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, "docs", "dashboard.png")
ADMIN_TOKEN = "dash-token"


class DashboardTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        site, self.held, _ = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        origin = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack(
            [{"name": "web", "group": "edge", "backend": origin, "host": "app.example.com"},
             {"name": "api", "group": "edge", "backend": origin, "host": "api.example.com"},
             {"name": "greeter", "group": "edge", "grpc_service": "helloworld.Greeter", "backend": "grpc://127.0.0.1:50051"},
             {"name": "reports", "group": "batch", "backend": origin, "path_prefix": "/reports"},
             {"name": "ops", "group": "edge", "backend": origin, "host": "ops.example.com", "allow_ips": ["10.0.0.0/8"]}],
            groups=[{"name": "edge", "tokens": [TOKEN]}, {"name": "batch", "tokens": ["batch-token"]}],
            server={"admin_listen": "127.0.0.1:0", "admin_token": ADMIN_TOKEN},
        )
        yield self.stack.start()
        self.pending: Any = None
        self.browser = Browser(self)

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.held.release()
        if self.pending is not None:
            yield self.pending   # it completes through the tunnel, so before the stack stops
        yield self.stack.stop()
        yield self.backend.stopListening()

    @inlineCallbacks
    def get(self, host: str, path: str) -> Any:
        resp = yield treq.get(self.stack.url(path), headers={b"Host": [host.encode()]}, persistent=False)
        yield treq.content(resp)
        return resp.code

    @inlineCallbacks
    def traffic(self) -> Any:
        """Some of everything: answers, a backend error, no route, no client, one request held in flight."""
        codes = []
        for host, path in (("app.example.com", "/"), ("app.example.com", "/bytes/100"), ("api.example.com", "/echo"),
                           ("api.example.com", "/echo"), ("app.example.com", "/status/500"),
                           ("other.example.com", "/"), ("reports.example.com", "/reports/daily"),
                           ("ops.example.com", "/")):
            codes.append((yield self.get(host, path)))
        self.assertEqual(codes, [200, 200, 200, 200, 500, 404, 502, 403])
        self.pending = treq.get(self.stack.url("/held"), headers={b"Host": [b"app.example.com"]}, persistent=False)
        self.pending.addCallback(treq.content)
        yield wait_for(lambda: len(self.held.requests) == 1, what="a request held at the backend")

    @inlineCallbacks
    def test_dashboard_shows_clients_routes_and_failures_live(self) -> Any:
        """The page loads without console errors, shows the client, its routes and failures, and updates live."""
        yield self.stack.add_client(group="edge", client_id="edge-1")
        yield self.traffic()
        from tests.test_e2e_knock import knock   # two refused tunnel opens for the "opens refused" tile

        self.assertEqual((yield deferToThread(knock, self.stack.tunnel_port, ["wrong-token"] * 2)),
                         ["UNAUTHENTICATED"] * 2)
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        url = f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}"
        yield self.browser.run(page.call, "Emulation.setDeviceMetricsOverride", width=1360, height=1000,
                               deviceScaleFactor=1, mobile=False)
        yield self.browser.run(page.call, "Page.navigate", url=url)
        text = yield self.browser.run(page.wait_for_text, "edge-1")
        for expected in ("Connected clients", "api.example.com/", "no client", "no route",
                         "5xx 1", "4xx 1", "/status/500", "/reports/daily", "Recent failures",
                         "ACCESS REFUSED", "allow_ips", "ip_not_allowed 1", "TUNNEL OPENS", "OPENS REFUSED"):
            self.assertIn(expected, text)
        tile = yield self.browser.run(page.evaluate, "const t = document.getElementById('tunnel-opens');"
                                                     "t.querySelector('.n').textContent + ' / ' + t.title")
        self.assertEqual(tile, "2 / unauthenticated 2, malformed 0, rate_limited 0, throttled 0")
        # A marker survives the update: the page changes in place, it is not reloaded.
        yield self.browser.run(page.evaluate, "window.__marker = 'kept'")
        yield self.stack.add_client(group="edge", client_id="edge-2")
        text = yield self.browser.run(page.wait_for_text, "edge-2")
        self.assertIn("edge-1", text)
        self.assertEqual((yield self.browser.run(page.evaluate, "window.__marker")), "kept")
        self.assertEqual(page.console_errors(), [])
        shot = yield self.browser.run(self.screenshot, page)
        self.assertTrue(shot.startswith(b"\x89PNG"))
        if os.environ.get("TUNNELD_WRITE_SCREENSHOT") == "1":
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            with open(SCREENSHOT, "wb") as f:
                f.write(shot)

    @inlineCallbacks
    def test_dashboard_with_10000_clients(self) -> Any:
        """With 10,000 clients the page renders in under 2 s: group rows, one page of clients, a working search."""
        import time

        from tunneld.registry.streams import StreamEntry

        registry = self.stack.server.hub.registry
        now = self.stack.server.hub.clock.seconds()
        fakes = [StreamEntry(group="edge", client_id=f"device-{i:05d}", stream_id="s", handle=object(),
                             connected_at=now, last_heartbeat=now + 3600, address=f"10.0.{i // 256}.{i % 256}:4000")
                 for i in range(10_000)]   # heard "in the future": never due a heartbeat nor expired here
        for e in fakes:
            registry.add(e)
        self.addCleanup(lambda: [registry.remove(e.key) for e in fakes])
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        started = time.monotonic()
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}")
        text = yield self.browser.run(page.wait_for_text, "showing 50 of 10000 streams")
        rendered = time.monotonic() - started
        print(f"MEASURED dashboard.render_10000_clients_s = {rendered:.3f}")
        self.assertLess(rendered, 2.0)
        self.assertIn("device-00049", text)
        self.assertNotIn("device-00050", text)
        rows = yield self.browser.run(page.evaluate, "document.querySelectorAll('tbody tr').length")
        self.assertLess(rows, 100)
        yield self.browser.run(page.evaluate, "const s = document.getElementById('clientsearch');"
                                              "s.value = 'device-07777'; s.dispatchEvent(new Event('input'))")
        text = yield self.browser.run(page.wait_for_text, "1 streams matching")
        self.assertIn("device-07777", text)
        self.assertNotIn("device-00049", text)   # (route cells list the first 20 ids only)
        self.assertEqual(page.console_errors(), [])

    @inlineCallbacks
    def test_dashboard_asks_for_the_token(self) -> Any:
        """Opened without its token, the page says so and shows no data."""
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{admin}/")
        text = yield self.browser.run(page.wait_for_text, "token needed")
        self.assertIn("needs its admin_token", text)
        self.assertNotIn("Connected clients", text)

    @inlineCallbacks
    def test_client_dashboard(self) -> Any:
        """A client's dashboard shows its connection state and the routes the server granted."""
        client = yield self.stack.add_client(group="edge", client_id="edge-9", admin_listen="127.0.0.1:0")
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{client.admin.port.getHost().port}/")
        text = yield self.browser.run(page.wait_for_text, "greeter")
        for expected in ("tunneld client edge-9", "connected", "web", "api", "grpc helloworld.Greeter"):
            self.assertIn(expected, text)
        self.assertNotIn("reports", text)
        self.assertEqual(page.console_errors(), [])

    @inlineCallbacks
    def test_failures_explain_themselves(self) -> Any:
        """Every failure row has its reason, request_id and who served it; a backend's 404 is not a failure;
        the tiles say who made the failures; times carry a date and time zone."""
        yield self.stack.add_client(group="edge", client_id="edge-1")
        codes = []
        for host, path in (("app.example.com", "/"), ("app.example.com", "/status/404"),
                           ("app.example.com", "/status/500"), ("other.example.com", "/"),
                           ("reports.example.com", "/reports/daily"), ("ops.example.com", "/")):
            codes.append((yield self.get(host, path)))
        self.assertEqual(codes, [200, 404, 500, 404, 502, 403])
        resp = yield treq.get(f"http://127.0.0.1:{self.stack.server.admin.port.getHost().port}/status".encode(),
                              headers={b"Authorization": [f"Bearer {ADMIN_TOKEN}".encode()]}, persistent=False)
        status = yield treq.json_content(resp)
        totals = status["totals"]
        self.assertEqual((totals["errors"], totals["errors_tunneld"], totals["errors_backend"], totals["backend_4xx"]),
                         (4, 3, 1, 1))
        self.assertEqual(sorted((row["path"], row["status"], row["reason"], row["answered_by"], row["served_by"])
                                for row in status["recent_errors"]), [
            ("/", 403, "access refused (ip_not_allowed)", "tunneld", ""),
            ("/", 404, "no route", "tunneld", ""),
            ("/reports/daily", 502, "no client connected", "tunneld", ""),
            ("/status/500", 500, "backend answered 500", "backend", "edge-1"),
        ])
        self.assertTrue(all(row["request_id"] for row in status["recent_errors"]), status["recent_errors"])

        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        yield self.browser.run(page.call, "Emulation.setDeviceMetricsOverride", width=1360, height=1000,
                               deviceScaleFactor=1, mobile=False)
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}")
        text = yield self.browser.run(page.wait_for_text, "backend answered 500")
        for expected in ("no client connected", "no route", "access refused (ip_not_allowed)", "FAILED BY TUNNELD",
                         "BACKEND 5XX", "BACKEND 4XX (NOT FAILURES)", "SERVED BY", "REASON"):
            self.assertIn(expected, text)
        for row in status["recent_errors"]:
            self.assertIn(row["request_id"], text)
        self.assertNotIn("/status/404", (yield self.browser.run(
            page.evaluate, "[...document.querySelectorAll('section')].find((s) => s.innerText.startsWith("
                           "'Recent failures')).innerText")))
        failure_rows = yield self.browser.run(page.evaluate, """(() => {
            const s = [...document.querySelectorAll('section')].find((s) => s.innerText.startsWith('Recent failures'));
            return [...s.querySelectorAll('tbody tr')].map((tr) => [...tr.cells].map((c) => c.innerText));
        })()""")
        self.assertEqual(len(failure_rows), 4)
        for cells in failure_rows:
            self.assertRegex(cells[0], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC([+-]\d\d:\d\d)?$")
            self.assertNotIn(cells[4], ("", "-"))    # reason
            self.assertNotIn(cells[9], ("", "-"))    # request_id
        served = {cells[6] for cells in failure_rows}
        self.assertIn("edge-1", served)
        # The traffic list has a "served by" column too.
        traffic = yield self.browser.run(page.wait_for_js, """(() => {
            const t = document.querySelector('#traffic table');
            return t && [...t.querySelectorAll('th')].map((th) => th.innerText).includes('SERVED BY') &&
                   [...t.querySelectorAll('tbody tr')].some((tr) => tr.innerText.includes('edge-1'));
        })()""")
        self.assertTrue(traffic)
        self.assertEqual(page.console_errors(), [])

    @inlineCallbacks
    def test_empty_chart_says_how_to_make_traffic(self) -> Any:
        """With no traffic yet, the chart area says where to send a request."""
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}")
        text = yield self.browser.run(page.wait_for_text, "No traffic yet.")
        self.assertIn("Send a request to the HTTP entry at http://127.0.0.1:", text)
        self.assertIn("make demo", text)
        self.assertEqual(page.console_errors(), [])

    @staticmethod
    def screenshot(page: DevTools) -> bytes:
        """Blocking: a PNG of the whole page at 1360 px wide."""
        height = page.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        page.call("Emulation.setDeviceMetricsOverride", width=1360, height=int(height), deviceScaleFactor=1,
                  mobile=False)
        data = page.call("Page.captureScreenshot", format="png")["data"]
        return base64.b64decode(data)


class TrafficViewTests(TestCase):
    """The dashboard's traffic view (the inspector) in headless Chromium."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        from tests.test_e2e_inspect import Recorder

        self.recorder = Recorder()
        from twisted.web import server as web

        self.backend = reactor.listenTCP(0, web.Site(self.recorder), interface="127.0.0.1")
        from autobahn.twisted.resource import WebSocketResource
        from autobahn.twisted.websocket import WebSocketServerFactory

        from tests.test_e2e_inspect import Echo

        factory = WebSocketServerFactory()
        factory.protocol = Echo
        self.ws_backend = reactor.listenTCP(0, web.Site(WebSocketResource(factory)), interface="127.0.0.1")
        self.stack = Stack(
            [{"name": "api", "group": "default", "backend": f"http://127.0.0.1:{self.backend.getHost().port}",
              "host": "api.example.com"},
             {"name": "chat", "group": "default", "backend": f"http://127.0.0.1:{self.ws_backend.getHost().port}",
              "path_prefix": "/room"}],
            server={"admin_listen": "127.0.0.1:0", "admin_token": ADMIN_TOKEN, "inspect_body_bytes": 4096},
        )
        yield self.stack.start()
        yield self.stack.add_client(client_id="edge-1")
        self.browser = Browser(self)

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.stack.stop()
        yield self.backend.stopListening()
        yield self.ws_backend.stopListening()
        yield wait_for(lambda: not any("_notify_bucket" in repr(c) for c in reactor.getDelayedCalls()),
                       what="autobahn timers to expire")

    @inlineCallbacks
    def test_websocket_timeline(self) -> Any:
        """A WebSocket exchange opens to its messages as a timeline, both directions, no console error."""
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool
        from websockets.sync.client import connect

        port = self.stack.http_port

        def talk() -> None:
            with connect(f"ws://127.0.0.1:{port}/room") as ws:
                for text in ("first message", "second message"):
                    ws.send(text)
                    ws.recv(timeout=10)

        pool = ThreadPool(minthreads=1, maxthreads=1, name="ws-caller")
        pool.start()
        self.addCleanup(pool.stop)
        yield deferToThreadPool(reactor, pool, talk)
        inspector = self.stack.server.hub.inspector
        yield wait_for(lambda: any(e.protocol == "websocket" and e.done for e in inspector), what="the record")
        [ws] = [e for e in inspector if e.protocol == "websocket"]
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}")
        # The summary renders before the traffic table (its "dropped msgs" tile also says MSGS):
        # wait for the exchange's own row, then open it.
        row = f"document.querySelector('tr[data-id=\"{ws.request_id}\"]')"
        yield self.browser.run(page.wait_for_js, f"{row} !== null")
        yield self.browser.run(page.evaluate, f"{row}.click()")
        text = yield self.browser.run(page.wait_for_text, "echo:second message")
        for expected in ("Messages", "first message", "echo:first message", "to backend", "to caller"):
            self.assertIn(expected, text)
        self.assertEqual(page.console_errors(), [])

    @inlineCallbacks
    def send(self, method: str, path: str, body: bytes = b"") -> Any:
        resp = yield treq.request(method, self.stack.url(path), data=body or None, persistent=False,
                                  headers={b"Host": [b"api.example.com"], b"Content-Type": [b"application/json"]})
        yield treq.content(resp)
        return resp.code

    @inlineCallbacks
    def test_traffic_list_detail_and_replay(self) -> Any:
        """The list updates as traffic flows, opening an exchange shows its body, Replay makes a new exchange."""
        self.assertEqual((yield self.send("POST", "/api/items", b'{"hello": "world", "n": 1}')), 200)
        yield wait_for(lambda: self.browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield self.browser.run(self.browser.attach)
        admin = self.stack.server.admin.port.getHost().port
        yield self.browser.run(page.call, "Emulation.setDeviceMetricsOverride", width=1360, height=1000,
                               deviceScaleFactor=1, mobile=False)
        yield self.browser.run(page.call, "Page.navigate", url=f"http://127.0.0.1:{admin}/#token={ADMIN_TOKEN}")
        text = yield self.browser.run(page.wait_for_text, "POST /api/items")
        self.assertIn("Traffic", text)
        # Live: a later request shows up without a reload.
        yield self.browser.run(page.evaluate, "window.__marker = 'kept'")
        self.assertEqual((yield self.send("GET", "/second?x=1")), 200)
        yield self.browser.run(page.wait_for_text, "GET /second?x=1")
        self.assertEqual((yield self.browser.run(page.evaluate, "window.__marker")), "kept")
        # The per-route charts fill after two polls.
        text = yield self.browser.run(page.wait_for_text, "req/s")
        self.assertIn("Per route, last minutes", text)
        self.assertGreaterEqual((yield self.browser.run(page.evaluate, "document.querySelectorAll('svg.spark').length")), 3)
        inspector = self.stack.server.hub.inspector
        [post] = [e for e in inspector if e.method == "POST"]
        yield self.browser.run(page.evaluate, f"document.querySelector('tr[data-id=\"{post.request_id}\"]').click()")
        text = yield self.browser.run(page.wait_for_text, '"hello": "world"')
        self.assertIn("Request body", text)
        self.assertIn("content-type", text.lower())
        yield self.browser.run(page.evaluate, "document.getElementById('replay').click()")
        text = yield self.browser.run(page.wait_for_text, "replayed as")
        yield wait_for(lambda: len(self.recorder.seen) == 3, what="the replay at the backend")
        self.assertEqual(self.recorder.seen[2][3], b'{"hello": "world", "n": 1}')
        [replayed] = [e for e in inspector if e.replay_of == post.request_id]
        self.assertIn(replayed.request_id, text)
        yield self.browser.run(page.wait_for_text, "replay")
        shot = yield self.browser.run(DashboardTests.screenshot, page)
        self.assertTrue(shot.startswith(b"\x89PNG"))
        if os.environ.get("TUNNELD_WRITE_SCREENSHOT") == "1":
            with open(os.path.join(ROOT, "docs", "traffic.png"), "wb") as f:
                f.write(shot)
        # The filter hides what does not match.
        yield self.browser.run(page.evaluate, "(() => { const i = document.getElementById('f-status'); i.value = '404';"
                                              " i.dispatchEvent(new Event('input')); })()")
        yield self.browser.run(page.wait_for_text, "Nothing matches the filters.")
        self.assertEqual(page.console_errors(), [])
