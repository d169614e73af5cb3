"""Active health checks: rise/fall state, pushed to the running data plane; https checks
against a real TLS server."""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from httpbackend import HttpBackend

from fastlb.config import Config, Health, parse_config
from fastlb.health import BackendHealth, HealthChecker, TlsClient, probe

from backends import says_name
from conftest import FakeEngine, free_port


def test_fall_then_rise_flip_only_at_the_thresholds() -> None:
    b = BackendHealth("app", "a:1", "127.0.0.1:1", Health(rise=2, fall=3), "a")
    assert [b.record(False, "refused") for _ in range(4)] == [None, None, False, None]
    assert not b.up and b.last_error == "refused"
    assert [b.record(True) for _ in range(3)] == [None, True, None]
    assert b.up
    # a success between failures resets the count
    assert [b.record(ok) for ok in (False, False, True, False, False)] == [None] * 5
    assert b.up


def config(port: int, addresses: list[str]) -> str:
    backends = ", ".join(f'{{ address = "{a}" }}' for a in addresses)
    return f"""
[runtime]
workers = 1
[admin]
bind = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
pool = "app"
[[pools]]
name = "app"
backends = [{backends}]
health = {{ type = "http", path = "/health", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }}
"""


def served_by(port: int, n: int) -> list[str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    names = []
    for _ in range(n):
        c.request("GET", "/")
        r = c.getresponse()
        names.append(f"{r.status} {r.read().decode()}")
    c.close()
    return names


def regular(b: HttpBackend) -> int:
    """Requests that were not health checks."""
    return sum(1 for r in b.received if r.header("user-agent") != "fastlb-health")


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_failing_http_check_takes_a_backend_out_and_passing_brings_it_back(hb, fastlb):
    sick, well = hb("sick", status_override=503), hb("well")
    port = free_port()
    fastlb(config(port, [sick.address, well.address]), port)
    assert wait_until(lambda: len([r for r in sick.received if r.path == "/health"]) >= 2)
    checks = [r for r in sick.received if r.path == "/health"]
    assert checks[0].header("host") == "127.0.0.1" and checks[0].method == "GET"
    time.sleep(0.3)  # the second failed check has been pushed to the engine
    before = regular(sick)
    assert served_by(port, 20) == ["200 well"] * 20
    assert regular(sick) == before, "a backend marked down still got requests"

    sick.status_override = None  # healthy again: back after `rise` passing checks
    assert wait_until(lambda: "200 sick" in served_by(port, 4)), "never back in rotation"


def test_tcp_check_marks_a_closed_backend_down_and_logs_it(backends, fastlb):
    gone, stays = backends(says_name, "gone"), backends(says_name, "stays")
    port = free_port()
    cfg = config(port, [gone.address, stays.address]).replace('protocol = "http"', 'protocol = "tcp"')
    cfg = cfg.replace('type = "http", path = "/health", ', 'type = "tcp", ')
    proc = fastlb(cfg, port)
    gone.close()
    time.sleep(1.2)  # fall (2) x interval (200 ms) + timeout, with room for a slow machine
    code, err = proc.stop()
    assert code == 0, err
    assert f"backend app/{gone.address} is down (2 checks failed" in err, err
    assert f"app/{stays.address} is down" not in err


def test_ejected_backend_is_held_down_then_needs_rise_checks() -> None:
    b = BackendHealth("app", "a:1", "127.0.0.1:1", Health(rise=2, fall=3), "a")
    b.eject()
    assert not b.up and b.last_error == "ejected by passive detection"
    # passing checks during the ejection (held) do not count, not even toward rise
    assert [b.record(True, held=True) for _ in range(5)] == [None] * 5
    assert [b.record(True, held=True), b.record(True)] == [None, None]
    assert not b.up
    # after it, `rise` passing checks bring it back
    assert b.record(True) is True
    assert b.up


# --- https checks: the checker against a real TLS server on loopback ------------------------------


class TlsServer:
    """An HTTPS server on 127.0.0.1 (http.server over ssl) answering GET with `status`; with
    `client_ca` it requires a client certificate. Records each request's path and Host, and
    the SNI it was sent."""

    def __init__(self, cert: trustme.LeafCert, client_ca: trustme.CA | None = None) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.sni: list[str | None] = []
        ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment,misc,return-value]
        self.status = 200
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("host", "")))
                self.send_response(server.status)
                self.send_header("Content-Length", "2")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.handle_error = lambda *args: None  # type: ignore[method-assign]  # failed handshakes
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[Callable[..., TlsServer]]:
    started: list[TlsServer] = []

    def start(client_ca: trustme.CA | None = None) -> TlsServer:
        s = TlsServer(ca.issue_cert("backend.internal", "127.0.0.1"), client_ca)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def https_config(tmp_path: Path, address: str, tls: dict[str, Any] | None) -> Config:
    pool: dict[str, Any] = {
        "name": "app",
        "backends": [{"address": address}],
        "health": {
            "type": "https",
            "path": "/health",
            "interval": "200ms",
            "timeout": "200ms",
            "rise": 2,
            "fall": 2,
        },
    }
    if tls is not None:
        pool["tls"] = tls
    data = {
        "admin": {"bind": "off"},
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{free_port()}", "protocol": "http", "pool": "app"}],
        "pools": [pool],
    }
    return parse_config(data, tmp_path)


def one_probe(cfg: Config) -> str:
    pool = cfg.pools[0]
    backend = pool.backends[0]
    b = BackendHealth(
        pool.name, backend.address, backend.address, pool.health, "127.0.0.1", TlsClient(pool.tls)
    )
    return asyncio.run(probe(b))


def test_https_check_marks_a_backend_down_and_up(tmp_path: Path, ca: trustme.CA, tls_server) -> None:
    server = tls_server()
    server.status = 503
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    engine = FakeEngine(https_config(tmp_path, server.address, {"ca": "ca.pem"}))

    async def run() -> None:
        checker = HealthChecker(engine)  # type: ignore[arg-type]
        checker.start()
        try:
            async with asyncio.timeout(10):
                while engine.flips != [False]:
                    await asyncio.sleep(0.05)
                [b] = checker.backends.values()
                assert b.last_error == "status 503"
                server.status = 200
                while engine.flips != [False, True]:
                    await asyncio.sleep(0.05)
        finally:
            await checker.stop()

    asyncio.run(run())
    assert ("/health", "127.0.0.1") in server.requests
    assert set(server.sni) == {None}  # the backend host is an IP address: no SNI, the IP is checked


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"ca": "ca.pem"}, ""),
        ({"ca": "ca.pem", "sni": "backend.internal"}, ""),
        ({"verify": False}, ""),
        ({"verify": False, "sni": "anything.example"}, ""),
        (None, "TLS: certificate not accepted"),  # the system's roots do not know the test CA
        ({}, "TLS: certificate not accepted"),
        ({"ca": "other-ca.pem"}, "TLS: certificate not accepted"),
        ({"ca": "ca.pem", "sni": "wrong.example"}, "TLS: certificate not accepted: Hostname mismatch"),
    ],
)
def test_https_check_verifies_as_pools_tls_says(
    tmp_path: Path, ca: trustme.CA, tls_server, tls: dict[str, Any] | None, error: str
) -> None:
    server = tls_server()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (tmp_path / "other-ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    result = one_probe(https_config(tmp_path, server.address, tls))
    assert result.startswith(error) and bool(result) == bool(error), result
    if not error:
        assert server.requests == [("/health", "127.0.0.1")]
        assert server.sni == [(tls or {}).get("sni")]


def test_https_check_presents_the_client_certificate(tmp_path: Path, ca: trustme.CA, tls_server) -> None:
    clients = trustme.CA()
    server = tls_server(client_ca=clients)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    lb = clients.issue_cert("lb.internal")
    (tmp_path / "lb.pem").write_bytes(lb.cert_chain_pems[0].bytes())
    (tmp_path / "lb.key").write_bytes(lb.private_key_pem.bytes())
    assert (
        one_probe(https_config(tmp_path, server.address, {"ca": "ca.pem", "cert": "lb.pem", "key": "lb.key"}))
        == ""
    )
    assert server.requests == [("/health", "127.0.0.1")]
    assert one_probe(https_config(tmp_path, server.address, {"ca": "ca.pem"})) != ""
    assert len(server.requests) == 1, "a check without the client certificate got an answer"
