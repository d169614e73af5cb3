"""gRPC through a real `fastlb serve` (issue 13): grpcio clients and grpcio backends (tests/grpcutil.py)
on loopback, through an h2c `http` listener and an `https` listener (ALPN h2) in front of pools with
`http_version = "2"`.

Every call shape (unary, server, client and bidi streaming), 4 MiB messages, status codes, details
and trailing metadata end to end, deadlines and cancellation carried to the backend, the answers
fastlb makes itself (trailers-only, grpc-status mapped from its HTTP status), per-call balancing on
one channel, and the grpc health check type.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from admin import scrape, state_of
from grpcutil import SERVICE, Client, GrpcBackend, channel
from h2conf import Certs, config, listener, pool
from h2server import H2Backend
from h2util import H2Client

from conftest import FastlbProcess, free_port, wait_until

KINDS = ("h2c", "tls")  # the two listeners every topology has


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def grpc_backends() -> Iterator[Callable[..., GrpcBackend]]:
    started: list[GrpcBackend] = []

    def start(name: str, tls: tuple[bytes, bytes] | None = None) -> GrpcBackend:
        b = GrpcBackend(name, tls)
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


@dataclass
class Lb:
    proc: FastlbProcess
    ports: dict[str, int]  # listener name -> port
    admin: int
    backends: list[GrpcBackend]
    certs: Certs

    def client(self, kind: str) -> Client:
        """A client on a new channel to the `h2c` or the `tls` listener."""
        if kind == "tls":
            return Client(channel(self.ports["tls"], ca=self.certs.ca_pem()))
        return Client(channel(self.ports[kind]))


@pytest.fixture
def grpc_lb(fastlb, grpc_backends, certs) -> Callable[..., Lb]:
    """`grpc_lb(n, *extra_parts, routes=...)`: fastlb with listeners `h2c` (http) and `tls` (https,
    a certificate for site.test) in front of pool `grpc` (http_version 2, round robin) of `n`
    grpcio backends g1..gn; `extra_parts` are more pools or listeners, `routes` go on both."""

    def start(n: int = 3, *extra: str, routes: tuple[dict[str, object], ...] = ()) -> Lb:
        backends = [grpc_backends(f"g{i + 1}") for i in range(n)]
        ports = {"h2c": free_port(), "tls": free_port()}
        admin = free_port()
        tls = {"certificates": [certs.issue("site", "site.test")]}
        cfg = config(
            listener("h2c", ports["h2c"], "http", "grpc", routes=list(routes)),
            listener("tls", ports["tls"], "https", "grpc", tls=tls, routes=list(routes)),
            pool("grpc", [b.address for b in backends], http_version="2"),
            *extra,
            admin=admin,
        )
        proc = fastlb(cfg, ports["tls"])
        return Lb(proc, ports, admin, backends, certs)

    return start


def metric(admin: int, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in scrape(admin).items() if n == name and set(labels.items()) <= set(ls))


# --- every call shape, both listeners ------------------------------------------------------------


def test_unary_call_reaches_the_backend_with_forwarding_metadata(grpc_lb):
    lb = grpc_lb(1)
    for kind in KINDS:
        with lb.client(kind) as c:
            assert c.unary(b"hello " + kind.encode(), timeout=10) == b"hello " + kind.encode()
            answer = json.loads(c.whoami(b"", timeout=10, metadata=(("x-client", "yes"),)))
        md = dict(answer["metadata"])
        assert answer["name"] == "g1"
        assert md["x-client"] == "yes"  # the client's metadata arrives
        assert md["x-forwarded-for"] == "127.0.0.1"
        assert md["x-forwarded-proto"] == ("https" if kind == "tls" else "http")
    assert lb.backends[0].count("Unary") == 2


def test_server_streaming_10k_messages_in_order(grpc_lb):
    lb = grpc_lb(1)
    for kind in KINDS:
        with lb.client(kind) as c:
            got = [m[:8] for m in c.stream(b"10000:64", timeout=60)]
        assert got == [f"{i:08d}".encode() for i in range(10000)], kind


def test_client_streaming_sum(grpc_lb):
    lb = grpc_lb(1)
    messages = [os.urandom(i % 1500) for i in range(1000)]
    want = {
        "count": 1000,
        "bytes": sum(map(len, messages)),
        "sha256": hashlib.sha256(b"".join(messages)).hexdigest(),
    }
    for kind in KINDS:
        with lb.client(kind) as c:
            assert json.loads(c.sum(iter(messages), timeout=30)) == want, kind


def test_bidi_streaming_ping_pong(grpc_lb):
    """Each message's echo arrives before the next message is sent: fastlb relays every DATA frame
    as it comes, in both directions, without waiting for the end of either stream."""
    lb = grpc_lb(1)
    for kind in KINDS:
        outgoing: queue.Queue[bytes | None] = queue.Queue()

        def requests(q: queue.Queue[bytes | None] = outgoing) -> Iterator[bytes]:
            while (m := q.get(timeout=10)) is not None:
                yield m

        with lb.client(kind) as c:
            call = c.bidi(requests(), timeout=30)
            for i in range(200):
                outgoing.put(f"ping {i}".encode())
                assert next(call) == f"ping {i}".encode(), (kind, i)
            outgoing.put(None)
            assert list(call) == []
            assert call.code() == grpc.StatusCode.OK


def test_4_mib_message_each_way(grpc_lb):
    lb = grpc_lb(1)
    for kind in KINDS:
        data = os.urandom(4 << 20)
        with lb.client(kind) as c:
            back = c.unary(data, timeout=60)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), kind


def test_status_details_and_metadata_intact(grpc_lb):
    lb = grpc_lb(1)
    failing = {
        "code": grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "details": "not yet: 100% ünïcode, \r\n and all",
        "initial": [["x-initial", "first"]],
        "trailing": [["x-trailer", "last"], ["x-raw-bin", "\x00\x01\xfe\xff"]],
    }
    for kind in KINDS:
        with lb.client(kind) as c:
            with pytest.raises(grpc.RpcError) as info:
                c.fail(json.dumps(failing).encode(), timeout=10)
            err = info.value
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, kind
            assert err.details() == failing["details"]
            assert ("x-initial", "first") in [tuple(m) for m in err.initial_metadata()]
            trailing = [tuple(m) for m in err.trailing_metadata()]
            assert ("x-trailer", "last") in trailing
            assert ("x-raw-bin", b"\x00\x01\xfe\xff") in trailing
            # A successful call's trailing metadata arrives too (trailers after the body).
            ok = {"code": 0, "trailing": [["x-trailer", "ok"]]}
            body, call = c.fail.with_call(json.dumps(ok).encode(), timeout=10)
            assert body == b"fail-body" and call.code() == grpc.StatusCode.OK
            assert ("x-trailer", "ok") in [tuple(m) for m in call.trailing_metadata()]


# --- deadlines and cancellation ------------------------------------------------------------------


def test_deadline_exceeded_and_the_backend_call_ends(grpc_lb):
    lb = grpc_lb(1)
    backend = lb.backends[0]
    for kind in KINDS:
        with lb.client(kind) as c:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                c.sleep(f"5000:deadline-{kind}".encode(), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 3
            # The client gave up; the backend's call ends too, long before its 5 s.
            assert backend.ended(f"deadline-{kind}").wait(4), kind
            assert c.unary(b"still fine", timeout=10) == b"still fine"


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_request(c: H2Client, path: str, message: bytes = b"", extra: tuple[tuple[str, str], ...] = ()):
    headers = [("content-type", "application/grpc"), ("te", "trailers"), *extra]
    return c.wait(c.request("POST", path, headers, grpc_frame(message)), timeout=15)[0]


def test_grpc_timeout_shorter_than_the_backend_ends_the_call(fastlb, certs):
    """A client that sends `grpc-timeout` and then waits without cancelling: fastlb ends the call
    with DEADLINE_EXCEEDED when it expires, although the backend (which ignores grpc-timeout)
    would answer much later."""
    slow = H2Backend("slow")
    try:
        port = free_port()
        fastlb(
            config(listener("h2c", port, "http", "slow"), pool("slow", [slow.address], http_version="2")),
            port,
        )
        with H2Client(port) as c:
            t0 = time.monotonic()
            r = grpc_request(c, "/sleep/5000", b"", (("grpc-timeout", "300m"),))
            took = time.monotonic() - t0
        assert r.status == 200 and (r.header("grpc-status") or r.trailer("grpc-status")) == "4", r
        assert 0.25 < took < 3, took
    finally:
        slow.close()


def test_cancelled_streaming_call_is_cancelled_at_the_backend(grpc_lb):
    lb = grpc_lb(1)
    backend = lb.backends[0]
    for kind in KINDS:
        with lb.client(kind) as c:
            call = c.forever(f"cancel-{kind}".encode(), timeout=60)
            for _ in range(3):
                next(call)
            assert not backend.ended(f"cancel-{kind}").is_set()
            call.cancel()
            # The client's RST_STREAM reaches the backend as a reset of fastlb's stream to it.
            assert backend.ended(f"cancel-{kind}").wait(5), kind
            assert c.unary(b"after", timeout=10) == b"after"
    assert wait_until(lambda: metric(lb.admin, "fastlb_http2_resets_total", side="client") >= 2)


# --- answers fastlb makes itself -----------------------------------------------------------------


def test_unavailable_when_the_pool_has_no_usable_backend(grpc_lb):
    dead = free_port()  # nothing listens: connect refused
    routes = ({"path_prefix": "/fastlb.down.", "pool": "down"},)
    lb = grpc_lb(1, pool("down", [f"127.0.0.1:{dead}"], http_version="2", retries=0), routes=routes)
    for kind in KINDS:
        with lb.client(kind) as c:
            assert c.unary(b"up", timeout=10) == b"up"
            down = c.channel.unary_unary("/fastlb.down.Echo/Unary")
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                down(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert time.monotonic() - t0 < 5
            assert c.unary(b"still up", timeout=10) == b"still up"  # the channel is unharmed
    # On the wire: trailers-only, HTTP 200, application/grpc, grpc-status 14.
    with H2Client(lb.ports["h2c"]) as h:
        r = grpc_request(h, "/fastlb.down.Echo/Unary")
    assert r.status == 200 and r.reset is None, r
    assert (r.header("content-type") or "").startswith("application/grpc"), r.headers
    assert r.header("grpc-status") == "14", r.headers
    assert r.body == b"" and r.trailers == []


def test_unavailable_when_every_backend_is_down_and_rate_limit_is_resource_exhausted(
    fastlb, grpc_backends, certs
):
    g = grpc_backends("g1")
    port, limited, admin = free_port(), free_port(), free_port()
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there: the tcp check fails at once
    sick = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}
    cfg = config(
        listener("h2c", port, "http", "sick"),
        listener("limited", limited, "http", "ok", rate_limit={"requests_per_second": 0.2, "burst": 1}),
        pool("sick", [gone], http_version="2", health=sick),
        pool("ok", [g.address], http_version="2"),
        admin=admin,
    )
    fastlb(cfg, port)
    assert wait_until(lambda: state_of(admin, "sick", gone) == "down", 10)
    with Client(channel(port)) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            c.unary(b"x", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert time.monotonic() - t0 < 5  # answered at once (no healthy backend), not queued
    with Client(channel(limited)) as c:
        assert c.unary(b"first", timeout=10) == b"first"
        with pytest.raises(grpc.RpcError) as info:
            c.unary(b"second", timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert g.count("Unary") == 1


# --- balancing -----------------------------------------------------------------------------------


def test_3000_calls_on_one_channel_spread_over_3_backends(grpc_lb):
    """A gRPC channel is one HTTP/2 connection: fastlb balances each call (stream), not the
    connection."""
    lb = grpc_lb(3)
    with lb.client("h2c") as c:
        names = Counter(c.name(timeout=10) for _ in range(3000))
    assert set(names) == {"g1", "g2", "g3"}, names
    for n in names.values():
        assert abs(n / 3000 - 1 / 3) <= 0.05, names
    assert sum(b.count("Whoami") for b in lb.backends) == 3000


# --- health --------------------------------------------------------------------------------------


def test_grpc_health_service_through_fastlb(grpc_lb):
    lb = grpc_lb(1)
    for kind in KINDS:
        with lb.client(kind) as c:
            assert c.check() == 1 and c.check(SERVICE) == 1
            lb.backends[0].set_serving(False, SERVICE)
            assert c.check(SERVICE) == 2 and c.check() == 1
            lb.backends[0].set_serving(True, SERVICE)


@pytest.mark.parametrize("backend_tls", [False, True], ids=["h2c-backends", "tls-backends"])
def test_grpc_health_check_takes_a_not_serving_backend_out(fastlb, grpc_backends, certs, backend_tls):
    """`health = { type = "grpc" }`: a backend answering NOT_SERVING for the service goes down and
    gets no calls; SERVING again brings it back. With [pools.tls] fastlb reaches the backends (data
    and checks) over TLS with ALPN h2."""
    tls = None
    pool_tls: dict[str, object] = {}
    if backend_tls:
        certs.issue("backend", "backend.test")
        tls = certs.key_and_chain("backend")
        pool_tls = {"tls": {"ca": "ca.pem", "sni": "backend.test"}}
    g1, g2 = grpc_backends("g1", tls), grpc_backends("g2", tls)
    port, admin = free_port(), free_port()
    check = {
        "type": "grpc",
        "service": SERVICE,
        "interval": "250ms",
        "timeout": "250ms",
        "rise": 1,
        "fall": 1,
    }
    cfg = config(
        listener("h2c", port, "http", "app"),
        pool("app", [g1.address, g2.address], http_version="2", health=check, **pool_tls),
        admin=admin,
    )
    fastlb(cfg, port)
    with Client(channel(port)) as c:
        assert Counter(c.name() for _ in range(20)) == {"g1": 10, "g2": 10}
        g2.set_serving(False, SERVICE)
        assert wait_until(lambda: state_of(admin, "app", g2.address) == "down", 10)
        assert Counter(c.name() for _ in range(20)) == {"g1": 20}
        g2.set_serving(True, SERVICE)
        assert wait_until(lambda: state_of(admin, "app", g2.address) == "up", 10)
        assert set(Counter(c.name() for _ in range(20))) == {"g1", "g2"}
    assert state_of(admin, "app", g1.address) == "up"
