"""grpc-js peers through the tunnel (Node.js, tests/grpc_js/peer.js): every call kind, both directions of peers.

grpc-js is what the benchmark's figures were measured with and a different
HTTP/2 implementation from grpcio's: a grpc-js caller against a grpcio
backend, a grpcio caller against a grpc-js backend, and grpc-js at both ends.
Skipped when node or @grpc/grpc-js (``npm ci`` in bench/grpc_js) is missing;
.ci/run installs both.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import grpc
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.grpc_services import RAW_SERVICE, GrpcBackend
from tests.harness import Stack
from tests.test_e2e_http import PooledTestCase

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "tests" / "grpc_js" / "peer.js"
NODE = shutil.which("node")
MISSING = ("node is not installed" if NODE is None else
           "@grpc/grpc-js is not installed (npm ci --prefix bench/grpc_js)"
           if not (ROOT / "bench" / "grpc_js" / "node_modules" / "@grpc" / "grpc-js").is_dir() else "")


def js_calls(target: str) -> dict[str, Any]:
    out = subprocess.run([NODE or "node", str(PEER), "call", target], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


class JsBackend:
    """``node peer.js serve``: a grpc-js backend on an ephemeral port."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([NODE or "node", str(PEER), "serve", "0"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["listening"], line
        self.port = int(line[1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class GrpcJsTests(PooledTestCase):
    timeout = 120
    skip = MISSING or None

    @inlineCallbacks
    def start(self, backend_url: str) -> Any:
        stack = Stack([{"name": "raw", "grpc_service": RAW_SERVICE, "backend": backend_url}],
                      server={"grpc_listen": "127.0.0.1:0"})
        yield stack.start()
        self.addCleanup(stack.stop)
        yield stack.add_client()
        return stack

    def assertJsCalls(self, got: dict[str, Any]) -> None:
        self.assertEqual(got["unary"], {"err": 0, "answer": "hello js", "headers": {"a": "1", "bin": "0001ff"},
                                        "trailers": {"t": "done", "bin": "00feff"}})
        self.assertEqual(got["client_stream"], {"count": 100, "total": sum(1000 + i for i in range(100))})
        self.assertEqual(got["server_stream"], {"code": 0, "messages": 500, "in_order": True})
        self.assertEqual(got["bidi"], {"code": 0, "replies": [f"re: ping {i}" for i in range(5)]})
        self.assertEqual(got["error"], {"code": grpc.StatusCode.PERMISSION_DENIED.value[0],
                                        "details": "not for you: js", "reason": "policy"})

    @inlineCallbacks
    def test_grpc_js_caller_to_grpcio_backend(self) -> Any:
        """A grpc-js caller: unary with -bin metadata and trailers, client, server and bidi streaming, an error."""
        backend = GrpcBackend(workers=8)
        self.addCleanup(deferToThread, backend.stop)
        stack = yield self.start(backend.url)
        got = yield deferToThread(js_calls, f"127.0.0.1:{stack.grpc_port}")
        self.assertJsCalls(got)

    @inlineCallbacks
    def test_grpc_js_at_both_ends(self) -> Any:
        """grpc-js caller and grpc-js backend: every call kind."""
        backend = JsBackend()
        self.addCleanup(backend.stop)
        stack = yield self.start(f"grpc://127.0.0.1:{backend.port}")
        got = yield deferToThread(js_calls, f"127.0.0.1:{stack.grpc_port}")
        self.assertJsCalls(got)

    @inlineCallbacks
    def test_grpcio_caller_to_grpc_js_backend(self) -> Any:
        """A grpcio caller against a grpc-js backend: every call kind, metadata and status exact."""
        backend = JsBackend()
        self.addCleanup(backend.stop)
        stack = yield self.start(f"grpc://127.0.0.1:{backend.port}")

        def calls() -> dict[str, Any]:
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
                m = lambda kind, name: getattr(channel, kind)(f"/{RAW_SERVICE}/{name}")  # noqa: E731
                body, call = m("unary_unary", "Echo").with_call(
                    b"hi", metadata=(("x-a", "1"), ("x-blob-bin", b"\x00\x01")), timeout=10)
                out: dict[str, Any] = {"unary": (body, dict(call.initial_metadata()), dict(call.trailing_metadata()))}
                out["sum"] = struct.unpack("!QQ", m("stream_unary", "Sum")(iter([b"a" * 10, b"b" * 20]), timeout=10))
                out["count"] = len(list(m("unary_stream", "Count")(struct.pack("!II", 300, 64), timeout=10)))
                out["chat"] = list(m("stream_stream", "Chat")(iter([b"x", b"y"]), timeout=10))
                try:
                    m("unary_unary", "Deny")(b"py", timeout=10)
                except grpc.RpcError as e:
                    out["deny"] = (e.code(), e.details(), dict(e.trailing_metadata()))
                return out

        got = yield deferToThread(calls)
        body, headers, trailers = got["unary"]
        self.assertEqual(body, b"hi")
        self.assertEqual((headers["x-a"], headers["x-blob-bin"]), ("1", b"\x00\x01"))
        self.assertEqual(trailers, {"x-trailer": "done", "x-trailer-bin": b"\x00\xfe\xff"})
        self.assertEqual(got["sum"], (2, 30))
        self.assertEqual(got["count"], 300)
        self.assertEqual(got["chat"], [b"re: x", b"re: y"])
        self.assertEqual(got["deny"][:2], (grpc.StatusCode.PERMISSION_DENIED, "not for you: py"))
        self.assertEqual(got["deny"][2].get("x-reason"), "policy")
