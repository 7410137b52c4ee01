"""Access-control and abuse-limit costs of the HTTP entry, measured in one run.

    .venv/bin/python bench/access_bench.py [--duration 10] [--cpu 0] [--slowloris 2000] [--header-timeout 10]

1. Small GET req/s (wrk -t1 -c64, ``GET /small`` from ``bench/backend.py``)
   through the tunnel on two routes to the same backend in the same server:
   ``open`` (no access control) and ``auth`` (``basic_auth`` with a bcrypt
   cost-10 hash, every request carrying the right credentials). The runs
   alternate open/auth/open/auth; every process (backend, server, client, wrk)
   is pinned to one CPU with taskset. Also the server CPU per request
   (utime+stime delta over the run / requests), which other work on a busy
   machine disturbs less than req/s.
2. Slowloris: ``--slowloris`` connections each send a request line and one
   header line (opened in batches of 40, under the listen backlog), then
   one more header line every 2 s; the server's CPU
   (utime+stime from /proc) is sampled while they are held and while
   ``header_timeout`` cuts them, and a normal request is timed every 0.5 s
   meanwhile. Bounded: header_timeout + 30 s at most.

Every process started is stopped by its PID at the end (bench.Procs).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bcrypt  # noqa: E402

import common as hb  # noqa: E402  (bench/common.py: ports, processes by PID, /proc readings)
from http_bench import parse_wrk  # noqa: E402

PASSWORD = "bench-password"


def log(message: str) -> None:
    print(f"[access-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def get(port: int, host: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/small", headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        conn.close()


def wrk(pin: list[str], port: int, host: str, headers: dict[str, str], duration: int, server_pid: int) -> dict[str, Any]:
    argv = pin + ["wrk", "-t1", "-c64", f"-d{duration}s", "--latency", "-H", f"Host: {host}"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{port}/small")
    log(" ".join(a if not a.startswith("Authorization") else "Authorization: Basic ..." for a in argv))
    cpu0 = hb.proc_cpu_seconds(server_pid) or 0.0
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    cpu1 = hb.proc_cpu_seconds(server_pid) or 0.0
    if out.returncode != 0:
        raise hb.BenchError(f"wrk failed: {out.stderr}")
    result = parse_wrk(out.stdout)
    # Server CPU per request: less sensitive than req/s to other work on the CPU.
    result["server_cpu_us_per_request"] = round(1e6 * (cpu1 - cpu0) / max(1, result.get("requests") or 1), 1)
    errors = [line for line in out.stdout.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    result["errors"] = errors
    return result


def metric(admin_port: int, name: str) -> float:
    """One unlabelled sample from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return -1.0


def slowloris(port: int, count: int, header_timeout: float, server_pid: int, admin_port: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1000)), hard))
    socks: list[socket.socket] = []
    cpu0 = hb.proc_cpu_seconds(server_pid) or 0.0
    t0 = time.monotonic()
    for start in range(0, count, 40):
        # In batches below the listen backlog (50), each batch connected before the next.
        batch = []
        for _ in range(min(40, count - start)):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            batch.append(s)
        for s in batch:
            poller = select.poll()
            poller.register(s, select.POLLOUT)
            poller.poll(5000)
            s.send(b"GET /small HTTP/1.1\r\nHost: open.test\r\n")
        socks.extend(batch)
        bound = time.monotonic() + 5
        while metric(admin_port, "tunneld_http_connections") < len(socks) and time.monotonic() < bound:
            time.sleep(0.01)
    opened = time.monotonic() - t0
    cpu_open = (hb.proc_cpu_seconds(server_pid) or 0.0) - cpu0
    held_by_server = metric(admin_port, "tunneld_http_connections")
    log(f"{count} slowloris connections opened in {opened:.2f} s (server CPU {cpu_open:.2f} s), "
        f"server holds {held_by_server}")
    alive = set(range(count))
    samples = []
    probe_max = 0.0
    probe_fail = 0
    hold_cpu_start = hb.proc_cpu_seconds(server_pid) or 0.0
    hold_t = time.monotonic()
    first_cut = None
    all_cut = None
    last_trickle = 0.0
    deadline = t0 + header_timeout + 30
    while time.monotonic() < deadline and alive:
        now = time.monotonic()
        trickle = now - last_trickle >= 2.0
        if trickle:
            last_trickle = now
        for i in list(alive):
            s = socks[i]
            try:
                data = s.recv(1)
                if data == b"":
                    alive.discard(i)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                alive.discard(i)
                continue
            if trickle:
                try:
                    s.send(b"X-Slow: 1\r\n")
                except BlockingIOError:
                    pass
                except OSError:
                    alive.discard(i)
        if len(alive) < count and first_cut is None:
            first_cut = time.monotonic() - t0
        try:
            status, latency = get(port, "open.test")
            probe_max = max(probe_max, latency)
            probe_fail += status != 200
        except OSError:
            probe_fail += 1
        samples.append((round(time.monotonic() - t0, 2), len(alive), hb.proc_cpu_seconds(server_pid)))
        time.sleep(0.5)
    all_cut = time.monotonic() - t0 if not alive else None
    timeouts = metric(admin_port, "tunneld_http_header_timeouts_total")
    cpu_end = hb.proc_cpu_seconds(server_pid) or 0.0
    # CPU while held: from all-open to the first cut
    held_samples = [(t, c) for t, n, c in samples if n == count and c is not None]
    held_cpu_pct = None
    if len(held_samples) >= 2:
        (ta, ca), (tb, cb) = held_samples[0], held_samples[-1]
        held_cpu_pct = 100.0 * (cb - ca) / (tb - ta) if tb > ta else None
    for s in socks:
        s.close()
    return {
        "connections": count, "held_by_server": held_by_server, "header_timeouts_counted": timeouts,
        "opened_s": round(opened, 2), "server_cpu_to_open_s": round(cpu_open, 2),
        "held_cpu_pct": None if held_cpu_pct is None else round(held_cpu_pct, 1),
        "first_cut_s": None if first_cut is None else round(first_cut, 2),
        "all_cut_s": None if all_cut is None else round(all_cut, 2),
        "still_open": len(alive), "server_cpu_total_s": round(cpu_end - cpu0, 2),
        "server_cpu_hold_and_cut_s": round(cpu_end - hold_cpu_start, 2),
        "hold_and_cut_wall_s": round(time.monotonic() - hold_t, 2),
        "probe_max_latency_ms": round(probe_max * 1000, 1), "probe_failures": probe_fail,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3, help="open/auth wrk run pairs, alternating")
    parser.add_argument("--slowloris", type=int, default=2000)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--output", default=str(HERE / "results" / "access-latest.json"))
    args = parser.parse_args()
    pin = ["taskset", "-c", str(args.cpu)]
    tunnel_port, http_port, backend_port, admin_port = hb.free_ports(4)
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-access-bench-"))
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    t = time.perf_counter()
    bcrypt.checkpw(PASSWORD.encode(), hashed.encode())
    bcrypt_ms = (time.perf_counter() - t) * 1000
    server_toml = tmp / "server.toml"
    server_toml.write_text(f"""
[server]
tunnel_listen = "127.0.0.1:{tunnel_port}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = ""
admin_listen = "127.0.0.1:{admin_port}"
drain_timeout = 2
header_timeout = {args.header_timeout}
[[groups]]
name = "default"
tokens = ["bench-token"]
[[routes]]
name = "open"
host = "open.test"
backend = "http://127.0.0.1:{backend_port}"
[[routes]]
name = "auth"
host = "auth.test"
backend = "http://127.0.0.1:{backend_port}"
basic_auth = ["bench:{hashed}"]
""")
    client_toml = tmp / "client.toml"
    client_toml.write_text(f"""
[client]
server = "127.0.0.1:{tunnel_port}"
token = "bench-token"
client_id = "bench"
drain_timeout = 2
""")
    twistd = hb.find_twistd()
    procs = hb.Procs(tmp)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    results: dict[str, Any] = {"cpu": args.cpu, "bcrypt_cost10_ms": round(bcrypt_ms, 1), "wrk": []}
    auth = {"Authorization": "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()}
    try:
        procs.start("backend", pin + [sys.executable, str(HERE / "backend.py"), "--port", str(backend_port)], env)
        server = procs.start("server", pin + [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(server_toml)],
                             env)
        procs.start("client", pin + [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(client_toml)], env)
        deadline = time.monotonic() + 30
        while True:
            procs.check_alive()
            try:
                if get(http_port, "open.test")[0] == 200 and get(http_port, "auth.test", auth)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise hb.BenchError("the tunnel did not answer within 30 s")
            time.sleep(0.2)
        assert get(http_port, "auth.test")[0] == 401
        for host, headers in [("open.test", {}), ("auth.test", auth)] * args.pairs:
            r = wrk(pin, http_port, host, headers, args.duration, server.pid)
            results["wrk"].append({"route": host.split(".")[0], "rps": r.get("rps"),
                                   "server_cpu_us_per_request": r["server_cpu_us_per_request"], "p50_ms": r.get("p50_ms"),
                                   "p99_ms": r.get("p99_ms"), "errors": r["errors"]})
            log(f"{host}: {r.get('rps')} req/s, server {r['server_cpu_us_per_request']} us CPU/request, p50 {r.get('p50_ms')} ms p99 {r.get('p99_ms')} ms {r['errors']}")
        open_rps = [w["rps"] for w in results["wrk"] if w["route"] == "open"]
        auth_rps = [w["rps"] for w in results["wrk"] if w["route"] == "auth"]
        results["open_rps_mean"] = round(sum(open_rps) / len(open_rps), 1)
        results["auth_rps_mean"] = round(sum(auth_rps) / len(auth_rps), 1)
        results["auth_vs_open"] = round(results["auth_rps_mean"] / results["open_rps_mean"], 3)
        for route in ("open", "auth"):
            cpu = [w["server_cpu_us_per_request"] for w in results["wrk"] if w["route"] == route]
            results[f"{route}_server_cpu_us_per_request_mean"] = round(sum(cpu) / len(cpu), 1)
        os.sched_setaffinity(0, {args.cpu})
        results["slowloris"] = slowloris(http_port, args.slowloris, args.header_timeout, server.pid, admin_port)
    finally:
        procs.stop_all()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
