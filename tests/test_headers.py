"""Tests for tunneld.protocols.headers: hop-by-hop, X-Forwarded-*, wire and gRPC forms."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from tunneld import tunnel_pb2
from tunneld.protocols.headers import (
    GRPC_DROPPED_METADATA,
    HOP_BY_HOP,
    add_forwarded,
    filter_grpc_metadata,
    from_pb,
    get_first,
    grpc_metadata_from_pb,
    replace_host,
    request_headers_for_backend,
    response_headers_for_client,
    strip_hop_by_hop,
    to_pb,
)


class StripHopByHopTests(SynchronousTestCase):
    def test_all_hop_by_hop_removed(self) -> None:
        """Every listed hop-by-hop header goes, whatever its case."""
        pairs = [(name.upper(), b"x") for name in sorted(HOP_BY_HOP)]
        pairs.append((b"Accept", b"*/*"))
        self.assertEqual(strip_hop_by_hop(pairs), [(b"Accept", b"*/*")])

    def test_repeated_set_cookie_order(self) -> None:
        """Repeated Set-Cookie headers survive in their order, interleaving kept."""
        pairs = [
            (b"Set-Cookie", b"a=1"),
            (b"Content-Type", b"text/plain"),
            (b"Set-Cookie", b"b=2"),
            (b"Connection", b"keep-alive"),
            (b"Set-Cookie", b"c=3"),
        ]
        self.assertEqual(
            response_headers_for_client(pairs),
            [
                (b"Set-Cookie", b"a=1"),
                (b"Content-Type", b"text/plain"),
                (b"Set-Cookie", b"b=2"),
                (b"Set-Cookie", b"c=3"),
            ],
        )

    def test_connection_listed_headers_removed(self) -> None:
        """Headers named in Connection tokens go, trimmed and case-insensitive."""
        pairs = [
            (b"X-Secret", b"1"),
            (b"Connection", b" X-SECRET ,  close,"),
            (b"x-other", b"2"),
            (b"connection", b"X-Other"),
            (b"X-Kept", b"3"),
        ]
        self.assertEqual(strip_hop_by_hop(pairs), [(b"X-Kept", b"3")])

    def test_name_case_preserved(self) -> None:
        """Kept headers keep the name case they arrived with."""
        pairs = [(b"x-MiXeD", b"v"), (b"TE", b"trailers")]
        self.assertEqual(strip_hop_by_hop(pairs), [(b"x-MiXeD", b"v")])

    def test_accepts_iterator(self) -> None:
        """A one-shot iterator works, even with Connection after the header it names."""
        pairs = iter([(b"X-A", b"1"), (b"Connection", b"x-a"), (b"X-B", b"2")])
        self.assertEqual(strip_hop_by_hop(pairs), [(b"X-B", b"2")])


class AddForwardedTests(SynchronousTestCase):
    def test_none_existing(self) -> None:
        """Without existing headers all three are appended at the end."""
        pairs = [(b"Accept", b"*/*")]
        self.assertEqual(
            add_forwarded(pairs, client_ip="10.0.0.1", proto="https", host="a.example"),
            [
                (b"Accept", b"*/*"),
                (b"X-Forwarded-For", b"10.0.0.1"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"a.example"),
            ],
        )

    def test_one_existing(self) -> None:
        """An existing X-Forwarded-For is appended to, in place."""
        pairs = [(b"A", b"1"), (b"x-forwarded-for", b"1.1.1.1"), (b"B", b"2")]
        self.assertEqual(
            add_forwarded(pairs, client_ip="2.2.2.2", proto="http", host="h"),
            [
                (b"A", b"1"),
                (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"),
                (b"B", b"2"),
                (b"X-Forwarded-Proto", b"http"),
                (b"X-Forwarded-Host", b"h"),
            ],
        )

    def test_several_existing(self) -> None:
        """Several X-Forwarded-For headers merge in order at the first one's place."""
        pairs = [
            (b"X-Forwarded-For", b"1.1.1.1, 3.3.3.3"),
            (b"A", b"1"),
            (b"X-FORWARDED-FOR", b"4.4.4.4"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"outer.example"),
        ]
        self.assertEqual(
            add_forwarded(pairs, client_ip="5.5.5.5", proto="http", host="inner"),
            [
                (b"X-Forwarded-For", b"1.1.1.1, 3.3.3.3, 4.4.4.4, 5.5.5.5"),
                (b"A", b"1"),
                (b"X-Forwarded-Proto", b"https, http"),
                (b"X-Forwarded-Host", b"outer.example, inner"),
            ],
        )

    def test_empty_host_skipped(self) -> None:
        """An empty host adds no X-Forwarded-Host but keeps an existing one."""
        self.assertEqual(
            add_forwarded([], client_ip="::1", proto="http", host=""),
            [(b"X-Forwarded-For", b"::1"), (b"X-Forwarded-Proto", b"http")],
        )
        self.assertEqual(
            add_forwarded([(b"X-Forwarded-Host", b"h")], client_ip="::1", proto="http", host=""),
            [
                (b"X-Forwarded-Host", b"h"),
                (b"X-Forwarded-For", b"::1"),
                (b"X-Forwarded-Proto", b"http"),
            ],
        )


class HostAndLookupTests(SynchronousTestCase):
    def test_replace_host(self) -> None:
        """Every Host header goes and one Host is appended."""
        pairs = [(b"host", b"a"), (b"X", b"1"), (b"HOST", b"b")]
        self.assertEqual(replace_host(pairs, b"c:80"), [(b"X", b"1"), (b"Host", b"c:80")])

    def test_get_first_case_insensitive(self) -> None:
        """get_first finds the first match in any case, None when absent."""
        pairs = [(b"set-cookie", b"a"), (b"SET-COOKIE", b"b")]
        self.assertEqual(get_first(pairs, b"Set-Cookie"), b"a")
        self.assertIsNone(get_first(pairs, b"Host"))


class RequestHeadersForBackendTests(SynchronousTestCase):
    def test_composition_with_set_host(self) -> None:
        """Hop-by-hop stripped, forwarded added, set_host replaces Host."""
        pairs = [
            (b"Host", b"public.example"),
            (b"Connection", b"Upgrade, X-Drop"),
            (b"X-Drop", b"1"),
            (b"Cookie", b"a=1"),
            (b"Content-Length", b"5"),
        ]
        out = request_headers_for_backend(
            pairs, client_ip="9.9.9.9", proto="https", host="public.example", set_host="internal:3000"
        )
        self.assertEqual(
            out,
            [
                (b"Cookie", b"a=1"),
                (b"Content-Length", b"5"),
                (b"X-Forwarded-For", b"9.9.9.9"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"public.example"),
                (b"Host", b"internal:3000"),
            ],
        )

    def test_host_kept_without_set_host(self) -> None:
        """Without set_host the original Host stays where it was."""
        out = request_headers_for_backend(
            [(b"Host", b"h"), (b"A", b"1")], client_ip="1.2.3.4", proto="http", host="h"
        )
        self.assertEqual(out[:2], [(b"Host", b"h"), (b"A", b"1")])

    def test_content_length_dropped_with_transfer_encoding(self) -> None:
        """Content-Length goes only when a Transfer-Encoding was present."""
        pairs = [(b"transfer-encoding", b"chunked"), (b"content-length", b"10"), (b"A", b"1")]
        out = request_headers_for_backend(pairs, client_ip="1.2.3.4", proto="http", host="")
        self.assertEqual(
            out,
            [(b"A", b"1"), (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-Proto", b"http")],
        )


    def test_drop_names(self) -> None:
        """Names in ``drop`` (lower-case) go in any case; the rest as usual."""
        pairs = [(b"Expect", b"100-continue"), (b"AUTHORIZATION", b"Basic x"), (b"A", b"1")]
        out = request_headers_for_backend(pairs, client_ip="", proto="http", host="",
                                          drop=frozenset({b"expect", b"authorization"}))
        self.assertEqual(out, [(b"A", b"1"), (b"X-Forwarded-Proto", b"http")])

    def test_one_pass_equals_the_composition(self) -> None:
        """On random header lists the one-pass version equals strip, drop, add_forwarded and replace_host in turn."""
        rng = random.Random(9)
        names = [b"Host", b"host", b"Connection", b"connection", b"Keep-Alive", b"TE", b"Transfer-Encoding",
                 b"Content-Length", b"X-Forwarded-For", b"x-forwarded-for", b"X-Forwarded-Proto",
                 b"X-FORWARDED-HOST", b"X-Drop", b"Expect", b"Authorization", b"Accept", b"Cookie", b"Upgrade"]
        values = [b"", b"1", b" a , b,,", b"X-Drop", b"x-forwarded-for, host", b"close", b"chunked", b",",
                  b"keep-alive, Content-Length"]
        for _ in range(3000):
            pairs = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(0, 9))]
            kwargs = {"client_ip": rng.choice(["", "10.0.0.1"]), "proto": rng.choice(["", "https"]),
                      "host": rng.choice(["", "h.example"])}
            set_host = rng.choice(["", "inner:80"])
            drop = rng.choice([frozenset(), frozenset({b"expect"}), frozenset({b"expect", b"authorization"})])
            expected = strip_hop_by_hop(pairs)
            if get_first(pairs, b"transfer-encoding") is not None:
                expected = [(n, v) for n, v in expected if n.lower() != b"content-length"]
            expected = [(n, v) for n, v in expected if n.lower() not in drop]
            expected = add_forwarded(expected, **kwargs)
            if set_host:
                expected = replace_host(expected, set_host.encode())
            got = request_headers_for_backend(pairs, set_host=set_host, drop=drop, **kwargs)
            self.assertEqual(got, expected, (pairs, kwargs, set_host, drop))


class WireTests(SynchronousTestCase):
    def test_round_trip_latin1(self) -> None:
        """Pairs with non-ASCII latin-1 names and arbitrary value bytes survive the wire."""
        pairs = [
            (b"X-Caf\xe9", b"\xff\x00\xe9"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ]
        headers = to_pb(pairs)
        self.assertEqual(headers[0].name, "X-Caf\u00e9")
        message = tunnel_pb2.HttpResponse(headers=headers)
        decoded = tunnel_pb2.HttpResponse.FromString(message.SerializeToString())
        self.assertEqual(from_pb(decoded.headers), pairs)

    def test_from_pb_non_latin1_name(self) -> None:
        """A name outside latin-1 from a broken peer does not raise."""
        pairs = from_pb([tunnel_pb2.Header(name="X-\u20ac", value=b"v")])
        self.assertEqual(pairs, [(b"X-?", b"v")])


class GrpcMetadataTests(SynchronousTestCase):
    def test_filter_drops_transport_keys(self) -> None:
        """Pseudo-headers and transport keys go; order, str and -bin bytes are kept."""
        items: list[tuple[str, str | bytes]] = [
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("x-user", "alice"),
            ("te", "trailers"),
            ("grpc-timeout", "1S"),
            ("trace-bin", b"\x00\xff\x10"),
            ("user-agent", "grpc-python"),
            ("x-user", "bob"),
            ("grpc-accept-encoding", "gzip"),
        ]
        self.assertEqual(
            filter_grpc_metadata(items),
            [("x-user", b"alice"), ("trace-bin", b"\x00\xff\x10"), ("x-user", b"bob")],
        )

    def test_dropped_set_contents(self) -> None:
        """The dropped set holds the transport keys and every hop-by-hop name."""
        for key in ("content-type", "te", "grpc-timeout", "grpc-encoding", "host", "upgrade"):
            self.assertIn(key, GRPC_DROPPED_METADATA)
        self.assertNotIn("authorization", GRPC_DROPPED_METADATA)

    def test_utf8_values_encoded(self) -> None:
        """Non-ASCII str values are encoded utf-8."""
        self.assertEqual(filter_grpc_metadata([("x-name", "caf\u00e9")]), [("x-name", b"caf\xc3\xa9")])

    def test_round_trip_through_pb(self) -> None:
        """-bin keys come back as bytes, others as str, in order."""
        items: list[tuple[str, str | bytes]] = [
            ("x-a", "1"),
            ("blob-bin", b"\xff\xfe"),
            ("x-a", "caf\u00e9"),
        ]
        filtered = filter_grpc_metadata(items)
        headers = [tunnel_pb2.Header(name=k, value=v) for k, v in filtered]
        self.assertEqual(grpc_metadata_from_pb(headers), tuple(items))

    def test_from_pb_invalid_utf8_replaced(self) -> None:
        """Invalid utf-8 in a text key is replaced, never raises."""
        headers = [tunnel_pb2.Header(name="x-a", value=b"\xff")]
        self.assertEqual(grpc_metadata_from_pb(headers), (("x-a", "\ufffd"),))
