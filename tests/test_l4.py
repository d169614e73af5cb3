"""L4 (TCP) proxying through a real `fastlb serve` process with two workers."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from backends import digest_after_eof, echo, holds_open, payload, says_name
from conftest import free_port
from l4util import ask_name, l4_config, read_all

WEIGHTS = [5, 3, 2]


def _shares(counts: Counter[str], names: list[str], total: int) -> list[float]:
    return [counts[n] / total for n in names]


def test_round_robin_follows_weights_exactly(backends, fastlb):
    bs = [backends(says_name, f"b{i}") for i in range(3)]
    port = free_port()
    fastlb(l4_config(port, [b.address for b in bs], weights=WEIGHTS), port)
    counts = Counter(ask_name(port) for _ in range(1000))
    shares = _shares(counts, ["b0", "b1", "b2"], 1000)
    for share, w in zip(shares, [0.5, 0.3, 0.2], strict=True):
        assert abs(share - w) <= 0.02, shares


@pytest.mark.parametrize("algorithm", ["random", "p2c", "peak_ewma"])
def test_dynamic_algorithms_use_every_backend(backends, fastlb, algorithm):
    bs = [backends(says_name, f"b{i}") for i in range(3)]
    port = free_port()
    fastlb(l4_config(port, [b.address for b in bs], algorithm=algorithm, weights=WEIGHTS), port)
    counts = Counter(ask_name(port) for _ in range(600))
    assert sum(counts.values()) == 600
    assert set(counts) == {"b0", "b1", "b2"}, counts
    if algorithm == "random":
        shares = _shares(counts, ["b0", "b1", "b2"], 600)
        for share, w in zip(shares, [0.5, 0.3, 0.2], strict=True):
            assert abs(share - w) <= 0.07, shares


def test_least_conn_balances_open_connections_by_weight(backends, fastlb):
    bs = [backends(holds_open, f"b{i}") for i in range(3)]
    port = free_port()
    fastlb(l4_config(port, [b.address for b in bs], algorithm="least_conn", weights=WEIGHTS), port)
    held = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"x")
        held.append(s)
        # each pick must see the previous connections as active: wait until it reached a backend
        deadline = time.monotonic() + 5
        while sum(b.accepted for b in bs) < len(held) and time.monotonic() < deadline:
            time.sleep(0.002)
    opened = [b.accepted for b in bs]
    for s in held:
        s.close()
    # (active + 1) / weight is minimised: 100 connections settle at 50/30/20, give or take one
    for got, want in zip(opened, [50, 30, 20], strict=True):
        assert abs(got - want) <= 1, opened


@pytest.mark.parametrize("algorithm", ["ip_hash", "consistent_hash", "maglev"])
def test_hashing_algorithms_pin_each_source_ip(backends, fastlb, algorithm):
    bs = [backends(says_name, f"b{i}") for i in range(3)]
    port = free_port()
    fastlb(l4_config(port, [b.address for b in bs], algorithm=algorithm), port)
    sources = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(300)]
    first = {ip: ask_name(port, ip) for ip in sources}
    again = {ip: ask_name(port, ip) for ip in sources[::7]}
    assert all(first[ip] == name for ip, name in again.items())
    counts = Counter(first.values())
    assert set(counts) == {"b0", "b1", "b2"}
    assert min(counts.values()) >= 300 * 0.2, counts


def test_refused_backend_is_retried_before_the_client_notices(backends, fastlb):
    live = backends(says_name, "live")
    dead = f"127.0.0.1:{free_port()}"
    port = free_port()
    fastlb(l4_config(port, [dead, live.address]), port)
    assert [ask_name(port) for _ in range(50)] == ["live"] * 50


def test_no_usable_backend_closes_the_client(fastlb):
    port = free_port()
    fastlb(l4_config(port, [f"127.0.0.1:{free_port()}"], pool="retries = 1"), port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert read_all(s) == b""


def test_16_mib_each_way_is_byte_exact(backends, fastlb):
    b = backends(echo)
    port = free_port()
    fastlb(l4_config(port, [b.address]), port)
    data = payload(16 << 20)
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:

        def reader() -> None:
            while chunk := s.recv(1 << 16):
                received.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(60)
    assert len(received) == len(data)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_half_close_still_gets_the_whole_reply(backends, fastlb):
    b = backends(digest_after_eof)
    port = free_port()
    fastlb(l4_config(port, [b.address]), port)
    sent = payload(3 << 20, seed=3)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(sent)
        s.shutdown(socket.SHUT_WR)
        reply = read_all(s)
    digest, _, rest = reply.partition(b"\n")
    assert digest.decode() == hashlib.sha256(sent).hexdigest()
    assert rest == payload(1 << 20)


def test_ipv6_listener(backends, fastlb):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this host")
    b = backends(says_name, "v4-backend")
    port = free_port()
    fastlb(l4_config(port, [b.address], bind_host="::1"), port, host="::1")
    assert ask_name(port, host="::1") == "v4-backend"


def test_sigterm_exits_zero(backends, fastlb):
    b = backends(says_name)
    port = free_port()
    p = fastlb(l4_config(port, [b.address]), port)
    assert ask_name(port) == b.name
    code, err = p.stop()
    assert code == 0, err


def test_port_in_use_is_a_runtime_failure(backends, fastlb, tmp_path):
    import subprocess
    import sys

    b = backends(says_name)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    path = tmp_path / "c.toml"
    path.write_text(l4_config(port, [b.address]))
    r = subprocess.run(
        [sys.executable, "-m", "fastlb", "serve", "-c", str(path)], capture_output=True, text=True
    )
    taken.close()
    assert r.returncode == 1, r.stderr
    assert "front" in r.stderr and str(port) in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_lets_an_open_transfer_finish(backends, fastlb):
    def slow_sender(conn: socket.socket, backend) -> None:
        for i in range(10):
            conn.sendall(payload(100_000, seed=i))
            time.sleep(0.1)

    b = backends(slow_sender)
    port = free_port()
    p = fastlb(l4_config(port, [b.address]), port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        first = s.recv(1000)
        assert first, "the transfer started"
        p.proc.send_signal(signal.SIGTERM)
        rest = read_all(s)
    assert first + rest == b"".join(payload(100_000, seed=i) for i in range(10))
    assert p.proc.wait(10) == 0, p.stop()[1]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
