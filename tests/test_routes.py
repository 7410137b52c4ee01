"""Tests for tunneld.registry.routes: HTTP and gRPC route precedence."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.routes import RouteTable, normalize_host


@dataclass(frozen=True)
class R:
    """A route as the config would give it."""

    name: str
    host: str = ""
    path_prefix: str = "/"
    grpc_service: str = ""


@dataclass(frozen=True)
class Fwd:
    """A forward rule: no grpc_service attribute at all."""

    name: str
    host: str = ""
    path_prefix: str = "/"


def name(route: R | Fwd | None) -> str | None:
    return None if route is None else route.name


class NormalizeHostTests(SynchronousTestCase):
    def test_case_port_dot(self) -> None:
        """Host is lower-cased and loses its port and trailing dot."""
        self.assertEqual(normalize_host("App.Example.COM.:8080"), "app.example.com")

    def test_ipv6(self) -> None:
        """Bracketed IPv6 loses brackets and port; a bare IPv6 literal is kept whole."""
        self.assertEqual(normalize_host("[::1]:8080"), "::1")
        self.assertEqual(normalize_host("[::1]"), "::1")
        self.assertEqual(normalize_host("::1"), "::1")


class HttpPrecedenceTests(SynchronousTestCase):
    def test_exact_beats_wildcard_beats_none(self) -> None:
        """An exact host beats a wildcard host, which beats a route without host."""
        table = RouteTable(
            [R("none"), R("wild", host="*.example.com"), R("exact", host="a.example.com")]
        )
        self.assertEqual(name(table.match_http("a.example.com", "/")), "exact")
        self.assertEqual(name(table.match_http("b.example.com", "/")), "wild")
        self.assertEqual(name(table.match_http("other.org", "/")), "none")

    def test_host_tier_before_path_length(self) -> None:
        """A more specific host wins even when a less specific one has a longer prefix."""
        table = RouteTable(
            [R("none-long", path_prefix="/api/v1"), R("exact", host="a.example.com")]
        )
        self.assertEqual(name(table.match_http("a.example.com", "/api/v1/x")), "exact")

    def test_falls_back_when_best_host_has_no_path_match(self) -> None:
        """If the exact host's routes miss the path, wildcard and then hostless routes serve it."""
        table = RouteTable(
            [
                R("exact", host="a.example.com", path_prefix="/admin"),
                R("wild", host="*.example.com", path_prefix="/api"),
                R("none"),
            ]
        )
        self.assertEqual(name(table.match_http("a.example.com", "/api/x")), "wild")
        self.assertEqual(name(table.match_http("a.example.com", "/x")), "none")

    def test_longest_prefix(self) -> None:
        """Among routes with the same host, the longest path prefix wins."""
        table = RouteTable(
            [
                R("root", host="h"),
                R("api", host="h", path_prefix="/api"),
                R("v1", host="h", path_prefix="/api/v1"),
            ]
        )
        self.assertEqual(name(table.match_http("h", "/api/v1/users")), "v1")
        self.assertEqual(name(table.match_http("h", "/api/v2")), "api")
        self.assertEqual(name(table.match_http("h", "/")), "root")

    def test_longer_wildcard_suffix(self) -> None:
        """A longer wildcard suffix beats a shorter one, whatever the config order."""
        table = RouteTable([R("short", host="*.example.com"), R("long", host="*.b.example.com")])
        self.assertEqual(name(table.match_http("a.b.example.com", "/")), "long")
        self.assertEqual(name(table.match_http("a.c.example.com", "/")), "short")

    def test_config_order_tie(self) -> None:
        """Equal host and equal prefix length: the first route in config order wins."""
        table = RouteTable([R("first", host="h"), R("second", host="h"), R("x", path_prefix="/")])
        self.assertEqual(name(table.match_http("h", "/a")), "first")
        table = RouteTable([R("first"), R("second")])
        self.assertEqual(name(table.match_http("any", "/a")), "first")


class HttpHostTests(SynchronousTestCase):
    def test_case_insensitive(self) -> None:
        """Host comparison ignores case on both the route and the request side."""
        table = RouteTable([R("r", host="App.Example.com")])
        self.assertEqual(name(table.match_http("APP.example.COM", "/")), "r")

    def test_port_and_trailing_dot(self) -> None:
        """The request's port and trailing dot are ignored."""
        table = RouteTable([R("r", host="app.example.com"), R("w", host="*.example.org")])
        self.assertEqual(name(table.match_http("app.example.com:8080", "/")), "r")
        self.assertEqual(name(table.match_http("app.example.com.", "/")), "r")
        self.assertEqual(name(table.match_http("x.example.org.:443", "/")), "w")

    def test_ipv6_host(self) -> None:
        """An IPv6 literal Host with a port matches a route for that address."""
        table = RouteTable([R("v6", host="::1"), R("none", path_prefix="/nope")])
        self.assertEqual(name(table.match_http("[::1]:8080", "/")), "v6")
        self.assertEqual(name(table.match_http("[::1]", "/")), "v6")

    def test_wildcard_depth(self) -> None:
        """A wildcard matches subdomains at any depth."""
        table = RouteTable([R("w", host="*.example.com")])
        self.assertEqual(name(table.match_http("a.example.com", "/")), "w")
        self.assertEqual(name(table.match_http("a.b.example.com", "/")), "w")

    def test_wildcard_not_bare_domain(self) -> None:
        """A wildcard does not match the bare domain nor a lookalike suffix."""
        table = RouteTable([R("w", host="*.example.com")])
        self.assertIsNone(table.match_http("example.com", "/"))
        self.assertIsNone(table.match_http("badexample.com", "/"))

    def test_empty_host(self) -> None:
        """A request without Host reaches only routes without host."""
        table = RouteTable([R("h", host="h"), R("w", host="*.h"), R("none", path_prefix="/x")])
        self.assertIsNone(table.match_http("", "/"))
        self.assertEqual(name(table.match_http("", "/x")), "none")


class HttpPathTests(SynchronousTestCase):
    def test_plain_prefix(self) -> None:
        """path_prefix is a plain string prefix: "/api" matches "/api", "/api/x" and "/apix"."""
        table = RouteTable([R("api", path_prefix="/api")])
        for path in ("/api", "/api/x", "/apix"):
            self.assertEqual(name(table.match_http("h", path)), "api")
        self.assertIsNone(table.match_http("h", "/ap"))

    def test_query_stripped(self) -> None:
        """The query string takes no part in prefix matching."""
        table = RouteTable([R("long", path_prefix="/a?b"), R("a", path_prefix="/a")])
        self.assertEqual(name(table.match_http("h", "/a?b=1")), "a")
        table = RouteTable([R("x", path_prefix="/x")])
        self.assertIsNone(table.match_http("h", "/?/x"))

    def test_no_match(self) -> None:
        """No matching route gives None."""
        table = RouteTable([R("h", host="h", path_prefix="/a")])
        self.assertIsNone(table.match_http("h", "/b"))
        self.assertIsNone(table.match_http("other", "/a"))
        self.assertIsNone(RouteTable([]).match_http("h", "/"))

    def test_grpc_routes_ignored(self) -> None:
        """gRPC routes never answer an HTTP match, and forward rules without grpc_service work."""
        table: RouteTable[R | Fwd] = RouteTable(
            [R("g", grpc_service="helloworld.Greeter"), Fwd("fwd", host="api.internal")]
        )
        self.assertIsNone(table.match_http("other", "/"))
        self.assertEqual(name(table.match_http("api.internal", "/")), "fwd")
        self.assertEqual(len(table), 2)


class GrpcTests(SynchronousTestCase):
    def test_exact_service(self) -> None:
        """A gRPC route matches only its exact service name."""
        table = RouteTable([R("g", grpc_service="helloworld.Greeter")])
        self.assertEqual(name(table.match_grpc("helloworld.Greeter")), "g")
        self.assertIsNone(table.match_grpc("helloworld.Greeter2"))
        self.assertIsNone(table.match_grpc("helloworld"))

    def test_http_routes_ignored(self) -> None:
        """HTTP routes never answer a gRPC match."""
        table = RouteTable([R("web")])
        self.assertIsNone(table.match_grpc("helloworld.Greeter", "h"))

    def test_host_preference(self) -> None:
        """Exact host beats longer wildcard, which beats shorter wildcard, which beats no host."""
        table = RouteTable(
            [
                R("none", grpc_service="s"),
                R("wild", host="*.example.com", grpc_service="s"),
                R("wild-long", host="*.b.example.com", grpc_service="s"),
                R("exact", host="a.b.example.com", grpc_service="s"),
            ]
        )
        self.assertEqual(name(table.match_grpc("s", "A.b.example.com:443")), "exact")
        self.assertEqual(name(table.match_grpc("s", "c.b.example.com")), "wild-long")
        self.assertEqual(name(table.match_grpc("s", "c.example.com")), "wild")
        self.assertEqual(name(table.match_grpc("s", "other.org")), "none")
        self.assertEqual(name(table.match_grpc("s")), "none")

    def test_non_matching_host_excluded(self) -> None:
        """A gRPC route whose host does not match the authority is not a candidate."""
        table = RouteTable([R("h", host="a.example.com", grpc_service="s")])
        self.assertIsNone(table.match_grpc("s", "b.example.com"))
        self.assertIsNone(table.match_grpc("s"))
        self.assertEqual(name(table.match_grpc("s", "a.example.com:50051")), "h")

    def test_config_order_tie(self) -> None:
        """Equal service and equal host rank: the first route in config order wins."""
        table = RouteTable([R("first", grpc_service="s"), R("second", grpc_service="s")])
        self.assertEqual(name(table.match_grpc("s", "x")), "first")
