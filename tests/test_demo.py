"""`make demo` as a newcomer runs it: every protocol through the tunnel, and the dashboard's inspector.

Runs scripts/demo.sh (what `make demo` runs) on free ports (the shipped
configs with their ports replaced), reads what it prints, uses HTTP, the
WebSocket chat, both gRPC calls and /inspect, then stops it by its PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class DemoTests(SynchronousTestCase):
    def test_demo_serves_every_protocol_and_the_dashboard(self) -> None:
        """The demo prints an HTTP, WebSocket, gRPC and dashboard line, and each of them works."""
        tunnel, http, grpc_entry, admin, backend, ws, grpc_port = free_ports(7)
        tmp = tempfile.mkdtemp(prefix="tunneld-demo-test-")
        with open(os.path.join(ROOT, "etc", "server.toml"), encoding="utf-8") as f:
            server = f.read()
        for old, new in (("127.0.0.1:7000", tunnel), ("127.0.0.1:8080", http), ("127.0.0.1:8081", grpc_entry),
                         ("127.0.0.1:9100", admin), ("127.0.0.1:3000", backend), ("127.0.0.1:3001", ws),
                         ("127.0.0.1:3002", grpc_port)):
            self.assertIn(old, server)
            server = server.replace(f'"{old}"', f'"127.0.0.1:{new}"').replace(f"//{old}", f"//127.0.0.1:{new}")
        with open(os.path.join(ROOT, "etc", "client.toml"), encoding="utf-8") as f:
            client = f.read().replace('"127.0.0.1:7000"', f'"127.0.0.1:{tunnel}"')
        server_conf, client_conf = os.path.join(tmp, "server.toml"), os.path.join(tmp, "client.toml")
        with open(server_conf, "w", encoding="utf-8") as f:
            f.write(server)
        with open(client_conf, "w", encoding="utf-8") as f:
            f.write(client)
        venv = os.path.dirname(os.path.dirname(sys.executable))
        env = {**os.environ, "VENV": venv, "SERVER_CONF": server_conf, "CLIENT_CONF": client_conf,
               "BACKEND_PORT": str(backend), "WS_PORT": str(ws), "GRPC_PORT": str(grpc_port)}
        log = open(os.path.join(tmp, "demo.out"), "w+b")
        self.addCleanup(log.close)
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.addCleanup(self._stop, proc)
        deadline = time.monotonic() + 60
        out = ""
        while "Ctrl-C stops everything." not in out:
            self.assertIsNone(proc.poll(), f"demo exited early:\n{out}")
            self.assertLess(time.monotonic(), deadline, f"demo not up within 60 s:\n{out}")
            time.sleep(0.2)   # polling the demo's output file, with a bound
            log.seek(0)
            out = log.read().decode("utf-8", "replace")
        entry = f"http://127.0.0.1:{http}"
        for expected in (f"curl -i {entry}/", f"{entry}/chat/", f"-m tunneld.demo ws ws://127.0.0.1:{http}/chat/ws",
                         f"-m tunneld.demo call --target 127.0.0.1:{grpc_entry} Say",
                         f"-m tunneld.demo call --target 127.0.0.1:{grpc_entry} Count",
                         f"http://127.0.0.1:{admin}/"):
            self.assertIn(expected, out)
        self.assertNotIn("hint \"open ", out)
        # The demo waited for /healthz, not on the entry: a fresh dashboard shows no failures.
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=10) as resp:
            fresh = json.load(resp)
        self.assertEqual((fresh["totals"]["errors"], fresh["recent_errors"]), (0, []))
        with urllib.request.urlopen(f"{entry}/", timeout=10) as resp:
            self.assertEqual(resp.status, 200)
        with urllib.request.urlopen(f"{entry}/chat/", timeout=10) as resp:
            self.assertIn(b"WebSocket through the tunnel", resp.read())
        demo = [sys.executable, "-m", "tunneld.demo"]
        run = lambda *a: subprocess.run([*demo, *a], capture_output=True, text=True, timeout=30, cwd=ROOT)  # noqa: E731
        said = run("ws", f"ws://127.0.0.1:{http}/chat/ws", "hi there")
        self.assertEqual(said.stdout.strip(), "echo #1: hi there", said.stderr)
        said = run("call", "--target", f"127.0.0.1:{grpc_entry}", "Say", "hello")
        self.assertEqual(said.stdout.strip(), "you said: hello", said.stderr)
        said = run("call", "--target", f"127.0.0.1:{grpc_entry}", "Count", "3")
        self.assertEqual(said.stdout.split("\n")[:3], ["1 of 3", "2 of 3", "3 of 3"], said.stderr)
        protocols: set[str] = set()
        deadline = time.monotonic() + 20
        while protocols != {"http", "websocket", "grpc"} and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/inspect", timeout=10) as resp:
                protocols = {e["protocol"] for e in json.load(resp)["exchanges"] if e["done"]}
            time.sleep(0.1)   # bounded poll of the inspector
        self.assertEqual(protocols, {"http", "websocket", "grpc"})
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/", timeout=10) as resp:
            self.assertIn(b"dashboard.js", resp.read())
        self.assertTrue(re.search(r"started client \(pid \d+\)", out))
        # Ctrl-C in a terminal signals the whole process group, and the script forwards SIGTERM too:
        # each process gets two stop signals, and neither log may show a critical line.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        for name in ("server", "client"):
            with open(os.path.join(ROOT, ".demo", f"{name}.log"), encoding="utf-8", errors="replace") as f:
                text = f.read()
            self.assertNotIn("#critical", text, name)
            self.assertNotIn("Traceback", text, name)
            self.assertIn("Server Shut Down.", text, name)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # the script stops its children by PID
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
