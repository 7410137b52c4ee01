"""Fleet simulator: N tunnel clients from one process against one tunneld server.

(``bench/fleet.py`` is the HAProxy fleet benchmark; this is the many-clients one.)

For each N in ``--clients`` this starts a fresh ``twistd tunneld-server``, a
real ``tunneld-client`` (client_id ``real``) and the bench backend, then a
child process (``--role sim``) that opens N ``TunnelService.Proxy`` streams
over grpc.aio channels (``--per-channel`` streams share one channel, i.e. one
TCP connection; 1 = every client on its own connection), authenticates with
``stream_open``, answers heartbeats, ignores config pushes and answers any HTTP
request with ``200 sim``.  Dials follow tunneld-client's rule
(grpc_bridge/client.py): the first dial, and the first redial after an accepted
stream was lost, wait a random 0..``--dial-jitter`` s; every redial waits the
client's backoff (0.5 s, x2, 10 s cap, each jittered down to half); a refused
or broken open counts as a redial.

Reported per N: time for all N to be in (connect rate), redials, the server's
RSS growth per client (RSS with N connected minus RSS with only the real client,
after a settle), its CPU while idle (over ``--idle`` seconds), and the latency
of HTTP requests to the group's route while N are connected (served by whichever
stream the server chooses: the real client or a simulated one).  Optionally
``--restart``: the server is restarted with N clients configured against it and
the time until all are back, the redials and the request latency during the storm
are reported.  Loopback only; every wait is bounded.

    .venv/bin/python bench/fleet_sim.py --clients 1000 5000 10000
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as hb  # noqa: E402

HERE = hb.HERE
TOKEN = "fleet-token"
GROUP = "fleet"
HOST = "fleet.test"


# --- the simulated clients (child process) -------------------------------------------


def sim_main(spec: dict[str, Any]) -> None:
    """Open spec['n'] streams; print JSON progress lines; run until stdin closes."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(_sim(spec))


async def _sim(spec: dict[str, Any]) -> None:
    import grpc

    from tunneld import frames
    from tunneld import tunnel_pb2 as pb
    from tunneld.grpc_bridge.client import PROXY_METHOD, Backoff, dial_spread

    n, per_channel, target = spec["n"], spec["per_channel"], spec["target"]
    jitter = spec.get("dial_jitter", 0.0)
    hb_interval = spec.get("client_heartbeat", 30.0)
    sync_interval = spec.get("client_config_sync", 0.0)
    # Like tunneld-client's keepalive_interval (a fleet sets it alike on both ends).
    keepalive_ms = int(spec.get("keepalive", 60.0) * 1000)
    token, group = spec.get("token", TOKEN), spec.get("group", GROUP)
    stats = {"connected": 0, "redials": 0, "requests": 0, "heartbeats": 0, "refused": 0, "config_syncs": 0}
    first_in = time.monotonic()
    channels: dict[int, Any] = {}
    sem = asyncio.Semaphore(spec.get("concurrency", 500))
    up = [False] * n

    def channel(i: int) -> Any:
        index = i // per_channel
        ch = channels.get(index)
        if ch is None:
            options = [("grpc.use_local_subchannel_pool", 1), ("grpc.keepalive_time_ms", keepalive_ms),
                       ("grpc.max_receive_message_length", 64 << 20)]
            ch = channels[index] = grpc.aio.insecure_channel(target, options=options)
        return ch

    async def client(i: int) -> None:
        await asyncio.sleep(dial_spread(jitter))
        backoff = Backoff()
        while True:
            opened = False
            try:
                async with sem:
                    call = channel(i).stream_stream(PROXY_METHOD, request_serializer=lambda b: b,
                                                    response_deserializer=pb.TunnelFrame.FromString)(
                        metadata=(("authorization", f"Bearer {token}"),))
                    so = pb.StreamOpenRequest(client_id=f"sim-{i}", group=group, version="sim",
                                              stream_id=f"{i}-{random.getrandbits(32):x}")
                    await call.write(frames.frame_of([pb.TunnelMessage(
                        client_id=so.client_id, direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL,
                        stream_open=so)]))
                    frame = await call.read()
                    if frame is grpc.aio.EOF or not frame.messages or \
                            not frame.messages[0].stream_open_response.success:
                        raise ConnectionError("refused")
                opened = True
                up[i] = True
                stats["connected"] += 1
                backoff.reset()
                now = time.monotonic()
                next_heartbeat = now + random.uniform(0, hb_interval) if hb_interval else float("inf")
                next_sync = now + random.uniform(0, sync_interval) if sync_interval else float("inf")
                version = frame.messages[0].stream_open_response.config.config_version
                msgs = list(frame.messages)[1:]
                while True:
                    replies = []
                    for msg in msgs:
                        if os.environ.get("FLEET_DEBUG"):
                            print(i, msg, file=sys.stderr)
                        kind = msg.WhichOneof("payload")
                        if kind == "heartbeat" and not msg.heartbeat.ack:
                            stats["heartbeats"] += 1
                            replies.append(pb.TunnelMessage(
                                client_id=so.client_id, direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL,
                                heartbeat=pb.Heartbeat(sent_at_ms=msg.heartbeat.sent_at_ms, ack=True)))
                        elif kind == "http_request" and msg.http_request.is_last_chunk:
                            stats["requests"] += 1
                            replies.append(pb.TunnelMessage(
                                client_id=so.client_id, request_id=msg.request_id, direction=pb.CLIENT_TO_SERVER,
                                protocol_type=pb.HTTP, http_response=pb.HttpResponse(
                                    status_code=200, body=b"sim", is_first_chunk=True, is_last_chunk=True,
                                    headers=[pb.Header(name="content-type", value=b"text/plain")])))
                    if replies:
                        await call.write(frames.frame_of(replies))
                    # Like the real client: a heartbeat of our own every client_heartbeat s and a
                    # config sync every client_config_sync s (the first ones at a random point of
                    # their interval), while a read is pending.
                    reading = asyncio.ensure_future(call.read())
                    while True:
                        due = min(next_heartbeat, next_sync)
                        wait = None if due == float("inf") else max(0.0, due - time.monotonic())
                        done, _ = await asyncio.wait({reading}, timeout=wait)
                        if done:
                            break
                        if next_heartbeat <= next_sync:
                            next_heartbeat += hb_interval
                            control = pb.TunnelMessage(
                                client_id=so.client_id, direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL,
                                heartbeat=pb.Heartbeat(sent_at_ms=int(time.time() * 1000)))
                        else:
                            next_sync += sync_interval
                            stats["config_syncs"] += 1
                            control = pb.TunnelMessage(
                                client_id=so.client_id, direction=pb.CLIENT_TO_SERVER, protocol_type=pb.CONTROL,
                                config_sync=pb.ConfigSyncRequest(config_version=version))
                        await call.write(frames.frame_of([control]))
                    frame = reading.result()
                    if frame is grpc.aio.EOF:
                        raise ConnectionError("closed")
                    msgs = list(frame.messages)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if os.environ.get("FLEET_DEBUG"):
                    print(i, "failed:", repr(e), file=sys.stderr)
                if opened:
                    up[i] = False
                    stats["connected"] -= 1
                else:
                    stats["refused"] += 1
                stats["redials"] += 1
                # The same rule as TunnelClientService._lost.
                spread = dial_spread(jitter) if backoff.attempt == 0 else 0.0
                await asyncio.sleep(backoff.next_delay() + spread)

    tasks = [asyncio.create_task(client(i)) for i in range(n)]
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stdin_closed.set_result, None)),
                     daemon=True).start()
    all_in_at = None
    while not stdin_closed.done():
        await asyncio.sleep(0.25)
        if all_in_at is None and stats["connected"] == n:
            all_in_at = time.monotonic() - first_in
        print(json.dumps({**stats, "elapsed": round(time.monotonic() - first_in, 2),
                          "all_in": all_in_at}), flush=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels.values():
        await ch.close()


# --- the driver ---------------------------------------------------------------------------


class Sim:
    """The simulator child and its latest progress line."""

    def __init__(self, spec: dict[str, Any], logdir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "sim", "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(logdir / "sim.log", "ab"), env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
        self.last: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.last = json.loads(line)
            except ValueError:
                pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def get(port: int, host: str, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def latencies(port: int, count: int, budget: float) -> tuple[list[float], int]:
    """``count`` sequential GETs (bounded by ``budget`` seconds): latencies in ms and failures."""
    out, failed = [], 0
    end = time.monotonic() + budget
    for _ in range(count):
        if time.monotonic() > end:
            break
        t = time.perf_counter()
        try:
            ok = get(port, HOST) == 200
        except OSError:
            ok = False
        if ok:
            out.append((time.perf_counter() - t) * 1000)
        else:
            failed += 1
    return out, failed


def status_clients(admin_port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
        conn.request("GET", "/status?limit=0")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return int(body["totals"]["streams"])
    except (OSError, ValueError, AttributeError):
        return None


def wait_for(check: Any, what: str, procs: hb.Procs, limit: float) -> float:
    start = time.monotonic()
    while True:
        procs.check_alive()
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise hb.BenchError(f"{what}: not within {limit:g} s")
        time.sleep(0.1)


def run_one(args: argparse.Namespace, n: int) -> dict[str, Any]:
    tunnel_port, http_port, backend_port, admin_port = hb.free_ports(4)
    tmp = Path(tempfile.mkdtemp(prefix=f"tunneld-fleet-{n}-"))
    server_toml = tmp / "server.toml"
    server_toml.write_text(f"""
[server]
tunnel_listen = "127.0.0.1:{tunnel_port}"
http_listen = "127.0.0.1:{http_port}"
grpc_listen = ""
admin_listen = "127.0.0.1:{admin_port}"
drain_timeout = 1
heartbeat_interval = {args.heartbeat_interval}
heartbeat_timeout = {args.heartbeat_timeout}
open_rate = {args.open_rate}
keepalive_interval = {args.keepalive_interval}
[[groups]]
name = "{GROUP}"
tokens = ["{TOKEN}"]
[[routes]]
name = "fleet"
host = "{HOST}"
group = "{GROUP}"
backend = "http://127.0.0.1:{backend_port}"
""")
    client_toml = tmp / "client.toml"
    client_toml.write_text(f"""
[client]
server = "127.0.0.1:{tunnel_port}"
token = "{TOKEN}"
client_id = "real"
group = "{GROUP}"
drain_timeout = 1
""")
    twistd = hb.find_twistd()
    procs = hb.Procs(tmp)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    result: dict[str, Any] = {"clients": n, "per_channel": args.per_channel,
                              "heartbeats": f"server {args.heartbeat_interval:g} s, clients {args.client_heartbeat:g} s",
                              "client_config_sync": args.client_config_sync,
                              "open_rate": args.open_rate, "keepalive_interval": args.keepalive_interval,
                              "dial_jitter": args.dial_jitter}
    sim: Sim | None = None
    server_argv = [twistd, "-n", "--pidfile=", "tunneld-server", "-c", str(server_toml)]
    try:
        procs.start("backend", [sys.executable, str(HERE / "backend.py"), "--port", str(backend_port)], env)
        server = procs.start("server", server_argv, env)
        procs.start("client", [twistd, "-n", "--pidfile=", "tunneld-client", "-c", str(client_toml)], env)

        def served() -> bool:
            try:
                return get(http_port, HOST, 2) == 200
            except OSError:
                return False

        wait_for(served, "the real client serving", procs, 30)
        time.sleep(1.0)  # settle (a measurement pause, not a test assertion)
        base = hb.proc_status(server.pid).get("VmRSS", 0)
        sim = Sim({"n": n, "per_channel": args.per_channel, "target": f"127.0.0.1:{tunnel_port}",
                   "concurrency": args.concurrency, "client_heartbeat": args.client_heartbeat,
                   "client_config_sync": args.client_config_sync,
                   "dial_jitter": args.dial_jitter,
                   "keepalive": args.client_keepalive or args.keepalive_interval}, tmp)
        start = time.monotonic()
        wait_for(lambda: sim.last.get("connected") == n or sim.proc.poll() is not None, f"{n} clients in",
                 procs, args.connect_limit)
        connect_s = time.monotonic() - start
        result.update(connect_s=round(connect_s, 2), connect_rate=round(n / connect_s),
                      redials=sim.last.get("redials"), refused=sim.last.get("refused"))
        hb.log(f"{n} clients in after {connect_s:.1f} s ({sim.last})")
        time.sleep(args.settle)
        rss = hb.proc_status(server.pid).get("VmRSS", 0)
        result["server_rss_mib"] = round(rss / hb.MIB, 1)
        result["rss_per_client_kib"] = round((rss - base) / n / 1024, 1)
        cpu0, t0 = hb.proc_cpu_seconds(server.pid) or 0.0, time.monotonic()
        time.sleep(args.idle)
        cpu1, t1 = hb.proc_cpu_seconds(server.pid) or 0.0, time.monotonic()
        result["idle_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
        lat, failed = latencies(http_port, args.requests, 60)
        result["latency_ms"] = hb.latency_summary(lat)
        result["failed_requests"] = failed
        result["status_streams"] = status_clients(admin_port)
        if args.restart:
            procs.stop("server")
            t = time.monotonic()
            wait_for(lambda: sim.last.get("connected", n) < n // 2, "the simulated clients noticing the restart",
                     procs, 30)
            server = procs.start("server", server_argv, env)
            lat_storm: list[float] = []
            failed_storm = 0
            deadline = t + args.connect_limit
            while time.monotonic() < deadline:
                if sim.last.get("connected") == n:
                    break
                got, f = latencies(http_port, 5, 2)
                lat_storm += got
                failed_storm += f
            back_s = time.monotonic() - t
            result["restart"] = {"back_s": round(back_s, 1), "all_back": sim.last.get("connected") == n,
                                 "redials_total": sim.last.get("redials"),
                                 "latency_ms": hb.latency_summary(lat_storm), "failed_requests": failed_storm,
                                 "server_rss_mib": round(hb.proc_status(server.pid).get("VmRSS", 0) / hb.MIB, 1)}
    finally:
        if sim is not None:
            sim.stop()
        procs.stop_all()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="driver")
    parser.add_argument("--spec", default="{}")
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--per-channel", type=int, default=1, help="streams per grpc channel (TCP connection)")
    parser.add_argument("--concurrency", type=int, default=500, help="opens in progress at once in the simulator")
    parser.add_argument("--client-heartbeat", type=float, default=30.0,
                        help="each simulated client sends a heartbeat this often, like tunneld-client (0 = never)")
    parser.add_argument("--client-config-sync", type=float, default=30.0,
                        help="each simulated client asks for its routes this often, like tunneld-client's "
                             "config_sync_interval (30 s by default; 0 = never)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="the server's heartbeat_interval")
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0, help="the server's heartbeat_timeout")
    parser.add_argument("--keepalive-interval", type=float, default=10.0,
                        help="the server's keepalive_interval (and the simulated clients', unless --client-keepalive)")
    parser.add_argument("--client-keepalive", type=float, default=0,
                        help="the simulated clients' gRPC keepalive interval (default: --keepalive-interval)")
    parser.add_argument("--open-rate", type=int, default=500, help="the server's open_rate (0 = no limit)")
    parser.add_argument("--dial-jitter", type=float, default=1.0,
                        help="the clients' dial_jitter (s): first dials and first redials after a loss spread over it")
    parser.add_argument("--connect-limit", type=float, default=180)
    parser.add_argument("--settle", type=float, default=5)
    parser.add_argument("--idle", type=float, default=20)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--restart", action="store_true", help="also restart the server and time the storm")
    parser.add_argument("--output", default=str(HERE / "results" / "fleet-latest.json"))
    args = parser.parse_args()
    if args.role == "sim":
        sim_main(json.loads(args.spec))
        return 0
    hb.raise_nofile(2 * max(args.clients) + 2000)
    results = [run_one(args, n) for n in args.clients]
    for r in results:
        print(json.dumps(r), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"commit": hb.git_commit(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
