"""HTTP/2 and gRPC on the control plane (issue 13): the config (`[listeners.http2]`, the pool key
`http_version`, health `type = "grpc"` with `service`) and its engine JSON, the example and the
documented configs, the http2 metric families, the dashboard's and `fastlb ctl status`'s h2
columns. The grpc check itself is tests/test_grpc_health.py."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from admin import FakeAdmin
from example_certs import config_with_certificates
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from fastlb._native import engine_config_error
from fastlb.cli import main as cli_main
from fastlb.config import ConfigError, Health, load_config, parse_config
from fastlb.ctl import status_view
from fastlb.metrics import families, render

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {"max_concurrent_streams": 100, "max_header_list_size": 65_536}
CERT = [{"cert": "certs/site.pem", "key": "certs/site.key"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config folder holding certs/site.pem and .key (for the https and tls listeners)."""
    root = tmp_path_factory.mktemp("h2")
    leaf = trustme.CA().issue_cert("example.com")
    (root / "certs").mkdir()
    (root / "certs" / "site.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (root / "certs" / "site.key").write_bytes(leaf.private_key_pem.bytes())
    return root


def h2_config() -> dict[str, Any]:
    """One listener of each protocol: web (http), secure (https) over pool "app", with a gRPC
    route to pool "rpc" (http_version "2", grpc health); raw (tcp) and sealed (tls) over "db";
    dns (udp) over "dns"."""
    return {
        "admin": {"bind": "off"},
        "runtime": {"workers": 1, "cpu_affinity": "off"},
        "listeners": [
            {
                "name": "web",
                "bind": "127.0.0.1:18080",
                "protocol": "http",
                "pool": "app",
                "routes": [{"path_prefix": "/orders.v1.OrderService/", "pool": "rpc"}],
            },
            {
                "name": "secure",
                "bind": "127.0.0.1:18443",
                "protocol": "https",
                "pool": "app",
                "tls": {"certificates": CERT},
            },
            {"name": "raw", "bind": "127.0.0.1:15432", "protocol": "tcp", "pool": "db"},
            {
                "name": "sealed",
                "bind": "127.0.0.1:15433",
                "protocol": "tls",
                "pool": "db",
                "tls": {"certificates": CERT},
            },
            {"name": "dns", "bind": "127.0.0.1:15353", "protocol": "udp", "pool": "dns"},
        ],
        "pools": [
            {"name": "app", "backends": [{"address": "127.0.0.1:19001"}]},
            {"name": "db", "backends": [{"address": "127.0.0.1:19002"}]},
            {"name": "dns", "backends": [{"address": "127.0.0.1:15301"}], "health": {"type": "dns"}},
            {
                "name": "rpc",
                "http_version": "2",
                "backends": [{"address": "127.0.0.1:50051"}, {"address": "127.0.0.1:50052"}],
                "health": {"type": "grpc", "service": "orders.v1.OrderService"},
            },
        ],
    }


def errors_of(data: dict[str, Any], folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, folder)
    assert all("\n" not in e for e in info.value.errors)
    return list(info.value.errors)


# --- config: valid settings and their engine JSON ---------------------------------------------


def test_http2_defaults_to_engine(folder: Path) -> None:
    engine = parse_config(h2_config(), folder).to_engine()
    listeners = {x["name"]: x for x in engine["listeners"]}
    assert listeners["web"]["http2"] == DEFAULTS
    assert listeners["secure"]["http2"] == DEFAULTS
    for name in ("raw", "sealed", "dns"):
        assert listeners[name]["http2"] is None, name
    assert len({frozenset(x) for x in engine["listeners"]}) == 1  # every listener has every key
    assert [p["http_version"] for p in engine["pools"]] == ["1.1", "1.1", "1.1", "2"]


def test_http2_settings_to_engine(folder: Path) -> None:
    data = h2_config()
    data["listeners"][0]["http2"] = {"max_concurrent_streams": 1, "max_header_list_size": 1024}
    data["listeners"][1]["http2"] = {"max_concurrent_streams": 10_000, "max_header_list_size": 1_048_576}
    web, secure = parse_config(data, folder).to_engine()["listeners"][:2]
    assert web["http2"] == {"max_concurrent_streams": 1, "max_header_list_size": 1024}
    assert secure["http2"] == {"max_concurrent_streams": 10_000, "max_header_list_size": 1_048_576}
    data["listeners"][0]["http2"] = {"max_header_list_size": 4096}  # the other key keeps its default
    web = parse_config(data, folder).to_engine()["listeners"][0]
    assert web["http2"] == {"max_concurrent_streams": 100, "max_header_list_size": 4096}


def test_http_version_1_1_written_out_is_the_default(folder: Path) -> None:
    data = h2_config()
    data["pools"][0]["http_version"] = "1.1"
    assert parse_config(data, folder).to_engine()["pools"][0]["http_version"] == "1.1"


def test_grpc_health_keys(folder: Path) -> None:
    cfg = parse_config(h2_config(), folder)
    rpc = cfg.pools[3].health
    assert (rpc.type, rpc.service, rpc.interval, rpc.timeout, rpc.rise, rpc.fall) == (
        "grpc",
        "orders.v1.OrderService",
        2000,
        1000,
        2,
        3,
    )
    assert Health(type="grpc").service == ""  # the server as a whole
    assert cfg.pools[0].health.service == ""


def test_grpc_health_on_a_pool_a_tcp_listener_uses(folder: Path) -> None:
    """A gRPC server behind a tcp listener (TLS passthrough, say) is checked over its own TCP
    port: the check type is free, only the HTTP keys are not."""
    data = h2_config()
    data["pools"][1]["health"] = {"type": "grpc"}
    assert parse_config(data, folder).pools[1].health.type == "grpc"


def test_dump_round_trips(folder: Path) -> None:
    data = h2_config()
    data["listeners"][0]["http2"] = {"max_concurrent_streams": 7}
    cfg = parse_config(data, folder)
    again = parse_config(cfg.model_dump(by_alias=True), folder)
    assert again.to_engine() == cfg.to_engine()


# --- config: errors, each naming its field ---------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to an h2_config(): `path` like "listeners.2.http2" or "pools.3.health.service"."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[int(last) if last.isdigit() else last] = value

    return change


HTTP_ONLY = 'only for protocol = "http" or "https"'
REFUSALS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("http2 on tcp", _set("listeners.2.http2", {"max_concurrent_streams": 10}),
     f"listeners[2].http2: {HTTP_ONLY}"),
    ("empty http2 on tcp", _set("listeners.2.http2", {}), f"listeners[2].http2: {HTTP_ONLY}"),
    ("http2 on tls", _set("listeners.3.http2", {}), f"listeners[3].http2: {HTTP_ONLY}"),
    ("http2 on udp", _set("listeners.4.http2", {}), f"listeners[4].http2: {HTTP_ONLY}"),
    ("streams 0", _set("listeners.0.http2", {"max_concurrent_streams": 0}),
     "listeners[0].http2.max_concurrent_streams: must be >= 1"),
    ("streams 10001", _set("listeners.1.http2", {"max_concurrent_streams": 10_001}),
     "listeners[1].http2.max_concurrent_streams: must be <= 10000"),
    ("streams string", _set("listeners.0.http2", {"max_concurrent_streams": "100"}),
     "listeners[0].http2.max_concurrent_streams: must be an integer"),
    ("streams bool", _set("listeners.0.http2", {"max_concurrent_streams": True}),
     "listeners[0].http2.max_concurrent_streams: must be an integer"),
    ("streams float", _set("listeners.0.http2", {"max_concurrent_streams": 1.5}),
     "listeners[0].http2.max_concurrent_streams: must be an integer"),
    ("header list 1023", _set("listeners.0.http2", {"max_header_list_size": 1023}),
     "listeners[0].http2.max_header_list_size: must be >= 1024"),
    ("header list 1 MiB + 1", _set("listeners.0.http2", {"max_header_list_size": 1_048_577}),
     "listeners[0].http2.max_header_list_size: must be <= 1048576"),
    ("unknown http2 key", _set("listeners.0.http2", {"max_streams": 10}),
     "listeners[0].http2.max_streams: unknown key"),
    ("http2 not a table", _set("listeners.0.http2", 100), "listeners[0].http2: must be a table"),
    ("http_version 3", _set("pools.0.http_version", "3"),
     'pools[0].http_version: must be "1.1" or "2", not "3"'),
    ("http_version 2.0", _set("pools.0.http_version", "2.0"),
     'pools[0].http_version: must be "1.1" or "2", not "2.0"'),
    ("http_version integer", _set("pools.0.http_version", 2),
     'pools[0].http_version: must be "1.1" or "2", not 2'),
    ("http_version float", _set("pools.0.http_version", 1.1),
     'pools[0].http_version: must be "1.1" or "2", not 1.1'),
    ("http_version h2", _set("pools.0.http_version", "h2"),
     'pools[0].http_version: must be "1.1" or "2", not "h2"'),
    ("http_version 2 for tcp", _set("pools.1.http_version", "2"),
     "pools[1].http_version: \"2\" is http only, but tcp listener 'raw' uses this pool"),
    ("http_version 2 for tls", _set("pools.1.http_version", "2"),
     "pools[1].http_version: \"2\" is http only, but tls listener 'sealed' uses this pool"),
    ("http_version 2 for udp", _set("pools.2.http_version", "2"),
     "pools[2].http_version: \"2\" is http only, but udp listener 'dns' uses this pool"),
    ("service on http health", _set("pools.0.health", {"type": "http", "service": "x"}),
     'pools[0].health.service: only for type = "grpc"'),
    ("service on the default (tcp) health", _set("pools.0.health", {"service": "x"}),
     'pools[0].health.service: only for type = "grpc"'),
    ("service on https health", _set("pools.0.health", {"type": "https", "service": "x"}),
     'pools[0].health.service: only for type = "grpc"'),
    ("service on dns health", _set("pools.2.health", {"type": "dns", "service": "x"}),
     'pools[2].health.service: only for type = "grpc"'),
    ("service not a string", _set("pools.3.health", {"type": "grpc", "service": 5}),
     "pools[3].health.service: must be a string"),
    ("grpc on a udp-only pool", _set("pools.2.health", {"type": "grpc"}),
     'pools[2].health.type: "grpc" checks a TCP port, but only udp listeners use this pool;'
     ' use "dns", "udp" or "none"'),
    ("unknown health type", _set("pools.3.health", {"type": "grpc-web"}),
     'pools[3].health.type: must be "tcp", "http", "https", "dns", "udp", "grpc" or "none", not "grpc-web"'),
    ("http keys on grpc health", _set("pools.3.health", {"type": "grpc", "path": "/health"}),
     'pools[3].health.path: only for type = "http" or "https"'),
    ("host on grpc health", _set("pools.3.health", {"type": "grpc", "host": "rpc.internal"}),
     'pools[3].health.host: only for type = "http" or "https"'),
    ("dns keys on grpc health", _set("pools.3.health", {"type": "grpc", "query": "a.example."}),
     'pools[3].health.query: only for type = "dns"'),
    ("udp keys on grpc health", _set("pools.3.health", {"type": "grpc", "send": "ping"}),
     'pools[3].health.send: only for type = "udp"'),
    ("grpc timeout over interval", _set("pools.3.health", {"type": "grpc", "timeout": "3s"}),
     "pools[3].health.timeout: must not exceed interval (2s)"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "expected"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused(folder: Path, change: Callable[[dict[str, Any]], None], expected: str) -> None:
    data = h2_config()
    change(data)
    errors = errors_of(data, folder)
    assert expected in errors, (expected, errors)


def test_every_error_at_once(folder: Path) -> None:
    data = h2_config()
    data["listeners"][2]["http2"] = {}
    data["pools"][1]["http_version"] = "2"
    data["pools"][0]["health"] = {"service": "x"}
    fields = sorted(e.split(": ")[0] for e in errors_of(data, folder))
    assert fields == [
        "listeners[2].http2",
        "pools[0].health.service",
        "pools[1].http_version",
        "pools[1].http_version",  # once for each of its users: the tcp and the tls listener
    ]


def toml(data: dict[str, Any]) -> str:
    """The config as TOML (inline tables; enough for these configs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float, str)):
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


def check(folder: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fastlb check -c FILE` in this process: (exit code, stdout, stderr)."""
    path = folder / "fastlb.toml"
    path.write_text(toml(data))
    code = cli_main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_check(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(folder, h2_config(), capsys) == (0, "ok\n", "")
    data = h2_config()
    data["listeners"][3]["http2"] = {"max_concurrent_streams": 5}
    assert check(folder, data, capsys) == (2, "", f"listeners[3].http2: {HTTP_ONLY}\n")
    data = h2_config()
    data["pools"][0]["http_version"] = "3"
    assert check(folder, data, capsys) == (2, "", 'pools[0].http_version: must be "1.1" or "2", not "3"\n')
    data = h2_config()
    data["pools"][0]["health"] = {"type": "tcp", "service": "x"}
    assert check(folder, data, capsys) == (2, "", 'pools[0].health.service: only for type = "grpc"\n')


# --- the example and the documented configs --------------------------------------------------


def test_example_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config_with_certificates((REPO / "examples" / "grpc.toml").read_text(), tmp_path)
    assert cli_main(["check", "-c", str(path)]) == 0
    assert capsys.readouterr() == ("ok\n", "")
    engine = load_config(path).to_engine()
    public, internal = engine["listeners"]
    assert (public["protocol"], public["tls"]["alpn"]) == ("https", ["h2", "http/1.1"])
    assert public["http2"] == {"max_concurrent_streams": 200, "max_header_list_size": 65_536}
    assert internal["protocol"] == "http"
    assert internal["http2"] == {"max_concurrent_streams": 1000, "max_header_list_size": 16_384}
    orders, web = engine["pools"]
    assert (orders["name"], orders["http_version"], web["http_version"]) == ("orders", "2", "1.1")
    health = load_config(path).pools[0].health
    assert (health.type, health.service) == ("grpc", "orders.v1.OrderService")


@pytest.mark.parametrize("doc", ["docs/http2.md", "README.md"])
def test_documented_h2_configs_check(tmp_path: Path, doc: str) -> None:
    """Every complete HTTP/2 example in the docs (a toml block with http2 or http_version, its
    listeners and pools), with the certificate files it names made here."""
    blocks = [b.split("```")[0] for b in (REPO / doc).read_text().split("```toml\n")[1:]]
    complete = [b for b in blocks if "[[listeners]]" in b and "[[pools]]" in b]
    h2 = [b for b in complete if "[listeners.http2]" in b or "http_version" in b]
    assert h2
    for k, text in enumerate(h2):
        folder = tmp_path / str(k)
        folder.mkdir()
        load_config(config_with_certificates(text, folder)).to_engine()


# --- the native engine takes the JSON (once the data plane has http2) -------------------------


def _native_has_http2(folder: Path) -> bool:
    spec = parse_config(h2_config(), folder).to_engine()
    error = engine_config_error(json.dumps(spec)) or ""
    return "unknown field `http2`" not in error and "unknown field `http_version`" not in error


def test_native_engine_accepts_the_h2_keys(folder: Path) -> None:
    if not _native_has_http2(folder):
        pytest.skip("this native build predates HTTP/2 (issue 13)")
    spec = parse_config(h2_config(), folder).to_engine()
    assert engine_config_error(json.dumps(spec)) is None
    for change in (
        lambda d: d["listeners"][2].update(http2=DEFAULTS),  # http2 on a tcp listener
        lambda d: d["listeners"][0].update(http2=None),  # none on an http one
        lambda d: d["pools"][0].update(http_version="3"),
        lambda d: d["pools"][0].pop("http_version"),  # no engine-side default
        lambda d: d["listeners"][0]["http2"].pop("max_header_list_size"),
    ):
        doc = copy.deepcopy(spec)
        change(doc)
        assert engine_config_error(json.dumps(doc)) is not None


# --- metrics ----------------------------------------------------------------------------------


def _listener(name: str, protocol: str, http2: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": protocol,
        "bind": "127.0.0.1:1",
        "pool": "p",
        "connections_total": 9,
        "connections_active": 4,
        "requests_total": 30,
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
        "udp": None,
        "http2": http2,
    }


H2_STATS = {
    "connections_active": 2,
    "connections_total": 5,
    "streams_active": 7,
    "streams_total": 41,
    "resets": {"client": 3, "backend": 1},
    "goaways": {"graceful": 4, "flood": 1},
}
STATUS: dict[str, Any] = {
    "buckets_s": [0.001, 0.01],
    "responses": [],
    "log_dropped": 0,
    "listeners": [_listener("raw", "tcp", None), _listener("web", "http", H2_STATS)],
    "pools": [],
}


def samples(status: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render(status).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_http2_metrics_from_the_stats_document() -> None:
    got = samples(STATUS)
    h2 = {k: v for k, v in got.items() if k[0].startswith("fastlb_http2_")}
    web = (("listener", "web"),)
    assert h2 == {
        ("fastlb_http2_connections_active", web): 2,
        ("fastlb_http2_connections_total", web): 5,
        ("fastlb_http2_streams_active", web): 7,
        ("fastlb_http2_streams_total", web): 41,
        ("fastlb_http2_resets_total", (("listener", "web"), ("side", "client"))): 3,
        ("fastlb_http2_resets_total", (("listener", "web"), ("side", "backend"))): 1,
        ("fastlb_http2_goaways_total", (("listener", "web"), ("reason", "graceful"))): 4,
        ("fastlb_http2_goaways_total", (("listener", "web"), ("reason", "flood"))): 1,
    }
    # the listener-wide families count the h2 connections with the others
    assert got["fastlb_connections_active", web] == 4


def test_http2_metric_families_without_http_listeners_have_no_series() -> None:
    names = {f.name: f.samples for f in families({**STATUS, "listeners": [_listener("raw", "tcp", None)]})}
    for name in (
        "fastlb_http2_connections_active",
        "fastlb_http2_connections",
        "fastlb_http2_streams_active",
        "fastlb_http2_streams",
        "fastlb_http2_resets",
        "fastlb_http2_goaways",
    ):
        assert names[name] == [], name
    # a stats document from before HTTP/2 (no key at all) reads the same
    old = _listener("web", "http", None)
    del old["http2"]
    assert all(not f.samples for f in families({**STATUS, "listeners": [old]}) if "http2" in f.name)


# --- fastlb ctl status and the dashboard --------------------------------------------------------

SHOWN = {**STATUS, "version": "test", "uptime_s": 1, "reloads": 0, "stopping": False, "connections_active": 4}


def test_ctl_status_shows_h2_connections_and_streams() -> None:
    console = Console(width=200, record=True)
    console.print(status_view(SHOWN))
    rows = {}
    for line in console.export_text().splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").replace("┃", "│").split("│")]
        rows[cells[0]] = cells
    assert rows["name"][-2:] == ["h2 conns", "h2 streams"]
    assert rows["web"][-2:] == ["2", "7"]
    assert rows["raw"][-2:] == ["-", "-"]  # nothing for a tcp listener


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_shows_h2_connections_and_streams() -> None:
    assert CHROMIUM, "the dashboard test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    admin = FakeAdmin(SHOWN)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{admin.port}/")
                web = page.locator('tr[data-listener="web"]')
                web.wait_for(timeout=10_000)
                assert web.locator("[data-testid=h2-connections]").inner_text() == "2"
                assert web.locator("[data-testid=h2-streams]").inner_text() == "7"
                assert web.locator("td").nth(4).inner_text().startswith("4")  # all connections first
                raw = page.locator('tr[data-listener="raw"]')
                assert raw.locator("[data-testid=h2-connections]").count() == 0
                assert raw.locator("[data-testid=h2-streams]").count() == 0
            finally:
                browser.close()
    finally:
        admin.close()
