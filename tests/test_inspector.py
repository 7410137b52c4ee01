"""The inspector's ring (pure): bounds, body prefixes, messages, masking, what replay may use."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tunneld import inspector as i
from tunneld.config import parse_client_config, parse_server_config


class RingTests(SynchronousTestCase):
    def test_off_is_none(self) -> None:
        """inspect = 0 makes no inspector at all (the entries then record nothing)."""
        self.assertIsNone(i.make(0, 100))
        self.assertIsInstance(i.make(1, 0), i.Inspector)

    def test_ring_keeps_the_newest_and_bodies_are_cut(self) -> None:
        """More exchanges than `inspect` and bigger bodies than `inspect_body_bytes`: the oldest go, prefixes stay."""
        ring = i.Inspector(3, 4)
        for n in range(10):
            rec = ring.begin("http")
            rec.request_id = f"r{n}"
            rec.request_chunk(b"abcdef")
            rec.request_chunk(b"gh")
            rec.response_chunk(b"0123456789" * 1000)
            rec.end(200)
        self.assertEqual([r.request_id for r in ring], ["r9", "r8", "r7"])
        self.assertIsNone(ring.find("r6"))
        rec = ring.find("r8")
        assert rec is not None
        self.assertEqual((rec.request_body, rec.response_body), (b"abcd", b"0123"))
        self.assertEqual((rec.bytes_in, rec.bytes_out), (8, 10000))
        self.assertFalse(rec.request_complete)
        self.assertEqual(sum(len(r.request_body) + len(r.response_body) for r in ring), 3 * 8)

    def test_heads_only_keeps_no_bytes_but_bodyless_requests_are_complete(self) -> None:
        """With inspect_body_bytes = 0 no body byte is kept; a request without a body is still replayable."""
        ring = i.Inspector(5, 0)
        get = ring.begin("http")
        get.end(200)
        post = ring.begin("http")
        post.request_chunk(b"x")
        post.end(200)
        self.assertTrue(get.request_complete)
        self.assertFalse(post.request_complete)
        self.assertEqual(post.request_body, b"")

    def test_messages_bounded(self) -> None:
        """Each message keeps its first bytes; after MAX_MESSAGES only counts go on."""
        ring = i.Inspector(1, 3)
        rec = ring.begin("websocket")
        for n in range(i.MAX_MESSAGES + 5):
            rec.message("in" if n % 2 else "out", b"hello", 1)
        rec.message_more("in", b"more")
        self.assertEqual(len(rec.messages or []), i.MAX_MESSAGES)
        self.assertEqual(rec.messages_dropped, 5)
        self.assertEqual({m.data for m in rec.messages or []}, {b"hel"})
        rec.end(1000)
        out = rec.to_json()
        self.assertEqual(out["messages"][0], {"direction": "out", "size": 5, "time": out["messages"][0]["time"],
                                              "opcode": 1, "data": "aGVs"})
        self.assertEqual(out["status"], 1000)

    def test_refused_exchanges_get_a_local_id(self) -> None:
        """An exchange that never reached a tunnel still has an id to open it by."""
        ring = i.Inspector(2)
        rec = ring.begin("http")
        rec.end(404)
        self.assertTrue(rec.request_id.startswith("local-"))
        self.assertIs(ring.find(rec.request_id), rec)


class MaskTests(SynchronousTestCase):
    def test_credentials_masked(self) -> None:
        """Authorization, Cookie, Proxy-Authorization and authorization-like -bin metadata never leave unmasked."""
        pairs = [(b"Authorization", b"Bearer s3cret"), (b"cookie", b"sid=1"), (b"Proxy-Authorization", b"Basic x"),
                 (b"accept", b"*/*")]
        self.assertEqual(i.mask_headers(pairs), [["Authorization", "***"], ["cookie", "***"],
                                                 ["Proxy-Authorization", "***"], ["accept", "*/*"]])
        meta = [("authorization", b"Bearer t"), ("x-auth-token-bin", b"\x00\x01"), ("x-trace-bin", b"\x00"),
                ("x-user", b"ann")]
        self.assertEqual(i.mask_headers(meta), [["authorization", "***"], ["x-auth-token-bin", "***"],
                                                ["x-trace-bin", "AA=="], ["x-user", "ann"]])

    def test_json_output_has_the_spec_keys_and_no_secret(self) -> None:
        """to_json has every key of SPEC §7.3, bodies only on request, and no credential."""
        ring = i.Inspector(2, 100)
        rec = ring.begin("http")
        rec.request_headers = [(b"authorization", b"Bearer s3cret")]
        rec.request_chunk(b"body")
        rec.end(200)
        out = rec.to_json()
        for key in ("request_id", "trace_id", "protocol", "route", "client_id", "started", "duration", "status",
                    "request", "response", "bytes_in", "bytes_out", "messages"):
            self.assertIn(key, out)
        self.assertNotIn("body", out["request"])
        self.assertEqual(rec.to_json(bodies=True)["request"]["body"], "Ym9keQ==")
        self.assertNotIn("s3cret", json.dumps(ring.listing()))


class ConfigTests(SynchronousTestCase):
    def test_keys_and_defaults(self) -> None:
        """inspect (200) and inspect_body_bytes (0) in [server] and [client]; negatives refused."""
        server = parse_server_config({"server": {}, "groups": [{"name": "default", "tokens": ["t"]}]}, "s.toml")
        self.assertEqual((server.server.inspect, server.server.inspect_body_bytes), (200, 0))
        client = parse_client_config({"client": {"inspect": 0, "inspect_body_bytes": 4096}}, "c.toml")
        self.assertEqual((client.client.inspect, client.client.inspect_body_bytes), (0, 4096))
        from tunneld.config import ConfigError
        with self.assertRaises(ConfigError):
            parse_server_config({"server": {"inspect": -1}, "groups": [{"name": "default", "tokens": ["t"]}]},
                                "s.toml")


class InspectMaskTests(SynchronousTestCase):
    """inspect_mask (SPEC §8.2): headers, gRPC metadata and query parameters, in every rendering."""

    SECRET_HEADERS = ("Authorization", "Cookie", "Set-Cookie", "Proxy-Authorization", "X-Api-Key", "X-Auth-Token",
                      "X-CSRF-Token", "X-Session-Token", "X-My-Token-Here", "Client-Secret", "DB-Password",
                      "My-Api-Key")

    def test_default_mask_covers_each_name(self) -> None:
        """Every default name, and names containing token/secret/password/api-key, are masked; others are not."""
        ring = i.Inspector(2)
        rec = ring.begin("http")
        rec.request_headers = [(n.encode(), b"s3cret-" + n.encode()) for n in self.SECRET_HEADERS] + [
            (b"Accept", b"*/*"), (b"X-Request-Id", b"r1")]
        rec.response_headers = [(b"Set-Cookie", b"sid=s3cret")]
        rec.path = "/a?access_token=s3cret1&page=2&token=s3cret2&api_key=ok&x-api-key=s3cret3&flag"
        rec.end(200)
        out = rec.to_json(bodies=True)
        text = json.dumps(ring.listing()) + json.dumps(out)
        self.assertNotIn("s3cret", text)
        self.assertEqual(out["request"]["headers"][-2:], [["Accept", "*/*"], ["X-Request-Id", "r1"]])
        self.assertEqual(out["request"]["path"],
                         "/a?access_token=***&page=2&token=***&api_key=ok&x-api-key=***&flag")

    def test_grpc_metadata_masked_whatever_the_entry(self) -> None:
        """gRPC metadata and trailers are masked where the record is rendered (any entry fills them)."""
        ring = i.Inspector(2)
        rec = ring.begin("grpc")
        rec.request_headers = [("x-api-key", b"s3cret"), ("x-session-token", b"s3cret"), ("x-user", b"ann"),
                               ("authorization", b"Bearer s3cret")]
        rec.trailers = [("x-refresh-token", b"s3cret")]
        rec.end("OK")
        out = rec.to_json()
        self.assertNotIn("s3cret", json.dumps(out))
        self.assertIn(["x-user", "ann"], out["request"]["metadata"])

    def test_websocket_query_token(self) -> None:
        """A WebSocket's ?token= is masked in its path."""
        ring = i.Inspector(2)
        rec = ring.begin("websocket")
        rec.path = "/chat/ws?token=s3cret&room=1"
        rec.end(1000)
        self.assertEqual(rec.to_json()["request"]["path"], "/chat/ws?token=***&room=1")

    def test_configured_mask_and_reload(self) -> None:
        """A configured list replaces the default (wildcards allowed); assigning a new Mask applies at once."""
        ring = i.Inspector(2, mask=("x-mine", "*-pin"))
        rec = ring.begin("http")
        rec.request_headers = [(b"X-Mine", b"a"), (b"Card-Pin", b"1234"), (b"X-Api-Key", b"k")]
        rec.path = "/?card-pin=1234"
        rec.end(200)
        out = rec.to_json()
        self.assertEqual(out["request"]["headers"], [["X-Mine", "***"], ["Card-Pin", "***"], ["X-Api-Key", "k"]])
        self.assertEqual(out["request"]["path"], "/?card-pin=***")
        ring.mask = i.Mask(i.DEFAULT_MASK)
        self.assertEqual(rec.to_json()["request"]["headers"][2], ["X-Api-Key", "***"])
        self.assertEqual(rec.to_json()["request"]["path"], "/?card-pin=1234")

    def test_replay_keeps_the_raw_values(self) -> None:
        """Masking is output only: the record keeps what replay needs."""
        ring = i.Inspector(2)
        rec = ring.begin("http")
        rec.request_headers = [(b"X-Api-Key", b"k1")]
        rec.path = "/?token=t"
        rec.to_json()
        self.assertEqual((rec.request_headers, rec.path), ([(b"X-Api-Key", b"k1")], "/?token=t"))
class BoundsTests(SynchronousTestCase):
    def test_heads_capped_per_exchange(self) -> None:
        """At most header_bytes of heads per exchange (request, response, trailers together); the rest counted, not kept; no replay then."""
        ring = i.Inspector(3, 0, header_bytes=100)
        rec = ring.begin("http")
        rec.request_headers = [(b"a", b"x" * 40), (b"b", b"y" * 40), (b"c", b"z" * 40)]
        self.assertEqual(rec.request_headers, [(b"a", b"x" * 40), (b"b", b"y" * 40)])
        rec.response_headers = [(b"d", b"1" * 10), (b"e", b"2" * 10)]
        self.assertEqual(rec.response_headers, [(b"d", b"1" * 10)])
        self.assertEqual(rec.headers_dropped, 2)
        rec.end(200)
        self.assertFalse(rec.request_complete)
        self.assertEqual(rec.to_json()["headers_dropped"], 2)
        small = ring.begin("http")
        pairs = [(b"host", b"x")]
        small.request_headers = pairs
        self.assertIs(small.request_headers, pairs)   # the common case keeps the entry's own list

    def test_total_budget_forgets_oldest(self) -> None:
        """All records together keep at most budget bytes: the oldest are forgotten first, the current one stays."""
        ring = i.Inspector(100, 1000, header_bytes=1000, budget=2500)
        recs = []
        for n in range(5):
            rec = ring.begin("http")
            rec.request_headers = [(b"h", b"v" * 99)]   # 100 bytes
            rec.request_chunk(b"b" * 900)                # 900 bytes
            recs.append(rec)
            self.assertLessEqual(ring.held, 2500)
        self.assertEqual(list(ring), [recs[4], recs[3]])
        self.assertEqual(ring.held, 2000)
        self.assertEqual(ring.evicted, 3)
        big = ring.begin("http")
        big.request_chunk(b"c" * 1000)
        big.response_chunk(b"d" * 1000)
        self.assertEqual(list(ring), [big])
        self.assertEqual(ring.held, 1000 + min(1000, 1000))

    def test_ring_size_still_bounds_and_accounts(self) -> None:
        """Records beyond size are dropped and their bytes no longer counted."""
        ring = i.Inspector(2, 10)
        for _ in range(5):
            ring.begin("http").request_chunk(b"x" * 20)
        self.assertEqual((len(ring), ring.held), (2, 20))
        ring.resize(1, 10)
        self.assertEqual((len(ring), ring.held), (1, 10))
