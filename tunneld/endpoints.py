"""Twisted server endpoints from the config's ``host:port`` strings (used by both taps)."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

from tunneld.config import parse_listen


def server_endpoint(reactor: Any, listen: str, backlog: int = 1024) -> Any:
    host, port = parse_listen(listen)
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)
