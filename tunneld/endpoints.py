"""Twisted server endpoints from the config's ``host:port`` strings (used by both taps)."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import (SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint,
                                        _WrapperServerEndpoint)
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from tunneld.config import parse_listen


def server_endpoint(reactor: Any, listen: str, backlog: int = 1024, *, tls_cert: str = "", tls_key: str = "",
                    proxy_protocol: bool = False, alpn: tuple[bytes, ...] = ()) -> Any:
    """TCP, or TLS when ``tls_cert``/``tls_key`` (PEM files) are given.

    ``proxy_protocol``: every connection must start with HAProxy's PROXY
    header (v1 or v2; Twisted's ``haproxy:`` wrapper), before TLS if any;
    the transport's ``getPeer()`` is then the address the header carries, and
    a connection without a valid header is closed.  ``alpn``: the protocols
    TLS offers, in order of preference (``b"h2"`` for the HTTP/2 edge).
    """
    host, port = parse_listen(listen)
    options = None
    if tls_cert:
        with open(tls_cert, "rb") as f:
            chain = f.read()
        with open(tls_key, "rb") as f:
            key = f.read()
        cert = PrivateCertificate.loadPEM(key + b"\n" + chain)
        if alpn:
            options = CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                         acceptableProtocols=list(alpn))
        else:
            options = cert.options()
        if not proxy_protocol:
            return SSL4ServerEndpoint(reactor, port, options, backlog=backlog, interface=host)
    if ":" in host:
        tcp: Any = TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    else:
        tcp = TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    if not proxy_protocol:
        return tcp
    if options is None:
        return _WrapperServerEndpoint(tcp, HAProxyWrappingFactory)
    # PROXY header first, then the TLS handshake.
    return _WrapperServerEndpoint(tcp, lambda factory: HAProxyWrappingFactory(TLSMemoryBIOFactory(options, False,
                                                                                                   factory)))
