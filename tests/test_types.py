"""The pure core and the reactor glue type-check with mypy."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["tunneld/config.py", "tunneld/session.py", "tunneld/window.py", "tunneld/tunnel.py",
        "tunneld/registry", "tunneld/protocols/headers.py", "tunneld/__main__.py", "tunneld/inspector.py",
        "tunneld/dial_report.py", "tunneld/lifecycle.py", "tunneld/protocols/grpc_wire.py", "tunneld/dispatch.py"]


class TypeCheckTests(SynchronousTestCase):
    def test_core_passes_mypy(self) -> None:
        """mypy finds no error in layers 1-2 (config, session, window, tunnel, registry, headers)."""
        try:
            import mypy  # noqa: F401
        except ImportError:
            raise SkipTest("mypy is not installed (pip install -e '.[test]')")
        result = subprocess.run([sys.executable, "-m", "mypy", *CORE], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
