"""Active-active (docs/ha.md): two `fastlb serve` processes with the same pool config map every
client to the same backend with maglev, so ECMP or DNS may send a client to either instance (and
to the other one after a failover) and it lands on the same backend. After a backend goes down,
both move the same keys, and only that backend's keys, the same way."""

from __future__ import annotations

import http.client
from collections import Counter
from collections.abc import Callable

import pytest
from admin import state_of
from httpbackend import HttpBackend

from conftest import FastlbProcess, free_port, wait_until

BACKENDS = 5


def pool_config(addresses: list[str], hash_key: str) -> str:
    """The `[[pools]]` table, the same text for both instances."""
    backends = ", ".join(f'{{ address = "{a}" }}' for a in addresses)
    return f"""
[[pools]]
name = "app"
algorithm = "maglev"
hash_key = "{hash_key}"
backends = [{backends}]
health = {{ type = "http", path = "/", interval = "100ms", timeout = "100ms", rise = 1, fall = 1 }}
"""


def instance_config(port: int, admin_port: int, pools: str) -> str:
    """One instance: only the listener's and the admin API's ports differ (two on one host)."""
    return f"""
[runtime]
workers = 2
[admin]
bind = "127.0.0.1:{admin_port}"
[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
pool = "app"
{pools}"""


def backend_of(port: int, hash_key: str, key: str) -> str:
    """The backend one request with `key` reached (its X-Backend header)."""
    source = ("127.0.0.1", 0)
    headers = {}
    if hash_key == "source_ip":
        source = (key, 0)
    else:
        headers[hash_key.removeprefix("header:")] = key
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=source)
    try:
        c.request("GET", "/", headers=headers)
        r = c.getresponse()
        r.read()
        assert r.status == 200, (key, r.status)
        return str(r.getheader("X-Backend"))
    finally:
        c.close()


def keys_for(hash_key: str) -> list[str]:
    if hash_key == "source_ip":  # every 127.x.y.z is this host's: distinct client addresses
        return [f"127.0.{i // 250 + 1}.{i % 250 + 1}" for i in range(300)]
    return [f"user-{i}" for i in range(400)]


@pytest.mark.parametrize("hash_key", ["header:X-User", "source_ip"])
def test_two_instances_agree_on_every_key_before_and_after_a_backend_fails(
    hb: Callable[..., HttpBackend], fastlb: Callable[..., FastlbProcess], hash_key: str
) -> None:
    bs = [hb(f"b{i}") for i in range(BACKENDS)]
    pools = pool_config([b.address for b in bs], hash_key)
    instances = []
    for _ in range(2):
        port, admin_port = free_port(), free_port()
        fastlb(instance_config(port, admin_port, pools), port)
        instances.append((port, admin_port))
    keys = keys_for(hash_key)

    def mapping(port: int) -> dict[str, str]:
        return {k: backend_of(port, hash_key, k) for k in keys}

    before = [mapping(port) for port, _ in instances]
    assert before[0] == before[1], [k for k in keys if before[0][k] != before[1][k]]
    shares = Counter(before[0].values())
    assert set(shares) == {b.name for b in bs}, shares  # a real spread, not one backend for all

    gone = bs[2]
    gone.close()
    for _, admin_port in instances:
        assert wait_until(lambda a=admin_port: state_of(a, "app", gone.address) == "down"), (
            f"instance with admin port {admin_port} did not mark {gone.address} down"
        )

    after = [mapping(port) for port, _ in instances]
    assert after[0] == after[1], [k for k in keys if after[0][k] != after[1][k]]
    moved = {k: after[0][k] for k in keys if after[0][k] != before[0][k]}
    assert set(moved) == {k for k in keys if before[0][k] == gone.name}, "only the failed backend's keys move"
    landed = Counter(moved.values())
    assert gone.name not in landed
    assert len(landed) >= 2, f"the failed backend's keys spread over the others: {landed}"
