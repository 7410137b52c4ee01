"""The path a request is routed on: its path normalised as RFC 3986 says (pure).

A backend that normalises paths itself (most frameworks do) would serve
``/x/../admin/`` as ``/admin/``; if tunneld matched the raw string it would
pick another route than the backend's idea of the path, and a per-route
``basic_auth`` or IP rule could be walked around.  So routes and access rules
judge ``normalise_path(raw)``:

1. every ``%XX`` escape must be two hex digits; one of an unreserved character
   (``A-Z a-z 0-9 - . _ ~``, RFC 3986 §2.3) is decoded, every other is kept
   with upper-case hex (§6.2.2.1); an encoded ``/`` (``%2F``) or NUL
   (``%00``), or a raw NUL, is refused: they mean something else to every
   backend that decodes them;
2. repeated slashes are merged (``//chat/`` is ``/chat/``), as nginx's
   ``merge_slashes`` does;
3. ``.`` and ``..`` segments are removed (§5.2.4), ``.`` and ``..`` spelled
   with escapes too (step 1 decoded them); a ``..`` above the root is refused
   instead of being dropped.

A trailing slash stays (``/chat/`` and ``/chat`` are different paths).
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%(..)?", re.S)
_HEX = frozenset("0123456789abcdefABCDEF")


class PathError(ValueError):
    """The path cannot be routed safely (answered 400); the message says why."""


def normalise_path(raw: str) -> str:
    """The normalised form of the origin-form path ``raw`` (no query), or PathError."""
    if not raw.startswith("/"):
        raise PathError(f"path {raw[:64]!r} does not start with '/'")
    if "\x00" in raw:
        raise PathError("path holds a NUL character")
    path = _ESCAPE.sub(_decode, raw) if "%" in raw else raw
    if "/." not in path and "//" not in path:
        return path   # the common case: nothing to merge or remove
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "..":
            if not out:
                raise PathError("path escapes the root with '..'")
            out.pop()
        elif segment and segment != ".":
            out.append(segment)
            continue
        elif segment == "" and index != last:
            continue   # a repeated slash
        if index == last:
            out.append("")   # ".", ".." or "" at the end: the path ends with a slash
    return "/" + "/".join(out)


def _decode(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None or digits[0] not in _HEX or digits[1] not in _HEX:
        raise PathError("path holds a malformed percent escape")
    char = chr(int(digits, 16))
    if char in _UNRESERVED:
        return char
    if char == "/":
        raise PathError("path holds an encoded '/' (%2F)")
    if char == "\x00":
        raise PathError("path holds an encoded NUL (%00)")
    return "%" + digits.upper()
