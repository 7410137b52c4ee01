#!/usr/bin/env python3
"""tunneld benchmark: the same backend measured direct and through the tunnel.

One run starts, on 127.0.0.1 only and with free ports chosen at start:

* the origin ``bench/backend.py`` (twisted.web),
* ``twistd -n tunneld-server`` and ``twistd -n tunneld-client``, from temporary
  copies of ``etc/server.toml`` / ``etc/client.toml`` carrying those ports,

then measures, direct to the backend and through the tunnel's HTTP entry:

1. small GET (``/small``) requests/s and p50/p99 latency at 1 and 64
   connections (wrk; an asyncio load generator in this file when wrk is missing),
2. a download (``/bytes/N``) and an upload (``PUT /upload``, the answered
   sha256 checked against the sent file) with curl, in MB/s (10^6 bytes/s),
3. the peak RSS (VmHWM) of the tunneld server and client after the run.

Every process (backend, server, client, and the load generator: wrk, curl or
the Python fallback) is pinned to the same single CPU with ``taskset -c 1``,
as our other comparisons are: the figures are one core doing all the work.

The table goes to stdout, the same data as JSON to ``bench/results/latest.json``
(plus the three processes' logs next to it). Every load loop is bounded in
time; every process started here is stopped by its PID on exit.

    python bench/bench.py [--duration 10] [--quick] [--cpu 1]

Stdlib only (plus wrk, curl and taskset on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1024 * 1024
MB = 1_000_000
SMALL_BODY = b"ok\n"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- machine ------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def free_ports(count: int) -> list[int]:
    """Bind ``count`` sockets to port 0 at once (so they differ), release them."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# --- processes ------------------------------------------------------------------


class Procs:
    """The long-running processes this run started; stopped by PID, newest first."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, argv: list[str], logfile: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(logfile, "wb")
        log(f"start {name}: {' '.join(argv)}")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(ROOT))
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
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log(f"{name} (pid {proc.pid}) ignored SIGTERM for 15 s: SIGKILL")
                    try:
                        os.kill(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            out.close()
        self.items.clear()


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of ``pid`` in bytes (empty when unreadable)."""
    result: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                result[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return result


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(busy, steal) clock ticks of one CPU from /proc/stat (busy excludes idle, iowait, steal)."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                # user nice system idle iowait irq softirq steal
                return v[0] + v[1] + v[2] + v[5] + v[6], v[7] if len(v) > 7 else 0
    except (OSError, ValueError):
        pass
    return 0, 0


class CpuWatch:
    """How much of the pinned CPU went to work that is not ours while a step ran.

    ``foreign`` = CPU busy time minus the CPU time of our processes (the long-running
    ones by /proc, the load generators as reaped children), over wall time; it also
    holds kernel work not charged to any process (loopback softirq), so a few per
    cent is normal. ``steal`` is time the hypervisor took from the CPU.
    """

    def __init__(self, cpu: int, pids: list[int]) -> None:
        self.cpu, self.pids = cpu, pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def _snap(self) -> tuple[float, int, int, float]:
        busy, steal = cpu_ticks(self.cpu)
        ours = sum(proc_cpu_seconds(pid) or 0.0 for pid in self.pids)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.monotonic(), busy, steal, ours + ru.ru_utime + ru.ru_stime

    def measure(self, step: Any, *args: Any) -> dict[str, Any]:
        t0, busy0, steal0, ours0 = self._snap()
        result = step(*args)
        t1, busy1, steal1, ours1 = self._snap()
        wall = max(t1 - t0, 1e-6)
        result["cpu"] = {
            "wall_s": round(wall, 3),
            "ours_pct": round(100 * (ours1 - ours0) / wall, 1),
            "foreign_pct": round(100 * max(0.0, (busy1 - busy0) / self.hz - (ours1 - ours0)) / wall, 1),
            "steal_pct": round(100 * (steal1 - steal0) / self.hz / wall, 1),
        }
        return result


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_200(url: str, what: str, procs: Procs, limit: float) -> float:
    """Poll ``url`` until it answers 200 with the small body, at most ``limit`` seconds."""
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < limit:
        procs.check_alive()
        try:
            status, body = http_get(url)
            if status == 200 and body == SMALL_BODY:
                return time.monotonic() - start
            last = f"HTTP {status} {body[:80]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise BenchError(f"{what}: {url} did not answer 200 within {limit:.0f} s (last: {last})")


# --- configs ------------------------------------------------------------------


def set_key(text: str, key: str, value: str, count: int = 1) -> str:
    """Replace the (uncommented) ``key = ...`` line(s) of a TOML text."""
    pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*)[^\n#]*?(\s*(#.*)?)$", re.M)
    new, n = pattern.subn(lambda m: m.group(1) + value + (m.group(2) or ""), text, count=count)
    if n != count:
        raise BenchError(f"config template: expected {count} '{key} =' line(s), found {n}")
    return new


def write_configs(tmp: Path, tunnel_port: int, http_port: int, backend_port: int) -> tuple[Path, Path]:
    """Temp copies of etc/server.toml and etc/client.toml on this run's ports."""
    server_text = (ROOT / "etc" / "server.toml").read_text()
    server_text = set_key(server_text, "tunnel_listen", f'"127.0.0.1:{tunnel_port}"')
    server_text = set_key(server_text, "http_listen", f'"127.0.0.1:{http_port}"')
    server_text = set_key(server_text, "grpc_listen", '""')  # "" disables (tunneld/config.py)
    server_text = set_key(server_text, "admin_listen", '""')  # "" disables
    server_text = set_key(server_text, "drain_timeout", "2")  # quick, clean shutdown after the run
    server_text = set_key(server_text, "backend", f'"http://127.0.0.1:{backend_port}"')
    client_text = (ROOT / "etc" / "client.toml").read_text()
    client_text = set_key(client_text, "server", f'"127.0.0.1:{tunnel_port}"')
    client_text = set_key(client_text, "client_id", '"bench"')
    client_text = set_key(client_text, "drain_timeout", "2")

    server = tomllib.loads(server_text)
    http_routes = [r for r in server.get("routes", []) if not r.get("grpc_service")]
    checks = [
        server["server"]["tunnel_listen"] == f"127.0.0.1:{tunnel_port}",
        server["server"]["http_listen"] == f"127.0.0.1:{http_port}",
        len(http_routes) == 1,
        http_routes and http_routes[0]["backend"] == f"http://127.0.0.1:{backend_port}",
        http_routes and http_routes[0].get("path_prefix", "/") == "/",
        http_routes and not http_routes[0].get("host"),
        tomllib.loads(client_text)["client"]["server"] == f"127.0.0.1:{tunnel_port}",
    ]
    if not all(checks):
        raise BenchError("etc/server.toml or etc/client.toml changed shape: cannot derive bench configs")
    server_path, client_path = tmp / "server.toml", tmp / "client.toml"
    server_path.write_text(server_text)
    client_path.write_text(client_text)
    return server_path, client_path


# --- load generators --------------------------------------------------------------

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    result: dict[str, Any] = {"non_2xx_3xx": 0, "socket_errors": None}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not m:
        raise BenchError(f"wrk output without Requests/sec:\n{text}")
    result["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", text)
    if m:
        result["requests"] = int(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", text, re.M)
        result[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        result["non_2xx_3xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        result["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    return result


def run_wrk(pin: list[str], url: str, conns: int, duration: int) -> dict[str, Any]:
    argv = pin + ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", url]
    log(" ".join(argv))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    result = parse_wrk(out.stdout)
    result["raw"] = out.stdout
    return result


async def _pyload(host: str, port: int, path: str, conns: int, duration: float) -> dict[str, Any]:
    """Keep-alive GET loop on ``conns`` connections for ``duration`` seconds."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    counters = {"non_2xx_3xx": 0, "errors": 0}
    deadline = time.monotonic() + duration

    async def read_response(reader: asyncio.StreamReader) -> int:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    async def worker() -> None:
        reader = writer = None
        while time.monotonic() < deadline:
            try:
                if reader is None or writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                start = time.perf_counter()
                writer.write(request)
                remaining = deadline - time.monotonic() + 5
                status = await asyncio.wait_for(read_response(reader), timeout=max(remaining, 0.1))
                latencies.append((time.perf_counter() - start) * 1000)
                if not 200 <= status < 400:
                    counters["non_2xx_3xx"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
                counters["errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] if latencies else None

    return {"rps": len(latencies) / elapsed, "requests": len(latencies), "p50_ms": pct(0.50),
            "p90_ms": pct(0.90), "p99_ms": pct(0.99), "non_2xx_3xx": counters["non_2xx_3xx"],
            "socket_errors": {"errors": counters["errors"]}}


def run_pyload(pin: list[str], url: str, conns: int, duration: int) -> dict[str, Any]:
    m = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    argv = pin + [sys.executable, str(Path(__file__).resolve()), "--_loadgen",
                  json.dumps([m.group(1), int(m.group(2)), m.group(3), conns, duration])]
    log(f"python load generator: {conns} connection(s), {duration} s, {url}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise BenchError(f"python load generator failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


# --- transfers ------------------------------------------------------------------

CURL_FORMAT = ('{"http_code": %{http_code}, "size_download": %{size_download}, '
               '"size_upload": %{size_upload}, "speed_download": %{speed_download}, '
               '"speed_upload": %{speed_upload}, "time_total": %{time_total}, '
               '"time_starttransfer": %{time_starttransfer}}')


def run_curl(pin: list[str], args: list[str], max_time: int) -> dict[str, Any]:
    argv = pin + ["curl", "-sS", "--max-time", str(max_time), "-w", CURL_FORMAT] + args
    log(" ".join(argv))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=max_time + 30)
    if out.returncode != 0:
        raise BenchError(f"curl failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def download(pin: list[str], base: str, size: int, max_time: int) -> dict[str, Any]:
    result = run_curl(pin, ["-o", "/dev/null", f"{base}/bytes/{size}"], max_time)
    ok = result["http_code"] == 200 and int(result["size_download"]) == size
    return {"mb_s": result["speed_download"] / MB, "seconds": result["time_total"], "ok": ok,
            "error": None if ok else f"HTTP {result['http_code']}, {result['size_download']} of {size} bytes",
            "curl": result}


def upload(pin: list[str], base: str, path: Path, size: int, sha256: str, tmp: Path, max_time: int) -> dict[str, Any]:
    answer_path = tmp / "upload-answer.json"
    result = run_curl(pin, ["-T", str(path), "-o", str(answer_path), f"{base}/upload"], max_time)
    error = None
    try:
        answer = json.loads(answer_path.read_bytes())
    except (OSError, ValueError) as exc:
        answer = None
        error = f"answer is not JSON: {exc}"
    if result["http_code"] != 200:
        error = f"HTTP {result['http_code']}"
    elif answer is not None and (answer.get("bytes") != size or answer.get("sha256") != sha256):
        error = f"backend saw {answer.get('bytes')} bytes sha256 {answer.get('sha256')}, sent {size} {sha256}"
    return {"mb_s": result["speed_upload"] / MB, "seconds": result["time_total"], "ok": error is None,
            "error": error, "sha256_ok": error is None, "answer": answer, "curl": result}


def make_upload_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, MIB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# --- report ------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return text + unit


def build_rows(results: dict[str, Any], conn_levels: list[int], transfer_mib: int) -> list[dict[str, Any]]:
    rows = []
    for conns in conn_levels:
        key = f"small_get_c{conns}"
        d, t = results["direct"][key], results["tunnel"][key]
        for metric, field, unit in (("req/s", "rps", ""), ("p50 latency", "p50_ms", " ms"),
                                    ("p99 latency", "p99_ms", " ms")):
            rows.append({"metric": f"GET /small c={conns} {metric}", "unit": unit.strip() or "req/s",
                         "direct": d.get(field), "tunnel": t.get(field)})
    for key, label in (("download", f"{transfer_mib} MiB download"), ("upload", f"{transfer_mib} MiB upload")):
        rows.append({"metric": f"{label} MB/s", "unit": "MB/s",
                     "direct": results["direct"][key]["mb_s"], "tunnel": results["tunnel"][key]["mb_s"]})
    for name in ("server", "client"):
        rss = results["rss"].get(name, {})
        rows.append({"metric": f"tunneld {name} peak RSS (VmHWM) MiB", "unit": "MiB", "direct": None,
                     "tunnel": rss["VmHWM"] / MIB if "VmHWM" in rss else None})
    for row in rows:
        d, t = row["direct"], row["tunnel"]
        row["ratio"] = (t / d) if (d and t is not None) else None
    return rows


def render(meta: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    lines = [
        "tunneld benchmark — direct to the backend vs through the tunnel",
        f"  date      {meta['date']}   commit {meta['commit']}",
        f"  machine   nproc={meta['nproc']}  cpu: {meta['cpu_model']}  "
        f"(load average before the run: {' '.join(str(x) for x in meta['loadavg_before'])})",
        f"  pinning   {meta['pinning']}",
        f"  load      {meta['load_generator']}; transfers: {meta['curl']}",
        f"  python    {meta['python']}",
        f"  settings  duration {meta['duration_s']} s per load run, transfers {meta['transfer_mib']} MiB"
        + ("  (--quick)" if meta["quick"] else ""),
        "",
    ]
    header = ("metric", "direct", "tunnel", "ratio")
    table = [header] + [
        (r["metric"], fmt(r["direct"]), fmt(r["tunnel"]), f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for index, row in enumerate(table):
        lines.append("  " + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                      for i, cell in enumerate(row)))
        if index == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append("  ratio = tunnel / direct (latency: >1 is slower; req/s and MB/s: <1 is slower);"
                 " MB/s = 10^6 bytes/s")
    if notes:
        lines.append("")
        lines.append("  notes:")
        lines.extend(f"  - {note}" for note in notes)
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------


def pin_cpu(requested: int) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    if requested in allowed:
        return requested
    log(f"CPU {requested} is not available (allowed: {allowed}); pinning to CPU {allowed[-1]}")
    return allowed[-1]


def find_twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("twistd")
    if not found:
        raise BenchError("twistd not found (activate the dev venv: .venv/bin/python bench/bench.py)")
    return found


def scan_log(path: Path) -> dict[str, int]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "unhandled": len(re.findall(r"Unhandled", text)),
        "error_lines": len(re.findall(r"(?im)^.*\b(error|critical)\b", text)),
        "lines": text.count("\n"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s load runs, 20 MiB transfers")
    parser.add_argument("--transfer-mib", type=int, default=None, help="download/upload size (default 100; 20 with --quick)")
    parser.add_argument("--connections", default="1,64", help="comma-separated wrk connection counts (default 1,64)")
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU every process is pinned to (default 1)")
    parser.add_argument("--no-wrk", action="store_true", help="use the built-in Python load generator")
    parser.add_argument("--backend", default=str(HERE / "backend.py"), help="origin script (default bench/backend.py)")
    parser.add_argument("--output", default=str(HERE / "results" / "latest.json"), help="JSON result file")
    parser.add_argument("--_loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._loadgen:
        host, port, path, conns, duration = json.loads(args._loadgen)
        print(json.dumps(asyncio.run(_pyload(host, port, path, conns, duration))))
        return 0

    duration = args.duration if args.duration is not None else (3 if args.quick else 10)
    transfer_mib = args.transfer_mib if args.transfer_mib is not None else (20 if args.quick else 100)
    transfer = transfer_mib * MIB
    conn_levels = [int(c) for c in args.connections.split(",") if c.strip()]
    if duration < 1 or transfer_mib < 1 or not conn_levels:
        parser.error("--duration, --transfer-mib and --connections must be positive")
    max_time = max(120, transfer_mib * 3)  # curl --max-time: generous, but bounded

    for tool in ("curl", "taskset"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed")
    use_wrk = bool(shutil.which("wrk")) and not args.no_wrk
    backend_script = Path(args.backend).resolve()
    if not backend_script.exists():
        raise BenchError(f"{backend_script} is missing")
    twistd = find_twistd()

    cpu = pin_cpu(args.cpu)
    pin = ["taskset", "-c", str(cpu)]
    pin_text = (f"backend, tunneld server, tunneld client and the load generator all pinned to CPU {cpu} "
                f"(taskset -c {cpu}), as our other comparisons are")
    loadgen = run_wrk if use_wrk else run_pyload
    loadgen_text = (tool_version(["wrk", "--version"]).split(" Copyright")[0] + " -t1 --latency"
                    if use_wrk else "built-in Python asyncio keep-alive load generator (wrk not used)")
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "pinned_cpu": cpu,
        "pinning": pin_text,
        "load_generator": loadgen_text,
        "curl": tool_version(["curl", "--version"]).split(" (")[0],
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "duration_s": duration,
        "transfer_mib": transfer_mib,
        "connections": conn_levels,
        "quick": args.quick,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-bench-"))
    results: dict[str, Any] = {"direct": {}, "tunnel": {}, "rss": {}, "cpu_seconds": {}, "logs": {}}
    notes: list[str] = []
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend_port, tunnel_port, http_port = free_ports(3)
        server_toml, client_toml = write_configs(tmp, tunnel_port, http_port, backend_port)
        meta["ports"] = {"backend": backend_port, "tunnel": tunnel_port, "http_entry": http_port}

        env = dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")
        backend = procs.start("backend", pin + [sys.executable, str(backend_script), "--port", str(backend_port)],
                              tmp / "backend.log", env)
        direct = f"http://127.0.0.1:{backend_port}"
        wait_http_200(f"{direct}/small", "backend", procs, 30)
        server = procs.start("server", pin + [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(server_toml)],
                             tmp / "server.log", env)
        client = procs.start("client", pin + [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(client_toml)],
                             tmp / "client.log", env)
        tunnel = f"http://127.0.0.1:{http_port}"
        ready = wait_http_200(f"{tunnel}/small", "tunnel", procs, 60)
        log(f"tunnel answers 200 after {ready:.1f} s")
        meta["pids"] = {"backend": backend.pid, "server": server.pid, "client": client.pid}
        watch = CpuWatch(cpu, [backend.pid, server.pid, client.pid])

        log(f"writing the {transfer_mib} MiB upload file")
        upload_path = tmp / "upload.bin"
        upload_sha = make_upload_file(upload_path, transfer)

        # Warm both paths a little (connection pools, code paths) before measuring.
        for base in (direct, tunnel):
            for _ in range(20):
                http_get(f"{base}/small", timeout=10)

        cpu_before = {name: proc_cpu_seconds(p.pid) for name, p in
                      (("backend", backend), ("server", server), ("client", client))}
        for conns in conn_levels:
            for label, base in (("direct", direct), ("tunnel", tunnel)):
                procs.check_alive()
                results[label][f"small_get_c{conns}"] = watch.measure(loadgen, pin, f"{base}/small", conns, duration)
        for label, base in (("direct", direct), ("tunnel", tunnel)):
            procs.check_alive()
            results[label]["download"] = watch.measure(download, pin, base, transfer, max_time)
        for label, base in (("direct", direct), ("tunnel", tunnel)):
            procs.check_alive()
            results[label]["upload"] = watch.measure(upload, pin, base, upload_path, transfer, upload_sha, tmp,
                                                     max_time)
        procs.check_alive()
        # The tunnel must still answer after the load.
        status, body = http_get(f"{tunnel}/small", timeout=10)
        if status != 200 or body != SMALL_BODY:
            notes.append(f"after the run GET /small through the tunnel answered {status} {body[:60]!r}")

        for name, proc in (("server", server), ("client", client), ("backend", backend)):
            results["rss"][name] = proc_status(proc.pid)
            after, before = proc_cpu_seconds(proc.pid), cpu_before.get(name)
            if after is not None and before is not None:
                results["cpu_seconds"][name] = round(after - before, 2)
    finally:
        procs.stop_all()
        for name in ("backend", "server", "client"):
            src = tmp / f"{name}.log"
            if src.exists():
                dst = out_path.parent / f"latest-{name}.log"
                shutil.copyfile(src, dst)
                results["logs"][name] = {"path": str(dst), **scan_log(dst)}
        shutil.rmtree(tmp, ignore_errors=True)

    # Anything that looked wrong goes into the notes.
    for label in ("direct", "tunnel"):
        for key, value in results[label].items():
            if key.startswith("small_get"):
                if value.get("non_2xx_3xx"):
                    notes.append(f"{label} {key}: {value['non_2xx_3xx']} non-2xx/3xx responses")
                errors = value.get("socket_errors") or {}
                if any(errors.values()):
                    notes.append(f"{label} {key}: socket errors {errors}")
            elif not value.get("ok", True):
                notes.append(f"{label} {key} FAILED: {value.get('error')}")
            elif key == "upload":
                notes.append(f"{label} upload: sha256 and byte count confirmed by the backend")
    for name, info in results["logs"].items():
        if info.get("tracebacks") or info.get("unhandled"):
            notes.append(f"{name} log: {info['tracebacks']} traceback(s), {info['unhandled']} 'Unhandled' "
                         f"line(s) — see {info['path']}")
    busy_steps = []
    for label in ("direct", "tunnel"):
        for key, value in results[label].items():
            cpu_info = value.get("cpu") or {}
            # /proc/stat counts in 10 ms ticks: only steps of a second or more say anything.
            if cpu_info.get("wall_s", 0) >= 1 and cpu_info["foreign_pct"] + cpu_info["steal_pct"] >= 10:
                busy_steps.append(f"{label} {key} {cpu_info['foreign_pct']:.0f}%"
                                  + (f" (+{cpu_info['steal_pct']:.0f}% steal)" if cpu_info.get("steal_pct") else ""))
    if busy_steps:
        notes.append(f"CPU {cpu} was shared with work that is not ours (or hypervisor steal) during: "
                     + ", ".join(busy_steps) + " — those figures are skewed; rerun on an idle machine")
    if results["cpu_seconds"]:
        notes.append("CPU seconds used during the measurements: "
                     + ", ".join(f"{k} {v}" for k, v in results["cpu_seconds"].items()))

    rows = build_rows(results, conn_levels, transfer_mib)
    report = render(meta, rows, notes)
    print(report, flush=True)
    out_path.write_text(json.dumps({"meta": meta, "rows": rows, "results": results, "notes": notes,
                                    "table": report}, indent=2) + "\n")
    log(f"wrote {out_path}")
    failed = [n for n in notes if "FAILED" in n]
    return 1 if failed else 0


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, _on_signal)
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(2)
