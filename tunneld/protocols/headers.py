"""Header and gRPC metadata rules shared by every entry and backend adapter.

Headers are ordered lists of ``(name, value)`` byte pairs, never a map, so
order and repeats (``Set-Cookie``) survive every function here.  Nothing in
this module looks at a socket or a reactor: it is pure core (stdlib and the
generated ``tunnel_pb2`` messages only), used by the HTTP entry and the
client's backend side for SPEC §5's header rules, by both for converting to
and from the wire's ``Header`` messages, and by the gRPC pass-through for
metadata.

* Hop-by-hop headers (RFC 9110 §7.6.1) and every header a ``Connection``
  header names are removed in both directions.
* ``X-Forwarded-For``/``-Proto``/``-Host`` are appended to, not replaced.
* gRPC metadata loses HTTP/2 pseudo-headers and transport keys, which grpcio
  sets itself on the next hop; ``-bin`` values stay raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tunneld import tunnel_pb2

Pairs = list[tuple[bytes, bytes]]

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

GRPC_DROPPED_METADATA: frozenset[str] = frozenset(
    {
        "content-type",
        "te",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
        "user-agent",
        "host",
    }
    | {name.decode("ascii") for name in HOP_BY_HOP}
)

_FORWARDED_NAMES: tuple[bytes, bytes, bytes] = (
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
)
_FORWARDED_LOWER: tuple[bytes, ...] = tuple(name.lower() for name in _FORWARDED_NAMES)
_FORWARDED_INDEX: dict[bytes, int] = {name: index for index, name in enumerate(_FORWARDED_LOWER)}
_HOST = frozenset({b"host"})
_CONTENT_LENGTH = frozenset({b"content-length"})


def _encode(text: str) -> bytes:
    """Header bytes for a str: latin-1 when it fits (the HTTP default), else utf-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def strip_hop_by_hop(pairs: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """Drop hop-by-hop headers and those named by any ``Connection`` header.

    ``Connection`` tokens are comma-separated, compared case-insensitively
    after trimming whitespace; a ``Connection`` header may come after the
    header it names.  The rest keep their order and name case.
    """
    items = pairs if isinstance(pairs, list) else list(pairs)
    named = [
        token.strip().lower()
        for name, value in items
        if name.lower() == b"connection"
        for token in value.split(b",")
    ]
    drop = HOP_BY_HOP.union(named) if named else HOP_BY_HOP
    return [(name, value) for name, value in items if name.lower() not in drop]


def client_ip(request: Any) -> str:
    """The external client's address for X-Forwarded-For, logs and IP rules ("" if unknown).

    The one place that answers "who is calling" for a twisted.web request on
    an entry: with ``proxy_protocol = true`` the transport's peer is already
    the address HAProxy's PROXY header carried (twisted.protocols.haproxy),
    otherwise it is the TCP peer.
    """
    return address_ip(request.getClientAddress())


def address_ip(address: Any) -> str:
    """The IP of a twisted address ("" for one without, e.g. a UNIX socket): see ``client_ip``."""
    return getattr(address, "host", "") or ""


def add_forwarded(
    pairs: Iterable[tuple[bytes, bytes]], *, client_ip: str, proto: str, host: str
) -> Pairs:
    """Append this hop to ``X-Forwarded-For``, ``-Proto`` and ``-Host``.

    All headers of one of these names are joined in order with ", " into one,
    the new value appended; the merged header takes the place of the first
    existing one, or goes at the end when there was none.  An empty new value
    (``host`` usually, when the request had no Host) is not appended; the
    existing ones are still merged.
    """
    new_values = (client_ip, proto, host)
    existing: list[list[bytes]] = [[], [], []]
    first_at: list[int] = [-1, -1, -1]
    out: Pairs = []
    for name, value in pairs:
        low = name.lower()
        if low in _FORWARDED_LOWER:
            index = _FORWARDED_LOWER.index(low)
            if first_at[index] < 0:
                first_at[index] = len(out)
                out.append((_FORWARDED_NAMES[index], b""))  # placeholder
            existing[index].extend(
                part for part in (p.strip() for p in value.split(b",")) if part
            )
        else:
            out.append((name, value))
    for index, header_name in enumerate(_FORWARDED_NAMES):
        values = existing[index]
        if new_values[index]:
            values.append(_encode(new_values[index]))
        joined = b", ".join(values)
        if first_at[index] >= 0:
            if joined:
                out[first_at[index]] = (header_name, joined)
        elif joined:
            out.append((header_name, joined))
    # Placeholders whose merged value came out empty are dropped.
    return [(name, value) for name, value in out if value or name not in _FORWARDED_NAMES]


def replace_host(pairs: Iterable[tuple[bytes, bytes]], host: bytes) -> Pairs:
    """Drop every ``Host`` header and append one ``Host: host``."""
    out = [(name, value) for name, value in pairs if name.lower() != b"host"]
    out.append((b"Host", host))
    return out


def get_first(pairs: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of the first header called ``name`` (any case), or None."""
    wanted = name.lower()
    for key, value in pairs:
        if key.lower() == wanted:
            return value
    return None


def to_pb(pairs: Iterable[tuple[bytes, bytes]]) -> list[tunnel_pb2.Header]:
    """Wire ``Header`` messages for ``pairs``; names decoded as latin-1."""
    header = tunnel_pb2.Header
    return [header(name=name.decode("latin-1"), value=value) for name, value in pairs]


def fill_pb(field: Any, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """Append ``pairs`` to a repeated ``Header`` field in place (half the cost of ``to_pb``)."""
    add = field.add
    for name, value in pairs:
        add(name=name.decode("latin-1"), value=value)


def from_pb(headers: Iterable[tunnel_pb2.Header]) -> Pairs:
    """Pairs from wire ``Header`` messages; names encoded as latin-1.

    A name outside latin-1 (only a broken peer sends one) becomes ``?``
    characters rather than an exception.
    """
    return [(h.name.encode("latin-1", "replace"), h.value) for h in headers]


def request_headers_for_backend(
    pairs: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str,
    proto: str,
    host: str,
    set_host: str = "",
    drop: frozenset[bytes] = frozenset(),
) -> Pairs:
    """The request headers the HTTP entry sends through the tunnel.

    Hop-by-hop headers go; ``Content-Length`` goes too when the request had a
    ``Transfer-Encoding`` (the backend side re-frames the body); so do the
    (lower-case) names in ``drop``; the ``X-Forwarded-*`` headers are added;
    ``set_host``, if given, replaces Host.

    The result is exactly ``replace_host(add_forwarded(strip_hop_by_hop(...)))``
    minus ``drop``, computed in one pass with one ``lower()`` per header: it
    runs for every request (tests/test_headers.py checks the two agree).
    """
    items = pairs if isinstance(pairs, list) else list(pairs)
    lows = [name.lower() for name, _ in items]
    removed = HOP_BY_HOP
    if b"connection" in lows:
        removed = removed.union(
            token.strip().lower()
            for (_, value), low in zip(items, lows)
            if low == b"connection"
            for token in value.split(b",")
        )
    if drop:
        removed = removed | drop
    if set_host:
        removed = removed | _HOST
    if b"transfer-encoding" in lows:
        removed = removed | _CONTENT_LENGTH
    out: Pairs = []
    existing: tuple[list[bytes], list[bytes], list[bytes]] | None = None
    first_at = [-1, -1, -1]
    for pair, low in zip(items, lows):
        if low in removed:
            continue
        index = _FORWARDED_INDEX.get(low)
        if index is None:
            out.append(pair)
            continue
        # An X-Forwarded-* header: merged into one at its first place (add_forwarded's rule).
        if existing is None:
            existing = ([], [], [])
        if first_at[index] < 0:
            first_at[index] = len(out)
            out.append((_FORWARDED_NAMES[index], b""))  # placeholder
        existing[index].extend(part for part in (p.strip() for p in pair[1].split(b",")) if part)
    new_values = (client_ip, proto, host)
    if existing is None:
        for header_name, new in zip(_FORWARDED_NAMES, new_values):
            if new:
                out.append((header_name, _encode(new)))
    else:
        empty = []
        for index, header_name in enumerate(_FORWARDED_NAMES):
            values = existing[index]
            if new_values[index]:
                values.append(_encode(new_values[index]))
            joined = b", ".join(values)
            if first_at[index] >= 0:
                if joined:
                    out[first_at[index]] = (header_name, joined)
                else:
                    empty.append(first_at[index])
            elif joined:
                out.append((header_name, joined))
        for at in sorted(empty, reverse=True):
            del out[at]
    if set_host:
        out.append((b"Host", _encode(set_host)))
    return out


def response_headers_for_client(pairs: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """The response headers passed back to the external client."""
    return strip_hop_by_hop(pairs)


def filter_grpc_metadata(
    items: Iterable[tuple[str, str | bytes]],
) -> list[tuple[str, bytes]]:
    """gRPC metadata to forward: no pseudo-headers, no transport keys.

    Keys are compared (and returned) lower-case, order kept; str values are
    encoded utf-8, bytes values (``-bin`` keys) kept as they are.
    """
    out: list[tuple[str, bytes]] = []
    for key, value in items:
        low = key.lower()
        if low.startswith(":") or low in GRPC_DROPPED_METADATA:
            continue
        out.append((low, value.encode("utf-8") if isinstance(value, str) else value))
    return out


def grpc_metadata_from_pb(
    headers: Iterable[tunnel_pb2.Header],
) -> tuple[tuple[str, str | bytes], ...]:
    """Wire ``Header`` messages back to grpcio's metadata form.

    Keys ending ``-bin`` keep bytes values; others are decoded utf-8 with
    replacement.  Keys are lower-cased and pseudo/transport keys dropped
    again, since grpcio refuses or mis-sends them and the peer is not trusted.
    """
    out: list[tuple[str, str | bytes]] = []
    for h in headers:
        key = h.name.lower()
        if key.startswith(":") or key in GRPC_DROPPED_METADATA:
            continue
        if key.endswith("-bin"):
            out.append((key, h.value))
        else:
            out.append((key, h.value.decode("utf-8", "replace")))
    return tuple(out)


def without_address(text: str, origin: str) -> str:
    """``text`` with ``origin``'s URL, host:port and host replaced by "the backend".

    What travels back to the external caller (a 502 body) must not name an
    address behind the tunnel; the full text goes to the log only."""
    url = origin.rstrip("/")
    _, _, netloc = url.partition("://")
    netloc = netloc.split("/", 1)[0]
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    for needle in (url, netloc, host.strip("[]"), host):
        if needle:
            text = text.replace(needle, "the backend")
    return text
