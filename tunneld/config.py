"""Configuration: TOML files -> frozen dataclasses, validated before anything listens.

``etc/server.toml`` becomes a :class:`ServerConfig` (``[server]``,
``[[groups]]``, ``[[routes]]``, ``[[upstreams]]``, ``[[forward]]``) and
``etc/client.toml`` a :class:`ClientConfig` (``[client]``). Every table is
optional and every key has a default where one makes sense (SPEC section 4).

Every mistake (unknown table or key, wrong type, missing required key, bad
address or URL, a route naming an unknown group, duplicate names) raises
:class:`ConfigError`, whose one-line message names the file, the table (for an
array of tables, which entry: index from 1 and name) and the key.

The loader resolves what the file leaves implicit, so consumers never do:
a route or forward rule with ``timeout = 0`` gets ``server.request_timeout``,
route and forward hosts are lower-case, and an empty ``client_id`` becomes
``<hostname>-<6 hex digits>``.

Pure core: stdlib only, no reactor, no clock.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import ipaddress
import json
import math
import re
import secrets
import socket
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tunneld.registry.access import parse_cidr, parse_htpasswd_line
from tunneld.window import MAX_WINDOW_CAP

__all__ = [
    "ClientConfig",
    "ClientSettings",
    "ConfigError",
    "ForwardRule",
    "Group",
    "Route",
    "ServerConfig",
    "ServerSettings",
    "Upstream",
    "backend_address",
    "describe",
    "load_any_config",
    "load_client_config",
    "load_server_config",
    "parse_client_config",
    "parse_listen",
    "parse_server_config",
]


class ConfigError(Exception):
    """A configuration mistake, located by file, table and key.

    ``table`` is the table as written in the file: ``"[server]"``,
    ``"[[routes]] #2 'web'"`` (second entry, named web), or ``"(top level)"``;
    ``""`` when the whole file is at fault (unreadable, not TOML), and ``key``
    is then ``""`` too. ``str(error)`` is one line, e.g.
    ``etc/server.toml: [[routes]] #2 'web' key 'group': unknown group 'nope'``.
    """

    def __init__(self, file: str, table: str, key: str, message: str) -> None:
        super().__init__(file, table, key, message)
        self.file = file
        self.table = table
        self.key = key
        self.message = message

    def __str__(self) -> str:
        key = f"key {self.key!r}" if self.key else ""
        where = " ".join(part for part in (self.table, key) if part)
        text = f"{self.file or '<config>'}: {where + ': ' if where else ''}{self.message}"
        return " ".join(text.splitlines())


# --- server ---------------------------------------------------------------

#: What the inspector masks by default: credential headers, and any name containing these words.
INSPECT_MASK: tuple[str, ...] = (
    "authorization", "cookie", "set-cookie", "proxy-authorization", "x-api-key", "x-auth-token",
    "x-csrf-token", "x-session-token", "*token*", "*secret*", "*password*", "*api-key*",
)
#: Tokens the project ships in examples; never acceptable on a public tunnel port.
EXAMPLE_TOKENS = frozenset({"change-me"})
#: A token shorter than this (bytes) is guessable.
MIN_TOKEN_BYTES = 16
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True)
class ServerSettings:
    """The ``[server]`` table: listeners, timeouts (float seconds), sizes (int bytes)."""

    tunnel_listen: str = "127.0.0.1:7000"
    http_listen: str = "127.0.0.1:8080"
    grpc_listen: str = "127.0.0.1:8081"  # "" disables the listener
    admin_listen: str = "127.0.0.1:9100"  # "" disables
    request_timeout: float = 30.0
    heartbeat_timeout: float = 60.0
    heartbeat_interval: float = 10.0  # how often the server sends heartbeats
    cleanup_interval: float = 30.0
    drain_timeout: float = 10.0  # SIGTERM: how long in-flight requests may finish
    websocket_ping_interval: int = 0  # whole seconds between pings on idle entry WebSockets; 0 = off
    access_log: bool = True  # one log line per finished request
    admin_token: str = field(default="", repr=False)  # "" = admin port open; else Authorization: Bearer <token>
    log_format: str = "text"  # "text" or "json" (JSON lines for log shippers)
    window: int = 262144  # per-request per-direction flow-control window
    max_window: int = 16777216  # receive windows of requests whose reader keeps up grow up to this (>= window)
    window_budget: int = 67108864  # per stream: growth of all its receive windows together (>= max_window)
    max_message_size: int = 67108864  # gRPC message limit on the tunnel port
    max_frame_size: int = 1048576  # tunnel frames: messages packed per gRPC write (<= max_message_size)
    max_header_size: int = 16384  # HTTP entry: total request header bytes
    header_timeout: float = 20.0  # HTTP entry: seconds for a complete request head (each request), else closed
    max_connections: int = 10000  # HTTP entry: open connections; beyond, new ones get 503 and are closed
    open_rate: int = 500  # tunnel port: new streams accepted per second on average (0 = no limit)
    open_burst: int = 200  # tunnel port: ... and at most this many at once
    keepalive_interval: float = 10.0  # tunnel port: gRPC keepalive ping every this many seconds per connection
    tls_cert: str = ""  # tunnel port: PEM certificate chain; with tls_key, the port speaks TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # tunnel port: PEM CA bundle; set = clients must present a certificate (mTLS)
    http_tls_cert: str = ""  # HTTP entry over TLS (https/wss)
    http_tls_key: str = ""
    grpc_tls_cert: str = ""  # gRPC entry over TLS
    grpc_tls_key: str = ""
    upstream_ca: str = ""  # PEM CA bundle to verify https upstreams; "" = the system's
    ready_timeout: float = 10.0  # /healthz: "starting" until every group with routes has a client, at most this long
    drain_delay: float = 0.0  # SIGTERM: entries keep serving this long with /healthz 503, then the drain
    proxy_protocol: bool = False  # http_listen and grpc_listen expect HAProxy's PROXY header (v1/v2) on every connection
    idle_timeout: float = 60.0  # an HTTP/2 connection with no open stream is closed after this (PINGs do not count)
    http2: bool = True  # http_listen: HTTP/2 beside HTTP/1.1 (ALPN h2 on TLS, the h2c preface on a plain port)
    inspect: int = 200  # inspector: the last N exchanges kept for the admin port's /inspect; 0 = off
    inspect_body_bytes: int = 0  # inspector: bytes kept of each body / WebSocket or gRPC message; 0 = heads only
    auth_fail_limit: int = 10  # tunnel port: refused opens from one address within auth_fail_window before it is throttled; 0 = never
    auth_fail_window: float = 60.0  # tunnel port: seconds a throttled address's opens are refused (RESOURCE_EXHAUSTED)
    admin_hosts: tuple[str, ...] = ()  # admin port: Host names answered besides its address, localhost, 127.0.0.1, [::1]
    inspect_mask: tuple[str, ...] = INSPECT_MASK  # inspector: header / metadata / query names masked ("*" = any run)
    max_connections_per_ip: int = 256  # public listeners: open connections from one address; beyond, 503 + close
    max_websockets_per_ip: int = 64  # HTTP entry: open WebSockets from one address; beyond, the handshake gets 503
    stall_timeout: float = 10.0  # a stream whose windows stay full this long with requests waiting is stalled
    inspect_header_bytes: int = 16384  # inspector: most bytes of heads kept per exchange


@dataclass(frozen=True)
class Group:
    """A ``[[groups]]`` entry: clients presenting one of ``tokens`` join ``name``."""

    name: str
    tokens: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class Route:
    """A ``[[routes]]`` entry: external request -> tunnel -> backend next to a client.

    Loaded routes always have ``timeout > 0`` and a lower-case ``host``.
    """

    name: str
    group: str = "default"
    backend: str = ""  # http(s):// for HTTP+WS routes, grpc(s):// when grpc_service is set
    host: str = ""  # "" any host; exact "app.example.com" or wildcard "*.example.com"
    path_prefix: str = "/"
    set_host: str = ""
    timeout: float = 0.0  # 0 in the file: server.request_timeout (resolved by the loader)
    grpc_service: str = ""  # "package.Service"; set => a gRPC route (path_prefix ignored)
    max_message_size: int = 16777216  # WebSocket / gRPC message limit
    max_body_size: int = 0  # HTTP request body limit, 0 = unlimited
    basic_auth: tuple[str, ...] = field(default=(), repr=False)  # htpasswd lines "user:$2y$..." (bcrypt)
    allow_ips: tuple[str, ...] = ()  # CIDRs; set = only these client addresses are served (403 otherwise)
    deny_ips: tuple[str, ...] = ()  # CIDRs refused with 403 (checked before allow_ips)
    max_websockets: int = 1000  # open WebSockets on this route (server-wide); beyond, the handshake gets 503
    preserve_path: bool = False  # the backend gets the raw path (routing and access rules judge the normalised one)

    @property
    def protected(self) -> bool:
        """Does access control apply (basic auth or an IP rule)?"""
        return bool(self.basic_auth or self.allow_ips or self.deny_ips)


@dataclass(frozen=True)
class Upstream:
    """An ``[[upstreams]]`` entry: HTTP origins reachable from the server."""

    name: str
    backends: tuple[str, ...]  # non-empty, each http:// or https://
    cooldown: float = 10.0  # seconds a backend that refused a connection is left out


@dataclass(frozen=True)
class ForwardRule:
    """A ``[[forward]]`` entry: client HTTP entry -> tunnel -> server -> upstream."""

    upstream: str
    host: str = ""
    path_prefix: str = "/"
    set_host: str = ""
    timeout: float = 0.0  # resolved like Route.timeout
    name: str = ""  # the loader fills f"forward-{index}" (index from 1)


@dataclass(frozen=True)
class ServerConfig:
    """A whole server file, validated and resolved."""

    path: str = ""
    server: ServerSettings = field(default_factory=ServerSettings)
    groups: tuple[Group, ...] = ()
    routes: tuple[Route, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    forward: tuple[ForwardRule, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)  # unsafe but allowed (on loopback); logged at start

    def group(self, name: str) -> Group | None:
        """The group called ``name``, or None."""
        for group in self.groups:
            if group.name == name:
                return group
        return None

    def routes_for_group(self, name: str) -> tuple[Route, ...]:
        """The routes served by group ``name``, in file order."""
        return tuple(route for route in self.routes if route.group == name)

    def upstream(self, name: str) -> Upstream | None:
        """The upstream called ``name``, or None."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None

    def version(self) -> str:
        """A stable short hash of the (resolved) routes: it changes when they do.

        Computed once per config object (it is frozen): every client's config
        sync asks for it, and hashing the routes costs ~85 us for three routes
        (milliseconds for hundreds), a few % of a core for a fleet.
        """
        cached: str | None = self.__dict__.get("_version")
        if cached is None:
            text = json.dumps([dataclasses.asdict(route) for route in self.routes], sort_keys=True)
            cached = hashlib.sha256(text.encode()).hexdigest()[:16]
            object.__setattr__(self, "_version", cached)   # frozen: bypass, as dataclasses' own __init__ does
        return cached


# --- client ---------------------------------------------------------------


#: The client's gRPC message limit on its tunnel channel.
CLIENT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class ClientSettings:
    """The ``[client]`` table."""

    server: str = "127.0.0.1:7000"  # the first (or only) server; ``servers`` holds them all
    group: str = "default"
    token: str = field(default="change-me", repr=False)
    client_id: str = ""  # the loader fills f"{hostname}-{6 hex digits}"
    http_entry: str = ""  # "" disables the forward direction
    http2: bool = True  # http_entry: HTTP/2 (h2c prior knowledge) beside HTTP/1.1
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 90.0
    keepalive_interval: float = 10.0  # gRPC keepalive ping to each server every this many seconds
    dial_jitter: float = 1.0  # first dial after start / after a lost stream waits a random 0..this s; 0 = off
    config_sync_interval: float = 30.0
    max_concurrency: int = 1000
    allow_backends: tuple[str, ...] = ()  # "host:port" entries; () allows every route backend
    drain_timeout: float = 10.0
    request_timeout: float = 60.0  # http_entry: seconds to wait for a response head (server rules time out first)
    websocket_ping_interval: int = 0  # whole seconds between pings on idle backend WebSockets; 0 = off
    access_log: bool = False  # one log line per request served (the server logs them already)
    admin_listen: str = ""  # /metrics, /status, dashboard; "" disables
    admin_token: str = field(default="", repr=False)  # "" = admin port open; else Authorization: Bearer <token>
    log_format: str = "text"  # "text" or "json"
    tls: bool = False  # dial the server with TLS (implied by tls_ca / tls_cert)
    tls_ca: str = ""  # PEM CA bundle to verify the server; "" = the system's
    tls_cert: str = ""  # client certificate for mTLS
    tls_key: str = ""
    tls_server_name: str = ""  # name to verify in the server certificate; "" = the host of `server`
    backend_ca: str = ""  # PEM CA bundle to verify https/wss/grpcs backends; "" = the system's
    max_frame_size: int = 1048576  # tunnel frames: messages packed per gRPC write (<= 64 MiB)
    max_window: int = 16777216  # receive windows of requests whose reader keeps up grow up to this
    window_budget: int = 67108864  # per stream: growth of all its receive windows together (>= max_window)
    inspect: int = 200  # inspector on the client's admin port: the last N exchanges kept; 0 = off
    inspect_body_bytes: int = 0  # inspector: bytes kept of each body / message; 0 = heads only
    admin_hosts: tuple[str, ...] = ()  # admin port: Host names answered besides its address, localhost, 127.0.0.1, [::1]
    inspect_mask: tuple[str, ...] = INSPECT_MASK  # inspector: header / metadata / query names masked ("*" = any run)
    max_connections_per_ip: int = 256  # http_entry: open connections from one address; beyond, 503 + close
    max_websockets: int = 1000  # open WebSockets served for the servers; counted apart from max_concurrency
    inspect_header_bytes: int = 16384  # inspector: most bytes of heads kept per exchange
    servers: tuple[str, ...] = ()  # all servers when `server` lists several (the loader fills it); else ()
    client_id_generated: bool = field(default=False, compare=False)  # the loader made client_id up (the file left it ""); SIGHUP keeps the running one

    @property
    def server_list(self) -> tuple[str, ...]:
        """The servers to keep a tunnel stream to (``servers``, else ``server``)."""
        return self.servers or (self.server,)


#: Fields of a settings dataclass that the file does not set directly.
_DERIVED_KEYS = frozenset({"servers", "client_id_generated"})


@dataclass(frozen=True)
class ClientConfig:
    """A whole client file (``path`` is "" when built from defaults)."""

    path: str = ""
    client: ClientSettings = field(default_factory=ClientSettings)
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)


# --- addresses ------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_GRPC_SERVICE = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEFAULT_PORTS = {"http": 80, "https": 443, "grpc": 80, "grpcs": 443}


def _is_hostname(host: str) -> bool:
    return len(host) <= 253 and _HOSTNAME.fullmatch(host.lower()) is not None


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[::1]:port"`` into (host, port); port 0..65535.

    The host comes back without brackets. Raises ValueError saying what is wrong.
    """
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            raise ValueError(f"{value!r}: missing ']' after the IPv6 address")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError(f"{value!r}: expected 'host:port'")
        if ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, like '[::1]:7000'")
        if not host:
            raise ValueError(f"{value!r}: missing host (use '0.0.0.0' for every interface)")
        if not _is_hostname(host):
            raise ValueError(f"{value!r}: {host!r} is not a hostname or IP address")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{value!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{value!r}: port {port} is out of range 0-65535")
    return host, port


def backend_address(url: str) -> tuple[str, str, int]:
    """Split a backend URL into (scheme, host, port), the port defaulted by scheme.

    Accepts ``http``, ``https``, ``grpc`` and ``grpcs`` URLs with a host, an
    optional port and no path beyond ``/`` (the request keeps its own path, as
    cloudflared's ingress does). Raises ValueError saying what is wrong.
    """
    if not url:
        raise ValueError("must not be empty")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"{url!r}: URL contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(
            f"{url!r}: scheme {scheme or '(none)'!r} is not http, https, grpc or grpcs"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: credentials in backend URLs are not supported")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{url!r}: missing host")
    if ":" not in host and not _is_hostname(host):
        raise ValueError(f"{url!r}: {host!r} is not a hostname or IP address")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 cannot be dialled")
    if parts.path not in ("", "/"):
        raise ValueError(
            f"{url!r}: a backend URL has no path (requests keep their own path); "
            "use path_prefix to choose which paths reach it"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"{url!r}: a backend URL has no query or fragment")
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


# --- reading tables -------------------------------------------------------


def _kind(value: object) -> str:
    """The TOML name of a value's type, with the value, for error messages."""
    names = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }
    name = names.get(type(value), "date/time")
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{name} {text}"


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _DERIVED_KEYS)


class _Table:
    """Typed, validated access to one TOML table; rejects unknown keys up front."""

    def __init__(
        self, file: str, label: str, raw: Mapping[str, object], keys: Iterable[str]
    ) -> None:
        self.file = file
        self.label = label
        self.raw = raw
        known = sorted(keys)
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                if close:
                    hint = f"did you mean {close[0]!r}?"
                else:
                    hint = f"known keys: {', '.join(known)}"
                raise self.error(key, f"unknown key ({hint})")

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.label, key, message)

    def _get(self, key: str, default: object) -> object:
        if key in self.raw:
            return self.raw[key]
        if default is None:
            raise self.error(key, "required key is missing")
        return default

    def text(self, key: str, default: str | None) -> str:
        """A string; ``default=None`` makes the key required."""
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_kind(value)}")
        return value

    def pem(self, key: str) -> str:
        """A PEM file path ("" = unset); relative paths are relative to the config file."""
        value = self.text(key, "")
        if not value:
            return ""
        path = value if os.path.isabs(value) or not self.file else os.path.join(os.path.dirname(self.file), value)
        try:
            with open(path, "rb") as f:
                head = f.read(65536)
        except OSError as e:
            raise self.error(key, f"cannot read {path}: {e.strerror or e}") from None
        if b"-----BEGIN " not in head:
            raise self.error(key, f"{path} is not a PEM file")
        return path

    def pair(self, cert_key: str, key_key: str) -> tuple[str, str]:
        """A certificate and its key: both or neither."""
        cert, key = self.pem(cert_key), self.pem(key_key)
        if bool(cert) != bool(key):
            missing = key_key if cert else cert_key
            raise self.error(missing, f"must be set together with {cert_key if cert else key_key}")
        return cert, key

    def texts(self, key: str, default: tuple[str, ...] | None) -> tuple[str, ...]:
        """An array of strings; ``default=None`` makes the key required."""
        value = self._get(key, default)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of strings, not {_kind(value)}")
        for index, item in enumerate(value, 1):
            if not isinstance(item, str):
                raise self.error(key, f"item {index} must be a string, not {_kind(item)}")
        return tuple(value)

    def name(self, key: str, default: str | None) -> str:
        """A name: letters, digits, '.', '_', '-', starting with a letter or digit."""
        value = self.text(key, default)
        if not _NAME.fullmatch(value):
            raise self.error(key, f"{value!r} is not a valid name (letters, digits, '.', '_', '-')")
        return value

    def seconds(self, key: str, default: float, *, zero_ok: bool = False) -> float:
        """A duration in seconds (integer or float): > 0, or >= 0 with ``zero_ok``."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number of seconds, not {_kind(value)}")
        seconds = float(value)
        if not math.isfinite(seconds):
            raise self.error(key, f"must be a finite number of seconds, not {value!r}")
        if seconds < 0 or (seconds == 0 and not zero_ok):
            raise self.error(key, f"must be {'>= 0' if zero_ok else '> 0'} seconds, not {value!r}")
        return seconds

    def integer(self, key: str, default: int, minimum: int) -> int:
        """An integer >= ``minimum`` (a boolean or a float is not an integer)."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {_kind(value)}")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, not {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """``true`` or ``false`` (not 0/1, not a string)."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_kind(value)}")
        return value

    def listen(self, key: str, default: str, *, optional: bool = False, dial: bool = False) -> str:
        """A ``host:port`` address; ``optional`` allows "" (disabled), ``dial`` forbids port 0."""
        value = self.text(key, default)
        if value == "" and optional:
            return value
        try:
            _, port = parse_listen(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if dial and port == 0:
            raise self.error(key, f"{value!r}: port 0 cannot be dialled")
        return value

    def backend(self, key: str, default: str | None, schemes: tuple[str, ...], hint: str) -> str:
        """A backend URL whose scheme is one of ``schemes``."""
        value = self.text(key, default)
        self.check_backend(key, value, schemes, hint)
        return value

    def check_backend(self, key: str, url: str, schemes: tuple[str, ...], hint: str) -> None:
        try:
            scheme, _, _ = backend_address(url)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if scheme not in schemes:
            raise self.error(key, f"{url!r}: scheme must be {' or '.join(schemes)} ({hint})")

    def host(self, key: str) -> str:
        """A hostname, ``*.suffix``, or "" for any host; returned lower-case."""
        value = self.text(key, "")
        host = value.lower()
        if not host:
            return host
        bare = host[2:] if host.startswith("*.") else host
        if not _is_hostname(bare):
            name, colon, port = bare.rpartition(":")
            if colon and port.isdigit() and _is_hostname(name):
                raise self.error(key, f"{value!r}: no port here (ports are ignored when matching)")
            raise self.error(
                key,
                f"{value!r} is not a hostname like 'app.example.com'"
                " or a wildcard like '*.example.com'",
            )
        return host

    def path_prefix(self, key: str) -> str:
        value = self.text(key, "/")
        if not value.startswith("/"):
            raise self.error(key, f"{value!r} must start with '/'")
        if any(char.isspace() or not char.isprintable() for char in value):
            raise self.error(key, f"{value!r} contains whitespace or control characters")
        return value

    def set_host(self, key: str) -> str:
        value = self.text(key, "")
        if any(char.isspace() or not char.isprintable() or char in "/@" for char in value):
            raise self.error(
                key,
                f"{value!r} is not a Host header value like 'app.internal' or 'app.internal:8080'",
            )
        return value


def _top_level(
    file: str,
    data: Mapping[str, object],
    tables: tuple[str, ...],
    other: tuple[str, ...],
    kind: str,
) -> None:
    """Reject top-level keys that are not ``tables``; ``other`` are the other kind's tables."""
    for key in data:
        if key not in tables:
            if key in other:
                other_kind = "client" if kind == "server" else "server"
                hint = f"a {other_kind} table; this is a {kind} config"
            else:
                hint = f"expected {', '.join(tables)}"
            raise ConfigError(file, "(top level)", key, f"unknown table ({hint})")


def _table(file: str, data: Mapping[str, object], name: str) -> dict[str, object]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(
            file, "(top level)", name, f"must be a table [{name}], not {_kind(value)}"
        )
    return value


def _entries(file: str, data: Mapping[str, object], name: str) -> list[dict[str, object]]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(
            file,
            "(top level)",
            name,
            f"must be an array of tables (write each entry as [[{name}]]), not {_kind(value)}",
        )
    return value


def _entry(file: str, array: str, index: int, raw: Mapping[str, object], cls: type) -> _Table:
    """A table for entry ``index`` (from 1) of ``[[array]]``, labelled with its name if any."""
    label = f"[[{array}]] #{index}"
    name = raw.get("name")
    if isinstance(name, str) and name:
        label += f" {name!r}"
    return _Table(file, label, raw, _field_names(cls))


def _unique(table: _Table, key: str, value: object, seen: dict[object, str], message: str) -> None:
    """Record ``value`` for ``table``; raise if an earlier entry had it."""
    if value in seen:
        raise table.error(key, message.format(other=seen[value]))
    seen[value] = table.label


# --- server files ---------------------------------------------------------

_SERVER_TABLES = ("server", "groups", "routes", "upstreams", "forward")
_CLIENT_TABLES = ("client",)


def _parse_settings(file: str, raw: Mapping[str, object]) -> ServerSettings:
    t = _Table(file, "[server]", raw, _field_names(ServerSettings))
    d = ServerSettings()
    tls_cert, tls_key = t.pair("tls_cert", "tls_key")
    tls_client_ca = t.pem("tls_client_ca")
    if tls_client_ca and not tls_cert:
        raise t.error("tls_client_ca", "needs tls_cert and tls_key (client certificates only exist over TLS)")
    http_cert, http_key = t.pair("http_tls_cert", "http_tls_key")
    grpc_cert, grpc_key = t.pair("grpc_tls_cert", "grpc_tls_key")
    max_message_size = t.integer("max_message_size", d.max_message_size, 1)
    window = t.integer("window", d.window, MIN_WINDOW)
    max_window, window_budget = _window_growth(t, d, window, "window")
    return ServerSettings(
        tunnel_listen=t.listen("tunnel_listen", d.tunnel_listen),
        http_listen=t.listen("http_listen", d.http_listen, optional=True),
        grpc_listen=t.listen("grpc_listen", d.grpc_listen, optional=True),
        admin_listen=t.listen("admin_listen", d.admin_listen, optional=True),
        request_timeout=t.seconds("request_timeout", d.request_timeout),
        heartbeat_timeout=t.seconds("heartbeat_timeout", d.heartbeat_timeout),
        heartbeat_interval=t.seconds("heartbeat_interval", d.heartbeat_interval),
        cleanup_interval=t.seconds("cleanup_interval", d.cleanup_interval),
        drain_timeout=t.seconds("drain_timeout", d.drain_timeout, zero_ok=True),
        window=window,
        max_window=max_window,
        window_budget=window_budget,
        max_message_size=max_message_size,
        max_frame_size=_frame_size(t, d.max_frame_size, max_message_size),
        max_header_size=t.integer("max_header_size", d.max_header_size, 1),
        header_timeout=t.seconds("header_timeout", d.header_timeout),
        max_connections=t.integer("max_connections", d.max_connections, 1),
        open_rate=t.integer("open_rate", d.open_rate, 0),
        open_burst=t.integer("open_burst", d.open_burst, 1),
        keepalive_interval=_keepalive(t, d.keepalive_interval),
        websocket_ping_interval=t.integer("websocket_ping_interval", d.websocket_ping_interval, 0),
        access_log=t.boolean("access_log", d.access_log),
        admin_token=t.text("admin_token", d.admin_token),
        log_format=_log_format(t, d.log_format),
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
        http_tls_cert=http_cert, http_tls_key=http_key, grpc_tls_cert=grpc_cert, grpc_tls_key=grpc_key,
        upstream_ca=t.pem("upstream_ca"),
        ready_timeout=t.seconds("ready_timeout", d.ready_timeout, zero_ok=True),
        drain_delay=t.seconds("drain_delay", d.drain_delay, zero_ok=True),
        proxy_protocol=t.boolean("proxy_protocol", d.proxy_protocol),
        idle_timeout=t.seconds("idle_timeout", d.idle_timeout, zero_ok=True),
        http2=t.boolean("http2", d.http2),
        inspect=t.integer("inspect", d.inspect, 0),
        inspect_body_bytes=t.integer("inspect_body_bytes", d.inspect_body_bytes, 0),
        auth_fail_limit=t.integer("auth_fail_limit", d.auth_fail_limit, 0),
        auth_fail_window=t.seconds("auth_fail_window", d.auth_fail_window),
        admin_hosts=_admin_hosts(t, d.admin_hosts),
        inspect_mask=_inspect_mask(t, d.inspect_mask),
        max_connections_per_ip=t.integer("max_connections_per_ip", d.max_connections_per_ip, 1),
        max_websockets_per_ip=t.integer("max_websockets_per_ip", d.max_websockets_per_ip, 1),
        stall_timeout=t.seconds("stall_timeout", d.stall_timeout),
        inspect_header_bytes=t.integer("inspect_header_bytes", d.inspect_header_bytes, 256),
    )


def _admin_hosts(t: _Table, default: tuple[str, ...]) -> tuple[str, ...]:
    """``admin_hosts``: host names (no port), lower-case."""
    hosts = []
    for index, host in enumerate(t.texts("admin_hosts", default), 1):
        name = host.lower().strip("[]")
        if not (_is_hostname(name) or _is_ip(name)):
            raise t.error("admin_hosts", f"item {index}: {host!r} is not a host name or IP address (no port)")
        hosts.append(name)
    return tuple(hosts)


_MASK_NAME = re.compile(r"[a-z0-9*_.~!#$%&'+^`|-]+")


def _inspect_mask(t: _Table, default: tuple[str, ...]) -> tuple[str, ...]:
    """``inspect_mask``: header / metadata / query names, lower-case; ``*`` matches any run of characters."""
    names = []
    for index, name in enumerate(t.texts("inspect_mask", default), 1):
        lowered = name.lower()
        if not _MASK_NAME.fullmatch(lowered) or lowered.strip("*") == "":
            raise t.error("inspect_mask", f"item {index}: {name!r} is not a header name "
                                          "(letters, digits, '-', '_', with '*' for any run)")
        names.append(lowered)
    return tuple(names)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(listen: str) -> bool:
    """Does the ``host:port`` address listen on loopback only (127.0.0.0/8, ::1, localhost)?"""
    host, _ = parse_listen(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name: it may resolve to any interface


def _weak_token(token: str) -> str:
    """Why ``token`` must not face the internet ("" when it may)."""
    if token in EXAMPLE_TOKENS:
        return f"{token!r} is the shipped example token"
    if len(token.encode()) < MIN_TOKEN_BYTES:
        return f"a token of {len(token.encode())} bytes is too short (at least {MIN_TOKEN_BYTES})"
    return ""


def _unsafe_defaults(file: str, settings: ServerSettings,
                     groups: tuple[Group, ...]) -> tuple[str, ...]:
    """Errors for weak tokens on a public tunnel port / an open public admin port; warnings on loopback."""
    warnings = []
    public = not is_loopback(settings.tunnel_listen)
    for index, group in enumerate(groups, 1):
        for item, token in enumerate(group.tokens, 1):
            why = _weak_token(token)
            if not why:
                continue
            if public:
                raise ConfigError(file, f"[[groups]] #{index} {group.name!r}", "tokens",
                                  f"item {item}: {why}, and tunnel_listen {settings.tunnel_listen!r} is not "
                                  f"loopback; make a token with {MAKE_TOKEN}")
            warnings.append(str(ConfigError(file, f"[[groups]] #{index} {group.name!r}", "tokens",
                                            f"item {item}: {why}; fine on loopback "
                                            f"({settings.tunnel_listen}), an error on any other address; "
                                            f"make a token with {MAKE_TOKEN}")))
    _open_admin(file, "[server]", settings.admin_listen, settings.admin_token)
    return tuple(warnings)


def _open_admin(file: str, table: str, listen: str, token: str) -> None:
    """An admin port on a non-loopback address needs ``admin_token``."""
    if listen and not token and not is_loopback(listen):
        raise ConfigError(file, table, "admin_token",
                          f"is empty, and admin_listen {listen!r} is not loopback: anyone who reaches it reads "
                          f"/status and /inspect; set admin_token (make one with {MAKE_TOKEN}) or listen on "
                          "127.0.0.1")


#: The smallest window a server may set (and announce to its clients).
MIN_WINDOW = 65536


def _window_growth(t: _Table, defaults: ServerSettings | ClientSettings, window: int,
                   floor: str) -> tuple[int, int]:
    """``max_window`` (>= ``window``, <= 1 GiB) and ``window_budget`` (>= ``max_window``).

    Left out, each follows the key it must not be below, so raising
    ``window`` alone never makes a file invalid.  ``floor`` names ``window``
    in errors.
    """
    max_window = t.integer("max_window", max(defaults.max_window, window), 1)
    if max_window < window:
        raise t.error("max_window", f"must be >= {floor} ({window}), not {max_window}")
    if max_window > MAX_WINDOW_CAP and "max_window" in t.raw:
        raise t.error("max_window", f"must be <= {MAX_WINDOW_CAP} (1 GiB), not {max_window}")
    budget = t.integer("window_budget", max(defaults.window_budget, max_window), 0)
    if budget < max_window:
        raise t.error("window_budget", f"must be >= max_window ({max_window}), not {budget}")
    return max_window, budget


def _frame_size(t: _Table, default: int, max_message_size: int) -> int:
    value = t.integer("max_frame_size", min(default, max_message_size), 1024)
    if value > max_message_size:
        raise t.error("max_frame_size", f"{value} exceeds max_message_size ({max_message_size}): "
                                        "a frame is one gRPC message")
    return value


def _keepalive(t: _Table, default: float) -> float:
    """``keepalive_interval``: seconds, at least 5 (the tunnel port refuses pings more often than that)."""
    value = t.seconds("keepalive_interval", default)
    if value < 5:
        raise t.error("keepalive_interval", f"must be at least 5 seconds, got {value:g}")
    return value


def _log_format(t: _Table, default: str) -> str:
    value = t.text("log_format", default)
    if value not in ("text", "json"):
        raise t.error("log_format", f"must be \"text\" or \"json\", not {value!r}")
    return value


def _parse_group(t: _Table) -> Group:
    name = t.name("name", None)
    tokens = t.texts("tokens", None)
    if not tokens:
        raise t.error("tokens", "must list at least one token")
    for index, token in enumerate(tokens, 1):
        if not token:
            raise t.error("tokens", f"item {index} is an empty token")
    return Group(name=name, tokens=tokens)


def _parse_route(t: _Table, settings: ServerSettings, groups: tuple[str, ...]) -> Route:
    d = Route(name="")
    name = t.name("name", None)
    group = t.text("group", d.group)
    if group not in groups:
        known = f"defined: {', '.join(groups)}" if groups else "no [[groups]] are defined"
        raise t.error("group", f"unknown group {group!r} ({known})")
    grpc_service = t.text("grpc_service", d.grpc_service)
    if grpc_service and not _GRPC_SERVICE.fullmatch(grpc_service):
        raise t.error(
            "grpc_service",
            f"{grpc_service!r} is not a gRPC service name like 'helloworld.Greeter'",
        )
    if grpc_service:
        backend = t.backend(
            "backend", None, ("grpc", "grpcs"), "a route with grpc_service dials a gRPC backend"
        )
    else:
        backend = t.backend(
            "backend",
            None,
            ("http", "https"),
            "set grpc_service for a gRPC route; WebSocket upgrades use http(s)",
        )
    timeout = t.seconds("timeout", d.timeout, zero_ok=True)
    basic_auth, allow_ips, deny_ips = _access(t)
    return Route(
        name=name,
        group=group,
        backend=backend,
        host=t.host("host"),
        path_prefix=t.path_prefix("path_prefix"),
        set_host=t.set_host("set_host"),
        timeout=timeout or settings.request_timeout,
        grpc_service=grpc_service,
        max_message_size=t.integer("max_message_size", d.max_message_size, 1),
        max_body_size=t.integer("max_body_size", d.max_body_size, 0),
        basic_auth=basic_auth,
        allow_ips=allow_ips,
        deny_ips=deny_ips,
        max_websockets=t.integer("max_websockets", d.max_websockets, 1),
        preserve_path=t.boolean("preserve_path", d.preserve_path),
    )


def _access(t: _Table) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``basic_auth``, ``allow_ips``, ``deny_ips``: every entry checked, CIDRs normalised."""
    lines = t.texts("basic_auth", ())
    users: dict[str, int] = {}
    for index, line in enumerate(lines, 1):
        try:
            user, _ = parse_htpasswd_line(line)
        except ValueError as exc:
            raise t.error("basic_auth", f"item {index}: {exc}") from None
        if user in users:
            raise t.error("basic_auth", f"item {index}: user {user!r} is also item {users[user]}")
        users[user] = index
    cidrs = {}
    for key in ("allow_ips", "deny_ips"):
        normalised = []
        for index, text in enumerate(t.texts(key, ()), 1):
            try:
                normalised.append(str(parse_cidr(text)))
            except ValueError as exc:
                raise t.error(key, f"item {index}: {exc}") from None
        cidrs[key] = tuple(normalised)
    return tuple(line.strip() for line in lines), cidrs["allow_ips"], cidrs["deny_ips"]


def _parse_upstream(t: _Table) -> Upstream:
    name = t.name("name", None)
    backends = t.texts("backends", None)
    if not backends:
        raise t.error("backends", "must list at least one backend URL")
    for backend in backends:
        t.check_backend("backends", backend, ("http", "https"), "upstreams are HTTP origins")
    return Upstream(name=name, backends=backends, cooldown=t.seconds("cooldown", Upstream.cooldown))


def _parse_forward(
    t: _Table, index: int, settings: ServerSettings, upstreams: tuple[str, ...]
) -> ForwardRule:
    name = t.name("name", f"forward-{index}")
    upstream = t.text("upstream", None)
    if upstream not in upstreams:
        known = f"defined: {', '.join(upstreams)}" if upstreams else "no [[upstreams]] are defined"
        raise t.error("upstream", f"unknown upstream {upstream!r} ({known})")
    timeout = t.seconds("timeout", 0.0, zero_ok=True)
    return ForwardRule(
        upstream=upstream,
        host=t.host("host"),
        path_prefix=t.path_prefix("path_prefix"),
        set_host=t.set_host("set_host"),
        timeout=timeout or settings.request_timeout,
        name=name,
    )


def parse_server_config(data: Mapping[str, object], path: str) -> ServerConfig:
    """Validate parsed TOML ``data`` from file ``path`` into a :class:`ServerConfig`."""
    _top_level(path, data, _SERVER_TABLES, _CLIENT_TABLES, "server")
    settings = _parse_settings(path, _table(path, data, "server"))

    groups: list[Group] = []
    seen: dict[object, str] = {}
    for index, raw in enumerate(_entries(path, data, "groups"), 1):
        t = _entry(path, "groups", index, raw, Group)
        group = _parse_group(t)
        _unique(t, "name", group.name, seen, "duplicate group name (also {other})")
        groups.append(group)
    group_names = tuple(group.name for group in groups)

    upstreams: list[Upstream] = []
    seen = {}
    for index, raw in enumerate(_entries(path, data, "upstreams"), 1):
        t = _entry(path, "upstreams", index, raw, Upstream)
        upstream = _parse_upstream(t)
        _unique(t, "name", upstream.name, seen, "duplicate upstream name (also {other})")
        upstreams.append(upstream)
    upstream_names = tuple(upstream.name for upstream in upstreams)

    routes: list[Route] = []
    seen = {}
    matches: dict[object, str] = {}
    for index, raw in enumerate(_entries(path, data, "routes"), 1):
        t = _entry(path, "routes", index, raw, Route)
        route = _parse_route(t, settings, group_names)
        _unique(t, "name", route.name, seen, "duplicate route name (also {other})")
        if route.grpc_service:
            key, match = "grpc_service", ("grpc", route.host, route.grpc_service)
        else:
            key, match = "path_prefix", ("http", route.host, route.path_prefix)
        message = "same host and " + key + " as {other}; this route could never match"
        _unique(t, key, match, matches, message)
        routes.append(route)

    forward: list[ForwardRule] = []
    seen, matches = {}, {}
    for index, raw in enumerate(_entries(path, data, "forward"), 1):
        t = _entry(path, "forward", index, raw, ForwardRule)
        rule = _parse_forward(t, index, settings, upstream_names)
        _unique(t, "name", rule.name, seen, "duplicate forward rule name (also {other})")
        _unique(
            t,
            "path_prefix",
            (rule.host, rule.path_prefix),
            matches,
            "same host and path_prefix as {other}; this rule could never match",
        )
        forward.append(rule)

    return ServerConfig(
        path=path,
        server=settings,
        groups=tuple(groups),
        routes=tuple(routes),
        upstreams=tuple(upstreams),
        forward=tuple(forward),
        warnings=_unsafe_defaults(path, settings, tuple(groups)),
    )


# --- client files ---------------------------------------------------------


def parse_client_config(data: Mapping[str, object], path: str) -> ClientConfig:
    """Validate parsed TOML ``data`` from file ``path`` into a :class:`ClientConfig`.

    An empty ``client_id`` becomes ``<hostname>-<6 random hex digits>``.
    """
    _top_level(path, data, _CLIENT_TABLES, _SERVER_TABLES, "client")
    t = _Table(path, "[client]", _table(path, data, "client"), _field_names(ClientSettings))
    d = ClientSettings()
    token = t.text("token", d.token)
    if not token:
        raise t.error("token", "must not be empty")
    client_id = t.text("client_id", d.client_id)
    if any(char.isspace() or not char.isprintable() for char in client_id):
        raise t.error("client_id", f"{client_id!r} contains whitespace or control characters")
    allow_backends = t.texts("allow_backends", d.allow_backends)
    allowed: list[str] = []
    for entry in allow_backends:
        try:
            host, port = parse_listen(entry)
        except ValueError as exc:
            raise t.error("allow_backends", str(exc)) from None
        if port == 0:
            raise t.error("allow_backends", f"{entry!r}: port 0 cannot be dialled")
        allowed.append(entry.lower())
    tls = t.boolean("tls", d.tls)
    tls_ca = t.pem("tls_ca")
    tls_cert, tls_key = t.pair("tls_cert", "tls_key")
    # The initial window is the server's (announced when the stream opens).
    max_window, window_budget = _window_growth(t, d, MIN_WINDOW, "the smallest window a server announces")
    servers = _server_list(t)
    settings = ClientSettings(
        server=servers[0],
        servers=servers if len(servers) > 1 else (),
        group=t.name("group", d.group),
        token=token,
        client_id=client_id or f"{socket.gethostname()}-{secrets.token_hex(3)}",
        client_id_generated=not client_id,
        http_entry=t.listen("http_entry", d.http_entry, optional=True),
        http2=t.boolean("http2", d.http2),
        heartbeat_interval=t.seconds("heartbeat_interval", d.heartbeat_interval),
        heartbeat_timeout=t.seconds("heartbeat_timeout", d.heartbeat_timeout),
        keepalive_interval=_keepalive(t, d.keepalive_interval),
        dial_jitter=t.seconds("dial_jitter", d.dial_jitter, zero_ok=True),
        config_sync_interval=t.seconds("config_sync_interval", d.config_sync_interval),
        max_concurrency=t.integer("max_concurrency", d.max_concurrency, 1),
        allow_backends=tuple(allowed),
        drain_timeout=t.seconds("drain_timeout", d.drain_timeout, zero_ok=True),
        request_timeout=t.seconds("request_timeout", d.request_timeout),
        websocket_ping_interval=t.integer("websocket_ping_interval", d.websocket_ping_interval, 0),
        access_log=t.boolean("access_log", d.access_log),
        admin_listen=t.listen("admin_listen", d.admin_listen, optional=True),
        admin_token=t.text("admin_token", d.admin_token),
        log_format=_log_format(t, d.log_format),
        tls=tls or bool(tls_ca or tls_cert), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
        tls_server_name=t.text("tls_server_name", d.tls_server_name), backend_ca=t.pem("backend_ca"),
        max_frame_size=_frame_size(t, d.max_frame_size, CLIENT_MAX_MESSAGE_SIZE),
        max_window=max_window,
        window_budget=window_budget,
        inspect=t.integer("inspect", d.inspect, 0),
        inspect_body_bytes=t.integer("inspect_body_bytes", d.inspect_body_bytes, 0),
        admin_hosts=_admin_hosts(t, d.admin_hosts),
        inspect_mask=_inspect_mask(t, d.inspect_mask),
        max_connections_per_ip=t.integer("max_connections_per_ip", d.max_connections_per_ip, 1),
        max_websockets=t.integer("max_websockets", d.max_websockets, 1),
        inspect_header_bytes=t.integer("inspect_header_bytes", d.inspect_header_bytes, 256),
    )
    _open_admin(path, "[client]", settings.admin_listen, settings.admin_token)
    return ClientConfig(path=path, client=settings)


def _server_list(t: _Table) -> tuple[str, ...]:
    """``server``: one "host:port" or a non-empty list of them, without repeats."""
    value = t.raw.get("server", ClientSettings.server)
    if isinstance(value, str):
        return (t.listen("server", value, dial=True),)
    if not isinstance(value, list) or not value:
        raise t.error("server", f"must be a \"host:port\" string or a non-empty list of them, not {_kind(value)}")
    servers: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise t.error("server", f"list entries must be strings, not {_kind(item)}")
        try:
            _, port = parse_listen(item)
        except ValueError as exc:
            raise t.error("server", str(exc)) from None
        if port == 0:
            raise t.error("server", f"{item!r}: port 0 cannot be dialled")
        if item in servers:
            raise t.error("server", f"{item!r} is listed twice")
        servers.append(item)
    return tuple(servers)


# --- files ----------------------------------------------------------------


def _read(path: str) -> dict[str, object]:
    """Parse the TOML file at ``path``; any failure is a ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, "", "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", "", f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", "", f"invalid TOML: {exc}") from None


def load_server_config(path: str) -> ServerConfig:
    """Read and validate a server file."""
    return parse_server_config(_read(path), path)


def load_client_config(path: str | None) -> ClientConfig:
    """Read and validate a client file; ``None`` gives the defaults (``path`` "")."""
    if path is None:
        return parse_client_config({}, "")
    return parse_client_config(_read(path), path)


def load_any_config(path: str) -> ServerConfig | ClientConfig:
    """Read a server or client file, told apart by its top-level tables."""
    data = _read(path)
    server = [name for name in _SERVER_TABLES if name in data]
    if "client" in data and server:
        raise ConfigError(
            path,
            "(top level)",
            server[0],
            "a file is either a client config ([client]) or a server config, not both",
        )
    if "client" in data:
        return parse_client_config(data, path)
    if server:
        return parse_server_config(data, path)
    raise ConfigError(
        path,
        "(top level)",
        "",
        "neither a server config ([server], [[routes]], ...) nor a client config ([client])",
    )


def _admin(listen: str, token: str) -> str:
    if not listen:
        return "off"
    return f"{listen} ({'token' if token else 'no token'})"


def _protected(routes: tuple[Route, ...]) -> str:
    auth = sum(1 for r in routes if r.basic_auth)
    ips = sum(1 for r in routes if r.allow_ips or r.deny_ips)
    protected = sum(1 for r in routes if r.protected)
    return f"{protected} protected: {auth} basic_auth, {ips} IP rules"


def describe(config: ServerConfig | ClientConfig) -> str:
    """A one-line summary: listeners, groups and routes, or server, group and entry."""
    if isinstance(config, ClientConfig):
        c = config.client
        return (
            f"client config {config.path or '(defaults)'}: id {c.client_id or '(generated)'}, "
            f"server {', '.join(c.server_list)}, group {c.group}, http entry {c.http_entry or 'off'}, "
            f"admin {_admin(c.admin_listen, c.admin_token)}, log {c.log_format}"
        )
    s = config.server

    def names(items: Iterable[Group | Route | Upstream | ForwardRule]) -> str:
        listed = [item.name for item in items]
        return f"{len(listed)} ({', '.join(listed)})" if listed else "none"

    return (
        f"server config {config.path or '(defaults)'}: tunnel {s.tunnel_listen}, "
        f"http {s.http_listen or 'off'}, grpc {s.grpc_listen or 'off'}, "
        f"admin {_admin(s.admin_listen, s.admin_token)}, log {s.log_format}; "
        f"groups {names(config.groups)}; "
        f"routes {names(config.routes)} ({_protected(config.routes)}); upstreams {names(config.upstreams)}; "
        f"forward {names(config.forward)}; version {config.version()}"
    )
