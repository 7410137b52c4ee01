"""Twisted server endpoints from the config's ``host:port`` strings (used by both taps)."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.ssl import PrivateCertificate

from tunneld.config import parse_listen


def server_endpoint(reactor: Any, listen: str, backlog: int = 1024, *, tls_cert: str = "", tls_key: str = "") -> Any:
    """TCP, or TLS when ``tls_cert``/``tls_key`` (PEM files) are given."""
    host, port = parse_listen(listen)
    if tls_cert:
        with open(tls_cert, "rb") as f:
            chain = f.read()
        with open(tls_key, "rb") as f:
            key = f.read()
        options = PrivateCertificate.loadPEM(key + b"\n" + chain).options()
        return SSL4ServerEndpoint(reactor, port, options, backlog=backlog, interface=host)
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)
