"""HTTP/2 on the HTTP entry, over loopback with curl: h2c prior knowledge, h2 over TLS (ALPN), beside HTTP/1.1.

curl (built with nghttp2) is the external client, run in a thread so the
server, the client and the backend keep running in the test's reactor;
``%{http_version}`` says which protocol served each transfer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import bcrypt
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from bench.backend import expected_bytes
from tests.backends import test_site
from tests.certs import make_pki
from tests.harness import Stack, wait_for

PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def curl_has_http2() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    out = subprocess.run([curl, "-V"], capture_output=True, text=True, timeout=10).stdout
    return "HTTP2" in out


def run_curl(*args: str, timeout: float = 60, stdin: bytes | None = None) -> tuple[str, bytes]:
    """curl's ``-w`` line (version and status) and the body; runs in a thread."""
    done = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w",
                           "\n%{http_version} %{http_code}", *args], capture_output=True, timeout=timeout + 10,
                          input=stdin)
    body, _, meta = done.stdout.rpartition(b"\n")
    return meta.decode(), body


class Http2EntryTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        if not curl_has_http2():
            raise SkipTest("curl with HTTP/2 (nghttp2) is not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = make_pki(os.path.join(self.dir, "pki"))
        site, self.held, self.never = test_site()
        self.backend_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.backend_port.stopListening)
        self.backend = f"http://127.0.0.1:{self.backend_port.getHost().port}"
        yield None

    def stack(self, with_client: bool = True, **server: Any) -> Any:
        b = self.backend
        stack = Stack([
            {"name": "app", "group": "default", "backend": b, "path_prefix": "/"},
            {"name": "secret", "group": "default", "backend": b, "host": "secret.test",
             "basic_auth": [f"alice:{HASH}"]},
            {"name": "office", "group": "default", "backend": b, "path_prefix": "/office", "deny_ips": ["127.0.0.1"]},
            {"name": "small", "group": "default", "backend": b, "path_prefix": "/limited", "max_body_size": 1000000},
            {"name": "slow", "group": "default", "backend": b, "path_prefix": "/never", "timeout": 0.5},
            {"name": "nobody", "group": "other", "backend": b, "host": "nobody.test"},
            {"name": "only", "group": "default", "backend": b, "host": "only.test", "path_prefix": "/only"},
        ], groups=[{"name": "default", "tokens": ["t0ken"]}, {"name": "other", "tokens": ["0ther"]}], server=server)
        self.addCleanup(stack.stop)
        return stack

    @inlineCallbacks
    def started(self, **server: Any) -> Any:
        stack = self.stack(**server)
        yield stack.start()
        yield stack.add_client(token="t0ken")
        return stack

    def h2c(self, stack: Stack, path: str, *args: str) -> Any:
        return deferToThread(run_curl, "--http2-prior-knowledge", *args, f"http://127.0.0.1:{stack.http_port}{path}")

    def tls(self, stack: Stack, path: str, *args: str) -> Any:
        return deferToThread(run_curl, "--cacert", self.pki.ca, *args, f"https://127.0.0.1:{stack.http_port}{path}")

    # -- the basics ------------------------------------------------------------------------

    @inlineCallbacks
    def test_get_over_h2c_prior_knowledge(self) -> Any:
        """curl --http2-prior-knowledge on the plain port is served over HTTP/2, with the HTTP/1.1 entry's headers."""
        stack = yield self.started()
        meta, body = yield self.h2c(stack, "/echo?x=1", "-H", "Cookie: a=1", "-H", "Cookie: b=2",
                                    "-H", "X-Forwarded-For: 10.0.0.9")
        self.assertEqual(meta, "2 200")
        echo = json.loads(body)
        headers = [(n.lower(), v) for n, v in echo["headers"]]
        self.assertEqual(echo["query"], [["x", "1"]])
        self.assertEqual(headers[0], ("host", f"127.0.0.1:{stack.http_port}"))
        self.assertIn(("cookie", "a=1; b=2"), headers)   # RFC 9113 §8.2.3: one field for HTTP/1.1
        self.assertIn(("x-forwarded-for", "10.0.0.9, 127.0.0.1"), headers)
        self.assertIn(("x-forwarded-proto", "http"), headers)
        self.assertIn(("x-forwarded-host", f"127.0.0.1:{stack.http_port}"), headers)
        self.assertFalse([n for n, _ in headers if n in ("te", "connection", "http2-settings")])
        yield wait_for(lambda: stack.server_in_flight() == 0, what="requests released")

    @inlineCallbacks
    def test_streamed_upload_and_download(self) -> Any:
        """A 12 MB upload and a 20 MB download over HTTP/2 (many windows each way) arrive whole (sha256)."""
        stack = yield self.started()
        path = os.path.join(self.dir, "up.bin")
        data = os.urandom(12 * 1024 * 1024)
        with open(path, "wb") as f:
            f.write(data)
        meta, body = yield self.h2c(stack, "/upload", "-T", path)
        self.assertEqual(meta, "2 200")
        self.assertEqual(json.loads(body), {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        n = 20 * 1000 * 1000
        meta, body = yield self.h2c(stack, f"/bytes/{n}")
        self.assertEqual(meta, "2 200")
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(expected_bytes(n)).hexdigest())
        yield wait_for(lambda: stack.server_in_flight() == 0 and stack.client_in_flight() == 0,
                       what="requests released")

    @inlineCallbacks
    def test_upload_of_unknown_length_and_head(self) -> Any:
        """A body without content-length (curl -T - from a pipe) arrives whole; HEAD keeps its content-length."""
        stack = yield self.started()
        data = os.urandom(3 * 1024 * 1024 + 17)
        meta, body = yield deferToThread(run_curl, "--http2-prior-knowledge", "-T", "-",
                                         f"http://127.0.0.1:{stack.http_port}/upload", stdin=data)
        self.assertEqual(meta, "2 200")
        self.assertEqual(json.loads(body), {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        meta, head = yield self.h2c(stack, "/bytes/1000", "-I")
        self.assertEqual(meta, "2 200")
        self.assertIn(b"content-length: 1000", head)

    @inlineCallbacks
    def test_h2_over_tls_with_alpn_and_http11_beside_it(self) -> Any:
        """TLS offers h2 and http/1.1: curl --http2 gets HTTP/2, curl --http1.1 gets HTTP/1.1, same answers."""
        stack = yield self.started(http_tls_cert=self.pki.server_cert, http_tls_key=self.pki.server_key)
        meta, body = yield self.tls(stack, "/echo", "--http2")
        self.assertEqual(meta, "2 200")
        self.assertIn(["X-Forwarded-Proto", "https"], json.loads(body)["headers"])
        meta, body = yield self.tls(stack, "/bytes/300000", "--http2")
        self.assertEqual((meta, body), ("2 200", expected_bytes(300000)))
        meta, _ = yield self.tls(stack, "/echo", "--http1.1")
        self.assertEqual(meta, "1.1 200")
        meta, h2_404 = yield self.tls(stack, "/only", "--http2", "-H", "Host: elsewhere.test")
        meta11, h11_404 = yield self.tls(stack, "/only", "--http1.1", "-H", "Host: elsewhere.test")
        self.assertEqual((meta, meta11), ("2 404", "1.1 404"))
        self.assertEqual(h2_404, h11_404)

    @inlineCallbacks
    def test_http11_and_h2c_on_the_same_port(self) -> Any:
        """Plain HTTP/1.1 (no preface) and a request line that only starts like it still get HTTP/1.1."""
        stack = yield self.started()
        meta, _ = yield self.h2c(stack, "/echo")
        self.assertEqual(meta, "2 200")
        meta, _ = yield deferToThread(run_curl, "--http1.1", stack.url("/echo").decode())
        self.assertEqual(meta, "1.1 200")

        def almost_preface() -> bytes:
            with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
                sock.sendall(b"PRI * HTTP/1.1\r\nHost: x\r\n\r\n")
                return sock.recv(100)

        answer = yield deferToThread(almost_preface)
        self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer)

    @inlineCallbacks
    def test_preface_in_pieces_waits_then_speaks_http2(self) -> Any:
        """A preface sent a few bytes at a time is still HTTP/2: the server's SETTINGS come after it."""
        stack = yield self.started()

        def pieces() -> bytes:
            with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(0, len(PREFACE), 5):
                    sock.sendall(PREFACE[i:i + 5])
                sock.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")   # empty SETTINGS
                return sock.recv(9)

        head = yield deferToThread(pieces)
        self.assertEqual(head[3], 0x4)   # the server's first frame: SETTINGS

    # -- answers and access rules -------------------------------------------------------------

    @inlineCallbacks
    def test_refusals_match_http11(self) -> Any:
        """404, 403, 401 (WWW-Authenticate), 413 and 504: same status and body over HTTP/2 as over HTTP/1.1."""
        stack = yield self.started()
        cases = [
            ("/only", ["-H", "Host: nowhere.test"], 404),
            ("/office", [], 403),
            ("/echo", ["-H", "Host: secret.test"], 401),
            ("/echo", ["-H", "Host: secret.test", "-u", "alice:wrong"], 401),
            ("/limited", ["--data-binary", "@" + self._file(2_000_000)], 413),
            ("/never", [], 504),
        ]
        for path, extra, status in cases:
            meta2, body2 = yield self.h2c(stack, path, *extra)
            meta1, body1 = yield deferToThread(run_curl, "--http1.1", *extra, stack.url(path).decode())
            self.assertEqual((meta2, meta1), (f"2 {status}", f"1.1 {status}"), path)
            self.assertEqual(body2, body1, path)
        dump = os.path.join(self.dir, "head")
        meta, _ = yield self.h2c(stack, "/echo", "-H", "Host: secret.test", "-D", dump)
        with open(dump, "rb") as f:
            self.assertIn(b"\nwww-authenticate: Basic realm=", f.read())   # lower-case names over HTTP/2
        yield wait_for(lambda: stack.server_in_flight() == 0, what="requests released")

    def _file(self, n: int) -> str:
        path = os.path.join(self.dir, f"body-{n}")
        with open(path, "wb") as f:
            f.write(b"x" * n)
        return path

    @inlineCallbacks
    def test_basic_auth_passes_and_authorization_stays_here(self) -> Any:
        """Right credentials: served over HTTP/2, and the backend never sees Authorization."""
        stack = yield self.started()
        meta, body = yield self.h2c(stack, "/echo", "-H", "Host: secret.test", "-u", f"alice:{PASSWORD}")
        self.assertEqual(meta, "2 200")
        self.assertNotIn("authorization", [n.lower() for n, _ in json.loads(body)["headers"]])
        auth = "Basic " + base64.b64encode(b"bob:x").decode()
        meta, body = yield self.h2c(stack, "/echo", "-H", f"Authorization: {auth}")
        self.assertIn(["Authorization", auth], [[n.title(), v] for n, v in json.loads(body)["headers"]])

    @inlineCallbacks
    def test_no_client_is_502(self) -> Any:
        """A route whose group has no client: 502 over HTTP/2, the HTTP/1.1 body."""
        stack = yield self.started()
        meta2, body2 = yield self.h2c(stack, "/", "-H", "Host: nobody.test")
        meta1, body1 = yield deferToThread(run_curl, "--http1.1", "-H", "Host: nobody.test", stack.url("/").decode())
        self.assertEqual((meta2, meta1), ("2 502", "1.1 502"))
        self.assertEqual(body2, body1)
        self.assertIn(b"no client connected", body2)

    # -- streams ----------------------------------------------------------------------------------

    @inlineCallbacks
    def test_a_stalled_stream_does_not_hold_another_on_the_same_connection(self) -> Any:
        """Two streams on one connection (nghttp): /held waits on its backend, /echo is answered meanwhile.

        (curl 7.88's -Z over h2c prior knowledge fails its second stream on the client side with
        "Error in the HTTP2 framing layer" before sending it, so nghttp is the client here.)
        """
        if shutil.which("nghttp") is None:
            raise SkipTest("nghttp (nghttp2-client) is not installed")
        stack = yield self.started()
        log = os.path.join(self.dir, "nghttp.log")
        base = f"http://127.0.0.1:{stack.http_port}"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["nghttp", "-nv", "-t", "60", f"{base}/held", f"{base}/echo"], stdout=out,
                                    stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        yield wait_for(lambda: len(self.held.requests) == 1, what="/held at the backend")

        def text() -> str:
            with open(log, encoding="utf-8", errors="replace") as f:
                return f.read()

        # nghttp opens /held on stream 13 and /echo on 15 (3..11 are its priority anchors).
        yield wait_for(lambda: "flags=0x01, stream_id=15" in text(), what="/echo answered while /held stalls")
        self.assertIsNone(proc.poll())
        self.assertNotIn("flags=0x01, stream_id=13", text())
        entry = stack.server.http.factory.h2
        self.assertEqual(len(entry.connections), 1)
        self.assertEqual(text().count("Connected"), 1)
        self.held.release()
        code = yield deferToThread(proc.wait, 30)
        self.assertEqual(code, 0, text())
        self.assertIn("flags=0x01, stream_id=13", text())

    @inlineCallbacks
    def test_slow_reader_holds_the_tunnel_not_memory(self) -> Any:
        """curl reading 200 KB/s of a 200 MB download: the entry relays only what flow control lets through."""
        stack = yield self.started()
        base = f"http://127.0.0.1:{stack.http_port}"
        proc = subprocess.Popen(["curl", "-sS", "--http2-prior-knowledge", "--limit-rate", "200k", "-o", os.devnull,
                                 f"{base}/bytes/200000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        entry = stack.server.http.factory.h2

        def streams() -> list[Any]:
            return [h for conn in entry.connections for h in conn.handlers.values()]

        yield wait_for(lambda: any(st.body_out > 0 for st in streams()), what="the download under way")
        # Unthrottled, loopback moves 200 MB in a second or two; let three seconds pass.
        yield deferLater(reactor, 3, lambda: None)
        [stream] = streams()
        # What left the entry: curl's ~600 KB, its HTTP/2 window (sockets push back first) and one tunnel
        # window (grown to max_window at most): ~18 MB measured; 200 MB when credit returned on receipt.
        self.assertLess(stream.body_out, 40_000_000)
        self.assertIsNone(proc.poll())
        proc.kill()
        yield deferToThread(proc.wait, 10)
        yield wait_for(lambda: stack.server_in_flight() == 0 and stack.client_in_flight() == 0,
                       what="requests released")

    @inlineCallbacks
    def test_entry_stop_sends_goaway_and_streams_in_flight_finish(self) -> Any:
        """http_listen stops: HTTP/2 connections get GOAWAY, a stream in flight still completes."""
        if shutil.which("nghttp") is None:
            raise SkipTest("nghttp (nghttp2-client) is not installed")
        stack = yield self.started()
        log = os.path.join(self.dir, "nghttp.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(["nghttp", "-nv", "-t", "60", f"http://127.0.0.1:{stack.http_port}/held"],
                                    stdout=out, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        yield wait_for(lambda: len(self.held.requests) == 1, what="/held at the backend")

        def text() -> str:
            with open(log, encoding="utf-8", errors="replace") as f:
                return f.read()

        yield stack.server.http.stopService()
        yield wait_for(lambda: "recv GOAWAY" in text(), what="GOAWAY")
        self.assertIsNone(proc.poll())
        self.held.release()
        code = yield deferToThread(proc.wait, 30)
        self.assertEqual(code, 0, text())
        self.assertIn("flags=0x01, stream_id=13", text())   # END_STREAM: the answer was complete

    @inlineCallbacks
    def test_client_going_away_cancels_the_tunnel_request(self) -> Any:
        """curl ending mid-download (RST_STREAM / close) releases the request on both sides."""
        stack = yield self.started()
        meta, _ = yield self.h2c(stack, "/bytes/2000000000", "--max-filesize", "1000", "--limit-rate", "1M")
        yield wait_for(lambda: stack.server_in_flight() == 0 and stack.client_in_flight() == 0,
                       what="requests released")

    # -- configuration -----------------------------------------------------------------------------

    @inlineCallbacks
    def test_http2_false_turns_it_off(self) -> Any:
        """http2 = false: no h2 in ALPN (curl --http2 falls back to 1.1); the preface is not HTTP."""
        stack = yield self.started(http2=False, http_tls_cert=self.pki.server_cert,
                                   http_tls_key=self.pki.server_key)
        meta, _ = yield self.tls(stack, "/echo", "--http2")
        self.assertEqual(meta, "1.1 200")
        stack2 = self.stack(http2=False)
        yield stack2.start()
        meta, _ = yield self.h2c(stack2, "/echo")
        self.assertNotEqual(meta.split()[0], "2")

    @inlineCallbacks
    def test_proxy_protocol_then_h2c(self) -> Any:
        """With proxy_protocol, the PROXY header comes first and HTTP/2 still follows it."""
        stack = yield self.started(proxy_protocol=True)
        meta, body = yield self.h2c(stack, "/echo", "--haproxy-protocol")
        self.assertEqual(meta, "2 200")
        self.assertIn(["X-Forwarded-For", "127.0.0.1"], json.loads(body)["headers"])

    @inlineCallbacks
    def test_max_connections_counts_http2_connections(self) -> Any:
        """An open HTTP/2 connection holds a place in max_connections: the next one gets 503."""
        stack = yield self.started(max_connections=1)
        sock = socket.create_connection(("127.0.0.1", stack.http_port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        entry = stack.server.http.factory.h2
        yield wait_for(lambda: len(entry.connections) == 1, what="the HTTP/2 connection")
        meta, _ = yield self.h2c(stack, "/echo")
        self.assertNotEqual(meta, "2 200")
        self.assertEqual(stack.server.hub.entry.refused_connections, 1)
        sock.close()
        yield wait_for(lambda: stack.server.hub.entry.connections == 0, what="its place released")
        meta, _ = yield self.h2c(stack, "/echo")
        self.assertEqual(meta, "2 200")

    @inlineCallbacks
    def test_client_http_entry_speaks_h2c(self) -> Any:
        """The client's http_entry (forward direction) takes h2c prior knowledge too."""
        stack = Stack([{"name": "unused", "group": "default", "backend": self.backend}],
                      upstreams=[{"name": "api", "backends": [self.backend]}],
                      forward=[{"name": "api", "host": "api.internal", "upstream": "api"}])
        self.addCleanup(stack.stop)
        yield stack.start()
        client = yield stack.add_client(http_entry="127.0.0.1:0")
        port = yield stack.entry_port(client)
        meta, body = yield deferToThread(run_curl, "--http2-prior-knowledge", "-H", "Host: api.internal",
                                         f"http://127.0.0.1:{port}/bytes/500000")
        self.assertEqual((meta, body), ("2 200", expected_bytes(500000)))

    # -- limits --------------------------------------------------------------------------------------

    @inlineCallbacks
    def test_header_list_over_max_header_size_never_crosses_the_tunnel(self) -> Any:
        """A 20 KB header over HTTP/2 ends that connection (GOAWAY) before dispatch, as HTTP/1.1 closes its own."""
        stack = yield self.started()
        hub = stack.server.hub
        before = hub.counters["requests"]
        meta, _ = yield self.h2c(stack, "/echo", "-H", "X-Big: " + "a" * 20000)
        self.assertEqual(meta, "0 000")
        self.assertEqual(hub.counters["requests"], before)
        meta, _ = yield self.h2c(stack, "/echo", "-H", "X-Big: " + "a" * 10000)
        self.assertEqual(meta, "2 200")

    @inlineCallbacks
    def test_idle_http2_connection_goes_after_idle_timeout(self) -> Any:
        """One request answered, then no stream open: GOAWAY and close after the server's idle_timeout."""
        stack = yield self.started(idle_timeout=1)

        def one_request_then_idle() -> tuple[bytes, float]:
            def literal(name: bytes, value: bytes) -> bytes:   # HPACK: literal field, new name, no indexing
                return bytes([0, len(name)]) + name + bytes([len(value)]) + value

            block = (literal(b":method", b"GET") + literal(b":path", b"/bytes/10") + literal(b":scheme", b"http")
                     + literal(b":authority", b"127.0.0.1"))
            headers = len(block).to_bytes(3, "big") + bytes([0x1, 0x5]) + (1).to_bytes(4, "big") + block
            with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
                sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + headers)
                got = b""
                answered_at = 0.0
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return got, time.monotonic() - answered_at
                    got += chunk
                    if not answered_at and got.count(b"\x00\x00\x00\x01") and b"\x00\x0a\x00\x01\x00\x00\x00\x01" in got:
                        answered_at = time.monotonic()   # the 10-byte DATA frame with END_STREAM on stream 1

        got, idle_for = yield deferToThread(one_request_then_idle)
        self.assertIn(b"\x00\x0a\x00\x01\x00\x00\x00\x01" + expected_bytes(10), got)
        self.assertIn(b"\x07\x00\x00\x00\x00", got)   # GOAWAY before the close
        self.assertLess(idle_for, 8.0)

    @inlineCallbacks
    def test_http2_connection_without_a_request_goes_after_header_timeout(self) -> Any:
        """Preface and SETTINGS, then nothing: closed after header_timeout (slowloris over HTTP/2)."""
        stack = yield self.started(header_timeout=1)

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
                sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                got = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return got
                    got += chunk

        got = yield deferToThread(silent)
        self.assertIn(b"\x07\x00\x00\x00\x00", got)   # a GOAWAY frame (type 7) came before the close


BROWSER_PAGE = b"""<!doctype html><html><head><title>h2</title></head><body><p id="out">waiting</p>
<script>
const echoed = new Promise((resolve, reject) => {
  const ws = new WebSocket("wss://" + location.host + "/ws");   // HTTP/1.1 beside the page's h2 connection
  ws.onopen = () => ws.send("over-tls");
  ws.onmessage = (e) => { resolve(e.data); ws.close(1000); };
  ws.onerror = () => reject("websocket error");
});
Promise.all([fetch("/bytes/100000"), fetch("/echo")].map(p => p.then(r => r.arrayBuffer())))
  .then(bodies => echoed.then(data => {
    document.getElementById("out").textContent = "fetched " + bodies.map(b => b.byteLength > 0).join(",") + " " + data;
  }))
  .catch(e => { document.getElementById("out").textContent = "failed " + e; });
</script></body></html>"""


class BrowserHttp2Tests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_chromium_loads_a_page_over_h2_through_the_tls_entry(self) -> Any:
        """Headless Chromium on the TLS entry: h2 for the page and its fetches; its wss:// goes on HTTP/1.1."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from twisted.web import resource, server

        from autobahn.twisted.resource import WebSocketResource
        from autobahn.twisted.websocket import WebSocketServerFactory

        from bench.backend import make_site
        from tests.cdp import Browser, DevTools
        from tests.test_browser_websocket import Echo

        pki = make_pki(os.path.abspath(self.mktemp()))
        with open(pki.server_cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()

        demo = make_site()
        ws_factory = WebSocketServerFactory()
        ws_factory.protocol = Echo
        ws = WebSocketResource(ws_factory)

        class Root(resource.Resource):
            def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
                if path == b"ws":
                    return ws
                if path == b"page":
                    page = resource.Resource()
                    page.render_GET = lambda request: BROWSER_PAGE   # type: ignore[method-assign]
                    page.isLeaf = True
                    return page
                request.postpath.insert(0, request.prepath.pop())
                return demo.resource

        backend = reactor.listenTCP(0, server.Site(Root()), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        stack = Stack([{"name": "app", "group": "default", "backend": f"http://127.0.0.1:{backend.getHost().port}"}],
                      server={"http_tls_cert": pki.server_cert, "http_tls_key": pki.server_key})
        self.addCleanup(stack.stop)
        yield stack.start()
        yield stack.add_client()
        # The browser trusts exactly this test certificate's key (no CA installed anywhere).
        browser = Browser(self, (f"--ignore-certificate-errors-spki-list={pin}",))
        yield wait_for(lambda: browser.port() is not None, timeout=30, what="Chromium's DevTools port")
        page: DevTools = yield browser.run(browser.attach)
        yield browser.run(page.call, "Page.navigate", url=f"https://127.0.0.1:{stack.http_port}/page")
        yield browser.run(page.wait_for_text, "fetched true,true echo:over-tls", timeout=30)
        protocols = yield browser.run(page.evaluate,
                                      "performance.getEntries().filter(e => e.nextHopProtocol)"
                                      ".map(e => e.nextHopProtocol)")
        self.assertEqual(protocols[0], "h2")   # the navigation itself
        self.assertEqual(protocols, ["h2"] * len(protocols))
        self.assertGreaterEqual(len(protocols), 3)
        yield wait_for(lambda: stack.server_in_flight() == 0, what="requests released")
        self.assertEqual([e for e in page.console_errors() if "favicon.ico" not in e], [])
