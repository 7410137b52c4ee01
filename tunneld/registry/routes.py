"""Route matching: which configured route (or forward rule) serves a request.

Generic over anything with ``host`` and ``path_prefix`` attributes (the
config's ``Route`` and ``ForwardRule``); items with a non-empty
``grpc_service`` are gRPC routes and are matched only by :meth:`match_grpc`.

HTTP and WebSocket (SPEC section 4), as nginx picks a server, then a location:

* Hosts compare case-insensitively, without port and trailing dot.
  ``*.example.com`` matches subdomains at any depth, never ``example.com``.
* Precedence: exact host > wildcard host (longer suffix first) > no host.
  Within the best host that has any matching route, the longest
  ``path_prefix`` wins; remaining ties go to the first route in config order.
* ``path_prefix`` is a plain string prefix of the path (query stripped), as
  nginx's ``location /api``: ``/api`` matches ``/api``, ``/api/x`` and
  ``/apix``. Write ``/api/`` to exclude ``/apix``.

gRPC: the service must be equal; a route whose host matches the authority
(exact > longer wildcard) beats one without a host, and a route whose host does
not match the authority is no candidate. Ties go to config order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class HttpMatchable(Protocol):
    """A route matched by host and path prefix."""

    @property
    def host(self) -> str: ...

    @property
    def path_prefix(self) -> str: ...


class GrpcMatchable(Protocol):
    """A route matched by gRPC service (and host, when set)."""

    @property
    def host(self) -> str: ...

    @property
    def grpc_service(self) -> str: ...


T = TypeVar("T", bound=HttpMatchable)


def normalize_host(host: str) -> str:
    """Lower-case ``host`` and strip its port and trailing dot.

    ``"[::1]:8080"`` and ``"[::1]"`` become ``"::1"``; a bare IPv6 literal
    (more than one colon, no brackets) is kept whole.
    """
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end != -1 else host[1:]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _wildcard_suffix(host: str) -> str | None:
    """``".example.com"`` for ``"*.example.com"``, else None."""
    return host[1:] if host.startswith("*.") else None


def _host_rank(item: HttpMatchable) -> tuple[int, int]:
    """Sort key: exact host, then wildcards (longer suffix first), then no host."""
    host = normalize_host(item.host)
    suffix = _wildcard_suffix(host)
    if suffix is not None:
        return (1, -len(suffix))
    return (0, 0) if host else (2, 0)


def _by_prefix(items: list[T]) -> list[T]:
    """Longest ``path_prefix`` first; ``sorted`` is stable, so config order breaks ties."""
    return sorted(items, key=lambda item: -len(item.path_prefix))


class RouteTable(Generic[T]):
    """Precomputed lookup over a fixed list of routes; rebuild it on reload."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items = list(items)
        exact: dict[str, list[T]] = {}
        wildcard: dict[str, list[T]] = {}
        no_host: list[T] = []
        grpc: dict[str, list[T]] = {}
        for item in self._items:
            host = normalize_host(item.host)
            suffix = _wildcard_suffix(host)
            service: str = getattr(item, "grpc_service", "") or ""
            if service:
                grpc.setdefault(service, []).append(item)
            elif suffix is not None:
                wildcard.setdefault(suffix, []).append(item)
            elif host:
                exact.setdefault(host, []).append(item)
            else:
                no_host.append(item)
        self._exact = {host: _by_prefix(bucket) for host, bucket in exact.items()}
        self._wildcard = {suffix: _by_prefix(bucket) for suffix, bucket in wildcard.items()}
        self._no_host = _by_prefix(no_host)
        self._grpc = {
            service: [(normalize_host(item.host), item) for item in sorted(bucket, key=_host_rank)]
            for service, bucket in grpc.items()
        }

    def __len__(self) -> int:
        return len(self._items)

    def match_http(self, host: str, path: str) -> T | None:
        """The best HTTP route for ``host`` (a Host header) and ``path``, or None."""
        host = normalize_host(host)
        path = path.partition("?")[0]
        for bucket in self._http_buckets(host):
            for item in bucket:
                if path.startswith(item.path_prefix):
                    return item
        return None

    def match_grpc(self, service: str, authority: str = "") -> T | None:
        """The best gRPC route for ``service`` called at ``authority``, or None."""
        authority = normalize_host(authority)
        for pattern, item in self._grpc.get(service, ()):
            if not pattern or _host_matches(pattern, authority):
                return item
        return None

    def _http_buckets(self, host: str) -> Iterable[list[T]]:
        """Route lists in precedence order: exact host, wildcards longest first, no host."""
        if host:
            exact = self._exact.get(host)
            if exact:
                yield exact
            if self._wildcard:
                # ".b.example.com", ".example.com", ".com" for "a.b.example.com"
                dot = host.find(".")
                while dot != -1:
                    bucket = self._wildcard.get(host[dot:])
                    if bucket and dot > 0:
                        yield bucket
                    dot = host.find(".", dot + 1)
        yield self._no_host


def _host_matches(pattern: str, host: str) -> bool:
    """Whether normalized ``host`` equals ``pattern`` or is a subdomain of its wildcard."""
    suffix = _wildcard_suffix(pattern)
    if suffix is None:
        return pattern == host
    return len(host) > len(suffix) and host.endswith(suffix)
