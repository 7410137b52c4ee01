"""gRPC over HTTP/2, the parts that are plain data (grpc's PROTOCOL-HTTP2.md): no sockets, no grpcio.

The HTTP/2 edge (protocols/h2/) relays gRPC calls as HTTP/2 streams whose
bodies are the gRPC byte stream itself (5-byte length prefix + message, wire
v3).  What it needs to understand of that stream lives here: ``grpc-timeout``,
status codes and ``grpc-message`` encoding, ``-bin`` metadata, the mapping of
HTTP statuses and RST_STREAM codes to gRPC statuses, and a scanner that reads
the length prefixes of a body as it streams past (to hold messages to a size
limit and to show them in the inspector) without ever reassembling it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final, Iterable
from urllib.parse import quote, unquote

from tunneld import tunnel_pb2 as pb

Fields = list[tuple[bytes, bytes]]

# grpc status codes by value (grpc.StatusCode without importing grpcio).
STATUS_NAMES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
STATUS: Final[dict[str, int]] = {name: code for code, name in enumerate(STATUS_NAMES)}


def status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)


# -- grpc-timeout ---------------------------------------------------------------

_TIMEOUT_UNITS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """``b"100m"`` -> 0.1 seconds; None when malformed (at most 8 digits and one unit)."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits or len(digits) > 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """Seconds -> the shortest exact-enough ``grpc-timeout`` value (rounded up, at most 8 digits)."""
    micros = max(int(seconds * 1_000_000 + 0.999), 1)
    for unit, scale in ((b"u", 1), (b"m", 1_000), (b"S", 1_000_000), (b"M", 60_000_000), (b"H", 3_600_000_000)):
        value = -(-micros // scale)
        if value < 100_000_000:
            return str(value).encode("ascii") + unit
    return b"99999999H"


# -- grpc-message and -bin metadata -------------------------------------------------

def encode_message(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (printable ASCII but ``%`` kept as is)."""
    return quote(text, safe=" !\"#$&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`"
                             "abcdefghijklmnopqrstuvwxyz{|}~").encode("ascii")


def decode_message(value: bytes) -> str:
    return unquote(value.decode("latin-1"), errors="replace")


def decode_bin(value: bytes) -> bytes:
    """A ``-bin`` header's value (base64, padding optional) -> the raw bytes; undecodable values stay as sent."""
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    except ValueError:
        return value


def encode_bin(value: bytes) -> bytes:
    return base64.b64encode(value).rstrip(b"=")


# -- metadata between HTTP/2 fields and the wire -----------------------------------------------

#: Fields that are HTTP/2 or transport mechanics, not call metadata (each hop sets its own).
NOT_METADATA: Final = frozenset({b"te", b"grpc-timeout", b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade", b"host", b"content-length"})
STATUS_KEYS: Final = frozenset({b"grpc-status", b"grpc-message"})


def metadata_from_h2(fields: Iterable[tuple[bytes, bytes]], skip: frozenset[bytes] = frozenset()) -> list[pb.Header]:
    """HTTP/2 fields -> wire ``Header``s: no pseudo-headers or transport keys; ``-bin`` values decoded to raw bytes."""
    out = []
    for name, value in fields:
        if name[:1] == b":" or name in NOT_METADATA or name in skip:
            continue
        out.append(pb.Header(name=name.decode("latin-1"), value=decode_bin(value) if name.endswith(b"-bin") else value))
    return out


def metadata_to_h2(headers: Iterable[pb.Header], skip: frozenset[bytes] = frozenset()) -> Fields:
    """Wire ``Header``s -> HTTP/2 fields (``-bin`` re-encoded); pseudo and transport keys from a peer never relayed."""
    out = []
    for item in headers:
        name = item.name.lower().encode("latin-1")
        if name[:1] == b":" or name in NOT_METADATA or name in skip:
            continue
        out.append((name, encode_bin(item.value) if name.endswith(b"-bin") else item.value))
    return out


def status_fields(code: int, details: str, trailers: Iterable[pb.Header] = ()) -> Fields:
    """The trailers that end a call: grpc-status, grpc-message (when there is one), trailing metadata."""
    out = [(b"grpc-status", str(code).encode("ascii"))]
    if details:
        out.append((b"grpc-message", encode_message(details)))
    out.extend(metadata_to_h2(trailers, STATUS_KEYS))
    return out


# -- statuses from HTTP ------------------------------------------------------------------

# grpc's http-grpc-status-mapping.md: a response that is not a gRPC response.
_HTTP_TO_GRPC: Final = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                        429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}

# PROTOCOL-HTTP2.md: RST_STREAM codes seen by a client.
_RESET_TO_GRPC: Final = {0x0: "INTERNAL", 0x7: "UNAVAILABLE", 0x8: "CANCELLED", 0xB: "RESOURCE_EXHAUSTED",
                         0xC: "PERMISSION_DENIED"}


def status_for_http(status: int) -> int:
    return STATUS[_HTTP_TO_GRPC.get(status, "UNKNOWN")]


def status_for_reset(error_code: int) -> int:
    """REFUSED_STREAM -> UNAVAILABLE, CANCEL -> CANCELLED, ENHANCE_YOUR_CALM -> RESOURCE_EXHAUSTED, others INTERNAL."""
    return STATUS[_RESET_TO_GRPC.get(error_code, "INTERNAL")]


# -- the byte stream ------------------------------------------------------------------------

PREFIX: Final = 5


@dataclass
class Scanned:
    """What one chunk held.

    ``started``: (size, first bytes kept) of each message whose prefix ended in
    this chunk; ``more``: kept bytes that continue the last message started
    in an earlier chunk; ``error``: the stream broke a rule (the rest of the
    chunk was not read).
    """

    started: list[tuple[int, bytes]]
    more: bytes = b""
    error: str = ""


class MessageScanner:
    """Reads the length prefixes of one direction's gRPC byte stream, chunk by chunk.

    ``limit`` (0 = none): a message announcing more bytes is an error, found
    from its prefix before any of it is relayed on.  ``keep`` bytes of each
    message are collected for the inspector (0 = sizes only).  State is a
    partial prefix (< 5 bytes) and a count of message bytes still to skip:
    memory is O(1) whatever the stream's size.
    """

    __slots__ = ("limit", "keep", "_prefix", "_skip", "_keeping", "messages")

    def __init__(self, limit: int = 0, keep: int = 0) -> None:
        self.limit = limit
        self.keep = keep
        self._prefix = b""
        self._skip = 0            # bytes of the current message still to come
        self._keeping = 0         # of those, how many the inspector still wants
        self.messages = 0

    @property
    def between_messages(self) -> bool:
        """True when the stream so far ends exactly at a message boundary (a clean end)."""
        return not self._prefix and not self._skip

    def feed(self, data: bytes) -> Scanned:
        out = Scanned([])
        pos, n = 0, len(data)
        if self._skip:
            take = min(self._skip, n)
            if self._keeping:
                grab = min(self._keeping, take)
                out.more = data[:grab]
                self._keeping -= grab
            self._skip -= take
            pos = take
        while pos < n:
            need = PREFIX - len(self._prefix)
            self._prefix += data[pos:pos + need]
            pos += min(need, n - pos)
            if len(self._prefix) < PREFIX:
                break
            flag, size = self._prefix[0], int.from_bytes(self._prefix[1:5], "big")
            self._prefix = b""
            self.messages += 1
            if flag > 1:
                out.error = f"malformed gRPC message prefix (flags {flag:#x})"
                return out
            if self.limit and size > self.limit:
                out.error = f"message larger than max ({size} vs. {self.limit})"
                return out
            take = min(size, n - pos)
            keep = min(size, self.keep)
            grab = min(keep, take)
            out.started.append((size, data[pos:pos + grab] if grab else b""))
            self._keeping = keep - grab
            self._skip = size - take
            pos += take
        return out
