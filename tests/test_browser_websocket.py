"""A real browser (headless Chromium) uses a WebSocket through the tunnel."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Any
from urllib.parse import unquote

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web import resource, server

from tests.harness import Stack, wait_for

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

PAGE = b"""<!doctype html><html><head><title>tunneld ws</title></head><body><p id="out">waiting</p>
<script>
const ws = new WebSocket("ws://" + location.host + "/ws", ["chat.v2"]);
ws.onopen = () => ws.send("browser-hello");
ws.onmessage = (e) => {
  document.getElementById("out").textContent = e.data;
  fetch("/report?msg=" + encodeURIComponent(e.data + "|" + ws.protocol)).then(() => ws.close(1000));
};
ws.onerror = () => fetch("/report?msg=error");
</script></body></html>"""


class Echo(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> Any:
        return "chat.v2" if "chat.v2" in request.protocols else None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(b"echo:" + payload, isBinary)


class Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE


class Report(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[str] = []

    def render_GET(self, request: server.Request) -> bytes:
        self.reports.append(unquote(request.args[b"msg"][0].decode()))
        return b"thanks"


class BrowserTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_chromium_websocket_echo_through_the_tunnel(self) -> Any:
        """Headless Chromium loads a page through the tunnel, opens a WebSocket through it and gets the echo."""
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SkipTest("chromium is not installed (.ci/run installs it)")
        factory = WebSocketServerFactory()
        factory.protocol = Echo
        root = resource.Resource()
        report = Report()
        root.putChild(b"page", Page())
        root.putChild(b"report", report)
        root.putChild(b"ws", WebSocketResource(factory))
        backend = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        stack = Stack([{"name": "app", "group": "default", "backend": f"http://127.0.0.1:{backend.getHost().port}"}])
        yield stack.start()
        self.addCleanup(stack.stop)
        yield stack.add_client()
        profile = tempfile.mkdtemp(prefix="tunneld-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"http://127.0.0.1:{stack.http_port}/page"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

        self.addCleanup(stop)
        yield wait_for(lambda: bool(report.reports), timeout=60, what="the browser's report")
        self.assertEqual(report.reports[0], "echo:browser-hello|chat.v2")
        yield wait_for(lambda: stack.server_in_flight() == 0, what="tunnel tables to empty")
