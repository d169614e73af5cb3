"""The active-passive pair of docs/ha.md, with Debian's keepalived and the shipped
deploy/keepalived/node-a.conf and node-b.conf as they are: two fastlb nodes in their own network
namespaces on a bridge, each with its backend, and a client namespace sending requests to the VIP.

The addresses are the configs' own (192.0.2.0/24 is a documentation range, and it lives only inside
the lab's namespaces). The namespace test needs root, `ip netns` and keepalived (CI has all three,
.ci/run installs keepalived); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from httpbackend import HttpBackend
from netns import Host, Lab, enter_netns, unavailable

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "keepalived"
NODE_LINES = ("router_id", "priority", "unicast_src_ip", "unicast_peer_address", "header")
PORT = 8080
FAILOVER_BOUND_S = 3.0  # the bound: the VIP moves in under 3 s


def shipped(node: str) -> str:
    return (DEPLOY / f"node-{node}.conf").read_text()


def _setting(conf: str, key: str) -> str:
    m = re.search(rf"^\s*{key}\s+(\S+)", conf, re.M)
    assert m, f"{key} not in the config"
    return m.group(1)


def _vip(conf: str) -> str:
    m = re.search(r"virtual_ipaddress\s*\{\s*(\S+)", conf)
    assert m, "no virtual_ipaddress"
    return m.group(1)


def _peer(conf: str) -> str:
    m = re.search(r"unicast_peer\s*\{\s*(\S+)", conf)
    assert m, "no unicast_peer"
    return m.group(1)


def _classify(line: str) -> str:
    """Which node-specific setting a line is, or the line itself."""
    if line.startswith("#") and re.search(r"node [AB]", line):
        return "header"
    for key in ("router_id", "priority", "unicast_src_ip"):
        if line.strip().startswith(key):
            return key
    if re.fullmatch(r"\s+[0-9a-f.:]+\s+# node [AB]: the other node's address", line):
        return "unicast_peer_address"
    return line


def test_the_node_configs_differ_only_in_their_node_lines() -> None:
    a, b = shipped("a").splitlines(), shipped("b").splitlines()
    assert len(a) == len(b)
    differing = {_classify(x) for x, y in zip(a, b, strict=True) if x != y}
    assert differing <= set(NODE_LINES), differing
    conf_a, conf_b = shipped("a"), shipped("b")
    assert _setting(conf_a, "unicast_src_ip") == _peer(conf_b)
    assert _setting(conf_b, "unicast_src_ip") == _peer(conf_a)
    assert int(_setting(conf_a, "priority")) != int(_setting(conf_b, "priority"))
    for conf in (conf_a, conf_b):
        assert _setting(conf, "state") == "BACKUP"
        assert re.search(r"^\s*nopreempt\s*$", conf, re.M)
        assert _setting(conf, "advert_int") == "1"
        assert "http://127.0.0.1:9901/healthz" in conf
        assert re.search(r"track_script\s*\{\s*fastlb_healthz\s*\}", conf)


# --- the namespace test ---------------------------------------------------------------------


def fastlb_config(backend_port: int) -> str:
    return f"""
[admin]
bind = "127.0.0.1:9901"
[[listeners]]
name = "web"
bind = "0.0.0.0:{PORT}"
protocol = "http"
pool = "app"
[[pools]]
name = "app"
backends = [{{ address = "127.0.0.1:{backend_port}" }}]
drain_timeout = "10s"
"""


def healthz() -> int:
    c = http.client.HTTPConnection("127.0.0.1", 9901, timeout=1)
    try:
        c.request("GET", "/healthz")
        return c.getresponse().status
    except OSError:
        return 0
    finally:
        c.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> float:
    """Polls `cond()` until true; returns the monotonic time it first held, else fails with `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return time.monotonic()
        time.sleep(step)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


@dataclass
class Node:
    """One load balancer: fastlb and keepalived in `host`, its backend named after the node."""

    name: str
    host: Host
    tmp: Path
    backend: HttpBackend
    fastlb: subprocess.Popen[bytes] | None = None
    keepalived: subprocess.Popen[bytes] | None = None

    def start_fastlb(self) -> None:
        config = self.tmp / f"fastlb-{self.name}.toml"
        config.write_text(fastlb_config(self.backend.port))
        cmd = [sys.executable, "-m", "fastlb", "serve", "-c", str(config)]
        self.fastlb = self.host.popen(cmd, self.tmp / f"fastlb-{self.name}.log")
        wait_for(lambda: self.host.call(healthz) == 200, 15, f"fastlb on {self.name} serving\n{self.logs()}")

    def start_keepalived(self) -> None:
        conf = self.tmp / f"keepalived-{self.name}.conf"
        conf.write_text(shipped(self.name))  # as shipped: the lab has the configs' interface and addresses
        run = self.tmp / f"keepalived-{self.name}"
        cmd = ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp"]
        cmd += ["-f", str(conf), "-p", f"{run}.pid", "-r", f"{run}-vrrp.pid"]
        self.keepalived = self.host.popen(cmd, self.tmp / f"keepalived-{self.name}.log")

    def keepalived_log(self) -> str:
        return (self.tmp / f"keepalived-{self.name}.log").read_text(errors="replace")

    def logs(self) -> str:
        parts = []
        for kind in ("fastlb", "keepalived"):
            path = self.tmp / f"{kind}-{self.name}.log"
            if path.exists():
                parts.append(f"--- {kind} on {self.name}:\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in (self.keepalived, self.fastlb):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@dataclass
class Attempt:
    start: float
    served_by: str  # the backend's name, which is its node's; "" when the request failed
    error: str = ""


class Client(threading.Thread):
    """Fresh connections to the VIP, one every 20 ms, from inside the client namespace."""

    def __init__(self, ns: str, vip: str) -> None:
        super().__init__(name="vip client", daemon=True)
        self.ns, self.vip = ns, vip
        self.attempts: list[Attempt] = []
        self.halt = threading.Event()

    def run(self) -> None:
        enter_netns(self.ns)
        while not self.halt.is_set():
            start = time.monotonic()
            c = http.client.HTTPConnection(self.vip, PORT, timeout=0.5)
            try:
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                served_by = r.getheader("X-Backend", "") if r.status == 200 else ""
                self.attempts.append(Attempt(start, served_by, str(r.status)))
            except OSError as err:
                self.attempts.append(Attempt(start, "", repr(err)))
            finally:
                c.close()
            time.sleep(0.02)

    def since(self, t: float) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.start >= t]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node, Client]]:
    """Nodes a and b serving (fastlb, keepalived), the client sending; all torn down after."""
    reason = unavailable("keepalived")
    if reason:
        pytest.skip(reason)
    conf = shipped("a")
    vip, dev = _vip(conf), _setting(conf, "interface")
    net = ipaddress.ip_interface(vip).network
    vip_address = str(ipaddress.ip_interface(vip).ip)
    addresses = {"a": _setting(conf, "unicast_src_ip"), "b": _setting(shipped("b"), "unicast_src_ip")}
    taken = {vip_address, *addresses.values()}
    client_address = next(str(h) for h in net.hosts() if str(h) not in taken)
    try:
        lab = Lab("fastlb-ha")
    except RuntimeError as err:
        pytest.skip(f"`ip netns` is unavailable: {err}")
    nodes: list[Node] = []
    client: Client | None = None
    try:
        for name, address in addresses.items():
            host = lab.host(name, address, net.prefixlen, dev)
            backend = host.call(HttpBackend, name)
            nodes.append(Node(name, host, tmp_path, backend))
        for node in nodes:
            node.start_fastlb()
        for node in nodes:
            node.start_keepalived()
        client_host = lab.host("client", client_address, net.prefixlen)
        client = Client(client_host.ns, vip_address)
        client.start()
        yield nodes[0], nodes[1], client
    finally:
        if client is not None:
            client.halt.set()
            client.join(5)
        for node in nodes:
            node.stop()
        lab.close()
        for node in nodes:
            node.backend.close()
        errors = [e for node in nodes for e in node.backend.errors]
        assert not errors, f"backend handler errors: {errors}"


def holder(nodes: tuple[Node, Node], vip: str) -> Node | None:
    """The node that holds the VIP, when exactly one does."""
    holding = [n for n in nodes if n.host.has_address(vip)]
    return holding[0] if len(holding) == 1 else None


def test_vip_moves_in_under_3s_when_fastlb_dies_or_stops_and_stays_when_it_recovers(
    pair: tuple[Node, Node, Client],
) -> None:
    a, b, client = pair
    nodes, vip = (a, b), client.vip
    logs = lambda: "\n".join(n.logs() for n in nodes)  # noqa: E731
    wait_for(lambda: holder(nodes, vip) is not None, 10, f"one node holds the VIP\n{logs()}")
    active = holder(nodes, vip)
    assert active is not None
    standby = b if active is a else a
    wait_for(lambda: sum(x.served_by == active.name for x in client.attempts) >= 5, 5, "the VIP serves")

    # 1. SIGKILL the active fastlb: /healthz stops answering, keepalived gives the VIP up.
    assert active.fastlb is not None
    killed = time.monotonic()
    active.fastlb.kill()
    moved = wait_for(lambda: holder(nodes, vip) is standby, 10, f"the VIP moves to {standby.name}\n{logs()}")
    assert moved - killed < FAILOVER_BOUND_S, f"the VIP took {moved - killed:.2f}s to move\n{logs()}"
    active.fastlb.wait()
    time.sleep(1.5)
    after = client.since(moved)
    assert len(after) >= 20, after
    assert all(x.served_by == standby.name for x in after), [x for x in after if x.served_by != standby.name]

    # 2. fastlb comes back on the old active: keepalived there turns BACKUP and, nopreempt, leaves the
    # VIP where it is although its priority is higher. A preempting node would ignore the holder's
    # lower-priority adverts and take the VIP once three had gone unheeded (3 x advert_int + skew,
    # about 3.4 s): watch for longer than that.
    log_mark = len(active.keepalived_log())
    active.start_fastlb()
    backup = wait_for(
        lambda: "Entering BACKUP STATE" in active.keepalived_log()[log_mark:], 10, f"{active.name} BACKUP"
    )
    time.sleep(4.5)
    assert holder(nodes, vip) is standby, f"the VIP went back to {active.name}\n{logs()}"
    during = client.since(backup)
    assert during and all(x.served_by == standby.name for x in during), during

    # 3. SIGTERM the new active's fastlb while it has a request in flight: it drains (the request on
    # its loopback finishes), /healthz answers 503 meanwhile, and the VIP moves back before it exits.
    slow: dict[str, int] = {}

    def slow_request() -> None:
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
        c.request("GET", "/sleep/4000")
        slow["status"] = c.getresponse().status
        c.close()

    in_flight = threading.Thread(target=lambda: standby.host.call(slow_request))
    in_flight.start()
    wait_for(lambda: any(r.path == "/sleep/4000" for r in standby.backend.received), 5, "in flight")
    assert standby.fastlb is not None
    stopped = time.monotonic()
    standby.fastlb.send_signal(signal.SIGTERM)
    back = wait_for(
        lambda: holder(nodes, vip) is active, 10, f"the VIP moves back to {active.name}\n{logs()}"
    )
    assert back - stopped < FAILOVER_BOUND_S, f"the VIP took {back - stopped:.2f}s to move\n{logs()}"
    assert standby.fastlb.poll() is None, "fastlb was still draining when the VIP moved: /healthz said 503"
    time.sleep(1.5)
    after = client.since(back)
    assert len(after) >= 20, after
    assert all(x.served_by == active.name for x in after), [x for x in after if x.served_by != active.name]
    in_flight.join(10)
    assert slow.get("status") == 200, "the in-flight request finished during the drain"
    assert standby.fastlb.wait(10) == 0
