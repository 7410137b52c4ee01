"""``twistd tunneld-client``: options and the client's service tree.

  bridge (thread) -> one dial service per server (each reconnects forever with its own backoff;
                     drains its link before stopping)
                  -> gRPC backend channels (closed after in-flight calls end, drain_timeout at most)
  heartbeat and config-sync TimerServices
Without ``-c`` the client runs on built-in defaults that match the shipped
etc/client.toml, so it works against the shipped etc/server.toml.
"""

from __future__ import annotations

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
from tunneld.client_hub import ClientHub
from tunneld.config import CLIENT_MAX_MESSAGE_SIZE, ClientConfig, ConfigError, load_client_config
from tunneld.grpc_bridge.backend import GrpcBackendExchange, GrpcChannels, GrpcChannelsService
from tunneld.grpc_bridge.client import TunnelClientService
from tunneld.grpc_bridge.stream import Bridge, BridgeService, channel_credentials
from tunneld.logs import with_log_format
from tunneld.endpoints import server_endpoint
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
            raise usage.UsageError(str(e)) from None


@dataclass
class ClientApp:
    service: MultiService
    hub: ClientHub
    dial: TunnelClientService   # the first server's (the only one with a single server)
    entry: StreamServerEndpointService | None = None   # the forward direction's http_entry
    admin: AdminService | None = None   # /metrics, /status, dashboard (admin_listen)
    dials: tuple[TunnelClientService, ...] = ()   # one per server, in the order of `server`


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


def build_client(config: ClientConfig, reactor: Any, *, max_message_size: int = CLIENT_MAX_MESSAGE_SIZE) -> ClientApp:
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
                                        ping_interval=cfg.websocket_ping_interval, trust_root=backend_trust)

    channels = GrpcChannels(channel_credentials(cfg.backend_ca))  # backend channels, closed on stop (after the drain)

    def grpc_backend(tunnel: Tunnel, event: s.RequestReceived, route: pb.Route) -> ResponderHandler:
        return GrpcBackendExchange(tunnel, event.request_id, event.message, route, bridge, channels,
                                   finished=finished_on(tunnel))

    hub = ClientHub(cfg, reactor, {pb.HTTP: http_backend, pb.WEBSOCKET: websocket_backend, pb.GRPC: grpc_backend})
    bridge = Bridge(reactor)
    bridge_service = BridgeService(bridge)
    bridge_service.setServiceParent(top)
    dials = []
    for link in hub.links:
        dial = TunnelClientService(
            bridge, link.server, cfg.token, link.connected, link.lost, reactor,
            max_message_size=max_message_size, max_frame_size=min(cfg.max_frame_size, max_message_size),
            before_stop=lambda link=link: link.drain(cfg.drain_timeout),   # type: ignore[misc]
            credentials=channel_credentials(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) if cfg.tls else None,
            server_name=cfg.tls_server_name, keepalive=cfg.keepalive_interval,
        )
        link.on_ready = dial.reset
        link.dial = dial
        dial.setServiceParent(bridge_service)
        dials.append(dial)
    GrpcChannelsService(bridge, channels, grace=cfg.drain_timeout).setServiceParent(bridge_service)
    closer = PoolCloser(pool)
    closer.setServiceParent(top)
    top.after.append(closer)
    for interval, tick in ((cfg.heartbeat_interval, hub.heartbeat_tick),
                           (cfg.config_sync_interval, hub.config_sync_tick)):
        timer = TimerService(interval, tick)
        timer.clock = reactor
        timer.setServiceParent(top)
    hub.inspector = inspector.make(cfg.inspect, cfg.inspect_body_bytes) if cfg.admin_listen else None
    entry = None
    if cfg.http_entry:
        entry = StreamServerEndpointService(server_endpoint(reactor, cfg.http_entry),
                                            EntrySite(hub, reactor, inspector=hub.inspector))
        entry._raiseSynchronously = True
        entry.setServiceParent(top)
    admin = None
    if cfg.admin_listen:
        admin = client_admin(hub, reactor, cfg.admin_listen, cfg.admin_token)
        admin.setServiceParent(top)
        top.after.append(admin)
    return ClientApp(top, hub, dials[0], entry, admin, tuple(dials))


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    config = options["loaded"]
    service = build_client(config, reactor).service
    return with_log_format(service, config.client.log_format, getattr(options, "parent", None))
