"""Certificates for the example configs: the repo ships no keys, so `fastlb check` on an example
that names certificate files runs on a copy beside a throwaway certificate and key at each path
its listeners name (used by the release check and the config tests)."""

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
    path = folder / name
    path.write_text(text)
    return path


def example_with_certificates(example: Path, folder: Path) -> Path:
    """`example` itself when it names no certificate files, else a copy in `folder` with them."""
    text = example.read_text()
    listeners = tomllib.loads(text).get("listeners", [])
    if not any(x.get("tls", {}).get("certificates") for x in listeners):
        return example
    return config_with_certificates(text, folder, example.name)
