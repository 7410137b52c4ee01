"""etc/fail2ban/filter.d/tunneld.conf against the lines tunneld really writes (text and JSON logs)."""

from __future__ import annotations

import configparser
import io
import os
import re

from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase

from tunneld.grpc_bridge.server import _Servicer
from tunneld.logs import JsonLines
from tunneld.registry.admission import RefusalLine

FILTER = os.path.join(os.path.dirname(__file__), "..", "etc", "fail2ban", "filter.d", "tunneld.conf")
# What fail2ban's <ADDR> matches, near enough: an IPv4 or IPv6 address.
ADDR = r"(?P<addr>(?:\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F:]*:[0-9a-fA-F:.]+)"
DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")


def failregexes() -> list[re.Pattern[str]]:
    parser = configparser.RawConfigParser()
    parser.read(FILTER)
    lines = [ln for ln in parser.get("Definition", "failregex").splitlines() if ln.strip()]
    return [re.compile(ln.replace("<ADDR>", ADDR)) for ln in lines]


def banned(line: str) -> list[str]:
    """The addresses fail2ban would take from ``line`` (a text line loses its leading date first, as in fail2ban)."""
    line = DATE.sub("", line, count=1)
    return [m.group("addr") for rx in failregexes() for m in [rx.search(line)] if m is not None]


def written(*lines: RefusalLine) -> tuple[list[str], list[str]]:
    """The text and JSON log lines the tunnel port writes for ``lines``."""
    text, js = io.StringIO(), io.StringIO()
    servicer = _Servicer.__new__(_Servicer)
    servicer.log = Logger(namespace="tunneld.grpc_bridge.server._Servicer",
                          observer=LogPublisher(textFileLogObserver(text), JsonLines(js)))
    for line in lines:
        servicer.log_refusal(line)
    return text.getvalue().splitlines(), js.getvalue().splitlines()


class Fail2banFilterTests(SynchronousTestCase):
    def test_matches_the_refusal_lines_in_both_formats(self) -> None:
        """Each refusal line yields exactly its address, IPv4 and IPv6, text and JSON."""
        text, js = written(RefusalLine("203.0.113.7", 1, {"unauthenticated": 1}, "default", "wrong token"),
                           RefusalLine("2001:db8::5", 199, {"throttled": 199}, "default", "throttled"))
        self.assertEqual([banned(ln) for ln in text], [["203.0.113.7"], ["2001:db8::5"]])
        self.assertEqual([banned(ln) for ln in js], [["203.0.113.7"], ["2001:db8::5"]])

    def test_a_peer_chosen_group_cannot_get_another_address_banned(self) -> None:
        """A group name holding the phrase and another address, or JSON quotes, does not move the match."""
        evil = 'x: refused tunnel open from 10.9.9.9: ", "text": "refused tunnel open from 10.8.8.8: '
        text, js = written(RefusalLine("192.0.2.1", 1, {"unauthenticated": 1}, evil, "wrong token"))
        self.assertEqual(banned(text[0]), ["192.0.2.1"])
        self.assertEqual(banned(js[0]), ["192.0.2.1"])

    def test_other_lines_do_not_match(self) -> None:
        """An accepted client's line is not a failure."""
        self.assertEqual(banned("2026-12-08T04:07:26+0000 [tunneld.server_hub.ServerHub#info] client c1 connected "
                                "to group default from ipv4:203.0.113.7:5000 (stream s1)"), [])
