"""The config of the kernel data path (`data_path = "kernel"`, docs/l4-kernel.md): what it takes,
what it refuses by name (everything that needs fastlb to hold the connection), and that the
engine is not given its listeners (nftables serves them, not a socket)."""

from __future__ import annotations

from typing import Any

import pytest

from fastlb.config import parse_config
from tests.test_config import assert_error, errors_of

L0, P0, B0 = "listeners[0]", "pools[0]", "pools[0].backends[0]"


def kernel(listener: dict[str, Any] | None = None, pool: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "listeners": [
            {"name": "l4", "bind": "10.0.0.1:80", "protocol": "tcp", "pool": "app", "data_path": "kernel"}
            | (listener or {})
        ],
        "pools": [
            {"name": "app", "backends": [{"address": "127.0.0.1:9001"}, {"address": "127.0.0.1:9002"}]}
            | (pool or {})
        ],
    }


@pytest.mark.parametrize("algorithm", ["round_robin", "random", "ip_hash", "consistent_hash", "maglev"])
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_kernel_listener_takes_the_packet_level_algorithms(protocol: str, algorithm: str) -> None:
    cfg = parse_config(kernel({"protocol": protocol, "source": "masquerade"}, {"algorithm": algorithm}))
    assert cfg.listeners[0].data_path == "kernel" and cfg.listeners[0].source == "masquerade"
    spec = cfg.to_engine()
    assert spec["listeners"] == [] and [p["name"] for p in spec["pools"]] == ["app"]


@pytest.mark.parametrize(
    ("listener", "pool", "path", "message"),
    [
        ({"protocol": "http"}, {}, f"{L0}.data_path", "is for tcp and udp"),
        ({"protocol": "tls"}, {}, f"{L0}.data_path", "is for tcp and udp"),
        ({"bind": "[::1]:80"}, {}, f"{L0}.bind", "takes an IPv4 address"),
        ({"bind": "lb.example:80"}, {}, f"{L0}.bind", "takes an IPv4 address"),
        ({"bind": "0.0.0.0:0"}, {}, f"{L0}.bind", "and a port"),
        ({"routes": [{"sni": "a.example", "pool": "app"}]}, {}, f"{L0}.routes", "terminated connection"),
        ({"proxy_protocol": {"accept": "required", "from": ["10.0.0.0/8"]}}, {}, f"{L0}.proxy_protocol", ""),
        ({"timeouts": {"client_idle": "5s"}}, {}, f"{L0}.timeouts", "conntrack"),
        ({"protocol": "udp", "udp": {"responses": 1}}, {}, f"{L0}.udp", "conntrack"),
        ({}, {"algorithm": "least_conn"}, f"{P0}.algorithm", "least_conn needs a terminated connection"),
        ({}, {"algorithm": "peak_ewma"}, f"{P0}.algorithm", "one of round_robin"),
        ({}, {"retries": 1}, f"{P0}.retries", "listener 'l4' uses this pool"),
        ({}, {"timeouts": {"connect": "1s"}}, f"{P0}.timeouts", ""),
        ({}, {"send_proxy": "v2"}, f"{P0}.send_proxy", ""),
        ({}, {"passive": {}}, f"{P0}.passive", ""),
        ({}, {"hash_balance_factor": 150, "algorithm": "maglev"}, f"{P0}.hash_balance_factor", ""),
        ({}, {"backends": [{"address": "127.0.0.1:1", "max_connections": 5}]}, f"{B0}.max_connections", ""),
        ({}, {"backends": [{"address": "[::1]:9001"}]}, f"{B0}.address", "IPv6"),
        ({"data_path": "proxy", "source": "masquerade"}, {}, f"{L0}.source", "only with data_path"),
        ({"data_path": "bpf"}, {}, f"{L0}.data_path", ""),
    ],
)  # fmt: skip
def test_what_needs_a_held_connection_is_refused_by_name(
    listener: dict[str, Any], pool: dict[str, Any], path: str, message: str
) -> None:
    assert_error(kernel(listener, pool), path, message)


def test_a_refused_kernel_listener_says_nothing_about_a_valid_proxy_one() -> None:
    data = kernel()
    data["listeners"].append({"name": "web", "bind": "127.0.0.1:8080", "protocol": "http", "pool": "app"})
    cfg = parse_config(data)  # a pool may serve both data paths
    assert [x["name"] for x in cfg.to_engine()["listeners"]] == ["web"]
    data["pools"][0]["algorithm"] = "least_conn"
    assert [e.split(":")[0] for e in errors_of(data)] == [f"{P0}.algorithm"]
