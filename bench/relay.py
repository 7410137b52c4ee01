#!/usr/bin/env python3
"""TCP delay relay: a slow link on loopback, for the benchmark's delayed rows.

    python bench/relay.py --listen 127.0.0.1:PORT --target 127.0.0.1:PORT [--delay-ms 25]

Every connection accepted on ``--listen`` is relayed to ``--target``; each
direction holds every chunk it reads for ``--delay-ms`` before writing it on
(so a 25 ms relay makes a 50 ms round trip).  Chunks are timestamped as they
are read (asyncio reads up to 256 KiB at a time) and released in order by one
timer per direction; there is no per-byte work and no window: the relay holds
whatever arrives during the delay, so it adds latency, not a bandwidth limit.
Reading stops only while the far side's socket does not keep up (more than
``HIGH_WATER`` bytes released and not yet taken by the kernel), as a real
link's receiver would push back.  EOF and close travel with the same delay.
Stdlib asyncio only; stops on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
from typing import Any

HIGH_WATER = 16 * 1024 * 1024


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class Direction:
    """Bytes read from one side, written to the other ``delay`` seconds after they were read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop, self.delay = loop, delay
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()  # None: EOF
        self.timer: asyncio.TimerHandle | None = None
        self.dst: asyncio.Transport | None = None

    def push(self, data: bytes | None) -> None:
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None and self.dst is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def attach(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def release(self) -> None:
        self.timer = None
        assert self.dst is not None
        now = self.loop.time()
        due: list[bytes] = []
        while self.queue and self.queue[0][0] <= now:
            data = self.queue.popleft()[1]
            if data is None:
                self._flush(due)
                self._write_eof()
                continue
            due.append(data)
        self._flush(due)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def _write_eof(self) -> None:
        assert self.dst is not None
        if self.dst.is_closing():
            return
        try:
            if self.dst.can_write_eof():
                self.dst.write_eof()
                return
        except OSError:  # the far side is already gone
            pass
        self.dst.close()

    def _flush(self, due: list[bytes]) -> None:
        if due and self.dst is not None and not self.dst.is_closing():
            self.dst.writelines(due)
        due.clear()

    def close_later(self) -> None:
        """Close the far side once everything read before now has been written."""
        self.loop.call_at(self.loop.time() + self.delay + 0.001, self._close)

    def _close(self) -> None:
        if self.queue:  # still releasing (a timer is pending): try again after it
            self.loop.call_at(self.queue[-1][0] + 0.001, self._close)
        elif self.dst is not None:
            self.dst.close()


class Side(asyncio.Protocol):
    """One socket of a relayed connection: what it reads goes to ``outgoing``."""

    def __init__(self, outgoing: Direction, incoming: Direction) -> None:
        self.outgoing, self.incoming = outgoing, incoming
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.incoming.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push(None)
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self.outgoing.close_later()

    # The far side cannot take more: stop reading here until it can.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    loop = asyncio.get_running_loop()

    def accepted() -> Side:
        up, down = Direction(loop, delay), Direction(loop, delay)
        inbound = Side(up, down)

        async def dial() -> None:
            try:
                _, outbound = await loop.create_connection(lambda: Side(down, up), *target)
            except OSError:
                if inbound.transport is not None:
                    inbound.transport.close()
                return
            inbound.peer, outbound.peer = outbound, inbound
            if inbound.transport is not None and inbound.transport.is_closing():
                up.close_later()

        loop.create_task(dial())
        return inbound

    server = await loop.create_server(accepted, *listen, backlog=1024)
    print(f"delay relay {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, {delay * 1e3:g} ms each way",
          flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="TCP relay that delays each direction (a slow link on loopback)")
    parser.add_argument("--listen", required=True, help="host:port to accept on (e.g. 127.0.0.1:7100)")
    parser.add_argument("--target", required=True, help="host:port to relay to")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="delay of each direction (default 25 ms)")
    args = parser.parse_args()
    asyncio.run(serve(_address(args.listen), _address(args.target), args.delay_ms / 1e3))


if __name__ == "__main__":
    main()
