"""The UDP tests' own parts, checked without fastlb: the DNS and echo backends, dnsmasq, dnspython
as a client, and the raw-socket sender of spoofed datagrams. When a test in test_udp.py fails,
these say whether the fault is in the balancer or in the rig."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from backends import payload
from udputil import (
    HEALTH_NAME,
    ZONE,
    DnsBackend,
    Dnsmasq,
    EchoBackend,
    SpoofedSender,
    client_socket,
    dns_query_wire,
    query_a,
)


def test_dns_backend_answers_with_its_identity_and_counts_checks_apart():
    b = DnsBackend("b", "10.0.0.7")
    try:
        assert query_a(b.port, f"a.{ZONE}") == "10.0.0.7"
        assert query_a(b.port, f"a.{ZONE}", source="127.0.0.9") == "10.0.0.7"
        assert query_a(b.port, HEALTH_NAME) == "10.0.0.7"
        assert (b.queries, b.health_queries) == (2, 1)
        assert {peer[0] for peer in b.peers} == {"127.0.0.1", "127.0.0.9"}
        b.health_rcode = "REFUSED"
        r = dns.query.udp(dns.message.make_query(HEALTH_NAME, "A"), "127.0.0.1", port=b.port, timeout=2)
        assert r.rcode() == dns.rcode.REFUSED
        assert query_a(b.port, f"b.{ZONE}") == "10.0.0.7"
        b.mode = "silent"
        with pytest.raises(dns.exception.Timeout):
            query_a(b.port, f"c.{ZONE}", timeout=0.2)
        assert b.queries == 4 and b.errors == []
    finally:
        b.close()
    with pytest.raises(dns.exception.Timeout):  # closed: nothing answers any more
        query_a(b.port, f"d.{ZONE}", timeout=0.2)


def test_dnsmasq_answers_the_zone_and_the_health_name(tmp_path: Path):
    d = Dnsmasq("10.0.0.3", tmp_path)
    try:
        assert query_a(d.port, f"q1.{ZONE}") == "10.0.0.3"
        assert query_a(d.port, HEALTH_NAME) == "10.0.0.3"
        r = dns.query.udp(dns.message.make_query("elsewhere.org.", "A"), "127.0.0.1", port=d.port, timeout=2)
        assert r.rcode() == dns.rcode.REFUSED  # no upstream: nothing else is answered
    finally:
        d.close()


def test_echo_backend_sends_as_many_copies_as_the_first_digit_says_up_to_64k():
    e = EchoBackend("e")
    try:
        with client_socket("127.0.0.3") as s:
            s.settimeout(2)
            big = b"1" + payload(65506)
            s.sendto(big, ("127.0.0.1", e.port))
            assert s.recv(1 << 17) == big
            s.sendto(b"2ab", ("127.0.0.1", e.port))
            assert [s.recv(10), s.recv(10)] == [b"2ab", b"2ab"]
            s.sendto(b"0x", ("127.0.0.1", e.port))
            s.sendto(b"zz", ("127.0.0.1", e.port))
            assert s.recv(10) == b"zz"  # nothing came back for "0x"
        assert e.sizes == [65507, 3, 2, 2]
    finally:
        e.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")
def test_spoofed_sender_reaches_a_plain_socket_from_the_address_and_ports_it_claims():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        r.bind(("127.0.0.1", 0))
        r.settimeout(2)
        sender = SpoofedSender()
        try:
            wire = dns_query_wire(f"flood.{ZONE}")
            sender.flood("127.0.0.2", range(40000, 40300), "127.0.0.1", r.getsockname()[1], wire, 100, 0.01)
            got = [r.recvfrom(2048) for _ in range(300)]
        finally:
            sender.close()
    assert {data for data, _ in got} == {wire}  # the UDP checksum was right, or the kernel drops it
    assert sorted(peer for _, peer in got) == [("127.0.0.2", p) for p in range(40000, 40300)]
