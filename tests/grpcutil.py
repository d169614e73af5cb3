"""Real gRPC backends for the HTTP/2 tests: grpcio servers on loopback, each in its own thread pool.

No generated code: one generic service, `fastlb.test.Echo`, whose messages are raw bytes (a
handler without (de)serializers gets and returns `bytes`). Methods:

    Unary       unary-unary: the request, echoed
    Whoami      unary-unary: JSON {"name", "metadata": [[key, value], ...] (text keys only), "peer"}
    Stream      server streaming: the request is b"COUNT:SIZE"; COUNT messages of SIZE bytes, each
                starting with its index (8 decimal digits)
    Sum         client streaming: JSON {"count", "bytes", "sha256"} of all messages received
    Bidi        bidi streaming: each message echoed as it arrives
    Sleep       unary: the request is b"MS:TAG"; answers b"slept" after MS ms, unless the call is
                cancelled first (then `ended(TAG)` is set)
    Forever     server streaming: the request is b"TAG"; a message every 10 ms until the call is
                cancelled (then `ended(TAG)` is set)
    Fail        unary: the request is JSON {"code", "details", "initial", "trailing"}; the call ends
                with that status code, details and metadata (`*-bin` values are latin-1 text)

Each backend also serves grpc.health.v1.Health (grpcio-health-checking's servicer), "" and
`fastlb.test.Echo` SERVING until `set_serving` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "fastlb.test.Echo"
MAX_MESSAGE = 64 << 20  # the 4 MiB tests need more than grpcio's 4 MiB receive default
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
# No proxy from the environment, no transparent retries: what the test sees is fastlb's doing.
CLIENT_OPTIONS = [*OPTIONS, ("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]

__all__ = ["SERVICE", "Client", "GrpcBackend", "channel", "method"]


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def status_code(n: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == n)


class GrpcBackend:
    """A grpcio server on 127.0.0.1 (h2c, or TLS with ALPN h2 when `tls` = (key PEM, chain PEM))."""

    def __init__(self, name: str = "", tls: tuple[bytes, bytes] | None = None, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # method name -> calls that reached a handler
        self.metadata: list[list[tuple[str, str]]] = []  # Whoami's invocation metadata, per call
        self._ended: dict[str, threading.Event] = {}
        self.pool = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix=f"grpc-{name}")
        # so_reuseport off: a port this test did not mean to share is refused, not shared
        self.server = grpc.server(self.pool, options=[*OPTIONS, ("grpc.so_reuseport", 0)])
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        handlers = {
            "Unary": unary(self._counted("Unary", lambda req, ctx: req)),
            "Whoami": unary(self._counted("Whoami", self._whoami)),
            "Stream": stream(self._counted("Stream", self._stream)),
            "Sum": grpc.stream_unary_rpc_method_handler(self._counted("Sum", self._sum)),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._counted("Bidi", self._bidi)),
            "Sleep": unary(self._counted("Sleep", self._sleep)),
            "Forever": stream(self._counted("Forever", self._forever)),
            "Fail": unary(self._counted("Fail", self._fail)),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in ("", SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if tls is None:
            self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            creds = grpc.ssl_server_credentials([tls])
            self.port = self.server.add_secure_port(f"127.0.0.1:{port}", creds)
        assert self.port, f"grpc backend {name!r} could not bind 127.0.0.1:{port}"
        self.address = f"127.0.0.1:{self.port}"
        self.name = name or self.address
        self.server.start()

    # --- what tests read and set -------------------------------------------------------------

    def count(self, name: str) -> int:
        with self.lock:
            return self.calls[name]

    def ended(self, tag: str) -> threading.Event:
        """Set when the Sleep or Forever call tagged `tag` was cancelled (by its client, by fastlb
        resetting the stream, or by the deadline it carried)."""
        with self.lock:
            return self._ended.setdefault(tag, threading.Event())

    def set_serving(self, serving: bool, service: str = "") -> None:
        status = health_pb2.HealthCheckResponse
        self.health.set(service, status.SERVING if serving else status.NOT_SERVING)

    def close(self) -> None:
        self.server.stop(grace=None).wait(5)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- handlers ---------------------------------------------------------------------------

    def _counted(self, name: str, fn: Any) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            with self.lock:
                self.calls[name] += 1
            return fn(request, context)

        return handler

    def _whoami(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = [(k, v) for k, v in context.invocation_metadata() if isinstance(v, str)]
        with self.lock:
            self.metadata.append(md)
        return json.dumps({"name": self.name, "metadata": md, "peer": context.peer()}).encode()

    @staticmethod
    def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, _, size = request.decode().partition(":")
        filler = b"x" * max(0, int(size) - 8)
        for i in range(int(count)):
            yield f"{i:08d}".encode() + filler

    @staticmethod
    def _sum(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        digest, count, total = hashlib.sha256(), 0, 0
        for m in requests:
            digest.update(m)
            count += 1
            total += len(m)
        return json.dumps({"count": count, "bytes": total, "sha256": digest.hexdigest()}).encode()

    @staticmethod
    def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    def _sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        ms, _, tag = request.decode().partition(":")
        end = time.monotonic() + int(ms) / 1000
        while time.monotonic() < end:
            if not context.is_active():
                self.ended(tag).set()
                return b""
            time.sleep(0.01)
        return b"slept"

    def _forever(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        # Runs when the call ends; a Forever call only ends by being cancelled.
        context.add_callback(self.ended(request.decode()).set)
        i = 0
        while context.is_active():
            yield f"{i:08d}".encode()
            i += 1
            time.sleep(0.01)
        self.ended(request.decode()).set()

    @staticmethod
    def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        spec = json.loads(request)

        def md(pairs: list[list[str]]) -> tuple[tuple[str, str | bytes], ...]:
            return tuple((k, v.encode("latin-1") if k.endswith("-bin") else v) for k, v in pairs)

        if spec.get("initial"):
            context.send_initial_metadata(md(spec["initial"]))
        context.set_trailing_metadata(md(spec.get("trailing", [])))
        context.set_code(status_code(spec["code"]))
        if spec.get("details") is not None:
            context.set_details(spec["details"])
        return b"fail-body"


# --- clients -------------------------------------------------------------------------------------


def channel(
    port: int, ca: bytes | None = None, server_name: str = "site.test", host: str = "127.0.0.1"
) -> grpc.Channel:
    """A channel to host:port: h2c, or TLS verified against `ca` for `server_name`."""
    target = f"{host}:{port}"
    if ca is None:
        return grpc.insecure_channel(target, options=CLIENT_OPTIONS)
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(target, creds, options=options)


class Client:
    """The Echo methods on one channel (each call an HTTP/2 stream on the channel's connection)."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.channel = ch
        self.unary = ch.unary_unary(method("Unary"))
        self.whoami = ch.unary_unary(method("Whoami"))
        self.stream = ch.unary_stream(method("Stream"))
        self.sum = ch.stream_unary(method("Sum"))
        self.bidi = ch.stream_stream(method("Bidi"))
        self.sleep = ch.unary_unary(method("Sleep"))
        self.forever = ch.unary_stream(method("Forever"))
        self.fail = ch.unary_unary(method("Fail"))
        self.health = health_pb2_grpc.HealthStub(ch)

    def check(self, service: str = "", timeout: float = 5) -> int:
        """grpc.health.v1.Health/Check: the status number (1 SERVING, 2 NOT_SERVING)."""
        req = health_pb2.HealthCheckRequest(service=service)
        return int(self.health.Check(req, timeout=timeout).status)

    def name(self, timeout: float = 5, metadata: tuple[tuple[str, str], ...] = ()) -> str:
        return str(json.loads(self.whoami(b"", timeout=timeout, metadata=metadata))["name"])

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
