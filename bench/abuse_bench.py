"""Fair under abuse (issue 20), measured: a WebSocket frame flood against other clients' GETs.

    .venv/bin/python bench/abuse_bench.py [--duration 10] [--rounds 2]

Flood: one external WebSocket sends 7-byte frames (1-byte payload, masked)
as fast as one Python process can write them, in 63 KiB writes, and reads
and discards the echoes (the route's backend is autobahn's echo server,
``bench/ws_bench.py backend``).  Meanwhile another client sends sequential
keep-alive ``GET /small`` through the same server and client
(``bench/backend.py``) and the server's admin ``/healthz`` is timed.  The
same GET load runs without the flood first; rounds alternate quiet/flood.
Reported: GET p50/p99/max and count, /healthz p50/p99, and the frames the
flooder got written (its rate is bounded by the entry's fair share and the
tunnel's flow control).  The figure the issue asks for is the GET p99 under
the flood against the quiet one (within 2x).

Processes are not pinned (two cores: server, client, backends and load
share them as a deployment on one machine would).  Every process started is
stopped by its PID at the end (bench/common.py ``Procs``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common as hb  # noqa: E402

WS_BENCH = HERE / "ws_bench.py"
_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: bench.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
_FRAME = bytes([0x81, 0x81]) + b"\x01\x02\x03\x04" + bytes([ord("x") ^ 0x01])   # "x", masked: 7 bytes


def log(message: str) -> None:
    print(f"[abuse-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def flood_role(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: one WebSocket writing tiny frames for ``duration`` s; echoes read and dropped in a thread."""
    s = socket.create_connection(("127.0.0.1", spec["port"]), timeout=10)
    s.sendall(_UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    if not head.startswith(b"HTTP/1.1 101"):
        return {"error": head.split(b"\r\n", 1)[0].decode("latin-1")}
    stop = threading.Event()
    received = [0]

    def drain() -> None:
        s2 = s.dup()
        s2.settimeout(0.5)
        while not stop.is_set():
            try:
                chunk = s2.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            received[0] += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    burst = _FRAME * (63 * 1024 // len(_FRAME))
    sent = 0
    started = time.monotonic()
    s.settimeout(1.0)
    while time.monotonic() - started < spec["duration"]:
        try:
            s.sendall(burst)
            sent += len(burst)
        except socket.timeout:
            continue
        except OSError:
            break
    elapsed = time.monotonic() - started
    stop.set()
    s.close()
    frames = sent // len(_FRAME)
    return {"frames_written": frames, "frames_per_s": round(frames / elapsed), "echo_bytes": received[0]}


def get_load(port: int, admin_port: int, duration: float) -> dict[str, Any]:
    """Sequential keep-alive GET /small for ``duration`` s, /healthz every 10th; latencies in ms."""
    gets: list[float] = []
    health: list[float] = []
    failures = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    admin = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    end = time.monotonic() + duration
    n = 0
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            conn.request("GET", "/small", headers={"Host": "bench.test"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures += 1
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        gets.append((time.perf_counter() - t) * 1000)
        n += 1
        if n % 10 == 0:
            t = time.perf_counter()
            try:
                admin.request("GET", "/healthz")
                admin.getresponse().read()
                health.append((time.perf_counter() - t) * 1000)
            except (OSError, http.client.HTTPException):
                admin.close()
                admin = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    conn.close()
    admin.close()
    return {"gets": len(gets), "failures": failures, "get_ms": hb.latency_summary(gets),
            "healthz_ms": hb.latency_summary(health)}


def configs(tmp: Path, ports: dict[str, int], server_extra: str = "", client_extra: str = "") -> tuple[Path, Path]:
    server = tmp / "server.toml"
    server.write_text(f"""
[server]
tunnel_listen = "127.0.0.1:{ports['tunnel']}"
http_listen = "127.0.0.1:{ports['http']}"
grpc_listen = ""
admin_listen = "127.0.0.1:{ports['admin']}"
drain_timeout = 2
access_log = false
{server_extra}
[[groups]]
name = "default"
tokens = ["bench-token-0123456789"]
[[routes]]
name = "web"
backend = "http://127.0.0.1:{ports['backend']}"
[[routes]]
name = "ws"
path_prefix = "/ws"
backend = "http://127.0.0.1:{ports['ws']}"
""")
    client = tmp / "client.toml"
    client.write_text(f"""
[client]
server = "127.0.0.1:{ports['tunnel']}"
token = "bench-token-0123456789"
client_id = "bench"
drain_timeout = 2
{client_extra}
""")
    return server, client


def wait_ready(procs: hb.Procs, port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        procs.check_alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/small", headers={"Host": "bench.test"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise hb.BenchError("the tunnel did not answer within 30 s")
        time.sleep(0.2)


def flood_step(args: argparse.Namespace, procs: hb.Procs, ports: dict[str, int]) -> dict[str, Any]:
    rounds = []
    for index in range(args.rounds):
        quiet = get_load(ports["http"], ports["admin"], args.duration)
        log(f"round {index + 1} quiet: GET {quiet['get_ms']} /healthz {quiet['healthz_ms']}")
        flooder = procs.start(f"flood-{index}", hb.child_argv([], Path(__file__), "flood",
                                                              {"port": ports["http"], "duration": args.duration + 2}),
                              hb.pinned_env())
        time.sleep(1.0)   # the flood is running before the GETs start
        loud = get_load(ports["http"], ports["admin"], args.duration)
        flooder.wait(timeout=args.duration + 30)
        lines = procs.logs[f"flood-{index}"].read_text().strip().splitlines()
        flood = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"error": lines[-3:]}
        log(f"round {index + 1} flood: GET {loud['get_ms']} /healthz {loud['healthz_ms']} flooder {flood}")
        rounds.append({"quiet": quiet, "flood": loud, "flooder": flood})
    p99_quiet = max(r["quiet"]["get_ms"]["p99_ms"] or 0 for r in rounds)
    p99_flood = max(r["flood"]["get_ms"]["p99_ms"] or 0 for r in rounds)
    return {"rounds": rounds, "get_p99_quiet_ms": p99_quiet, "get_p99_flood_ms": p99_flood,
            "p99_ratio": round(p99_flood / p99_quiet, 2) if p99_quiet else None}


def burst_worker(port: int, end: float, size: int, counts: dict[str, int]) -> None:
    """Until ``end``: POST /upload of ``size`` bytes with ~12 KiB of headers, then GET /bytes/``size``."""
    headers = {"Host": "bench.test", **{f"X-Big-{n}": "h" * 1000 for n in range(12)}}
    body = b"u" * size
    while time.monotonic() < end:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/upload", body=body, headers=headers)
            conn.getresponse().read()
            conn.request("GET", f"/bytes/{size}", headers=headers)
            response = conn.getresponse()
            while response.read(1 << 20):
                pass
            conn.close()
            counts["ok"] += 1
        except (OSError, http.client.HTTPException):
            counts["failed"] += 1


def smaps_summary(pid: int) -> dict[str, Any]:
    """Resident MiB of ``pid`` by kind of mapping: [heap], other anonymous (thread arenas, mmaps), files."""
    kinds: dict[str, float] = {"heap": 0.0, "anon": 0.0, "file": 0.0}
    anon_sizes: list[float] = []
    kind = "anon"
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else ""
                kind = "heap" if name == "[heap]" else ("file" if name.startswith("/") else "anon")
            elif parts and parts[0] == "Rss:":
                mib = int(parts[1]) / 1024
                kinds[kind] += mib
                if kind == "anon" and mib >= 1:
                    anon_sizes.append(round(mib, 1))
    except OSError:
        pass
    return {**{k: round(v, 1) for k, v in kinds.items()}, "anon_maps_over_1_mib": sorted(anon_sizes, reverse=True)[:12]}


def soak_step(args: argparse.Namespace, procs: hb.Procs, ports: dict[str, int]) -> dict[str, Any]:
    """RSS of server and client: idle, at the peak of a burst of large requests, then over ``--settle`` s of idle."""
    pids = {"server": procs.pid("server"), "client": procs.pid("client")}

    def rss() -> dict[str, float]:
        return {name: round(hb.proc_status(pid).get("VmRSS", 0) / hb.MIB, 1) for name, pid in pids.items()}

    time.sleep(2)
    before = rss()
    log(f"soak: idle RSS {before} MiB; burst of {args.burst_conns} connections for {args.burst} s")
    counts = {"ok": 0, "failed": 0}
    end = time.monotonic() + args.burst
    workers = [threading.Thread(target=burst_worker, args=(ports["http"], end, args.burst_size, counts), daemon=True)
               for _ in range(args.burst_conns)]
    for w in workers:
        w.start()
    peak = dict(before)
    while any(w.is_alive() for w in workers) and time.monotonic() < end + 60:
        now = rss()
        peak = {k: max(peak[k], now[k]) for k in peak}
        time.sleep(0.5)
    done = time.monotonic()
    after: list[dict[str, Any]] = []
    while time.monotonic() - done < args.settle:
        time.sleep(5)
        sample = {"t": round(time.monotonic() - done), **rss()}
        after.append(sample)
        log(f"soak: {sample}")
    last = after[-1] if after else rss()
    if args.smaps:
        for name, pid in pids.items():
            log(f"soak: {name} {smaps_summary(pid)}")
    return {"idle_mib": before, "peak_mib": peak, "after_mib": after, "requests": counts,
            "returned_within_50_mib": all(last[k] - before[k] <= 50 for k in before)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per quiet and per flood phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", default="flood,soak", help="flood, soak or both")
    parser.add_argument("--burst", type=float, default=15.0, help="soak: seconds of the burst")
    parser.add_argument("--burst-conns", type=int, default=64, help="soak: concurrent connections in the burst")
    parser.add_argument("--burst-size", type=int, default=4 * 1024 * 1024, help="soak: bytes up and down per request")
    parser.add_argument("--settle", type=float, default=60.0, help="soak: seconds of idle watched after the burst")
    parser.add_argument("--smaps", action="store_true", help="soak: print where each process's RSS lies at the end")
    parser.add_argument("--server-set", default="", help="extra [server] TOML lines (experiments), ';'-separated")
    parser.add_argument("--client-set", default="", help="extra [client] TOML lines (experiments), ';'-separated")
    parser.add_argument("--output", default=str(HERE / "results" / "abuse-latest.json"))
    args = parser.parse_args()
    names = ("tunnel", "http", "admin", "backend", "ws")
    ports = dict(zip(names, hb.free_ports(len(names))))
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-abuse-bench-"))
    server_toml, client_toml = configs(tmp, ports, args.server_set.replace(";", "\n"),
                                       args.client_set.replace(";", "\n"))
    twistd = hb.find_twistd()
    procs = hb.Procs(tmp)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    results: dict[str, Any] = {"commit": hb.git_commit(), "cpu": hb.cpu_model(), "duration_s": args.duration}
    try:
        procs.start("backend", [sys.executable, str(HERE / "backend.py"), "--port", str(ports["backend"])], env)
        procs.start("ws-backend", hb.child_argv([], WS_BENCH, "backend", {"port": ports["ws"]}), env)
        procs.start("server", [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(server_toml)], env)
        procs.start("client", [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(client_toml)], env)
        wait_ready(procs, ports["http"])
        steps = args.steps.split(",")
        if "flood" in steps:
            results["flood"] = flood_step(args, procs, ports)
        if "soak" in steps:
            results["soak"] = soak_step(args, procs, ports)
    finally:
        procs.stop_all()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    summary = {k: v for k, v in results.get("flood", {}).items() if k != "rounds"}
    if "soak" in results:
        summary["soak"] = {k: v for k, v in results["soak"].items() if k != "after_mib"}
        summary["soak"]["last_mib"] = results["soak"]["after_mib"][-1] if results["soak"]["after_mib"] else None
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "flood":
        sys.exit(hb.child_main({"flood": flood_role}))
    sys.exit(main())
