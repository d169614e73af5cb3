"""The fastlb configuration file: TOML -> one validated `Config` -> the engine's JSON.

`load_config(path)` reads and validates a file; `parse_config(data)` validates a dict; both raise
`ConfigError`, whose `.errors` are one line each, `field.path: message`, e.g.
`pools[0].backends[1].address: not host:port`; what is accepted but looks wrong (an expired
certificate) is in `Config.warnings`. Both also read the certificate, key and CA files the
config names (fastlb.certs; paths relative to the config file's folder), so a bad file fails
`fastlb check` and a reload alike. `Config.to_engine()` resolves what the data plane
must not do itself (host names, "auto" worker counts, CPU lists) and returns exactly the JSON that
`native/src/config.rs` (`EngineConfig`) accepts. Validation is pure; only `to_engine()` touches
the machine (DNS, the CPU mask, local addresses). This schema is the one source of defaults: the
engine JSON carries every field, and the engine has no defaults of its own.

Defaults (a key left out means this):
    runtime   workers = "auto" (one per CPU the process may run on, or one per listed CPU),
              cpu_affinity = "auto", max_connections = 50000 (0 = unlimited), pid_file = none
              (relative to the config file's folder)
    admin     bind = "127.0.0.1:9901" ("off" disables)
    log       level = "info" (trace | debug | info | warn | warning | error), access_log = "off"
    listeners timeouts.client_idle = "60s" for http/https, "10m" for tcp/tls (nginx stream's
              proxy_timeout; "0s" = never), timeouts.header_read = "10s" (http/https only);
              rate_limit.burst = requests_per_second rounded up (at least 1);
              max_header_bytes = 65536 (1024..=1048576; a bigger request head gets 431, like
              HAProxy's tune.bufsize), max_headers = 100 (1..=1000; HAProxy's limit is 101);
              tls (https/tls only, required there): min_version = "1.2", alpn = ["h2",
              "http/1.1"] for https and none for tls, client_auth = "off", session_tickets = true;
              routes: redirect.code = 301; name = the route's index ("0", "1", ...);
              canary = {steps = [5, 25, 50, 100], interval = "1m", max_error_rate = 0.01,
              max_p99_ratio = 1.5, min_requests = 100} (pool is required);
              split_affinity.ttl = "30d" ("0s": a session cookie);
              http2 (http/https only; h2c with prior knowledge on http, ALPN h2 on https):
              max_concurrent_streams = 100 (1..=10000; more streams are refused with
              REFUSED_STREAM), max_header_list_size = 65536 (1024..=1048576 bytes);
              udp listeners: timeouts.session_idle = "30s", udp = {responses = 0 (a flow ends
              only when idle), per_packet = false, max_sessions = 100000}
    pools     http_version = "1.1" ("2": HTTP/2 to the backends, h2c, or ALPN h2 with tls),
              algorithm = "round_robin", hash_key = "source_ip", hash_balance_factor = 0 (off),
              backend weight = 1, max_connections = 0 (unlimited), backup = false,
              retries = 2 (at most MAX_RETRIES = 10, the data plane's limit),
              timeouts = {connect = "2s", read = "30s", send = "30s", idle = "60s"},
              health = {type = "tcp", interval = "2s", timeout = "1s", rise = 2, fall = 3},
              http health: path = "/", expect_status = any 2xx or 3xx (HAProxy httpchk), host =
              the backend's host; dns health: query = "a.root-servers.net.", query_type = "A",
              expect_rcode = any rcode but SERVFAIL (dnsdist); udp health: send (required),
              expect = none (any reply); grpc health (grpc.health.v1.Health/Check over
              HTTP/2): service = "" (the server as a whole); a pool only udp listeners use,
              without a health table: type = "none", with a warning; passive = off;
              slow_start = "0s"; drain_timeout = "30s";
              affinity.ttl = none (a session cookie, like HAProxy `cookie ... insert`);
              keepalive = 256 (0..=10000 idle upstream connections kept per backend per worker
              thread; 0 = a new upstream connection per request). Not nginx's usual 32: a worker
              with more requests in flight to one backend than idle slots closes and reopens
              connections all the time (bench/README.md: 64 clients, 32 slots, 2.3x the CPU
              per re-encrypted request);
              queue = {size = 1000, timeout = "5s"} (HAProxy maxqueue / timeout queue: a request
              finding every backend at max_connections waits up to `timeout`, then 503; size
              0..=1000000, 0 = no queue: 503 at once);
              tls = none (plain TCP to the backends); with it verify = true, ca = the system's
              roots, sni = none (the data plane then uses the request's Host for http)
    alerts    when the key is absent: DEFAULT_ALERTS; `alerts = []` means none; for = "0s"

Choices where the contract is silent:
    - Durations may combine units ("1m30s", as nginx allows); they are rounded to whole ms.
    - Names of listeners, pools and alerts are `[A-Za-z0-9_.-]+` (they appear in URLs and labels).
    - A listener bind may be `:PORT` or `*:PORT` (all IPv4 addresses, as in HAProxy) and may use
      port 0 (the kernel picks one); backends need a port in 1..65535.
    - At least one listener is required (HAProxy refuses to start without one).
    - `hash_key` with a non-hashing algorithm is an error rather than silently ignored; ip_hash
      only hashes the source IP; `hash_balance_factor` only applies to the hashing algorithms.
    - Listener binds may not overlap (same port and same address, or a wildcard address); a
      udp listener may share its address and port with a tcp one (DNS over both).
    - source_cidr accepts host bits set ("10.1.2.3/8" means 10.0.0.0/8), as nginx and HAProxy do.
    - Health `timeout` may not exceed `interval`; http-only health keys with another type, and
      `affinity` / a non-source_ip `hash_key` on a pool used by a tcp listener, are errors.
    - Alert expressions are `METRIC OP NUMBER`; METRIC is one of ALERT_METRICS, OP one of
      < <= > >= == !=; latency_p99 is in seconds, error_rate a fraction.
    - Split weights follow backend weights (integers 0..=1000); a pool may appear once per split.
    - Route names are unique per listener and follow the name syntax; an all-digit name must be
      the route's own index (a URL's `{route}` is a name or an index: one route either way).
    - `canary` and `split_affinity` are for split routes of http/https listeners only. A canary's
      split has 2 pools or more, `canary.pool` is one of them, and the others need a weight
      above 0 (they take the traffic back on a rollback). `steps` are percentages of the
      canary pool, strictly increasing, 1..=100, and must end at 100 (reaching it is the
      promotion). `interval` may be below a second. Durations also take "d" (days).
    - `path_regex` uses the data plane's syntax (Rust `regex`): no look-around and no
      backreferences; a pattern it cannot compile is a config error, with its reason. Python's
      `re` is not consulted (it would refuse valid patterns such as `(?<name>...)` or `\\z`).
    - Route hosts go to the engine lower-case and without a trailing dot (host names are
      case-insensitive); header names too, so a route may not name the same header twice.
    - max_header_bytes, max_headers (listeners) and keepalive, queue (pools) are http-only: a
      non-default value on a tcp listener, or on a pool a tcp listener uses, is an error.
    - https behaves as http and tls as tcp in every check above. A tls listener has no routes;
      a tcp listener's routes are SNI routes (`sni` and `pool`, nothing else), and `sni` is
      refused elsewhere (http/https route by `host`). `redirect` is http/https only, has no
      pool or split, needs one of scheme/host/path, and may not point at the listener itself
      (its own scheme with nothing else changed). Its host and path go into a Location header
      as written, so they must be printable ASCII.
    - An https listener's alpn may list only "h2" and "http/1.1" (what it speaks); a tls
      listener's any protocol names. client_ca with client_auth = "off", and pools.tls.ca with
      verify = false, are warnings (the file is read and checked, then unused).
    - udp listeners take the tcp checks (no rate_limit, header keys, keepalive, queue,
      affinity, non-source_ip hash_key) and more: no routes, no tls on the listener or its
      pool, no timeouts.client_idle (session_idle ends a flow); `udp` and session_idle are
      udp-only. A pool only udp listeners use may check with dns, udp or none (a tcp/http
      check finds no TCP port); a pool shared with tcp listeners may use any type (DNS over
      TCP and UDP on the same backends). dns names are made absolute ("x.example" ->
      "x.example."), query types and rcodes upper-case, as dnspython spells them; query
      types that are not asked for (AXFR, IXFR, OPT, TSIG...) are refused.
    - `[listeners.http2]` is http/https-only; `http_version = "2"`, like the other HTTP pool
      keys, is refused on a pool a tcp, tls or udp listener uses (it relays bytes, not
      requests). Every http/https listener gets an `http2` table (the defaults when absent);
      h2 on https still needs "h2" in tls.alpn (the default offers it). The `grpc` check
      speaks HTTP/2 whatever the pool's http_version (a gRPC server speaks nothing else);
      `service` is grpc-only.
    - `send_proxy` ("v1", "v2") is for pools of tcp, tls, http and https listeners; not udp,
      nor `http_version = "2"` pools (their connections multiplex clients). On an http pool a
      keep-alive backend connection is reused only for requests whose header would be the same.
    - `proxy_protocol` (accept "optional" or "required") needs `from` (the balancers trusted to
      send a PROXY header) and is for tcp, tls, http and https listeners, not udp.
    - `data_path` is "proxy" (the default, fastlb relays) or "kernel" (tcp/udp: nftables NAT,
      docs/l4-kernel.md): an IPv4 bind, and none of what needs a held connection (SNI routes,
      PROXY in or out, listener or pool timeouts, retries, TLS, passive ejection, backend
      max_connections, udp options, least_conn/p2c/peak_ewma); `source` ("keep" |
      "masquerade") goes with it only.
    - `trusted_proxies` (default none: X-Forwarded-For is never believed) is for http and https
      listeners; networks as source_cidr takes them.
    - A pool backend named by a host name (not localhost) stands for every A/AAAA address the
      name has, looked up again every `resolve.interval` (default 5s) through
      `runtime.resolvers` (fastlb.discovery); `srv` stands in place of `backends` (one of the
      two is required). Without a lookup result (at start) getaddrinfo's first address is used.
    - `country` route conditions need `[geoip].database`, a MaxMind DB file (checked for the
      format's metadata marker here; the data plane reads it whole, again at every reload).
      Codes are two letters, upper-cased.
    - The admin API on an address beyond loopback (a wildcard, a name other than localhost)
      needs `tokens_file` or mTLS (`tls.client_ca`), unless `insecure = true`: an error naming
      admin.bind otherwise. The tokens file is read at load and at every reload; a bad line is
      an error naming it (`admin.tokens_file: line 3: ...`), an empty file a warning (only the
      `open` paths answer). The admin certificate may name IP addresses only (no DNS names
      needed: operators often reach it by address).
    - pools.tls.verify is true/false; "required"/"none" (CONTRACT.md's spelling) mean the same.
      health type "https" may be used with or without [pools.tls] (without: verify against the
      system's roots).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from fastlb._native import MAX_RETRIES
from fastlb.admin_auth import Token as AdminToken
from fastlb.admin_auth import default_allowed_hosts, is_loopback_host, parse_tokens
from fastlb.certs import CertKeyPem, Files

__all__ = [
    "ALERT_METRICS",
    "DEFAULT_ALERTS",
    "Config",
    "ConfigError",
    "Duration",
    "load_config",
    "parse_config",
    "split_host_port",
]

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Protocol = Literal["tcp", "http", "https", "tls", "udp"]
HTTP_PROTOCOLS = ("http", "https")  # requests: routes by content, rate limits, header limits
STREAM_PROTOCOLS = ("tcp", "tls")  # bytes to the pool
TLS_PROTOCOLS = ("https", "tls")  # TLS terminated here: [listeners.tls] required
UDP_HEALTH = ("dns", "udp", "none")  # the health types of a pool only udp listeners use
HTTPS_ALPN = ("h2", "http/1.1")  # what an https listener speaks, and offers by default
HASH_ALGORITHMS = ("ip_hash", "consistent_hash", "maglev")
ALERT_METRICS = ("healthy_backends", "draining_backends", "error_rate", "latency_p99", "canary_rolled_back")
LOOPBACKS: frozenset[IPAddr] = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})


class ConfigError(ValueError):
    """An invalid configuration; `.errors` holds one line per problem (`field.path: message`)."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --- durations --------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION_HINT = 'must be a duration with a unit, e.g. "5s"'


class Duration(int):
    """A duration in whole milliseconds; the file writes it with a unit ("250ms", "1.5s", "1m", "30d")."""

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parses "250ms" / "1.5s" / "1m30s" / "2h" / "30d"; raises ValueError naming the problem."""
        if not _DURATION.fullmatch(text):
            raise ValueError(f"{_DURATION_HINT} (units: ms, s, m, h, d), not {json.dumps(text)}")
        total = sum(float(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(text))
        return cls(round(total))

    @property
    def ms(self) -> int:
        """Milliseconds as a plain int."""
        return int(self)

    @property
    def seconds(self) -> float:
        return int(self) / 1000

    @property
    def text(self) -> str:
        """The shortest exact spelling with one unit, e.g. "30s"; round-trips through parse()."""
        for unit in ("h", "m", "s"):
            if int(self) and int(self) % _UNIT_MS[unit] == 0:
                return f"{int(self) // _UNIT_MS[unit]}{unit}"
        return f"{int(self)}ms"

    @classmethod
    def _validate(cls, value: object) -> Duration:
        if isinstance(value, Duration):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(_DURATION_HINT)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.text)
        )


def _positive(value: Duration) -> Duration:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]

# --- addresses --------------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def split_host_port(text: str, *, bind: bool = False) -> tuple[str, int]:
    """Splits `host:port` / `[v6]:port` into (host, port), host without brackets.

    With `bind`, `:PORT` and `*:PORT` mean 0.0.0.0 and port 0 is allowed. Raises ValueError.
    """
    if not isinstance(text, str):
        raise ValueError("must be a string")
    if bind and (text.startswith(":") or text.startswith("*:")):
        host, port_text = "0.0.0.0", text.split(":", 1)[1]
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("not host:port")
        host, port_text = text[1:end], text[end + 2 :]
        if not isinstance(_ip(host), ipaddress.IPv6Address):
            raise ValueError(f"not host:port ({host!r} in brackets is not an IPv6 address)")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("not host:port")
        if ":" in host:
            raise ValueError("not host:port (write IPv6 as [addr]:port)")
        looks_ipv4 = re.fullmatch(r"[0-9.]+", host) is not None
        if (looks_ipv4 and _ip(host) is None) or not _HOSTNAME.fullmatch(host):
            raise ValueError(f"not host:port (bad host {host!r})")
    if not _PORT.fullmatch(port_text):
        raise ValueError("not host:port (bad port)")
    port, low = int(port_text), 0 if bind else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be {low}..65535")
    return host, port


def _ip(host: str) -> IPAddr | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolver_address(text: str) -> tuple[str, int]:
    """A `runtime.resolvers` entry as (IP, port): "IP", "IP:PORT", "[v6]:PORT" (port 53 when
    none is given). Raises ValueError."""
    try:
        host, port = split_host_port(text) if text.startswith("[") or text.count(":") == 1 else (text, 53)
    except ValueError:
        host, port = "", 0
    if _ip(host) is None or not 0 < port < 65536:
        raise ValueError(f'not a DNS server address: {text!r} (e.g. "10.0.0.2" or "10.0.0.2:53")')
    return host, port


def _resolver(text: str) -> str:
    resolver_address(text)
    return text


def _srv_name(text: str) -> str:
    if not _is_dns_name(text.rstrip(".")) or not text.startswith("_"):
        raise ValueError(f'not an SRV name: {text!r} (e.g. "_http._tcp.api.internal")')
    return text


def _backend_address(text: str) -> str:
    split_host_port(text)
    return text


def _bind_address(text: str) -> str:
    split_host_port(text, bind=True)
    return text


def _admin_bind(text: str) -> str:
    return text if text == "off" else _bind_address(text)


# --- small field types ------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header and cookie names
_HASH_KEY_HINT = 'must be "source_ip", "path", "header:NAME", "cookie:NAME" or "query:NAME"'


def _name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise ValueError("must be letters, digits, '_', '.' or '-'")
    return text


def _token(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"not a valid header/cookie name: {text!r}")
    return text


def _hash_key(text: str) -> str:
    if text in ("source_ip", "path"):
        return text
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("header", "cookie", "query"):
        raise ValueError(_HASH_KEY_HINT)
    if not name:
        raise ValueError(f"{kind} name missing after '{kind}:'")
    if kind != "query" and not _TOKEN.fullmatch(name):
        raise ValueError(f"not a valid {kind} name: {name!r}")
    return text


def _workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError('must be an integer >= 1 or "auto"')


def _cpu_affinity(value: object) -> Literal["auto", "off"] | list[int]:
    if value == "auto" or value == "off":
        return "auto" if value == "auto" else "off"
    hint = 'must be "auto", "off" or a non-empty list of CPU numbers (integers >= 0)'
    if not isinstance(value, list) or not value:
        raise ValueError(hint)
    for cpu in value:
        if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0:
            raise ValueError(f"{hint}; got {json.dumps(cpu)}")
    if len(set(value)) != len(value):
        raise ValueError("lists a CPU twice")
    return list(value)


def _protocol(value: object) -> Protocol:
    for protocol in get_args(Protocol):
        if value == protocol:
            return cast(Protocol, protocol)
    raise ValueError('must be "tcp", "http", "https", "tls" or "udp"')


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError('must start with "/"')
    return text


def _regex(text: str) -> str:
    """A pattern the data plane (Rust `regex`) compiles; Python's `re` only without the extension."""
    try:
        from fastlb._native import regex_error
    except ImportError:  # pragma: no cover - the extension ships with the package
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"bad regex: {exc}") from None
        return text
    error = regex_error(text)
    if error is not None:
        lines = [line.strip() for line in error.splitlines() if line.strip()] or ["unknown error"]
        # "regex parse error:\n    PATTERN\n    ^^^\nerror: WHY" -> WHY; other errors are one line.
        why = lines[-1].removeprefix("error: ") if lines[0] == "regex parse error:" else lines[0]
        raise ValueError(f"bad regex: {why}")
    return text


def _cidr(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {text!r}") from None
    return text


def _country(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z]{2}", text):
        raise ValueError(f'not an ISO 3166-1 alpha-2 country code: {text!r} (e.g. "DE")')
    return text.upper()


def _route_host(text: str) -> str:
    bare = text[2:] if text.startswith("*.") else text
    if not (_HOSTNAME.fullmatch(bare) or _ip(bare)):
        raise ValueError('must be a host name, or "*.domain"')
    return text


def _is_dns_name(text: str) -> bool:
    """A host name that is not an IP address (TLS server names are never addresses)."""
    return _HOSTNAME.fullmatch(text) is not None and _ip(text.rstrip(".")) is None


def _sni(text: str) -> str:
    if not _is_dns_name(text[2:] if text.startswith("*.") else text):
        raise ValueError('must be a host name, or "*.domain" (never an IP address)')
    return text


def _server_name(text: str) -> str:
    if not _is_dns_name(text):
        raise ValueError("must be a host name (never an IP address)")
    return text


def _location_part(text: str) -> str:
    """Printable ASCII without spaces: it goes into a Location header as written."""
    if not text or any(not 0x21 <= ord(c) <= 0x7E for c in text):
        raise ValueError("must be printable ASCII without spaces (percent-encode the rest)")
    return text


def _redirect_host(text: str) -> str:
    _location_part(text)
    if _HOSTNAME.fullmatch(text) or _ip(text):
        return text
    try:
        split_host_port(text)
    except ValueError:
        raise ValueError('must be a host name or address, optionally with ":PORT"') from None
    return text


def _redirect_path(text: str) -> str:
    return _location_part(_path(text))


def _file(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    if "\0" in text:
        raise ValueError("must not contain a NUL byte")
    return text


def _alpn(text: str) -> str:
    if not 1 <= len(text.encode()) <= 255 or not text.isascii() or not text.isprintable():
        raise ValueError("must be a protocol name of 1..255 printable ASCII characters")
    return text


def _verify(value: object) -> bool:
    """true / false; the contract's spelling "required" / "none" is accepted too."""
    if isinstance(value, bool):
        return value
    if value == "required" or value == "none":
        return value == "required"
    raise ValueError('must be true or false ("required" or "none" also work)')


def _dns_name(text: str) -> str:
    """A DNS name (dnspython's syntax), made absolute: "health.example" -> "health.example."."""
    if not text:
        raise ValueError('must be a DNS name, e.g. "health.example."')
    try:
        return dns.name.from_text(text).to_text()
    except dns.exception.DNSException as exc:
        raise ValueError(f"not a DNS name: {exc}") from None


def _query_type(text: str) -> str:
    """An RR type one can ask for over UDP: "A", "AAAA", "SOA", "TYPE65534", "ANY"; not AXFR,
    IXFR, OPT, TSIG..."""
    try:
        rdtype = dns.rdatatype.from_text(text)
    except dns.exception.DNSException:
        raise ValueError(f'not a DNS record type: {json.dumps(text)} (e.g. "A", "AAAA", "SOA")') from None
    if dns.rdatatype.is_metatype(rdtype) and rdtype != dns.rdatatype.ANY:
        raise ValueError(f"{dns.rdatatype.to_text(rdtype)} cannot be asked for in a health check")
    return dns.rdatatype.to_text(rdtype)


def _rcode(text: str) -> str:
    name = text.upper()
    if name not in dns.rcode.Rcode.__members__:
        known = ", ".join(list(dns.rcode.Rcode.__members__)[:6])
        raise ValueError(f"unknown rcode {json.dumps(text)} (names such as {known}, ...)")
    return name


MAX_DATAGRAM = 65_507  # the largest UDP payload over IPv4


def _datagram(text: str) -> str:
    if len(text.encode()) > MAX_DATAGRAM:
        raise ValueError(f"longer than one datagram ({MAX_DATAGRAM} bytes as UTF-8)")
    return text


def _balance_factor(value: int) -> int:
    if value != 0 and value < 100:
        raise ValueError("must be 0 (off) or >= 100")
    return value


def _status_code(value: int) -> int:
    if not 100 <= value <= 599:
        raise ValueError("must be an HTTP status 100..599")
    return value


Name = Annotated[str, AfterValidator(_name)]
FilePath = Annotated[str, AfterValidator(_file)]  # relative to the config file's folder
Token = Annotated[str, AfterValidator(_token)]
Weight = Annotated[int, Field(ge=0, le=1000)]

# --- models -----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Runtime(_Model):
    """`[runtime]`: read when the engine starts."""

    workers: Annotated[int | Literal["auto"], PlainValidator(_workers)] = "auto"
    cpu_affinity: Annotated[Literal["auto", "off"] | list[int], PlainValidator(_cpu_affinity)] = "auto"
    max_connections: Annotated[int, Field(ge=0)] = 50_000
    # written at start, rewritten by the new process after a binary upgrade; relative to the
    # config file's folder
    pid_file: Annotated[str, Field(min_length=1)] | None = None
    # DNS servers for backend discovery ("IP" or "IP:PORT"); none: /etc/resolv.conf's
    resolvers: list[Annotated[str, AfterValidator(_resolver)]] = []


def _open_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise ValueError("must be a path starting with /")
    return text


def _allowed_host(text: str) -> str:
    if text in ("*", "<ip>"):
        return text
    name = text[1:] if text.startswith(".") else text
    if not (_HOSTNAME.fullmatch(name) or _ip(name)):
        raise ValueError('must be a host name, an address, ".domain" (and its subdomains), "<ip>" or "*"')
    return text


class AdminTls(_Model):
    """`[admin].tls`: the admin API over HTTPS; with `client_ca`, clients must present a
    certificate it signed (mTLS)."""

    cert: FilePath
    key: FilePath
    client_ca: FilePath | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    _pem: CertKeyPem | None = PrivateAttr(default=None)  # read by parse_config
    _client_ca_pem: str | None = PrivateAttr(default=None)


class Admin(_Model):
    """`[admin]`: admin API, /metrics and dashboard, and who may use them (docs/security.md)."""

    bind: Annotated[str, AfterValidator(_admin_bind)] = "127.0.0.1:9901"
    tokens_file: FilePath | None = None  # lines "NAME ROLE SHA256HEX"; re-read on reload
    open: list[Annotated[str, AfterValidator(_open_path)]] = ["/healthz", "/metrics"]
    allowed_hosts: list[Annotated[str, AfterValidator(_allowed_host)]] | None = None  # None: bind + localhost
    insecure: bool = False  # serve a non-loopback bind without tokens (or mTLS)
    tls: AdminTls | None = None
    _tokens: list[AdminToken] | None = PrivateAttr(default=None)  # read by parse_config

    @property
    def tokens(self) -> list[AdminToken] | None:
        """The tokens file's entries; None without `tokens_file` (no token is asked for)."""
        return self._tokens

    def hosts(self) -> list[str]:
        """`allowed_hosts`, or its default for this bind."""
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        return default_allowed_hosts(split_host_port(self.bind, bind=True)[0] if self.bind != "off" else "")


class Log(_Model):
    """`[log]`: access_log is "off", "stdout" or a file path (JSON lines)."""

    level: Literal["trace", "debug", "info", "warn", "warning", "error"] = "info"
    access_log: Annotated[str, Field(min_length=1)] = "off"


class ListenerTimeouts(_Model):
    client_idle: Duration = Duration.parse("60s")
    header_read: PositiveDuration = Duration.parse("10s")
    session_idle: PositiveDuration = Duration.parse("30s")  # udp: a flow ends after this long quiet


class Udp(_Model):
    """`udp = { responses, per_packet, max_sessions }` on a udp listener."""

    responses: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # replies that end a session; 0 = idle only
    per_packet: bool = False  # balance every datagram, not every flow
    max_sessions: Annotated[int, Field(ge=1, le=2**32 - 1)] = 100_000  # per listener, whole process


class Http2(_Model):
    """`[listeners.http2]` on http and https listeners: the limits of an HTTP/2 client
    connection (h2c with prior knowledge on http, ALPN h2 on https)."""

    # streams open at once per connection; more are refused with RST_STREAM REFUSED_STREAM
    max_concurrent_streams: Annotated[int, Field(ge=1, le=10_000)] = 100
    # SETTINGS_MAX_HEADER_LIST_SIZE: the largest decoded header list of a request (431 beyond)
    max_header_list_size: Annotated[int, Field(ge=1024, le=1_048_576)] = 65_536


class RateLimit(_Model):
    """Per client IP token bucket (http); over it: 429 with Retry-After."""

    requests_per_second: float = Field(gt=0)
    burst: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: Any) -> Any:
        if isinstance(data, dict) and "burst" not in data:
            rps = data.get("requests_per_second")
            if isinstance(rps, (int, float)) and not isinstance(rps, bool) and rps > 0:
                return {**data, "burst": max(1, math.ceil(rps))}
        return data


class SplitEntry(_Model):
    pool: str
    weight: Weight = 1


class Redirect(_Model):
    """`redirect = { scheme, code, host, path }`: what is not given is kept from the request."""

    scheme: Literal["http", "https"] | None = None
    code: Literal[301, 302, 303, 307, 308] = 301
    host: Annotated[str, AfterValidator(_redirect_host)] | None = None
    path: Annotated[str, AfterValidator(_redirect_path)] | None = None


def _steps(steps: list[int]) -> list[int]:
    if not steps:
        raise ValueError("must not be empty")
    for k, step in enumerate(steps):
        if not 1 <= step <= 100:
            raise ValueError(f"[{k}] = {step}: each step is a percentage from 1 to 100")
        if k and step <= steps[k - 1]:
            raise ValueError(f"[{k}] = {step}: steps must increase ({steps[k - 1]} before it)")
    if steps[-1] != 100:
        raise ValueError(f"must end at 100 (the canary's whole share), not {steps[-1]}")
    return steps


class Canary(_Model):
    """`canary = { pool, steps, ... }` on a split route: fastlb.canary drives its weights."""

    pool: str  # the canary pool, one of the split's
    # the canary pool's share of the route, in percent, one step per interval; ends at 100
    steps: Annotated[list[int], AfterValidator(_steps)] = [5, 25, 50, 100]
    interval: PositiveDuration = Duration.parse("1m")
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01  # canary 5xx / canary responses
    max_p99_ratio: Annotated[float, Field(gt=0)] = 1.5  # canary p99 / the other pools' p99
    min_requests: Annotated[int, Field(ge=0)] = 100  # canary requests in an interval to judge it


class SplitAffinity(_Model):
    """`split_affinity = { cookie, ttl }`: sticky A/B groups; "0s" ttl: a session cookie."""

    cookie: Token
    ttl: Duration = Duration.parse("30d")


def _field_value(text: str) -> str:
    if any(c in text for c in "\r\n\0") or text != text.strip(" \t"):
        raise ValueError("a field value has no CR, LF or NUL, nor spaces at its ends")
    return text


FieldValue = Annotated[str, AfterValidator(_field_value)]

# Fields fastlb writes or frames messages by: a route's rules may not set, add or remove them.
MANAGED_FIELDS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection",
        "te", "trailer", "upgrade", "expect", "x-forwarded-for", "x-forwarded-proto", "forwarded",
        "via", "x-request-id", "cookie", "set-cookie", "x-client-cert-subject", "x-client-cert-fingerprint",
    }
)  # fmt: skip


class HeaderRules(_Model):
    """`request_headers` / `response_headers` of a route: `set` replaces every field of that
    name, `add` appends one, `remove` drops every one (names case-insensitive)."""

    set: dict[Token, FieldValue] = {}
    add: dict[Token, FieldValue] = {}
    remove: list[Token] = []

    def to_engine(self) -> dict[str, Any]:
        return {"set": [[n, v] for n, v in self.set.items()], "add": [[n, v] for n, v in self.add.items()],
                "remove": list(self.remove)}  # fmt: skip


class Route(_Model):
    """One `[[listeners.routes]]` entry: all given conditions must hold; first match wins."""

    name: Name | None = None  # how the admin API names it (default: its index)
    host: Annotated[str, AfterValidator(_route_host)] | None = None
    path_prefix: Annotated[str, AfterValidator(_path)] | None = None
    path_exact: Annotated[str, AfterValidator(_path)] | None = None
    path_regex: Annotated[str, AfterValidator(_regex)] | None = None
    headers: dict[Token, str] = {}
    cookies: dict[Token, str] = {}
    query: dict[Annotated[str, Field(min_length=1)], str] = {}
    source_cidr: list[Annotated[str, AfterValidator(_cidr)]] = []
    country: list[Annotated[str, AfterValidator(_country)]] = []  # the client's, by [geoip].database
    sni: Annotated[str, AfterValidator(_sni)] | None = None  # tcp listeners: TLS passthrough by SNI
    redirect: Redirect | None = None  # http/https: answer with a redirect instead of a pool
    pool: str | None = None
    split: list[SplitEntry] | None = None
    canary: Canary | None = None  # http/https split routes: a self-driving canary release
    split_affinity: SplitAffinity | None = None  # http/https split routes: sticky groups
    request_headers: HeaderRules = Field(default_factory=HeaderRules)  # on the way to the backend
    response_headers: HeaderRules = Field(default_factory=HeaderRules)  # on the backend's answer
    rewrite_prefix: Annotated[str, AfterValidator(_path)] | None = None  # replaces path_prefix


class CertKey(_Model):
    """One `{ cert, key }` of `[listeners.tls].certificates`: the chain (leaf first) and its key."""

    cert: FilePath
    key: FilePath
    _pem: CertKeyPem | None = PrivateAttr(default=None)  # read by parse_config


class ListenerTls(_Model):
    """`[listeners.tls]`: TLS termination on https and tls listeners."""

    certificates: list[CertKey] = Field(min_length=1)
    min_version: Literal["1.2", "1.3"] = "1.2"
    # the default depends on the protocol: https HTTPS_ALPN, tls none (Listener fills it in)
    alpn: list[Annotated[str, AfterValidator(_alpn)]] = []
    client_ca: FilePath | None = None
    client_auth: Literal["off", "optional", "required"] = "off"
    session_tickets: bool = True
    _client_ca_pem: str | None = PrivateAttr(default=None)


class ProxyProtocol(_Model):
    """`proxy_protocol = { accept, from }`: PROXY protocol headers (v1 and v2) from the load
    balancer in front, read before anything else (before TLS); only `from` may send one."""

    accept: Literal["off", "optional", "required"] = "off"
    from_: Annotated[list[Annotated[str, AfterValidator(_cidr)]], Field(alias="from")] = []


def _media_type(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/(\*|[a-z0-9!#$&^_.+-]+)", text.lower()):
        raise ValueError(f'not a media type: {text!r} (e.g. "text/*" or "application/json")')
    return text.lower()


class CompressionLevels(_Model):
    """Levels per algorithm: gzip 1-9 (nginx's gzip_comp_level), br 0-11, zstd 1-19."""

    gzip: Annotated[int, Field(ge=1, le=9)] = 6
    br: Annotated[int, Field(ge=0, le=11)] = 4
    zstd: Annotated[int, Field(ge=1, le=19)] = 3


class Compression(_Model):
    """`compression = { algorithms, min_size, types, levels }` on http/https listeners."""

    algorithms: Annotated[list[Literal["zstd", "br", "gzip"]], Field(min_length=1)] = ["zstd", "br", "gzip"]
    min_size: Annotated[int, Field(ge=0)] = 1024
    types: Annotated[list[Annotated[str, AfterValidator(_media_type)]], Field(min_length=1)] = [
        "text/*",
        "application/json",
        "application/javascript",
        "image/svg+xml",
    ]
    levels: CompressionLevels = Field(default_factory=CompressionLevels)

    def to_engine(self) -> dict[str, Any]:
        return {
            "algorithms": list(dict.fromkeys(self.algorithms)),
            "min_size": self.min_size,
            "types": self.types,
            "gzip_level": self.levels.gzip,
            "br_level": self.levels.br,
            "zstd_level": self.levels.zstd,
        }


class Listener(_Model):
    name: Name
    bind: Annotated[str, AfterValidator(_bind_address)]
    protocol: Annotated[Protocol, PlainValidator(_protocol)]
    pool: str
    timeouts: ListenerTimeouts = Field(default_factory=ListenerTimeouts)
    max_header_bytes: Annotated[int, Field(ge=1024, le=1_048_576)] = 65_536
    max_headers: Annotated[int, Field(ge=1, le=1000)] = 100
    rate_limit: RateLimit | None = None
    tls: ListenerTls | None = None
    routes: list[Route] = []
    udp: Udp | None = None  # udp listeners: always set (the defaults when the table is absent)
    http2: Http2 | None = None  # http/https listeners: always set (the defaults when absent)
    proxy_protocol: ProxyProtocol = Field(default_factory=ProxyProtocol)
    # http/https: X-Forwarded-For from these is believed (the right-most untrusted hop is the client)
    trusted_proxies: list[Annotated[str, AfterValidator(_cidr)]] = []
    compression: Compression | None = None  # http/https: responses encoded (docs/http.md)
    # tcp/udp: "proxy" (fastlb relays) | "kernel" (nftables NAT: not in this version)
    data_path: Literal["proxy", "kernel"] = "proxy"
    source: Literal["keep", "masquerade"] = "keep"  # data_path = "kernel" only

    @property
    def is_http(self) -> bool:
        """Speaks HTTP to its clients (http, https)."""
        return self.protocol in HTTP_PROTOCOLS

    @model_validator(mode="before")
    @classmethod
    def _protocol_defaults(cls, data: Any) -> Any:
        """Defaults that depend on the protocol: client_idle 10m on tcp/tls (nginx stream),
        ALPN h2 and http/1.1 on https, the `udp` table's defaults on udp, the `http2`
        table's on http and https."""
        if not isinstance(data, dict):
            return data
        protocol = data.get("protocol")
        timeouts = data.get("timeouts", {})
        if protocol in STREAM_PROTOCOLS and isinstance(timeouts, dict) and "client_idle" not in timeouts:
            data = {**data, "timeouts": {**timeouts, "client_idle": "10m"}}
        tls = data.get("tls")
        if protocol == "https" and isinstance(tls, dict) and "alpn" not in tls:
            data = {**data, "tls": {**tls, "alpn": list(HTTPS_ALPN)}}
        if protocol == "udp" and "udp" not in data:
            data = {**data, "udp": {}}
        if protocol in HTTP_PROTOCOLS and "http2" not in data:
            data = {**data, "http2": {}}
        return data


class Backend(_Model):
    address: Annotated[str, AfterValidator(_backend_address)]
    weight: Weight = 1
    max_connections: Annotated[int, Field(ge=0)] = 0
    backup: bool = False


class PoolTimeouts(_Model):
    connect: PositiveDuration = Duration.parse("2s")
    read: PositiveDuration = Duration.parse("30s")
    send: PositiveDuration = Duration.parse("30s")
    idle: PositiveDuration = Duration.parse("60s")


class Health(_Model):
    """Active health checks; `expect_status` None means any 2xx or 3xx, `expect_rcode` None
    any rcode but SERVFAIL (dnsdist's default)."""

    type: Literal["tcp", "http", "https", "dns", "udp", "grpc", "none"] = "tcp"
    path: Annotated[str, AfterValidator(_path)] = "/"
    expect_status: (
        Annotated[list[Annotated[int, AfterValidator(_status_code)]], Field(min_length=1)] | None
    ) = None
    expect_body: str | None = None
    host: str | None = None
    # dns: the question sent (names absolute, types and rcodes upper-case, as dnspython spells them)
    query: Annotated[str, AfterValidator(_dns_name)] = "a.root-servers.net."
    query_type: Annotated[str, AfterValidator(_query_type)] = "A"
    expect_rcode: Annotated[list[Annotated[str, AfterValidator(_rcode)]], Field(min_length=1)] | None = None
    # udp: the payload sent (UTF-8; required for type = "udp") and a substring the reply must hold
    send: Annotated[str, AfterValidator(_datagram)] = ""
    expect: Annotated[str, Field(min_length=1)] | None = None
    # grpc: the service asked about in grpc.health.v1.Health/Check ("" = the server as a whole)
    service: str = ""
    interval: PositiveDuration = Duration.parse("2s")
    timeout: PositiveDuration = Duration.parse("1s")
    rise: Annotated[int, Field(ge=1)] = 2
    fall: Annotated[int, Field(ge=1)] = 3

    def status_ok(self, status: int) -> bool:
        """Whether a check response with this status counts as healthy."""
        if self.expect_status is None:
            return 200 <= status < 400
        return status in self.expect_status

    def rcode_ok(self, rcode: str) -> bool:
        """Whether a dns check reply with this rcode (a dnspython name) counts as healthy."""
        if self.expect_rcode is None:
            return rcode != "SERVFAIL"
        return rcode in self.expect_rcode


# Health keys that only one kind of check reads: (types, keys).
HEALTH_KEYS = (
    (("http", "https"), ("path", "expect_status", "expect_body", "host")),
    (("dns",), ("query", "query_type", "expect_rcode")),
    (("udp",), ("send", "expect")),
    (("grpc",), ("service",)),
)


class Passive(_Model):
    """Outlier ejection from live traffic."""

    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    eject: PositiveDuration = Duration.parse("30s")


class Affinity(_Model):
    """Sticky cookie insert (http); ttl None = session cookie."""

    cookie: Token
    ttl: PositiveDuration | None = None


class Queue(_Model):
    """Requests waiting for a backend below its max_connections (http); 503 when full or late."""

    size: Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    timeout: PositiveDuration = Duration.parse("5s")


class PoolTls(_Model):
    """`[pools.tls]`: connect to the backends over TLS (re-encrypt)."""

    verify: Annotated[bool, PlainValidator(_verify)] = True
    ca: FilePath | None = None  # None: the system's roots
    sni: Annotated[str, AfterValidator(_server_name)] | None = None
    cert: FilePath | None = None  # client certificate (mTLS to the backends), with key
    key: FilePath | None = None
    _ca_pem: str | None = PrivateAttr(default=None)  # read by parse_config
    _pem: CertKeyPem | None = PrivateAttr(default=None)

    @property
    def ca_pem(self) -> str | None:
        return self._ca_pem

    @property
    def cert_pem(self) -> CertKeyPem | None:
        return self._pem


class Resolve(_Model):
    """`resolve = { interval }`: how often host-name backends (and `srv`) are looked up again."""

    interval: PositiveDuration = Duration.parse("5s")


class Pool(_Model):
    name: Name
    # "2": HTTP/2 to the backends (h2c with prior knowledge; ALPN h2 with [pools.tls])
    http_version: Literal["1.1", "2"] = "1.1"
    send_proxy: Literal["off", "v1", "v2"] = "off"  # PROXY header first on each backend connection
    algorithm: Literal[
        "round_robin", "least_conn", "random", "p2c", "peak_ewma", "ip_hash", "consistent_hash", "maglev"
    ] = "round_robin"
    hash_key: Annotated[str, AfterValidator(_hash_key)] = "source_ip"
    hash_balance_factor: Annotated[int, AfterValidator(_balance_factor)] = 0
    affinity: Affinity | None = None
    keepalive: Annotated[int, Field(ge=0, le=10_000)] = 256
    queue: Queue = Field(default_factory=Queue)
    backends: list[Backend] = []  # required unless srv names them
    srv: Annotated[str, AfterValidator(_srv_name)] | None = None  # backends from SRV records
    resolve: Resolve = Field(default_factory=Resolve)
    timeouts: PoolTimeouts = Field(default_factory=PoolTimeouts)
    retries: Annotated[int, Field(ge=0, le=MAX_RETRIES)] = 2
    health: Health = Field(default_factory=Health)
    passive: Passive | None = None
    tls: PoolTls | None = None
    slow_start: Duration = Duration.parse("0s")
    drain_timeout: Duration = Duration.parse("30s")

    def engine_hash_key(self) -> str | dict[str, str]:
        """hash_key as serde's externally tagged `HashKey` (header names lower-cased)."""
        if self.hash_key in ("source_ip", "path"):
            return self.hash_key
        kind, _, name = self.hash_key.partition(":")
        return {kind: name.lower() if kind == "header" else name}


_ALERT_EXPR = re.compile(r"\s*([a-z_0-9]+)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*")


def _alert_expr(text: str) -> str:
    match = _ALERT_EXPR.fullmatch(text)
    if not match:
        raise ValueError('must be "METRIC OP NUMBER", e.g. "healthy_backends < 2"')
    metric, _, number = match.groups()
    if metric not in ALERT_METRICS:
        raise ValueError(f"unknown metric {metric!r} (one of: {', '.join(ALERT_METRICS)})")
    try:
        float(number)
    except ValueError:
        raise ValueError(f"not a number: {number!r}") from None
    return text


class Alert(_Model):
    name: Name
    expr: Annotated[str, AfterValidator(_alert_expr)]
    for_: Duration = Field(Duration.parse("0s"), alias="for")

    @property
    def parts(self) -> tuple[str, str, float]:
        """(metric, operator, threshold) of `expr`."""
        match = _ALERT_EXPR.fullmatch(self.expr)
        assert match is not None
        return match.group(1), match.group(2), float(match.group(3))


DEFAULT_ALERTS: list[dict[str, str]] = [
    {"name": "UnhealthyBackends", "expr": "healthy_backends < 2", "for": "30s"},
    {"name": "HighErrorRate", "expr": "error_rate > 0.01", "for": "1m"},
    {"name": "HighLatencyP99", "expr": "latency_p99 > 0.5", "for": "1m"},
    {"name": "ManyDraining", "expr": "draining_backends > 1", "for": "5m"},
    {"name": "CanaryRolledBack", "expr": "canary_rolled_back > 0", "for": "0s"},
]


def _default_alerts() -> list[Alert]:
    return [Alert.model_validate(a) for a in DEFAULT_ALERTS]


class GeoIp(_Model):
    """`[geoip]`: the MaxMind DB that `country` route conditions look clients up in."""

    database: Annotated[str, Field(min_length=1)]  # relative to the config file's folder


class Config(_Model):
    """The whole validated configuration file."""

    runtime: Runtime = Field(default_factory=Runtime)
    geoip: GeoIp | None = None
    admin: Admin = Field(default_factory=Admin)
    log: Log = Field(default_factory=Log)
    listeners: list[Listener] = Field(min_length=1)
    pools: list[Pool] = []
    alerts: list[Alert] = Field(default_factory=_default_alerts)
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _pid_path: Path | None = PrivateAttr(default=None)
    _geoip_path: Path | None = PrivateAttr(default=None)

    @property
    def geoip_path(self) -> Path | None:
        """`geoip.database` resolved against the config file's folder."""
        return self._geoip_path

    @property
    def pid_path(self) -> Path | None:
        """`runtime.pid_file` resolved against the config file's folder."""
        return self._pid_path

    @property
    def warnings(self) -> list[str]:
        """What is accepted but looks wrong (an expired certificate...), one line each,
        `field.path: message`; `fastlb check` prints them, `fastlb serve` logs them."""
        return list(self._warnings)

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.pools if p.name == name), None)

    def to_engine(self) -> dict[str, Any]:
        """The `EngineConfig` JSON for the native engine (native/src/config.rs), no extra keys.

        Resolves host names with getaddrinfo (first result), `workers = "auto"` and the CPU
        list, then re-checks hairpins against the resolved addresses; raises ConfigError.
        """
        return _Engine(self).build()


# The marker before a MaxMind DB's metadata section, within its last 128 KiB (the format's spec).
_MMDB_MARKER = b"\xab\xcd\xefMaxMind.com"


def _mmdb_errors(path: Path) -> list[str]:
    """A cheap check that `path` is a MaxMind DB; the data plane reads it whole (and says
    more if its tree is broken)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 128 * 1024))
            tail = f.read()
    except OSError as err:
        return [f"geoip.database: cannot read {path}: {err.strerror or err}"]
    if _MMDB_MARKER not in tail:
        return [f"geoip.database: {path} is not a MaxMind DB file (no metadata marker)"]
    return []


# --- cross-field checks -----------------------------------------------------------------------

Endpoint = tuple[frozenset[IPAddr], int]  # addresses a bind/backend stands for, and its port


def _literal_endpoint(text: str, *, bind: bool) -> Endpoint:
    """Addresses known without DNS: an IP literal, or "localhost" as both loopbacks.

    Other names give an empty set here; `to_engine()` checks them again once resolved.
    """
    host, port = split_host_port(text, bind=bind)
    ip = _ip(host)
    if ip is not None:
        return frozenset({ip}), port
    if host.lower().rstrip(".") == "localhost":
        return LOOPBACKS, port
    return frozenset(), port


def _local_ips() -> frozenset[IPAddr]:
    """This host's own addresses (Linux /proc; empty elsewhere). Loopback is handled apart."""
    found: set[IPAddr] = set()
    try:
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            if "|--" in line:
                last = line.split("|--")[1].strip()
            elif "/32 host LOCAL" in line and last:
                found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def _is_wildcard(ip: IPAddr) -> bool:
    return ip.is_unspecified


def _binds_overlap(a: Endpoint, b: Endpoint) -> bool:
    """Two binds collide: same port, and the same address or a wildcard covering the other.

    `[::]` covers IPv4 too (Linux dual-stack default); port 0 never collides.
    """
    (ips_a, port_a), (ips_b, port_b) = a, b
    if port_a == 0 or port_a != port_b:
        return False
    for x in ips_a:
        for y in ips_b:
            if x == y:
                return True
            wild_v6 = (_is_wildcard(x) and x.version == 6) or (_is_wildcard(y) and y.version == 6)
            if (_is_wildcard(x) or _is_wildcard(y)) and (x.version == y.version or wild_v6):
                return True
    return False


def _hairpin(listener: Endpoint, backend: Endpoint, local: frozenset[IPAddr]) -> bool:
    """Whether connecting to `backend` reaches `listener` (a wildcard listener: any own address).

    A backend at 0.0.0.0 / :: is connected as loopback, as Linux does.
    """
    (l_ips, l_port), (b_ips, b_port) = listener, backend
    if l_port == 0 or l_port != b_port:
        return False
    for b in b_ips:
        if b.is_unspecified:
            b = ipaddress.ip_address("127.0.0.1" if b.version == 4 else "::1")
        for lip in l_ips:
            if lip == b or (lip.is_unspecified and (b.is_loopback or b in local)):
                return True
    return False


def _endpoint_errors(
    cfg: Config, listeners: list[Endpoint | None], backends: dict[tuple[int, int], Endpoint]
) -> list[str]:
    """Overlapping binds (listeners and admin) and hairpins (backend == own listener). TCP and UDP
    ports are apart: DNS binds both on the same address and port; a pool's backends can only
    reach the listeners of the transports its users speak (an unused pool: either)."""
    errors: list[str] = []
    transport = [_transport(x.protocol) for x in cfg.listeners]
    for i, ep in enumerate(listeners):
        for k in range(i):
            other = listeners[k]
            if transport[i] != transport[k]:
                continue
            if ep is not None and other is not None and _binds_overlap(ep, other):
                name = cfg.listeners[k].name
                errors.append(f"listeners[{i}].bind: already used by listener {name!r}")
                break
    if cfg.admin.bind != "off":
        admin = _literal_endpoint(cfg.admin.bind, bind=True)
        for i, ep in enumerate(listeners):
            if ep is not None and transport[i] == "tcp" and _binds_overlap(admin, ep):
                name = cfg.listeners[i].name
                errors.append(f"admin.bind: already used by listener {name!r}")
    local = _local_ips()
    users = _pool_users(cfg)
    for (i, j), backend in sorted(backends.items()):
        reach = {_transport(p) for p in users.get(cfg.pools[i].name, set())} or {"tcp", "udp"}
        for k, ep in enumerate(listeners):
            if ep is not None and transport[k] in reach and _hairpin(ep, backend, local):
                name = cfg.listeners[k].name
                errors.append(
                    f"pools[{i}].backends[{j}].address: hairpin: this is listener {name!r}"
                    " (fastlb would send traffic to itself)"
                )
                break
    return errors


def _transport(protocol: str) -> str:
    return "udp" if protocol == "udp" else "tcp"


def _duplicates(section: str, names: list[str], what: str) -> list[str]:
    seen: dict[str, int] = {}
    errors: list[str] = []
    for i, name in enumerate(names):
        if name in seen:
            errors.append(f"{section}[{i}].name: duplicate {what} {name!r} ({section}[{seen[name]}])")
        seen.setdefault(name, i)
    return errors


HTTP_ONLY = 'only for protocol = "http" or "https"'


def _route_errors(at: str, route: Route, pools: dict[str, int], protocol: Protocol) -> list[str]:
    if protocol == "tcp":
        return _sni_route_errors(at, route, pools)
    errors: list[str] = []
    if route.sni is not None:
        errors.append(f'{at}.sni: only on protocol = "tcp" listeners (TLS passthrough); use host here')
    if route.redirect is not None:
        errors += _redirect_errors(at, route, protocol)
        errors += [
            f"{at}.{key}: a redirect route forwards nothing to rewrite"
            for key in ("request_headers", "response_headers", "rewrite_prefix")
            if key in route.model_fields_set
        ]
    else:
        errors += _target_errors(at, route, pools) + _canary_errors(at, route)
    if route.rewrite_prefix is not None and route.path_prefix is None:
        errors.append(f"{at}.rewrite_prefix: needs path_prefix (the part of the path it replaces)")
    for side in ("request_headers", "response_headers"):
        rules: HeaderRules = getattr(route, side)
        for kind, names in (("set", list(rules.set)), ("add", list(rules.add)), ("remove", rules.remove)):
            errors += [
                f"{at}.{side}.{kind}: {name!r} is a field fastlb itself writes or frames messages by"
                " (docs/http.md lists them)"
                for name in names
                if name.lower() in MANAGED_FIELDS
            ]
    matchers = [m for m in ("path_prefix", "path_exact", "path_regex") if getattr(route, m)]
    if len(matchers) > 1:
        errors.append(f"{at}.{matchers[1]}: only one of path_prefix, path_exact, path_regex")
    named: dict[str, str] = {}
    for name in route.headers:
        if name.lower() in named:
            first = json.dumps(named[name.lower()])
            errors.append(
                f"{at}.headers{_key(name, at)}: same header as {first} (names are case-insensitive)"
            )
        named.setdefault(name.lower(), name)
    return errors


def _target_errors(at: str, route: Route, pools: dict[str, int]) -> list[str]:
    """Where a route sends its traffic: `pool`, or a weighted `split`."""
    errors: list[str] = []
    if route.pool is not None and route.split is not None:
        errors.append(f"{at}.split: give either pool or split, not both")
    elif route.pool is None and route.split is None:
        errors.append(f"{at}.pool: required (or split, or redirect)")
    if route.pool is not None and route.pool not in pools:
        errors.append(f"{at}.pool: unknown pool {route.pool!r}")
    if route.split is not None:
        if not route.split:
            errors.append(f"{at}.split: must not be empty")
        elif sum(e.weight for e in route.split) == 0:
            errors.append(f"{at}.split: weights must sum to more than 0")
        seen: set[str] = set()
        for k, entry in enumerate(route.split):
            if entry.pool not in pools:
                errors.append(f"{at}.split[{k}].pool: unknown pool {entry.pool!r}")
            elif entry.pool in seen:
                errors.append(f"{at}.split[{k}].pool: pool {entry.pool!r} listed twice")
            seen.add(entry.pool)
    return errors


def _redirect_errors(at: str, route: Route, protocol: Protocol) -> list[str]:
    redirect = route.redirect
    assert redirect is not None
    errors = [
        f"{at}.{key}: a redirect route has no {key}"
        for key in ("pool", "split", "canary", "split_affinity")
        if getattr(route, key)
    ]
    if redirect.scheme is None and redirect.host is None and redirect.path is None:
        errors.append(f"{at}.redirect: give at least one of scheme, host, path")
    elif redirect.host is None and redirect.path is None and redirect.scheme == protocol:
        errors.append(f'{at}.redirect.scheme: "{protocol}" on an {protocol} listener redirects to itself')
    return errors


def _sni_route_errors(at: str, route: Route, pools: dict[str, int]) -> list[str]:
    """A route on a tcp listener: `sni` (read from the ClientHello, not decrypted) and `pool`."""
    errors: list[str] = []
    if route.sni is None:
        errors.append(f"{at}.sni: required on a tcp listener (its routes match the TLS SNI)")
    for key in Route.model_fields:
        if key in route.model_fields_set and key not in ("sni", "pool", "name"):
            errors.append(f"{at}.{key}: not on a tcp listener (a route there has only name, sni and pool)")
    if route.pool is None:
        if "split" not in route.model_fields_set:
            errors.append(f"{at}.pool: required")
    elif route.pool not in pools:
        errors.append(f"{at}.pool: unknown pool {route.pool!r}")
    return errors


def _listener_errors(i: int, lst: Listener, cfg: Config, pools: dict[str, int]) -> list[str]:
    at = f"listeners[{i}]"
    errors: list[str] = []
    pp = lst.proxy_protocol
    if pp.accept != "off" and lst.protocol == "udp":
        errors.append(f"{at}.proxy_protocol: not for udp listeners (a PROXY header precedes a TCP stream)")
    elif pp.accept != "off" and not pp.from_:
        errors.append(
            f"{at}.proxy_protocol.from: list the load balancers allowed to send PROXY headers"
            ' (a header from anyone else closes the connection), e.g. ["10.0.0.0/8"]'
        )
    if lst.data_path != "proxy" and lst.protocol not in ("tcp", "udp"):
        errors.append(f'{at}.data_path: "kernel" is for tcp and udp listeners (it rewrites packets)')
    elif lst.data_path == "kernel":
        errors += _kernel_listener_errors(at, lst, cfg, pools)
    if lst.source != "keep" and lst.data_path != "kernel":
        errors.append(f'{at}.source: only with data_path = "kernel" (the proxy always connects from itself)')
    if lst.compression is not None and not lst.is_http:
        errors.append(f"{at}.compression: for http and https listeners (it encodes HTTP responses)")
    if lst.trusted_proxies and not lst.is_http:
        errors.append(
            f"{at}.trusted_proxies: for http and https listeners (X-Forwarded-For is an HTTP field);"
            " a tcp or tls listener learns the client from proxy_protocol"
        )
    if lst.pool not in pools:
        errors.append(f"{at}.pool: unknown pool {lst.pool!r}")
    if lst.is_http or lst.protocol == "udp":
        used = [lst.pool, *(r.pool for r in lst.routes if r.pool is not None)]
        used += [e.pool for r in lst.routes for e in r.split or []]
        for name in dict.fromkeys(used):
            p = pools.get(name)
            if p is None or cfg.pools[p].send_proxy == "off":
                continue
            if lst.protocol == "udp":
                errors.append(
                    f"pools[{p}].send_proxy: a PROXY header precedes a TCP stream, but udp listener"
                    f" {lst.name!r} uses this pool"
                )
            elif cfg.pools[p].http_version == "2":
                errors.append(
                    f'pools[{p}].send_proxy: not with http_version = "2" (one HTTP/2 connection'
                    " carries many clients' streams, and a PROXY header can name only one)"
                )
    if lst.protocol in TLS_PROTOCOLS and lst.tls is None:
        errors.append(
            f'{at}.tls: required for protocol = "{lst.protocol}" ([listeners.tls] with certificates)'
        )
    elif lst.protocol not in TLS_PROTOCOLS and lst.tls is not None:
        errors.append(f'{at}.tls: only for protocol = "https" or "tls"')
    elif lst.tls is not None:
        errors += _listener_tls_errors(f"{at}.tls", lst.protocol, lst.tls)
    if not lst.is_http and lst.http2 is not None:
        errors.append(f"{at}.http2: {HTTP_ONLY}")
    if lst.protocol != "udp":
        if lst.udp is not None:
            errors.append(f'{at}.udp: only for protocol = "udp"')
        if lst.timeouts.session_idle != ListenerTimeouts().session_idle:
            errors.append(f'{at}.timeouts.session_idle: only for protocol = "udp"')
    if not lst.is_http:
        errors += _stream_listener_errors(at, lst, cfg, pools)
    if lst.protocol == "udp":
        errors += _udp_listener_errors(at, lst, cfg, pools)
        return errors
    if lst.protocol == "tls" and lst.routes:
        errors.append(
            f'{at}.routes: not for protocol = "tls" (SNI routes are for "tcp" listeners, content routes'
            ' for "http" and "https")'
        )
        return errors
    for j, route in enumerate(lst.routes):
        errors += _route_errors(f"{at}.routes[{j}]", route, pools, lst.protocol)
        if route.country and cfg.geoip is None:
            errors.append(
                f'{at}.routes[{j}].country: needs [geoip] database = "..." (a MaxMind DB file) to know'
                " the client's country"
            )
    return errors + _route_name_errors(at, lst.routes)


def route_name(index: int, route: Route) -> str:
    """The name the admin API, the engine and the metrics know a route by: its `name`, or its
    index as a decimal string."""
    return route.name if route.name is not None else str(index)


def _route_name_errors(at: str, routes: list[Route]) -> list[str]:
    """Route names are unique per listener; an all-digit name must be the route's own index (so
    `{route}` in a URL names one route, whether it has a name or not)."""
    errors: list[str] = []
    seen: dict[str, int] = {}
    for j, route in enumerate(routes):
        name = route_name(j, route)
        if route.name is not None and route.name.isdigit() and route.name != str(j):
            errors.append(
                f"{at}.routes[{j}].name: an all-digit name must be the route's own index ({j}):"
                f" {route.name!r} reads as the index of another route"
            )
        elif name in seen:
            errors.append(f"{at}.routes[{j}].name: duplicate route name {name!r} ({at}.routes[{seen[name]}])")
        seen.setdefault(name, j)
    return errors


def _canary_errors(at: str, route: Route) -> list[str]:
    """`canary` and `split_affinity` want a split: a canary of two pools or more, the canary
    one of them, and the others able to take the traffic back."""
    errors: list[str] = []
    for key in ("canary", "split_affinity"):
        if getattr(route, key) is not None and route.split is None:
            errors.append(f"{at}.{key}: only on a split route (split = [...]), not on pool = ...")
    canary, split = route.canary, route.split
    if canary is None or split is None:
        return errors
    names = [e.pool for e in split]
    if len(names) < 2:
        errors.append(f"{at}.canary: the split needs at least 2 pools (the canary and a baseline)")
    elif canary.pool not in names:
        errors.append(f"{at}.canary.pool: {canary.pool!r} is not a pool of the split ({', '.join(names)})")
    elif sum(e.weight for e in split if e.pool != canary.pool) == 0:
        errors.append(
            f"{at}.split: the pools other than the canary {canary.pool!r} need a weight above 0"
            " (they take the traffic back on a rollback)"
        )
    return errors


def _listener_tls_errors(at: str, protocol: Protocol, tls: ListenerTls) -> list[str]:
    errors: list[str] = []
    if tls.client_auth != "off" and tls.client_ca is None:
        errors.append(
            f'{at}.client_auth: "{tls.client_auth}" needs client_ca (the CA of the client certificates)'
        )
    for k, name in enumerate(tls.alpn):
        if name in tls.alpn[:k]:
            errors.append(f"{at}.alpn[{k}]: {json.dumps(name)} listed twice")
        elif protocol == "https" and name not in HTTPS_ALPN:
            errors.append(f'{at}.alpn[{k}]: an https listener speaks "h2" and "http/1.1" only')
    return errors


def _stream_listener_errors(at: str, lst: Listener, cfg: Config, pools: dict[str, int]) -> list[str]:
    """tcp, tls and udp listeners relay bytes: the HTTP keys do not apply, to them or their pools."""
    errors: list[str] = []
    if lst.rate_limit is not None:
        errors.append(f"{at}.rate_limit: {HTTP_ONLY}")
    if lst.timeouts.header_read != ListenerTimeouts().header_read:
        errors.append(f"{at}.timeouts.header_read: {HTTP_ONLY}")
    for key in ("max_header_bytes", "max_headers"):
        if getattr(lst, key) != Listener.model_fields[key].default:
            errors.append(f"{at}.{key}: {HTTP_ONLY}")
    used = [lst.pool, *(r.pool for r in lst.routes if r.pool is not None)]
    for name in dict.fromkeys(used):
        if name not in pools:
            continue
        p, pool = pools[name], cfg.pools[pools[name]]
        uses = f"{lst.protocol} listener {lst.name!r} uses this pool"
        if pool.hash_key != "source_ip" and pool.algorithm in HASH_ALGORITHMS:
            errors.append(f'pools[{p}].hash_key: {uses}; only "source_ip" works for {lst.protocol}')
        if pool.affinity is not None:
            errors.append(f"pools[{p}].affinity: http only, but {uses}")
        if pool.keepalive != Pool.model_fields["keepalive"].default:
            errors.append(f"pools[{p}].keepalive: http only, but {uses}")
        if pool.queue != Queue():
            errors.append(f"pools[{p}].queue: http only, but {uses}")
        if pool.http_version != "1.1":
            errors.append(f'pools[{p}].http_version: "{pool.http_version}" is http only, but {uses}')
    return errors


KERNEL_ALGORITHMS = ("round_robin", "random", "ip_hash", "consistent_hash", "maglev")
_TERMINATED = 'needs a terminated connection, which data_path = "kernel" does not make'


def _kernel_listener_errors(at: str, lst: Listener, cfg: Config, pools: dict[str, int]) -> list[str]:
    """data_path = "kernel": nftables rewrites packets (fastlb.kernel_path), so nothing that needs
    the proxy to hold the connection applies, to the listener or to its pool."""
    errors: list[str] = []
    try:
        host, port = split_host_port(lst.bind, bind=True)
    except ValueError:
        host, port = "", 1  # the field's own validator said so
    if not isinstance(_ip(host), ipaddress.IPv4Address) or port == 0:
        errors.append(
            f'{at}.bind: data_path = "kernel" takes an IPv4 address and a port (nftables matches'
            f' them in packets), e.g. "0.0.0.0:{port or 53}", not {lst.bind!r}'
        )
    if lst.routes:
        errors.append(f"{at}.routes: SNI routes read the ClientHello, which {_TERMINATED}")
    if lst.proxy_protocol.accept != "off":
        errors.append(f"{at}.proxy_protocol: a PROXY header {_TERMINATED}")
    idle = {"client_idle": Duration.parse("10m")} if lst.protocol in STREAM_PROTOCOLS else {}
    if lst.timeouts != ListenerTimeouts(**idle):  # the protocol's defaults (_protocol_defaults)
        errors.append(
            f'{at}.timeouts: not with data_path = "kernel"; conntrack\'s timeouts apply'
            " (sysctl net.netfilter.nf_conntrack_tcp_timeout_established, ..._udp_timeout)"
        )
    if lst.udp is not None and lst.udp != Udp():
        errors.append(f'{at}.udp: not with data_path = "kernel"; conntrack balances each flow once')
    p = pools.get(lst.pool)
    if p is None:
        return errors
    pool, uses = cfg.pools[p], f'data_path = "kernel" listener {lst.name!r} uses this pool'
    if pool.algorithm not in KERNEL_ALGORITHMS:
        errors.append(
            f"pools[{p}].algorithm: {pool.algorithm} {_TERMINATED}, but {uses}; one of"
            f" {', '.join(KERNEL_ALGORITHMS)}"
        )
    for key in ("tls", "passive", "retries", "timeouts", "hash_balance_factor"):
        if key in pool.model_fields_set:
            errors.append(f"pools[{p}].{key}: {_TERMINATED}, but {uses}")
    if pool.send_proxy != "off":
        errors.append(f"pools[{p}].send_proxy: a PROXY header {_TERMINATED}, but {uses}")
    for j, b in enumerate(pool.backends):
        if b.max_connections:
            errors.append(f"pools[{p}].backends[{j}].max_connections: {_TERMINATED}, but {uses}")
        if isinstance(_ip(split_host_port(b.address)[0]), ipaddress.IPv6Address):
            errors.append(f"pools[{p}].backends[{j}].address: IPv6, but {uses} (IPv4 only for now)")
    return errors


def _udp_listener_errors(at: str, lst: Listener, cfg: Config, pools: dict[str, int]) -> list[str]:
    """A udp listener relays datagrams: no routes, no client_idle (session_idle ends a flow), and
    no TLS to its pool's backends."""
    errors: list[str] = []
    if lst.routes:
        errors.append(f'{at}.routes: not for protocol = "udp" (every datagram goes to the pool)')
    if lst.timeouts.client_idle != ListenerTimeouts().client_idle:
        errors.append(f'{at}.timeouts.client_idle: not for protocol = "udp"; a flow ends after session_idle')
    p = pools.get(lst.pool)
    if p is not None and cfg.pools[p].tls is not None:
        errors.append(f"pools[{p}].tls: not for udp, but udp listener {lst.name!r} uses this pool")
    return errors


def _pool_users(cfg: Config) -> dict[str, set[str]]:
    """The protocols of the listeners that send traffic to each pool (directly or by a route)."""
    users: dict[str, set[str]] = {}
    for lst in cfg.listeners:
        names = [lst.pool]
        for r in lst.routes:
            names += [r.pool] if r.pool is not None else [e.pool for e in r.split or []]
        for name in names:
            users.setdefault(name, set()).add(lst.protocol)
    return users


def _udp_only(cfg: Config) -> list[int]:
    """Indexes of the pools that only udp listeners use."""
    users = _pool_users(cfg)
    return [i for i, pool in enumerate(cfg.pools) if users.get(pool.name) == {"udp"}]


def _udp_health_errors(cfg: Config) -> list[str]:
    """A pool only udp listeners use has no TCP port to check: dns, udp or none."""
    errors: list[str] = []
    allowed = '"dns", "udp" or "none"'
    for i in _udp_only(cfg):
        health = cfg.pools[i].health
        if "health" not in cfg.pools[i].model_fields_set or health.type in UDP_HEALTH:
            continue
        given = "" if "type" in health.model_fields_set else " (the default)"
        errors.append(
            f'pools[{i}].health.type: "{health.type}"{given} checks a TCP port, but only udp listeners'
            f" use this pool; use {allowed}"
        )
    return errors


def _udp_health_defaults(cfg: Config) -> list[str]:
    """A pool only udp listeners use, without a `health` table, gets no active checks (the tcp
    default cannot reach a UDP service); returns the warnings that say so."""
    warnings: list[str] = []
    for i in _udp_only(cfg):
        pool = cfg.pools[i]
        if "health" in pool.model_fields_set:
            continue
        pool.health = Health(type="none")
        warnings.append(
            f"pools[{i}].health: not set on a pool only udp listeners use, so it has no active checks"
            ' (type = "none"); set type = "dns" or "udp"'
        )
    return warnings


def _address_key(text: str) -> tuple[str, int]:
    host, port = split_host_port(text)
    ip = _ip(host)
    return (str(ip) if ip is not None else host.lower().rstrip(".")), port


def _pool_errors(i: int, pool: Pool) -> list[str]:
    at = f"pools[{i}]"
    errors: list[str] = []
    if pool.srv is None and not pool.backends:
        errors.append(f'{at}.backends: required (or srv = "_service._tcp.name" to take them from DNS)')
    elif pool.srv is not None and pool.backends:
        errors.append(f"{at}.srv: give either backends or srv, not both")
    seen: dict[tuple[str, int], int] = {}
    for j, backend in enumerate(pool.backends):
        key = _address_key(backend.address)
        if key in seen:
            errors.append(f"{at}.backends[{j}].address: duplicate of backends[{seen[key]}]")
        seen.setdefault(key, j)
    hashing = ", ".join(HASH_ALGORITHMS)
    if pool.hash_key != "source_ip" and pool.algorithm not in HASH_ALGORITHMS:
        errors.append(f"{at}.hash_key: only used by {hashing}")
    elif pool.hash_key != "source_ip" and pool.algorithm == "ip_hash":
        errors.append(f'{at}.hash_key: ip_hash always uses "source_ip"; use consistent_hash')
    if pool.hash_balance_factor and pool.algorithm not in HASH_ALGORITHMS:
        errors.append(f"{at}.hash_balance_factor: only used by {hashing}")
    health = pool.health
    if health.timeout > health.interval:
        errors.append(f"{at}.health.timeout: must not exceed interval ({health.interval.text})")
    default = Health()
    for types, keys in HEALTH_KEYS:
        if health.type in types:
            continue
        only = " or ".join(f'"{t}"' for t in types)
        for name in keys:
            if getattr(health, name) != getattr(default, name):
                errors.append(f"{at}.health.{name}: only for type = {only}")
    if health.type == "udp" and not health.send:
        errors.append(f'{at}.health.send: required for type = "udp" (the payload each check sends)')
    tls = pool.tls
    if tls is not None and (tls.cert is None) != (tls.key is None):
        given, missing = ("cert", "key") if tls.key is None else ("key", "cert")
        errors.append(f"{at}.tls.{missing}: required with {given}")
    return errors


def _admin_errors(admin: Admin) -> list[str]:
    if admin.bind == "off" or admin.insecure:
        return []
    host = split_host_port(admin.bind, bind=True)[0]
    if is_loopback_host(host) or admin.tokens_file is not None:
        return []
    if admin.tls is not None and admin.tls.client_ca is not None:
        return []
    return [
        f"admin.bind: {admin.bind} is reachable beyond this machine, and anyone who reaches it could"
        " drain backends and reload: set admin.tokens_file (fastlb admin-token NAME ROLE makes"
        " tokens) or admin.tls.client_ca, or admin.insecure = true to serve it open"
    ]


def _semantic_errors(cfg: Config) -> list[str]:
    """Checks that span fields; each error names the field it is about."""
    errors = _duplicates("listeners", [x.name for x in cfg.listeners], "listener")
    errors += _duplicates("pools", [p.name for p in cfg.pools], "pool")
    errors += _duplicates("alerts", [a.name for a in cfg.alerts], "alert")
    pools: dict[str, int] = {}
    for i, pool in enumerate(cfg.pools):
        pools.setdefault(pool.name, i)
        errors += _pool_errors(i, pool)
    for i, listener in enumerate(cfg.listeners):
        errors += _listener_errors(i, listener, cfg, pools)
    errors += _udp_health_errors(cfg)
    errors += _admin_errors(cfg.admin)
    binds: list[Endpoint | None] = [_literal_endpoint(x.bind, bind=True) for x in cfg.listeners]
    backends = {
        (i, j): _literal_endpoint(b.address, bind=False)
        for i, p in enumerate(cfg.pools)
        for j, b in enumerate(p.backends)
    }
    return errors + _endpoint_errors(cfg, binds, backends)


# --- pydantic errors -> one line each ---------------------------------------------------------

_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "less_than_equal": ("<=", "le"),
    "greater_than": (">", "gt"),
    "less_than": ("<", "lt"),
}


def _message(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _PLAIN_MESSAGES:
        return _PLAIN_MESSAGES[kind]
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx[key]
        return f"must be {op} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}"
    if kind == "literal_error":
        expected = str(ctx["expected"]).replace("'", '"')
        try:
            given = json.dumps(err["input"])
        except TypeError:
            given = repr(err["input"])
        return f"must be {expected}, not {given}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return str(err["msg"])


def _unwrap(tp: Any) -> Any:
    """Strips Annotated and Optional so the walker sees the model/list/dict underneath."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or type(tp).__name__ == "UnionType":
            arms = [a for a in get_args(tp) if a is not type(None)]
            if len(arms) != 1:
                return tp
            tp = arms[0]
        else:
            return tp


def _key(item: str, path: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
        return f".{item}" if path else item
    return f"[{json.dumps(item)}]"


def _format_loc(loc: tuple[int | str, ...]) -> str:
    """A pydantic loc as a config path (`pools[0].backends[1].address`), walking the models
    so that pydantic's own tags (union arms, validator names, `[key]`) are left out."""
    path, tp = "", _unwrap(Config)
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
            tp = _unwrap(get_args(tp)[0]) if get_origin(tp) is list else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {(f.alias or n): f for n, f in tp.model_fields.items()}
            path += _key(item, path)
            tp = _unwrap(fields[item].annotation) if item in fields else None
        elif get_origin(tp) is dict:
            path += _key(item, path)
            tp = _unwrap(get_args(tp)[1])
        elif tp is None:
            path += _key(item, path)
    return path


def _pydantic_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        path = _format_loc(tuple(err["loc"])) or "config"
        lines.append(f"{path}: {_message(err)}")
    return list(dict.fromkeys(lines))


# --- entry points -----------------------------------------------------------------------------


def _read_admin_files(admin: Admin, files: Files) -> None:
    if admin.tokens_file is not None:
        data = files.read("admin.tokens_file", admin.tokens_file)
        if data is not None:
            tokens, problems = parse_tokens(data.decode("utf-8", "replace"))
            files.errors += [f"admin.tokens_file: {admin.tokens_file}: {line}" for line in problems]
            admin._tokens = tokens
            if not tokens and not problems:
                files.warnings.append(
                    f"admin.tokens_file: {admin.tokens_file} has no tokens: only {admin.open} answer"
                )
    tls = admin.tls
    if tls is not None:
        tls._pem = files.cert_and_key("admin.tls", tls.cert, tls.key, server=False)
        if tls.client_ca is not None:
            tls._client_ca_pem = files.ca_bundle("admin.tls.client_ca", tls.client_ca)


def _read_files(cfg: Config, base: Path) -> tuple[list[str], list[str]]:
    """Reads and checks every certificate, key and CA file (fastlb.certs), keeping their text
    on the models for `to_engine()`; returns (errors, warnings)."""
    files = Files(base)
    for i, lst in enumerate(cfg.listeners):
        tls = lst.tls
        if tls is None:
            continue
        at = f"listeners[{i}].tls"
        for k, pair in enumerate(tls.certificates):
            pair._pem = files.cert_and_key(f"{at}.certificates[{k}]", pair.cert, pair.key, server=True)
        if tls.client_ca is not None:
            tls._client_ca_pem = files.ca_bundle(f"{at}.client_ca", tls.client_ca)
            if tls.client_auth == "off":
                files.warnings.append(
                    f'{at}.client_ca: not used with client_auth = "off"'
                    " (clients are not asked for a certificate)"
                )
    _read_admin_files(cfg.admin, files)
    for i, pool in enumerate(cfg.pools):
        ptls = pool.tls
        if ptls is None:
            continue
        at = f"pools[{i}].tls"
        if ptls.ca is not None:
            ptls._ca_pem = files.ca_bundle(f"{at}.ca", ptls.ca)
            if not ptls.verify:
                files.warnings.append(f"{at}.ca: not used with verify = false")
        if ptls.cert is not None and ptls.key is not None:
            ptls._pem = files.cert_and_key(at, ptls.cert, ptls.key, server=False)
    return files.errors, files.warnings


def parse_config(data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validates a parsed TOML document and reads the files it names (paths relative to
    `base_dir`, default the current directory); raises ConfigError with every problem found.
    What is accepted but looks wrong is in `Config.warnings`."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(exc)) from None
    errors = _semantic_errors(cfg)
    base = Path.cwd() if base_dir is None else Path(base_dir)
    file_errors, warnings = _read_files(cfg, base)
    if cfg.runtime.pid_file is not None:
        cfg._pid_path = (base / cfg.runtime.pid_file).absolute()
        if not cfg._pid_path.parent.is_dir():
            file_errors.append(f"runtime.pid_file: {cfg._pid_path.parent} is not a folder")
    if cfg.geoip is not None:
        cfg._geoip_path = (base / cfg.geoip.database).absolute()
        file_errors += _mmdb_errors(cfg._geoip_path)
    errors = list(dict.fromkeys(errors + file_errors))
    if errors:
        raise ConfigError(errors)
    cfg._warnings = _udp_health_defaults(cfg) + warnings
    return cfg


_TOML_AT = re.compile(r"(.*) \(at line (\d+), column (\d+)\)", re.DOTALL)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Reads and validates a TOML config file and the files it names (relative to the config
    file's folder); raises ConfigError (file, syntax, fields, certificates)."""
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_AT.fullmatch(str(exc))
        if match:
            where, message = f"line {match[2]}, column {match[3]}", match[1]
        else:
            where = f"line {text.count(chr(10)) + 1} (end of file)"
            message = str(exc).replace(" (at end of document)", "")
        raise ConfigError(f"{file}: {where}: TOML syntax error: {message}") from None
    return parse_config(data, file.absolute().parent)


# --- the engine's JSON ------------------------------------------------------------------------


def _socket_addr(ip: IPAddr, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class _Engine:
    """Builds `Config.to_engine()`'s dict, collecting resolution errors as it goes."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.errors: list[str] = []

    def resolve(self, at: str, text: str, *, bind: bool) -> Endpoint | None:
        host, port = split_host_port(text, bind=bind)
        ip = _ip(host)
        if ip is None:
            flags = socket.AI_PASSIVE if bind else 0
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
                ip = _ip(str(infos[0][4][0]))
            except (OSError, UnicodeError, IndexError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc) or "no address"
                self.errors.append(f"{at}: cannot resolve {host!r}: {reason}")
                return None
            if ip is None:
                self.errors.append(f"{at}: cannot resolve {host!r}: no IP address")
                return None
        return frozenset({ip}), port

    def runtime(self) -> dict[str, Any]:
        rt = self.cfg.runtime
        if hasattr(os, "sched_getaffinity"):
            allowed = sorted(os.sched_getaffinity(0))
        else:  # pragma: no cover - non-Linux
            allowed = list(range(os.cpu_count() or 1))
        aff = rt.cpu_affinity
        cpus = allowed if aff == "auto" else [] if aff == "off" else list(aff)
        missing = [c for c in cpus if c not in allowed]
        if missing:
            self.errors.append(
                f"runtime.cpu_affinity: CPU {missing} not available to this process (allowed: {allowed})"
            )
        if isinstance(rt.workers, int):
            workers = rt.workers
        else:
            workers = len(aff) if isinstance(aff, list) else len(allowed)
        return {"workers": workers, "cpus": cpus, "max_connections": rt.max_connections}

    def build(self) -> dict[str, Any]:
        cfg = self.cfg
        runtime = self.runtime()
        binds = [self.resolve(f"listeners[{i}].bind", x.bind, bind=True) for i, x in enumerate(cfg.listeners)]
        backends: dict[tuple[int, int], Endpoint] = {}
        for i, pool in enumerate(cfg.pools):
            for j, b in enumerate(pool.backends):
                at = f"pools[{i}].backends[{j}].address"
                ep = self.resolve(at, b.address, bind=False)
                if ep is not None:
                    backends[i, j] = ep
        self.errors += _endpoint_errors(cfg, binds, backends)
        if self.errors:
            raise ConfigError(self.errors)
        listeners = [
            self.listener(i, x, _socket_addr(next(iter(ep[0])), ep[1]))
            for i, (x, ep) in enumerate(zip(cfg.listeners, binds, strict=True))
            if ep is not None and x.data_path == "proxy"  # nftables serves the others
        ]
        pools = [self.pool(i, p, backends) for i, p in enumerate(cfg.pools)]
        if self.errors:
            raise ConfigError(self.errors)
        log = self.cfg.log.access_log
        access_log = None if log == "off" else log
        geoip = None if self.cfg.geoip_path is None else str(self.cfg.geoip_path)
        return {
            "runtime": runtime,
            "access_log": access_log,
            "listeners": listeners,
            "pools": pools,
            "geoip": geoip,
        }

    def listener(self, i: int, x: Listener, bind: str) -> dict[str, Any]:
        """`ListenerConfig`; tcp and udp listeners carry the http keys too (defaults, no
        routes), every listener `udp` (null unless protocol = "udp") and `http2` (null unless
        http or https)."""
        rate = x.rate_limit
        udp = (x.udp or Udp()) if x.protocol == "udp" else None
        http2 = (x.http2 or Http2()) if x.is_http else None
        return {
            "name": x.name,
            "bind": bind,
            "protocol": x.protocol,
            "tls": None if x.tls is None else self.listener_tls(f"listeners[{i}].tls", x.tls),
            "pool": x.pool,
            "client_idle_ms": x.timeouts.client_idle.ms,
            "header_read_ms": x.timeouts.header_read.ms,
            "max_header_bytes": x.max_header_bytes,
            "max_headers": x.max_headers,
            "rate_limit": (
                None
                if rate is None
                else {"requests_per_second": float(rate.requests_per_second), "burst": rate.burst}
            ),
            "routes": [_Engine.route(k, r) for k, r in enumerate(x.routes)],
            "udp": (
                None
                if udp is None
                else {
                    "session_idle_ms": x.timeouts.session_idle.ms,
                    "responses": udp.responses,
                    "per_packet": udp.per_packet,
                    "max_sessions": udp.max_sessions,
                }
            ),
            "http2": (
                None
                if http2 is None
                else {
                    "max_concurrent_streams": http2.max_concurrent_streams,
                    "max_header_list_size": http2.max_header_list_size,
                }
            ),
            "proxy_protocol": (
                None
                if x.proxy_protocol.accept == "off"
                else {
                    "required": x.proxy_protocol.accept == "required",
                    "from": [str(ipaddress.ip_network(c, strict=False)) for c in x.proxy_protocol.from_],
                }
            ),
            "trusted_proxies": [str(ipaddress.ip_network(c, strict=False)) for c in x.trusted_proxies],
            "compression": None if x.compression is None else x.compression.to_engine(),
        }

    def unread(self, at: str) -> None:
        self.errors.append(f"{at}: file not read (build the Config with load_config or parse_config)")

    def listener_tls(self, at: str, tls: ListenerTls) -> dict[str, Any]:
        """`[listeners.tls]` with the files' PEM text (read by parse_config)."""
        certificates = []
        for k, pair in enumerate(tls.certificates):
            if pair._pem is None:
                self.unread(f"{at}.certificates[{k}].cert")
                continue
            pem = pair._pem
            certificates.append(
                {
                    "cert": pair.cert,
                    "chain_pem": pem.chain_pem,
                    "key_pem": pem.key_pem,
                    "names": list(pem.names),
                }
            )
        if tls.client_ca is not None and tls._client_ca_pem is None:
            self.unread(f"{at}.client_ca")
        return {
            "certificates": certificates,
            "min_version": tls.min_version,
            "alpn": list(tls.alpn),
            "client_ca_pem": tls._client_ca_pem,
            "client_auth": tls.client_auth,
            "session_tickets": tls.session_tickets,
        }

    def pool_tls(self, at: str, tls: PoolTls) -> dict[str, Any]:
        if tls.ca is not None and tls._ca_pem is None:
            self.unread(f"{at}.ca")
        if tls.cert is not None and tls._pem is None:
            self.unread(f"{at}.cert")
        pem = tls._pem
        return {
            "verify": tls.verify,
            "ca_pem": tls._ca_pem,
            "sni": None if tls.sni is None else tls.sni.lower().rstrip("."),
            "cert_pem": None if pem is None else pem.chain_pem,
            "key_pem": None if pem is None else pem.key_pem,
        }

    @staticmethod
    def route(index: int, r: Route) -> dict[str, Any]:
        """`RouteConfig`: its name (or index), host and sni lower-case without a trailing dot,
        header names lower-case, networks with host bits cleared, `pool = "x"` as a one-entry
        split, a redirect with no split; `canary` stays here (the control plane drives it)."""
        if r.redirect is not None:
            split = []
        elif r.split is None:
            split = [{"pool": r.pool, "weight": 1}]
        else:
            split = [{"pool": e.pool, "weight": e.weight} for e in r.split]
        redirect, affinity = r.redirect, r.split_affinity
        return {
            "name": route_name(index, r),
            "host": None if r.host is None else r.host.lower().rstrip("."),
            "path_prefix": r.path_prefix,
            "path_exact": r.path_exact,
            "path_regex": r.path_regex,
            "headers": {name.lower(): value for name, value in r.headers.items()},
            "cookies": dict(r.cookies),
            "query": dict(r.query),
            "source_cidr": [str(ipaddress.ip_network(c, strict=False)) for c in r.source_cidr],
            "country": list(r.country),
            "request_headers": r.request_headers.to_engine(),
            "response_headers": r.response_headers.to_engine(),
            "rewrite_prefix": r.rewrite_prefix,
            "sni": None if r.sni is None else r.sni.lower().rstrip("."),
            "redirect": (
                None
                if redirect is None
                else {
                    "scheme": redirect.scheme,
                    "code": redirect.code,
                    "host": redirect.host,
                    "path": redirect.path,
                }
            ),
            "split": split,
            "split_affinity": (
                None if affinity is None else {"cookie": affinity.cookie, "ttl_ms": affinity.ttl.ms}
            ),
        }

    def pool(self, i: int, pool: Pool, resolved: dict[tuple[int, int], Endpoint]) -> dict[str, Any]:
        backends = []
        for j, b in enumerate(pool.backends):
            ips, port = resolved[i, j]
            backends.append(
                {
                    "address": b.address,
                    "addr": _socket_addr(next(iter(ips)), port),
                    "weight": b.weight,
                    "max_connections": b.max_connections,
                    "backup": b.backup,
                }
            )
        t = pool.timeouts
        return {
            "name": pool.name,
            "http_version": pool.http_version,
            "send_proxy": None if pool.send_proxy == "off" else pool.send_proxy,
            "algorithm": pool.algorithm,
            "hash_key": pool.engine_hash_key(),
            "hash_balance_factor": pool.hash_balance_factor,
            "backends": backends,
            "timeouts": {
                "connect_ms": t.connect.ms,
                "read_ms": t.read.ms,
                "send_ms": t.send.ms,
                "idle_ms": t.idle.ms,
            },
            "retries": pool.retries,
            "affinity": (
                None
                if pool.affinity is None
                else {"cookie": pool.affinity.cookie, "ttl_ms": (pool.affinity.ttl or Duration(0)).ms}
            ),
            "keepalive": pool.keepalive,
            "queue": {"size": pool.queue.size, "timeout_ms": pool.queue.timeout.ms},
            "passive": (
                None if pool.passive is None else {"consecutive_failures": pool.passive.consecutive_failures}
            ),
            "tls": None if pool.tls is None else self.pool_tls(f"pools[{i}].tls", pool.tls),
        }
