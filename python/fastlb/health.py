"""Active health checks, HAProxy style: every `interval` (jittered) a TCP connect, an HTTP GET
over plain TCP or over TLS (`https`), a DNS query (`dns`) or a datagram (`udp`), per backend;
`fall` consecutive failures mark it down,
`rise` consecutive successes mark it up again. A flip is pushed to the data plane at once
(`Engine.set_backend_up`) and logged.

Checks run on the control plane's event loop; nothing here touches a worker thread. A backend
starts up (as in HAProxy) and its first check comes at a random point of the first interval, so
thousands of backends do not check in lockstep.

A backend that passive detection ejected (`eject`) is held down: checks keep running, but
successes count only once its `eject` time has passed (the control plane owns that deadline:
`held`), and then `rise` of them bring it back.

An `https` check speaks TLS as the pool's `[pools.tls]` says (without it: verify against the
system's roots): `ca` or the system's roots when `verify` is true, `sni` or else the backend's
host as the server name, the client certificate if given. The TLS context is built once per
pool settings, in a thread (loading the system's roots reads a file), and shared by the pool's
checks.

`dns` and `udp` checks send one datagram from a connected UDP socket (an asyncio datagram
endpoint), so only the backend's address is heard from and an ICMP port unreachable fails the
check at once (ECONNREFUSED) instead of waiting out the timeout. `dns` sends a query for `query`
/ `query_type` (dnspython builds it, with a random ID) and waits for the reply to it: a datagram
that is not a DNS response to this query (another ID, another question) is ignored; the
reply's rcode decides (`expect_rcode`, default any but SERVFAIL). `udp` sends `send` and is
healthy at the first reply that holds `expect` (any reply without it).

The verdict itself is the engine's (one owner of backend state): a check entry created for a
backend that already runs, because a reload changed its check or added checks to its pool,
starts from the engine's verdict, not from "up".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.rcode

from fastlb.config import Health, PoolTls, split_host_port
from fastlb.engine import Engine

log = logging.getLogger("fastlb.health")

# Most of a check response read for `expect_body`; HAProxy's check buffer is 16 KiB.
MAX_CHECK_BODY = 64 * 1024


class TlsClient:
    """The client side of an `https` check for one pool: its settings and, once the first
    check needs it, the `ssl.SSLContext` built from them (the PEM texts read at load)."""

    def __init__(self, tls: PoolTls | None) -> None:
        self.tls = tls if tls is not None else PoolTls()
        self._context: ssl.SSLContext | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TlsClient) and other.tls == self.tls

    __hash__ = None  # type: ignore[assignment]

    def server_name(self, host: str) -> str:
        """The SNI and the name the certificate must carry: `sni`, else the backend's host."""
        return self.tls.sni or host

    async def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = await asyncio.to_thread(client_context, self.tls)
        return self._context


def client_context(tls: PoolTls) -> ssl.SSLContext:
    """An SSLContext for connecting to backends as `tls` says; blocks (file reads)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif tls.ca_pem is not None:
        ctx.load_verify_locations(cadata=tls.ca_pem)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    pem = tls.cert_pem
    if pem is not None:
        # ssl loads a certificate and key only from a file: a private one, removed at once
        fd, name = tempfile.mkstemp(prefix="fastlb-health-", suffix=".pem")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(pem.chain_pem.rstrip("\n") + "\n" + pem.key_pem)
            ctx.load_cert_chain(name)
        finally:
            os.unlink(name)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass
class BackendHealth:
    """Check state of one backend (`pool/address`)."""

    pool: str
    address: str
    addr: str  # resolved host:port the data plane connects to
    check: Health
    host_header: str
    tls: TlsClient | None = None  # https checks
    up: bool = True
    successes: int = 0
    failures: int = 0
    checks_failed: int = 0  # every failed check since start: fastlb_backend_failures_total{kind="health"}
    last_error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return f"{self.pool}/{self.address}"

    def key(self) -> tuple[str, Health, str, TlsClient | None]:
        """What a check depends on: a reload that changes none of it keeps the state."""
        return self.addr, self.check, self.host_header, self.tls

    def record(self, ok: bool, error: str = "", held: bool = False) -> bool | None:
        """Counts one result; returns the new state when it flips, else None. `held`: the
        backend is within an ejection, so a success does not count."""
        if ok and held:
            self.successes = 0
            return None
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if not self.up and self.successes >= self.check.rise:
                self.up = True
                return True
        else:
            self.checks_failed += 1
            self.failures, self.successes = self.failures + 1, 0
            self.last_error = error
            if self.up and self.failures >= self.check.fall:
                self.up = False
                return False
        return None

    def eject(self) -> None:
        """Passive detection took the backend out: down, and `rise` passing checks after the
        hold are needed to come back."""
        self.up, self.successes, self.failures = False, 0, 0
        self.last_error = "ejected by passive detection"

    def carry_over(self, old: BackendHealth | None, engine_up: bool) -> None:
        """A fresh entry for a backend already running: the verdict is the engine's; the
        counters and the last error continue from the entry it replaces."""
        self.up = engine_up
        if old is not None:
            self.checks_failed, self.last_error = old.checks_failed, old.last_error


async def probe(b: BackendHealth) -> str:
    """One check; "" when healthy, else why not."""
    if b.check.type in ("dns", "udp"):
        return await _datagram_probe(b)
    host, port = split_host_port(b.addr)
    timeout = b.check.timeout.seconds
    context, name = None, None
    try:
        if b.check.type == "https":  # built once, outside the check's timeout
            tls = b.tls or TlsClient(None)
            context, name = await tls.context(), tls.server_name(split_host_port(b.address)[0])
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=name)
            try:
                if b.check.type in ("http", "https"):
                    return await _http_probe(b, reader, writer)
                return ""
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"no answer within {b.check.timeout.text}"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: certificate not accepted: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS: {exc.reason or exc}"
    except OSError as exc:
        return exc.strerror or str(exc)


async def _http_probe(b: BackendHealth, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    request = (
        f"GET {b.check.path} HTTP/1.1\r\nHost: {b.host_header}\r\nConnection: close\r\n"
        "User-Agent: fastlb-health\r\nAccept: */*\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return f"not an HTTP response: {status_line[:60]!r}"
    status = int(parts[1])
    if not b.check.status_ok(status):
        return f"status {status}"
    if b.check.expect_body is not None:
        body = await reader.read(MAX_CHECK_BODY)
        while len(body) < MAX_CHECK_BODY and (more := await reader.read(MAX_CHECK_BODY - len(body))):
            body += more
        if b.check.expect_body.encode() not in body:
            return f"body lacks {b.check.expect_body!r}"
    return ""


# A reply's verdict: None = not an answer to this check (ignored), "" = healthy, else why not.
Verdict = Callable[[bytes], str | None]


class _Exchange(asyncio.DatagramProtocol):
    """One datagram check on a connected socket: `result` gets the first verdict that is not
    None, or the socket's error (ECONNREFUSED: an ICMP port unreachable came back)."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.result: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.ignored = 0  # datagrams that were not an answer to this check

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.result.done():
            return
        verdict = self.verdict(data)
        if verdict is None:
            self.ignored += 1
        else:
            self.result.set_result(verdict)

    def error_received(self, exc: Exception) -> None:
        if not self.result.done():
            self.result.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.result.done():
            self.result.set_exception(exc or ConnectionError("socket closed"))


def _dns_verdict(check: Health) -> tuple[bytes, Verdict]:
    """The query to send and the verdict on a datagram that comes back."""
    query = dns.message.make_query(check.query, check.query_type)

    def verdict(data: bytes) -> str | None:
        try:
            reply = dns.message.from_wire(data, ignore_trailing=True, raise_on_truncation=True)
        except dns.message.Truncated as exc:  # TC set (maybe cut short): its header still counts
            reply = exc.kwargs["message"]
        except dns.exception.DNSException:
            return None  # not DNS: not the answer
        if not query.is_response(reply):
            return None
        rcode = dns.rcode.to_text(reply.rcode())
        if check.rcode_ok(rcode):
            return ""
        expected = "any but SERVFAIL" if check.expect_rcode is None else " or ".join(check.expect_rcode)
        return f"rcode {rcode} (expected {expected})"

    return query.to_wire(), verdict


def _udp_verdict(check: Health) -> tuple[bytes, Verdict]:
    expect = None if check.expect is None else check.expect.encode()

    def verdict(data: bytes) -> str | None:
        if expect is None or expect in data:
            return ""
        return f"reply lacks {check.expect!r}: {data[:60]!r}"

    return check.send.encode(), verdict


async def _datagram_probe(b: BackendHealth) -> str:
    """A `dns` or `udp` check: one datagram out, the first answer decides."""
    host, port = split_host_port(b.addr)
    payload, verdict = _dns_verdict(b.check) if b.check.type == "dns" else _udp_verdict(b.check)
    loop = asyncio.get_running_loop()
    exchange: _Exchange | None = None
    try:
        async with asyncio.timeout(b.check.timeout.seconds):
            transport, exchange = await loop.create_datagram_endpoint(
                lambda: _Exchange(verdict), remote_addr=(host, port)
            )
            try:
                transport.sendto(payload)
                return await exchange.result
            finally:
                transport.close()
    except TimeoutError:
        ignored = exchange.ignored if exchange is not None else 0
        other = f" ({ignored} other datagram{'s' if ignored != 1 else ''} ignored)" if ignored else ""
        return f"no answer within {b.check.timeout.text}{other}"
    except ConnectionRefusedError:
        return "port unreachable (ICMP)"
    except OSError as exc:
        return exc.strerror or str(exc)


class HealthChecker:
    """All active checks of a running engine; `update()` follows reloads. `on_flip(id, up)` is
    called after each flip has been pushed to the engine; `held(id)` says whether the backend is
    within an ejection."""

    def __init__(
        self,
        engine: Engine,
        on_flip: Callable[[str, bool], None] | None = None,
        held: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self.engine = engine
        self.on_flip = on_flip
        self.held = held
        self.backends: dict[str, BackendHealth] = {}

    def start(self) -> None:
        self.update()

    def update(self) -> None:
        """Follows the engine's config (call after `Engine.update`): starts checks for new or
        changed backends and stops those of removed ones; an unchanged backend keeps its state
        and counters."""
        config = self.engine.config
        spec = {p["name"]: p for p in self.engine.spec["pools"]}
        wanted: dict[str, BackendHealth] = {}
        for pool in config.pools:
            if pool.health.type == "none":
                continue
            resolved = {b["address"]: b["addr"] for b in spec[pool.name]["backends"]}
            tls = TlsClient(pool.tls) if pool.health.type == "https" else None
            for backend in pool.backends:
                host = pool.health.host or split_host_port(backend.address)[0]
                b = BackendHealth(
                    pool.name, backend.address, resolved[backend.address], pool.health, host, tls
                )
                wanted[b.id] = b
        for key, new in list(wanted.items()):
            old = self.backends.get(key)
            if old is not None and new.key() == old.key():
                wanted[key] = old
                continue
            if old is not None and old.task is not None:
                old.task.cancel()
            # KeyError: not in the engine yet, a first start, where every backend is up
            with contextlib.suppress(KeyError):
                new.carry_over(old, self.engine.backend_state(new.pool, new.address).up)
        for key, old in self.backends.items():
            if key not in wanted and old.task is not None:
                old.task.cancel()
        for b in wanted.values():
            if b.task is None:
                b.task = asyncio.get_running_loop().create_task(self._loop(b), name=f"health {b.id}")
        self.backends = wanted

    async def stop(self) -> None:
        tasks = [b.task for b in self.backends.values() if b.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.backends = {}

    async def _loop(self, b: BackendHealth) -> None:
        interval = b.check.interval.seconds
        await asyncio.sleep(random.uniform(0, interval))  # spread the first checks
        while True:
            error = await probe(b)
            flipped = b.record(not error, error, self.held(b.id))
            if flipped is not None:
                self._push(b, flipped)
            # +-10% jitter keeps checks from drifting into lockstep (HAProxy spread-checks)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    def _push(self, b: BackendHealth, up: bool) -> None:
        try:
            self.engine.set_backend_up(b.pool, b.address, up)
        except KeyError:
            return  # removed by a reload in the meantime
        if up:
            log.info("backend %s is up (%d checks passed)", b.id, b.check.rise)
        else:
            log.warning("backend %s is down (%d checks failed: %s)", b.id, b.check.fall, b.last_error)
        if self.on_flip is not None:
            self.on_flip(b.id, up)
