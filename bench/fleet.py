"""Several servers behind HAProxy: small-GET throughput and what a kill -9 costs.

    .venv/bin/python bench/fleet.py [--duration 10] [--connections 64]

Starts, on free 127.0.0.1 ports and unpinned (every process may use every
CPU): the origin (bench/backend.py), two ``twistd tunneld-server`` processes
(proxy_protocol, /healthz), one ``twistd tunneld-client`` listing both, and
HAProxy (Debian's ``haproxy``) in the shape of etc/haproxy/haproxy.cfg.  Then:

* ``wrk -t1 -cN -dDs`` on ``GET /small``: direct to the origin, through
  HAProxy with one server (the other in maintenance via a second HAProxy
  config), and through HAProxy with both;
* kill -9 of server A under a Python keep-alive GET loop through HAProxy
  (4 connections, bounded): failed requests, how long after the kill the
  last one was sent, and when HAProxy's checks marked A down.

Every process is stopped by its own PID; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TWISTD = str(Path(sys.executable).parent / "twistd")
TOKEN = "bench-token"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:
        return 0, b""


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.items: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.tmp / f"{name}.log", "ab")
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.items.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.items:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def haproxy_cfg(port: int, stats: int, servers: list[tuple[int, int]], disabled: set[int]) -> str:
    lines = "\n".join(
        f"    server s{i} 127.0.0.1:{http} send-proxy-v2 check port {admin}" + (" disabled" if i in disabled else "")
        for i, (http, admin) in enumerate(servers))
    return f"""global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance leastconn
{lines}
listen stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
"""


def wrk(url: str, connections: int, duration: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url], capture_output=True, text=True,
                         timeout=duration + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  ({errors.group(1)} non-2xx answers)")
    return float(m.group(1)) if m else 0.0


def state(stats_port: int, name: str) -> str:
    _, body = get(f"http://127.0.0.1:{stats_port}/stats;csv")
    for row in csv.reader(io.StringIO(body.decode().lstrip("# "))):
        if len(row) > 17 and row[0] == "be" and row[1] == name:
            return row[17]
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if not shutil.which("haproxy") or not shutil.which("wrk"):
        raise SystemExit("needs haproxy and wrk (apt-get install haproxy wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-fleet-"))
    procs = Procs(tmp)
    try:
        backend_port = free_port()
        procs.start("backend", [sys.executable, str(HERE / "backend.py"), "--port", str(backend_port)])
        servers = []
        tunnels = []
        for i in range(2):
            tunnel, http_port, admin = free_port(), free_port(), free_port()
            (tmp / f"server{i}.toml").write_text(f"""[server]
tunnel_listen = "127.0.0.1:{tunnel}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = ""
admin_listen = "127.0.0.1:{admin}"
proxy_protocol = true
access_log = false
drain_delay = 1.5
[[groups]]
name = "default"
tokens = ["{TOKEN}"]
[[routes]]
name = "web"
backend = "http://127.0.0.1:{backend_port}"
""")
            servers.append(procs.start(f"server{i}", [TWISTD, "-n", "--pidfile=", "tunneld-server", "-c",
                                                       str(tmp / f"server{i}.toml")]))
            tunnels.append((tunnel, http_port, admin))
        listed = ", ".join(f'"127.0.0.1:{t}"' for t, _, _ in tunnels)
        (tmp / "client.toml").write_text(f'[client]\nserver = [{listed}]\ntoken = "{TOKEN}"\n')
        procs.start("client", [TWISTD, "-n", "--pidfile=", "tunneld-client", "-c", str(tmp / "client.toml")])
        for _, _, admin in tunnels:
            wait(lambda: get(f"http://127.0.0.1:{admin}/healthz")[0] == 200, 30, "servers healthy")
        wait(lambda: get(f"http://127.0.0.1:{backend_port}/small")[0] == 200, 10, "backend")

        figures: dict[str, float] = {}
        figures["direct"] = wrk(f"http://127.0.0.1:{backend_port}/small", args.connections, args.duration)
        pairs = [(h, a) for _, h, a in tunnels]
        for label, disabled in (("haproxy, 1 server", {1}), ("haproxy, 2 servers", set())):
            port, stats = free_port(), free_port()
            cfg = tmp / f"haproxy-{len(disabled)}.cfg"
            cfg.write_text(haproxy_cfg(port, stats, pairs, disabled))
            hap = procs.start(f"haproxy-{len(disabled)}", ["haproxy", "-db", "-f", str(cfg)])
            wait(lambda: state(stats, "s0") == "UP", 15, "haproxy sees s0 up")
            figures[label] = wrk(f"http://127.0.0.1:{port}/small", args.connections, args.duration)
            if disabled:
                os.kill(hap.pid, signal.SIGKILL)
                hap.wait(10)
        print(f"\nsmall GET req/s, wrk -t1 -c{args.connections} -d{args.duration}s, unpinned, nproc={os.cpu_count()}")
        for label, value in figures.items():
            print(f"  {label:22s} {value:10.0f}  ({value / figures['direct']:.2f} of direct)")

        # kill -9 of server A under a GET loop through HAProxy (the 2-server one still running).
        results: list[tuple[float, object]] = []
        lock = threading.Lock()
        stop = threading.Event()
        limit = time.monotonic() + 30

        def loop() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            while not stop.is_set() and time.monotonic() < limit:
                sent = time.monotonic()
                try:
                    conn.request("GET", "/small")
                    resp = conn.getresponse()
                    resp.read()
                    outcome: object = resp.status
                except Exception as e:
                    outcome = type(e).__name__
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                with lock:
                    results.append((sent, outcome))

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)   # bench only: let the loop run before the kill
        killed = time.monotonic()
        os.kill(servers[0].pid, signal.SIGKILL)
        servers[0].wait(10)
        wait(lambda: state(stats, "s0").startswith("DOWN"), 10, "haproxy marks s0 down")
        down_after = time.monotonic() - killed
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(10)
        failed = [(s - killed, o) for s, o in results if o != 200]
        print(f"\nkill -9 of server A under 4 keep-alive GET loops through HAProxy ({len(results)} requests):")
        print(f"  failed requests: {len(failed)}" + (f", last sent {max(f[0] for f in failed):+.3f} s from the kill"
                                                    if failed else ""))
        print(f"  HAProxy marked A down after {down_after:.2f} s (fall 2 x inter 0.5 s)")
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
