"""L7 (HTTP/1.1) proxying through a real `fastlb serve` process, against real HTTP backends.

Each test starts its own backends (tests/httpbackend.py, which record every request they got
whole) and its own fastlb with two workers; clients are raw sockets (framing under test
control), http.client and curl.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from httpbackend import payload
from httputil import Background, RawConn, exchange, get, http_config, names_over, pool, request_bytes

from conftest import free_port

HOST = ("Host", "test.local")


@pytest.fixture
def lb(fastlb) -> Callable[..., int]:
    """`lb(pools, **http_config kwargs)` starts fastlb with one http listener; returns its port."""

    def start(pools: list[str], **kw: Any) -> int:
        port = free_port()
        fastlb(http_config(port, pools, **kw), port)
        return port

    return start


def headers_seen(req_headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in req_headers if n.lower() == name.lower()]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# --- the backend itself (so a backend bug is not taken for a proxy bug) ----------------------


def test_backend_answers_each_path_directly(hb):
    b = hb("b1")
    assert get(b.port)[2] == b"b1"
    status, hdrs, body, _ = get(b.port, "/headers", {"X-Mixed-Case": "v"})
    assert status == 200 and ["X-Mixed-Case", "v"] in json.loads(body)
    assert get(b.port, "/echo", method="POST", body=b"hello")[2] == b"hello"
    status, hdrs, body, _ = get(b.port, "/chunked")
    assert hdrs["transfer-encoding"] == "chunked" and body == b"part1part2b1"
    assert get(b.port, "/big/100000")[2] == payload(100000)
    status, hdrs, body, _ = get(b.port, "/status/204")
    assert status == 204 and body == b""
    assert get(b.port, "/status/418")[0] == 418
    assert get(b.port, "/ws")[2] == b"no-upgrade"
    assert get(b.port, "/sleep/50")[2] == b"b1"

    with RawConn(b.port) as c:  # keep-alive, HEAD, chunked request body, until-close
        c.send(request_bytes("HEAD", "/big/10", [HOST]))
        r = c.read_response("HEAD")
        assert r.header("content-length") == "10" and r.body == b""
        c.send(request_bytes("POST", "/echo", [HOST, ("Transfer-Encoding", "chunked")]))
        c.send(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        assert c.read_response().body == b"abcde"
        c.send(request_bytes("GET", "/until-close", [HOST]))
        r = c.read_response()
        assert r.header("content-length") is None and r.body == b"until-close:b1"
    assert b.received[-2].body == b"abcde"
    assert b.received[-2].header("transfer-encoding") == "chunked"

    with RawConn(b.port) as c:  # /die records and closes; /ws upgrades and echoes
        c.send(request_bytes("GET", "/die", [HOST]))
        assert c.read_to_eof() == b""
    assert b.paths()[-1] == "/die"
    with RawConn(b.port) as c:
        c.send(request_bytes("GET", "/ws", [HOST, ("Upgrade", "websocket"), ("Connection", "Upgrade")]))
        assert c.read_head().status == 101
        c.send(b"ping")
        assert c.read_exact(4) == b"ping"
    assert b.bad == 0


def test_backend_modes_reset_kill_and_close(hb):
    r = hb("r", mode="reset")
    # The reset surfaces in whichever call meets it first (even connect); after that, EOF.
    reset, data = False, b""
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            try:
                s.sendall(request_bytes())
            except (ConnectionResetError, BrokenPipeError):
                reset = True
            try:
                data = s.recv(100)
            except ConnectionResetError:
                reset = True
    except ConnectionResetError:
        reset = True
    assert reset and data == b""
    assert wait_for(lambda: r.connections == 1) and r.received == []

    o = hb("o", status_override=503)
    assert get(o.port, "/anything")[:3:2] == (503, b"o")

    k = hb("k")
    with RawConn(k.port) as c:
        c.send(request_bytes("GET", "/sleep/10000", [HOST]))
        assert wait_for(lambda: len(k.received) == 1)
        k.kill()
        with pytest.raises(ConnectionResetError):
            c.sock.recv(100)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", k.port), timeout=5).close()

    c2 = hb("c")
    c2.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", c2.port), timeout=5).close()


# --- 1. forwarding and upstream keep-alive ---------------------------------------------------


def test_curl_basic_get(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    out = subprocess.run(
        ["curl", "-sS", "-w", " %{http_code}", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "b1 200"


def test_round_robin_alternates_on_one_keepalive_connection(hb, lb):
    b1, b2 = hb("b1"), hb("b2")
    port = lb([pool("app", [b1.address, b2.address])])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    names = []
    for _ in range(10):
        c.request("GET", "/")
        names.append(c.getresponse().read().decode())
    c.close()
    assert set(names) == {"b1", "b2"}
    assert all(a != b for a, b in itertools.pairwise(names)), names


def test_upstream_connections_are_kept_alive(hb, lb):
    b1, b2 = hb("b1"), hb("b2")
    port = lb([pool("app", [b1.address, b2.address])])
    for _ in range(4):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(50):
            c.request("GET", "/")
            r = c.getresponse()
            assert r.status == 200 and r.read() in (b"b1", b"b2")
        c.close()
    assert len(b1.received) + len(b2.received) == 200
    assert b1.connections + b2.connections < 20, (b1.connections, b2.connections)


# --- 2. request headers the backend sees ------------------------------------------------------


def test_backend_closing_kept_alive_connections_loses_no_request(hb, lb):
    """A backend that closes every connection after answering, without `Connection: close`:
    each reuse finds a dead connection, and each request (POST included) still gets exactly one
    answer and reaches the backend exactly once."""
    b = hb("b1", mode="one-shot")
    port = lb([pool("app", [b.address])], workers=1)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for n in range(20):
            if n % 2:
                c.request("POST", f"/echo?n={n}", body=f"body {n}".encode())
                want = f"body {n}".encode()
            else:
                c.request("GET", f"/?n={n}")
                want = b"b1"
            r = c.getresponse()
            assert (r.status, r.read()) == (200, want), n
    finally:
        c.close()
    assert sorted(req.target for req in b.received) == sorted(
        [f"/echo?n={n}" for n in range(1, 20, 2)] + [f"/?n={n}" for n in range(0, 20, 2)]
    )


def test_forwarding_headers_added(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    _, _, body, _ = get(port, "/headers", {"X-Forwarded-For": "1.2.3.4"})
    seen = [tuple(h) for h in json.loads(body)]
    assert headers_seen(seen, "x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert headers_seen(seen, "x-forwarded-proto") == ["http"]
    assert any("for=127.0.0.1;proto=http" in v for v in headers_seen(seen, "forwarded")), seen

    _, _, body, _ = get(port, "/headers")
    seen = [tuple(h) for h in json.loads(body)]
    assert headers_seen(seen, "x-forwarded-for") == ["127.0.0.1"]


def test_request_id_kept_or_generated_and_via_token_stable(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    get(port, "/", {"X-Request-Id": "client-id-123"})
    assert b.received[-1].header_all("x-request-id") == ["client-id-123"]
    ids, vias = [], set()
    for _ in range(10):  # fresh connections: spread over both workers
        get(port, "/")
        req = b.received[-1]
        ids += req.header_all("x-request-id")
        vias.update(req.header_all("via"))
    assert len(ids) == 10 and len(set(ids)) == 10, ids
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(vias) == 1, vias
    assert re.fullmatch(r"1\.1 fastlb-[0-9a-f]{8}", vias.pop())


def test_hop_by_hop_headers_removed_and_host_unchanged(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(
            request_bytes(
                "GET",
                "/",
                [
                    ("Host", "example.test:1234"),
                    ("Connection", "x-secret"),
                    ("X-Secret", "1"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Connection", "keep-alive"),
                    ("TE", "trailers"),
                    ("X-Kept", "yes"),
                ],
            )
        )
        assert c.read_response().status == 200
    req = b.received[-1]
    names = {n.lower() for n, _ in req.headers}
    assert not names & {"x-secret", "keep-alive", "proxy-connection", "te"}, req.headers
    assert all("x-secret" not in v.lower() for v in req.header_all("connection")), req.headers
    assert req.header_all("host") == ["example.test:1234"]
    assert req.header_all("x-kept") == ["yes"]


# --- 3. loop detection ------------------------------------------------------------------------


def test_own_via_token_gets_508_and_is_not_forwarded(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    assert get(port, "/", {"Via": "1.0 other-proxy"})[0] == 200  # someone else's Via is fine
    own = next(v for v in b.received[-1].header_all("via") if "fastlb-" in v)
    token = re.search(r"fastlb-[0-9a-f]{8}", own).group(0)
    before = len(b.received)
    status, _, _, _ = get(port, "/", {"Via": f"1.1 {token}"})
    assert status == 508
    status, _, _, _ = get(port, "/", {"Via": f"1.0 other, 1.1 {token}"})
    assert status == 508
    assert len(b.received) == before


# --- 4. response framing ----------------------------------------------------------------------


def test_chunked_response_via_curl_and_http_client(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    out = subprocess.run(
        ["curl", "-sS", "--raw", "-D", "-", f"http://127.0.0.1:{port}/chunked"],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{port}/chunked"], capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"part1part2b1", out
    status, _, body, _ = get(port, "/chunked")
    assert (status, body) == (200, b"part1part2b1")


def test_until_close_response_is_whole_then_closed(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(request_bytes("GET", "/until-close", [HOST]))
        head = c.read_head()
        assert head.status == 200
        rest = c.read_to_eof()
    if "chunked" in (head.header("transfer-encoding") or "").lower():  # re-framed by fastlb
        assert rest == b"e\r\nuntil-close:b1\r\n0\r\n\r\n" or (
            b"until-close:b1" in rest.replace(b"\r\n", b"") and rest.endswith(b"0\r\n\r\n")
        ), rest
    else:
        assert rest == b"until-close:b1"
    assert b.paths() == ["/until-close"]


def test_big_response_is_byte_exact(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    status, _, body, _ = get(port, "/big/8388608", timeout=60)
    assert status == 200 and len(body) == 8388608 and body == payload(8388608)


def test_head_and_bodiless_statuses_keep_the_connection_usable(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(request_bytes("HEAD", "/big/1000", [HOST]))
        r = c.read_response("HEAD")
        assert r.status == 200 and r.body == b""
        for code in (204, 304):
            c.send(request_bytes("GET", f"/status/{code}", [HOST]))
            assert c.read_response().status == code
        c.send(request_bytes("GET", "/", [HOST]))
        r = c.read_response()
        assert (r.status, r.body) == (200, b"b1")
        assert c.buf == b""  # no stray body bytes after a HEAD/204/304
    status, _, body, _ = get(port, "/status/204")
    assert (status, body) == (204, b"")


def test_http10_client(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(b"GET / HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"b1")
        assert c.closed_by_peer()
    with RawConn(port) as c:
        for _ in range(2):
            c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            r = c.read_response()
            assert (r.status, r.body) == (200, b"b1")


def test_client_connection_close_is_honoured(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(request_bytes("GET", "/", [HOST, ("Connection", "close")]))
        r = c.read_response()
        assert (r.status, r.body) == (200, b"b1")
        assert c.closed_by_peer()


# --- 5. pipelining ----------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    ids = ["pipe-1", "pipe-2", "pipe-3"]
    with RawConn(port) as c:
        c.send(b"".join(request_bytes("GET", "/headers", [HOST, ("X-Request-Id", i)]) for i in ids))
        got = []
        for _ in ids:
            r = c.read_response()
            assert r.status == 200
            got.append(headers_seen([tuple(h) for h in r.json()], "x-request-id"))
    assert got == [[i] for i in ids]


def test_close_request_with_more_pipelined_behind_it(hb, lb):
    """`Connection: close` ends the connection after its answer, which arrives whole (no reset
    from the unread requests behind it); those never reach a backend."""
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(
            b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n" * 2000  # beyond one read buffer
        )
        r = c.read_response()
        assert (r.status, r.body) == (200, b"b1")
        assert c.read_to_eof() == b""
        assert not c.reset
    assert [req.target for req in b.received] == ["/first"]


def test_pipelined_requests_to_different_pools_in_order(hb, lb):
    a, s = hb("slow-pool"), hb("fast-pool")
    port = lb(
        [pool("app", [a.address]), pool("fast", [s.address])],
        routes=[{"path_prefix": "/fast/", "pool": "fast"}],
    )
    paths = ["/sleep/300", "/fast/x", "/sleep/100", "/fast/y"]
    with RawConn(port) as c:
        c.send(b"".join(request_bytes("GET", p, [HOST]) for p in paths))
        bodies = [c.read_response().body for _ in paths]
    assert bodies == [b"slow-pool", b"fast-pool", b"slow-pool", b"fast-pool"]


# --- 6. request bodies ------------------------------------------------------------------------


def test_request_bodies_content_length_chunked_and_large(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    assert get(port, "/echo", method="POST", body=b"hello world")[2] == b"hello world"
    with RawConn(port) as c:
        c.send(request_bytes("POST", "/echo", [HOST, ("Transfer-Encoding", "chunked")]))
        c.send(b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"hello world")
    assert b.received[-1].body == b"hello world"
    with RawConn(port) as c:  # a body, then the next request on the same connection
        c.send(
            request_bytes("POST", "/echo", [HOST, ("Content-Length", "7")], b"GET /x ")
            + request_bytes("GET", "/after", [HOST])
        )
        assert c.read_response().body == b"GET /x "
        assert c.read_response().body == b"b1"
    assert b.paths()[-2:] == ["/echo", "/after"]
    big = payload(1 << 20, seed=11)
    status, _, body, _ = get(port, "/echo", method="PUT", body=big, timeout=60)
    assert status == 200 and body == big
    assert b.received[-1].body == big
    assert b.bad == 0


# --- 7. Expect: 100-continue -----------------------------------------------------------------


def test_expect_100_continue_answered_by_fastlb(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port, timeout=10) as c:
        c.send(request_bytes("POST", "/echo", [HOST, ("Content-Length", "5"), ("Expect", "100-continue")]))
        interim = c.read_head()
        assert interim.status == 100, interim
        c.send(b"abcde")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"abcde")
    assert b.received[-1].header("expect") is None, b.received[-1].headers


# --- 8. WebSocket (Upgrade) -------------------------------------------------------------------


def test_websocket_upgrade_tunnels_both_ways(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    ws_headers = [
        HOST,
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    with RawConn(port) as c:
        c.send(request_bytes("GET", "/ws", ws_headers))
        r = c.read_head()
        assert r.status == 101
        assert (r.header("upgrade") or "").lower() == "websocket"
        for i in range(5):
            msg = f"ping-{i}".encode()
            c.send(msg)
            assert c.read_exact(len(msg)) == msg
        big = payload(300_000, seed=5)
        c.send(big)
        assert c.read_exact(len(big)) == big
    # an Upgrade to a path whose backend does not switch is an ordinary response
    with RawConn(port) as c:
        c.send(request_bytes("GET", "/", ws_headers))
        r = c.read_response()
        assert (r.status, r.body) == (200, b"b1")


# --- 9. malformed and ambiguous requests -------------------------------------------------------

_G = b"GET / HTTP/1.1\r\nHost: x\r\n"
MALFORMED = {
    "cl_and_te": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two_cl": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl_list": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl_plus": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "cl_abc": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello",
    "te_gzip_chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "te_identity": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    "obs_fold": _G + b"X-A: 1\r\n  continued\r\n\r\n",
    "space_before_colon": _G + b"X-A : 1\r\n\r\n",
    "nul_in_value": _G + b"X-A: a\x00b\r\n\r\n",
    "bare_cr_in_value": _G + b"X-A: a\rb\r\n\r\n",
    "http11_without_host": b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "version_9_9": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "garbage_line": b"GARBAGE\r\nHost: x\r\n\r\n",
    "double_space_line": b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    "smuggling_cl0_te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "head_over_64k": _G + b"X-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
    "101_headers": _G + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
}
TOO_LARGE = {"head_over_64k", "101_headers"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_refused_and_never_forwarded(hb, lb, case):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    assert get(port, "/")[0] == 200  # the backend works
    before = len(b.received)
    with RawConn(port) as c:
        # refused before it was all sent? the answer must still be readable
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            c.send(MALFORMED[case])
        r = c.read_head()
        want = {431} if case in TOO_LARGE else {400}
        if case == "version_9_9":
            want = {400, 505}  # RFC 9110 15.6.6 allows 505 too
        if case == "te_gzip_chunked":
            want = {400, 501}  # chunked is final: an unsupported coding, RFC 9112 6.1 allows 501
        assert r.status in want, (r.status, r.raw_head)
        assert r.header("x-backend") is None, "the backend answered, not fastlb"
        cl = r.header("content-length")
        if cl is not None:
            c.read_exact(int(cl))
        assert c.closed_by_peer(), "fastlb kept the connection open after a malformed request"
    time.sleep(0.2)  # anything forwarded by mistake would have arrived by now
    assert len(b.received) == before, [r.target for r in b.received[before:]]
    assert "/smuggled" not in b.paths()
    assert b.bad == 0, "the malformed bytes reached the backend"


def test_header_count_below_the_limit_is_fine(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    r = exchange(port, _G + b"".join(b"X-H%d: v\r\n" % i for i in range(90)) + b"\r\n")
    assert (r.status, r.body) == (200, b"b1")
    assert len(b.received[-1].header_all("x-h89")) == 1


@pytest.mark.parametrize("size_line", [b"zz", b"fffffffffffffffffff"])
def test_bad_chunk_size_is_not_forwarded_as_a_request(hb, lb, size_line):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        c.send(size_line + b"\r\nhello\r\n0\r\n\r\n")
        try:
            r = c.read_head()
        except Exception:  # closed without an answer is acceptable too
            r = None
        if r is not None:
            assert r.status == 400, (r.status, r.raw_head)
        assert c.read_to_eof() is not None  # and the connection ends (the timeout would raise)
    time.sleep(0.2)
    assert all(req.target != "/echo" for req in b.received), b.received
    assert b"hello" not in [req.body for req in b.received]


# --- 10. errors -------------------------------------------------------------------------------


def test_all_weights_zero_is_503(hb, lb):
    b1, b2 = hb("b1"), hb("b2")
    port = lb([pool("app", [{"address": b1.address, "weight": 0}, {"address": b2.address, "weight": 0}])])
    status, hdrs, body, _ = get(port, "/")
    assert status == 503 and body and "x-backend" not in hdrs
    assert b1.received == [] and b2.received == []


def test_max_connections_reached_without_queue_is_503(hb, lb):
    b = hb("b1")
    port = lb(
        [
            pool(
                "app",
                [{"address": b.address, "max_connections": 1}],
                queue={"size": 0, "timeout": "1s"},
            )
        ]
    )
    first = Background(lambda: get(port, "/sleep/1500")[:3:2])
    assert wait_for(lambda: len(b.received) == 1)
    status, hdrs, _, _ = get(port, "/")
    assert status == 503 and "x-backend" not in hdrs
    assert first.result() == (200, b"b1")
    assert b.paths() == ["/sleep/1500"]


def test_every_backend_refusing_is_502(lb):
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    port = lb([pool("app", dead, retries=2)])
    status, hdrs, body, _ = get(port, "/")
    assert status == 502 and body and "x-backend" not in hdrs


def test_slow_backend_is_504(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address], timeouts={"connect": "1s", "read": "500ms"}, retries=0)])
    status, hdrs, _, _ = get(port, "/sleep/3000")
    assert status == 504 and "x-backend" not in hdrs
    assert b.paths() == ["/sleep/3000"]


def test_rate_limit_429_with_retry_after(hb, lb):
    b = hb("b1")
    # 0.2/s: a refill takes 5 s, so "quick" holds even on a slow machine
    port = lb([pool("app", [b.address])], rate_limit={"requests_per_second": 0.2, "burst": 2})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    got = []
    for _ in range(3):
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        got.append((r.status, r.getheader("Retry-After")))
    c.close()
    assert [s for s, _ in got] == [200, 200, 429], got
    retry_after = got[2][1]
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, got
    assert len(b.received) == 2


@pytest.mark.parametrize(("timeout", "want"), [("200ms", 503), ("5s", 200)])
def test_queue_waits_for_a_free_slot_up_to_its_timeout(hb, lb, timeout, want):
    b = hb("b1")
    port = lb(
        [
            pool(
                "app",
                [{"address": b.address, "max_connections": 1}],
                queue={"size": 10, "timeout": timeout},
            )
        ]
    )
    first = Background(lambda: get(port, "/sleep/1500")[:3:2])
    assert wait_for(lambda: len(b.received) == 1)
    status, _, body, _ = get(port, "/")
    assert first.result() == (200, b"b1")
    assert status == want
    if want == 200:
        assert body == b"b1"
        assert b.paths() == ["/sleep/1500", "/"]
    else:
        assert b.paths() == ["/sleep/1500"]


# --- 11. retries -------------------------------------------------------------------------------


def test_get_retried_away_from_a_resetting_backend(hb, lb):
    bad, good = hb("bad", mode="reset"), hb("good")
    port = lb([pool("app", [bad.address, good.address], retries=2)])
    counts = names_over(port, 20, threads=1)
    assert counts == Counter({"good": 20})
    assert bad.connections > 0  # it was tried


def test_post_to_a_dying_backend_is_502_and_not_retried(hb, lb):
    b1, b2 = hb("b1"), hb("b2")
    port = lb([pool("app", [b1.address, b2.address], retries=2)])
    status, _, _, _ = get(port, "/die", method="POST", body=b"payload")
    assert status == 502
    assert len(b1.received) + len(b2.received) == 1


def test_get_to_dying_backends_is_retried_then_502(hb, lb):
    b1, b2 = hb("b1"), hb("b2")
    port = lb([pool("app", [b1.address, b2.address], retries=2)])
    status, _, _, _ = get(port, "/die")
    assert status == 502
    assert 2 <= len(b1.received) + len(b2.received) <= 3


def test_get_retried_on_503_from_one_backend(hb, lb):
    sick, good = hb("sick", status_override=503), hb("good")
    port = lb([pool("app", [sick.address, good.address], retries=2)])
    counts = names_over(port, 20, threads=1)
    assert counts == Counter({"good": 20})
    assert len(sick.received) > 0


def test_get_retried_when_backend_killed_mid_request(hb, lb):
    a, b = hb("a"), hb("b")
    port = lb([pool("app", [a.address, b.address], retries=2)])
    pending = Background(lambda: get(port, "/sleep/1000")[:3:2])
    assert wait_for(lambda: len(a.received) + len(b.received) == 1)
    victim, other = (a, b) if a.received else (b, a)
    victim.kill()
    assert pending.result() == (200, other.name.encode())
    assert other.paths() == ["/sleep/1000"]


# --- 12. routing -------------------------------------------------------------------------------

ROUTE_CASES = {
    "host_exact": (
        {"host": "api.example.com"},
        ("/", {"Host": "api.example.com"}),
        ("/", {"Host": "www.example.com"}),
    ),
    "host_wildcard": (
        {"host": "*.example.com"},
        ("/", {"Host": "a.example.com"}),
        ("/", {"Host": "a.example.org"}),
    ),
    "path_prefix": ({"path_prefix": "/api/"}, ("/api/users", {}), ("/apix", {})),
    "path_exact": ({"path_exact": "/exact"}, ("/exact?x=1", {}), ("/exact/more", {})),
    "path_regex": ({"path_regex": "^/v[0-9]+/items$"}, ("/v12/items", {}), ("/vx/items", {})),
    "headers": (
        {"headers": {"x-client": "mobile"}},
        ("/", {"X-CLIENT": "mobile"}),
        ("/", {"X-Client": "desktop"}),
    ),
    "cookies": (
        {"cookies": {"ab-test": "group-a"}},
        ("/", {"Cookie": "x=1; ab-test=group-a"}),
        ("/", {"Cookie": "ab-test=group-b"}),
    ),
    "query": ({"query": {"beta": "1"}}, ("/p?alpha=0&beta=1", {}), ("/p?beta=0", {})),
    "source_cidr": ({"source_cidr": ["127.0.0.1/32"]}, ("/", {}), None),
    "source_cidr_other": ({"source_cidr": ["10.0.0.0/8"]}, None, ("/", {})),
}


@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_route_condition(hb, lb, case):
    cond, match, miss = ROUTE_CASES[case]
    d, s = hb("default"), hb("special")
    port = lb(
        [pool("app", [d.address]), pool("special", [s.address])],
        routes=[{**cond, "pool": "special"}],
    )
    if match is not None:
        status, _, body, _ = get(port, match[0], match[1])
        assert (status, body) == (200, b"special"), match
    if miss is not None:
        status, _, body, _ = get(port, miss[0], miss[1])
        assert (status, body) == (200, b"default"), miss


def test_first_matching_route_wins_and_all_conditions_must_hold(hb, lb):
    d, p1, p2, p3 = hb("default"), hb("p1"), hb("p2"), hb("p3")
    port = lb(
        [
            pool("app", [d.address]),
            pool("p1", [p1.address]),
            pool("p2", [p2.address]),
            pool("p3", [p3.address]),
        ],
        routes=[
            {"path_prefix": "/a/", "headers": {"x-tier": "gold"}, "pool": "p3"},
            {"path_prefix": "/a/", "pool": "p1"},
            {"path_prefix": "/a/b/", "pool": "p2"},
        ],
    )
    assert get(port, "/a/b/c")[2] == b"p1"
    assert get(port, "/a/b/c", {"X-Tier": "gold"})[2] == b"p3"
    assert get(port, "/b/", {"X-Tier": "gold"})[2] == b"default"
    assert get(port, "/")[2] == b"default"


def test_split_95_5_over_10000_requests(hb, lb):
    v1, v2 = hb("v1"), hb("v2")
    port = lb(
        [pool("app", [v1.address]), pool("v1", [v1.address]), pool("v2", [v2.address])],
        routes=[{"path_prefix": "/", "split": [{"pool": "v1", "weight": 95}, {"pool": "v2", "weight": 5}]}],
    )
    counts = names_over(port, 10_000, threads=4)
    assert sum(counts.values()) == 10_000 and set(counts) <= {"v1", "v2"}, counts
    assert abs(counts["v2"] / 10_000 - 0.05) <= 0.015, counts


def test_ab_split_50_50(hb, lb):
    a, b = hb("A"), hb("B")
    port = lb(
        [pool("app", [a.address]), pool("a", [a.address]), pool("b", [b.address])],
        routes=[{"path_prefix": "/", "split": [{"pool": "a", "weight": 50}, {"pool": "b", "weight": 50}]}],
    )
    counts = names_over(port, 4000, threads=4)
    assert sum(counts.values()) == 4000, counts
    assert abs(counts["A"] / 4000 - 0.5) <= 0.05, counts


# --- 13. hash keys ------------------------------------------------------------------------------

HASH_CASES: dict[str, tuple[str, Callable[[str], tuple[str, dict[str, str]]]]] = {
    "header": ("header:x-user", lambda v: ("/", {"X-User": v})),
    "cookie": ("cookie:uid", lambda v: ("/", {"Cookie": f"a=1; uid={v}"})),
    "query": ("query:user", lambda v: (f"/q?x=1&user={v}", {})),
    "path": ("path", lambda v: (f"/items/{v}", {})),
}


@pytest.mark.parametrize("case", list(HASH_CASES))
def test_hash_key_pins_each_value(hb, lb, case):
    key, make = HASH_CASES[case]
    b1, b2 = hb("b1"), hb("b2")
    port = lb([pool("app", [b1.address, b2.address], algorithm="consistent_hash", hash_key=key)])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def ask(value: str) -> str:
        path, headers = make(value)
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        return body.decode()

    try:
        same = {ask("alice") for _ in range(50)}
        spread = Counter(ask(f"user-{i}") for i in range(50))
    finally:
        c.close()
    assert len(same) == 1, same
    assert set(spread) == {"b1", "b2"}, spread


# --- 14. cookie affinity ------------------------------------------------------------------------


def _cookie_token(set_cookie: str | None, name: str) -> str:
    assert set_cookie is not None, "no Set-Cookie"
    m = re.match(rf"\s*{name}=([^;]*)", set_cookie)
    assert m, set_cookie
    return m.group(1)


def test_cookie_affinity_sticks_and_moves_when_the_backend_goes(hb, lb):
    b1, b2 = hb("b1"), hb("b2")
    port = lb(
        [
            pool(
                "app",
                [b1.address, b2.address],
                affinity={"cookie": "FASTLB_SRV", "ttl": "1h"},
                timeouts={"connect": "1s", "read": "5s"},
                retries=2,
            )
        ]
    )
    status, hdrs, body, _ = get(port, "/")
    assert status == 200
    token = _cookie_token(hdrs.get("set-cookie"), "FASTLB_SRV")
    first = body.decode()
    chosen = b1 if first == "b1" else b2
    other = b2 if chosen is b1 else b1
    assert token and str(chosen.port) not in token and "127.0.0.1" not in token, token

    counts = names_over(port, 1000, threads=4, headers={"Cookie": f"FASTLB_SRV={token}"})
    assert counts == Counter({first: 1000})

    chosen.close()
    status, hdrs, body, _ = get(port, "/", {"Cookie": f"FASTLB_SRV={token}"})
    assert (status, body) == (200, other.name.encode())
    new_token = _cookie_token(hdrs.get("set-cookie"), "FASTLB_SRV")
    assert new_token != token
    counts = names_over(port, 50, threads=2, headers={"Cookie": f"FASTLB_SRV={new_token}"})
    assert counts == Counter({other.name: 50})


# --- 15. slowloris and idle keep-alive ----------------------------------------------------------


def test_slow_header_is_cut_off(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])], timeouts={"client_idle": "60s", "header_read": "1s"})
    with RawConn(port, timeout=15) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        rest = c.read_to_eof()  # a socket timeout (15 s) here fails the test
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]
    assert b.received == []


def test_head_sent_a_byte_at_a_time_is_served(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])])
    with RawConn(port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in b"GET /trickle HTTP/1.1\r\nHost: x\r\n\r\n":
            c.send(bytes([byte]))
            time.sleep(0.002)
        r = c.read_response()
    assert (r.status, r.body) == (200, b"b1")
    assert [req.target for req in b.received] == ["/trickle"]


def test_silent_new_connection_is_cut_off_after_header_read(hb, lb):
    """Before its first request a connection gets `header_read`, not the keep-alive idle time."""
    b = hb("b1")
    port = lb([pool("app", [b.address])], timeouts={"client_idle": "60s", "header_read": "1s"})
    with RawConn(port, timeout=15) as c:
        assert c.read_to_eof() == b""  # a socket timeout (15 s) here fails the test
    assert b.received == []


def test_idle_keepalive_connection_is_closed(hb, lb):
    b = hb("b1")
    port = lb([pool("app", [b.address])], timeouts={"client_idle": "1s", "header_read": "10s"})
    with RawConn(port, timeout=15) as c:
        c.send(request_bytes("GET", "/", [HOST]))
        assert c.read_response().body == b"b1"
        assert c.read_to_eof() == b""  # closed by fastlb well before the 15 s socket timeout


# --- reload -----------------------------------------------------------------------------------


def test_reload_applies_to_open_keepalive_connections(hb, fastlb):
    """A SIGHUP that adds a route takes effect at the next request of a connection that was
    opened before it, and that connection is not closed."""
    a, b = hb("a"), hb("b")
    port = free_port()
    pools = [pool("app", [a.address]), pool("new", [b.address])]
    proc = fastlb(http_config(port, pools), port)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/x")
    assert c.getresponse().read() == b"a"
    proc.config_path.write_text(http_config(port, pools, routes=[{"path_prefix": "/x", "pool": "new"}]))
    proc.proc.send_signal(signal.SIGHUP)

    def routed_to_new() -> bool:
        c.request("GET", "/x")
        return c.getresponse().read() == b"b"

    try:
        assert wait_for(routed_to_new), "the reloaded route never applied on the open connection"
    finally:
        c.close()
