"""What an entry asks the server's router, and what it gets back (the glue between hubs and entries).

Entries (adapters) import these; the hub implements ``GrpcDispatcher``.  They
live here, not in an adapter module, so the hub never imports an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tunneld.tunnel import Tunnel


@dataclass(frozen=True)
class GrpcTarget:
    """Where a gRPC call goes: a tunnel and the route's limits."""

    tunnel: Tunnel
    route: str
    max_message_size: int
    client_id: str = field(default="", compare=False)   # the client serving it (inspector)
    strip_authorization: bool = False                    # basic_auth checked here: never forwarded


@dataclass(frozen=True)
class GrpcRefusal:
    """Answer the call here with a trailers-only status; ``code`` names a gRPC status."""

    code: str
    message: str
    route: str = ""      # the route it matched, if any (logs and metrics count the refusal under it)
    reason: str = ""     # access refusals: the metric label (no_credentials, ip_denied, ...)


class GrpcDispatcher(Protocol):
    def dispatch_grpc(self, service: str, authority: str, address: str = "",
                      authorization: bytes | None = None) -> GrpcTarget | GrpcRefusal:
        """Pick the tunnel for a call to ``service`` at ``authority`` from ``address``, or say why not."""

    def finished(self, record: dict[str, object]) -> None:
        """A call ended (for logs and metrics)."""
