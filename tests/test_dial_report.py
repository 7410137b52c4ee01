"""A client's dial diagnostics: "cannot reach" vs "lost", one warning after 3 failed dials, /status in words.

Pure tests of ``DialHistory`` / ``explain`` on grpc's real error texts, and
loopback tests of a real client against a closed port and against a port
that speaks HTTP/1.1.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from tests.harness import wait_for
from tests.processes import free_port
from tunneld.admin import client_status
from tunneld.client_tap import build_client
from tunneld.config import parse_client_config
from tunneld.dial_report import DialHistory, explain
from tunneld.grpc_bridge.client import Backoff

REFUSED = ("UNAVAILABLE: failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7001: "
           "Failed to connect to remote host: Connection refused")
HTTP1 = ("UNAVAILABLE: failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:8080: "
         "Failed parsing HTTP/2 (Expected SETTINGS frame as the first frame, got frame type 80)")
TLS_ON_PLAIN = ("UNAVAILABLE: failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7000: Tls "
                "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
                "routines:OPENSSL_internal:WRONG_VERSION_NUMBER")
PLAIN_ON_TLS = ("UNAVAILABLE: failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:7000: "
                "recvmsg:Connection reset by peer (104)")
TOKEN = "UNAUTHENTICATED: invalid token for group 'default'"


class ExplainTests(SynchronousTestCase):
    """grpc's error texts in words, with the likely cause."""

    def test_causes(self) -> None:
        """Nothing listens; HTTP/1.1 port; TLS expected or not; wrong token."""
        self.assertIn("nothing listens there", explain(REFUSED, tls=False)[1])
        self.assertEqual(explain(REFUSED, tls=False)[0], "connection refused")
        self.assertIn("that port speaks HTTP/1.1, not the tunnel", explain(HTTP1, tls=False)[1])
        self.assertIn("TLS expected, but that port speaks plain text", explain(TLS_ON_PLAIN, tls=True)[1])
        self.assertIn("may expect TLS", explain(PLAIN_ON_TLS, tls=False)[1])
        self.assertIn("wrong token", explain(TOKEN, tls=False)[1])
        self.assertEqual(explain("UNKNOWN: something new", tls=False), ("UNKNOWN: something new", ""))


class HistoryTests(SynchronousTestCase):
    """What each ended dial logs."""

    def test_never_connected_warns_once_at_the_third_failure(self) -> None:
        """1st, 2nd: cannot_reach; 3rd: warn; later: quiet; /status says "cannot reach" with the cause."""
        h = DialHistory("127.0.0.1:7001", tls=False)
        kinds = []
        for _ in range(5):
            h.dialing()
            kinds.append(h.failed(REFUSED).kind)
        self.assertEqual(kinds, ["cannot_reach", "cannot_reach", "warn", "quiet", "quiet"])
        self.assertEqual(h.summary(), "cannot reach 127.0.0.1:7001: 5 failed dials in a row; last error: connection "
                                      "refused; likely cause: nothing listens there: is the server running, and is "
                                      "`server` its tunnel_listen address?")

    def test_lost_after_up_then_counts_again(self) -> None:
        """A stream that was up is "lost" (not counted); the redials that fail count from 1 again."""
        h = DialHistory("s:1", tls=False)
        h.dialing()
        h.accepted()
        self.assertEqual(h.summary(), "connected to s:1")
        report = h.failed("UNAVAILABLE: Socket closed")
        self.assertEqual((report.kind, report.words), ("lost", "UNAVAILABLE: Socket closed"))
        h.dialing()
        self.assertEqual(h.failed(REFUSED).kind, "cannot_reach")
        self.assertEqual(h.failures, 1)
        self.assertTrue(h.summary().startswith("lost the tunnel and cannot reach s:1: 1 failed dial in a row"))
        h.dialing()
        h.accepted()
        self.assertEqual((h.failures, h.last_error), (0, ""))


class LoopbackDialTests(TestCase):
    """A real client dialling a closed port, and a port that speaks HTTP/1.1."""

    timeout = 60

    @inlineCallbacks
    def dial_until_quiet(self, target: str) -> Any:
        """Run a client against ``target`` until 4 dials failed; its dial log lines and /status."""
        config = parse_client_config({"client": {"server": target, "token": "t" * 16, "dial_jitter": 0}},
                                     "test-client.toml")
        app = build_client(config, reactor)
        app.dial.backoff = Backoff(initial=0.05, cap=0.1)
        events: list[Any] = []

        def observe(event: Any) -> None:
            if event.get("log_namespace", "").endswith("TunnelClientService"):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        app.service.startService()
        self.addCleanup(app.service.stopService)
        yield wait_for(lambda: app.dial.history.failures >= 4, timeout=30, what="4 failed dials")
        status = client_status(app.hub, None, time.time())
        return [(e["log_level"], formatEvent(e)) for e in events], status["servers"][0]

    def assert_pattern(self, lines: list[tuple[Any, str]], target: str, cause: str) -> None:
        loud = [(level, text) for level, text in lines if level != LogLevel.debug]
        self.assertEqual([level for level, _ in loud], [LogLevel.info, LogLevel.info, LogLevel.warn], loud)
        self.assertTrue(all(text.startswith(f"cannot reach the server at {target}") for _, text in loud), loud)
        self.assertIn("3 dials in a row failed", loud[2][1])
        self.assertIn(f"likely cause: {cause}", loud[2][1])
        self.assertFalse(any(" lost " in text for _, text in lines), lines)
        self.assertGreaterEqual(len([1 for level, _ in lines if level == LogLevel.debug]), 1)

    @inlineCallbacks
    def test_closed_port(self) -> Any:
        """Nothing listens: two info lines, one warning naming the cause, then quiet; /status says the same."""
        target = f"127.0.0.1:{free_port()}"
        lines, status = yield self.dial_until_quiet(target)
        self.assert_pattern(lines, target, "nothing listens there")
        self.assertIn(f"cannot reach {target}:", status["diagnosis"])
        self.assertEqual((status["last_error"], status["ever_connected"]), ("connection refused", False))
        self.assertIn("nothing listens there", status["likely_cause"])

    @inlineCallbacks
    def test_http_port(self) -> Any:
        """A port that speaks HTTP/1.1: the warning says so, not grpc's parser error."""
        root = resource.Resource()
        port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        target = f"127.0.0.1:{port.getHost().port}"
        lines, status = yield self.dial_until_quiet(target)
        self.assert_pattern(lines, target, "that port speaks HTTP/1.1, not the tunnel")
        self.assertIn("that port speaks HTTP/1.1", status["diagnosis"])


class WrongTokenTests(TestCase):
    """A real client with a token the real server refuses: the warning says "wrong token"."""

    timeout = 60

    @inlineCallbacks
    def test_wrong_token(self) -> Any:
        """Three refused opens: one warning naming the token as the likely cause; /status says the same."""
        from tests.harness import Stack

        stack = Stack([])
        yield stack.start()
        self.addCleanup(stack.stop)
        config = parse_client_config({"client": {"server": f"127.0.0.1:{stack.tunnel_port}", "token": "w" * 20,
                                                 "dial_jitter": 0}}, "test-client.toml")
        app = build_client(config, reactor)
        app.dial.backoff = Backoff(initial=0.05, cap=0.1)
        app.service.startService()
        self.addCleanup(app.service.stopService)
        yield wait_for(lambda: app.dial.history.failures >= 3, timeout=30, what="3 refused opens")
        status = client_status(app.hub, None, time.time())["servers"][0]
        self.assertEqual(status["last_error"], "the server refused the token")
        self.assertIn("wrong token", status["likely_cause"])
        self.assertFalse(app.hub.is_connected)
