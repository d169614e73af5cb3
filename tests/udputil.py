"""Helpers for UDP tests: real DNS and echo backends on loopback, dnsmasq, a raw-socket sender of
spoofed datagrams, dnspython clients, and the config text of a udp listener.

Every backend has an identity a client can see: a DNS backend answers every A query with its own
address (10.0.0.N), so the answer says which backend a query reached; each backend also counts what
it received, so a test can tell what reached it and what did not.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from admin import api

HEALTH_NAME = "health.example."
ZONE = "example.test."
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def free_udp_port(also_tcp: bool = False) -> int:
    """A port free for UDP on 127.0.0.1 (and for TCP too when `also_tcp`: dnsmasq binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            if not also_tcp:
                return port
            try:
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port))
                    return port
            except OSError:
                continue


class UdpServer:
    """A UDP server on 127.0.0.1 whose `handle(data, peer)` returns the datagrams to send back."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind(("127.0.0.1", port))
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.received = 0  # datagrams, health checks included
        self.peers: Counter[tuple[str, int]] = Counter()  # source address -> datagrams
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def handle(self, data: bytes, peer: tuple[str, int]) -> list[bytes]:
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(1 << 16)
            except OSError:
                return
            if peer is None:  # shut down by close()
                return
            with self.lock:
                self.received += 1
                self.peers[peer] += 1
                self.sizes.append(len(data))
            try:
                replies = self.handle(data, peer)
            except Exception as exc:  # a bad datagram must not stop the server; the test sees it
                self.errors.append(repr(exc))
                continue
            for r in replies:
                with contextlib.suppress(OSError):  # the peer may be gone (ICMP on a later send)
                    self.sock.sendto(r, peer)

    def close(self) -> None:
        """Stops answering: the port is closed, so datagrams to it get ICMP port unreachable."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


class DnsBackend(UdpServer):
    """A small DNS server: every A query gets one A record, `ip` (the backend's identity).

    `mode`: "answer" | "silent" (counts, never answers) | an rcode name ("REFUSED", "SERVFAIL")
    to answer data queries with. `health_rcode` is the rcode for queries of HEALTH_NAME
    (None: answer them as data queries are answered). Queries are counted by name.
    """

    def __init__(self, name: str, ip: str, port: int = 0) -> None:
        self.ip = ip
        self.mode = "answer"
        self.health_rcode: str | None = None
        self.names: Counter[str] = Counter()
        super().__init__(name, port)

    @property
    def queries(self) -> int:
        """Data queries received (health checks not counted)."""
        with self.lock:
            return sum(n for q, n in self.names.items() if q != HEALTH_NAME)

    @property
    def health_queries(self) -> int:
        with self.lock:
            return self.names[HEALTH_NAME]

    def handle(self, data: bytes, peer: tuple[str, int]) -> list[bytes]:
        q = dns.message.from_wire(data)
        qname = q.question[0].name.to_text()
        with self.lock:
            self.names[qname] += 1
        mode = self.mode
        if qname == HEALTH_NAME and self.health_rcode is not None:
            mode = self.health_rcode
        if mode == "silent":
            return []
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if mode != "answer":
            r.set_rcode(dns.rcode.from_text(mode))
            return [r.to_wire()]
        if q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 0, "IN", "A", self.ip))
        return [r.to_wire()]


class EchoBackend(UdpServer):
    """Echoes each datagram back `int(data[0:1])` times when it starts with a digit, else once:
    b"2..." gets two copies, b"0..." none, so replies and requests can be counted apart."""

    def handle(self, data: bytes, peer: tuple[str, int]) -> list[bytes]:
        first = data[:1]
        copies = int(first) if first.isdigit() else 1
        return [data] * copies


class Dnsmasq:
    """Debian's dnsmasq as a DNS backend: answers ZONE (and subdomains) and HEALTH_NAME with `ip`."""

    def __init__(self, ip: str, tmp: Path) -> None:
        self.ip = ip
        self.name = "dnsmasq"
        self.port = free_udp_port(also_tcp=True)
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp / f"dnsmasq-{self.port}.log"
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                DNSMASQ,
                "--no-daemon",
                "--keep-in-foreground",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--pid-file",  # none: the default one in /run is the system's
                "--user=root",
                f"--address=/{ZONE.rstrip('.')}/{ip}",
                f"--address=/{HEALTH_NAME.rstrip('.')}/{ip}",
                "--dns-forward-max=1000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        end = time.monotonic() + 10
        while True:
            try:
                if query_a(self.port, f"probe.{ZONE}", timeout=0.5) == ip:
                    return
            except (dns.exception.Timeout, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise AssertionError(f"dnsmasq did not answer: {self.log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --- clients ----------------------------------------------------------------------------------


def query_a(
    port: int,
    name: str,
    *,
    source: str | None = None,
    sock: socket.socket | None = None,
    timeout: float = 2.0,
    host: str = "127.0.0.1",
) -> str:
    """One A query with dnspython (a new socket, from `source`, unless `sock` is given); returns the
    address answered. dnspython checks the reply came from the address it asked (the listener's)."""
    q = dns.message.make_query(name, "A")
    r = dns.query.udp(q, host, timeout=timeout, port=port, source=source, sock=sock)
    if r.rcode() != dns.rcode.NOERROR or not r.answer:
        raise AssertionError(f"{name}: {dns.rcode.to_text(r.rcode())}, answer {r.answer}")
    return str(r.answer[0][0].address)


def client_socket(source: str = "127.0.0.1") -> socket.socket:
    """An unconnected UDP socket on `source` with an ephemeral port: one flow for its lifetime."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    return s


# --- spoofed datagrams (root) -------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 datagram carrying a UDP datagram, both headers written here (with checksums)."""
    udp_len = 8 + len(payload)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + udp


class SpoofedSender:
    """Sends hand-made IPv4/UDP datagrams through a raw socket (IPPROTO_RAW implies IP_HDRINCL),
    so their source address and port are whatever the test says. Needs root (CAP_NET_RAW)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.sent = 0

    def flood(
        self,
        src: str,
        ports: Sequence[int],
        dst: str,
        dport: int,
        payload: bytes,
        burst: int = 100,
        pause: float = 0.01,
    ) -> None:
        """One datagram from each of `ports`, in bursts of `burst` with `pause` seconds between
        bursts (bounded: the test says how many and how fast)."""
        for i, sport in enumerate(ports):
            self.sock.sendto(ipv4_udp(src, sport, dst, dport, payload), (dst, 0))
            self.sent += 1
            if (i + 1) % burst == 0:
                time.sleep(pause)

    def close(self) -> None:
        self.sock.close()


def dns_query_wire(name: str, qid: int = 0x1234) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    return q.to_wire()


# --- config -----------------------------------------------------------------------------------


def udp_config(
    port: int,
    backends: Sequence[str],
    *,
    admin: int,
    algorithm: str = "round_robin",
    weights: Sequence[int] | None = None,
    workers: int = 2,
    session_idle: str | None = None,
    responses: int | None = None,
    per_packet: bool | None = None,
    max_sessions: int | None = None,
    health: str = '{ type = "none" }',
    pool: str = "",
    log: str = "",
    name: str = "dns",
    extra: str = "",
    drain_timeout: str = "2s",
    backups: Sequence[str] = (),
) -> str:
    """A config with one udp listener `name` on 127.0.0.1:`port` over one pool "dns"; the admin
    API on 127.0.0.1:`admin` (the tests read /api/status and /metrics there). Keys left None are
    not written, so the defaults apply. `backups` are backends with `backup = true`."""
    weights = weights or [1] * len(backends)
    entries = ", ".join(
        [f'{{ address = "{a}", weight = {w} }}' for a, w in zip(backends, weights, strict=True)]
        + [f'{{ address = "{a}", backup = true }}' for a in backups]
    )
    udp = []
    if responses is not None:
        udp.append(f"responses = {responses}")
    if per_packet is not None:
        udp.append(f"per_packet = {str(per_packet).lower()}")
    if max_sessions is not None:
        udp.append(f"max_sessions = {max_sessions}")
    lines = [f"udp = {{ {', '.join(udp)} }}"] if udp else []
    if session_idle is not None:
        lines.append(f'timeouts = {{ session_idle = "{session_idle}" }}')
    listener_extra = "\n".join(lines)
    return f"""
[runtime]
workers = {workers}
cpu_affinity = "off"

[admin]
bind = "127.0.0.1:{admin}"

[log]
{log}

[[listeners]]
name = "{name}"
bind = "127.0.0.1:{port}"
protocol = "udp"
pool = "dns"
{listener_extra}

[[pools]]
name = "dns"
algorithm = "{algorithm}"
backends = [{entries}]
health = {health}
drain_timeout = "{drain_timeout}"
{pool}
{extra}
"""


def dns_health(  # a check must miss two 500 ms answers in a row to fail: noisy machines are slow
    expect_rcode: Sequence[str] | None = ("NOERROR",),
    interval: str = "500ms",
    timeout: str = "500ms",
    rise: int = 1,
    fall: int = 2,
) -> str:
    expect = "" if expect_rcode is None else f", expect_rcode = {list(expect_rcode)!r}".replace("'", '"')
    return (
        f'{{ type = "dns", query = "{HEALTH_NAME}", query_type = "A"{expect}, '
        f'interval = "{interval}", timeout = "{timeout}", rise = {rise}, fall = {fall} }}'
    )


# --- admin API views --------------------------------------------------------------------------


def listener_udp(admin: int, listener: str = "dns") -> dict[str, Any]:
    """The `udp` object of a listener in /api/status (the engine's stats for it)."""
    status, body = api(admin, "GET", "/api/status")
    assert status == 200, body
    for item in body["listeners"]:
        if item["name"] == listener:
            return dict(item["udp"])
    raise AssertionError(f"listener {listener} not in /api/status: {body['listeners']}")


def listener_status(admin: int, listener: str = "dns") -> dict[str, Any]:
    status, body = api(admin, "GET", "/api/status")
    assert status == 200, body
    return dict(next(x for x in body["listeners"] if x["name"] == listener))


def sessions_active(admin: int, listener: str = "dns") -> int:
    return int(listener_udp(admin, listener)["sessions_active"])


def metric(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample; a missing one is an error that lists the samples of that name."""
    k = (name, tuple(sorted(labels.items())))
    if k not in metrics:
        have = [lab for n, lab in metrics if n == name]
        raise AssertionError(f"no {name}{labels}; have {have}")
    return metrics[k]


# --- a steady client --------------------------------------------------------------------------


@dataclass
class DnsStream:
    """A client sending one A query every `every` seconds until `stop()` (or `limit_s`), waiting
    for each answer (`timeout`) before the next: on one socket (one flow) when `one_flow`, else a
    new socket (a new source port) per query. Records (name, answer or the error)."""

    port: int
    one_flow: bool = True
    every: float = 0.02
    timeout: float = 2.0
    limit_s: float = 60.0
    source: str = "127.0.0.1"
    outcomes: list[tuple[str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> DnsStream:
        self._sock = client_socket(self.source) if self.one_flow else None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        end = time.monotonic() + self.limit_s
        n = 0
        while not self._stop.is_set() and time.monotonic() < end:
            name = f"s{n}.{ZONE}"
            n += 1
            try:
                if self._sock is not None:
                    got = query_a(self.port, name, sock=self._sock, timeout=self.timeout)
                else:
                    got = query_a(self.port, name, source=self.source, timeout=self.timeout)
            except Exception as exc:  # recorded: the test asserts there were none
                got = f"error: {exc!r}"
            self.outcomes.append((name, got))
            self._stop.wait(self.every)

    def stop(self) -> list[tuple[str, str]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._sock is not None:
            self._sock.close()
        return list(self.outcomes)

    def failures(self) -> list[tuple[str, str]]:
        return [o for o in self.outcomes if o[1].startswith("error")]


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
