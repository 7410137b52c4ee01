"""gRPC end to end over loopback: caller -> server gRPC entry -> tunnel -> client -> gRPC backend.

The callers are grpcio's sync stubs run in threads (``deferToThread``), so the
reactor never blocks; the backends are a real ``grpc.server`` serving
grpcio-health-checking, grpcio-reflection and the raw-bytes test service of
tests/grpc_services.py.
"""

from __future__ import annotations

import hashlib
import queue
import struct
import time
from typing import Any, Iterator

import grpc
import treq as _treq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from tests.backends import test_site
from tests.grpc_services import MAX_MESSAGE, RAW_SERVICE, GrpcBackend
from tests.harness import Stack, rss_bytes, wait_for
from tests.test_e2e_http import HashingReader, PooledTestCase, free_port

MiB = 1024 * 1024
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def code_of(d: Deferred[Any]) -> Deferred[grpc.StatusCode]:
    """The status code a failed call ended with (fails the test if it succeeded)."""

    def ok(result: object) -> None:
        raise AssertionError(f"the call succeeded with {result!r}")

    def failed(failure: Any) -> grpc.StatusCode:
        failure.trap(grpc.RpcError)
        return failure.value.code()  # type: ignore[no-any-return]

    return d.addCallbacks(ok, failed)


class GrpcEndToEndTests(PooledTestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.backend = GrpcBackend()
        site, self.held, _ = test_site()
        self.http_backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.stack = Stack([
            {"name": "web", "group": "default", "backend": f"http://127.0.0.1:{self.http_backend.getHost().port}"},
            {"name": "health", "group": "default", "grpc_service": HEALTH, "backend": self.backend.url},
            {"name": "reflection", "group": "default", "grpc_service": REFLECTION, "backend": self.backend.url,
             "max_message_size": 2 * MAX_MESSAGE},  # so the entry's own limit is above the raw route's
            {"name": "raw", "group": "default", "grpc_service": RAW_SERVICE, "backend": self.backend.url,
             "max_message_size": MAX_MESSAGE},
            {"name": "dead", "group": "default", "grpc_service": "tunneld.test.Dead",
             "backend": f"grpc://127.0.0.1:{free_port()}"},
            {"name": "lonely", "group": "lonely", "grpc_service": "tunneld.test.Lonely", "backend": self.backend.url},
        ], groups=[{"name": "default", "tokens": ["test-token"]}, {"name": "lonely", "tokens": ["x"]}],
            server={"grpc_listen": "127.0.0.1:0"})
        yield self.stack.start()
        self.client = yield self.stack.add_client()
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.stack.grpc_port}",
            options=[("grpc.max_receive_message_length", 2 * MAX_MESSAGE),
                     ("grpc.max_send_message_length", 2 * MAX_MESSAGE)],
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.held.release()
        yield deferToThread(self.channel.close)
        yield self.stack.stop()
        yield deferToThread(self.backend.stop)
        yield self.http_backend.stopListening()

    def raw(self, method: str, kind: str = "unary_unary") -> Any:
        return getattr(self.channel, kind)(f"/{RAW_SERVICE}/{method}")  # type: ignore[no-any-return]

    @inlineCallbacks
    def assertReleased(self) -> Any:
        """Both ends' request tables drain once a test's traffic is over."""
        yield wait_for(lambda: self.stack.server_in_flight() == 0 and self.stack.client_in_flight() == 0,
                       what="request tables to empty")

    # -- third-party services -------------------------------------------------------

    @inlineCallbacks
    def test_health_check_unary(self) -> Any:
        """grpc.health Check answers SERVING, and NOT_FOUND for an unknown service, through the tunnel."""
        resp = yield deferToThread(self.health.Check, health_pb2.HealthCheckRequest(service=""), timeout=10)
        self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)
        code = yield code_of(deferToThread(self.health.Check, health_pb2.HealthCheckRequest(service="nope"),
                                           timeout=10))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        yield self.assertReleased()

    @inlineCallbacks
    def test_health_watch_sees_a_change_mid_stream(self) -> Any:
        """A server-streaming Watch delivers the first status, then a change made at the backend mid-watch."""
        self.backend.health.set("svc", health_pb2.HealthCheckResponse.SERVING)
        stream = self.health.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=30)
        first = yield deferToThread(next, stream)
        self.assertEqual(first.status, health_pb2.HealthCheckResponse.SERVING)
        self.assertEqual(self.stack.server_in_flight(), 1)  # the watch is still open
        self.backend.health.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
        second = yield deferToThread(next, stream)
        self.assertEqual(second.status, health_pb2.HealthCheckResponse.NOT_SERVING)
        stream.cancel()
        yield self.assertReleased()

    @inlineCallbacks
    def test_reflection_bidi_lists_services(self) -> Any:
        """grpc reflection's bidi ServerReflectionInfo lists the backend's services and finds a symbol."""
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=HEALTH)]
        responses = yield deferToThread(lambda: list(stub.ServerReflectionInfo(iter(requests), timeout=10)))
        self.assertEqual(len(responses), 2)
        names = {s.name for s in responses[0].list_services_response.service}
        self.assertEqual(names, {HEALTH, REFLECTION, RAW_SERVICE})
        self.assertTrue(responses[1].file_descriptor_response.file_descriptor_proto)
        yield self.assertReleased()

    # -- the raw-bytes service -----------------------------------------------------------

    @inlineCallbacks
    def test_metadata_and_trailers_come_back_exact(self) -> Any:
        """Invocation metadata (repeats, order, -bin bytes) reaches the backend; its headers and trailers come back."""
        sent = (("x-a", "1"), ("x-a", "2"), ("x-blob-bin", b"\x00\x01\xff"), ("x-b", "three"))
        body, call = yield deferToThread(self.raw("Echo").with_call, b"hello", metadata=sent, timeout=10)
        self.assertEqual(body, b"hello")
        echoed = tuple(tuple(m) for m in call.initial_metadata())
        self.assertEqual(tuple(m for m in echoed if m[0] != "x-forwarded-for"), sent)
        self.assertIn(("x-forwarded-for", "127.0.0.1"), echoed)   # the caller's address reaches the backend
        self.assertEqual(tuple(tuple(m) for m in call.trailing_metadata()),
                         (("x-trailer", "done"), ("x-trailer-bin", b"\x00\xfe\xff")))
        self.assertEqual(call.code(), grpc.StatusCode.OK)
        yield self.assertReleased()

    @inlineCallbacks
    def test_a_unary_call_is_one_tunnel_message_each_way(self) -> Any:
        """Request head+message+half-close travel as one message; the answer's headers, message and status too."""
        assert self.stack.server is not None
        [stream] = list(self.stack.server.hub.streams.values())
        before_in, before_out = stream.tunnel.messages_in, stream.tunnel.messages_out
        calls = 20
        for i in range(calls):
            body = yield deferToThread(self.raw("Echo"), b"one %d" % i, timeout=10)
            self.assertEqual(body, b"one %d" % i)
        # A few heartbeats may ride along; a second message per call would double the counts.
        self.assertLessEqual(stream.tunnel.messages_out - before_out, calls + 3)
        self.assertLessEqual(stream.tunnel.messages_in - before_in, calls + 3)
        yield self.assertReleased()

    @inlineCallbacks
    def test_error_status_details_and_trailers_come_back_exact(self) -> Any:
        """A backend error keeps its code, details and trailing metadata (incl. -bin)."""
        try:
            yield deferToThread(self.raw("Deny"), b"alice", timeout=10)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.PERMISSION_DENIED)
            self.assertEqual(e.details(), "not for you: alice")
            self.assertEqual(tuple(tuple(m) for m in e.trailing_metadata()),
                             (("x-reason", "policy"), ("x-reason-bin", b"\x01\x02")))
        else:
            self.fail("Deny succeeded")
        yield self.assertReleased()

    @inlineCallbacks
    def test_client_streaming(self) -> Any:
        """A client-streaming call delivers every message (incl. empty ones) before the answer."""
        messages = [b"", b"a" * 10, b"b" * 70_000, b""] + [b"c" * 1000] * 500
        answer = yield deferToThread(self.raw("Sum", "stream_unary"), iter(messages), timeout=20)
        self.assertEqual(struct.unpack("!QQ", answer), (len(messages), sum(len(m) for m in messages)))
        yield self.assertReleased()

    @inlineCallbacks
    def test_bidi_ping_pong_never_waits_for_the_next_message(self) -> Any:
        """A bidi caller that waits for each answer before sending again gets it (nothing waits for a 2nd message)."""
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not None:
                yield item

        replies = self.raw("Chat", "stream_stream")(requests(), timeout=20)
        for word in (b"one", b"two", b"three"):
            outbox.put(word)
            reply = yield deferToThread(next, replies)
            self.assertEqual(reply, b"re: " + word)
        outbox.put(None)
        rest = yield deferToThread(list, replies)
        self.assertEqual(rest, [])
        yield self.assertReleased()

    @inlineCallbacks
    def test_bidi_where_the_server_speaks_first(self) -> Any:
        """A bidi caller that sends nothing until the backend spoke gets the backend's first message."""
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not None:
                yield item

        replies = self.raw("Greet", "stream_stream")(requests(), timeout=20)
        hello = yield deferToThread(next, replies)
        self.assertEqual(hello, b"ready")
        outbox.put(b"x")
        reply = yield deferToThread(next, replies)
        self.assertEqual(reply, b"re: x")
        outbox.put(None)
        self.assertEqual((yield deferToThread(list, replies)), [])
        yield self.assertReleased()

    @inlineCallbacks
    def test_caller_is_paused_while_the_backend_does_not_read(self) -> Any:
        """A client-streaming caller is held back by the window while the backend reads nothing; all arrives later."""
        from tunneld.protocols.h2.grpc_entry import _TunnelSide

        chunk = bytes(64 * 1024)
        n = 256  # 16 MiB: far more than the window and the HTTP/2 buffers on the way
        sent = [0]

        def requests() -> Iterator[bytes]:
            for _ in range(n):
                sent[0] += 1
                yield chunk

        future = self.raw("Gated", "stream_unary").future(requests(), timeout=60)
        assert self.stack.server is not None
        tunnels = [stream.tunnel for stream in self.stack.server.hub.streams.values()]

        def entry_paused() -> bool:
            return any(isinstance(h, _TunnelSide) and h.call.held for t in tunnels for h in t.handlers.values())

        yield wait_for(entry_paused, what="the entry to stop reading the caller")
        self.assertFalse(future.done())
        self.assertLess(sent[0], n)  # the caller itself is held back, nothing is buffered whole
        self.backend.raw.gate.set()
        answer = yield deferToThread(future.result)
        self.assertEqual(struct.unpack("!QQ", answer), (n, n * len(chunk)))
        yield self.assertReleased()

    @inlineCallbacks
    def test_slow_caller_stalls_only_itself_and_memory_stays_bounded(self) -> Any:
        """A caller reading 10 messages/s while the backend streams 100 MiB flat out: others are answered at once,
        memory stays bounded (the windows hold the backend back), cancelling releases everything."""
        rss_before = rss_bytes()
        call = self.raw("Count", "unary_stream")(struct.pack("!II", 100_000, 1024), timeout=60)
        got = [0]

        def read_slowly() -> None:
            for _ in call:
                got[0] += 1
                if got[0] >= 30:
                    return
                time.sleep(0.1)   # the slow reader itself, not a timing assertion

        reader = deferToThread(read_slowly)
        for i in range(10):
            started = time.monotonic()
            body = yield deferToThread(self.raw("Echo"), b"other %d" % i, timeout=10)
            self.assertEqual(body, b"other %d" % i)
            self.assertLess(time.monotonic() - started, 2.0)
        yield reader
        self.assertLess(rss_bytes() - rss_before, 64 * MiB)
        call.cancel()
        yield self.assertReleased()

    @inlineCallbacks
    def test_server_streaming_many_messages(self) -> Any:
        """A server-streaming call delivers 3000 messages in order."""
        stream = self.raw("Count", "unary_stream")(struct.pack("!II", 3000, 100), timeout=30)
        got = yield deferToThread(list, stream)
        self.assertEqual([struct.unpack("!I", m[:4])[0] for m in got], list(range(3000)))
        yield self.assertReleased()

    @inlineCallbacks
    def test_4_mib_message_each_way(self) -> Any:
        """A 4 MiB message reaches the backend whole, and a 4 MiB answer comes back (route max_message_size 8 MiB)."""
        payload = bytes(range(256)) * (4 * MiB // 256)
        answer = yield deferToThread(self.raw("Big"), payload, timeout=30)
        self.assertEqual(answer[:32], hashlib.sha256(payload).digest())
        self.assertEqual(len(answer), 32 + 4 * MiB)
        yield self.assertReleased()

    @inlineCallbacks
    def test_message_over_the_route_limit_is_resource_exhausted(self) -> Any:
        """A request message above the route's max_message_size ends the call with RESOURCE_EXHAUSTED."""
        try:
            yield deferToThread(self.raw("Big"), bytes(MAX_MESSAGE + 1), timeout=30)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn(f"larger than max ({MAX_MESSAGE + 1} vs. {MAX_MESSAGE})", e.details())
        else:
            self.fail("the call succeeded")
        yield self.assertReleased()

    @inlineCallbacks
    def test_deadline_reaches_the_backend(self) -> Any:
        """The caller's deadline travels: the caller gets DEADLINE_EXCEEDED and the backend call ends cancelled."""
        code = yield code_of(deferToThread(self.raw("Block"), b"", timeout=1.0))
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        yield wait_for(lambda: self.backend.raw.block_ended == [True], what="the backend call to end cancelled")
        [remaining] = self.backend.raw.block_deadlines
        assert remaining is not None
        self.assertTrue(0 < remaining < 1.5, remaining)  # the caller's 1 s (grpc-timeout rounds up a little)
        yield self.assertReleased()

    @inlineCallbacks
    def test_caller_cancel_reaches_the_backend(self) -> Any:
        """A caller that cancels (no deadline) cancels the backend call."""
        future = self.raw("Block").future(b"")
        yield wait_for(lambda: self.backend.raw.block_started == 1, what="the backend call to start")
        future.cancel()
        yield wait_for(lambda: self.backend.raw.block_ended == [True], what="the backend call to end cancelled")
        self.assertEqual(future.code(), grpc.StatusCode.CANCELLED)
        [remaining] = self.backend.raw.block_deadlines
        self.assertTrue(remaining is None or remaining > 1e6, remaining)  # no deadline: the cancel ended it
        yield self.assertReleased()

    @inlineCallbacks
    def test_caller_cancel_mid_stream_is_no_failure(self) -> Any:
        """A caller that cancels a stream while messages flow ends it as CANCELLED, logged as such, not as a failure.

        The entry's ``context.write`` can fail under the cancel (grpc's ExecuteBatchError) before
        grpc cancels the handler: that is the caller going away, not a bug worth a warning.
        """
        warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if "gRPC entry call" in text and "failed" in text:
                warnings.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def read_some_then_cancel() -> int:
            stream = self.raw("Count", "unary_stream")(struct.pack("!II", 1_000_000, 100), timeout=60)
            got = 0
            for _ in stream:
                got += 1
                if got == 200:
                    # Stop reading until the entry's write waits on the caller's flow-control
                    # window (not a timing assertion: the cancel is what is tested).
                    time.sleep(0.3)
                    stream.cancel()
                    break
            return got

        for _ in range(5):
            got = yield deferToThread(read_some_then_cancel)
            self.assertEqual(got, 200)
        yield self.assertReleased()
        self.assertEqual(warnings, [])

    # -- refusals and failures --------------------------------------------------------------

    @inlineCallbacks
    def test_unknown_service_is_unimplemented_naming_it(self) -> Any:
        """A service no route serves gets UNIMPLEMENTED with a message naming the service."""
        method = self.channel.unary_unary("/nowhere.Service/Call")
        try:
            yield deferToThread(method, b"", timeout=10)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.UNIMPLEMENTED)
            self.assertIn("nowhere.Service", e.details())
        else:
            self.fail("the call succeeded")
        yield self.assertReleased()

    @inlineCallbacks
    def test_group_without_client_is_unavailable(self) -> Any:
        """A route whose group has no connected client gets UNAVAILABLE naming the group."""
        method = self.channel.unary_unary("/tunneld.test.Lonely/Call")
        try:
            yield deferToThread(method, b"", timeout=10)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("lonely", e.details())
        else:
            self.fail("the call succeeded")
        yield self.assertReleased()

    @inlineCallbacks
    def test_unreachable_backend_is_unavailable(self) -> Any:
        """A backend nobody listens on: UNAVAILABLE naming the route, never the address behind the tunnel."""
        method = self.channel.unary_unary("/tunneld.test.Dead/Call")
        error = yield deferToThread(method, b"", timeout=10).addCallbacks(lambda r: self.fail(r), lambda f: f.value)
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("route 'dead'", error.details())
        self.assertNotIn("127.0.0.1", error.details())
        yield self.assertReleased()

    @inlineCallbacks
    def test_client_killed_mid_stream_is_unavailable_at_once(self) -> Any:
        """Killing the client's tunnel during a server-streaming call ends it with UNAVAILABLE promptly."""
        self.backend.health.set("svc", health_pb2.HealthCheckResponse.SERVING)
        stream = self.health.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=60)
        first = yield deferToThread(next, stream)
        self.assertEqual(first.status, health_pb2.HealthCheckResponse.SERVING)
        started = time.monotonic()
        assert self.client.dial.handle is not None
        self.client.dial.handle.abort("test kills the tunnel")
        code = yield code_of(deferToThread(next, stream))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertLess(time.monotonic() - started, 3.0)  # far below any heartbeat timeout
        self.assertEqual(self.stack.server_in_flight(), 0)
        yield self.assertReleased()

    # -- sharing the tunnel ---------------------------------------------------------------

    @inlineCallbacks
    def test_stalled_grpc_stream_and_http_download_do_not_block_small_requests(self) -> Any:
        """A stalled gRPC stream and a stalled HTTP download leave small HTTP and gRPC calls prompt; all finish."""
        stream = self.raw("Count", "unary_stream")(struct.pack("!II", 2000, 16 * 1024), timeout=60)
        first = yield deferToThread(next, stream)  # then nobody reads: the stream stalls
        self.assertEqual(struct.unpack("!I", first[:4])[0], 0)
        download = HashingReader()
        resp = yield self.http.get(self.stack.url(f"/bytes/{32 * MiB}"), unbuffered=True)
        resp.deliverBody(download)
        yield wait_for(lambda: download.n > 0, what="first download bytes")
        download.transport.pauseProducing()
        echo = self.raw("Echo")
        for i in range(10):
            started = time.monotonic()
            small = yield self.http.get(self.stack.url("/echo"))
            self.assertEqual(small.code, 200)
            yield _treq.content(small)
            body = yield deferToThread(echo, b"ping %d" % i, timeout=10)
            self.assertEqual(body, b"ping %d" % i)
            self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(self.stack.server_in_flight(), 2)  # the two stalled ones are still there
        download.transport.resumeProducing()
        rest = yield deferToThread(list, stream)
        yield download.done
        self.assertEqual([struct.unpack("!I", m[:4])[0] for m in rest], list(range(1, 2000)))
        self.assertEqual(download.n, 32 * MiB)
        yield self.assertReleased()
