"""gRPC backends for the loopback tests: real third-party services and a raw-bytes one.

``GrpcBackend`` is a sync ``grpc.server`` with a thread pool on 127.0.0.1:0
serving

* ``grpc.health.v1.Health`` (grpcio-health-checking: ``Check`` unary,
  ``Watch`` server-streaming; ``health.set(...)`` changes a status mid-watch),
* ``grpc.reflection.v1alpha.ServerReflection`` (grpcio-reflection, bidi),
* ``tunneld.test.Raw``, a generic handler over raw bytes (no protobuf), whose
  methods show one thing each: ``Echo`` (metadata back as initial metadata,
  trailers incl. ``-bin``), ``Sum`` (client-streaming), ``Chat`` (bidi
  ping-pong), ``Greet`` (bidi, the server speaks first), ``Gated``
  (client-streaming that reads nothing until ``raw.gate`` is set),
  ``Count`` (server-streaming), ``Deny`` (an error with details
  and trailers), ``Big`` (a big message each way), ``Block`` (waits until the
  call ends and records whether it was cancelled).

Stop it with ``stop()`` (the tests do so in cleanup).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from concurrent import futures
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

RAW_SERVICE = "tunneld.test.Raw"
MAX_MESSAGE = 8 * 1024 * 1024


class RawService:
    """The raw-bytes test service; counters are read by the tests (any thread)."""

    def __init__(self) -> None:
        self.block_started = 0
        self.block_ended: list[bool] = []  # True when the call was cancelled (deadline or caller)
        self.block_deadlines: list[float | None] = []  # the backend's time_remaining() as each call began
        self.lock = threading.Lock()
        self.gate = threading.Event()  # Gated waits for it before reading its requests

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        sent = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-") or k == "authorization"]
        context.send_initial_metadata(sent)
        context.set_trailing_metadata((("x-trailer", "done"), ("x-trailer-bin", b"\x00\xfe\xff")))
        return request

    def sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return struct.pack("!QQ", count, total)

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield b"re: " + message

    def greet(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"ready"  # before any request message: the caller waits for it
        for message in requests:
            yield b"re: " + message

    def gated(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        if not self.gate.wait(60):
            raise AssertionError("the test never opened the gate")
        return self.sum(requests, context)

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        n, size = struct.unpack("!II", request)
        for i in range(n):
            yield struct.pack("!I", i) + b"x" * max(0, size - 4)

    def deny(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-reason", "policy"), ("x-reason-bin", b"\x01\x02")))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you: " + request.decode())
        raise AssertionError("abort returned")

    def big(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        # Answer: sha256 of what arrived, then as many bytes again.
        return hashlib.sha256(request).digest() + bytes(len(request))

    def block(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        ended = threading.Event()
        context.add_callback(ended.set)
        with self.lock:
            self.block_started += 1
            self.block_deadlines.append(context.time_remaining())
        ended.wait(60)
        with self.lock:
            self.block_ended.append(not context.is_active() and ended.is_set())
        return b""

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(RAW_SERVICE, {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Greet": grpc.stream_stream_rpc_method_handler(self.greet),
            "Gated": grpc.stream_unary_rpc_method_handler(self.gated),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Deny": grpc.unary_unary_rpc_method_handler(self.deny),
            "Big": grpc.unary_unary_rpc_method_handler(self.big),
            "Block": grpc.unary_unary_rpc_method_handler(self.block),
        })


class GrpcBackend:
    """A real grpc server with the services above on an ephemeral loopback port."""

    def __init__(self, workers: int = 16, tls: tuple[bytes, bytes] | None = None) -> None:
        self.raw = RawService()
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((self.raw.handler(),))
        names = (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME, RAW_SERVICE)
        reflection.enable_server_reflection(names, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:   # (key PEM, certificate chain PEM): a grpcs:// backend
            self.port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls]))
        self.tls = tls is not None
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    @property
    def url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://127.0.0.1:{self.port}"

    def stop(self) -> Any:
        self.health.enter_graceful_shutdown()
        self.server.stop(0).wait(10)
