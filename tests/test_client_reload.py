"""Tests for the client's SIGHUP reload: ``ClientHub.reload`` and ``client_tap.ReloadOnHangup``.

No sockets or real time: client and server hubs are wired back to back as in
test_hubs (``Link``, ``FakeHandle``), timers run on a ``task.Clock``, dial
services are fakes.  The files ReloadOnHangup reads are temporary files.
"""

from __future__ import annotations

# FakeHandle stands in for grpc_bridge.stream.StreamHandle, which the hubs name as a concrete class.
# mypy: disable-error-code="arg-type"

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from tests.session_pair import http_response_head
from tests.test_hubs import HubCase, Link, client_settings
from tunneld import tunnel_pb2 as pb
from tunneld.admin import client_admin
from tunneld.client_hub import ClientHub, ServerLink
from tunneld.client_tap import ReloadOnHangup
from tunneld.config import ClientConfig, parse_client_config
from tunneld.inspector import Inspector


def client_config(**client: Any) -> ClientConfig:
    """A parsed client file with test_hubs' defaults (token "secret", client_id "c1")."""
    table: dict[str, Any] = {"token": "secret", "client_id": "c1", "heartbeat_timeout": 90}
    table.update(client)
    return parse_client_config({"client": table}, "reloaded.toml")


class FakeDial:
    """A link's dial service as the hub sees it: a token, a parent, and disownServiceParent (which drains)."""

    def __init__(self, link: ServerLink) -> None:
        self.link = link
        self.token = link.settings.token
        self.parent: Any = object()
        self.disowned = False

    def disownServiceParent(self) -> Deferred[None]:
        self.disowned = True
        self.parent = None
        return self.link.drain(self.link.settings.drain_timeout)


class ReloadCase(HubCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        logger = Logger(namespace="test", observer=self.events.append)
        self.patch(ClientHub, "log", logger)
        self.patch(ReloadOnHangup, "log", logger)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


class LiveKeysTests(ReloadCase):
    def test_allow_backends_applies_to_the_next_request(self) -> None:
        """A backend added to allow_backends is served from the next request on, on the same stream."""
        link, client, factory = self.link(allow_backends=["127.0.0.1:3001"])
        refused, _, _ = self.start(link, "/")
        self.assertEqual(refused.calls[0][1], 502)
        report = client.hub.reload(client_config(allow_backends=["127.0.0.1:3000", "127.0.0.1:3001"]))
        self.assertEqual(report.live, ("allow_backends",))
        served, _, _ = self.start(link, "/")
        self.assertEqual(served.names(), ["message", "closed"])
        self.assertEqual([b.route.name for b in factory.created], ["web"])
        self.assertTrue(client.is_connected)
        self.assert_quiet(link)

    def test_in_flight_request_finishes_on_what_it_started_with(self) -> None:
        """A request already at its backend finishes after a reload that would now refuse it."""
        link, client, factory = self.link(answer=False)
        handler, _, _ = self.start(link, "/")
        client.hub.reload(client_config(allow_backends=["127.0.0.1:3001"]))
        factory.created[0].respond(b"late")
        link.flush()
        self.assertEqual(handler.names(), ["message", "closed"])
        refused, _, _ = self.start(link, "/")
        self.assertEqual(refused.calls[0][1], 502)
        self.assert_quiet(link)

    def test_timeouts_and_access_log_read_live(self) -> None:
        """request_timeout, heartbeat_timeout and access_log are what the hub and its links read next."""
        link, client, _ = self.link()
        hub = client.hub
        report = hub.reload(client_config(request_timeout=5, heartbeat_timeout=20, access_log=True))
        self.assertEqual(sorted(report.live), ["access_log", "heartbeat_timeout", "request_timeout"])
        decision = hub.dispatch("api.internal", "/")
        self.assertEqual(getattr(decision, "timeout", None), 5)
        self.assertEqual(client.settings.heartbeat_timeout, 20)
        self.clock.advance(21)
        client.heartbeat_tick()   # nothing heard for 21 s > the new 20 s: the stream is dropped
        self.assertFalse(client.is_connected)
        hub.finished({"protocol": "http", "route": "web", "status": 200, "duration": 0.1, "bytes_out": 1,
                      "request_id": "r", "trace_id": "t"})
        self.assertIn("http route=web status=200", self.lines()[-1])

    def test_admin_token_applies_to_the_next_admin_request(self) -> None:
        """The client's admin port checks the token of the running config, read per request."""
        hub = ClientHub(client_settings(admin_token="old"), self.clock, {})
        admin = client_admin(hub, self.clock, "127.0.0.1:0")
        self.assertEqual(admin.resource.token(), "old")
        report = hub.reload(client_config(admin_token="new"))
        self.assertEqual(admin.resource.token(), "new")
        self.assertEqual(report.live, ("admin_token",))
        self.assertNotIn("new", " ".join(self.lines()))   # named, never shown

    def test_intervals_retime_their_timers(self) -> None:
        """heartbeat_interval and config_sync_interval restart their TimerServices with the new step."""
        hub = ClientHub(client_settings(heartbeat_interval=30), self.clock, {})
        ticks: list[float] = []
        timer = TimerService(30, lambda: ticks.append(self.clock.seconds()))
        timer.clock = self.clock
        timer.startService()
        self.addCleanup(timer.stopService)
        hub.timers["heartbeat_interval"] = timer
        self.clock.advance(10)
        hub.reload(client_config(heartbeat_interval=5))
        self.assertEqual(timer.step, 5)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(ticks, [0, 10, 15, 20])

    def test_inspector_resized(self) -> None:
        """inspect / inspect_body_bytes resize a running inspector, keeping its newest exchanges."""
        hub = ClientHub(client_settings(admin_listen="127.0.0.1:9101"), self.clock, {})
        hub.inspector = Inspector(5)
        recs = [hub.inspector.begin("http") for _ in range(4)]
        report = hub.reload(client_config(admin_listen="127.0.0.1:9101", inspect=2, inspect_body_bytes=100))
        self.assertEqual(sorted(report.live), ["inspect", "inspect_body_bytes"])
        self.assertEqual((hub.inspector.size, hub.inspector.body_bytes), (2, 100))
        self.assertEqual(list(hub.inspector), [recs[3], recs[2]])

    def test_inspector_on_off_only_on_restart(self) -> None:
        """Turning the inspector off (inspect = 0) is a restart-only change; the running one stays."""
        hub = ClientHub(client_settings(admin_listen="127.0.0.1:9101"), self.clock, {})
        hub.inspector = Inspector(5)
        report = hub.reload(client_config(admin_listen="127.0.0.1:9101", inspect=0))
        self.assertEqual(report.restart, ("inspect",))
        self.assertEqual(hub.settings.inspect, 200)


class NextDialTests(ReloadCase):
    def test_token_and_group_apply_to_the_next_dial(self) -> None:
        """A new token and group go into the next stream_open (and the dial's metadata); the open stream stays."""
        link, client, _ = self.link()
        dial = FakeDial(client)
        client.dial = dial
        report = client.hub.reload(client_config(token="ops-token", group="ops"))
        self.assertEqual(sorted(report.next_dial), ["group", "token"])
        self.assertEqual(dial.token, "ops-token")
        self.assertTrue(client.is_connected)
        self.assertEqual(sorted(client.routes), ["api", "web"])
        client._drop("test: redial")
        again = Link(self.hub, client)
        opening = again.client_handle.sent[0].stream_open
        self.assertEqual((opening.token, opening.group), ("ops-token", "ops"))
        self.assertEqual(sorted(client.routes), ["admin"])
        self.assertIn("config reload: group, token apply from each server's next connection "
                      "(the current streams stay up)", self.lines())
        self.assertNotIn("ops-token", " ".join(self.lines()))

    def test_window_sizes_apply_to_the_next_stream(self) -> None:
        """max_window and window_budget shape streams opened after the reload, not the open one."""
        link, client, _ = self.link()
        assert client.tunnel is not None
        before = client.tunnel.session
        client.hub.reload(client_config(max_window=2 << 20, window_budget=4 << 20))
        self.assertIs(client.tunnel.session, before)
        client._drop("test: redial")
        Link(self.hub, client)
        assert client.tunnel is not None
        self.assertEqual(client.tunnel.session.max_window, 2 << 20)


class RestartOnlyTests(ReloadCase):
    def test_listeners_and_tls_only_on_restart(self) -> None:
        """Listen addresses, TLS files and channel options are refused live: logged, the running value kept."""
        hub = ClientHub(client_settings(), self.clock, {})
        before = hub.settings
        report = hub.reload(client_config(http_entry="127.0.0.1:8090", admin_listen="127.0.0.1:9101",
                                          tls=True, keepalive_interval=20, log_format="json",
                                          max_frame_size=4096, access_log=True))
        self.assertEqual(report.restart, ("http_entry", "keepalive_interval", "admin_listen", "log_format", "tls",
                                          "max_frame_size"))
        self.assertEqual(report.live, ("access_log",))
        for key in report.restart:
            self.assertEqual(getattr(hub.settings, key), getattr(before, key))
        self.assertTrue(hub.settings.access_log)
        self.assertIn("config reload: http_entry, keepalive_interval, admin_listen, log_format, tls, "
                      "max_frame_size change only on restart", self.lines())

    def test_unset_client_id_keeps_the_running_one(self) -> None:
        """A file without client_id (a new random id per load) keeps the running id, with no warning."""
        hub = ClientHub(parse_client_config({"client": {}}, "a.toml").client, self.clock, {})
        running = hub.settings.client_id
        report = hub.reload(parse_client_config({"client": {}}, "a.toml"))
        self.assertEqual(report.restart, ())
        self.assertEqual(hub.settings.client_id, running)
        self.assertEqual(hub.links[0].client_id, running)

    def test_explicit_client_id_change_only_on_restart(self) -> None:
        """A different explicit client_id is a restart-only change."""
        hub = ClientHub(client_settings(client_id="c1"), self.clock, {})
        report = hub.reload(client_config(client_id="c2"))
        self.assertEqual(report.restart, ("client_id",))
        self.assertEqual(hub.settings.client_id, "c1")

    def test_server_list_only_on_restart_without_a_dial_maker(self) -> None:
        """Without make_dial (no tap), a changed server list is restart-only and the links stay."""
        hub = ClientHub(client_settings(), self.clock, {})
        links = list(hub.links)
        report = hub.reload(client_config(server=["127.0.0.1:7000", "127.0.0.1:7001"]))
        self.assertEqual(report.restart, ("server",))
        self.assertEqual(hub.links, links)
        self.assertEqual(hub.settings.server_list, ("127.0.0.1:7000",))


class ServerListTests(ReloadCase):
    def setUp(self) -> None:
        super().setUp()
        self.hub_c = ClientHub(client_settings(server=["a:7000", "b:7000"]), self.clock, {})
        self.made: list[str] = []

        def make_dial(link: ServerLink) -> None:
            self.made.append(link.server)
            link.dial = FakeDial(link)

        for link in self.hub_c.links:
            link.dial = FakeDial(link)
        self.hub_c.make_dial = make_dial

    def test_added_server_gets_a_link_and_a_dial(self) -> None:
        """A server added to the list gets a link and a started dial service; the others are untouched."""
        a, b = self.hub_c.links
        report = self.hub_c.reload(client_config(server=["a:7000", "b:7000", "c:7000"]))
        self.assertEqual(report.added, ("c:7000",))
        self.assertEqual([link.server for link in self.hub_c.links], ["a:7000", "b:7000", "c:7000"])
        self.assertIs(self.hub_c.links[0], a)
        self.assertIs(self.hub_c.links[1], b)
        self.assertEqual(self.made, ["c:7000"])
        self.assertIn("config reloaded from reloaded.toml: servers added c:7000", self.lines())

    def test_removed_server_drains_then_leaves(self) -> None:
        """A removed server's link drains its in-flight request (the hub keeps serving), then closes and is forgotten."""
        a, b = self.hub_c.links
        link = Link(self.hub, a)
        pending: list[Slow] = []
        self.hub_c.backends[pb.HTTP] = lambda tunnel, event, route: Slow(tunnel, event, pending)
        external, _, _ = self.start(link, "/")
        report = self.hub_c.reload(client_config(server=["b:7000"]))
        self.assertEqual(report.removed, ("a:7000",))
        self.assertEqual(self.hub_c.links, [b])
        assert isinstance(a.dial, FakeDial)
        self.assertTrue(a.dial.disowned)
        self.assertFalse(self.hub_c.draining)   # the rest of the client keeps serving
        self.assertEqual((self.hub_c.in_flight, self.hub_c.leaving), (1, [a]))
        self.assertIn("config reloaded from reloaded.toml: servers removed (draining) a:7000", self.lines())
        pending[0].respond()
        link.flush()
        self.assertEqual(external.names(), ["message", "closed"])
        self.clock.advance(0.1)
        self.assertEqual(self.hub_c.leaving, [])
        self.assertEqual(link.client_handle.ops[-1], ("close",))
        self.assert_quiet(link)


class Slow:
    """A backend exchange that answers only when told to."""

    def __init__(self, tunnel: Any, event: Any, pending: list[Slow]) -> None:
        self.tunnel, self.event = tunnel, event
        pending.append(self)

    def begin(self) -> None:
        pass

    def message_received(self, msg: Any, end: bool) -> None:
        pass

    def writable(self) -> None:
        pass

    def closed(self) -> None:
        pass

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        pass

    def respond(self) -> None:
        self.tunnel.send(self.event.request_id, http_response_head(200, end=True, body=b"ok"))


class ReloadOnHangupTests(ReloadCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_broken_file_refused_old_config_stays(self) -> None:
        """A broken file is refused with a log line naming the file, table and key; the running config stays."""
        link, client, _ = self.link(allow_backends=["127.0.0.1:3001"])
        hub = client.hub
        before = hub.settings
        path = self.write('[client]\ntoken = "secret"\nallow_backends = ["127.0.0.1:3000"]\nmax_concurrency = "lots"\n')
        ReloadOnHangup(path, hub, self.clock).reload()
        self.assertIs(hub.settings, before)
        [line] = self.lines()
        self.assertIn("config reload refused, keeping the running config:", line)
        self.assertIn(path, line)
        self.assertIn("[client]", line)
        self.assertIn("max_concurrency", line)
        refused, _, _ = self.start(link, "/")
        self.assertEqual(refused.calls[0][1], 502)

    def test_valid_file_applied_with_a_log_line(self) -> None:
        """A valid file is applied; the log names the path and what changed."""
        link, client, _ = self.link(allow_backends=["127.0.0.1:3001"])
        path = self.write('[client]\ntoken = "secret"\nclient_id = "c1"\nheartbeat_timeout = 90\n'
                          'allow_backends = ["127.0.0.1:3000"]\n')
        ReloadOnHangup(path, client.hub, self.clock).reload()
        self.assertEqual(client.settings.allow_backends, ("127.0.0.1:3000",))
        self.assertEqual(self.lines(), [f"config reloaded from {path}: changed allow_backends"])
        served, _, _ = self.start(link, "/")
        self.assertEqual(served.names(), ["message", "closed"])

    def test_no_file_nothing_to_reload(self) -> None:
        """Started without -c, SIGHUP logs that there is no file and changes nothing."""
        hub = ClientHub(client_settings(), self.clock, {})
        before = hub.settings
        ReloadOnHangup("", hub, self.clock).reload()
        self.assertIs(hub.settings, before)
        self.assertIn("no -c file", self.lines()[0])
