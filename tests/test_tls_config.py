"""TLS configuration (python/fastlb/config.py and fastlb/certs.py): https and tls listeners, SNI
and redirect routes, [pools.tls], the certificate files read at load, and the engine JSON.

Certificates are made here, at test time (trustme, or cryptography for the odd ones); no key is
ever committed. The data plane's side of TLS is tested where it lives; these tests read
`to_engine()` as a dict and start the engine only with plain tcp/http listeners.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from fastlb.cli import main as cli_main
from fastlb.config import Config, ConfigError, load_config, parse_config

from backends import says_name
from conftest import free_port
from l4util import ask_name, l4_config

PEM = serialization.Encoding.PEM


# --- certificate files ---------------------------------------------------------------------------


def self_signed(
    names: tuple[str, ...] = ("example.com",),
    *,
    valid: tuple[int, int] = (-1, 30),
    key: CertificateIssuerPrivateKeyTypes | None = None,
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a self-signed certificate with these DNS names (none: no
    subjectAltName at all), valid from `valid[0]` to `valid[1]` days from now."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "example.com")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=valid[0]))
        .not_valid_after(now + timedelta(days=valid[1]))
    )
    if names:
        san = x509.SubjectAlternativeName([x509.DNSName(n) for n in names])
        builder = builder.add_extension(san, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(key, algorithm)
    key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(PEM), key_pem


class Folder:
    """A config folder: `put("certs/a.pem", data)` writes a file and returns its relative path."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.root, self.ca = root, ca

    def put(self, rel: str, data: bytes | str) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return rel

    def leaf(self, name: str, *hosts: str) -> dict[str, str]:
        """`{cert, key}` for a certificate of the test CA, written as certs/NAME.pem and .key."""
        cert = self.ca.issue_cert(*hosts)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return {
            "cert": self.put(f"certs/{name}.pem", chain),
            "key": self.put(f"certs/{name}.key", cert.private_key_pem.bytes()),
        }

    def pair(self, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, str]:
        return {
            "cert": self.put(f"certs/{name}.pem", cert_pem),
            "key": self.put(f"certs/{name}.key", key_pem),
        }

    def ca_file(self, name: str = "ca", ca: trustme.CA | None = None) -> str:
        return self.put(f"certs/{name}.pem", (ca or self.ca).cert_pem.bytes())

    def text(self, rel: str) -> str:
        return (self.root / rel).read_text()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def folder(tmp_path: Path, ca: trustme.CA) -> Folder:
    return Folder(tmp_path, ca)


def config(*listeners: dict[str, Any], pools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Listeners on 127.0.0.1:8443, :8444, ... over pool "app" (and any `pools`)."""
    named = [
        {"name": f"l{i}", "bind": f"127.0.0.1:{8443 + i}", "pool": "app", **x}
        for i, x in enumerate(listeners)
    ]
    app = {"name": "app", "backends": [{"address": "127.0.0.1:9001"}]}
    return {"admin": {"bind": "off"}, "listeners": named, "pools": [app, *(pools or [])]}


def https(*certificates: dict[str, str], **tls: Any) -> dict[str, Any]:
    return {"protocol": "https", "tls": {"certificates": list(certificates), **tls}}


def errors_of(data: dict[str, Any], base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base)
    assert all("\n" not in e for e in info.value.errors)
    return list(info.value.errors)


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fastlb check -c PATH` in this process: (exit code, stdout, stderr)."""
    code = cli_main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def write_toml(folder: Folder, data: dict[str, Any]) -> Path:
    """The config as a TOML file in the folder (inline tables; enough for these configs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"

    lines = [f"{k} = {value(v)}" for k, v in data.items()]
    path = folder.root / "fastlb.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- valid configs and their engine JSON --------------------------------------------------------


def test_https_listener_engine_json(folder: Folder) -> None:
    """Two certificates (the first is the default), mTLS; every PEM goes as the file's text."""
    main = folder.pair("main", *self_signed(("Example.COM.", "*.example.com", "example.com")))
    other = folder.leaf("other", "other.org", "127.0.0.1")
    data = config(
        https(main, other, client_ca=folder.ca_file("clients"), client_auth="required", min_version="1.3")
    )
    cfg = parse_config(data, folder.root)
    assert cfg.warnings == []
    listener = cfg.to_engine()["listeners"][0]
    assert listener["protocol"] == "https"
    assert listener["tls"] == {
        "certificates": [
            {
                "cert": "certs/main.pem",
                "chain_pem": folder.text("certs/main.pem"),
                "key_pem": folder.text("certs/main.key"),
                "names": ["example.com", "*.example.com"],
            },
            {
                "cert": "certs/other.pem",
                "chain_pem": folder.text("certs/other.pem"),
                "key_pem": folder.text("certs/other.key"),
                "names": ["other.org"],  # IP addresses are not DNS names
            },
        ],
        "min_version": "1.3",
        "alpn": ["h2", "http/1.1"],
        "client_ca_pem": folder.text("certs/clients.pem"),
        "client_auth": "required",
        "session_tickets": True,
    }
    # https is http over TLS: the http defaults apply
    assert listener["client_idle_ms"] == 60_000 and listener["header_read_ms"] == 10_000


def test_tls_listener_for_a_database(folder: Folder) -> None:
    """tls: terminated here, bytes to the pool; no ALPN by default, tcp's idle default."""
    db = folder.leaf("db", "db.example.com")
    data = config({"protocol": "tls", "tls": {"certificates": [db], "session_tickets": False}})
    listener = parse_config(data, folder.root).to_engine()["listeners"][0]
    assert listener["protocol"] == "tls" and listener["client_idle_ms"] == 600_000
    tls = listener["tls"]
    assert tls["alpn"] == [] and tls["session_tickets"] is False and tls["client_auth"] == "off"
    assert tls["client_ca_pem"] is None and tls["min_version"] == "1.2"
    assert [c["names"] for c in tls["certificates"]] == [["db.example.com"]]
    assert listener["routes"] == []


def test_alpn_as_configured(folder: Folder) -> None:
    leaf = folder.leaf("a", "a.example")
    data = config(
        https(leaf, alpn=["http/1.1"]), {"protocol": "tls", "tls": {"certificates": [leaf], "alpn": ["pg"]}}
    )
    https_l, tls_l = parse_config(data, folder.root).to_engine()["listeners"]
    assert https_l["tls"]["alpn"] == ["http/1.1"] and tls_l["tls"]["alpn"] == ["pg"]


def test_plain_listeners_and_pools_carry_null_tls(folder: Folder) -> None:
    data = config({"protocol": "http", "routes": [{"path_prefix": "/x", "pool": "app"}]}, {"protocol": "tcp"})
    engine = parse_config(data, folder.root).to_engine()
    assert [x["tls"] for x in engine["listeners"]] == [None, None]
    assert engine["listeners"][0]["routes"][0]["sni"] is None
    assert engine["listeners"][0]["routes"][0]["redirect"] is None
    assert engine["pools"][0]["tls"] is None


def test_sni_routes_on_a_tcp_listener(folder: Folder) -> None:
    """Passthrough: the tcp listener reads the SNI and picks the pool; nothing is decrypted."""
    other = {"name": "other", "backends": [{"address": "127.0.0.1:9002"}]}
    routes = [{"sni": "*.Example.com", "pool": "other"}, {"sni": "db.internal.", "pool": "app"}]
    data = config({"protocol": "tcp", "routes": routes}, pools=[other])
    listener = parse_config(data, folder.root).to_engine()["listeners"][0]
    assert listener["tls"] is None
    assert listener["routes"] == [
        {
            "name": str(k),
            "host": None,
            "path_prefix": None,
            "path_exact": None,
            "path_regex": None,
            "headers": {},
            "cookies": {},
            "query": {},
            "source_cidr": [],
            "country": [],
            "request_headers": {"set": [], "add": [], "remove": []},
            "response_headers": {"set": [], "add": [], "remove": []},
            "rewrite_prefix": None,
            "sni": sni,
            "redirect": None,
            "split": [{"pool": pool, "weight": 1}],
            "split_affinity": None,
        }
        for k, (sni, pool) in enumerate((("*.example.com", "other"), ("db.internal", "app")))
    ]


def test_redirect_routes(folder: Folder) -> None:
    """The companion http listener: everything to https; an https listener moves a path."""
    leaf = folder.leaf("www", "www.example.com")
    data = config(
        {"protocol": "http", "routes": [{"redirect": {"scheme": "https"}}]},
        https(leaf)
        | {
            "routes": [
                {"path_prefix": "/old/", "redirect": {"path": "/new/", "code": 308}},
                {"host": "example.com", "redirect": {"host": "www.example.com:8443", "code": 302}},
            ]
        },
    )
    http_l, https_l = parse_config(data, folder.root).to_engine()["listeners"]
    assert http_l["routes"][0]["redirect"] == {"scheme": "https", "code": 301, "host": None, "path": None}
    assert http_l["routes"][0]["split"] == []
    first, second = https_l["routes"]
    assert first["redirect"] == {"scheme": None, "code": 308, "host": None, "path": "/new/"}
    assert first["path_prefix"] == "/old/" and first["split"] == []
    assert second["redirect"] == {"scheme": None, "code": 302, "host": "www.example.com:8443", "path": None}


def test_pool_tls_engine_json(folder: Folder) -> None:
    """Re-encryption: CA, SNI and a client certificate (which needs no DNS names)."""
    client = folder.pair("lb", *self_signed(()))
    pools = [
        {
            "name": "secure",
            "backends": [{"address": "127.0.0.1:9443"}],
            "tls": {"ca": folder.ca_file(), "sni": "Backend.Internal", **client},
        },
        {"name": "lax", "backends": [{"address": "127.0.0.1:9444"}], "tls": {"verify": False}},
        {"name": "contract", "backends": [{"address": "127.0.0.1:9445"}], "tls": {"verify": "none"}},
        {
            "name": "roots",
            "backends": [{"address": "127.0.0.1:9446"}],
            "tls": {},
            "health": {"type": "https"},
        },
    ]
    cfg = parse_config(config({"protocol": "http"}, pools=pools), folder.root)
    assert cfg.warnings == []
    _, secure, lax, contract, roots = cfg.to_engine()["pools"]
    assert secure["tls"] == {
        "verify": True,
        "ca_pem": folder.text("certs/ca.pem"),
        "sni": "backend.internal",
        "cert_pem": folder.text("certs/lb.pem"),
        "key_pem": folder.text("certs/lb.key"),
    }
    nothing = {"ca_pem": None, "sni": None, "cert_pem": None, "key_pem": None}
    assert lax["tls"] == contract["tls"] == {"verify": False, **nothing}
    assert roots["tls"] == {"verify": True, **nothing}


def test_https_health_with_and_without_pool_tls(folder: Folder) -> None:
    health = {"type": "https", "path": "/health", "expect_status": [200], "host": "app.internal"}
    pools = [{"name": "plain", "backends": [{"address": "127.0.0.1:9002"}], "health": health}]
    pools.append(
        {
            "name": "tls",
            "backends": [{"address": "127.0.0.1:9003"}],
            "health": health,
            "tls": {"verify": False},
        }
    )
    cfg = parse_config(config({"protocol": "http"}, pools=pools), folder.root)
    assert [p.health.type for p in cfg.pools] == ["tcp", "https", "https"]


def test_https_listener_accepts_everything_http_does(folder: Folder) -> None:
    leaf = folder.leaf("a", "a.example")
    listener = https(leaf) | {
        "rate_limit": {"requests_per_second": 10},
        "max_headers": 50,
        "max_header_bytes": 8192,
        "timeouts": {"header_read": "5s"},
        "routes": [{"host": "a.example", "split": [{"pool": "app", "weight": 1}]}],
    }
    pools = [
        {
            "name": "sticky",
            "backends": [{"address": "127.0.0.1:9002"}],
            "affinity": {"cookie": "S"},
            "keepalive": 0,
        }
    ]
    listener["routes"].append({"path_prefix": "/s/", "pool": "sticky"})
    engine = parse_config(config(listener, pools=pools), folder.root).to_engine()
    out = engine["listeners"][0]
    assert out["rate_limit"] == {"requests_per_second": 10.0, "burst": 10}
    assert (out["max_headers"], out["max_header_bytes"], out["header_read_ms"]) == (50, 8192, 5000)


# --- relative paths -------------------------------------------------------------------------------


def test_paths_are_relative_to_the_config_folder(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = Folder(tmp_path / "etc" / "fastlb", ca)
    leaf = conf.leaf("site", "site.example")
    path = write_toml(conf, config(https(leaf)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.to_engine()["listeners"][0]["tls"]["certificates"][0]["chain_pem"] == conf.text(
        "certs/site.pem"
    )
    # the same through a relative path to the config file
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("etc/fastlb/fastlb.toml")) == cfg
    # parse_config: relative to base_dir, else to the current directory
    assert parse_config(config(https(leaf)), conf.root) == cfg
    errors = errors_of(config(https(leaf)), Path.cwd())
    assert (
        errors[0]
        == "listeners[0].tls.certificates[0].cert: cannot read certs/site.pem: No such file or directory"
    )
    monkeypatch.chdir(conf.root)
    assert parse_config(config(https(leaf))) == cfg
    # an absolute path is used as it is
    absolute = {"cert": str(conf.root / leaf["cert"]), "key": str(conf.root / leaf["key"])}
    assert (
        parse_config(config(https(absolute)), elsewhere).to_engine()["listeners"][0]["tls"]["certificates"][
            0
        ]["cert"]
        == absolute["cert"]
    )


# --- what is refused: files ---------------------------------------------------------------------


def _missing(folder: Folder) -> dict[str, Any]:
    return config(https(folder.leaf("a", "a.example"), {"cert": "certs/x.pem", "key": "certs/a.key"}))


def _garbage_cert(folder: Folder) -> dict[str, Any]:
    return config(
        https({"cert": folder.put("certs/junk.pem", "hello\n"), "key": folder.leaf("a", "a.example")["key"]})
    )


def _der_cert(folder: Folder) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate(folder.ca.cert_pem.bytes()).public_bytes(serialization.Encoding.DER)
    return config(
        https({"cert": folder.put("certs/a.der", cert), "key": folder.leaf("a", "a.example")["key"]})
    )


def _garbage_key(folder: Folder) -> dict[str, Any]:
    return config(
        https({"cert": folder.leaf("a", "a.example")["cert"], "key": folder.put("certs/junk.key", "hello\n")})
    )


def _broken_key(folder: Folder) -> dict[str, Any]:
    bad = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    return config(
        https({"cert": folder.leaf("a", "a.example")["cert"], "key": folder.put("certs/bad.key", bad)})
    )


def _mismatch(folder: Folder) -> dict[str, Any]:
    a, b = folder.leaf("a", "a.example"), folder.leaf("b", "b.example")
    return config(https(a, {"cert": a["cert"], "key": b["key"]}))


def _leaf_not_first(folder: Folder) -> dict[str, Any]:
    cert, key = self_signed(("a.example",))
    other, _ = self_signed(("b.example",))
    return config(
        https({"cert": folder.put("certs/chain.pem", other + cert), "key": folder.put("certs/a.key", key)})
    )


def _no_dns_names(folder: Folder) -> dict[str, Any]:
    return config(https(folder.pair("cn", *self_signed(()))))


def _ip_only(folder: Folder) -> dict[str, Any]:
    return config(https(folder.leaf("ip", "127.0.0.1")))


def _encrypted_key(folder: Folder) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = self_signed(key=key)
    enc = key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    return config(https(folder.pair("enc", cert, enc)))


def _weak_rsa_key(folder: Folder) -> dict[str, Any]:
    return config(https(folder.pair("weak", *self_signed(key=rsa.generate_private_key(65537, 1024)))))


def _empty_client_ca(folder: Folder) -> dict[str, Any]:
    leaf = folder.leaf("a", "a.example")
    return config(https(leaf, client_ca=folder.put("certs/clients.pem", ""), client_auth="optional"))


def _unreadable_pool_ca(folder: Folder) -> dict[str, Any]:
    (folder.root / "certs").mkdir(exist_ok=True)
    pool = {"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": {"ca": "certs"}}
    return config({"protocol": "http"}, pools=[pool])


def _pool_key_mismatch(folder: Folder) -> dict[str, Any]:
    cert, _ = self_signed(())
    _, key = self_signed(())
    pool = {"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": folder.pair("lb", cert, key)}
    return config({"protocol": "http"}, pools=[pool])


def _pool_cert_without_key(folder: Folder) -> dict[str, Any]:
    pool = {
        "name": "b",
        "backends": [{"address": "127.0.0.1:9002"}],
        "tls": {"cert": folder.leaf("lb", "lb")["cert"]},
    }
    return config({"protocol": "http"}, pools=[pool])


FILE_ERRORS = {
    "missing file": (
        _missing,
        "listeners[0].tls.certificates[1].cert: cannot read certs/x.pem: No such file or directory",
    ),
    "not a certificate": (
        _garbage_cert,
        "listeners[0].tls.certificates[0].cert: no PEM certificate in certs/junk.pem",
    ),
    "DER": (_der_cert, "listeners[0].tls.certificates[0].cert: certs/a.der is not a PEM file"),
    "not a key": (_garbage_key, "listeners[0].tls.certificates[0].key: no PEM private key in certs/junk.key"),
    "broken key": (
        _broken_key,
        "listeners[0].tls.certificates[0].key: the private key in certs/bad.key does not parse",
    ),
    "key of another certificate": (
        _mismatch,
        "listeners[0].tls.certificates[1].key: certs/b.key does not match the certificate in certs/a.pem",
    ),
    "leaf not first": (_leaf_not_first, "the leaf must come first"),
    "no DNS names": (
        _no_dns_names,
        "listeners[0].tls.certificates[0].cert: the certificate in certs/cn.pem has no DNS names",
    ),
    "IP address only": (
        _ip_only,
        "listeners[0].tls.certificates[0].cert: the certificate in certs/ip.pem has no DNS names",
    ),
    "encrypted key": (_encrypted_key, "listeners[0].tls.certificates[0].key: certs/enc.key is encrypted"),
    "weak RSA key": (
        _weak_rsa_key,
        "listeners[0].tls.certificates[0].key: certs/weak.key holds an RSA key of 1024 bits",
    ),
    "empty client CA": (
        _empty_client_ca,
        "listeners[0].tls.client_ca: no PEM certificate in certs/clients.pem",
    ),
    "pool CA is a folder": (_unreadable_pool_ca, "pools[1].tls.ca: cannot read certs: Is a directory"),
    "pool client key": (
        _pool_key_mismatch,
        "pools[1].tls.key: certs/lb.key does not match the certificate in certs/lb.pem",
    ),
    "pool cert without key": (_pool_cert_without_key, "pools[1].tls.key: required with cert"),
}


@pytest.mark.parametrize("case", FILE_ERRORS, ids=list(FILE_ERRORS))
def test_bad_files_are_errors_naming_the_field(
    case: str, folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = FILE_ERRORS[case]
    data = make(folder)
    errors = errors_of(data, folder.root)
    assert any(expected in e for e in errors), errors
    code, out, err = check(write_toml(folder, data), capsys)
    assert (code, out) == (2, "") and expected in err, err


def test_check_exits_2_with_the_error_line(folder: Folder) -> None:
    """The real command, once: `fastlb check -c FILE` exits 2 and prints the one line."""
    path = write_toml(folder, _missing(folder))
    proc = subprocess.run(
        [sys.executable, "-m", "fastlb", "check", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "listeners[0].tls.certificates[1].cert: cannot read certs/x.pem: No such file or directory"
    ]


def test_every_bad_file_is_reported_at_once(folder: Folder) -> None:
    """Field errors and file errors together, each file once, in config order."""
    data = config(
        https({"cert": "certs/x.pem", "key": "certs/y.key"}),
        {"protocol": "http", "tls": {"certificates": [{"cert": "c", "key": "k"}]}},
    )
    assert errors_of(data, folder.root) == [
        'listeners[1].tls: only for protocol = "https" or "tls"',
        "listeners[0].tls.certificates[0].cert: cannot read certs/x.pem: No such file or directory",
        "listeners[0].tls.certificates[0].key: cannot read certs/y.key: No such file or directory",
        "listeners[1].tls.certificates[0].cert: cannot read c: No such file or directory",
        "listeners[1].tls.certificates[0].key: cannot read k: No such file or directory",
    ]


# --- what is accepted with a warning --------------------------------------------------------------


def test_expired_certificate_is_a_warning(folder: Folder, capsys: pytest.CaptureFixture[str]) -> None:
    old = folder.pair("old", *self_signed(("old.example",), valid=(-30, -1)))
    future = folder.pair("future", *self_signed(("future.example",), valid=(2, 30)))
    path = write_toml(folder, config(https(old, future)))
    cfg = load_config(path)
    [expired, early] = cfg.warnings
    assert expired.startswith(
        "listeners[0].tls.certificates[0].cert: the certificate in certs/old.pem expired on "
    )
    assert early.startswith(
        "listeners[0].tls.certificates[1].cert: the certificate in certs/future.pem is not valid before "
    )
    assert expired.endswith(" UTC")
    code, out, err = check(path, capsys)
    assert (code, out) == (0, "ok\n")
    assert err.splitlines() == [f"warning: {expired}", f"warning: {early}"]
    # the certificate still goes to the engine
    assert len(cfg.to_engine()["listeners"][0]["tls"]["certificates"]) == 2


def test_unused_ca_files_are_warnings(folder: Folder) -> None:
    leaf = folder.leaf("a", "a.example")
    pool = {
        "name": "b",
        "backends": [{"address": "127.0.0.1:9002"}],
        "tls": {"verify": False, "ca": folder.ca_file()},
    }
    cfg = parse_config(config(https(leaf, client_ca=folder.ca_file("clients")), pools=[pool]), folder.root)
    assert cfg.warnings == [
        'listeners[0].tls.client_ca: not used with client_auth = "off"'
        " (clients are not asked for a certificate)",
        "pools[1].tls.ca: not used with verify = false",
    ]


def test_warnings_are_logged_at_serve(backends: Any, fastlb: Any, folder: Folder) -> None:
    """`fastlb serve` logs the warnings at start (a plain listener: the pool's CA is unused)."""
    a = backends(says_name, "a")
    port = free_port()
    ca_path = folder.root / folder.ca_file()
    text = l4_config(port, [a.address]) + f'\n  [pools.tls]\n  verify = false\n  ca = "{ca_path}"\n'
    p = fastlb(text, port)
    code, err = p.stop()
    assert code == 0, err
    assert "config: pools[0].tls.ca: not used with verify = false" in err


# --- what is refused: keys per protocol -------------------------------------------------------------


def refusals(folder: Folder) -> list[tuple[dict[str, Any], str]]:
    leaf = folder.leaf("a", "a.example")
    tls = {"certificates": [leaf]}
    tls_listener = {"protocol": "tls", "tls": tls}
    return [
        (config({"protocol": "https"}), 'listeners[0].tls: required for protocol = "https"'),
        (config({"protocol": "tls"}), 'listeners[0].tls: required for protocol = "tls"'),
        (config({"protocol": "http", "tls": tls}), 'listeners[0].tls: only for protocol = "https" or "tls"'),
        (config({"protocol": "tcp", "tls": tls}), 'listeners[0].tls: only for protocol = "https" or "tls"'),
        (config({"protocol": "udp", "tls": tls}), 'listeners[0].tls: only for protocol = "https" or "tls"'),
        (
            config({"protocol": "https", "tls": {"certificates": []}}),
            "listeners[0].tls.certificates: must not be empty",
        ),
        (
            config(https(leaf, client_auth="required")),
            'listeners[0].tls.client_auth: "required" needs client_ca',
        ),
        (
            config(https(leaf, client_auth="optional")),
            'listeners[0].tls.client_auth: "optional" needs client_ca',
        ),
        (
            config(https(leaf, client_auth="on")),
            'listeners[0].tls.client_auth: must be "off", "optional" or "required"',
        ),
        (config(https(leaf, min_version="1.1")), 'listeners[0].tls.min_version: must be "1.2" or "1.3"'),
        (
            config(https(leaf, alpn=["spdy/3"])),
            'listeners[0].tls.alpn[0]: an https listener speaks "h2" and "http/1.1" only',
        ),
        (config(https(leaf, alpn=["h2", "h2"])), 'listeners[0].tls.alpn[1]: "h2" listed twice'),
        (config(https(leaf, alpn=[""])), "listeners[0].tls.alpn[0]: must be a protocol name"),
        (
            config(https(leaf, session_tickets="yes")),
            "listeners[0].tls.session_tickets: must be true or false",
        ),
        (config(https(leaf, ciphers="x")), "listeners[0].tls.ciphers: unknown key"),
        (config(https({"cert": "a.pem"})), "listeners[0].tls.certificates[0].key: required"),
        (
            config(tls_listener | {"rate_limit": {"requests_per_second": 1}}),
            'listeners[0].rate_limit: only for protocol = "http" or "https"',
        ),
        (
            config(tls_listener | {"max_headers": 10}),
            'listeners[0].max_headers: only for protocol = "http" or "https"',
        ),
        (
            config(tls_listener | {"timeouts": {"header_read": "1s"}}),
            'listeners[0].timeouts.header_read: only for protocol = "http" or "https"',
        ),
        (
            config(tls_listener | {"routes": [{"sni": "a.example", "pool": "app"}]}),
            'listeners[0].routes: not for protocol = "tls"',
        ),
        (
            config(tls_listener, pools=[])
            | {
                "pools": [
                    {"name": "app", "backends": [{"address": "127.0.0.1:9001"}], "affinity": {"cookie": "S"}}
                ]
            },
            "pools[0].affinity: http only, but tls listener 'l0' uses this pool",
        ),
        # routes on tcp listeners: sni and pool, nothing else
        (
            config({"protocol": "tcp", "routes": [{"pool": "app"}]}),
            "listeners[0].routes[0].sni: required on a tcp listener",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "a.example", "host": "a.example", "pool": "app"}]}),
            "listeners[0].routes[0].host: not on a tcp listener",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "a.example", "split": [{"pool": "app"}]}]}),
            "listeners[0].routes[0].split: not on a tcp listener",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "a.example", "redirect": {"scheme": "https"}}]}),
            "listeners[0].routes[0].redirect: not on a tcp listener",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "a.example"}]}),
            "listeners[0].routes[0].pool: required",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "a.example", "pool": "nope"}]}),
            "listeners[0].routes[0].pool: unknown pool 'nope'",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "10.0.0.1", "pool": "app"}]}),
            "listeners[0].routes[0].sni: must be a host name",
        ),
        (
            config({"protocol": "tcp", "routes": [{"sni": "a..b", "pool": "app"}]}),
            "listeners[0].routes[0].sni: must be a host name",
        ),
        (
            config(
                {"protocol": "tcp", "routes": [{"sni": "a.example", "pool": "sticky"}]},
                pools=[{"name": "sticky", "backends": [{"address": "127.0.0.1:9002"}], "keepalive": 0}],
            ),
            "pools[1].keepalive: http only, but tcp listener 'l0' uses this pool",
        ),
        (
            config({"protocol": "http", "routes": [{"sni": "a.example", "pool": "app"}]}),
            'listeners[0].routes[0].sni: only on protocol = "tcp" listeners',
        ),
        (
            config(https(leaf) | {"routes": [{"sni": "a.example", "pool": "app"}]}),
            'listeners[0].routes[0].sni: only on protocol = "tcp" listeners',
        ),
        # redirects: http/https only, no pool, something to change, not to itself
        (
            config({"protocol": "http", "routes": [{"redirect": {"scheme": "https"}, "pool": "app"}]}),
            "listeners[0].routes[0].pool: a redirect route has no pool",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"host": "b"}, "split": [{"pool": "app"}]}]}),
            "listeners[0].routes[0].split: a redirect route has no split",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"code": 302}}]}),
            "listeners[0].routes[0].redirect: give at least one of scheme, host, path",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"scheme": "http"}}]}),
            'listeners[0].routes[0].redirect.scheme: "http" on an http listener redirects to itself',
        ),
        (
            config(https(leaf) | {"routes": [{"redirect": {"scheme": "https"}}]}),
            'listeners[0].routes[0].redirect.scheme: "https" on an https listener redirects to itself',
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"scheme": "ftp"}}]}),
            'listeners[0].routes[0].redirect.scheme: must be "http" or "https"',
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"scheme": "https", "code": 300}}]}),
            "listeners[0].routes[0].redirect.code: must be 301, 302, 303, 307 or 308",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"path": "new"}}]}),
            'listeners[0].routes[0].redirect.path: must start with "/"',
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"path": "/a b"}}]}),
            "listeners[0].routes[0].redirect.path: must be printable ASCII",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"host": "a\r\nSet-Cookie: x"}}]}),
            "listeners[0].routes[0].redirect.host: must be printable ASCII",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"host": "a/b"}}]}),
            "listeners[0].routes[0].redirect.host: must be a host name or address",
        ),
        (
            config({"protocol": "http", "routes": [{"redirect": {"scheme": "https", "status": 301}}]}),
            "listeners[0].routes[0].redirect.status: unknown key",
        ),
        # pools.tls
        (
            config(
                {"protocol": "http"},
                pools=[{"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": {"sni": "*.x"}}],
            ),
            "pools[1].tls.sni: must be a host name",
        ),
        (
            config(
                {"protocol": "http"},
                pools=[
                    {"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": {"sni": "10.1.1.1"}}
                ],
            ),
            "pools[1].tls.sni: must be a host name (never an IP address)",
        ),
        (
            config(
                {"protocol": "http"},
                pools=[{"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": {"verify": "yes"}}],
            ),
            'pools[1].tls.verify: must be true or false ("required" or "none" also work)',
        ),
        (
            config(
                {"protocol": "http"},
                pools=[{"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": {"key": "k.pem"}}],
            ),
            "pools[1].tls.cert: required with key",
        ),
        (
            config(
                {"protocol": "http"},
                pools=[{"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "tls": {"ca": ""}}],
            ),
            "pools[1].tls.ca: must not be empty",
        ),
        # health: the http keys apply to https, not to tcp
        (
            config(
                {"protocol": "http"},
                pools=[
                    {
                        "name": "b",
                        "backends": [{"address": "127.0.0.1:9002"}],
                        "health": {"type": "tcp", "path": "/h"},
                    }
                ],
            ),
            'pools[1].health.path: only for type = "http" or "https"',
        ),
        (
            config(
                {"protocol": "http"},
                pools=[{"name": "b", "backends": [{"address": "127.0.0.1:9002"}], "health": {"type": "tls"}}],
            ),
            'pools[1].health.type: must be "tcp", "http", "https", "dns", "udp", "grpc" or "none"',
        ),
    ]


def test_protocol_specific_keys_are_refused(folder: Folder) -> None:
    for data, expected in refusals(folder):
        errors = errors_of(data, folder.root)
        assert any(e.startswith(expected.split(": ")[0] + ": ") and expected in e for e in errors), (
            expected,
            errors,
        )


# --- reload ------------------------------------------------------------------------------------------


def test_reload_with_a_bad_file_keeps_the_running_config(backends: Any, fastlb: Any, folder: Folder) -> None:
    """Every file is read again at reload; one that is bad refuses the reload (plain listener:
    the engine is started only with what it serves today)."""
    a, b = backends(says_name, "a"), backends(says_name, "b")
    port = free_port()
    p = fastlb(l4_config(port, [a.address]), port)
    assert ask_name(port) == "a"
    missing = folder.root / "certs" / "gone.pem"
    p.config_path.write_text(l4_config(port, [b.address]) + f'\n  [pools.tls]\n  ca = "{missing}"\n')
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert [ask_name(port) for _ in range(3)] == ["a"] * 3, (
        "a reload with a bad file keeps the running config"
    )
    code, err = p.stop()
    assert code == 0, err
    assert f"reload refused, keeping the running config: pools[0].tls.ca: cannot read {missing}" in err


def test_config_equality_follows_file_contents(folder: Folder) -> None:
    """A reload compares configs (health checks keep their state when nothing changed): the
    files' contents are part of the config."""
    leaf = folder.leaf("a", "a.example")
    data = config(https(leaf))
    first: Config = parse_config(data, folder.root)
    assert parse_config(data, folder.root) == first
    folder.leaf("a", "a.example")  # a new certificate in the same files
    assert parse_config(data, folder.root) != first


# --- docs/tls.md ---------------------------------------------------------------------------------


def test_the_docs_example_is_valid(tmp_path: Path, ca: trustme.CA) -> None:
    """docs/tls.md's full example, with the certificate files it names made here."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "tls.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    folder = Folder(tmp_path, ca)
    for site in ("example.com", "other.org", "partners.example.com", "db.example.com"):
        folder.leaf(site, site, f"*.{site}")
    folder.leaf("lb", "lb.internal")
    folder.ca_file("partners-ca")
    folder.ca_file("backend-ca")
    path = folder.put("fastlb.toml", example)
    cfg = load_config(folder.root / path)
    assert cfg.warnings == []
    engine = cfg.to_engine()
    protocols = {x["name"]: (x["protocol"], x["tls"] is not None) for x in engine["listeners"]}
    assert protocols == {
        "https": ("https", True),
        "http": ("http", False),
        "partners": ("https", True),
        "postgres": ("tls", True),
        "tenants": ("tcp", False),
    }
    assert engine["listeners"][1]["routes"][0]["redirect"] == {
        "scheme": "https",
        "code": 301,
        "host": None,
        "path": None,
    }
    assert [r["sni"] for r in engine["listeners"][4]["routes"]] == ["legacy.example.net", "*.example.net"]
    assert engine["pools"][1]["tls"]["sni"] == "api.internal"
