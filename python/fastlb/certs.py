"""The certificate, key and CA files a config names: read once at load (and at every reload),
checked with `cryptography`, and handed to the data plane as PEM text.

`Files(base)` resolves paths against the config file's folder and collects one line per
problem, `field.path: message`, in `errors` (the config is refused) or `warnings` (it is
accepted; `fastlb check` and `fastlb serve` print them). What is checked:

- a file that cannot be read, is not text, or holds no PEM block of the kind asked for;
- a private key that does not parse, is encrypted, or is of a kind TLS libraries refuse
  (RSA under 2048 bits, DSA, curves other than P-256/P-384/P-521, Ed448);
- a key that does not match the first certificate of its file (the leaf must come first);
- a server certificate without DNS names (subjectAltName dNSName): clients match the name
  there, never in the subject's CN;
- an expired or not yet valid leaf certificate: a warning, so that a reload does not take
  a listener down on the day its certificate runs out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = ["CertKeyPem", "Files", "dns_names"]

_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_KEY_BLOCK = re.compile(rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----")
_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class CertKeyPem:
    """A certificate chain and its key as read: PEM texts as in the files, and the leaf's DNS
    names (lower-case, no trailing dot)."""

    chain_pem: str
    key_pem: str
    names: list[str] = field(default_factory=list)


def dns_names(cert: x509.Certificate) -> list[str]:
    """The subjectAltName dNSName entries, lower-case, without a trailing dot, each once."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = (n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    return list(dict.fromkeys(n for n in names if n))


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_problem(key: PrivateKeyTypes) -> str | None:
    """Why a TLS library (rustls) would refuse this key for signing, or None."""
    if isinstance(key, rsa.RSAPrivateKey):
        return None if key.key_size >= 2048 else f"an RSA key of {key.key_size} bits (at least 2048)"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ok = key.curve.name in _CURVES
        return None if ok else f"an EC key on {key.curve.name} (P-256, P-384 or P-521 only)"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    kinds: list[tuple[type, str]] = [
        (dsa.DSAPrivateKey, "DSA"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    ]
    kind = next((name for cls, name in kinds if isinstance(key, cls)), type(key).__name__)
    return f"a {kind} key (RSA, ECDSA or Ed25519 only)"


class Files:
    """Reads the files of one config; `errors` and `warnings` collect what it found."""

    def __init__(self, base: Path, now: datetime | None = None) -> None:
        self.base = base
        self.now = now or datetime.now(UTC)
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def read(self, at: str, path: str) -> bytes | None:
        """The file's bytes (path relative to the config's folder), or None with an error."""
        try:
            return (self.base / path).read_bytes()
        except OSError as exc:
            self.errors.append(f"{at}: cannot read {path}: {exc.strerror or exc}")
            return None

    def _text(self, at: str, path: str, data: bytes) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.errors.append(f"{at}: {path} is not a PEM file (binary: DER? `openssl x509 -inform der`)")
            return None

    def _pem(self, at: str, path: str) -> tuple[bytes, str] | None:
        """A file's bytes and its text, or None with an error (unreadable, or not text)."""
        data = self.read(at, path)
        if data is None:
            return None
        text = self._text(at, path, data)
        return None if text is None else (data, text)

    def certificates(self, at: str, path: str) -> tuple[str, list[x509.Certificate]] | None:
        """The file's text and its certificates in order (at least one), or None with an error."""
        found = self._pem(at, path)
        if found is None:
            return None
        data, text = found
        certs = []
        for k, block in enumerate(_CERT_BLOCK.findall(data)):
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except ValueError as exc:
                self.errors.append(f"{at}: certificate {k + 1} in {path} does not parse: {exc}")
                return None
        if not certs:
            self.errors.append(f"{at}: no PEM certificate in {path} (-----BEGIN CERTIFICATE-----)")
            return None
        return text, certs

    def ca_bundle(self, at: str, path: str) -> str | None:
        """A CA file's text (one certificate or more), or None with an error."""
        found = self.certificates(at, path)
        return None if found is None else found[0]

    def private_key(self, at: str, path: str) -> tuple[str, PrivateKeyTypes] | None:
        found = self._pem(at, path)
        if found is None:
            return None
        data, text = found
        label = _KEY_BLOCK.search(data)
        if label is None:
            self.errors.append(f"{at}: no PEM private key in {path} (-----BEGIN PRIVATE KEY-----)")
            return None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # encrypted
            self.errors.append(
                f"{at}: {path} is encrypted; fastlb needs it unencrypted (`openssl pkey -in KEY -out PLAIN`)"
            )
            return None
        except (ValueError, UnsupportedAlgorithm) as exc:
            why = str(exc).split(". ")[0].rstrip(".")  # cryptography's first sentence; the rest is advice
            self.errors.append(f"{at}: the private key in {path} does not parse: {why}")
            return None
        problem = _key_problem(key)
        if problem is not None:
            self.errors.append(f"{at}: {path} holds {problem}")
            return None
        return text, key

    def cert_and_key(
        self, at: str, cert_path: str, key_path: str, *, server: bool, cert_field: str = "cert"
    ) -> CertKeyPem | None:
        """A certificate file and its key file, checked together; `at` is the table holding
        `cert` and `key`. `server`: the certificate must carry DNS names."""
        at_cert, at_key = f"{at}.{cert_field}", f"{at}.key"
        chain = self.certificates(at_cert, cert_path)
        key = self.private_key(at_key, key_path)
        if chain is None:
            return None
        text, certs = chain
        leaf = certs[0]
        names = dns_names(leaf)
        if server and not names:
            self.errors.append(
                f"{at_cert}: the certificate in {cert_path} has no DNS names (subjectAltName dNSName);"
                " clients check the name there, not in the subject CN"
            )
        self._validity(at_cert, cert_path, leaf)
        if key is None:
            return None
        key_text, private = key
        public = private.public_key().public_bytes(*_SPKI)
        if leaf.public_key().public_bytes(*_SPKI) != public:
            later = any(c.public_key().public_bytes(*_SPKI) == public for c in certs[1:])
            why = " (it matches a later one: the leaf must come first)" if later else ""
            self.errors.append(f"{at_key}: {key_path} does not match the certificate in {cert_path}{why}")
            return None
        return CertKeyPem(text, key_text, names)

    def _validity(self, at: str, path: str, leaf: x509.Certificate) -> None:
        after, before = leaf.not_valid_after_utc, leaf.not_valid_before_utc
        if after < self.now:
            self.warnings.append(f"{at}: the certificate in {path} expired on {_when(after)}")
        elif before > self.now:
            self.warnings.append(f"{at}: the certificate in {path} is not valid before {_when(before)}")
