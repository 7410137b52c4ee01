"""Helpers shared by the benchmark driver (``compare.py``) and its modules.

Machine facts for the header (CPU model, git commit, load average), free
ports, CPU pinning, the processes a run starts (stopped by PID), /proc
readings (RSS, CPU seconds, process trees), the CPU-noise accounting, pinned
child processes that answer one JSON line, log scanning and the table
renderer.  Stdlib only: the load-generator and backend children import it too.
"""

from __future__ import annotations

import datetime as _dt
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
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- machine ----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(argv: list[str]) -> str:
    """First line of a tool's version output (stdout, else stderr)."""
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
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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


def pin_cpu(requested: int) -> int:
    """``requested`` if this process may run there, else the last CPU it may use."""
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
        raise BenchError("twistd not found (run with the dev venv: make bench, or .venv/bin/python bench/compare.py)")
    return found


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


# --- /proc --------------------------------------------------------------------------


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


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid``: its own (utime + stime) and those of its children it reaped."""
    fields = _stat_fields(pid)
    try:
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK") if fields else None
    except (ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def tree_memory(pids: list[int]) -> dict[str, int | None]:
    """Summed VmRSS / VmHWM and open fds of ``pids`` (one logical process that may be several)."""
    status = [proc_status(pid) for pid in pids]
    fds = [fd_count(pid) for pid in pids]
    return {"rss": sum(s.get("VmRSS", 0) for s in status) if status else None,
            "hwm": sum(s.get("VmHWM", 0) for s in status) if status else None,
            "fds": sum(f or 0 for f in fds) if fds else None}


# --- processes ------------------------------------------------------------------------


class Procs:
    """The long-running processes this run started, each with its log; stopped by PID, newest first.

    A process's descendants (sshd's per-connection children) are collected before it is
    stopped and stopped too when they outlive it.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[tuple[str, subprocess.Popen[bytes], Any]] = []
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        path = self.logdir / f"{name}.log"
        out = open(path, "ab")
        log(f"start {name}: {' '.join(argv)}")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(ROOT))
        self.items.append((name, proc, out))
        self.logs[name] = path
        return proc

    def pid(self, name: str) -> int:
        return next(proc.pid for n, proc, _ in self.items if n == name)

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.items)

    def check_alive(self) -> None:
        for name, proc, _ in self.items:
            if proc.poll() is not None:
                raise BenchError(f"{name} (pid {proc.pid}) exited early with status {proc.returncode}"
                                 f" — see its log: {log_tail(self.logs[name])}")

    @staticmethod
    def _stop(name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        below = descendants(proc.pid)
        terminate(name, proc)
        deadline = time.monotonic() + 5
        for pid in below:
            if Path(f"/proc/{pid}").exists():
                _kill(pid, signal.SIGTERM)
        while any(Path(f"/proc/{pid}").exists() for pid in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in below:
            if Path(f"/proc/{pid}").exists():
                _kill(pid, signal.SIGKILL)

    def stop(self, name: str) -> None:
        for item in [i for i in self.items if i[0] == name]:
            self._stop(item[0], item[1])
            item[2].close()
            self.items.remove(item)

    def stop_all(self) -> None:
        for name, proc, out in reversed(self.items):
            self._stop(name, proc)
            out.close()
        self.items.clear()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def terminate(name: str, proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    _kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM for {grace:g} s: SIGKILL")
        _kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def log_tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace").strip()[-chars:] or "(empty)"
    except OSError:
        return "(no log)"


def pinned_env() -> dict[str, str]:
    return dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")


def child_argv(pin: list[str], script: Path, role: str, spec: dict[str, Any]) -> list[str]:
    """A pinned Python child running ``script``'s ``role`` (see :func:`child_main`)."""
    return pin + [sys.executable, str(script), role, json.dumps(spec)]


def run_child(pin: list[str], script: Path, role: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a pinned load-generator child to its end; its answer is the last JSON line it prints."""
    out = subprocess.run(child_argv(pin, script, role, spec), capture_output=True, text=True, timeout=timeout,
                         env=pinned_env())
    if out.returncode != 0:
        raise BenchError(f"{script.name} {role} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if out.stderr.strip():
        result["stderr"] = out.stderr.strip()[-2000:]
    return result


def child_main(roles: dict[str, Callable[[dict[str, Any]], Any]]) -> int:
    """Entry point of a module run as a child: ``script.py ROLE JSON-SPEC``; prints the role's answer."""
    if len(sys.argv) != 3 or sys.argv[1] not in roles:
        print(f"usage: {sys.argv[0]} {{{','.join(roles)}}} JSON-SPEC  (started by bench/compare.py)",
              file=sys.stderr)
        return 2
    result = roles[sys.argv[1]](json.loads(sys.argv[2]))
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


def poll(check: Callable[[], Any], what: str, procs: Procs, limit: float) -> float:
    """Call ``check`` until it returns without raising, at most ``limit`` s; the seconds it took."""
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < limit:
        procs.check_alive()
        try:
            check()
            return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 -- retried until the limit
            last = repr(exc)
        time.sleep(0.2)
    raise BenchError(f"{what}: not ready within {limit:.0f} s (last: {last})")


def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    values = sorted(latencies_ms)

    def pct(p: float) -> float | None:
        return round(values[min(len(values) - 1, int(len(values) * p))], 3) if values else None

    return {"p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": round(values[-1], 3) if values else None}


# --- CPU noise ----------------------------------------------------------------------------


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
    ones by /proc, ``pids()`` asked at each reading; the load generators as reaped
    children), over wall time; it also holds kernel work not charged to any process
    (loopback softirq), so a few per cent is normal. ``steal`` is time the hypervisor
    took from the CPU.
    """

    def __init__(self, cpu: int, pids: Callable[[], list[int]]) -> None:
        self.cpu, self.pids = cpu, pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def _snap(self) -> tuple[float, int, int, dict[int, float], float]:
        busy, steal = cpu_ticks(self.cpu)
        ours = {pid: proc_cpu_seconds(pid) or 0.0 for pid in self.pids()}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.monotonic(), busy, steal, ours, ru.ru_utime + ru.ru_stime

    def measure(self, step: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
        t0, busy0, steal0, ours0, kids0 = self._snap()
        result = step(*args, **kwargs)
        t1, busy1, steal1, ours1, kids1 = self._snap()
        wall = max(t1 - t0, 1e-6)
        # A process that appeared during the step counts from zero, one that went away is not known.
        ours = sum(v - ours0.get(pid, 0.0) for pid, v in ours1.items()) + (kids1 - kids0)
        result["cpu"] = {
            "wall_s": round(wall, 3),
            "ours_pct": round(100 * ours / wall, 1),
            "foreign_pct": round(100 * max(0.0, (busy1 - busy0) / self.hz - ours) / wall, 1),
            "steal_pct": round(100 * (steal1 - steal0) / self.hz / wall, 1),
        }
        return result


def noisy(cpu_info: dict[str, Any] | None) -> str | None:
    """``"N%"`` when a step of a second or more shared the CPU (>= 10 % foreign work or steal), else None."""
    # /proc/stat counts in 10 ms ticks: only steps of a second or more say anything.
    if not cpu_info or cpu_info.get("wall_s", 0) < 1:
        return None
    if cpu_info["foreign_pct"] + cpu_info["steal_pct"] < 10:
        return None
    return f"{cpu_info['foreign_pct']:.0f}%" + (f" (+{cpu_info['steal_pct']:.0f}% steal)"
                                                 if cpu_info.get("steal_pct", 0) >= 0.5 else "")


# --- logs and report ------------------------------------------------------------------------


def scan_log(path: Path) -> dict[str, Any]:
    """Tracebacks, 'Unhandled' lines, lines per twistd log level and the most frequent warnings."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    levels: dict[str, int] = {}
    warnings: dict[str, int] = {}
    for m in re.finditer(r"^\S+ \[[^\]#]*#(\w+)\] ?(.*)$", text, re.M):
        levels[m.group(1)] = levels.get(m.group(1), 0) + 1
        if m.group(1) in ("warn", "error", "critical"):
            key = re.sub(r"\d+", "N", m.group(2))[:160]
            warnings[key] = warnings.get(key, 0) + 1
    return {
        "lines": text.count("\n"),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "unhandled": len(re.findall(r"Unhandled", text)),
        "levels": levels,
        "top_warnings": sorted(warnings.items(), key=lambda kv: -kv[1])[:4],
    }


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """First column left-aligned, the others right-aligned, a rule under the header."""
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        lines.append(indent + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                         for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append(indent + "-+-".join("-" * w for w in widths))
    return lines


def _on_signal(signum: int, _frame: Any) -> None:
    log(f"{signal.Signals(signum).name}: stopping every process this run started")
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], int]) -> None:
    """Run a driver: SIGTERM/SIGHUP/SIGINT unwind through its ``finally`` (which stops what it started)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    # Also when started in the background by a shell, which leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        log("interrupted: every process this run started has been stopped")
        sys.exit(130)
