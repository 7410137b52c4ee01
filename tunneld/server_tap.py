"""``twistd tunneld-server``: options and the server's service tree.

The tree (children start in this order, stop in reverse):
  bridge (thread)  -> tunnel port (grpc.aio; drains the hub before stopping)
  gRPC entry       (HTTP/2 on the reactor on grpc_listen, when set: GOAWAY on stop, calls get drain_timeout)
  HTTP entry       (twisted.web Site on http_listen; with http2, behind the HTTP/2 switch)
  heartbeat, cleanup TimerServices
  admin port       (/metrics, /status, /healthz; stops last, so /healthz says "draining" to the end)
SIGTERM (``ServerRoot.stopService``): /healthz turns 503 at once, the entries
keep serving for ``drain_delay`` (the load balancer takes the server out),
then every child but the admin port stops (the tunnel service drains the
hub), then the admin port.
Nothing here touches grpc or starts threads: that happens in startService,
after twistd has forked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage

from tunneld import session as s
from tunneld import inspector
from tunneld.admin import AdminService, server_admin
from tunneld.config import ConfigError, ForwardRule, ServerConfig, load_server_config
from tunneld.endpoints import ListenService, server_endpoint
from tunneld.hangup import HangupService
from tunneld.lifecycle import ProcessExit, check_tls_files, preflight
from tunneld.grpc_bridge.server import TunnelServerService
from tunneld.grpc_bridge.stream import Bridge, BridgeService, server_credentials
from tunneld.protocols.h2.connection import H2Limits
from tunneld.protocols.h2.grpc_entry import GrpcEntryFactory, GrpcEntryService
from tunneld.protocols.h2.http_entry import H2Entry
from tunneld.protocols.h2.switch import EntrySwitchFactory
from tunneld.protocols.http_backend import BackendExchange, PoolCloser, make_pool
from tunneld.protocols.http_entry import EntrySite
from tunneld.protocols.websocket import EntryWebSocketFactory, EntryWebSocketResource
from tunneld.logs import with_log_format
from tunneld.memory import TRIM_INTERVAL, Trimmer
from tunneld.registry.admission import OpenGuard, OpenRateLimiter
from tunneld.server_hub import ServerHub
from tunneld.tunnel import ResponderHandler, Tunnel


class Options(usage.Options):
    optParameters = [["config", "c", "etc/server.toml", "server configuration file (TOML)"]]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_server_config(self["config"])
        except ConfigError as e:
            # One line and status 1 (a UsageError would print the whole option list before it).
            sys.stderr.write(f"tunneld-server: {e}\n")
            raise SystemExit(1) from None


class ServerRoot(MultiService):
    """The server's top service: on stop, /healthz first, then ``drain_delay``, then the drain, admin last."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.hub: ServerHub | None = None
        self.last: Service | None = None   # the admin port

    def stopService(self) -> Deferred[Any]:
        hub = self.hub
        delay = hub.config.server.drain_delay if hub is not None else 0.0
        if hub is not None:
            hub.stopping = True
        Service.stopService(self)
        if delay <= 0:
            return self._stop_children(None)
        self.log.info("stopping: /healthz answers 503; entries keep serving for drain_delay {delay:g} s",
                      delay=delay)
        # A fresh Deferred: it fires (``called``) only once every child has stopped.
        done: Deferred[Any] = Deferred()
        deferLater(self.reactor, delay, lambda: None).addCallback(self._stop_children).chainDeferred(done)
        return done

    def _stop_children(self, _: object) -> Deferred[Any]:
        others = [maybeDeferred(child.stopService) for child in reversed(list(self)) if child is not self.last]
        done: Deferred[Any] = DeferredList(others)
        if self.last is not None:
            last = self.last
            done.addCallback(lambda _: maybeDeferred(last.stopService))
        return done


@dataclass
class ServerApp:
    service: MultiService
    hub: ServerHub
    tunnel: TunnelServerService
    http: StreamServerEndpointService | None
    grpc: GrpcEntryService | None = None
    admin: AdminService | None = None   # /metrics, /status, dashboard (admin_listen)
    exit: ProcessExit | None = None   # set: a listener that cannot bind ends the process (status 1, one line)


def build_server(config: ServerConfig, reactor: Any, exit: ProcessExit | None = None) -> ServerApp:
    """The server's service tree.  With ``exit``, every listener's failure goes to it (the twistd path)."""
    cfg = config.server
    top = ServerRoot(reactor)
    pool = make_pool(reactor, ca=cfg.upstream_ca)

    def upstream_backend(tunnel: Tunnel, event: s.RequestReceived, origin: str, rule: ForwardRule,
                         next_origin: Callable[[str], str | None]) -> ResponderHandler:
        return BackendExchange(tunnel, event.request_id, event.message, origin, pool, set_host=rule.set_host,
                               finished=hub.finished, route=rule.name, clock=reactor, timeout=rule.timeout,
                               next_origin=next_origin)

    hub = ServerHub(config, reactor, upstream_factory=upstream_backend)
    top.hub = hub
    # The inspector is read on the admin port only: without one, nothing is recorded.
    hub.inspector = (inspector.make(cfg.inspect, cfg.inspect_body_bytes, cfg.inspect_mask,
                                    header_bytes=cfg.inspect_header_bytes) if cfg.admin_listen else None)
    PoolCloser(pool).setServiceParent(top)
    # Refused tunnel opens: counted, logged per address, throttled (the tunnel port's bridge thread owns it).
    hub.open_guard = OpenGuard(cfg.auth_fail_limit, cfg.auth_fail_window)
    bridge = Bridge(reactor)
    bridge_service = BridgeService(bridge)
    bridge_service.setServiceParent(top)
    tunnel = TunnelServerService(
        bridge, cfg.tunnel_listen, hub.authenticate, hub.stream_connected,
        max_message_size=cfg.max_message_size, max_frame_size=cfg.max_frame_size,
        credentials=server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert else None, before_stop=lambda: hub.drain(cfg.drain_timeout),
        limiter=OpenRateLimiter(cfg.open_rate, cfg.open_burst) if cfg.open_rate else None,
        keepalive=cfg.keepalive_interval, guard=hub.open_guard,
        on_failure=exit.listen_failed("tunnel_listen", cfg.tunnel_listen) if exit is not None else None,
    )
    tunnel.setServiceParent(bridge_service)
    grpc_entry = None
    if cfg.grpc_listen:
        limits = H2Limits(max_header_list_size=cfg.max_header_size, idle_timeout=cfg.idle_timeout,
                          header_timeout=cfg.header_timeout)
        factory = GrpcEntryFactory(hub, reactor, limits=limits, max_connections=cfg.max_connections,
                                   max_connections_per_ip=cfg.max_connections_per_ip, inspector=hub.inspector)
        endpoint = server_endpoint(reactor, cfg.grpc_listen, tls_cert=cfg.grpc_tls_cert, tls_key=cfg.grpc_tls_key,
                                   proxy_protocol=cfg.proxy_protocol, alpn=(b"h2",))
        hub.grpc_entry = factory
        grpc_entry = GrpcEntryService(endpoint, factory, reactor, grace=cfg.drain_timeout)
        grpc_entry.setServiceParent(top)
        if exit is not None:
            grpc_entry.on_failure = exit.listen_failed("grpc_listen", cfg.grpc_listen)
    http = None
    if cfg.http_listen:
        scheme = "https" if cfg.http_tls_cert else "http"
        ws_factory = EntryWebSocketFactory(hub, reactor, scheme=scheme, ping_interval=cfg.websocket_ping_interval,
                                           max_websockets_per_ip=cfg.max_websockets_per_ip)
        ws_factory.inspector = hub.inspector
        websocket = EntryWebSocketResource(ws_factory)
        site = EntrySite(hub, reactor, scheme=scheme, max_header_size=cfg.max_header_size, websocket=websocket,
                         header_timeout=cfg.header_timeout, max_connections=cfg.max_connections,
                         inspector=hub.inspector, max_connections_per_ip=cfg.max_connections_per_ip,
                         proxy_protocol=cfg.proxy_protocol)
        hub.entry = site
        # http2: the switch picks HTTP/2 (ALPN h2, or the h2c preface) or the site (HTTP/1.1, WebSocket).
        entry_factory: Any = site
        alpn: tuple[bytes, ...] = ()
        if cfg.http2:
            entry_factory = EntrySwitchFactory(site, H2Entry(site, idle_timeout=cfg.idle_timeout))
            alpn = (b"h2", b"http/1.1")
        endpoint = server_endpoint(reactor, cfg.http_listen, tls_cert=cfg.http_tls_cert, tls_key=cfg.http_tls_key,
                                   proxy_protocol=cfg.proxy_protocol, alpn=alpn)
        http = ListenService(endpoint, entry_factory)
        if exit is not None:
            http.on_failure = exit.listen_failed("http_listen", cfg.http_listen)
        http.setServiceParent(top)
    # Heartbeats go out spread over the interval, one slice per tick, only to quiet streams.
    # The stall watch looks only at streams with requests in flight (and stalled ones).
    stall_check = min(1.0, cfg.stall_timeout / 4)
    # After a burst, glibc's freed heap pages go back to the system (tunneld/memory.py).
    trimmer = Trimmer()
    for interval, tick in ((hub.heartbeats.tick, hub.heartbeat_schedule_tick), (cfg.cleanup_interval, hub.cleanup_tick),
                           (stall_check, hub.stall_tick), (TRIM_INTERVAL, trimmer.tick)):
        timer = TimerService(interval, tick)
        timer.clock = reactor
        timer.setServiceParent(top)
    admin = None
    if cfg.admin_listen:
        admin = server_admin(hub, reactor, cfg.admin_listen)
        if exit is not None:
            admin.on_failure = exit.listen_failed("admin_listen", cfg.admin_listen)
        admin.setServiceParent(top)
        top.last = admin
    if exit is not None:
        exit.setServiceParent(top)
    return ServerApp(top, hub, tunnel, http, grpc_entry, admin, exit)


class ReloadOnHangup(HangupService):
    """SIGHUP: re-read the config file; a broken file is refused and the old config stays."""

    def __init__(self, path: str, hub: ServerHub, reactor: Any) -> None:
        super().__init__(reactor)
        self.path = path
        self.hub = hub

    def reload(self) -> None:
        try:
            config = load_server_config(self.path)
        except ConfigError as e:
            self.log.error("config reload refused, keeping the running config: {error}", error=str(e))
            return
        for warning in config.warnings:
            self.log.warn("unsafe setting: {problem}", problem=warning)
        self.hub.reload(config)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    config = options["loaded"]
    for warning in config.warnings:   # unsafe but allowed on loopback (shown once logging starts)
        Logger().warn("unsafe setting: {problem}", problem=warning)
    check_tls_files(config.path, [(pair, getattr(config.server, pair[0]), getattr(config.server, pair[1]))
                                  for pair in (("tls_cert", "tls_key"), ("http_tls_cert", "http_tls_key"),
                                               ("grpc_tls_cert", "grpc_tls_key"))], "tunneld-server")
    cfg = config.server
    preflight("tunneld-server", config.path, [(key, getattr(cfg, key)) for key in
                                              ("tunnel_listen", "http_listen", "grpc_listen", "admin_listen")])
    app = build_server(config, reactor, ProcessExit(reactor, config.path))
    ReloadOnHangup(config.path, app.hub, reactor).setServiceParent(app.service)
    return with_log_format(app.service, config.server.log_format, getattr(options, "parent", None))
