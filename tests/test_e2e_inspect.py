"""The inspector over real sockets: capture of HTTP, WebSocket and gRPC, masking, the ring, replay, the token."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import treq
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource
from websockets.sync.client import connect

from tests.grpc_services import RAW_SERVICE, GrpcBackend
from tests.harness import Stack, wait_for

HOP_BY_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
              b"proxy-connection", b"content-length"}


class Recorder(Resource):
    """An HTTP backend that remembers every request (method, uri, headers, body) and answers JSON."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []

    def render(self, request: server.Request) -> bytes:
        body = request.content.read()
        headers = [(n.lower(), v) for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        self.seen.append((request.method, request.uri, headers, body))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"set-cookie", b"sid=secret-session")
        return json.dumps({"n": len(self.seen), "got": len(body)}).encode()


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(b"echo:" + payload, isBinary)


class _InspectorCase(TestCase):
    """A server with its admin port (token "tok"), the inspector on, and HTTP, WebSocket and gRPC backends."""

    timeout = 90
    inspect = 50
    body_bytes = 1024

    @inlineCallbacks
    def setUp(self) -> Any:
        self.recorder = Recorder()
        self.http_backend = reactor.listenTCP(0, server.Site(self.recorder), interface="127.0.0.1")
        factory = WebSocketServerFactory()
        factory.protocol = Echo
        self.ws_backend = reactor.listenTCP(0, server.Site(WebSocketResource(factory)), interface="127.0.0.1")
        self.grpc_backend = GrpcBackend(workers=4)
        self.stack = Stack([
            {"name": "web", "group": "default", "backend": f"http://127.0.0.1:{self.http_backend.getHost().port}",
             "host": "app.test"},
            {"name": "chat", "group": "default", "backend": f"http://127.0.0.1:{self.ws_backend.getHost().port}",
             "path_prefix": "/room"},
            {"name": "raw", "group": "default", "grpc_service": RAW_SERVICE, "backend": self.grpc_backend.url},
            {"name": "nobody", "group": "empty", "grpc_service": "tunneld.test.Nobody",
             "backend": self.grpc_backend.url},
        ], groups=[{"name": "default", "tokens": ["test-token"]}, {"name": "empty", "tokens": ["x"]}], server={"admin_listen": "127.0.0.1:0", "admin_token": "tok", "grpc_listen": "127.0.0.1:0",
                   "inspect": self.inspect, "inspect_body_bytes": self.body_bytes})
        yield self.stack.start()
        self.client = yield self.stack.add_client(client_id="inspected")
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="inspect-callers")
        self.pool.start()

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.pool.stop()
        yield self.stack.stop()
        yield deferToThreadPool(reactor, reactor.getThreadPool(), self.grpc_backend.stop)
        yield self.http_backend.stopListening()
        yield self.ws_backend.stopListening()
        yield wait_for(lambda: not any("_notify_bucket" in repr(c) for c in reactor.getDelayedCalls()),
                       what="autobahn timers to expire")

    def in_thread(self, fn: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, self.pool, fn, *args)

    def admin(self, path: str) -> bytes:
        assert self.stack.server is not None and self.stack.server.admin is not None
        return f"http://127.0.0.1:{self.stack.server.admin.port.getHost().port}{path}".encode()

    @inlineCallbacks
    def call_admin(self, method: str, path: str, token: str | None = "tok") -> Any:
        headers = {b"Authorization": [f"Bearer {token}".encode()]} if token else {}
        resp = yield treq.request(method, self.admin(path), headers=headers, persistent=False)
        body = yield treq.content(resp)
        return resp.code, body

    @inlineCallbacks
    def exchanges(self) -> Any:
        code, body = yield self.call_admin("GET", "/inspect")
        self.assertEqual(code, 200, body)
        return json.loads(body)["exchanges"]

    @inlineCallbacks
    def one(self, request_id: str) -> Any:
        code, body = yield self.call_admin("GET", f"/inspect/{request_id}")
        self.assertEqual(code, 200, body)
        return json.loads(body)

    @inlineCallbacks
    def wait_done(self, protocol: str, count: int = 1) -> Any:
        """Poll /inspect (bounded) until ``count`` finished exchanges of ``protocol`` are there."""
        found: list[Any] = []

        @inlineCallbacks
        def poll() -> Any:
            listed = yield self.exchanges()
            found[:] = [e for e in listed if e["protocol"] == protocol and e["done"]]
            return len(found) >= count

        for _ in range(200):
            done = yield poll()
            if done:
                return found
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no {count} finished {protocol} exchanges within the bound")

    @inlineCallbacks
    def post(self, path: str, body: bytes, **headers: bytes) -> Any:
        hdrs = {b"Host": [b"app.test"], **{k.replace("_", "-").encode(): [v] for k, v in headers.items()}}
        resp = yield treq.post(self.stack.url(path), data=body, headers=hdrs, persistent=False)
        content = yield treq.content(resp)
        return resp.code, content



class InspectorTests(_InspectorCase):
    # -- capture --------------------------------------------------------------------

    @inlineCallbacks
    def test_http_capture_with_body_and_masking(self) -> Any:
        """An HTTP POST is captured: method, path, headers both ways masked, status, sizes, both bodies."""
        code, _ = yield self.post("/api/items?x=1", b'{"name": "widget"}', Authorization=b"Bearer top-secret",
                                  Cookie=b"sid=also-secret", Proxy_Authorization=b"Basic c2VjcmV0",
                                  Content_Type=b"application/json")
        self.assertEqual(code, 200)
        [ex] = yield self.wait_done("http")
        self.assertEqual((ex["route"], ex["status"], ex["client_id"], ex["request"]["method"], ex["request"]["path"]),
                         ("web", 200, "inspected", "POST", "/api/items?x=1"))
        self.assertEqual((ex["bytes_in"], ex["response"]["status"]), (18, 200))
        self.assertGreater(ex["bytes_out"], 0)
        self.assertTrue(ex["replayable"])
        heads = {n.lower(): v for n, v in ex["request"]["headers"]}
        self.assertEqual((heads["authorization"], heads["cookie"], heads["proxy-authorization"]), ("***",) * 3)
        self.assertEqual(heads["content-type"], "application/json")
        self.assertEqual({n.lower(): v for n, v in ex["response"]["headers"]}["set-cookie"], "***")
        full = yield self.one(ex["request_id"])
        self.assertEqual(base64.b64decode(full["request"]["body"]), b'{"name": "widget"}')
        self.assertEqual(json.loads(base64.b64decode(full["response"]["body"])), {"n": 1, "got": 18})
        self.assertTrue(full["response"]["body_complete"])
        code, raw = yield self.call_admin("GET", "/inspect")
        for secret in (b"top-secret", b"also-secret", b"c2VjcmV0", b"secret-session"):
            self.assertNotIn(secret, raw)

    @inlineCallbacks
    def test_websocket_messages_both_ways(self) -> Any:
        """A WebSocket: the handshake, each message in and out with its size and first bytes, the close code."""
        port = self.stack.http_port

        def talk() -> list[str]:
            with connect(f"ws://127.0.0.1:{port}/room") as ws:
                answers = []
                for text in ("one", "two", "three"):
                    ws.send(text)
                    answers.append(str(ws.recv(timeout=10)))
                ws.send(b"\x00\x01binary")
                answers.append(repr(ws.recv(timeout=10)))
                return answers

        answers = yield self.in_thread(talk)
        self.assertEqual(answers[:3], ["echo:one", "echo:two", "echo:three"])
        [ex] = yield self.wait_done("websocket")
        self.assertEqual((ex["route"], ex["status"], ex["response"]["status"], ex["request"]["path"]),
                         ("chat", 1000, 101, "/room"))
        msgs = [(m["direction"], m["size"], m["opcode"], base64.b64decode(m["data"])) for m in ex["messages"]]
        self.assertEqual(msgs, [("in", 3, 1, b"one"), ("out", 8, 1, b"echo:one"), ("in", 3, 1, b"two"),
                                ("out", 8, 1, b"echo:two"), ("in", 5, 1, b"three"), ("out", 10, 1, b"echo:three"),
                                ("in", 8, 2, b"\x00\x01binary"), ("out", 13, 2, b"echo:\x00\x01binary")])
        self.assertEqual((ex["bytes_in"], ex["bytes_out"]), (19, 39))
        code, body = yield self.call_admin("POST", f"/inspect/{ex['request_id']}/replay")
        self.assertEqual(code, 409, body)

    @inlineCallbacks
    def test_grpc_unary_and_streaming(self) -> Any:
        """gRPC calls: service, method, metadata (auth masked), each message, status, details and trailers."""
        target = f"127.0.0.1:{self.stack.grpc_port}"

        def calls() -> tuple[bytes, list[bytes]]:
            with grpc.insecure_channel(target) as channel:
                unary = channel.unary_unary(f"/{RAW_SERVICE}/Echo")
                answer = unary(b"ping", metadata=[("x-user", "ann"), ("authorization", "Bearer grpc-secret"),
                                                  ("x-auth-bin", b"\x01\x02")], timeout=10)
                chat = channel.stream_stream(f"/{RAW_SERVICE}/Chat")
                replies = [bytes(r) for r in chat(iter([b"a", b"bb", b"ccc"]), timeout=10)]
                return bytes(answer), replies

        answer, replies = yield self.in_thread(calls)
        self.assertEqual((answer, replies), (b"ping", [b"re: a", b"re: bb", b"re: ccc"]))
        found = yield self.wait_done("grpc", 2)
        by_method = {e["request"]["method"]: e for e in found}
        echo, chat = by_method["Echo"], by_method["Chat"]
        self.assertEqual((echo["route"], echo["status"], echo["request"]["service"]), ("raw", "OK", RAW_SERVICE))
        meta = dict((k, v) for k, v in echo["request"]["metadata"])
        self.assertEqual((meta["x-user"], meta["authorization"], meta["x-auth-bin"]), ("ann", "***", "***"))
        self.assertIn(["x-trailer", "done"], echo["response"]["trailers"])
        self.assertEqual([(m["direction"], base64.b64decode(m["data"])) for m in echo["messages"]],
                         [("in", b"ping"), ("out", b"ping")])
        self.assertEqual(sorted((m["direction"], base64.b64decode(m["data"])) for m in chat["messages"]),
                         [("in", b"a"), ("in", b"bb"), ("in", b"ccc"),
                          ("out", b"re: a"), ("out", b"re: bb"), ("out", b"re: ccc")])
        self.assertEqual((chat["bytes_in"], chat["bytes_out"], chat["status"]), (6, 18, "OK"))
        _, raw = yield self.call_admin("GET", "/inspect")
        self.assertNotIn(b"grpc-secret", raw)

    @inlineCallbacks
    def test_grpc_refusal_counted_under_its_route(self) -> Any:
        """A gRPC call refused for want of a client is recorded and counted under the route it matched."""
        target = f"127.0.0.1:{self.stack.grpc_port}"

        def call() -> grpc.StatusCode:
            with grpc.insecure_channel(target) as channel:
                try:
                    channel.unary_unary("/tunneld.test.Nobody/Call")(b"x", timeout=10)
                except grpc.RpcError as e:
                    return e.code()  # type: ignore[no-any-return]
            raise AssertionError("the call succeeded")

        code = yield self.in_thread(call)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        [ex] = yield self.wait_done("grpc")
        self.assertEqual((ex["route"], ex["status"]), ("nobody", "UNAVAILABLE"))
        metrics = self.stack.server.hub.metrics  # type: ignore[union-attr]
        yield wait_for(lambda: metrics.tally.get(("grpc", "nobody", "UNAVAILABLE")) == 1, what="the refusal counted")

    # -- replay -------------------------------------------------------------------------

    @inlineCallbacks
    def test_replay_reaches_the_backend_again(self) -> Any:
        """Replay sends the same method, path, headers (bar hop-by-hop) and body again; a new exchange records it."""
        code, _ = yield self.post("/api/orders?id=7", b"order=42&qty=3", X_Custom=b"kept",
                                  Authorization=b"Bearer keep-me", Content_Type=b"application/x-www-form-urlencoded")
        self.assertEqual(code, 200)
        [ex] = yield self.wait_done("http")
        code, body = yield self.call_admin("POST", f"/inspect/{ex['request_id']}/replay")
        self.assertEqual(code, 200, body)
        new_id = json.loads(body)["request_id"]
        self.assertNotEqual(new_id, ex["request_id"])
        yield wait_for(lambda: len(self.recorder.seen) == 2, what="the replay at the backend")
        (m1, u1, h1, b1), (m2, u2, h2, b2) = self.recorder.seen
        self.assertEqual((m2, u2, b2), (m1, u1, b1))
        self.assertEqual((m2, u2, b2), (b"POST", b"/api/orders?id=7", b"order=42&qty=3"))
        strip = lambda hs: sorted((n, v) for n, v in hs if n not in HOP_BY_HOP)  # noqa: E731
        self.assertEqual(strip(h2), strip(h1))
        self.assertIn((b"authorization", b"Bearer keep-me"), h2)
        found = yield self.wait_done("http", 2)
        [replayed] = [e for e in found if e["request_id"] == new_id]
        self.assertEqual((replayed["replay_of"], replayed["status"], replayed["route"]), (ex["request_id"], 200, "web"))
        full = yield self.one(new_id)
        self.assertEqual(json.loads(base64.b64decode(full["response"]["body"])), {"n": 2, "got": 14})

    @inlineCallbacks
    def test_replay_routes_on_the_normalised_path(self) -> Any:
        """A request made to a path variant replays to the same route and the backend gets the same normalised path."""
        code, _ = yield self.post("/x/../api//orders?id=8", b"order=1")
        self.assertEqual(code, 200)
        [ex] = yield self.wait_done("http")
        self.assertEqual(ex["request"]["path"], "/x/../api//orders?id=8")   # recorded as it came
        code, body = yield self.call_admin("POST", f"/inspect/{ex['request_id']}/replay")
        self.assertEqual(code, 200, body)
        yield wait_for(lambda: len(self.recorder.seen) == 2, what="the replay at the backend")
        self.assertEqual([u for _, u, _, _ in self.recorder.seen], [b"/api/orders?id=8"] * 2)

    @inlineCallbacks
    def test_replay_refused_when_body_not_whole_and_unknown_ids(self) -> Any:
        """409 for a body bigger than inspect_body_bytes; 404 for an unknown id; 405 for a GET on replay."""
        code, _ = yield self.post("/big", b"x" * (self.body_bytes + 1))
        self.assertEqual(code, 200)
        [ex] = yield self.wait_done("http")
        self.assertFalse(ex["replayable"])
        code, body = yield self.call_admin("POST", f"/inspect/{ex['request_id']}/replay")
        self.assertEqual(code, 409, body)
        self.assertEqual(len(self.recorder.seen), 1)
        code, _ = yield self.call_admin("POST", "/inspect/nope/replay")
        self.assertEqual(code, 404)
        code, _ = yield self.call_admin("GET", f"/inspect/{ex['request_id']}/replay")
        self.assertEqual(code, 405)

    @inlineCallbacks
    def test_token_required(self) -> Any:
        """Every /inspect endpoint answers 401 without the admin token (and with a wrong one)."""
        yield self.post("/x", b"")
        [ex] = yield self.wait_done("http")
        for method, path in (("GET", "/inspect"), ("GET", f"/inspect/{ex['request_id']}"),
                             ("POST", f"/inspect/{ex['request_id']}/replay")):
            for token in (None, "wrong"):
                code, _ = yield self.call_admin(method, path, token)
                self.assertEqual(code, 401, (method, path, token))
        self.assertEqual(len(self.recorder.seen), 1)


class RingBoundTests(_InspectorCase):
    inspect = 3
    body_bytes = 8

    @inlineCallbacks
    def test_ring_keeps_the_last_exchanges(self) -> Any:
        """More exchanges and bigger bodies than the limits: 3 kept, newest first, 8 bytes of each body."""
        for n in range(7):
            code, _ = yield self.post(f"/n/{n}", b"y" * 5000)
            self.assertEqual(code, 200)
        found = yield self.wait_done("http", 3)
        listed = yield self.exchanges()
        self.assertEqual(len(listed), 3)
        self.assertEqual([e["request"]["path"] for e in listed], ["/n/6", "/n/5", "/n/4"])
        full = yield self.one(found[0]["request_id"])
        self.assertEqual(base64.b64decode(full["request"]["body"]), b"y" * 8)
        self.assertEqual(full["bytes_in"], 5000)
        inspector = self.stack.server.hub.inspector  # type: ignore[union-attr]
        self.assertEqual(len(inspector), 3)
        self.assertLessEqual(max(len(r.request_body) + len(r.response_body) for r in inspector), 16)


class OffTests(TestCase):
    """inspect = 0: no inspector, /inspect answers 404."""

    @inlineCallbacks
    def test_off(self) -> Any:
        """With inspect = 0 the hub has no inspector and the entries none either."""
        stack = Stack([{"name": "web", "group": "default", "backend": "http://127.0.0.1:1"}],
                      server={"admin_listen": "127.0.0.1:0", "inspect": 0})
        yield stack.start()
        try:
            assert stack.server is not None
            self.assertIsNone(stack.server.hub.inspector)
            self.assertIsNone(stack.server.hub.entry.inspector)
            resp = yield treq.get(f"http://127.0.0.1:{stack.server.admin.port.getHost().port}/inspect".encode(),
                                  persistent=False)
            yield treq.content(resp)
            self.assertEqual(resp.code, 404)
        finally:
            yield stack.stop()


class ClientInspectorTests(TestCase):
    """The client's admin port inspects (and replays) requests through its http_entry."""

    timeout = 60

    @inlineCallbacks
    def test_client_http_entry_captured_and_replayed(self) -> Any:
        """A POST through the client's http_entry is captured on the client's /inspect and replays upstream."""
        recorder = Recorder()
        upstream = reactor.listenTCP(0, server.Site(recorder), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        stack = Stack([], upstreams=[{"name": "api", "backends": [f"http://127.0.0.1:{upstream.getHost().port}"]}],
                      forward=[{"name": "api", "host": "api.internal", "upstream": "api"}])
        yield stack.start()
        self.addCleanup(stack.stop)
        client = yield stack.add_client(http_entry="127.0.0.1:0", admin_listen="127.0.0.1:0", admin_token="ct",
                                        inspect_body_bytes=100)
        entry = yield stack.entry_port(client)
        resp = yield treq.post(f"http://127.0.0.1:{entry}/orders".encode(), data=b"n=1",
                               headers={b"Host": [b"api.internal"]}, persistent=False)
        yield treq.content(resp)
        self.assertEqual(resp.code, 200)
        admin = f"http://127.0.0.1:{client.admin.port.getHost().port}"
        auth = {b"Authorization": [b"Bearer ct"]}
        yield wait_for(lambda: len(client.hub.inspector) == 1 and next(iter(client.hub.inspector)).done,
                       what="the client's record")
        resp = yield treq.get(f"{admin}/inspect".encode(), headers=auth, persistent=False)
        [ex] = json.loads((yield treq.content(resp)))["exchanges"]
        self.assertEqual((ex["protocol"], ex["route"], ex["request"]["path"], ex["status"], ex["bytes_in"]),
                         ("http", "forward", "/orders", 200, 3))
        resp = yield treq.post(f"{admin}/inspect/{ex['request_id']}/replay".encode(), headers=auth, persistent=False)
        body = yield treq.content(resp)
        self.assertEqual(resp.code, 200, body)
        yield wait_for(lambda: len(recorder.seen) == 2, what="the replay upstream")
        self.assertEqual(recorder.seen[1][:2] + (recorder.seen[1][3],), (b"POST", b"/orders", b"n=1"))
