"""The README's configuration tables and the config schema (tunneld/config.py) agree, and what they promise holds.

Every key named in the ``[server]``, ``[[routes]]`` and ``[client]`` tables
(and the ``[[groups]]``, ``[[upstreams]]``, ``[[forward]]`` lines) is a key
the config accepts, every accepted key is documented, and a default written
as a TOML value is the default the config applies.  The tables are looked
for in README.md and in docs/*.md (where the longer documentation may move).
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import Stack
from tunneld import config as c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The heading line before a table (as the README writes it) -> the schema it documents.
TABLES = {"`[server]`": c.ServerSettings, "`[[routes]]`": c.Route, "`[client]`": c.ClientSettings}
#: Prose lines listing a table's keys in backticks.
PROSE = {"`[[groups]]`": c.Group, "`[[upstreams]]`": c.Upstream, "`[[forward]]`": c.ForwardRule}


def documents() -> list[tuple[str, str]]:
    paths = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                 recursive=True))
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out.append((os.path.relpath(path, ROOT), f.read()))
    return out


def documented_tables() -> dict[type, list[tuple[str, str]]]:
    """schema class -> [(key, default cell)] from every ``| key | default | meaning |`` table after a heading."""
    found: dict[type, list[tuple[str, str]]] = {}
    for _, text in documents():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            schema = TABLES.get(line.split(" ", 1)[0].strip())
            if schema is None:
                continue
            j = i + 1
            while j < len(lines) and not lines[j].startswith("| key"):
                if lines[j].strip() and not lines[j].startswith("`"):
                    break
                j += 1
            if j >= len(lines) or not lines[j].startswith("| key"):
                continue
            for row in lines[j + 2:]:
                if not row.startswith("|"):
                    break
                cells = [cell.strip() for cell in row.strip("|").split("|")]
                for key in re.findall(r"`([a-z_0-9]+)`", cells[0]):
                    found.setdefault(schema, []).append((key, cells[1]))
    return found


def documented_prose() -> dict[type, set[str]]:
    found: dict[type, set[str]] = {}
    for _, text in documents():
        for paragraph in text.split("\n\n"):
            if not any(paragraph.startswith(heading) for heading in PROSE):
                continue
            for heading, schema in PROSE.items():
                at = paragraph.find(heading)
                if at == -1:
                    continue
                rest = paragraph[at + len(heading):]
                # Up to the next table heading in the same paragraph.
                cut = min([rest.find(h) for h in PROSE if rest.find(h) != -1] + [len(rest)])
                found.setdefault(schema, set()).update(re.findall(r"`([a-z_]+)`", rest[:cut]))
    return found


def schema_keys(schema: type) -> set[str]:
    return set(c._field_names(schema))


class ReadmeConfigTests(SynchronousTestCase):
    """README tables <-> config.py."""

    def test_every_documented_key_is_in_the_schema_and_back(self) -> None:
        """Each key of the [server], [[routes]], [client] tables is accepted by the config, and each is documented."""
        tables = documented_tables()
        self.assertEqual(set(tables), set(TABLES.values()), "a configuration table is missing from the README")
        for schema, rows in tables.items():
            documented = {key for key, _ in rows}
            self.assertEqual(documented - schema_keys(schema), set(), f"{schema.__name__}: documented, not in the schema")
            self.assertEqual(schema_keys(schema) - documented, set(), f"{schema.__name__}: in the schema, not documented")

    def test_prose_tables(self) -> None:
        """[[groups]], [[upstreams]] and [[forward]] name only keys the config accepts, and all of them."""
        prose = documented_prose()
        for schema in PROSE.values():
            self.assertEqual(prose.get(schema, set()) ^ schema_keys(schema), set(),
                             schema.__name__)

    def test_documented_defaults_are_the_defaults(self) -> None:
        """A default written as a TOML value is what the config applies when the key is absent."""
        defaults = {c.ServerSettings: c.ServerSettings(), c.ClientSettings: c.ClientSettings()}
        checked = 0
        for schema, rows in documented_tables().items():
            if schema not in defaults:
                continue
            for key, cell in rows:
                literal = re.fullmatch(r"`([^`]+)`", cell)
                if literal is None:
                    continue
                try:
                    value = tomllib.loads(f"v = {literal.group(1)}")["v"]
                except tomllib.TOMLDecodeError:
                    continue
                actual = getattr(defaults[schema], key)
                if isinstance(actual, tuple):
                    actual = list(actual)
                if key == "server" and isinstance(value, str):
                    actual = actual[0] if isinstance(actual, list) and len(actual) == 1 else actual
                self.assertEqual(value, actual, f"{schema.__name__}.{key}: README says {cell}")
                checked += 1
        self.assertGreater(checked, 40)

    def test_http_listen_may_be_empty(self) -> None:
        """``http_listen = ""`` is accepted (the README says it disables the HTTP entry)."""
        config = c.parse_server_config({"server": {"http_listen": "", "grpc_listen": "127.0.0.1:8081"},
                                        "groups": [{"name": "default", "tokens": ["x" * 16]}]}, "s.toml")
        self.assertEqual(config.server.http_listen, "")
        self.assertIn("http off", c.describe(config))


class GrpcOnlyServerTests(TestCase):
    """A server with ``http_listen = ""`` runs without an HTTP entry (a server for gRPC only)."""

    @inlineCallbacks
    def test_server_without_http_entry(self) -> Any:
        """No HTTP listener is built; the tunnel port and the gRPC entry listen, and a client connects."""
        stack = Stack([], server={"http_listen": "", "grpc_listen": "127.0.0.1:0"})
        yield stack.start()
        self.addCleanup(stack.stop)
        assert stack.server is not None
        self.assertIsNone(stack.server.http)
        self.assertIsNone(stack.server.hub.entry)
        self.assertGreater(stack.tunnel_port, 0)
        self.assertGreater(stack.grpc_port, 0)
        yield stack.add_client()
