"""PROXY protocol in (CONTRACT.md `proxy_protocol = { accept, from }`): real `fastlb serve`
processes, raw sockets for exact headers (v1, v2, split across segments, malformed), curl's
`--haproxy-protocol`, and Debian's HAProxy (`send-proxy-v2`) in front; real backends behind."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from admin import backend_status, scrape
from h2util import RawH2
from httputil import http_config, pool

from fastlb.config import ConfigError, parse_config

from backends import echo
from conftest import free_port, wait_port, wait_until
from l4util import l4_config

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
GET = b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"


def v1(src: str, sport: int = 51000) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if ":" in src else "127.0.0.1"
    return f"PROXY {family} {src} {dst} {sport} 80\r\n".encode()


def v2(src: str | None, sport: int = 51000, tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header for TCP over IPv4 from `src`; None: a LOCAL header (health checks)."""
    if src is None:
        return V2_SIG + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 80) + tlvs
    return V2_SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def exchange(port: int, *parts: bytes, pause: float = 0.0, half_close: bool = False) -> bytes:
    """Sends `parts` (pausing between them, so each goes in its own segment), reads to EOF (a
    reset counts as the end)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a refused connection may be closed before everything is sent
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
            for k, part in enumerate(parts):
                if k and pause:
                    time.sleep(pause)
                s.sendall(part)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def forwarded_for(answer: bytes) -> list[str]:
    """The X-Forwarded-For values the backend saw (its /headers answer), [] if none answered."""
    if b"\r\n\r\n" not in answer:
        return []
    head, _, body = answer.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0]:
        return []
    return [v for n, v in json.loads(body) if n.lower() == "x-forwarded-for"]


def http_with_proxy(port: int, admin: int, backends: list[str], accept: str, trusted: str, **kw: Any) -> str:
    config = http_config(port, [pool("app", backends)], admin=f"127.0.0.1:{admin}", **kw)
    return config.replace(
        'protocol = "http"\n',
        f'protocol = "http"\nproxy_protocol = {{ accept = "{accept}", from = ["{trusted}"] }}\n',
        1,
    )


def dropped(admin: int) -> float:
    return scrape(admin).get(
        ("fastlb_connections_dropped_total", (("listener", "web"), ("reason", "proxy_protocol"))), 0.0
    )


def test_v1_and_v2_name_the_client_for_the_backend(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "required", "127.0.0.0/8"), port)
    base = dropped(admin)  # the fixture's own check that the port is open sent no header
    assert forwarded_for(exchange(port, v1("203.0.113.9") + GET)) == ["203.0.113.9"]
    assert forwarded_for(exchange(port, v1("2001:db8::9") + GET)) == ["2001:db8::9"]
    assert forwarded_for(exchange(port, v2("198.51.100.7") + GET)) == ["198.51.100.7"]
    alpn = bytes([0x01]) + struct.pack("!H", 2) + b"h2"  # TLVs are skipped
    assert forwarded_for(exchange(port, v2("198.51.100.8", tlvs=alpn) + GET)) == ["198.51.100.8"]
    # LOCAL (a health check of the balancer in front): the connection's own address
    assert forwarded_for(exchange(port, v2(None) + GET)) == ["127.0.0.1"]
    assert len(a.received) == 5 and dropped(admin) == base


def test_a_header_split_across_segments_is_waited_for(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "required", "127.0.0.0/8"), port)
    header = v2("192.0.2.44")
    assert forwarded_for(exchange(port, header[:5], header[5:20], header[20:] + GET, pause=0.05)) == [
        "192.0.2.44"
    ]
    line = v1("192.0.2.45")
    assert forwarded_for(exchange(port, line[:9], line[9:], GET, pause=0.05)) == ["192.0.2.45"]


@pytest.mark.parametrize(
    "sent",
    [
        GET,  # no header where one is required
        b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 80\r\n" + GET,
        b"PROXY TCP4 nonsense\r\n" + GET,
        V2_SIG + bytes([0x21, 0x11]) + struct.pack("!H", 4) + b"\x00" * 4 + GET,  # too short for TCP4
        V2_SIG + bytes([0x31, 0x11, 0, 12]) + b"\x00" * 12 + GET,  # version 3
        b"PROXY " + b"x" * 200,  # no CRLF within 107 bytes
    ],
    ids=["missing", "bad-port", "bad-fields", "v2-short", "v2-version", "v1-no-crlf"],
)
def test_malformed_or_missing_headers_are_closed_and_never_reach_a_backend(hb, fastlb, sent):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "required", "127.0.0.0/8"), port)
    base = dropped(admin)  # the fixture's own check that the port is open sent no header
    assert exchange(port, sent) == b""
    assert a.received == []
    assert wait_until(lambda: dropped(admin) == base + 1)


def test_a_header_that_never_comes_is_timed_out(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    config = http_with_proxy(
        port,
        admin,
        [a.address],
        "required",
        "127.0.0.0/8",
        timeouts={"client_idle": "60s", "header_read": "300ms"},
    )
    fastlb(config, port)
    base = dropped(admin)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(v2("192.0.2.1")[:10])
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # closed with the partial header unread
            assert s.recv(100) == b""
        assert time.monotonic() - started < 5  # closed by header_read, not by the client
    assert a.received == [] and wait_until(lambda: dropped(admin) == base + 1)


def test_only_trusted_sources_may_send_one(hb, fastlb):
    """from = 10.0.0.0/8: a loopback client is not trusted. Required: it is refused. Optional: its
    plain requests are served under its own address, and a header it sends closes it."""
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "required", "10.0.0.0/8"), port)
    assert exchange(port, v1("203.0.113.9") + GET) == b"" and a.received == []
    port2, admin2 = free_port(), free_port()
    fastlb(http_with_proxy(port2, admin2, [a.address], "optional", "10.0.0.0/8"), port2)
    base = dropped(admin2)
    assert forwarded_for(exchange(port2, GET)) == ["127.0.0.1"]
    assert exchange(port2, v1("203.0.113.9") + GET) == b""  # an untrusted header: no spoofing
    assert len(a.received) == 1 and wait_until(lambda: dropped(admin2) == base + 1)


def test_optional_accepts_both_from_trusted_sources(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "optional", "127.0.0.1/32"), port)
    assert forwarded_for(exchange(port, GET)) == ["127.0.0.1"]
    assert forwarded_for(exchange(port, v1("203.0.113.10") + GET)) == ["203.0.113.10"]


def test_the_client_it_names_is_the_client_for_routes_and_the_access_log(hb, fastlb, tmp_path):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    log = tmp_path / "access.log"
    config = http_with_proxy(port, admin, [a.address], "required", "127.0.0.0/8", routes=[
        {"source_cidr": ["203.0.113.0/24"], "pool": "b"}])  # fmt: skip
    config += "\n" + pool("b", [b.address])
    config = config.replace("[admin]", f'[log]\naccess_log = "{log}"\n\n[admin]', 1)
    fastlb(config, port)
    assert exchange(port, v1("203.0.113.50") + GET).count(b"200 OK") == 1
    assert exchange(port, v1("198.51.100.50") + GET).count(b"200 OK") == 1
    assert (len(a.received), len(b.received)) == (1, 1)  # the route matched the proxied client only
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
    clients = [json.loads(line)["client"] for line in log.read_text().splitlines()]
    assert [c.rsplit(":", 1)[0] for c in clients] == ["203.0.113.50", "198.51.100.50"]


def test_tcp_listener_strips_the_header_and_forwards_the_stream(backends, fastlb):
    b = backends(echo)
    port = free_port()
    config = l4_config(port, [b.address]).replace(
        'protocol = "tcp"\n',
        'protocol = "tcp"\nproxy_protocol = { accept = "required", from = ["127.0.0.1"] }\n',
        1,
    )
    fastlb(config, port)
    sent = v2("192.0.2.1") + b"payload, not the header"
    assert exchange(port, sent, half_close=True) == b"payload, not the header"
    assert exchange(port, b"no header", half_close=True) == b""


def test_tls_listener_reads_the_header_before_the_handshake(hb, fastlb, tmp_path):
    ca = trustme.CA()
    ca.issue_cert("app.test").private_key_and_cert_chain_pem.write_to_path(tmp_path / "site.pem")
    a = hb("a")
    port, admin = free_port(), free_port()
    config = http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}").replace(
        'protocol = "http"\n',
        'protocol = "https"\nproxy_protocol = { accept = "required", from = ["127.0.0.1"] }\n'
        f'tls = {{ certificates = [{{ cert = "{tmp_path}/site.pem", key = "{tmp_path}/site.pem" }}] }}\n',
        1,
    )
    fastlb(config, port)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(v1("203.0.113.77"))
        with ctx.wrap_socket(raw, server_hostname="app.test") as s:
            s.sendall(GET)
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ssl.SSLError:
                pass
    assert forwarded_for(answer) == ["203.0.113.77"]


def test_curl_haproxy_protocol(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "required", "127.0.0.0/8"), port)
    base = dropped(admin)  # the fixture's own check that the port is open sent no header
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--haproxy-protocol", f"http://127.0.0.1:{port}/headers"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [v for n, v in json.loads(done.stdout) if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert dropped(admin) == base


HAPROXY = shutil.which("haproxy")


def test_haproxy_send_proxy_v2_in_front(hb, fastlb, tmp_path: Path):
    assert HAPROXY, "the interop test needs Debian's haproxy (apt-get install haproxy)"
    a = hb("a")
    port, admin, front = free_port(), free_port(), free_port()
    fastlb(http_with_proxy(port, admin, [a.address], "required", "127.0.0.0/8"), port)
    base = dropped(admin)  # the fixture's own check that the port is open sent no header
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
        f"  timeout server 30s\nlisten front\n  bind 127.0.0.1:{front}\n"
        f"  server lb 127.0.0.1:{port} send-proxy-v2\n"
    )
    proc = subprocess.Popen(
        [HAPROXY, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(front)
        for _ in range(3):
            assert forwarded_for(exchange(front, GET)) == ["127.0.0.1"]
    finally:
        proc.terminate()
        proc.wait(10)
    assert len(a.received) == 3 and dropped(admin) == base


NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")


def run_haproxy(tmp_path: Path, body: str) -> subprocess.Popen[bytes]:
    assert HAPROXY, "the interop test needs Debian's haproxy (apt-get install haproxy)"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 100\ndefaults\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n" + body
    )
    return subprocess.Popen(
        [HAPROXY, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_into_haproxy_accept_proxy(fastlb, tmp_path: Path, version):
    """fastlb's send_proxy into Debian HAProxy's `accept-proxy`: HAProxy answers with the source
    it took from the header, for an http pool (the X-Forwarded-For client of a trusted proxy)
    and a tcp pool (the client a PROXY header into fastlb named)."""
    behind = free_port()
    proc = run_haproxy(
        tmp_path,
        f"frontend echo\n  mode http\n  bind 127.0.0.1:{behind} accept-proxy\n"
        '  http-request return status 200 content-type text/plain lf-string "src=%[src]"\n',
    )
    try:
        wait_port(behind)
        web, tcp = free_port(), free_port()
        config = http_config(
            web, [pool("app", [f"127.0.0.1:{behind}"], send_proxy=version)], trusted_proxies=["127.0.0.0/8"]
        )
        fastlb(config, web)
        xff = (
            b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.44\r\nConnection: close\r\n\r\n"
        )
        assert exchange(web, xff).endswith(b"src=203.0.113.44")
        l4 = l4_config(tcp, [f"127.0.0.1:{behind}"]).replace(
            "[[pools]]\n", f'[[pools]]\nsend_proxy = "{version}"\n', 1
        )
        l4 = l4.replace(
            'protocol = "tcp"\n',
            'protocol = "tcp"\nproxy_protocol = { accept = "required", from = ["127.0.0.0/8"] }\n',
            1,
        )
        fastlb(l4, tcp)
        plain = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        assert exchange(tcp, v1("198.51.100.3") + plain).endswith(b"src=198.51.100.3")
    finally:
        proc.terminate()
        proc.wait(10)


def test_send_proxy_into_nginx_listen_proxy_protocol(fastlb, tmp_path: Path):
    """fastlb's send_proxy v1 and v2 into nginx's `listen ... proxy_protocol`, which answers with
    the address the header carried."""
    assert NGINX, "the interop test needs nginx (apt-get install nginx)"
    behind = free_port()
    (tmp_path / "nginx").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/nginx-error.log;\nevents {{}}\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {tmp_path}/nginx;\n  proxy_temp_path {tmp_path}/nginx;\n"
        f"  fastcgi_temp_path {tmp_path}/nginx;\n  uwsgi_temp_path {tmp_path}/nginx;\n"
        f"  scgi_temp_path {tmp_path}/nginx;\n"
        f"  server {{\n    listen 127.0.0.1:{behind} proxy_protocol;\n"
        '    location / { return 200 "pp=$proxy_protocol_addr:$proxy_protocol_port"; }\n  }\n}\n'
    )
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(behind)
        for version in ("v1", "v2"):
            web = free_port()
            fastlb(http_config(web, [pool("app", [f"127.0.0.1:{behind}"], send_proxy=version)]), web)
            with socket.create_connection(("127.0.0.1", web), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                client_port = s.getsockname()[1]
            assert answer.endswith(f"pp=127.0.0.1:{client_port}".encode()), (version, answer[-200:])
    finally:
        proc.terminate()
        proc.wait(10)


PP = "listeners[0].proxy_protocol"


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ({"proxy_protocol": {"accept": "required"}}, f"{PP}.from: list the load balancers"),
        ({"proxy_protocol": {"accept": "always", "from": ["10.0.0.0/8"]}}, f"{PP}.accept:"),
        ({"proxy_protocol": {"accept": "optional", "from": ["10.0.0.300/8"]}}, f"{PP}.from[0]:"),
        ({"protocol": "udp", "proxy_protocol": {"accept": "required", "from": ["10.0.0.0/8"]}},
         f"{PP}: not for udp listeners"),
        ({"trusted_proxies": ["10.0.0.0/8"]}, "listeners[0].trusted_proxies: for http and https listeners"),
        ({"protocol": "http", "trusted_proxies": ["10.0.0.300/8"]}, "listeners[0].trusted_proxies[0]:"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(listener: dict[str, Any], message: str) -> None:
    data = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "protocol": "tcp", "pool": "app"} | listener],
        "pools": [{"name": "app", "backends": [{"address": "127.0.0.1:9000"}], "health": {"type": "none"}}],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_config_to_engine() -> None:
    data = {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app",
             "proxy_protocol": {"accept": "optional", "from": ["10.1.2.3/8", "::1"]}},
            {"name": "plain", "bind": "127.0.0.1:8081", "protocol": "http", "pool": "app"},
        ],
        "pools": [{"name": "app", "backends": [{"address": "127.0.0.1:9000"}], "health": {"type": "none"}}],
    }  # fmt: skip
    web, plain = parse_config(data).to_engine()["listeners"]
    assert web["proxy_protocol"] == {"required": False, "from": ["10.0.0.0/8", "::1/128"]}
    assert plain["proxy_protocol"] is None


# --- send_proxy: fastlb sending the header to its backends ----------------------------------------


def recording(conn: socket.socket, backend: Any) -> None:
    """Keeps what arrived (until the client half-closes), answers "ok"."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    backend.seen = [*getattr(backend, "seen", []), data]
    conn.sendall(b"ok")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_puts_the_header_first_on_tcp_backend_connections(backends, fastlb, version):
    b = backends(recording)
    port = free_port()
    config = l4_config(port, [b.address]).replace("[[pools]]\n", f'[[pools]]\nsend_proxy = "{version}"\n', 1)
    fastlb(config, port)
    assert exchange(port, b"hello", half_close=True) == b"ok"
    # the fixture's check that the port is open made a connection too, which may be recorded
    # after this one: take the one that carried the data
    (data,) = [d for d in b.seen if d.endswith(b"hello")]
    if version == "v1":
        assert data.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
        assert data.endswith(f" {port}\r\nhello".encode())
    else:
        assert data.startswith(V2_SIG + bytes([0x21, 0x11, 0, 12])) and data.endswith(b"hello")
        assert struct.unpack("!H", data[16 + 10 : 16 + 12])[0] == port  # the address the client reached


def test_fastlb_into_fastlb_with_checks_that_send_local(hb, fastlb):
    """A tcp front with send_proxy v2 into an http fastlb that requires PROXY headers: requests go
    through, and the front's http health checks (which send a LOCAL header) keep it up."""
    a = hb("a")
    inner, inner_admin = free_port(), free_port()
    fastlb(http_with_proxy(inner, inner_admin, [a.address], "required", "127.0.0.0/8"), inner)
    front, front_admin = free_port(), free_port()
    config = l4_config(front, [f"127.0.0.1:{inner}"], admin=f"127.0.0.1:{front_admin}").replace(
        "[[pools]]\n", '[[pools]]\nsend_proxy = "v2"\n', 1
    )
    config = config.replace(
        'health = { type = "none" }',
        'health = { type = "http", path = "/", interval = "200ms", timeout = "100ms" }',
    )
    assert 'type = "http"' in config
    fastlb(config, front)
    base = dropped(inner_admin)
    assert forwarded_for(exchange(front, GET)) == ["127.0.0.1"]
    time.sleep(1.0)  # several checks
    status = backend_status(front_admin, "app", f"127.0.0.1:{inner}")
    assert status["state"] == "up" and status["health"]["up"], status
    assert dropped(inner_admin) == base  # neither the request nor a check was refused


@pytest.mark.parametrize(
    ("listener", "pool_keys", "message"),
    [
        ({"protocol": "http"}, {"http_version": "2"}, 'pools[0].send_proxy: not with http_version = "2"'),
        ({"protocol": "udp"}, {"health": {"type": "none"}}, "pools[0].send_proxy: a PROXY header"),
    ],
)  # fmt: skip
def test_send_proxy_is_refused_where_one_header_cannot_name_the_client(
    listener: dict[str, Any], pool_keys: dict[str, Any], message: str
) -> None:
    data = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "app"} | listener],
        "pools": [
            {"name": "app", "backends": [{"address": "127.0.0.1:9000"}], "send_proxy": "v1"} | pool_keys
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


class ProxiedHttp:
    """A keep-alive HTTP/1.1 backend behind send_proxy: per connection, the PROXY line it began
    with (v1; v2 headers are kept whole in `v2_headers`) and the paths of the requests it
    carried. Answers 200 "ok"."""

    def __init__(self, backends: Any) -> None:
        self.connections: list[tuple[str, list[str]]] = []  # ("v2", ...) for a v2 header
        self.v2_headers: list[bytes] = []
        self.backend = backends(self._serve)
        self.address = self.backend.address

    def _serve(self, conn: socket.socket, _backend: Any) -> None:
        data = b""
        while b"\r\n" not in data:
            if not (chunk := conn.recv(65536)):
                return
            data += chunk
        if data.startswith(V2_SIG):
            while len(data) < 16 or len(data) < 16 + struct.unpack("!H", data[14:16])[0]:
                if not (chunk := conn.recv(65536)):
                    return
                data += chunk
            end = 16 + struct.unpack("!H", data[14:16])[0]
            self.v2_headers.append(data[:end])
            data = data[end:]
            line = "v2"
        else:
            raw, _, data = data.partition(b"\r\n")
            line = raw.decode()
        paths: list[str] = []
        self.connections.append((line, paths))
        while True:
            while b"\r\n\r\n" not in data:
                if not (chunk := conn.recv(65536)):
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            paths.append(head.split(b" ")[1].decode())
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def keep_alive_gets(port: int, paths: list[str], xff: str | None = None) -> tuple[int, list[bytes]]:
    """`paths` on one keep-alive connection; returns its local port and the status lines."""
    extra = f"X-Forwarded-For: {xff}\r\n" if xff else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        answers = []
        for path in paths:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: app.test\r\n{extra}\r\n".encode())
            data = b""
            while not data.endswith(b"ok"):
                chunk = s.recv(65536)
                assert chunk, "closed"
                data += chunk
            answers.append(data.split(b"\r\n")[0])
        return s.getsockname()[1], answers


def test_send_proxy_on_an_http_pool_names_each_client_on_its_own_connections(backends, fastlb):
    b = ProxiedHttp(backends)
    port = free_port()
    config = http_config(port, [pool("app", [b.address], send_proxy="v1")])
    fastlb(config, port)
    first, answers = keep_alive_gets(port, ["/a1", "/a2"])
    second, more = keep_alive_gets(port, ["/b1", "/b2"])
    third, last = keep_alive_gets(port, ["/c1"])
    assert answers + more + last == [b"HTTP/1.1 200 OK"] * 5
    # one backend connection per client connection, each begun with that client's header and
    # reused for that client's requests only (never for the next client's)
    by_path = {tuple(paths): line for line, paths in b.connections if paths}
    assert by_path == {
        ("/a1", "/a2"): f"PROXY TCP4 127.0.0.1 127.0.0.1 {first} {port}",
        ("/b1", "/b2"): f"PROXY TCP4 127.0.0.1 127.0.0.1 {second} {port}",
        ("/c1",): f"PROXY TCP4 127.0.0.1 127.0.0.1 {third} {port}",
    }, b.connections


def test_send_proxy_names_the_x_forwarded_for_client_and_h2_clients(backends, fastlb):
    b = ProxiedHttp(backends)
    port = free_port()
    config = http_config(port, [pool("app", [b.address], send_proxy="v1")], trusted_proxies=["127.0.0.0/8"])
    fastlb(config, port)
    # behind a trusted proxy the request's client is named (no port: the field has none)
    _, answers = keep_alive_gets(port, ["/x"], xff="203.0.113.44")
    assert answers == [b"HTTP/1.1 200 OK"]
    assert ("PROXY TCP4 203.0.113.44 127.0.0.1 0 " + str(port), ["/x"]) in b.connections
    # an HTTP/2 client's streams go to the HTTP/1.1 pool with its own header
    with RawH2(port) as raw:
        sid = raw.new_stream()
        raw.send(raw.headers_frame(sid, path="/h2"))
        assert raw.wait_stream(sid, 10) and raw.status(sid) == 200
        h2_port = raw.sock.getsockname()[1]
    assert (f"PROXY TCP4 127.0.0.1 127.0.0.1 {h2_port} {port}", ["/h2"]) in b.connections


def tlvs(header: bytes) -> dict[int, bytes]:
    """The TLVs of a v2 header over IPv4 (type -> value)."""
    rest, out = header[16 + 12 :], {}
    while rest:
        kind, length = rest[0], struct.unpack("!H", rest[1:3])[0]
        out[kind] = rest[3 : 3 + length]
        rest = rest[3 + length :]
    return out


def test_send_proxy_v2_from_https_carries_alpn_sni_and_the_ssl_tlv(backends, fastlb, tmp_path):
    b = ProxiedHttp(backends)
    ca, clients = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("app.test")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "site.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "site.key")
    clients.cert_pem.write_to_path(tmp_path / "clients.pem")
    port = free_port()
    config = http_config(port, [pool("app", [b.address], send_proxy="v2")]).replace(
        'protocol = "http"\n',
        'protocol = "https"\ntls = { certificates = [{ cert = "site.pem", key = "site.key" }],'
        ' client_ca = "clients.pem", client_auth = "optional" }\n',
        1,
    )
    fastlb(config, port)

    def get(with_cert: bool) -> bytes:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        ctx.set_alpn_protocols(["http/1.1"])
        if with_cert:
            clients.issue_cert("alice@example.test", common_name="alice").configure_cert(ctx)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="app.test") as s,
        ):
            s.sendall(b"GET /tls HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            return answer

    assert get(with_cert=True).startswith(b"HTTP/1.1 200")
    assert get(with_cert=False).startswith(b"HTTP/1.1 200")
    assert len(b.v2_headers) == 2, b.connections
    signed, anonymous = (tlvs(h) for h in b.v2_headers)
    assert signed[0x01] == b"http/1.1" and signed[0x02] == b"app.test"
    ssl_tlv = signed[0x20]
    assert ssl_tlv[0] == 0x07 and ssl_tlv[1:5] == b"\0\0\0\0"  # SSL, cert on conn and session; verified
    sub = tlvs(b"\0" * 28 + ssl_tlv[5:])
    assert sub[0x21] == b"TLSv1.3" and sub[0x22] == b"alice" and sub[0x23].startswith(b"TLS13_")
    assert anonymous[0x20][0] == 0x01 and 0x22 not in tlvs(b"\0" * 28 + anonymous[0x20][5:])


# --- trusted_proxies: the client X-Forwarded-For names -----------------------------------------


def get_as(port: int, xff: list[str] | None = None, path: str = "/headers") -> bytes:
    """One request on a new connection, with these X-Forwarded-For fields."""
    fields = "".join(f"X-Forwarded-For: {v}\r\n" for v in xff or [])
    request = f"GET {path} HTTP/1.1\r\nHost: app.test\r\n{fields}Connection: close\r\n\r\n"
    return exchange(port, request.encode())


def trusted_config(port: int, admin: int, a: str, b: str, trusted: list[str], log: Path, **kw: Any) -> str:
    """An http listener that believes X-Forwarded-For from `trusted`, a route for clients in
    203.0.113.0/24 to pool "b", an access log."""
    config = http_config(
        port,
        [pool("app", [a]), pool("b", [b])],
        admin=f"127.0.0.1:{admin}",
        routes=[{"source_cidr": ["203.0.113.0/24"], "pool": "b"}],
        trusted_proxies=trusted,
        **kw,
    )
    return config.replace("[admin]", f'[log]\naccess_log = "{log}"\n\n[admin]', 1)


def logged_clients(log: Path, n: int) -> list[str]:
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= n)
    return [json.loads(line)["client"].rsplit(":", 1)[0].strip("[]") for line in log.read_text().splitlines()]


def test_trusted_proxies_the_right_most_untrusted_hop_is_the_client(hb, fastlb, tmp_path):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    log = tmp_path / "access.log"
    fastlb(trusted_config(port, admin, a.address, b.address, ["127.0.0.0/8"], log), port)
    sent = [
        ["203.0.113.50"],  # -> b: the client is in the route's network
        ["203.0.113.50, 198.51.100.9"],  # -> a: the right-most untrusted hop is 198.51.100.9
        ["198.51.100.9", "203.0.113.7, 127.0.0.5"],  # -> b: 127.0.0.5 is a trusted proxy
        [],  # -> a: no field, the peer is the client
        ["6.6.6.6, garbage"],  # -> a: not an address, so the proxy that passed it on is the client
    ]
    for xff in sent:
        assert get_as(port, xff).count(b"200 OK") == 1
    assert (len(a.received), len(b.received)) == (3, 2)
    assert logged_clients(log, 5) == ["203.0.113.50", "198.51.100.9", "203.0.113.7", "127.0.0.1", "127.0.0.1"]
    # the backend still gets the whole chain, the hop that connected appended
    assert b.received[0].header_all("x-forwarded-for") == ["203.0.113.50, 127.0.0.1"]


def test_x_forwarded_for_from_an_untrusted_peer_is_not_believed(hb, fastlb, tmp_path):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    log = tmp_path / "access.log"
    fastlb(trusted_config(port, admin, a.address, b.address, ["10.0.0.0/8"], log), port)
    assert get_as(port, ["203.0.113.50"]).count(b"200 OK") == 1
    assert (len(a.received), len(b.received)) == (1, 0)
    assert logged_clients(log, 1) == ["127.0.0.1"]


def test_trusted_proxies_behind_a_proxy_protocol_hop(hb, fastlb, tmp_path):
    """The PROXY header names the hop (10.0.0.7, a trusted proxy), its X-Forwarded-For the client."""
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    log = tmp_path / "access.log"
    config = trusted_config(port, admin, a.address, b.address, ["10.0.0.0/8"], log)
    config = config.replace(
        'protocol = "http"\n',
        'protocol = "http"\nproxy_protocol = { accept = "required", from = ["127.0.0.0/8"] }\n',
        1,
    )
    fastlb(config, port)
    request = (
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.80\r\nConnection: close\r\n\r\n"
    )
    assert exchange(port, v1("10.0.0.7") + request).count(b"200 OK") == 1
    assert exchange(port, v1("192.0.2.1") + request).count(b"200 OK") == 1  # an untrusted hop
    assert (len(a.received), len(b.received)) == (1, 1)
    assert logged_clients(log, 2) == ["203.0.113.80", "192.0.2.1"]


def test_trusted_proxies_for_hashing_and_rate_limits(hb, fastlb):
    a, b = hb("a"), hb("b")
    port = free_port()
    config = http_config(
        port,
        [pool("app", [a.address, b.address], algorithm="ip_hash")],
        trusted_proxies=["127.0.0.0/8"],
        rate_limit={"requests_per_second": 1, "burst": 2},
    )
    fastlb(config, port)
    # 20 clients behind one proxy: hashed by their own address, they spread over both
    # backends (by the proxy's address they would all land on one); each gets its own budget
    for k in range(20):
        assert get_as(port, [f"198.51.100.{k + 1}"], "/").count(b"200 OK") == 1
    assert len(a.received) > 0 and len(b.received) > 0, (len(a.received), len(b.received))
    answers = [get_as(port, ["203.0.113.9"], "/").split(b"\r\n")[0] for _ in range(3)]
    assert answers[:2] == [b"HTTP/1.1 200 OK"] * 2 and b" 429 " in answers[2], answers
    assert get_as(port, ["203.0.113.10"], "/").startswith(b"HTTP/1.1 200")  # another client


def test_trusted_proxies_over_http2(hb, fastlb, tmp_path):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    log = tmp_path / "access.log"
    fastlb(trusted_config(port, admin, a.address, b.address, ["127.0.0.0/8"], log), port)
    with RawH2(port) as raw:
        ids = []
        for xff in ("203.0.113.50", "203.0.113.50, 198.51.100.9"):
            sid = raw.new_stream()
            raw.send(raw.headers_frame(sid, path="/", extra=(("x-forwarded-for", xff),)))
            ids.append(sid)
        for sid in ids:
            assert raw.wait_stream(sid, 10) and raw.status(sid) == 200
    assert (len(a.received), len(b.received)) == (1, 1)
    assert sorted(logged_clients(log, 2)) == ["198.51.100.9", "203.0.113.50"]
    assert b.received[0].header_all("x-forwarded-for") == ["203.0.113.50, 127.0.0.1"]


def test_trusted_proxies_to_engine() -> None:
    data = {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app",
             "trusted_proxies": ["10.1.2.3/8", "2001:db8::1"]},
        ],
        "pools": [{"name": "app", "backends": [{"address": "127.0.0.1:9000"}], "health": {"type": "none"}}],
    }  # fmt: skip
    (web,) = parse_config(data).to_engine()["listeners"]
    assert web["trusted_proxies"] == ["10.0.0.0/8", "2001:db8::1/128"]
