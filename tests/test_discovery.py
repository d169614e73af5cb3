"""Backends from DNS (docs/discovery.md): a real `fastlb serve` resolving through a DNS server
the test runs (tests/dnszone.py, dnslib over UDP and TCP) and changes as it goes: records added
and removed, SERVFAIL, empty answers, truncated UDP answers, SRV records. Real HTTP backends on
loopback addresses answer, so a request shows where it went."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from admin import api, scrape
from dnszone import Zone
from httpbackend import HttpBackend

from fastlb.config import ConfigError, parse_config

from conftest import free_port, wait_until


@pytest.fixture
def zone() -> Iterator[Zone]:
    z = Zone()
    yield z
    z.close()


@pytest.fixture
def loopbacks() -> Iterator[Any]:
    """`loopbacks(n)`: HTTP backends on 127.0.0.2, .3, ... all on one port; returns them."""
    started: list[HttpBackend] = []

    def start(n: int) -> list[HttpBackend]:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.2", 0))
                port = s.getsockname()[1]
            try:
                backends = [HttpBackend(f"b{k}", port=port, host=f"127.0.0.{k}") for k in range(2, 2 + n)]
            except OSError:
                continue
            started.extend(backends)
            return backends

    yield start
    for b in started:
        b.close()


def config(port: int, admin: int, zone: Zone, pool_keys: str) -> str:
    return f"""
[runtime]
workers = 2
cpu_affinity = "off"
resolvers = ["{zone.address}"]

[admin]
bind = "127.0.0.1:{admin}"

[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
pool = "app"

[[pools]]
name = "app"
{pool_keys}
resolve = {{ interval = "1s" }}
health = {{ type = "none" }}
drain_timeout = "2s"
"""


def backends_of(admin: int) -> dict[str, dict[str, Any]]:
    status = api(admin, "GET", "/api/status")[1]
    (pool,) = [p for p in status["pools"] if p["name"] == "app"]
    return {b["address"]: b for b in pool["backends"]}


def served_by(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        return r.getheader("x-backend") or f"status {r.status}"
    finally:
        conn.close()


def test_every_address_is_a_backend_and_changes_follow(zone, loopbacks, fastlb):
    b2, b3, b4 = loopbacks(3)
    port, admin = free_port(), free_port()
    zone.set_addresses("api.test", ["127.0.0.2", "127.0.0.3"])
    lb = fastlb(
        config(port, admin, zone, f'backends = [{{ address = "api.test:{b2.port}", weight = 3 }}]'), port
    )
    assert wait_until(lambda: set(backends_of(admin)) == {b2.address, b3.address}, 10), backends_of(admin)
    assert {b["weight"] for b in backends_of(admin).values()} == {3}  # the template's settings
    assert {served_by(port) for _ in range(20)} == {"b2", "b3"}
    metrics = scrape(admin)
    assert metrics[("fastlb_backend_discovered", (("pool", "app"),))] == 2
    # a record added: a new backend, the others keep their state (same id)
    before = backends_of(admin)[b2.address]["requests_total"]
    zone.set_addresses("api.test", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    assert wait_until(lambda: b4.address in backends_of(admin), 10)
    assert backends_of(admin)[b2.address]["requests_total"] >= before
    assert wait_until(lambda: "b4" in {served_by(port) for _ in range(20)}, 10)
    # a record removed: drained (no new requests), then gone
    zone.set_addresses("api.test", ["127.0.0.3", "127.0.0.4"])
    assert wait_until(lambda: backends_of(admin).get(b2.address, {}).get("state") != "up", 10)
    served = {served_by(port) for _ in range(20)}
    assert served == {"b3", "b4"}, served
    assert wait_until(lambda: b2.address not in backends_of(admin), 10), backends_of(admin)
    assert scrape(admin)[("fastlb_backend_discovered", (("pool", "app"),))] == 2
    code, err = lb.stop()
    assert code == 0, err
    assert "DNS now gives 2 backends" in err and "drained" in err


def test_failures_and_empty_answers_keep_the_last_good_set(zone, loopbacks, fastlb):
    b2, b3 = loopbacks(2)
    port, admin = free_port(), free_port()
    zone.set_addresses("api.test", ["127.0.0.2", "127.0.0.3"])
    lb = fastlb(config(port, admin, zone, f'backends = [{{ address = "api.test:{b2.port}" }}]'), port)
    good = {b2.address, b3.address}
    assert wait_until(lambda: set(backends_of(admin)) == good, 10)
    for broken in ("servfail", "timeout", "empty", "gone"):
        asked = len(zone.queries)
        if broken == "servfail":
            zone.servfail = True
        elif broken == "timeout":
            zone.silent = True
        elif broken == "empty":
            zone.set_addresses("api.test", [])  # the name is there, with no address
        else:
            zone.records.clear()  # NXDOMAIN
        assert wait_until(lambda a=asked: len(zone.queries) > a + 2, 15), "not asked again"
        assert set(backends_of(admin)) == good, broken
        assert {served_by(port) for _ in range(10)} == {"b2", "b3"}
        zone.servfail = zone.silent = False
        zone.set_addresses("api.test", ["127.0.0.2", "127.0.0.3"])
    code, err = lb.stop()
    assert code == 0 and "keeping the last good set" in err


def test_truncated_answers_are_asked_again_over_tcp(zone, loopbacks, fastlb):
    b2, b3 = loopbacks(2)
    port, admin = free_port(), free_port()
    zone.truncate_udp = True
    zone.set_addresses("api.test", ["127.0.0.2", "127.0.0.3"])
    fastlb(config(port, admin, zone, f'backends = [{{ address = "api.test:{b2.port}" }}]'), port)
    assert wait_until(lambda: set(backends_of(admin)) == {b2.address, b3.address}, 10)
    assert zone.count("udp") > 0 and zone.count("tcp") > 0


def test_srv_records_give_ports_weights_and_backups(zone, hb, fastlb):
    one, two, spare = hb("one"), hb("two"), hb("spare")
    port, admin = free_port(), free_port()
    zone.set_addresses("node.test", ["127.0.0.1"])
    zone.set_srv(
        "_http._tcp.api.test",
        [(10, 5, one.port, "node.test."), (10, 1, two.port, "node.test."), (20, 1, spare.port, "node.test.")],
    )
    fastlb(config(port, admin, zone, 'srv = "_http._tcp.api.test"'), port)
    assert wait_until(lambda: len(backends_of(admin)) == 3, 10), backends_of(admin)
    seen = backends_of(admin)
    assert (seen[one.address]["weight"], seen[two.address]["weight"]) == (5, 1)
    assert seen[spare.address]["backup"] and not seen[one.address]["backup"]
    assert {served_by(port) for _ in range(30)} == {"one", "two"}  # the backup waits
    # the SRV set changes: a target leaves
    zone.set_srv("_http._tcp.api.test", [(10, 5, one.port, "node.test."), (20, 1, spare.port, "node.test.")])
    assert wait_until(lambda: two.address not in backends_of(admin), 15), backends_of(admin)
    assert {served_by(port) for _ in range(10)} == {"one"}


LOCAL = {"address": "127.0.0.1:80"}


def pool_data(**pool: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app"}],
        "pools": [{"name": "app", **pool}],
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pool_data(), "pools[0].backends: required (or srv"),
        (pool_data(srv="_http._tcp.a.test", backends=[LOCAL]), "pools[0].srv: give either"),
        (pool_data(srv="api.test"), "pools[0].srv:"),
        (pool_data(backends=[LOCAL], resolve={"interval": "0s"}), "pools[0].resolve.interval:"),
        (pool_data(backends=[LOCAL]) | {"runtime": {"resolvers": ["dns.test"]}},
         "runtime.resolvers[0]:"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors
