"""Per-address caps (tunneld.registry.per_address) and their use on the HTTP entry, without sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from tests.test_access import NullDispatcher
from tunneld.protocols.http_entry import EntrySite
from tunneld.registry.per_address import PerAddressLimit


class PerAddressLimitTests(SynchronousTestCase):
    def test_limit_per_address(self) -> None:
        """Each address gets ``limit`` slots; a refusal takes nothing and is counted; others are unaffected."""
        limit = PerAddressLimit(2)
        self.assertTrue(limit.acquire("a"))
        self.assertTrue(limit.acquire("a"))
        self.assertFalse(limit.acquire("a"))
        self.assertTrue(limit.acquire("b"))
        self.assertEqual((limit.held("a"), limit.held("b"), len(limit), limit.refused), (2, 1, 3, 1))

    def test_release_frees_and_forgets(self) -> None:
        """A release makes room again; an address with nothing held is forgotten (bounded table)."""
        limit = PerAddressLimit(1)
        limit.acquire("a")
        self.assertFalse(limit.acquire("a"))
        limit.release("a")
        self.assertEqual(limit.counts, {})
        self.assertTrue(limit.acquire("a"))
        limit.release("a")
        limit.release("a")   # an extra release never goes negative
        self.assertEqual((limit.counts, len(limit)), ({}, 0))

    def test_zero_is_no_limit(self) -> None:
        """limit 0 never refuses."""
        limit = PerAddressLimit(0)
        self.assertTrue(all(limit.acquire("a") for _ in range(1000)))
        self.assertEqual(limit.refused, 0)


def peer(ip: str) -> IPv4Address:
    return IPv4Address("TCP", ip, 40000)


class EntryPerIpTests(SynchronousTestCase):
    def make_site(self, **kwargs: Any) -> EntrySite:
        site = EntrySite(NullDispatcher(), Clock(), max_connections_per_ip=2, **kwargs)
        site.doStart()
        self.addCleanup(site.doStop)
        return site

    def connect(self, factory: Any, ip: str) -> tuple[Any, StringTransport]:
        proto = factory.buildProtocol(peer(ip))
        transport = StringTransport(peerAddress=peer(ip))
        proto.makeConnection(transport)
        return proto, transport

    def test_third_connection_from_one_address_503(self) -> None:
        """max_connections_per_ip = 2: the third connection from one address gets 503 and is closed, counted; another address is served; a close frees a slot."""
        site = self.make_site()
        first, _ = self.connect(site, "192.0.2.1")
        self.connect(site, "192.0.2.1")
        refused, refused_t = self.connect(site, "192.0.2.1")
        self.assertTrue(refused_t.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"from your address", refused_t.value())
        self.assertTrue(refused_t.disconnecting)
        refused.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")   # nothing parsed after the refusal
        self.assertNotIn(b"404", refused_t.value())
        other, other_t = self.connect(site, "192.0.2.2")
        other.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"404", other_t.value())
        self.assertEqual(site.refused_per_ip, 1)
        refused.connectionLost(None)
        self.assertEqual(site.per_ip.held("192.0.2.1"), 2)   # the refused one never held a slot
        first.connectionLost(None)
        _, again_t = self.connect(site, "192.0.2.1")
        self.assertEqual(again_t.value(), b"")
        self.assertEqual(site.per_ip.held("192.0.2.1"), 2)

    def test_proxy_protocol_address_counts(self) -> None:
        """With the PROXY protocol the header's source address is counted, not the proxy's."""
        site = self.make_site(proxy_protocol=True)
        wrapped = HAProxyWrappingFactory(site)
        wrapped.doStart()
        self.addCleanup(wrapped.doStop)

        def via_proxy(source: str) -> StringTransport:
            proto, transport = self.connect(wrapped, "10.0.0.9")   # every connection comes from the proxy
            proto.dataReceived(f"PROXY TCP4 {source} 10.0.0.1 5555 80\r\n".encode())
            proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return transport

        a1, a2, a3 = via_proxy("198.51.100.1"), via_proxy("198.51.100.1"), via_proxy("198.51.100.1")
        b1 = via_proxy("198.51.100.2")
        self.assertEqual([t.value()[:12] for t in (a1, a2, a3, b1)],
                         [b"HTTP/1.1 404", b"HTTP/1.1 404", b"HTTP/1.1 503", b"HTTP/1.1 404"])
        self.assertEqual(site.per_ip.held("10.0.0.9"), 0)
        self.assertEqual((site.per_ip.held("198.51.100.1"), site.refused_per_ip), (2, 1))


class ThrottledWarningTests(SynchronousTestCase):
    def test_one_line_per_message_per_period_with_a_count(self) -> None:
        """A refusal repeated within 10 s is folded into the next line's count, not logged again."""
        from twisted.logger import Logger, formatEvent

        from tunneld.logs import ThrottledWarning
        lines: list[str] = []
        warning = ThrottledWarning(Logger(observer=lambda e: lines.append(formatEvent(e))), "refused a request")
        for now in (0.0, 1.0, 2.0, 10.5, 11.0):
            warning.note(now, "client is at its limit: 1 requests in flight (max_concurrency)")
        warning.note(11.0, "another limit")
        self.assertEqual(lines, [
            "refused a request: client is at its limit: 1 requests in flight (max_concurrency)",
            "refused a request: client is at its limit: 1 requests in flight (max_concurrency) "
            "(2 more since the last line)",
            "refused a request: another limit",
        ])
        self.assertEqual(warning.total, 6)
