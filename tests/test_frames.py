"""Frames (wire v2): packing, order, size limits, and the writer that never waits."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tunneld import tunnel_pb2 as pb
from tunneld.frames import FramePacker, decode, encode, frame_of
from tunneld.grpc_bridge.stream import StreamHandle


def body(rid: str, n: int) -> pb.TunnelMessage:
    return pb.TunnelMessage(request_id=rid, http_response=pb.HttpResponse(body=b"x" * n))


class PackerTests(SynchronousTestCase):
    def test_frame_bytes_parse_as_a_tunnel_frame_in_order(self) -> None:
        """A frame built from encoded pieces is exactly TunnelFrame(messages=...) on the wire, order kept."""
        msgs = [body(f"r{i}", i * 10) for i in range(5)]
        data = frame_of(msgs)
        self.assertEqual(data, pb.TunnelFrame(messages=msgs).SerializeToString())
        self.assertEqual([m.request_id for m in decode(data)], [f"r{i}" for i in range(5)])
        big = body("big", 300_000)  # a length that needs a three-byte varint
        self.assertEqual(decode(encode(big))[0], big)

    def test_packs_everything_waiting(self) -> None:
        """One pack takes every waiting message while the frame stays within max_frame_size."""
        q: deque[object] = deque(body(f"r{i}", 100) for i in range(10))
        packer = FramePacker(q, 1024 * 1024)
        self.assertEqual(len(decode(packer.pack())), 10)
        self.assertFalse(packer.waiting())
        self.assertEqual(packer.pack(), b"")

    def test_frames_are_bounded_and_order_holds(self) -> None:
        """Messages that would overflow a frame go in the next one, in order, each encoded once."""
        q: deque[object] = deque(body(f"r{i}", 400) for i in range(10))
        packer = FramePacker(q, 1024)
        seen: list[str] = []
        while packer.waiting():
            frame = packer.pack()
            self.assertLessEqual(len(frame), 1024)
            seen.extend(m.request_id for m in decode(frame))
        self.assertEqual(seen, [f"r{i}" for i in range(10)])
        self.assertEqual(packer.frames, 5)

    def test_a_message_larger_than_the_frame_travels_alone(self) -> None:
        """A single message above max_frame_size is its own frame, between its neighbours."""
        q: deque[object] = deque([body("a", 10), body("huge", 5000), body("b", 10)])
        packer = FramePacker(q, 1024)
        frames = []
        while packer.waiting():
            frames.append([m.request_id for m in decode(packer.pack())])
        self.assertEqual(frames, [["a"], ["huge"], ["b"]])

    def test_stops_at_the_end_marker(self) -> None:
        """The end marker closes the queue: what came before it is packed, nothing after."""
        end = object()
        q: deque[object] = deque([body("a", 1), end, body("late", 1)])
        packer = FramePacker(q, 1024, stop=end)
        self.assertEqual([m.request_id for m in decode(packer.pack())], ["a"])
        self.assertTrue(packer.ended)
        self.assertFalse(packer.waiting())


class _LoopBridge:
    """The two Bridge calls a StreamHandle makes, on one asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.delivered: list[Any] = []

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon(fn, *args)

    def to_reactor(self, fn: Any, *args: Any) -> None:
        fn(*args)


class WriterTests(SynchronousTestCase):
    def test_a_lone_message_goes_out_at_once_and_later_ones_batch(self) -> None:
        """The writer sends a lone message at once; what queues during that write goes out as one frame."""

        async def scenario() -> list[list[str]]:
            loop = asyncio.get_running_loop()
            handle = StreamHandle(_LoopBridge(loop), max_frame_size=1024 * 1024)  # type: ignore[arg-type]
            frames: list[list[str]] = []
            release = asyncio.Event()

            async def write(data: bytes) -> None:
                frames.append([m.request_id for m in decode(data)])
                if len(frames) == 1:
                    await release.wait()  # the first write is "in flight"

            writer = loop.create_task(handle.run_writer(write))
            handle.send([body("first", 10)])
            for _ in range(5):
                await asyncio.sleep(0)
            self.assertEqual(frames, [["first"]])  # no waiting for company
            handle.send([body("a", 10)])
            handle.send([body("b", 10), body("c", 10)])
            for _ in range(5):
                await asyncio.sleep(0)
            self.assertEqual(len(frames), 1)  # still in the first write
            release.set()
            handle.close()
            await asyncio.wait_for(writer, 5)
            return frames

        frames = asyncio.run(scenario())
        self.assertEqual(frames, [["first"], ["a", "b", "c"]])

    def test_inbound_frame_delivers_each_message_and_ignores_empty_frames(self) -> None:
        """A frame's messages reach on_message one by one, in order; an empty frame delivers nothing."""
        handle = StreamHandle(_LoopBridge(None))  # type: ignore[arg-type]
        got: list[str] = []
        handle.on_message = lambda m: got.append(m.request_id)
        handle.reader_delivered(pb.TunnelFrame().messages)
        handle.reader_delivered(pb.TunnelFrame(messages=[body("x", 1), body("y", 1)]).messages)
        self.assertEqual(got, ["x", "y"])


def client_heartbeat(sent_at_ms: int = 5, **fields: Any) -> pb.TunnelMessage:
    return pb.TunnelMessage(**{"direction": pb.CLIENT_TO_SERVER, "protocol_type": pb.CONTROL,
                               "heartbeat": pb.Heartbeat(sent_at_ms=sent_at_ms), **fields})


class BridgeHeartbeatTests(SynchronousTestCase):
    """Server side: lone client heartbeats are answered in the bridge thread once ``answer_heartbeats`` is set."""

    def handle(self) -> tuple[StreamHandle, list[pb.TunnelMessage], list[str]]:
        handle = StreamHandle(_LoopBridge(None))  # type: ignore[arg-type]
        delivered: list[pb.TunnelMessage] = []
        heard: list[str] = []
        handle.on_message = delivered.append
        handle.on_heard = lambda: heard.append("heard")
        return handle, delivered, heard

    def test_lone_heartbeat_answered_without_the_session(self) -> None:
        """The ack is queued at once (what the session would send) and the reactor only hears of it."""

        async def scenario() -> tuple[list[list[pb.TunnelMessage]], list[pb.TunnelMessage], list[str]]:
            handle, delivered, heard = self.handle()
            frames: list[list[pb.TunnelMessage]] = []

            async def write(data: bytes) -> None:
                frames.append(decode(data))

            handle.answer_heartbeats = True
            writer = asyncio.get_running_loop().create_task(handle.run_writer(write))
            await asyncio.sleep(0)
            handle.reader_delivered(pb.TunnelFrame(messages=[client_heartbeat(1234)]).messages)
            for _ in range(5):
                await asyncio.sleep(0)
            handle.stop_writer()
            await asyncio.wait_for(writer, 5)
            self.assertEqual(handle.heartbeats_answered, 1)
            return frames, delivered, heard

        frames, delivered, heard = asyncio.run(scenario())
        self.assertEqual(frames, [[pb.TunnelMessage(direction=pb.SERVER_TO_CLIENT, protocol_type=pb.CONTROL,
                                                    heartbeat=pb.Heartbeat(sent_at_ms=1234, ack=True))]])
        self.assertEqual(delivered, [])
        self.assertEqual(heard, ["heard"])

    def test_everything_else_goes_to_the_session(self) -> None:
        """Off by default; acks, misdirected heartbeats and heartbeats sharing a frame are delivered as usual."""
        handle, delivered, heard = self.handle()
        handle.reader_delivered([client_heartbeat(1)])            # not open yet: flag off
        handle.answer_heartbeats = True
        ack = client_heartbeat(2)
        ack.heartbeat.ack = True
        wrong = client_heartbeat(3, direction=pb.SERVER_TO_CLIENT)
        for frame in ([ack], [wrong], [client_heartbeat(4), body("r", 1)]):
            handle.reader_delivered(frame)
        self.assertEqual([m.heartbeat.sent_at_ms for m in delivered if m.HasField("heartbeat")], [1, 2, 3, 4])
        self.assertEqual(len(delivered), 5)
        self.assertEqual(heard, [])
        self.assertEqual(handle.heartbeats_answered, 0)
        self.assertEqual(len(handle._out), 0)

    def test_heard_after_loss_is_not_reported(self) -> None:
        """A heartbeat answered just before the stream ended reports nothing after on_lost."""
        handle, _, heard = self.handle()
        handle.answer_heartbeats = True
        handle.reader_lost("gone")
        handle.reader_delivered([client_heartbeat()])
        self.assertEqual(heard, [])
