"""The gRPC entry's bridge half when the caller's call breaks under a write (no sockets, a fake context)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc._cython import cygrpc
from twisted.trial.unittest import SynchronousTestCase

from tunneld import tunnel_pb2 as pb
from tunneld.grpc_bridge.entry import _EntryCall


class _Bridge:
    """Records the calls the bridge half sends to the reactor."""

    def __init__(self) -> None:
        self.to_reactor_calls: list[tuple[str, tuple[Any, ...]]] = []

    def to_reactor(self, fn: Any, *args: Any) -> None:
        self.to_reactor_calls.append((fn.__name__, args))


class _Entry:
    def __init__(self) -> None:
        self.bridge = _Bridge()


class _Context:
    """A caller that sent one message and half-closed; ``write`` fails as grpc's does on a dead call."""

    def __init__(self, write_error: Exception) -> None:
        self.write_error = write_error
        self.reads = [b"request", grpc.aio.EOF]

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    def done(self) -> bool:
        return False  # grpc has not marked the call done yet: the race seen under a caller's cancel

    async def read(self) -> Any:
        if self.reads:
            return self.reads.pop(0)
        await asyncio.Event().wait()

    async def write(self, message: bytes) -> None:
        raise self.write_error

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass


def _run(write_error: Exception) -> list[tuple[str, tuple[Any, ...]]]:
    entry = _Entry()

    async def scenario() -> None:
        call = _EntryCall(entry, _Context(write_error), "bench.Raw", "Count")  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(call.run())
        for _ in range(100):  # until the head went to the reactor (bounded)
            if call.started:
                break
            await asyncio.sleep(0)
        call.inbox.put_nowait(pb.GrpcResponse(is_first_chunk=True, has_message=True, body=b"x"))
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    return entry.bridge.to_reactor_calls


class WriteOnBrokenCallTests(SynchronousTestCase):
    def test_batch_error_under_a_write_is_the_caller_gone(self) -> None:
        """grpc's ExecuteBatchError from ``context.write`` ends the call as CANCELLED, with no failure warning."""
        calls = _run(cygrpc.ExecuteBatchError('Failed "execute_batch": (SendMessageOperation,)'))
        names = [name for name, _ in calls]
        self.assertNotIn("failed", names)
        self.assertEqual(names[-1], "caller_gone")
        self.assertEqual(calls[-1][1][2], "CANCELLED")

    def test_other_errors_are_still_reported(self) -> None:
        """Anything else breaking the relay is a bug worth its warning line (and the call still ends)."""
        calls = _run(ValueError("a bug"))
        names = [name for name, _ in calls]
        self.assertIn("failed", names)
        self.assertEqual(names[-1], "caller_gone")
