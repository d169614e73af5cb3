"""`fastlb demo`: three loopback backends behind one listener, to try fastlb in a minute.

The backends are tiny HTTP servers on this process's event loop that answer with their name, so
`curl` through the listener shows the balancing. The listener is plain TCP (L4) for now.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

from fastlb.cli import EXIT_USAGE, serve_config
from fastlb.config import ConfigError, parse_config

log = logging.getLogger("fastlb")


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _answer(name: str) -> Any:
    body = f"hello from {name}\n".encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(body), b"Connection: close\r\n" if close else b"", body)
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


def demo_config(listen: str, backend_ports: list[int]) -> dict[str, Any]:
    return {
        "admin": {"bind": "off"},
        "runtime": {"workers": 1, "cpu_affinity": "off"},
        "listeners": [{"name": "demo", "bind": listen, "protocol": "tcp", "pool": "demo"}],
        "pools": [
            {
                "name": "demo",
                "algorithm": "round_robin",
                "backends": [{"address": f"127.0.0.1:{p}", "weight": 1} for p in backend_ports],
                "drain_timeout": "1s",
            }
        ],
    }


def run_demo(listen: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fastlb %(levelname)s %(message)s")
    sockets = [_listening_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in sockets]
    try:
        config = parse_config(demo_config(listen, ports))
    except ConfigError as err:
        for line in err.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE

    async def start_backends() -> None:
        for i, sock in enumerate(sockets):
            await asyncio.start_server(_answer(f"backend-{i + 1} (127.0.0.1:{ports[i]})"), sock=sock)
        print(
            f"\nfastlb demo: listener {listen} -> 3 backends (round robin, L4)\n"
            f"  try:   for i in 1 2 3 4 5 6; do curl -s http://{listen}/; done\n"
            f"  stop:  Ctrl-C\n",
            flush=True,
        )

    return serve_config(config, before=start_backends)
