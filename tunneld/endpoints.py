"""Twisted server endpoints from the config's ``host:port`` strings (used by both taps)."""

from __future__ import annotations

import errno
import socket
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import (SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint,
                                        _WrapperServerEndpoint)
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from tunneld.config import parse_listen


class ListenService(StreamServerEndpointService):
    """A listening port as a service; a failed listen goes to ``on_failure`` (one line, exit status).

    ``on_failure`` (set by the taps to ``ProcessExit.listen_failed(key, address)``)
    receives the Failure instead of a traceback; without it, the failure is
    raised at start (in-process tests and embedders see it at once).
    """

    on_failure: Callable[[Any], None] | None = None

    def __init__(self, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        if self.on_failure is None:
            super().privilegedStartService()
            return
        Service.privilegedStartService(self)
        on_failure = self.on_failure

        def failed(failure: Any) -> None:
            if not failure.check(CancelledError):
                on_failure(failure)
            return None

        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addErrback(failed)
        self._raiseSynchronously = False


def load_tls_pair(cert: str, key: str) -> Any:
    """A certificate chain and its key (PEM files) as one ``PrivateCertificate``.

    Raises ``ValueError`` saying which file and why when either cannot be
    read or parsed, or the key does not belong to the certificate.
    """
    from OpenSSL import crypto

    try:
        with open(cert, "rb") as f:
            chain = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {cert}: {e.strerror or e}") from None
    try:
        with open(key, "rb") as f:
            private = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {key}: {e.strerror or e}") from None
    try:
        return PrivateCertificate.loadPEM(private + b"\n" + chain)
    except crypto.Error as e:
        raise ValueError(f"cannot load {cert} with {key}: {_openssl_words(e)}") from None
    except Exception as e:  # pyOpenSSL/cryptography raise several kinds for a broken PEM or a wrong key
        raise ValueError(f"cannot load {cert} with {key}: {e or type(e).__name__}") from None


def _openssl_words(error: Exception) -> str:
    parts = [str(item[2]) for item in (error.args[0] if error.args and isinstance(error.args[0], list) else [])
             if len(item) > 2]
    return "; ".join(parts) or str(error) or "not a certificate and key"


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
        cert = load_tls_pair(tls_cert, tls_key)
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


def probe_bind(address: str) -> OSError | None:
    """Bind ``address`` once with a plain socket (as Twisted would) to learn why a listener could not.

    grpc reports a failed bind without its reason; the kernel tells us the
    same answer again.  None: it binds now (the failure was something else).
    """
    try:
        host, port = parse_listen(address)
    except ValueError as e:
        return OSError(errno.EINVAL, str(e))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return None
    except socket.gaierror as e:
        return OSError(errno.EADDRNOTAVAIL, str(e))
    except OSError as e:
        return e
    finally:
        sock.close()
