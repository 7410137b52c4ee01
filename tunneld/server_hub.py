"""Server side: the connected tunnel streams, and which one serves a request.

The hub accepts authenticated streams from the bridge (handshake, registry
entry, the group's routes), keeps them alive (heartbeats, cleanup of silent
streams), and answers the HTTP entry's question "which tunnel serves this
host and path" (``dispatch``).  Losing a stream fails its requests at once.
SIGTERM drains: new requests are refused, in-flight ones may finish for up
to ``drain_timeout``, then streams close cleanly.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tunneld import __version__
from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.config import ForwardRule, Route, ServerConfig
from tunneld.inspector import Inspector, Mask
from tunneld.logs import ThrottledWarning
from tunneld.dispatch import GrpcRefusal, GrpcTarget
from tunneld.grpc_bridge.stream import StreamHandle
from tunneld.protocols.headers import get_first
from tunneld.protocols.http_entry import Refusal, Target
from tunneld.registry.access import AccessControl
from tunneld.registry.admission import OpenGuard
from tunneld.registry.heartbeats import HeartbeatSchedule
from tunneld.registry.routes import RouteTable
from tunneld.registry.streams import DuplicateStream, StreamEntry, StreamRegistry
from tunneld.registry.upstreams import UpstreamPool
from tunneld.tunnel import ResponderHandler, Tunnel

# (tunnel, request, chosen origin, rule, next_origin(failed)) -> the handler dialling the upstream
UpstreamFactory = Callable[[Tunnel, s.RequestReceived, str, ForwardRule, Callable[[str], "str | None"]],
                           ResponderHandler]


def route_to_pb(route: Route) -> pb.Route:
    return pb.Route(
        name=route.name, host=route.host, path_prefix=route.path_prefix, backend=route.backend,
        set_host=route.set_host, timeout=route.timeout, grpc_service=route.grpc_service,
        max_message_size=route.max_message_size, max_body_size=route.max_body_size,
    )


#: Compared against when a stream names an unknown group (never equal: no token is this long).
_NO_GROUP_TOKEN = "\0" * 64


@dataclass(eq=False)
class ServerStream:
    tunnel: Tunnel
    handle: StreamHandle
    entry: StreamEntry | None = None
    token: str = ""   # the token it authenticated with (a reload may revoke it)


# Access refusals as gRPC statuses (SPEC §8.1): IP rules, credentials, the failed-login throttle.
_GRPC_DENIAL = {403: "PERMISSION_DENIED", 401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}

class ServerHub:
    """Owner of every tunnel stream on the server (a tunnel ``StreamOwner``)."""

    log = Logger()
    metrics: Any = None   # admin.RequestMetrics when the admin port is on; fed by finished()
    inspector: Inspector | None = None   # the inspector's ring (config inspect > 0), read by the admin port
    open_guard: OpenGuard | None = None  # the tunnel port's refused-open counts and throttle (set by the tap)
    chosen_client = ""

    def __init__(self, config: ServerConfig, clock: Any, *, upstream_factory: UpstreamFactory | None = None) -> None:
        self.clock = clock
        self.config = config
        self.routes: RouteTable[Route] = RouteTable(config.routes)
        self.access = AccessControl(config.routes)
        self.entry: Any = None   # the HTTP entry's EntrySite (connection metrics), set by the tap
        self.grpc_entry: Any = None   # the gRPC entry's GrpcEntryFactory (connection metrics), set by the tap
        self.forward_rules: RouteTable[ForwardRule] = RouteTable(config.forward)
        self.upstreams = {u.name: UpstreamPool(u.name, u.backends, u.cooldown) for u in config.upstreams}
        self.upstream_factory = upstream_factory
        self.registry = StreamRegistry(config.server.heartbeat_timeout)
        self.heartbeats = HeartbeatSchedule(config.server.heartbeat_interval)
        self.streams: dict[Tunnel, ServerStream] = {}
        self._targets: dict[tuple[str, Tunnel], Target] = {}   # dispatch's answers, per route and stream
        self.draining = False
        self.stopping = False   # SIGTERM arrived (/healthz says "draining"); the drain may start later (drain_delay)
        self.started_at = clock.seconds()
        self.ready = False      # latched: /healthz "ok" from the first moment every group with routes had a client
        self.counters: dict[str, int] = {"requests": 0, "violations": 0, "streams_opened": 0, "forwarded": 0,
                                         "messages_dropped": 0, "flow_stalls": 0,   # these two: closed streams'
                                         "stalls": 0}
        self.refusals = ThrottledWarning(self.log, "refused a forward request from a client")

    # -- authentication (bridge thread: reads immutable config only) -----------

    def authenticate(self, group: str, token: str) -> bool:
        g = self.config.group(group)
        # An unknown group still costs one comparison, so timing does not say which groups exist.
        candidates = g.tokens if g is not None else (_NO_GROUP_TOKEN,)
        ok = False
        for candidate in candidates:
            # Compare against every token so timing says nothing about which.
            ok |= hmac.compare_digest(candidate.encode(), token.encode())
        return ok and g is not None

    # -- streams ----------------------------------------------------------------

    def stream_connected(self, handle: StreamHandle, first: pb.TunnelMessage) -> None:
        """An authenticated Proxy call (reactor thread)."""
        cfg = self.config.server
        session = s.Session(s.Role.SERVER, window=cfg.window, max_window=cfg.max_window,
                            window_budget=cfg.window_budget)
        tunnel = Tunnel(session, handle.send, self, name=handle.peer)
        stream = ServerStream(tunnel, handle)
        self.streams[tunnel] = stream
        handle.on_message = lambda msg: self._received(stream, msg)
        handle.on_lost = lambda reason: self._lost(stream, reason)
        if self.draining:
            tunnel.control(lambda: session.reject("server shutting down"))
            self._close(stream, "server shutting down")
            return
        tunnel.receive(first)

    def _heard(self, entry: StreamEntry) -> None:
        entry.last_heartbeat = self.clock.seconds()

    def _received(self, stream: ServerStream, msg: pb.TunnelMessage) -> None:
        if stream.entry is not None:
            stream.entry.last_heartbeat = self.clock.seconds()
        stream.tunnel.receive(msg)

    def stream_event(self, tunnel: Tunnel, event: s.Event) -> None:
        stream = self.streams.get(tunnel)
        if stream is None:
            return
        if isinstance(event, s.OpenRequested):
            self._open(stream, event.request)
        elif isinstance(event, s.HeartbeatReceived):
            if event.ack and stream.entry is not None:
                rtt = max(0.0, self.clock.seconds() - event.sent_at_ms / 1000.0)
                self.registry.touch(stream.entry.key, self.clock.seconds(), rtt)
        elif isinstance(event, s.ConfigSyncRequested):
            if stream.entry is not None and event.version != self.config.version():
                tunnel.control(lambda: tunnel.session.push_config(self._config_for(stream.entry.group)))  # type: ignore[union-attr]
        elif isinstance(event, s.RequestRefused):
            self.refusals.note(self.clock.seconds(), event.message, request_id=event.request_id,
                               client=self._who(stream))
        elif isinstance(event, s.ProtocolViolation):
            self.counters["violations"] += 1
            self.log.warn("protocol violation from {client}: {message}", client=self._who(stream),
                          message=event.message, request_id=event.request_id, trace_id="")
            if event.fatal:
                self._close(stream, f"protocol violation: {event.message}", abort=True)

    def _open(self, stream: ServerStream, req: pb.StreamOpenRequest) -> None:
        now = self.clock.seconds()
        entry = StreamEntry(
            group=req.group, client_id=req.client_id or "anonymous", stream_id=req.stream_id or str(id(stream)),
            handle=stream, connected_at=now, last_heartbeat=now, address=stream.handle.peer, version=req.version,
        )
        session = stream.tunnel.session
        try:
            self.registry.add(entry)
        except DuplicateStream:
            stream.tunnel.control(lambda: session.reject("duplicate client_id and stream_id"))
            self._close(stream, "duplicate stream")
            return
        stream.entry = entry
        stream.token = req.token
        # The registry orders streams by load: the session reports every change.
        entry.in_flight = len(session)
        session.on_load = lambda n: setattr(entry, "in_flight", n)
        self.counters["streams_opened"] += 1
        response = pb.StreamOpenResponse(message=f"tunneld {__version__}", config=self._config_for(req.group))
        stream.tunnel.control(lambda: session.accept(response))
        # From now on the bridge thread answers the client's heartbeats itself
        # (grpc_bridge/stream.py): a fleet's idle CPU is mostly heartbeats.
        stream.handle.on_heard = lambda: self._heard(entry)
        stream.handle.answer_heartbeats = True
        self.log.info("client {client_id} connected to group {group} from {address} (stream {stream_id})",
                      client_id=entry.client_id, group=entry.group, address=entry.address, stream_id=entry.stream_id)

    def _config_for(self, group: str) -> pb.ConfigSyncResponse:
        return pb.ConfigSyncResponse(
            config_version=self.config.version(),
            routes=[route_to_pb(r) for r in self.config.routes_for_group(group)],
        )

    def request_received(self, tunnel: Tunnel, event: s.RequestReceived) -> ResponderHandler | None:
        """Forward direction: a client's http_entry request for one of our upstreams."""
        rid = event.request_id
        if self.draining:
            tunnel.cancel(rid, s.OVERLOADED, "server is shutting down")
            return None
        if event.protocol != pb.HTTP:
            tunnel.cancel(rid, s.BAD_GATEWAY, "the server forwards only HTTP requests")
            return None
        req = event.message.http_request
        rule = self.forward_rules.match_http(req.host, req.path)
        if rule is None or self.upstream_factory is None:
            tunnel.cancel(rid, 404, f"no forward rule for host {req.host or '-'} path {req.path}")
            return None
        pool = self.upstreams[rule.upstream]
        origin = pool.choose(self.clock.seconds())
        if origin is None:
            tunnel.cancel(rid, s.BAD_GATEWAY, f"every backend of upstream {pool.name!r} is down")
            return None
        self.counters["forwarded"] += 1

        def next_origin(failed: str) -> str | None:
            # Passive health: a refusing backend sits out its cool-down.
            pool.mark_down(failed, self.clock.seconds())
            return pool.choose(self.clock.seconds(), exclude=frozenset({failed}))

        return self.upstream_factory(tunnel, event, origin, rule, next_origin)

    def _lost(self, stream: ServerStream, reason: str) -> None:
        self._close(stream, reason)

    def _close(self, stream: ServerStream, reason: str, abort: bool = False) -> None:
        if self.streams.pop(stream.tunnel, None) is None:
            return
        for key in [k for k in self._targets if k[1] is stream.tunnel]:
            del self._targets[key]
        stream.tunnel.lost(reason)
        self.counters["messages_dropped"] += stream.tunnel.session.dropped
        self.counters["flow_stalls"] += stream.tunnel.stalls
        if stream.entry is not None:
            stream.tunnel.session.on_load = None
            self.registry.remove(stream.entry.key)
            self.log.info("client {client_id} disconnected: {reason}", client_id=stream.entry.client_id, reason=reason)
        if abort:
            stream.handle.abort(reason)
        else:
            stream.handle.close()

    def _who(self, stream: ServerStream) -> str:
        return stream.entry.client_id if stream.entry else stream.handle.peer

    # -- SIGHUP -----------------------------------------------------------------------

    def reload(self, config: ServerConfig) -> None:
        """Adopt a new (already validated) config: routes, rules, upstreams, groups, tokens.

        Connected clients get their group's routes at once; streams whose token
        or group is gone are disconnected.  Listen addresses and size limits
        only change on restart.
        """
        old = self.config
        self.config = config
        self.routes = RouteTable(config.routes)
        self._targets.clear()   # timeouts, limits and access rules may have changed
        self.access.reload(config.routes)   # remembered credentials are forgotten
        self.forward_rules = RouteTable(config.forward)
        pools = {}
        for u in config.upstreams:
            pool = UpstreamPool(u.name, u.backends, u.cooldown)
            previous = self.upstreams.get(u.name)
            if previous is not None:
                pool.down_until = {b: t for b, t in previous.down_until.items() if b in u.backends}
            pools[u.name] = pool
        self.upstreams = pools
        self.registry.heartbeat_timeout = config.server.heartbeat_timeout
        if self.open_guard is not None:
            self.open_guard.configure(config.server.auth_fail_limit, config.server.auth_fail_window)
        if self.inspector is not None:
            self.inspector.mask = Mask(config.server.inspect_mask)
        if config.server.heartbeat_interval != self.heartbeats.interval:
            self.heartbeats = HeartbeatSchedule(config.server.heartbeat_interval)
        listeners = ("tunnel_listen", "http_listen", "grpc_listen", "admin_listen", "max_message_size", "max_frame_size",
                     "header_timeout", "max_connections")
        changed = [k for k in listeners if getattr(old.server, k) != getattr(config.server, k)]
        if changed:
            self.log.warn("config reload: {keys} change only on restart", keys=", ".join(changed))
        per_stream = [k for k in ("window", "max_window", "window_budget")
                      if getattr(old.server, k) != getattr(config.server, k)]
        if per_stream:
            self.log.info("config reload: {keys} apply to streams opened from now on", keys=", ".join(per_stream))
        for stream in list(self.streams.values()):
            entry = stream.entry
            if entry is None:
                continue
            if not self.authenticate(entry.group, stream.token):
                self.log.warn("client {client_id}: its token is no longer valid for group {group}; disconnecting",
                              client_id=entry.client_id, group=entry.group)
                self._close(stream, "token revoked by a config reload", abort=True)
                continue
            session = stream.tunnel.session
            group = entry.group
            stream.tunnel.control(lambda: session.push_config(self._config_for(group)))
        self.log.info("config reloaded from {path}: version {version}, {n} routes", path=config.path,
                      version=config.version(), n=len(config.routes))

    # -- periodic work (TimerServices) ---------------------------------------------

    def heartbeat_tick(self) -> None:
        now_ms = int(self.clock.seconds() * 1000)
        for stream in list(self.streams.values()):
            if stream.entry is not None:
                session = stream.tunnel.session
                stream.tunnel.control(lambda: session.heartbeat(now_ms))

    def heartbeat_schedule_tick(self) -> None:
        """Every ``heartbeats.tick`` s: heartbeats for this tick's slice of quiet streams (registry/heartbeats.py)."""
        now = self.clock.seconds()
        now_ms = int(now * 1000)
        for entry in self.heartbeats.due(self.registry.streams(), now):
            stream = entry.handle
            assert isinstance(stream, ServerStream)
            session = stream.tunnel.session
            stream.tunnel.control(lambda: session.heartbeat(now_ms))

    def cleanup_tick(self) -> None:
        for entry in self.registry.expire(self.clock.seconds()):
            stream = entry.handle
            assert isinstance(stream, ServerStream)
            self.log.warn("client {client_id}: no heartbeat for {timeout:g} s, dropping its stream",
                          client_id=entry.client_id, timeout=self.registry.heartbeat_timeout)
            self._close(stream, "heartbeat timeout", abort=True)

    def stall_tick(self) -> None:
        """Mark streams that make no progress (requests waiting for credit, nothing received) stalled; drop long ones."""
        now = self.clock.seconds()
        observed = []
        for entry in self.registry.busy():
            session = entry.handle.tunnel.session  # type: ignore[attr-defined]
            observed.append((entry, session.blocked(), session.progress))
        timeout = self.config.server.stall_timeout
        started, recovered, overdue = self.registry.watch_stalls(now, observed, timeout)
        for entry in started:
            self.counters["stalls"] += 1
            self.log.warn("client {client_id} (stream {stream_id}) is stalled: its requests have waited {timeout:g} s "
                          "for window credit and nothing came back; new requests of group {group} go to its other "
                          "streams while there are any", client_id=entry.client_id, stream_id=entry.stream_id,
                          timeout=timeout, group=entry.group)
        for entry in recovered:
            self.log.info("client {client_id} (stream {stream_id}) makes progress again: no longer stalled",
                          client_id=entry.client_id, stream_id=entry.stream_id)
        for entry in overdue:
            self.log.warn("client {client_id} (stream {stream_id}) stalled for more than heartbeat_timeout "
                          "({timeout:g} s): dropping its stream", client_id=entry.client_id,
                          stream_id=entry.stream_id, timeout=self.registry.heartbeat_timeout)
            self._close(entry.handle, "stalled", abort=True)  # type: ignore[arg-type]

    # -- the HTTP entry's Dispatcher -------------------------------------------------

    def choose(self, group: str) -> Tunnel | None:
        chosen = self.registry.choose(group, self.clock.seconds())
        if chosen is None:
            return None
        tunnel: Tunnel = chosen.handle.tunnel  # type: ignore[attr-defined]
        self.chosen_client = chosen.client_id   # for the Target (inspector)
        return tunnel if tunnel.is_open else None

    def dispatch(self, host: str, path: str, address: str = "",
                 headers: list[tuple[bytes, bytes]] | None = None) -> Target | Refusal:
        """Which tunnel serves this request from ``address``; access control first (403/401/429)."""
        if self.draining:
            return Refusal(503, "server is shutting down")
        route = self.routes.match_http(host, path)
        if route is None:
            return Refusal(404, f"no route for host {host or '-'} path {path}")
        policy = self.access.policies.get(route.name) if self.access.policies else None
        if policy is not None:
            authorization = get_first(headers, b"authorization") if policy.users and headers else None
            denial = self.access.check(policy, address, authorization, self.clock.seconds())
            if denial is not None:
                return Refusal(denial.status, denial.message, route.name, denial.reason, denial.headers)
        tunnel = self.choose(route.group)
        if tunnel is None:
            return Refusal(502, f"no client connected for group {route.group!r} (route {route.name})", route.name)
        self.counters["requests"] += 1
        # A Target is immutable and depends only on the route (config) and the
        # stream: made once per pair, not per request (a frozen dataclass costs
        # microseconds to build); forgotten on reload and when the stream goes.
        key = (route.name, tunnel)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = Target(
                tunnel, route.name, route.timeout, route.max_body_size, route.set_host, route.max_message_size,
                strip_authorization=policy is not None and bool(policy.users), client_id=self.chosen_client,
                max_websockets=route.max_websockets, preserve_path=route.preserve_path)
        return target

    def dispatch_grpc(self, service: str, authority: str, address: str = "",
                      authorization: bytes | None = None) -> GrpcTarget | GrpcRefusal:
        """The gRPC entry's question: which tunnel serves ``service`` at ``authority`` for ``address``."""
        if self.draining:
            return GrpcRefusal("UNAVAILABLE", "server is shutting down")
        route = self.routes.match_grpc(service, authority)
        if route is None:
            return GrpcRefusal("UNIMPLEMENTED", f"no route for gRPC service {service!r}")
        policy = self.access.policies.get(route.name) if self.access.policies else None
        if policy is not None:
            denial = self.access.check(policy, address, authorization, self.clock.seconds())
            if denial is not None:
                return GrpcRefusal(_GRPC_DENIAL.get(denial.status, "PERMISSION_DENIED"), denial.message, route.name,
                                   denial.reason)
        tunnel = self.choose(route.group)
        if tunnel is None:
            return GrpcRefusal("UNAVAILABLE", f"no client connected for group {route.group!r} (route {route.name})",
                               route.name)
        self.counters["requests"] += 1
        return GrpcTarget(tunnel, route.name, route.max_message_size, client_id=self.chosen_client,
                          strip_authorization=policy is not None and bool(policy.users))

    def finished(self, record: dict[str, object]) -> None:
        if self.metrics is not None:
            self.metrics.observe(record)
        if record.get("refusal"):
            # Security events are logged even with access_log off (once per request).
            self.log.info("access refused: {protocol} {path} route={route} reason={refusal} status={status} "
                          "address={address} request_id={request_id} trace_id={trace_id}",
                          **{"address": "", "request_id": "", **record})
            return
        if not self.config.server.access_log:
            return
        self.log.info(
            "{protocol} {method} {path} route={route} status={status} {duration:.3f}s in={bytes_in} out={bytes_out} "
            "request_id={request_id} trace_id={trace_id} client={client}",
            **{"client": "-", **record},
        )

    # -- SIGTERM ----------------------------------------------------------------------

    def in_flight(self) -> int:
        return sum(len(stream.tunnel.session) for stream in self.streams.values())

    # -- /healthz (load balancers) --------------------------------------------------

    def health(self) -> tuple[int, str]:
        """What ``GET /healthz`` answers: (503, "starting"), (200, "ok") or (503, "draining").

        Ready once every group that has routes has a healthy stream here, or
        ``ready_timeout`` after start, whichever comes first; from then on ok
        until SIGTERM (a later client loss is the routes' 502, not a reason to
        take the whole server out of the balancer).
        """
        if self.stopping or self.draining:
            return 503, "draining"
        if not self.ready:
            now = self.clock.seconds()
            groups = {route.group for route in self.config.routes}
            served = all(any(self.registry.is_healthy(e, now) for e in self.registry.streams(g)) for g in groups)
            if served or now - self.started_at >= self.config.server.ready_timeout:
                self.ready = True
        return (200, "ok") if self.ready else (503, "starting")

    def drain(self, timeout: float) -> Deferred[None]:
        """Refuse new requests, wait for in-flight ones (up to ``timeout``), close streams."""
        self.draining = True
        self.stopping = True
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            if self.in_flight() and self.clock.seconds() < deadline:
                self.clock.callLater(0.05, check)
                return
            left = self.in_flight()
            if left:
                self.log.warn("drain timeout: {n} requests still in flight are cut", n=left)
            for stream in list(self.streams.values()):
                self._close(stream, "server shutting down")
            done.callback(None)

        check()
        return done
