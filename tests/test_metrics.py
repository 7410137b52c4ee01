"""Request metrics bookkeeping, status classes and the flow-control stall counter (no sockets)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.trial.unittest import SynchronousTestCase

from tests.session_pair import http_head, http_response_head
from tests.test_admin import metric
from tests.test_tunnel import Recorder, TunnelPair, responders
from tunneld.admin import RECENT_ERRORS, RequestMetrics, code_class, is_failure


def record(**fields: Any) -> dict[str, Any]:
    base = {"protocol": "http", "route": "web", "status": 200, "duration": 0.01, "bytes_in": 0, "bytes_out": 0,
            "request_id": "r", "trace_id": "t", "method": "GET", "path": "/"}
    base.update(fields)
    return base


class CodeClassTests(SynchronousTestCase):
    def test_http_statuses_become_classes(self) -> None:
        """HTTP and WebSocket statuses map to 1xx..5xx; anything unusable is "other"."""
        self.assertEqual([code_class("http", n) for n in (101, 200, 302, 404, 499, 502)],
                         ["1xx", "2xx", "3xx", "4xx", "4xx", "5xx"])
        self.assertEqual(code_class("websocket", 101), "1xx")
        self.assertEqual([code_class("http", v) for v in (0, 600, "200", None, True)], ["other"] * 5)

    def test_grpc_statuses_keep_their_names(self) -> None:
        """gRPC statuses keep their names; free-form abort texts become "other" (a bounded label set)."""
        self.assertEqual(code_class("grpc", "OK"), "OK")
        self.assertEqual(code_class("grpc", "UNAVAILABLE"), "UNAVAILABLE")
        self.assertEqual(code_class("grpc", "aborted 502: backend gone"), "other")
        self.assertEqual(code_class("grpc", ""), "other")

    def test_failures(self) -> None:
        """Only 4xx, 5xx, non-OK gRPC statuses and "other" count as failures."""
        self.assertEqual([is_failure(k) for k in ("1xx", "2xx", "3xx", "OK", "4xx", "5xx", "UNAVAILABLE", "other")],
                         [False] * 4 + [True] * 4)


class RequestMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.now = 1000.0
        self.metrics = RequestMetrics(self.registry, clock=lambda: self.now)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def test_records_feed_counters_histogram_and_tally(self) -> None:
        """Each record counts once by protocol, route and class, adds its body bytes and its duration."""
        self.metrics.observe(record(bytes_in=10, bytes_out=100, duration=0.02))
        self.metrics.observe(record(bytes_in=5, bytes_out=50, duration=2.0))
        self.metrics.observe(record(status=503, bytes_out=7))
        self.metrics.observe(record(protocol="grpc", route="greeter", status="OK", bytes_in=3, bytes_out=4))
        text = self.text()
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="web", code_class="2xx"), 2)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="http", route="web", code_class="5xx"), 1)
        self.assertEqual(metric(text, "tunneld_requests_total", protocol="grpc", route="greeter", code_class="OK"), 1)
        self.assertEqual(metric(text, "tunneld_request_bytes_total", protocol="http", direction="in"), 15)
        self.assertEqual(metric(text, "tunneld_request_bytes_total", protocol="http", direction="out"), 157)
        self.assertEqual(metric(text, "tunneld_request_duration_seconds_count", protocol="http", route="web"), 3)
        self.assertEqual(metric(text, "tunneld_request_duration_seconds_bucket", protocol="http", route="web",
                                le="0.025"), 2)
        self.assertAlmostEqual(metric(text, "tunneld_request_duration_seconds_sum", protocol="http", route="web"),
                               2.03)
        self.assertEqual(self.metrics.by_route(), {"web": {"2xx": 2, "5xx": 1}, "greeter": {"OK": 1}})
        summary = self.metrics.summary()
        self.assertEqual((summary["requests"], summary["errors"]), (4, 1))

    def test_client_records_without_bytes_in(self) -> None:
        """A client-side record (no bytes_in, no path) counts too."""
        self.metrics.observe({"protocol": "http", "route": "web", "status": 200, "duration": 0.1, "bytes_out": 9,
                              "request_id": "r", "trace_id": "t"})
        self.assertEqual(metric(self.text(), "tunneld_request_bytes_total", protocol="http", direction="out"), 9)

    def test_recent_failures_newest_first_and_bounded(self) -> None:
        """Failures are kept newest first with their ids, at most RECENT_ERRORS of them; successes are not."""
        for n in range(RECENT_ERRORS + 5):
            self.now = 1000.0 + n
            self.metrics.observe(record(status=502, request_id=f"r{n}", trace_id=f"t{n}", path=f"/p{n}",
                                        reason="no client connected", answered_by="tunneld"))
        self.metrics.observe(record(status=200))
        recent = self.metrics.summary()["recent_errors"]
        self.assertEqual(len(recent), RECENT_ERRORS)
        last = RECENT_ERRORS + 4
        self.assertEqual(recent[0], {"time": 1000.0 + last, "protocol": "http", "route": "web", "status": 502,
                                     "code_class": "5xx", "duration": 0.01, "path": f"/p{last}",
                                     "request_id": f"r{last}", "trace_id": f"t{last}",
                                     "reason": "no client connected", "answered_by": "tunneld", "served_by": ""})

    def test_who_failed(self) -> None:
        """tunneld's own answers and backend 5xx are failures; a backend's own 4xx is not; a record
        without ``answered_by`` (older builders) counts as before."""
        self.metrics.observe(record(status=404, answered_by="backend", client_id="edge-1"))
        self.metrics.observe(record(status=503, answered_by="backend", client_id="edge-1", request_id="b5"))
        self.metrics.observe(record(status=404, answered_by="tunneld", reason="no route"))
        self.metrics.observe(record(status=502))
        self.metrics.observe({"protocol": "grpc", "route": "g", "status": "NOT_FOUND", "answered_by": "backend"})
        self.metrics.observe({"protocol": "grpc", "route": "g", "status": "INTERNAL", "answered_by": "backend"})
        summary = self.metrics.summary()
        self.assertEqual((summary["errors"], summary["errors_tunneld"], summary["errors_backend"],
                          summary["backend_4xx"]), (4, 2, 2, 2))
        rows = {row["status"]: row for row in summary["recent_errors"]}
        self.assertEqual((rows[503]["reason"], rows[503]["served_by"], rows[503]["answered_by"]),
                         ("backend answered 503", "edge-1", "backend"))
        self.assertEqual(rows[404]["reason"], "no route")
        self.assertEqual(rows[502]["reason"], "status 502")
        self.assertEqual(self.metrics.failed_by_route(), {"web": 3, "g": 1})

    def test_two_registries_side_by_side(self) -> None:
        """Each process part gets its own registry: two RequestMetrics never clash or share counts."""
        other_registry = CollectorRegistry(auto_describe=False)
        other = RequestMetrics(other_registry)
        self.metrics.observe(record())
        other.observe(record())
        other.observe(record())
        self.assertEqual(metric(self.text(), "tunneld_requests_total", protocol="http", route="web",
                                code_class="2xx"), 1)
        self.assertEqual(metric(generate_latest(other_registry).decode(), "tunneld_requests_total", protocol="http",
                                route="web", code_class="2xx"), 2)


class StallCounterTests(SynchronousTestCase):
    def test_sends_that_run_out_of_window_are_counted(self) -> None:
        """Tunnel.stalls counts each send that returned False (window exhausted), and nothing else."""
        window = 65536
        pair = TunnelPair(window=window, client_make=responders())
        handler = Recorder()
        rid = pair.server.start(http_head("POST", "/big", end=False), handler)
        self.assertTrue(pair.server.send_body(rid, b"x" * 1000))
        self.assertEqual(pair.server.stalls, 0)
        # A sender sends while its credit is positive: this one still goes out and spends the rest ...
        self.assertTrue(pair.server.send_body(rid, b"x" * window))
        self.assertEqual(pair.server.stalls, 0)
        # ... and each send after it waits for credit: a stall.
        self.assertFalse(pair.server.send_body(rid, b"y"))
        self.assertEqual(pair.server.stalls, 1)
        self.assertFalse(pair.server.send_body(rid, b"z"))
        self.assertEqual(pair.server.stalls, 2)
        pair.flush()
        pair.client.consumed(rid, window + 1002)
        pair.flush()
        self.assertTrue(pair.server.send_body(rid, b"", end=True))
        pair.client.send(rid, http_response_head(200, end=True))
        pair.flush()
        self.assertFalse(pair.server.send(rid, http_response_head(200)))  # released: not a stall
        self.assertEqual((pair.server.stalls, pair.client.stalls), (2, 0))
        pair.assert_empty(self)
