#!/usr/bin/env python3
"""tunneld gRPC benchmark: the same gRPC backend measured direct and through the tunnel.

One run starts, on 127.0.0.1 only, with free ports chosen at start:

* a ``grpc.aio`` backend (this file, ``--_backend``) serving ``bench.Raw``:
  ``Echo`` (unary, answers its request) and ``Count`` (server-streaming),
* ``twistd -n tunneld-server`` (gRPC entry on) and ``twistd -n tunneld-client``
  from small generated configs with one gRPC route to that backend,

then measures, direct to the backend and through the server's gRPC entry:

1. unary ``Echo`` calls/s (16-byte messages) and p50/p99 latency with 1 and
   32 concurrent callers (one channel, N asyncio tasks calling in a loop),
2. server-streaming messages/s: one ``Count`` call streaming 100-byte messages,
   read as fast as they come.

Every process -- backend, server, client and the load generator -- is pinned
to the same single CPU with ``taskset -c 1`` (``--cpu N``), so the figures are
what one core does running the whole chain.  Table on stdout (with the core
count), JSON in ``bench/results/grpc-latest.json``.  Every process started
here is stopped by its PID on exit.

    .venv/bin/python bench/grpc_bench.py [--duration 10] [--quick] [--cpu 1]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVICE = "bench.Raw"
TOKEN = "bench-token"


def log(message: str) -> None:
    print(f"[grpc-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Procs:
    """The processes this run started; stopped by PID (SIGTERM, then SIGKILL), newest first."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, argv: list[str], logfile: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(logfile, "wb")
        log(f"start {name}: {' '.join(argv)}")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(ROOT))
        self.items.append((name, proc, out))
        return proc

    def check_alive(self) -> None:
        for name, proc, _ in self.items:
            if proc.poll() is not None:
                raise BenchError(f"{name} (pid {proc.pid}) exited early with status {proc.returncode}")

    def stop_all(self) -> None:
        for name, proc, out in reversed(self.items):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except ProcessLookupError:
                    pass
                except subprocess.TimeoutExpired:
                    log(f"{name} (pid {proc.pid}) ignored SIGTERM for 15 s: SIGKILL")
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            out.close()
        self.items.clear()


# --- the backend (a separate, pinned process) -------------------------------------


def run_backend(port: int) -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def count(request: bytes, context: Any) -> Any:
        n, size = struct.unpack("!QI", request)
        body = b"x" * size
        for _ in range(n):
            yield body

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        }),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


# --- the load generator (a separate, pinned process) ----------------------------------


async def unary_load(target: str, callers: int, duration: float) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        payload = b"0123456789abcdef"
        for _ in range(20):  # warm up the connection and both paths
            await echo(payload, timeout=10)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        stop_at = time.monotonic() + duration

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    answer = await echo(payload, timeout=10)
                    if answer != payload:
                        errors["wrong answer"] = errors.get("wrong answer", 0) + 1
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)

        t0 = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall = time.monotonic() - t0
    latencies.sort()
    n = len(latencies)
    return {
        "calls": n, "wall_s": round(wall, 3), "calls_per_s": round(n / wall, 1),
        "p50_ms": round(latencies[n // 2] * 1e3, 3) if n else None,
        "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1e3, 3) if n else None,
        "errors": errors,
    }


async def stream_load(target: str, duration: float, size: int) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        count = channel.unary_stream(f"/{SERVICE}/Count")
        call = count(struct.pack("!QI", 10**12, size))
        received = 0
        t0 = time.monotonic()
        stop_at = t0 + duration
        async for message in call:
            received += 1
            if len(message) != size:
                raise BenchError(f"message of {len(message)} bytes, expected {size}")
            if received % 256 == 0 and time.monotonic() >= stop_at:
                break
        wall = time.monotonic() - t0
        call.cancel()
    return {"messages": received, "wall_s": round(wall, 3), "messages_per_s": round(received / wall, 1),
            "MB_per_s": round(received * size / wall / 1e6, 2)}


def loadgen(pin: list[str], spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    argv = pin + [sys.executable, str(Path(__file__).resolve()), "--_loadgen", json.dumps(spec)]
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise BenchError(f"load generator failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "unary":
        return asyncio.run(unary_load(spec["target"], spec["callers"], spec["duration"]))
    return asyncio.run(stream_load(spec["target"], spec["duration"], spec["size"]))


# --- orchestration -------------------------------------------------------------------


def write_configs(tmp: Path, tunnel_port: int, grpc_port: int, http_port: int,
                  backend_port: int) -> tuple[Path, Path]:
    server = tmp / "server.toml"
    server.write_text(f"""\
[server]
tunnel_listen = "127.0.0.1:{tunnel_port}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = "127.0.0.1:{grpc_port}"
admin_listen = ""
drain_timeout = 2

[[groups]]
name = "default"
tokens = ["{TOKEN}"]

[[routes]]
name = "bench"
group = "default"
grpc_service = "{SERVICE}"
backend = "grpc://127.0.0.1:{backend_port}"
""")
    client = tmp / "client.toml"
    client.write_text(f"""\
[client]
server = "127.0.0.1:{tunnel_port}"
group = "default"
token = "{TOKEN}"
client_id = "grpc-bench"
drain_timeout = 2
""")
    return server, client


def wait_ready(target: str, procs: Procs, limit: float) -> float:
    """Poll ``target`` with an Echo until it answers, at most ``limit`` seconds."""
    import grpc

    start = time.monotonic()
    last = "no answer yet"
    channel = grpc.insecure_channel(target)
    try:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        while time.monotonic() - start < limit:
            procs.check_alive()
            try:
                if echo(b"ping", timeout=2) == b"ping":
                    return time.monotonic() - start
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.2)
    finally:
        channel.close()
    raise BenchError(f"{target} did not answer within {limit:.0f} s (last: {last})")


def find_twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("twistd")
    if not found:
        raise BenchError("twistd not found (run with the dev venv: .venv/bin/python bench/grpc_bench.py)")
    return found


def pin_cpu(requested: int) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    if requested in allowed:
        return requested
    log(f"CPU {requested} is not available (allowed: {allowed}); pinning to CPU {allowed[-1]}")
    return allowed[-1]


def render(meta: dict[str, Any], rows: list[tuple[str, str, str, str]]) -> str:
    lines = [
        f"tunneld gRPC benchmark  {meta['date']}  commit {meta['commit']}",
        f"cores: {meta['nproc']} ({meta['cpu_model']}); every process pinned to CPU {meta['pinned_cpu']} "
        f"(taskset -c {meta['pinned_cpu']}); {meta['duration_s']} s per step; python {meta['python']}",
        "",
    ]
    header = ("metric", "direct", "tunnel", "tunnel/direct")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt.format(*row) for row in rows)
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds per step (default 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s steps")
    parser.add_argument("--callers", default="1,32", help="comma-separated concurrent unary callers (default 1,32)")
    parser.add_argument("--stream-size", type=int, default=100, help="server-streaming message size (default 100)")
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU every process is pinned to (default 1)")
    parser.add_argument("--output", default=str(HERE / "results" / "grpc-latest.json"), help="JSON result file")
    parser.add_argument("--_backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._backend:
        run_backend(args._backend)
        return 0
    if args._loadgen:
        print(json.dumps(run_loadgen(json.loads(args._loadgen))), flush=True)
        return 0

    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    callers = [int(c) for c in args.callers.split(",") if c.strip()]
    if not shutil.which("taskset"):
        raise BenchError("taskset is not installed (util-linux)")
    twistd = find_twistd()
    cpu = pin_cpu(args.cpu)
    pin = ["taskset", "-c", str(cpu)]
    meta: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
        "nproc": os.cpu_count(), "cpu_model": cpu_model(), "pinned_cpu": cpu,
        "python": platform.python_version(), "duration_s": duration, "callers": callers,
        "stream_message_bytes": args.stream_size,
    }
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-grpc-bench-"))
    results: dict[str, Any] = {"direct": {}, "tunnel": {}, "cpu_seconds": {}, "peak_rss": {}}
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend_port, tunnel_port, grpc_port, http_port = free_ports(4)  # the HTTP entry cannot be disabled
        server_toml, client_toml = write_configs(tmp, tunnel_port, grpc_port, http_port, backend_port)
        env = dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")
        backend = procs.start("backend", pin + [sys.executable, str(Path(__file__).resolve()), "--_backend",
                                                str(backend_port)], tmp / "backend.log", env)
        direct = f"127.0.0.1:{backend_port}"
        wait_ready(direct, procs, 30)
        server = procs.start("server", pin + [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(server_toml)],
                             tmp / "server.log", env)
        client = procs.start("client", pin + [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(client_toml)],
                             tmp / "client.log", env)
        tunnel = f"127.0.0.1:{grpc_port}"
        log(f"tunnel answers after {wait_ready(tunnel, procs, 60):.1f} s")
        pids = {"backend": backend.pid, "server": server.pid, "client": client.pid}
        cpu_before = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
        timeout = duration + 120
        for n in callers:
            for label, target in (("direct", direct), ("tunnel", tunnel)):
                procs.check_alive()
                log(f"unary, {n} caller(s), {label}")
                results[label][f"unary_c{n}"] = loadgen(
                    pin, {"kind": "unary", "target": target, "callers": n, "duration": duration}, timeout)
        for label, target in (("direct", direct), ("tunnel", tunnel)):
            procs.check_alive()
            log(f"server streaming, {label}")
            results[label]["stream"] = loadgen(
                pin, {"kind": "stream", "target": target, "duration": duration, "size": args.stream_size}, timeout)
        procs.check_alive()
        for name, pid in pids.items():
            after, before = proc_cpu_seconds(pid), cpu_before[name]
            if after is not None and before is not None:
                results["cpu_seconds"][name] = round(after - before, 2)
            results["peak_rss"][name] = peak_rss(pid)
    finally:
        procs.stop_all()
        for name in ("backend", "server", "client"):
            src = tmp / f"{name}.log"
            if src.exists():
                shutil.copyfile(src, out_path.parent / f"grpc-latest-{name}.log")
        shutil.rmtree(tmp, ignore_errors=True)

    rows: list[tuple[str, str, str, str]] = []

    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.2f}" if a and b is not None else "-"

    for n in callers:
        d, t = results["direct"][f"unary_c{n}"], results["tunnel"][f"unary_c{n}"]
        rows.append((f"unary calls/s, {n} caller(s)", f"{d['calls_per_s']:.0f}", f"{t['calls_per_s']:.0f}",
                     ratio(d["calls_per_s"], t["calls_per_s"])))
        rows.append((f"  p50 / p99 ms, {n} caller(s)", f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}",
                     f"{t['p50_ms']:.2f} / {t['p99_ms']:.2f}", ratio(d["p50_ms"], t["p50_ms"])))
    d, t = results["direct"]["stream"], results["tunnel"]["stream"]
    rows.append((f"server-streaming msgs/s ({args.stream_size} B)", f"{d['messages_per_s']:.0f}",
                 f"{t['messages_per_s']:.0f}", ratio(d["messages_per_s"], t["messages_per_s"])))
    report = render(meta, rows)
    errors = {f"{label} {k}": v["errors"] for label in ("direct", "tunnel") for k, v in results[label].items()
              if v.get("errors")}
    notes = [f"CPU seconds during the steps: {results['cpu_seconds']}",
             "peak RSS MiB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in results["peak_rss"].items() if v)]
    if errors:
        notes.append(f"call errors: {errors}")
    print(report + "\n\n" + "\n".join(notes), flush=True)
    out_path.write_text(json.dumps({"meta": meta, "results": results, "rows": rows, "notes": notes,
                                    "table": report}, indent=2) + "\n")
    log(f"wrote {out_path}")
    return 1 if errors else 0


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    if not any(a.startswith("--_") for a in sys.argv[1:]):
        for _sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(_sig, _on_signal)
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(2)
