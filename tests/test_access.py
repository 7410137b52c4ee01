"""Access decisions without sockets or real time: CIDRs, htpasswd, the credential cache, the failure limit, the head deadline."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import bcrypt
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tunneld.admin import RequestMetrics
from tunneld.protocols.http_entry import EntrySite, Refusal
from tunneld.registry.access import AccessControl, FailureLimiter, Policy, parse_cidr, parse_htpasswd_line

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


@dataclass(frozen=True)
class R:
    name: str
    basic_auth: tuple[str, ...] = ()
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()


def auth(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class FakeVerify:
    """Counts calls; 'pw' is the only right password."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls.append((password, hashed))
        return password == b"pw" and hashed != b"dummy"


def control(*routes: R, **kwargs: Any) -> tuple[AccessControl, FakeVerify]:
    verify = FakeVerify()
    return AccessControl(routes, verify=verify, dummy_hash=lambda like: b"dummy", **kwargs), verify


class ParsingTests(SynchronousTestCase):
    def test_cidrs_v4_v6_and_bare_addresses(self) -> None:
        """CIDRs of both families parse; a bare address is a single host; host bits are tolerated."""
        self.assertEqual(str(parse_cidr("10.1.2.3/8")), "10.0.0.0/8")
        self.assertEqual(str(parse_cidr("2001:db8::1")), "2001:db8::1/128")
        self.assertEqual(str(parse_cidr("192.0.2.7")), "192.0.2.7/32")
        for bad in ("10.0.0.0/33", "nope", "", "1.2.3", "::/129"):
            self.assertRaises(ValueError, parse_cidr, bad)

    def test_htpasswd_lines(self) -> None:
        """bcrypt lines ($2y$, $2b$) parse; other formats and broken lines are refused with the user named."""
        user, hashed = parse_htpasswd_line(f"alice:{HASH}")
        self.assertEqual((user, hashed), ("alice", HASH.encode()))
        self.assertEqual(parse_htpasswd_line("bob:" + HASH.replace("$2b$", "$2y$"))[0], "bob")
        with self.assertRaisesRegex(ValueError, "user 'carol'.*not bcrypt"):
            parse_htpasswd_line("carol:$apr1$abc$0123456789012345678901")
        for bad in ("alice", ":" + HASH, "alice:", "al ice:" + HASH, "alice:" + HASH[:-1]):
            self.assertRaises(ValueError, parse_htpasswd_line, bad)


class IpRuleTests(SynchronousTestCase):
    def test_deny_before_allow_and_families(self) -> None:
        """deny_ips wins over allow_ips; IPv4-mapped IPv6 counts as IPv4; a non-IP address is never allowed."""
        ac, _ = control(R("r", allow_ips=("10.0.0.0/8", "2001:db8::/32"), deny_ips=("10.6.6.0/24",)))
        policy = ac.policies["r"]
        self.assertIsNone(ac.check(policy, "10.1.2.3", None, 0))
        self.assertIsNone(ac.check(policy, "::ffff:10.1.2.3", None, 0))
        self.assertIsNone(ac.check(policy, "2001:db8::5", None, 0))
        denied = ac.check(policy, "10.6.6.6", None, 0)
        assert denied is not None
        self.assertEqual((denied.status, denied.reason), (403, "ip_denied"))
        for address in ("192.0.2.1", "2001:db9::1", "", "unix-socket"):
            refused = ac.check(policy, address, None, 0)
            assert refused is not None
            self.assertEqual((refused.status, refused.reason), (403, "ip_not_allowed"))

    def test_open_routes_have_no_policy(self) -> None:
        """A route without rules costs nothing: it has no policy at all."""
        ac, _ = control(R("open"), R("guarded", deny_ips=("10.0.0.0/8",)))
        self.assertEqual(list(ac.policies), ["guarded"])
        self.assertIsNone(Policy.of(R("open")))


class BasicAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ac, self.verify = control(R("web", basic_auth=(f"alice:{HASH}",)))
        self.policy = self.ac.policies["web"]

    def check(self, header: bytes | None, source: str = "192.0.2.1", now: float = 0.0) -> Any:
        return self.ac.check(self.policy, source, header, now)

    def test_challenge_and_verdicts(self) -> None:
        """No credentials: 401 with the realm (bcrypt not run); wrong: 401; right: allowed."""
        missing = self.check(None)
        self.assertEqual((missing.status, missing.reason), (401, "no_credentials"))
        self.assertEqual(missing.headers, ((b"www-authenticate", b'Basic realm="web"'),))
        self.assertEqual(self.check(b"Bearer x").reason, "no_credentials")
        self.assertEqual(self.verify.calls, [])
        self.assertEqual(self.check(auth("alice", "wrong")).reason, "bad_credentials")
        self.assertIsNone(self.check(auth("alice", "pw")))
        self.assertEqual(self.check(b"Basic !!notbase64").reason, "bad_credentials")
        self.assertEqual(self.check(b"Basic " + base64.b64encode(b"no-colon")).reason, "bad_credentials")

    def test_each_header_verified_once(self) -> None:
        """The same header, right or wrong, runs bcrypt once until the entry expires."""
        for _ in range(5):
            self.assertIsNone(self.check(auth("alice", "pw"), now=1.0))
            self.assertEqual(self.check(auth("alice", "bad"), now=1.0).reason, "bad_credentials")
        self.assertEqual(len(self.verify.calls), 2)
        self.assertIsNone(self.check(auth("alice", "pw"), now=1.0 + self.ac.cache_ttl))
        self.assertEqual(len(self.verify.calls), 3)

    def test_cache_is_bounded_and_keeps_no_header(self) -> None:
        """At most cache_size entries (least recently used go first); keys are hashes, not headers."""
        ac, verify = control(R("web", basic_auth=(f"alice:{HASH}",)), cache_size=3)
        policy = ac.policies["web"]
        for i in range(10):
            ac.check(policy, f"10.0.0.{i}", auth("alice", f"p{i}"), 0)
        self.assertEqual(len(ac.cache), 3)
        self.assertTrue(all(len(key) == 32 for key in ac.cache))
        self.assertNotIn(auth("alice", "p9"), ac.cache)

    def test_unknown_user_costs_the_same(self) -> None:
        """An unknown user is verified against a dummy hash (no timing hint), and refused."""
        self.assertEqual(self.check(auth("mallory", "pw")).reason, "bad_credentials")
        self.assertEqual(self.verify.calls, [(b"pw", b"dummy")])

    def test_failures_limited_per_source(self) -> None:
        """After MAX_FAILURES failures from one address within the window: 429 without bcrypt; others unaffected; the window passes."""
        for i in range(10):
            self.assertEqual(self.check(auth("alice", f"guess{i}"), now=5.0).reason, "bad_credentials")
        calls = len(self.verify.calls)
        limited = self.check(auth("alice", "another"), now=6.0)
        self.assertEqual((limited.status, limited.reason), (429, "too_many_failures"))
        self.assertEqual(dict(limited.headers), {b"retry-after": b"60"})
        self.assertEqual(len(self.verify.calls), calls)
        self.assertIsNone(self.check(auth("alice", "pw"), source="192.0.2.2", now=6.0))
        self.assertIsNone(self.check(auth("alice", "pw"), now=65.0))

    def test_limiter_is_bounded(self) -> None:
        """The limiter tracks at most max_sources addresses."""
        limiter = FailureLimiter(max_failures=1, window=60, max_sources=100)
        for i in range(1000):
            limiter.failed(f"10.0.{i // 256}.{i % 256}", 0)
        self.assertEqual(len(limiter.sources), 100)
        self.assertTrue(limiter.limited("10.0.3.231", 1))

    def test_reload_forgets_credentials(self) -> None:
        """reload (SIGHUP) drops every remembered answer and adopts the new users."""
        self.assertIsNone(self.check(auth("alice", "pw")))
        other = bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)).decode()
        self.ac.reload([R("web", basic_auth=(f"alice:{other}",))])
        self.assertEqual(len(self.ac.cache), 0)
        self.policy = self.ac.policies["web"]
        self.check(auth("alice", "pw"))
        self.assertEqual(self.verify.calls[-1], (b"pw", other.encode()))

    def test_real_bcrypt(self) -> None:
        """With the real bcrypt: right password passes, wrong and over-long ones do not ($2y$ accepted)."""
        ac = AccessControl([R("web", basic_auth=("alice:" + HASH.replace("$2b$", "$2y$"),))])
        policy = ac.policies["web"]
        self.assertIsNone(ac.check(policy, "1.2.3.4", auth("alice", "pw"), 0))
        self.assertEqual(ac.check(policy, "1.2.3.5", auth("alice", "x" * 100), 0).reason, "bad_credentials")
        self.assertEqual(ac.check(policy, "1.2.3.6", auth("bob", "pw"), 0).reason, "bad_credentials")


class NullDispatcher:
    def dispatch(self, host: str, path: str, address: str = "", headers: Any = None) -> Refusal:
        return Refusal(404, "none")

    def finished(self, record: dict[str, object]) -> None:
        pass


class EntryLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.site = EntrySite(NullDispatcher(), self.clock, header_timeout=4.0, max_connections=2)
        self.site.doStart()
        self.addCleanup(self.site.doStop)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_head_deadline(self) -> None:
        """A head not complete within header_timeout is cut; one completed in time is not; sweeps every second."""
        slow, slow_t = self.connect()
        quick, quick_t = self.connect()
        slow.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(3)
        quick.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(1)
        self.assertTrue(slow_t.disconnecting)
        self.assertEqual(self.site.header_timeouts, 1)
        self.assertIn(b"404", quick_t.value())
        self.assertFalse(quick_t.disconnecting)
        slow.connectionLost(None)
        self.assertEqual(self.site.connections, 1)

    def test_beyond_max_connections_503(self) -> None:
        """The third connection with max_connections = 2 gets a canned 503 and is closed; after a close one fits again."""
        first, _ = self.connect()
        self.connect()
        _, refused = self.connect()
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(refused.disconnecting)
        self.assertEqual((self.site.connections, self.site.refused_connections), (2, 1))
        first.connectionLost(None)
        _, again = self.connect()
        self.assertEqual(again.value(), b"")
        self.assertEqual(self.site.connections, 2)


class RefusalMetricsTests(SynchronousTestCase):
    def test_refusals_counted_by_route_and_reason(self) -> None:
        """A finished record with a refusal counts in tunneld_access_refusals_total and the /status tally."""
        from prometheus_client import CollectorRegistry, generate_latest
        registry = CollectorRegistry()
        metrics = RequestMetrics(registry)
        for reason in ("ip_denied", "ip_denied", "no_credentials"):
            metrics.observe({"protocol": "http", "route": "web", "status": 403, "refusal": reason})
        metrics.observe({"protocol": "http", "route": "web", "status": 200, "refusal": ""})
        text = generate_latest(registry).decode()
        self.assertIn('tunneld_access_refusals_total{reason="ip_denied",route="web"} 2.0', text)
        self.assertEqual(metrics.refusals_by_route(), {"web": {"ip_denied": 2, "no_credentials": 1}})
