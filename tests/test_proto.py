"""The committed generated code matches proto/tunnel.proto."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATED = ("tunnel_pb2.py", "tunnel_pb2_grpc.py", "tunnel_pb2.pyi")


class GeneratedCodeTests(SynchronousTestCase):
    def test_generated_code_matches_proto(self) -> None:
        """Regenerating from proto/ into a temp dir gives exactly the committed files."""
        out = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(out, "tunneld"))
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-Itunneld={os.path.join(ROOT, 'proto')}",
             f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", "tunneld/tunnel.proto"],
            check=True, cwd=ROOT,
        )
        for name in GENERATED:
            with open(os.path.join(out, "tunneld", name), "rb") as f:
                fresh = f.read()
            with open(os.path.join(ROOT, "tunneld", name), "rb") as f:
                committed = f.read()
            self.assertEqual(fresh, committed, f"tunneld/{name} is stale: run `make proto` and commit it")
