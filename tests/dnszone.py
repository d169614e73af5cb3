"""A DNS server for the discovery tests: dnslib over UDP and TCP on one 127.0.0.1 port, with
records the test changes as it goes and failures it turns on (SERVFAIL, truncated UDP
answers). Every query is recorded with the transport it came over."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSLabel, DNSRecord


class Zone:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[RR]] = {}
        self.servfail = False
        self.truncate_udp = False  # UDP answers come with TC set and no records
        self.silent = False  # no answer at all: the lookup times out
        self.queries: list[tuple[str, str, str]] = []  # (transport, name, type)
        self._lock = threading.Lock()
        while True:  # one port free for both transports
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket()
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.address = f"127.0.0.1:{self.port}"
        self._closed = False
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def set_addresses(self, name: str, ips: list[str], ttl: int = 1) -> None:
        with self._lock:
            for kind, cls, family in (("A", A, "."), ("AAAA", AAAA, ":")):
                rrs = [RR(name, QTYPE.reverse[kind], rdata=cls(ip), ttl=ttl) for ip in ips if family in ip]
                self.records[(name.rstrip(".").lower(), kind)] = rrs

    def set_srv(self, name: str, targets: list[tuple[int, int, int, str]], ttl: int = 1) -> None:
        """(priority, weight, port, target) records."""
        with self._lock:
            self.records[(name.rstrip(".").lower(), "SRV")] = [
                RR(name, QTYPE.SRV, rdata=SRV(priority, weight, port, DNSLabel(target)), ttl=ttl)
                for priority, weight, port, target in targets
            ]

    def count(self, transport: str) -> int:
        with self._lock:
            return sum(1 for t, _, _ in self.queries if t == transport)

    def _answer(self, data: bytes, transport: str) -> bytes:
        request = DNSRecord.parse(data)
        reply = request.reply()
        q = request.q
        name, kind = str(q.qname).rstrip(".").lower(), QTYPE[q.qtype]
        with self._lock:
            self.queries.append((transport, name, kind))
            if self.servfail:
                reply.header.rcode = RCODE.SERVFAIL
            elif self.truncate_udp and transport == "udp":
                reply.header.tc = 1
            elif not any(n == name for n, _ in self.records):
                reply.header.rcode = RCODE.NXDOMAIN
            else:
                for rr in self.records.get((name, kind), []):
                    reply.add_answer(rr)
        return bytes(reply.pack())

    def _serve_udp(self) -> None:
        while not self._closed:
            try:
                data, peer = self.udp.recvfrom(4096)
                if self.silent:
                    with self._lock:
                        self.queries.append(("udp", "", "unanswered"))
                    continue
                self.udp.sendto(self._answer(data, "udp"), peer)
            except OSError:
                return
            except Exception:  # a malformed query: ignored, as a server would
                continue

    def _serve_tcp(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while (head := conn.recv(2)) and len(head) == 2:
                (n,) = struct.unpack("!H", head)
                data = b""
                while len(data) < n and (chunk := conn.recv(n - len(data))):
                    data += chunk
                out = self._answer(data, "tcp")
                conn.sendall(struct.pack("!H", len(out)) + out)

    def close(self) -> None:
        self._closed = True
        self.udp.close()
        self.tcp.close()
