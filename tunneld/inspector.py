"""The inspector: the last exchanges of every protocol, for the admin port (SPEC §7.3).

Pure core (no reactor, no grpc): an ``Inspector`` is a bounded ring of
``Exchange`` records, and the entries (HTTP, WebSocket, gRPC) fill one record
per external exchange as it flows.  Recording must cost little on the hot
path, so a record keeps references to what the entry already has (the header
lists it parsed) and does all formatting, masking and base64 only when the
admin port asks (``Exchange.to_json``).  With ``inspect = 0`` the entries hold
no ``Inspector`` at all and do nothing per request.

Memory is bounded: at most ``size`` records; each keeps at most
``body_bytes`` of each body direction and of each of at most
``MAX_MESSAGES`` WebSocket/gRPC messages (later messages are only counted).
Raw header values (credentials included) stay in memory for replay; every
output masks them: header and metadata values and query parameter values
whose name is in the inspector's ``Mask`` (config ``inspect_mask``), for
every entry alike, since masking happens here where records are rendered.
"""

from __future__ import annotations

import base64
import itertools
import re
import time
import urllib.parse
from collections import deque
from typing import Any, Callable, Iterable, Iterator

MAX_MESSAGES = 100   # messages kept per WebSocket / gRPC exchange; later ones are counted only
MASK = "***"
_SECRET_NAMES = frozenset({"authorization", "cookie", "proxy-authorization", "set-cookie"})
_SECRET_WORDS = ("auth", "token", "secret", "password", "cookie", "credential", "session", "key")


#: The default of ``inspect_mask`` (tunneld.config.INSPECT_MASK; repeated here: the inspector imports no config).
DEFAULT_MASK = (
    "authorization", "cookie", "set-cookie", "proxy-authorization", "x-api-key", "x-auth-token",
    "x-csrf-token", "x-session-token", "*token*", "*secret*", "*password*", "*api-key*",
)


class Mask:
    """Which names are masked: exact names, or patterns where ``*`` matches any run (case-insensitive)."""

    def __init__(self, names: Iterable[str] = DEFAULT_MASK) -> None:
        self.names = tuple(n.lower() for n in names)
        self.exact = frozenset(n for n in self.names if "*" not in n)
        patterns = [".*".join(re.escape(part) for part in n.split("*")) for n in self.names if "*" in n]
        self.pattern = re.compile("|".join(patterns)) if patterns else None
        self._seen: dict[str, bool] = {}   # names already judged (a handful of distinct header names)

    def __call__(self, name: str) -> bool:
        name = name.lower()
        hit = self._seen.get(name)
        if hit is None:
            hit = name in self.exact or (self.pattern is not None and self.pattern.fullmatch(name) is not None)
            if len(self._seen) < 4096:
                self._seen[name] = hit
        return hit


_DEFAULT = Mask()


def is_secret(name: str, mask: Mask | None = None) -> bool:
    """Is a header / metadata key a credential? (``-bin`` gRPC metadata: authorization-like words too.)"""
    name = name.lower()
    if name in _SECRET_NAMES or (mask or _DEFAULT)(name):
        return True
    return name.endswith("-bin") and any(w in name for w in _SECRET_WORDS)


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")


def mask_query(target: str, mask: Mask | None = None) -> str:
    """A request target with the values of masked query parameters replaced (``?access_token=***``).

    Everything else is kept byte for byte (order, encoding, parameters without ``=``)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    mask = mask or _DEFAULT
    query, hash_, fragment = query.partition("#")
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        if eq and mask(urllib.parse.unquote_plus(name)):
            part = f"{name}={MASK}"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}{hash_}{fragment}"


def mask_headers(pairs: Iterable[tuple[bytes | str, bytes | str]], mask: Mask | None = None) -> list[list[str]]:
    """Header or metadata pairs as ``[[name, value], ...]`` strings, credentials masked.

    Binary (``-bin``) metadata values are shown as base64."""
    out = []
    for name, value in pairs:
        n = _text(name)
        if is_secret(n, mask):
            v = MASK
        elif n.lower().endswith("-bin") and isinstance(value, bytes):
            v = base64.b64encode(value).decode()
        else:
            v = _text(value)
        out.append([n, v])
    return out


class Message:
    """One WebSocket or gRPC message: direction ("in" = from the external client), size, time, first bytes."""

    __slots__ = ("direction", "size", "time", "opcode", "data")

    def __init__(self, direction: str, t: float, opcode: int, size: int, data: bytes) -> None:
        self.direction = direction
        self.time = t
        self.opcode = opcode
        self.size = size
        self.data = data

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "size": self.size, "time": self.time, "opcode": self.opcode,
                "data": base64.b64encode(self.data).decode()}


class Exchange:
    """One exchange as the inspector keeps it; filled by its entry, read by the admin port."""

    __slots__ = ("inspector", "request_id", "trace_id", "protocol", "route", "client_id", "started", "duration",
                 "status", "method", "path", "host", "scheme", "remote", "request_headers", "response_status",
                 "response_headers", "bytes_in", "bytes_out", "request_body", "response_body", "messages",
                 "messages_dropped", "details", "trailers", "done", "replay_of", "_t0")

    def __init__(self, inspector: Inspector, protocol: str) -> None:
        self.inspector = inspector
        self.protocol = protocol
        self.request_id = ""
        self.trace_id = ""
        self.route = "-"
        self.client_id = ""
        self.started = inspector.wall()
        self._t0 = time.monotonic()
        self.duration: float | None = None
        self.status: object = None
        self.method = ""     # HTTP method; gRPC: the method's name
        self.path = ""       # HTTP: the URI; gRPC: the service
        self.host = ""
        self.scheme = ""
        self.remote = ""
        self.request_headers: Any = ()    # raw pairs (bytes, bytes) or gRPC (str, bytes)
        self.response_status = 0
        self.response_headers: Any = ()
        self.bytes_in = 0
        self.bytes_out = 0
        self.request_body = b""
        self.response_body = b""
        self.messages: list[Message] | None = None
        self.messages_dropped = 0
        self.details = ""
        self.trailers: Any = ()
        self.done = False
        self.replay_of = ""

    # -- filled by the entries ---------------------------------------------------------

    def request_chunk(self, data: bytes) -> None:
        self.bytes_in += len(data)
        room = self.inspector.body_bytes - len(self.request_body)
        if room > 0:
            self.request_body += data[:room]

    def response_chunk(self, data: bytes) -> None:
        self.bytes_out += len(data)
        room = self.inspector.body_bytes - len(self.response_body)
        if room > 0:
            self.response_body += data[:room]

    def message(self, direction: str, data: bytes, opcode: int = 0, size: int | None = None) -> None:
        """A new WebSocket / gRPC message (its first piece; ``size``: the whole message's, when known)."""
        n = len(data) if size is None else size
        if direction == "in":
            self.bytes_in += n
        else:
            self.bytes_out += n
        if self.messages is None:
            self.messages = []
        if len(self.messages) >= MAX_MESSAGES:
            self.messages_dropped += 1
            return
        self.messages.append(Message(direction, time.monotonic() - self._t0, opcode, n,
                                     data[: self.inspector.body_bytes]))

    def message_more(self, direction: str, data: bytes, count: bool = True) -> None:
        """A later piece of the last message in ``direction`` (``count``: its size was not known at its start)."""
        if count and direction == "in":
            self.bytes_in += len(data)
        elif count:
            self.bytes_out += len(data)
        if not self.messages:
            return
        for m in reversed(self.messages):
            if m.direction == direction:
                if count:
                    m.size += len(data)
                room = self.inspector.body_bytes - len(m.data)
                if room > 0:
                    m.data += data[:room]
                return

    def end(self, status: object) -> None:
        if self.done:
            return
        self.done = True
        self.status = status
        self.duration = time.monotonic() - self._t0
        if not self.request_id:
            self.request_id = f"local-{next(self.inspector.local_ids)}"   # refused before any tunnel

    # -- read by the admin port ----------------------------------------------------------

    @property
    def request_complete(self) -> bool:
        """Was the whole request body captured (replay needs it)?"""
        return self.done and len(self.request_body) == self.bytes_in

    def to_json(self, bodies: bool = False) -> dict[str, Any]:
        mask = self.inspector.mask
        if self.protocol == "grpc":
            request: dict[str, Any] = {"service": self.path, "method": self.method,
                                       "metadata": mask_headers(self.request_headers, mask)}
        else:
            request = {"method": self.method, "path": mask_query(self.path, mask), "host": self.host,
                       "headers": mask_headers(self.request_headers, mask)}
        response: dict[str, Any] = {"status": self.response_status,
                                    "headers": mask_headers(self.response_headers, mask)}
        if self.protocol == "grpc":
            response["details"] = self.details
            response["trailers"] = mask_headers(self.trailers, mask)
        out: dict[str, Any] = {
            "request_id": self.request_id, "trace_id": self.trace_id, "protocol": self.protocol,
            "route": self.route, "client_id": self.client_id, "started": self.started,
            "duration": self.duration if self.duration is not None else time.monotonic() - self._t0,
            "done": self.done, "status": self.status, "request": request, "response": response,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "messages": [m.to_json() for m in self.messages or ()],
            "messages_dropped": self.messages_dropped,
            "replayable": self.protocol == "http" and self.request_complete,
        }
        if self.replay_of:
            out["replay_of"] = self.replay_of
        if bodies:
            out["request"]["body"] = base64.b64encode(self.request_body).decode()
            out["request"]["body_complete"] = self.request_complete
            out["response"]["body"] = base64.b64encode(self.response_body).decode()
            out["response"]["body_complete"] = self.done and len(self.response_body) == self.bytes_out
        return out


class Inspector:
    """The ring: the last ``size`` exchanges (``size`` > 0), newest last."""

    def __init__(self, size: int, body_bytes: int = 0, wall: Callable[[], float] = time.time,
                 mask: Iterable[str] = DEFAULT_MASK) -> None:
        assert size > 0
        self.size = size
        self.body_bytes = body_bytes
        self.mask = Mask(mask)   # a config reload may replace it
        self.wall = wall
        self.ring: deque[Exchange] = deque(maxlen=size)
        self.local_ids = itertools.count(1)
        self.replayer: Callable[[Exchange], str] | None = None   # set by the tap: HTTP replay

    def resize(self, size: int, body_bytes: int) -> None:
        """A config reload: keep the newest ``size`` exchanges; ``body_bytes`` for what is captured from now on."""
        assert size > 0
        self.size = size
        self.body_bytes = body_bytes
        self.ring = deque(self.ring, maxlen=size)

    def begin(self, protocol: str) -> Exchange:
        rec = Exchange(self, protocol)
        self.ring.append(rec)   # deque(maxlen) drops the oldest
        return rec

    def __iter__(self) -> Iterator[Exchange]:
        return reversed(self.ring)   # newest first

    def __len__(self) -> int:
        return len(self.ring)

    def find(self, request_id: str) -> Exchange | None:
        for rec in reversed(self.ring):
            if rec.request_id == request_id:
                return rec
        return None

    def listing(self) -> dict[str, Any]:
        return {"exchanges": [rec.to_json() for rec in self], "inspect": self.size,
                "inspect_body_bytes": self.body_bytes}


def make(size: int, body_bytes: int, mask: Iterable[str] = DEFAULT_MASK) -> Inspector | None:
    """The inspector for ``inspect`` / ``inspect_body_bytes`` / ``inspect_mask``; None when off."""
    return Inspector(size, body_bytes, mask=mask) if size > 0 else None
