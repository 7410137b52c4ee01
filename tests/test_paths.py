"""Path normalisation before routing (tunneld.registry.paths): examples and properties."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunneld.registry.paths import PathError, normalise_path

UNRESERVED = string.ascii_letters + string.digits + "-._~"
SEGMENT_CHARS = UNRESERVED + "!$&'()*+,;=:@"


def encode_all(path: str) -> str:
    """Every character of ``path`` but '/' percent-encoded."""
    return "".join(c if c == "/" else f"%{ord(c):02x}" for c in path)


segments = st.lists(st.one_of(st.sampled_from([".", "..", ""]), st.text(SEGMENT_CHARS, min_size=1, max_size=6)),
                    max_size=8)


def reference(parts: list[str]) -> str | None:
    """RFC 3986 §5.2.4 with merged slashes, written another way (None: escapes the root)."""
    stack: list[str] = []
    for part in parts:
        if part == "..":
            if not stack:
                return None
            stack.pop()
        elif part not in (".", ""):
            stack.append(part)
    trailing = bool(parts) and parts[-1] in (".", "..", "")
    return "/" + "/".join(stack) + ("/" if trailing and stack else "")


class ExampleTests(SynchronousTestCase):
    def test_issue_examples_reach_chat(self) -> None:
        """/x/../chat/, /%63hat/ and //chat/ are all /chat/."""
        for raw in ("/x/../chat/", "/%63hat/", "//chat/", "/./chat/", "/%2e/chat/", "/x/%2E%2E/chat/", "///chat//"):
            self.assertEqual(normalise_path(raw), "/chat/", raw)

    def test_unchanged(self) -> None:
        """Already-normal paths come back as they are (trailing slash kept, other escapes kept)."""
        for raw in ("/", "/chat", "/chat/", "/a/b.c/d", "/a%20b", "/%C3%A9t%C3%A9", "/a/.b/..c", "/a;b=c", "/~u"):
            self.assertEqual(normalise_path(raw), raw, raw)

    def test_escapes_normalised(self) -> None:
        """Unreserved escapes are decoded, others get upper-case hex."""
        self.assertEqual(normalise_path("/%41%7e%2d/%c3%a9%3f%25"), "/A~-/%C3%A9%3F%25")

    def test_dot_segments(self) -> None:
        """. and .. are removed; a .. at the end leaves a trailing slash."""
        cases = {"/a/b/../c": "/a/c", "/a/./b": "/a/b", "/a/b/..": "/a/", "/a/b/.": "/a/b/", "/a/..": "/",
                 "/a/b/../../c/": "/c/", "/a//..//b": "/b"}
        for raw, want in cases.items():
            self.assertEqual(normalise_path(raw), want, raw)

    def test_refused(self) -> None:
        """Escaping the root, %2F, NUL (raw or %00), malformed escapes and relative paths are PathError."""
        for raw, why in (("/..", "root"), ("/a/../..", "root"), ("/%2e%2e/x", "root"), ("/../chat/", "root"),
                         ("/a%2Fb", "'/'"), ("/a%2fb", "'/'"), ("/a%00", "NUL"), ("/a\x00b", "NUL"),
                         ("/a%zz", "malformed"), ("/a%4", "malformed"), ("/a%", "malformed"),
                         ("chat/", "start"), ("", "start")):
            with self.assertRaises(PathError, msg=raw) as caught:
                normalise_path(raw)
            self.assertIn(why, str(caught.exception), raw)


class PropertyTests(SynchronousTestCase):
    @given(segments)
    def test_matches_the_reference(self, parts: list[str]) -> None:
        """Over safe segments, the result is RFC 3986's dot removal with slashes merged."""
        raw = "/" + "/".join(parts)
        want = reference(parts)
        if want is None:
            self.assertRaises(PathError, normalise_path, raw)
        else:
            self.assertEqual(normalise_path(raw), want)

    @given(segments)
    def test_encoding_unreserved_characters_changes_nothing(self, parts: list[str]) -> None:
        """Percent-encoding every character (dots included) gives the same route path or the same refusal."""
        raw = "/" + "/".join(parts)
        encoded = encode_all(raw)
        try:
            want = normalise_path(raw)
        except PathError:
            self.assertRaises(PathError, normalise_path, encoded)
            return
        if all(c in UNRESERVED or c == "/" for c in raw):
            self.assertEqual(normalise_path(encoded), want)

    @given(st.text(max_size=40).map(lambda t: "/" + t))
    def test_idempotent_and_clean(self, raw: str) -> None:
        """Any path either is refused or normalises to a fixed point with no //, . or .. segments."""
        try:
            once = normalise_path(raw)
        except PathError:
            return
        self.assertEqual(normalise_path(once), once)
        self.assertTrue(once.startswith("/"))
        self.assertNotIn("//", once)
        self.assertFalse({".", ".."} & set(once.split("/")))
        self.assertNotIn("\x00", once)
