"""Geo routing (CONTRACT.md `[geoip].database`, route condition `country`): a MaxMind DB built at
test time with mmdb-writer, real `fastlb serve`, clients placed by X-Forwarded-For from a trusted
proxy (and by their own address); the database swapped and reloaded, a broken one refused."""

from __future__ import annotations

import http.client
import shutil
from pathlib import Path
from typing import Any

import pytest
from admin import api
from h2util import RawH2
from httputil import http_config, pool
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from fastlb.config import ConfigError, load_config, parse_config

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def write_db(
    path: Path, countries: dict[str, list[str]], registered: dict[str, list[str]] | None = None
) -> None:
    """An IPv6 MaxMind DB (IPv4 mapped in, as GeoLite2's) placing these networks: `countries`
    by `country.iso_code`, `registered` by `registered_country.iso_code` only."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    for code, nets in countries.items():
        writer.insert_network(IPSet(nets), {"country": {"iso_code": code}})
    for code, nets in (registered or {}).items():
        writer.insert_network(IPSet(nets), {"registered_country": {"iso_code": code}})
    tmp = path.with_suffix(".tmp")
    writer.to_db_file(str(tmp))
    tmp.replace(path)  # as an operator's update would: the file is never seen half-written


PLACES = {
    "DE": ["198.51.100.0/25", "2001:db8:de::/48"],
    "US": ["203.0.113.0/24"],
}
REGISTERED = {"FR": ["198.51.100.128/25"]}


def geo_config(port: int, admin: int, eu: str, us: str, other: str, db: str = "geo.mmdb") -> str:
    config = http_config(
        port,
        [pool("other", [other]), pool("eu", [eu]), pool("us", [us])],
        default_pool="other",
        admin=f"127.0.0.1:{admin}",
        trusted_proxies=["127.0.0.0/8"],
        routes=[{"name": "europe", "country": ["de", "FR"], "pool": "eu"}, {"country": ["US"], "pool": "us"}],
    )
    return f'[geoip]\ndatabase = "{db}"\n\n' + config


def served_by(port: int, client: str | None) -> str:
    """The backend (X-Backend) that answered a request from `client` (None: the connection's own)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"X-Forwarded-For": client} if client else {})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        return r.getheader("x-backend") or ""
    finally:
        conn.close()


@pytest.fixture
def geo_lb(hb, fastlb, tmp_path):  # type: ignore[no-untyped-def]
    def start(places: dict[str, list[str]] = PLACES) -> tuple[int, int]:
        write_db(tmp_path / "geo.mmdb", places, REGISTERED)
        eu, us, other = hb("eu"), hb("us"), hb("other")
        port, admin = free_port(), free_port()
        fastlb(geo_config(port, admin, eu.address, us.address, other.address), port)
        return port, admin

    return start


def test_clients_go_to_the_pool_of_their_country(geo_lb):
    port, _ = geo_lb()
    assert served_by(port, "198.51.100.7") == "eu"  # DE
    assert served_by(port, "198.51.100.200") == "eu"  # FR, placed by registration only
    assert served_by(port, "2001:db8:de::1") == "eu"  # DE over IPv6
    assert served_by(port, "203.0.113.9") == "us"
    assert served_by(port, "192.0.2.1") == "other"  # not in the database: the default pool
    assert served_by(port, None) == "other"  # 127.0.0.1 itself


def test_http2_requests_are_placed_the_same_way(geo_lb):
    port, _ = geo_lb()
    with RawH2(port) as raw:
        streams = {}
        for client in ("198.51.100.7", "203.0.113.9", "192.0.2.1"):
            sid = raw.new_stream()
            raw.send(raw.headers_frame(sid, path="/", extra=(("x-forwarded-for", client),)))
            streams[client] = sid
        for sid in streams.values():
            assert raw.wait_stream(sid, 10) and raw.status(sid) == 200
        backend = {c: dict(raw.heads[sid]).get("x-backend") for c, sid in streams.items()}
    assert backend == {"198.51.100.7": "eu", "203.0.113.9": "us", "192.0.2.1": "other"}


def test_a_new_database_takes_effect_at_reload_and_a_broken_one_is_refused(geo_lb, tmp_path):
    port, admin = geo_lb()
    assert served_by(port, "203.0.113.9") == "us"
    # the monthly update: 203.0.113.0/24 moved to Germany
    write_db(tmp_path / "geo.mmdb", {"DE": ["203.0.113.0/24"], "US": ["198.51.100.0/24"]})
    assert served_by(port, "203.0.113.9") == "us", "the file alone changes nothing before a reload"
    status, body = api(admin, "POST", "/api/reload")
    assert status == 200, body
    assert served_by(port, "203.0.113.9") == "eu"
    assert served_by(port, "198.51.100.7") == "us"
    # a broken file: the reload is refused, naming the field, and the old database serves on
    (tmp_path / "geo.mmdb").write_bytes(b"not a database" * 100)
    status, body = api(admin, "POST", "/api/reload")
    assert status >= 400 and "geoip.database" in str(body), (status, body)
    assert served_by(port, "203.0.113.9") == "eu"


def data(routes: list[dict[str, Any]], geoip: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app", "routes": routes}
        ],
        "pools": [{"name": "app", "backends": [{"address": "127.0.0.1:9000"}]}],
    }
    if geoip is not None:
        out["geoip"] = geoip
    return out


@pytest.mark.parametrize(
    ("routes", "geoip", "message"),
    [
        ([{"country": ["DE"], "pool": "app"}], None, "listeners[0].routes[0].country: needs [geoip]"),
        ([{"country": ["DEU"], "pool": "app"}], {"database": "geo.mmdb"}, "listeners[0].routes[0].country"),
        ([{"country": ["DE"], "pool": "app"}], {"database": "missing.mmdb"}, "geoip.database: cannot read"),
        ([{"country": ["DE"], "pool": "app"}], {"database": "fake.mmdb"}, "geoip.database: "),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(tmp_path, routes, geoip, message):
    write_db(tmp_path / "geo.mmdb", PLACES)
    (tmp_path / "fake.mmdb").write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError) as err:
        parse_config(data(routes, geoip), base_dir=tmp_path)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_config_to_engine(tmp_path):
    write_db(tmp_path / "geo.mmdb", PLACES)
    engine = parse_config(
        data([{"country": ["de", "Fr"], "pool": "app"}], {"database": "geo.mmdb"}), base_dir=tmp_path
    )
    spec = engine.to_engine()
    assert spec["geoip"] == str(tmp_path / "geo.mmdb")
    assert spec["listeners"][0]["routes"][0]["country"] == ["DE", "FR"]
    assert parse_config(data([])).to_engine()["geoip"] is None


def test_the_example_checks(tmp_path):
    shutil.copy(ROOT / "examples" / "geo.toml", tmp_path / "geo.toml")
    write_db(tmp_path / "GeoLite2-Country.mmdb", PLACES)
    config = load_config(tmp_path / "geo.toml")
    routes = {r.name: r.country for r in config.listeners[0].routes}
    assert "DE" in routes["europe"] and routes["north-america"] == ["US", "CA", "MX"]
