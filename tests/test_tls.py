"""TLS through a real `fastlb serve`: https termination (SNI, ALPN, resumption across workers,
mTLS, min_version), tls listeners relaying to TCP, SNI passthrough, re-encryption to TLS
backends, redirects, certificate reload and the handshake metric.

Certificates are made at test time (trustme); clients are openssl s_client, curl and Python's
ssl module; backends are real sockets on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from conftest import free_port, wait_until

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")


# --- certificates and configs ------------------------------------------------------------------


class Certs:
    """A CA and the files of the certificates it issued, in the config's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def issue(self, stem: str, *names: str, ca: trustme.CA | None = None) -> dict[str, str]:
        cert = (ca or self.ca).issue_cert(*names)
        chain = self.folder / f"{stem}.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.folder / f"{stem}.key"))
        return {"cert": f"{stem}.pem", "key": f"{stem}.key"}

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        return ctx

    def server_context(self, stem: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.folder / f"{stem}.pem"), str(self.folder / f"{stem}.key"))
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def listener(
    name: str, port: int, protocol: str, pool: str, tls: dict[str, Any] | None = None, **kw: Any
) -> str:
    lines = ["[[listeners]]", f"name = {toml(name)}", f'bind = "127.0.0.1:{port}"']
    lines += [f"protocol = {toml(protocol)}", f"pool = {toml(pool)}"]
    routes = kw.pop("routes", [])
    lines += [f"{k} = {toml(v)}" for k, v in kw.items()]
    if tls is not None:
        lines.append("  [listeners.tls]")
        lines += [
            f"  {k} = {toml(v) if not isinstance(v, list) else '[' + ', '.join(map(toml, v)) + ']'}"
            for k, v in tls.items()
        ]
    for r in routes:
        lines.append("  [[listeners.routes]]")
        lines += [f"  {k} = {toml(v)}" for k, v in r.items()]
    return "\n".join(lines) + "\n"


def pool(name: str, *addresses: str, tls: dict[str, Any] | None = None, **kw: Any) -> str:
    backends = ", ".join(toml({"address": a}) for a in addresses)
    lines = ["[[pools]]", f"name = {toml(name)}", f"backends = [{backends}]"]
    lines += [f"{k} = {toml(v)}" for k, v in kw.items()]
    if tls is not None:
        lines.append("  [pools.tls]")
        lines += [f"  {k} = {toml(v)}" for k, v in tls.items()]
    return "\n".join(lines) + "\n"


def config(*parts: str, admin_port: int | None = None, workers: int = 2) -> str:
    head = f'[runtime]\nworkers = {workers}\ncpu_affinity = "off"\n'
    if admin_port is not None:
        head += f'[admin]\nbind = "127.0.0.1:{admin_port}"\n'
    return head + "".join(parts)


def s_client(port: int, *args: str, data: bytes = b"", timeout: float = 10) -> str:
    """openssl s_client's output (stdout and stderr) for one connection."""
    assert OPENSSL, "openssl is required"
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args]
    done = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def https_conn(port: int, ctx: ssl.SSLContext, host: str = "site.test") -> http.client.HTTPConnection:
    """An HTTP connection over TLS to 127.0.0.1 with `host` as SNI and for the certificate check."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.sock = tls_connect(port, ctx, host)
    return conn


def https_get(
    port: int, ctx: ssl.SSLContext, path: str = "/", host: str = "site.test"
) -> tuple[int, dict[str, str], bytes]:
    conn = https_conn(port, ctx, host)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tls_connect(port: int, ctx: ssl.SSLContext, sni: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=sni)


def status(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/status", timeout=10) as r:
        return json.loads(r.read())


def metrics(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


def handshakes(admin_port: int, listener_name: str, result: str) -> float:
    total = 0.0
    for line in metrics(admin_port).splitlines():
        if (
            line.startswith("fastlb_tls_handshakes_total{")
            and f'listener="{listener_name}"' in line
            and f'result="{result}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def backend_headers(body: bytes, name: str) -> list[str]:
    return [v for n, v in json.loads(body) if n.lower() == name.lower()]


# --- https termination ---------------------------------------------------------------------------


@pytest.fixture
def https_lb(fastlb, hb, certs) -> Callable[..., tuple[int, int]]:
    """`https_lb(**tls)` starts fastlb with an https listener (certificates for site.test and
    *.wild.test) in front of one HTTP backend; returns (port, admin port)."""

    def start(**tls: Any) -> tuple[int, int]:
        backend = hb("b1")
        port, admin = free_port(), free_port()
        tls = {"certificates": [certs.issue("site", "site.test"), certs.issue("wild", "*.wild.test")], **tls}
        cfg = config(
            listener("web", port, "https", "app", tls), pool("app", backend.address), admin_port=admin
        )
        fastlb(cfg, port)
        return port, admin

    return start


def test_https_request_reaches_the_backend_with_forwarding_headers(https_lb, certs):
    port, _ = https_lb()
    ctx = certs.client_context()
    conn = https_conn(port, ctx)
    conn.request(
        "GET",
        "/headers",
        headers={"Host": "site.test", "X-Client-Cert-Subject": "CN=forged", "X-Forwarded-Proto": "http"},
    )
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200
    assert backend_headers(body, "X-Forwarded-Proto") == ["https"]
    assert any("proto=https" in v for v in backend_headers(body, "Forwarded"))
    # A client's own copy of a header only fastlb may set never reaches the backend.
    assert backend_headers(body, "X-Client-Cert-Subject") == []
    # Keep-alive over TLS: a second request on the same connection.
    conn.request("GET", "/", headers={"Host": "site.test"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"b1"
    conn.close()


def test_curl_with_resolve_and_cacert(https_lb, certs):
    port, _ = https_lb()
    assert CURL
    out = subprocess.run(
        [
            CURL,
            "-sS",
            "--resolve",
            f"site.test:{port}:127.0.0.1",
            "--cacert",
            str(certs.ca_path),
            f"https://site.test:{port}/",
        ],
        capture_output=True,
        timeout=20,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "b1"


def test_certificate_chosen_by_sni_exact_then_wildcard_then_the_first(https_lb, certs):
    port, _ = https_lb()
    ctx = certs.client_context()
    ctx.check_hostname = False

    def served_names(sni: str | None) -> list[str]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            cert = s.getpeercert()
        return [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]

    assert served_names("site.test") == ["site.test"]
    assert served_names("a.wild.test") == ["*.wild.test"]
    assert served_names("other.test") == ["site.test"]  # unknown name: the first certificate
    assert served_names(None) == ["site.test"]


def test_alpn_picks_h2_when_offered_and_http11_otherwise(https_lb):
    port, _ = https_lb()
    out = s_client(port, "-servername", "site.test", "-alpn", "h2,http/1.1", data=b"")
    assert "ALPN protocol: h2" in out, out
    out = s_client(port, "-servername", "site.test", "-alpn", "http/1.1", data=b"")
    assert "ALPN protocol: http/1.1" in out, out


def test_tls_versions_and_min_version(https_lb, certs):
    port, admin = https_lb(min_version="1.3")
    assert "Protocol  : TLSv1.3" in s_client(port, "-servername", "site.test") or "TLSv1.3" in s_client(
        port, "-servername", "site.test"
    )
    refused = s_client(port, "-servername", "site.test", "-tls1_2")
    assert "Cipher is (NONE)" in refused or "alert" in refused.lower(), refused
    assert wait_until(lambda: handshakes(admin, "web", "protocol") >= 1)


def test_tls12_and_tls13_both_served_by_default(https_lb):
    port, _ = https_lb()
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        out = s_client(port, "-servername", "site.test", flag)
        assert f"Protocol  : {version}" in out or f"New, {version}" in out, out


def test_resumption_by_ticket_across_workers(https_lb, tmp_path):
    port, admin = https_lb()
    sess = tmp_path / "sess.pem"
    # TLS 1.3: the ticket arrives after the handshake; s_client waits for it with a request.
    first = s_client(
        port,
        "-servername",
        "site.test",
        "-ign_eof",
        "-sess_out",
        str(sess),
        data=b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
    )
    assert "New," in first
    # SO_REUSEPORT spreads new connections over both workers: every one resumes.
    reused = 0
    for _ in range(8):
        out = s_client(
            port,
            "-servername",
            "site.test",
            "-ign_eof",
            "-sess_in",
            str(sess),
            data=b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
        )
        reused += "Reused," in out
    assert reused == 8
    assert wait_until(lambda: handshakes(admin, "web", "resumed") >= 8)


def test_tls12_session_resumption(https_lb, tmp_path):
    port, _ = https_lb()
    sess = tmp_path / "sess12.pem"
    s_client(port, "-servername", "site.test", "-tls1_2", "-sess_out", str(sess))
    for _ in range(4):
        assert "Reused," in s_client(port, "-servername", "site.test", "-tls1_2", "-sess_in", str(sess))


def mtls(certs: Certs, auth: str) -> tuple[trustme.CA, dict[str, Any]]:
    """A CA for client certificates (clients.pem) and listener TLS settings that ask for them."""
    clients = trustme.CA()
    (certs.folder / "clients.pem").write_bytes(clients.cert_pem.bytes())
    tls = {
        "certificates": [certs.issue("site", "site.test")],
        "client_ca": "clients.pem",
        "client_auth": auth,
    }
    return clients, tls


def test_client_certificates_required(fastlb, hb, certs, tmp_path):
    backend = hb("b1")
    port, admin = free_port(), free_port()
    clients, tls = mtls(certs, "required")
    fastlb(
        config(listener("web", port, "https", "app", tls), pool("app", backend.address), admin_port=admin),
        port,
    )
    ctx = certs.client_context()
    # Without a certificate: the handshake (or the first read, TLS 1.3) fails.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        https_get(port, ctx)
    assert wait_until(lambda: handshakes(admin, "web", "client_cert") >= 1)
    # With one: through, and the backend learns who it is.
    issued = clients.issue_cert("alice@example.test", common_name="alice")
    issued.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "alice.pem"))
    ctx.load_cert_chain(str(tmp_path / "alice.pem"))
    code, _, body = https_get(port, ctx, "/headers")
    assert code == 200
    der = ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    assert subject.startswith("CN=alice,")  # RFC 4514: the last RDN first
    assert backend_headers(body, "X-Client-Cert-Subject") == [subject]
    assert backend_headers(body, "X-Client-Cert-Fingerprint") == [hashlib.sha256(der).hexdigest()]


def test_client_certificates_optional(fastlb, hb, certs, tmp_path):
    backend = hb("b1")
    port = free_port()
    _, tls = mtls(certs, "optional")
    fastlb(config(listener("web", port, "https", "app", tls), pool("app", backend.address)), port)
    code, _, body = https_get(port, certs.client_context(), "/headers")
    assert code == 200
    assert backend_headers(body, "X-Client-Cert-Subject") == []


def test_garbage_and_plain_http_are_refused_and_counted(https_lb, certs):
    port, admin = https_lb()
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(3000), b"\x16\x03\x01\x00\x05hello"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):  # fastlb closes: EOF (or a reset), never a hang
                    pass
    assert wait_until(lambda: handshakes(admin, "web", "error") >= 3)
    # The service is unharmed.
    assert https_get(port, certs.client_context())[0] == 200


# --- tls listeners: terminated, relayed to TCP ----------------------------------------------------


def echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        # A reset by the other side ends the echo; what the test checks is what arrived.
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_tls_listener_relays_16_mib_byte_exact(fastlb, certs):
    srv, _ = echo_server()
    port = free_port()
    tls = {"certificates": [certs.issue("db", "db.test")]}
    fastlb(
        config(listener("db", port, "tls", "db", tls), pool("db", f"127.0.0.1:{srv.getsockname()[1]}")), port
    )
    data = os.urandom(16 << 20)
    got = bytearray()
    # One thread drives both directions: an SSL socket must not be read and written from two
    # threads at once (OpenSSL's SSL objects are not thread-safe).
    with tls_connect(port, certs.client_context(), "db.test") as s:
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 60
        while len(got) < len(data):
            assert time.monotonic() < deadline, f"stalled at {sent} sent, {len(got)} received"
            want_write = [s] if sent < len(data) else []
            readable, writable, _ = select.select([s], want_write, [], 1)
            if writable:
                with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent += s.send(data[sent : sent + (1 << 16)])
            while readable or s.pending():
                try:
                    chunk = s.recv(1 << 20)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                assert chunk, f"closed after {len(got)} bytes"
                got += chunk
                readable = []
    srv.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


# --- SNI passthrough -----------------------------------------------------------------------------


def tls_backend(certs: Certs, stem: str, name: str) -> tuple[socket.socket, list[str]]:
    """A TLS server answering each connection with its name; returns (socket, names served)."""
    certs.issue(stem, name)
    ctx = certs.server_context(stem)
    srv = socket.create_server(("127.0.0.1", 0))
    served: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(100)
                    served.append(name)
                    s.sendall(f"I am {name}".encode())
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return srv, served


def handshake_in_pieces(port: int, ctx: ssl.SSLContext, sni: str, split: int) -> bytes:
    """A TLS client over a raw socket that writes its ClientHello in two segments (`split`
    bytes, a pause, the rest), then talks as usual; returns the server's answer."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        assert len(hello) > split
        s.sendall(hello[:split])
        time.sleep(0.2)
        s.sendall(hello[split:])
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    s.sendall(out)
                data = s.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        if out := outgoing.read():
            s.sendall(out)
        tls.write(b"hello")
        s.sendall(outgoing.read())
        answer = b""
        while not answer:
            try:
                answer = tls.read(100)
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                if not data:
                    break
                incoming.write(data)
        return answer


def test_sni_passthrough_routes_without_decrypting(fastlb, certs):
    a, served_a = tls_backend(certs, "a", "a.pass.test")
    b, served_b = tls_backend(certs, "b", "x.other.test")
    plain, _ = echo_server()
    port = free_port()
    routes = [{"sni": "a.pass.test", "pool": "a"}, {"sni": "*.other.test", "pool": "b"}]
    cfg = config(
        listener("edge", port, "tcp", "plain", routes=routes),
        pool("a", f"127.0.0.1:{a.getsockname()[1]}"),
        pool("b", f"127.0.0.1:{b.getsockname()[1]}"),
        pool("plain", f"127.0.0.1:{plain.getsockname()[1]}"),
    )
    fastlb(cfg, port)
    ctx = certs.client_context()
    # The ClientHello in two segments, split inside the record header and inside the SNI.
    for split in (3, 100):
        assert handshake_in_pieces(port, ctx, "a.pass.test", split) == b"I am a.pass.test"
        assert handshake_in_pieces(port, ctx, "x.other.test", split) == b"I am x.other.test"
    # Not TLS: the listener's own pool.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"plain bytes\n")
        assert s.recv(100) == b"plain bytes\n"
    assert served_a == ["a.pass.test"] * 2 and served_b == ["x.other.test"] * 2
    for srv in (a, b, plain):
        srv.close()


def test_sni_passthrough_with_a_post_quantum_sized_hello(fastlb, certs):
    """A ClientHello as large as one with an ML-KEM key share (~1.8 KB) spans segments; here it
    is padded with a large ALPN list instead, as Python cannot send ML-KEM shares."""
    a, served = tls_backend(certs, "a", "a.pass.test")
    port = free_port()
    cfg = config(
        listener("edge", port, "tcp", "a", routes=[{"sni": "a.pass.test", "pool": "a"}]),
        pool("a", f"127.0.0.1:{a.getsockname()[1]}"),
    )
    fastlb(cfg, port)
    ctx = certs.client_context()
    ctx.set_alpn_protocols([f"proto-{i:03d}-padding-padding" for i in range(60)])
    assert handshake_in_pieces(port, ctx, "a.pass.test", 1400) == b"I am a.pass.test"
    assert served == ["a.pass.test"]
    a.close()


# --- re-encryption to TLS backends --------------------------------------------------------------


def test_reencryption_verifies_the_backend(fastlb, hb, certs):
    certs.issue("backend", "backend.test")
    good = hb("secure", tls=certs.server_context("backend"))
    certs.issue("wrong", "somebody-else.test")
    wrong = hb("wrong", tls=certs.server_context("wrong"))
    port = free_port()
    cfg = config(
        listener("web", port, "http", "good", routes=[{"host": "wrong.test", "pool": "bad"}]),
        pool(
            "good",
            good.address,
            tls={"ca": "ca.pem", "sni": "backend.test"},
            keepalive=4,
            health={"type": "none"},
        ),
        pool(
            "bad",
            wrong.address,
            tls={"ca": "ca.pem", "sni": "backend.test"},
            retries=0,
            health={"type": "none"},
        ),
    )
    fastlb(cfg, port)
    # One client connection, so one worker (each keeps its own backend connections).
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/", headers={"Host": "app.test"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"secure")
    conn.close()
    # Kept alive: three requests, one TLS connection to the backend.
    assert good.connections == 1
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/", headers={"Host": "wrong.test"})
    resp = conn.getresponse()
    assert resp.status == 502
    resp.read()
    conn.close()
    assert time.monotonic() - t0 < 5  # refused, not hung
    assert wrong.received == []


def test_reencryption_sni_defaults_to_the_host(fastlb, hb, certs):
    certs.issue("backend", "app.test")
    good = hb("secure", tls=certs.server_context("backend"))
    port = free_port()
    fastlb(
        config(listener("web", port, "http", "app"), pool("app", good.address, tls={"ca": "ca.pem"})), port
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/", headers={"Host": "app.test:8443"})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"secure")
    conn.close()


# --- redirects -----------------------------------------------------------------------------------


def test_redirect_route_answers_itself(fastlb, hb):
    backend = hb("b1")
    port = free_port()
    routes = [{"path_prefix": "/", "redirect": {"scheme": "https", "code": 301}}]
    fastlb(config(listener("web", port, "http", "app", routes=routes), pool("app", backend.address)), port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/a/b?x=1", headers={"Host": f"site.test:{port}"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 301
    assert resp.getheader("Location") == "https://site.test/a/b?x=1"
    # Kept alive, and the backend never saw it.
    conn.request("GET", "/c", headers={"Host": "site.test"})
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("Location") == "https://site.test/c"
    conn.close()
    assert backend.received == []


# --- certificate reload --------------------------------------------------------------------------


def test_certificate_reload_under_a_stream_of_handshakes(fastlb, hb, certs, tmp_path):
    backend = hb("b1")
    port, admin = free_port(), free_port()
    tls = {"certificates": [certs.issue("site", "site.test")]}
    lb = fastlb(
        config(listener("web", port, "https", "app", tls), pool("app", backend.address), admin_port=admin),
        port,
    )
    ctx = certs.client_context()

    def serial() -> int:
        with tls_connect(port, ctx, "site.test") as s:
            der = s.getpeercert(binary_form=True)
        return int.from_bytes(hashlib.sha256(der).digest()[:8], "big")

    before = serial()
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def stream() -> None:
        while not done.is_set():
            try:
                with tls_connect(port, ctx, "site.test") as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
                    if not s.recv(100).startswith(b"HTTP/1.1 200"):
                        failures.append("bad answer")
                count[0] += 1
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))

    t = threading.Thread(target=stream)
    t.start()
    # An open connection survives the reload.
    held = tls_connect(port, ctx, "site.test")
    certs.issue("site", "site.test")  # new key and certificate, same files
    lb.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: serial() != before, timeout=15)
    after = serial()
    # A bad file: the reload fails and the current certificate keeps serving.
    (tmp_path / "site.pem").write_text("not a certificate")
    lb.proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert serial() == after
    held.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 200")
    held.close()
    done.set()
    t.join()
    assert failures == [] and count[0] > 5, (failures[:5], count[0])


# --- the metric -----------------------------------------------------------------------------------


def test_handshake_metric_by_result_and_version(https_lb, certs):
    port, admin = https_lb()
    https_get(port, certs.client_context())
    s_client(port, "-servername", "site.test", "-tls1_2")
    assert wait_until(
        lambda: (
            'result="ok",version="1.3"' in metrics(admin) and 'result="ok",version="1.2"' in metrics(admin)
        )
    )
    text = metrics(admin)
    assert re.search(
        r'fastlb_tls_handshakes_total\{listener="web",result="ok",version="1.3"\} [1-9]', text
    ), text
    st = status(admin)
    web = next(li for li in st["listeners"] if li["name"] == "web")
    assert web["protocol"] == "https"


def test_sslyze_finds_no_old_protocol_weak_cipher_or_renegotiation(https_lb, tmp_path):
    port, _ = https_lb()
    out = tmp_path / "scan.json"
    scan = ["--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--reneg"]
    cmd = [sys.executable, "-m", "sslyze", *scan, f"--json_out={out}", f"site.test:{port}{{127.0.0.1}}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.exists(), done.stdout + done.stderr
    result = json.loads(out.read_text())["server_scan_results"][0]
    assert result["scan_status"] == "COMPLETED", result
    scans = result["scan_result"]

    def accepted(scan: str) -> list[str]:
        return [s["cipher_suite"]["name"] for s in scans[scan]["result"]["accepted_cipher_suites"]]

    for old in (
        "ssl_2_0_cipher_suites",
        "ssl_3_0_cipher_suites",
        "tls_1_0_cipher_suites",
        "tls_1_1_cipher_suites",
    ):
        assert accepted(old) == [], old
    tls12, tls13 = accepted("tls_1_2_cipher_suites"), accepted("tls_1_3_cipher_suites")
    assert tls12 and tls13
    for name in tls12:
        # Forward secrecy and an AEAD: ECDHE with GCM or ChaCha20-Poly1305, nothing else.
        assert name.startswith("TLS_ECDHE_") and ("_GCM_" in name or "CHACHA20_POLY1305" in name), name
    reneg = scans["session_renegotiation"]["result"]
    assert not reneg["is_vulnerable_to_client_renegotiation_dos"]
    assert (
        not reneg["supports_secure_renegotiation"]
        or reneg.get("is_vulnerable_to_insecure_renegotiation") is not True
    )


def test_reencryption_with_a_client_certificate(fastlb, hb, certs, tmp_path):
    """A backend that requires a client certificate gets fastlb's, and refuses without it."""
    certs.issue("backend", "backend.test")
    ctx = certs.server_context("backend")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(certs.ca_path))
    strict = hb("strict", tls=ctx)
    client = certs.issue("lb-client", "lb.test")
    port = free_port()
    tls = {"ca": "ca.pem", "sni": "backend.test"}
    cfg = config(
        listener("web", port, "http", "with", routes=[{"host": "without.test", "pool": "without"}]),
        pool("with", strict.address, tls={**tls, **client}, health={"type": "none"}),
        pool("without", strict.address, tls=tls, health={"type": "none"}, retries=0),
    )
    fastlb(cfg, port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/", headers={"Host": "with.test"})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"strict")
    conn.request("GET", "/", headers={"Host": "without.test"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 502
    conn.close()


def test_access_log_carries_the_tls_session(fastlb, hb, certs, tmp_path):
    backend = hb("b1")
    port = free_port()
    log = tmp_path / "access.log"
    tls = {"certificates": [certs.issue("site", "site.test")]}
    cfg = config(listener("web", port, "https", "app", tls), pool("app", backend.address))
    fastlb(f'[log]\naccess_log = "{log}"\n' + cfg, port)
    assert https_get(port, certs.client_context())[0] == 200
    assert wait_until(lambda: log.exists() and log.read_text().strip() != "")
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["tls_version"] == "1.3"
    assert line["tls_cipher"].startswith("TLS13_")
    assert line["sni"] == "site.test"
    assert line["alpn"] is None  # Python's ssl offers no ALPN unless asked


def test_reencryption_resumes_sessions_to_the_backend(fastlb, hb, certs):
    """Without keep-alive every request opens a TLS connection to the backend: all but the
    first resume the session (rustls' client cache, shared by the workers)."""
    certs.issue("backend", "backend.test")
    good = hb("secure", tls=certs.server_context("backend"))
    port = free_port()
    tls = {"ca": "ca.pem", "sni": "backend.test"}
    cfg = config(
        listener("web", port, "http", "app"),
        pool("app", good.address, tls=tls, keepalive=0, health={"type": "none"}),
    )
    fastlb(cfg, port)
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/", headers={"Host": "app.test"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"secure")
        conn.close()
    assert wait_until(lambda: len(good.tls_resumed) == 4)
    assert good.tls_resumed[0] is False and all(good.tls_resumed[1:]), good.tls_resumed


def test_a_response_delimited_by_the_close_ends_with_close_notify(https_lb, certs):
    """A body that runs until the connection closes is only known complete over TLS when a
    close_notify precedes the close: curl treats a bare TCP close as truncation (exit 56)."""
    port, _ = https_lb()
    assert CURL
    url = f"https://site.test:{port}/until-close"
    resolve = f"site.test:{port}:127.0.0.1"
    out = subprocess.run(
        [CURL, "-sS", "--resolve", resolve, "--cacert", str(certs.ca_path), url],
        capture_output=True,
        timeout=20,
        text=True,
    )
    assert (out.returncode, out.stdout) == (0, "until-close:b1"), out.stderr
