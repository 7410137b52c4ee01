"""The admin port against other web pages, over loopback (SPEC §8.2).

DNS rebinding (a foreign ``Host``) gets 421; a cross-site replay (a form or
``text/plain`` POST, a foreign ``Origin``) is refused and nothing reaches the
backend; the inspector masks every name of ``inspect_mask`` and query
parameters with those names.  The admin port here has no ``admin_token``, as
the shipped config.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web import server

from tests.harness import Stack, wait_for
from tests.test_e2e_access import raw_exchange
from tests.test_e2e_inspect import Recorder

SECRETS = {
    "Authorization": "Bearer s3cret-a", "Cookie": "sid=s3cret-b", "Proxy-Authorization": "Basic s3cret-c",
    "X-Api-Key": "s3cret-d", "X-Auth-Token": "s3cret-e", "X-CSRF-Token": "s3cret-f", "X-Session-Token": "s3cret-g",
    "X-Refresh-Token": "s3cret-h", "Client-Secret": "s3cret-i", "X-Db-Password": "s3cret-j", "My-Api-Key": "s3cret-k",
}
QUERY = "/form?access_token=s3cret-q1&page=2&token=s3cret-q2&client_secret=s3cret-q3"


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class AdminGuardTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.recorder = Recorder()
        self.backend = reactor.listenTCP(0, server.Site(self.recorder), interface="127.0.0.1")
        self.stack = Stack(
            [{"name": "web", "group": "default", "backend": f"http://127.0.0.1:{self.backend.getHost().port}"}],
            server={"admin_listen": "127.0.0.1:0", "inspect": 20, "inspect_body_bytes": 1024,
                    "admin_hosts": ["tunneld-admin.internal"]})
        yield self.stack.start()
        yield self.stack.add_client()
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="admin-guard")
        self.pool.start()
        assert self.stack.server is not None and self.stack.server.admin is not None
        self.admin_port = self.stack.server.admin.port.getHost().port

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.pool.stop()
        yield self.stack.stop()
        yield self.backend.stopListening()

    def admin(self, method: str, path: str, host: str | None = None, headers: dict[str, str] | None = None,
              body: bytes = b"", version: str = "HTTP/1.1") -> Any:
        """One raw request to the admin port (in a thread); (status, body)."""
        lines = [f"{method} {path} {version}"]
        if host is not None:
            lines.append(f"Host: {host}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines += [f"Content-Length: {len(body)}", "Connection: close"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        return deferToThreadPool(reactor, self.pool,
                                 lambda: status_and_body(raw_exchange(self.admin_port, data)))

    @inlineCallbacks
    def recorded_post(self) -> Any:
        """A POST with credentials through the entry; its request_id once the inspector has it."""
        headers = "".join(f"{k}: {v}\r\n" for k, v in SECRETS.items())
        data = (f"POST {QUERY} HTTP/1.1\r\nHost: app.test\r\n{headers}Content-Length: 4\r\n"
                "Connection: close\r\n\r\nbody").encode()
        raw = yield deferToThreadPool(reactor, self.pool, raw_exchange, self.stack.http_port, data)
        self.assertEqual(status_and_body(raw)[0], 200)
        assert self.stack.server is not None and self.stack.server.hub.inspector is not None
        inspector = self.stack.server.hub.inspector
        yield wait_for(lambda: len(inspector) == 1 and next(iter(inspector)).done, what="the exchange recorded")
        return next(iter(inspector)).request_id

    @inlineCallbacks
    def test_foreign_host_gets_421(self) -> Any:
        """DNS rebinding: any page of the admin port with a foreign Host is 421; ours, and no Host at all, are served."""
        rid = yield self.recorded_post()
        port = self.admin_port
        for path in ("/", "/status", "/metrics", "/inspect", f"/inspect/{rid}", "/healthz"):
            code, body = yield self.admin("GET", path, f"evil.example:{port}")
            self.assertEqual(code, 421, (path, body))
            self.assertNotIn(b"s3cret", body)
        code, _ = yield self.admin("POST", f"/inspect/{rid}/replay", f"evil.example:{port}",
                                   {"X-Tunneld-Replay": "1"})
        self.assertEqual(code, 421)
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}",
                     f"tunneld-admin.internal:{port}"):
            code, _ = yield self.admin("GET", "/status", host)
            self.assertEqual(code, 200, host)
        code, _ = yield self.admin("GET", "/status", None, version="HTTP/1.0")
        self.assertEqual(code, 200)
        self.assertEqual(len(self.recorder.seen), 1)

    @inlineCallbacks
    def test_cross_site_replay_is_refused_and_nothing_reaches_the_backend(self) -> Any:
        """A text/plain or form POST, a foreign Origin or Sec-Fetch-Site: 403 and no second request at the backend."""
        rid = yield self.recorded_post()
        host = f"127.0.0.1:{self.admin_port}"
        for headers in (
            {"Origin": "http://evil.example", "Content-Type": "text/plain"},   # the CORS simple request
            {"Content-Type": "application/x-www-form-urlencoded"},            # a cross-site form
            {"Content-Type": "text/plain"},
            {"Origin": "http://evil.example", "X-Tunneld-Replay": "1"},       # (a browser would preflight)
            {"Origin": "http://evil.example", "Content-Type": "application/json"},
            {"Sec-Fetch-Site": "cross-site", "X-Tunneld-Replay": "1"},
        ):
            code, body = yield self.admin("POST", f"/inspect/{rid}/replay", host, headers, b"x=1")
            self.assertEqual(code, 403, (headers, body))
        self.assertEqual(len(self.recorder.seen), 1)
        # Same origin and a non-simple request: replayed, with the original credentials.
        code, body = yield self.admin("POST", f"/inspect/{rid}/replay", host,
                                      {"Origin": f"http://{host}", "X-Tunneld-Replay": "1"})
        self.assertEqual(code, 200, body)
        code, body = yield self.admin("POST", f"/inspect/{rid}/replay", host,
                                      {"Content-Type": "application/json", "Sec-Fetch-Site": "same-origin"}, b"{}")
        self.assertEqual(code, 200, body)
        yield wait_for(lambda: len(self.recorder.seen) == 3, what="two replays at the backend")
        self.assertIn((b"x-api-key", b"s3cret-d"), self.recorder.seen[1][2])

    @inlineCallbacks
    def test_inspect_masks_every_name_and_query_parameter(self) -> Any:
        """/inspect and /inspect/<id> show none of the credential values, in headers or the query string."""
        rid = yield self.recorded_post()
        host = f"127.0.0.1:{self.admin_port}"
        for path in ("/inspect", f"/inspect/{rid}"):
            code, body = yield self.admin("GET", path, host)
            self.assertEqual(code, 200)
            self.assertNotIn(b"s3cret", body)
        code, body = yield self.admin("GET", f"/inspect/{rid}", host)
        ex = json.loads(body)
        shown = {name.lower(): value for name, value in ex["request"]["headers"]}
        for name in SECRETS:
            self.assertEqual(shown[name.lower()], "***", name)
        self.assertEqual(ex["request"]["path"], "/form?access_token=***&page=2&token=***&client_secret=***")
        self.assertEqual(dict((n.lower(), v) for n, v in ex["response"]["headers"])["set-cookie"], "***")
