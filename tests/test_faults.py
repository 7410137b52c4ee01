"""Faults real networks produce, over loopback: tunneld notices them and recovers.

Most tests run real ``twistd -n tunneld-server`` / ``tunneld-client``
processes (tests/processes.py) against a backend in the test process, and
kill, freeze or restart them by PID.  Where the assertion needs the server's
tables, the same fault is reproduced in-process (tests/harness.py ``Stack``)
by cutting the client's TCP connection under grpc's feet.  Every wait is a
bounded poll; elapsed times are measured, recorded in ``MEASURED`` and
printed to the test log, and compared to the requirement only as upper bounds.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
from typing import Any, Callable

import grpc
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.backends import test_site
from tests.harness import Stack, wait_for
from tests.processes import TOKEN, ProcessStack, Twistd
from tests.test_e2e_bad_input import c2s, rogue_session
from tunneld import tunnel_pb2 as pb
from tunneld.grpc_bridge import server as tunnel_server
from tunneld.grpc_bridge import stream as bridge_stream

#: Figures measured by the tests in this run (name -> seconds or count).
MEASURED: dict[str, float] = {}


def measured(name: str, value: float) -> None:
    MEASURED[name] = value
    print(f"\nMEASURED {name} = {value:.3f}")


def since(start: float) -> float:
    return time.monotonic() - start


@inlineCallbacks
def get(url: bytes, timeout: float = 30.0) -> Any:
    """(status, body, seconds); status 0 and the error's repr if the request failed."""
    start = time.monotonic()
    try:
        resp = yield treq.get(url, persistent=False, timeout=timeout)
        body = yield treq.content(resp)
        return resp.code, body, since(start)
    except Exception as e:
        return 0, repr(e).encode(), since(start)


# -- raw sockets ---------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, half_close: bool = False, timeout: float = 10.0) -> tuple[str, float]:
    """Send ``data`` to 127.0.0.1:port and read until the peer closes (blocking; run in a thread).

    Returns ("closed" | "reset" | "open", seconds until then).
    """
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        deadline = start + timeout
        try:
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                if not s.recv(65536):
                    return "closed", since(start)
        except socket.timeout:
            pass
        except ConnectionResetError:
            return "reset", since(start)
    return "open", since(start)


def raw_proxy_call(port: int, payloads: list[bytes], token: str = TOKEN, timeout: float = 10.0) -> str:
    """A Proxy call whose messages are raw bytes (not necessarily protobuf); returns its status name."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    outbox: queue.Queue[bytes | None] = queue.Queue()
    for p in payloads:
        outbox.put(p)

    def requests() -> Any:
        while True:
            item = outbox.get(timeout=timeout)
            if item is None:
                return
            yield item

    try:
        call = channel.stream_stream("/tunneld.v1.TunnelService/Proxy", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(
            requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=timeout)
        for _ in call:
            pass
        return "OK"
    except grpc.RpcError as e:
        return str(e.code().name)
    finally:
        outbox.put(None)
        channel.close()


def _proc_net_tcp_remote(port: int) -> set[str]:
    """Socket inodes of TCP connections (any process) whose remote end is 127.0.0.1:port."""
    inodes: set[str] = set()
    v4, v6 = f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[2] in (v4, v6) and fields[3] == "01":  # ESTABLISHED
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    return inodes


def cut_connections_to(port: int) -> int:
    """Shut down, under grpc's feet, every TCP connection of this process to 127.0.0.1:port.

    No HTTP/2 GOAWAY, no RST_STREAM, no cancelled call: the peer just sees the
    connection end, as when a process is killed.  Returns how many were cut.
    """
    inodes = _proc_net_tcp_remote(port)
    cut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            s = socket.socket(fileno=os.dup(int(name)))
            try:
                s.shutdown(socket.SHUT_RDWR)
                cut += 1
            except OSError:
                pass
            finally:
                s.close()
    return cut


class Silent(Protocol):
    """A backend that accepts connections and never reads or answers."""

    def __init__(self, factory: SilentFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        self.factory.accepted += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.closed += 1


class SilentFactory(Factory):
    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0

    def buildProtocol(self, addr: Any) -> Silent:
        return Silent(self)


# -- real processes ----------------------------------------------------------------------


class ProcessFaultTests(TestCase):
    """Real server and client processes; a backend in the test process."""

    timeout = 60

    def setUp(self) -> None:
        site, self.held, self.never = test_site()
        self.backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.addCleanup(self.held.release)
        self.backend_url = f"http://127.0.0.1:{self.backend.getHost().port}"

    def make_stack(self, **server: Any) -> ProcessStack:
        return ProcessStack(self, [{"name": "web", "backend": self.backend_url}], server=server)

    @inlineCallbacks
    def start(self, clients: int = 1, server: dict[str, Any] | None = None, **client: Any) -> Any:
        """A server and ``clients`` client processes ("c0", "c1", ...), all connected and serving."""
        stack = self.make_stack(**(server or {}))
        stack.start_server()
        procs = [stack.add_client(client_id=f"c{i}", **client) for i in range(clients)]
        for proc in procs:
            yield stack.wait_connected(proc)
        yield stack.wait_http("/small", timeout=10)
        return stack, procs

    def assertQuiet(self, *procs: Twistd) -> None:
        for proc in procs:
            self.assertNotIn("Traceback", proc.log(), proc.name)

    @inlineCallbacks
    def test_client_sigkill_mid_request_fails_it_at_once(self) -> Any:
        """SIGKILL of the client: a request without a head gets 502, one mid-body is cut, both within 1 s."""
        stack, (client,) = yield self.start()
        no_head = get(stack.url("/never"))
        mid_body: list[bytes] = []
        resp = yield treq.get(stack.url("/held"), persistent=False, unbuffered=True)
        self.assertEqual(resp.code, 200)
        body_done = treq.collect(resp, mid_body.append)
        outcome: list[Any] = []
        body_done.addBoth(outcome.append)
        yield wait_for(lambda: self.never.started == 1 and bool(mid_body), what="both requests at the backend")
        killed = time.monotonic()
        client.kill()
        status, body, _ = yield no_head
        no_head_after = since(killed)
        yield wait_for(lambda: bool(outcome), timeout=5, what="mid-body response cut")
        cut_after = since(killed)
        measured("sigkill_client.502_after", no_head_after)
        measured("sigkill_client.cut_after", cut_after)
        self.assertEqual(status, 502, body)
        self.assertLess(no_head_after, 1.0)
        self.assertLess(cut_after, 1.0)
        self.assertIsInstance(outcome[0], Failure, "the cut body must not look complete")
        # The dead client's backend connections died with it.
        yield wait_for(lambda: self.never.disconnected == 1 and len(self.held.disconnected) == 1,
                       what="backend saw the client die")
        # The server holds nothing for the dead stream: a second client serves every request.
        other = stack.add_client(client_id="second")
        yield stack.wait_connected(other)
        answers = []
        for _ in range(6):
            answers.append((yield get(stack.url("/small")))[0])
        self.assertEqual(answers, [200] * 6, stack.logs())
        assert stack.server is not None
        self.assertIn("client c0 disconnected", stack.server.log())
        self.assertQuiet(stack.server, other)

    @inlineCallbacks
    def test_client_restart_serves_again_within_backoff(self) -> Any:
        """A client stopped (SIGTERM) and started again carries traffic again within 5 s."""
        stack, (client,) = yield self.start()
        client.signal(signal.SIGTERM)
        yield wait_for(lambda: not client.running, timeout=10, what="client exit")
        status, _, _ = yield get(stack.url("/small"))
        self.assertEqual(status, 502)  # no client: the server answers at once
        restarted = time.monotonic()
        again = stack.add_client(client_id="c0")
        took = yield stack.wait_http("/small", timeout=5)
        measured("client_restart.traffic_after", since(restarted))
        answers = []
        for _ in range(6):
            answers.append((yield get(stack.url("/small")))[0])
        self.assertEqual(answers, [200] * 6, stack.logs())
        self.assertLess(took, 5.0)
        self.assertQuiet(client, again)

    @inlineCallbacks
    def test_server_restart_client_reconnects_by_itself(self) -> Any:
        """The server killed and started again on the same ports: the same client process serves within 20 s."""
        stack, (client,) = yield self.start()
        connects, lost = client.count("connected to "), client.count("reconnecting in")
        restarted = time.monotonic()
        stack.restart_server()  # SIGKILL: no clean close reaches the client
        yield stack.wait_http("/small", timeout=20)
        measured("server_restart.traffic_after", since(restarted))
        self.assertTrue(client.running)
        self.assertGreater(client.count("connected to "), connects)
        self.assertGreater(client.count("reconnecting in"), lost)
        self.assertLess(since(restarted), 20.0)
        self.assertQuiet(client)

    @inlineCallbacks
    def test_frozen_client_detected_by_keepalive(self) -> Any:
        """A SIGSTOPped client (no RST): its requests fail with 502 long before heartbeat_timeout; after SIGCONT it serves again."""
        # Neither the heartbeat timeout nor the route timeout may be what answers.
        stack, (client,) = yield self.start(server={"heartbeat_timeout": 60, "request_timeout": 120})
        connects = client.count("connected to ")
        pending = get(stack.url("/never"), timeout=25)
        yield wait_for(lambda: self.never.started == 1, what="request at the backend")
        frozen = time.monotonic()
        client.freeze()
        status, body, _ = yield pending
        noticed = since(frozen)
        measured("frozen_client.502_after", noticed)
        self.assertEqual(status, 502, body)
        self.assertLess(noticed, 20.0)
        assert stack.server is not None
        self.assertIn("client c0 disconnected", stack.server.log())
        # Meanwhile the group has no client: new requests are refused at once, not queued to the frozen one.
        status, _, took = yield get(stack.url("/small"))
        self.assertEqual((status, took < 1.0), (502, True))
        thawed = time.monotonic()
        client.thaw()
        yield stack.wait_http("/small", timeout=15)
        measured("frozen_client.traffic_after_sigcont", since(thawed))
        # The thawed client found its stream dead and released the backend request it held.
        yield wait_for(lambda: self.never.disconnected == 1, what="client released its backend request")
        self.assertGreater(client.count("connected to "), connects)
        self.assertQuiet(client, stack.server)

    @inlineCallbacks
    def test_frozen_server_detected_by_the_client(self) -> Any:
        """A SIGSTOPped server: the client drops the stream through keepalive, well before its heartbeat_timeout; after SIGCONT traffic flows."""
        stack, (client,) = yield self.start(heartbeat_timeout=90)
        assert stack.server is not None
        lost = client.count("reconnecting in")
        frozen = time.monotonic()
        stack.server.freeze()
        yield wait_for(lambda: client.count("reconnecting in") > lost, timeout=25, what="client noticed the frozen server")
        measured("frozen_server.client_noticed_after", since(frozen))
        self.assertLess(since(frozen), 20.0)
        thawed = time.monotonic()
        stack.server.thaw()
        yield stack.wait_http("/small", timeout=25)
        measured("frozen_server.traffic_after_sigcont", since(thawed))
        # The server dropped the dead stream: nothing goes to it any more.
        answers = []
        for _ in range(6):
            answers.append((yield get(stack.url("/small")))[0])
        self.assertEqual(answers, [200] * 6, stack.logs())
        self.assertQuiet(client, stack.server)

    @inlineCallbacks
    def test_one_of_two_clients_killed_the_other_serves_everything(self) -> Any:
        """Two clients in a group, one SIGKILLed under load: after the first second no request fails."""
        stack, (a, b) = yield self.start(clients=2, access_log=True)
        # Both serve before the kill.
        for _ in range(20):
            if a.count("route=web status=200") and b.count("route=web status=200"):
                break
            yield get(stack.url("/small"))
        self.assertTrue(a.count("route=web status=200") and b.count("route=web status=200"), stack.logs())
        results: list[tuple[float, float, int]] = []   # (started, ended, status)
        kill_at: list[float] = []
        start = time.monotonic()

        @inlineCallbacks
        def worker() -> Any:
            for _ in range(2000):
                if kill_at and time.monotonic() > kill_at[0] + 3.0:
                    return
                began = time.monotonic()
                status, _, _ = yield get(stack.url("/slow?delay=0.05"), timeout=10)
                results.append((began, time.monotonic(), status))

        def kill() -> None:
            kill_at.append(time.monotonic())
            a.kill()

        killing = deferLater(reactor, 1.0, kill)
        yield DeferredList([worker() for _ in range(4)] + [killing], fireOnOneErrback=True, consumeErrors=True)
        killed = kill_at[0]
        # Requests in flight on the killed client may fail (502 at once); none may fail after the first second.
        before = [s for t, e, s in results if e < killed and s != 200]
        early = [round(e - killed, 3) for t, e, s in results if e >= killed and t < killed + 1.0 and s != 200]
        late = [(round(t - killed, 3), s) for t, e, s in results if t >= killed + 1.0 and s != 200]
        measured("two_clients.requests", len(results))
        measured("two_clients.errors_in_first_second", len(early))
        measured("two_clients.errors_after_first_second", len(late))
        self.assertEqual(before, [])
        self.assertEqual(late, [], stack.logs())
        # Those that failed did so at once (502 on stream loss, not a timeout).
        self.assertTrue(all(ended < 1.0 for ended in early), early)
        self.assertGreater(sum(1 for t, _, _ in results if t >= killed + 1.0), 10)
        self.assertTrue(b.running)
        self.assertQuiet(b)
        # start is only for the log line: how long the whole run took.
        measured("two_clients.run_seconds", since(start))

    @inlineCallbacks
    def test_garbage_on_tunnel_port_ends_only_that_connection(self) -> Any:
        """Random bytes, HTTP/1.1, a truncated preface and malformed Proxy streams are closed; the real client never notices."""
        stack, (client,) = yield self.start()
        port = stack.tunnel_port
        connects, reconnects = client.count("connected to "), client.count("reconnecting")
        rnd = b"\x16\x03\x01" + os.urandom(509)  # starts like a TLS ClientHello, then noise
        for name, data, half in [
            ("random", rnd, False),
            ("http1", b"GET / HTTP/1.1\r\nHost: tunnel\r\nConnection: keep-alive\r\n\r\n", False),
            ("truncated_preface", b"PRI * HTTP/2.0\r\n\r\nSM", True),
        ]:
            outcome, took = yield deferToThread(raw_exchange, port, data, half, 10.0)
            measured(f"garbage.{name}.closed_after", took)
            self.assertIn(outcome, ("closed", "reset"), name)
            self.assertLess(took, 5.0, name)
        # Proxy streams that break the protocol: each ends with an error status.
        open_msg = c2s(protocol_type=pb.CONTROL,
                       stream_open=pb.StreamOpenRequest(client_id="rogue", group="default", stream_id="r"))
        got, status = yield deferToThread(rogue_session, port, [c2s(heartbeat=pb.Heartbeat(sent_at_ms=1))], TOKEN)
        self.assertEqual(status, "FAILED_PRECONDITION")
        got, status = yield deferToThread(rogue_session, port, [open_msg, open_msg], TOKEN, 5)
        self.assertEqual(status, "ABORTED")
        response_from_client = c2s(protocol_type=pb.CONTROL, stream_open_response=pb.StreamOpenResponse(success=True))
        got, status = yield deferToThread(rogue_session, port, [open_msg, response_from_client], TOKEN, 5)
        self.assertEqual(status, "ABORTED")
        status = yield deferToThread(raw_proxy_call, port, [b"\xff\xff\xff\xff\xff"])
        self.assertNotEqual(status, "OK")
        status = yield deferToThread(raw_proxy_call, port, [open_msg.SerializeToString(), b"\x0a\xff"])
        self.assertNotEqual(status, "OK")
        # The legitimate client saw nothing.
        answers = []
        for _ in range(3):
            answers.append((yield get(stack.url("/small")))[0])
        self.assertEqual(answers, [200] * 3)
        self.assertEqual((client.count("connected to "), client.count("reconnecting")), (connects, reconnects),
                         client.log())
        assert stack.server is not None
        self.assertTrue(stack.server.running)
        self.assertQuiet(client, stack.server)


# -- in-process: the server's tables ----------------------------------------------------------


class InProcessFaultTests(TestCase):
    """The same faults in one process, where the server's and client's tables can be read."""

    timeout = 30

    @inlineCallbacks
    def make_stack(self, routes: list[dict[str, Any]], **server: Any) -> Any:
        stack = Stack(routes, server=server)
        yield stack.start()
        self.addCleanup(stack.stop)
        return stack

    @inlineCallbacks
    def test_abrupt_connection_loss_empties_the_server_tables(self) -> Any:
        """The client's TCP connection cut without any gRPC close: 502 within 1 s, the stream and its requests are gone."""
        site, held, never = test_site()
        backend = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        stack = yield self.make_stack([{"name": "web", "backend": f"http://127.0.0.1:{backend.getHost().port}"}])
        client = yield stack.add_client()
        assert stack.server is not None
        hub = stack.server.hub
        (entry,) = hub.registry.streams()
        old_key = entry.key
        pending = get(stack.url("/never"))
        yield wait_for(lambda: never.started == 1 and stack.server_in_flight() == 1, what="request in flight")
        cut_at = time.monotonic()
        self.assertEqual(cut_connections_to(stack.tunnel_port), 1)
        status, body, _ = yield pending
        measured("abrupt_loss.502_after", since(cut_at))
        self.assertEqual(status, 502, body)
        self.assertLess(since(cut_at), 1.0)
        self.assertEqual(stack.server_in_flight(), 0)
        self.assertIsNone(hub.registry.get(old_key))
        self.assertNotIn(entry.handle, hub.streams.values())
        # The client noticed too, released the backend request, and came back on a new stream.
        yield wait_for(lambda: never.disconnected == 1, what="client aborted its backend request")
        yield wait_for(lambda: client.hub.is_connected and len(hub.registry) == 1, what="client reconnected")
        self.assertEqual(stack.client_in_flight(), 0)
        status, _, _ = yield get(stack.url("/small"))
        self.assertEqual(status, 200)
        yield wait_for(lambda: stack.server_in_flight() == 0 and stack.client_in_flight() == 0, what="tables empty")

    @inlineCallbacks
    def test_backend_accepting_and_never_answering_is_504_and_released(self) -> Any:
        """A backend that accepts and never answers gives 504 at the route timeout; both ends release the request."""
        silent = SilentFactory()
        backend = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        stack = yield self.make_stack([{"name": "web", "timeout": 0.5,
                                        "backend": f"http://127.0.0.1:{backend.getHost().port}"}])
        yield stack.add_client()
        status, body, took = yield get(stack.url("/anything"))
        measured("silent_backend.504_after", took)
        self.assertEqual(status, 504, body)
        self.assertGreaterEqual(took, 0.5)
        self.assertLess(took, 2.0)
        self.assertEqual(silent.accepted, 1)
        yield wait_for(lambda: silent.closed == 1, what="client closed its backend connection")
        yield wait_for(lambda: stack.server_in_flight() == 0 and stack.client_in_flight() == 0,
                       what="request tables empty")

    @inlineCallbacks
    def test_silent_connection_is_closed_after_the_handshake_timeout(self) -> Any:
        """A TCP connection to the tunnel port that never completes the HTTP/2 preface is closed after the handshake timeout."""
        self.patch(bridge_stream, "HANDSHAKE_TIMEOUT_MS", 1000)
        stack = yield self.make_stack([{"name": "web", "backend": "http://127.0.0.1:9"}])
        client = yield stack.add_client()
        for name, data in (("nothing", b""), ("truncated_preface", b"PRI * HTTP/2.0\r\n\r\nSM")):
            outcome, took = yield deferToThread(raw_exchange, stack.tunnel_port, data, False, 10.0)
            measured(f"handshake_timeout.{name}.closed_after", took)
            self.assertEqual(outcome, "closed", name)
            self.assertLess(took, 5.0, name)
        self.assertTrue(client.hub.is_connected)
        self.assertEqual(client.dial.reconnects, 0)

    @inlineCallbacks
    def test_silent_connection_to_the_grpc_entry_is_closed_too(self) -> Any:
        """The public gRPC entry closes a connection that sends no request within header_timeout."""
        stack = yield self.make_stack([{"name": "web", "backend": "http://127.0.0.1:9"}], grpc_listen="127.0.0.1:0",
                                      header_timeout=1)
        outcome, took = yield deferToThread(raw_exchange, stack.grpc_port, b"", False, 10.0)
        measured("handshake_timeout.grpc_entry.closed_after", took)
        self.assertEqual(outcome, "closed")
        self.assertLess(took, 5.0)

    @inlineCallbacks
    def test_proxy_stream_without_stream_open_is_closed(self) -> Any:
        """A Proxy call that never sends its first message is ended after the open timeout."""
        self.patch(tunnel_server, "OPEN_TIMEOUT", 0.5)
        stack = yield self.make_stack([{"name": "web", "backend": "http://127.0.0.1:9"}])
        client = yield stack.add_client()
        start = time.monotonic()
        got, status = yield deferToThread(rogue_session, stack.tunnel_port, [], TOKEN)
        measured("open_timeout.closed_after", since(start))
        self.assertEqual(status, "DEADLINE_EXCEEDED")
        self.assertLess(since(start), 5.0)
        self.assertTrue(client.hub.is_connected)
        self.assertEqual(client.dial.reconnects, 0)
        assert stack.server is not None
        self.assertEqual(len(stack.server.hub.registry), 1)
