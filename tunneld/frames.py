"""Packing TunnelMessages into TunnelFrames (wire v2, SPEC §3.1), as bytes.

grpcio's cost is per gRPC message, so one write carries every message that
queued up while the previous write was in flight.  The frame's bytes are
built once: the wire format of ``repeated TunnelMessage messages = 1`` is the
concatenation of ``tag, length, message`` for each element, so each message
is serialized exactly once and no ``TunnelFrame`` object is ever filled (which
would copy every message).  Pure code: no grpc, no threads, no reactor.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from tunneld import tunnel_pb2 as pb

#: Default for ``max_frame_size`` (SPEC §3.1): 1 MiB.
DEFAULT_MAX_FRAME_SIZE: Final = 1024 * 1024

_TAG: Final = b"\x0a"  # field 1, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode(msg: pb.TunnelMessage) -> bytes:
    """One message as it stands inside a frame (tag, length, bytes)."""
    data = msg.SerializeToString()
    return _TAG + _varint(len(data)) + data


def frame_of(msgs: list[pb.TunnelMessage]) -> bytes:
    """A whole frame's bytes (used by tests and peers that send one batch)."""
    return b"".join(encode(m) for m in msgs)


def decode(data: bytes) -> list[pb.TunnelMessage]:
    """A frame's messages, in order (raises ``google.protobuf.message.DecodeError``)."""
    return list(pb.TunnelFrame.FromString(data).messages)


class FramePacker:
    """Takes messages from a queue and packs them into frames of bounded size.

    ``pack()`` returns the bytes of the next frame: every message waiting, in
    order, as long as the frame stays within ``max_frame_size``; a single
    message larger than that travels alone.  A message that would overflow the
    frame is kept (already encoded) for the next one, so nothing is encoded
    twice and order holds.  ``stop`` is the queue's end marker: ``pack`` stops
    before it and ``ended`` tells it was reached.
    """

    def __init__(self, queue: deque[object], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 stop: object = None) -> None:
        self.queue = queue
        self.max_frame_size = max_frame_size
        self.stop = stop
        self._carry: bytes | None = None
        self.ended = False
        self.frames = 0
        self.messages = 0

    def waiting(self) -> bool:
        return self._carry is not None or (bool(self.queue) and not self.ended)

    def pack(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        if self._carry is not None:
            parts.append(self._carry)
            size = len(self._carry)
            self._carry = None
        queue = self.queue
        limit = self.max_frame_size
        while queue and not self.ended:
            item = queue.popleft()
            if item is self.stop:
                self.ended = True
                break
            piece = encode(item)  # type: ignore[arg-type]
            if parts and size + len(piece) > limit:
                self._carry = piece
                break
            parts.append(piece)
            size += len(piece)
        self.messages += len(parts)
        if parts:
            self.frames += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)
