#!/usr/bin/env python3
"""CPU per request of the server's reactor thread for small GETs through the tunnel.

Wall-clock req/s on a shared machine is noisy; the CPU a thread spends per
request is not (much).  This starts ``backend.py``, ``twistd -n tunneld-server``
and ``twistd -n tunneld-client`` (one route to the backend, access log off,
admin port off unless ``--admin``), all pinned to one CPU, then for each
connection count runs ``wrk`` on ``/small`` and reads every server thread's
utime+stime from ``/proc/<pid>/task/<tid>/stat`` before and after:

    .venv/bin/python bench/entry_cpu.py [--conns 64,1] [--duration 8] [--runs 3] [--admin] [--path /small]
        [--tree base=/tmp/base]   # A/B: also run /tmp/base (git archive main | tar -x -C /tmp/base), alternating

``--profile FILE`` runs ``py-spy record --threads -f raw`` on the server
during the first measured run (the profile then costs CPU too: read its
shape, not its numbers).  Only the processes this script started are stopped,
by PID.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    import socket
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def thread_ticks(pid: int) -> dict[str, tuple[int, int]]:
    """(utime, stime) of every thread of ``pid``, keyed "tid:name" (the main thread first)."""
    out: dict[str, tuple[int, int]] = {}
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=lambda t: (int(t) != pid, int(t))):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[f"{tid}:{name}"] = (int(fields[11]), int(fields[12]))
    return out


def wrk(cpu: int, conns: int, duration: int, url: str) -> tuple[int, float, str]:
    res = subprocess.run(["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{conns}", f"-d{duration}s", url],
                         capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) requests in", res.stdout)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if not m or not rps:
        raise SystemExit(f"wrk output not understood:\n{res.stdout}\n{res.stderr}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout)
    errors = re.search(r"Socket errors: .*", res.stdout)
    note = (f" non2xx={non2xx.group(1)}" if non2xx else "") + (f" {errors.group(0)}" if errors else "")
    return int(m.group(1)), float(rps.group(1)), note


def start_setup(name: str, tree: Path, args: argparse.Namespace, procs: list[subprocess.Popen[bytes]]
                ) -> tuple[subprocess.Popen[bytes], str]:
    """backend + server + client running ``tree``'s tunneld; returns the server process and the URL."""
    tmp = Path(tempfile.mkdtemp(prefix=f"entry-cpu-{name}-"))
    tunnel, http_port, backend, admin = free_ports(4)
    (tmp / "server.toml").write_text(f"""\
[server]
tunnel_listen = "127.0.0.1:{tunnel}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = ""
admin_listen = "{f'127.0.0.1:{admin}' if args.admin else ''}"
access_log = {'true' if args.access_log else 'false'}
drain_timeout = 2

[[groups]]
name = "default"
tokens = ["bench-token"]

[[routes]]
name = "web"
group = "default"
backend = "http://127.0.0.1:{backend}"
""")
    (tmp / "client.toml").write_text(f"""\
[client]
server = "127.0.0.1:{tunnel}"
group = "default"
token = "bench-token"
client_id = "bench"
max_concurrency = 256
access_log = false
drain_timeout = 2
""")
    pin = ["taskset", "-c", str(args.cpu)]
    py = str(Path(sys.executable))
    twistd = str(Path(sys.executable).parent / "twistd")
    # PYTHONPATH first: ``tree``'s tunneld (and its plugins) win over the venv's editable install.
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONPATH": str(tree)}
    where = subprocess.run([py, "-c", "import tunneld; print(tunneld.__file__)"], env=env, cwd=tmp,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"{name}: tunneld comes from {where}, not {tree}")

    def start(role: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(pin + argv, cwd=tmp, env=env, stdout=open(tmp / f"{role}.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    start("backend", [py, str(HERE / "backend.py"), "--port", str(backend)])
    server = start("server", [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(tmp / "server.toml")])
    start("client", [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(tmp / "client.toml")])
    url = f"http://127.0.0.1:{http_port}{args.path}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: tunnel not up; logs in {tmp}")
        time.sleep(0.2)
    return server, url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", type=int, default=1)
    p.add_argument("--conns", default="64,1")
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--path", default="/small")
    p.add_argument("--admin", action="store_true", help="admin port on: metrics and the inspector record")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--profile", default="", help="py-spy raw output file for the first measured run")
    p.add_argument("--tree", action="append", default=[],
                   help="NAME=DIR: measure DIR's tunneld too (e.g. base=/tmp/base from git archive); "
                        "runs alternate between the trees so machine noise hits all alike")
    args = p.parse_args()

    trees = [("this", ROOT)] + [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        setups = [(name, *start_setup(name, tree, args, procs)) for name, tree in trees]
        for _, _, url in setups:
            wrk(args.cpu, 64, 2, url)   # warm-up
        results: dict[tuple[str, int], list[float]] = {}
        for run in range(args.runs):
            for conns in [int(c) for c in args.conns.split(",")]:
                for name, server, url in setups:
                    spy = None
                    if args.profile and run == 0:
                        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--threads",
                                                "-f", "raw", "-r", "200", "-o", f"{args.profile}.{name}.c{conns}",
                                                "-p", str(server.pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(1)
                    before = thread_ticks(server.pid)
                    n, rps, note = wrk(args.cpu, conns, args.duration, url)
                    after = thread_ticks(server.pid)
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait()
                    per = {k: (sum(after[k]) - sum(before.get(k, (0, 0)))) / TICK / n * 1e6 for k in after}
                    main_thread = next(iter(after))
                    main_us = per[main_thread]
                    main_user = (after[main_thread][0] - before[main_thread][0]) / TICK / n * 1e6
                    total = sum(per.values())
                    results.setdefault((name, conns), []).append(main_us)
                    others = " ".join(f"{k.split(':', 1)[1]}={v:.0f}" for k, v in list(per.items())[1:] if v >= 1)
                    print(f"run {run} {name:>5} c={conns:<3} {n:>7} req {rps:>8.0f} req/s  reactor {main_us:6.1f} "
                          f"us/req (user {main_user:5.1f})  process {total:6.1f} us/req  [{others}]{note}", flush=True)
        for (name, conns), values in results.items():
            print(f"{name:>5} c={conns}: reactor us/req median {statistics.median(values):.1f} "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
