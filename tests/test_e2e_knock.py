"""Who knocks on the tunnel port, over loopback (SPEC §8.2): refused opens logged, counted, throttled.

A brute force of wrong tokens from 127.0.0.1 meets a real server; a real
tunneld client with the right token dials through a relay bound to
127.0.0.2 ("another address") and must open while 127.0.0.1 is throttled.
"""

from __future__ import annotations

import json
import queue
import time
from typing import Any

import grpc
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.harness import TOKEN, Stack, wait_for
from tests.test_admin import metric
from tunneld import tunnel_pb2 as pb
from tunneld.grpc_bridge.server import SERVICE

PROXY_METHOD = f"/{SERVICE}/Proxy"


def _frame(msg: pb.TunnelMessage) -> bytes:
    return pb.TunnelFrame(messages=[msg]).SerializeToString()


def knock(port: int, tokens: list[str], group: str = "default", first: pb.TunnelMessage | None = None) -> list[str]:
    """Open one Proxy call per token on one channel (as a brute force would); each call's final status name.

    A call that opened (the right token, served) is ended by the client after
    the StreamOpenResponse and reported "OK"."""
    results = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        proxy = channel.stream_stream(PROXY_METHOD, request_serializer=_frame,
                                      response_deserializer=pb.TunnelFrame.FromString)
        for n, token in enumerate(tokens):
            outbox: queue.Queue[pb.TunnelMessage | None] = queue.Queue()
            outbox.put(first if first is not None else pb.TunnelMessage(
                protocol_type=pb.CONTROL, stream_open=pb.StreamOpenRequest(
                    client_id=f"knock-{n}", group=group, stream_id=f"k{n}", version="test")))

            def requests() -> Any:
                while (item := outbox.get(timeout=10)) is not None:
                    yield item

            call = proxy(requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            try:
                next(iter(call))
                results.append("OK")
                call.cancel()
            except grpc.RpcError as e:
                results.append(e.code().name)
            finally:
                outbox.put(None)
    return results


class _FromOtherAddress(portforward.ProxyServer):
    """portforward's relay, dialling out from 127.0.0.2 (the tunnel port sees "another address")."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        client = self.clientProtocolFactory()
        client.setServer(self)
        reactor.connectTCP(self.factory.host, self.factory.port, client, bindAddress=("127.0.0.2", 0))


class RelayFactory(portforward.ProxyFactory):
    protocol = _FromOtherAddress

    def __init__(self, target: int) -> None:
        super().__init__("127.0.0.1", target)


def capture_refusals(case: TestCase) -> list[dict[str, Any]]:
    """The 'refused tunnel open' log events of this test."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_format", "")).startswith("refused tunnel open from"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class BruteForceTests(TestCase):
    """200 wrong opens from 127.0.0.1, then the right token from 127.0.0.2 and from 127.0.0.1."""

    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:
        self.events = capture_refusals(self)
        # open_rate 1/s with 12 at once: if throttled opens took tokens, the client from
        # 127.0.0.2 would find the bucket empty (and limiter.allowed would say so).
        self.stack = Stack([], server={"admin_listen": "127.0.0.1:0", "open_rate": 1, "open_burst": 12,
                                       "auth_fail_limit": 10, "auth_fail_window": 60})
        yield self.stack.start()
        self.addCleanup(self.stack.stop)
        assert self.stack.server is not None
        self.hub = self.stack.server.hub
        assert self.hub.open_guard is not None
        self.hub.open_guard.log_interval = 1.0   # real time: held-back counts come out after 1 s, not 10

    @inlineCallbacks
    def test_brute_force_is_throttled_logged_counted_and_others_still_open(self) -> Any:
        """10 UNAUTHENTICATED then RESOURCE_EXHAUSTED; 127.0.0.2 opens meanwhile; bounded lines with the right count."""
        results = yield deferToThread(knock, self.stack.tunnel_port, ["wrong-token"] * 200)
        self.assertEqual(results[:10], ["UNAUTHENTICATED"] * 10)
        self.assertEqual(results[10:], ["RESOURCE_EXHAUSTED"] * 190)
        guard = self.hub.open_guard
        assert guard is not None

        # The right token from the throttled address is refused before it is compared.
        again = yield deferToThread(knock, self.stack.tunnel_port, [TOKEN])
        self.assertEqual(again, ["RESOURCE_EXHAUSTED"])

        # A real client from another address opens during the throttle.
        relay = reactor.listenTCP(0, RelayFactory(self.stack.tunnel_port), interface="127.0.0.1")
        self.addCleanup(relay.stopListening)
        client = yield self.stack.add_client(server=f"127.0.0.1:{relay.getHost().port}", dial_jitter=0)
        [entry] = [e for e in self.hub.registry.streams() if e.client_id == client.hub.client_id]
        self.assertTrue(entry.address.startswith("ipv4:127.0.0.2:"), entry.address)

        self.assertEqual(guard.counts, {"accepted": 1, "unauthenticated": 10, "malformed": 0,
                                        "rate_limited": 0, "throttled": 191})
        limiter = self.stack.server.tunnel.limiter   # type: ignore[union-attr]
        self.assertEqual(limiter.allowed, 11)   # the 10 wrong opens and the client; never a throttled one

        # Log: at most one line per address per interval, the counts adding up to every refusal.
        def logged(address: str) -> int:
            return sum(e["count"] for e in self.events if e["address"] == address)

        yield wait_for(lambda: logged("127.0.0.1") == 201, what="every refusal from 127.0.0.1 in the log")
        lines = [e for e in self.events if e["address"] == "127.0.0.1"]
        self.assertLessEqual(len(lines), 4, [formatEvent(e) for e in lines])
        self.assertEqual(lines[0]["count"], 1)
        self.assertEqual(lines[0]["group"], "default")
        self.assertIn("refused tunnel open from 127.0.0.1: wrong token", formatEvent(lines[0]))
        self.assertEqual(sum(e["by_result"].get("throttled", 0) for e in lines), 191)
        self.assertEqual(logged("127.0.0.2"), 0)

        # Counted on /metrics and /status.
        admin = f"http://127.0.0.1:{self.stack.server.admin.port.getHost().port}"   # type: ignore[union-attr]
        resp = yield treq.get(f"{admin}/metrics".encode(), persistent=False)
        text = (yield treq.content(resp)).decode()
        for result, n in (("accepted", 1), ("unauthenticated", 10), ("throttled", 191), ("rate_limited", 0),
                          ("malformed", 0)):
            self.assertEqual(metric(text, "tunneld_tunnel_opens_total", result=result), n, result)
        resp = yield treq.get(f"{admin}/status".encode(), persistent=False)
        status = json.loads((yield treq.content(resp)))
        self.assertEqual(status["tunnel_opens"]["throttled"], 191)
        self.assertEqual(status["tunnel_opens"]["accepted"], 1)

    @inlineCallbacks
    def test_malformed_and_unknown_group_count_toward_the_throttle(self) -> Any:
        """A first message that is not stream_open is 'malformed'; an unknown group is 'unauthenticated'."""
        results = yield deferToThread(knock, self.stack.tunnel_port, [TOKEN] * 3, "no-such-group")
        self.assertEqual(results, ["UNAUTHENTICATED"] * 3)
        guard = self.hub.open_guard
        assert guard is not None
        self.assertEqual(guard.counts["unauthenticated"], 3)
        yield wait_for(lambda: any(e["group"] == "no-such-group" for e in self.events), what="a line naming the group")
        heartbeat = pb.TunnelMessage(protocol_type=pb.CONTROL, heartbeat=pb.Heartbeat())
        results = yield deferToThread(knock, self.stack.tunnel_port, [TOKEN] * 8, first=heartbeat)
        self.assertEqual(results, ["FAILED_PRECONDITION"] * 7 + ["RESOURCE_EXHAUSTED"])
        self.assertEqual((guard.counts["malformed"], guard.counts["throttled"]), (7, 1))


class WindowPassesTests(TestCase):
    """With a short window (real time), the throttled address is served again once it has passed."""

    timeout = 60

    @inlineCallbacks
    def test_served_again_after_the_window(self) -> Any:
        """10 wrong opens throttle 127.0.0.1 for auth_fail_window (1 s); then the right token opens."""
        stack = Stack([], server={"auth_fail_limit": 10, "auth_fail_window": 1})
        yield stack.start()
        self.addCleanup(stack.stop)
        results = yield deferToThread(knock, stack.tunnel_port, ["wrong-token"] * 10 + [TOKEN])
        self.assertEqual(results, ["UNAUTHENTICATED"] * 10 + ["RESOURCE_EXHAUSTED"])
        # Bounded poll: the window is 1 s; allow up to 10 s on a loaded machine.
        deadline = time.monotonic() + 10
        while True:
            got = yield deferToThread(knock, stack.tunnel_port, [TOKEN])
            if got == ["OK"]:
                break
            self.assertEqual(got, ["RESOURCE_EXHAUSTED"])
            self.assertLess(time.monotonic(), deadline, "still throttled 10 s after a 1 s window")
            yield deferLater(reactor, 0.2, lambda: None)
