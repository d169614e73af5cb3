"""python/fastlb/demo.py without the data plane: its config and its HTTP/1.1 demo backends."""

from __future__ import annotations

import asyncio

from fastlb.config import parse_config
from fastlb.demo import _answer, _listening_socket, demo_config


def test_demo_config_routes_canary_header_then_splits() -> None:
    cfg = parse_config(demo_config("127.0.0.1:8080", [9001, 9002, 9003]))
    engine = cfg.to_engine()
    (listener,) = engine["listeners"]
    assert (listener["protocol"], listener["pool"], listener["bind"]) == ("http", "stable", "127.0.0.1:8080")
    first, rest = listener["routes"]
    assert (first["headers"], first["split"]) == ({"x-canary": "1"}, [{"pool": "canary", "weight": 1}])
    assert rest["path_prefix"] == "/"
    assert rest["split"] == [{"pool": "stable", "weight": 90}, {"pool": "canary", "weight": 10}]
    pools = {p["name"]: [b["address"] for b in p["backends"]] for p in engine["pools"]}
    assert pools == {"stable": ["127.0.0.1:9001", "127.0.0.1:9002"], "canary": ["127.0.0.1:9003"]}
    assert cfg.admin.bind == "off"
    assert (
        parse_config(demo_config("127.0.0.1:8080", [1, 2, 3], "127.0.0.1:9901")).admin.bind
        == "127.0.0.1:9901"
    )


async def _exchange(request: bytes) -> bytes:
    """Sends `request` on one connection to a demo backend; returns all it answers until EOF."""
    sock = _listening_socket()
    port = sock.getsockname()[1]
    server = await asyncio.start_server(_answer("backend-9 (test)"), sock=sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        return data
    finally:
        server.close()


def test_demo_backend_keeps_alive_with_content_length() -> None:
    request = (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    body = b"hello from backend-9 (test)\n"
    data = asyncio.run(_exchange(request))
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    assert data == (ok + b"\r\n" + body) * 2 + ok + b"\r\n" + ok + b"Connection: close\r\n\r\n" + body


def test_demo_backend_closes_http10_and_chunked() -> None:
    data = asyncio.run(_exchange(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n"))
    assert data.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close\r\n" in data
    data = asyncio.run(_exchange(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
    assert data.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close\r\n" in data
