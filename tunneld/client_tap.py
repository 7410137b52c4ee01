"""``twistd tunneld-client``: options and the client's service tree.

  bridge (thread) -> one dial service per server (each reconnects forever with its own backoff;
                     drains its link before stopping)
  gRPC backend connections (HTTP/2 on the reactor; closed after the drain)
  heartbeat and config-sync TimerServices
  SIGHUP handler (``ReloadOnHangup``): re-reads the file, ``ClientHub.reload`` applies it
Without ``-c`` the client runs on built-in defaults that match the shipped
etc/client.toml, so it works against the shipped etc/server.toml.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.web.client import HTTPConnectionPool
from twisted.python import usage

from tunneld import session as s
from tunneld import tunnel_pb2 as pb
from tunneld import inspector
from tunneld.admin import AdminService, client_admin
from tunneld.client_hub import ClientHub, ServerLink
from tunneld.config import CLIENT_MAX_MESSAGE_SIZE, ClientConfig, ConfigError, load_client_config
from tunneld.grpc_bridge.client import TunnelClientService
from tunneld.grpc_bridge.stream import Bridge, BridgeService, channel_credentials
from tunneld.hangup import HangupService
from tunneld.logs import with_log_format
from tunneld.endpoints import ListenService, server_endpoint
from tunneld.lifecycle import ProcessExit, check_tls_files, preflight
from tunneld.protocols.h2.grpc_backend import GrpcBackendCall, GrpcBackends, GrpcBackendsService
from tunneld.protocols.h2.http_entry import H2Entry
from tunneld.protocols.h2.switch import EntrySwitchFactory
from tunneld.memory import TRIM_INTERVAL, Trimmer
from tunneld.protocols.http_entry import EntrySite
from tunneld.protocols.http_backend import BackendExchange, PoolCloser, make_pool, trust_root
from tunneld.protocols.websocket import BackendWebSocketExchange
from tunneld.tunnel import ResponderHandler, Tunnel


class Options(usage.Options):
    optParameters = [["config", "c", None, "client configuration file (TOML); default: built-in defaults"]]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_client_config(self["config"])
        except ConfigError as e:
            # One line and status 1 (a UsageError would print the whole option list before it).
            sys.stderr.write(f"tunneld-client: {e}\n")
            raise SystemExit(1) from None


@dataclass
class ClientApp:
    service: MultiService
    hub: ClientHub
    dial: TunnelClientService   # the first server's (the only one with a single server)
    entry: StreamServerEndpointService | None = None   # the forward direction's http_entry
    admin: AdminService | None = None   # /metrics, /status, dashboard (admin_listen)
    dials: tuple[TunnelClientService, ...] = ()   # one per server, in the order of `server`
    exit: ProcessExit | None = None   # set: a listener that cannot bind ends the process (status 1, one line)


class ClientRoot(MultiService):
    """The client's top service: on stop, every other child first (the drain included), then ``after``.

    ``after``: the backend connection pool (the drained requests hand their
    connections back to it) and the admin port (so /status and /metrics stay
    up while in-flight requests finish)."""

    def __init__(self) -> None:
        super().__init__()
        self.after: list[Service] = []

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        others = [maybeDeferred(child.stopService) for child in reversed(list(self)) if child not in self.after]
        done: Deferred[Any] = DeferredList(others)
        for service in self.after:
            done.addCallback(lambda _, service=service: maybeDeferred(service.stopService))
        return done


def build_client(config: ClientConfig, reactor: Any, *, max_message_size: int = CLIENT_MAX_MESSAGE_SIZE,
                 exit: ProcessExit | None = None) -> ClientApp:
    """The client's service tree.  With ``exit``, every listener's failure goes to it (the twistd path)."""
    cfg = config.client
    top = ClientRoot()
    pool = make_pool(reactor, ca=cfg.backend_ca)
    backend_trust = trust_root(cfg.backend_ca)
    hub: ClientHub

    def finished_on(tunnel: Tunnel) -> Any:
        """Records of requests served for one server carry its address (the metrics' ``server`` label)."""
        return lambda record: hub.finished({**record, "server": tunnel.name})

    def http_backend(tunnel: Tunnel, event: s.RequestReceived, route: pb.Route) -> ResponderHandler:
        return BackendExchange(tunnel, event.request_id, event.message, route.backend, pool,
                               finished=finished_on(tunnel))

    def websocket_backend(tunnel: Tunnel, event: s.RequestReceived, route: pb.Route) -> ResponderHandler:
        return BackendWebSocketExchange(tunnel, event.request_id, event.message, route.backend, reactor,
                                        max_message_size=route.max_message_size or 16 * 1024 * 1024,
                                        ping_interval=hub.settings.websocket_ping_interval, trust_root=backend_trust,
                                        set_host=route.set_host)

    grpc_backends = GrpcBackends(reactor, trust_root=backend_trust)   # closed on stop (after the drain)

    def grpc_backend(tunnel: Tunnel, event: s.RequestReceived, route: pb.Route) -> ResponderHandler:
        return GrpcBackendCall(tunnel, event.request_id, event.message, route, grpc_backends,
                               finished=finished_on(tunnel))

    hub = ClientHub(cfg, reactor, {pb.HTTP: http_backend, pb.WEBSOCKET: websocket_backend, pb.GRPC: grpc_backend})
    bridge = Bridge(reactor)
    bridge_service = BridgeService(bridge)
    bridge_service.setServiceParent(top)
    dials = []

    def make_dial(link: ServerLink) -> None:
        """The dial service of ``link``, started at once when the client runs (a server added by SIGHUP).

        TLS and channel options are the start's (they change only on restart);
        the token and drain_timeout are read from the hub's current settings."""
        dial = TunnelClientService(
            bridge, link.server, hub.settings.token, link.connected, link.lost, reactor,
            max_message_size=max_message_size, max_frame_size=min(cfg.max_frame_size, max_message_size),
            before_stop=lambda: link.drain(hub.settings.drain_timeout),
            credentials=channel_credentials(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) if cfg.tls else None,
            server_name=cfg.tls_server_name, keepalive=cfg.keepalive_interval,
            dial_jitter=cfg.dial_jitter,
        )
        link.on_ready = dial.reset
        link.dial = dial
        dial.setServiceParent(bridge_service)

    for link in hub.links:
        make_dial(link)
        dials.append(link.dial)
    hub.make_dial = make_dial
    backends_closer = GrpcBackendsService(grpc_backends)
    backends_closer.setServiceParent(top)
    top.after.append(backends_closer)
    closer = PoolCloser(pool)
    closer.setServiceParent(top)
    top.after.append(closer)
    for key, tick in (("heartbeat_interval", hub.heartbeat_tick), ("config_sync_interval", hub.config_sync_tick)):
        timer = TimerService(getattr(cfg, key), tick)
        timer.clock = reactor
        timer.setServiceParent(top)
        hub.timers[key] = timer   # a reload retimes it
    # After a burst, glibc's freed heap pages go back to the system (tunneld/memory.py).
    trim_timer = TimerService(TRIM_INTERVAL, Trimmer().tick)
    trim_timer.clock = reactor
    trim_timer.setServiceParent(top)
    hub.inspector = (inspector.make(cfg.inspect, cfg.inspect_body_bytes, cfg.inspect_mask,
                                    header_bytes=cfg.inspect_header_bytes) if cfg.admin_listen else None)
    entry = None
    if cfg.http_entry:
        site = EntrySite(hub, reactor, inspector=hub.inspector, max_connections_per_ip=cfg.max_connections_per_ip)
        hub.entry = site   # connection metrics on the admin port
        # http2: h2c prior knowledge beside HTTP/1.1 (the switch reads the preface).
        entry_factory: Any = EntrySwitchFactory(site, H2Entry(site)) if cfg.http2 else site
        entry = ListenService(server_endpoint(reactor, cfg.http_entry), entry_factory)
        if exit is not None:
            entry.on_failure = exit.listen_failed("http_entry", cfg.http_entry)
        entry.setServiceParent(top)
    admin = None
    if cfg.admin_listen:
        admin = client_admin(hub, reactor, cfg.admin_listen)
        if exit is not None:
            admin.on_failure = exit.listen_failed("admin_listen", cfg.admin_listen)
        admin.setServiceParent(top)
        top.after.append(admin)
    if exit is not None:
        exit.setServiceParent(top)
    return ClientApp(top, hub, dials[0], entry, admin, tuple(dials), exit)


class ReloadOnHangup(HangupService):
    """SIGHUP: re-read the client's config file; a broken file is refused and the old config stays."""

    def __init__(self, path: str, hub: ClientHub, reactor: Any) -> None:
        super().__init__(reactor)
        self.path = path
        self.hub = hub

    def reload(self) -> None:
        if not self.path:
            self.log.warn("config reload: the client runs on built-in defaults (no -c file); nothing to reload")
            return
        try:
            config = load_client_config(self.path)
        except ConfigError as e:
            self.log.error("config reload refused, keeping the running config: {error}", error=str(e))
            return
        self.hub.reload(config)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    config = options["loaded"]
    check_tls_files(config.path or "the client's config", [(("tls_cert", "tls_key"), config.client.tls_cert,
                                                            config.client.tls_key)], "tunneld-client")
    preflight("tunneld-client", config.path, [(key, getattr(config.client, key)) for key in
                                              ("http_entry", "admin_listen")])
    app = build_client(config, reactor, exit=ProcessExit(reactor, config.path))
    ReloadOnHangup(config.path, app.hub, reactor).setServiceParent(app.service)
    return with_log_format(app.service, config.client.log_format, getattr(options, "parent", None))
