"""Who may use a route: IP rules and HTTP basic auth, decided without I/O.

Theory of operation.  A route may carry ``deny_ips``, ``allow_ips`` (CIDRs)
and ``basic_auth`` (htpasswd lines with bcrypt hashes).  The server hub asks
:meth:`AccessControl.check` once per request, after the route matched and
before anything else happens (no tunnel is chosen for a refused request):

1. the client address is in ``deny_ips``            -> 403 ``ip_denied``
2. ``allow_ips`` is set and the address is not in it -> 403 ``ip_not_allowed``
3. ``basic_auth`` is set and the ``Authorization`` header
   * is missing or not ``Basic``                    -> 401 ``no_credentials``
   * was verified before (cache hit)                -> its remembered answer
   * comes from an address with too many recent failed verifications
                                                    -> 429 ``too_many_failures`` (bcrypt not run)
   * verifies (bcrypt)                              -> allowed, remembered
   * does not                                       -> 401 ``bad_credentials``, remembered, failure counted

bcrypt costs milliseconds to tens of milliseconds by design, so every
distinct header is verified once and its answer (yes or no) remembered for
``CACHE_TTL`` seconds in a bounded LRU keyed by a SHA-256 of the route name
and the header (the header itself is never kept).  A flood of one wrong
password costs one bcrypt run; a flood of different ones is cut off per
source address after ``MAX_FAILURES`` failures within ``FAILURE_WINDOW``
seconds.  An unknown user is verified against a dummy hash of the same cost,
so timing does not tell which user names exist.  :meth:`AccessControl.reload`
(SIGHUP) forgets every remembered answer.

Pure core: stdlib plus ``bcrypt`` (a pure function), no reactor, no clock:
``now`` is passed in; the verify function is injectable for tests.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Verify = Callable[[bytes, bytes], bool]

#: Seconds a verified (or refused) credential is remembered.
CACHE_TTL = 300.0
#: Distinct credentials remembered at most (LRU beyond).
CACHE_SIZE = 10000
#: Failed verifications per source address within FAILURE_WINDOW before 429.
MAX_FAILURES = 10
FAILURE_WINDOW = 60.0
#: Source addresses whose failures are tracked at most.
MAX_SOURCES = 10000

_BCRYPT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


# -- parsing (used by the config loader; errors are ValueErrors naming the entry) --------------


def parse_cidr(text: str) -> Network:
    """``"10.0.0.0/8"``, ``"2001:db8::/32"`` or a bare address (a /32 or /128).

    Host bits may be set (``10.1.2.3/8`` means ``10.0.0.0/8``), as nginx allows.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR like '10.0.0.0/8' or '2001:db8::/32'") from None


def parse_htpasswd_line(line: str) -> tuple[str, bytes]:
    """``user:$2y$05$...`` (``htpasswd -nB``) -> (user, hash)."""
    user, colon, hashed = line.strip().partition(":")
    if not colon or not user:
        raise ValueError(f"{_shown(line)} is not an htpasswd line 'user:hash'")
    if any(char.isspace() or not char.isprintable() for char in user):
        raise ValueError(f"user {user!r} contains whitespace or control characters")
    raw = hashed.encode("ascii", "replace")
    if not _BCRYPT.fullmatch(raw):
        raise ValueError(f"user {user!r}: the hash is not bcrypt ($2y$/$2b$, as 'htpasswd -nB' prints); "
                         f"other htpasswd formats (MD5, SHA1, crypt) are refused")
    return user, raw


def _shown(line: str) -> str:
    """A line for an error message without most of a hash."""
    return repr(line if len(line) <= 24 else line[:24] + "...")


# -- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Denial:
    """Why a request is refused: status, a metric label, a short text, extra response headers."""

    status: int
    reason: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


class Guarded(Protocol):
    """What a route needs for access control (config.Route has these)."""

    @property
    def name(self) -> str: ...

    @property
    def basic_auth(self) -> tuple[str, ...]: ...

    @property
    def allow_ips(self) -> tuple[str, ...]: ...

    @property
    def deny_ips(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Policy:
    """One route's rules, parsed."""

    route: str
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    users: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, route: Guarded) -> Policy | None:
        """The route's policy, or None for an open route (the common, free case)."""
        if not (route.basic_auth or route.allow_ips or route.deny_ips):
            return None
        return cls(route.name, tuple(parse_cidr(c) for c in route.allow_ips),
                   tuple(parse_cidr(c) for c in route.deny_ips),
                   dict(parse_htpasswd_line(line) for line in route.basic_auth))

    def ip_denial(self, address: str) -> Denial | None:
        if not (self.allow or self.deny):
            return None
        ip = client_ip(address)
        if ip is not None and any(ip in net for net in self.deny):
            return Denial(403, "ip_denied", f"address {address} is denied on route {self.route}")
        if self.allow and (ip is None or not any(ip in net for net in self.allow)):
            return Denial(403, "ip_not_allowed", f"address {address or '-'} is not allowed on route {self.route}")
        return None


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address as an IP (IPv4-mapped IPv6 as IPv4; a ``%zone`` dropped); None if not an IP."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def bcrypt_verify(password: bytes, hashed: bytes) -> bool:
    import bcrypt
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:
        return False


_DUMMY: dict[bytes, bytes] = {}


def _dummy_hash(like: bytes) -> bytes:
    """A hash with the cost of ``like`` (made once per cost) to verify unknown users against."""
    cost = like[4:6]
    if cost not in _DUMMY:
        import bcrypt
        _DUMMY[cost] = bcrypt.hashpw(b"not a password", bcrypt.gensalt(int(cost)))
    return _DUMMY[cost]


class FailureLimiter:
    """Failed verifications per source address in fixed windows; bounded."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 max_sources: int = MAX_SOURCES) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_sources = max_sources
        self.sources: OrderedDict[str, list[float]] = OrderedDict()   # address -> [window start, count]

    def limited(self, source: str, now: float) -> bool:
        entry = self.sources.get(source)
        if entry is None:
            return False
        if now - entry[0] >= self.window:
            del self.sources[source]
            return False
        return entry[1] >= self.max_failures

    def failed(self, source: str, now: float) -> None:
        entry = self.sources.get(source)
        if entry is None or now - entry[0] >= self.window:
            self.sources.pop(source, None)
            self.sources[source] = [now, 1.0]
            while len(self.sources) > self.max_sources:
                self.sources.popitem(last=False)   # the oldest window goes first
        else:
            entry[1] += 1


class AccessControl:
    """Every route's policy, the credential cache and the failure limiter of one server."""

    def __init__(self, routes: Iterable[Guarded], *, verify: Verify = bcrypt_verify,
                 dummy_hash: Callable[[bytes], bytes] = _dummy_hash, cache_size: int = CACHE_SIZE,
                 cache_ttl: float = CACHE_TTL, limiter: FailureLimiter | None = None) -> None:
        self.verify = verify
        self.dummy_hash = dummy_hash
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.limiter = limiter or FailureLimiter()
        self.cache: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()   # key -> (ok, expires)
        self.policies: dict[str, Policy] = {}
        self.verifications = 0   # bcrypt runs, for tests and curiosity
        self.reload(routes)

    def reload(self, routes: Iterable[Guarded]) -> None:
        """New policies; every remembered credential is forgotten (failure counts stay)."""
        policies = {}
        for route in routes:
            policy = Policy.of(route)
            if policy is not None:
                policies[route.name] = policy
        self.policies = policies
        self.cache.clear()

    def check(self, policy: Policy, address: str, authorization: bytes | None, now: float) -> Denial | None:
        """None when the request may pass, else why not."""
        denial = policy.ip_denial(address)
        if denial is not None or not policy.users:
            return denial
        return self._basic(policy, address, authorization, now)

    def _basic(self, policy: Policy, address: str, authorization: bytes | None, now: float) -> Denial | None:
        challenge = ((b"www-authenticate", f'Basic realm="{policy.route}"'.encode()),)
        if not authorization or authorization[:6].lower() != b"basic ":
            return Denial(401, "no_credentials", f"route {policy.route} needs credentials", challenge)
        key = hashlib.sha256(policy.route.encode() + b"\0" + authorization).digest()
        cached = self.cache.get(key)
        if cached is not None:
            ok, expires = cached
            if now < expires:
                self.cache.move_to_end(key)
                return None if ok else Denial(401, "bad_credentials", "wrong user name or password", challenge)
            del self.cache[key]
        if self.limiter.limited(address, now):
            return Denial(429, "too_many_failures", f"too many failed logins from {address}; try again later",
                          ((b"retry-after", str(int(self.limiter.window)).encode()),))
        ok = self._verify(policy, authorization[6:].strip())
        self.cache[key] = (ok, now + self.cache_ttl)
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        if ok:
            return None
        self.limiter.failed(address, now)
        return Denial(401, "bad_credentials", "wrong user name or password", challenge)

    def _verify(self, policy: Policy, token: bytes) -> bool:
        try:
            decoded = base64.b64decode(token, validate=True)
        except ValueError:
            return False
        user_raw, colon, password = decoded.partition(b":")
        if not colon:
            return False
        user = user_raw.decode("utf-8", "replace")
        hashed = policy.users.get(user)
        self.verifications += 1
        if hashed is None:
            # Same work as for a real user: the answer's timing names no user.
            self.verify(password, self.dummy_hash(next(iter(policy.users.values()))))
            return False
        return self.verify(password, hashed)
