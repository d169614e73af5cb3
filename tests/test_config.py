"""Tests for python/fastlb/config.py: the TOML file, its errors, and the engine JSON it produces."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from example_certs import example_with_certificates

from fastlb._native import MAX_RETRIES, Engine, engine_config_error
from fastlb.config import Config, ConfigError, Duration, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))

# The contract's example, completed with the pools its routes name.
FULL_EXAMPLE = """
[runtime]
workers = "auto"
cpu_affinity = "auto"
max_connections = 50000

[admin]
bind = "127.0.0.1:9901"

[log]
level = "info"
access_log = "off"

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
pool = "app"
timeouts = { client_idle = "60s", header_read = "10s" }
rate_limit = { requests_per_second = 100, burst = 200 }

  [[listeners.routes]]
  host = "api.example.com"
  path_prefix = "/api/v1/"
  headers = { "x-client" = "mobile" }
  cookies = { "ab-test" = "group-a" }
  query = { "beta" = "1" }
  source_cidr = ["10.0.0.0/8", "::1/128"]
  pool = "v1"

  [[listeners.routes]]
  path_regex = "^/v2/.*"
  split = [{ pool = "v1", weight = 95 }, { pool = "v2", weight = 5 }]

[[listeners]]
name = "db"
bind = "[::]:5432"
protocol = "tcp"
pool = "v2"

[[pools]]
name = "app"
algorithm = "round_robin"
hash_key = "source_ip"
affinity = { cookie = "FASTLB_SRV", ttl = "1h" }
backends = [
  { address = "127.0.0.1:9001", weight = 5 },
  { address = "127.0.0.1:9002", weight = 3, max_connections = 200 },
  { address = "127.0.0.1:9003", backup = true },
]
timeouts = { connect = "2s", read = "30s", send = "30s", idle = "60s" }
retries = 2
passive = { consecutive_failures = 5, eject = "30s" }
slow_start = "30s"
drain_timeout = "30s"

  [pools.health]          # the same as health = { ... } inline
  type = "http"
  path = "/health"
  expect_status = [200]
  interval = "2s"
  timeout = "1s"
  rise = 2
  fall = 3

[[pools]]
name = "v1"
algorithm = "consistent_hash"
hash_key = "header:X-User"
hash_balance_factor = 125
backends = [{ address = "localhost:9101" }, { address = "[::1]:9102" }]

[[pools]]
name = "v2"
algorithm = "maglev"
backends = [{ address = "127.0.0.1:9201" }]

[[alerts]]
name = "UnhealthyBackends"
expr = "healthy_backends < 2"
for = "30s"
"""

# Every key native/src/config.rs (EngineConfig, deny_unknown_fields) accepts, per struct.
ENGINE_KEYS = {"runtime", "access_log", "listeners", "pools", "geoip"}
RUNTIME_KEYS = {"workers", "cpus", "max_connections"}
LISTENER_KEYS = {
    "name",
    "bind",
    "protocol",
    "tls",
    "pool",
    "client_idle_ms",
    "header_read_ms",
    "max_header_bytes",
    "max_headers",
    "rate_limit",
    "routes",
    "udp",
    "http2",
    "proxy_protocol",
    "trusted_proxies",
    "compression",
}
ROUTE_KEYS = {
    "name",
    "split_affinity",
    "host",
    "path_prefix",
    "path_exact",
    "path_regex",
    "headers",
    "cookies",
    "query",
    "source_cidr",
    "country",
    "request_headers",
    "response_headers",
    "rewrite_prefix",
    "sni",
    "redirect",
    "split",
}
POOL_KEYS = {
    "name",
    "http_version",
    "send_proxy",
    "passive",
    "algorithm",
    "hash_key",
    "hash_balance_factor",
    "backends",
    "timeouts",
    "retries",
    "affinity",
    "keepalive",
    "queue",
    "tls",
}
BACKEND_KEYS = {"address", "addr", "weight", "max_connections", "backup"}
TIMEOUT_KEYS = {"connect_ms", "read_ms", "send_ms", "idle_ms"}


def minimal() -> dict[str, Any]:
    """The smallest valid config: one http listener over one pool of two backends."""
    return {
        "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app"}],
        "pools": [
            {"name": "app", "backends": [{"address": "127.0.0.1:9001"}, {"address": "127.0.0.1:9002"}]}
        ],
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    errors: list[str] = info.value.errors
    return errors


def assert_error(data: dict[str, Any], path: str, message: str = "") -> None:
    """Exactly one line starts with `path: ` and contains `message`."""
    errors = errors_of(data)
    hits = [e for e in errors if e.startswith(f"{path}: ") and message in e]
    assert hits, f"no error at {path!r} with {message!r} in {errors}"
    assert all("\n" not in e for e in errors)


def write(tmp_path: Path, text: str, name: str = "fastlb.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- valid files --------------------------------------------------------------------------------


def test_full_example_parses(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_EXAMPLE))
    assert [x.name for x in cfg.listeners] == ["web", "db"]
    assert cfg.listeners[0].rate_limit is not None and cfg.listeners[0].rate_limit.burst == 200
    route = cfg.listeners[0].routes[1]
    assert route.split is not None and [(e.pool, e.weight) for e in route.split] == [("v1", 95), ("v2", 5)]
    app = cfg.pools[0]
    assert app.affinity is not None and app.affinity.ttl == 3_600_000
    assert app.health.type == "http" and app.health.status_ok(200) and not app.health.status_ok(204)
    assert app.passive is not None and app.passive.eject.ms == 30_000
    assert app.slow_start == 30_000
    assert cfg.alerts[0].for_ == 30_000 and cfg.alerts[0].parts == ("healthy_backends", "<", 2.0)


def _key_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every object key of a JSON document, as a path of keys and list indexes (maps whose keys
    are data, like a route's headers, or an enum's tag, like `{"header": "x"}`, are left out)."""
    if isinstance(value, dict) and path[-1:] not in (("headers",), ("cookies",), ("query",), ("hash_key",)):
        for key, v in value.items():
            yield (*path, key)
            yield from _key_paths(v, (*path, key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _key_paths(v, (*path, i))


def test_engine_json_carries_every_field_and_the_engine_has_no_defaults(tmp_path: Path) -> None:
    """One source of defaults: the engine accepts the schema's JSON and refuses it with any one
    field left out, naming that field, so no engine-side default can drift from the schema's."""
    engine = load_config(write(tmp_path, FULL_EXAMPLE)).to_engine()
    assert engine_config_error(json.dumps(engine)) is None
    paths = list(_key_paths(engine))
    assert len(paths) > 60
    for path in paths:
        doc = json.loads(json.dumps(engine))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        error = engine_config_error(json.dumps(doc))
        assert error is not None and f"missing field `{path[-1]}`" in error, (path, error)


def test_full_example_engine_shape(tmp_path: Path) -> None:
    engine = load_config(write(tmp_path, FULL_EXAMPLE)).to_engine()
    assert set(engine) == ENGINE_KEYS
    assert set(engine["runtime"]) == RUNTIME_KEYS
    assert engine["runtime"]["workers"] == len(os.sched_getaffinity(0))
    assert engine["runtime"]["cpus"] == sorted(os.sched_getaffinity(0))
    assert engine["runtime"]["max_connections"] == 50000
    for listener in engine["listeners"]:
        assert set(listener) == LISTENER_KEYS
        for route in listener["routes"]:
            assert set(route) == ROUTE_KEYS
    web, db = engine["listeners"]
    assert web == {
        "name": "web",
        "bind": "127.0.0.1:8080",
        "protocol": "http",
        "tls": None,
        "pool": "app",
        "client_idle_ms": 60_000,
        "header_read_ms": 10_000,
        "max_header_bytes": 65_536,
        "max_headers": 100,
        "rate_limit": {"requests_per_second": 100.0, "burst": 200},
        "udp": None,
        "http2": {"max_concurrent_streams": 100, "max_header_list_size": 65_536},
        "proxy_protocol": None,
        "trusted_proxies": [],
        "compression": None,
        "routes": [
            {
                "name": "0",
                "host": "api.example.com",
                "path_prefix": "/api/v1/",
                "path_exact": None,
                "path_regex": None,
                "headers": {"x-client": "mobile"},
                "cookies": {"ab-test": "group-a"},
                "query": {"beta": "1"},
                "source_cidr": ["10.0.0.0/8", "::1/128"],
                "country": [],
                "request_headers": {"set": [], "add": [], "remove": []},
                "response_headers": {"set": [], "add": [], "remove": []},
                "rewrite_prefix": None,
                "sni": None,
                "redirect": None,
                "split": [{"pool": "v1", "weight": 1}],
                "split_affinity": None,
            },
            {
                "name": "1",
                "host": None,
                "path_prefix": None,
                "path_exact": None,
                "path_regex": "^/v2/.*",
                "headers": {},
                "cookies": {},
                "query": {},
                "source_cidr": [],
                "country": [],
                "request_headers": {"set": [], "add": [], "remove": []},
                "response_headers": {"set": [], "add": [], "remove": []},
                "rewrite_prefix": None,
                "sni": None,
                "redirect": None,
                "split": [{"pool": "v1", "weight": 95}, {"pool": "v2", "weight": 5}],
                "split_affinity": None,
            },
        ],
    }
    assert db["bind"] == "[::]:5432" and db["client_idle_ms"] == 600_000
    assert db["routes"] == [] and db["rate_limit"] is None
    for pool in engine["pools"]:
        assert set(pool) == POOL_KEYS
        assert set(pool["timeouts"]) == TIMEOUT_KEYS
        for backend in pool["backends"]:
            assert set(backend) == BACKEND_KEYS
            host, _, port = backend["addr"].rpartition(":")
            ipaddress.ip_address(host.strip("[]"))
            assert 0 < int(port) < 65536
    app, v1, v2 = engine["pools"]
    assert app["hash_key"] == "source_ip" and app["retries"] == 2
    assert app["affinity"] == {"cookie": "FASTLB_SRV", "ttl_ms": 3_600_000}
    assert (app["keepalive"], app["queue"]) == (256, {"size": 1000, "timeout_ms": 5000})
    assert v1["affinity"] is None
    assert app["timeouts"] == {"connect_ms": 2000, "read_ms": 30_000, "send_ms": 30_000, "idle_ms": 60_000}
    assert app["backends"][1] == {
        "address": "127.0.0.1:9002",
        "addr": "127.0.0.1:9002",
        "weight": 3,
        "max_connections": 200,
        "backup": False,
    }
    assert app["backends"][2]["backup"] is True and app["backends"][2]["weight"] == 1
    assert v1["hash_key"] == {"header": "x-user"} and v1["hash_balance_factor"] == 125
    assert v1["backends"][0]["address"] == "localhost:9101"
    assert v1["backends"][0]["addr"] in ("127.0.0.1:9101", "[::1]:9101")
    assert v1["backends"][1]["addr"] == "[::1]:9102"
    assert v2["algorithm"] == "maglev"


def test_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.runtime.workers == "auto" and cfg.runtime.cpu_affinity == "auto"
    assert cfg.runtime.max_connections == 50_000
    assert cfg.admin.bind == "127.0.0.1:9901"
    assert cfg.log.level == "info" and cfg.log.access_log == "off"
    listener = cfg.listeners[0]
    assert listener.timeouts.client_idle == 60_000 and listener.timeouts.header_read == 10_000
    assert listener.rate_limit is None and listener.routes == []
    pool = cfg.pools[0]
    assert pool.algorithm == "round_robin" and pool.hash_key == "source_ip" and pool.hash_balance_factor == 0
    assert [(b.weight, b.max_connections, b.backup) for b in pool.backends] == [(1, 0, False)] * 2
    assert pool.retries == 2
    t = pool.timeouts
    assert (t.connect, t.read, t.send, t.idle) == (2000, 30_000, 30_000, 60_000)
    h = pool.health
    assert (h.type, h.interval, h.timeout, h.rise, h.fall) == ("tcp", 2000, 1000, 2, 3)
    assert pool.passive is None and pool.affinity is None
    assert pool.slow_start == 0 and pool.drain_timeout == 30_000
    assert {a.name for a in cfg.alerts} >= {"UnhealthyBackends"}
    assert (listener.max_header_bytes, listener.max_headers) == (65_536, 100)
    assert pool.keepalive == 256 and (pool.queue.size, pool.queue.timeout) == (1000, 5000)


def test_l7_defaults_match_the_engine() -> None:
    """What a key left out means here is what native/src/config.rs assumes for a missing key."""
    engine = parse_config(minimal()).to_engine()
    listener, pool = engine["listeners"][0], engine["pools"][0]
    assert (listener["max_header_bytes"], listener["max_headers"]) == (64 * 1024, 100)
    assert (listener["header_read_ms"], listener["rate_limit"], listener["routes"]) == (10_000, None, [])
    assert (pool["affinity"], pool["keepalive"]) == (None, 256)
    assert pool["queue"] == {"size": 1000, "timeout_ms": 5000}


def test_tcp_client_idle_default_is_ten_minutes() -> None:
    data = minimal()
    data["listeners"][0]["protocol"] = "tcp"
    assert parse_config(data).listeners[0].timeouts.client_idle == 600_000


def test_rate_limit_burst_defaults_to_rate() -> None:
    data = minimal()
    data["listeners"][0]["rate_limit"] = {"requests_per_second": 2.5}
    rate_limit = parse_config(data).listeners[0].rate_limit
    assert rate_limit is not None and rate_limit.burst == 3


def test_empty_alerts_list_means_no_alerts() -> None:
    data = minimal()
    data["alerts"] = []
    assert parse_config(data).alerts == []


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_EXAMPLE))
    assert parse_config(cfg.model_dump(by_alias=True)) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path, tmp_path: Path) -> None:
    cfg = load_config(example_with_certificates(path, tmp_path))
    engine = cfg.to_engine()
    assert set(engine) == ENGINE_KEYS and engine["listeners"] and engine["pools"]


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"l4.toml", "l7-routing.toml", "canary.toml"}


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("1.5s", 1500),
        ("5s", 5000),
        ("1m", 60_000),
        ("2h", 7_200_000),
        ("1m30s", 90_000),
        ("0s", 0),
    ],
)
def test_duration_parses(text: str, ms: int) -> None:
    assert Duration.parse(text).ms == ms
    assert Duration.parse(Duration.parse(text).text) == ms


@pytest.mark.parametrize("value", [5, 1.5, "5", "5 s", "5sec", "", "-1s", "s"])
def test_bad_duration_names_field(value: object) -> None:
    data = minimal()
    data["pools"][0]["timeouts"] = {"connect": value}
    assert_error(data, "pools[0].timeouts.connect", "must be a duration with a unit")


def test_bare_number_duration_message() -> None:
    data = minimal()
    data["listeners"][0]["timeouts"] = {"client_idle": 60}
    assert errors_of(data) == ['listeners[0].timeouts.client_idle: must be a duration with a unit, e.g. "5s"']


def test_zero_connect_timeout_rejected() -> None:
    data = minimal()
    data["pools"][0]["timeouts"] = {"connect": "0s"}
    assert_error(data, "pools[0].timeouts.connect", "must be > 0")


# --- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "path"),
    [
        (lambda d: d, "colour"),
        (lambda d: d.setdefault("runtime", {}), "runtime.colour"),
        (lambda d: d.setdefault("admin", {}), "admin.colour"),
        (lambda d: d["listeners"][0], "listeners[0].colour"),
        (lambda d: d["listeners"][0].setdefault("timeouts", {}), "listeners[0].timeouts.colour"),
        (lambda d: d["pools"][0], "pools[0].colour"),
        (lambda d: d["pools"][0]["backends"][1], "pools[0].backends[1].colour"),
        (lambda d: d["pools"][0].setdefault("health", {}), "pools[0].health.colour"),
    ],
)
def test_unknown_key(where: Any, path: str) -> None:
    data = minimal()
    where(data)["colour"] = "blue"
    assert errors_of(data) == [f"{path}: unknown key"]


def test_unknown_key_in_route() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"pool": "app", "paht_prefix": "/x"}]
    assert errors_of(data) == ["listeners[0].routes[0].paht_prefix: unknown key"]


def test_unknown_key_in_split() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"split": [{"pool": "app", "weigth": 1}]}]
    assert_error(data, "listeners[0].routes[0].split[0].weigth", "unknown key")


def test_many_errors_reported_at_once() -> None:
    data = minimal()
    data["pools"][0]["retries"] = 11
    data["pools"][0]["backends"][0]["weight"] = 1001
    data["listeners"][0]["bind"] = "nope"
    assert len(errors_of(data)) == 3


# --- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "localhost",
        "::1:80",
        "[::1]80",
        "1.2.3.4:99999",
        "1.2.3.4:0",
        "300.1.1.1:80",
        "[zz]:80",
        "a b:80",
        ":80",
    ],
)
def test_bad_backend_address(address: str) -> None:
    data = minimal()
    data["pools"][0]["backends"][1]["address"] = address
    assert_error(data, "pools[0].backends[1].address")


def test_bad_address_message() -> None:
    data = minimal()
    data["pools"][0]["backends"][1]["address"] = "10.0.0.1"
    assert errors_of(data) == ["pools[0].backends[1].address: not host:port"]


@pytest.mark.parametrize(
    "address", ["10.0.0.1:80", "[2001:db8::1]:443", "db-1.internal:5432", "localhost:9000"]
)
def test_good_backend_address(address: str) -> None:
    data = minimal()
    data["pools"][0]["backends"][1]["address"] = address
    parse_config(data)


@pytest.mark.parametrize(
    ("bind", "engine"), [("*:8080", "0.0.0.0:8080"), ("[::1]:0", "[::1]:0"), (":8080", "0.0.0.0:8080")]
)
def test_bind_forms(bind: str, engine: str) -> None:
    data = minimal()
    data["listeners"][0]["bind"] = bind
    assert parse_config(data).to_engine()["listeners"][0]["bind"] == engine


def test_unresolvable_name_is_config_error() -> None:
    data = minimal()
    data["pools"][0]["backends"][1]["address"] = "no-such-host.invalid:80"
    cfg = parse_config(data)
    with pytest.raises(ConfigError) as info:
        cfg.to_engine()
    assert info.value.errors[0].startswith(
        "pools[0].backends[1].address: cannot resolve 'no-such-host.invalid'"
    )


# --- weights, retries, sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "message"), [(1001, "must be <= 1000"), (-1, "must be >= 0"), (1.5, "must be an integer")]
)
def test_bad_weight(weight: object, message: str) -> None:
    data = minimal()
    data["pools"][0]["backends"][1]["weight"] = weight
    assert errors_of(data) == [f"pools[0].backends[1].weight: {message}"]


def test_weight_zero_and_max_allowed() -> None:
    data = minimal()
    data["pools"][0]["backends"][0]["weight"] = 0
    data["pools"][0]["backends"][1]["weight"] = 1000
    parse_config(data)


def test_retries_bounds() -> None:
    """The limit is the data plane's (written once, in native/src/config.rs); the engine itself
    refuses JSON above it."""
    assert MAX_RETRIES == 10
    data = minimal()
    data["pools"][0]["retries"] = MAX_RETRIES
    engine = parse_config(data).to_engine()
    assert engine_config_error(json.dumps(engine)) is None
    engine["pools"][0]["retries"] = MAX_RETRIES + 1
    assert engine_config_error(json.dumps(engine)) == "pool app: retries above 10"
    data["pools"][0]["retries"] = MAX_RETRIES + 1
    assert errors_of(data) == ["pools[0].retries: must be <= 10"]


def test_pool_needs_a_backend() -> None:
    data = minimal()
    data["pools"][0]["backends"] = []
    assert errors_of(data) == [
        'pools[0].backends: required (or srv = "_service._tcp.name" to take them from DNS)'
    ]


def test_needs_a_listener() -> None:
    data = minimal()
    del data["listeners"]
    assert errors_of(data) == ["listeners: required"]


# --- references and names -----------------------------------------------------------------------


def test_unknown_pool_in_listener() -> None:
    data = minimal()
    data["listeners"][0]["pool"] = "ap"
    assert errors_of(data) == ["listeners[0].pool: unknown pool 'ap'"]


def test_unknown_pool_in_route() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"path_prefix": "/a"}, {"path_prefix": "/b", "pool": "nope"}]
    errors = errors_of(data)
    assert "listeners[0].routes[0].pool: required (or split, or redirect)" in errors
    assert "listeners[0].routes[1].pool: unknown pool 'nope'" in errors


def test_unknown_pool_in_split() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [
        {"split": [{"pool": "app", "weight": 95}, {"pool": "canary", "weight": 5}]}
    ]
    assert errors_of(data) == ["listeners[0].routes[0].split[1].pool: unknown pool 'canary'"]


def test_split_rules() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [
        {"split": [{"pool": "app", "weight": 0}]},
        {"pool": "app", "split": [{"pool": "app"}]},
        {"split": []},
    ]
    errors = errors_of(data)
    assert "listeners[0].routes[0].split: weights must sum to more than 0" in errors
    assert "listeners[0].routes[1].split: give either pool or split, not both" in errors
    assert "listeners[0].routes[2].split: must not be empty" in errors


def test_duplicate_names() -> None:
    data = minimal()
    data["listeners"].append({"name": "web", "bind": "127.0.0.1:8081", "protocol": "http", "pool": "app"})
    data["pools"].append(copy.deepcopy(data["pools"][0]))
    errors = errors_of(data)
    assert_error(data, "listeners[1].name", "duplicate listener 'web'")
    assert_error(data, "pools[1].name", "duplicate pool 'app'")
    assert len(errors) == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("[::]:8080", "10.1.1.1:8080"),
    ],
)
def test_duplicate_binds(first: str, second: str) -> None:
    data = minimal()
    data["listeners"][0]["bind"] = first
    data["listeners"].append({"name": "web2", "bind": second, "protocol": "http", "pool": "app"})
    assert errors_of(data) == ["listeners[1].bind: already used by listener 'web'"]


def test_port_zero_binds_do_not_collide() -> None:
    data = minimal()
    data["listeners"][0]["bind"] = "127.0.0.1:0"
    data["listeners"].append({"name": "web2", "bind": "127.0.0.1:0", "protocol": "http", "pool": "app"})
    parse_config(data)


def test_admin_bind_collides_with_listener() -> None:
    data = minimal()
    data["admin"] = {"bind": "127.0.0.1:8080"}
    assert errors_of(data) == ["admin.bind: already used by listener 'web'"]


def test_admin_off() -> None:
    data = minimal()
    data["admin"] = {"bind": "off"}
    assert parse_config(data).admin.bind == "off"


def test_duplicate_backend() -> None:
    data = minimal()
    data["pools"][0]["backends"][1]["address"] = "127.0.0.1:9001"
    assert errors_of(data) == ["pools[0].backends[1].address: duplicate of backends[0]"]


def test_bad_name() -> None:
    data = minimal()
    data["pools"][0]["name"] = "my pool/1"
    data["listeners"][0]["pool"] = "my pool/1"
    assert_error(data, "pools[0].name", "must be letters")


# --- hairpin ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "backend"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.53:8080"),
        ("0.0.0.0:8080", "localhost:8080"),
        ("0.0.0.0:8080", "[::1]:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "localhost:8080"),
        ("127.0.0.1:8080", "0.0.0.0:8080"),
    ],
)
def test_hairpin(bind: str, backend: str) -> None:
    data = minimal()
    data["listeners"][0]["bind"] = bind
    data["pools"][0]["backends"][1]["address"] = backend
    assert errors_of(data) == [
        "pools[0].backends[1].address: hairpin: this is listener 'web' (fastlb would send traffic to itself)"
    ]


@pytest.mark.parametrize(
    ("bind", "backend"),
    [
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8081"),
        ("127.0.0.1:0", "127.0.0.1:1"),
    ],
)
def test_not_hairpin(bind: str, backend: str) -> None:
    data = minimal()
    data["listeners"][0]["bind"] = bind
    data["pools"][0]["backends"][1]["address"] = backend
    parse_config(data)


def test_hairpin_on_local_interface_address() -> None:
    local = _a_local_non_loopback_ip()
    if local is None:
        local = "127.0.0.1"  # no other interface here: the loopback case still holds
    data = minimal()
    data["listeners"][0]["bind"] = "0.0.0.0:8080"
    data["pools"][0]["backends"][1]["address"] = f"{local}:8080"
    assert_error(data, "pools[0].backends[1].address", "hairpin: this is listener 'web'")


def test_hairpin_through_dns_found_by_to_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def fake(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host == "myself.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    data = minimal()
    data["pools"][0]["backends"][1]["address"] = "myself.example:8080"
    cfg = parse_config(data)
    with pytest.raises(ConfigError) as info:
        cfg.to_engine()
    assert info.value.errors == [
        "pools[0].backends[1].address: hairpin: this is listener 'web' (fastlb would send traffic to itself)"
    ]


def _a_local_non_loopback_ip() -> str | None:
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            ip = ipaddress.IPv6Address(int(line.split()[0], 16))
            if not ip.is_loopback and not ip.is_link_local:
                return f"[{ip}]"
    except OSError:
        pass
    return None


# --- protocols and routes -----------------------------------------------------------------------


def test_tcp_listener_with_routes() -> None:
    """A tcp listener's routes match the TLS SNI (tests/test_tls_config.py): `sni` is required."""
    data = minimal()
    data["listeners"][0]["protocol"] = "tcp"
    data["listeners"][0]["routes"] = [{"pool": "app"}]
    assert errors_of(data) == [
        "listeners[0].routes[0].sni: required on a tcp listener (its routes match the TLS SNI)"
    ]


def test_tcp_listener_with_rate_limit() -> None:
    data = minimal()
    data["listeners"][0]["protocol"] = "tcp"
    data["listeners"][0]["rate_limit"] = {"requests_per_second": 10}
    assert errors_of(data) == ['listeners[0].rate_limit: only for protocol = "http" or "https"']


def test_unknown_protocol() -> None:
    data = minimal()
    data["listeners"][0]["protocol"] = "smtp"
    assert errors_of(data) == ['listeners[0].protocol: must be "tcp", "http", "https", "tls" or "udp"']


def test_unknown_algorithm() -> None:
    data = minimal()
    data["pools"][0]["algorithm"] = "fastest"
    assert_error(data, "pools[0].algorithm", '"least_conn"')


def test_bad_regex() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"path_regex": "^/(api", "pool": "app"}]
    assert_error(data, "listeners[0].routes[0].path_regex", "bad regex")


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "banana", "::1/129"])
def test_bad_cidr(cidr: str) -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"source_cidr": ["10.0.0.0/8", cidr], "pool": "app"}]
    assert errors_of(data) == [f"listeners[0].routes[0].source_cidr[1]: not an IP network: {cidr!r}"]


def test_cidr_with_host_bits_is_accepted() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"source_cidr": ["10.1.2.3/8", "192.168.1.1"], "pool": "app"}]
    parse_config(data)


def test_route_path_rules() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [
        {"path_prefix": "api/", "pool": "app"},
        {"path_prefix": "/a", "path_exact": "/a", "pool": "app"},
        {"host": "*.example.com", "headers": {"bad header": "x"}, "pool": "app"},
    ]
    errors = errors_of(data)
    assert 'listeners[0].routes[0].path_prefix: must start with "/"' in errors
    assert any(e.startswith('listeners[0].routes[2].headers["bad header"]: ') for e in errors)
    data["listeners"][0]["routes"] = data["listeners"][0]["routes"][1:2]
    assert errors_of(data) == [
        "listeners[0].routes[0].path_exact: only one of path_prefix, path_exact, path_regex"
    ]


# --- L7 keys in the engine JSON ---------------------------------------------------------------


def l7_pools(data: dict[str, Any]) -> dict[str, Any]:
    data["pools"] += [
        {"name": "v1", "backends": [{"address": "127.0.0.1:9101"}]},
        {"name": "v2", "backends": [{"address": "127.0.0.1:9201"}]},
    ]
    return data


def test_listener_l7_keys_to_engine() -> None:
    data = l7_pools(minimal())
    data["listeners"][0].update(
        timeouts={"header_read": "2.5s"},
        max_header_bytes=8192,
        max_headers=50,
        rate_limit={"requests_per_second": 2.5},
        routes=[
            {
                "host": "API.Example.COM.",
                "path_prefix": "/api/",
                "headers": {"X-Client": "mobile", "accept": "text/html"},
                "cookies": {"AB-Test": "group-A"},
                "query": {"Beta": "1"},
                "source_cidr": ["10.1.2.3/8", "192.168.1.1", "2001:DB8::1/32", "::1"],
                "pool": "v1",
            },
            {"host": "*.example.com", "path_exact": "/health", "pool": "app"},
            {"path_regex": "^/v2/[a-z]+$", "split": [{"pool": "v1", "weight": 0}, {"pool": "v2"}]},
        ],
    )
    listener = parse_config(data).to_engine()["listeners"][0]
    assert listener == {
        "name": "web",
        "bind": "127.0.0.1:8080",
        "protocol": "http",
        "tls": None,
        "pool": "app",
        "client_idle_ms": 60_000,
        "header_read_ms": 2500,
        "max_header_bytes": 8192,
        "max_headers": 50,
        "rate_limit": {"requests_per_second": 2.5, "burst": 3},
        "udp": None,
        "http2": {"max_concurrent_streams": 100, "max_header_list_size": 65_536},
        "proxy_protocol": None,
        "trusted_proxies": [],
        "compression": None,
        "routes": [
            {
                "name": "0",
                "host": "api.example.com",
                "path_prefix": "/api/",
                "path_exact": None,
                "path_regex": None,
                "headers": {"x-client": "mobile", "accept": "text/html"},
                "cookies": {"AB-Test": "group-A"},
                "query": {"Beta": "1"},
                "source_cidr": ["10.0.0.0/8", "192.168.1.1/32", "2001:db8::/32", "::1/128"],
                "country": [],
                "request_headers": {"set": [], "add": [], "remove": []},
                "response_headers": {"set": [], "add": [], "remove": []},
                "rewrite_prefix": None,
                "sni": None,
                "redirect": None,
                "split": [{"pool": "v1", "weight": 1}],
                "split_affinity": None,
            },
            {
                "name": "1",
                "host": "*.example.com",
                "path_prefix": None,
                "path_exact": "/health",
                "path_regex": None,
                "headers": {},
                "cookies": {},
                "query": {},
                "source_cidr": [],
                "country": [],
                "request_headers": {"set": [], "add": [], "remove": []},
                "response_headers": {"set": [], "add": [], "remove": []},
                "rewrite_prefix": None,
                "sni": None,
                "redirect": None,
                "split": [{"pool": "app", "weight": 1}],
                "split_affinity": None,
            },
            {
                "name": "2",
                "host": None,
                "path_prefix": None,
                "path_exact": None,
                "path_regex": "^/v2/[a-z]+$",
                "headers": {},
                "cookies": {},
                "query": {},
                "source_cidr": [],
                "country": [],
                "request_headers": {"set": [], "add": [], "remove": []},
                "response_headers": {"set": [], "add": [], "remove": []},
                "rewrite_prefix": None,
                "sni": None,
                "redirect": None,
                "split": [{"pool": "v1", "weight": 0}, {"pool": "v2", "weight": 1}],
                "split_affinity": None,
            },
        ],
    }


def test_tcp_listener_sends_http_keys_as_defaults() -> None:
    data = minimal()
    data["listeners"][0]["protocol"] = "tcp"
    listener = parse_config(data).to_engine()["listeners"][0]
    assert {k: listener[k] for k in ("max_header_bytes", "max_headers", "rate_limit", "routes")} == {
        "max_header_bytes": 65_536,
        "max_headers": 100,
        "rate_limit": None,
        "routes": [],
    }


def test_pool_l7_keys_to_engine() -> None:
    data = minimal()
    data["pools"][0].update(
        affinity={"cookie": "SRV", "ttl": "1h"}, keepalive=0, queue={"size": 0, "timeout": "250ms"}
    )
    data["pools"].append(
        {
            "name": "other",
            "affinity": {"cookie": "S2"},
            "keepalive": 10_000,
            "queue": {"size": 1_000_000},
            "backends": [{"address": "127.0.0.1:9101"}],
        }
    )
    app, other = parse_config(data).to_engine()["pools"]
    assert {k: app[k] for k in ("affinity", "keepalive", "queue")} == {
        "affinity": {"cookie": "SRV", "ttl_ms": 3_600_000},
        "keepalive": 0,
        "queue": {"size": 0, "timeout_ms": 250},
    }
    assert {k: other[k] for k in ("affinity", "keepalive", "queue")} == {
        "affinity": {"cookie": "S2", "ttl_ms": 0},
        "keepalive": 10_000,
        "queue": {"size": 1_000_000, "timeout_ms": 5000},
    }


# --- L7 keys: bad values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_header_bytes", 1023, "must be >= 1024"),
        ("max_header_bytes", 1_048_577, "must be <= 1048576"),
        ("max_header_bytes", "64k", "must be an integer"),
        ("max_header_bytes", 8192.0, "must be an integer"),
        ("max_headers", 0, "must be >= 1"),
        ("max_headers", 1001, "must be <= 1000"),
        ("max_headers", True, "must be an integer"),
    ],
)
def test_bad_listener_l7_value(key: str, value: object, message: str) -> None:
    data = minimal()
    data["listeners"][0][key] = value
    assert errors_of(data) == [f"listeners[0].{key}: {message}"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_header_bytes", 1024), ("max_header_bytes", 1_048_576), ("max_headers", 1), ("max_headers", 1000)],
)
def test_listener_l7_bounds_allowed(key: str, value: int) -> None:
    data = minimal()
    data["listeners"][0][key] = value
    assert parse_config(data).to_engine()["listeners"][0][key] == value


@pytest.mark.parametrize(
    ("key", "value", "path", "message"),
    [
        ("keepalive", -1, "keepalive", "must be >= 0"),
        ("keepalive", 10_001, "keepalive", "must be <= 10000"),
        ("keepalive", "32", "keepalive", "must be an integer"),
        ("queue", 100, "queue", "must be a table"),
        ("queue", {"size": -1}, "queue.size", "must be >= 0"),
        ("queue", {"size": 1_000_001}, "queue.size", "must be <= 1000000"),
        ("queue", {"size": "1k"}, "queue.size", "must be an integer"),
        ("queue", {"timeout": "0s"}, "queue.timeout", "must be > 0"),
        ("queue", {"timeout": 5}, "queue.timeout", 'must be a duration with a unit, e.g. "5s"'),
        ("queue", {"maxqueue": 5}, "queue.maxqueue", "unknown key"),
        ("affinity", {"cookie": "a b"}, "affinity.cookie", "not a valid header/cookie name: 'a b'"),
        ("affinity", {"cookie": "S", "ttl": "0s"}, "affinity.ttl", "must be > 0"),
    ],
)
def test_bad_pool_l7_value(key: str, value: object, path: str, message: str) -> None:
    data = minimal()
    data["pools"][0][key] = value
    assert errors_of(data) == [f"pools[0].{path}: {message}"]


@pytest.mark.parametrize(("key", "value"), [("max_header_bytes", 8192), ("max_headers", 10)])
def test_tcp_listener_with_header_limits(key: str, value: int) -> None:
    data = minimal()
    data["listeners"][0].update({"protocol": "tcp", key: value})
    assert errors_of(data) == [f'listeners[0].{key}: only for protocol = "http" or "https"']


@pytest.mark.parametrize(("key", "value"), [("keepalive", 0), ("queue", {"size": 10})])
def test_tcp_listener_pool_with_http_only_key(key: str, value: object) -> None:
    data = minimal()
    data["listeners"][0]["protocol"] = "tcp"
    data["pools"][0][key] = value
    assert errors_of(data) == [f"pools[0].{key}: http only, but tcp listener 'web' uses this pool"]


def test_tcp_listener_pool_with_default_http_keys_written_out() -> None:
    data = minimal()
    data["listeners"][0].update(protocol="tcp", max_header_bytes=65_536, max_headers=100)
    data["pools"][0].update(keepalive=256, queue={"size": 1000, "timeout": "5s"})
    parse_config(data)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("^/(api", "bad regex: unclosed group"),
        ("^/(?=api)", "bad regex: look-around, including look-ahead and look-behind, is not supported"),
        (r"^/(a)\1", "bad regex: backreferences are not supported"),
        ("a{1000}{1000}", "bad regex: Compiled regex exceeds size limit of 10485760 bytes."),
    ],
)
def test_regex_the_data_plane_cannot_compile(pattern: str, message: str) -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [
        {"path_prefix": "/", "pool": "app"},
        {"path_regex": pattern, "pool": "app"},
    ]
    assert errors_of(data) == [f"listeners[0].routes[1].path_regex: {message}"]


@pytest.mark.parametrize("pattern", [r"^/(?<ver>v\d+)/", r"^/static/.+\.(css|js)\z", "[[:alpha:]]+"])
def test_regex_in_data_plane_syntax_accepted(pattern: str) -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"path_regex": pattern, "pool": "app"}]
    assert parse_config(data).to_engine()["listeners"][0]["routes"][0]["path_regex"] == pattern


def test_route_names_a_header_twice() -> None:
    data = minimal()
    data["listeners"][0]["routes"] = [{"headers": {"X-Client": "a", "x-client": "b"}, "pool": "app"}]
    assert errors_of(data) == [
        'listeners[0].routes[0].headers["x-client"]: same header as "X-Client" (names are case-insensitive)'
    ]


# --- hash keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["header:", "header", "ip", "cookie:a b", "query:", "source-ip"])
def test_bad_hash_key(key: str) -> None:
    data = minimal()
    data["pools"][0].update(algorithm="consistent_hash", hash_key=key)
    assert_error(data, "pools[0].hash_key")


@pytest.mark.parametrize(
    ("key", "engine"),
    [
        ("source_ip", "source_ip"),
        ("path", "path"),
        ("header:X-User", {"header": "x-user"}),
        ("cookie:SID", {"cookie": "SID"}),
        ("query:user", {"query": "user"}),
    ],
)
def test_hash_key_engine_form(key: str, engine: object) -> None:
    data = minimal()
    data["pools"][0].update(algorithm="maglev", hash_key=key)
    assert parse_config(data).to_engine()["pools"][0]["hash_key"] == engine


def test_tcp_listener_with_header_hash_key() -> None:
    data = minimal()
    data["listeners"][0]["protocol"] = "tcp"
    data["pools"][0].update(algorithm="consistent_hash", hash_key="header:x-user")
    assert_error(data, "pools[0].hash_key", "tcp listener 'web'")


def test_hash_key_with_non_hash_algorithm() -> None:
    data = minimal()
    data["pools"][0]["hash_key"] = "path"
    assert_error(data, "pools[0].hash_key", "only used by")


@pytest.mark.parametrize(
    ("factor", "ok"), [(0, True), (100, True), (150, True), (99, False), (1, False), (-5, False)]
)
def test_hash_balance_factor(factor: int, ok: bool) -> None:
    data = minimal()
    data["pools"][0].update(algorithm="consistent_hash", hash_balance_factor=factor)
    if ok:
        assert parse_config(data).to_engine()["pools"][0]["hash_balance_factor"] == factor
    else:
        assert_error(data, "pools[0].hash_balance_factor")


# --- runtime ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["some", [], [-1], [0, 0], [True], "0", 1.5])
def test_bad_cpu_affinity(value: object) -> None:
    data = minimal()
    data["runtime"] = {"cpu_affinity": value}
    assert_error(data, "runtime.cpu_affinity")


@pytest.mark.parametrize("value", [0, -1, "many", True, 2.0])
def test_bad_workers(value: object) -> None:
    data = minimal()
    data["runtime"] = {"workers": value}
    assert errors_of(data) == ['runtime.workers: must be an integer >= 1 or "auto"']


def test_workers_and_cpus_to_engine() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    data = minimal()
    data["runtime"] = {"workers": "auto", "cpu_affinity": [allowed[0]]}
    assert parse_config(data).to_engine()["runtime"] == {
        "workers": 1,
        "cpus": [allowed[0]],
        "max_connections": 50_000,
    }
    data["runtime"] = {"workers": 3, "cpu_affinity": "off", "max_connections": 0}
    assert parse_config(data).to_engine()["runtime"] == {"workers": 3, "cpus": [], "max_connections": 0}
    data["runtime"] = {"workers": "auto", "cpu_affinity": "off"}
    assert parse_config(data).to_engine()["runtime"]["workers"] == len(allowed)


def test_cpu_not_available_is_config_error() -> None:
    data = minimal()
    data["runtime"] = {"cpu_affinity": [max(os.sched_getaffinity(0)) + 1]}
    with pytest.raises(ConfigError) as info:
        parse_config(data).to_engine()
    assert info.value.errors[0].startswith("runtime.cpu_affinity: ")


# --- health, alerts, log ------------------------------------------------------------------------


def test_health_rules() -> None:
    data = minimal()
    data["pools"][0]["health"] = {
        "type": "tcp",
        "path": "/health",
        "interval": "1s",
        "timeout": "2s",
        "rise": 0,
    }
    errors = errors_of(data)
    assert errors == ["pools[0].health.rise: must be >= 1"]
    del data["pools"][0]["health"]["rise"]
    errors = errors_of(data)
    assert "pools[0].health.timeout: must not exceed interval (1s)" in errors
    assert 'pools[0].health.path: only for type = "http" or "https"' in errors


def test_health_bad_type_and_status() -> None:
    data = minimal()
    data["pools"][0]["health"] = {"type": "icmp"}
    assert_error(data, "pools[0].health.type", '"tcp"')
    data["pools"][0]["health"] = {"type": "http", "expect_status": [200, 999]}
    assert_error(data, "pools[0].health.expect_status[1]", "100..599")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("healthy < 2", "unknown metric"),
        ("error_rate >", "METRIC OP NUMBER"),
        ("latency_p99 > x", "not a number"),
    ],
)
def test_bad_alert(expr: str, message: str) -> None:
    data = minimal()
    data["alerts"] = [{"name": "A", "expr": expr}]
    assert_error(data, "alerts[0].expr", message)


def test_bad_log_level() -> None:
    data = minimal()
    data["log"] = {"level": "loud"}
    assert_error(data, "log.level", '"info"')


def test_type_errors_are_short() -> None:
    data = minimal()
    data["pools"][0]["backends"][0]["backup"] = "yes"
    data["pools"][0]["backends"][1]["max_connections"] = "10"
    data["listeners"][0]["routes"] = {"pool": "app"}
    assert sorted(errors_of(data)) == [
        "listeners[0].routes: must be a list",
        "pools[0].backends[0].backup: must be true or false",
        "pools[0].backends[1].max_connections: must be an integer",
    ]


# --- files --------------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[runtime]\nworkers = "auto"\nmax_connections = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert line.startswith(f"{path}: line 3") and "TOML syntax error" in line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_config_error_is_value_error_with_lines() -> None:
    err = ConfigError(["a: one", "b: two"])
    assert isinstance(err, ValueError)
    assert str(err) == "a: one\nb: two"
    assert err.errors == ["a: one", "b: two"]


def test_unknown_key_in_file(tmp_path: Path) -> None:
    text = FULL_EXAMPLE.replace("retries = 2\n", "retries = 2\nretry = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.errors == ["pools[0].retry: unknown key"]


def test_config_type() -> None:
    assert isinstance(parse_config(minimal()), Config)


# --- the CLI: `fastlb check` --------------------------------------------------------------------


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_cli_check_ok(path: Path, tmp_path: Path) -> None:
    result = run_check(example_with_certificates(path, tmp_path))
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


def test_cli_check_full_example_ok(tmp_path: Path) -> None:
    result = run_check(write(tmp_path, FULL_EXAMPLE))
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ('address = "127.0.0.1:9002"', 'address = "127.0.0.1"', "pools[0].backends[1].address"),
        ("weight = 3,", "weight = 1001,", "pools[0].backends[1].weight"),
        ("retries = 2\n", "retries = 2\nretry = 3\n", "pools[0].retry"),
        ('pool = "v2"\n\n[[pools]]', 'pool = "nope"\n\n[[pools]]', "listeners[1].pool"),
        ('address = "127.0.0.1:9003"', 'address = "127.0.0.1:8080"', "pools[0].backends[2].address"),
        ('connect = "2s"', "connect = 2", "pools[0].timeouts.connect"),
        ('protocol = "tcp"', 'protocol = "sctp"', "listeners[1].protocol"),
        ("max_connections = 50000", "max_connections = ", ":"),
    ],
)
def test_cli_check_invalid(tmp_path: Path, old: str, new: str, path: str) -> None:
    assert old in FULL_EXAMPLE
    result = run_check(write(tmp_path, FULL_EXAMPLE.replace(old, new, 1)))
    assert result.returncode == 2
    assert path in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() != "ok"


def test_cli_check_missing_file(tmp_path: Path) -> None:
    result = run_check(tmp_path / "absent.toml")
    assert result.returncode == 2 and "absent.toml" in result.stderr and "Traceback" not in result.stderr


def test_native_engine_accepts_to_engine() -> None:
    """The dict goes through the real serde schema (deny_unknown_fields) unchanged."""
    data = minimal()
    data["listeners"][0]["bind"] = "127.0.0.1:0"
    data["listeners"].append({"name": "raw", "bind": "[::1]:0", "protocol": "tcp", "pool": "hashed"})
    data["runtime"] = {"workers": 1, "cpu_affinity": "off"}
    data["admin"] = {"bind": "off"}
    data["pools"].append(
        {
            "name": "hashed",
            "algorithm": "consistent_hash",
            "hash_balance_factor": 125,
            "backends": [{"address": "localhost:9101", "weight": 2, "max_connections": 5, "backup": True}],
        }
    )
    data["pools"][0].update(
        algorithm="maglev",
        hash_key="header:X-User",
        affinity={"cookie": "SRV", "ttl": "1h"},
        keepalive=0,
        queue={"size": 0, "timeout": "1s"},
    )
    data["listeners"][0].update(
        max_header_bytes=4096,
        max_headers=20,
        rate_limit={"requests_per_second": 0.5, "burst": 2},
        routes=[
            {
                "host": "*.Example.com",
                "path_regex": "^/v[0-9]+/",
                "headers": {"X-A": "1"},
                "cookies": {"c": "1"},
                "query": {"q": "1"},
                "source_cidr": ["10.1.2.3/8"],
                "pool": "hashed",
            },
            {"path_prefix": "/", "split": [{"pool": "app", "weight": 9}, {"pool": "hashed", "weight": 1}]},
        ],
    )
    spec = json.dumps(parse_config(data).to_engine())
    engine = Engine(spec)
    try:
        engine.update(spec)
    finally:
        engine.stop(0.1)


def test_data_path_proxy_is_the_default_and_may_be_written() -> None:
    data = minimal()
    data["listeners"][0].update(protocol="tcp", data_path="proxy")
    assert parse_config(data).listeners[0].data_path == "proxy"
