"""`GET /metrics`: the engine's merged counters and histograms (and the control plane's health
view) as Prometheus families, with exactly the names and labels of CONTRACT.md.

Counting happens in the data plane only; a scrape takes one `ControlPlane.status()` document
(off the event loop) and translates it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

DROP_REASONS = ("max_connections", "no_backend", "rate_limited", "bad_request", "proxy_protocol")
FAILURE_KINDS = ("connect", "timeout", "reset", "5xx")
UDP_DIRECTIONS = ("in", "out", "to_backend", "from_backend")
UDP_DROP_REASONS = ("max_sessions", "no_backend", "send_error", "unreachable")
HTTP2_RESET_SIDES = ("client", "backend")
HTTP2_GOAWAY_REASONS = ("graceful", "flood")
BACKEND_STATES = ("up", "down", "draining", "drained", "disabled")  # /api/status's `state`


class _StatusCollector(Collector):
    """The families of one status document."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from families(self.status)


def families(status: dict[str, Any]) -> Iterator[Metric]:
    """The Prometheus families of one `/api/status` document."""
    listeners = status["listeners"]
    conns = CounterMetricFamily(
        "fastlb_connections_total", "Client connections accepted.", labels=["listener"]
    )
    active = GaugeMetricFamily("fastlb_connections_active", "Client connections open.", labels=["listener"])
    dropped = CounterMetricFamily(
        "fastlb_connections_dropped_total",
        "Connections or requests refused, by reason.",
        labels=["listener", "reason"],
    )
    bytes_total = CounterMetricFamily(
        "fastlb_bytes_total",
        "Bytes from clients (in) and to clients (out).",
        labels=["listener", "direction"],
    )
    durations = HistogramMetricFamily(
        "fastlb_request_duration_seconds",
        "http: request head to last response byte; tcp: connection lifetime.",
        labels=["listener", "pool"],
    )
    handshakes = CounterMetricFamily(
        "fastlb_tls_handshakes_total",
        "https/tls listeners: TLS handshakes by result (ok, resumed, timeout, client_cert, protocol, error)"
        " and version.",
        labels=["listener", "result", "version"],
    )
    bounds = [_le(b) for b in status["buckets_s"]]
    for li in listeners:
        for h in li.get("tls_handshakes", []):
            handshakes.add_metric([li["name"], h["result"], h["version"]], h["count"])
        name = li["name"]
        conns.add_metric([name], li["connections_total"])
        active.add_metric([name], li["connections_active"])
        for reason in DROP_REASONS if li.get("data_path") != "kernel" else ():  # nftables drops nothing
            dropped.add_metric([name, reason], li["dropped"][reason])
        bytes_total.add_metric([name, "in"], li["bytes_in"])
        bytes_total.add_metric([name, "out"], li["bytes_out"])
        for d in li["durations"]:
            buckets = [*zip(bounds, d["buckets"], strict=True), ("+Inf", d["count"])]
            durations.add_metric([name, d["pool"]], buckets, d["sum_s"])
    requests = CounterMetricFamily(
        "fastlb_requests_total",
        "http responses by status code.",
        labels=["listener", "pool", "backend", "code"],
    )
    for r in status["responses"]:
        requests.add_metric([r["listener"], r["pool"], r["backend"], str(r["code"])], r["count"])
    up = GaugeMetricFamily(
        "fastlb_backend_up", "1 while the backend passes its health checks.", labels=["pool", "backend"]
    )
    backend_active = GaugeMetricFamily(
        "fastlb_backend_connections_active",
        "Open connections (tcp) or requests in flight (http) per backend.",
        labels=["pool", "backend"],
    )
    failures = CounterMetricFamily(
        "fastlb_backend_failures_total", "Backend failures by kind.", labels=["pool", "backend", "kind"]
    )
    ejections = CounterMetricFamily(
        "fastlb_backend_ejections_total",
        "Times passive detection ejected the backend.",
        labels=["pool", "backend"],
    )
    state = GaugeMetricFamily(
        "fastlb_backend_state",
        "1 for the backend's state (up, down, draining, drained, disabled), 0 for the others.",
        labels=["pool", "backend", "state"],
    )
    healthy = GaugeMetricFamily("fastlb_healthy_backends", "Backends up and enabled.", labels=["pool"])
    discovered = GaugeMetricFamily(
        "fastlb_backend_discovered", "Backends the pool has from DNS (host names, srv) now.", labels=["pool"]
    )
    for pool in status["pools"]:
        pname = pool["name"]
        healthy.add_metric([pname], pool["healthy_backends"])
        if pool.get("discovered") is not None:
            discovered.add_metric([pname], pool["discovered"])
        for b in pool["backends"]:
            labels = [pname, b["address"]]
            up.add_metric(labels, 1 if b["health"]["up"] else 0)
            backend_active.add_metric(labels, b["active_connections"])
            for kind in FAILURE_KINDS:
                failures.add_metric([*labels, kind], b["failures"][kind])
            failures.add_metric([*labels, "health"], b["health"]["checks_failed"])
            ejections.add_metric(labels, b["ejections"])
            for name in BACKEND_STATES:
                state.add_metric([*labels, name], 1 if b["state"] == name else 0)
    log_dropped = CounterMetricFamily(
        "fastlb_log_dropped_total", "Access log lines dropped because the writer fell behind."
    )
    log_dropped.add_metric([], status["log_dropped"])
    yield from (conns, active, dropped, requests, durations, up, backend_active, failures, ejections)
    yield from (state, healthy, discovered, bytes_total, log_dropped, handshakes)
    yield from _kernel(status["pools"])
    yield from _udp(listeners)
    yield from _http2(listeners)
    yield from _splits(listeners)


def _splits(listeners: list[dict[str, Any]]) -> Iterator[Metric]:
    """The live share of each pool of every split route of two pools or more (a canary's
    included), in percent of the route's traffic."""
    weight = GaugeMetricFamily(
        "fastlb_canary_weight",
        "Live share of the route's requests a pool of its split gets, in percent (split routes of 2+ pools).",
        labels=["listener", "route", "pool"],
    )
    for li in listeners:
        for r in li.get("routes") or []:
            live = (r["split"] or {}).get("live", {})
            total = sum(live.values())
            if len(live) < 2 or total <= 0:
                continue
            for pool, w in live.items():
                weight.add_metric([li["name"], r["name"], pool], round(100 * w / total, 3))
    yield weight


def _kernel(pools: list[dict[str, Any]]) -> Iterator[Metric]:
    """Backends of data_path = "kernel" listeners: flows NATed to them (nft counters), flows open
    now (conntrack) and bytes both ways; their `kernel` object (null on the others)."""
    labels = ["listener", "pool", "backend"]
    flows = CounterMetricFamily(
        "fastlb_kernel_flows_total", "Flows the kernel data path NATed to the backend.", labels=labels
    )
    active = GaugeMetricFamily(
        "fastlb_kernel_flows_active", "Kernel data path flows open to the backend (conntrack).", labels=labels
    )
    moved = CounterMetricFamily(
        "fastlb_kernel_bytes_total",
        "Kernel data path bytes, client to backend (in) and back (out).",
        labels=[*labels, "direction"],
    )
    for pool in pools:
        for b in pool["backends"]:
            for listener, k in ((b.get("kernel") or {}).get("listeners") or {}).items():
                at = [listener, pool["name"], b["address"]]
                flows.add_metric(at, k["flows_total"])
                active.add_metric(at, k["flows_active"])
                moved.add_metric([*at, "in"], k["bytes_in"])
                moved.add_metric([*at, "out"], k["bytes_out"])
    yield from (flows, active, moved)


def _udp(listeners: list[dict[str, Any]]) -> Iterator[Metric]:
    """udp listeners' datagrams, sessions and drops (their `udp` object; null on the others,
    which get no series)."""
    datagrams = CounterMetricFamily(
        "fastlb_udp_datagrams_total",
        "udp: datagrams from clients (in), to clients (out), to and from backends.",
        labels=["listener", "direction"],
    )
    active = GaugeMetricFamily("fastlb_udp_sessions_active", "udp: sessions open.", labels=["listener"])
    sessions = CounterMetricFamily(
        "fastlb_udp_sessions_total", "udp: sessions started (one per flow).", labels=["listener"]
    )
    dropped = CounterMetricFamily(
        "fastlb_udp_dropped_total",
        "udp: client datagrams dropped, by reason.",
        labels=["listener", "reason"],
    )
    for li in listeners:
        udp = li.get("udp")
        if udp is None:
            continue
        name = li["name"]
        for direction in UDP_DIRECTIONS:
            datagrams.add_metric([name, direction], udp["datagrams"][direction])
        active.add_metric([name], udp["sessions_active"])
        sessions.add_metric([name], udp["sessions_total"])
        for reason in UDP_DROP_REASONS:
            dropped.add_metric([name, reason], udp["dropped"][reason])
    yield from (datagrams, active, sessions, dropped)


def _http2(listeners: list[dict[str, Any]]) -> Iterator[Metric]:
    """http/https listeners' HTTP/2 connections, streams, resets and GOAWAYs (their `http2`
    object; null on tcp/tls/udp listeners, which get no series). Requests over h2 are counted in
    the request families too."""
    conns_active = GaugeMetricFamily(
        "fastlb_http2_connections_active", "HTTP/2 client connections open.", labels=["listener"]
    )
    conns = CounterMetricFamily(
        "fastlb_http2_connections_total", "HTTP/2 client connections accepted.", labels=["listener"]
    )
    streams_active = GaugeMetricFamily(
        "fastlb_http2_streams_active", "HTTP/2 client streams open.", labels=["listener"]
    )
    streams = CounterMetricFamily(
        "fastlb_http2_streams_total", "HTTP/2 client streams opened.", labels=["listener"]
    )
    resets = CounterMetricFamily(
        "fastlb_http2_resets_total",
        "HTTP/2 RST_STREAM received, from clients (client) or from h2 backends (backend).",
        labels=["listener", "side"],
    )
    goaways = CounterMetricFamily(
        "fastlb_http2_goaways_total",
        "GOAWAY sent to HTTP/2 clients: graceful (reload, stop, drain) or flood (limits exceeded).",
        labels=["listener", "reason"],
    )
    for li in listeners:
        h2 = li.get("http2")
        if h2 is None:
            continue
        name = li["name"]
        conns_active.add_metric([name], h2["connections_active"])
        conns.add_metric([name], h2["connections_total"])
        streams_active.add_metric([name], h2["streams_active"])
        streams.add_metric([name], h2["streams_total"])
        for side in HTTP2_RESET_SIDES:
            resets.add_metric([name, side], h2["resets"][side])
        for reason in HTTP2_GOAWAY_REASONS:
            goaways.add_metric([name, reason], h2["goaways"][reason])
    yield from (conns_active, conns, streams_active, streams, resets, goaways)


def _le(seconds: float) -> str:
    return f"{seconds:g}"


def render(status: dict[str, Any]) -> bytes:
    """The Prometheus text of one `/api/status` document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)
