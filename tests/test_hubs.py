"""Tests for tunneld.server_hub and tunneld.client_hub: the reactor glue around tunnel streams.

No grpc, sockets or real time: a ``ServerHub`` and ``ClientHub``s are wired
back to back through ``FakeHandle``s (the reactor-facing surface of
``grpc_bridge.stream.StreamHandle``) by a ``Link`` that moves each side's sent
messages to the other's ``on_message``; time is a ``task.Clock``.  The
client's backends are a fake factory whose handlers answer on demand.
"""

from __future__ import annotations

# FakeHandle stands in for grpc_bridge.stream.StreamHandle, which the hubs name as a concrete class.
# mypy: disable-error-code="arg-type"

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.session_pair import control, http_head, http_response_head, kinds, ws_head
from tests.test_tunnel import Recorder, errors_in
from tunneld import __version__
from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.client_hub import ClientHub, ServerLink, backend_hostport
from tunneld.config import ClientSettings, ServerConfig, parse_client_config, parse_server_config
from tunneld.protocols.http_entry import Refusal, Target
from tunneld.server_hub import ServerHub
from tunneld.tunnel import Tunnel

HOST = "app.example.com"


def server_config(**server: Any) -> ServerConfig:
    settings: dict[str, Any] = {"heartbeat_timeout": 60, "window": 65536}
    settings.update(server)
    return parse_server_config(
        {
            "server": settings,
            "groups": [
                {"name": "default", "tokens": ["secret", "spare"]},
                {"name": "ops", "tokens": ["ops-token"]},
            ],
            "routes": [
                {"name": "web", "backend": "http://127.0.0.1:3000", "host": HOST, "timeout": 12,
                 "set_host": "internal.example:8080"},
                {"name": "api", "backend": "http://127.0.0.1:3001", "host": HOST, "path_prefix": "/api",
                 "max_body_size": 1000},
                {"name": "admin", "group": "ops", "backend": "http://10.0.0.9:80", "host": "ops.example.com"},
            ],
        },
        "t.toml",
    )


def client_settings(**client: Any) -> ClientSettings:
    table: dict[str, Any] = {"token": "secret", "client_id": "c1", "heartbeat_timeout": 90}
    table.update(client)
    return parse_client_config({"client": table}, "t.toml").client


class FakeHandle:
    """Stands in for a StreamHandle: records every call in order."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.on_message: Any = None
        self.on_lost: Any = None
        self.sent: list[pb.TunnelMessage] = []
        self.ops: list[tuple[Any, ...]] = []   # ("send", kinds) / ("close",) / ("abort", reason)
        self.closed = 0
        self.aborted: list[str] = []

    def send(self, msgs: list[pb.TunnelMessage]) -> None:
        self.sent.extend(msgs)
        self.ops.append(("send", kinds(msgs)))

    def close(self) -> None:
        self.closed += 1
        self.ops.append(("close",))

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)
        self.ops.append(("abort", reason))

    @property
    def ended(self) -> bool:
        return bool(self.closed or self.aborted)


class Backend(Recorder):
    """A client-side backend exchange (ResponderHandler) that answers when told to."""

    def __init__(self, tunnel: Tunnel, event: s.RequestReceived, route: pb.Route, answer: bool) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.event = event
        self.route = route
        self.answer_at_once = answer

    @property
    def request_id(self) -> str:
        return self.event.request_id

    def begin(self) -> None:
        self.calls.append(("begin",))
        if self.answer_at_once:
            self.respond(b"from " + self.route.name.encode())

    def respond(self, body: bytes = b"ok", status: int = 200) -> None:
        self.tunnel.send(self.request_id, http_response_head(status, end=True, body=body))


class BackendFactory:
    """A fake ``BackendFactory`` recording every backend it builds."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.created: list[Backend] = []

    def __call__(self, tunnel: Tunnel, event: s.RequestReceived, route: pb.Route) -> Backend:
        backend = Backend(tunnel, event, route, self.answer)
        self.created.append(backend)
        return backend


class Link:
    """One tunnel stream: a ClientHub's handle wired to a ServerHub's handle."""

    def __init__(self, server_hub: ServerHub, client_hub: ServerLink, peer: str = "ipv4:10.0.0.2:40000") -> None:
        self.server_hub = server_hub
        self.client_hub = client_hub
        self.client_handle = FakeHandle("tunnel.example.com:7000")
        self.server_handle = FakeHandle(peer)
        client_hub.connected(self.client_handle)
        first = self.client_handle.sent[0]
        self._from_client = 1
        self._from_server = 0
        server_hub.stream_connected(self.server_handle, first)
        self.flush()

    def flush(self) -> None:
        """Move messages both ways until quiet; an aborted stream carries nothing more."""
        while True:
            moved = False
            while self._from_server < len(self.server_handle.sent):
                msg = self.server_handle.sent[self._from_server]
                self._from_server += 1
                if not (self.server_handle.aborted or self.client_handle.aborted):
                    self.client_handle.on_message(msg)
                    moved = True
            while self._from_client < len(self.client_handle.sent):
                msg = self.client_handle.sent[self._from_client]
                self._from_client += 1
                if not (self.server_handle.aborted or self.client_handle.aborted):
                    self.server_handle.on_message(msg)
                    moved = True
            if not moved:
                return

    @property
    def server_tunnel(self) -> Tunnel:
        for tunnel, stream in self.server_hub.streams.items():
            if stream.handle is self.server_handle:
                return tunnel
        raise AssertionError("stream not in the hub")

    @property
    def entry(self) -> Any:
        stream = self.server_hub.streams[self.server_tunnel]
        return stream.entry


def request_head(target: Target, path: str = "/", method: str = "GET", end: bool = True,
                 route: str | None = None) -> pb.TunnelMessage:
    """The head the HTTP entry would start for ``target``."""
    msg = http_head(method, path, end, host=HOST)
    msg.http_request.route = target.route if route is None else route
    return msg


def open_message(client_id: str, stream_id: str, group: str = "default", token: str = "secret") -> pb.TunnelMessage:
    return control(pb.CLIENT_TO_SERVER, client_id=client_id, stream_open=pb.StreamOpenRequest(
        client_id=client_id, group=group, stream_id=stream_id, token=token, version="9.9"))


class HubCase(SynchronousTestCase):
    """A server hub, a clock, and helpers to connect clients to it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.config = server_config()
        self.hub = ServerHub(self.config, self.clock)

    def client(self, answer: bool = True, **settings: Any) -> tuple[ServerLink, BackendFactory]:
        factory = BackendFactory(answer)
        return ClientHub(client_settings(**settings), self.clock, {pb.HTTP: factory}).links[0], factory

    def link(self, answer: bool = True, **settings: Any) -> tuple[Link, ServerLink, BackendFactory]:
        client_hub, factory = self.client(answer, **settings)
        return Link(self.hub, client_hub, peer=f"ipv4:10.0.0.{len(self.hub.streams) + 2}:4000"), client_hub, factory

    def target(self, path: str = "/", host: str = HOST) -> Target:
        decision = self.hub.dispatch(host, path)
        assert isinstance(decision, Target), decision
        return decision

    def start(self, link: Link, path: str = "/", **kwargs: Any) -> tuple[Recorder, str, Target]:
        """Dispatch and start one request the way the HTTP entry does."""
        target = self.target(path)
        handler = Recorder()
        rid = target.tunnel.start(request_head(target, path, **kwargs), handler)
        link.flush()
        return handler, rid, target

    def assert_quiet(self, *links: Link) -> None:
        """No request is left in any table."""
        self.assertEqual(self.hub.in_flight(), 0)
        for link in links:
            for tunnel in (link.client_hub.tunnel, *[t for t in self.hub.streams if t.name == link.server_handle.peer]):
                if tunnel is not None:
                    self.assertEqual(len(tunnel.session), 0)
                    self.assertEqual(tunnel.handlers, {})
                    tunnel.session.check_invariants()


# -- ServerHub ---------------------------------------------------------------------


class AuthenticateTests(HubCase):
    def test_accepts_group_tokens(self) -> None:
        """Every token of a group authenticates for that group."""
        self.assertTrue(self.hub.authenticate("default", "secret"))
        self.assertTrue(self.hub.authenticate("default", "spare"))
        self.assertTrue(self.hub.authenticate("ops", "ops-token"))

    def test_wrong_group(self) -> None:
        """A token of another group, or an unknown group, is refused."""
        self.assertFalse(self.hub.authenticate("ops", "secret"))
        self.assertFalse(self.hub.authenticate("default", "ops-token"))
        self.assertFalse(self.hub.authenticate("nope", "secret"))

    def test_wrong_or_empty_token(self) -> None:
        """A wrong, differently-cased, prefixed or empty token is refused."""
        self.assertFalse(self.hub.authenticate("default", "Secret"))
        self.assertFalse(self.hub.authenticate("default", "secret2"))
        self.assertFalse(self.hub.authenticate("default", "secre"))
        self.assertFalse(self.hub.authenticate("default", ""))
        self.assertFalse(self.hub.authenticate("", ""))


class OpenTests(HubCase):
    def test_sessions_get_their_side_window_growth_settings(self) -> None:
        """Each side's session grows its receive windows by its own max_window / window_budget."""
        self.hub = ServerHub(server_config(max_window=1 << 20, window_budget=3 << 20), self.clock)
        link, client_hub, _ = self.link(max_window=2 << 20, window_budget=5 << 20)
        server = link.server_tunnel.session
        assert client_hub.tunnel is not None
        client = client_hub.tunnel.session
        self.assertEqual((server.window, server.max_window, server.window_budget), (65536, 1 << 20, 3 << 20))
        self.assertEqual((client.window, client.max_window, client.window_budget), (65536, 2 << 20, 5 << 20))

    def test_open_registers_and_sends_group_routes(self) -> None:
        """stream_open gives a registry entry and a StreamOpenResponse carrying the group's routes only."""
        link, client_hub, _ = self.link()
        entries = self.hub.registry.streams("default")
        self.assertEqual(len(entries), 1)
        entry = entries[0]
        self.assertEqual(entry.client_id, "c1")
        self.assertEqual(entry.group, "default")
        self.assertEqual(entry.address, link.server_handle.peer)
        self.assertEqual(entry.version, __version__)
        self.assertEqual(entry.connected_at, self.clock.seconds())
        first = link.server_handle.sent[0]
        self.assertEqual(first.WhichOneof("payload"), "stream_open_response")
        response = first.stream_open_response
        self.assertTrue(response.success)
        self.assertEqual(response.window, 65536)
        self.assertEqual([r.name for r in response.config.routes], ["web", "api"])
        self.assertEqual(response.config.config_version, self.config.version())
        web = response.config.routes[0]
        self.assertEqual((web.host, web.backend, web.timeout, web.set_host),
                         (HOST, "http://127.0.0.1:3000", 12.0, "internal.example:8080"))
        self.assertEqual(self.hub.counters["streams_opened"], 1)
        self.assertTrue(link.server_tunnel.is_open)

    def test_other_group_gets_its_routes_only(self) -> None:
        """A client of group ops is granted the ops routes and nothing else."""
        link, client_hub, _ = self.link(group="ops", token="ops-token")
        self.assertEqual([r.name for r in link.server_handle.sent[0].stream_open_response.config.routes], ["admin"])
        self.assertEqual(sorted(client_hub.routes), ["admin"])
        self.assertEqual(self.hub.registry.groups(), ["ops"])

    def test_duplicate_stream_rejected(self) -> None:
        """A second stream with the same (client_id, stream_id) is told it is refused, then closed; the first stays."""
        h1, h2 = FakeHandle("ipv4:10.0.0.2:1"), FakeHandle("ipv4:10.0.0.3:1")
        self.hub.stream_connected(h1, open_message("c1", "s1"))
        self.hub.stream_connected(h2, open_message("c1", "s1"))
        self.assertEqual(len(self.hub.registry), 1)
        self.assertIs(self.hub.registry.streams()[0].address, h1.peer)
        self.assertEqual(len(self.hub.streams), 1)
        self.assertFalse(h1.ended)
        self.assertTrue(h2.ended)
        # The refused client is told why before its stream closes.
        self.assertEqual(kinds(h2.sent), ["stream_open_response"])
        self.assertFalse(h2.sent[0].stream_open_response.success)
        self.assertIn("duplicate", h2.sent[0].stream_open_response.message)
        self.assertEqual(h2.ops[-1], ("close",))

    def test_same_client_other_stream_id_accepted(self) -> None:
        """The same client_id with another stream_id is a second stream, not a duplicate."""
        h1, h2 = FakeHandle("ipv4:10.0.0.2:1"), FakeHandle("ipv4:10.0.0.2:2")
        self.hub.stream_connected(h1, open_message("c1", "s1"))
        self.hub.stream_connected(h2, open_message("c1", "s2"))
        self.assertEqual(len(self.hub.registry), 2)
        self.assertTrue(h2.sent[0].stream_open_response.success)

    def test_forward_request_from_client_refused(self) -> None:
        """A request the client starts is refused with 404 naming host and path when no forward rule matches."""
        link, client_hub, _ = self.link()
        handler = Recorder()
        assert client_hub.tunnel is not None
        head = http_head()
        client_hub.tunnel.start(head, handler)
        link.flush()
        [(kind, code, message, by_peer)] = handler.calls
        self.assertEqual((kind, code, by_peer), ("aborted", 404, True))
        self.assertIn(f"path {head.http_request.path}", message)
        self.assert_quiet(link)


class DispatchTests(HubCase):
    def test_no_route_is_404_naming_host_and_path(self) -> None:
        """A request no route matches is refused with 404 naming its host and path."""
        self.link()
        decision = self.hub.dispatch("nowhere.example.com", "/some/path")
        self.assertIsInstance(decision, Refusal)
        assert isinstance(decision, Refusal)
        self.assertEqual(decision.status, 404)
        self.assertIn("nowhere.example.com", decision.message)
        self.assertIn("/some/path", decision.message)

    def test_group_without_stream_is_502(self) -> None:
        """A route whose group has no connected stream is refused with 502 naming the group."""
        self.link()
        decision = self.hub.dispatch("ops.example.com", "/")
        assert isinstance(decision, Refusal), decision
        self.assertEqual(decision.status, 502)
        self.assertIn("ops", decision.message)
        self.assertEqual(self.hub.counters["requests"], 0)

    def test_target_carries_route_limits(self) -> None:
        """A connected route gives a Target with the stream's tunnel and the route's timeout, limits and set_host."""
        link, _, _ = self.link()
        self.assertEqual(self.hub.dispatch(HOST, "/"),
                         Target(link.server_tunnel, "web", 12.0, 0, "internal.example:8080", 16 * 1024 * 1024,
                                max_websockets=1000))
        self.assertEqual(self.hub.dispatch(HOST, "/api/v1"),
                         Target(link.server_tunnel, "api", 30.0, 1000, "", 16 * 1024 * 1024, max_websockets=1000))
        self.assertEqual(self.hub.counters["requests"], 2)

    def test_host_port_and_case_ignored(self) -> None:
        """The Host header's case and port do not change the route chosen."""
        self.link()
        decision = self.hub.dispatch("APP.Example.com:8080", "/")
        assert isinstance(decision, Target), decision
        self.assertEqual(decision.route, "web")

    def test_request_reaches_backend_and_answer_returns(self) -> None:
        """handshake -> routes -> dispatch -> tunnel.start reaches the client's factory -> the answer reaches the entry."""
        link, client_hub, factory = self.link()
        self.assertEqual(sorted(client_hub.routes), ["api", "web"])
        handler, rid, _ = self.start(link, "/hello")
        self.assertEqual(len(factory.created), 1)
        backend = factory.created[0]
        self.assertEqual(backend.route.name, "web")
        self.assertEqual(backend.route.backend, "http://127.0.0.1:3000")
        self.assertEqual(backend.event.request_id, rid)
        self.assertEqual(backend.event.protocol, pb.HTTP)
        self.assertEqual(backend.event.message.http_request.path, "/hello")
        self.assertIs(backend.tunnel, client_hub.tunnel)
        self.assertEqual(backend.names(), ["begin", "closed"])
        self.assertEqual(handler.names(), ["message", "closed"])
        response = handler.messages()[0].http_response
        self.assertEqual((response.status_code, response.body), (200, b"from web"))
        self.assert_quiet(link)

    def test_least_in_flight_between_two_streams(self) -> None:
        """dispatch picks the stream with fewer requests in flight, counted from the sessions."""
        link1, _, factory1 = self.link(answer=False, client_id="c1")
        link2, _, factory2 = self.link(answer=False, client_id="c2")
        links = {link1.server_tunnel: (link1, factory1), link2.server_tunnel: (link2, factory2)}

        def start() -> Tunnel:
            handler, _, target = self.start(link1)
            link2.flush()
            return target.tunnel

        first = start()
        other = link2.server_tunnel if first is link1.server_tunnel else link1.server_tunnel
        # One request in flight on `first`: every dispatch now goes to `other`.
        for _ in range(3):
            self.assertIs(self.target().tunnel, other)
        self.assertIs(start(), other)
        # 1 and 1: a tie goes to either; then the one with fewer wins.
        loaded = start()
        lighter = other if loaded is first else first
        self.assertEqual((len(loaded.session), len(lighter.session)), (2, 1))
        for _ in range(3):
            self.assertIs(self.target().tunnel, lighter)
        # Finish everything on `loaded`: it becomes the only choice.
        link, factory = links[loaded]
        for backend in factory.created:
            backend.respond()
        link.flush()
        self.assertEqual(len(loaded.session), 0)
        for _ in range(3):
            self.assertIs(self.target().tunnel, loaded)

    def test_silent_stream_not_chosen_before_cleanup(self) -> None:
        """A stream silent for longer than heartbeat_timeout is not chosen even before cleanup_tick drops it."""
        self.link()
        self.clock.advance(61)
        decision = self.hub.dispatch(HOST, "/")
        assert isinstance(decision, Refusal), decision
        self.assertEqual(decision.status, 502)


class HeartbeatTests(HubCase):
    def test_heartbeat_tick_on_every_open_stream(self) -> None:
        """heartbeat_tick sends one Heartbeat on every open stream; the acks record a round trip."""
        link1, _, _ = self.link(client_id="c1")
        link2, _, _ = self.link(client_id="c2")
        before = [len(link1.server_handle.sent), len(link2.server_handle.sent)]
        self.hub.heartbeat_tick()
        for link, n in zip((link1, link2), before):
            new = link.server_handle.sent[n:]
            self.assertEqual(kinds(new), ["heartbeat"])
            self.assertFalse(new[0].heartbeat.ack)
            self.assertEqual(new[0].direction, pb.SERVER_TO_CLIENT)
            link.flush()
            # The client acked it.
            self.assertEqual(kinds(link.client_handle.sent[-1:]), ["heartbeat"])
            self.assertTrue(link.client_handle.sent[-1].heartbeat.ack)
            rtt = link.entry.rtt
            self.assertIsNotNone(rtt)
            self.assertGreaterEqual(rtt, 0.0)

    def test_cleanup_drops_silent_stream(self) -> None:
        """cleanup_tick after heartbeat_timeout of silence drops the stream, aborts its handle and fails its requests."""
        link, client_hub, factory = self.link(answer=False)
        handler, rid, _ = self.start(link)
        self.assertEqual(len(factory.created), 1)
        self.clock.advance(60)
        self.hub.cleanup_tick()
        self.assertEqual(len(self.hub.registry), 1, "not yet: exactly heartbeat_timeout old is still healthy")
        self.clock.advance(1)
        self.hub.cleanup_tick()
        self.assertEqual(link.server_handle.aborted, ["heartbeat timeout"])
        self.assertEqual(handler.calls, [("aborted", 502, "tunnel stream lost: heartbeat timeout", False)])
        self.assertEqual(len(self.hub.registry), 0)
        self.assertEqual(self.hub.streams, {})
        self.assertEqual(self.hub.in_flight(), 0)
        decision = self.hub.dispatch(HOST, "/")
        assert isinstance(decision, Refusal)
        self.assertEqual(decision.status, 502)
        # The bridge's later report of the cancelled call changes nothing.
        link.server_handle.on_lost("stream cancelled by the server")
        self.assertEqual(len(handler.calls), 1)
        self.assertEqual(link.server_handle.closed, 0)

    def test_cleanup_keeps_stream_whose_messages_arrive(self) -> None:
        """A stream that keeps sending (client heartbeats) is not dropped by cleanup_tick."""
        link, client_hub, _ = self.link()
        for _ in range(4):
            self.clock.advance(40)
            client_hub.heartbeat_tick()
            link.flush()
            self.hub.cleanup_tick()
        self.assertEqual(self.clock.seconds(), 160)
        self.assertEqual(len(self.hub.registry), 1)
        self.assertEqual(link.server_handle.aborted, [])
        self.assertEqual(link.entry.last_heartbeat, 160)

    def test_heartbeats_answered_in_the_bridge_keep_stream_alive(self) -> None:
        """An accepted stream's handle answers heartbeats itself; each one it reports (on_heard) keeps the stream alive."""
        link, _, _ = self.link()
        handle = link.server_handle
        self.assertTrue(handle.answer_heartbeats)
        for _ in range(4):
            self.clock.advance(40)
            handle.on_heard()
            self.hub.cleanup_tick()
        self.assertEqual(len(self.hub.registry), 1)
        self.assertEqual(link.entry.last_heartbeat, 160)
        self.assertEqual(handle.aborted, [])

    def test_heartbeats_not_answered_by_the_bridge_before_open(self) -> None:
        """Until the server accepted the stream, every message (a heartbeat too) goes to the session."""
        handle = FakeHandle("ipv4:10.0.0.9:4000")
        self.hub.stream_connected(handle, pb.TunnelMessage(  # type: ignore[arg-type]
            direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL, heartbeat=pb.Heartbeat(sent_at_ms=1)))
        self.assertFalse(getattr(handle, "answer_heartbeats", False))

    def test_cleanup_keeps_stream_that_acks_server_heartbeats(self) -> None:
        """Acks of the server's own heartbeats keep a stream alive."""
        link, _, _ = self.link()
        for _ in range(4):
            self.clock.advance(40)
            self.hub.heartbeat_tick()
            link.flush()
            self.hub.cleanup_tick()
        self.assertEqual(len(self.hub.registry), 1)
        self.assertEqual(link.server_handle.aborted, [])


class LossTests(HubCase):
    def test_stream_loss_fails_requests_and_unregisters(self) -> None:
        """on_lost fails the stream's requests at once and removes its registry entry."""
        link, _, _ = self.link(answer=False)
        handlers = [self.start(link)[0] for _ in range(2)]
        link.server_handle.on_lost("client reset the stream")
        for handler in handlers:
            self.assertEqual(handler.calls, [("aborted", 502, "tunnel stream lost: client reset the stream", False)])
        self.assertEqual(len(self.hub.registry), 0)
        self.assertEqual(self.hub.streams, {})
        self.assertEqual(self.hub.in_flight(), 0)
        self.assertEqual(link.server_handle.aborted, [])

    def test_loss_of_one_stream_leaves_the_other(self) -> None:
        """Losing one stream of a group leaves dispatch to the other."""
        link1, _, _ = self.link(client_id="c1")
        link2, _, _ = self.link(client_id="c2")
        link1.server_handle.on_lost("gone")
        for _ in range(2):
            self.assertIs(self.target().tunnel, link2.server_tunnel)

    def test_fatal_violation_closes_that_stream_only(self) -> None:
        """A second stream_open on an open stream aborts that stream and fails its requests; the other keeps serving."""
        link1, _, factory1 = self.link(answer=False, client_id="c1")
        link2, _, factory2 = self.link(answer=False, client_id="c2")
        handler, _, target = self.start(link1)
        victim, survivor, survivor_factory = (
            (link1, link2, factory2) if target.tunnel is link1.server_tunnel else (link2, link1, factory1))
        victim_tunnel = victim.server_tunnel
        victim.server_handle.on_message(open_message(victim.client_hub.client_id, "again"))
        self.assertEqual(len(victim.server_handle.aborted), 1)
        self.assertIn("protocol violation", victim.server_handle.aborted[0])
        self.assertNotIn(victim_tunnel, self.hub.streams)
        self.assertEqual(handler.names(), ["aborted"])
        self.assertEqual(handler.calls[0][1], 502)
        self.assertFalse(handler.calls[0][3])
        self.assertEqual(self.hub.counters["violations"], 1)
        self.assertEqual(len(self.hub.registry), 1)
        self.assertEqual(survivor.server_handle.aborted, [])
        self.assertEqual(survivor.server_handle.closed, 0)
        handler2, _, target2 = self.start(survivor)
        self.assertIs(target2.tunnel, survivor.server_tunnel)
        survivor_factory.created[-1].respond()
        survivor.flush()
        self.assertEqual(handler2.names(), ["message", "closed"])

    def test_non_fatal_violation_keeps_stream(self) -> None:
        """A message for an unknown request is counted but the stream stays open."""
        link, _, _ = self.link()
        link.server_handle.on_message(pb.TunnelMessage(
            request_id="nope", direction=pb.CLIENT_TO_SERVER, protocol_type=pb.HTTP,
            http_response=pb.HttpResponse(status_code=200, is_first_chunk=True)))
        self.assertEqual(self.hub.counters["violations"], 1)
        self.assertEqual(len(self.hub.registry), 1)
        self.assertEqual(link.server_handle.aborted, [])
        self.assertEqual(errors_in(link.server_handle.sent[-1:]), [("nope", 400, "unknown request_id")])


class DrainTests(HubCase):
    def test_drain_refuses_new_requests_with_503(self) -> None:
        """While draining, dispatch refuses with 503."""
        self.link()
        self.hub.drain(5)
        decision = self.hub.dispatch(HOST, "/")
        assert isinstance(decision, Refusal), decision
        self.assertEqual(decision.status, 503)

    def test_drain_waits_for_in_flight_then_closes(self) -> None:
        """drain() fires only once in-flight requests ended, then closes the streams cleanly."""
        link, _, factory = self.link(answer=False)
        handler, _, _ = self.start(link)
        fired: list[object] = []
        self.hub.drain(5).addCallback(fired.append)
        self.assertEqual(fired, [])
        self.clock.advance(1)
        self.assertEqual(fired, [])
        self.assertEqual(link.server_handle.closed, 0)
        factory.created[0].respond()
        link.flush()
        self.assertEqual(handler.names(), ["message", "closed"])
        self.clock.advance(0.05)
        self.assertEqual(fired, [None])
        self.assertEqual(link.server_handle.closed, 1)
        self.assertEqual(link.server_handle.aborted, [])
        self.assertEqual(self.hub.streams, {})
        self.assertEqual(len(self.hub.registry), 0)

    def test_drain_timeout_cuts_requests(self) -> None:
        """drain() fires after its timeout even with requests in flight, failing them and closing the streams."""
        link, _, _ = self.link(answer=False)
        handler, _, _ = self.start(link)
        fired: list[object] = []
        self.hub.drain(5).addCallback(fired.append)
        self.clock.pump([0.05] * 98)   # 4.9 s
        self.assertEqual(fired, [])
        self.assertEqual(handler.calls, [])
        self.clock.pump([0.05] * 4)    # 5.1 s
        self.assertEqual(fired, [None])
        self.assertEqual(handler.calls, [("aborted", 502, "tunnel stream lost: server shutting down", False)])
        self.assertEqual(link.server_handle.closed, 1)
        self.assertEqual(self.hub.streams, {})

    def test_drain_idle_fires_at_once(self) -> None:
        """drain() with nothing in flight closes the streams and fires at once."""
        link, _, _ = self.link()
        fired: list[object] = []
        self.hub.drain(5).addCallback(fired.append)
        self.assertEqual(fired, [None])
        self.assertEqual(link.server_handle.closed, 1)

    def test_stream_during_drain_rejected(self) -> None:
        """A stream that connects while draining is refused with a reason, closed, and the client drops it."""
        self.hub.drain(5)
        link, client_hub, _ = self.link()
        self.assertEqual(kinds(link.server_handle.sent), ["stream_open_response"])
        self.assertFalse(link.server_handle.sent[0].stream_open_response.success)
        self.assertEqual(link.server_handle.sent[0].stream_open_response.message, "server shutting down")
        self.assertEqual(link.server_handle.closed, 1)
        self.assertEqual(len(self.hub.registry), 0)
        # The client saw OpenRejected and dropped its stream.
        self.assertEqual(link.client_handle.aborted, ["refused: server shutting down"])
        self.assertIsNone(client_hub.tunnel)


class ConfigSyncTests(HubCase):
    def test_old_version_gets_routes_pushed(self) -> None:
        """ConfigSyncRequested with an old version pushes the group's routes."""
        link, client_hub, _ = self.link()
        client_hub.config_version = "old"
        client_hub.routes = {}
        n = len(link.server_handle.sent)
        client_hub.config_sync_tick()
        link.flush()
        pushed = link.server_handle.sent[n:]
        self.assertEqual(kinds(pushed), ["config_sync_response"])
        self.assertEqual([r.name for r in pushed[0].config_sync_response.routes], ["web", "api"])
        self.assertEqual(client_hub.config_version, self.config.version())
        self.assertEqual(sorted(client_hub.routes), ["api", "web"])

    def test_current_version_sends_nothing(self) -> None:
        """ConfigSyncRequested with the current version is not answered."""
        link, client_hub, _ = self.link()
        n = len(link.server_handle.sent)
        client_hub.config_sync_tick()
        self.assertEqual(kinds(link.client_handle.sent[-1:]), ["config_sync"])
        link.flush()
        self.assertEqual(link.server_handle.sent[n:], [])


# -- ClientHub -----------------------------------------------------------------------


class ClientHubTests(HubCase):
    def test_open_accepted_installs_routes_and_calls_on_ready(self) -> None:
        """OpenAccepted installs the granted routes and calls on_ready once."""
        client_hub, _ = self.client()
        ready: list[bool] = []
        client_hub.on_ready = lambda: ready.append(True)
        self.clock.advance(7)
        link = Link(self.hub, client_hub)
        self.assertEqual(ready, [True])
        self.assertEqual(sorted(client_hub.routes), ["api", "web"])
        self.assertEqual(client_hub.routes["web"].backend, "http://127.0.0.1:3000")
        self.assertEqual(client_hub.config_version, self.config.version())
        self.assertTrue(client_hub.is_connected)
        self.assertEqual(client_hub.connected_since, 7)
        assert client_hub.tunnel is not None
        self.assertEqual(client_hub.tunnel.session.window, 65536)
        opening = link.client_handle.sent[0]
        self.assertEqual(opening.stream_open.client_id, "c1")
        self.assertEqual(opening.stream_open.group, "default")
        self.assertEqual(opening.stream_open.token, "secret")
        self.assertTrue(opening.stream_open.stream_id)

    def test_unknown_route_cancelled_with_502(self) -> None:
        """A request naming a route the client was not given is cancelled with 502 and never reaches a factory."""
        link, client_hub, factory = self.link()
        target = self.target()
        handler = Recorder()
        rid = target.tunnel.start(request_head(target, route="nope"), handler)
        link.flush()
        self.assertEqual(factory.created, [])
        self.assertEqual(handler.calls, [("aborted", 502, "client has no route 'nope'", True)])
        self.assertEqual(errors_in(link.client_handle.sent), [(rid, 502, "client has no route 'nope'")])
        self.assert_quiet(link)

    def test_allow_backends_blocks_unlisted_backend(self) -> None:
        """With allow_backends set, a route whose backend is not listed is refused with 502; a listed one is served."""
        link, client_hub, factory = self.link(allow_backends=["127.0.0.1:3001"])
        blocked, _, _ = self.start(link, "/")
        self.assertEqual(factory.created, [])
        self.assertEqual(blocked.names(), ["aborted"])
        self.assertEqual(blocked.calls[0][1], 502)
        self.assertIn("not allowed", blocked.calls[0][2])
        allowed, _, _ = self.start(link, "/api/x")
        self.assertEqual([b.route.name for b in factory.created], ["api"])
        self.assertEqual(allowed.names(), ["message", "closed"])
        self.assert_quiet(link)

    def test_backend_hostport(self) -> None:
        """backend_hostport lower-cases and fills the scheme's default port."""
        self.assertEqual(backend_hostport("http://App.Example.com/x"), "app.example.com:80")
        self.assertEqual(backend_hostport("https://app.example.com"), "app.example.com:443")
        self.assertEqual(backend_hostport("http://127.0.0.1:3000/"), "127.0.0.1:3000")
        self.assertEqual(backend_hostport("grpcs://[::1]"), "[::1]:443")
        self.assertEqual(backend_hostport("http://[::1]:8080"), "[::1]:8080")

    def test_protocol_without_factory_refused(self) -> None:
        """A request of a protocol the client has no factory for is refused with 502."""
        link, _, factory = self.link()
        target = self.target()
        handler = Recorder()
        head = ws_head()
        head.ws_request.route = "web"
        target.tunnel.start(head, handler)
        link.flush()
        self.assertEqual(factory.created, [])
        self.assertEqual(handler.calls, [("aborted", 502, "protocol not supported by this client", True)])

    def test_heartbeat_tick_sends_heartbeat(self) -> None:
        """heartbeat_tick on a live stream sends a Heartbeat towards the server."""
        link, client_hub, _ = self.link()
        n = len(link.client_handle.sent)
        self.clock.advance(90)
        client_hub.heartbeat_tick()
        new = link.client_handle.sent[n:]
        self.assertEqual(kinds(new), ["heartbeat"])
        self.assertFalse(new[0].heartbeat.ack)
        self.assertEqual(new[0].direction, pb.CLIENT_TO_SERVER)
        self.assertEqual(link.client_handle.aborted, [])
        link.flush()
        self.assertIsNotNone(client_hub.rtt)

    def test_heartbeat_tick_drops_silent_server(self) -> None:
        """heartbeat_tick after heartbeat_timeout with nothing received drops the stream and fails its requests."""
        link, client_hub, factory = self.link(answer=False)
        self.start(link)
        backend = factory.created[0]
        self.clock.advance(90.5)
        n = len(link.client_handle.sent)
        client_hub.heartbeat_tick()
        self.assertEqual(link.client_handle.sent[n:], [])
        self.assertEqual(link.client_handle.aborted, ["nothing from the server for 90 s"])
        self.assertEqual(backend.calls[-1], ("aborted", 502, "tunnel stream lost: nothing from the server for 90 s",
                                             False))
        self.assertIsNone(client_hub.tunnel)
        self.assertFalse(client_hub.is_connected)

    def test_messages_from_server_keep_client_alive(self) -> None:
        """Any message from the server resets the client's silence timer."""
        link, client_hub, _ = self.link()
        for _ in range(3):
            self.clock.advance(80)
            self.hub.heartbeat_tick()
            link.flush()
            client_hub.heartbeat_tick()
        self.assertEqual(link.client_handle.aborted, [])
        self.assertTrue(client_hub.is_connected)

    def test_config_sync_tick_sends_current_version(self) -> None:
        """config_sync_tick sends a ConfigSyncRequest carrying the version the client holds."""
        link, client_hub, _ = self.link()
        client_hub.config_sync_tick()
        last = link.client_handle.sent[-1]
        self.assertEqual(last.WhichOneof("payload"), "config_sync")
        self.assertEqual(last.config_sync.config_version, self.config.version())

    def test_config_sync_tick_without_stream_does_nothing(self) -> None:
        """config_sync_tick and heartbeat_tick with no stream do nothing."""
        client_hub, _ = self.client()
        client_hub.config_sync_tick()
        client_hub.heartbeat_tick()
        self.assertIsNone(client_hub.tunnel)

    def test_config_received_replaces_routes(self) -> None:
        """ConfigReceived replaces the route set; a dropped route is refused afterwards."""
        link, client_hub, factory = self.link()
        link.client_handle.on_message(control(pb.SERVER_TO_CLIENT, config_sync_response=pb.ConfigSyncResponse(
            config_version="v2", routes=[pb.Route(name="api", backend="http://127.0.0.1:3001")])))
        self.assertEqual(sorted(client_hub.routes), ["api"])
        self.assertEqual(client_hub.config_version, "v2")
        handler, _, _ = self.start(link, "/")
        self.assertEqual(handler.calls, [("aborted", 502, "client has no route 'web'", True)])
        self.assertEqual(factory.created, [])

    def test_lost_fails_in_flight_handlers(self) -> None:
        """ClientHub.lost() fails every in-flight backend exchange with 502 and forgets the stream."""
        link, client_hub, factory = self.link(answer=False)
        self.start(link)
        self.start(link)
        client_hub.lost(link.client_handle, "server went away")
        for backend in factory.created:
            self.assertEqual(backend.calls[-1], ("aborted", 502, "tunnel stream lost: server went away", False))
        self.assertIsNone(client_hub.tunnel)
        self.assertIsNone(client_hub.connected_since)
        self.assertFalse(client_hub.is_connected)

    def test_lost_for_stale_handle_ignored(self) -> None:
        """lost() for a handle that is no longer the current one leaves the new stream alone."""
        link1, client_hub, _ = self.link()
        client_hub.lost(link1.client_handle, "first")
        link2 = Link(self.hub, client_hub, peer="ipv4:10.0.0.7:1")
        client_hub.lost(link1.client_handle, "late report of the first loss")
        self.assertTrue(client_hub.is_connected)
        self.assertIs(client_hub.handle, link2.client_handle)

    def test_client_drain_waits_then_closes(self) -> None:
        """ClientHub.drain() waits for in-flight requests, then closes its stream cleanly."""
        link, client_hub, factory = self.link(answer=False)
        self.start(link)
        fired: list[object] = []
        client_hub.drain(5).addCallback(fired.append)
        self.clock.advance(1)
        self.assertEqual(fired, [])
        factory.created[0].respond()
        link.flush()
        self.clock.advance(0.05)
        self.assertEqual(fired, [None])
        self.assertEqual(link.client_handle.closed, 1)
        self.assertEqual(link.client_handle.aborted, [])
        self.assertIsNone(client_hub.tunnel)
