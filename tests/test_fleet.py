"""A few hundred simulated clients against an in-process server, over loopback.

The clients are ``bench/fleet_sim.py --role sim`` in a child process (real
tunnel streams over grpc.aio: open, authenticate, answer heartbeats and
requests).  A real tunneld client in the same group keeps being served while
they are connected, and once they leave the server's tables are empty again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.backends import test_site
from tests.harness import TOKEN, Stack, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = os.path.join(ROOT, "bench", "fleet_sim.py")
CLIENTS = 300


class FleetTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        site, self.held, _ = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        origin = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.stack = Stack([{"name": "web", "backend": origin, "host": "app.example.com"}],
                           server={"open_rate": 1000, "open_burst": 100})
        yield self.stack.start()
        self.sim: subprocess.Popen[bytes] | None = None
        self.last: dict[str, Any] = {}

    @inlineCallbacks
    def tearDown(self) -> Any:
        self.held.release()
        self.stop_sim()
        yield self.stack.stop()
        yield self.backend.stopListening()

    def start_sim(self, n: int) -> None:
        spec = {"n": n, "per_channel": 1, "target": f"127.0.0.1:{self.stack.tunnel_port}", "token": TOKEN,
                "group": "default", "concurrency": 100, "client_heartbeat": 1.0}
        self.sim = subprocess.Popen([sys.executable, SIM, "--role", "sim", "--spec", json.dumps(spec)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "GRPC_VERBOSITY": "ERROR"})

        def read() -> None:
            assert self.sim is not None and self.sim.stdout is not None
            for line in self.sim.stdout:
                self.last = json.loads(line)

        threading.Thread(target=read, daemon=True).start()

    def stop_sim(self) -> None:
        if self.sim is not None and self.sim.poll() is None:
            assert self.sim.stdin is not None
            self.sim.stdin.close()
            try:
                self.sim.wait(20)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait(5)

    @inlineCallbacks
    def get(self) -> Any:
        resp = yield treq.get(self.stack.url("/"), headers={b"Host": [b"app.example.com"]}, persistent=False)
        body = yield treq.content(resp)
        return resp.code, body

    @inlineCallbacks
    def test_few_hundred_clients_come_and_go(self) -> Any:
        """300 simulated clients connect; requests are served meanwhile; after they leave the tables are empty."""
        yield self.stack.add_client(client_id="real")
        hub = self.stack.server.hub
        self.start_sim(CLIENTS)
        yield wait_for(lambda: len(hub.registry) == CLIENTS + 1, timeout=30, what=f"{CLIENTS} simulated clients")
        self.assertEqual(self.sim.poll(), None)
        bodies = []
        for _ in range(20):
            code, body = yield self.get()
            self.assertEqual(code, 200)
            bodies.append(body)
        # The group's streams share the requests: simulated clients answer "sim".
        self.assertIn(b"sim", bodies)
        self.assertEqual(hub.in_flight(), 0)
        self.stop_sim()
        self.assertEqual(self.sim.returncode, 0)
        yield wait_for(lambda: len(hub.registry) == 1 and len(hub.streams) == 1, timeout=20,
                       what="the simulated clients' streams gone from the server")
        (entry,) = hub.registry.streams()
        self.assertEqual(entry.client_id, "real")
        self.assertEqual(hub.registry.groups(), ["default"])
        self.assertEqual(sum(len(orders) for loads in hub.registry._loads.values() for orders in loads.values()), 1)
        code, _ = yield self.get()
        self.assertEqual(code, 200)
