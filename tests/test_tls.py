"""TLS on every hop: tunnel port (and mTLS), HTTP entry, gRPC entry, https backends, all with test-time certificates."""

from __future__ import annotations

import os
from typing import Any

import grpc
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from tests.backends import test_site
from tests.certs import make_pki
from tests.harness import Stack, wait_for


class TlsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.pki = make_pki(os.path.abspath(self.mktemp()))
        site, _, _ = test_site()
        self.plain_backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.plain_backend.stopListening)
        with open(self.pki.server_cert, "rb") as f:
            chain = f.read()
        with open(self.pki.server_key, "rb") as f:
            key = f.read()
        tls_site, _, _ = test_site()
        options = PrivateCertificate.loadPEM(key + b"\n" + chain).options()
        self.tls_backend = yield SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(tls_site)
        self.addCleanup(self.tls_backend.stopListening)
        with open(self.pki.ca, "rb") as f:
            ca = Certificate.loadPEM(f.read())
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        self.https = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=ca), pool=self.pool))

    def stack(self, **server: Any) -> Stack:
        p = self.pki
        settings = {"tls_cert": p.server_cert, "tls_key": p.server_key, "http_tls_cert": p.server_cert,
                    "http_tls_key": p.server_key}
        settings.update(server)
        stack = Stack([
            {"name": "web", "group": "default", "backend": f"http://127.0.0.1:{self.plain_backend.getHost().port}"},
            {"name": "secure", "group": "default", "path_prefix": "/small",
             "backend": f"https://127.0.0.1:{self.tls_backend.getHost().port}"},
        ], server=settings)
        self.addCleanup(stack.stop)
        return stack

    @inlineCallbacks
    def get(self, stack: Stack, path: str) -> Any:
        resp = yield self.https.get(f"https://127.0.0.1:{stack.http_port}{path}".encode())
        return resp.code, (yield treq.content(resp))

    @inlineCallbacks
    def test_tls_tunnel_and_https_entry(self) -> Any:
        """A client dialling with TLS (verified against our CA) serves requests arriving over https."""
        stack = self.stack()
        yield stack.start()
        yield stack.add_client(tls_ca=self.pki.ca)
        code, body = yield self.get(stack, "/echo")
        self.assertEqual(code, 200)
        self.assertIn(b'"x-forwarded-proto", "https"', body.lower())

    @inlineCallbacks
    def test_client_rejects_a_server_its_ca_did_not_sign(self) -> Any:
        """A client trusting another CA never connects (verification is on)."""
        stack = self.stack()
        yield stack.start()
        app = yield stack.add_client(tls_ca=self.pki.other_ca, wait=False)
        yield wait_for(lambda: app.dial.attempts >= 2, what="a failed dial")
        self.assertFalse(app.hub.is_connected)
        self.assertEqual(len(stack.server.hub.registry), 0)  # type: ignore[union-attr]

    @inlineCallbacks
    def test_plaintext_client_cannot_use_a_tls_tunnel_port(self) -> Any:
        """A client dialling in plaintext cannot register on a TLS tunnel port."""
        stack = self.stack()
        yield stack.start()
        app = yield stack.add_client(wait=False)
        yield wait_for(lambda: app.dial.attempts >= 2, what="a failed dial")
        self.assertEqual(len(stack.server.hub.registry), 0)  # type: ignore[union-attr]

    @inlineCallbacks
    def test_mutual_tls_requires_a_client_certificate(self) -> Any:
        """With tls_client_ca set, a client without a certificate is refused and one with it is served."""
        stack = self.stack(tls_client_ca=self.pki.ca)
        yield stack.start()
        anonymous = yield stack.add_client(tls_ca=self.pki.ca, wait=False)
        yield wait_for(lambda: anonymous.dial.attempts >= 2, what="a refused dial")
        self.assertFalse(anonymous.hub.is_connected)
        yield stack.stop_client(anonymous)
        yield stack.add_client(tls_ca=self.pki.ca, tls_cert=self.pki.client_cert, tls_key=self.pki.client_key)
        code, _ = yield self.get(stack, "/echo")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_https_backend_verified_with_backend_ca(self) -> Any:
        """An https:// backend is verified: served with backend_ca, 502 without it."""
        stack = self.stack()
        yield stack.start()
        trusting = yield stack.add_client(tls_ca=self.pki.ca, backend_ca=self.pki.ca)
        code, body = yield self.get(stack, "/small")
        self.assertEqual((code, body), (200, b"ok\n"))
        yield stack.stop_client(trusting)
        yield stack.add_client(tls_ca=self.pki.ca)
        code, body = yield self.get(stack, "/small")
        self.assertEqual(code, 502)

    @inlineCallbacks
    def test_grpc_entry_over_tls(self) -> Any:
        """The gRPC entry speaks TLS: a caller verifying our CA gets a proper gRPC status back."""
        stack = self.stack(grpc_listen="127.0.0.1:0", grpc_tls_cert=self.pki.server_cert,
                           grpc_tls_key=self.pki.server_key)
        yield stack.start()
        yield stack.add_client(tls_ca=self.pki.ca)
        with open(self.pki.ca, "rb") as f:
            roots = f.read()

        def call() -> str:
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            with grpc.secure_channel(f"127.0.0.1:{stack.grpc_port}", creds) as channel:
                method = channel.unary_unary("/no.Such/Method")
                try:
                    method(b"", timeout=10)
                except grpc.RpcError as e:
                    return f"{e.code().name}: {e.details()}"
            return "OK"

        result = yield deferToThread(call)
        self.assertTrue(result.startswith("UNIMPLEMENTED"), result)
        self.assertIn("no.Such", result)
