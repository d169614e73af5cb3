"""Micro benchmarks (pytest-benchmark). `make test` runs them once each as a smoke test
(`--benchmark-disable`); `make bench` runs them fully and records the figures in
bench/RESULTS.md (bench/micro/report.py).

Loops that would measure the Python call more than the data plane run inside Rust
(`_native.bench_*`, N operations per call); `extra_info["ops_per_call"]` says how many, so a
figure per operation is the mean per call divided by it.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from fastlb import _native
from fastlb._native import HashRing, Maglev

ALGORITHMS = [
    "round_robin",
    "least_conn",
    "random",
    "p2c",
    "peak_ewma",
    "ip_hash",
    "consistent_hash",
    "maglev",
]
OPS = 1000


class SeedConsistentHash:
    """The seed article's ConsistentHash, as written there: md5, 160 virtual nodes, and a sorted
    scan of the whole ring per lookup."""

    def __init__(self, servers: list[str]) -> None:
        self.servers = sorted(servers)
        self.hash_ring: dict[int, str] = {}
        for server in self.servers:
            for i in range(160):
                node_key = f"{server}:{i}"
                self.hash_ring[int(hashlib.md5(node_key.encode()).hexdigest(), 16)] = server

    def get_server(self, key: str) -> str:
        hash_val = int(hashlib.md5(key.encode()).hexdigest(), 16)
        for ring_key in sorted(self.hash_ring.keys()):
            if ring_key >= hash_val:
                return self.hash_ring[ring_key]
        return self.hash_ring[min(self.hash_ring.keys())]


SERVERS = [f"10.0.0.{i}:80" for i in range(10)]
KEYS = [f"user-{random.Random(7).randrange(10**9)}-{i}" for i in range(OPS)]


@pytest.mark.parametrize("impl", ["seed_python", "fastlb_ring", "fastlb_maglev"])
def test_hash_lookup(benchmark, impl: str) -> None:
    if impl == "seed_python":
        ring = SeedConsistentHash(SERVERS)
        fn, keys = ring.get_server, KEYS[:20]  # ~0.1 ms each: 20 keep a round short
    elif impl == "fastlb_ring":
        fn, keys = HashRing(SERVERS).lookup, KEYS
    else:
        fn, keys = Maglev(SERVERS).lookup, KEYS
    benchmark.extra_info["ops_per_call"] = len(keys)
    benchmark.extra_info["note"] = "per lookup, called from Python (the call is included)"
    result = benchmark(lambda: [fn(k) for k in keys])
    assert set(result) <= set(SERVERS)


def test_parse_http_head(benchmark) -> None:
    head = (
        b"GET /api/v1/users/42?expand=orders HTTP/1.1\r\nHost: api.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\nAccept: application/json\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Cookie: session=abc123; theme=dark\r\nX-Request-Id: 0123456789abcdef\r\n\r\n"
    )
    benchmark.extra_info["ops_per_call"] = OPS
    benchmark.extra_info["note"] = "per 8-field request head, in Rust"
    total_ns = benchmark(_native.bench_parse_head, head, OPS)
    assert total_ns > 0


@pytest.mark.parametrize("backends", [10, 1000])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_select(benchmark, algorithm: str, backends: int) -> None:
    benchmark.extra_info["ops_per_call"] = OPS
    benchmark.extra_info["note"] = "per selection, in Rust, usable filter included"
    pool = _native.BenchPool(algorithm, backends)  # built outside the timing
    total_ns = benchmark(pool.select, OPS)
    assert total_ns > 0


def test_bench_helpers_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        _native.BenchPool("fastest", 10)
    with pytest.raises(ValueError, match="incomplete"):
        _native.bench_parse_head(b"GET / HTTP/1.1\r\n", 1)
