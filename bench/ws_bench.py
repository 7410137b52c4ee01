#!/usr/bin/env python3
"""tunneld WebSocket benchmark: the same echo backend measured direct and through the tunnel.

One run starts, on 127.0.0.1 only and with free ports chosen at start:

* an autobahn (Twisted) WebSocket echo server (this file, ``--_backend PORT``),
* ``twistd -n tunneld-server`` and ``twistd -n tunneld-client``, from temporary
  copies of ``etc/server.toml`` / ``etc/client.toml`` carrying those ports
  (``bench.write_configs``) with the client's ``max_concurrency`` raised to 2000,

then measures, direct to the backend and through the tunnel's HTTP/WebSocket entry:

1. echo round trips/s of 64-byte binary messages with 1 and 32 connections
   (each connection sends a message, waits for its echo, repeats, for
   ``--duration`` seconds after a short warm-up) and p50/p99 round-trip
   latency; the load generator is this file (``--_loadgen``): asyncio plus
   ``websockets.asyncio.client.connect``, compression and keep-alive pings off;
2. memory per idle WebSocket: 1,000 WebSockets opened concurrently in batches
   (each sends one message and waits for the echo), held idle, and the growth
   of VmRSS of the tunneld server and client (and of the backend, for scale)
   over the VmRSS just before opening, divided by 1,000; then every socket is
   closed and the RSS after the close is compared with that baseline. The
   tunnel is measured first (the backend's baseline is then untouched), the
   direct run (backend growth only) after it.

Every process -- backend, server, client and the load generator -- is pinned
to the same single CPU with ``taskset -c 1`` (``--cpu N``), as our other
comparisons are. Table on stdout (with ``nproc``, the CPU model and the load
average), JSON in ``bench/results/ws-latest.json``, the three processes' logs
as ``bench/results/ws-latest-*.log``. Every loop is bounded in time; every
process started here is stopped by its PID on exit, error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/ws_bench.py [--quick] [--duration 10] [--idle 1000] [--cpu 1]

Needs the dev venv (autobahn, websockets, tunneld) and taskset.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench as hb  # noqa: E402  (bench/bench.py: the HTTP benchmark's helpers)
from bench import BenchError, CpuWatch, Procs, fmt, proc_cpu_seconds, proc_status  # noqa: E402

ROOT = hb.ROOT
KIB, MIB = 1024, 1024 * 1024
MESSAGE_SIZE = 64
WARMUP_S = 0.5
AIM_RTPS_C32 = 3000.0       # team aim: round trips/s through the tunnel with 32 connections
AIM_KIB_PER_IDLE_WS = 16.0  # team aim: server + client RSS per idle WebSocket


def log(message: str) -> None:
    print(f"[ws-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- backend (--_backend PORT): autobahn echo server --------------------------------------


def run_backend(port: int) -> int:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor as _reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                                textFileLogObserver)

    reactor: Any = _reactor
    # Only warnings and errors (autobahn is chatty at debug level) go to the backend's log.
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer: Any = FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])  # type: ignore[arg-type]
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Echo
    factory.setProtocolOptions(webStatus=False)
    reactor.listenTCP(port, factory, backlog=1024, interface="127.0.0.1")
    print(f"ws echo backend on 127.0.0.1:{port}", flush=True)
    reactor.run()
    return 0


# --- load generator (--_loadgen JSON): asyncio + websockets --------------------------------

CONNECT_KW: dict[str, Any] = {"compression": None, "ping_interval": None, "proxy": None,
                              "open_timeout": 30, "close_timeout": 5}


def _pct(values: list[float], p: float) -> float | None:
    return values[min(len(values) - 1, int(len(values) * p))] if values else None


async def _echo_load(url: str, conns: int, duration: float, size: int) -> dict[str, Any]:
    """``conns`` connections, each: send, wait for the echo, repeat -- for ``duration`` s after a warm-up."""
    from websockets.asyncio.client import connect

    payload = os.urandom(size)
    t_open = time.monotonic()
    opened = await asyncio.gather(*(asyncio.wait_for(connect(url, **CONNECT_KW), 60) for _ in range(conns)),
                                  return_exceptions=True)
    sockets = [ws for ws in opened if not isinstance(ws, BaseException)]
    errors = [repr(e) for e in opened if isinstance(e, BaseException)]
    open_s = time.monotonic() - t_open
    latencies: list[float] = []
    counters = {"mismatches": 0}
    start = time.monotonic() + WARMUP_S
    deadline = start + duration

    async def worker(ws: Any) -> None:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            try:
                t0 = time.perf_counter()
                await ws.send(payload)
                reply = await asyncio.wait_for(ws.recv(), timeout=max(deadline - now, 0) + 10)
                t1 = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 -- counted and reported, the worker stops
                errors.append(repr(exc))
                return
            if reply != payload:
                counters["mismatches"] += 1
            if now >= start:  # round trips begun during the warm-up are not counted
                latencies.append((t1 - t0) * 1000)

    await asyncio.gather(*(worker(ws) for ws in sockets))
    elapsed = time.monotonic() - start
    await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True), 30)
    latencies.sort()
    return {"connections": conns, "connected": len(sockets), "open_s": round(open_s, 3),
            "round_trips": len(latencies), "elapsed_s": round(elapsed, 3),
            "rtps": len(latencies) / elapsed if elapsed > 0 else None,
            "p50_ms": _pct(latencies, 0.50), "p90_ms": _pct(latencies, 0.90), "p99_ms": _pct(latencies, 0.99),
            "max_ms": latencies[-1] if latencies else None, "mismatches": counters["mismatches"],
            "errors": len(errors), "error_samples": errors[:5]}


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


async def _wait_stdin_line(timeout: float) -> str | None:
    """The next line on stdin (the parent's command), or None after ``timeout`` s / EOF."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str | None] = loop.create_future()
    fd = sys.stdin.fileno()
    buf = bytearray()

    def readable() -> None:
        data = os.read(fd, 4096)
        if not data:
            if not fut.done():
                fut.set_result(None)
            return
        buf.extend(data)
        if b"\n" in buf and not fut.done():
            fut.set_result(buf.split(b"\n", 1)[0].decode())

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)


async def _idle_load(url: str, count: int, batch: int, size: int, hold_max: float) -> None:
    """Open ``count`` WebSockets (one echo each), report, hold them idle until told, check, close, report."""
    from websockets.asyncio.client import connect

    payload = os.urandom(size)
    errors: list[str] = []

    async def open_one() -> Any:
        ws = await asyncio.wait_for(connect(url, **CONNECT_KW), 60)
        try:
            await ws.send(payload)
            reply = await asyncio.wait_for(ws.recv(), 30)
        except BaseException:
            await asyncio.wait_for(ws.close(), 10)
            raise
        if reply != payload:
            await asyncio.wait_for(ws.close(), 10)
            raise RuntimeError("echo mismatch")
        return ws

    sockets: list[Any] = []
    t0 = time.monotonic()
    give_up = t0 + 300  # bounded: never more than 5 minutes opening
    for first in range(0, count, batch):
        if time.monotonic() > give_up:
            errors.append("gave up opening after 300 s")
            break
        got = await asyncio.gather(*(open_one() for _ in range(min(batch, count - first))), return_exceptions=True)
        for item in got:
            if isinstance(item, BaseException):
                errors.append(repr(item))
            else:
                sockets.append(item)
    _emit({"event": "opened", "requested": count, "opened": len(sockets), "failed": count - len(sockets),
           "open_s": round(time.monotonic() - t0, 3), "error_samples": errors[:5]})

    command = await _wait_stdin_line(hold_max)  # "check" / "close"; None = parent gone or timed out

    alive = None
    if command == "check":
        # Prove the held sockets are still open end to end: one more echo on each, in batches.
        async def still_open(ws: Any) -> bool:
            try:
                await ws.send(payload)
                return await asyncio.wait_for(ws.recv(), 30) == payload
            except Exception:  # noqa: BLE001
                return False
        alive = 0
        for first in range(0, len(sockets), batch):
            alive += sum(await asyncio.gather(*(still_open(ws) for ws in sockets[first:first + batch])))
        _emit({"event": "checked", "alive": alive, "held": len(sockets)})
        command = await _wait_stdin_line(hold_max)

    t1 = time.monotonic()
    close_errors = 0
    for first in range(0, len(sockets), batch):
        got = await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in sockets[first:first + batch]),
                                                    return_exceptions=True), 60)
        close_errors += sum(isinstance(g, BaseException) for g in got)
    codes: dict[str, int] = {}
    for ws in sockets:
        key = str(getattr(ws, "close_code", None))
        codes[key] = codes.get(key, 0) + 1
    _emit({"event": "closed", "closed": len(sockets), "close_s": round(time.monotonic() - t1, 3),
           "close_errors": close_errors, "close_codes": codes, "command": command})


def run_loadgen(spec: dict[str, Any]) -> int:
    if spec["mode"] == "echo":
        _emit(asyncio.run(_echo_load(spec["url"], spec["conns"], spec["duration"], spec["size"])))
    elif spec["mode"] == "idle":
        asyncio.run(_idle_load(spec["url"], spec["count"], spec["batch"], spec["size"], spec["hold_max"]))
    else:
        raise SystemExit(f"unknown load generator mode {spec['mode']!r}")
    return 0


# --- orchestration -------------------------------------------------------------------------


def loadgen_argv(pin: list[str], spec: dict[str, Any]) -> list[str]:
    return pin + [sys.executable, str(Path(__file__).resolve()), "--_loadgen", json.dumps(spec)]


def run_echo(pin: list[str], url: str, conns: int, duration: int) -> dict[str, Any]:
    spec = {"mode": "echo", "url": url, "conns": conns, "duration": duration, "size": MESSAGE_SIZE}
    log(f"echo load: {conns} connection(s), {duration} s, {MESSAGE_SIZE}-byte messages, {url}")
    out = subprocess.run(loadgen_argv(pin, spec), capture_output=True, text=True, timeout=duration + 180)
    if out.returncode != 0:
        raise BenchError(f"load generator failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if out.stderr.strip():
        result["stderr"] = out.stderr.strip()[-2000:]
    log(f"  {result['rtps']:.0f} round trips/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
        f"{result['errors']} error(s)" if result.get("rtps") else f"  no round trips: {result}")
    return result


def ws_echo_once(url: str, timeout: float = 5.0) -> None:
    from websockets.sync.client import connect

    payload = b"ready?"
    with connect(url, compression=None, proxy=None, open_timeout=timeout, close_timeout=2) as ws:
        ws.send(payload)
        if ws.recv(timeout=timeout) != payload:
            raise RuntimeError("echo mismatch")


def wait_ws_echo(url: str, what: str, procs: Procs, limit: float) -> float:
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < limit:
        procs.check_alive()
        try:
            ws_echo_once(url)
            return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 -- retried until the limit
            last = repr(exc)
        time.sleep(0.2)
    raise BenchError(f"{what}: {url} gave no WebSocket echo within {limit:.0f} s (last: {last})")


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sample(pids: dict[str, int]) -> dict[str, dict[str, int | None]]:
    return {name: {"rss": proc_status(pid).get("VmRSS"), "fds": fd_count(pid)} for name, pid in pids.items()}


def settled_sample(pids: dict[str, int], seconds: float) -> dict[str, dict[str, int | None]]:
    """Wait ``seconds``, then take 3 samples 0.5 s apart and keep the last (RSS moves little when idle)."""
    time.sleep(seconds)
    snaps = []
    for _ in range(3):
        snaps.append(sample(pids))
        time.sleep(0.5)
    snaps[-1]["_spread_rss"] = {name: (max(s[name]["rss"] or 0 for s in snaps) - min(s[name]["rss"] or 0 for s in snaps))
                                for name in pids}  # type: ignore[assignment]
    return snaps[-1]


class LineReader:
    """JSON lines from a child's stdout, with a timeout (the child must not hang the run)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        self.sel.register(proc.stdout, selectors.EVENT_READ)

    def next(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"load generator: no '{what}' report within {timeout:.0f} s")
            if self.sel.select(min(left, 1.0)):
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    raise BenchError(f"load generator exited (status {self.proc.wait(5)}) before '{what}'")
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def idle_cycle(pin: list[str], url: str, label: str, pids: dict[str, int], count: int, batch: int,
               tmp: Path, settle: float, before: dict[str, Any]) -> dict[str, Any]:
    """One cycle: open ``count`` WebSockets (one echo each), sample RSS, re-check them, close them, sample RSS."""
    spec = {"mode": "idle", "url": url, "count": count, "batch": batch, "size": MESSAGE_SIZE, "hold_max": 300}
    errpath = tmp / f"loadgen-idle-{label}.err"
    errlog = open(errpath, "ab")
    log(f"idle sockets ({label}): opening {count} WebSockets in batches of {batch}, {url}")
    proc = subprocess.Popen(loadgen_argv(pin, spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog)
    result: dict[str, Any] = {}
    try:
        reader = LineReader(proc)
        opened = reader.next(400, "opened")
        result["open"] = opened
        log(f"  {opened['opened']} open ({opened['failed']} failed) in {opened['open_s']:.1f} s")
        result["while_open"] = settled_sample(pids, settle)
        assert proc.stdin is not None
        proc.stdin.write(b"check\n")
        proc.stdin.flush()
        result["check"] = reader.next(120, "checked")
        log(f"  still open after the idle period (one more echo each): {result['check']['alive']}"
            f"/{result['check']['held']}")
        proc.stdin.write(b"close\n")
        proc.stdin.flush()
        result["close"] = reader.next(180, "closed")
        log(f"  closed {result['close']['closed']} in {result['close']['close_s']:.1f} s, "
            f"codes {result['close']['close_codes']}")
        proc.wait(timeout=30)
        result["loadgen_status"] = proc.returncode
        # Wait (bounded) until the measured processes have let go of the sockets.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            now = sample(pids)
            if all((now[n]["fds"] or 0) <= (before[n]["fds"] or 0) + 2 for n in pids):
                break
            time.sleep(0.5)
        result["fds_released_s"] = round(time.monotonic() - t0, 1)
        result["after_close"] = settled_sample(pids, settle)
    finally:
        if proc.poll() is None:
            log(f"stopping load generator pid {proc.pid}")
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        errlog.close()
    return result


def idle_step(pin: list[str], url: str, label: str, pids: dict[str, int], count: int, batch: int,
              tmp: Path, settle: float, cycles: int) -> dict[str, Any]:
    """Idle WebSockets through ``url``: RSS of ``pids`` before / while open / after close, per cycle.

    The figures per WebSocket come from the first cycle. A second cycle opens and closes the same number
    again: if RSS hardly grows in it, what the first close kept is memory the process reuses (the
    allocator keeps freed memory), not a leak. If it grows again, the closed sockets' objects may be
    reference cycles still waiting for CPython's full (generation 2) collection, which nothing here can
    force in the measured processes; a leak keeps growing over many cycles (``--cycles``).
    """
    before = settled_sample(pids, settle)
    result: dict[str, Any] = {"count": count, "batch": batch, "before": before, "cycles": []}
    for _ in range(cycles):
        result["cycles"].append(idle_cycle(pin, url, label, pids, count, batch, tmp, settle, before))
    first = result["cycles"][0]
    result.update({k: first[k] for k in ("open", "while_open", "check", "close", "after_close")})
    err_text = (tmp / f"loadgen-idle-{label}.err").read_text(errors="replace").strip()
    if err_text:
        result["loadgen_stderr"] = err_text[-2000:]
    n = max(first["open"]["opened"], 1)
    per: dict[str, Any] = {}
    for name in pids:
        b, o, a = before[name]["rss"], first["while_open"][name]["rss"], first["after_close"][name]["rss"]
        if None in (b, o, a):
            continue
        per[name] = {"rss_before": b, "rss_open": o, "rss_after_close": a,
                     "growth": o - b, "kib_per_ws": (o - b) / n / KIB, "retained_after_close": a - b,
                     "fds_before": before[name]["fds"], "fds_open": first["while_open"][name]["fds"],
                     "fds_after_close": first["after_close"][name]["fds"]}
        if len(result["cycles"]) > 1:
            last = result["cycles"][-1]
            o2, a2 = last["while_open"][name]["rss"], last["after_close"][name]["rss"]
            if o2 is not None and a2 is not None:
                per[name].update({"rss_open_last_cycle": o2, "rss_after_close_last_cycle": a2,
                                  "growth_last_cycle": o2 - a, "retained_after_last_close": a2 - b})
    result["per_process"] = per
    return result


def scan_levels(path: Path) -> dict[str, Any]:
    """Lines per log level of a twistd log, and the most frequent warn/error/critical messages."""
    levels: dict[str, int] = {}
    warnings: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for m in re.finditer(r"^\S+ \[[^\]#]*#(\w+)\] ?(.*)$", text, re.M):
        levels[m.group(1)] = levels.get(m.group(1), 0) + 1
        if m.group(1) in ("warn", "error", "critical"):
            key = re.sub(r"\d+", "N", m.group(2))[:160]
            warnings[key] = warnings.get(key, 0) + 1
    top = sorted(warnings.items(), key=lambda kv: -kv[1])[:4]
    return {"levels": levels, "top_warnings": top}


def build_rows(results: dict[str, Any], conn_levels: list[int], idle: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for conns in conn_levels:
        key = f"echo_c{conns}"
        d, t = results["direct"].get(key, {}), results["tunnel"].get(key, {})
        for metric, field, unit in (("round trips/s", "rtps", "rt/s"), ("p50 latency ms", "p50_ms", "ms"),
                                    ("p99 latency ms", "p99_ms", "ms")):
            rows.append({"metric": f"WS echo {MESSAGE_SIZE} B c={conns} {metric}", "unit": unit,
                         "direct": d.get(field), "tunnel": t.get(field)})
    ti = results["tunnel"].get("idle", {}).get("per_process", {})
    di = results["direct"].get("idle", {}).get("per_process", {})
    for name in ("server", "client"):
        rows.append({"metric": f"idle WS: tunneld {name} KiB per WS", "unit": "KiB", "direct": None,
                     "tunnel": ti.get(name, {}).get("kib_per_ws")})
    if "server" in ti and "client" in ti:
        rows.append({"metric": "idle WS: server + client KiB per WS", "unit": "KiB", "direct": None,
                     "tunnel": ti["server"]["kib_per_ws"] + ti["client"]["kib_per_ws"]})
    rows.append({"metric": "idle WS: backend KiB per WS (scale)", "unit": "KiB",
                 "direct": di.get("backend", {}).get("kib_per_ws"), "tunnel": ti.get("backend", {}).get("kib_per_ws")})
    rows.append({"metric": f"idle WS: seconds to open {idle} (batches)", "unit": "s",
                 "direct": results["direct"].get("idle", {}).get("open", {}).get("open_s"),
                 "tunnel": results["tunnel"].get("idle", {}).get("open", {}).get("open_s")})
    for name in ("server", "client"):
        p = ti.get(name)
        for metric, field in (("RSS before open MiB", "rss_before"), ("RSS with WS open MiB", "rss_open"),
                              ("RSS after close MiB", "rss_after_close"),
                              ("RSS open again (last cycle) MiB", "rss_open_last_cycle"),
                              ("RSS after last close MiB", "rss_after_close_last_cycle")):
            if p and field not in p:
                continue
            rows.append({"metric": f"tunneld {name} {metric}", "unit": "MiB", "direct": None,
                         "tunnel": p[field] / MIB if p else None})
    for name in ("server", "client"):
        rss = results["rss"].get(name, {})
        rows.append({"metric": f"tunneld {name} peak RSS (VmHWM) MiB", "unit": "MiB", "direct": None,
                     "tunnel": rss["VmHWM"] / MIB if "VmHWM" in rss else None})
    for row in rows:
        d, t = row["direct"], row["tunnel"]
        row["ratio"] = (t / d) if (d and t is not None) else None
    return rows


def render(meta: dict[str, Any], rows: list[dict[str, Any]], aims: list[str], notes: list[str]) -> str:
    lines = [
        "tunneld WebSocket benchmark — direct to the backend vs through the tunnel",
        f"  date      {meta['date']}   commit {meta['commit']}",
        f"  machine   nproc={meta['nproc']}  cpu: {meta['cpu_model']}",
        f"  load avg  before the run {' '.join(str(x) for x in meta['loadavg_before'])}, "
        f"after {' '.join(str(x) for x in meta.get('loadavg_after', []))}",
        f"  pinning   {meta['pinning']}",
        f"  load      {meta['load_generator']}",
        f"  backend   {meta['backend']}",
        f"  python    {meta['python']}",
        f"  settings  {meta['duration_s']} s per echo run (+{WARMUP_S} s warm-up), {meta['idle_sockets']} idle "
        f"sockets in batches of {meta['batch']} ({meta['cycles']} open/close cycles), client max_concurrency {meta['max_concurrency']}"
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
    lines += ["", "  ratio = tunnel / direct (latency: >1 is slower; round trips/s: <1 is slower);"
              " KiB/MiB = 1024/1024^2 bytes of VmRSS", "", "  aims:"]
    lines.extend(f"  - {a}" for a in aims)
    if notes:
        lines += ["", "  notes:"]
        lines.extend(f"  - {note}" for note in notes)
    return "\n".join(lines)


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE (inherited by every process we start) to at least ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log(f"raised the open-file soft limit from {soft} to {target}")
        if target < needed:
            log(f"warning: hard limit {hard} < {needed}: opening the idle sockets may fail")
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=None, help="seconds per echo run (default 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s echo runs")
    parser.add_argument("--connections", default="1,32", help="comma-separated echo connection counts (default 1,32)")
    parser.add_argument("--idle", type=int, default=1000, help="idle WebSockets for the memory step (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="idle sockets opened concurrently (default 50)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each RSS sample (default 2)")
    parser.add_argument("--cycles", type=int, default=2,
                        help="open/close cycles of the idle sockets (default 2: the 2nd tells reuse from a leak)")
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU every process is pinned to (default 1)")
    parser.add_argument("--output", default=str(HERE / "results" / "ws-latest.json"), help="JSON result file")
    parser.add_argument("--_backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._backend:
        return run_backend(args._backend)
    if args._loadgen:
        return run_loadgen(json.loads(args._loadgen))

    duration = args.duration if args.duration is not None else (3 if args.quick else 10)
    conn_levels = [int(c) for c in args.connections.split(",") if c.strip()]
    if duration < 1 or not conn_levels or min(conn_levels) < 1 or args.idle < 1 or args.batch < 1 or args.cycles < 1:
        parser.error("--duration, --connections, --idle and --batch must be positive")
    if not shutil.which("taskset"):
        raise BenchError("taskset is not installed")
    try:
        import autobahn  # noqa: F401
        import websockets
    except ImportError as exc:
        raise BenchError(f"{exc}: run with the dev venv (.venv/bin/python bench/ws_bench.py)") from None
    twistd = hb.find_twistd()
    max_concurrency = max(2000, 2 * args.idle)
    # The load generator, the server (entry side), the client (backend side) and the backend each hold one
    # socket per idle WebSocket; set before anything is spawned so every child inherits the limit.
    nofile = raise_nofile(args.idle * 2 + max(conn_levels) * 2 + 1024)

    cpu = hb.pin_cpu(args.cpu)
    pin = ["taskset", "-c", str(cpu)]
    import autobahn as _ab
    meta: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": hb.git_commit(),
        "nproc": os.cpu_count(),
        "cpu_model": hb.cpu_model(),
        "pinned_cpu": cpu,
        "pinning": f"backend, tunneld server, tunneld client and the load generator all pinned to CPU {cpu} "
                   f"(taskset -c {cpu})",
        "load_generator": f"asyncio + websockets {websockets.__version__} (websockets.asyncio.client.connect, "
                          f"compression off, pings off), one process",
        "backend": f"autobahn {_ab.__version__} WebSocketServerProtocol echo on Twisted (this file, --_backend)",
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "duration_s": duration,
        "connections": conn_levels,
        "idle_sockets": args.idle,
        "batch": args.batch,
        "cycles": args.cycles,
        "max_concurrency": max_concurrency,
        "nofile_limit": list(nofile),
        "quick": args.quick,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    log(f"load average before the run: {meta['loadavg_before']}")

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="tunneld-ws-bench-"))
    results: dict[str, Any] = {"direct": {}, "tunnel": {}, "rss": {}, "cpu_seconds": {}, "logs": {}}
    notes: list[str] = []
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend_port, tunnel_port, http_port = hb.free_ports(3)
        server_toml, client_toml = hb.write_configs(tmp, tunnel_port, http_port, backend_port)
        client_toml.write_text(hb.set_key(client_toml.read_text(), "max_concurrency", str(max_concurrency)))
        meta["ports"] = {"backend": backend_port, "tunnel": tunnel_port, "http_entry": http_port}

        env = dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")
        backend = procs.start("backend", pin + [sys.executable, str(Path(__file__).resolve()),
                                                "--_backend", str(backend_port)], tmp / "backend.log", env)
        direct = f"ws://127.0.0.1:{backend_port}/"
        wait_ws_echo(direct, "backend", procs, 30)
        server = procs.start("server", pin + [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(server_toml)],
                             tmp / "server.log", env)
        client = procs.start("client", pin + [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(client_toml)],
                             tmp / "client.log", env)
        tunnel = f"ws://127.0.0.1:{http_port}/"
        ready = wait_ws_echo(tunnel, "tunnel", procs, 60)
        log(f"tunnel echoes after {ready:.1f} s")
        meta["pids"] = {"backend": backend.pid, "server": server.pid, "client": client.pid}
        watch = CpuWatch(cpu, [backend.pid, server.pid, client.pid])

        for _ in range(20):  # warm both paths a little
            ws_echo_once(direct)
            ws_echo_once(tunnel)

        cpu_before = {name: proc_cpu_seconds(p.pid) for name, p in
                      (("backend", backend), ("server", server), ("client", client))}
        for conns in conn_levels:
            for label, url in (("direct", direct), ("tunnel", tunnel)):
                procs.check_alive()
                results[label][f"echo_c{conns}"] = watch.measure(run_echo, pin, url, conns, duration)

        # Idle sockets: tunnel first (the backend's baseline is then untouched), then direct.
        procs.check_alive()
        results["tunnel"]["idle"] = watch.measure(
            idle_step, pin, tunnel, "tunnel",
            {"server": server.pid, "client": client.pid, "backend": backend.pid}, args.idle, args.batch, tmp,
            args.settle, args.cycles)
        procs.check_alive()
        results["direct"]["idle"] = watch.measure(
            idle_step, pin, direct, "direct", {"backend": backend.pid}, args.idle, args.batch, tmp, args.settle,
            args.cycles)
        procs.check_alive()
        try:
            ws_echo_once(tunnel, timeout=10)
            results["tunnel_ok_after"] = True
        except Exception as exc:  # noqa: BLE001
            results["tunnel_ok_after"] = False
            notes.append(f"FAILED: after the run a WebSocket echo through the tunnel failed: {exc!r}")

        for name, proc in (("server", server), ("client", client), ("backend", backend)):
            results["rss"][name] = proc_status(proc.pid)
            after, before = proc_cpu_seconds(proc.pid), cpu_before.get(name)
            if after is not None and before is not None:
                results["cpu_seconds"][name] = round(after - before, 2)
    finally:
        procs.stop_all()
        meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        for name in ("backend", "server", "client"):
            src = tmp / f"{name}.log"
            if src.exists():
                dst = out_path.parent / f"ws-latest-{name}.log"
                shutil.copyfile(src, dst)
                results["logs"][name] = {"path": str(dst), **hb.scan_log(dst), **scan_levels(dst)}
        for err in tmp.glob("loadgen-idle-*.err"):
            if err.stat().st_size:
                dst = out_path.parent / f"ws-latest-{err.stem}.log"
                shutil.copyfile(err, dst)
                results["logs"][err.stem] = {"path": str(dst), **hb.scan_log(dst)}
        shutil.rmtree(tmp, ignore_errors=True)

    # Anything that looked wrong goes into the notes.
    for label in ("direct", "tunnel"):
        for key, value in results[label].items():
            if key.startswith("echo_"):
                if value.get("errors") or value.get("mismatches") or value.get("connected") != value.get("connections"):
                    notes.append(f"FAILED: {label} {key}: {value.get('connected')}/{value.get('connections')} "
                                 f"connected, {value.get('errors')} error(s), {value.get('mismatches')} echo "
                                 f"mismatch(es) {value.get('error_samples')}")
            elif key == "idle":
                o, c = value.get("open", {}), value.get("check", {})
                if o.get("failed"):
                    notes.append(f"FAILED: {label} idle: {o['failed']} of {o['requested']} WebSockets did not "
                                 f"open: {o.get('error_samples')}")
                if c and c.get("alive") != c.get("held"):
                    notes.append(f"FAILED: {label} idle: only {c.get('alive')}/{c.get('held')} held WebSockets "
                                 f"still echoed after the idle period")
                for cycle_no, cyc in enumerate(value.get("cycles", [])[1:], 2):
                    co, cc = cyc.get("open", {}), cyc.get("check", {})
                    if co.get("failed") or (cc and cc.get("alive") != cc.get("held")):
                        notes.append(f"FAILED: {label} idle cycle {cycle_no}: {co.get('opened')}/{co.get('requested')}"
                                     f" opened, {cc.get('alive')}/{cc.get('held')} still echoed {co.get('error_samples')}")
                for name, p in value.get("per_process", {}).items():
                    growth, kept = p["growth"], p["retained_after_close"]
                    back = kept <= max(MIB, 0.25 * max(growth, 0))
                    text = (f"{label} idle {name}: RSS {p['rss_before'] / MIB:.1f} MiB before -> "
                            f"{p['rss_open'] / MIB:.1f} with {o.get('opened')} open (+{growth / MIB:.1f} MiB) -> "
                            f"{p['rss_after_close'] / MIB:.1f} after close ({kept / MIB:+.1f} MiB vs before: "
                            f"{'back near baseline' if back else 'NOT back near baseline'}); fds {p['fds_before']} -> "
                            f"{p['fds_open']} -> {p['fds_after_close']}")
                    if "growth_last_cycle" in p:
                        g2 = p["growth_last_cycle"]
                        text += (f"; cycle {len(value['cycles'])}: open again {p['rss_open_last_cycle'] / MIB:.1f} MiB "
                                 f"({g2 / MIB:+.1f} MiB over the previous close), after close "
                                 f"{p['rss_after_close_last_cycle'] / MIB:.1f} MiB "
                                 f"({p['retained_after_last_close'] / MIB:+.1f} vs before) -> "
                                 + ("the kept memory is reused, not leaked" if g2 <= 0.25 * max(growth, MIB)
                                    else "grew again: the closed sockets' objects may still await CPython's "
                                         "full GC (reference cycles), or a leak; more cycles tell"))
                    notes.append(text)
    for name, info in results["logs"].items():
        if info.get("levels"):
            notes.append(f"{name} log: {info['lines']} lines, by level {info['levels']}"
                         + "".join(f"; {count} x {text!r}" for text, count in info.get("top_warnings", [])))
        if info.get("tracebacks") or info.get("unhandled"):
            notes.append(f"{name} log: {info['tracebacks']} traceback(s), {info['unhandled']} 'Unhandled' "
                         f"line(s) — see {info['path']}")
    busy_steps = []
    for label in ("direct", "tunnel"):
        for key, value in results[label].items():
            cpu_info = value.get("cpu") or {}
            # Only the echo runs: the idle steps are mostly sleeping, and the kernel's TCP work for opening and
            # closing 1,000 sockets (charged to no process) reads as foreign there. Their figures are in the JSON.
            if key.startswith("echo_") and cpu_info.get("wall_s", 0) >= 1 and cpu_info["foreign_pct"] + cpu_info["steal_pct"] >= 10:
                busy_steps.append(f"{label} {key} {cpu_info['foreign_pct']:.0f}%"
                                  + (f" (+{cpu_info['steal_pct']:.0f}% steal)" if cpu_info.get("steal_pct") else ""))
    if busy_steps:
        notes.append(f"CPU {cpu} was shared with work that is not ours (or hypervisor steal) during: "
                     + ", ".join(busy_steps) + " — those figures are skewed; rerun on an idle machine")
    if results["cpu_seconds"]:
        notes.append("CPU seconds used during the measurements: "
                     + ", ".join(f"{k} {v}" for k, v in results["cpu_seconds"].items()))
    notes.append("backend idle growth: the direct run follows the tunnel run, so the backend may reuse memory "
                 "freed after the tunnel run (its direct figure can read low)")

    rows = build_rows(results, conn_levels, args.idle)
    aims = []
    c32 = results["tunnel"].get("echo_c32", {}).get("rtps")
    aims.append(f"tunnel echo round trips/s with 32 connections >= {AIM_RTPS_C32:,.0f}: "
                + ("not measured" if c32 is None else f"{c32:,.0f} — {'MET' if c32 >= AIM_RTPS_C32 else 'NOT MET'}"))
    ti = results["tunnel"].get("idle", {}).get("per_process", {})
    if "server" in ti and "client" in ti:
        kib = ti["server"]["kib_per_ws"] + ti["client"]["kib_per_ws"]
        aims.append(f"server + client RSS per idle WebSocket <= {AIM_KIB_PER_IDLE_WS:g} KiB: {kib:.1f} KiB "
                    f"(server {ti['server']['kib_per_ws']:.1f} + client {ti['client']['kib_per_ws']:.1f}) — "
                    f"{'MET' if kib <= AIM_KIB_PER_IDLE_WS else 'NOT MET'}")
    else:
        aims.append(f"server + client RSS per idle WebSocket <= {AIM_KIB_PER_IDLE_WS:g} KiB: not measured")
    report = render(meta, rows, aims, notes)
    print(report, flush=True)
    out_path.write_text(json.dumps({"meta": meta, "rows": rows, "aims": aims, "results": results, "notes": notes,
                                    "table": report}, indent=2) + "\n")
    log(f"wrote {out_path}")
    return 1 if any(n.startswith("FAILED") for n in notes) else 0


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
