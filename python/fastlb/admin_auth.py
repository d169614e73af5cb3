"""Who may use the admin API, as pure logic (the aiohttp side is in fastlb.admin): the tokens
file, token checks, the Host check against DNS rebinding, the cross-site check against CSRF, and
the limit on failed token attempts. Threat model and settings: docs/security.md.

- Tokens are stored as SHA-256 digests (a file of lines `NAME ROLE SHA256HEX`), so the file is
  not a secret; a presented token is hashed and compared with every digest in constant time.
- Roles: `read` (GET: status, metrics, alerts, events) and `operate` (also state changes).
- A DNS-rebinding page reaches the admin port under the attacker's own host name, so a Host
  that is an IP literal is never a rebinding; names must be listed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = [
    "ROLES",
    "TOKEN_NAME",
    "FailedAttempts",
    "Token",
    "check_token",
    "cross_site",
    "default_allowed_hosts",
    "digest",
    "host_allowed",
    "is_loopback_host",
    "new_token",
    "parse_tokens",
]

Role = Literal["read", "operate"]
ROLES: tuple[Role, ...] = ("read", "operate")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True)
class Token:
    """One line of the tokens file: who (`name`, in the audit trail), what it may do, and the
    SHA-256 of the token itself."""

    name: str
    role: Role
    sha256: bytes

    def may(self, method: str) -> bool:
        return self.role == "operate" or method.upper() not in STATE_CHANGING


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, with a prefix that secret scanners can match."""
    return "fastlb_" + secrets.token_urlsafe(32)


def parse_tokens(text: str) -> tuple[list[Token], list[str]]:
    """The tokens of a tokens file and one message per bad line (`line N: ...`). Blank lines and
    lines starting with `#` are skipped."""
    tokens: list[Token] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            errors.append(f'line {n}: expected "NAME ROLE SHA256HEX" (`fastlb admin-token` prints one)')
            continue
        name, role, hexdigest = parts
        if not TOKEN_NAME.fullmatch(name):
            errors.append(f"line {n}: name {name!r}: 1..64 letters, digits, '_', '.', '@' or '-'")
        elif name in seen:
            errors.append(f"line {n}: name {name!r} is already on line {seen[name]}")
        elif role not in ROLES:
            errors.append(f'line {n}: role {role!r}: must be "read" or "operate"')
        elif not _HEX64.fullmatch(hexdigest.lower()):
            errors.append(f"line {n}: not a SHA-256 digest (64 hex digits); store the digest, not the token")
        else:
            seen[name] = n
            tokens.append(Token(name, role, bytes.fromhex(hexdigest)))
    return tokens, errors


def check_token(presented: str, tokens: list[Token]) -> Token | None:
    """The token whose digest matches `presented`, or None. Every digest is compared (and in
    constant time), so how long it takes says nothing about which entry came close."""
    want = digest(presented)
    found = None
    for token in tokens:
        if hmac.compare_digest(want, token.sha256):
            found = token
    return found


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses; a wildcard or any other name is not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The bind address and localhost; on a wildcard bind, any IP literal too ("0.0.0.0" and
    "::" stand for every address of the machine, and no rebinding page can present an IP)."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    ip = _ip(bind_host)
    if ip is not None and ip.is_unspecified:
        hosts.append("<ip>")
    elif bind_host.lower() not in hosts:
        hosts.append(bind_host.lower())
    return hosts


def _host_of(header: str) -> str | None:
    """The host part of a Host header (`name`, `name:port`, `[v6]:port`), lower-case, without a
    trailing dot; None when it is malformed."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        if end < 0 or (header[end + 1 :] and not header[end + 1 :].startswith(":")):
            return None
        host = header[1:end]
        return host.lower() if isinstance(_ip(host), ipaddress.IPv6Address) else None
    host = header.rpartition(":")[0] if ":" in header else header
    if not host or ":" in host:
        return None
    return host.lower().rstrip(".")


def host_allowed(header: str | None, allowed: list[str]) -> bool:
    """Whether a request's Host may be served: entries are names or addresses (any port), `*`
    (anything), `.example.com` (the name and its subdomains) or `<ip>` (any IP literal). A
    request without Host (HTTP/1.0 tools) is not from a browser and passes."""
    if header is None:
        return True
    host = _host_of(header)
    if host is None:
        return False
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry == "*" or entry == host:
            return True
        if entry == "<ip>" and _ip(host) is not None:
            return True
        if entry.startswith(".") and (host == entry[1:] or host.endswith(entry)):
            return True
    return False


def cross_site(origin: str | None, fetch_site: str | None, host: str | None, scheme: str) -> str | None:
    """Why a browser request comes from another origin, or None when it does not: a
    `Sec-Fetch-Site` other than same-origin/none, or an `Origin` whose scheme://host:port is not
    this server's own."""
    if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {fetch_site}"
    if origin is None:
        return None
    if origin == "null":
        return "Origin: null"
    parts = urlsplit(origin)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:
        return f"Origin: {origin}"
    if host is None or parts.hostname is None or parts.scheme != scheme:
        return f"Origin: {origin}"
    own = _host_of(host)
    own_port = host.rpartition(":")[2] if host.rpartition(":")[2].isdigit() else str(default)
    if own != parts.hostname.rstrip(".") or str(port) != own_port:
        return f"Origin: {origin}"
    return None


class FailedAttempts:
    """Failed token attempts per client address: a bucket of `burst` that refills one attempt
    every `refill_s`; an empty bucket blocks that client (every token refused, right or wrong)
    until it refills. At most `clients` addresses are tracked (least recently failed forgotten
    first), so a spray from many addresses cannot grow it without bound."""

    def __init__(self, burst: int = 10, refill_s: float = 6.0, clients: int = 10_000) -> None:
        self.burst, self.refill_s, self.clients = burst, refill_s, clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (level, at)

    def _level(self, client: str, now: float) -> float:
        level, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), level + (now - at) / self.refill_s)

    def blocked_for(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try a token again (0: it may now)."""
        now = time.monotonic() if now is None else now
        if client not in self._buckets:
            return 0.0
        level = self._level(client, now)
        return 0.0 if level >= 1.0 else (1.0 - level) * self.refill_s

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._buckets[client] = (max(0.0, self._level(client, now) - 1.0), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)
