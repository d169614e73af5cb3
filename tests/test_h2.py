"""HTTP/2 through a real `fastlb serve` (issue 13): clients curl, nghttp, httpx and frame-level
scripts (tests/h2util.py); backends HTTP/1.1 (tests/httpbackend.py) and HTTP/2-only
(tests/h2server.py, the `h2` library), all on loopback.

h2c prior knowledge on `http` listeners and ALPN h2 on `https` listeners; translation both ways
(h2 clients to HTTP/1.1 pools, HTTP/1.1 clients to `http_version = "2"` pools) with byte-exact
16 MiB bodies; routes, forwarding headers and balancing per stream; SETTINGS and limits; the
access log and metrics; graceful GOAWAY on stop and when a reload removes the listener.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from admin import scrape
from h2conf import Certs, config, listener, pool
from h2server import H2Backend
from h2util import (
    CANCEL,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    NO_ERROR,
    REFUSED_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2Client,
    RawH2,
    frame,
)

from backends import payload
from conftest import free_port, wait_port, wait_until

CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")
BIG = 16 << 20


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def h2b() -> Iterator[Callable[..., H2Backend]]:
    """`h2b(name, tls=...)` starts an HTTP/2-only backend; the test fails if one recorded an error
    or got a connection that was not HTTP/2."""
    started: list[H2Backend] = []

    def start(name: str = "", tls=None) -> H2Backend:
        b = H2Backend(name, tls)
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()
    assert [e for b in started for e in b.errors] == []
    assert [b.bad for b in started] == [0] * len(started), "a backend got a connection that was not h2"


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert CURL, "curl is required (apt-get install curl)"
    return subprocess.run([CURL, "-sS", *args], capture_output=True, text=True, timeout=timeout)


def metric(admin: int, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in scrape(admin).items() if n == name and set(labels.items()) <= set(ls))


def seen(body: bytes, name: str) -> list[str]:
    """The values of header `name` in an HttpBackend /headers answer (a JSON list of pairs)."""
    return [v for n, v in json.loads(body) if n.lower() == name.lower()]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- clients: curl and nghttp --------------------------------------------------------------------


def test_curl_http2_over_tls_negotiates_h2(fastlb, hb, certs):
    b = hb("b1")
    port = free_port()
    tls = {"certificates": [certs.issue("site", "site.test")]}
    fastlb(config(listener("web", port, "https", "app", tls=tls), pool("app", [b.address])), port)
    url = f"https://site.test:{port}/"
    out = curl(
        "--http2",
        "--cacert",
        str(certs.ca_path),
        "--resolve",
        f"site.test:{port}:127.0.0.1",
        "-w",
        "\n%{http_version}",
        url,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "b1\n2"
    # The backend got HTTP/1.1 (the pool's default) with the authority as Host.
    req = b.received[-1]
    assert req.version == "HTTP/1.1" and req.header_all("host") == [f"site.test:{port}"]


def test_curl_prior_knowledge_on_the_http_listener_and_upgrade_stays_http11(fastlb, hb):
    b = hb("b1")
    port = free_port()
    fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address])), port)
    url = f"http://127.0.0.1:{port}/"
    out = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", url)
    assert (out.returncode, out.stdout) == (0, "b1\n2"), out.stderr
    # `Upgrade: h2c` is not taken up (like nginx): served as HTTP/1.1.
    out = curl("--http2", "-w", "\n%{http_version}", url)
    assert (out.returncode, out.stdout) == (0, "b1\n1.1"), out.stderr
    assert all(r.header("upgrade") is None and r.header("http2-settings") is None for r in b.received)


def test_nghttp_client_h2c_and_tls_many_streams(fastlb, hb, certs):
    assert NGHTTP, "nghttp is required (apt-get install nghttp2-client)"
    backends = [hb(f"b{i}") for i in (1, 2, 3)]
    port, tls_port = free_port(), free_port()
    tls = {"certificates": [certs.issue("site", "site.test")]}
    cfg = config(
        listener("web", port, "http", "app"),
        listener("tls", tls_port, "https", "app", tls=tls),
        pool("app", [b.address for b in backends]),
    )
    fastlb(cfg, tls_port)
    for url in (f"http://127.0.0.1:{port}/", f"https://127.0.0.1:{tls_port}/"):
        # -m 30: the same request 30 times, each a stream of one connection
        out = subprocess.run([NGHTTP, "-y", "-m", "30", url], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert Counter(re.findall(r"b[123]", out.stdout)) == {"b1": 10, "b2": 10, "b3": 10}, out.stdout
    verbose = subprocess.run(
        [NGHTTP, "-v", f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=30
    )
    assert verbose.returncode == 0 and "recv SETTINGS frame" in verbose.stdout, verbose.stdout


# --- translation ---------------------------------------------------------------------------------


def test_h2_client_to_http11_backend(fastlb, hb):
    b = hb("b1")
    port = free_port()
    fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address])), port)
    with H2Client(port, authority="app.test:8080") as c:
        r = c.get(
            "/headers?q=1",
            [("x-forwarded-for", "1.2.3.4"), ("cookie", "a=1"), ("cookie", "b=2"), ("x-custom", "yes")],
        )
        assert r.status == 200, r
        # no connection-specific header may reach an h2 client (the h2 library would refuse it)
        assert r.header("connection") is None and r.header("keep-alive") is None
        post = c.wait(c.request("POST", "/echo", [("content-type", "text/plain")], b"posted body"))[0]
        assert (post.status, bytes(post.body)) == (200, b"posted body")
    req = b.received[0]
    assert req.version == "HTTP/1.1" and req.target == "/headers?q=1" and req.method == "GET"
    assert req.header_all("host") == ["app.test:8080"]  # :authority becomes Host
    assert all(not n.startswith(":") for n, _ in req.headers), req.headers
    assert req.header_all("x-custom") == ["yes"]
    # RFC 9113 8.2.3: cookie crumbs are joined into one header for HTTP/1.1
    assert req.header_all("cookie") == ["a=1; b=2"]
    assert req.header_all("x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert req.header_all("x-forwarded-proto") == ["http"]
    assert any("for=127.0.0.1;proto=http" in v for v in req.header_all("forwarded")), req.headers
    assert re.fullmatch(r"[0-9a-f]{32}", req.header("x-request-id") or ""), req.headers
    assert re.fullmatch(r"(2|2\.0) fastlb-[0-9a-f]{8}", req.header("via") or ""), req.header("via")
    echo = b.received[1]
    assert echo.body == b"posted body" and echo.header("content-type") == "text/plain"


def test_http11_client_to_h2_pool(fastlb, h2b):
    b = h2b("h2")
    port = free_port()
    fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address], http_version="2")), port)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(
            "GET", "/headers?q=1", headers={"Host": "app.test", "X-Custom": "yes", "Connection": "keep-alive"}
        )
        r = c.getresponse()
        body = r.read()
        assert r.status == 200 and r.getheader("x-backend") == "h2", body
        # chunked upload: the body arrives whole over h2
        c.putrequest("POST", "/echo")
        c.putheader("Transfer-Encoding", "chunked")
        c.endheaders()
        for part in (b"abc", b"defg", b""):
            c.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"abcdefg")
        # trailers from an h2 backend: the body arrives intact over HTTP/1.1
        c.request("GET", "/trailers", headers={"Host": "app.test"})
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"h2")
    finally:
        c.close()
    got = dict(b.received[0].headers)
    assert (got[":method"], got[":path"], got[":scheme"], got[":authority"]) == (
        "GET",
        "/headers?q=1",
        "http",
        "app.test",
    )
    assert got["x-custom"] == "yes" and got["x-forwarded-for"] == "127.0.0.1"
    # connection-specific headers never reach an h2 peer (RFC 9113 8.2.2); Host, if kept, agrees
    assert not {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"} & set(got), (
        got
    )
    assert got.get("host", "app.test") == "app.test", got
    assert b.received[1].body == b"abcdefg"
    assert b.connections == 1, "one h2 connection to the backend carries every request"


@pytest.mark.parametrize(
    ("client", "pool_version"),
    [("h2c", "1.1"), ("h2-tls", "1.1"), ("h1", "2"), ("h2c", "2")],
    ids=["h2c-to-h1", "h2-tls-to-h1", "h1-to-h2", "h2c-to-h2"],
)
def test_16_mib_bodies_byte_exact(fastlb, hb, h2b, certs, client, pool_version):
    backend = h2b("big") if pool_version == "2" else hb("big")
    port, tls_port = free_port(), free_port()
    tls = {"certificates": [certs.issue("site", "site.test")]}
    cfg = config(
        listener("web", port, "http", "app"),
        listener("tls", tls_port, "https", "app", tls=tls),
        pool("app", [backend.address], http_version=pool_version, timeouts={"connect": "1s", "read": "60s"}),
    )
    fastlb(cfg, tls_port)
    upload = os.urandom(BIG)
    if client == "h1":
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            c.request("POST", "/echo", body=upload)
            r = c.getresponse()
            echoed, status = r.read(), r.status
            c.request("GET", f"/big/{BIG}")
            r = c.getresponse()
            downloaded = r.read()
        finally:
            c.close()
    else:
        tls_client = client == "h2-tls"
        base = f"https://127.0.0.1:{tls_port}" if tls_client else f"http://127.0.0.1:{port}"
        # over TLS: SNI and the certificate check for site.test, the connection to 127.0.0.1
        ext = {"sni_hostname": "site.test"} if tls_client else {}
        verify = certs.client_context() if tls_client else True
        with httpx.Client(http1=False, http2=True, verify=verify, timeout=60) as h:
            r = h.post(base + "/echo", content=upload, extensions=ext)
            assert r.http_version == "HTTP/2"
            echoed, status = r.content, r.status_code
            downloaded = h.get(base + f"/big/{BIG}", extensions=ext).content
    assert status == 200
    assert sha(echoed) == sha(upload), f"upload echoed {len(echoed)} of {BIG} bytes"
    assert sha(downloaded) == sha(payload(BIG)), f"downloaded {len(downloaded)} of {BIG} bytes"
    assert sha(backend.received[0].body) == sha(upload)


# --- routes, forwarding and balancing per stream -------------------------------------------------


def test_routes_and_x_forwarded_for_apply_to_h2_requests(fastlb, hb):
    app, api, static, canary = hb("app"), hb("api"), hb("static"), hb("canary")
    port = free_port()
    routes = [
        {"headers": {"x-canary": "1"}, "pool": "canary"},
        {"host": "api.test", "pool": "api"},
        {"path_prefix": "/static/", "pool": "static"},
    ]
    cfg = config(
        listener("web", port, "http", "app", routes=routes),
        pool("app", [app.address]),
        pool("api", [api.address]),
        pool("static", [static.address]),
        pool("canary", [canary.address]),
    )
    fastlb(cfg, port)
    with H2Client(port, authority="www.test") as c:
        assert bytes(c.get("/").body) == b"app"
        assert bytes(c.get("/static/a.css").body) == b"static"
        assert bytes(c.get("/", [("x-canary", "1")]).body) == b"canary"
        r = c.get("/headers", [("x-forwarded-for", "203.0.113.7")])
        assert seen(bytes(r.body), "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
    with H2Client(port, authority="api.test") as c:  # host routes match :authority
        assert bytes(c.get("/static/x").body) == b"api"
    assert [r.target for r in static.received] == ["/static/a.css"]


def test_streams_of_one_connection_spread_over_three_backends(fastlb, hb):
    backends = [hb(f"b{i}") for i in (1, 2, 3)]
    port = free_port()
    fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address for b in backends])), port)
    names: Counter[str] = Counter()
    with H2Client(port) as c:
        for _ in range(6):  # 50 streams open at once, six times
            for r in c.wait([c.request("GET", "/") for _ in range(50)], timeout=30):
                assert r.status == 200, r
                names[bytes(r.body).decode()] += 1
    assert names == {"b1": 100, "b2": 100, "b3": 100}, names
    # HTTP/1.1 keep-alive to each backend: far fewer connections than requests
    assert all(b.connections < 60 for b in backends), [b.connections for b in backends]


# --- settings and limits -------------------------------------------------------------------------


def test_settings_advertise_the_configured_limits_and_windows(fastlb, hb):
    b = hb("b1")
    port = free_port()
    cfg = config(
        listener("web", port, "http", "app", http2={"max_concurrent_streams": 7}), pool("app", [b.address])
    )
    fastlb(cfg, port)
    with RawH2(port) as raw:
        time.sleep(0.3)
        settings = next(f for f in raw.frames if f.kind == SETTINGS and not f.flags & 1)
        values = {
            int.from_bytes(settings.payload[i : i + 2], "big"): int.from_bytes(
                settings.payload[i + 2 : i + 6], "big"
            )
            for i in range(0, len(settings.payload), 6)
        }
        assert values.get(MAX_CONCURRENT_STREAMS) == 7, values
        assert values.get(INITIAL_WINDOW_SIZE) == 1 << 20, values  # 1 MiB per stream
        window = sum(
            int.from_bytes(f.payload, "big") & 0x7FFFFFFF
            for f in raw.frames
            if f.kind == WINDOW_UPDATE and f.stream == 0
        )
        assert window + 65535 >= 16 << 20, window  # 16 MiB for the connection
        # Beyond 7 open streams: REFUSED_STREAM, and the 7 are served.
        streams = [raw.new_stream() for _ in range(8)]
        raw.send(b"".join(raw.headers_frame(s, path="/sleep/500") for s in streams))
        assert raw.wait_stream(streams[-1], 5)
        assert raw.resets.get(streams[-1]) == REFUSED_STREAM, raw.resets
        assert all(raw.wait_stream(s, 5) for s in streams[:7])
        assert [raw.status(s) for s in streams[:7]] == [200] * 7
        assert not raw.ended(), raw.goaway  # refusing streams is no reason to end the connection


def test_oversized_header_list_is_refused_and_the_connection_serves_on(fastlb, hb):
    b = hb("b1")
    port = free_port()
    fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address])), port)
    with RawH2(port) as raw:
        big = raw.new_stream()
        # 100 KiB of header list in one small HEADERS frame: the field enters the HPACK table
        # once and is then referenced by index (so this is the header-list limit at work, not the
        # CONTINUATION limit)
        block = raw.header_block(path="/too-big", extra=(("x-big", "v" * 1000),) * 100)
        assert len(block) < 16384
        raw.send(frame(HEADERS, END_HEADERS | END_STREAM, big, block))
        assert raw.wait_stream(big, 5), (
            f"no 431 nor stream reset for an oversized header list ({raw.goaway=})"
        )
        assert raw.status(big) == 431 or big in raw.resets, (raw.status(big), raw.resets)
        ok = raw.new_stream()
        raw.send(raw.headers_frame(ok, path="/fine"))
        if not raw.ended():  # a connection error is also allowed; then a new connection serves
            assert raw.wait_stream(ok, 5) and raw.status(ok) == 200
    assert "/too-big" not in [r.target for r in b.received]
    with H2Client(port) as c:
        assert c.get("/").status == 200


# --- access log and metrics ----------------------------------------------------------------------


def test_access_log_says_http2(fastlb, hb, tmp_path):
    b = hb("b1")
    port = free_port()
    log = tmp_path / "access.log"
    fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address]), access_log=log), port)
    with H2Client(port) as c:
        assert c.get("/over-h2").status == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/over-h1")
    assert conn.getresponse().read() == b"b1"
    conn.close()
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 2)
    lines = {line["path"]: line for line in map(json.loads, log.read_text().splitlines())}
    assert lines["/over-h2"]["protocol"] == "HTTP/2" and lines["/over-h2"]["status"] == 200
    assert lines["/over-h1"]["protocol"] == "HTTP/1.1"
    assert "grpc_status" not in lines["/over-h2"]


def test_http2_metrics_streams_active_and_resets(fastlb, hb, h2b):
    b, h2 = hb("b1"), h2b("h2")
    port, admin = free_port(), free_port()
    routes = [{"path_prefix": "/reset", "pool": "h2"}]
    cfg = config(
        listener("web", port, "http", "app", routes=routes),
        pool("app", [b.address]),
        pool("h2", [h2.address], http_version="2"),
        admin=admin,
    )
    fastlb(cfg, port)
    with H2Client(port) as c:
        slow = c.request("GET", "/sleep/1500")
        assert wait_until(
            lambda: c.pump(0.01) and metric(admin, "fastlb_http2_streams_active", listener="web") >= 1, 5
        )
        assert metric(admin, "fastlb_http2_connections_active", listener="web") >= 1
        assert c.wait(slow)[0].status == 200
        # a stream the client resets
        gone = c.request("GET", "/sleep/3000")
        time.sleep(0.2)
        c.reset(gone, CANCEL)
        # a stream the (h2) backend resets: the client's stream is reset too, not ended cleanly
        r = c.wait(c.request("GET", "/reset"))[0]
        assert r.reset is not None, r
        assert c.get("/").status == 200
    assert wait_until(lambda: metric(admin, "fastlb_http2_resets_total", listener="web", side="client") >= 1)
    assert wait_until(lambda: metric(admin, "fastlb_http2_resets_total", listener="web", side="backend") >= 1)
    assert wait_until(lambda: metric(admin, "fastlb_http2_streams_active", listener="web") == 0, 5)
    assert metric(admin, "fastlb_http2_streams_total", listener="web") >= 4
    # h2 requests are counted like any other
    assert metric(admin, "fastlb_requests_total") >= 3


# --- graceful GOAWAY -----------------------------------------------------------------------------


def test_goaway_on_stop_lets_the_in_flight_stream_finish(fastlb, hb):
    b = hb("b1")
    port = free_port()
    lb = fastlb(config(listener("web", port, "http", "app"), pool("app", [b.address])), port)
    with RawH2(port) as raw:
        done = raw.new_stream()
        raw.send(raw.headers_frame(done, path="/"))
        assert raw.wait_stream(done, 5) and raw.status(done) == 200
        inflight = raw.new_stream()
        raw.send(raw.headers_frame(inflight, path="/sleep/1000"))
        time.sleep(0.3)
        lb.proc.send_signal(signal.SIGTERM)
        assert raw.wait_ended(5), "no GOAWAY on stop"
        assert raw.goaway is not None, "closed without a GOAWAY"
        last, code = raw.goaway
        assert code == NO_ERROR and last >= inflight, raw.goaway
        assert raw.wait_stream(inflight, 10) and raw.status(inflight) == 200
        assert bytes(raw.bodies[inflight]) == b"b1"
        assert raw.wait_closed(10)
    code, err = lb.stop()
    assert code == 0, err


def test_goaway_when_a_reload_removes_the_listener(fastlb, hb):
    b = hb("b1")
    keep, gone = free_port(), free_port()
    cfg = config(
        listener("keep", keep, "http", "app"), listener("gone", gone, "http", "app"), pool("app", [b.address])
    )
    lb = fastlb(cfg, keep)
    wait_port(gone)
    with RawH2(gone) as raw:
        inflight = raw.new_stream()
        raw.send(raw.headers_frame(inflight, path="/sleep/1000"))
        time.sleep(0.3)
        lb.config_path.write_text(config(listener("keep", keep, "http", "app"), pool("app", [b.address])))
        lb.proc.send_signal(signal.SIGHUP)
        assert raw.wait_ended(10), "no GOAWAY when the listener was removed"
        assert raw.goaway is not None and raw.goaway[1] == NO_ERROR, raw.goaway
        assert raw.wait_stream(inflight, 10) and raw.status(inflight) == 200
        assert raw.wait_closed(10), "the connection outlived its removed listener"
    with H2Client(keep) as c:
        assert c.get("/").status == 200
    assert wait_until(lambda: _refused(gone), 10)


def _refused(port: int) -> bool:
    try:
        wait_port(port, timeout=0.1)
    except TimeoutError:
        return True
    return False
