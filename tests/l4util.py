"""Helpers for L4 tests: config text and clients."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from backends import Backend


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


def name_then_echo(conn: socket.socket, backend: Backend) -> None:
    """A backend handler: says its name on a line, then echoes until EOF."""
    conn.sendall(backend.name.encode() + b"\n")
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def tcp_connect(port: int) -> tuple[socket.socket, str]:
    """A connection through the proxy and the name of the `name_then_echo` backend it reached."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    name = b""
    while not name.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed before the backend said its name")
        name += chunk
    return s, name.decode().strip()
