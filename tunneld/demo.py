"""The demo's WebSocket and gRPC backends, and a gRPC caller to try them (``make demo``).

    python -m tunneld.demo serve [--host 127.0.0.1] [--ws-port 3001] [--grpc-port 3002]
    python -m tunneld.demo call [--target 127.0.0.1:8081] Say "hello"       # unary
    python -m tunneld.demo call [--target 127.0.0.1:8081] Count 5           # server streaming
    python -m tunneld.demo ws ws://127.0.0.1:8080/chat/ws "hello"           # one WebSocket message

``serve`` runs, on ``--ws-port``, a chat page at ``/chat`` whose script talks
over a WebSocket (``/chat/ws``, an echo that also says how many messages it
has seen), and on ``--grpc-port`` the raw-bytes gRPC service
``tunneld.demo.Echo`` (no protobuf needed): ``Say`` answers ``you said:
<request>``, ``Count`` streams ``n`` numbered messages.  With the demo
config both sit behind the client: routes ``chat`` (path ``/chat``) and
``demo-grpc`` (service ``tunneld.demo.Echo``).
"""

from __future__ import annotations

import argparse
import sys
from concurrent import futures
from typing import Any, Iterator

SERVICE = "tunneld.demo.Echo"

CHAT_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunneld demo chat</title>
<style>body{font:15px system-ui,sans-serif;margin:2em;max-width:42em}#log{border:1px solid #ccc;border-radius:6px;
padding:8px;height:18em;overflow:auto;background:#fafafa}.in{color:#2457c5}.out{color:#1a7f37}</style></head>
<body><h1>tunneld demo: WebSocket through the tunnel</h1>
<p>Every message goes browser &rarr; server &rarr; tunnel &rarr; client &rarr; this backend and back.
Open the admin dashboard's Traffic view to see each message.</p>
<div id="log"></div>
<form id="f"><input id="msg" size="40" autocomplete="off" value="hello tunnel"> <button>Send</button></form>
<script src="chat.js"></script></body></html>
"""

CHAT_JS = b"""
"use strict";
const log = document.getElementById("log");
function line(cls, text) { const d = document.createElement("div"); d.className = cls; d.textContent = text;
  log.append(d); log.scrollTop = log.scrollHeight; }
const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/chat/ws";
const ws = new WebSocket(url);
ws.onopen = () => line("", "connected to " + url);
ws.onmessage = (e) => line("in", "\\u2190 " + e.data);
ws.onclose = (e) => line("", "closed (" + e.code + ")");
document.getElementById("f").addEventListener("submit", (ev) => {
  ev.preventDefault(); const m = document.getElementById("msg"); ws.send(m.value); line("out", "\\u2192 " + m.value);
});
"""


def web_site() -> Any:
    """The chat page and its WebSocket echo (twisted.web + autobahn)."""
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.web import server
    from twisted.web.resource import Resource
    from twisted.web.static import Data

    class Echo(WebSocketServerProtocol):
        seen = 0

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.seen += 1
            if isBinary:
                self.sendMessage(payload, True)
            else:
                self.sendMessage(f"echo #{self.seen}: {payload.decode('utf-8', 'replace')}".encode(), False)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    chat = Resource()
    chat.putChild(b"", Data(CHAT_PAGE, "text/html; charset=utf-8"))
    chat.putChild(b"chat.js", Data(CHAT_JS, "text/javascript; charset=utf-8"))
    chat.putChild(b"ws", WebSocketResource(factory))
    root = Resource()
    root.putChild(b"chat", chat)
    return server.Site(root)


def grpc_server(host: str, port: int) -> Any:
    """The raw-bytes gRPC service ``tunneld.demo.Echo`` (Say: unary, Count: server streaming), started."""
    import grpc

    def say(request: bytes, context: Any) -> bytes:
        return b"you said: " + request

    def count(request: bytes, context: Any) -> Iterator[bytes]:
        n = int(request or b"3")
        for i in range(1, min(n, 1000) + 1):
            yield f"{i} of {n}".encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise SystemExit(f"demo: cannot listen on {host}:{port}")
    server.start()
    return server


def serve(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    grpc_srv = grpc_server(args.host, args.grpc_port)
    reactor.listenTCP(args.ws_port, web_site(), interface=args.host)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", lambda: grpc_srv.stop(1).wait(5))  # type: ignore[attr-defined]
    print(f"demo backends: chat page + WebSocket on http://{args.host}:{args.ws_port}/chat, "
          f"gRPC {SERVICE} on {args.host}:{args.grpc_port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


def call(args: argparse.Namespace) -> int:
    import grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            if args.method == "Say":
                answer = channel.unary_unary(f"/{SERVICE}/Say")(args.message.encode(), timeout=args.timeout)
                print(answer.decode())
            elif args.method == "Count":
                for reply in channel.unary_stream(f"/{SERVICE}/Count")(args.message.encode(), timeout=args.timeout):
                    print(reply.decode())
            else:
                print(f"demo: unknown method {args.method!r} (Say or Count)", file=sys.stderr)
                return 2
        except grpc.RpcError as e:
            print(f"demo: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def ws(args: argparse.Namespace) -> int:
    """Send one message over a WebSocket and print the answer (needs the ``websockets`` package)."""
    try:
        from websockets.sync.client import connect
    except ImportError:
        print("demo: pip install websockets (or open the chat page in a browser)", file=sys.stderr)
        return 2
    with connect(args.url, open_timeout=args.timeout) as conn:
        conn.send(args.message)
        print(conn.recv(timeout=args.timeout))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunneld.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the WebSocket and gRPC demo backends")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ws-port", type=int, default=3001)
    p.add_argument("--grpc-port", type=int, default=3002)
    p = sub.add_parser("call", help="call the demo gRPC service (through the server's grpc_listen)")
    p.add_argument("--target", default="127.0.0.1:8081")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("method", choices=["Say", "Count"])
    p.add_argument("message", nargs="?", default="hello")
    p = sub.add_parser("ws", help="send one WebSocket message and print the answer")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("url", nargs="?", default="ws://127.0.0.1:8080/chat/ws")
    p.add_argument("message", nargs="?", default="hello")
    args = parser.parse_args(argv)
    return {"serve": serve, "call": call, "ws": ws}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
