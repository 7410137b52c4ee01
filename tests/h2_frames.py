"""Raw HTTP/2 frames for the hostile-input tests: what an attacker writes, byte by byte (RFC 9113, RFC 7541).

No HTTP/2 library: the point is to send what a well-behaved library never
would (floods, resets, bombs, garbage).
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", stream_id) + payload


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3, "initial_window_size": 4,
           "max_frame_size": 5, "max_header_list_size": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack("!HI", ids[k], v) for k, v in values.items()))


def _integer(value: int, prefix: int, first: int = 0) -> bytes:
    """HPACK integer with a ``prefix``-bit prefix (RFC 7541 §5.1)."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes, index: bool = False) -> bytes:
    """A literal header field with a new name: incremental indexing (``index``) or not indexed."""
    head = b"\x40" if index else b"\x00"
    return head + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def indexed(index: int) -> bytes:
    return _integer(index, 7, 0x80)


def grpc_request_block(path: bytes, authority: bytes = b"localhost", extra: bytes = b"") -> bytes:
    """A gRPC request head: :method POST, :scheme http, :path, :authority, content-type, te."""
    return (indexed(3) + indexed(6) + literal(b":path", path) + literal(b":authority", authority)
            + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers") + extra)


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack("!I", len(body)) + body


def parse(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in ``data``."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        if pos + 9 + length > len(data):
            return
        kind, flags = data[pos + 3], data[pos + 4]
        stream_id = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        yield kind, flags, stream_id, data[pos + 9:pos + 9 + length]
        pos += 9 + length


class RawPeer(Protocol):
    """A client connection that writes what it is told and keeps what it gets; ``lost`` fires on close."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Deferred[None] = Deferred()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.lost.callback(None)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        # The server's own preface is not sent (it is a server): frames start at byte 0.
        return list(parse(bytes(self.received)))

    def goaway_code(self) -> int | None:
        for kind, _, _, payload in self.frames():
            if kind == GOAWAY and len(payload) >= 8:
                return int.from_bytes(payload[4:8], "big")
        return None
