"""Tests for a client on several servers (SPEC §7.1): one link per server, own routes, own backoff.

Like tests/test_hubs.py, no grpc, sockets or real time: each of a
``ClientHub``'s links is wired back to back to its own ``ServerHub`` through
``FakeHandle``s (``tests.test_hubs.Link``), and time is a ``task.Clock``.
"""

from __future__ import annotations

# mypy: disable-error-code="arg-type"

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_hubs import HOST, BackendFactory, Link, client_settings, request_head, server_config
from tests.test_tunnel import Recorder
from tunneld import tunnel_pb2 as pb
from tunneld.client_hub import ClientHub
from tunneld.client_tap import build_client
from tunneld.config import ConfigError, parse_client_config, parse_server_config
from tunneld.protocols.http_entry import Refusal, Target
from tunneld.server_hub import ServerHub

A, B = "a.example.com:7000", "b.example.com:7000"


def api_only_config() -> Any:
    """A second server whose config gives group default only the route "api"."""
    return parse_server_config({
        "server": {"heartbeat_timeout": 60, "window": 65536},
        "groups": [{"name": "default", "tokens": ["secret"]}],
        "routes": [{"name": "api", "backend": "http://127.0.0.1:3001", "host": HOST, "path_prefix": "/api"}],
    }, "b.toml")


def forward_head() -> pb.TunnelMessage:
    msg = request_head(Target(None, "forward", 5), "/x")  # type: ignore[arg-type]
    msg.http_request.route = "forward"
    return msg


class ServerListConfigTests(SynchronousTestCase):
    def test_string_and_list(self) -> None:
        """`server` is a string (as before) or a list; server_list has them all, server the first."""
        one = client_settings(server=A)
        self.assertEqual((one.server, one.server_list), (A, (A,)))
        two = client_settings(server=[A, B])
        self.assertEqual((two.server, two.server_list), (A, (A, B)))
        self.assertEqual(client_settings(server=[A]).server_list, (A,))

    def test_bad_lists_name_the_key(self) -> None:
        """An empty list, a non-string, a bad address or a repeat is an error naming [client] server."""
        for value, words in (([], "non-empty list"), ([A, 7], "strings"), (["nope"], "nope"),
                             ([A, "b:0"], "port 0"), ([A, A], "listed twice"), (3, "non-empty list")):
            with self.assertRaises(ConfigError) as caught:
                parse_client_config({"client": {"server": value}}, "c.toml")
            self.assertIn("c.toml: [client] key 'server'", str(caught.exception))
            self.assertIn(words, str(caught.exception))

    def test_servers_is_not_a_key(self) -> None:
        """`servers` (filled from `server`) cannot be set in the file."""
        with self.assertRaises(ConfigError):
            parse_client_config({"client": {"servers": [A]}}, "c.toml")

    def test_tap_builds_one_dial_per_server_with_its_own_backoff(self) -> None:
        """build_client makes one dial service per server, each with its own Backoff and link."""
        from twisted.internet import reactor

        app = build_client(parse_client_config({"client": {"server": [A, B]}}, "c.toml"), reactor)
        self.assertEqual([d.target for d in app.dials], [A, B])
        self.assertIsNot(app.dials[0].backoff, app.dials[1].backoff)
        self.assertEqual([link.server for link in app.hub.links], [A, B])
        self.assertEqual([link.dial for link in app.hub.links], list(app.dials))
        self.assertIs(app.dial, app.dials[0])
        app.dials[0].backoff.next_delay()
        self.assertEqual((app.dials[0].backoff.attempt, app.dials[1].backoff.attempt), (1, 0))


class TwoServersCase(SynchronousTestCase):
    """One client hub with links to servers A (routes web, api) and B (route api only)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server_a = ServerHub(server_config(), self.clock)
        self.server_b = ServerHub(api_only_config(), self.clock)
        self.factory = BackendFactory(answer=False)
        self.hub = ClientHub(client_settings(server=[A, B]), self.clock, {pb.HTTP: self.factory})
        self.link_a, self.link_b = self.hub.links
        self.wire_a = Link(self.server_a, self.link_a)
        self.wire_b = Link(self.server_b, self.link_b)

    def start(self, server: ServerHub, wire: Link, path: str) -> Recorder:
        decision = server.dispatch(HOST, path)
        assert isinstance(decision, Target), decision
        handler = Recorder()
        decision.tunnel.start(request_head(decision, path), handler)
        wire.flush()
        return handler


class PerServerTests(TwoServersCase):
    def test_each_link_has_the_routes_of_its_server(self) -> None:
        """Each link holds the routes its own server granted."""
        self.assertEqual((self.link_a.server, self.link_b.server), (A, B))
        self.assertEqual(sorted(self.link_a.routes), ["api", "web"])
        self.assertEqual(sorted(self.link_b.routes), ["api"])
        self.assertTrue(self.hub.is_connected)

    def test_request_served_only_for_routes_of_the_server_it_came_from(self) -> None:
        """Server B naming route "web" (which only A gave) is refused with 502; A's "web" is served."""
        decision = self.server_b.dispatch(HOST, "/api/x")
        assert isinstance(decision, Target)
        handler = Recorder()
        decision.tunnel.start(request_head(decision, "/", route="web"), handler)
        self.wire_b.flush()
        self.assertEqual(handler.calls, [("aborted", 502, "client has no route 'web'", True)])
        self.assertEqual(self.factory.created, [])
        self.start(self.server_a, self.wire_a, "/")
        self.assertEqual([(b.route.name, b.tunnel) for b in self.factory.created], [("web", self.link_a.tunnel)])

    def test_losing_one_server_leaves_the_other(self) -> None:
        """A lost stream fails only that server's requests; the other link keeps its stream and requests."""
        self.start(self.server_a, self.wire_a, "/")
        self.start(self.server_b, self.wire_b, "/api/y")
        on_a, on_b = self.factory.created
        self.link_a.lost(self.wire_a.client_handle, "server A died")
        self.assertEqual(on_a.calls[-1], ("aborted", 502, "tunnel stream lost: server A died", False))
        self.assertEqual(on_b.calls, [("begin",)])
        self.assertEqual((self.link_a.state, self.link_b.state), ("down", "connected"))
        self.assertTrue(self.hub.is_connected)
        on_b.respond()
        self.wire_b.flush()
        self.assertEqual(self.link_b.in_flight, 0)

    def test_heartbeat_drops_only_the_silent_server(self) -> None:
        """A server silent past heartbeat_timeout is dropped; the other, still talking, is kept."""
        for _ in range(3):
            self.clock.advance(40)
            self.server_b.heartbeat_tick()
            self.wire_b.flush()
            self.hub.heartbeat_tick()
        self.assertEqual(self.wire_a.client_handle.aborted, ["nothing from the server for 90 s"])
        self.assertEqual(self.wire_b.client_handle.aborted, [])
        self.assertEqual([link.is_connected for link in self.hub.links], [False, True])


class ForwardChoiceTests(TwoServersCase):
    def test_fewest_in_flight_wins(self) -> None:
        """dispatch picks the connected link with the fewest requests in flight."""
        first = self.hub.dispatch(HOST, "/")
        assert isinstance(first, Target)
        first.tunnel.start(forward_head(), Recorder())   # not flushed: stays in flight
        second = self.hub.dispatch(HOST, "/")
        assert isinstance(second, Target)
        self.assertIsNot(second.tunnel, first.tunnel)
        second.tunnel.start(forward_head(), Recorder())
        second.tunnel.start(forward_head(), Recorder())
        third = self.hub.dispatch(HOST, "/")
        assert isinstance(third, Target)
        self.assertIs(third.tunnel, first.tunnel)

    def test_ties_take_turns(self) -> None:
        """With nothing in flight anywhere, consecutive requests alternate between the servers."""
        picks = set()
        for _ in range(4):
            decision = self.hub.dispatch(HOST, "/")
            assert isinstance(decision, Target)
            picks.add(id(decision.tunnel))
        self.assertEqual(picks, {id(self.link_a.tunnel), id(self.link_b.tunnel)})

    def test_only_connected_links(self) -> None:
        """A lost server is skipped; with none connected the answer is 502 naming the servers."""
        self.link_a.lost(self.wire_a.client_handle, "gone")
        for _ in range(3):
            decision = self.hub.dispatch(HOST, "/")
            assert isinstance(decision, Target)
            self.assertIs(decision.tunnel, self.link_b.tunnel)
        self.link_b.lost(self.wire_b.client_handle, "gone too")
        decision = self.hub.dispatch(HOST, "/")
        self.assertEqual(decision, Refusal(502, f"not connected to the server {A}, {B}"))

    def test_stream_not_yet_accepted_is_skipped(self) -> None:
        """A link whose stream_open was not answered yet takes no forward requests."""
        from tests.test_hubs import FakeHandle

        self.link_a.lost(self.wire_a.client_handle, "gone")
        self.link_a.connected(FakeHandle(A))   # dialled, no answer yet
        self.assertEqual(self.link_a.state, "connecting")
        for _ in range(3):
            decision = self.hub.dispatch(HOST, "/")
            assert isinstance(decision, Target)
            self.assertIs(decision.tunnel, self.link_b.tunnel)

    def test_drain_refuses_and_closes_every_link(self) -> None:
        """ClientHub.drain refuses new forward requests with 503 and closes both streams cleanly."""
        fired: list[object] = []
        self.hub.drain(5).addCallback(fired.append)
        self.assertEqual(fired, [None])
        self.assertEqual(self.hub.dispatch(HOST, "/"), Refusal(503, "client is shutting down"))
        self.assertEqual((self.wire_a.client_handle.closed, self.wire_b.client_handle.closed), (1, 1))


class StatusTests(TwoServersCase):
    def test_status_and_metrics_list_every_server(self) -> None:
        """The client's /status has one entry per server (state, rtt, in flight); gauges carry a server label."""
        from prometheus_client import CollectorRegistry, generate_latest

        from tunneld.admin import ClientCollector, client_status

        self.hub.heartbeat_tick()
        self.wire_a.flush()
        self.wire_b.flush()
        self.start(self.server_b, self.wire_b, "/api/z")
        self.link_a.lost(self.wire_a.client_handle, "gone")
        doc = client_status(self.hub, None, 0.0)
        servers = {s["address"]: s for s in doc["servers"]}  # type: ignore[attr-defined]
        self.assertEqual(list(servers), [A, B])
        self.assertEqual((servers[A]["state"], servers[A]["in_flight"], servers[A]["routes"]), ("down", 0, []))
        self.assertEqual((servers[B]["state"], servers[B]["in_flight"], servers[B]["routes"]), ("connected", 1, ["api"]))
        self.assertIsNone(servers[A]["rtt"])   # gone with its stream
        self.assertIsNotNone(servers[B]["rtt"])
        self.assertEqual((doc["connected"], doc["in_flight"], doc["server"]), (True, 1, A))
        self.assertEqual([r["servers"] for r in doc["routes"]], [[B]])  # type: ignore[index]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ClientCollector(self.hub))  # type: ignore[arg-type]
        text = generate_latest(registry).decode()
        self.assertIn(f'tunneld_client_connected{{server="{A}"}} 0.0', text)
        self.assertIn(f'tunneld_client_connected{{server="{B}"}} 1.0', text)
        self.assertIn(f'tunneld_requests_in_flight{{server="{B}"}} 1.0', text)
        self.assertIn(f'tunneld_client_routes{{server="{B}"}} 1.0', text)
