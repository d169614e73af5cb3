"""Issue 17 in the config: route `name`, `canary` and `split_affinity`, their errors (each naming
its field), and the engine JSON they produce (`name` and `split_affinity` go to the engine;
`canary` stays with the control plane)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastlb._native import engine_config_error
from fastlb.config import ConfigError, Duration, parse_config


def config(*routes: dict[str, Any], protocol: str = "http") -> dict[str, Any]:
    """One listener with these routes over pools v1, v2 and v3."""
    return {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:8080", "protocol": protocol, "pool": "v1"}
            | {"routes": list(routes)}
        ],
        "pools": [
            {"name": name, "backends": [{"address": f"127.0.0.1:{9000 + k}"}]}
            for k, name in enumerate(("v1", "v2", "v3"))
        ],
    }


SPLIT = [{"pool": "v1", "weight": 95}, {"pool": "v2", "weight": 5}]


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return list(info.value.errors)


def one_error(data: dict[str, Any], path: str, message: str) -> None:
    errors = errors_of(data)
    hits = [e for e in errors if e.startswith(f"{path}: ") and message in e]
    assert hits, f"no error at {path!r} with {message!r} in {errors}"


def test_canary_defaults() -> None:
    cfg = parse_config(config({"split": SPLIT, "canary": {"pool": "v2"}}))
    canary = cfg.listeners[0].routes[0].canary
    assert canary is not None
    assert canary.steps == [5, 25, 50, 100]
    assert canary.interval == Duration.parse("1m")
    assert (canary.max_error_rate, canary.max_p99_ratio, canary.min_requests) == (0.01, 1.5, 100)


def test_route_names_and_affinity_to_engine() -> None:
    cfg = parse_config(
        config(
            {"name": "checkout", "split": SPLIT, "canary": {"pool": "v2", "interval": "500ms"}},
            {"path_prefix": "/ab/", "split": SPLIT, "split_affinity": {"cookie": "ab-test"}},
            {"name": "2", "split": SPLIT, "split_affinity": {"cookie": "g", "ttl": "0s"}},
        )
    )
    routes = cfg.to_engine()["listeners"][0]["routes"]
    assert [r["name"] for r in routes] == ["checkout", "1", "2"]
    assert routes[0]["split_affinity"] is None
    assert routes[1]["split_affinity"] == {"cookie": "ab-test", "ttl_ms": 30 * 86_400_000}
    assert routes[2]["split_affinity"] == {"cookie": "g", "ttl_ms": 0}
    assert all("canary" not in r for r in routes)
    assert engine_config_error(orjson.dumps(cfg.to_engine()).decode()) is None


def test_route_name_errors() -> None:
    data = config({"name": "a", "pool": "v1"}, {"name": "a", "pool": "v2"}, {"name": "0", "pool": "v1"})
    errors = errors_of(data)
    assert "listeners[0].routes[1].name: duplicate route name 'a' (listeners[0].routes[0])" in errors
    one_error(data, "listeners[0].routes[2].name", "an all-digit name must be the route's own index (2)")
    one_error(config({"name": "a b", "pool": "v1"}), "listeners[0].routes[0].name", "must be letters")


def test_route_name_on_sni_routes() -> None:
    """tcp listeners' SNI routes may be named too (no canary there)."""
    cfg = parse_config(config({"name": "ex", "sni": "example.com", "pool": "v2"}, protocol="tcp"))
    assert cfg.to_engine()["listeners"][0]["routes"][0]["name"] == "ex"
    one_error(
        config({"sni": "example.com", "pool": "v2", "canary": {"pool": "v2"}}, protocol="tcp"),
        "listeners[0].routes[0].canary",
        "not on a tcp listener",
    )


@pytest.mark.parametrize(
    ("route", "path", "message"),
    [
        ({"pool": "v1", "canary": {"pool": "v1"}}, "canary", "only on a split route"),
        ({"pool": "v1", "split_affinity": {"cookie": "g"}}, "split_affinity", "only on a split route"),
        (
            {"redirect": {"scheme": "https"}, "canary": {"pool": "v1"}},
            "canary",
            "a redirect route has no canary",
        ),
        ({"split": [{"pool": "v2"}], "canary": {"pool": "v2"}}, "canary", "at least 2 pools"),
        ({"split": SPLIT, "canary": {"pool": "v3"}}, "canary.pool", "'v3' is not a pool of the split"),
        (
            {"split": [{"pool": "v1", "weight": 0}, {"pool": "v2"}], "canary": {"pool": "v2"}},
            "split",
            "need a weight above 0",
        ),
        ({"split": SPLIT, "canary": {"pool": "v2", "steps": []}}, "canary.steps", "must not be empty"),
        ({"split": SPLIT, "canary": {"pool": "v2", "steps": [5, 5, 100]}}, "canary.steps", "must increase"),
        ({"split": SPLIT, "canary": {"pool": "v2", "steps": [0, 100]}}, "canary.steps", "from 1 to 100"),
        ({"split": SPLIT, "canary": {"pool": "v2", "steps": [5, 50]}}, "canary.steps", "must end at 100"),
        ({"split": SPLIT, "canary": {"pool": "v2", "interval": "0s"}}, "canary.interval", "must be > 0"),
        ({"split": SPLIT, "canary": {"pool": "v2", "max_error_rate": 1.5}}, "canary.max_error_rate", "<= 1"),
        ({"split": SPLIT, "canary": {"pool": "v2", "max_p99_ratio": 0}}, "canary.max_p99_ratio", "> 0"),
        ({"split": SPLIT, "canary": {"pool": "v2", "min_requests": -1}}, "canary.min_requests", ">= 0"),
        ({"split": SPLIT, "canary": {"pool": "v2", "surprise": 1}}, "canary.surprise", "unknown key"),
        ({"split": SPLIT, "split_affinity": {"cookie": "a b"}}, "split_affinity.cookie", "cookie name"),
        ({"split": SPLIT, "split_affinity": {"cookie": "g", "ttl": "x"}}, "split_affinity.ttl", "duration"),
    ],
)
def test_canary_errors(route: dict[str, Any], path: str, message: str) -> None:
    one_error(config(route), f"listeners[0].routes[0].{path}", message)
