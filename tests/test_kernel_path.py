"""The kernel data path (`data_path = "kernel"`, docs/l4-kernel.md) in network namespaces: a client
(several addresses), the balancer (fastlb, forwarding), and three backends on their own subnet
that route through the balancer, all on one bridge. Real `fastlb serve`, real nftables, real
TCP and DNS-over-UDP clients; backends report the client address they saw.

Asserted: the share per algorithm, the client address kept (and hidden by masquerade), drain
keeping an established flow, a killed backend taken out by its checks, reload, DNS through it,
stop (new flows refused, established ones left, then the table removed, no other table
touched), a crash's rules replaced by the next start, and the start-up errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
from dnslib import QTYPE, RR, TXT, DNSRecord

from tests.netns import SBIN_PATH, Host, Lab, unavailable

pytestmark = pytest.mark.skipif(unavailable("nft") is not None, reason=str(unavailable("nft")))

VIP, PORT = "10.9.0.1", 80
CLIENTS = [f"10.9.0.{n}" for n in range(10, 18)]
BACKENDS = {"b1": "10.9.1.21", "b2": "10.9.1.22", "b3": "10.9.1.23"}


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env={"PATH": SBIN_PATH})
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


def tcp_backend(name: str, port: int = PORT) -> socket.socket:
    """Answers every read with `NAME CLIENT_IP` (the peer it saw); closing the returned socket
    kills it for new connections while open ones go on."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(256)

    def talk(conn: socket.socket, peer: str) -> None:
        with conn:
            while conn.recv(100):
                conn.sendall(f"{name} {peer}\n".encode())

    def accept() -> None:
        while True:
            try:
                conn, (peer, _) = srv.accept()
            except OSError:
                return
            threading.Thread(target=talk, args=(conn, peer), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def dns_backend(name: str, port: int = 53) -> socket.socket:
    """Answers every query with TXT `NAME CLIENT_IP`."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))

    def serve() -> None:
        while True:
            try:
                data, peer = srv.recvfrom(4096)
            except OSError:
                return
            q = DNSRecord.parse(data)
            a = q.reply()
            a.add_answer(RR(q.q.qname, QTYPE.TXT, rdata=TXT(f"{name} {peer[0]}"), ttl=0))
            srv.sendto(a.pack(), peer)

    threading.Thread(target=serve, daemon=True).start()
    return srv


class Net:
    """The lab: `client`, `lb` and the backends, wired and routed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lab = Lab("fastlb-k")
        self.client = self.lab.host("client", CLIENTS[0])
        for extra in CLIENTS[1:]:
            sh("ip", "-n", self.client.ns, "addr", "add", f"{extra}/24", "dev", "eth0")
        self.lb = self.lab.host("lb", VIP)
        sh("ip", "-n", self.lb.ns, "addr", "add", "10.9.1.1/24", "dev", "eth0")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0"):  # fmt: skip
            sh("ip", "netns", "exec", self.lb.ns, "sysctl", "-qw", key)
        self.backends: dict[str, Host] = {}
        for name, address in BACKENDS.items():
            host = self.lab.host(name, address)
            sh("ip", "-n", host.ns, "route", "add", "default", "via", "10.9.1.1")
            self.backends[name] = host
        self.servers: dict[str, socket.socket] = {}
        self.fastlb: subprocess.Popen[bytes] | None = None

    def start_backends(self, kind: Callable[[str], socket.socket] = tcp_backend) -> None:
        for name, host in self.backends.items():
            self.servers[name] = host.call(kind, name)

    def serve(
        self, config: str, env: dict[str, str] | None = None, wait: bool = True
    ) -> subprocess.Popen[bytes]:
        path = self.tmp / "lb.toml"
        path.write_text(config)
        self.log = self.tmp / "fastlb.log"
        cmd = [sys.executable, "-m", "fastlb", "serve", "-c", str(path)]
        self.fastlb = self.lb.popen(cmd, self.log, env=env)
        if wait:
            wait_for(lambda: self.lb.call(admin, "/healthz") is not None, 15, self.logs)
        return self.fastlb

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def status(self) -> dict[str, Any]:
        got = self.lb.call(admin, "/api/status")
        assert got is not None, self.logs()
        return dict(json.loads(got))

    def ask(self, src: str = CLIENTS[0]) -> tuple[str, str]:
        """One new connection from `src` to the listener: (backend, client address it saw)."""
        return self.client.call(_ask, src)

    def nft(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.lb.ns, "nft", *args)

    def close(self) -> None:
        if self.fastlb is not None and self.fastlb.poll() is None:
            self.fastlb.kill()
            self.fastlb.wait()
        for srv in self.servers.values():
            srv.close()
        self.lab.close()


def _ask(src: str) -> tuple[str, str]:
    with socket.create_connection((VIP, PORT), timeout=3, source_address=(src, 0)) as c:
        c.sendall(b"?")
        name, seen = c.makefile().readline().split()
        return name, seen


def admin(path: str, method: str = "GET") -> bytes | None:
    req = urllib.request.Request(
        f"http://127.0.0.1:9901{path}", method=method, headers={"X-Fastlb-Admin": "1"}
    )
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return bytes(r.read())
    except OSError:
        return None


def wait_for(check: Callable[[], bool], seconds: float, why: Callable[[], str] | str = "") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out: {why() if callable(why) else why}")


def config(
    algorithm: str = "round_robin",
    weights: tuple[int, ...] = (1, 1, 1),
    protocol: str = "tcp",
    extra: str = "",
    backends: tuple[str, ...] = tuple(BACKENDS),
    port: int = PORT,
) -> str:
    health = '{ type = "dns", query = "health.", interval = "300ms", timeout = "200ms", rise = 1, fall = 1 }'
    if protocol == "tcp":
        health = '{ interval = "300ms", timeout = "200ms", rise = 1, fall = 1 }'
    listed = ", ".join(
        f'{{ address = "{BACKENDS[b]}:{port}", weight = {w} }}'
        for b, w in zip(backends, weights, strict=False)
    )
    return f"""
[[listeners]]
name = "l4"
bind = "{VIP}:{port}"
protocol = "{protocol}"
pool = "app"
data_path = "kernel"
{extra}

[[pools]]
name = "app"
algorithm = "{algorithm}"
health = {health}
drain_timeout = "20s"
backends = [{listed}]
"""


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.close()


def all_up(net: Net, count: int = 3) -> bool:
    pools = net.status()["pools"]
    return sum(1 for b in pools[0]["backends"] if b["state"] == "up") == count


# --- the share per algorithm, the client address --------------------------------------------


def test_round_robin_follows_weights_exactly_and_backends_see_the_client(net: Net) -> None:
    net.start_backends()
    net.serve(config(weights=(1, 1, 2)))
    wait_for(lambda: all_up(net), 10, net.logs)
    answers = [net.ask() for _ in range(12)]
    assert Counter(name for name, _ in answers) == {"b1": 3, "b2": 3, "b3": 6}
    assert {seen for _, seen in answers} == {CLIENTS[0]}, "the backend saw the balancer, not the client"
    status = net.status()
    listener = next(x for x in status["listeners"] if x["name"] == "l4")
    assert listener["data_path"] == "kernel" and listener["connections_total"] == 12
    assert listener["bytes_in"] > 0 and listener["bytes_out"] > 0
    flows = {
        b["address"]: b["kernel"]["listeners"]["l4"]["flows_total"] for b in status["pools"][0]["backends"]
    }
    assert flows == {"10.9.1.21:80": 3, "10.9.1.22:80": 3, "10.9.1.23:80": 6}
    metrics = net.lb.call(admin, "/metrics").decode()
    assert 'fastlb_kernel_flows_total{backend="10.9.1.23:80",listener="l4",pool="app"} 6.0' in metrics
    assert 'fastlb_connections_total{listener="l4"} 12.0' in metrics
    ctl = sh("ip", "netns", "exec", net.lb.ns, sys.executable, "-m", "fastlb", "ctl", "status")
    assert "(kernel)" in ctl, ctl  # beside the protocol (rich may wrap it)


@pytest.mark.parametrize("algorithm", ["ip_hash", "maglev", "consistent_hash"])
def test_hashing_keeps_each_client_on_one_backend(net: Net, algorithm: str) -> None:
    net.start_backends()
    net.serve(config(algorithm))
    wait_for(lambda: all_up(net), 10, net.logs)
    first = {src: net.ask(src)[0] for src in CLIENTS}
    for _ in range(2):
        assert {src: net.ask(src)[0] for src in CLIENTS} == first
    assert len(set(first.values())) > 1, f"every client on one backend: {first}"
    if algorithm == "ip_hash":
        return
    # maglev: draining one backend moves its clients only
    gone = first[CLIENTS[0]]
    net.lb.call(admin, f"/api/pools/app/backends/{BACKENDS[gone]}:{PORT}/drain", "POST")
    wait_for(lambda: net.ask(CLIENTS[0])[0] != gone, 5, "the drained backend still got new flows")
    after = {src: net.ask(src)[0] for src in CLIENTS}
    assert all(after[s] == b for s, b in first.items() if b != gone), (first, after)
    assert gone not in after.values()


def test_random_reaches_every_backend(net: Net) -> None:
    net.start_backends()
    net.serve(config("random"))
    wait_for(lambda: all_up(net), 10, net.logs)
    assert set(Counter(net.ask()[0] for _ in range(60))) == set(BACKENDS)


def test_masquerade_hides_the_client_from_backends(net: Net) -> None:
    net.start_backends()
    net.serve(config(extra='source = "masquerade"'))
    wait_for(lambda: all_up(net), 10, net.logs)
    assert {net.ask()[1] for _ in range(3)} == {"10.9.1.1"}


# --- drain, health, reload, UDP ---------------------------------------------------------------


def test_drain_keeps_the_established_flow_and_checks_take_a_dead_backend_out(net: Net) -> None:
    net.start_backends()
    net.serve(config())
    wait_for(lambda: all_up(net), 10, net.logs)

    def hold() -> tuple[socket.socket, str]:
        c = socket.create_connection((VIP, PORT), timeout=3)
        c.sendall(b"?")
        return c, c.makefile().readline().split()[0]

    conn, held = net.client.call(hold)
    try:
        address = f"{BACKENDS[held]}:{PORT}"
        net.lb.call(admin, f"/api/pools/app/backends/{address}/drain", "POST")
        wait_for(lambda: all(net.ask()[0] != held for _ in range(4)), 5, "new flows still went to it")
        conn.sendall(b"?")
        assert conn.recv(100).split()[0].decode() == held, "the established flow moved"

        def backend(addr: str) -> dict[str, Any]:
            return next(b for b in net.status()["pools"][0]["backends"] if b["address"] == addr)

        wait_for(lambda: backend(address)["kernel"]["listeners"]["l4"]["flows_active"] == 1, 5)
        assert backend(address)["state"] == "draining"
    finally:
        conn.close()
    wait_for(lambda: backend(address)["state"] == "drained", 10, lambda: str(backend(address)))

    dead = next(b for b in BACKENDS if b != held)
    net.backends[dead].call(net.servers[dead].close)
    wait_for(lambda: backend(f"{BACKENDS[dead]}:{PORT}")["state"] == "down", 10, net.logs)
    # the table follows the engine's state within a poll (0.1 s) and a transaction
    wait_for(lambda: backend(f"{BACKENDS[dead]}:{PORT}")["kernel"]["listeners"]["l4"]["weight"] == 0, 5)
    survivor = ({*BACKENDS} - {held, dead}).pop()
    assert {net.ask()[0] for _ in range(6)} == {survivor}


def test_dns_over_udp_through_it_and_reload_takes_a_backend_out(net: Net) -> None:
    net.start_backends(dns_backend)
    net.serve(config(protocol="udp", port=53))
    wait_for(lambda: all_up(net), 10, net.logs)

    def query(n: int) -> list[str]:
        got = []
        for i in range(n):
            q = dns.message.make_query(f"q{i}.example.", dns.rdatatype.TXT)
            a = dns.query.udp(q, VIP, port=53, timeout=3)  # a new source port: a new flow
            got.append(a.answer[0][0].strings[0].decode())
        return got

    answers = net.client.call(query, 6)
    assert Counter(a.split()[0] for a in answers) == {"b1": 2, "b2": 2, "b3": 2}
    assert {a.split()[1] for a in answers} == {CLIENTS[0]}
    path = net.tmp / "lb.toml"
    path.write_text(config(protocol="udp", port=53, backends=("b1", "b2")))
    assert net.fastlb is not None
    net.fastlb.send_signal(signal.SIGHUP)
    wait_for(lambda: "b3" not in {a.split()[0] for a in net.client.call(query, 4)}, 10, net.logs)
    assert Counter(a.split()[0] for a in net.client.call(query, 4)) == {"b1": 2, "b2": 2}


# --- stop, crash, start-up errors --------------------------------------------------------------


def test_stop_refuses_new_flows_lets_established_finish_and_touches_no_other_table(net: Net) -> None:
    net.start_backends()
    net.nft("add", "table", "ip", "other")
    net.nft("add", "chain", "ip", "other", "keep", "{ type filter hook input priority 0; policy accept; }")
    others = net.nft("list", "table", "ip", "other")
    proc = net.serve(config())
    wait_for(lambda: all_up(net), 10, net.logs)
    conn = net.client.call(socket.create_connection, (VIP, PORT), 3)
    try:
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                net.ask()
            except ConnectionRefusedError:
                return True
            return False

        wait_for(refused, 5, net.logs)
        conn.sendall(b"?")
        assert conn.recv(100).split()[1].decode() == CLIENTS[0]
        assert proc.poll() is None, "fastlb left before the established flow ended"
    finally:
        conn.close()
    assert proc.wait(15) == 0, net.logs()
    assert "fastlb" not in net.nft("list", "tables")
    assert net.nft("list", "table", "ip", "other") == others


def test_a_crash_leaves_rules_the_next_start_replaces(net: Net) -> None:
    net.start_backends()
    proc = net.serve(config())
    wait_for(lambda: all_up(net), 10, net.logs)
    proc.kill()
    proc.wait()
    assert "table ip fastlb" in net.nft("list", "tables")
    net.serve(config(backends=("b2",)))
    wait_for(lambda: all_up(net, 1), 10, net.logs)
    assert {net.ask()[0] for _ in range(4)} == {"b2"}
    table = net.nft("list", "table", "ip", "fastlb")
    assert "10.9.1.21" not in table and "10.9.1.23" not in table


def test_start_up_errors_name_the_listener_and_exit_1(net: Net) -> None:
    proc = net.serve(config(), env={**os.environ, "FASTLB_NFT": "/nonexistent/nft"}, wait=False)
    assert proc.wait(15) == 1
    assert "listener 'l4' (data_path = \"kernel\"): /nonexistent/nft is not installed" in net.logs()
    with contextlib.suppress(FileNotFoundError):
        (net.tmp / "fastlb.log").unlink()
    # without CAP_NET_ADMIN (out of the bounding set, so root's exec does not get it): nft refuses
    cmd = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    path = net.tmp / "lb.toml"
    proc = net.lb.popen([*cmd, sys.executable, "-m", "fastlb", "serve", "-c", str(path)], net.log)
    assert proc.wait(15) == 1, net.logs()
    assert "listener 'l4' (data_path = \"kernel\"): nft:" in net.logs(), net.logs()
    assert "Operation not permitted" in net.logs(), net.logs()


def test_a_binary_upgrade_hands_the_table_over_and_keeps_an_established_flow(net: Net) -> None:
    net.start_backends()
    pid_file = net.tmp / "fastlb.pid"
    proc = net.serve(f'[runtime]\npid_file = "{pid_file}"\n' + config())
    wait_for(lambda: all_up(net), 10, net.logs)
    conn = net.client.call(socket.create_connection, (VIP, PORT), 3)
    try:
        conn.sendall(b"?")
        held = conn.recv(100).split()[0]
        proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: pid_file.exists() and int(pid_file.read_text()) != proc.pid, 15, net.logs)
        # the old process drains (the held flow) while the new one serves new flows
        assert {net.ask()[1] for _ in range(3)} == {CLIENTS[0]}
        conn.sendall(b"?")
        assert conn.recv(100).split()[0] == held
    finally:
        conn.close()
    assert proc.wait(15) == 0, net.logs()
    assert "table ip fastlb" in net.nft("list", "tables"), "the old process removed the new one's table"
    assert Counter(net.ask()[0] for _ in range(3)) == {"b1": 1, "b2": 1, "b3": 1}
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    wait_for(lambda: "fastlb" not in net.nft("list", "tables"), 15, net.logs)
