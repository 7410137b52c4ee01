"""The package builds without setuptools warnings, and the wheel carries the dashboard and the twistd plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WheelTests(SynchronousTestCase):
    def test_wheel_builds_cleanly_with_the_dashboard(self) -> None:
        """`pip wheel` prints no warning; the wheel holds dashboard/*.html/css/js and twisted/plugins/."""
        tree = os.path.abspath(self.mktemp())
        os.makedirs(tree)
        # A copy of what the build reads: building in the worktree would leave build/ there.
        for name in ("setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy(os.path.join(ROOT, name), tree)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        for name in ("tunneld", "twisted"):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(tree, name), ignore=ignore)
        out = os.path.join(tree, "dist")
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                               "-w", out], cwd=tree, capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertNotIn("warning", (done.stdout + done.stderr).lower(), done.stdout + done.stderr)
        [wheel] = [f for f in os.listdir(out) if f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(out, wheel)) as z:
            names = set(z.namelist())
        for name in ("tunneld/dashboard/index.html", "tunneld/dashboard/dashboard.css",
                     "tunneld/dashboard/dashboard.js", "twisted/plugins/tunneld_server.py",
                     "twisted/plugins/tunneld_client.py", "tunneld/py.typed"):
            self.assertIn(name, names)


class MakefileTests(SynchronousTestCase):
    def test_old_python_is_refused_with_a_clear_message(self) -> None:
        """`make` with a Python older than 3.11 stops before making a venv and says what to do."""
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        old = os.path.join(tmp, "python3.9")
        with open(old, "w") as f:
            f.write('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "Python 3.9.2"; exit 0; fi\nexit 1\n')
        os.chmod(old, 0o755)
        venv = os.path.join(tmp, "venv")
        done = subprocess.run(["make", "venv", f"PYTHON={old}", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f"tunneld needs Python >= 3.11, but '{old}' is Python 3.9.2.", done.stderr)
        self.assertIn("PYTHON=python3.11", done.stderr)
        self.assertFalse(os.path.exists(venv))
