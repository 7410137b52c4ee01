#!/usr/bin/env bash
# `make demo`: the whole tunnel on one machine, all on 127.0.0.1, in the
# foreground of this shell:
#   demo backend (bench/backend.py, :3000)                    \
#   WebSocket chat + gRPC tunneld.demo.Echo (tunneld.demo, :3001/:3002) <- tunneld-client
#                                  <=tunnel=> tunneld-server (HTTP+WebSocket :8080, gRPC :8081, admin :9100)
# Waits until the admin port's /healthz says ready (client connected) and
# http://127.0.0.1:8080/ answers 200 through the tunnel, prints
# what to try for each protocol and the dashboard, then waits. Ctrl-C or SIGTERM stops everything it started, by
# PID; so does any one of the three dying. Logs: .demo/*.log.
#
# Environment (all optional): VENV (.venv), SERVER_CONF (etc/server.toml),
# CLIENT_CONF (etc/client.toml), BACKEND_PORT (3000; the server config's web
# route must point at it), WS_PORT (3001) and GRPC_PORT (3002) (its chat and
# demo-grpc routes). The entry URL comes from the server's http_listen.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
TWISTD=$VENV/bin/twistd
SERVER_CONF=${SERVER_CONF:-etc/server.toml}
CLIENT_CONF=${CLIENT_CONF:-etc/client.toml}
BACKEND_PORT=${BACKEND_PORT:-3000}
WS_PORT=${WS_PORT:-3001}
GRPC_PORT=${GRPC_PORT:-3002}
READY_TIMEOUT=15
STOP_TIMEOUT=15          # server and client drain in-flight work on SIGTERM
LOGDIR=.demo
export GRPC_VERBOSITY=ERROR

for f in "$PY" "$TWISTD"; do
    [ -x "$f" ] || { echo "demo: $f missing; run 'make demo' (it builds $VENV)" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "demo: needs curl (apt-get install curl)" >&2; exit 1; }
"$PY" -m tunneld check "$SERVER_CONF" >/dev/null && "$PY" -m tunneld check "$CLIENT_CONF" >/dev/null

# Every port the demo will listen on: the backend's and the server config's
# *_listen keys (empty = disabled). A busy one is named and we stop here.
ports=$("$PY" - "$SERVER_CONF" "$BACKEND_PORT" "$WS_PORT" "$GRPC_PORT" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    server = tomllib.load(f).get("server", {})
print(f"backend 127.0.0.1:{sys.argv[2]}")
print(f"ws_backend 127.0.0.1:{sys.argv[3]}")
print(f"grpc_backend 127.0.0.1:{sys.argv[4]}")
for key in ("tunnel_listen", "http_listen", "grpc_listen", "admin_listen"):
    if server.get(key):
        print(key, server[key])
EOF
)
# Entry URL from http_listen ("0.0.0.0:8080" -> http://127.0.0.1:8080).
ENTRY=$(awk '$1 == "http_listen" { print $2 }' <<<"$ports")
[ -n "$ENTRY" ] || { echo "demo: $SERVER_CONF has no http_listen" >&2; exit 1; }
case $ENTRY in
    0.0.0.0:*) ENTRY=127.0.0.1:${ENTRY#0.0.0.0:} ;;
    "[::]:"*) ENTRY=[::1]:${ENTRY#"[::]:"} ;;
esac
ENTRY=http://$ENTRY
local_addr() {  # local_addr KEY: the server's KEY listener as host:port to dial ("" if off)
    local a
    a=$(awk -v k="$1" '$1 == k { print $2 }' <<<"$ports")
    case $a in
        0.0.0.0:*) a=127.0.0.1:${a#0.0.0.0:} ;;
        "[::]:"*) a=[::1]:${a#"[::]:"} ;;
    esac
    echo "$a"
}
GRPC_ENTRY=$(local_addr grpc_listen)
ADMIN=$(local_addr admin_listen)
busy=$("$PY" - <<EOF
import socket
busy = []
for line in """$ports""".splitlines():
    what, listen = line.split()
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            busy.append(f"  {listen} ({what}): {e.strerror}")
print("\n".join(busy))
EOF
)
if [ -n "$busy" ]; then
    echo "demo: port(s) busy, stop whatever uses them first:" >&2
    echo "$busy" >&2
    exit 1
fi

mkdir -p "$LOGDIR"
pids=()
names=()

# Children die with this script even if it is killed with SIGKILL.
pdeath=()
command -v setpriv >/dev/null && pdeath=(setpriv --pdeathsig TERM --)

start() {  # start NAME COMMAND...: run in the background, log to .demo/NAME.log
    local name=$1
    shift
    "${pdeath[@]}" "$@" </dev/null >"$LOGDIR/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
    echo "started $name (pid $!): $*"
}

stopping=0
stop_all() {
    [ "$stopping" -eq 0 ] || return 0
    stopping=1
    trap '' INT TERM
    local i pid alive
    # Reverse order: client, server, backend.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null && echo "stopping ${names[i]} (pid ${pids[i]})" || true
    done
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 1 ] || break
        sleep 0.1
    done
    for ((i = 0; i < ${#pids[@]}; i++)); do
        if kill -0 "${pids[i]}" 2>/dev/null; then
            echo "${names[i]} (pid ${pids[i]}) still running after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
    echo "demo stopped"
}
trap 'stop_all; exit 0' INT
trap 'stop_all; exit 0' TERM
trap 'stop_all' EXIT

died() {  # died: print which child exited, with its log tail; 0 if one did
    local i
    for ((i = 0; i < ${#pids[@]}; i++)); do
        if ! kill -0 "${pids[i]}" 2>/dev/null; then
            echo "demo: ${names[i]} exited; last lines of $LOGDIR/${names[i]}.log:" >&2
            tail -n 20 "$LOGDIR/${names[i]}.log" >&2
            return 0
        fi
    done
    return 1
}

http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true; }

start backend "$PY" bench/backend.py --port "$BACKEND_PORT" --host 127.0.0.1
start demo-backends "$PY" -m tunneld.demo serve --host 127.0.0.1 --ws-port "$WS_PORT" --grpc-port "$GRPC_PORT"
start server "$TWISTD" -n --pidfile= tunneld-server -c "$SERVER_CONF"
# Readiness is asked of the admin port's /healthz, never of the entry: a probe
# of the entry before the client is connected would be a real request answered
# 502 (no client connected), and a fresh dashboard would greet the user with failures.
listening() {  # listening HOST:PORT: something accepts TCP connections there (no request is sent)
    local host=${1%:*} port=${1##*:}
    host=${host#[}; host=${host%]}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}
deadline=$((SECONDS + READY_TIMEOUT))
until listening "${ENTRY#http://}"; do
    if died || [ "$SECONDS" -ge "$deadline" ]; then
        echo "demo: the server did not start listening on $ENTRY within ${READY_TIMEOUT}s (see $LOGDIR/server.log)" >&2
        exit 1
    fi
    sleep 0.2
done
start client "$TWISTD" -n --pidfile= tunneld-client -c "$CLIENT_CONF"
deadline=$((SECONDS + READY_TIMEOUT))
if [ -n "$ADMIN" ]; then
    # 200 once every group with routes has a connected client (or after the server's ready_timeout).
    until [ "$(http_code "http://$ADMIN/healthz")" = "200" ]; do
        if died || [ "$SECONDS" -ge "$deadline" ]; then
            echo "demo: http://$ADMIN/healthz did not answer 200 within ${READY_TIMEOUT}s (is the client connected?)" >&2
            echo "      logs: $LOGDIR/server.log $LOGDIR/client.log" >&2
            exit 1
        fi
        sleep 0.2
    done
fi
until [ "$(http_code "$ENTRY/")" = "200" ]; do
    if died || [ "$SECONDS" -ge "$deadline" ]; then
        echo "demo: $ENTRY/ did not answer 200 through the tunnel within ${READY_TIMEOUT}s (last: $(http_code "$ENTRY/"))" >&2
        echo "      logs: $LOGDIR/backend.log $LOGDIR/server.log $LOGDIR/client.log" >&2
        exit 1
    fi
    sleep 0.2
done

hint() { printf '  %-72s # %s\n' "$1" "$2"; }
echo
WS_ENTRY=ws://${ENTRY#http://}
echo "tunneld demo is up: $ENTRY -> server -> tunnel -> client -> backend 127.0.0.1:$BACKEND_PORT"
echo "Try HTTP:"
hint "curl -i $ENTRY/" "page with two Set-Cookie headers"
hint "curl -N $ENTRY/stream" "Server-Sent Events, one every 0.2 s"
hint "curl -N '$ENTRY/stream?n=20&interval=0.5'" "longer stream"
hint "curl -o /dev/null -w '%{size_download} B %{speed_download} B/s\\n' $ENTRY/bytes/10485760" "10 MiB download"
hint "curl -T somefile $ENTRY/upload" "answers {bytes, sha256}"
hint "curl -i $ENTRY/status/204" "empty answer"
hint "curl -H 'X-Demo: 1' '$ENTRY/echo?a=1'" "the request as the backend saw it"
echo "Try WebSocket (route chat -> 127.0.0.1:$WS_PORT):"
hint "$ENTRY/chat/" "open in a browser: a chat page talking over the tunnel"
hint "$PY -m tunneld.demo ws $WS_ENTRY/chat/ws 'hello'" "one message, its echo printed"
if [ -n "$GRPC_ENTRY" ]; then
    echo "Try gRPC (route demo-grpc -> 127.0.0.1:$GRPC_PORT):"
    hint "$PY -m tunneld.demo call --target $GRPC_ENTRY Say 'hello'" "unary call"
    hint "$PY -m tunneld.demo call --target $GRPC_ENTRY Count 5" "server streaming"
fi
if [ -n "$ADMIN" ]; then
    echo "Watch it:"
    hint "http://$ADMIN/" "open in a browser: the dashboard (clients, routes, live traffic with replay)"
    hint "curl -s http://$ADMIN/inspect" "the inspector's JSON (add -H 'Authorization: Bearer ...' with admin_token)"
fi
hint "make check-config" "$PY -m tunneld check $SERVER_CONF"
echo "Logs: $LOGDIR/backend.log $LOGDIR/demo-backends.log $LOGDIR/server.log $LOGDIR/client.log"
echo "Ctrl-C stops everything."

# Wait until a signal arrives or one of the three exits.
while ! died; do
    wait -n "${pids[@]}" 2>/dev/null || true
done
exit 1
