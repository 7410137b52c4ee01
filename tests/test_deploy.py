"""Deployment files: the LSB init scripts run for real (daemons on temporary paths), the systemd units checked."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web import resource, server

from tests.harness import wait_for
from tests.processes import free_port, toml_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ADMIN_TOKEN = "init-admin-token"
TOKEN = "init-token"


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello from the backend\n"


class InitScriptTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.backend = reactor.listenTCP(0, server.Site(Hello()), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ports = {name: free_port() for name in ("tunnel", "http", "admin", "client_admin")}
        origin = f"http://127.0.0.1:{self.backend.getHost().port}"
        self.server_toml = os.path.join(self.tmp, "server.toml")
        self.routes = [{"name": "web", "group": "default", "backend": origin, "host": "one.test"}]
        self.write_server_config()
        self.client_toml = os.path.join(self.tmp, "client.toml")
        self.write_client_config()

    def write_client_config(self, **extra: Any) -> None:
        with open(self.client_toml, "w") as f:
            f.write(toml_table("client", {
                "server": f"127.0.0.1:{self.ports['tunnel']}", "token": TOKEN, "client_id": "init-client",
                "drain_timeout": 1, "heartbeat_interval": 1, "admin_listen": f"127.0.0.1:{self.ports['client_admin']}",
                **extra,
            }))

    def write_server_config(self) -> None:
        text = toml_table("server", {
            "tunnel_listen": f"127.0.0.1:{self.ports['tunnel']}", "http_listen": f"127.0.0.1:{self.ports['http']}",
            "grpc_listen": "", "admin_listen": f"127.0.0.1:{self.ports['admin']}", "admin_token": ADMIN_TOKEN,
            "log_format": "json", "drain_timeout": 1, "heartbeat_interval": 1, "cleanup_interval": 1,
        })
        text += toml_table("groups", {"name": "default", "tokens": [TOKEN]}, array=True)
        for route in self.routes:
            text += toml_table("routes", route, array=True)
        with open(self.server_toml, "w") as f:
            f.write(text)

    def env(self, kind: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "TUNNELD_DEFAULTS": os.path.join(self.tmp, "no-defaults-file"),
            "TUNNELD_TWISTD": os.path.join(BIN, "twistd"),
            "TUNNELD_CONFIG": self.server_toml if kind == "server" else self.client_toml,
            "TUNNELD_PIDFILE": os.path.join(self.tmp, "run", f"{kind}.pid"),
            "TUNNELD_LOGFILE": os.path.join(self.tmp, "log", f"{kind}.log"),
            "TUNNELD_USER": "",
            "TUNNELD_STOP_TIMEOUT": "20",
        })
        env.update(extra)
        return env

    def script(self, kind: str, command: str, **extra: str) -> Any:
        """Run etc/init.d/tunneld-KIND COMMAND; fires with (exit status, stdout + stderr)."""
        if kind in ("server", "client") and command == "start":
            self.addCleanup(self.kill_daemon, kind)
        # subprocess, not reactor.spawnProcess: spawnProcess forks with os.fork(), and in a process
        # where gRPC already runs, grpc's at-fork handlers can abort the child before it execs.
        # subprocess uses vfork/posix_spawn, which run no at-fork handlers.
        argv = ["/bin/sh", os.path.join(ROOT, "etc", "init.d", f"tunneld-{kind}"), command]
        d = deferToThread(subprocess.run, argv, env=self.env(kind, **extra), cwd=ROOT, capture_output=True,
                          timeout=60)
        return d.addCallback(lambda r: (r.returncode, (r.stdout + r.stderr).decode()))

    def pid(self, kind: str) -> int | None:
        try:
            with open(os.path.join(self.tmp, "run", f"{kind}.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill_daemon(self, kind: str) -> None:
        """Cleanup if a test failed half-way: SIGKILL the daemon this test started, by its pid file."""
        pid = self.pid(kind)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log(self, kind: str) -> str:
        try:
            with open(os.path.join(self.tmp, "log", f"{kind}.log")) as f:
                return f.read()
        except OSError:
            return ""

    @inlineCallbacks
    def get(self, url: str, **kwargs: Any) -> Any:
        try:
            resp = yield treq.get(url.encode(), persistent=False, timeout=5, **kwargs)
            body = yield treq.content(resp)
            return resp.code, body
        except Exception as e:
            return 0, repr(e).encode()

    @inlineCallbacks
    def wait_get(self, url: str, code: int, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 20
        while True:
            got = yield self.get(url, **kwargs)
            if got[0] == code:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: no {code} (last {got!r})\n{self.log('server')}\n{self.log('client')}")
            yield deferLater(reactor, 0.1, lambda: None)

    @inlineCallbacks
    def test_start_status_reload_stop(self) -> Any:
        """The init scripts daemonize server and client, which carry traffic; status, reload and stop behave (LSB)."""
        code, out = yield self.script("server", "status")
        self.assertEqual((code, out.strip()), (3, "tunneld-server is not running"))
        code, out = yield self.script("server", "start")
        self.assertEqual(code, 0, out + self.log("server"))
        server_pid = self.pid("server")
        self.assertIn(f"tunneld-server started (pid {server_pid})", out)
        code, out = yield self.script("server", "status")
        self.assertEqual((code, out.strip()), (0, f"tunneld-server is running (pid {server_pid})"))
        code, out = yield self.script("server", "start")
        self.assertEqual((code, out.strip()), (0, f"tunneld-server is already running (pid {server_pid})"))

        # The daemon answers before any client is there: 502 on its route, and its admin port.
        http = f"http://127.0.0.1:{self.ports['http']}/hi"
        code, _ = yield self.wait_get(http, 502, headers={b"Host": [b"one.test"]})
        code, _ = yield self.get(f"http://127.0.0.1:{self.ports['admin']}/status")
        self.assertEqual(code, 401)

        code, out = yield self.script("client", "start")
        self.assertEqual(code, 0, out + self.log("client"))
        code, body = yield self.wait_get(http, 200, headers={b"Host": [b"one.test"]})
        self.assertEqual(body, b"hello from the backend\n")
        code, body = yield self.get(f"http://127.0.0.1:{self.ports['admin']}/status",
                                    headers={b"Authorization": [f"Bearer {ADMIN_TOKEN}".encode()]})
        self.assertEqual(code, 200)
        self.assertEqual([(c["client_id"], c["group"]) for c in json.loads(body)["clients"]],
                         [("init-client", "default")])
        code, body = yield self.get(f"http://127.0.0.1:{self.ports['client_admin']}/status")
        self.assertEqual((code, json.loads(body)["connected"]), (200, True))

        # reload = SIGHUP: the server re-reads its file; a route added there starts answering.
        code, _ = yield self.get(f"http://127.0.0.1:{self.ports['http']}/hi", headers={b"Host": [b"two.test"]})
        self.assertEqual(code, 404)
        self.routes.append({**self.routes[0], "name": "web2", "host": "two.test"})
        self.write_server_config()
        code, out = yield self.script("server", "reload")
        self.assertEqual((code, out.strip()), (0, f"tunneld-server reloading its config (pid {server_pid})"))
        yield self.wait_get(http, 200, headers={b"Host": [b"two.test"]})
        self.assertEqual(self.pid("server"), server_pid)
        # The client reloads on SIGHUP too: its allow_backends now leaves out the route's backend
        # (502 from the next request) and its admin port wants a token; same process.
        client_pid = self.pid("client")
        self.write_client_config(allow_backends=["127.0.0.1:1"], admin_token=ADMIN_TOKEN)
        code, out = yield self.script("client", "reload")
        self.assertEqual((code, out.strip()), (0, f"tunneld-client reloading its config (pid {client_pid})"))
        yield self.wait_get(http, 502, headers={b"Host": [b"one.test"]})
        code, _ = yield self.get(f"http://127.0.0.1:{self.ports['client_admin']}/status")
        self.assertEqual(code, 401)
        yield wait_for(lambda: f"config reloaded from {self.client_toml}: changed allow_backends, admin_token"
                       in self.log("client"), what="the client's reload log line")
        # A broken file is refused, named in the log, and the running config stays.
        with open(self.client_toml, "a") as f:
            f.write("max_concurrency = \"lots\"\n")
        code, out = yield self.script("client", "reload")
        self.assertEqual(code, 0, out)
        yield wait_for(lambda: "config reload refused, keeping the running config" in self.log("client"),
                       what="the client's refusal logged")
        self.assertIn("max_concurrency", self.log("client"))
        code, _ = yield self.get(http, headers={b"Host": [b"one.test"]})
        self.assertEqual(code, 502)
        self.write_client_config()
        code, out = yield self.script("client", "reload")
        self.assertEqual(code, 0, out)
        yield self.wait_get(http, 200, headers={b"Host": [b"one.test"]})
        self.assertEqual(self.pid("client"), client_pid)

        for kind in ("client", "server"):
            pid = self.pid(kind)
            code, out = yield self.script(kind, "stop")
            self.assertEqual((code, out.strip()), (0, f"tunneld-{kind} stopped"))
            self.assertFalse(os.path.exists(os.path.join(self.tmp, "run", f"{kind}.pid")))
            self.assertFalse(os.path.exists(f"/proc/{pid}"))
            code, _ = yield self.script(kind, "status")
            self.assertEqual(code, 3)
        code, out = yield self.script("server", "stop")
        self.assertEqual((code, out.strip()), (0, "tunneld-server is not running"))
        code, _ = yield self.script("server", "reload")
        self.assertEqual(code, 7)

        # log_format = "json": the server's log file is JSON lines; the client's is text.
        events = [json.loads(line) for line in self.log("server").splitlines()]
        texts = [e["text"] for e in events]
        self.assertTrue(any("client init-client connected to group default" in t for t in texts), texts)
        self.assertTrue(any(e.get("route") == "web" and e.get("status") == 200 and e.get("trace_id") for e in events))
        self.assertIn("connected to 127.0.0.1:", self.log("client"))
        self.assertNotIn("Traceback", self.log("server") + self.log("client"))

    @inlineCallbacks
    def test_start_refuses_a_broken_config(self) -> Any:
        """start checks the config first: a broken file is named with table and key, and nothing starts."""
        with open(self.server_toml, "a") as f:
            f.write('\n[[routes]]\nname = "bad"\ngroup = "nope"\nbackend = "http://127.0.0.1:1"\n')
        code, out = yield self.script("server", "start")
        self.assertEqual(code, 1)
        self.assertIn("tunneld-server not started:", out)
        self.assertIn("key 'group': unknown group 'nope'", out)
        self.assertIsNone(self.pid("server"))
        if os.getuid() == 0:
            code, out = yield self.script("client", "start", TUNNELD_USER="tunneld-no-such-user")
            self.assertEqual(code, 1)
            self.assertIn("user tunneld-no-such-user does not exist", out)
            self.assertIsNone(self.pid("client"))

    @inlineCallbacks
    def test_stale_pid_file(self) -> Any:
        """A pid file naming a dead (or unrelated) process is status 1, and start replaces it."""
        os.makedirs(os.path.join(self.tmp, "run"))
        with open(os.path.join(self.tmp, "run", "server.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")  # alive, but not a tunneld-server
        code, out = yield self.script("server", "status")
        self.assertEqual(code, 1, out)
        code, out = yield self.script("server", "start")
        self.assertEqual(code, 0, out + self.log("server"))
        self.assertNotEqual(self.pid("server"), os.getpid())
        code, out = yield self.script("server", "stop")
        self.assertEqual(code, 0, out)


class DeploymentFileTests(SynchronousTestCase):
    def read(self, *path: str) -> str:
        with open(os.path.join(ROOT, *path)) as f:
            return f.read()

    def test_init_scripts_differ_only_in_names(self) -> None:
        """The client's init script is the server's with the names changed (no drift between them)."""
        server = self.read("etc", "init.d", "tunneld-server")
        client = self.read("etc", "init.d", "tunneld-client")
        body = server[server.index("\nNAME="):]
        self.assertEqual(body.replace("server", "client"), client[client.index("\nNAME="):])
        for name, text in (("tunneld-server", server), ("tunneld-client", client)):
            self.assertIn(f"# Provides:          {name}\n", text)
            self.assertTrue(os.access(os.path.join(ROOT, "etc", "init.d", name), os.X_OK))

    def unit(self, name: str) -> configparser.RawConfigParser:
        parser = configparser.RawConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(self.read("etc", "systemd", name))
        return parser

    def test_systemd_units(self) -> None:
        """The units run twistd in the foreground with no pid file; both reload with SIGHUP."""
        for kind in ("server", "client"):
            unit = self.unit(f"tunneld-{kind}.service")
            self.assertEqual(unit["Service"]["Type"], "simple")
            self.assertEqual(unit["Service"]["ExecStart"],
                             f"/opt/tunneld/bin/twistd -n --pidfile= tunneld-{kind} -c /etc/tunneld/{kind}.toml")
            self.assertEqual(unit["Service"]["ExecStartPre"],
                             f"/opt/tunneld/bin/python -m tunneld check /etc/tunneld/{kind}.toml")
            self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")
        for kind in ("server", "client"):
            self.assertEqual(self.unit(f"tunneld-{kind}.service")["Service"]["ExecReload"], "/bin/kill -HUP $MAINPID")

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts both units (with this venv's paths in place of /opt/tunneld)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise SkipTest("systemd-analyze is not installed")
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        paths = []
        for kind in ("server", "client"):
            path = os.path.join(tmp, f"tunneld-{kind}.service")
            with open(path, "w") as f:
                f.write(self.read("etc", "systemd", f"tunneld-{kind}.service").replace("/opt/tunneld/bin/", BIN + "/"))
            paths.append(path)
        result = subprocess.run([tool, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""), result.stdout)
