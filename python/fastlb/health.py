"""Active health checks, HAProxy style: every `interval` (jittered) a TCP connect, an HTTP GET
over plain TCP or over TLS (`https`), a gRPC health Check over HTTP/2 (`grpc`), a DNS query
(`dns`) or a datagram (`udp`), per backend; `fall` consecutive failures mark it down,
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

A `grpc` check calls grpc.health.v1.Health/Check (the standard gRPC health protocol) with
`service` over one HTTP/2 connection, spoken with the `h2` library over asyncio streams: h2c
with prior knowledge, or TLS with ALPN "h2" when the pool has `[pools.tls]` (verified as an
`https` check verifies; a backend that does not agree to h2 fails). The request and reply are
tiny protobufs, written and read here by hand (no grpcio in the control plane). Healthy iff
the call ends with grpc-status 0 and the reply's status is SERVING (1); an unknown service
(grpc-status 5 NOT_FOUND), NOT_SERVING, an HTTP error or a reset stream is a failure, with the
reason in `last_error`. The call carries `grpc-timeout` = the check's timeout.

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
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.rcode
import h2.config
import h2.connection
import h2.events
import h2.exceptions

from fastlb.config import Health, PoolTls, split_host_port
from fastlb.engine import Engine

log = logging.getLogger("fastlb.health")

# Most of a check response read for `expect_body`; HAProxy's check buffer is 16 KiB.
MAX_CHECK_BODY = 64 * 1024


class TlsClient:
    """The client side of an `https` (or TLS `grpc`) check for one pool: its settings, the
    protocol offered by ALPN, and, once the first check needs it, the `ssl.SSLContext` built
    from them (the PEM texts read at load)."""

    def __init__(self, tls: PoolTls | None, alpn: str = "http/1.1") -> None:
        self.tls = tls if tls is not None else PoolTls()
        self.alpn = alpn
        self._context: ssl.SSLContext | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TlsClient) and other.tls == self.tls and other.alpn == self.alpn

    __hash__ = None  # type: ignore[assignment]

    def server_name(self, host: str) -> str:
        """The SNI and the name the certificate must carry: `sni`, else the backend's host."""
        return self.tls.sni or host

    async def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = await asyncio.to_thread(client_context, self.tls, self.alpn)
        return self._context


def client_context(tls: PoolTls, alpn: str = "http/1.1") -> ssl.SSLContext:
    """An SSLContext for connecting to backends as `tls` says, offering `alpn`; blocks (file
    reads)."""
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
    ctx.set_alpn_protocols([alpn])
    return ctx


@dataclass
class BackendHealth:
    """Check state of one backend (`pool/address`)."""

    pool: str
    address: str
    addr: str  # resolved host:port the data plane connects to
    check: Health
    host_header: str
    tls: TlsClient | None = None  # https checks, and grpc checks of a pool with [pools.tls]
    send_proxy: bool = False  # the pool's backends expect a PROXY header: checks send LOCAL
    up: bool = True
    successes: int = 0
    failures: int = 0
    checks_failed: int = 0  # every failed check since start: fastlb_backend_failures_total{kind="health"}
    last_error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return f"{self.pool}/{self.address}"

    def key(self) -> tuple[str, Health, str, TlsClient | None, bool]:
        """What a check depends on: a reload that changes none of it keeps the state."""
        return self.addr, self.check, self.host_header, self.tls, self.send_proxy

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


# A PROXY protocol v2 LOCAL header: "this is the balancer's own connection" (its health check),
# which a backend expecting PROXY headers accepts without taking an address from it.
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


async def _connect(
    host: str, port: int, context: ssl.SSLContext | None, name: str | None, send_proxy: bool
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The check's connection; to a `send_proxy` pool, a LOCAL header goes first (before TLS)."""
    if not send_proxy:
        return await asyncio.open_connection(host, port, ssl=context, server_hostname=name)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(PROXY_V2_LOCAL)
    await writer.drain()
    if context is not None:
        await writer.start_tls(context, server_hostname=name)
    return reader, writer


async def probe(b: BackendHealth) -> str:
    """One check; "" when healthy, else why not."""
    if b.check.type in ("dns", "udp"):
        return await _datagram_probe(b)
    host, port = split_host_port(b.addr)
    timeout = b.check.timeout.seconds
    context, name = None, None
    try:
        if b.check.type == "https" or b.tls is not None:  # built once, outside the check's timeout
            tls = b.tls or TlsClient(None)
            context, name = await tls.context(), tls.server_name(split_host_port(b.address)[0])
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(host, port, context, name, b.send_proxy)
            try:
                if b.check.type in ("http", "https"):
                    return await _http_probe(b, reader, writer)
                if b.check.type == "grpc":
                    return await _grpc_probe(b, reader, writer)
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


# --- grpc: grpc.health.v1.Health/Check over HTTP/2 --------------------------------------------

GRPC_CHECK_PATH = "/grpc.health.v1.Health/Check"
SERVING = 1  # HealthCheckResponse.ServingStatus
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); raises ValueError when cut short or longer than 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def health_check_request(service: str) -> bytes:
    """`HealthCheckRequest {service}` as one uncompressed, length-prefixed gRPC message (proto3
    leaves out an empty string: the message is then empty)."""
    raw = service.encode()
    body = b"\x0a" + _varint(len(raw)) + raw if raw else b""  # field 1, wire type 2 (bytes)
    return b"\x00" + len(body).to_bytes(4, "big") + body


def serving_status(message: bytes) -> int:
    """The `status` (field 1, a varint) of a `HealthCheckResponse`; 0 (UNKNOWN) when absent, the
    last one when repeated (protobuf's rule); other fields are skipped. Raises ValueError."""
    pos, status = 0, 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(message, pos)
            if number == 1:
                status = value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _read_varint(message, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(message):
            raise ValueError("truncated field")
    return status


def _grpc_reply(headers: dict[str, str], trailers: dict[str, str], body: bytes) -> str:
    """The verdict on a finished call: "" when healthy, else why not."""
    status = headers.get(":status", "")
    if status != "200":
        return f"HTTP status {status or '(none)'}"
    kind = headers.get("content-type", "")
    if not kind.startswith("application/grpc"):
        return f"not a gRPC response (content-type {kind or '(none)'})"
    ending = trailers or headers  # trailers-only: the status is in the headers
    code = ending.get("grpc-status")
    if code is None:
        return "no grpc-status in the reply"
    if code != "0":
        name = GRPC_CODES[int(code)] if code.isdigit() and int(code) < len(GRPC_CODES) else "?"
        message = urllib.parse.unquote(ending.get("grpc-message", ""))
        return f"grpc-status {code} ({name})" + (f": {message}" if message else "")
    if len(body) < 5:
        return "no response message"
    if body[0] & 1:
        return "compressed response message (none was asked for)"
    size = int.from_bytes(body[1:5], "big")
    if len(body) < 5 + size:
        return "response message cut short"
    try:
        serving = serving_status(body[5 : 5 + size])
    except ValueError as exc:
        return f"not a HealthCheckResponse: {exc}"
    if serving != SERVING:
        return f"status {SERVING_STATUS.get(serving, str(serving))}"
    return ""


async def _grpc_probe(b: BackendHealth, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """One Health/Check call on a fresh HTTP/2 connection (h2c, or TLS that agreed to h2); the
    connection is dropped once the verdict is in."""
    try:
        return await _grpc_call(b, reader, writer)
    finally:
        # a gRPC server keeps the connection open after our GOAWAY, and closing TLS would wait
        # for its close_notify: the check is over, so the connection is dropped
        writer.transport.abort()


async def _grpc_call(b: BackendHealth, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        agreed = ssl_object.selected_alpn_protocol() or "none"
        return f"TLS: the backend did not agree to h2 by ALPN ({agreed})"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "http" if ssl_object is None else "https"),
            (":path", GRPC_CHECK_PATH),
            (":authority", b.address),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", f"{max(1, b.check.timeout.ms)}m"),
            ("user-agent", "fastlb-health"),
        ],
    )
    conn.send_data(stream, health_check_request(b.check.service), end_stream=True)
    headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    body = b""
    try:
        while True:
            writer.write(conn.data_to_send())
            await writer.drain()
            data = await reader.read(65_536)
            if not data:
                return "connection closed before the answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    headers = dict(_text_headers(event.headers))
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream:
                    trailers = dict(_text_headers(event.headers))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data or b""
                    if len(body) > MAX_CHECK_BODY:
                        return f"response larger than {MAX_CHECK_BODY} bytes"
                    conn.acknowledge_received_data(event.flow_controlled_length or 0, stream)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    return f"stream reset by the backend ({_h2_error(event.error_code)})"
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return f"GOAWAY from the backend ({_h2_error(event.error_code)})"
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    conn.close_connection()
                    writer.write(conn.data_to_send())
                    await writer.drain()
                    return _grpc_reply(headers, trailers, body)
    except h2.exceptions.ProtocolError as exc:
        return f"HTTP/2 protocol error: {exc}"


def _text_headers(headers: Iterable[tuple[bytes, bytes]] | None) -> list[tuple[str, str]]:
    """h2's header pairs (bytes) as text."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers or []]


def _h2_error(code: object) -> str:
    return getattr(code, "name", None) or str(code)


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
            tls = None
            if pool.health.type == "https":
                tls = TlsClient(pool.tls)
            elif pool.health.type == "grpc" and pool.tls is not None:
                tls = TlsClient(pool.tls, alpn="h2")
            for backend in pool.backends:
                host = pool.health.host or split_host_port(backend.address)[0]
                b = BackendHealth(
                    pool.name, backend.address, resolved[backend.address], pool.health, host, tls,
                    send_proxy=pool.send_proxy != "off",
                )  # fmt: skip
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
