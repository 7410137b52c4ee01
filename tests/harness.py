"""Real server and client services on loopback, in the test process.

``Stack`` starts a tunneld server (tunnel port + HTTP entry on ephemeral
ports; the gRPC entry too with ``server={"grpc_listen": "127.0.0.1:0"}``,
its port in ``grpc_port``) and, on demand, clients, exactly as the taps build them, against
whatever backends a test listens on.  ``wait_for`` polls a condition with a
bound instead of sleeping.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from tunneld.client_tap import ClientApp, build_client
from tunneld.config import parse_client_config, parse_server_config
from tunneld.server_tap import ServerApp, build_server

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

TOKEN = "test-token"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Deferred[None]:
    """Fire when ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    @inlineCallbacks
    def poll() -> Any:
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            yield deferLater(reactor, interval, lambda: None)

    return poll()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stack:
    """One server plus clients, all real services on 127.0.0.1."""

    def __init__(self, routes: list[dict[str, Any]], *, groups: list[dict[str, Any]] | None = None,
                 server: dict[str, Any] | None = None, upstreams: list[dict[str, Any]] | None = None,
                 forward: list[dict[str, Any]] | None = None) -> None:
        settings = {"tunnel_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "grpc_listen": "",
                    "admin_listen": "", "heartbeat_interval": 1, "cleanup_interval": 1}
        settings.update(server or {})
        self.config = parse_server_config(
            {"server": settings, "groups": groups or [{"name": "default", "tokens": [TOKEN]}], "routes": routes,
             "upstreams": upstreams or [], "forward": forward or []},
            "test-server.toml",
        )
        self.server: ServerApp | None = None
        self.clients: list[ClientApp] = []
        self.tunnel_port = 0
        self.http_port = 0
        self.grpc_port = 0

    @inlineCallbacks
    def start(self) -> Any:
        self.server = build_server(self.config, reactor)
        self.server.service.startService()
        self.tunnel_port = yield self.server.tunnel.ready
        if self.server.grpc is not None:
            self.grpc_port = yield self.server.grpc.ready
        if self.server.http is None:   # http_listen = "": a server for gRPC only
            return
        # Chain a copy: yielding the service's own Deferred would eat the port
        # its stopService needs.
        got: Deferred[Any] = Deferred()

        def keep(port: Any) -> Any:
            got.callback(port)
            return port

        self.server.http._waitingForPort.addCallback(keep)
        port = yield got
        self.http_port = port.getHost().port

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.http_port}{path}".encode()

    @inlineCallbacks
    def add_client(self, *, group: str = "default", token: str = TOKEN, wait: bool = True,
                   **settings: Any) -> Any:
        client_settings = {"server": f"127.0.0.1:{self.tunnel_port}", "group": group, "token": token,
                           "heartbeat_interval": 1, "heartbeat_timeout": 5}
        client_settings.update(settings)
        config = parse_client_config({"client": client_settings}, "test-client.toml")
        app = build_client(config, reactor)
        app.service.startService()
        self.clients.append(app)
        if wait:
            yield wait_for(lambda: app.hub.is_connected and self._registered(app), what="client connected")
        return app

    @inlineCallbacks
    def entry_port(self, app: ClientApp) -> Any:
        """The port of a client's http_entry (forward direction)."""
        assert app.entry is not None
        got: Deferred[Any] = Deferred()

        def keep(port: Any) -> Any:
            got.callback(port)
            return port

        app.entry._waitingForPort.addCallback(keep)
        port = yield got
        return port.getHost().port

    def _registered(self, app: ClientApp) -> bool:
        assert self.server is not None
        return any(e.client_id == app.hub.client_id for e in self.server.hub.registry.streams())

    @inlineCallbacks
    def stop_client(self, app: ClientApp) -> Any:
        if app in self.clients:
            self.clients.remove(app)
            yield app.service.stopService()

    @inlineCallbacks
    def stop(self) -> Any:
        for app in list(self.clients):
            yield self.stop_client(app)
        if self.server is not None:
            yield self.server.service.stopService()
            self.server = None

    def server_in_flight(self) -> int:
        assert self.server is not None
        return self.server.hub.in_flight()

    def client_in_flight(self) -> int:
        return sum(app.hub.in_flight for app in self.clients)
