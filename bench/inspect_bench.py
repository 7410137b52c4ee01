"""What the inspector costs: small GET req/s with ``inspect = 0`` against heads only (``inspect = 200``).

    .venv/bin/python bench/inspect_bench.py [--duration 8] [--pairs 3] [--cpu 0] [--body-bytes 0]

Two server+client pairs (one per mode) and one backend (``bench/backend.py``)
run at once, every process and wrk (-t1 -c64, ``GET /small``) pinned to one
CPU with taskset; the wrk runs alternate off/on so drift hits both alike.
Also the server's CPU per request (utime+stime / requests). Every process is
stopped by its PID at the end (bench.Procs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common as hb  # noqa: E402
from access_bench import get  # noqa: E402
from http_bench import parse_wrk  # noqa: E402


def wrk(pin: list[str], port: int, duration: int, server_pid: int) -> dict[str, Any]:
    cpu0 = hb.proc_cpu_seconds(server_pid) or 0.0
    out = subprocess.run(pin + ["wrk", "-t1", "-c64", f"-d{duration}s", "--latency", "-H", "Host: open.test",
                                f"http://127.0.0.1:{port}/small"],
                         capture_output=True, text=True, timeout=duration + 30)
    cpu1 = hb.proc_cpu_seconds(server_pid) or 0.0
    if out.returncode != 0:
        raise hb.BenchError(f"wrk failed: {out.stderr}")
    result = parse_wrk(out.stdout)
    result["server_cpu_us_per_request"] = round(1e6 * (cpu1 - cpu0) / max(1, result.get("requests") or 1), 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--body-bytes", type=int, default=0, help="inspect_body_bytes of the 'on' server")
    args = parser.parse_args()
    pin = ["taskset", "-c", str(args.cpu)]
    ports = hb.free_ports(7)
    backend_port = ports[0]
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-inspect-bench-"))
    twistd = hb.find_twistd()
    procs = hb.Procs(tmp)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    modes = {"off": (0, ports[1:4]), "on": (200, ports[4:7])}
    servers = {}
    results: dict[str, Any] = {"cpu": args.cpu, "inspect_body_bytes": args.body_bytes, "wrk": []}
    try:
        procs.start("backend", pin + [sys.executable, str(HERE / "backend.py"), "--port", str(backend_port)], env)
        for mode, (inspect, (tunnel_port, http_port, admin_port)) in modes.items():
            (tmp / f"server-{mode}.toml").write_text(f"""
[server]
tunnel_listen = "127.0.0.1:{tunnel_port}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = ""
admin_listen = "127.0.0.1:{admin_port}"
access_log = false
drain_timeout = 2
inspect = {inspect}
inspect_body_bytes = {args.body_bytes if inspect else 0}
[[groups]]
name = "default"
tokens = ["bench-token"]
[[routes]]
name = "open"
host = "open.test"
backend = "http://127.0.0.1:{backend_port}"
""")
            (tmp / f"client-{mode}.toml").write_text(f"""
[client]
server = "127.0.0.1:{tunnel_port}"
token = "bench-token"
client_id = "bench-{mode}"
drain_timeout = 2
""")
            servers[mode] = procs.start(f"server-{mode}", pin + [twistd, "-n", "--pidfile=", "tunneld-server", "-c",
                                                                 str(tmp / f"server-{mode}.toml")], env)
            procs.start(f"client-{mode}", pin + [twistd, "-n", "--pidfile=", "tunneld-client", "-c",
                                                 str(tmp / f"client-{mode}.toml")], env)
        deadline = time.monotonic() + 30
        for mode, (_, (_, http_port, _)) in modes.items():
            while True:
                procs.check_alive()
                try:
                    if get(http_port, "open.test")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise hb.BenchError("the tunnels did not answer within 30 s")
                time.sleep(0.2)
        for mode in ["off", "on"] * args.pairs:
            r = wrk(pin, modes[mode][1][1], args.duration, servers[mode].pid)
            results["wrk"].append({"mode": mode, "rps": r.get("rps"), "p50_ms": r.get("p50_ms"),
                                   "server_cpu_us_per_request": r["server_cpu_us_per_request"]})
            hb.log(f"{mode}: {r.get('rps')} req/s, server {r['server_cpu_us_per_request']} us CPU/request")
        for mode in modes:
            rps = [w["rps"] for w in results["wrk"] if w["mode"] == mode]
            cpu = [w["server_cpu_us_per_request"] for w in results["wrk"] if w["mode"] == mode]
            results[f"{mode}_rps_mean"] = round(sum(rps) / len(rps), 1)
            results[f"{mode}_server_cpu_us_per_request_mean"] = round(sum(cpu) / len(cpu), 1)
        results["on_vs_off"] = round(results["on_rps_mean"] / results["off_rps_mean"], 3)
    finally:
        procs.stop_all()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
