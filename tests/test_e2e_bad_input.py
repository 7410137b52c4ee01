"""Malformed tunnel traffic on the real tunnel port ends only the offender."""

from __future__ import annotations

import queue
from typing import Any

import grpc
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.backends import test_site
from tests.harness import TOKEN, Stack, wait_for
from tunneld import tunnel_pb2 as pb
from tunneld.frames import frame_of
from tunneld.grpc_bridge.client import PROXY_METHOD


def _frame(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item                  # raw bytes, as a broken peer might send
    if isinstance(item, list):
        return frame_of(item)        # several messages in one frame
    return frame_of([item])          # one message per frame, as a simple peer sends


def rogue_session(port: int, messages: list[Any], token: str = TOKEN, read: int = 10,
                  method: str = "") -> tuple[list[pb.TunnelMessage], str]:
    """Speak to the tunnel port with a plain grpc client (in a thread); return what came back.

    Each item of ``messages`` is one gRPC message on the stream: a TunnelMessage
    (a frame of one), a list of them (one frame) or raw bytes.
    """
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    outbox: queue.Queue[pb.TunnelMessage | None] = queue.Queue()
    for m in messages:
        outbox.put(m)

    def requests() -> Any:
        while True:
            item = outbox.get(timeout=10)
            if item is None:
                return
            yield item

    got: list[pb.TunnelMessage] = []
    status = "OK"
    details = ""
    try:
        call = channel.stream_stream(method or PROXY_METHOD, request_serializer=_frame,
                                     response_deserializer=pb.TunnelFrame.FromString)(
            requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        for frame in call:
            got.extend(frame.messages)
            if len(got) >= read:
                break
        outbox.put(None)
    except grpc.RpcError as e:
        status = e.code().name
        details = e.details() or ""
    finally:
        outbox.put(None)
        channel.close()
    if details:
        got.append(pb.TunnelMessage(error_message=pb.ErrorMessage(message=details)))
    return got, status


def c2s(**payload: Any) -> pb.TunnelMessage:
    return pb.TunnelMessage(direction=pb.CLIENT_TO_SERVER, **payload)


def opening(stream_id: str, client_id: str = "rogue") -> pb.TunnelMessage:
    return c2s(protocol_type=pb.CONTROL,
               stream_open=pb.StreamOpenRequest(client_id=client_id, group="default", stream_id=stream_id))


def answers_for_unknown_requests() -> list[pb.TunnelMessage]:
    """A response and a window update for request_ids this stream never saw."""
    return [
        c2s(request_id="not-mine", protocol_type=pb.HTTP,
            http_response=pb.HttpResponse(status_code=200, is_first_chunk=True, is_last_chunk=True)),
        c2s(request_id="not-mine-2", protocol_type=pb.HTTP, window_update=pb.WindowUpdate(increment=5)),
    ]


class RogueStreamTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        site, self.held, self.never = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.stack = Stack([{"name": "web", "group": "default",
                             "backend": f"http://127.0.0.1:{self.backend.getHost().port}"}])
        yield self.stack.start()
        self.client = yield self.stack.add_client()
        self.pool = HTTPConnectionPool(reactor)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.stack.stop()
        yield self.backend.stopListening()

    @inlineCallbacks
    def assertLegitimateClientWorks(self) -> Any:
        resp = yield self.http.get(self.stack.url("/small"))
        self.assertEqual(resp.code, 200)
        self.assertEqual((yield treq.content(resp)), b"ok\n")
        yield wait_for(lambda: self.stack.server_in_flight() == 0, what="request table empty")

    @inlineCallbacks
    def test_message_before_stream_open_is_refused(self) -> Any:
        """A stream whose first message is not stream_open is ended (FAILED_PRECONDITION), nothing registered."""
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port,
                                          [c2s(heartbeat=pb.Heartbeat(sent_at_ms=1))])
        self.assertEqual(status, "FAILED_PRECONDITION")
        self.assertEqual(len(self.stack.server.hub.registry), 1)  # type: ignore[union-attr]
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_wrong_token_is_unauthenticated(self) -> Any:
        """A stream with a wrong token gets UNAUTHENTICATED."""
        open_msg = c2s(protocol_type=pb.CONTROL,
                       stream_open=pb.StreamOpenRequest(client_id="rogue", group="default", stream_id="r1"))
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port, [open_msg], "nope")
        self.assertEqual(status, "UNAUTHENTICATED")
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_responses_for_other_streams_requests_are_dropped(self) -> Any:
        """Answers for unknown request_ids, stray window updates and empty messages get ErrorMessages; others unaffected."""
        bad = [opening("r2"), *answers_for_unknown_requests()]
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port, bad, TOKEN, 3)
        kinds = [m.WhichOneof("payload") for m in got]
        self.assertEqual(kinds[0], "stream_open_response")
        errors = {m.request_id: m.error_message.code for m in got if m.WhichOneof("payload") == "error_message"}
        self.assertEqual(errors, {"not-mine": 400, "not-mine-2": 400})
        assert self.stack.server is not None
        yield wait_for(lambda: self.stack.server.hub.counters["violations"] >= 2, what="violations counted")
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_several_messages_in_one_frame_are_handled_in_order(self) -> Any:
        """A frame holding the open and two bad answers is handled as if they came one by one; an empty frame is ignored."""
        frame = [opening("f1"), *answers_for_unknown_requests()]
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port, [b"", frame], TOKEN, 3)
        kinds = [m.WhichOneof("payload") for m in got]
        self.assertEqual(kinds[0], "stream_open_response")
        errors = [(m.request_id, m.error_message.code) for m in got if m.WhichOneof("payload") == "error_message"]
        self.assertEqual(errors, [("not-mine", 400), ("not-mine-2", 400)])
        assert self.stack.server is not None
        yield wait_for(lambda: self.stack.server.hub.counters["violations"] >= 2, what="violations counted")
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_bytes_that_are_not_a_frame_abort_only_that_stream(self) -> Any:
        """A gRPC message that does not parse as a TunnelFrame ends that stream with ABORTED."""
        open_msg = c2s(protocol_type=pb.CONTROL,
                       stream_open=pb.StreamOpenRequest(client_id="rogue", group="default", stream_id="f2"))
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port,
                                          [open_msg, b"\x0a\xff\xff\xff\x0f garbage"], TOKEN, 5)
        self.assertEqual(got[0].WhichOneof("payload"), "stream_open_response")
        self.assertEqual(status, "ABORTED")
        assert self.stack.server is not None
        yield wait_for(lambda: len(self.stack.server.hub.registry) == 1, what="rogue stream dropped")
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_a_v1_client_gets_a_clear_unimplemented(self) -> Any:
        """A peer speaking wire v1 (tunneld.v1) is refused with UNIMPLEMENTED naming the version."""
        open_msg = c2s(protocol_type=pb.CONTROL,
                       stream_open=pb.StreamOpenRequest(client_id="old", group="default", stream_id="v1"))
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port, [open_msg], TOKEN, 1,
                                          "/tunneld.v1.TunnelService/Proxy")
        self.assertEqual(status, "UNIMPLEMENTED")
        self.assertIn("tunneld.v3", got[-1].error_message.message)
        self.assertIn("upgrade the client", got[-1].error_message.message)
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_second_stream_open_closes_only_that_stream(self) -> Any:
        """A second stream_open on an open stream is fatal for that stream only."""
        open_msg = c2s(protocol_type=pb.CONTROL,
                       stream_open=pb.StreamOpenRequest(client_id="rogue", group="default", stream_id="r3"))
        got, status = yield deferToThread(rogue_session, self.stack.tunnel_port, [open_msg, open_msg], TOKEN, 5)
        self.assertEqual(got[0].WhichOneof("payload"), "stream_open_response")
        self.assertEqual(status, "ABORTED")
        assert self.stack.server is not None
        yield wait_for(lambda: len(self.stack.server.hub.registry) == 1, what="rogue stream dropped")
        yield self.assertLegitimateClientWorks()

    @inlineCallbacks
    def test_a_client_cannot_answer_another_clients_request(self) -> Any:
        """A second (authenticated) stream answering a live request of the first is dropped; the real answer wins."""
        d = self.http.get(self.stack.url("/held"))
        yield wait_for(lambda: len(self.held.requests) == 1, what="request at the backend")
        assert self.stack.server is not None
        [stream] = list(self.stack.server.hub.streams.values())
        [rid] = stream.tunnel.session.request_ids()
        open_msg = c2s(protocol_type=pb.CONTROL,
                       stream_open=pb.StreamOpenRequest(client_id="impostor", group="default", stream_id="i1"))
        forged = c2s(request_id=rid, protocol_type=pb.HTTP, http_response=pb.HttpResponse(
            status_code=200, is_first_chunk=True, is_last_chunk=True, body=b"forged"))
        got, _ = yield deferToThread(rogue_session, self.stack.tunnel_port, [open_msg, forged], TOKEN, 2)
        self.assertEqual([m.error_message.code for m in got if m.request_id == rid], [400])
        self.held.release()
        resp = yield d
        body = yield treq.content(resp)
        self.assertEqual(body, b"data: first\n\ndata: last\n\n")
        self.assertGreaterEqual(self.stack.server.hub.counters["violations"], 1)


class OldServerTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_client_against_a_v1_server_says_so_and_keeps_retrying(self) -> Any:
        """A server without tunneld.v3 answers UNIMPLEMENTED; the client logs the version mismatch and redials."""
        from concurrent.futures import ThreadPoolExecutor

        from twisted.logger import globalLogPublisher

        from tunneld.client_tap import build_client
        from tunneld.config import parse_client_config

        old = grpc.server(ThreadPoolExecutor(2))  # speaks no tunneld.v3: every call is UNIMPLEMENTED
        port = old.add_insecure_port("127.0.0.1:0")
        old.start()
        self.addCleanup(old.stop, None)
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if "reason" in event and ("tunnel to" in str(event.get("log_format", ""))
                                      or "cannot reach the server" in str(event.get("log_format", ""))):
                lines.append(str(event["reason"]))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        config = parse_client_config({"client": {"server": f"127.0.0.1:{port}", "token": TOKEN}}, "c.toml")
        app = build_client(config, reactor)
        app.service.startService()
        try:
            yield wait_for(lambda: app.dial.attempts >= 2 and any("another tunnel protocol" in x for x in lines),
                           what="a second attempt and the version line")
            line = next(x for x in lines if "another tunnel protocol" in x)
            self.assertIn("tunneld.v3", line)
            self.assertFalse(app.hub.is_connected)
        finally:
            yield app.service.stopService()
