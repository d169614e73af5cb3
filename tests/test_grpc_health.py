"""The `grpc` health check (python/fastlb/health.py) against real gRPC servers on loopback:
grpcio with grpcio-health-checking's HealthServicer (the reference grpc.health.v1 server), in
plain text (h2c) and over TLS (ALPN h2), under asyncio's loop and uvloop (what `fastlb serve`
runs); the hand-written protobuf against grpcio's own; rise/fall through the checker; and a
real `fastlb serve` taking a NOT_SERVING backend out."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fastlb._native import engine_config_error
from fastlb.config import Config, Health, parse_config
from fastlb.health import (
    BackendHealth,
    HealthChecker,
    TlsClient,
    health_check_request,
    probe,
    serving_status,
)

from conftest import FakeEngine, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on asyncio's loop, then (second run of the test) on uvloop."""
    return LOOPS[request.param]  # type: ignore[return-value]


class GrpcServer:
    """A grpcio server on 127.0.0.1 serving grpc.health.v1 (grpcio-health-checking's
    HealthServicer); `set(service, status)` changes an answer; `tls` = (key, chain) PEMs."""

    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tls is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls]))
        self.address = f"127.0.0.1:{port}"
        self.server.start()
        self.set("", SERVING)

    def set(self, service: str, status: int) -> None:
        self.health.set(service, status)

    def close(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def grpc_server(ca: trustme.CA) -> Iterator[Callable[..., GrpcServer]]:
    """`grpc_server(tls=False)` starts a server; with tls=True its certificate (from `ca`) is
    for backend.internal and 127.0.0.1."""
    started: list[GrpcServer] = []

    def start(tls: bool = False) -> GrpcServer:
        pems = None
        if tls:
            leaf = ca.issue_cert("backend.internal", "127.0.0.1")
            pems = (leaf.private_key_pem.bytes(), b"".join(b.bytes() for b in leaf.cert_chain_pems))
        s = GrpcServer(pems)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def backend(address: str, tls: TlsClient | None = None, **check: Any) -> BackendHealth:
    health_check = Health.model_validate({"type": "grpc", "interval": "2s", "timeout": "1s", **check})
    return BackendHealth("rpc", address, address, health_check, "127.0.0.1", tls)


# --- the messages, against grpcio's protobuf ----------------------------------------------------


@pytest.mark.parametrize("service", ["", "orders.v1.OrderService", "ü" * 200])
def test_request_is_what_protobuf_writes(service: str) -> None:
    message = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health_check_request(service) == b"\x00" + len(message).to_bytes(4, "big") + message


def test_reply_status_is_read_as_protobuf_wrote_it() -> None:
    for status in (0, 1, 2, 3):
        reply = health_pb2.HealthCheckResponse(status=status)
        assert serving_status(reply.SerializeToString()) == status
    # unknown fields of every wire type are skipped; the last status wins, as protobuf reads it
    extra = b"\x10\x05" + b"\x19" + b"\x00" * 8 + b"\x22\x02hi" + b"\x2d" + b"\x00" * 4
    assert serving_status(extra + b"\x08\x02" + b"\x08\x01") == 1
    assert serving_status(b"\x08\xff\xff\xff\xff\x0f") == 2**32 - 1
    for bad in (b"\x08", b"\x22\x05hi", b"\x0b", b"\x08" + b"\xff" * 11):
        with pytest.raises(ValueError):
            serving_status(bad)


# --- the check against grpcio -------------------------------------------------------------------


def test_serving_is_healthy(run, grpc_server) -> None:
    server = grpc_server()
    assert run(probe(backend(server.address))) == ""


def test_not_serving_is_unhealthy(run, grpc_server) -> None:
    server = grpc_server()
    server.set("", NOT_SERVING)
    assert run(probe(backend(server.address))) == "status NOT_SERVING"


def test_a_named_service_is_asked_about(run, grpc_server) -> None:
    server = grpc_server()
    server.set("", NOT_SERVING)  # the server as a whole is not what the check asks about
    server.set("orders.v1.OrderService", SERVING)
    server.set("billing.v1.Billing", NOT_SERVING)
    assert run(probe(backend(server.address, service="orders.v1.OrderService"))) == ""
    assert run(probe(backend(server.address, service="billing.v1.Billing"))) == "status NOT_SERVING"
    assert run(probe(backend(server.address))) == "status NOT_SERVING"


def test_an_unknown_service_is_unhealthy(run, grpc_server) -> None:
    server = grpc_server()
    result = run(probe(backend(server.address, service="no.such.Service")))
    assert result.startswith("grpc-status 5 (NOT_FOUND)"), result


def test_a_server_that_is_down_is_unhealthy(run, grpc_server) -> None:
    server = grpc_server()
    address = server.address
    assert run(probe(backend(address))) == ""
    server.close()
    start = time.monotonic()
    result = run(probe(backend(address)))
    assert result and "no answer" not in result, result  # refused at once, not a timeout
    assert time.monotonic() - start < 1.0


def test_a_server_that_never_answers_times_out(run) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        assert run(probe(backend(address, timeout="300ms"))) == "no answer within 300ms"


def test_an_http1_server_is_unhealthy(run) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = run(probe(backend(f"127.0.0.1:{httpd.server_address[1]}", timeout="500ms")))
        assert result and "no answer" not in result, result
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- over TLS: ALPN h2, verified as the https check verifies --------------------------------------


def tls_backend(tmp_path: Path, ca: trustme.CA, address: str, tls: dict[str, Any]) -> BackendHealth:
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (tmp_path / "other-ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    cfg = checker_config(tmp_path, [address], {"type": "grpc"}, tls)
    assert cfg.pools[0].tls is not None
    return backend(address, TlsClient(cfg.pools[0].tls, alpn="h2"))


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"ca": "ca.pem"}, ""),
        ({"ca": "ca.pem", "sni": "backend.internal"}, ""),
        ({"verify": False}, ""),
        ({}, "TLS: certificate not accepted"),  # the system's roots do not know the test CA
        ({"ca": "other-ca.pem"}, "TLS: certificate not accepted"),
        ({"ca": "ca.pem", "sni": "wrong.example"}, "TLS: certificate not accepted: Hostname mismatch"),
    ],
)
def test_tls_check_verifies_as_pools_tls_says(
    run, tmp_path: Path, ca: trustme.CA, grpc_server, tls: dict[str, Any], error: str
) -> None:
    server = grpc_server(tls=True)
    result = run(probe(tls_backend(tmp_path, ca, server.address, tls)))
    assert result.startswith(error) and bool(result) == bool(error), result


def test_tls_check_needs_the_backend_to_agree_to_h2(run, tmp_path: Path, ca: trustme.CA) -> None:
    """A TLS server that speaks no h2 (no ALPN answer) fails the check with that reason, at once
    (not after a timeout, though the server keeps the connection open)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                tls.recv(1024)
                done.wait(5)  # no close_notify back until the test is over
        except OSError:
            pass

    done = threading.Event()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        result = run(probe(tls_backend(tmp_path, ca, address, {"ca": "ca.pem"})))
        assert result == "TLS: the backend did not agree to h2 by ALPN (none)"
        assert time.monotonic() - start < 0.9
    finally:
        done.set()
        listener.close()
        thread.join(5)


# --- rise/fall through the checker, as for the other check types ------------------------------


def checker_config(
    folder: Path, addresses: list[str], health_check: dict[str, Any], tls: dict[str, Any] | None = None
) -> Config:
    pool: dict[str, Any] = {
        "name": "rpc",
        "http_version": "2",
        "backends": [{"address": a} for a in addresses],
        "health": {"interval": "100ms", "timeout": "100ms", "rise": 2, "fall": 2, **health_check},
    }
    if tls is not None:
        pool["tls"] = tls
    data = {
        "admin": {"bind": "off"},
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{free_port()}", "protocol": "http", "pool": "rpc"}],
        "pools": [pool],
    }
    return parse_config(data, folder)


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_grpc_check_takes_a_backend_down_and_up(
    run, tmp_path: Path, ca: trustme.CA, grpc_server, tls: bool
) -> None:
    server = grpc_server(tls=tls)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    service = "orders.v1.OrderService"
    server.set(service, SERVING)
    engine = FakeEngine(
        checker_config(
            tmp_path,
            [server.address],
            {"type": "grpc", "service": service},
            {"ca": "ca.pem"} if tls else None,
        )
    )

    async def scenario() -> None:
        checker = HealthChecker(engine)  # type: ignore[arg-type]
        checker.start()
        try:
            b = checker.backends[f"rpc/{server.address}"]
            assert (b.tls is not None) == tls and (b.tls is None or b.tls.alpn == "h2")
            async with asyncio.timeout(10):
                while b.successes < 2:
                    await asyncio.sleep(0.02)
                assert engine.flips == []
                server.set(service, NOT_SERVING)
                while engine.flips != [False]:
                    await asyncio.sleep(0.02)
                assert b.last_error == "status NOT_SERVING"
                server.set(service, SERVING)
                while engine.flips != [False, True]:
                    await asyncio.sleep(0.02)
        finally:
            await checker.stop()

    run(scenario())


# --- through a real `fastlb serve` (once the data plane has http2) ----------------------------


def _native_has_http2(folder: Path) -> bool:
    spec = checker_config(folder, ["127.0.0.1:9"], {"type": "grpc"}).to_engine()
    error = engine_config_error(json.dumps(spec)) or ""
    return "unknown field `http2`" not in error and "unknown field `http_version`" not in error


def test_fastlb_takes_a_not_serving_backend_out(tmp_path: Path, grpc_server, fastlb) -> None:
    if not _native_has_http2(tmp_path):
        pytest.skip("this native build predates HTTP/2 (issue 13)")
    well, sick = grpc_server(), grpc_server()
    sick.set("", NOT_SERVING)
    port = free_port()
    proc = fastlb(
        f"""
[runtime]
workers = 1
[admin]
bind = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
pool = "rpc"
[[pools]]
name = "rpc"
http_version = "2"
backends = [{{ address = "{well.address}" }}, {{ address = "{sick.address}" }}]
health = {{ type = "grpc", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }}
""",
        port,
    )
    time.sleep(1.2)  # fall (2) x interval (200 ms) + timeout, with room for a slow machine
    code, err = proc.stop()
    assert code == 0, err
    assert f"backend rpc/{sick.address} is down (2 checks failed: status NOT_SERVING)" in err, err
    assert f"rpc/{well.address} is down" not in err
