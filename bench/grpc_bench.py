"""gRPC steps of the benchmark (driven by ``compare.py``).

The peers are grpc-js (Node.js, ``bench/grpc_js/``) when ``node`` and ``npm``
are there -- the origin and load generator the issue's figures were measured
with, cheap enough per call and per message that they measure the path and
not themselves -- else grpcio's asyncio API in Python (``--grpc-peers``):

* the origin (``grpc_js/server.js``, or role ``backend`` here): a server of
  the generic service ``bench.Raw`` with raw-bytes methods ``Echo`` (unary,
  answers its request) and ``Count`` (server-streaming: N messages of S bytes),
* the load generator (``grpc_js/loadgen.js``, or role ``loadgen`` here), one
  channel:
  - unary ``Echo`` of 64-byte messages, N callers calling in a loop for
    the step's duration (after 20 warm-up calls): calls/s, p50/p99 latency,
  - server streaming: one ``Count`` call of 1 KiB messages read as fast as
    they come for the step's duration: messages/s.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BenchError, Procs, child_argv, child_main, latency_summary, log, poll, run_child

SCRIPT = Path(__file__).resolve()
JS_DIR = SCRIPT.parent / "grpc_js"
SERVICE = "bench.Raw"
UNARY_SIZE = 64
STREAM_SIZE = 1024


# --- the backend (role "backend") ------------------------------------------------------


def _backend_role(spec: dict[str, Any]) -> None:
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
        server.add_insecure_port(f"127.0.0.1:{spec['port']}")
        await server.start()
        print(f"grpc backend on 127.0.0.1:{spec['port']}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


class Peers:
    """Which gRPC origin and load generator this run uses: ``grpc-js`` or ``python``."""

    kind = "python"
    why = ""

    @classmethod
    def choose(cls, wanted: str) -> str:
        """``auto``: grpc-js when node and npm can install it (once, into bench/grpc_js), else Python."""
        if wanted == "python":
            cls.kind, cls.why = "python", "--grpc-peers python"
            return cls.kind
        problem = cls._install_js()
        if problem is None:
            cls.kind, cls.why = "grpc-js", ""
        elif wanted == "grpc-js":
            raise BenchError(f"--grpc-peers grpc-js: {problem}")
        else:
            cls.kind, cls.why = "python", problem
            log(f"gRPC peers: Python grpc.aio ({problem})")
        return cls.kind

    @staticmethod
    def _install_js() -> str | None:
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            return "node/npm not installed (apt-get install nodejs npm)"
        if not (JS_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
            log("gRPC peers: npm ci in bench/grpc_js (@grpc/grpc-js)")
            out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0:
                return f"npm ci failed: {(out.stderr or out.stdout).strip()[-300:]}"
        return None

    @classmethod
    def version(cls) -> str:
        if cls.kind == "grpc-js":
            meta = json.loads((JS_DIR / "node_modules" / "@grpc" / "grpc-js" / "package.json").read_text())
            node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
            return f"grpc-js {meta['version']} (Node.js {node}) both ends"
        import grpc
        return f"grpcio {grpc.__version__} grpc.aio (Python) both ends" + (f" ({cls.why})" if cls.why else "")


def backend_argv(pin: list[str], port: int) -> list[str]:
    if Peers.kind == "grpc-js":
        return pin + ["node", str(JS_DIR / "server.js"), str(port)]
    return child_argv(pin, SCRIPT, "backend", {"port": port})


# --- the load generator (role "loadgen") -------------------------------------------------


async def _unary_load(target: str, callers: int, duration: float, size: int) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
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
                latencies.append((time.perf_counter() - started) * 1e3)

        t0 = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall = time.monotonic() - t0
    return {"callers": callers, "calls": len(latencies), "wall_s": round(wall, 3),
            "calls_per_s": round(len(latencies) / wall, 1), **latency_summary(latencies), "errors": errors}


async def _stream_load(target: str, duration: float, size: int) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        count = channel.unary_stream(f"/{SERVICE}/Count")
        call = count(struct.pack("!QI", 10**12, size))
        received = 0
        errors: dict[str, int] = {}
        t0 = time.monotonic()
        stop_at = t0 + duration
        async for message in call:
            received += 1
            if len(message) != size:
                errors["wrong size"] = errors.get("wrong size", 0) + 1
            if received % 256 == 0 and time.monotonic() >= stop_at:
                break
        wall = time.monotonic() - t0
        call.cancel()
    return {"messages": received, "wall_s": round(wall, 3), "messages_per_s": round(received / wall, 1),
            "MB_per_s": round(received * size / wall / 1e6, 2), "errors": errors}


def _loadgen_role(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "unary":
        return asyncio.run(_unary_load(spec["target"], spec["callers"], spec["duration"], spec["size"]))
    return asyncio.run(_stream_load(spec["target"], spec["duration"], spec["size"]))


def _checked(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("errors"):
        raise BenchError(f"call errors: {result['errors']}")
    return result


def _load(pin: list[str], spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    if Peers.kind != "grpc-js":
        return _checked(run_child(pin, SCRIPT, "loadgen", spec, timeout))
    out = subprocess.run(pin + ["node", str(JS_DIR / "loadgen.js"), json.dumps(spec)], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise BenchError(f"grpc-js load generator exited {out.returncode}: {out.stderr.strip()[-400:]}")
    return _checked(json.loads(out.stdout.strip().splitlines()[-1]))


def run_unary(pin: list[str], target: str, callers: int, duration: int) -> dict[str, Any]:
    log(f"gRPC unary {UNARY_SIZE} B: {callers} caller(s), {duration} s, {target}")
    spec = {"kind": "unary", "target": target, "callers": callers, "duration": duration, "size": UNARY_SIZE}
    return _load(pin, spec, duration + 120)


def run_stream(pin: list[str], target: str, duration: int) -> dict[str, Any]:
    log(f"gRPC server streaming {STREAM_SIZE} B messages: {duration} s, {target}")
    spec = {"kind": "stream", "target": target, "duration": duration, "size": STREAM_SIZE}
    return _load(pin, spec, duration + 120)


def echo_once(target: str) -> None:
    import grpc

    with grpc.insecure_channel(target) as channel:
        if channel.unary_unary(f"/{SERVICE}/Echo")(b"ping", timeout=2) != b"ping":
            raise BenchError("wrong answer")


def wait_grpc(target: str, what: str, procs: Procs, limit: float) -> float:
    return poll(lambda: echo_once(target), f"{what} (gRPC Echo at {target})", procs, limit)


if __name__ == "__main__":
    sys.exit(child_main({"backend": _backend_role, "loadgen": _loadgen_role}))


# --- idle caller connections -------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"          # an empty SETTINGS frame
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def idle_connections(target: str, n: int, pid: int, settle: float = 1.0) -> dict[str, Any]:
    """RSS of the process ``pid`` (the gRPC entry's server) per idle HTTP/2 caller connection.

    ``n`` connections each send the HTTP/2 preface and SETTINGS (what a
    grpc channel does when it connects) and then nothing; the server's
    VmRSS growth over its value just before, divided by ``n``. Held for
    ``settle`` seconds, well inside the entry's header_timeout.
    """
    import socket
    from common import proc_status   # noqa: E402  (bench/ is on sys.path)

    host, _, port = target.rpartition(":")
    time.sleep(settle)
    before = proc_status(pid).get("VmRSS", 0)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(H2_PREFACE + H2_SETTINGS + H2_SETTINGS_ACK)
            socks.append(s)
        time.sleep(settle)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += s.recv(65536) != b""
            except BlockingIOError:
                alive += 1
        during = proc_status(pid).get("VmRSS", 0)
    finally:
        for s in socks:
            s.close()
    return {"connections": n, "alive": alive, "rss_before": before, "rss_open": during,
            "kib_per_connection": round((during - before) / 1024 / n, 2)}
