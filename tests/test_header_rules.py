"""Per-route rewrites (docs/http.md): `request_headers` and `response_headers` (set, add,
remove) and `rewrite_prefix`, through real `fastlb serve` for every pairing of client and pool
protocol (HTTP/1 and HTTP/2 clients; HTTP/1.1 and HTTP/2 pools), against real backends that
record what arrived."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import pytest
from h2server import H2Backend
from h2util import RawH2
from httputil import http_config, pool

from fastlb.config import ConfigError, parse_config

from conftest import free_port

RULES: dict[str, Any] = {
    "path_prefix": "/api/",
    "rewrite_prefix": "/v2/",
    "request_headers": {"set": {"X-Env": "prod"}, "add": {"X-Tag": "from-lb"}, "remove": ["X-Debug"]},
    "response_headers": {"set": {"Cache-Control": "no-store"}, "add": {"X-Frame-Options": "DENY"},
                         "remove": ["X-Backend"]},
}  # fmt: skip
SENT = [("X-Env", "dev"), ("X-Env", "test"), ("X-Tag", "from-client"), ("X-Debug", "1"), ("X-Keep", "k")]


def config_for(port: int, backend: str, **pool_keys: Any) -> str:
    """Route /api/ (rewritten) to pool "api"; everything else to "app" unchanged."""
    return http_config(
        port,
        [pool("app", [backend], **pool_keys), pool("api", [backend], **pool_keys)],
        routes=[{**RULES, "pool": "api"}],
    )


def h1_get(port: int, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in SENT:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def h2_get(port: int, path: str) -> tuple[int, dict[str, list[str]]]:
    with RawH2(port) as raw:
        sid = raw.new_stream()
        raw.send(raw.headers_frame(sid, path=path, extra=tuple((n.lower(), v) for n, v in SENT)))
        assert raw.wait_stream(sid, 10)
        fields: dict[str, list[str]] = {}
        for name, value in raw.heads[sid]:
            fields.setdefault(name, []).append(value)
        return raw.status(sid) or 0, fields


def assert_request_rewritten(path: str, header_all: Any) -> None:
    assert path == "/v2/headers?q=1", path
    assert header_all("x-env") == ["prod"]
    assert header_all("x-tag") == ["from-client", "from-lb"]
    assert header_all("x-debug") == []
    assert header_all("x-keep") == ["k"]


@pytest.fixture
def h2b() -> Iterator[H2Backend]:
    b = H2Backend("h2")
    yield b
    b.close()


def test_http1_client_to_http1_pool(hb, fastlb):
    b = hb("b")
    port = free_port()
    fastlb(config_for(port, b.address), port)
    status, headers, _ = h1_get(port, "/api/headers?q=1")
    assert status == 200
    req = b.received[-1]
    assert_request_rewritten(req.target, req.header_all)
    assert headers.get_all("Cache-Control") == ["no-store"] and headers["X-Frame-Options"] == "DENY"
    assert "X-Backend" not in headers
    # another route's requests are untouched
    status, headers, _ = h1_get(port, "/headers")
    plain = b.received[-1]
    assert plain.target == "/headers" and plain.header_all("x-env") == ["dev", "test"]
    assert plain.header_all("x-debug") == ["1"] and headers["X-Backend"] == "b"
    assert "X-Frame-Options" not in headers


def test_http2_client_to_http1_pool(hb, fastlb):
    b = hb("b")
    port = free_port()
    fastlb(config_for(port, b.address), port)
    status, fields = h2_get(port, "/api/headers?q=1")
    assert status == 200
    req = b.received[-1]
    assert_request_rewritten(req.target, req.header_all)
    assert fields["cache-control"] == ["no-store"] and fields["x-frame-options"] == ["DENY"]
    assert "x-backend" not in fields


def test_http1_client_to_http2_pool(h2b, fastlb):
    port = free_port()
    fastlb(config_for(port, f"127.0.0.1:{h2b.port}", http_version="2"), port)
    status, headers, _ = h1_get(port, "/api/headers?q=1")
    assert status == 200
    req = h2b.received[-1]
    assert_request_rewritten(req.path, req.header_all)
    assert headers["Cache-Control"] == "no-store" and "x-backend" not in headers


def test_http2_client_to_http2_pool(h2b, fastlb):
    port = free_port()
    fastlb(config_for(port, f"127.0.0.1:{h2b.port}", http_version="2"), port)
    status, fields = h2_get(port, "/api/headers?q=1")
    assert status == 200
    req = h2b.received[-1]
    assert_request_rewritten(req.path, req.header_all)
    assert fields["x-frame-options"] == ["DENY"] and "x-backend" not in fields


def route_data(route: dict[str, Any]) -> dict[str, Any]:
    return {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app", "routes": [route]}
        ],
        "pools": [{"name": "app", "backends": [{"address": "127.0.0.1:9000"}]}],
    }


R0 = "listeners[0].routes[0]"
REQ, RESP = f"{R0}.request_headers", f"{R0}.response_headers"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"rewrite_prefix": "/v2/", "pool": "app"}, f"{R0}.rewrite_prefix: needs path_prefix"),
        ({"path_prefix": "/a/", "rewrite_prefix": "v2", "pool": "app"}, f"{R0}.rewrite_prefix:"),
        ({"request_headers": {"set": {"Host": "x"}}, "pool": "app"}, f"{REQ}.set: 'Host' is a field"),
        ({"response_headers": {"remove": ["Content-Length"]}, "pool": "app"}, f"{RESP}.remove:"),
        ({"request_headers": {"remove": ["X-Forwarded-For"]}, "pool": "app"}, f"{REQ}.remove:"),
        ({"request_headers": {"add": {"X-A": "a\r\nX-B: b"}}, "pool": "app"}, f"{R0}.request_headers.add"),
        ({"request_headers": {"add": {"X A": "a"}}, "pool": "app"}, f"{R0}.request_headers.add"),
        ({"redirect": {"scheme": "https"}, "response_headers": {"add": {"X-A": "a"}}},
         f"{R0}.response_headers: a redirect route forwards nothing"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(route_data(route))
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_config_to_engine_keeps_the_order() -> None:
    route = {"path_prefix": "/a/", "pool": "app", **{k: v for k, v in RULES.items() if k != "path_prefix"}}
    (r,) = parse_config(route_data(route)).to_engine()["listeners"][0]["routes"]
    assert r["rewrite_prefix"] == "/v2/"
    assert r["request_headers"] == {
        "set": [["X-Env", "prod"]],
        "add": [["X-Tag", "from-lb"]],
        "remove": ["X-Debug"],
    }
    assert r["response_headers"]["remove"] == ["X-Backend"]
