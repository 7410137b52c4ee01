"""HTTP steps of the benchmark (driven by ``compare.py``; the origin is ``backend.py``).

* small GETs (``/small``): requests/s and p50/p99 latency with wrk
  (``wrk -t1 -cN -dDs --latency``); when wrk is missing, the asyncio keep-alive
  load generator below (role ``loadgen``, a pinned child),
* transfers: ``GET /bytes/N`` downloaded and ``PUT /upload`` uploaded with
  curl, MB/s (10^6 bytes/s); the upload's sha256 and byte count, as the
  backend computed them, are checked against the sent file.

Every load loop is bounded (wrk ``-d``, curl ``--max-time``, subprocess timeouts).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from common import MB, MIB, BenchError, child_main, latency_summary, log, pinned_env, run_child

SCRIPT = Path(__file__).resolve()
SMALL_BODY = b"ok\n"


def get(url: str, host: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_small(base: str, host: str | None = None) -> None:
    """Raise unless ``base/small`` answers 200 with the small body."""
    status, body = get(f"{base}/small", host)
    if status != 200 or body != SMALL_BODY:
        raise BenchError(f"GET {base}/small answered {status} {body[:80]!r}")


# --- small GETs: wrk ----------------------------------------------------------------------

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


def run_h2load(pin: list[str], url: str, streams: int, duration: int) -> dict[str, Any]:
    """Small GETs over HTTP/2 (h2c prior knowledge): h2load, one connection, ``streams`` concurrent streams."""
    import re
    import shutil

    if shutil.which("h2load") is None:
        raise BenchError("h2load not installed (apt-get install nghttp2-client)")
    argv = pin + ["h2load", "-c1", f"-m{streams}", "-D", str(duration), "--warm-up-time=1", url]
    log(" ".join(argv))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise BenchError(f"h2load failed ({out.returncode}): {out.stderr.strip()}")
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out.stdout)
    counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out.stdout)
    codes = re.search(r"status codes: (\d+) 2xx", out.stdout)
    if rate is None or counts is None:
        raise BenchError(f"h2load output not understood: {out.stdout[-500:]}")
    if int(counts.group(2)) or (codes is not None and int(codes.group(1)) != int(counts.group(1))):
        raise BenchError(f"h2load: failed or non-2xx requests: {out.stdout[-500:]}")
    return {"rps": float(rate.group(1)), "requests": int(counts.group(1)), "raw": out.stdout}


# --- small GETs: the Python fallback (role "loadgen") ------------------------------------------


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
    return {"rps": len(latencies) / elapsed, "requests": len(latencies), **latency_summary(latencies),
            "non_2xx_3xx": counters["non_2xx_3xx"], "socket_errors": {"errors": counters["errors"]}}


def _loadgen_role(spec: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_pyload(spec["host"], spec["port"], spec["path"], spec["conns"], spec["duration"]))


def run_pyload(pin: list[str], url: str, conns: int, duration: int) -> dict[str, Any]:
    m = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
    if not m:
        raise BenchError(f"python load generator: cannot parse {url}")
    log(f"python load generator: {conns} connection(s), {duration} s, {url}")
    spec = {"host": m.group(1), "port": int(m.group(2)), "path": m.group(3), "conns": conns, "duration": duration}
    return run_child(pin, SCRIPT, "loadgen", spec, duration + 60)


# --- transfers: curl --------------------------------------------------------------------------

CURL_FORMAT = ('{"http_code": %{http_code}, "size_download": %{size_download}, '
               '"size_upload": %{size_upload}, "speed_download": %{speed_download}, '
               '"speed_upload": %{speed_upload}, "time_total": %{time_total}, '
               '"time_starttransfer": %{time_starttransfer}}')


def run_curl(pin: list[str], args: list[str], max_time: int, host: str | None) -> dict[str, Any]:
    argv = pin + ["curl", "-sS", "--max-time", str(max_time), "-w", CURL_FORMAT] + (
        ["-H", f"Host: {host}"] if host else []) + args
    log(" ".join(argv))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=max_time + 30, env=pinned_env())
    if out.returncode != 0:
        raise BenchError(f"curl failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def download(pin: list[str], base: str, size: int, max_time: int, host: str | None = None) -> dict[str, Any]:
    result = run_curl(pin, ["-o", "/dev/null", f"{base}/bytes/{size}"], max_time, host)
    ok = result["http_code"] == 200 and int(result["size_download"]) == size
    if not ok:
        raise BenchError(f"download: HTTP {result['http_code']}, {result['size_download']} of {size} bytes")
    return {"mb_s": result["speed_download"] / MB, "seconds": result["time_total"], "curl": result}


def upload(pin: list[str], base: str, path: Path, size: int, sha256: str, max_time: int,
           host: str | None = None) -> dict[str, Any]:
    answer_path = path.with_suffix(".answer.json")
    answer_path.unlink(missing_ok=True)
    result = run_curl(pin, ["-T", str(path), "-o", str(answer_path), f"{base}/upload"], max_time, host)
    if result["http_code"] != 200:
        raise BenchError(f"upload: HTTP {result['http_code']}")
    try:
        answer = json.loads(answer_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BenchError(f"upload: the answer is not JSON: {exc}") from None
    if answer.get("bytes") != size or answer.get("sha256") != sha256:
        raise BenchError(f"upload: backend saw {answer.get('bytes')} bytes sha256 {answer.get('sha256')}, "
                         f"sent {size} {sha256}")
    return {"mb_s": result["speed_upload"] / MB, "seconds": result["time_total"], "sha256_ok": True,
            "answer": answer, "curl": result}


def median_of(runs: int, once: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a transfer ``runs`` times; the run with the median MB/s, with every run's MB/s in ``samples``.

    One 100 MiB transfer over loopback lasts about half a second, so a single
    one moves by 10-20 % with whatever else the core did meanwhile.
    """
    results = [once() for _ in range(max(1, runs))]
    ordered = sorted(results, key=lambda r: r["mb_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["samples"] = [round(r["mb_s"], 1) for r in results]
    return chosen


def make_upload_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, MIB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(child_main({"loadgen": _loadgen_role}))
