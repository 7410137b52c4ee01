#!/usr/bin/env python3
"""tunneld benchmark: the same backends direct, through tunneld and through ``ssh -R``, in one run.

``make bench`` (``bench/run.sh``) runs this.  On 127.0.0.1 only, with free
ports chosen at start, it starts:

* the origins: ``backend.py`` (HTTP, twisted.web), an autobahn WebSocket echo
  server (``ws_bench.py``) and a ``grpc.aio`` server (``grpc_bench.py``),
* tunneld: ``twistd -n tunneld-server`` (HTTP/WebSocket entry and gRPC entry,
  access log off) and ``twistd -n tunneld-client`` routing to those origins,
  from generated configs (every other key at its default),
* ssh: our own sshd and ``ssh -N -R`` forwards to the same origins
  (``ssh_forward.py``); skipped, with the reason printed, when sshd is missing,
* for the delayed rows: ``relay.py`` (25 ms each way by default) between a
  second tunneld client and the tunnel port, and between a second ssh and sshd,

then measures each step on each path, one path after the other: direct to
the origin, through tunneld, through ssh.  Every process of every path
(origins, tunneld server and clients, sshd and ssh, relays, load generators)
is pinned to one CPU with ``taskset``.  The table goes to stdout, the data to
``bench/results/latest.json``, the processes' logs to ``bench/results/latest-*.log``.

    python bench/compare.py [--quick] [--duration 10] [--cpu 1] [--delay-ms 25] [--only http,ws,grpc,delay,idle]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from common import (HERE, MIB, BenchError, CpuWatch, Procs, cpu_model, descendants, find_twistd, fmt, free_ports,
                    git_commit, loadavg, log, noisy, now_iso, pin_cpu, pinned_env, poll, proc_cpu_seconds, proc_status,
                    raise_nofile, render_table, run_main, scan_log, tool_version)

import grpc_bench  # noqa: E402  (bench/ is on sys.path: this script's directory)
import http_bench
import ssh_forward
import ws_bench

PATHS = ("direct", "tunneld", "ssh", "hop")
HTTP_PATHS = PATHS          # the one-hop Twisted proxy is measured on the HTTP rows only
OTHER_PATHS = ("direct", "tunneld", "ssh")
SECTIONS = ("http", "ws", "grpc", "delay", "idle")
TOKEN, DELAYED_TOKEN = "bench-token", "bench-delayed-token"
DELAYED_HOST = "delayed.bench"  # the tunneld route of the delayed client matches this Host
NOT_APPLICABLE = "—"


# --- tunneld configs --------------------------------------------------------------------


def write_tunneld_configs(tmp: Path, ports: dict[str, int], grpc_on: bool, max_concurrency: int) -> dict[str, Path]:
    """server.toml, client.toml and client-delayed.toml for this run's ports; other keys at their defaults."""
    server = f"""\
[server]
tunnel_listen = "127.0.0.1:{ports['tunnel']}"
http_listen = "127.0.0.1:{ports['http_entry']}"
grpc_listen = "{f'127.0.0.1:{ports["grpc_entry"]}' if grpc_on else ''}"
admin_listen = ""
access_log = false
drain_timeout = 2
# Every load generator and the idle-WebSocket step come from 127.0.0.1: the per-address caps
# (issue 20) would refuse them, so they are lifted here, as behind a trusted load balancer.
max_connections_per_ip = 100000
max_websockets_per_ip = 100000

[[groups]]
name = "default"
tokens = ["{TOKEN}"]

[[groups]]
name = "delayed"
tokens = ["{DELAYED_TOKEN}"]

[[routes]]
name = "web"
group = "default"
backend = "http://127.0.0.1:{ports['http_backend']}"

[[routes]]
name = "ws"
group = "default"
path_prefix = "/ws"
backend = "http://127.0.0.1:{ports['ws_backend']}"

[[routes]]
name = "grpc"
group = "default"
grpc_service = "{grpc_bench.SERVICE}"
backend = "grpc://127.0.0.1:{ports['grpc_backend']}"

[[routes]]
name = "web-delayed"
group = "delayed"
host = "{DELAYED_HOST}"
backend = "http://127.0.0.1:{ports['http_backend']}"
"""

    def client(server_port: int, group: str, token: str, client_id: str) -> str:
        return f"""\
[client]
server = "127.0.0.1:{server_port}"
group = "{group}"
token = "{token}"
client_id = "{client_id}"
max_concurrency = {max_concurrency}
max_websockets = {max_concurrency}
access_log = false
drain_timeout = 2
"""

    files = {"server": server,
             "client": client(ports["tunnel"], "default", TOKEN, "bench"),
             "client-delayed": client(ports["relay_tunnel"], "delayed", DELAYED_TOKEN, "bench-delayed")}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp / f"{name}.toml"
        paths[name].write_text(text)
        out = subprocess.run([sys.executable, "-m", "tunneld", "check", str(paths[name])], capture_output=True,
                             text=True, timeout=60, env=pinned_env(), cwd=str(HERE.parent))
        if out.returncode != 0:
            raise BenchError(f"generated {name}.toml does not pass 'tunneld check': {out.stdout}{out.stderr}")
    return paths


# --- the table ------------------------------------------------------------------------------


def cell(results: dict[str, Any], step: str, path: str, field: str, scale: float = 1.0) -> Any:
    """A step's figure on one path: a number, or a string saying why there is none."""
    entry = results.get(step, {}).get(path)
    if entry is None:
        return None
    if "na" in entry:
        return NOT_APPLICABLE
    if "skipped" in entry:
        return "skip"
    if "error" in entry:
        return "FAIL"
    value = entry
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value / scale if isinstance(value, (int, float)) else None


def ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def build_rows(results: dict[str, Any], m: dict[str, Any]) -> list[dict[str, Any]]:
    spec: list[tuple[str, str, str, float]] = []  # metric, step, field, scale
    for conns in m["http_connections"]:
        spec += [(f"GET /small, {conns} conn: req/s", f"small_c{conns}", "rps", 1),
                 ("  p50 latency ms", f"small_c{conns}", "p50_ms", 1),
                 ("  p99 latency ms", f"small_c{conns}", "p99_ms", 1)]
    spec.append(("GET /small over HTTP/2, 1 conn x 64 streams: req/s", "small_h2_m64", "rps", 1))
    mib = m["transfer_mib"]
    spec += [(f"{mib} MiB download MB/s", "download", "mb_s", 1),
             (f"{mib} MiB upload MB/s (sha256 checked)", "upload", "mb_s", 1)]
    for conns in m["ws_connections"]:
        spec += [(f"WS echo {ws_bench.MESSAGE_SIZE} B, {conns} conn: round trips/s", f"ws_echo_c{conns}", "rtps", 1),
                 ("  p50 latency ms", f"ws_echo_c{conns}", "p50_ms", 1)]
    for callers in m["grpc_callers"]:
        spec.append((f"gRPC unary {grpc_bench.UNARY_SIZE} B, {callers} caller{'s' * (callers > 1)}: calls/s",
                     f"grpc_unary_c{callers}", "calls_per_s", 1))
        if callers == 1:
            spec.append(("  p50 latency ms", f"grpc_unary_c{callers}", "p50_ms", 1))
    spec.append((f"gRPC server streaming {grpc_bench.STREAM_SIZE // 1024} KiB: msgs/s", "grpc_stream",
                 "messages_per_s", 1))
    spec.append(("1,000 idle gRPC caller connections: entry KiB each", "grpc_idle", "kib_per_connection", 1))
    rtt = f"{2 * m['delay_ms']:g} ms RTT link"
    spec += [(f"{mib} MiB download over {rtt}: MB/s", "delay_download", "mb_s", 1),
             (f"{mib} MiB upload over {rtt}: MB/s", "delay_upload", "mb_s", 1)]
    spec += [("server peak RSS MiB, load steps (VmHWM)", "peak_load", "server", MIB),
             ("client peak RSS MiB, load steps (VmHWM)", "peak_load", "client", MIB)]
    idle = m["idle_sockets"]
    spec += [(f"{idle:,} idle WS: server KiB per WS", "ws_idle", "per_process.server.kib_per_ws", 1),
             (f"{idle:,} idle WS: client KiB per WS", "ws_idle", "per_process.client.kib_per_ws", 1),
             (f"{idle:,} idle WS: server + client KiB per WS", "ws_idle", "kib_per_ws_tunnel", 1),
             (f"{idle:,} idle WS: backend KiB per WS (scale)", "ws_idle", "per_process.backend.kib_per_ws", 1),
             ("server peak RSS MiB, whole run (VmHWM)", "peak_end", "server", MIB),
             ("client peak RSS MiB, whole run (VmHWM)", "peak_end", "client", MIB)]
    rows = []
    for metric, step, field, scale in spec:
        if step not in results:
            continue
        values = {path: cell(results, step, path, field, scale) for path in PATHS}
        if step == "ws_idle" and "backend" not in field and values["direct"] is None:
            values["direct"] = NOT_APPLICABLE  # direct has no server or client: only the backend's growth
        rows.append({"metric": metric, "step": step, "field": field, **values,
                     "tunneld_over_direct": ratio(values["tunneld"], values["direct"]),
                     "tunneld_over_ssh": ratio(values["tunneld"], values["ssh"]),
                     "tunneld_over_hop": ratio(values["tunneld"], values["hop"])})
    return rows


def render(meta: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    def show(value: Any) -> str:
        return value if isinstance(value, str) else fmt(value)

    def show_ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    lines = [
        "tunneld benchmark — direct to the backend vs tunneld vs ssh -R",
        f"  date      {meta['date']}   commit {meta['commit']}",
        f"  machine   nproc={meta['nproc']}  cpu: {meta['cpu_model']}",
        f"  load avg  before the run {' '.join(map(str, meta['loadavg_before']))}, "
        f"after {' '.join(map(str, meta.get('loadavg_after', [])))} (1, 5, 15 min)",
        f"  pinning   {meta['pinning']}",
        f"  tools     {meta['tools']}",
        f"  ssh -R    {meta['ssh']}",
        f"  settings  {meta['settings']}",
        "",
    ]
    header = ("metric", "direct", "tunneld", "ssh -R", "Twisted hop", "tunneld/direct", "tunneld/ssh", "tunneld/hop")
    lines += render_table(header, [
        (r["metric"], show(r["direct"]), show(r["tunneld"]), show(r["ssh"]), show(r["hop"]),
         show_ratio(r["tunneld_over_direct"]), show_ratio(r["tunneld_over_ssh"]),
         show_ratio(r["tunneld_over_hop"])) for r in rows])
    lines += ["",
              "  ratios: tunneld / direct and tunneld / ssh (req/s, MB/s, round trips/s, calls/s, msgs/s: < 1 is"
              " slower; latency and memory: > 1 is more); MB/s = 10^6 bytes/s, KiB/MiB = 1024/1024^2 bytes;",
              f"  {NOT_APPLICABLE} = not applicable, skip = path not available (reason in the header),"
              " FAIL = the step failed (see notes); ssh server = sshd's processes together, ssh client = the ssh"
              " process; Twisted hop = one twisted.web ReverseProxyResource in front of the same origin"
              " (bench/twisted_hop.py: HTTP/1.0, a new backend connection per request), HTTP rows only"]
    if notes:
        lines += ["", "  notes:"]
        lines.extend(f"  - {note}" for note in notes)
    return "\n".join(lines)


# --- notes ------------------------------------------------------------------------------------


def idle_notes(label: str, value: dict[str, Any]) -> list[str]:
    notes = []
    o, c = value.get("open", {}), value.get("check", {})
    if o.get("failed"):
        notes.append(f"FAILED: {label} idle: {o['failed']} of {o['requested']} WebSockets did not open: "
                     f"{o.get('error_samples')}")
    if c and c.get("alive") != c.get("held"):
        notes.append(f"FAILED: {label} idle: only {c.get('alive')}/{c.get('held')} held WebSockets still echoed "
                     "after the idle period")
    for cycle_no, cyc in enumerate(value.get("cycles", [])[1:], 2):
        co, cc = cyc.get("open", {}), cyc.get("check", {})
        if co.get("failed") or (cc and cc.get("alive") != cc.get("held")):
            notes.append(f"FAILED: {label} idle cycle {cycle_no}: {co.get('opened')}/{co.get('requested')} opened, "
                         f"{cc.get('alive')}/{cc.get('held')} still echoed {co.get('error_samples')}")
    for name, p in value.get("per_process", {}).items():
        growth, kept = p["growth"], p["retained_after_close"]
        back = kept <= max(MIB, 0.25 * max(growth, 0))
        text = (f"{label} idle WS, {name}: RSS {p['rss_before'] / MIB:.1f} MiB before -> {p['rss_open'] / MIB:.1f} "
                f"with {o.get('opened')} open (+{growth / MIB:.1f}) -> {p['rss_after_close'] / MIB:.1f} after close "
                f"({kept / MIB:+.1f} vs before: {'back near baseline' if back else 'NOT back near baseline'}); "
                f"fds {p['fds_before']} -> {p['fds_open']} -> {p['fds_after_close']}")
        if "growth_last_cycle" in p:
            g2 = p["growth_last_cycle"]
            text += (f"; cycle {len(value['cycles'])}: open again {p['rss_open_last_cycle'] / MIB:.1f} MiB "
                     f"({g2 / MIB:+.1f} over the previous close) -> "
                     + ("the kept memory is reused, not leaked" if g2 <= 0.25 * max(growth, MIB)
                        else "grew again: reference cycles awaiting CPython's full GC, or a leak; more cycles "
                             "(--cycles) tell"))
        notes.append(text)
    return notes


def collect_notes(results: dict[str, Any], logs: dict[str, Any], cpu: int, extra: list[str]) -> list[str]:
    notes = list(extra)
    for step, paths in results.items():
        for path, value in paths.items():
            if not isinstance(value, dict):
                continue
            if "error" in value:
                notes.append(f"FAILED: {step} via {path}: {value['error']}")
            for key in ("non_2xx_3xx",):
                if value.get(key):
                    notes.append(f"{step} via {path}: {value[key]} non-2xx/3xx responses")
            errors = value.get("socket_errors") or {}
            if any(errors.values()):
                notes.append(f"{step} via {path}: socket errors {errors}")
            if step == "ws_idle" and "per_process" in value:
                notes.extend(idle_notes(path, value))
    if any(v.get("sha256_ok") for s in ("upload", "delay_upload") for v in results.get(s, {}).values()):
        notes.append("uploads: the backend's byte count and sha256 matched the sent file on every path that has a "
                     "figure")
    for name, info in logs.items():
        if info.get("tracebacks") or info.get("unhandled"):
            notes.append(f"{name} log: {info['tracebacks']} traceback(s), {info['unhandled']} 'Unhandled' line(s) — "
                         f"see {info['path']}")
        if info.get("levels", {}).get("warn") or info.get("levels", {}).get("error"):
            notes.append(f"{name} log: by level {info['levels']}"
                         + "".join(f"; {count} x {text!r}" for text, count in info.get("top_warnings", [])))
    busy = []
    for step, paths in results.items():
        for path, value in paths.items():
            # The idle steps mostly sleep; the kernel's TCP work of opening and closing 1,000 sockets (charged
            # to no process) reads as foreign there. Their figures are in the JSON.
            shared = noisy(value.get("cpu")) if isinstance(value, dict) and step != "ws_idle" else None
            if shared:
                busy.append(f"{step} via {path} {shared}")
    if busy:
        notes.append(f"CPU {cpu} was shared with work that is not ours (or hypervisor steal) during: "
                     + ", ".join(busy) + " — those figures are skewed; rerun on an idle machine")
    return notes


# --- the run ----------------------------------------------------------------------------------


class Run:
    """Everything one benchmark run started and measured."""

    http_connections = [1, 64]
    ws_connections = [1, 32]
    grpc_callers = [1, 32]

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.sections = set(args.only)
        self.cpu = pin_cpu(args.cpu)
        self.pin = ["taskset", "-c", str(self.cpu)]
        self.procs = Procs(tmp)
        self.results: dict[str, dict[str, Any]] = {}
        self.extra_notes: list[str] = []
        self.ssh: ssh_forward.SshPath | None = None
        self.ssh_reason: str | None = None if not args.no_ssh else "--no-ssh given"
        self.targets: dict[str, dict[str, Any]] = {path: {} for path in PATHS}
        self.watch = CpuWatch(self.cpu, self.our_pids)
        self.ports: dict[str, int] = {}
        self.cpu_at_start: dict[str, float] = {}
        self.cpu_load_steps: dict[str, float] = {}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each long-running process with its descendants (sshd's sessions)."""
        return {name: sum(proc_cpu_seconds(pid) or 0.0 for pid in [proc.pid] + descendants(proc.pid))
                for name, proc, _ in self.procs.items}

    def our_pids(self) -> list[int]:
        pids = [proc.pid for _, proc, _ in self.procs.items]
        return pids + (descendants(self.procs.pid("sshd")) if self.procs.has("sshd") else [])

    # -- starting ---------------------------------------------------------------------------

    def start(self, ports: dict[str, int]) -> None:
        a, pin, procs, env = self.args, self.pin, self.procs, pinned_env()
        self.ports = ports
        need_http = bool(self.sections & {"http", "delay"})
        need_ws = bool(self.sections & {"ws", "idle"})
        need_grpc = "grpc" in self.sections
        direct, tunneld = self.targets["direct"], self.targets["tunneld"]

        # Origins.
        if need_http:
            procs.start("backend-http", pin + [sys.executable, str(HERE / "backend.py"),
                                               "--port", str(ports["http_backend"])], env)
        if need_ws:
            procs.start("backend-ws", ws_bench.backend_argv(pin, ports["ws_backend"]), env)
        if need_grpc:
            procs.start("backend-grpc", grpc_bench.backend_argv(pin, ports["grpc_backend"]), env)
        direct.update(http=f"http://127.0.0.1:{ports['http_backend']}", ws=f"ws://127.0.0.1:{ports['ws_backend']}/ws",
                      grpc=f"127.0.0.1:{ports['grpc_backend']}")
        self.wait_ready("direct", 30)

        # tunneld.
        configs = write_tunneld_configs(self.tmp, ports, need_grpc, max(2000, 2 * a.idle))
        twistd = [find_twistd(), "-n", "--pidfile="]
        procs.start("server", pin + [*twistd, "tunneld-server", "-c", str(configs["server"])], env)
        procs.start("client", pin + [*twistd, "tunneld-client", "-c", str(configs["client"])], env)
        tunneld.update(http=f"http://127.0.0.1:{ports['http_entry']}", ws=f"ws://127.0.0.1:{ports['http_entry']}/ws",
                       grpc=f"127.0.0.1:{ports['grpc_entry']}")
        log(f"tunneld answers after {self.wait_ready('tunneld', 60):.1f} s")
        if need_http:
            procs.start("twisted-hop", pin + [sys.executable, str(HERE / "twisted_hop.py"), "--port",
                                              str(ports["hop"]), "--backend-port", str(ports["http_backend"])], env)
            self.targets["hop"].update(http=f"http://127.0.0.1:{ports['hop']}")
            self.poll(lambda: http_bench.check_small(self.targets["hop"]["http"]), "Twisted hop", 30)
        if "delay" in self.sections:
            self.start_relay("relay-tunnel", ports["relay_tunnel"], ports["tunnel"])
            procs.start("client-delayed", pin + [*twistd, "tunneld-client", "-c",
                                                 str(configs["client-delayed"])], env)
            tunneld["http_delayed"] = (tunneld["http"], DELAYED_HOST)
            waited = self.poll(lambda: http_bench.check_small(tunneld["http"], DELAYED_HOST),
                               "tunneld via the delay relay", 60)
            log(f"tunneld via the delay relay answers after {waited:.1f} s")

        # ssh -R.
        if self.ssh_reason is None:
            self.ssh_reason = ssh_forward.unavailable()
        if self.ssh_reason is None:
            try:
                self.start_ssh(ports, need_http, need_ws, need_grpc)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                self.ssh_reason = f"could not start sshd / ssh: {exc}" + (
                    f" (sshd log: {self.ssh.sshd_log()})" if self.ssh is not None else "")
                for name in ("ssh-delayed", "relay-ssh", "ssh", "sshd"):
                    procs.stop(name)
        if self.ssh_reason:
            log(f"ssh -R path skipped: {self.ssh_reason}")

    def start_relay(self, name: str, listen: int, target: int) -> None:
        self.procs.start(name, self.pin + [sys.executable, str(HERE / "relay.py"), "--listen", f"127.0.0.1:{listen}",
                                           "--target", f"127.0.0.1:{target}", "--delay-ms", str(self.args.delay_ms)],
                         pinned_env())
        self.poll(lambda: socket.create_connection(("127.0.0.1", listen), timeout=2).close(), name, 20)

    def start_ssh(self, ports: dict[str, int], need_http: bool, need_ws: bool, need_grpc: bool) -> None:
        self.ssh = ssh_forward.SshPath(self.procs, self.pin, self.tmp)
        self.ssh.start_sshd(ports["sshd"])
        forwards = [(ports[f"ssh_{kind}"], ports[f"{kind}_backend"])
                    for kind, on in (("http", need_http), ("ws", need_ws), ("grpc", need_grpc)) if on]
        self.ssh.connect("ssh", ports["sshd"], forwards)
        ssh = self.targets["ssh"]
        ssh.update(http=f"http://127.0.0.1:{ports['ssh_http']}", ws=f"ws://127.0.0.1:{ports['ssh_ws']}/ws",
                   grpc=f"127.0.0.1:{ports['ssh_grpc']}")
        self.wait_ready("ssh", 30)
        if "delay" in self.sections:
            self.start_relay("relay-ssh", ports["relay_ssh"], ports["sshd"])
            self.ssh.connect("ssh-delayed", ports["relay_ssh"], [(ports["ssh_delayed"], ports["http_backend"])])
            ssh["http_delayed"] = (f"http://127.0.0.1:{ports['ssh_delayed']}", None)
            self.poll(lambda: http_bench.check_small(ssh["http_delayed"][0]), "ssh via the delay relay", 30)

    def poll(self, check: Callable[[], Any], what: str, limit: float) -> float:
        return poll(check, what, self.procs, limit)

    def wait_ready(self, path: str, limit: float) -> float:
        t = self.targets[path]
        waited = 0.0
        if self.sections & {"http", "delay"} and "http" in t:
            waited += self.poll(lambda: http_bench.check_small(t["http"]), f"{path} HTTP", limit)
        if self.sections & {"ws", "idle"} and "ws" in t:
            waited += ws_bench.wait_ws_echo(t["ws"], f"{path} WebSocket", self.procs, limit)
        if "grpc" in self.sections and "grpc" in t:
            waited += grpc_bench.wait_grpc(t["grpc"], f"{path} gRPC", self.procs, limit)
        return waited

    def warm_up(self) -> None:
        for path in self.live_paths():
            t = self.targets[path]
            for _ in range(20):
                if self.sections & {"http", "delay"} and "http" in t:
                    http_bench.check_small(t["http"])
                if path == "hop":
                    continue
                if self.sections & {"ws", "idle"}:
                    ws_bench.ws_echo_once(t["ws"])
                if "grpc" in self.sections:
                    grpc_bench.echo_once(t["grpc"])

    def live_paths(self) -> list[str]:
        return [p for p in PATHS if (p != "ssh" or not self.ssh_reason) and (p != "hop" or self.targets["hop"])]

    # -- measuring ------------------------------------------------------------------------------

    def step(self, key: str, run: Callable[[Any], dict[str, Any]], target: str,
             paths: tuple[str, ...] = OTHER_PATHS) -> None:
        """Measure ``run(the path's target)`` on each of ``paths`` in turn; a failed step is recorded, the run
        goes on (a process that died ends the run: ``check_alive``)."""
        results = self.results.setdefault(key, {})
        for path in PATHS:
            if path not in paths:
                results.setdefault(path, {"na": True})
            elif path == "ssh" and self.ssh_reason:
                results[path] = {"skipped": self.ssh_reason}
            else:
                self.procs.check_alive()
                try:
                    results[path] = self.watch.measure(run, self.targets[path][target])
                except (BenchError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
                    log(f"{key} via {path} FAILED: {exc}")
                    results[path] = {"error": str(exc)[-1500:]}

    def peak_rss(self, key: str) -> None:
        """VmHWM of the server and client of each path, now (a high-water mark: the peak so far)."""
        p = self.procs
        tunneld = {"server": proc_status(p.pid("server")).get("VmHWM"),
                   "client": proc_status(p.pid("client")).get("VmHWM")}
        if p.has("client-delayed"):
            tunneld["client_delayed"] = proc_status(p.pid("client-delayed")).get("VmHWM")
        entry: dict[str, Any] = {"direct": {"na": True}, "tunneld": tunneld, "hop": {"na": True}}
        if self.ssh_reason or self.ssh is None:
            entry["ssh"] = {"skipped": self.ssh_reason}
        else:
            entry["ssh"] = {"server": sum(proc_status(pid).get("VmHWM", 0) for pid in self.ssh.server_pids()),
                            "client": proc_status(p.pid("ssh")).get("VmHWM")}
            if p.has("ssh-delayed"):
                entry["ssh"]["client_delayed"] = proc_status(p.pid("ssh-delayed")).get("VmHWM")
        self.results[key] = entry

    def measure_all(self, duration: int, transfer: int, upload_path: Path, upload_sha: str, max_time: int) -> None:
        a, pin, s = self.args, self.pin, self.sections
        n = a.transfers
        self.cpu_at_start = self.cpu_seconds()
        if "http" in s:
            for conns in self.http_connections:
                small = http_bench.run_wrk if self.use_wrk else http_bench.run_pyload
                self.step(f"small_c{conns}", lambda base: small(pin, f"{base}/small", conns, duration), "http",
                          HTTP_PATHS)
            # HTTP/2 on the entry (h2c): only tunneld's entry speaks it (the origin is HTTP/1.1).
            self.step("small_h2_m64", lambda base: http_bench.run_h2load(pin, f"{base}/small", 64, duration), "http",
                      ("tunneld",))
            self.step("download", lambda base: http_bench.median_of(
                n, lambda: http_bench.download(pin, base, transfer, max_time)), "http", HTTP_PATHS)
            self.step("upload", lambda base: http_bench.median_of(
                n, lambda: http_bench.upload(pin, base, upload_path, transfer, upload_sha, max_time)),
                "http", HTTP_PATHS)
        if "ws" in s:
            for conns in self.ws_connections:
                self.step(f"ws_echo_c{conns}", lambda url: ws_bench.run_echo(pin, url, conns, duration), "ws")
        if "grpc" in s:
            for callers in self.grpc_callers:
                self.step(f"grpc_unary_c{callers}",
                          lambda target: grpc_bench.run_unary(pin, target, callers, duration), "grpc")
            self.step("grpc_stream", lambda target: grpc_bench.run_stream(pin, target, duration), "grpc")
            pids = {"tunneld": lambda: self.procs.pid("server"), "direct": lambda: self.procs.pid("backend-grpc")}
            for path, pid in pids.items():
                self.step("grpc_idle", lambda target, pid=pid: grpc_bench.idle_connections(target, 1000, pid()),
                          "grpc", (path,))
        if "delay" in s:
            delayed = ("tunneld", "ssh")
            self.step("delay_download", lambda t: http_bench.median_of(
                n, lambda: http_bench.download(pin, t[0], transfer, max_time, t[1])), "http_delayed", delayed)
            self.step("delay_upload", lambda t: http_bench.median_of(
                n, lambda: http_bench.upload(pin, t[0], upload_path, transfer, upload_sha, max_time, t[1])),
                "http_delayed", delayed)
        self.peak_rss("peak_load")
        self.cpu_load_steps = {name: round(seconds - self.cpu_at_start.get(name, 0.0), 2)
                               for name, seconds in self.cpu_seconds().items()}
        if "idle" in s and a.idle > 0:
            for path in ("tunneld", "ssh", "direct"):
                self.step_idle(path)
            self.results["ws_idle"] = {p: self.results["ws_idle"].get(p, {"na": True}) for p in PATHS}
            self.peak_rss("peak_end")

    def step_idle(self, path: str) -> None:
        """Memory of 1,000 idle WebSockets on one path: its server and client (if any) and the backend.

        The WebSocket origin is restarted first, so each path's backend growth starts from a fresh process
        (a process that already held 1,000 sockets would reuse that memory and read low).
        """
        a = self.args
        if path == "ssh" and self.ssh_reason:
            self.step("ws_idle", lambda url: {}, "ws", (path,))  # recorded as skipped
            return
        self.procs.stop("backend-ws")
        self.procs.start("backend-ws", ws_bench.backend_argv(self.pin, self.ports["ws_backend"]), pinned_env())
        ws_bench.wait_ws_echo(self.targets["direct"]["ws"], "restarted WebSocket origin", self.procs, 30)

        def run(url: str) -> dict[str, Any]:
            pids: dict[str, list[int]] = {"backend": [self.procs.pid("backend-ws")]}
            if path == "tunneld":
                pids.update(server=[self.procs.pid("server")], client=[self.procs.pid("client")])
            elif path == "ssh" and self.ssh is not None:
                pids.update(server=self.ssh.server_pids(), client=[self.procs.pid("ssh")])
            result = ws_bench.idle_step(self.pin, url, path, pids, a.idle, a.batch, self.tmp, a.settle, a.cycles)
            per = result.get("per_process", {})
            if "server" in per and "client" in per:
                result["kib_per_ws_tunnel"] = per["server"]["kib_per_ws"] + per["client"]["kib_per_ws"]
            return result

        self.step("ws_idle", run, "ws", (path,))

    @property
    def use_wrk(self) -> bool:
        return bool(shutil.which("wrk")) and not self.args.no_wrk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s load runs, 20 MiB transfers, one idle open/close cycle")
    parser.add_argument("--duration", type=int, default=None, help="seconds per load run (default 10; 3 with --quick)")
    parser.add_argument("--transfer-mib", type=int, default=None, help="download/upload size (default 100; 20 quick)")
    parser.add_argument("--transfers", type=int, default=None,
                        help="runs of each download and upload; the median is reported (default 3; 1 with --quick)")
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU every process is pinned to (default 1)")
    parser.add_argument("--delay-ms", type=float, default=25.0,
                        help="delay of the relay, each direction (default 25 ms: a 50 ms round trip)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--idle", type=int, default=1000, help="idle WebSockets of the memory step (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="idle WebSockets opened concurrently (default 50)")
    parser.add_argument("--cycles", type=int, default=None,
                        help="open/close cycles of the idle WebSockets (default 2; 1 with --quick)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each idle RSS sample (default 2)")
    parser.add_argument("--no-ssh", action="store_true", help="leave out the ssh -R path")
    parser.add_argument("--no-wrk", action="store_true", help="small GETs with the built-in Python load generator")
    parser.add_argument("--grpc-peers", choices=("auto", "grpc-js", "python"), default="auto",
                        help="gRPC origin and load generator: grpc-js (Node.js; npm installs @grpc/grpc-js into "
                             "bench/grpc_js once), python (grpc.aio), or auto = grpc-js when node and npm are there")
    parser.add_argument("--output", default=str(HERE / "results" / "latest.json"), help="JSON result file")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown or not args.only:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.duration = args.duration if args.duration is not None else (3 if args.quick else 10)
    args.transfer_mib = args.transfer_mib if args.transfer_mib is not None else (20 if args.quick else 100)
    args.cycles = args.cycles if args.cycles is not None else (1 if args.quick else 2)
    args.transfers = args.transfers if args.transfers is not None else (1 if args.quick else 3)
    if min(args.duration, args.transfer_mib, args.batch, args.cycles) < 1 or args.idle < 0 or args.delay_ms < 0:
        parser.error("--duration, --transfer-mib, --batch and --cycles must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("taskset", "curl"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed")
    try:
        import autobahn
        import grpc
        import websockets
    except ImportError as exc:
        raise BenchError(f"{exc}: run with the dev venv (make bench, or .venv/bin/python bench/compare.py)") from None
    # One socket per idle WebSocket in the load generator, the entry side, the backend side and the backend,
    # set before anything is spawned so every child inherits it.
    nofile = raise_nofile(args.idle * 2 + 4096)
    transfer = args.transfer_mib * MIB
    max_time = max(300, args.transfer_mib * 6)  # curl --max-time: generous (the delayed link is slow), but bounded

    tmp = Path(tempfile.mkdtemp(prefix="tunneld-bench-"))
    run = Run(args, tmp)
    if "grpc" in args.only:
        grpc_bench.Peers.choose(args.grpc_peers)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "date": now_iso(), "commit": git_commit(), "nproc": os.cpu_count(), "cpu_model": cpu_model(),
        "pinned_cpu": run.cpu, "loadavg_before": loadavg(), "sections": args.only, "quick": args.quick,
        "duration_s": args.duration, "transfer_mib": args.transfer_mib, "delay_ms": args.delay_ms,
        "idle_sockets": args.idle, "batch": args.batch, "cycles": args.cycles, "nofile_limit": list(nofile),
        "http_connections": run.http_connections, "ws_connections": run.ws_connections,
        "grpc_callers": run.grpc_callers,
        "pinning": (f"every process of each path — origins, tunneld server and clients, sshd and ssh, delay relays, "
                    f"load generators — on CPU {run.cpu} (taskset -c {run.cpu})"),
        "tools": "; ".join([
            ("GET /small: " + tool_version(["wrk", "--version"]).split(" Copyright")[0] + " -t1 --latency")
            if run.use_wrk else "GET /small: built-in Python asyncio load generator (wrk not used)",
            "transfers: " + tool_version(["curl", "--version"]).split(" (")[0],
            f"WebSocket: Python websockets {websockets.__version__} (asyncio) against an autobahn "
            f"{autobahn.__version__} echo",
            f"gRPC: {grpc_bench.Peers.version()}",
            f"{platform.python_implementation()} {platform.python_version()}"]),
    }
    log(f"load average before the run: {meta['loadavg_before']}")
    ports = dict(zip(("http_backend", "ws_backend", "grpc_backend", "tunnel", "http_entry", "grpc_entry",
                      "relay_tunnel", "sshd", "relay_ssh", "ssh_http", "ssh_ws", "ssh_grpc", "ssh_delayed", "hop"),
                     free_ports(14)))
    meta["ports"] = ports
    logs: dict[str, Any] = {}
    try:
        run.start(ports)
        meta["pids"] = {name: proc.pid for name, proc, _ in run.procs.items}
        log(f"writing the {args.transfer_mib} MiB upload file")
        upload_path = tmp / "upload.bin"
        upload_sha = http_bench.make_upload_file(upload_path, transfer)
        run.warm_up()
        run.measure_all(args.duration, transfer, upload_path, upload_sha, max_time)
        # Each path must still answer after the load.
        for path in run.live_paths():
            try:
                run.wait_ready(path, 10)
            except BenchError as exc:
                run.extra_notes.append(f"FAILED: after the run, {path} did not answer: {exc}")
        meta["cpu_seconds_load_steps"] = run.cpu_load_steps
    except BenchError as exc:
        log(f"run aborted: {exc}")
        run.extra_notes.append(f"FAILED: run aborted: {exc}")
    finally:
        run.procs.stop_all()
        meta["loadavg_after"] = loadavg()
        for old in out_path.parent.glob(f"{out_path.stem}-*.log"):
            old.unlink()
        for name, src in list(run.procs.logs.items()) + [(p.stem, p) for p in tmp.glob("loadgen-idle-*.err")]:
            if src.exists() and src.stat().st_size:
                dst = out_path.parent / f"{out_path.stem}-{name}.log"
                shutil.copyfile(src, dst)
                logs[name] = {"path": str(dst), **scan_log(dst)}
        shutil.rmtree(tmp, ignore_errors=True)

    meta["ssh"] = (f"{ssh_forward.version()}: own sshd on 127.0.0.1 (temporary host and client keys), "
                   f"ssh -N -R per origin" if not run.ssh_reason
                   else "SKIPPED — " + "; ".join(ln.strip() for ln in run.ssh_reason.splitlines() if ln.strip()))
    settings = [f"sections {','.join(args.only)}", f"{args.duration} s per load run"]
    if {"http", "delay"} & set(args.only):
        settings.append(f"{args.transfer_mib} MiB transfers (median of {args.transfers} each)")
    if "delay" in args.only:
        settings.append(f"delay relay {args.delay_ms:g} ms each way ({2 * args.delay_ms:g} ms round trip)")
    if "idle" in args.only:
        settings.append(f"{args.idle:,} idle WebSockets x {args.cycles} open/close cycle(s)")
    meta["settings"] = ", ".join(settings) + ("  (--quick)" if args.quick else "")
    notes = collect_notes(run.results, logs, run.cpu, run.extra_notes)
    peak = run.results.get("peak_end", run.results.get("peak_load", {}))
    for path in ("tunneld", "ssh"):
        if peak.get(path, {}).get("client_delayed"):
            notes.append(f"{path}: the client of the delayed link peaked at "
                         f"{peak[path]['client_delayed'] / MIB:.1f} MiB (VmHWM)")
    for step in ("download", "upload", "delay_download", "delay_upload"):
        runs = {path: v["samples"] for path, v in run.results.get(step, {}).items()
                if isinstance(v, dict) and len(v.get("samples", [])) > 1}
        if runs:
            notes.append(f"{step} MB/s of each run (the median is in the table): "
                         + "; ".join(f"{path} " + ", ".join(f"{x:g}" for x in xs) for path, xs in runs.items()))
    if any(meta.get("cpu_seconds_load_steps", {}).values()):
        notes.append("CPU seconds used during the load steps (all but the idle WebSockets): "
                     + ", ".join(f"{k} {v}" for k, v in meta["cpu_seconds_load_steps"].items()))
    if "ws_idle" in run.results:
        notes.append("idle WS: KiB per WS = VmRSS growth with the sockets open over VmRSS just before, per socket "
                     "(first cycle); the WebSocket origin is restarted before each path's run")

    rows = build_rows(run.results, meta)
    report = render(meta, rows, notes)
    print(report, flush=True)
    out_path.write_text(json.dumps({"meta": meta, "rows": rows, "results": run.results, "logs": logs,
                                    "notes": notes, "table": report}, indent=2) + "\n")
    log(f"wrote {out_path}")
    return 1 if any(n.startswith("FAILED") for n in notes) else 0


if __name__ == "__main__":
    run_main(main)
