"""Response compression (docs/http.md, CONTRACT.md `compression`): a real `fastlb serve` in front
of a real backend, clients asking with Accept-Encoding (raw requests, curl --compressed, HTTP/2
streams), and every body decoded with Python's decoders (gzip, brotli, zstandard)."""

from __future__ import annotations

import gzip
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import brotli
import pytest
import zstandard
from h2util import RawH2
from httputil import http_config, pool

from fastlb.config import ConfigError, parse_config

from backends import Backend
from conftest import free_port

TEXT = b"".join(b"line %05d: fastlb compresses text it is asked to\n" % i for i in range(400))  # 20 KB
CURL = shutil.which("curl")


def decode(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "br":
        return brotli.decompress(body)
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    assert encoding == "", encoding
    return body


def responder(conn: socket.socket, backend: Backend) -> None:
    """A backend answering by path: /text (20 KB text/html), /small (text, 100 B), /png,
    /encoded (already gzip), /range (206), /no-transform, /none (204), /chunked (text in three
    chunks), /events (text/event-stream: one event, a pause, another). HTTP/1.1 keep-alive."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        path = head.split(b" ")[1].decode()
        fields: list[tuple[str, str]] = [("ETag", '"v1"')]
        body, status, kind = TEXT, "200 OK", "text/html; charset=utf-8"
        if path == "/small":
            body = TEXT[:100]
        elif path == "/png":
            kind = "image/png"
        elif path == "/encoded":
            body = gzip.compress(TEXT)
            fields.append(("Content-Encoding", "gzip"))
        elif path == "/range":
            status, body = "206 Partial Content", TEXT[:1000]
            fields.append(("Content-Range", f"bytes 0-999/{len(TEXT)}"))
        elif path == "/no-transform":
            fields.append(("Cache-Control", "public, no-transform"))
        elif path == "/none":
            status, body = "204 No Content", b""
        if path in ("/chunked", "/events"):
            kind = "text/event-stream" if path == "/events" else kind
            out = f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            conn.sendall(out)
            pieces = [TEXT[:7000], TEXT[7000:14000], TEXT[14000:]]
            if path == "/events":
                pieces = [b"data: first\n\n", b"data: second\n\n"]
            for k, piece in enumerate(pieces):
                if path == "/events" and k:
                    time.sleep(1.0)  # the first event must reach the client before this one is sent
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")
            continue
        fields += [("Content-Type", kind), ("Content-Length", str(len(body)))]
        if status.startswith("204"):
            fields = [f for f in fields if f[0] != "Content-Length"]
        head_out = f"HTTP/1.1 {status}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
        conn.sendall(head_out.encode() + body)


@pytest.fixture
def lb(backends, fastlb) -> Iterator[Callable[..., int]]:  # type: ignore[no-untyped-def]
    def start(**compression: Any) -> int:
        b = backends(responder)
        port = free_port()
        settings = {"algorithms": ["zstd", "br", "gzip"], **compression}
        fastlb(http_config(port, [pool("app", [b.address])], compression=settings), port)
        return port

    yield start


def get(
    port: int, path: str, accept: str | None, method: str = "GET"
) -> tuple[str, dict[str, list[str]], bytes]:
    """One request on a new connection: (status line, fields by lower-case name, raw body)."""
    fields = f"Accept-Encoding: {accept}\r\n" if accept is not None else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: app.test\r\n{fields}Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    if out.get("transfer-encoding") == ["chunked"]:
        body = dechunk(body)
    return lines[0], out, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[:size]
        body = rest[size + 2 :]


@pytest.mark.parametrize(
    ("accept", "encoding"),
    [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, br", "br"),
        ("gzip", "gzip"),
        ("br;q=0.5, gzip;q=0.9", "gzip"),
        ("*", "zstd"),
        ("identity", ""),
        (None, ""),
    ],
)
def test_the_best_accepted_encoding_is_used_and_decodes(lb, accept, encoding):
    port = lb()
    status, fields, body = get(port, "/text", accept)
    assert status == "HTTP/1.1 200 OK"
    assert fields.get("content-encoding", [""]) == [encoding]
    assert decode(encoding, body) == TEXT
    if encoding:
        assert "content-length" not in fields and fields["transfer-encoding"] == ["chunked"]
        assert fields["etag"] == ['W/"v1"'] and fields["vary"] == ["Accept-Encoding"]
        assert len(body) < len(TEXT) / 5
    else:
        assert fields["etag"] == ['"v1"']


@pytest.mark.parametrize(
    ("path", "method", "why"),
    [
        ("/small", "GET", "under min_size"),
        ("/png", "GET", "a type not listed"),
        ("/encoded", "GET", "already encoded"),
        ("/range", "GET", "a 206"),
        ("/no-transform", "GET", "Cache-Control: no-transform"),
        ("/none", "GET", "a 204"),
        ("/text", "HEAD", "a HEAD"),
    ],
)
def test_what_is_never_compressed(lb, path, method, why):
    port = lb()
    status, fields, body = get(port, path, "gzip, br, zstd", method)
    assert status.split(" ")[1] in ("200", "204", "206"), status
    if path == "/encoded":
        assert fields["content-encoding"] == ["gzip"] and gzip.decompress(body) == TEXT, why
        return
    assert "content-encoding" not in fields, why
    if method == "GET" and path not in ("/none",):
        expected = {"/small": TEXT[:100], "/range": TEXT[:1000]}.get(path, TEXT)
        assert body == expected, why


def test_chunked_backend_bodies_are_compressed_whole(lb):
    port = lb()
    for encoding in ("gzip", "br", "zstd"):
        _, fields, body = get(port, "/chunked", encoding)
        assert fields["content-encoding"] == [encoding]
        assert decode(encoding, body) == TEXT


def test_an_event_stream_goes_out_event_by_event(lb):
    """The first event is decodable before the backend sent the second: nothing is held back."""
    port = lb()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /events HTTP/1.1\r\nHost: app.test\r\nAccept-Encoding: gzip\r\n\r\n")
        started, raw = time.monotonic(), b""
        while True:
            chunk = s.recv(65536)
            assert chunk, "closed before the first event"
            raw += chunk
            head, sep, rest = raw.partition(b"\r\n\r\n")
            if not sep:
                continue
            assert b"content-encoding: gzip" in head.lower()
            # the chunks that arrived whole, decoded as far as they go
            decoder, body = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
            while (size_line := rest.partition(b"\r\n"))[1] and len(size_line[2]) >= int(
                size_line[0], 16
            ) + 2:
                size = int(size_line[0], 16)
                body += size_line[2][:size]
                rest = size_line[2][size + 2 :]
                if size == 0:
                    break
            if b"data: first" in decoder.decompress(body):
                break
        assert time.monotonic() - started < 0.9, "the first event waited for the second"


def test_curl_compressed(lb):
    assert CURL, "curl is required"
    port = lb()
    done = subprocess.run(
        [CURL, "-s", "--compressed", "-D", "-", f"http://127.0.0.1:{port}/text"],
        capture_output=True,
        timeout=10,
    )
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert b"content-encoding: " in head.lower()
    assert body == TEXT


def test_http2_clients_get_compressed_streams(lb):
    port = lb()
    with RawH2(port) as raw:
        results = {}
        for accept in ("br", "zstd", "gzip"):
            sid = raw.new_stream()
            raw.send(raw.headers_frame(sid, path="/text", extra=(("accept-encoding", accept),)))
            results[accept] = sid
        for accept, sid in results.items():
            assert raw.wait_stream(sid, 10) and raw.status(sid) == 200
            heads = dict(raw.heads[sid])
            assert heads["content-encoding"] == accept and "content-length" not in heads
            assert decode(accept, bytes(raw.bodies[sid])) == TEXT


def test_many_requests_on_one_connection(lb):
    """Keep-alive goes on across compressed answers (the parts path, chunked to the client)."""
    port = lb()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(5):
            s.sendall(b"GET /text HTTP/1.1\r\nHost: app.test\r\nAccept-Encoding: gzip\r\n\r\n")
            raw = b""
            while not raw.endswith(b"0\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk, "closed between requests"
                raw += chunk
            _, _, body = raw.partition(b"\r\n\r\n")
            assert gzip.decompress(dechunk(body)) == TEXT


def data(listener: dict[str, Any]) -> dict[str, Any]:
    return {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app"} | listener
        ],
        "pools": [{"name": "app", "backends": [{"address": "127.0.0.1:9000"}]}],
    }


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ({"protocol": "tcp", "compression": {}}, "listeners[0].compression: for http and https"),
        ({"compression": {"algorithms": ["deflate"]}}, "listeners[0].compression.algorithms[0]"),
        ({"compression": {"types": ["html"]}}, "listeners[0].compression.types[0]"),
        ({"compression": {"levels": {"gzip": 12}}}, "listeners[0].compression.levels.gzip"),
    ],
)
def test_config_errors_name_the_field(listener: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data(listener))
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_config_to_engine_defaults() -> None:
    (web,) = parse_config(data({"compression": {}})).to_engine()["listeners"]
    assert web["compression"] == {
        "algorithms": ["zstd", "br", "gzip"],
        "min_size": 1024,
        "types": ["text/*", "application/json", "application/javascript", "image/svg+xml"],
        "gzip_level": 6,
        "br_level": 4,
        "zstd_level": 3,
    }
