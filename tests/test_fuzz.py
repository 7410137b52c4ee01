"""Random and mutated TunnelMessage sequences never break a session or leak its table."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.session_pair import grpc_head, http_head, http_response_head, opened
from tunneld import tunnel_pb2 as pb
from tunneld.session import Role, Session, State

IDS = st.sampled_from(["", "a", "b", "c", "d"])
PAYLOADS = st.sampled_from([
    "http_request", "http_response", "grpc_request", "grpc_response", "ws_request", "ws_response", "ws_frame",
    "config_sync", "config_sync_response", "stream_open", "stream_open_response", "error_message", "heartbeat",
    "window_update", None,
])


@st.composite
def messages(draw: Any) -> pb.TunnelMessage:
    """Any TunnelMessage shape, plausible or not."""
    msg = pb.TunnelMessage(
        request_id=draw(IDS),
        direction=draw(st.sampled_from([0, 1, 2, 7])),
        protocol_type=draw(st.sampled_from([0, 1, 2, 3, 4, 9])),
        window_limited=draw(st.booleans()),
    )
    kind = draw(PAYLOADS)
    flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    body = draw(st.binary(max_size=70 * 1024))
    if kind in ("http_request", "http_response", "grpc_request", "grpc_response"):
        part = getattr(msg, kind)
        part.body = body
        part.is_first_chunk, part.is_last_chunk = flags[0], flags[1]
    elif kind == "ws_frame":
        msg.ws_frame.CopyFrom(pb.WebSocketFrame(opcode=draw(st.sampled_from([0, 1, 2, 8, 9])), fin=flags[0],
                                                payload=body[:1024], close_code=draw(st.integers(0, 70000))))
    elif kind == "ws_response":
        msg.ws_response.CopyFrom(pb.WebSocketResponse(accepted=flags[0], status_code=101))
    elif kind == "ws_request":
        msg.ws_request.CopyFrom(pb.WebSocketRequest(url="/"))
    elif kind == "window_update":
        msg.window_update.increment = draw(st.integers(0, 2**32 - 1))
        msg.window_update.grow = draw(st.sampled_from([0, 0, 1, 65536, 2**30, 2**32 - 1]))
    elif kind == "error_message":
        msg.error_message.code = draw(st.integers(-5, 1000))
    elif kind == "heartbeat":
        msg.heartbeat.ack = flags[0]
    elif kind is not None:
        getattr(msg, kind).SetInParent()
    return msg


def drain(session: Session) -> None:
    session.take_events()
    session.take_outgoing()
    session.check_invariants()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


class SessionFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(st.lists(messages(), max_size=25), st.sampled_from([Role.CLIENT, Role.SERVER]))
    def test_random_sequences_to_a_fresh_session(self, sequence: list[pb.TunnelMessage], role: Role) -> None:
        """A fresh session of either role survives any message sequence; fail_all leaves its table empty."""
        session = Session(role, window=65536, max_window=1 << 20, window_budget=2 << 20)
        if role is Role.CLIENT:
            session.open(pb.StreamOpenRequest(client_id="c", group="g", stream_id="s"))
        for msg in sequence:
            session.receive(msg)
            drain(session)
        session.fail_all("end of test")
        drain(session)
        self.assertEqual(len(session), 0)

    @FUZZ
    @given(st.lists(messages(), max_size=25), st.lists(messages(), max_size=25))
    def test_mutated_traffic_on_an_open_pair(self, to_client: list[pb.TunnelMessage],
                                             to_server: list[pb.TunnelMessage]) -> None:
        """Garbage mixed into real traffic of an open pair never raises, and every table empties."""
        pair = opened(max_window=1 << 20, window_budget=2 << 20)
        head = http_head(end=False)
        head.request_id = "a"            # ids the random messages use too
        rid = pair.server.start(head)
        call = grpc_head(body=b"x")
        call.request_id = "b"
        pair.server.start(call)
        pair.pump()
        for a, b in zip(to_client, to_server):
            pair.client.receive(a)
            pair.server.receive(b)
            pair.pump()
        if rid in pair.client:
            pair.client.send(rid, http_response_head(200, end=True))
        pair.server.send_body(rid, b"tail", end=True) if rid in pair.server else None
        pair.pump()
        for session in (pair.server, pair.client):
            session.fail_all("end of test")
            drain(session)
            self.assertEqual(len(session), 0)
        self.assertIn(pair.server.state, (State.OPEN, State.CLOSED))

    @FUZZ
    @given(st.binary(max_size=4096))
    def test_undecodable_bytes_never_reach_the_session(self, data: bytes) -> None:
        """Bytes that do not parse as a TunnelMessage fail in protobuf, before any session sees them."""
        try:
            msg = pb.TunnelMessage.FromString(data)
        except Exception:
            return
        session = Session(Role.SERVER)
        session.receive(msg)
        drain(session)
        session.fail_all("end")
        self.assertEqual(len(session), 0)
