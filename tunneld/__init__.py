"""tunneld: a reverse tunnel carrying HTTP, WebSocket and gRPC over one gRPC stream."""
from __future__ import annotations

__version__ = "0.1.0"
