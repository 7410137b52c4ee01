"""The floor of server memory per idle gRPC client: bare grpc.aio servers, no tunneld code.

For each N in ``--clients`` and each row in ``--rows`` this starts a fresh
server subprocess (``--role server``; it imports grpc and nothing of tunneld),
then one client subprocess (``--role client``) that opens N grpc.aio channels,
each on its own TCP connection (``grpc.use_local_subchannel_pool`` = 1, so no
two channels share a subchannel; checked by counting the ESTABLISHED sockets on
the server's port in ``/proc/net/tcp``).  In the stream rows every channel opens
one ``/tunneld.v2.TunnelService/Proxy`` bidi stream (bytes in, bytes out, no
serializers) and writes one 16-byte message, so the server handler is entered
(checked: the server counts its handler entries), then holds it open.  Clients
are opened ``--concurrency`` at a time.

Rows (``--rows``; a row may be given several times to see the noise):

* ``aio-read``: a coroutine handler that does ``await context.read()`` (the
  16-byte message) and then awaits a second ``context.read()`` forever: an idle
  bidi stream held open, like the tunnel stream.
* ``aio-rw``: the same, but it writes one 16-byte message back (response
  headers and a message out, as tunneld answers ``stream_open``) before the
  second read.
* ``aio-gen``: an async-generator handler, ``async for _ in request_iterator``
  (reads the message, then waits on the next) and would ``yield`` afterwards.
* ``aio-iter``: a coroutine handler iterating the request iterator the same way.
* ``connect``: channels only: every client waits for ``channel_ready()`` and
  opens no call, the transport-only floor (the server is the ``aio-read`` one).
* ``aio-read+ph2`` / ``connect+ph2``: the same with ``GRPC_EXPERIMENTS=ph2_server``
  in the server's environment (grpc's promise-based HTTP/2 server transport).

The sync ``grpc.server`` (thread pool) is not a candidate: it holds a
thread-pool worker for each open stream, so 10,000 streams would need 10,000
threads; it is not measured.

Reported per (row, N): the server's VmRSS (``/proc/PID/status``) before any
client, after N/2 clients and a short settle, after all N and ``--settle`` s;
KiB per connection = (RSS with N - RSS before) / N, and the marginal figure
(RSS with N - RSS with N/2) / (N/2), which leaves out one-off costs (thread
pools, the first connection); the server's CPU while idle over ``--idle`` s
(utime + stime from ``/proc/PID/stat``), the connections counted and the
handler entries.  With ``--tracemalloc`` the server also traces its Python heap
and the growth per connection is reported (its RSS then includes tracemalloc's
own bookkeeping, so use those runs for the Python share only).  Loopback only;
every wait is bounded.

Server options mirror tunneld's ``start_server`` (grpc_bridge/stream.py) with
the fleet keepalive: ``grpc.keepalive_time_ms`` = ``--server-keepalive`` s
(300 by default), ``keepalive_timeout_ms`` 5000, ``http2.ping_timeout_ms`` 5000,
``keepalive_permit_without_calls`` 1, ``http2.max_pings_without_data`` 0,
``http2.min_recv_ping_interval_without_data_ms`` 5000, ``so_reuseport`` 0,
``server_handshake_timeout_ms`` 10000.  Clients: the same keepalive options with
``--client-keepalive`` s (120 by default).  Both processes pin themselves to
``--cpu`` and raise RLIMIT_NOFILE to the hard limit.

    .venv/bin/python bench/grpc_floor.py --clients 2000 10000 \\
        --rows aio-read aio-read aio-rw aio-gen aio-iter connect aio-read+ph2 connect+ph2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from typing import Any, AsyncIterator

METHOD = "/tunneld.v2.TunnelService/Proxy"
SERVICE, RPC = "tunneld.v2.TunnelService", "Proxy"
ROWS = ("aio-read", "aio-rw", "aio-gen", "aio-iter", "connect", "aio-read+ph2", "connect+ph2")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """tunneld's KEEPALIVE_OPTIONS (grpc_bridge/stream.py) with a ping every ``seconds``."""
    return [("grpc.keepalive_time_ms", int(seconds * 1000)), ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.ping_timeout_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines read from stdin (None at EOF), delivered on ``loop`` without a thread."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    buf = bytearray()
    fd = sys.stdin.fileno()

    def readable() -> None:
        data = os.read(fd, 4096)
        if not data:
            loop.remove_reader(fd)
            lines.put_nowait(None)
            return
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            lines.put_nowait(line.decode().strip())

    loop.add_reader(fd, readable)
    return lines


# --- the server (child process; grpc only) ------------------------------------------------


def traced() -> int:
    """Bytes of Python heap tracemalloc sees (0 when it is not tracing)."""
    import tracemalloc

    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0


async def server_main(args: argparse.Namespace) -> None:
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    import grpc

    entered = 0

    async def h_read(request_iterator: Any, context: Any) -> None:
        nonlocal entered
        await context.read()
        entered += 1
        await context.read()  # never completes while the client holds the stream

    async def h_rw(request_iterator: Any, context: Any) -> None:
        nonlocal entered
        await context.read()
        entered += 1
        await context.write(b"y" * 16)  # headers and one message out, as the tunnel answers stream_open
        await context.read()

    async def h_gen(request_iterator: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        nonlocal entered
        async for _ in request_iterator:
            entered += 1
        yield b""

    async def h_iter(request_iterator: AsyncIterator[bytes], context: Any) -> None:
        nonlocal entered
        async for _ in request_iterator:
            entered += 1

    handler = {"read": h_read, "rw": h_rw, "gen": h_gen, "iter": h_iter}[args.handler]
    options = keepalive_options(args.server_keepalive) + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", 10_000),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {RPC: grpc.stream_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise OSError("cannot listen on 127.0.0.1")
    await server.start()
    lines = stdin_lines(asyncio.get_running_loop())
    emit({"port": port, "pid": os.getpid(), "nofile": raise_nofile(), "grpc": grpc.__version__,
          "experiments": os.environ.get("GRPC_EXPERIMENTS", ""), "traced": traced()})
    while True:
        line = await lines.get()
        if line is None:
            break
        if line == "count":
            emit({"entered": entered, "traced": traced()})
    os._exit(0)  # no graceful stop of N streams: the process exit closes them


# --- the clients (child process) ----------------------------------------------------------


async def client_main(args: argparse.Namespace) -> None:
    import grpc

    raise_nofile()
    target = f"127.0.0.1:{args.port}"
    options = keepalive_options(args.client_keepalive) + [("grpc.use_local_subchannel_pool", 1)]
    lines = stdin_lines(asyncio.get_running_loop())
    held: list[Any] = []
    failed = 0
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            channel = grpc.aio.insecure_channel(target, options=options + [("grpc.channel_id", i)])
            try:
                await asyncio.wait_for(channel.channel_ready(), args.timeout)
                if args.stream:
                    call = channel.stream_stream(METHOD)()
                    await asyncio.wait_for(call.write(b"x" * 16), args.timeout)
                    held.append(call)
                held.append(channel)
            except Exception:  # noqa: BLE001 - a failed client is counted, not fatal
                failed += 1
                await channel.close()

    async def batch(lo: int, hi: int) -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(lo, hi))), args.open_timeout)

    half = args.n // 2
    t0 = time.monotonic()
    await batch(0, half)
    emit({"half": half, "failed": failed, "s": round(time.monotonic() - t0, 1)})
    if await asyncio.wait_for(lines.get(), args.open_timeout) != "go":
        os._exit(1)
    t1 = time.monotonic()
    await batch(half, args.n)
    emit({"all": args.n, "failed": failed, "s": round(time.monotonic() - t1, 1)})
    await lines.get()  # hold until stdin closes
    os._exit(0)


# --- the driver ---------------------------------------------------------------------------


class Child:
    """A subprocess speaking JSON lines on stdout, commands on stdin; every read bounded."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"child {self.proc.pid} exited ({self.proc.poll()})")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 30.0) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its pid
            self.proc.wait(10)


def vm_rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def established(port: int) -> int:
    """ESTABLISHED sockets whose local port is ``port``: the server's side of each connection.

    grpc's sockets are dual-stack, so 127.0.0.1 shows up in /proc/net/tcp6 as ::ffff:127.0.0.1.
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def run_one(args: argparse.Namespace, row: str, n: int) -> dict[str, Any]:
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--cpu", str(args.cpu)] if args.cpu is not None else []
    env = dict(os.environ)
    env.pop("GRPC_EXPERIMENTS", None)
    if row.endswith("+ph2"):
        env["GRPC_EXPERIMENTS"] = "ph2_server"
    handler = {"aio-rw": "rw", "aio-gen": "gen", "aio-iter": "iter"}.get(row.split("+")[0], "read")
    stream = not row.startswith("connect")
    server = Child(me + common + ["--role", "server", "--handler", handler,
                                  "--server-keepalive", str(args.server_keepalive)]
                   + (["--tracemalloc"] if args.tracemalloc else []), env)
    client: Child | None = None
    try:
        hello = server.read(30)
        pid, port = server.proc.pid, hello["port"]
        time.sleep(args.settle_start)
        rss0 = vm_rss(pid)
        client_env = dict(os.environ)
        client_env.pop("GRPC_EXPERIMENTS", None)
        client = Child(me + common + ["--role", "client", "--port", str(port), "--n", str(n),
                                      "--concurrency", str(args.concurrency), "--timeout", str(args.timeout),
                                      "--open-timeout", str(args.open_timeout),
                                      "--client-keepalive", str(args.client_keepalive)]
                       + (["--stream"] if stream else []), client_env)
        half = client.read(args.open_timeout + 30)
        time.sleep(args.settle_half)
        rss_half, conns_half = vm_rss(pid), established(port)
        client.send("go")
        done = client.read(args.open_timeout + 30)
        time.sleep(args.settle)
        rss1 = vm_rss(pid)
        conns = established(port)
        server.send("count")
        counted = server.read(60)
        entered = counted["entered"]
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle)
        cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        rss2 = vm_rss(pid)
        n_half = half["half"]
        result = {
            "row": row, "n": n, "grpc": hello["grpc"], "experiments": hello["experiments"],
            "rss_before_mib": round(rss0 / 2**20, 1), "rss_half_mib": round(rss_half / 2**20, 1),
            "rss_all_mib": round(rss1 / 2**20, 1), "rss_after_idle_mib": round(rss2 / 2**20, 1),
            "kib_per_conn": round((rss1 - rss0) / n / 1024, 2),
            "kib_per_conn_marginal": round((rss1 - rss_half) / (n - n_half) / 1024, 2),
            "idle_cpu_pct": round(cpu * 100, 2),
            "py_kib_per_conn": round((counted["traced"] - hello["traced"]) / n / 1024, 2) if args.tracemalloc else None,
            "conns_half": conns_half, "conns": conns, "entered": entered,
            "failed": done["failed"], "open_s": round(half["s"] + done["s"], 1),
        }
        return result
    finally:
        if client is not None:
            client.stop()
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[2000, 10000], help="N per run (2000 10000)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="what to measure; repeat a row to see the noise (all, once each)")
    p.add_argument("--concurrency", type=int, default=500, help="clients opening at once (500)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-client connect / write timeout, s (60)")
    p.add_argument("--open-timeout", type=float, default=300.0, help="bound on opening N/2 clients, s (300)")
    p.add_argument("--settle", type=float, default=5.0, help="wait after all N are in before RSS, s (5)")
    p.add_argument("--settle-half", type=float, default=2.0, help="wait after N/2 before RSS, s (2)")
    p.add_argument("--settle-start", type=float, default=1.0, help="wait after the server starts, s (1)")
    p.add_argument("--idle", type=float, default=10.0, help="server CPU measured over this, s (10)")
    p.add_argument("--server-keepalive", type=float, default=300.0, help="server keepalive ping, s (300)")
    p.add_argument("--client-keepalive", type=float, default=120.0, help="client keepalive ping, s (120)")
    p.add_argument("--cpu", type=int, default=None, help="pin every process to this CPU")
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace the server's Python heap (inflates its RSS; for the Python share only)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--role", choices=("driver", "server", "client"), default="driver", help=argparse.SUPPRESS)
    p.add_argument("--handler", choices=("read", "rw", "gen", "iter"), default="read", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    pin(args.cpu)
    if args.role == "server":
        raise_nofile()
        asyncio.run(server_main(args))
        return
    if args.role == "client":
        asyncio.run(client_main(args))
        return
    raise_nofile()
    results = []
    print("| row | N | RSS before → N/2 → N (MiB) | KiB / conn | marginal KiB / conn (N/2 → N) "
          "| idle CPU | conns | handlers entered | failed | open s | Python heap KiB / conn |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in args.clients:
        for row in args.rows:
            r = run_one(args, row, n)
            results.append(r)
            print(f"| {r['row']} | {n} | {r['rss_before_mib']} → {r['rss_half_mib']} → {r['rss_all_mib']} "
                  f"| {r['kib_per_conn']} | {r['kib_per_conn_marginal']} | {r['idle_cpu_pct']} % "
                  f"| {r['conns']} | {r['entered']} | {r['failed']} | {r['open_s']} "
                  f"| {r['py_kib_per_conn'] if args.tracemalloc else '–'} |", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
