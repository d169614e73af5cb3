"""HTTP/1 grammar at the edges, through a real `fastlb serve` and real backends.

What the contract promises for malformed input: 400, the connection closed, and nothing of it
at a backend. For a body that fastlb buffers (a request up to 64 KiB: the whole body is read and
checked before a backend is chosen) that is literal: the backend gets no byte. A larger body
streams through once a backend is chosen, so its head and the body bytes before the fault have
been forwarded when the fault arrives; what fastlb guarantees then is that the backend never
gets the malformed bytes nor a complete request: the upstream connection is closed mid-body.
`test_streamed_body_fault_is_cut_before_the_malformed_bytes` pins exactly that.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from httputil import PeerClosed, RawConn, http_config, pool

from backends import Backend
from conftest import free_port, wait_until

# --- fixtures and a recording backend --------------------------------------------------------


_LAST_CHUNK = re.compile(rb"\r\n0(;[^\r\n]*)?\r\n\r\n")
OK_REPLY = b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 2\r\n\r\nok"


class RawBackend:
    """Records every byte it receives, on every connection, and answers each request with
    `reply`. Its framing is only good for the requests of this file: a head, then a
    Content-Length body, or a chunked body without trailers (it ends at the first CRLF "0",
    maybe an extension, CRLF CRLF)."""

    def __init__(self, reply: bytes = OK_REPLY) -> None:
        self.reply = reply
        self.lock = threading.Lock()
        self._raw = bytearray()
        self._requests: list[bytes] = []
        self.closed_mid_request = 0  # connections that ended with a request unfinished
        # the listening socket and its threads: tests/backends.py, one handler per connection
        self.server = Backend(lambda conn, _: self._serve(conn), "raw")
        self.address = self.server.address

    @property
    def raw(self) -> bytes:
        with self.lock:
            return bytes(self._raw)

    @property
    def requests(self) -> list[bytes]:
        with self.lock:
            return list(self._requests)

    def close(self) -> None:
        self.server.close()

    @staticmethod
    def _take(buf: bytearray) -> bytes | None:
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return None
        head = bytes(buf[: i + 4]).lower()
        if b"\r\ntransfer-encoding: chunked\r\n" in head:
            m = _LAST_CHUNK.search(buf, i + 2)
            if m is None:
                return None
            end = m.end()
        elif b"\r\ncontent-length: " in head:
            n = int(head.split(b"\r\ncontent-length: ", 1)[1].split(b"\r\n", 1)[0])
            end = i + 4 + n
            if len(buf) < end:
                return None
        else:
            end = i + 4
        req = bytes(buf[:end])
        del buf[:end]
        return req

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    if buf:
                        with self.lock:
                            self.closed_mid_request += 1
                    return
                with self.lock:
                    self._raw += data
                buf += data
                while (req := self._take(buf)) is not None:
                    with self.lock:
                        self._requests.append(req)
                    with contextlib.suppress(OSError):
                        conn.sendall(self.reply)


@pytest.fixture
def raw_backend() -> Iterator[Callable[..., RawBackend]]:
    started: list[RawBackend] = []

    def start(reply: bytes = OK_REPLY) -> RawBackend:
        b = RawBackend(reply)
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


@pytest.fixture
def lb(fastlb) -> Callable[..., int]:
    """`lb(backend_address, **http_config kwargs)` starts fastlb with one http listener in
    front of one backend; returns the listener's port."""

    def start(address: str, **kw: Any) -> int:
        port = free_port()
        fastlb(http_config(port, [pool("app", [address])], workers=1, **kw), port)
        return port

    return start


CHUNKED_HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def warm_up(port: int) -> None:
    """One good request, so a later silence at the backend is not a dead backend (and the
    upstream connection fastlb keeps alive is open: refused bytes would have a way there)."""
    with RawConn(port) as c:
        c.send(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200


def assert_refused(port: int, data: bytes, status: int = 400) -> None:
    """`data` gets fastlb's own `status` (not a backend's), then the connection is closed."""
    with RawConn(port) as c:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            c.send(data)
        r = c.read_response()
        assert r.status == status, (r.status, r.raw_head)
        assert r.header("x-backend") is None, "a backend answered, not fastlb"
        assert c.closed_by_peer(), "fastlb kept the connection open after malformed input"


# --- 1. an empty line before the request line (RFC 9112 2.2) ---------------------------------


def test_one_leading_crlf_is_served_and_not_forwarded(raw_backend, lb):
    b = raw_backend()
    port = lb(b.address)
    with RawConn(port) as c:
        c.send(b"\r\nGET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.body, r.header("x-backend")) == (200, b"ok", "raw")
        # in two pieces, the empty line first (the head is parsed as it trickles in)
        c.send(b"\r\n")
        time.sleep(0.1)
        c.send(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200
    reqs = b.requests
    assert [r.split(b"\r\n", 1)[0] for r in reqs] == [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1"]
    assert all(r.startswith(b"GET /") for r in reqs), "the empty line was forwarded"
    assert b.raw == b"".join(reqs)
    assert b.closed_mid_request == 0


def test_crlf_after_a_body_before_the_next_request(hb, lb):
    """The case RFC 9112 2.2 has in mind: a client that ends a POST body with an extra CRLF."""
    b = hb("b1")
    port = lb(b.address)
    with RawConn(port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\n")
        c.send(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        r1, r2 = c.read_response(), c.read_response()
        assert (r1.status, r1.body) == (200, b"hello")
        assert r2.status == 200 and ["Host", "x"] in r2.json()
    assert [(r.method, r.target, r.version) for r in b.received] == [
        ("POST", "/echo", "HTTP/1.1"),
        ("GET", "/headers", "HTTP/1.1"),
    ]
    assert b.bad == 0


def test_access_log_method_after_a_leading_crlf(raw_backend, fastlb, tmp_path: Path):
    b = raw_backend()
    port = free_port()
    log_path = tmp_path / "access.log"
    cfg = http_config(port, [pool("app", [b.address])], workers=1)
    cfg = cfg.replace("[admin]", f'[log]\naccess_log = "{log_path}"\n\n[admin]')
    fastlb(cfg, port)
    with RawConn(port) as c:
        c.send(b"\r\nDELETE /item/7 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200
    assert wait_until(lambda: log_path.exists() and log_path.read_text().strip() != "", 5)
    line = json.loads(log_path.read_text().splitlines()[0])
    assert (line["method"], line["path"], line["status"]) == ("DELETE", "/item/7", 200)


@pytest.mark.parametrize(
    "prefix",
    [b"\r\n\r\n", b"\r\n\r\n\r\n", b"\n", b"\r\n\n", b"\n\r\n"],
    ids=["two_crlf", "three_crlf", "bare_lf", "crlf_lf", "lf_crlf"],
)
def test_more_than_one_empty_line_or_a_bare_lf_is_refused(raw_backend, lb, prefix):
    b = raw_backend()
    port = lb(b.address)
    warm_up(port)
    before = b.raw
    assert_refused(port, prefix + b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)  # anything forwarded by mistake would have arrived by now
    assert b.raw == before, "bytes of a refused request reached the backend"


def test_two_crlfs_after_a_request_on_a_kept_alive_connection(raw_backend, lb):
    b = raw_backend()
    port = lb(b.address)
    with RawConn(port) as c:
        c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200
        c.send(b"\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.read_response()
        assert r.status == 400 and r.header("x-backend") is None
        assert c.closed_by_peer()
    time.sleep(0.2)
    assert [r.split(b"\r\n", 1)[0] for r in b.requests] == [b"GET /first HTTP/1.1"]
    assert b"/never" not in b.raw


# --- 2. chunk extensions (RFC 9112 7.1.1) ------------------------------------------------------

BAD_CHUNKED = {
    # the two reported gaps
    "ext_without_name": b"2;\r\nab\r\n0\r\n\r\n",
    "ext_unbalanced_quote": b'2;a="b\r\nab\r\n0\r\n\r\n',
    # their siblings
    "ext_name_then_bws_only": b"2;a \r\nab\r\n0\r\n\r\n",
    "ext_equals_without_value": b"2;a=\r\nab\r\n0\r\n\r\n",
    "ext_bad_name_byte": b"2;a@b\r\nab\r\n0\r\n\r\n",
    "ext_token_then_quote": b'2;a=b"c"\r\nab\r\n0\r\n\r\n',
    "ext_escape_at_line_end": b'2;a="b\\\r\nab\r\n0\r\n\r\n',
    "ext_control_byte_in_quotes": b'2;a="\x01"\r\nab\r\n0\r\n\r\n',
    "ext_on_last_chunk": b"2\r\nab\r\n0;\r\n\r\n",
    "bws_without_ext": b"2 \r\nab\r\n0\r\n\r\n",
    # trailer section (RFC 9112 7.1.2: field lines)
    "trailer_no_colon": b"2\r\nab\r\n0\r\nNoColon\r\n\r\n",
    "trailer_obs_fold": b"2\r\nab\r\n0\r\nX-T: a\r\n folded\r\n\r\n",
    "trailer_leading_htab": b"2\r\nab\r\n0\r\n\tX-T: a\r\n\r\n",
    "trailer_space_before_colon": b"2\r\nab\r\n0\r\nX-T : a\r\n\r\n",
    "trailer_empty_name": b"2\r\nab\r\n0\r\n: a\r\n\r\n",
    "trailer_nul_in_value": b"2\r\nab\r\n0\r\nX-T: a\x00b\r\n\r\n",
    "trailer_bare_cr_in_value": b"2\r\nab\r\n0\r\nX-T: a\rb\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_CHUNKED))
def test_malformed_chunked_body_is_refused_and_nothing_reaches_the_backend(raw_backend, lb, case):
    b = raw_backend()
    port = lb(b.address)
    warm_up(port)
    before = b.raw
    # a pipelined request behind it must not be served either
    assert_refused(port, CHUNKED_HEAD + BAD_CHUNKED[case] + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    assert b.raw == before, f"reached the backend: {b.raw[len(before) :]!r}"


@pytest.mark.parametrize("case", ["ext_without_name", "ext_unbalanced_quote", "trailer_no_colon"])
def test_malformed_chunked_body_never_reaches_a_real_http_backend(hb, lb, case):
    """Against the parsing backend too: no request recorded, nothing it found malformed."""
    b = hb("b1")
    port = lb(b.address)
    warm_up(port)
    before = len(b.received)
    assert_refused(port, CHUNKED_HEAD + BAD_CHUNKED[case])
    time.sleep(0.2)
    assert len(b.received) == before and b.bad == 0


GOOD_CHUNKED = {
    "token_and_quoted": b'2;a=b;c="d e"\r\nab\r\n0\r\n\r\n',
    "bws_everywhere": b'2 \t; a = b ;c\t=\t"" ; d\r\nab\r\n0\r\n\r\n',
    "quoted_pairs_and_obs_text": b'2;q="a\\"b\\\\c\xe9"\r\nab\r\n0;last\r\n\r\n',
}


@pytest.mark.parametrize("case", list(GOOD_CHUNKED))
def test_valid_chunk_extensions_are_forwarded_byte_for_byte(raw_backend, lb, case):
    b = raw_backend()
    port = lb(b.address)
    with RawConn(port) as c:
        c.send(CHUNKED_HEAD + GOOD_CHUNKED[case])
        r = c.read_response()
        assert (r.status, r.body, r.header("x-backend")) == (200, b"ok", "raw")
    [req] = b.requests
    assert req.startswith(b"POST /echo HTTP/1.1\r\n")
    assert req.endswith(b"\r\n\r\n" + GOOD_CHUNKED[case]), req


def test_valid_trailers_are_forwarded(hb, lb):
    b = hb("b1")
    port = lb(b.address)
    body = b"2;a=b\r\nab\r\n0\r\nX-T: v 1\r\nX-Empty:\r\nX-Tab:\ta\tb \r\n\r\n"
    with RawConn(port) as c:
        c.send(CHUNKED_HEAD + body)
        r = c.read_response()
        assert (r.status, r.body) == (200, b"ab")
        # and the connection still carries the next request
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().body == b"b1"
    assert b.bad == 0 and [r.body for r in b.received] == [b"ab", b""]


# --- 3. a body that streams through: what fastlb can still guarantee ---------------------------

BIG = 70 * 1024  # over the 64 KiB fastlb buffers before choosing a backend
FILL = b"\x01"  # chunk data: a byte no head contains


@pytest.mark.parametrize(
    "fault",
    [b"2;\r\nab\r\n0\r\n\r\n", b'2;a="b\r\nab\r\n0\r\n\r\n', b"0\r\nNoColon\r\n\r\n"],
    ids=["ext_without_name", "ext_unbalanced_quote", "trailer_no_colon"],
)
def test_streamed_body_fault_is_cut_before_the_malformed_bytes(raw_backend, lb, fault):
    b = raw_backend()
    port = lb(b.address)
    first = CHUNKED_HEAD + f"{BIG:x}\r\n".encode() + FILL * BIG + b"\r\n"
    with RawConn(port) as c:
        c.send(first)
        # The head and the first 64 KiB went to the backend before the rest was seen: this is
        # the part of the request fastlb cannot take back.
        assert wait_until(lambda: b.raw.count(FILL) == BIG, 10), len(b.raw)
        assert b.raw.startswith(b"POST /echo HTTP/1.1\r\n")
        c.send(fault)
        r = c.read_response()
        assert r.status == 400 and r.header("x-backend") is None
        assert c.closed_by_peer()
    # What it does guarantee: the backend never gets a byte of the malformed part, nor a
    # complete request, and its connection is closed mid-body.
    assert wait_until(lambda: b.closed_mid_request == 1, 5)
    raw = b.raw
    assert raw.endswith(FILL * BIG + b"\r\n"), raw[-40:]
    assert fault[:4] not in raw[raw.index(b"\r\n\r\n") :]
    assert b.requests == []


# --- 4. the same grammar on responses: a malformed chunked body from a backend is a 502 --------


@pytest.mark.parametrize(
    "body",
    [b"2;\r\nab\r\n0\r\n\r\n", b'2;a="b\r\nab\r\n0\r\n\r\n', b"2\r\nab\r\n0\r\nNoColon\r\n\r\n"],
    ids=["ext_without_name", "ext_unbalanced_quote", "trailer_no_colon"],
)
def test_malformed_chunked_response_is_a_502(raw_backend, lb, body):
    reply = b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    b = raw_backend(reply)
    port = lb(b.address)
    with RawConn(port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            r = c.read_response()
        except PeerClosed as exc:  # the head already went out, then the connection was cut
            assert b"ab" not in exc.args[0]
            return
        assert r.status == 502 and r.header("x-backend") is None, (r.status, r.raw_head)


# --- 5. Host (RFC 9110 7.2, RFC 3986 3.2.2) ------------------------------------------------


@pytest.mark.parametrize("host", ["a:b", ":80", "a[b]", "[::1]x", "[::1", "a.example:80:x"])
def test_malformed_host_is_refused(raw_backend, lb, host):
    b = raw_backend()
    port = lb(b.address)
    warm_up(port)
    before = b.raw
    assert_refused(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    time.sleep(0.2)
    assert b.raw == before


@pytest.mark.parametrize("host", ["a", "a:8080", "a:", "[::1]:8080", "10.0.0.1", "2001:db8::1"])
def test_valid_host_is_served(raw_backend, lb, host):
    b = raw_backend()
    port = lb(b.address)
    with RawConn(port) as c:
        c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert c.read_response().status == 200
    assert f"\r\nHost: {host}\r\n".encode() in b.requests[0]
