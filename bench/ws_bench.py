"""WebSocket steps of the benchmark (driven by ``compare.py``).

* the origin: an autobahn (Twisted) WebSocket echo server (role ``backend``,
  a pinned child; it echoes on any path),
* echo round trips/s of 64-byte binary messages with N connections (each
  connection sends a message, waits for its echo, repeats, for the step's
  duration after a 0.5 s warm-up) and p50/p99 round-trip latency; the load
  generator (role ``echo``) is asyncio plus ``websockets.asyncio.client.connect``
  with compression and keep-alive pings off,
* memory per idle WebSocket (role ``idle``, driven over its stdin/stdout):
  1,000 WebSockets opened 50 at a time, each proven open by one echo, held
  idle; the VmRSS growth of the measured processes over their VmRSS just
  before, divided by the sockets opened; then the sockets are re-checked (one
  more echo each), closed, and VmRSS / open fds compared with the baseline; a
  second open/close cycle tells memory a process keeps and reuses from a leak.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (KIB, BenchError, Procs, child_argv, child_main, latency_summary, log, pinned_env, poll,
                    run_child, terminate, tree_memory)

SCRIPT = Path(__file__).resolve()
MESSAGE_SIZE = 64
WARMUP_S = 0.5


# --- backend (role "backend"): autobahn echo server --------------------------------------


def _backend_role(spec: dict[str, Any]) -> None:
    port = spec["port"]
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


# --- load generators (roles "echo" and "idle"): asyncio + websockets --------------------------------

CONNECT_KW: dict[str, Any] = {"compression": None, "ping_interval": None, "proxy": None,
                              "open_timeout": 30, "close_timeout": 5}


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
    return {"connections": conns, "connected": len(sockets), "open_s": round(open_s, 3),
            "round_trips": len(latencies), "elapsed_s": round(elapsed, 3),
            "rtps": len(latencies) / elapsed if elapsed > 0 else None, **latency_summary(latencies),
            "mismatches": counters["mismatches"], "errors": len(errors), "error_samples": errors[:5]}


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


def _echo_role(spec: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_echo_load(spec["url"], spec["conns"], spec["duration"], spec["size"]))


def _idle_role(spec: dict[str, Any]) -> None:
    asyncio.run(_idle_load(spec["url"], spec["count"], spec["batch"], spec["size"], spec["hold_max"]))


# --- orchestration -------------------------------------------------------------------------


def backend_argv(pin: list[str], port: int) -> list[str]:
    return child_argv(pin, SCRIPT, "backend", {"port": port})


def run_echo(pin: list[str], url: str, conns: int, duration: int) -> dict[str, Any]:
    spec = {"url": url, "conns": conns, "duration": duration, "size": MESSAGE_SIZE}
    log(f"echo load: {conns} connection(s), {duration} s, {MESSAGE_SIZE}-byte messages, {url}")
    result = run_child(pin, SCRIPT, "echo", spec, duration + 180)
    if result.get("errors") or result.get("mismatches") or result.get("connected") != conns \
            or not result.get("round_trips"):
        raise BenchError(f"{result.get('connected')}/{conns} connected, {result.get('errors')} error(s), "
                         f"{result.get('mismatches')} echo mismatch(es) {result.get('error_samples')}")
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
    return poll(lambda: ws_echo_once(url), f"{what} (WebSocket echo at {url})", procs, limit)


def sample(pids: dict[str, list[int]]) -> dict[str, dict[str, int | None]]:
    """VmRSS and open fds per measured process (a process may be several, e.g. sshd's tree: summed)."""
    return {name: tree_memory(group) for name, group in pids.items()}


def settled_sample(pids: dict[str, list[int]], seconds: float) -> dict[str, dict[str, int | None]]:
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


def idle_cycle(pin: list[str], url: str, label: str, pids: dict[str, list[int]], count: int, batch: int,
               tmp: Path, settle: float, before: dict[str, Any]) -> dict[str, Any]:
    """One cycle: open ``count`` WebSockets (one echo each), sample RSS, re-check them, close them, sample RSS."""
    spec = {"url": url, "count": count, "batch": batch, "size": MESSAGE_SIZE, "hold_max": 300}
    errpath = tmp / f"loadgen-idle-{label}.err"
    errlog = open(errpath, "ab")
    log(f"idle sockets ({label}): opening {count} WebSockets in batches of {batch}, {url}")
    proc = subprocess.Popen(child_argv(pin, SCRIPT, "idle", spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errlog, env=pinned_env())
    result: dict[str, Any] = {}

    def command(text: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(text + b"\n")
        proc.stdin.flush()

    try:
        reader = LineReader(proc)
        opened = reader.next(400, "opened")
        result["open"] = opened
        log(f"  {opened['opened']} open ({opened['failed']} failed) in {opened['open_s']:.1f} s")
        result["while_open"] = settled_sample(pids, settle)
        command(b"check")
        result["check"] = reader.next(120, "checked")
        log(f"  still open after the idle period (one more echo each): {result['check']['alive']}"
            f"/{result['check']['held']}")
        command(b"close")
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
            terminate("idle load generator", proc, grace=10)
        errlog.close()
    return result


def idle_step(pin: list[str], url: str, label: str, pids: dict[str, list[int]], count: int, batch: int,
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


if __name__ == "__main__":
    sys.exit(child_main({"backend": _backend_role, "echo": _echo_role, "idle": _idle_role}))
