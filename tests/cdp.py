"""Headless Chromium driven over the Chrome DevTools Protocol, for the browser tests.

``Chromium`` starts the browser with ``--remote-debugging-port=0`` in a fresh
profile and reads the port it chose from ``DevToolsActivePort``; ``DevTools``
is a blocking client of one page target (the ``websockets`` sync client plus
a reader thread that files answers by id and keeps every event).  Both are
blocking: tests call them from a thread (``Browser.run``) so the reactor
keeps serving the pages being tested.  The process is stopped by its own PID
(its process group, which holds only Chromium's helpers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, TestCase
from websockets.sync.client import ClientConnection, connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-breakpad", "--disable-crash-reporter", "--remote-debugging-port=0"]


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SkipTest("chromium is not installed (.ci/run installs it)")
    return found


class DevTools:
    """A blocking CDP session with one page: ``call`` a method, read ``events``."""

    def __init__(self, url: str) -> None:
        self.ws: ClientConnection = connect(url, max_size=None, open_timeout=10)
        self._next = 0
        self._lock = threading.Lock()
        self._answers: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition(self._lock)
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                msg = json.loads(raw)
                with self._arrived:
                    if "id" in msg:
                        self._answers[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._arrived.notify_all()
        except Exception:
            pass
        with self._arrived:
            self._arrived.notify_all()

    def call(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            ident = self._next
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        with self._arrived:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise TimeoutError(f"no answer to {method} within {timeout} s")
                self._arrived.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for_text(self, text: str, timeout: float = 20.0, interval: float = 0.1) -> str:
        """Poll ``document.body.innerText`` until it contains ``text``; return it."""
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            body = self.evaluate("document.body ? document.body.innerText : ''") or ""
            if text in body:
                return str(body)
            time.sleep(interval)  # polling the page from the test's own thread, with a bound
        raise AssertionError(f"{text!r} did not appear within {timeout} s; the page shows:\n{body}")

    def wait_for_js(self, expression: str, timeout: float = 20.0, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)  # polling the page from the test's own thread, with a bound
        raise AssertionError(f"{expression!r} stayed falsy for {timeout} s")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP, failed loads) so far."""
        with self._lock:
            events = list(self.events)
        errors = []
        for e in events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(p.get("exceptionDetails"))[:500])
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
        return errors

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self._reader.join(5)


class Browser:
    """One headless Chromium for a test case, stopped in cleanup; ``page()`` gives a DevTools session."""

    def __init__(self, case: TestCase, extra_flags: tuple[str, ...] = ()) -> None:
        self.case = case
        self.profile = tempfile.mkdtemp(prefix="tunneld-chromium-")
        case.addCleanup(shutil.rmtree, self.profile, True)
        self.proc = subprocess.Popen(
            [chromium_binary(), *FLAGS, *extra_flags, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="cdp")
        self.pool.start()
        case.addCleanup(self.pool.stop)
        # Cleanups run last-in first-out: the browser dies first, so a call
        # still waiting in the pool's thread fails at once and the pool stops.
        case.addCleanup(self.stop)
        self.devtools: DevTools | None = None

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run blocking ``fn`` in the browser's thread; a Deferred of its result."""
        return deferToThreadPool(reactor, self.pool, fn, *args, **kwargs)

    def port(self) -> int | None:
        try:
            with open(os.path.join(self.profile, "DevToolsActivePort")) as f:
                first = f.readline().strip()
        except OSError:
            return None
        return int(first) if first.isdigit() else None

    def attach(self) -> DevTools:
        """Blocking: connect to the first page target, enable Runtime, Log and Page events."""
        port = self.port()
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            devtools.call(f"{domain}.enable")
        self.devtools = devtools
        return devtools

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.devtools is not None:
            self.devtools.close()
