"""Helpers for L4 tests: config text and clients."""

from __future__ import annotations

import socket
from collections.abc import Sequence


def l4_config(
    port: int,
    backends: Sequence[str],
    *,
    algorithm: str = "round_robin",
    weights: Sequence[int] | None = None,
    workers: int = 2,
    runtime: str = "",
    pool: str = "",
    bind_host: str = "127.0.0.1",
    admin: str = "off",
    drain_timeout: str = "2s",
) -> str:
    """A config with one tcp listener over one pool, health checks off."""
    weights = weights or [1] * len(backends)
    entries = ", ".join(
        f'{{ address = "{a}", weight = {w} }}' for a, w in zip(backends, weights, strict=True)
    )
    host = f"[{bind_host}]" if ":" in bind_host else bind_host
    return f"""
[runtime]
workers = {workers}
cpu_affinity = "off"
{runtime}

[admin]
bind = "{admin}"

[[listeners]]
name = "front"
bind = "{host}:{port}"
protocol = "tcp"
pool = "app"

[[pools]]
name = "app"
algorithm = "{algorithm}"
backends = [{entries}]
health = {{ type = "none" }}
drain_timeout = "{drain_timeout}"
{pool}
"""


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def ask_name(port: int, source_ip: str | None = None, host: str = "127.0.0.1") -> str:
    """Connects through the proxy and returns the name the backend sent before closing."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        if source_ip:
            s.bind((source_ip, 0))
        s.connect((host, port))
        return read_all(s).decode()
