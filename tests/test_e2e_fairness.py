"""Fair under abuse, over loopback: one address, one WebSocket or one path trick cannot take the service.

Attackers are blocking sockets in a thread pool (bound to 127.0.0.2, "another
address"); a normal client on 127.0.0.1 is answered during each attack.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks

from tests.harness import wait_for
from tests.test_e2e_access import AccessTestCase, get, raw_exchange, status_of


class PerAddressTests(AccessTestCase):
    """Default max_connections_per_ip (256)."""

    def routes(self, backend: str, ws_backend: str) -> list[dict[str, Any]]:
        return [{"name": "open", "backend": backend}]

    @inlineCallbacks
    def test_300_connections_from_one_address_refused_past_the_cap(self) -> Any:
        """300 connections from 127.0.0.2: 256 are held, the other 44 get 503 and close; 127.0.0.1 is served meanwhile."""
        port = self.stack.http_port
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])

        def attack() -> list[bytes]:
            answers = []
            for _ in range(300):
                s = socket.socket()
                s.settimeout(5)
                s.bind(("127.0.0.2", 0))
                s.connect(("127.0.0.1", port))
                held.append(s)
            for s in held:
                s.setblocking(False)
                try:
                    answers.append(s.recv(4096))
                except BlockingIOError:
                    answers.append(b"")
            return answers

        yield self.in_thread(attack)
        yield wait_for(lambda: self.site.refused_per_ip == 44, what="44 refusals")
        self.assertEqual(self.site.per_ip.held("127.0.0.2"), 256)
        for _ in range(5):
            self.assertEqual(status_of((yield self.in_thread(get, port, "/ok"))), 200)
        refused = yield self.in_thread(raw_exchange, port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n", "127.0.0.2")
        self.assertEqual(status_of(refused), 503)
        self.assertIn(b"too many connections from your address", refused)
        for s in held:
            s.close()
        yield wait_for(lambda: self.site.per_ip.held("127.0.0.2") == 0, what="slots released")
        self.assertEqual(status_of((yield self.in_thread(get, port, "/ok", source="127.0.0.2"))), 200)
        yield self.assert_released()
        self.assertEqual(self.site.per_ip.counts, {})
