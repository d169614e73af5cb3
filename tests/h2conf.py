"""Config text and certificates for the HTTP/2 and gRPC tests.

Pools come from httputil.pool (health checks off unless asked, short connect timeout); listeners
here take the sub-tables HTTP/2 adds (`[listeners.http2]`) next to `[listeners.tls]` and routes.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trustme
from httputil import pool, toml_value

__all__ = ["Certs", "config", "listener", "pool"]


class Certs:
    """A CA and the certificates it issued, as files in the config's folder (paths in a config are
    relative to it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def issue(self, stem: str, *names: str) -> dict[str, str]:
        """`{cert, key}` for a listener's certificates list (or a backend's files)."""
        cert = self.ca.issue_cert(*names)
        (self.folder / f"{stem}.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.folder / f"{stem}.key"))
        return {"cert": f"{stem}.pem", "key": f"{stem}.key"}

    def key_and_chain(self, stem: str) -> tuple[bytes, bytes]:
        """(key PEM, chain PEM) of an issued certificate, as grpc.ssl_server_credentials wants them."""
        return (self.folder / f"{stem}.key").read_bytes(), (self.folder / f"{stem}.pem").read_bytes()

    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def server_context(self, stem: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.folder / f"{stem}.pem"), str(self.folder / f"{stem}.key"))
        return ctx


def listener(
    name: str,
    port: int,
    protocol: str = "http",
    pool: str = "app",
    *,
    tls: dict[str, Any] | None = None,
    http2: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | tuple[()] = (),
    **keys: Any,
) -> str:
    """A `[[listeners]]` table; `tls` and `http2` become its sub-tables, `routes` its routes."""
    lines = ["[[listeners]]", f"name = {toml_value(name)}", f'bind = "127.0.0.1:{port}"']
    lines += [f"protocol = {toml_value(protocol)}", f"pool = {toml_value(pool)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    for table, values in (("tls", tls), ("http2", http2)):
        if values is not None:
            lines.append(f"  [listeners.{table}]")
            lines += [f"  {k} = {toml_value(v)}" for k, v in values.items()]
    for r in routes:
        lines.append("  [[listeners.routes]]")
        lines += [f"  {k} = {toml_value(v)}" for k, v in r.items()]
    return "\n".join(lines) + "\n"


def config(*parts: str, admin: int | None = None, workers: int = 2, access_log: Path | None = None) -> str:
    """The whole file: runtime, admin (off unless a port), log, then the listeners and pools."""
    head = f'[runtime]\nworkers = {workers}\ncpu_affinity = "off"\n\n'
    head += f'[admin]\nbind = "{f"127.0.0.1:{admin}" if admin else "off"}"\n\n'
    if access_log is not None:
        head += f"[log]\naccess_log = {toml_value(str(access_log))}\n\n"
    return head + "\n".join(parts)
