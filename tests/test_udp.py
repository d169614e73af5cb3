"""UDP load balancing (issue 14) end to end: real `fastlb serve` processes with `protocol = "udp"`
listeners, dnspython and plain-socket clients, Python DNS and echo backends and Debian's dnsmasq,
a raw socket for spoofed floods; everything on loopback.

Clients on different 127.0.0.x addresses stand for different client hosts. Every DNS backend
answers an A query with its own address (10.0.0.N), so each answer says where it was balanced.
Assertions are on counts and distributions, never on speed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import pytest
from admin import api, scrape, state_of

from backends import payload
from conftest import FastlbProcess, free_port, wait_until
from udputil import (
    ZONE,
    DnsBackend,
    Dnsmasq,
    DnsStream,
    EchoBackend,
    SpoofedSender,
    UdpServer,
    client_socket,
    dns_health,
    dns_query_wire,
    free_udp_port,
    listener_status,
    listener_udp,
    metric,
    query_a,
    sessions_active,
    udp_config,
    vm_rss_kib,
)

IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@pytest.fixture
def udp_servers() -> Iterator[Callable[..., UdpServer]]:
    """`udp_servers(cls, *args)` starts a UdpServer subclass; all are closed after the test, which
    fails if a backend could not handle what it got."""
    started: list[UdpServer] = []

    def start(cls: type[UdpServer], *args: object) -> UdpServer:
        s = cls(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()
    errors = [e for s in started for e in s.errors]
    assert not errors, f"backend errors: {errors}"


@pytest.fixture
def dns_backend(udp_servers) -> Callable[..., DnsBackend]:
    """`dns_backend(name, ip)`: a Python DNS backend that answers A queries with `ip`."""

    def start(name: str, ip: str, port: int = 0) -> DnsBackend:
        b = udp_servers(DnsBackend, name, ip, port)
        assert isinstance(b, DnsBackend)
        return b

    return start


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Callable[[str], Dnsmasq]]:
    started: list[Dnsmasq] = []

    def start(ip: str) -> Dnsmasq:
        d = Dnsmasq(ip, tmp_path)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def udp_lb(fastlb) -> Callable[[str, int], FastlbProcess]:
    """`udp_lb(config, admin)`: `fastlb serve` on a config whose listeners are udp. There is no
    TCP port to wait for, so it waits for the admin API, which starts after the listeners are
    bound (a datagram sent from then on is queued on the listener's socket)."""

    def start(config: str, admin: int) -> FastlbProcess:
        return fastlb(config, admin)

    return start


def answers(port: int, n: int, source: str | None = None, prefix: str = "q") -> Counter[str]:
    """`n` queries, each on a new socket (a new flow); the answers counted by address."""
    return Counter(query_a(port, f"{prefix}{i}.{ZONE}", source=source) for i in range(n))


def three(dns_backend, dnsmasq) -> tuple[list[DnsBackend], Dnsmasq, list[str]]:
    """Two Python DNS backends (10.0.0.1, 10.0.0.2) and dnsmasq (10.0.0.3)."""
    py = [dns_backend(f"py{i}", IPS[i]) for i in range(2)]
    dm = dnsmasq(IPS[2])
    return py, dm, [py[0].address, py[1].address, dm.address]


# --- through fastlb to three DNS backends -----------------------------------------------------


def test_dnspython_through_fastlb_to_three_backends_one_of_them_dnsmasq(dns_backend, dnsmasq, udp_lb):
    py, _, addresses = three(dns_backend, dnsmasq)
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, addresses, admin=admin, responses=1), admin)
    got = answers(port, 300)
    # round robin: every backend answered a third, dnsmasq included
    assert set(got) == set(IPS), got
    for ip in IPS:
        assert abs(got[ip] - 100) <= 3, got
    # each query reached exactly one backend once: no duplicate, no retry
    assert [b.queries for b in py] == [got[IPS[0]], got[IPS[1]]]
    assert wait_until(lambda: sessions_active(admin) == 0, 5), listener_udp(admin)
    udp = listener_udp(admin)
    assert udp["sessions_total"] == 300
    assert udp["datagrams"] == {"in": 300, "out": 300, "to_backend": 300, "from_backend": 300}


# --- distribution per algorithm ---------------------------------------------------------------


def test_round_robin_follows_weights(dns_backend, dnsmasq, udp_lb):
    _, _, addresses = three(dns_backend, dnsmasq)
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, addresses, admin=admin, responses=1, weights=[5, 3, 2]), admin)
    got = answers(port, 1000)
    for ip, share in zip(IPS, [0.5, 0.3, 0.2], strict=True):
        assert abs(got[ip] / 1000 - share) <= 0.03, got


@pytest.mark.parametrize("algorithm", ["random", "p2c", "peak_ewma"])
def test_dynamic_algorithms_use_every_backend(dns_backend, udp_lb, algorithm):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(3)]
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(
        port, [b.address for b in bs], admin=admin, responses=1, algorithm=algorithm, weights=[5, 3, 2]
    )
    udp_lb(cfg, admin)
    got = answers(port, 600)
    assert sum(got.values()) == 600 and set(got) == set(IPS), got
    if algorithm == "random":
        for ip, share in zip(IPS, [0.5, 0.3, 0.2], strict=True):
            assert abs(got[ip] / 600 - share) <= 0.07, got


def test_least_conn_balances_open_sessions_by_weight(dns_backend, udp_lb):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(3)]
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(
        port, [b.address for b in bs], admin=admin, algorithm="least_conn", weights=[5, 3, 2], responses=0
    )
    udp_lb(cfg, admin)
    # 100 flows that stay open (responses = 0, the default 30 s idle): each pick sees the
    # sessions before it as active; the sockets stay open so no source port is reused
    socks = [client_socket() for _ in range(100)]
    try:
        got = Counter(query_a(port, f"lc{i}.{ZONE}", sock=s) for i, s in enumerate(socks))
        assert sessions_active(admin) == 100
        status = api(admin, "GET", "/api/status")[1]
        active = {b["address"]: b["active_connections"] for b in status["pools"][0]["backends"]}
    finally:
        for s in socks:
            s.close()
    for ip, want in zip(IPS, [50, 30, 20], strict=True):
        assert abs(got[ip] - want) <= 2, got
    # a backend's active_connections are its open sessions
    assert [active[b.address] for b in bs] == [got[ip] for ip in IPS], active


@pytest.mark.parametrize("algorithm", ["ip_hash", "consistent_hash", "maglev"])
def test_hashing_algorithms_keep_each_client_ip_on_its_backend(dns_backend, dnsmasq, udp_lb, algorithm):
    _, _, addresses = three(dns_backend, dnsmasq)
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, addresses, admin=admin, algorithm=algorithm, responses=1), admin)
    sources = [f"127.0.{i // 250 + 1}.{i % 250 + 1}" for i in range(200)]
    first = {ip: query_a(port, f"h.{ZONE}", source=ip) for ip in sources}
    # new flows (new source ports, new sessions) from the same addresses: the same backend
    for ip in sources[::5]:
        assert [query_a(port, f"h{k}.{ZONE}", source=ip) for k in range(3)] == [first[ip]] * 3, ip
    counts = Counter(first.values())
    assert set(counts) == set(IPS), counts
    assert min(counts.values()) >= 200 * 0.2, counts


# --- flows ------------------------------------------------------------------------------------


def test_each_flow_stays_on_one_backend(dns_backend, udp_lb):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(3)]
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, [b.address for b in bs], admin=admin, responses=0), admin)
    socks = [client_socket(f"127.0.0.{i % 3 + 1}") for i in range(30)]
    seen: dict[int, set[str]] = {i: set() for i in range(30)}
    try:
        for k in range(10):  # interleaved: flow 0, 1, ..., 29, then again
            for i, s in enumerate(socks):
                seen[i].add(query_a(port, f"f{i}-{k}.{ZONE}", sock=s))
        assert sessions_active(admin) == 30
    finally:
        for s in socks:
            s.close()
    assert all(len(v) == 1 for v in seen.values()), seen
    flows_per_ip = Counter(next(iter(v)) for v in seen.values())
    assert flows_per_ip == {ip: 10 for ip in IPS}, flows_per_ip  # flows round-robin, datagrams follow
    for b, ip in zip(bs, IPS, strict=True):
        assert b.queries == 10 * flows_per_ip[ip]
        # each session has its own upstream socket: one fastlb source port per flow
        assert len(b.peers) == flows_per_ip[ip], b.peers


def test_per_packet_spreads_one_sockets_datagrams(dns_backend, udp_lb):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(3)]
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, [b.address for b in bs], admin=admin, per_packet=True, responses=0), admin)
    with client_socket() as s:
        got = Counter(query_a(port, f"pp{i}.{ZONE}", sock=s) for i in range(300))
    for ip in IPS:
        assert abs(got[ip] - 100) <= 5, got
    # sessions are keyed by (client, backend): one client, three backends, three sessions
    assert sessions_active(admin) == 3
    assert [len(b.peers) for b in bs] == [1, 1, 1]


def test_responses_1_ends_each_session_at_its_answer(dns_backend, udp_lb):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(3)]
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, [b.address for b in bs], admin=admin, responses=1), admin)
    # one socket: every answer ends its session, so the next query is a new flow and round
    # robin moves it on
    with client_socket() as s:
        one_socket = Counter(query_a(port, f"r{i}.{ZONE}", sock=s) for i in range(30))
    assert one_socket == {ip: 10 for ip in IPS}, one_socket
    answers(port, 50)
    assert wait_until(lambda: sessions_active(admin) == 0, 5), listener_udp(admin)
    m = scrape(admin)
    assert metric(m, "fastlb_udp_sessions_total", listener="dns") == 80
    assert metric(m, "fastlb_udp_sessions_active", listener="dns") == 0
    # each ended session is timed like a tcp connection: its lifetime, in the pool's histogram
    assert metric(m, "fastlb_request_duration_seconds_count", listener="dns", pool="dns") == 80
    assert [metric(m, "fastlb_backend_connections_active", pool="dns", backend=b.address) for b in bs] == [
        0,
        0,
        0,
    ]


def test_drain_keeps_existing_flows_and_disable_moves_them(dns_backend, udp_lb):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(2)]
    by_ip = {b.ip: b for b in bs}
    port, admin = free_udp_port(), free_port()
    # a long drain_timeout: the backend stays "draining" (not "drained") while the test runs
    cfg = udp_config(port, [b.address for b in bs], admin=admin, responses=0, drain_timeout="60s")
    udp_lb(cfg, admin)
    with client_socket() as held:
        mine = by_ip[query_a(port, f"d.{ZONE}", sock=held)]
        other = next(b for b in bs if b is not mine)
        assert api(admin, "POST", f"/api/pools/dns/backends/{mine.address}/drain")[0] == 200
        assert state_of(admin, "dns", mine.address) == "draining"
        # no new flows to a draining backend; the open flow stays on it
        assert answers(port, 20, prefix="new") == {other.ip: 20}
        assert [query_a(port, f"d{i}.{ZONE}", sock=held) for i in range(10)] == [mine.ip] * 10
        assert state_of(admin, "dns", mine.address) == "draining"
        # disabled: the open flow is re-balanced at its next datagram
        assert api(admin, "POST", f"/api/pools/dns/backends/{mine.address}/disable")[0] == 200
        assert [query_a(port, f"x{i}.{ZONE}", sock=held) for i in range(5)] == [other.ip] * 5


# --- health -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["REFUSED", "silent"])
def test_failing_dns_health_check_takes_a_backend_out_and_back(dns_backend, dnsmasq, udp_lb, failure):
    py, _, addresses = three(dns_backend, dnsmasq)
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(port, addresses, admin=admin, responses=1, health=dns_health(["NOERROR"]))
    udp_lb(cfg, admin)
    assert wait_until(lambda: all(state_of(admin, "dns", a) == "up" for a in addresses), 10)
    sick = py[1]
    sick.health_rcode = failure  # data queries still answered: only the check fails
    assert wait_until(lambda: state_of(admin, "dns", sick.address) == "down", 10)
    before = sick.queries
    got = answers(port, 60, prefix="out")
    assert sum(got.values()) == 60 and set(got) == {IPS[0], IPS[2]}, got
    assert sick.queries == before
    m = scrape(admin)
    assert metric(m, "fastlb_backend_up", pool="dns", backend=sick.address) == 0
    assert metric(m, "fastlb_healthy_backends", pool="dns") == 2
    sick.health_rcode = None
    assert wait_until(lambda: state_of(admin, "dns", sick.address) == "up", 10)
    assert set(answers(port, 30, prefix="back")) == set(IPS)


def test_dns_check_by_default_fails_only_servfail(dns_backend, udp_lb):
    refused, servfail = dns_backend("refused", IPS[0]), dns_backend("servfail", IPS[1])
    refused.health_rcode, servfail.health_rcode = "REFUSED", "SERVFAIL"
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(
        port, [refused.address, servfail.address], admin=admin, responses=1, health=dns_health(None)
    )
    udp_lb(cfg, admin)
    assert wait_until(lambda: state_of(admin, "dns", servfail.address) == "down", 10)
    assert wait_until(lambda: refused.health_queries >= 4, 10)
    assert state_of(admin, "dns", refused.address) == "up"
    assert answers(port, 10) == {IPS[0]: 10}


def test_udp_check_sends_its_payload_and_expects_the_substring(udp_servers, udp_lb):
    class Replies(UdpServer):
        def __init__(self, name: str, reply: bytes) -> None:
            self.reply = reply
            self.got: list[bytes] = []
            super().__init__(name)

        def handle(self, data: bytes, peer: tuple[str, int]) -> list[bytes]:
            self.got.append(data)
            return [self.reply]

    good = udp_servers(Replies, "good", b"status: pong ok")
    bad = udp_servers(Replies, "bad", b"status: busy")
    port, admin = free_udp_port(), free_port()
    health = (
        '{ type = "udp", send = "ping", expect = "pong", interval = "500ms", timeout = "500ms", '
        "rise = 1, fall = 2 }"
    )
    udp_lb(udp_config(port, [good.address, bad.address], admin=admin, health=health), admin)
    assert wait_until(lambda: state_of(admin, "dns", bad.address) == "down", 10)
    assert state_of(admin, "dns", good.address) == "up"
    assert set(good.got) == {b"ping"} and set(bad.got) == {b"ping"}


def test_killed_backend_is_taken_out_and_the_others_keep_answering(dns_backend, dnsmasq, udp_lb):
    py, _, addresses = three(dns_backend, dnsmasq)
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(port, addresses, admin=admin, responses=1, health=dns_health(["NOERROR"]))
    udp_lb(cfg, admin)
    assert wait_until(lambda: all(state_of(admin, "dns", a) == "up" for a in addresses), 10)
    py[0].close()  # its port now answers ICMP port unreachable
    assert wait_until(lambda: state_of(admin, "dns", py[0].address) == "down", 10)
    got = answers(port, 100, prefix="after")
    assert sum(got.values()) == 100 and set(got) == {IPS[1], IPS[2]}, got
    assert metric(scrape(admin), "fastlb_healthy_backends", pool="dns") == 2


def test_icmp_unreachable_counts_for_passive_ejection(dns_backend, udp_lb):
    live, dead = dns_backend("live", IPS[0]), dns_backend("dead", IPS[1])
    dead.close()  # its port answers ICMP port unreachable; no active checks to notice it
    port, admin = free_udp_port(), free_port()
    passive = 'passive = { consecutive_failures = 1, eject = "30s" }'
    udp_lb(udp_config(port, [live.address, dead.address], admin=admin, responses=1, pool=passive), admin)
    lost = 0
    for i in range(40):  # round robin sends flows to the dead backend until it is ejected
        try:
            assert query_a(port, f"p{i}.{ZONE}", timeout=0.5) == live.ip
        except dns.exception.Timeout:
            lost += 1
        if state_of(admin, "dns", dead.address) == "down":
            break
    assert state_of(admin, "dns", dead.address) == "down"
    assert lost >= 1
    assert answers(port, 30) == {live.ip: 30}
    udp = listener_udp(admin)
    assert udp["dropped"]["unreachable"] == lost  # each lost query: one session ended by the ICMP
    assert wait_until(lambda: sessions_active(admin) == 0, 5), "an unreachable session ends"
    m = scrape(admin)
    assert metric(m, "fastlb_backend_failures_total", pool="dns", backend=dead.address, kind="connect") >= 1


def test_backup_takes_flows_only_while_every_primary_is_down(dns_backend, udp_lb):
    primary, backup = dns_backend("primary", IPS[0]), dns_backend("backup", IPS[1])
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(
        port, [primary.address], backups=[backup.address], admin=admin, responses=1, health=dns_health()
    )
    udp_lb(cfg, admin)
    assert wait_until(lambda: state_of(admin, "dns", primary.address) == "up", 10)
    assert answers(port, 20) == {primary.ip: 20}
    primary.health_rcode = "SERVFAIL"
    assert wait_until(lambda: state_of(admin, "dns", primary.address) == "down", 10)
    assert answers(port, 20, prefix="b") == {backup.ip: 20}
    primary.health_rcode = None
    assert wait_until(lambda: state_of(admin, "dns", primary.address) == "up", 10)
    assert answers(port, 20, prefix="c") == {primary.ip: 20}
    assert backup.queries == 20


# --- counters ---------------------------------------------------------------------------------


def test_metrics_and_status_equal_what_was_sent(udp_servers, udp_lb):
    echo = udp_servers(EchoBackend, "echo")
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, [echo.address], admin=admin, responses=0, session_idle="3s"), admin)
    # 4 flows; the first digit says how many copies come back (0, 1 or 2)
    plan = [[b"1aaaa", b"2bb"], [b"0cccccc", b"1d" * 50], [b"2" * 300], [b"1e", b"1f", b"0g", b"2hh"]]
    sent = got_bytes = replies = 0
    for flow in plan:
        with client_socket() as s:
            s.settimeout(5)
            for data in flow:
                s.sendto(data, ("127.0.0.1", port))
                for _ in range(int(data[:1])):
                    assert s.recv(70000) == data
                    replies += 1
                    got_bytes += len(data)
                sent += len(data)
    datagrams = sum(len(f) for f in plan)
    assert wait_until(lambda: echo.received == datagrams, 5)
    assert sessions_active(admin) == 4
    assert wait_until(lambda: sessions_active(admin) == 0, 15), "idle sessions end after 3 s"
    m = scrape(admin)
    for direction, want in [("in", datagrams), ("to_backend", datagrams), ("from_backend", replies)]:
        assert metric(m, "fastlb_udp_datagrams_total", listener="dns", direction=direction) == want, direction
    assert metric(m, "fastlb_udp_datagrams_total", listener="dns", direction="out") == replies
    assert metric(m, "fastlb_bytes_total", listener="dns", direction="in") == sent
    assert metric(m, "fastlb_bytes_total", listener="dns", direction="out") == got_bytes
    assert metric(m, "fastlb_udp_sessions_total", listener="dns") == 4
    assert metric(m, "fastlb_udp_sessions_active", listener="dns") == 0
    for reason in ("max_sessions", "no_backend", "send_error", "unreachable"):
        assert metric(m, "fastlb_udp_dropped_total", listener="dns", reason=reason) == 0
    assert metric(m, "fastlb_request_duration_seconds_count", listener="dns", pool="dns") == 4
    assert m.get(("fastlb_connections_total", (("listener", "dns"),)), 0) == 0  # no connections in UDP
    # /api/status carries the same numbers, in the stats JSON's shape
    st = listener_status(admin)
    assert st["protocol"] == "udp" and st["connections_active"] == 0
    assert (st["bytes_in"], st["bytes_out"]) == (sent, got_bytes)
    assert st["udp"] == {
        "datagrams": {"in": datagrams, "out": replies, "to_backend": datagrams, "from_backend": replies},
        "sessions_active": 0,
        "sessions_total": 4,
        "dropped": {"max_sessions": 0, "no_backend": 0, "send_error": 0, "unreachable": 0},
    }
    # no backend left: each datagram is dropped and counted
    assert api(admin, "POST", f"/api/pools/dns/backends/{echo.address}/disable")[0] == 200
    with client_socket() as s:
        for _ in range(3):
            s.sendto(b"1zz", ("127.0.0.1", port))
    assert wait_until(lambda: listener_udp(admin)["dropped"]["no_backend"] == 3, 5), listener_udp(admin)
    m = scrape(admin)
    assert metric(m, "fastlb_udp_dropped_total", listener="dns", reason="no_backend") == 3
    assert metric(m, "fastlb_udp_datagrams_total", listener="dns", direction="in") == datagrams + 3
    assert echo.received == datagrams


def test_only_udp_listeners_get_udp_series(udp_servers, backends, udp_lb):
    from backends import echo as tcp_echo

    udp_echo = udp_servers(EchoBackend, "echo")
    t = backends(tcp_echo)
    port, tport, admin = free_udp_port(), free_port(), free_port()
    extra = f"""
[[listeners]]
name = "plain"
bind = "127.0.0.1:{tport}"
protocol = "tcp"
pool = "tcp"

[[pools]]
name = "tcp"
backends = [{{ address = "{t.address}" }}]
health = {{ type = "none" }}
"""
    udp_lb(udp_config(port, [udp_echo.address], admin=admin, extra=extra), admin)
    m = scrape(admin)
    udp_names = {n for n, _ in m if n.startswith("fastlb_udp_")}
    assert udp_names >= {
        "fastlb_udp_datagrams_total",
        "fastlb_udp_sessions_active",
        "fastlb_udp_sessions_total",
    }
    listeners = {dict(lab).get("listener") for n, lab in m if n.startswith("fastlb_udp_")}
    assert listeners == {"dns"}, listeners
    assert listener_status(admin, "plain")["udp"] is None


# --- bad input --------------------------------------------------------------------------------


def test_datagrams_up_to_64k_are_relayed_intact_both_ways(udp_servers, udp_lb):
    echo = udp_servers(EchoBackend, "echo")
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, [echo.address], admin=admin, responses=0), admin)
    sizes = [1, 512, 1472, 1473, 8972, 32768, 65000, 65507]  # 65507: the IPv4 maximum
    with client_socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(5)
        for i, n in enumerate(sizes):
            data = b"1" + payload(n - 1, seed=i)  # "1": one copy back
            s.sendto(data, ("127.0.0.1", port))
            back = s.recv(1 << 17)
            assert len(back) == n and hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), n
    assert echo.sizes == sizes  # what reached the backend, datagram by datagram
    m = scrape(admin)
    assert metric(m, "fastlb_bytes_total", listener="dns", direction="in") == sum(sizes)
    assert metric(m, "fastlb_bytes_total", listener="dns", direction="out") == sum(sizes)


def test_a_backend_that_never_answers_leaks_no_session(dns_backend, udp_lb):
    mute = dns_backend("mute", IPS[0])
    mute.mode = "silent"
    port, admin = free_udp_port(), free_port()
    udp_lb(udp_config(port, [mute.address], admin=admin, responses=1, session_idle="1s"), admin)
    for i in range(20):
        with pytest.raises(dns.exception.Timeout):
            query_a(port, f"m{i}.{ZONE}", timeout=0.2)
    assert wait_until(lambda: mute.queries == 20, 5)
    assert wait_until(lambda: sessions_active(admin) == 0, 10), listener_udp(admin)
    udp = listener_udp(admin)
    assert udp["sessions_total"] == 20 and udp["datagrams"]["out"] == 0
    assert metric(scrape(admin), "fastlb_backend_connections_active", pool="dns", backend=mute.address) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets with spoofed sources need root")
def test_spoofed_port_flood_stays_within_max_sessions_and_real_clients_are_answered(dns_backend, udp_lb):
    bs = [dns_backend(f"b{i}", IPS[i]) for i in range(2)]
    port, admin = free_udp_port(), free_port()
    cfg = udp_config(
        port, [b.address for b in bs], admin=admin, responses=0, max_sessions=500, session_idle="60s"
    )
    lb = udp_lb(cfg, admin)
    legit = DnsStream(port, one_flow=True, every=0.02, timeout=2.0).start()
    rss_before = 0
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, sessions_active(admin))
            sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sender = SpoofedSender()
    flood = 20_000
    try:
        assert wait_until(lambda: len(legit.outcomes) >= 5, 10), "the legitimate flow is open"
        rss_before = vm_rss_kib(lb.proc.pid)
        sampler.start()
        # 20k datagrams from 127.0.0.2, every one from a new source port: 20k would-be flows
        ports = [1024 + i for i in range(flood)]
        sender.flood("127.0.0.2", ports, "127.0.0.1", port, dns_query_wire(f"flood.{ZONE}"), 100, 0.01)
        time.sleep(0.5)
        rss_after = vm_rss_kib(lb.proc.pid)
    finally:
        sampling.set()
        sender.close()
        outcomes = legit.stop()
        sampler.join(10)
    assert legit.failures() == [], legit.failures()[:5]
    assert len(outcomes) >= 30, "the legitimate client kept asking through the flood"
    assert peak <= 500, peak
    udp = listener_udp(admin)
    assert udp["sessions_active"] <= 500, udp
    assert udp["dropped"]["max_sessions"] > 0, udp
    m = scrape(admin)
    assert metric(m, "fastlb_udp_dropped_total", listener="dns", reason="max_sessions") > 0
    assert (
        metric(m, "fastlb_udp_datagrams_total", listener="dns", direction="in") <= flood + len(outcomes) + 1
    )
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    # once the flood's sessions have been idle for over a second, a new flow takes one's slot
    time.sleep(1.2)
    for source in ("127.0.0.1", "127.0.0.3"):
        assert query_a(port, f"late.{ZONE}", source=source) in IPS[:2]
    assert sessions_active(admin) <= 500


# --- access log -------------------------------------------------------------------------------


def test_access_log_has_one_line_per_session(dns_backend, udp_lb, tmp_path):
    import json

    talk, mute = dns_backend("talk", IPS[0]), dns_backend("mute", IPS[1])
    mute.mode = "silent"
    gone = f"127.0.0.1:{free_udp_port()}"  # nothing there: ICMP port unreachable
    port, mport, gport, admin = free_udp_port(), free_udp_port(), free_udp_port(), free_port()
    log_path = tmp_path / "access.log"
    extra = ""
    for name, p, pool_name, addr in [("mute", mport, "mp", mute.address), ("gone", gport, "gp", gone)]:
        extra += f"""
[[listeners]]
name = "{name}"
bind = "127.0.0.1:{p}"
protocol = "udp"
pool = "{pool_name}"
timeouts = {{ session_idle = "1s" }}

[[pools]]
name = "{pool_name}"
backends = [{{ address = "{addr}" }}]
health = {{ type = "none" }}
"""
    cfg = udp_config(
        port, [talk.address], admin=admin, responses=1, log=f'access_log = "{log_path}"', extra=extra
    )
    udp_lb(cfg, admin)
    clients = []
    for i in range(2):
        with client_socket() as s:
            s.settimeout(5)
            wire = dns_query_wire(f"log{i}.{ZONE}", qid=100 + i)
            s.sendto(wire, ("127.0.0.1", port))
            reply = s.recv(4096)
            assert dns.message.from_wire(reply).id == 100 + i
            clients.append((f"127.0.0.1:{s.getsockname()[1]}", len(wire), len(reply)))
    for p in (mport, gport):
        with client_socket() as s:
            s.sendto(dns_query_wire(f"x.{ZONE}"), ("127.0.0.1", p))
            clients.append((f"127.0.0.1:{s.getsockname()[1]}", 0, 0))

    def lines() -> list[dict]:
        return [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []

    assert wait_until(lambda: len(lines()) >= 4, 10), lines()
    time.sleep(0.3)
    by_client = {x["client"]: x for x in lines()}
    assert len(lines()) == 4 and len(by_client) == 4, lines()
    for client, n_in, n_out in clients[:2]:
        x = by_client[client]
        assert (x["listener"], x["protocol"], x["pool"], x["backend"]) == ("dns", "udp", "dns", talk.address)
        assert (x["datagrams_in"], x["datagrams_out"], x["bytes_in"], x["bytes_out"]) == (1, 1, n_in, n_out)
        assert x["end"] == "responses" and x["duration_ms"] >= 0
    idle = by_client[clients[2][0]]
    assert (idle["listener"], idle["backend"], idle["end"]) == ("mute", mute.address, "idle")
    assert (idle["datagrams_in"], idle["datagrams_out"], idle["bytes_out"]) == (1, 0, 0)
    assert idle["duration_ms"] >= 950  # it ended because it had been idle for session_idle
    unreachable = by_client[clients[3][0]]
    assert (unreachable["listener"], unreachable["backend"], unreachable["end"]) == (
        "gone",
        gone,
        "unreachable",
    )


# --- reload and config ------------------------------------------------------------------------


def test_udp_listener_keeps_serving_across_reload_and_sighup(dns_backend, udp_lb):
    a, b, c = (dns_backend(f"b{i}", IPS[i]) for i in range(3))
    port, admin = free_udp_port(), free_port()
    proc = udp_lb(udp_config(port, [a.address, b.address], admin=admin, responses=1), admin)
    flows = DnsStream(port, one_flow=False, every=0.01).start()
    held = DnsStream(port, one_flow=True, every=0.02).start()
    try:
        assert wait_until(lambda: len(flows.outcomes) >= 10 and len(held.outcomes) >= 10, 10)
        # a third backend, through `fastlb ctl reload`
        proc.config_path.write_text(
            udp_config(port, [a.address, b.address, c.address], admin=admin, responses=1)
        )
        ctl = [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}", "reload"]
        out = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "reloaded: 1 listeners, 1 pools", out
        assert wait_until(lambda: c.queries >= 5, 10), "the new backend gets new flows"
        proc.proc.send_signal(signal.SIGHUP)  # the same file again
        n = len(flows.outcomes)
        assert wait_until(lambda: len(flows.outcomes) >= n + 20, 10)
    finally:
        flows.stop()
        held.stop()
    assert flows.failures() == [] and held.failures() == [], (flows.failures()[:5], held.failures()[:5])
    assert {ip for _, ip in held.outcomes} <= set(IPS), "the held flow was answered by a backend"
    _, err = proc.stop()
    assert err.count("reloaded: 1 listeners, 1 pools") == 2, err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("udp = { responses = 0 }", "udp = { responses = -1 }"), "listeners[0].udp.responses"),
        (('protocol = "udp"', 'protocol = "tcp"'), "listeners[0].udp"),
    ],
    ids=["negative-responses", "udp-table-on-tcp"],
)
def test_a_bad_udp_key_exits_2_naming_the_field(tmp_path, change, field):
    cfg = udp_config(free_udp_port(), ["127.0.0.1:5301"], admin=free_port(), responses=0)
    assert change[0] in cfg
    path = tmp_path / "bad.toml"
    path.write_text(cfg.replace(*change))
    r = subprocess.run(
        [sys.executable, "-m", "fastlb", "serve", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2, r.stderr
    assert any(line.startswith(field) for line in r.stderr.splitlines()), r.stderr
    assert "Traceback" not in r.stderr
