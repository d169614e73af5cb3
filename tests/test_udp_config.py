"""UDP on the control plane (issue 14): the config (`protocol = "udp"`, `udp`, session_idle, dns
and udp health keys) and its engine JSON, the udp metric families, the dashboard's udp row, and
the `dns` / `udp` health checks against real servers on loopback (a dnslib server thread,
Debian's dnsmasq, plain UDP sockets), under asyncio's loop and uvloop (what `fastlb serve` runs)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import dnslib
import pytest
import uvloop
from admin import FakeAdmin
from prometheus_client.parser import text_string_to_metric_families

from fastlb._native import engine_config_error
from fastlb.cli import main as cli_main
from fastlb.config import Config, ConfigError, Health, parse_config
from fastlb.health import BackendHealth, HealthChecker, probe
from fastlb.metrics import families, render

from conftest import FakeEngine, free_port

REPO = Path(__file__).resolve().parent.parent


def udp_config(**listener: Any) -> dict[str, Any]:
    """A udp listener "dns" over pool "dns" (maglev, two backends, dns health), plus `listener`
    keys; a tcp listener "web" over pool "app"."""
    return {
        "admin": {"bind": "off"},
        "runtime": {"workers": 1, "cpu_affinity": "off"},
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:18080", "protocol": "tcp", "pool": "app"},
            {"name": "dns", "bind": "127.0.0.1:15353", "protocol": "udp", "pool": "dns", **listener},
        ],
        "pools": [
            {"name": "app", "backends": [{"address": "127.0.0.1:19001"}]},
            {
                "name": "dns",
                "algorithm": "maglev",
                "backends": [{"address": "127.0.0.1:15301"}, {"address": "127.0.0.1:15302", "weight": 2}],
                "health": {"type": "dns", "query": "health.example.", "expect_rcode": ["NOERROR"]},
            },
        ],
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert all("\n" not in e for e in info.value.errors)
    return list(info.value.errors)


# --- config: valid udp listeners and their engine JSON ---------------------------------------


def test_udp_listener_defaults_to_engine() -> None:
    engine = parse_config(udp_config()).to_engine()
    web, dns = engine["listeners"]
    assert web["udp"] is None
    assert dns["protocol"] == "udp"
    assert dns["udp"] == {
        "session_idle_ms": 30_000,
        "responses": 0,
        "per_packet": False,
        "max_sessions": 100_000,
    }
    # the tcp-ish keys still go, with their usual defaults
    assert {k: dns[k] for k in ("tls", "rate_limit", "routes", "header_read_ms", "max_header_bytes")} == {
        "tls": None,
        "rate_limit": None,
        "routes": [],
        "header_read_ms": 10_000,
        "max_header_bytes": 65_536,
    }
    assert set(dns) == set(web)


def test_udp_settings_to_engine() -> None:
    data = udp_config(
        timeouts={"session_idle": "1m30s"}, udp={"responses": 1, "per_packet": True, "max_sessions": 7}
    )
    dns = parse_config(data).to_engine()["listeners"][1]
    assert dns["udp"] == {"session_idle_ms": 90_000, "responses": 1, "per_packet": True, "max_sessions": 7}


def test_dns_health_is_normalised_as_dnspython_spells_it() -> None:
    data = udp_config()
    data["pools"][1]["health"] = {"type": "dns", "query": "Health.Example", "query_type": "aaaa",
                                  "expect_rcode": ["noerror", "NXDomain"]}  # fmt: skip
    health = parse_config(data).pools[1].health
    assert (health.query, health.query_type, health.expect_rcode) == (
        "Health.Example.",
        "AAAA",
        ["NOERROR", "NXDOMAIN"],
    )
    default = Health(type="dns")
    assert (default.query, default.query_type, default.expect_rcode) == ("a.root-servers.net.", "A", None)
    assert default.rcode_ok("NXDOMAIN") and default.rcode_ok("REFUSED") and not default.rcode_ok("SERVFAIL")


def test_udp_pool_without_health_gets_none_and_a_warning() -> None:
    data = udp_config()
    del data["pools"][1]["health"]
    cfg = parse_config(data)
    assert cfg.pools[1].health.type == "none"
    assert cfg.pools[0].health.type == "tcp"  # the tcp listener's pool keeps the tcp default
    assert cfg.warnings == [
        "pools[1].health: not set on a pool only udp listeners use, so it has no active checks"
        ' (type = "none"); set type = "dns" or "udp"'
    ]


def test_dns_and_udp_health_on_a_pool_shared_with_tcp() -> None:
    """DNS over TCP and UDP on the same backends: any health type; no warning."""
    data = udp_config()
    data["listeners"][0]["pool"] = "dns"
    for health in ({"type": "dns"}, {"type": "udp", "send": "ping"}, {"type": "tcp"}):
        data["pools"][1]["health"] = health
        assert parse_config(data).warnings == []
    del data["pools"][1]["health"]
    cfg = parse_config(data)
    assert cfg.pools[1].health.type == "tcp" and cfg.warnings == []


def test_udp_and_tcp_listeners_share_an_address_and_port() -> None:
    """DNS over UDP and TCP on one port: the port spaces are apart; two udp listeners are not,
    and nor is the admin API (TCP) with a tcp listener."""
    data = udp_config()
    data["listeners"][0]["bind"] = data["listeners"][1]["bind"]
    data["listeners"][0]["pool"] = "dns"
    data["admin"]["bind"] = data["listeners"][1]["bind"]
    assert errors_of(data) == ["admin.bind: already used by listener 'web'"]
    data["admin"]["bind"] = "off"
    assert [x["bind"] for x in parse_config(data).to_engine()["listeners"]] == ["127.0.0.1:15353"] * 2
    data["listeners"][0]["protocol"] = "udp"
    data["listeners"][0]["name"] = "dns2"
    assert errors_of(data) == ["listeners[1].bind: already used by listener 'dns2'"]


def test_hairpin_by_transport() -> None:
    """A udp pool's backend at a udp listener's address is fastlb itself; at a tcp listener's
    address (the same port number) it is not, and the other way round."""
    data = udp_config()
    data["pools"][1]["backends"] = [{"address": "127.0.0.1:15353"}]  # the udp listener
    assert errors_of(data) == [
        "pools[1].backends[0].address: hairpin: this is listener 'dns' (fastlb would send traffic to itself)"
    ]
    data["pools"][1]["backends"] = [{"address": "127.0.0.1:18080"}]  # the tcp listener's port, over udp
    data["pools"][0]["backends"] = [{"address": "127.0.0.1:15353"}]  # the udp listener's port, over tcp
    parse_config(data).to_engine()


def test_every_algorithm_on_a_udp_pool() -> None:
    for algorithm in (
        "round_robin",
        "least_conn",
        "random",
        "p2c",
        "peak_ewma",
        "ip_hash",
        "consistent_hash",
    ):
        data = udp_config()
        data["pools"][1]["algorithm"] = algorithm
        assert parse_config(data).to_engine()["pools"][1]["algorithm"] == algorithm


# --- config: errors, each naming its field ---------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to a udp_config(): `path` like "listeners.1.udp" or "pools.1.health.send"."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[int(last) if last.isdigit() else last] = value

    return change


REFUSALS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("udp on tcp", _set("listeners.0.udp", {"responses": 1}), 'listeners[0].udp: only for protocol = "udp"'),
    (
        "session_idle on tcp",
        _set("listeners.0.timeouts", {"session_idle": "5s"}),
        'listeners[0].timeouts.session_idle: only for protocol = "udp"',
    ),
    ("responses < 0", _set("listeners.1.udp", {"responses": -1}), "listeners[1].udp.responses: must be >= 0"),
    (
        "max_sessions 0",
        _set("listeners.1.udp", {"max_sessions": 0}),
        "listeners[1].udp.max_sessions: must be >= 1",
    ),
    (
        "per_packet string",
        _set("listeners.1.udp", {"per_packet": "yes"}),
        "listeners[1].udp.per_packet: must be true or false",
    ),
    ("unknown udp key", _set("listeners.1.udp", {"responce": 1}), "listeners[1].udp.responce: unknown key"),
    (
        "session_idle 0",
        _set("listeners.1.timeouts", {"session_idle": "0s"}),
        "listeners[1].timeouts.session_idle: must be > 0",
    ),
    (
        "routes",
        _set("listeners.1.routes", [{"pool": "dns"}]),
        'listeners[1].routes: not for protocol = "udp"',
    ),
    (
        "tls",
        _set("listeners.1.tls", {"certificates": [{"cert": "a.pem", "key": "a.key"}]}),
        'listeners[1].tls: only for protocol = "https" or "tls"',
    ),
    (
        "rate_limit",
        _set("listeners.1.rate_limit", {"requests_per_second": 10}),
        'listeners[1].rate_limit: only for protocol = "http" or "https"',
    ),
    (
        "header_read",
        _set("listeners.1.timeouts", {"header_read": "1s"}),
        'listeners[1].timeouts.header_read: only for protocol = "http" or "https"',
    ),
    (
        "max_header_bytes",
        _set("listeners.1.max_header_bytes", 4096),
        'listeners[1].max_header_bytes: only for protocol = "http" or "https"',
    ),
    (
        "client_idle",
        _set("listeners.1.timeouts", {"client_idle": "5m"}),
        'listeners[1].timeouts.client_idle: not for protocol = "udp"',
    ),
    (
        "hash_key",
        _set("pools.1.hash_key", "header:x-id"),
        "pools[1].hash_key: udp listener 'dns' uses this pool; only \"source_ip\" works for udp",
    ),
    (
        "affinity",
        _set("pools.1.affinity", {"cookie": "s"}),
        "pools[1].affinity: http only, but udp listener 'dns' uses this pool",
    ),
    (
        "pool tls",
        _set("pools.1.tls", {"verify": False}),
        "pools[1].tls: not for udp, but udp listener 'dns' uses this pool",
    ),
    (
        "tcp health",
        _set("pools.1.health", {"type": "tcp"}),
        'pools[1].health.type: "tcp" checks a TCP port, but only udp listeners use this pool;'
        ' use "dns", "udp" or "none"',
    ),
    (
        "http health",
        _set("pools.1.health", {"type": "http", "path": "/h"}),
        'pools[1].health.type: "http" checks a TCP port',
    ),
    (
        "health without type",
        _set("pools.1.health", {"interval": "5s"}),
        'pools[1].health.type: "tcp" (the default) checks a TCP port',
    ),
    (
        "unknown health type",
        _set("pools.1.health", {"type": "icmp"}),
        'pools[1].health.type: must be "tcp", "http", "https", "dns", "udp", "grpc" or "none"',
    ),
    (
        "udp health without send",
        _set("pools.1.health", {"type": "udp", "expect": "pong"}),
        'pools[1].health.send: required for type = "udp"',
    ),
    (
        "empty expect",
        _set("pools.1.health", {"type": "udp", "send": "ping", "expect": ""}),
        "pools[1].health.expect: must not be empty",
    ),
    (
        "send too big",
        _set("pools.1.health", {"type": "udp", "send": "x" * 65_508}),
        "pools[1].health.send: longer than one datagram (65507 bytes as UTF-8)",
    ),
    (
        "dns keys on udp health",
        _set("pools.1.health", {"type": "udp", "send": "ping", "query": "a.example."}),
        'pools[1].health.query: only for type = "dns"',
    ),
    (
        "dns keys on tcp health",
        _set("pools.0.health", {"type": "tcp", "expect_rcode": ["NOERROR"]}),
        'pools[0].health.expect_rcode: only for type = "dns"',
    ),
    (
        "udp keys on dns health",
        _set("pools.1.health", {"type": "dns", "send": "ping"}),
        'pools[1].health.send: only for type = "udp"',
    ),
    (
        "udp keys on tcp health",
        _set("pools.0.health", {"type": "tcp", "expect": "pong"}),
        'pools[0].health.expect: only for type = "udp"',
    ),
    (
        "http keys on dns health",
        _set("pools.1.health", {"type": "dns", "path": "/h"}),
        'pools[1].health.path: only for type = "http" or "https"',
    ),
    (
        "bad query type",
        _set("pools.1.health", {"type": "dns", "query_type": "AAAAA"}),
        'pools[1].health.query_type: not a DNS record type: "AAAAA"',
    ),
    (
        "AXFR query",
        _set("pools.1.health", {"type": "dns", "query_type": "axfr"}),
        "pools[1].health.query_type: AXFR cannot be asked for in a health check",
    ),
    (
        "bad rcode",
        _set("pools.1.health", {"type": "dns", "expect_rcode": ["NOERROR", "OK"]}),
        'pools[1].health.expect_rcode[1]: unknown rcode "OK"',
    ),
    (
        "rcode number",
        _set("pools.1.health", {"type": "dns", "expect_rcode": ["0"]}),
        'pools[1].health.expect_rcode[0]: unknown rcode "0"',
    ),
    (
        "empty rcode list",
        _set("pools.1.health", {"type": "dns", "expect_rcode": []}),
        "pools[1].health.expect_rcode: must not be empty",
    ),
    (
        "bad query name",
        _set("pools.1.health", {"type": "dns", "query": "a..example"}),
        "pools[1].health.query: not a DNS name: A DNS label is empty.",
    ),
    (
        "empty query name",
        _set("pools.1.health", {"type": "dns", "query": ""}),
        "pools[1].health.query: must be a DNS name",
    ),
    (
        "query label too long",
        _set("pools.1.health", {"type": "dns", "query": "x" * 64 + ".example."}),
        "pools[1].health.query: not a DNS name: A DNS label is > 63 octets long.",
    ),
]


@pytest.mark.parametrize(("change", "expected"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused(change: Callable[[dict[str, Any]], None], expected: str) -> None:
    data = udp_config()
    change(data)
    errors = errors_of(data)
    field = expected.split(": ")[0]
    assert any(e.startswith(field + ": ") and expected in e for e in errors), (expected, errors)


def test_udp_was_reserved_and_is_now_a_protocol() -> None:
    data = udp_config()
    data["listeners"][1]["protocol"] = "quic"
    assert errors_of(data) == ['listeners[1].protocol: must be "tcp", "http", "https", "tls" or "udp"']


def toml(data: dict[str, Any]) -> str:
    """The config as TOML (inline tables; enough for these configs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, list)]
    for key, entries in data.items():
        if isinstance(entries, list):
            for entry in entries:
                lines += [f"[[{key}]]", *(f"{k} = {value(v)}" for k, v in entry.items())]
    return "\n".join(lines) + "\n"


def check(tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fastlb check -c FILE` in this process: (exit code, stdout, stderr)."""
    path = tmp_path / "fastlb.toml"
    path.write_text(toml(data))
    code = cli_main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_check_udp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, udp_config(udp={"responses": 1}), capsys) == (0, "ok\n", "")
    data = udp_config()
    del data["pools"][1]["health"]
    code, out, err = check(tmp_path, data, capsys)
    assert (code, out) == (0, "ok\n") and err.startswith("warning: pools[1].health: ")
    code, out, err = check(tmp_path, udp_config(udp={"max_sessions": 0}), capsys)
    assert (code, out, err) == (2, "", "listeners[1].udp.max_sessions: must be >= 1\n")
    bad = udp_config(routes=[{"pool": "dns"}])
    bad["pools"][1]["health"] = {"type": "udp"}
    code, out, err = check(tmp_path, bad, capsys)
    assert (code, out) == (2, "")
    assert sorted(line.split(": ")[0] for line in err.splitlines()) == [
        "listeners[1].routes",
        "pools[1].health.send",
    ]


def test_example_file_checks(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["check", "-c", str(REPO / "examples" / "udp-dns.toml")])
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "ok\n", "")


@pytest.mark.parametrize("doc", ["docs/udp.md", "README.md"])
def test_documented_udp_configs_check(doc: str) -> None:
    """Every complete UDP example in the docs (a toml block with a udp listener and its pool)."""
    blocks = (REPO / doc).read_text().split("```toml\n")[1:]
    configs = [b.split("```")[0] for b in blocks if 'protocol = "udp"' in b.split("```")[0]]
    complete = [c for c in configs if "[[pools]]" in c]
    assert complete
    for text in complete:
        parse_config(tomllib.loads(text))


def test_dump_round_trips() -> None:
    cfg = parse_config(udp_config(timeouts={"session_idle": "5s"}, udp={"per_packet": True}))
    assert parse_config(cfg.model_dump(by_alias=True)) == cfg


# --- the native engine takes the JSON (once the data plane has udp) ---------------------------


def _native_has_udp() -> bool:
    spec = parse_config(udp_config()).to_engine()
    error = engine_config_error(json.dumps(spec)) or ""
    return "unknown field `udp`" not in error and "unknown variant `udp`" not in error


@pytest.mark.skipif(not _native_has_udp(), reason="this native build predates udp listeners (issue 14)")
def test_native_engine_accepts_udp_listeners() -> None:
    spec = parse_config(udp_config(udp={"responses": 1, "per_packet": True})).to_engine()
    assert engine_config_error(json.dumps(spec)) is None
    tcp_with_udp = copy.deepcopy(spec)
    tcp_with_udp["listeners"][0]["udp"] = spec["listeners"][1]["udp"]
    assert engine_config_error(json.dumps(tcp_with_udp)) is not None


# --- metrics ----------------------------------------------------------------------------------


def _listener(name: str, protocol: str, udp: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": protocol,
        "bind": "127.0.0.1:1",
        "pool": "p",
        "connections_total": 0,
        "connections_active": 0,
        "requests_total": 0,
        "dropped": {
            "max_connections": 0,
            "no_backend": 0,
            "rate_limited": 0,
            "bad_request": 0,
            "proxy_protocol": 0,
        },
        "bytes_in": 100,
        "bytes_out": 300,
        "durations": [],
        "udp": udp,
    }


UDP_STATS = {
    "datagrams": {"in": 10, "out": 9, "to_backend": 11, "from_backend": 8},
    "sessions_active": 3,
    "sessions_total": 7,
    "dropped": {"max_sessions": 4, "no_backend": 1, "send_error": 2, "unreachable": 5},
}
STATUS: dict[str, Any] = {
    "buckets_s": [0.001, 0.01],
    "responses": [],
    "log_dropped": 0,
    "listeners": [_listener("web", "tcp", None), _listener("dns", "udp", UDP_STATS)],
    "pools": [],
}


def samples(status: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render(status).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_udp_metrics_from_the_stats_document() -> None:
    got = samples(STATUS)
    udp = {k: v for k, v in got.items() if k[0].startswith("fastlb_udp_")}
    assert udp == {
        ("fastlb_udp_datagrams_total", (("direction", "in"), ("listener", "dns"))): 10,
        ("fastlb_udp_datagrams_total", (("direction", "out"), ("listener", "dns"))): 9,
        ("fastlb_udp_datagrams_total", (("direction", "to_backend"), ("listener", "dns"))): 11,
        ("fastlb_udp_datagrams_total", (("direction", "from_backend"), ("listener", "dns"))): 8,
        ("fastlb_udp_sessions_active", (("listener", "dns"),)): 3,
        ("fastlb_udp_sessions_total", (("listener", "dns"),)): 7,
        ("fastlb_udp_dropped_total", (("listener", "dns"), ("reason", "max_sessions"))): 4,
        ("fastlb_udp_dropped_total", (("listener", "dns"), ("reason", "no_backend"))): 1,
        ("fastlb_udp_dropped_total", (("listener", "dns"), ("reason", "send_error"))): 2,
        ("fastlb_udp_dropped_total", (("listener", "dns"), ("reason", "unreachable"))): 5,
    }
    # the listener-wide families still count a udp listener's payload bytes
    assert got["fastlb_bytes_total", (("direction", "in"), ("listener", "dns"))] == 100


def test_udp_metric_families_without_udp_listeners_have_no_series() -> None:
    status = {**STATUS, "listeners": [_listener("web", "tcp", None)]}
    names = {f.name: f.samples for f in families(status)}
    for name in (
        "fastlb_udp_datagrams",
        "fastlb_udp_sessions_active",
        "fastlb_udp_sessions",
        "fastlb_udp_dropped",
    ):
        assert names[name] == []
    # a stats document from before udp (no key at all) reads the same
    old = _listener("web", "tcp", None)
    del old["udp"]
    assert [f.samples for f in families({**STATUS, "listeners": [old]}) if "udp" in f.name] == [
        [],
        [],
        [],
        [],
    ]


# --- dashboard --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_shows_udp_sessions_and_datagrams() -> None:
    assert CHROMIUM, "the dashboard test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    status = {
        **STATUS,
        "version": "test",
        "uptime_s": 1,
        "reloads": 0,
        "stopping": False,
        "connections_active": 0,
    }
    admin = FakeAdmin(status)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{admin.port}/")
                row = page.locator('tr[data-listener="dns"]')
                row.wait_for(timeout=10_000)
                assert row.locator("[data-testid=sessions]").inner_text() == "3"
                assert row.locator("[data-testid=datagrams-in]").inner_text() == "10 dgram"
                assert row.locator("[data-testid=datagrams-out]").inner_text() == "9 dgram"
                web = page.locator('tr[data-listener="web"]')
                assert web.locator("[data-testid=sessions]").count() == 0
                assert web.locator("[data-testid=datagrams-in]").count() == 0
            finally:
                browser.close()
    finally:
        admin.close()


# --- health checks against real servers -----------------------------------------------------

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on asyncio's loop, then (second run of the test) on uvloop."""
    return LOOPS[request.param]  # type: ignore[return-value]


def backend(address: str, **health: Any) -> BackendHealth:
    check = Health.model_validate({"interval": "2s", "timeout": "1s", **health})
    return BackendHealth("dns", address, address, check, "127.0.0.1")


def timed(run: Callable[[Coroutine[Any, Any, str]], str], b: BackendHealth) -> tuple[str, float]:
    start = time.monotonic()
    result = run(probe(b))
    return result, time.monotonic() - start


class UdpServer:
    """A UDP server thread; `reply(data)` gives the datagrams to send back for one received."""

    def __init__(self, reply: Callable[[bytes], list[bytes]]) -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                data, peer = self.sock.recvfrom(65_535)
            except TimeoutError:
                continue
            self.received.append(data)
            for out in self.reply(data):
                self.sock.sendto(out, peer)

    def close(self) -> None:
        """Stops serving and closes the port (a datagram to it then gets ICMP port unreachable)."""
        self.closing.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def udp_server() -> Iterator[Callable[[Callable[[bytes], list[bytes]]], UdpServer]]:
    started: list[UdpServer] = []

    def start(reply: Callable[[bytes], list[bytes]]) -> UdpServer:
        s = UdpServer(reply)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def closed_udp_port() -> str:
    """A loopback UDP port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_udp_check_sends_the_payload_and_finds_the_substring(run, udp_server) -> None:
    server = udp_server(lambda data: [b"PONG " + data.upper()])
    assert run(probe(backend(server.address, type="udp", send="ping", expect="PONG PING"))) == ""
    assert run(probe(backend(server.address, type="udp", send="ping"))) == ""  # no expect: any reply
    assert server.received == [b"ping", b"ping"]


def test_udp_check_fails_on_a_reply_without_the_substring(run, udp_server) -> None:
    server = udp_server(lambda data: [b"busy"])
    result = run(probe(backend(server.address, type="udp", send="ping", expect="pong")))
    assert result == "reply lacks 'pong': b'busy'"


def test_udp_check_fails_when_no_reply_comes(run, udp_server) -> None:
    server = udp_server(lambda data: [])
    result, took = timed(run, backend(server.address, type="udp", send="ping", timeout="300ms"))
    assert result == "no answer within 300ms"
    assert 0.25 < took < 1.5 and server.received == [b"ping"]


def test_udp_check_fails_at_once_on_port_unreachable(run) -> None:
    result, took = timed(
        run, backend(closed_udp_port(), type="udp", send="ping", timeout="2s", interval="2s")
    )
    assert result == "port unreachable (ICMP)"
    assert took < 1.0, f"ICMP port unreachable took {took:.2f}s: the check waited for its timeout"


def test_dns_check_fails_at_once_on_port_unreachable(run) -> None:
    result, took = timed(run, backend(closed_udp_port(), type="dns", timeout="2s", interval="2s"))
    assert (result, took < 1.0) == ("port unreachable (ICMP)", True)


class DnsServer(UdpServer):
    """A dnslib server: `names` answer NOERROR with an A record, others NXDOMAIN; `rcode`
    overrides every answer's rcode; `before` are datagrams sent ahead of the answer (a wrong
    ID, garbage); `answer = False` sends only those."""

    def __init__(self, names: tuple[str, ...] = ("health.example.",)) -> None:
        self.names = names
        self.rcode: int | None = None
        self.before: list[Callable[[dnslib.DNSRecord], bytes]] = []
        self.answer = True
        self.truncated = False  # TC set, answer section left out (as a server over its UDP size does)
        self.questions: list[tuple[str, str, int]] = []
        super().__init__(self._reply)

    def _reply(self, data: bytes) -> list[bytes]:
        query = dnslib.DNSRecord.parse(data)
        q = query.q
        self.questions.append((str(q.qname), dnslib.QTYPE[q.qtype], query.header.rd))
        reply = query.reply()
        if str(q.qname).lower() in self.names:
            reply.add_answer(dnslib.RR(q.qname, dnslib.QTYPE.A, rdata=dnslib.A("127.0.0.1"), ttl=5))
        else:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        if self.rcode is not None:
            reply.header.rcode = self.rcode
        if self.truncated:
            reply.header.tc, reply.rr = 1, []
        out = [make(query) for make in self.before]
        return [*out, bytes(reply.pack())] if self.answer else out


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    s = DnsServer()
    yield s
    s.close()


def wrong_id(query: dnslib.DNSRecord) -> bytes:
    reply = query.reply()
    reply.header.id = (query.header.id + 1) % 65536
    reply.add_answer(dnslib.RR(query.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("10.0.0.1")))
    return bytes(reply.pack())


def other_question(query: dnslib.DNSRecord) -> bytes:
    reply = dnslib.DNSRecord(
        dnslib.DNSHeader(id=query.header.id, qr=1, ra=1), q=dnslib.DNSQuestion("evil.example.")
    )
    return bytes(reply.pack())


def test_dns_check_asks_the_configured_question(run, dns_server: DnsServer) -> None:
    b = backend(dns_server.address, type="dns", query="health.example.", expect_rcode=["NOERROR"])
    assert run(probe(b)) == ""
    b = backend(dns_server.address, type="dns", query_type="AAAA", expect_rcode=["NXDOMAIN"])
    assert run(probe(b)) == ""
    assert dns_server.questions == [("health.example.", "A", 1), ("a.root-servers.net.", "AAAA", 1)]


def test_dns_check_fails_on_an_unexpected_rcode(run, dns_server: DnsServer) -> None:
    b = backend(dns_server.address, type="dns", query="missing.example.", expect_rcode=["NOERROR"])
    assert run(probe(b)) == "rcode NXDOMAIN (expected NOERROR)"
    b = backend(dns_server.address, type="dns", query="health.example.", expect_rcode=["NXDOMAIN", "REFUSED"])
    assert run(probe(b)) == "rcode NOERROR (expected NXDOMAIN or REFUSED)"


def test_dns_check_default_accepts_any_rcode_but_servfail(run, dns_server: DnsServer) -> None:
    b = backend(dns_server.address, type="dns", query="missing.example.")
    assert run(probe(b)) == ""  # NXDOMAIN: the server answers, so it is up
    dns_server.rcode = dnslib.RCODE.REFUSED
    assert run(probe(b)) == ""
    dns_server.rcode = dnslib.RCODE.SERVFAIL
    assert run(probe(b)) == "rcode SERVFAIL (expected any but SERVFAIL)"


def test_dns_check_takes_the_rcode_of_a_truncated_reply(run, dns_server: DnsServer) -> None:
    dns_server.truncated = True
    assert run(probe(backend(dns_server.address, type="dns", query="health.example."))) == ""
    dns_server.rcode = dnslib.RCODE.SERVFAIL
    assert run(probe(backend(dns_server.address, type="dns", query="health.example."))).startswith(
        "rcode SERVFAIL"
    )


def test_dns_check_ignores_replies_to_other_queries(run, dns_server: DnsServer) -> None:
    b = backend(
        dns_server.address, type="dns", query="health.example.", expect_rcode=["NOERROR"], timeout="300ms"
    )
    dns_server.before = [wrong_id, other_question, lambda q: b"\x00garbage"]
    assert run(probe(b)) == ""  # the answer after them counts
    dns_server.answer = False
    assert run(probe(b)) == "no answer within 300ms (3 other datagrams ignored)"
    dns_server.answer, dns_server.before = True, []
    dns_server.rcode = dnslib.RCODE.SERVFAIL
    dns_server.before = [wrong_id]  # a NOERROR with the wrong ID must not mask the SERVFAIL
    b = backend(dns_server.address, type="dns", query="health.example.")
    assert run(probe(b)).startswith("rcode SERVFAIL")


def test_dns_check_fails_when_the_server_is_silent(run, udp_server) -> None:
    server = udp_server(lambda data: [])
    result, took = timed(run, backend(server.address, type="dns", timeout="300ms"))
    assert result == "no answer within 300ms" and 0.25 < took < 1.5
    assert len(server.received) == 1


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's dnsmasq on a loopback port: health.example. (and below) is 127.0.0.1; with no
    upstream, every other name is REFUSED."""
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    assert os.path.exists(exe), "this test needs Debian's dnsmasq (apt-get install dnsmasq-base)"
    port = free_port()
    folder = tmp_path_factory.mktemp("dnsmasq")
    pid_file, log = folder / "dnsmasq.pid", folder / "dnsmasq.log"
    args = [exe, "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--address=/health.example/127.0.0.1", "--conf-file=/dev/null",
            f"--pid-file={pid_file}", "--log-facility=-"]  # fmt: skip
    if os.geteuid() == 0:
        args.append("--user=root")
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out)
    address = f"127.0.0.1:{port}"
    try:
        b = backend(address, type="dns", query="health.example.", expect_rcode=["NOERROR"], timeout="200ms")
        deadline = time.monotonic() + 10
        while asyncio.run(probe(b)) != "":
            assert proc.poll() is None, f"dnsmasq exited: {log.read_text()}"
            assert time.monotonic() < deadline, "dnsmasq did not answer within 10s"
            time.sleep(0.1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_dns_check_against_dnsmasq(run, dnsmasq: str) -> None:
    ok = backend(dnsmasq, type="dns", query="health.example.", expect_rcode=["NOERROR"])
    assert run(probe(ok)) == ""
    below = backend(dnsmasq, type="dns", query="db.health.example.", query_type="A", expect_rcode=["NOERROR"])
    assert run(probe(below)) == ""
    other = backend(dnsmasq, type="dns", query="unknown.test.", expect_rcode=["NOERROR"])
    assert run(probe(other)) == "rcode REFUSED (expected NOERROR)"
    assert run(probe(backend(dnsmasq, type="dns", query="unknown.test."))) == ""  # REFUSED is not SERVFAIL


# --- rise/fall through the checker, as for the other check types -----------------------------


def checker_config(address: str, health: dict[str, Any]) -> Config:
    data = udp_config()
    data["pools"][0]["health"] = {"type": "none"}  # only the udp pool's backend is checked
    data["pools"][1]["backends"] = [{"address": address}]
    data["pools"][1]["health"] = {"interval": "100ms", "timeout": "100ms", "rise": 2, "fall": 2, **health}
    return parse_config(data)


def test_dns_check_takes_a_backend_down_and_up(run, dns_server: DnsServer) -> None:
    engine = FakeEngine(checker_config(dns_server.address, {"type": "dns", "query": "health.example."}))
    dns_server.rcode = dnslib.RCODE.SERVFAIL

    async def scenario() -> None:
        checker = HealthChecker(engine)  # type: ignore[arg-type]
        checker.start()
        try:
            async with asyncio.timeout(10):
                while engine.flips != [False]:
                    await asyncio.sleep(0.02)
                b = checker.backends[f"dns/{dns_server.address}"]
                assert b.last_error == "rcode SERVFAIL (expected any but SERVFAIL)" and b.failures >= 2
                dns_server.rcode = None
                while engine.flips != [False, True]:
                    await asyncio.sleep(0.02)
                assert b.successes >= 2
        finally:
            await checker.stop()

    run(scenario())
    assert len(dns_server.questions) >= 4  # fall 2 + rise 2
    assert set(dns_server.questions) == {("health.example.", "A", 1)}


def test_udp_check_takes_a_killed_backend_down(run, udp_server) -> None:
    server = udp_server(lambda data: [b"pong"])
    engine = FakeEngine(checker_config(server.address, {"type": "udp", "send": "ping", "expect": "pong"}))

    async def scenario() -> None:
        checker = HealthChecker(engine)  # type: ignore[arg-type]
        checker.start()
        try:
            async with asyncio.timeout(10):
                while len(server.received) < 3:
                    await asyncio.sleep(0.02)
                assert engine.flips == []
                server.close()  # the port is closed now: ICMP port unreachable
                while engine.flips != [False]:
                    await asyncio.sleep(0.02)
                assert checker.backends[f"dns/{server.address}"].last_error == "port unreachable (ICMP)"
        finally:
            await checker.stop()

    run(scenario())
