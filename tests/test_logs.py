"""JSON log lines, how the taps hand them to twistd, and the operating keys of the config files."""

from __future__ import annotations

import io
import json
import os
import signal
import textwrap
from contextlib import redirect_stderr, redirect_stdout

from twisted.application.service import Application, MultiService
from twisted.logger import ILogObserver, Logger, eventsFromJSONLogFile
from twisted.trial.unittest import SynchronousTestCase

from tunneld.__main__ import main
from tunneld.config import ConfigError, load_client_config, load_server_config
from tunneld.logs import JsonLines, with_log_format


class JsonLinesTests(SynchronousTestCase):
    def test_one_json_object_per_line_with_flat_fields(self) -> None:
        """Each event is one JSON line: its own fields plus time, level and the formatted text."""
        out = io.StringIO()
        log = Logger(namespace="tunneld.test", observer=JsonLines(out))
        log.info("{protocol} route={route} status={status}", protocol="http", route="web", status=200,
                 request_id="r-1", trace_id="t-1")
        log.warn("client {client_id} disconnected: {reason}", client_id="a", reason="gone")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertNotIn("\x1e", out.getvalue())
        first, second = (json.loads(line) for line in lines)
        self.assertEqual((first["text"], first["level"]), ("http route=web status=200", "info"))
        self.assertEqual((first["request_id"], first["trace_id"], first["status"]), ("r-1", "t-1", 200))
        self.assertEqual(first["log_namespace"], "tunneld.test")
        self.assertTrue(first["time"].endswith("+00:00"))
        self.assertEqual((second["level"], second["text"]), ("warn", "client a disconnected: gone"))

    def test_lines_read_back_as_twisted_events(self) -> None:
        """The lines are still Twisted's JSON event format: eventsFromJSONLogFile reads them back."""
        out = io.StringIO()
        Logger(observer=JsonLines(out)).info("hello {who}", who="world")
        [event] = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
        self.assertEqual((event["who"], event["text"]), ("world", "hello world"))

    def test_flat_fields_always_have_their_types(self) -> None:
        """time is always the ISO string and text the formatted message, even for legacy log.msg events."""
        from twisted.logger import LogPublisher
        from twisted.python.log import LogPublisher as LegacyPublisher

        out = io.StringIO()
        publisher = LogPublisher(JsonLines(out))
        LegacyPublisher(publisher, publisher).msg("Starting factory", system="-")
        line = json.loads(out.getvalue())
        self.assertEqual((line["text"], line["level"]), ("Starting factory", "info"))
        self.assertIsInstance(line["time"], str)
        self.assertIsInstance(line["log_time"], float)


class WithLogFormatTests(SynchronousTestCase):
    def setUp(self) -> None:
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)

    def test_text_leaves_the_service_alone(self) -> None:
        """log_format "text" (or no twistd options, as in tests) returns the tap's service unchanged."""
        service = MultiService()
        self.assertIs(with_log_format(service, "text", {"nodaemon": True}), service)
        self.assertIs(with_log_format(service, "json", None), service)

    def test_json_sets_the_applications_log_observer(self) -> None:
        """With "json", joining the twistd Application sets its ILogObserver, which twistd prefers."""
        service = MultiService()
        wrapped = with_log_format(service, "json", {"nodaemon": True, "logfile": None, "syslog": False})
        application = Application("tunneld-test")
        wrapped.setServiceParent(application)
        observer = ILogObserver(application)
        self.assertIsInstance(observer, JsonLines)
        self.assertIs(observer.out, __import__("sys").stdout)
        self.assertIs(service.parent, wrapped)

    def test_json_to_the_logfile(self) -> None:
        """A daemon's --logfile gets the JSON lines (a rotating LogFile, as twistd's own)."""
        path = os.path.abspath(self.mktemp())
        wrapped = with_log_format(MultiService(), "json", {"nodaemon": False, "logfile": path, "syslog": False})
        application = Application("tunneld-test")
        wrapped.setServiceParent(application)
        observer = ILogObserver(application)
        Logger(observer=observer).info("to the file {n}", n=1)
        observer.out.flush()
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["text"], "to the file 1")
        observer.out.close()

    def test_syslog_and_an_existing_observer_are_respected(self) -> None:
        """--syslog keeps twistd's syslog observer; an observer already on the application stays."""
        application = Application("tunneld-test")
        with_log_format(MultiService(), "json", {"nodaemon": True, "syslog": True}).setServiceParent(application)
        self.assertIsNone(ILogObserver(application, None))
        application = Application("tunneld-test")
        mine = JsonLines(io.StringIO())
        application.setComponent(ILogObserver, mine)
        with_log_format(MultiService(), "json", {"nodaemon": True}).setServiceParent(application)
        self.assertIs(ILogObserver(application), mine)


class OperatingKeysTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_server_keys(self) -> None:
        """[server] admin_token and log_format load; the token stays out of repr."""
        config = load_server_config(self.write('[server]\nadmin_token = "t0k"\nlog_format = "json"\n'))
        self.assertEqual((config.server.admin_token, config.server.log_format), ("t0k", "json"))
        self.assertNotIn("t0k", repr(config))

    def test_client_keys(self) -> None:
        """[client] admin_listen (off by default), admin_token and log_format load."""
        self.assertEqual(load_client_config(None).client.admin_listen, "")
        config = load_client_config(self.write(
            '[client]\nadmin_listen = "127.0.0.1:9101"\nadmin_token = "c"\nlog_format = "text"\n'))
        c = config.client
        self.assertEqual((c.admin_listen, c.admin_token, c.log_format), ("127.0.0.1:9101", "c", "text"))
        self.assertNotIn("'c'", repr(c))

    def test_bad_values_name_table_and_key(self) -> None:
        """A wrong log_format, admin_token type or client admin_listen is an error naming table and key."""
        cases = [
            (load_server_config, '[server]\nlog_format = "xml"\n', "[server]", "log_format", "must be \"text\" or"),
            (load_server_config, "[server]\nadmin_token = 5\n", "[server]", "admin_token", "must be a string"),
            (load_client_config, '[client]\nlog_format = "JSON"\n', "[client]", "log_format", "'JSON'"),
            (load_client_config, '[client]\nadmin_listen = "9101"\n', "[client]", "admin_listen", "host:port"),
        ]
        for loader, text, table, key, fragment in cases:
            path = self.write(text)
            error = self.assertRaises(ConfigError, loader, path)
            self.assertEqual((error.table, error.key), (table, key), str(error))
            self.assertIn(fragment, str(error))

    def check(self, path: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["check", path])
        return code, out.getvalue(), err.getvalue()

    def test_check_summarises_both_kinds(self) -> None:
        """`python -m tunneld check` prints one line with the admin port (and whether it has a token) and log format."""
        code, out, err = self.check(self.write(
            '[server]\nadmin_token = "t"\nlog_format = "json"\n[[groups]]\nname = "default"\ntokens = ["x-long-enough-token-0123456789"]\n'))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 1)
        self.assertIn("admin 127.0.0.1:9100 (token), log json;", out)
        self.assertNotIn("'t'", out)
        code, out, err = self.check(self.write('[client]\nadmin_listen = "127.0.0.1:9101"\n'))
        self.assertEqual((code, err), (0, ""))
        self.assertIn("admin 127.0.0.1:9101 (no token), log text", out)
        code, out, err = self.check(self.write('[client]\nlog_format = "yaml"\n'))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("[client] key 'log_format'", err)
