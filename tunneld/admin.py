"""The admin port: ``/metrics`` (Prometheus), ``/status`` (JSON) and ``/`` (a live dashboard).

Both the server (``[server] admin_listen``) and, optionally, the client
(``[client] admin_listen``) serve it.  What it shows comes from two places:

* ``RequestMetrics`` is fed by the hub's ``finished(record)``, once per
  finished request (HTTP, WebSocket, gRPC): counters by protocol, route and
  status class, body bytes, a duration histogram, and for ``/status`` a tally
  by route and the last failures.
* ``ServerCollector`` / ``ClientCollector`` read the hub's live state when
  Prometheus scrapes (connected clients and streams, in-flight requests,
  heartbeat round trips, dropped messages, flow-control stalls, reconnects);
  ``server_status`` / ``client_status`` build ``/status`` from the same state.

Each process has its own ``CollectorRegistry`` (never prometheus-client's
global one), so tests can run several servers and clients side by side.

``GET /healthz`` (server only, never behind the token) is for load balancers:
``503 starting`` / ``200 ok`` / ``503 draining`` from ``ServerHub.health``.

Access: with ``admin_token`` set, ``/metrics`` and ``/status`` need
``Authorization: Bearer <token>`` (else 401).  The dashboard page itself is
static HTML with no data and no external assets; its script reads the token
from the URL fragment (``/#token=…``, which browsers never send to a server
or put in a Referer) and sends it as that header when it polls ``/status``.

Other web pages (SPEC §8.2): a request whose ``Host`` is not the admin
address (the one it listens on or the one the connection arrived at),
``localhost``, ``127.0.0.1``, ``[::1]`` or a name in ``admin_hosts`` gets
421, so a page the operator visits cannot read the port through DNS
rebinding.  The one state-changing request, replay, needs the admin token or,
without one, a same-origin request that a cross-site form cannot send: an
``Origin`` (when the browser sends one) equal to the admin address, and an
``X-Tunneld-Replay`` header or a JSON content type (either forces a CORS
preflight, which this port never grants).
"""

from __future__ import annotations

import hmac
import json
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import http, server
from twisted.web.resource import Resource

from tunneld import __version__
from tunneld.inspector import Exchange, Inspector
from tunneld.endpoints import ListenService

if TYPE_CHECKING:
    from tunneld.client_hub import ClientHub
    from tunneld.config import ServerConfig
    from tunneld.server_hub import ServerHub

# Request durations range from milliseconds (HTTP) to hours (WebSocket, gRPC streams).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
RECENT_ERRORS = 20

_GRPC_CODES = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})


def code_class(protocol: str, status: object) -> str:
    """The ``code_class`` label: "2xx", "5xx", ... for HTTP and WebSocket, the status name for gRPC.

    Anything else (no status at all, a free-form abort message) is "other",
    so the label's values stay a small fixed set.
    """
    if protocol == "grpc":
        name = str(status)
        return name if name in _GRPC_CODES else "other"
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return f"{status // 100}xx"
    return "other"


def is_failure(klass: str) -> bool:
    """Is this status class an error status at all (before asking who made it)?"""
    return klass not in ("1xx", "2xx", "3xx", "OK")


#: gRPC statuses that say the server side broke (a backend's own NOT_FOUND or INVALID_ARGUMENT is its answer).
_GRPC_SERVER_ERRORS = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "other"})


def failure_kind(protocol: str, klass: str, record: dict[str, Any]) -> str:
    """"" (not a failure), "tunneld" (an answer tunneld made itself) or "backend" (a backend's 5xx).

    A backend's own 4xx (or a gRPC backend's NOT_FOUND, ...) is its answer,
    not a failure of tunneld.  Records without ``answered_by`` (built before
    the field existed) count as failed whenever their status is an error, as
    they always did.
    """
    if not is_failure(klass):
        return ""
    answered_by = record.get("answered_by")
    if answered_by == "backend":
        if protocol == "grpc":
            return "backend" if klass in _GRPC_SERVER_ERRORS else ""
        return "backend" if klass in ("5xx", "other") else ""
    return "tunneld"


class RequestMetrics:
    """Counters fed by ``finished(record)``, one call per finished request."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time,
                 extra_labels: tuple[str, ...] = ()) -> None:
        disable_created_metrics()  # no *_created series: plain Prometheus text format
        self.clock = clock
        self.extra_labels = extra_labels   # the client adds "server": which server the request came from
        self.requests = Counter(
            "tunneld_requests", "Finished requests by protocol, route and status class (2xx.. or gRPC status).",
            ["protocol", "route", "code_class", *extra_labels], registry=registry)
        self.bytes = Counter(
            "tunneld_request_bytes", "Body bytes of finished requests: in = request bodies (toward the backend), "
            "out = response bodies (toward the caller).", ["protocol", "direction"], registry=registry)
        self.duration = Histogram(
            "tunneld_request_duration_seconds", "Time from a request's start to its end.", ["protocol", "route"],
            buckets=DURATION_BUCKETS, registry=registry)
        self.refusals = Counter(
            "tunneld_access_refusals", "Requests refused by a route's access control, by route and reason "
            "(ip_denied, ip_not_allowed, no_credentials, bad_credentials, too_many_failures).",
            ["route", "reason"], registry=registry)
        self.refusal_tally: dict[tuple[str, str], int] = {}
        self.tally: dict[tuple[str, str, str], int] = {}
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        self.recent_errors: deque[dict[str, object]] = deque(maxlen=RECENT_ERRORS)
        self.failed_tally: dict[str, int] = {}                 # route -> failed requests
        self.kind_tally = {"tunneld": 0, "backend": 0, "backend_4xx": 0}

    def observe(self, record: dict[str, Any]) -> None:
        protocol = str(record.get("protocol", "")) or "-"
        route = str(record.get("route", "")) or "-"
        klass = code_class(protocol, record.get("status"))
        key = (protocol, route, klass)
        extra = tuple(str(record.get(name, "")) or "-" for name in self.extra_labels)
        children = self._children.get(key + extra)
        if children is None:
            # labels() takes a lock and builds a key on every call: this runs
            # once per request, so the labelled series are looked up once.
            children = self._children[key + extra] = (
                self.requests.labels(protocol, route, klass, *extra), self.bytes.labels(protocol, "in"),
                self.bytes.labels(protocol, "out"), self.duration.labels(protocol, route))
        requests, bytes_in, bytes_out, durations = children
        requests.inc()
        bytes_in.inc(int(record.get("bytes_in", 0) or 0))
        bytes_out.inc(int(record.get("bytes_out", 0) or 0))
        duration = float(record.get("duration", 0.0) or 0.0)
        durations.observe(duration)
        self.tally[key] = self.tally.get(key, 0) + 1
        refusal = record.get("refusal")
        if refusal:
            self.refusals.labels(route, str(refusal)).inc()
            self.refusal_tally[(route, str(refusal))] = self.refusal_tally.get((route, str(refusal)), 0) + 1
        kind = failure_kind(protocol, klass, record)
        if not kind:
            if is_failure(klass):
                self.kind_tally["backend_4xx"] += 1   # the backend's own answer
            return
        self.kind_tally[kind] += 1
        self.failed_tally[route] = self.failed_tally.get(route, 0) + 1
        status = _jsonable(record.get("status"))
        reason = str(record.get("reason", "") or "")
        if not reason:
            refusal = record.get("refusal")
            reason = (f"access refused ({refusal})" if refusal else
                      f"backend answered {status}" if kind == "backend" else f"status {status}")
        self.recent_errors.appendleft({
            "time": self.clock(), "protocol": protocol, "route": route, "status": status,
            "code_class": klass, "duration": round(duration, 6), "path": str(record.get("path", "")),
            "request_id": str(record.get("request_id", "")), "trace_id": str(record.get("trace_id", "")),
            "reason": reason, "answered_by": kind,
            "served_by": str(record.get("client_id", "") or record.get("origin", "") or ""),
        })

    def by_route(self) -> dict[str, dict[str, int]]:
        """route -> code_class -> count."""
        out: dict[str, dict[str, int]] = {}
        for (_, route, klass), n in self.tally.items():
            classes = out.setdefault(route, {})
            classes[klass] = classes.get(klass, 0) + n
        return out

    def refusals_by_route(self) -> dict[str, dict[str, int]]:
        """route -> refusal reason -> count."""
        out: dict[str, dict[str, int]] = {}
        for (route, reason), n in self.refusal_tally.items():
            out.setdefault(route, {})[reason] = n
        return out

    def failed_by_route(self) -> dict[str, int]:
        """route -> failed requests (tunneld's own error answers and backend 5xx)."""
        return dict(self.failed_tally)

    def summary(self) -> dict[str, object]:
        requests = sum(self.tally.values())
        errors = self.kind_tally["tunneld"] + self.kind_tally["backend"]
        rows = [{"protocol": p, "route": r, "code_class": k, "count": n} for (p, r, k), n in sorted(self.tally.items())]
        return {"requests": requests, "errors": errors, "by_class": rows, "recent_errors": list(self.recent_errors),
                "errors_tunneld": self.kind_tally["tunneld"], "errors_backend": self.kind_tally["backend"],
                "backend_4xx": self.kind_tally["backend_4xx"]}


def _jsonable(value: object) -> object:
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _tunnels_dropped_and_stalled(tunnels: Iterable[Any]) -> tuple[int, int]:
    dropped = stalls = 0
    for tunnel in tunnels:
        dropped += tunnel.session.dropped
        stalls += getattr(tunnel, "stalls", 0)
    return dropped, stalls


# -- server ---------------------------------------------------------------------------------


class ServerCollector:
    """Live server gauges and counters, read from the hub at scrape time."""

    def __init__(self, hub: ServerHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        info = GaugeMetricFamily("tunneld_build_info", "Always 1; the version and role as labels.",
                                 labels=["version", "role"])
        info.add_metric([__version__, "server"], 1)
        yield info
        config = GaugeMetricFamily("tunneld_config_info", "Always 1; the routes' config version as a label.",
                                   labels=["version"])
        config.add_metric([hub.config.version()], 1)
        yield config
        groups = sorted({g.name for g in hub.config.groups} | set(hub.registry.groups()))
        clients = GaugeMetricFamily("tunneld_clients_connected", "Distinct clients with a stream, by group.",
                                    labels=["group"])
        streams = GaugeMetricFamily("tunneld_streams_connected", "Registered tunnel streams, by group.",
                                    labels=["group"])
        in_flight = GaugeMetricFamily("tunneld_requests_in_flight", "Requests in flight on the group's streams.",
                                      labels=["group"])
        for group in groups:
            entries = hub.registry.streams(group)
            clients.add_metric([group], len({e.client_id for e in entries}))
            streams.add_metric([group], len(entries))
            in_flight.add_metric([group], sum(_stream_in_flight(e) for e in entries))
        yield clients
        yield streams
        yield in_flight
        # By group, never by client: a fleet of 10,000 clients would be 10,000 series.
        rtt = GaugeMetricFamily("tunneld_heartbeat_rtt_seconds",
                                "Slowest last heartbeat round trip among the group's streams.", labels=["group"])
        seen: dict[str, float] = {}
        for e in hub.registry.streams():
            if e.rtt is not None:
                seen[e.group] = max(seen.get(e.group, 0.0), e.rtt)
        for group, value in sorted(seen.items()):
            rtt.add_metric([group], value)
        yield rtt
        counters = hub.counters
        dropped, stalls = _tunnels_dropped_and_stalled(stream.tunnel for stream in hub.streams.values())
        yield _counter("tunneld_streams_opened", "Tunnel streams accepted since start.",
                       counters.get("streams_opened", 0))
        yield _counter("tunneld_protocol_violations", "Invalid messages or sequences from clients.",
                       counters.get("violations", 0))
        yield _counter("tunneld_tunnel_messages_dropped", "Tunnel messages from peers dropped as invalid.",
                       counters.get("messages_dropped", 0) + dropped)
        yield _counter("tunneld_flow_control_stalls", "Times a request's sender paused on an empty window.",
                       counters.get("flow_stalls", 0) + stalls)
        yield _gauge("tunneld_draining", "1 while shutting down (SIGTERM), else 0.", 1 if hub.draining else 0)
        opens = CounterMetricFamily("tunneld_tunnel_opens", "Tunnel stream opens on the tunnel port by result "
                                    "(accepted, unauthenticated, malformed, rate_limited, throttled).",
                                    labels=["result"])
        for result, n in _tunnel_opens(hub).items():
            opens.add_metric([result], n)
        yield opens
        yield _gauge("tunneld_streams_stalled", "Streams whose requests wait for credit with nothing coming back "
                     "for stall_timeout (passed over while a healthy stream exists).", len(hub.registry.stalled))
        yield _counter("tunneld_stream_stalls", "Times a stream was marked stalled.", counters.get("stalls", 0))
        entry = getattr(hub, "entry", None)
        if entry is not None:
            yield _gauge("tunneld_http_connections", "Open connections on the HTTP entry (WebSockets included).",
                         entry.connections)
            yield _counter("tunneld_http_connections_refused", "Connections answered 503 and closed at "
                           "max_connections.", entry.refused_connections)
            yield _counter("tunneld_http_header_timeouts", "Connections closed for not sending a complete "
                           "request head within header_timeout.", entry.header_timeouts)
            yield _counter("tunneld_http_connections_refused_per_ip", "Connections answered 503 and closed "
                           "at max_connections_per_ip.", entry.refused_per_ip)
        grpc_entry = getattr(hub, "grpc_entry", None)
        if grpc_entry is not None:
            yield _gauge("tunneld_grpc_connections", "Open HTTP/2 connections on the gRPC entry.",
                         len(grpc_entry.connections))
            refused = CounterMetricFamily("tunneld_grpc_connections_refused", "Connections to the gRPC entry "
                                          "closed with GOAWAY at a limit.", labels=["limit"])
            refused.add_metric(["max_connections"], grpc_entry.refused)
            refused.add_metric(["max_connections_per_ip"], grpc_entry.per_ip.refused)
            yield refused


def _tunnel_opens(hub: Any) -> dict[str, int]:
    """result -> count, every result present (zeros before the tunnel port's guard exists)."""
    from tunneld.registry.admission import RESULTS

    guard = getattr(hub, "open_guard", None)
    counts = dict(guard.counts) if guard is not None else {}
    return {r: counts.get(r, 0) for r in RESULTS}


def _stream_in_flight(entry: Any) -> int:
    tunnel = getattr(entry.handle, "tunnel", None)
    return len(tunnel.session) if tunnel is not None else entry.in_flight


def _route_match(route: Any) -> str:
    if getattr(route, "grpc_service", ""):
        return f"grpc {route.grpc_service}" + (f" @ {route.host}" if route.host else "")
    return f"{route.host or '*'}{route.path_prefix}"


def _access_summary(route: Any) -> str:
    """What guards a route, for /status and the dashboard: "basic_auth, allow_ips" or ""."""
    return ", ".join(k for k in ("basic_auth", "allow_ips", "deny_ips") if getattr(route, k, ()))


#: ``/status`` lists at most this many clients unless ``?limit=`` says otherwise (max MAX_STATUS_LIMIT).
STATUS_LIMIT = 100
MAX_STATUS_LIMIT = 1000
#: A route lists at most this many of its group's client ids (``clients_total`` counts them all).
ROUTE_CLIENTS = 20


def _query(args: dict[bytes, list[bytes]] | None) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in (args or {}).items() if v}


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(value))) if value not in (None, "") else default
    except ValueError:
        return default


def server_status(hub: ServerHub, metrics: RequestMetrics | None, started: float,
                  clock: Callable[[], float] = time.time, query: dict[str, str] | None = None) -> dict[str, object]:
    """The server's ``/status`` document (see README, "Operating").

    With thousands of clients it stays small: per-group counts always, and one
    page of the client list, chosen by ``query`` (the URL's ``group``, ``q``: a
    substring of client_id or address, ``offset``, ``limit``; default the first
    ``STATUS_LIMIT`` clients of every group).
    """
    config: ServerConfig = hub.config
    query = query or {}
    now = clock()
    offset = now - hub.clock.seconds()   # registry times are reactor seconds; report wall-clock times
    want_group = query.get("group") or None
    search = (query.get("q") or "").strip().lower()
    page_offset = _int(query.get("offset"), 0, 0, 1 << 31)
    page_limit = _int(query.get("limit"), STATUS_LIMIT, 0, MAX_STATUS_LIMIT)
    if search:
        matching = [e for e in hub.registry.streams(want_group)
                    if search in e.client_id.lower() or search in e.address.lower()]
        total, entries = len(matching), matching[page_offset:page_offset + page_limit]
    else:
        total, entries = hub.registry.page(want_group, page_offset, page_limit)
    clients = []
    for e in entries:
        clients.append({
            "client_id": e.client_id, "group": e.group, "stream_id": e.stream_id, "address": e.address,
            "version": e.version, "connected_at": e.connected_at + offset, "last_heartbeat": e.last_heartbeat + offset,
            "rtt": e.rtt, "in_flight": _stream_in_flight(e),
            "healthy": hub.registry.is_healthy(e, hub.clock.seconds()),
            # Requests wait for credit and nothing comes back: passed over while the group has a healthy stream.
            "stalled": e.stalled_since is not None,
            "stalled_since": e.stalled_since + offset if e.stalled_since is not None else None,
        })
    group_names = [g.name for g in config.groups]
    group_names += [g for g in hub.registry.groups() if g not in group_names]
    groups = []
    ids: dict[str, list[str]] = {}
    healthy_now = hub.clock.seconds()
    all_ids: set[str] = set()
    for name in group_names:
        members = hub.registry.streams(name)
        names = sorted({e.client_id for e in members})
        ids[name] = names
        all_ids.update(names)
        groups.append({
            "name": name, "clients": len(names), "streams": len(members),
            "in_flight": sum(_stream_in_flight(e) for e in members),
            "healthy": sum(1 for e in members if hub.registry.is_healthy(e, healthy_now)),
            "routes": [r.name for r in config.routes if r.group == name],
        })
    tally = metrics.by_route() if metrics is not None else {}
    refused = metrics.refusals_by_route() if metrics is not None else {}
    failed = metrics.failed_by_route() if metrics is not None else {}
    routes: list[dict[str, object]] = []
    for r in config.routes:
        routes.append({
            "name": r.name, "kind": "grpc" if r.grpc_service else "http", "match": _route_match(r),
            "group": r.group, "backend": r.backend,
            "clients": ids.get(r.group, [])[:ROUTE_CLIENTS], "clients_total": len(ids.get(r.group, [])),
            "requests": tally.get(r.name, {}), "failed": failed.get(r.name, 0),
            "access": _access_summary(r), "refusals": refused.get(r.name, {}),
        })
    for f in getattr(config, "forward", ()):
        routes.append({
            "name": f.name, "kind": "forward", "match": _route_match(f), "group": "", "backend": f"upstream {f.upstream}",
            "clients": [], "requests": tally.get(f.name, {}), "failed": failed.get(f.name, 0),
        })
    unrouted = tally.get("-")
    summary = metrics.summary() if metrics is not None else {"requests": 0, "errors": 0, "by_class": [],
                                                             "recent_errors": []}
    dropped, stalls = _tunnels_dropped_and_stalled(stream.tunnel for stream in hub.streams.values())
    counters = dict(hub.counters)
    counters["messages_dropped"] = counters.get("messages_dropped", 0) + dropped
    counters["flow_stalls"] = counters.get("flow_stalls", 0) + stalls
    entry = getattr(hub, "entry", None)
    if entry is not None:
        counters["http_connections"] = entry.connections
        counters["http_connections_refused"] = entry.refused_connections
        counters["http_header_timeouts"] = entry.header_timeouts
        counters["http_connections_refused_per_ip"] = entry.refused_per_ip
    counters["streams_stalled"] = len(hub.registry.stalled)
    counters["access_refusals"] = sum(sum(r.values()) for r in refused.values())
    s = config.server
    return {
        "role": "server", "version": __version__, "now": now, "started": started, "draining": hub.draining,
        "config": {"path": config.path, "version": config.version()},
        "listen": {"tunnel": s.tunnel_listen, "http": s.http_listen, "grpc": s.grpc_listen, "admin": s.admin_listen},
        "totals": {
            "clients": len(all_ids), "streams": len(hub.registry),
            "in_flight": hub.in_flight(), "requests": summary["requests"], "errors": summary["errors"],
            **_failure_split(summary),
        },
        "groups": groups, "clients": clients, "routes": routes,
        "clients_page": {"total": total, "offset": page_offset, "limit": page_limit, "group": want_group or "",
                         "q": search}, "unrouted": unrouted or {},
        "requests": summary["by_class"], "recent_errors": summary["recent_errors"], "counters": counters,
        "tunnel_opens": _tunnel_opens(hub),
    }


# -- client ---------------------------------------------------------------------------------


class ClientCollector:
    """Live client gauges and counters, read from the hub's links (one per server) at scrape time."""

    def __init__(self, hub: ClientHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        info = GaugeMetricFamily("tunneld_build_info", "Always 1; the version and role as labels.",
                                 labels=["version", "role"])
        info.add_metric([__version__, "client"], 1)
        yield info
        per_server = {
            "connected": GaugeMetricFamily("tunneld_client_connected", "1 while the tunnel stream to the server is open.",
                                           labels=["server"]),
            "reconnects": CounterMetricFamily("tunneld_client_reconnects",
                                              "Tunnel streams lost and redialled since start.", labels=["server"]),
            "routes": GaugeMetricFamily("tunneld_client_routes", "Routes the server granted this client.",
                                        labels=["server"]),
            "in_flight": GaugeMetricFamily("tunneld_requests_in_flight", "Requests in flight on the tunnel stream.",
                                           labels=["server"]),
            "rtt": GaugeMetricFamily("tunneld_heartbeat_rtt_seconds", "Last heartbeat round trip to the server.",
                                     labels=["server"]),
        }
        dropped_total, stalls_total = 0, 0
        for link in hub.links:
            label = [link.server]
            per_server["connected"].add_metric(label, 1 if link.is_connected else 0)
            per_server["reconnects"].add_metric(label, link.dial.reconnects if link.dial is not None else 0)
            per_server["routes"].add_metric(label, len(link.routes))
            per_server["in_flight"].add_metric(label, link.in_flight)
            if link.rtt is not None:
                per_server["rtt"].add_metric(label, link.rtt)
            dropped, stalls = _tunnels_dropped_and_stalled([link.tunnel] if link.tunnel is not None else [])
            dropped_total += link.counters.get("messages_dropped", 0) + dropped
            stalls_total += link.counters.get("flow_stalls", 0) + stalls
        yield from per_server.values()
        yield _counter("tunneld_tunnel_messages_dropped", "Tunnel messages from the servers dropped as invalid.",
                       dropped_total)
        yield _counter("tunneld_flow_control_stalls", "Times a request's sender paused on an empty window.",
                       stalls_total)
        yield _gauge("tunneld_draining", "1 while shutting down (SIGTERM), else 0.", 1 if hub.draining else 0)
        entry = getattr(hub, "entry", None)
        if entry is not None:
            yield _gauge("tunneld_http_connections", "Open connections on the http_entry (WebSockets included).",
                         entry.connections)
            yield _counter("tunneld_http_connections_refused_per_ip", "Connections answered 503 and closed "
                           "at max_connections_per_ip.", entry.refused_per_ip)


def _failure_split(summary: dict[str, Any]) -> dict[str, object]:
    """Who made the failures: tunneld's own answers vs backend 5xx; and backend 4xx (not failures)."""
    return {"errors_tunneld": summary.get("errors_tunneld", 0), "errors_backend": summary.get("errors_backend", 0),
            "backend_4xx": summary.get("backend_4xx", 0)}


def _dial_words(dial: Any) -> dict[str, object]:
    """A server's dials in words: "cannot reach" (never up) vs "lost", the last error and its likely cause."""
    history = getattr(dial, "history", None)
    if history is None:
        return {}
    return {"diagnosis": history.summary(), "failed_dials": history.failures, "last_error": history.last_error,
            "likely_cause": history.likely_cause, "ever_connected": history.ever_connected}


def client_status(hub: ClientHub, metrics: RequestMetrics | None, started: float,
                  clock: Callable[[], float] = time.time) -> dict[str, object]:
    """The client's ``/status`` document: the whole client, and ``servers`` (one entry per server)."""
    now = clock()
    offset = now - hub.clock.seconds()
    tally = metrics.by_route() if metrics is not None else {}
    failed = metrics.failed_by_route() if metrics is not None else {}
    summary = metrics.summary() if metrics is not None else {"requests": 0, "errors": 0, "by_class": [],
                                                             "recent_errors": []}
    counters: dict[str, int] = {"messages_dropped": 0, "flow_stalls": 0, "reconnects": 0, "dial_attempts": 0}
    servers = []
    routes: dict[str, dict[str, object]] = {}
    for link in hub.links:
        dial = link.dial
        dropped, stalls = _tunnels_dropped_and_stalled([link.tunnel] if link.tunnel is not None else [])
        counters["messages_dropped"] += link.counters.get("messages_dropped", 0) + dropped
        counters["flow_stalls"] += link.counters.get("flow_stalls", 0) + stalls
        reconnects = dial.reconnects if dial is not None else 0
        counters["reconnects"] += reconnects
        counters["dial_attempts"] += dial.attempts if dial is not None else 0
        servers.append({
            "address": link.server, "state": link.state, "connected": link.is_connected,
            "connected_since": link.connected_since + offset if link.connected_since is not None else None,
            "rtt": link.rtt, "in_flight": link.in_flight, "reconnects": reconnects,
            "routes": sorted(link.routes), "config_version": link.config_version,
            **_dial_words(dial),
        })
        for r in link.routes.values():
            row = routes.setdefault(r.name, {
                "name": r.name, "kind": "grpc" if r.grpc_service else "http", "match": _route_match(r),
                "backend": r.backend, "requests": tally.get(r.name, {}), "failed": failed.get(r.name, 0),
                "servers": [],
            })
            row["servers"].append(link.server)  # type: ignore[attr-defined]
    connected = [link for link in hub.links if link.is_connected]
    first = connected[0] if connected else hub.links[0]
    settings = hub.settings
    return {
        "role": "client", "version": __version__, "now": now, "started": started, "draining": hub.draining,
        "client_id": hub.client_id, "group": settings.group, "server": settings.server,
        "servers": servers,
        "http_entry": getattr(settings, "http_entry", ""),
        "connected": hub.is_connected,
        "connected_since": first.connected_since + offset if first.connected_since is not None else None,
        "rtt": first.rtt, "in_flight": hub.in_flight,
        "reconnects": counters["reconnects"], "config_version": first.config_version,
        "totals": {"requests": summary["requests"], "errors": summary["errors"], **_failure_split(summary)},
        "routes": list(routes.values()), "requests": summary["by_class"], "recent_errors": summary["recent_errors"],
        "counters": counters,
    }


# -- the web side ---------------------------------------------------------------------------------


class AdminResource(Resource):
    """``/``, ``/metrics`` and ``/status``; the last two behind the bearer token when one is set."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, status: Callable[[dict[str, str]], dict[str, object]],
                 token: Callable[[], str] = lambda: "", health: Callable[[], tuple[int, str]] | None = None,
                 inspector: Inspector | None = None, replay: Callable[[Exchange], str] | None = None,
                 listen: str = "", hosts: Callable[[], tuple[str, ...]] = lambda: ()) -> None:
        super().__init__()
        self.listen_host = _listen_host(listen)   # "" for a wildcard bind: the connection's address counts
        self.hosts = hosts   # admin_hosts, read per request (a reload may change it)
        self.inspector = inspector   # None: the inspector is off (/inspect answers 404)
        self.replay = replay
        self.registry = registry
        self.status = status
        self.health = health   # the server's /healthz (no token: load balancers probe it)
        self.token = token   # read per request, so a config reload can change it

    def render(self, request: server.Request) -> bytes:
        if not self._host_allowed(request):
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"connection", b"close")
            return self._plain(request, MISDIRECTED, "this admin port does not answer for that Host; "
                                                     "add the name to admin_hosts if it is yours")
        return super().render(request)  # type: ignore[no-any-return]

    def _host_allowed(self, request: server.Request) -> bool:
        """Is the request's Host one of ours? (No Host at all: not a browser, so no rebinding.)"""
        header = request.requestHeaders.getRawHeaders(b"host")
        if not header:
            return True
        if len(header) > 1:
            return False
        host = _host_name(header[0].decode("latin-1"))
        if host in _ALWAYS_HOSTS or (self.listen_host and host == self.listen_host) or host in self.hosts():
            return True
        local = getattr(request.getHost(), "host", None)
        return local is not None and host == local.lower()

    def _same_origin_write(self, request: server.Request) -> str:
        """Why a token-less state-changing request is refused ("" when it may proceed)."""
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = request.getHeader(b"host") or b""
            if origin.lower() not in (b"http://" + host.lower(), b"https://" + host.lower()):
                return "cross-origin request (Origin does not match Host)"
        site = request.getHeader(b"sec-fetch-site")
        if site is not None and site.lower() not in (b"same-origin", b"none"):
            return "cross-site request (Sec-Fetch-Site)"
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if request.getHeader(b"x-tunneld-replay") is None and content_type != b"application/json":
            return "send an X-Tunneld-Replay header or a JSON body (a plain form or text/plain POST is refused)"
        return ""

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        path = request.path
        page = DASHBOARD_FILES.get(path)
        if page is not None:
            request.setHeader(b"content-type", page[1])
            request.setHeader(b"content-security-policy", DASHBOARD_CSP)
            request.setHeader(b"x-frame-options", b"DENY")
            request.setHeader(b"referrer-policy", b"no-referrer")
            return page[0]
        if path == b"/healthz" and self.health is not None:
            code, text = self.health()
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return text.encode() + b"\n"
        if path == b"/inspect" or path.startswith(b"/inspect/"):
            return self._inspect(request, path)
        if path not in (b"/metrics", b"/status"):
            return self._plain(request, http.NOT_FOUND, "not found; try /, /metrics, /status or /inspect")
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="tunneld admin"')
            return self._plain(request, http.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer ...)")
        if path == b"/metrics":
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return generate_latest(self.registry)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.status(_query(request.args)), indent=1, sort_keys=True).encode() + b"\n"

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        path = request.path
        if path.startswith(b"/inspect/") and path.endswith(b"/replay"):
            return self._inspect(request, path)
        return self._plain(request, http.NOT_ALLOWED, "only POST /inspect/<request_id>/replay")

    def _inspect(self, request: server.Request, path: bytes) -> bytes:
        """``GET /inspect``, ``GET /inspect/<request_id>``, ``POST /inspect/<request_id>/replay`` (SPEC §7.3)."""
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="tunneld admin"')
            return self._plain(request, http.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer ...)")
        inspector = self.inspector
        if inspector is None:
            return self._plain(request, http.NOT_FOUND, "the inspector is off (inspect = 0)")
        parts = [p for p in path.decode("latin-1", "replace").split("/")[2:] if p]   # after "/inspect"
        post = request.method == b"POST"
        if len(parts) > 2 or (len(parts) == 2 and parts[1] != "replay"):
            return self._plain(request, http.NOT_FOUND, "try GET /inspect, GET /inspect/<request_id> or "
                                                        "POST /inspect/<request_id>/replay")
        if post != (len(parts) == 2):
            return self._plain(request, http.NOT_ALLOWED, "GET /inspect[/<request_id>]; "
                                                          "POST /inspect/<request_id>/replay")
        if not parts:
            return self._json(request, inspector.listing())
        rec = inspector.find(parts[0])
        if rec is None:
            return self._plain(request, http.NOT_FOUND, f"no exchange {parts[0]!r} in the inspector")
        if not post:
            return self._json(request, rec.to_json(bodies=True))
        if not self.token():
            why = self._same_origin_write(request)
            if why:
                return self._plain(request, http.FORBIDDEN, f"replay refused: {why}; or set admin_token")
        if self.replay is None:
            return self._plain(request, http.CONFLICT, "replay is not available here")
        from tunneld.protocols.replay import ReplayRefused
        try:
            new_id = self.replay(rec)
        except ReplayRefused as e:
            return self._plain(request, e.status, e.message)
        return self._json(request, {"request_id": new_id})

    @staticmethod
    def _json(request: server.Request, value: object) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value, sort_keys=True).encode() + b"\n"

    def _authorized(self, request: server.Request) -> bool:
        token = self.token().encode()
        if not token:
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)

    @staticmethod
    def _plain(request: server.Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"{code} {http.RESPONSES.get(code, b'').decode()}: {message}\n".encode()


#: 421 Misdirected Request (RFC 9110): the Host is not one this port serves.
MISDIRECTED = 421
_ALWAYS_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _host_name(value: str) -> str:
    """The host of a Host header value, lower-case, without port, brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    return value.rpartition(":")[0].rstrip(".") if ":" in value else value.rstrip(".")


def _listen_host(listen: str) -> str:
    """The host of ``admin_listen`` ("" for a wildcard bind or none)."""
    if not listen:
        return ""
    host = _host_name(listen)
    return "" if host in ("0.0.0.0", "::", "") else host


class AdminSite(server.Site):
    """The admin port's Site: quiet (no access log line per scrape or poll)."""

    noisy = False

    def __init__(self, resource: AdminResource) -> None:
        super().__init__(resource)
        self.displayTracebacks = False

    def log(self, request: object) -> None:
        pass


class AdminService(ListenService):
    """Listens on ``admin_listen``; ``port`` is the listening port once started (None if it could not)."""

    def __init__(self, endpoint: Any, resource: AdminResource, registry: CollectorRegistry) -> None:
        super().__init__(endpoint, AdminSite(resource))   # a busy admin port stops startup, as the entries do
        self.registry = registry
        self.resource = resource
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port


def _replayer(hub: Any, reactor: Any) -> Callable[[Exchange], str] | None:
    """Replay through ``hub``'s dispatcher into its inspector (None without an inspector)."""
    inspector = hub.inspector
    if inspector is None:
        return None
    from tunneld.protocols.replay import replay

    return lambda rec: replay(rec, hub, inspector, reactor)


def server_admin(hub: ServerHub, reactor: Any, listen: str) -> AdminService:
    """The server's admin port (token: the current config's ``admin_token``); feeds metrics from ``hub.finished``."""
    from tunneld.endpoints import server_endpoint

    registry = CollectorRegistry(auto_describe=False)
    metrics = RequestMetrics(registry)
    registry.register(ServerCollector(hub))  # type: ignore[arg-type]
    hub.metrics = metrics
    started = time.time()
    resource = AdminResource(registry, lambda query: server_status(hub, metrics, started, query=query),
                             lambda: hub.config.server.admin_token, health=hub.health,
                             inspector=hub.inspector, replay=_replayer(hub, reactor),
                             listen=listen, hosts=lambda: hub.config.server.admin_hosts)
    return AdminService(server_endpoint(reactor, listen), resource, registry)


def client_admin(hub: ClientHub, reactor: Any, listen: str) -> AdminService:
    """The client's admin port; also makes ``hub.finished`` feed the request metrics (labelled by server).

    Token: the hub's current ``admin_token`` (a SIGHUP reload changes it)."""
    from tunneld.endpoints import server_endpoint

    registry = CollectorRegistry(auto_describe=False)
    metrics = RequestMetrics(registry, extra_labels=("server",))
    registry.register(ClientCollector(hub))  # type: ignore[arg-type]
    hub.metrics = metrics
    started = time.time()
    resource = AdminResource(registry, lambda query: client_status(hub, metrics, started),
                             lambda: hub.settings.admin_token,
                             inspector=hub.inspector, replay=_replayer(hub, reactor),
                             listen=listen, hosts=lambda: hub.settings.admin_hosts)
    return AdminService(server_endpoint(reactor, listen), resource, registry)


# -- the dashboard ------------------------------------------------------------------------------
# The page is three package files (tunneld/dashboard/); no external assets, nothing inline, so the
# CSP allows scripts and styles from this origin only.

def _dashboard_file(name: str) -> bytes:
    return (resources.files("tunneld") / "dashboard" / name).read_bytes()


DASHBOARD_FILES: dict[bytes, tuple[bytes, bytes]] = {
    b"/": (_dashboard_file("index.html"), b"text/html; charset=utf-8"),
    b"/dashboard.css": (_dashboard_file("dashboard.css"), b"text/css; charset=utf-8"),
    b"/dashboard.js": (_dashboard_file("dashboard.js"), b"text/javascript; charset=utf-8"),
}
DASHBOARD_FILES[b"/index.html"] = DASHBOARD_FILES[b"/"]
DASHBOARD_HTML = DASHBOARD_FILES[b"/"][0]
DASHBOARD_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
