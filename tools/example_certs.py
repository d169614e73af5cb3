"""Certificates (and a GeoIP database) for the example configs: the repo ships no keys and no
MaxMind DB, so `fastlb check` on an example that names such files runs on a copy beside a
throwaway certificate and key at each path its listeners name, and a small MaxMind DB where
`[geoip].database` says (used by the release check and the config tests)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import trustme


def config_with_certificates(text: str, folder: Path, name: str = "fastlb.toml") -> Path:
    """Writes the config `text` into `folder` as `name`, beside a certificate and key (issued by
    a fresh CA for *.example.com) at every path its listeners name; returns the file's path."""
    data = tomllib.loads(text)
    ca = trustme.CA()
    for listener in data.get("listeners", []):
        for pair in listener.get("tls", {}).get("certificates", []):
            leaf = ca.issue_cert("example.com", "*.example.com")
            chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
            for rel, blob in ((pair["cert"], chain), (pair["key"], leaf.private_key_pem.bytes())):
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(blob)
    if "geoip" in data:
        write_geoip_db(folder / data["geoip"]["database"])
    path = folder / name
    path.write_text(text)
    return path


def write_geoip_db(path: Path) -> None:
    """A MaxMind DB placing two documentation networks (DE and US), made with mmdb-writer."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "US"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.to_db_file(str(path))


def example_with_certificates(example: Path, folder: Path) -> Path:
    """`example` itself when it names no certificate nor GeoIP files, else a copy in `folder`
    with them."""
    text = example.read_text()
    data = tomllib.loads(text)
    listeners = data.get("listeners", [])
    if not any(x.get("tls", {}).get("certificates") for x in listeners) and "geoip" not in data:
        return example
    return config_with_certificates(text, folder, example.name)
