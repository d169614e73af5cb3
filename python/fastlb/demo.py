"""`fastlb demo`: three loopback backends behind one HTTP listener, to try fastlb in a minute.

The backends are tiny HTTP/1.1 servers on this process's event loop that answer with their name,
so `curl` through the listener shows the routing: pool `stable` (backends 1 and 2) takes 90% of
requests and pool `canary` (backend 3) 10%; a request with `x-canary: 1` always goes to canary.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

from fastlb.config import ConfigError, parse_config
from fastlb.server import EXIT_USAGE, Server

log = logging.getLogger("fastlb")

POOLS = ("stable", "stable", "canary")  # the pool of backend 1, 2, 3


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _head_fields(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """(request line, lower-cased header name -> value) of a request head."""
    lines = head.split(b"\r\n")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


def _answer(name: str) -> Any:
    """A connection handler: HTTP/1.1 keep-alive (the proxy reuses upstream connections), every
    response with Content-Length; a request body is read and dropped, chunked ones close."""
    body = f"hello from {name}\n".encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, fields = _head_fields(head)
                words = request_line.split(b" ")
                method, version = words[0], words[-1]
                connection = fields.get(b"connection", b"").lower()
                close = b"close" in connection or (version == b"HTTP/1.0" and b"keep-alive" not in connection)
                if b"transfer-encoding" in fields:
                    close = True  # not worth decoding chunks here; answer, then close
                elif length := fields.get(b"content-length"):
                    await reader.readexactly(int(length))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (
                        len(body),
                        b"Connection: close\r\n" if close else b"",
                        b"" if method == b"HEAD" else body,
                    )
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    return handle


def demo_config(listen: str, backend_ports: list[int], admin: str = "off") -> dict[str, Any]:
    """An http listener: `x-canary: 1` -> canary; everything else 90% stable / 10% canary."""
    backends = [f"127.0.0.1:{p}" for p in backend_ports]
    return {
        "admin": {"bind": admin},
        "runtime": {"workers": 1, "cpu_affinity": "off"},
        "listeners": [
            {
                "name": "demo",
                "bind": listen,
                "protocol": "http",
                "pool": "stable",
                "routes": [
                    {"headers": {"x-canary": "1"}, "pool": "canary"},
                    {
                        "path_prefix": "/",
                        "split": [{"pool": "stable", "weight": 90}, {"pool": "canary", "weight": 10}],
                    },
                ],
            }
        ],
        "pools": [
            {
                "name": pool,
                "algorithm": "round_robin",
                "backends": [{"address": b} for b, p in zip(backends, POOLS, strict=True) if p == pool],
                "health": {"type": "http", "path": "/", "interval": "1s", "timeout": "500ms"},
                "passive": {"consecutive_failures": 5, "eject": "10s"},
                "slow_start": "10s",
                "drain_timeout": "1s",
            }
            for pool in ("stable", "canary")
        ],
    }


def run_demo(listen: str, admin: str = "127.0.0.1:9901") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fastlb %(levelname)s %(message)s")
    sockets = [_listening_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in sockets]
    try:
        config = parse_config(demo_config(listen, ports, admin))
    except ConfigError as err:
        for line in err.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE

    async def start_backends() -> None:
        for i, sock in enumerate(sockets):
            name = f"backend-{i + 1} ({POOLS[i]}, 127.0.0.1:{ports[i]})"
            await asyncio.start_server(_answer(name), sock=sock)
        url = f"http://{listen}/"
        print(
            f"\nfastlb demo: http listener {listen}\n"
            f"  pools:  stable = backend-1, backend-2; canary = backend-3\n"
            f"  routes: header x-canary: 1 -> canary; everything else 90% stable, 10% canary\n"
            f"  try:    curl -s {url}\n"
            f"          curl -s -H 'x-canary: 1' {url}\n"
            f"          for i in $(seq 50); do curl -s {url}; done | sort | uniq -c\n"
            + (
                f"  admin:  fastlb ctl --admin {admin} status\n"
                f"          fastlb ctl --admin {admin} drain stable 127.0.0.1:{ports[0]}\n"
                if admin != "off"
                else ""
            )
            + "  stop:   Ctrl-C\n",
            flush=True,
        )

    return Server(config, before=start_backends).run()
