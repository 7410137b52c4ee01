#!/usr/bin/env python3
"""One Twisted reverse-proxy hop: the benchmark's reference for small requests.

    python bench/twisted_hop.py --port PORT --backend-port PORT

A ``twisted.web`` ``Site`` whose root is ``ReverseProxyResource``: every
request is forwarded to the origin on 127.0.0.1 (HTTP/1.0, a new backend
connection per request, as Twisted ships it).  It is what "one Python proxy
hop, no tunnel" costs on this machine; ``make bench`` measures it next to
tunneld on the HTTP rows.  Its log shows a few "Request.finish called on a
request after its connection was lost" tracebacks when wrk closes its
connections at the end of a run: a known weakness of Twisted's own proxy,
harmless to the figures.
"""

from __future__ import annotations

import argparse

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class _QuietSite(Site):
    def log(self, request: object) -> None:
        pass  # no access log, as the tunneld paths run without one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    args = parser.parse_args()
    site = _QuietSite(ReverseProxyResource("127.0.0.1", args.backend_port, b""))
    reactor.listenTCP(args.port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
