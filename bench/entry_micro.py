#!/usr/bin/env python3
"""In-process micro-benchmark of the server's HTTP entry hot path (no sockets, no grpc).

``entry_cpu.py`` measures the real thing, but on a shared machine its numbers
wander by 10-20 %.  This drives the same objects the server's reactor runs
for one small GET, minus the kernel: an ``EntrySite`` channel on a
``StringTransport`` (built by ``buildProtocol``, as the port does), the real
``ServerHub`` with its ``Tunnel``/``Session``, and a ``ClientHub`` whose
backend answers at once, the two hubs wired by handles that queue messages.
Only the server side's work is timed (``time.thread_time_ns``: the request
bytes into the channel, and the response messages into the server's
handle), the client side is not:

    .venv/bin/python bench/entry_micro.py [--requests 20000] [--conns 1] [--headers wrk|browser] [--repeat 5]

``--conns K`` keeps K keep-alive connections with a request in flight on
each (as ``wrk -cK`` does) before the responses are delivered.  Prints the
best of ``--repeat`` rounds, in µs of server CPU per request.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from tunneld import session as s  # noqa: E402
from tunneld import tunnel_pb2 as pb  # noqa: E402
from tunneld.client_hub import ClientHub  # noqa: E402
from tunneld.config import parse_client_config, parse_server_config  # noqa: E402
from tunneld.protocols.http_entry import EntrySite  # noqa: E402
from tunneld.server_hub import ServerHub  # noqa: E402

WRK = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BROWSER = (b"GET /small?x=1 HTTP/1.1\r\nHost: app.example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
           b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Connection: keep-alive\r\nCookie: session=abc123; theme=dark\r\n"
           b"Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n"
           b"Cache-Control: max-age=0\r\n\r\n")
RESPONSE_HEADERS = [("Server", b"TwistedWeb/26.10.0"), ("Date", b"Mon, 30 Nov 2026 00:00:00 GMT"),
                    ("Content-Type", b"text/plain"), ("Content-Length", b"3")]


class Handle:
    """A StreamHandle stand-in: sent messages wait in ``queue`` until the driver moves them."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.on_message: Any = None
        self.on_lost: Any = None
        self.queue: list[pb.TunnelMessage] = []

    def send(self, msgs: list[pb.TunnelMessage]) -> None:
        self.queue.extend(msgs)

    def close(self) -> None:
        pass

    def abort(self, reason: str) -> None:
        raise RuntimeError(f"stream aborted: {reason}")


class Answer:
    """The client's backend: answers every request at once with a 3-byte body."""

    def __init__(self, tunnel: Any, event: s.RequestReceived, route: pb.Route) -> None:
        self.tunnel, self.rid = tunnel, event.request_id

    def begin(self) -> None:
        msg = pb.TunnelMessage()
        resp = msg.http_response
        resp.status_code = 200
        for name, value in RESPONSE_HEADERS:
            resp.headers.add(name=name, value=value)
        resp.body = b"ok\n"
        resp.is_first_chunk = resp.is_last_chunk = True
        self.tunnel.send(self.rid, msg)

    def message_received(self, msg: Any, end: bool) -> None:
        pass

    def writable(self) -> None:
        pass

    def closed(self) -> None:
        pass

    def aborted(self, code: int, message: str, by_peer: bool) -> None:
        pass


def build(admin: bool) -> tuple[EntrySite, Handle, Handle, ServerHub]:
    config = parse_server_config({
        "server": {"admin_listen": "127.0.0.1:0" if admin else "", "access_log": False},
        "groups": [{"name": "default", "tokens": ["t"]}],
        "routes": [{"name": "web", "backend": "http://127.0.0.1:3000"}],
    }, "micro.toml")
    hub = ServerHub(config, reactor)
    if admin:
        from prometheus_client import CollectorRegistry

        from tunneld import inspector
        from tunneld.admin import RequestMetrics
        hub.metrics = RequestMetrics(CollectorRegistry())
        hub.inspector = inspector.make(config.server.inspect, config.server.inspect_body_bytes)
    settings = parse_client_config({"client": {"token": "t", "client_id": "micro"}}, "micro.toml").client
    client = ClientHub(settings, reactor, {pb.HTTP: Answer}).links[0]
    client_handle, server_handle = Handle("server:7000"), Handle("ipv4:127.0.0.1:40000")
    client.connected(client_handle)   # type: ignore[arg-type]
    first = client_handle.queue.pop(0)
    hub.stream_connected(server_handle, first)   # type: ignore[arg-type]
    flush(client_handle, server_handle)
    site = EntrySite(hub, reactor, inspector=hub.inspector)
    return site, client_handle, server_handle, hub


def flush(client_handle: Handle, server_handle: Handle) -> None:
    while client_handle.queue or server_handle.queue:
        out, server_handle.queue = server_handle.queue, []
        for msg in out:
            client_handle.on_message(msg)
        back, client_handle.queue = client_handle.queue, []
        for msg in back:
            server_handle.on_message(msg)


def connect(site: EntrySite, port: int) -> tuple[Any, StringTransport]:
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    proto.makeConnection(transport)
    return proto, transport


def round_(site: EntrySite, client_handle: Handle, server_handle: Handle, conns: list[tuple[Any, StringTransport]],
           requests: int, request: bytes) -> float:
    """Server CPU ns per request over ``requests`` requests."""
    spent = 0
    clock = time.thread_time_ns
    done = 0
    while done < requests:
        t0 = clock()
        for proto, _ in conns:
            proto.dataReceived(request)
        spent += clock() - t0
        # The client side (not timed): requests to the backend and its answers back.
        out, server_handle.queue = server_handle.queue, []
        for msg in out:
            client_handle.on_message(msg)
        back, client_handle.queue = client_handle.queue, []
        t0 = clock()
        for msg in back:
            server_handle.on_message(msg)
        spent += clock() - t0
        for _, transport in conns:
            if not transport.value().endswith(b"ok\n"):
                raise SystemExit(f"unexpected response: {transport.value()!r}")
            transport.clear()
        # What a running reactor does between iterations: drop cancelled timers
        # (none is due), or they pile up and the collector's work with them.
        reactor.runUntilCurrent()   # type: ignore[attr-defined]
        done += len(conns)
    return spent / done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--headers", choices=("wrk", "browser"), default="wrk")
    p.add_argument("--admin", action="store_true", help="metrics and the inspector on (admin port configured)")
    p.add_argument("--profile", action="store_true", help="cProfile one round (whole loop, client side included)")
    p.add_argument("--serve", action="store_true",
                   help="read a request count per stdin line, answer with the us per request of that round "
                        "(a driver alternates two trees' rounds finely, so machine noise hits both alike)")
    args = p.parse_args()
    request = WRK if args.headers == "wrk" else BROWSER
    site, client_handle, server_handle, hub = build(args.admin)
    conns = [connect(site, 40000 + i) for i in range(args.conns)]
    round_(site, client_handle, server_handle, conns, 2000, request)   # warm-up
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        round_(site, client_handle, server_handle, conns, args.requests, request)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(45)
        return 0
    if args.serve:
        for line in sys.stdin:
            gc.collect()
            print(f"{round_(site, client_handle, server_handle, conns, int(line), request) / 1000:.2f}", flush=True)
        return 0
    results = []
    for _ in range(args.repeat):
        gc.collect()
        results.append(round_(site, client_handle, server_handle, conns, args.requests, request) / 1000)
    print(f"server entry CPU per request: best {min(results):.1f} us, "
          f"all {' '.join(f'{r:.1f}' for r in results)}  (conns={args.conns} headers={args.headers} admin={args.admin})")
    leftover = hub.in_flight()
    if leftover:
        raise SystemExit(f"{leftover} requests still in flight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
