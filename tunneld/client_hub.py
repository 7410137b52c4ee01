"""Client side: one tunnel stream per server, their routes, and serving their requests.

``server`` in client.toml may list several servers (SPEC §7.1).  The
``ClientHub`` holds one ``ServerLink`` per server; each link is the
``StreamOwner`` of that server's stream and has its own dial service (own
reconnect backoff), so losing one server leaves the others untouched.

For every connection attempt a link's dial service hands over a fresh
``StreamHandle``; the link builds a session on it, sends ``stream_open``,
keeps the routes *that server* granted, and starts a backend exchange for
each request that server sends, but only for a route it gave and, when
``allow_backends`` is set, only to an allowed host:port.  A silent server
(nothing received for ``heartbeat_timeout``) is dropped so the dial service
reconnects.  SIGTERM lets in-flight requests finish, then closes cleanly.

The forward direction (``http_entry``) goes to the connected link with the
fewest requests in flight (ties rotate).

SIGHUP (``ClientHub.reload``): links read the settings through the hub, so a
reloaded file applies to the next request (allow_backends, timeouts,
access_log, admin_token, ...) and to the next dial (token, group, window
sizes); a request already started keeps the backend exchange it began with.
Servers added to ``server`` get a link and a dial service, removed ones are
drained and closed.  Keys that shaped listeners or channels at start change
only on restart, as on the server.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger

from tunneld import __version__
from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld.config import ClientConfig, ClientSettings
from tunneld.grpc_bridge.stream import StreamHandle
from tunneld.inspector import Mask
from tunneld.logs import ThrottledWarning
from tunneld.protocols.http_entry import Refusal, Target
from tunneld.tunnel import ResponderHandler, Tunnel

BackendFactory = Callable[[Tunnel, s.RequestReceived, pb.Route], ResponderHandler]


def backend_hostport(url: str) -> str:
    """"http://Host:port/…" -> "host:port" (default port by scheme)."""
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0].lower()
    if hostport.startswith("["):
        return hostport if "]:" in hostport else f"{hostport}:{_DEFAULT_PORTS.get(scheme, 80)}"
    if ":" not in hostport:
        hostport = f"{hostport}:{_DEFAULT_PORTS.get(scheme, 80)}"
    return hostport


_DEFAULT_PORTS = {"http": 80, "ws": 80, "grpc": 80, "https": 443, "wss": 443, "grpcs": 443}


class ServerLink:
    """The client's tunnel stream to one server (a tunnel ``StreamOwner``)."""

    log = Logger()

    def __init__(self, hub: ClientHub, server: str) -> None:
        self.hub = hub
        self.server = server
        self.clock = hub.clock
        self.client_id = hub.client_id
        self.leaving = False   # removed from `server` by a reload: draining alone, the hub stays up
        self.tunnel: Tunnel | None = None
        self.handle: StreamHandle | None = None
        self.routes: dict[str, pb.Route] = {}
        self.config_version = ""
        self.connected_since: float | None = None
        self.last_received = 0.0
        self.rtt: float | None = None
        self.on_ready: Callable[[], None] | None = None   # the dial service resets its backoff here
        self.draining = False
        self.counters: dict[str, int] = {"messages_dropped": 0, "flow_stalls": 0}  # of streams already lost
        self.dial: Any = None   # its TunnelClientService (reconnects, attempts), set by the tap
        self.refusals = ThrottledWarning(self.log, f"refused a request from {server}")

    @property
    def settings(self) -> ClientSettings:
        """The hub's, read at each use: a reload reaches every link at once."""
        return self.hub.settings

    @property
    def backends(self) -> dict[int, BackendFactory]:
        return self.hub.backends

    @property
    def in_flight(self) -> int:
        tunnel = self.tunnel
        return len(tunnel.session) if tunnel is not None else 0

    @property
    def state(self) -> str:
        """"connected", "connecting" (a dial or open handshake in progress), "draining" or "down"."""
        if self.draining:
            return "draining"
        if self.is_connected and self.connected_since is not None:
            return "connected"
        return "connecting" if self.handle is not None else "down"

    # -- connection lifecycle -----------------------------------------------------

    def connected(self, handle: StreamHandle) -> None:
        """A fresh dial: build the session and send stream_open."""
        session = s.Session(s.Role.CLIENT, client_id=self.client_id, max_concurrency=self.settings.max_concurrency,
                            max_websockets=self.settings.max_websockets,
                            max_window=self.settings.max_window, window_budget=self.settings.window_budget)
        tunnel = Tunnel(session, handle.send, self, name=handle.peer)
        self.tunnel, self.handle = tunnel, handle
        self.last_received = self.clock.seconds()
        handle.on_message = lambda msg: self._received(tunnel, msg)
        request = pb.StreamOpenRequest(
            client_id=self.client_id, group=self.settings.group, version=__version__,
            stream_id=uuid.uuid4().hex, token=self.settings.token, max_concurrency=self.settings.max_concurrency,
        )
        tunnel.control(lambda: session.open(request))

    def lost(self, handle: StreamHandle, reason: str) -> None:
        if handle is not self.handle or self.tunnel is None:
            return
        self.tunnel.lost(reason)
        self.counters["messages_dropped"] += self.tunnel.session.dropped
        self.counters["flow_stalls"] += self.tunnel.stalls
        self.tunnel = self.handle = None
        self.connected_since = None
        self.routes = {}   # that server's grant ends with its stream; the next open brings them again
        self.rtt = None

    def _received(self, tunnel: Tunnel, msg: pb.TunnelMessage) -> None:
        self.last_received = self.clock.seconds()
        tunnel.receive(msg)

    @property
    def is_connected(self) -> bool:
        return self.tunnel is not None and self.tunnel.is_open

    # -- StreamOwner --------------------------------------------------------------

    def stream_event(self, tunnel: Tunnel, event: s.Event) -> None:
        if tunnel is not self.tunnel:
            return
        if isinstance(event, s.OpenAccepted):
            self._install(event.response.config)
            self.connected_since = self.clock.seconds()
            self.log.info("connected to {server} as {client_id} (group {group}, {n} routes)",
                          server=self.server, client_id=self.client_id, group=self.settings.group,
                          n=len(self.routes))
            if self.on_ready is not None:
                self.on_ready()
        elif isinstance(event, s.OpenRejected):
            self.log.error("server {server} refused the stream: {message}", server=self.server,
                           message=event.message)
            self._drop(f"refused: {event.message}")
        elif isinstance(event, s.ConfigReceived):
            self._install(event.config)
            self.log.info("routes updated to version {version} ({n} routes)", version=self.config_version,
                          n=len(self.routes))
        elif isinstance(event, s.HeartbeatReceived):
            if event.ack:
                self.rtt = max(0.0, self.clock.seconds() - event.sent_at_ms / 1000.0)
        elif isinstance(event, s.RequestRefused):
            self.refusals.note(self.clock.seconds(), event.message, request_id=event.request_id)
        elif isinstance(event, s.ProtocolViolation):
            self.log.warn("protocol violation from the server: {message}", message=event.message,
                          request_id=event.request_id, trace_id="")
            if event.fatal:
                self._drop(f"protocol violation: {event.message}")

    def _install(self, config: pb.ConfigSyncResponse) -> None:
        self.routes = {r.name: r for r in config.routes}
        self.config_version = config.config_version

    def request_received(self, tunnel: Tunnel, event: s.RequestReceived) -> ResponderHandler | None:
        if self.draining or self.hub.draining:
            tunnel.cancel(event.request_id, s.OVERLOADED, "client is shutting down")
            return None
        head = event.message
        kind = head.WhichOneof("payload")
        route_name = getattr(head, kind).route if kind else ""
        route = self.routes.get(route_name)
        trace = head.trace_id
        if route is None:
            self.log.warn("request for unknown route {route!r} refused", route=route_name,
                          request_id=event.request_id, trace_id=trace)
            tunnel.cancel(event.request_id, s.BAD_GATEWAY, f"client has no route {route_name!r}")
            return None
        allowed = self.settings.allow_backends
        if allowed and backend_hostport(route.backend) not in allowed:
            self.log.warn("backend {backend} of route {route} is not in allow_backends", backend=route.backend,
                          route=route.name, request_id=event.request_id, trace_id=trace)
            tunnel.cancel(event.request_id, s.BAD_GATEWAY, f"backend of route {route.name!r} not allowed by the client")
            return None
        factory = self.backends.get(event.protocol)
        if factory is None:
            tunnel.cancel(event.request_id, s.BAD_GATEWAY, "protocol not supported by this client")
            return None
        return factory(tunnel, event, route)

    # -- periodic work --------------------------------------------------------------

    def heartbeat_tick(self) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        if self.clock.seconds() - self.last_received > self.settings.heartbeat_timeout:
            self._drop(f"nothing from the server for {self.settings.heartbeat_timeout:g} s")
            return
        now_ms = int(self.clock.seconds() * 1000)
        tunnel.control(lambda: tunnel.session.heartbeat(now_ms))

    def config_sync_tick(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.is_open:
            tunnel.control(lambda: tunnel.session.request_config(self.config_version))

    def _drop(self, reason: str) -> None:
        handle = self.handle
        if handle is not None:
            self.lost(handle, reason)
            handle.abort(reason)

    # -- SIGTERM ------------------------------------------------------------------------

    def drain(self, timeout: float) -> Deferred[None]:
        """Let in-flight requests finish (up to ``timeout``), then close the stream cleanly."""
        self.draining = True
        if not self.leaving:
            self.hub.draining = True
        tunnel = self.tunnel
        if tunnel is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            if self.tunnel is tunnel and len(tunnel.session) and self.clock.seconds() < deadline:
                self.clock.callLater(0.05, check)
                return
            handle = self.handle
            if handle is not None and self.tunnel is tunnel:
                self.lost(handle, "client shutting down")
                handle.close()
            done.callback(None)

        check()
        return done


#: [client] keys that shaped listeners, the tunnel channels or the backend agent at start.
RESTART_ONLY = ("client_id", "http_entry", "admin_listen", "tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name",
                "backend_ca", "keepalive_interval", "max_frame_size", "log_format")
#: Keys sent in (or fixed at) the stream open: they apply to each server's next dial.
NEXT_DIAL = ("group", "token", "max_concurrency", "max_window", "window_budget")


@dataclass(frozen=True)
class ReloadReport:
    """What a reload did with each changed key."""

    live: tuple[str, ...] = ()        # in force for the next request
    next_dial: tuple[str, ...] = ()   # in force from each server's next stream
    restart: tuple[str, ...] = ()     # ignored until restart (the running value stays)
    added: tuple[str, ...] = ()       # servers dialled from now on
    removed: tuple[str, ...] = ()     # servers drained and closed


class ClientHub:
    """The client's links, one per server, and the forward direction's choice among them."""

    log = Logger()
    metrics: Any = None   # admin.RequestMetrics when the admin port is on; fed by finished()
    inspector: Any = None   # inspector.Inspector when the admin port has one (config inspect > 0)
    entry: Any = None   # the http_entry's EntrySite (connection metrics), set by the tap

    def __init__(self, settings: ClientSettings, clock: Any, backends: dict[int, BackendFactory]) -> None:
        self.settings = settings
        self.clock = clock
        self.backends = backends
        self.client_id = settings.client_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.draining = False
        self.links = [ServerLink(self, server) for server in settings.server_list]
        self.leaving: list[ServerLink] = []   # removed by a reload, still draining
        self._turn = 0
        # Set by the tap: builds and starts a new link's dial service (None: `server` changes need a restart).
        self.make_dial: Callable[[ServerLink], None] | None = None
        # Set by the tap: the TimerServices of heartbeat_interval / config_sync_interval, retimed by a reload.
        self.timers: dict[str, Any] = {}

    # -- the whole client ---------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Connected to at least one server."""
        return any(link.is_connected for link in self.links)

    @property
    def in_flight(self) -> int:
        return sum(link.in_flight for link in (*self.links, *self.leaving))

    def link_of(self, tunnel: Tunnel) -> ServerLink | None:
        for link in (*self.links, *self.leaving):
            if link.tunnel is tunnel:
                return link
        return None

    # -- the http_entry's Dispatcher (forward direction) ------------------------------

    def choose(self) -> ServerLink | None:
        """The connected link with the fewest requests in flight; equal ones take turns."""
        ready = [link for link in self.links
                 if link.is_connected and link.connected_since is not None and not link.draining]
        if not ready:
            return None
        self._turn = (self._turn + 1) % len(ready)
        ordered = ready[self._turn:] + ready[:self._turn]
        return min(ordered, key=lambda link: link.in_flight)

    def dispatch(self, host: str, path: str, address: str = "",
                 headers: list[tuple[bytes, bytes]] | None = None) -> Target | Refusal:
        """Every entry request goes to a server, which matches its [[forward]] rules."""
        if self.draining:
            return Refusal(503, "client is shutting down")
        link = self.choose()
        if link is None or link.tunnel is None:
            servers = ", ".join(self.settings.server_list)
            return Refusal(502, f"not connected to the server {servers}")
        return Target(link.tunnel, "forward", self.settings.request_timeout)

    def finished(self, record: dict[str, object]) -> None:
        if self.metrics is not None:
            self.metrics.observe(record)
        if not self.settings.access_log:
            return
        self.log.info("{protocol} route={route} status={status} {duration:.3f}s out={bytes_out} "
                       "request_id={request_id} trace_id={trace_id}", **record)

    # -- periodic work --------------------------------------------------------------

    def heartbeat_tick(self) -> None:
        for link in self.links:
            link.heartbeat_tick()

    def config_sync_tick(self) -> None:
        for link in self.links:
            link.config_sync_tick()

    # -- SIGTERM ------------------------------------------------------------------------

    def drain(self, timeout: float) -> Deferred[None]:
        """Drain every link at once (each dial service also drains its own link before stopping)."""
        self.draining = True
        return DeferredList([link.drain(timeout) for link in self.links]).addCallback(lambda _: None)

    # -- SIGHUP -------------------------------------------------------------------------

    def reload(self, config: ClientConfig) -> ReloadReport:
        """Adopt a new (already validated) client config; see the module docstring.

        Restart-only keys keep their running value, so ``self.settings`` is
        always what is in force.
        """
        old, new = self.settings, config.client
        restart: list[str] = []
        # An unset client_id is made up anew by every load: keep the running one.
        if new.client_id_generated != old.client_id_generated or (
                not new.client_id_generated and new.client_id != old.client_id):
            restart.append("client_id")
        new = replace(new, client_id=old.client_id, client_id_generated=old.client_id_generated)
        skip = {"server", "servers", "client_id", "client_id_generated"}
        changed = [f.name for f in fields(ClientSettings)
                   if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)]
        restart += [k for k in changed if k in RESTART_ONLY]
        if "inspect_mask" in changed and self.inspector is not None:
            self.inspector.mask = Mask(new.inspect_mask)
        if any(k in changed for k in ("inspect", "inspect_body_bytes")):
            if self.inspector is not None and new.inspect > 0:
                self.inspector.resize(new.inspect, new.inspect_body_bytes, new.inspect_header_bytes)
            elif old.admin_listen:   # turning the inspector on or off: the admin port and entry hold it
                restart += [k for k in ("inspect", "inspect_body_bytes") if k in changed]
        servers_changed = old.server_list != new.server_list
        if servers_changed and self.make_dial is None:
            restart.append("server")
        keep = {k: getattr(old, k) for k in restart if k != "server"}
        if "server" in restart:
            keep.update(server=old.server, servers=old.servers)
        new = replace(new, **keep)
        self.settings = new
        for link in self.links:
            if link.dial is not None:
                link.dial.token = new.token   # the next dial's `authorization` metadata
        for key, timer in self.timers.items():
            step = getattr(new, key)
            if step != getattr(old, key):
                running = timer.running
                if running:
                    timer.stopService()
                timer.step = step
                if running:
                    timer.startService()
        added: list[str] = []
        removed: list[str] = []
        if servers_changed and "server" not in restart:
            added, removed = self._relink(new.server_list)
        report = ReloadReport(
            live=tuple(k for k in changed if k not in restart and k not in NEXT_DIAL),
            next_dial=tuple(k for k in changed if k in NEXT_DIAL),
            restart=tuple(restart), added=tuple(added), removed=tuple(removed),
        )
        self._log_reload(config.path, report)
        return report

    def _relink(self, servers: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """Links for exactly ``servers`` (in that order): new ones dial, dropped ones drain and close."""
        existing = {link.server: link for link in self.links}
        removed = [link for link in self.links if link.server not in servers]
        self.links = [existing.get(server) or ServerLink(self, server) for server in servers]
        added = [link for link in self.links if link.server not in existing]
        for link in removed:
            self._retire(link)
        assert self.make_dial is not None
        for link in added:
            self.make_dial(link)
        return [link.server for link in added], [link.server for link in removed]

    def _retire(self, link: ServerLink) -> None:
        """Drain a link whose server left the list (its in-flight requests finish), then forget it."""
        link.leaving = True
        self.leaving.append(link)
        dial = link.dial
        if dial is not None and dial.parent is not None:
            done = maybeDeferred(dial.disownServiceParent)   # stopService drains the link first
        else:
            done = link.drain(self.settings.drain_timeout)
        done.addBoth(lambda _: self.leaving.remove(link) if link in self.leaving else None)

    def _log_reload(self, path: str, report: ReloadReport) -> None:
        if report.restart:
            self.log.warn("config reload: {keys} change only on restart", keys=", ".join(report.restart))
        if report.next_dial:
            self.log.info("config reload: {keys} apply from each server's next connection (the current streams "
                          "stay up)", keys=", ".join(report.next_dial))
        parts = []
        if report.live or report.next_dial:
            parts.append("changed " + ", ".join((*report.live, *report.next_dial)))
        if report.added:
            parts.append("servers added " + ", ".join(report.added))
        if report.removed:
            parts.append("servers removed (draining) " + ", ".join(report.removed))
        self.log.info("config reloaded from {path}: {changes}", path=path,
                      changes="; ".join(parts) or "nothing changed that applies live")
