"""Tests for tunneld.config and ``python -m tunneld check``: loading, defaults, validation."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

import tunneld
from tunneld.__main__ import main
from tunneld.config import (
    ClientConfig,
    ClientSettings,
    ConfigError,
    ForwardRule,
    Group,
    Route,
    ServerConfig,
    ServerSettings,
    backend_address,
    describe,
    load_any_config,
    load_client_config,
    load_server_config,
    parse_client_config,
    parse_listen,
    parse_server_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tunneld.__file__)))
SERVER_TOML = os.path.join(ROOT, "etc", "server.toml")
CLIENT_TOML = os.path.join(ROOT, "etc", "client.toml")

GROUP = """
[[groups]]
name = "default"
tokens = ["secret"]
"""

WEB = """
[[routes]]
name = "web"
backend = "http://127.0.0.1:3000"
"""

UPSTREAM = """
[[upstreams]]
name = "api"
backends = ["http://10.0.0.5:9000"]
"""

SPEC_EXAMPLE = """
[server]
tunnel_listen = "0.0.0.0:7000"   # gRPC tunnel port (clients dial this)
http_listen   = "0.0.0.0:8080"   # HTTP + WebSocket entry
grpc_listen   = "0.0.0.0:8081"   # gRPC entry
admin_listen  = "127.0.0.1:9100" # /metrics, /status, dashboard
request_timeout   = 30           # seconds until response head, per route overridable
heartbeat_timeout = 60           # a stream silent this long is dropped
cleanup_interval  = 30

[[groups]]
name   = "default"
tokens = ["change-me"]            # a client must present one of these

[[routes]]                        # external -> tunnel -> backend next to the client
name = "web"
host = "app.example.com"          # optional; exact or "*.example.com"
path_prefix = "/"                 # longest prefix wins; host-specific beats wildcard
group = "default"
backend = "http://127.0.0.1:3000" # what the client dials (ws:// implied for upgrades)
set_host = ""                     # optional Host rewrite
timeout = 30

[[routes]]
name = "greeter"
grpc_service = "helloworld.Greeter"   # gRPC routes match service
group = "default"
backend = "grpc://127.0.0.1:50051"

[[upstreams]]                     # reachable from the server
name = "api"
backends = ["http://10.0.0.5:9000", "http://10.0.0.6:9000"]

[[forward]]                       # client http entry -> tunnel -> upstream
host = "api.internal"
path_prefix = "/"
upstream = "api"
"""


def field_names(cls: type) -> list[str]:
    """The keys of a config table: its dataclass's field names (bar those the loader fills in)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("servers", "client_id_generated")]


def uncomment_examples(text: str) -> str:
    """Turn the commented-out example tables of a shipped file into live TOML."""
    lines = []
    for line in text.splitlines():
        match = re.match(r"^# (\[\[\w+\]\]|\w+ = .*|# .*)$", line)
        lines.append(match.group(1) if match else line)
    return "\n".join(lines) + "\n"


class ConfigTestCase(SynchronousTestCase):
    """Helpers: write TOML to a temporary file and expect a located ConfigError."""

    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def assert_error(
        self,
        text: str,
        table: str,
        key: str,
        *fragments: str,
        loader: Callable[[str], object] = load_server_config,
    ) -> ConfigError:
        path = self.write(text)
        error = self.assertRaises(ConfigError, loader, path)
        line = str(error)
        self.assertNotIn("\n", line)
        self.assertTrue(line.startswith(path + ": "), line)
        self.assertEqual((error.file, error.table, error.key), (path, table, key), line)
        self.assertIn(table, line)
        if key:
            self.assertIn(f"key {key!r}", line)
        for fragment in fragments:
            self.assertIn(fragment, line)
        return error

    def assert_client_error(self, text: str, key: str, *fragments: str) -> ConfigError:
        return self.assert_error(text, "[client]", key, *fragments, loader=load_client_config)

    def load(self, text: str) -> ServerConfig:
        return load_server_config(self.write(text))

    def load_client(self, text: str) -> ClientConfig:
        return load_client_config(self.write(text))


class ShippedFilesTests(ConfigTestCase):
    def test_server_toml_loads(self) -> None:
        """etc/server.toml loads with the default settings, group 'default', route 'web' and the demo's routes."""
        loaded = load_server_config(SERVER_TOML)
        self.assertEqual(loaded.server, ServerSettings())
        self.assertEqual(loaded.groups, (Group("default", ("change-me",)),))
        self.assertEqual(
            loaded.routes,
            (Route(name="web", backend="http://127.0.0.1:3000", timeout=30.0),
             Route(name="chat", backend="http://127.0.0.1:3001", path_prefix="/chat", timeout=30.0),
             Route(name="demo-grpc", backend="grpc://127.0.0.1:3002", grpc_service="tunneld.demo.Echo",
                   timeout=30.0)),
        )
        self.assertEqual((loaded.upstreams, loaded.forward), ((), ()))

    def test_server_toml_listens_on_loopback(self) -> None:
        """Every listener of the shipped server file is on 127.0.0.1."""
        s = load_server_config(SERVER_TOML).server
        for address in (s.tunnel_listen, s.http_listen, s.grpc_listen, s.admin_listen):
            self.assertEqual(parse_listen(address)[0], "127.0.0.1")

    def test_server_toml_examples_are_valid(self) -> None:
        """The commented-out gRPC route, upstream and forward examples load once uncommented."""
        with open(SERVER_TOML, encoding="utf-8") as f:
            loaded = self.load(uncomment_examples(f.read()))
        self.assertEqual([r.name for r in loaded.routes], ["web", "chat", "demo-grpc", "greeter"])
        self.assertEqual(loaded.routes[3].grpc_service, "helloworld.Greeter")
        self.assertEqual(loaded.routes[3].backend, "grpc://127.0.0.1:50051")
        self.assertEqual(loaded.upstreams[0].name, "api")
        self.assertEqual(loaded.forward[0].upstream, "api")

    def test_server_toml_has_every_key(self) -> None:
        """The shipped server file sets every [server] and [[routes]] key explicitly."""
        with open(SERVER_TOML, encoding="utf-8") as f:
            text = f.read()
        for name in [*field_names(ServerSettings), *field_names(Route)]:
            self.assertRegex(text, rf"(?m)^{name} = ")
        for name in field_names(ForwardRule):
            self.assertRegex(text, rf"(?m)^# {name} = ")

    def test_client_toml_loads(self) -> None:
        """etc/client.toml loads and matches the ClientSettings defaults (bar the generated id)."""
        loaded = load_client_config(CLIENT_TOML)
        defaults = ClientSettings()
        self.assertEqual(
            (loaded.client.server, loaded.client.group, loaded.client.token),
            (defaults.server, defaults.group, defaults.token),
        )
        self.assertEqual(loaded.client, ClientSettings(client_id=loaded.client.client_id))

    def test_client_toml_has_every_key(self) -> None:
        """The shipped client file sets every [client] key explicitly."""
        with open(CLIENT_TOML, encoding="utf-8") as f:
            text = f.read()
        for name in field_names(ClientSettings):
            self.assertRegex(text, rf"(?m)^{name} = ")

    def test_files_work_together(self) -> None:
        """The shipped client dials the shipped tunnel port with a group and token it accepts."""
        server = load_server_config(SERVER_TOML)
        client = load_client_config(CLIENT_TOML).client
        self.assertEqual(client.server, server.server.tunnel_listen)
        group = server.group(client.group)
        assert group is not None
        self.assertIn(client.token, group.tokens)

    def test_spec_example_loads(self) -> None:
        """The server.toml example of SPEC section 4 is valid once its example token is replaced (SPEC §8.2)."""
        with self.assertRaises(ConfigError) as caught:
            self.load(SPEC_EXAMPLE)
        self.assertEqual((caught.exception.table, caught.exception.key), ("[[groups]] #1 'default'", "tokens"))
        loaded = self.load(SPEC_EXAMPLE.replace('"change-me"', '"' + "k" * 32 + '"'))
        self.assertEqual(loaded.warnings, ())
        self.assertEqual(loaded.server.tunnel_listen, "0.0.0.0:7000")
        self.assertEqual([r.name for r in loaded.routes], ["web", "greeter"])
        self.assertEqual(loaded.forward[0].name, "forward-1")


class DefaultsTests(ConfigTestCase):
    def test_empty_server_file(self) -> None:
        """An empty server file gives the default settings and no groups, routes or rules."""
        loaded = self.load("")
        self.assertEqual(loaded, ServerConfig(path=loaded.path))
        self.assertEqual(loaded.server.request_timeout, 30.0)
        self.assertEqual(loaded.server.window, 262144)

    def test_server_table_partial(self) -> None:
        """Keys absent from [server] keep their defaults; int seconds become floats."""
        loaded = self.load("[server]\nrequest_timeout = 5\n")
        self.assertEqual(loaded.server, ServerSettings(request_timeout=5.0))
        self.assertIsInstance(loaded.server.request_timeout, float)

    def test_route_defaults(self) -> None:
        """A route with only name and backend gets group 'default', any host and '/'."""
        route = self.load(GROUP + WEB).routes[0]
        self.assertEqual(
            (route.group, route.host, route.path_prefix, route.set_host, route.grpc_service),
            ("default", "", "/", "", ""),
        )
        self.assertEqual((route.max_message_size, route.max_body_size), (16777216, 0))

    def test_client_none(self) -> None:
        """load_client_config(None) gives the defaults, path '' and a generated id."""
        loaded = load_client_config(None)
        self.assertEqual(loaded.path, "")
        self.assertEqual(loaded.client, ClientSettings(client_id=loaded.client.client_id))
        self.assertTrue(loaded.client.client_id)

    def test_client_empty_file(self) -> None:
        """A client file without [client] gives the defaults."""
        loaded = self.load_client("")
        self.assertEqual(loaded.client, ClientSettings(client_id=loaded.client.client_id))

    def test_parse_functions(self) -> None:
        """parse_*_config validate an already-parsed dict and keep the given path."""
        self.assertEqual(parse_server_config({}, "x.toml").path, "x.toml")
        self.assertEqual(
            parse_client_config({"client": {"client_id": "c"}}, "y.toml").client.client_id, "c"
        )

    def test_tokens_not_in_repr(self) -> None:
        """Tokens stay out of repr(), so logging a config never leaks them."""
        loaded = self.load(GROUP)
        # "'secret'": the token itself (inspect_mask's "*secret*" pattern may appear).
        self.assertNotIn("'secret'", repr(loaded))
        self.assertNotIn("change-me", repr(load_client_config(None)))


class ConfigErrorTests(SynchronousTestCase):
    def test_str(self) -> None:
        """str(ConfigError) names file, table and key on one line."""
        error = ConfigError(
            "etc/server.toml", "[[routes]] #2 'web'", "group", "unknown group 'nope'"
        )
        self.assertEqual(
            str(error), "etc/server.toml: [[routes]] #2 'web' key 'group': unknown group 'nope'"
        )

    def test_str_without_location(self) -> None:
        """A whole-file error has neither table nor key in its message."""
        self.assertEqual(
            str(ConfigError("a.toml", "", "", "cannot read file")), "a.toml: cannot read file"
        )

    def test_one_line(self) -> None:
        """Newlines in a message never split the error over lines."""
        self.assertNotIn("\n", str(ConfigError("a.toml", "[server]", "x", "one\ntwo")))


class TopLevelTests(ConfigTestCase):
    def test_unknown_table(self) -> None:
        """An unknown top-level table is an error naming it."""
        self.assert_error("[bogus]\nx = 1\n", "(top level)", "bogus", "unknown table")

    def test_client_table_in_server_file(self) -> None:
        """[client] in a server file is an error that says which kind of file this is."""
        self.assert_error("[client]\n", "(top level)", "client", "server config")

    def test_server_table_in_client_file(self) -> None:
        """[[routes]] in a client file is an error."""
        self.assert_error(WEB, "(top level)", "routes", "client config", loader=load_client_config)

    def test_server_not_a_table(self) -> None:
        """A top-level 'server = ...' value instead of a [server] table is an error."""
        self.assert_error('server = "x"\n', "(top level)", "server", "must be a table")

    def test_routes_not_an_array(self) -> None:
        """[routes] written as a single table instead of [[routes]] is an error."""
        self.assert_error('[routes]\nname = "web"\n', "(top level)", "routes", "[[routes]]")


class UnknownKeyTests(ConfigTestCase):
    def test_server(self) -> None:
        """A misspelt [server] key is an error with a suggestion."""
        self.assert_error(
            '[server]\ntunel_listen = "127.0.0.1:1"\n',
            "[server]",
            "tunel_listen",
            "unknown key",
            "did you mean 'tunnel_listen'",
        )

    def test_route(self) -> None:
        """An unknown key in a route names the route by index and name."""
        self.assert_error(
            GROUP + WEB + "colour = 1\n", "[[routes]] #1 'web'", "colour", "unknown key"
        )

    def test_route_nested_table(self) -> None:
        """A nested table inside a route is an unknown key."""
        self.assert_error(
            GROUP + WEB + "[routes.headers]\na = 'b'\n", "[[routes]] #1 'web'", "headers"
        )

    def test_group(self) -> None:
        """An unknown key in a group is an error."""
        self.assert_error(
            GROUP + "token = 'x'\n", "[[groups]] #1 'default'", "token", "did you mean 'tokens'"
        )

    def test_upstream(self) -> None:
        """An unknown key in an upstream is an error."""
        self.assert_error(UPSTREAM + "weight = 2\n", "[[upstreams]] #1 'api'", "weight")

    def test_forward(self) -> None:
        """An unknown key in a forward rule is an error; an unnamed entry is named by index."""
        self.assert_error(
            UPSTREAM + "[[forward]]\nupstream = 'api'\nbackend = 'x'\n", "[[forward]] #1", "backend"
        )

    def test_client(self) -> None:
        """An unknown key in [client] is an error."""
        self.assert_client_error(
            "[client]\nservr = '127.0.0.1:7000'\n", "servr", "did you mean 'server'"
        )


class TypeTests(ConfigTestCase):
    def test_string_for_number(self) -> None:
        """A string where seconds are expected is an error."""
        self.assert_error(
            '[server]\nrequest_timeout = "30"\n', "[server]", "request_timeout", "number"
        )

    def test_bool_for_number(self) -> None:
        """A boolean is not a number of seconds."""
        self.assert_error(
            "[server]\nrequest_timeout = true\n", "[server]", "request_timeout", "boolean"
        )

    def test_bool_for_int(self) -> None:
        """A boolean is not an integer."""
        self.assert_error("[server]\nwindow = true\n", "[server]", "window", "integer", "boolean")

    def test_float_for_int(self) -> None:
        """A float where an integer is expected is an error."""
        self.assert_error("[server]\nwindow = 65536.0\n", "[server]", "window", "integer")

    def test_float_accepted_for_seconds(self) -> None:
        """Fractional seconds are accepted."""
        self.assertEqual(
            self.load("[server]\ncleanup_interval = 0.5\n").server.cleanup_interval, 0.5
        )

    def test_int_for_string(self) -> None:
        """An integer where a string is expected is an error."""
        self.assert_error(
            GROUP + "[[routes]]\nname = 'web'\nbackend = 3000\n",
            "[[routes]] #1 'web'",
            "backend",
            "string",
        )

    def test_string_for_list(self) -> None:
        """A string where an array of strings is expected is an error."""
        self.assert_error(
            "[[groups]]\nname = 'g'\ntokens = 'secret'\n", "[[groups]] #1 'g'", "tokens", "array"
        )

    def test_list_of_non_strings(self) -> None:
        """An array with a non-string item is an error naming the item."""
        self.assert_error(
            "[[groups]]\nname = 'g'\ntokens = ['a', 1]\n", "[[groups]] #1 'g'", "tokens", "item 2"
        )

    def test_client_list(self) -> None:
        """allow_backends must be an array of strings."""
        self.assert_client_error("[client]\nallow_backends = 'a:1'\n", "allow_backends", "array")

    def test_name_not_a_string(self) -> None:
        """A non-string route name is an error, and the entry is named by index only."""
        self.assert_error(
            GROUP + "[[routes]]\nname = 1\nbackend = 'http://a:1'\n", "[[routes]] #1", "name"
        )


class RequiredKeyTests(ConfigTestCase):
    def test_route_name(self) -> None:
        """A route without a name is an error."""
        self.assert_error(
            GROUP + "[[routes]]\nbackend = 'http://a:1'\n", "[[routes]] #1", "name", "required"
        )

    def test_route_backend(self) -> None:
        """A route without a backend is an error."""
        self.assert_error(
            GROUP + "[[routes]]\nname = 'web'\n", "[[routes]] #1 'web'", "backend", "required"
        )

    def test_group_name(self) -> None:
        """A group without a name is an error."""
        self.assert_error("[[groups]]\ntokens = ['x']\n", "[[groups]] #1", "name", "required")

    def test_group_tokens(self) -> None:
        """A group without tokens is an error."""
        self.assert_error("[[groups]]\nname = 'g'\n", "[[groups]] #1 'g'", "tokens", "required")

    def test_upstream_name(self) -> None:
        """An upstream without a name is an error."""
        self.assert_error(
            "[[upstreams]]\nbackends = ['http://a:1']\n", "[[upstreams]] #1", "name", "required"
        )

    def test_upstream_backends(self) -> None:
        """An upstream without backends is an error."""
        self.assert_error(
            "[[upstreams]]\nname = 'api'\n", "[[upstreams]] #1 'api'", "backends", "required"
        )

    def test_forward_upstream(self) -> None:
        """A forward rule without an upstream is an error."""
        self.assert_error("[[forward]]\nname = 'f'\n", "[[forward]] #1 'f'", "upstream", "required")


class ReferenceTests(ConfigTestCase):
    def test_unknown_group(self) -> None:
        """A route naming an undefined group is an error (the second route is #2)."""
        text = GROUP + WEB + "[[routes]]\nname = 'api'\ngroup = 'nope'\nbackend = 'http://a:1'\n"
        self.assert_error(text, "[[routes]] #2 'api'", "group", "unknown group 'nope'", "default")

    def test_no_groups(self) -> None:
        """Without [[groups]], a route (group 'default' by default) is an error."""
        self.assert_error(WEB, "[[routes]] #1 'web'", "group", "no [[groups]]")

    def test_unknown_upstream(self) -> None:
        """A forward rule naming an undefined upstream is an error."""
        self.assert_error(
            UPSTREAM + "[[forward]]\nupstream = 'apx'\n",
            "[[forward]] #1",
            "upstream",
            "unknown upstream 'apx'",
        )

    def test_no_upstreams(self) -> None:
        """Without [[upstreams]], any forward rule is an error."""
        self.assert_error(
            "[[forward]]\nupstream = 'api'\n", "[[forward]] #1", "upstream", "no [[upstreams]]"
        )

    def test_duplicate_group(self) -> None:
        """Two groups with one name are an error naming the first."""
        self.assert_error(GROUP + GROUP, "[[groups]] #2 'default'", "name", "duplicate", "#1")

    def test_duplicate_route(self) -> None:
        """Two routes with one name are an error."""
        text = GROUP + WEB + WEB + "path_prefix = '/x'\n"
        self.assert_error(text, "[[routes]] #2 'web'", "name", "duplicate route name")

    def test_duplicate_upstream(self) -> None:
        """Two upstreams with one name are an error."""
        self.assert_error(UPSTREAM + UPSTREAM, "[[upstreams]] #2 'api'", "name", "duplicate")

    def test_duplicate_forward(self) -> None:
        """Two forward rules with one name are an error."""
        text = (
            UPSTREAM
            + "[[forward]]\nupstream='api'\n"
            + "[[forward]]\nname='forward-1'\nupstream='api'\nhost='a'\n"
        )
        self.assert_error(text, "[[forward]] #2 'forward-1'", "name", "duplicate")

    def test_unreachable_route(self) -> None:
        """Two HTTP routes with one host and path_prefix are an error: the second never matches."""
        text = GROUP + WEB + WEB.replace('"web"', '"web2"')
        self.assert_error(text, "[[routes]] #2 'web2'", "path_prefix", "never match")

    def test_unreachable_grpc_route(self) -> None:
        """Two gRPC routes for the same host and service are an error."""
        route = "[[routes]]\nname = '{}'\ngrpc_service = 'a.B'\nbackend = 'grpc://h:1'\n"
        text = GROUP + route.format("one") + route.format("two")
        self.assert_error(text, "[[routes]] #2 'two'", "grpc_service", "never match")

    def test_same_prefix_other_host(self) -> None:
        """Routes with the same path_prefix but different hosts are fine."""
        text = GROUP + WEB + WEB.replace('"web"', '"web2"') + "host = 'a.example.com'\n"
        self.assertEqual(len(self.load(text).routes), 2)

    def test_empty_token_list(self) -> None:
        """A group with an empty token list is an error."""
        self.assert_error(
            "[[groups]]\nname = 'g'\ntokens = []\n", "[[groups]] #1 'g'", "tokens", "at least one"
        )

    def test_empty_token(self) -> None:
        """An empty token string is an error."""
        self.assert_error(
            "[[groups]]\nname = 'g'\ntokens = ['a', '']\n", "[[groups]] #1 'g'", "tokens", "empty"
        )

    def test_bad_name(self) -> None:
        """A route name with spaces is an error."""
        text = GROUP + "[[routes]]\nname = 'my web'\nbackend = 'http://a:1'\n"
        self.assert_error(text, "[[routes]] #1 'my web'", "name", "not a valid name")

    def test_upstream_with_no_backends(self) -> None:
        """An upstream with an empty backend list is an error."""
        self.assert_error(
            "[[upstreams]]\nname = 'api'\nbackends = []\n", "[[upstreams]] #1 'api'", "backends"
        )


class ListenTests(ConfigTestCase):
    def test_parse_listen(self) -> None:
        """parse_listen splits host:port and bracketed IPv6, ports 0..65535."""
        self.assertEqual(parse_listen("127.0.0.1:7000"), ("127.0.0.1", 7000))
        self.assertEqual(parse_listen("[::1]:7000"), ("::1", 7000))
        self.assertEqual(parse_listen("tunnel.example.com:0"), ("tunnel.example.com", 0))
        self.assertEqual(parse_listen("0.0.0.0:65535"), ("0.0.0.0", 65535))

    def test_parse_listen_errors(self) -> None:
        """parse_listen raises ValueError saying what is wrong."""
        cases = {
            "127.0.0.1": "host:port",
            "127.0.0.1:65536": "out of range",
            "127.0.0.1:http": "not a number",
            "127.0.0.1:-1": "not a number",
            ":7000": "missing host",
            "::1:7000": "brackets",
            "[::1:7000": "']'",
            "[nope]:7000": "IPv6",
            "[::1]7000": "':port'",
            "bad host:1": "not a hostname",
            "": "host:port",
        }
        for value, fragment in cases.items():
            error = self.assertRaises(ValueError, parse_listen, value)
            self.assertIn(fragment, str(error), value)

    def test_bad_listen(self) -> None:
        """A bad listen address is a ConfigError naming the key."""
        self.assert_error(
            "[server]\nhttp_listen = '0.0.0.0:99999'\n", "[server]", "http_listen", "out of range"
        )

    def test_required_listeners(self) -> None:
        """tunnel_listen cannot be disabled."""
        self.assert_error("[server]\ntunnel_listen = ''\n", "[server]", "tunnel_listen")

    def test_http_listen_can_be_disabled(self) -> None:
        """http_listen '' disables the HTTP entry (a server for gRPC, or for the forward direction, only)."""
        self.assertEqual(self.load("[server]\nhttp_listen = ''\n").server.http_listen, "")

    def test_optional_listeners(self) -> None:
        """grpc_listen and admin_listen '' disable those listeners."""
        s = self.load("[server]\ngrpc_listen = ''\nadmin_listen = ''\n").server
        self.assertEqual((s.grpc_listen, s.admin_listen), ("", ""))

    def test_client_addresses(self) -> None:
        """The client's server must be dialable; http_entry may be '' or host:port."""
        self.assert_client_error("[client]\nserver = ''\n", "server")
        self.assert_client_error("[client]\nserver = 'tunnel.example.com:0'\n", "server", "port 0")
        self.assert_client_error("[client]\nhttp_entry = 'localhost'\n", "http_entry", "host:port")
        loaded = self.load_client(
            "[client]\nserver = '[::1]:7000'\nhttp_entry = '127.0.0.1:8090'\n"
        )
        self.assertEqual(loaded.client.http_entry, "127.0.0.1:8090")

    def test_allow_backends(self) -> None:
        """allow_backends entries are host:port, stored lower-case."""
        loaded = self.load_client("[client]\nallow_backends = ['LocalHost:3000', '[::1]:50051']\n")
        self.assertEqual(loaded.client.allow_backends, ("localhost:3000", "[::1]:50051"))
        self.assert_client_error(
            "[client]\nallow_backends = ['127.0.0.1']\n", "allow_backends", "host:port"
        )
        self.assert_client_error("[client]\nallow_backends = ['a:0']\n", "allow_backends", "port 0")


class BackendTests(ConfigTestCase):
    def route(self, backend: str, extra: str = "") -> str:
        return GROUP + f"[[routes]]\nname = 'r'\nbackend = '{backend}'\n{extra}"

    def test_backend_address(self) -> None:
        """backend_address gives scheme, host and port, defaulting the port by scheme."""
        self.assertEqual(backend_address("http://127.0.0.1:3000"), ("http", "127.0.0.1", 3000))
        self.assertEqual(backend_address("https://Example.com/"), ("https", "example.com", 443))
        self.assertEqual(backend_address("http://app"), ("http", "app", 80))
        self.assertEqual(backend_address("grpcs://[::1]"), ("grpcs", "::1", 443))
        self.assertEqual(backend_address("grpc://h:50051"), ("grpc", "h", 50051))

    def test_backend_address_errors(self) -> None:
        """backend_address rejects what a client could not dial."""
        cases = {
            "": "empty",
            "127.0.0.1:3000": "scheme",
            "ftp://h:21": "scheme 'ftp'",
            "http://": "missing host",
            "http://h:99999": "out of range",
            "http://h:0": "port 0",
            "http://u:p@h:1": "credentials",
            "http://h:1/base": "no path",
            "http://h:1/?a=b": "query",
            "http://h :1": "whitespace",
            "http://[::1:1": "IPv6",
        }
        for url, fragment in cases.items():
            error = self.assertRaises(ValueError, backend_address, url)
            self.assertIn(fragment, str(error), url)

    def test_other_scheme(self) -> None:
        """An ftp:// backend is an error naming the route and key."""
        self.assert_error(self.route("ftp://h:21"), "[[routes]] #1 'r'", "backend", "scheme")

    def test_websocket_scheme(self) -> None:
        """A ws:// backend is an error: upgrades use the route's http:// backend."""
        self.assert_error(self.route("ws://h:1"), "[[routes]] #1 'r'", "backend", "scheme")

    def test_grpc_backend_on_http_route(self) -> None:
        """A grpc:// backend without grpc_service is an error that mentions grpc_service."""
        self.assert_error(self.route("grpc://h:1"), "[[routes]] #1 'r'", "backend", "grpc_service")

    def test_http_backend_on_grpc_route(self) -> None:
        """A gRPC route needs a grpc:// or grpcs:// backend."""
        text = self.route("http://h:1", "grpc_service = 'a.B'\n")
        self.assert_error(text, "[[routes]] #1 'r'", "backend", "grpc or grpcs")

    def test_grpc_backend_path(self) -> None:
        """A gRPC backend URL with a path is an error."""
        text = self.route("grpc://h:1/x", "grpc_service = 'a.B'\n")
        self.assert_error(text, "[[routes]] #1 'r'", "backend", "no path")

    def test_missing_host(self) -> None:
        """A backend URL without a host is an error."""
        self.assert_error(self.route("http:///x"), "[[routes]] #1 'r'", "backend", "missing host")

    def test_grpc_route(self) -> None:
        """A route with grpc_service and a grpcs:// backend loads as a gRPC route."""
        route = self.load(
            self.route("grpcs://h:1", "grpc_service = 'helloworld.Greeter'\n")
        ).routes[0]
        self.assertEqual((route.grpc_service, route.backend), ("helloworld.Greeter", "grpcs://h:1"))

    def test_host_on_grpc_route(self) -> None:
        """A gRPC route may name a host: it is matched against the call's :authority."""
        config = self.load(self.route("grpc://h:1", "grpc_service = 'a.B'\nhost = 'api.example.com'\n"))
        self.assertEqual(config.routes[0].host, "api.example.com")

    def test_grpc_service_names(self) -> None:
        """grpc_service must be dot-separated identifiers."""
        for bad in ("hello world", "1pkg.Svc", "pkg..Svc", "pkg.Svc/Method", ".Svc"):
            text = self.route("grpc://h:1", f"grpc_service = '{bad}'\n")
            self.assert_error(text, "[[routes]] #1 'r'", "grpc_service", "gRPC service")
        for good in ("Greeter", "a.b.c.Service_2"):
            self.load(self.route("grpc://h:1", f"grpc_service = '{good}'\n"))

    def test_upstream_backend(self) -> None:
        """Upstream backends must be http or https; the error names the upstream."""
        text = "[[upstreams]]\nname = 'api'\nbackends = ['http://a:1', 'grpc://b:2']\n"
        self.assert_error(text, "[[upstreams]] #1 'api'", "backends", "grpc://b:2")


class HostAndPathTests(ConfigTestCase):
    def test_host_lower_cased(self) -> None:
        """Route and forward hosts are stored lower-case."""
        text = GROUP + WEB + "host = 'App.Example.COM'\n" + UPSTREAM
        text += "[[forward]]\nupstream = 'api'\nhost = '*.Internal.Example'\n"
        loaded = self.load(text)
        self.assertEqual(loaded.routes[0].host, "app.example.com")
        self.assertEqual(loaded.forward[0].host, "*.internal.example")

    def test_wildcard(self) -> None:
        """A leading '*.' wildcard label is accepted."""
        self.assertEqual(
            self.load(GROUP + WEB + "host = '*.example.com'\n").routes[0].host, "*.example.com"
        )

    def test_bad_hosts(self) -> None:
        """Hosts with inner wildcards, bare '*', ports or spaces are errors."""
        for bad, fragment in (
            ("a.*.com", "wildcard"),
            ("*", "hostname"),
            ("**.example.com", "hostname"),
            ("app.example.com:8080", "no port"),
            ("bad host", "hostname"),
            ("http://app", "hostname"),
        ):
            self.assert_error(
                GROUP + WEB + f"host = '{bad}'\n", "[[routes]] #1 'web'", "host", fragment
            )

    def test_path_prefix(self) -> None:
        """path_prefix must start with '/'."""
        self.assert_error(
            GROUP + WEB + "path_prefix = 'api'\n", "[[routes]] #1 'web'", "path_prefix", "'/'"
        )
        text = UPSTREAM + "[[forward]]\nupstream = 'api'\npath_prefix = ''\n"
        self.assert_error(text, "[[forward]] #1", "path_prefix", "'/'")

    def test_set_host(self) -> None:
        """set_host accepts a host with port and rejects URLs."""
        route = self.load(GROUP + WEB + "set_host = 'app.internal:8080'\n").routes[0]
        self.assertEqual(route.set_host, "app.internal:8080")
        self.assert_error(
            GROUP + WEB + "set_host = 'http://x/'\n", "[[routes]] #1 'web'", "set_host"
        )


class NumberTests(ConfigTestCase):
    def test_positive_seconds(self) -> None:
        """Timeouts and intervals must be > 0."""
        for key in (
            "request_timeout",
            "heartbeat_timeout",
            "heartbeat_interval",
            "cleanup_interval",
        ):
            self.assert_error(f"[server]\n{key} = 0\n", "[server]", key, "> 0")
            self.assert_error(f"[server]\n{key} = -1.5\n", "[server]", key, "> 0")
        for key in ("heartbeat_interval", "heartbeat_timeout", "config_sync_interval"):
            self.assert_client_error(f"[client]\n{key} = 0\n", key, "> 0")

    def test_not_finite(self) -> None:
        """inf and nan are not durations."""
        self.assert_error(
            "[server]\nrequest_timeout = inf\n", "[server]", "request_timeout", "finite"
        )
        self.assert_error(
            "[server]\nrequest_timeout = nan\n", "[server]", "request_timeout", "finite"
        )

    def test_drain_timeout_zero(self) -> None:
        """drain_timeout may be 0 (close at once) but not negative."""
        self.assertEqual(self.load("[server]\ndrain_timeout = 0\n").server.drain_timeout, 0.0)
        self.assert_error("[server]\ndrain_timeout = -1\n", "[server]", "drain_timeout", ">= 0")
        self.assertEqual(
            self.load_client("[client]\ndrain_timeout = 0\n").client.drain_timeout, 0.0
        )

    def test_window(self) -> None:
        """window must be at least 65536."""
        self.assert_error("[server]\nwindow = 65535\n", "[server]", "window", ">= 65536")
        self.assertEqual(self.load("[server]\nwindow = 65536\n").server.window, 65536)

    def test_sizes(self) -> None:
        """Message and header sizes must be > 0."""
        for key in ("max_message_size", "max_header_size"):
            self.assert_error(f"[server]\n{key} = 0\n", "[server]", key, ">= 1")
        self.assert_error(
            GROUP + WEB + "max_message_size = 0\n", "[[routes]] #1 'web'", "max_message_size"
        )

    def test_max_body_size(self) -> None:
        """max_body_size may be 0 (unlimited) but not negative."""
        self.assertEqual(self.load(GROUP + WEB + "max_body_size = 0\n").routes[0].max_body_size, 0)
        self.assert_error(
            GROUP + WEB + "max_body_size = -1\n", "[[routes]] #1 'web'", "max_body_size", ">= 0"
        )

    def test_max_concurrency(self) -> None:
        """max_concurrency must be at least 1."""
        self.assert_client_error("[client]\nmax_concurrency = 0\n", "max_concurrency", ">= 1")

    def test_negative_route_timeout(self) -> None:
        """A negative route timeout is an error."""
        self.assert_error(GROUP + WEB + "timeout = -1\n", "[[routes]] #1 'web'", "timeout", ">= 0")


class WindowGrowthTests(ConfigTestCase):
    """[server] and [client] max_window / window_budget: defaults and validation."""

    def test_defaults(self) -> None:
        """Windows grow up to 16 MiB per request direction, within 64 MiB per stream, on both sides."""
        server, client = self.load("").server, self.load_client("").client
        for settings in (server, client, ServerSettings(), ClientSettings()):
            self.assertEqual((settings.max_window, settings.window_budget), (16 * 2**20, 64 * 2**20))

    def test_set(self) -> None:
        """Both keys take integers on both sides; max_window = window turns growth off."""
        loaded = self.load("[server]\nwindow = 65536\nmax_window = 65536\nwindow_budget = 65536\n").server
        self.assertEqual((loaded.window, loaded.max_window, loaded.window_budget), (65536, 65536, 65536))
        client = self.load_client("[client]\nmax_window = 1048576\nwindow_budget = 4194304\n").client
        self.assertEqual((client.max_window, client.window_budget), (1048576, 4194304))

    def test_follow_a_bigger_window(self) -> None:
        """Left out, max_window follows a window above its default, and window_budget follows max_window."""
        big = 32 * 2**20
        loaded = self.load(f"[server]\nwindow = {big}\n").server
        self.assertEqual((loaded.max_window, loaded.window_budget), (big, 64 * 2**20))
        loaded = self.load(f"[server]\nmax_window = {4 * big}\n").server
        self.assertEqual((loaded.max_window, loaded.window_budget), (4 * big, 4 * big))
        client = self.load_client(f"[client]\nmax_window = {4 * big}\n").client
        self.assertEqual(client.window_budget, 4 * big)

    def test_max_window_below_window(self) -> None:
        """max_window below window (server) or below 65536 (client) is an error naming the key."""
        self.assert_error("[server]\nwindow = 262144\nmax_window = 131072\n", "[server]", "max_window",
                          ">= window (262144)", "131072")
        self.assert_client_error("[client]\nmax_window = 65535\n", "max_window", ">= the smallest window", "65536")

    def test_budget_below_max_window(self) -> None:
        """window_budget below max_window is an error naming the key, on both sides."""
        self.assert_error("[server]\nmax_window = 1048576\nwindow_budget = 1048575\n", "[server]", "window_budget",
                          ">= max_window (1048576)")
        self.assert_client_error("[client]\nwindow_budget = 1\n", "window_budget", ">= max_window (16777216)")

    def test_max_window_cap(self) -> None:
        """max_window above 1 GiB is an error (a peer would refuse such a window)."""
        self.assert_error(f"[server]\nmax_window = {2**30 + 1}\n", "[server]", "max_window", "<= 1073741824")
        self.assert_client_error(f"[client]\nmax_window = {2**30 + 1}\n", "max_window", "1 GiB")
        self.assertEqual(self.load(f"[server]\nmax_window = {2**30}\n").server.max_window, 2**30)

    def test_types(self) -> None:
        """Both keys must be integers."""
        self.assert_error("[server]\nmax_window = 1.5e7\n", "[server]", "max_window", "integer", "float")
        self.assert_error("[server]\nwindow_budget = \"64M\"\n", "[server]", "window_budget", "integer", "string")
        self.assert_client_error("[client]\nmax_window = true\n", "max_window", "integer", "boolean")


class ResolutionTests(ConfigTestCase):
    def test_route_timeout_inherits(self) -> None:
        """A route without timeout, or with 0, gets server.request_timeout."""
        loaded = self.load("[server]\nrequest_timeout = 12\n" + GROUP + WEB + "timeout = 0\n")
        self.assertEqual(loaded.routes[0].timeout, 12.0)
        self.assertEqual(self.load(GROUP + WEB).routes[0].timeout, 30.0)

    def test_route_timeout_own(self) -> None:
        """A route's own timeout wins over server.request_timeout."""
        self.assertEqual(self.load(GROUP + WEB + "timeout = 2.5\n").routes[0].timeout, 2.5)

    def test_forward_timeout_and_name(self) -> None:
        """Forward rules inherit the timeout and are named forward-N from 1 unless named."""
        text = "[server]\nrequest_timeout = 7\n" + UPSTREAM
        text += "[[forward]]\nupstream = 'api'\nhost = 'a'\n"
        text += "[[forward]]\nupstream = 'api'\nhost = 'b'\nname = 'bee'\ntimeout = 1\n"
        text += "[[forward]]\nupstream = 'api'\nhost = 'c'\n"
        rules = self.load(text).forward
        self.assertEqual([r.name for r in rules], ["forward-1", "bee", "forward-3"])
        self.assertEqual([r.timeout for r in rules], [7.0, 1.0, 7.0])

    def test_group_lookup(self) -> None:
        """group() finds a group by name; routes_for_group() keeps file order."""
        text = GROUP + "[[groups]]\nname = 'other'\ntokens = ['o']\n" + WEB
        text += "[[routes]]\nname = 'b'\ngroup = 'other'\nbackend = 'http://b:1'\nhost = 'b'\n"
        text += "[[routes]]\nname = 'c'\nbackend = 'http://c:1'\npath_prefix = '/c'\n"
        loaded = self.load(text)
        self.assertEqual(loaded.group("other"), Group("other", ("o",)))
        self.assertIsNone(loaded.group("nope"))
        self.assertEqual([r.name for r in loaded.routes_for_group("default")], ["web", "c"])
        self.assertEqual(loaded.routes_for_group("nope"), ())

    def test_upstream_lookup(self) -> None:
        """upstream() finds an upstream by name."""
        loaded = self.load(UPSTREAM)
        upstream = loaded.upstream("api")
        assert upstream is not None
        self.assertEqual(upstream.backends, ("http://10.0.0.5:9000",))
        self.assertIsNone(loaded.upstream("nope"))


class VersionTests(ConfigTestCase):
    def test_stable(self) -> None:
        """The same routes give the same short version, whatever else differs."""
        one = self.load(GROUP + WEB)
        two = self.load("[server]\nadmin_listen = ''\n" + GROUP + WEB + UPSTREAM)
        self.assertEqual(one.version(), two.version())
        self.assertRegex(one.version(), r"^[0-9a-f]{16}$")

    def test_changes_with_routes(self) -> None:
        """Changing a route, or the timeout it inherits, changes the version."""
        base = self.load(GROUP + WEB).version()
        self.assertNotEqual(base, self.load(GROUP + WEB + "path_prefix = '/x'\n").version())
        self.assertNotEqual(
            base, self.load("[server]\nrequest_timeout = 5\n" + GROUP + WEB).version()
        )
        self.assertNotEqual(base, self.load(GROUP).version())


class ClientIdTests(ConfigTestCase):
    def test_generated(self) -> None:
        """An empty client_id becomes hostname plus six random hex digits."""
        self.patch(socket, "gethostname", lambda: "box")
        self.patch(secrets, "token_hex", lambda n: "ab" * n)
        self.assertEqual(
            self.load_client("[client]\nclient_id = ''\n").client.client_id, "box-ababab"
        )
        self.assertEqual(load_client_config(None).client.client_id, "box-ababab")

    def test_generated_is_marked(self) -> None:
        """A made-up client_id is marked as such (a SIGHUP reload keeps the running one); a set one is not."""
        self.assertTrue(self.load_client("[client]\nclient_id = ''\n").client.client_id_generated)
        self.assertFalse(self.load_client("[client]\nclient_id = 'c'\n").client.client_id_generated)

    def test_generated_really(self) -> None:
        """Without patching, the generated id starts with the hostname and differs per load."""
        ids = {load_client_config(None).client.client_id for _ in range(3)}
        self.assertEqual(len(ids), 3)
        for client_id in ids:
            self.assertRegex(client_id, rf"^{re.escape(socket.gethostname())}-[0-9a-f]{{6}}$")

    def test_explicit(self) -> None:
        """An explicit client_id is kept as written."""
        self.assertEqual(
            self.load_client("[client]\nclient_id = 'edge-1'\n").client.client_id, "edge-1"
        )

    def test_whitespace(self) -> None:
        """A client_id with whitespace is an error."""
        self.assert_client_error("[client]\nclient_id = 'edge 1'\n", "client_id", "whitespace")

    def test_token_and_group(self) -> None:
        """An empty token or an invalid group name is an error."""
        self.assert_client_error("[client]\ntoken = ''\n", "token", "empty")
        self.assert_client_error("[client]\ngroup = ''\n", "group", "name")


class FileTests(ConfigTestCase):
    def test_missing_file(self) -> None:
        """A missing file is a ConfigError naming it."""
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_server_config, path)
        self.assertEqual((error.file, error.table, error.key), (path, "", ""))
        self.assertIn("No such file", str(error))
        self.assertTrue(str(error).startswith(path + ": "))
        self.assertRaises(ConfigError, load_client_config, path)
        self.assertRaises(ConfigError, load_any_config, path)

    def test_directory(self) -> None:
        """A directory instead of a file is a ConfigError naming it."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertIn(path, str(self.assertRaises(ConfigError, load_server_config, path)))

    def test_syntax_error(self) -> None:
        """A TOML syntax error is a ConfigError with tomllib's line and column."""
        path = self.write("[server]\nhttp_listen = \n")
        line = str(self.assertRaises(ConfigError, load_server_config, path))
        self.assertIn(path, line)
        self.assertIn("invalid TOML", line)
        self.assertIn("line 2", line)
        self.assertNotIn("\n", line)

    def test_duplicate_key_is_syntax_error(self) -> None:
        """A key written twice is rejected by TOML itself."""
        path = self.write("[server]\nwindow = 65536\nwindow = 65536\n")
        self.assertIn("invalid TOML", str(self.assertRaises(ConfigError, load_server_config, path)))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is a ConfigError."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b'[server]\nhttp_listen = "\xff"\n')
        self.assertIn(path, str(self.assertRaises(ConfigError, load_server_config, path)))


class LoadAnyTests(ConfigTestCase):
    def test_server(self) -> None:
        """A file with [server] loads as a ServerConfig."""
        self.assertIsInstance(load_any_config(self.write("[server]\n")), ServerConfig)

    def test_server_without_server_table(self) -> None:
        """A file with only [[groups]] and [[routes]] is a server config too."""
        self.assertIsInstance(load_any_config(self.write(GROUP + WEB)), ServerConfig)

    def test_client(self) -> None:
        """A file with [client] loads as a ClientConfig."""
        loaded = load_any_config(self.write("[client]\n"))
        self.assertIsInstance(loaded, ClientConfig)

    def test_neither(self) -> None:
        """An empty file or one with only unknown tables is an error."""
        self.assert_error("", "(top level)", "", "neither", loader=load_any_config)
        self.assert_error("[bogus]\n", "(top level)", "", "neither", loader=load_any_config)

    def test_both(self) -> None:
        """A file with [client] and [server] is an error."""
        self.assert_error(
            "[client]\n[server]\n", "(top level)", "server", "not both", loader=load_any_config
        )

    def test_validates(self) -> None:
        """load_any_config validates what it loads."""
        self.assert_error(
            "[client]\nmax_concurrency = 0\n", "[client]", "max_concurrency", loader=load_any_config
        )


class DescribeTests(ConfigTestCase):
    def test_server(self) -> None:
        """describe() of a server config is one line with listeners, groups and routes."""
        text = describe(load_server_config(SERVER_TOML))
        self.assertNotIn("\n", text)
        for fragment in (
            "127.0.0.1:7000",
            "127.0.0.1:8080",
            "127.0.0.1:8081",
            "127.0.0.1:9100",
            "default",
            "web",
        ):
            self.assertIn(fragment, text)
        self.assertNotIn("change-me", text)

    def test_disabled(self) -> None:
        """Disabled listeners show as off."""
        text = describe(self.load("[server]\ngrpc_listen = ''\nadmin_listen = ''\n"))
        self.assertIn("grpc off", text)
        self.assertIn("admin off", text)

    def test_client(self) -> None:
        """describe() of a client config is one line: server, group and entry, never the token."""
        loaded = self.load_client("[client]\nhttp_entry = '127.0.0.1:8090'\ntoken = 'hush'\n")
        text = describe(loaded)
        self.assertNotIn("\n", text)
        for fragment in ("127.0.0.1:7000", "default", "127.0.0.1:8090", loaded.client.client_id):
            self.assertIn(fragment, text)
        self.assertNotIn("hush", text)


class CheckCommandTests(ConfigTestCase):
    def run_main(self, argv: list[str]) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        code = main(argv)
        return code, stdout.getvalue(), stderr.getvalue()

    def test_valid_server(self) -> None:
        """check on a valid server file prints OK and a summary, exit 0 (the shipped token: one warning)."""
        code, out, err = self.run_main(["check", SERVER_TOML])
        self.assertEqual(code, 0)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("warning: ") and "'change-me' is the shipped example token" in err, err)
        self.assertTrue(out.startswith("OK: "), out)
        self.assertEqual(out.count("\n"), 1)

    def test_valid_client(self) -> None:
        """check on a valid client file prints OK, exit 0."""
        code, out, _ = self.run_main(["check", CLIENT_TOML])
        self.assertEqual(code, 0)
        self.assertIn("OK: client config", out)

    def test_invalid(self) -> None:
        """check on an invalid file prints the one-line error on stderr, exit 1."""
        path = self.write(GROUP + WEB + "group = 'nope'\n")
        code, out, err = self.run_main(["check", path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err,
            f"{path}: [[routes]] #1 'web' key 'group': unknown group 'nope' (defined: default)\n",
        )

    def test_missing_file(self) -> None:
        """check on a missing file exits 1."""
        code, _, err = self.run_main(["check", self.mktemp()])
        self.assertEqual(code, 1)
        self.assertIn("cannot read file", err)

    def test_usage(self) -> None:
        """No command, an unknown command or a missing FILE is a usage error, exit 2."""
        for argv in ([], ["frobnicate"], ["check"], ["check", "a", "b"]):
            code, out, err = self.run_main(argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertIn("usage:", err)

    def test_module(self) -> None:
        """python -m tunneld check runs as a module with the same exit codes."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        ok = subprocess.run(
            [sys.executable, "-m", "tunneld", "check", SERVER_TOML],
            capture_output=True,
            text=True,
            env=env,
        )
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertTrue(ok.stdout.startswith("OK: "))
        bad = subprocess.run(
            [sys.executable, "-m", "tunneld", "check", self.write("[server]\nwindow = 1\n")],
            capture_output=True,
            text=True,
            env=env,
        )
        self.assertEqual(bad.returncode, 1)
        self.assertIn("key 'window'", bad.stderr)


class FrameSizeTests(ConfigTestCase):
    """[server] and [client] max_frame_size: default, bounds, errors."""

    def test_default_and_set(self) -> None:
        """1 MiB by default on both sides; any size from 1024 up to the gRPC message limit."""
        self.assertEqual(self.load("").server.max_frame_size, 2**20)
        self.assertEqual(self.load_client("").client.max_frame_size, 2**20)
        self.assertEqual(self.load("[server]\nmax_frame_size = 4194304\n").server.max_frame_size, 4 * 2**20)
        self.assertEqual(self.load_client("[client]\nmax_frame_size = 1024\n").client.max_frame_size, 1024)

    def test_never_above_max_message_size(self) -> None:
        """A frame is one gRPC message: above max_message_size is an error naming both keys."""
        self.assert_error("[server]\nmax_message_size = 2097152\nmax_frame_size = 4194304\n", "[server]",
                          "max_frame_size", "exceeds max_message_size (2097152)")
        self.assert_client_error(f"[client]\nmax_frame_size = {2**26 + 1}\n", "max_frame_size",
                                 "exceeds max_message_size")
        # Left out, the frame size follows a smaller message limit instead of failing.
        self.assertEqual(self.load("[server]\nmax_message_size = 65536\n").server.max_frame_size, 65536)

    def test_too_small(self) -> None:
        """Below 1024 bytes is an error."""
        self.assert_error("[server]\nmax_frame_size = 100\n", "[server]", "max_frame_size", "1024")


_BCRYPT_LINE = "alice:$2y$05$" + "a" * 53


class AccessConfigTests(ConfigTestCase):
    def route(self, extra: str) -> str:
        return GROUP + '[[routes]]\nname = "web"\nbackend = "http://127.0.0.1:3000"\n' + extra

    def test_defaults_and_values(self) -> None:
        """header_timeout 20 and max_connections 10000 by default; access keys load, CIDRs normalised."""
        loaded = self.load(GROUP + WEB)
        self.assertEqual((loaded.server.header_timeout, loaded.server.max_connections), (20.0, 10000))
        self.assertFalse(loaded.routes[0].protected)
        loaded = self.load("[server]\nheader_timeout = 5\nmax_connections = 50\n" + self.route(
            f'basic_auth = ["{_BCRYPT_LINE}"]\nallow_ips = ["10.1.2.3/8", "2001:db8::1"]\ndeny_ips = ["10.6.0.0/16"]\n'))
        self.assertEqual((loaded.server.header_timeout, loaded.server.max_connections), (5.0, 50))
        route = loaded.routes[0]
        self.assertEqual(route.allow_ips, ("10.0.0.0/8", "2001:db8::1/128"))
        self.assertEqual(route.deny_ips, ("10.6.0.0/16",))
        self.assertEqual(route.basic_auth, (_BCRYPT_LINE,))
        self.assertTrue(route.protected)
        self.assertNotIn("$2y$", repr(route))

    def test_malformed_cidr_names_the_entry(self) -> None:
        """A malformed CIDR is an error naming file, table, key and the item."""
        self.assert_error(self.route('allow_ips = ["10.0.0.0/8", "10.0.0.300/8"]\n'), "[[routes]] #1 'web'",
                          "allow_ips", "item 2", "'10.0.0.300/8'")
        self.assert_error(self.route('deny_ips = ["fe80::/200"]\n'), "[[routes]] #1 'web'", "deny_ips", "item 1")
        self.assert_error(self.route('deny_ips = "10.0.0.0/8"\n'), "[[routes]] #1 'web'", "deny_ips", "array")

    def test_malformed_htpasswd_names_the_entry(self) -> None:
        """A non-bcrypt or broken htpasswd line is an error naming the item and user, duplicates too."""
        self.assert_error(self.route('basic_auth = ["bob:$apr1$xyz$abcdefghijklmnopqrstuv"]\n'),
                          "[[routes]] #1 'web'", "basic_auth", "item 1", "user 'bob'", "bcrypt")
        self.assert_error(self.route('basic_auth = ["no-colon-here"]\n'), "[[routes]] #1 'web'", "basic_auth",
                          "item 1", "htpasswd line")
        self.assert_error(self.route(f'basic_auth = ["{_BCRYPT_LINE}", "{_BCRYPT_LINE}"]\n'),
                          "[[routes]] #1 'web'", "basic_auth", "item 2", "user 'alice'")

    def test_limits_validated(self) -> None:
        """header_timeout must be > 0 seconds and max_connections >= 1."""
        self.assert_error("[server]\nheader_timeout = 0\n", "[server]", "header_timeout", "> 0")
        self.assert_error("[server]\nmax_connections = 0\n", "[server]", "max_connections", ">= 1")

    def test_grpc_routes_take_access_keys(self) -> None:
        """allow_ips, deny_ips and basic_auth apply to gRPC routes too (the HTTP/2 edge enforces them)."""
        config = self.load(GROUP + '[[routes]]\nname = "g"\ngrpc_service = "a.B"\nbackend = "grpc://127.0.0.1:1"\n'
                           f'allow_ips = ["10.0.0.0/8"]\ndeny_ips = ["10.1.0.0/16"]\nbasic_auth = ["{_BCRYPT_LINE}"]\n')
        route = config.routes[0]
        self.assertEqual((route.allow_ips, route.deny_ips, len(route.basic_auth)), (("10.0.0.0/8",), ("10.1.0.0/16",), 1))

    def test_describe_counts_protected_routes(self) -> None:
        """check's summary says how many routes are protected, and by what."""
        text = describe(self.load(self.route(f'basic_auth = ["{_BCRYPT_LINE}"]\n') +
                                  '[[routes]]\nname = "b"\npath_prefix = "/b"\nbackend = "http://127.0.0.1:3000"\n'
                                  'deny_ips = ["10.0.0.0/8"]\n[[routes]]\nname = "c"\npath_prefix = "/c"\n'
                                  'backend = "http://127.0.0.1:3000"\n'))
        self.assertIn("2 protected: 1 basic_auth, 1 IP rules", text)
        self.assertNotIn("$2y$", text)


class FleetSettingsTests(SynchronousTestCase):
    def test_open_rate_and_keepalive(self) -> None:
        """open_rate, open_burst and keepalive_interval parse; a keepalive under 5 s is refused on both sides."""
        cfg = parse_server_config({"server": {"open_rate": 0, "open_burst": 10, "keepalive_interval": 60}}, "s.toml")
        self.assertEqual((cfg.server.open_rate, cfg.server.open_burst, cfg.server.keepalive_interval), (0, 10, 60))
        self.assertEqual(parse_server_config({}, "s.toml").server.keepalive_interval, 10)
        error = self.assertRaises(ConfigError, parse_server_config, {"server": {"keepalive_interval": 1}}, "s.toml")
        self.assertIn("keepalive_interval", str(error))
        self.assertRaises(ConfigError, parse_client_config,
                          {"client": {"client_id": "c", "keepalive_interval": 2}}, "c.toml")
        self.assertRaises(ConfigError, parse_server_config, {"server": {"open_burst": 0}}, "s.toml")

    def test_config_version_hashed_once(self) -> None:
        """version() hashes the routes once per config object (every config sync asks), and follows them."""
        import dataclasses

        import tunneld.config as config_module

        cfg = parse_server_config({"groups": [{"name": "default", "tokens": ["t"]}],
                                   "routes": [{"name": "r", "path_prefix": "/", "backend": "http://127.0.0.1:1"}]},
                                  "s.toml")
        first = cfg.version()
        dumps = config_module.json.dumps

        def no_hashing(*args: object, **kwargs: object) -> str:
            raise AssertionError("hashed the routes again")

        self.patch(config_module.json, "dumps", no_hashing)
        self.assertEqual(cfg.version(), first)
        self.patch(config_module.json, "dumps", dumps)
        self.assertNotEqual(dataclasses.replace(cfg, routes=()).version(), first)

    def test_dial_jitter(self) -> None:
        """dial_jitter: 1 s by default, 0 turns it off, negative is refused; the tap hands it to every dial."""
        from twisted.internet import reactor

        from tunneld.client_tap import build_client

        self.assertEqual(parse_client_config({"client": {"client_id": "c"}}, "c.toml").client.dial_jitter, 1.0)
        cfg = parse_client_config({"client": {"client_id": "c", "dial_jitter": 0}}, "c.toml")
        self.assertEqual(cfg.client.dial_jitter, 0.0)
        error = self.assertRaises(ConfigError, parse_client_config,
                                  {"client": {"client_id": "c", "dial_jitter": -1}}, "c.toml")
        self.assertIn("dial_jitter", str(error))
        cfg = parse_client_config({"client": {"client_id": "c", "dial_jitter": 20,
                                              "server": ["a:7000", "b:7000"]}}, "c.toml")
        self.assertEqual([d.dial_jitter for d in build_client(cfg, reactor).dials], [20.0, 20.0])


STRONG = "Zq3v8K1xN0pLr6TgWbYc2sHdFe9Ju4Ma"   # 32 bytes, not an example


class UnsafeDefaultsTests(ConfigTestCase):
    """Weak tokens and open admin ports facing the internet are errors; on loopback, warnings (SPEC §8.2)."""

    def server(self, listen: str, token: str, admin: str = "127.0.0.1:9100", admin_token: str = "") -> str:
        return (f'[server]\ntunnel_listen = "{listen}"\nadmin_listen = "{admin}"\nadmin_token = "{admin_token}"\n'
                f'[[groups]]\nname = "default"\ntokens = ["{STRONG}", "{token}"]\n')

    def test_short_or_example_token_on_a_public_tunnel_port_is_an_error(self) -> None:
        """A token < 16 bytes or the shipped example with tunnel_listen off loopback names file, table, key and a recipe."""
        for listen in ("0.0.0.0:7000", "[::]:7000", "192.0.2.1:7000", "tunnel.example.com:7000"):
            for token, why in (("change-me", "shipped example"), ("fifteen-bytes!!", "15 bytes is too short")):
                error = self.assert_error(self.server(listen, token), "[[groups]] #1 'default'", "tokens",
                                          "item 2", why, "secrets.token_urlsafe(32)", "not loopback")
                self.assertNotIn(token, str(error).replace("'change-me' is the shipped", ""))

    def test_the_same_on_loopback_is_a_warning(self) -> None:
        """On 127.0.0.0/8, ::1 or localhost the config loads, with one warning per weak token."""
        for listen in ("127.0.0.1:7000", "127.0.0.2:7000", "[::1]:7000", "localhost:7000"):
            loaded = load_server_config(self.write(self.server(listen, "short")))
            [warning] = loaded.warnings
            self.assertIn("[[groups]] #1 'default' key 'tokens': item 2: a token of 5 bytes is too short", warning)
            self.assertIn("secrets.token_urlsafe(32)", warning)

    def test_strong_tokens_give_no_warning(self) -> None:
        """16 bytes or more, not an example: nothing to say, anywhere."""
        loaded = load_server_config(self.write(self.server("0.0.0.0:7000", "x" * 16, admin_token="t")))
        self.assertEqual(loaded.warnings, ())

    def test_open_admin_port_off_loopback_is_an_error(self) -> None:
        """admin_listen on a non-loopback address with an empty admin_token: error; with a token or on loopback: fine."""
        self.assert_error(self.server("127.0.0.1:7000", STRONG, admin="0.0.0.0:9100"), "[server]", "admin_token",
                          "0.0.0.0:9100", "not loopback", "secrets.token_urlsafe(32)")
        load_server_config(self.write(self.server("127.0.0.1:7000", STRONG, admin="0.0.0.0:9100", admin_token="t")))
        self.assertEqual(load_server_config(self.write(self.server("127.0.0.1:7000", STRONG))).warnings, ())
        self.assert_error('[client]\nadmin_listen = "10.1.2.3:9101"\n', "[client]", "admin_token", "not loopback",
                          loader=load_client_config)
        load_client_config(self.write('[client]\nadmin_listen = "127.0.0.1:9101"\n'))

    def test_check_command_says_so(self) -> None:
        """`python -m tunneld check`: the error (exit 1) off loopback, a warning line and OK (exit 0) on it."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["check", self.write(self.server("0.0.0.0:7000", "change-me"))]), 1)
        self.assertIn("'change-me' is the shipped example token, and tunnel_listen '0.0.0.0:7000' is not loopback",
                      err.getvalue())
        err.truncate(0)
        err.seek(0)
        self.assertEqual(main(["check", self.write(self.server("127.0.0.1:7000", "change-me"))]), 0)
        self.assertTrue(err.getvalue().startswith("warning: "), err.getvalue())
        self.assertIn("OK: ", out.getvalue())


class NewKeysTests(ConfigTestCase):
    """auth_fail_limit, auth_fail_window, admin_hosts, inspect_mask: defaults and validation."""

    def test_defaults(self) -> None:
        """SPEC §8.2 defaults, on the server and (admin_hosts, inspect_mask) the client."""
        s = load_server_config(self.write("")).server
        self.assertEqual((s.auth_fail_limit, s.auth_fail_window, s.admin_hosts), (10, 60.0, ()))
        self.assertEqual(s.inspect_mask[:8], ("authorization", "cookie", "set-cookie", "proxy-authorization",
                                              "x-api-key", "x-auth-token", "x-csrf-token", "x-session-token"))
        self.assertEqual(set(s.inspect_mask[8:]), {"*token*", "*secret*", "*password*", "*api-key*"})
        c = load_client_config(None).client
        self.assertEqual((c.admin_hosts, c.inspect_mask), ((), s.inspect_mask))

    def test_values_and_errors(self) -> None:
        """Set values are kept (names lower-cased); bad ones are located errors."""
        s = load_server_config(self.write(
            '[server]\nauth_fail_limit = 0\nauth_fail_window = 5\nadmin_hosts = ["Admin.Example", "[::1]"]\n'
            'inspect_mask = ["X-Mine", "*key*"]\n')).server
        self.assertEqual((s.auth_fail_limit, s.auth_fail_window, s.admin_hosts, s.inspect_mask),
                         (0, 5.0, ("admin.example", "::1"), ("x-mine", "*key*")))
        self.assert_error("[server]\nauth_fail_limit = -1\n", "[server]", "auth_fail_limit", ">= 0")
        self.assert_error("[server]\nauth_fail_window = 0\n", "[server]", "auth_fail_window", "> 0")
        self.assert_error('[server]\nadmin_hosts = ["a.example:9100"]\n', "[server]", "admin_hosts", "item 1")
        self.assert_error('[server]\ninspect_mask = ["bad name"]\n', "[server]", "inspect_mask", "item 1")
        self.assert_error('[server]\ninspect_mask = ["**"]\n', "[server]", "inspect_mask", "item 1")
        self.assert_error('[client]\nadmin_hosts = [1]\n', "[client]", "admin_hosts", loader=load_client_config)


class UnsafeDefaultsLoggedTests(ConfigTestCase):
    """The server logs the warnings: at start (makeService) and on a SIGHUP reload."""

    def capture(self) -> list[str]:
        from twisted.logger import formatEvent, globalLogPublisher

        seen: list[str] = []

        def observe(event: dict[str, object]) -> None:
            text = formatEvent(event)
            if text.startswith("unsafe setting: "):
                seen.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    def test_start_and_reload_log_each_warning(self) -> None:
        """A short token on loopback: one 'unsafe setting' line at start and one per reload."""
        from twisted.internet.task import Clock

        from tunneld import server_tap
        from tunneld.server_hub import ServerHub

        path = self.write('[server]\nhttp_listen = "127.0.0.1:0"\ntunnel_listen = "127.0.0.1:0"\n'
                          'grpc_listen = ""\nadmin_listen = ""\n[[groups]]\nname = "default"\ntokens = ["short"]\n')
        seen = self.capture()
        options = server_tap.Options()
        options.parseOptions(["-c", path])
        server_tap.makeService(options)   # composes only: nothing listens until startService
        self.assertEqual(len(seen), 1)
        self.assertIn("a token of 5 bytes is too short", seen[0])
        hub = ServerHub(load_server_config(path), Clock())
        server_tap.ReloadOnHangup(path, hub, Clock()).reload()
        self.assertEqual(len(seen), 2)
class FairnessConfigTests(ConfigTestCase):
    def test_defaults(self) -> None:
        """Issue 20's keys load with SPEC §8.3's defaults on both sides and on routes."""
        s = self.load(GROUP + WEB)
        self.assertEqual((s.server.max_connections_per_ip, s.server.max_websockets_per_ip, s.server.stall_timeout,
                          s.server.inspect_header_bytes), (256, 64, 10.0, 16384))
        self.assertEqual((s.routes[0].max_websockets, s.routes[0].preserve_path), (1000, False))
        c = self.load_client("[client]\n")
        self.assertEqual((c.client.max_connections_per_ip, c.client.max_websockets, c.client.inspect_header_bytes),
                         (256, 1000, 16384))

    def test_values_and_errors(self) -> None:
        """Set values load; out-of-range or mistyped values name file, table and key."""
        s = self.load("[server]\nmax_connections_per_ip = 3\nmax_websockets_per_ip = 2\nstall_timeout = 1.5\n"
                      "inspect_header_bytes = 1024\n" + GROUP + WEB.replace(
                          'backend =', 'max_websockets = 5\npreserve_path = true\nbackend ='))
        self.assertEqual((s.server.max_connections_per_ip, s.server.max_websockets_per_ip, s.server.stall_timeout,
                          s.server.inspect_header_bytes), (3, 2, 1.5, 1024))
        self.assertEqual((s.routes[0].max_websockets, s.routes[0].preserve_path), (5, True))
        self.assert_error("[server]\nmax_connections_per_ip = 0\n", "[server]", "max_connections_per_ip", ">= 1")
        self.assert_error("[server]\nmax_websockets_per_ip = 0\n", "[server]", "max_websockets_per_ip", ">= 1")
        self.assert_error("[server]\nstall_timeout = 0\n", "[server]", "stall_timeout", "> 0")
        self.assert_error("[server]\ninspect_header_bytes = 10\n", "[server]", "inspect_header_bytes", ">= 256")
        self.assert_error(GROUP + WEB.replace('backend =', 'preserve_path = 1\nbackend ='), "[[routes]] #1 'web'",
                          "preserve_path", "true or false")
        self.assert_client_error("[client]\nmax_websockets = 0\n", "max_websockets", ">= 1")
        self.assert_client_error("[client]\nmax_connections_per_ip = -1\n", "max_connections_per_ip", ">= 1")
