"""The control plane through real processes: failover, passive ejection, slow start, backup,
draining, runtime weight, hot reload, graceful stop, the admin API and `fastlb ctl`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from admin import Stream, api, backend_status, state_of
from httpbackend import HttpBackend, payload
from httputil import RawConn, get, http_config, pool

from conftest import free_port, wait_until
from l4util import l4_config, name_then_echo, tcp_connect


def echoes(s: socket.socket, data: bytes = b"ping") -> bool:
    try:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(len(data) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == data
    except OSError:
        return False


CHECKS = {"type": "http", "path": "/health", "interval": "200ms", "timeout": "100ms", "rise": 2, "fall": 2}


def not_checks(b: HttpBackend) -> int:
    return sum(1 for r in b.received if r.header("user-agent") != "fastlb-health")


# --- failover, slow start ---------------------------------------------------------------------


def test_killed_backend_costs_no_request_is_marked_down_in_time_and_ramps_back(hb, fastlb):
    """A steady keep-alive stream while a backend dies and comes back: every request answered
    200 (retries), the backend down within fall x interval + timeout, back after `rise` checks
    with its share ramping up over `slow_start`."""
    a, b, c = hb("a"), hb("b"), hb("c")
    port, admin = free_port(), free_port()
    cfg = http_config(
        port,
        [pool("app", [a.address, b.address, c.address], health=CHECKS, slow_start="3s")],
        admin=f"127.0.0.1:{admin}",
    )
    proc = fastlb(cfg, port)
    stream = Stream(port, threads=4).start()
    try:
        time.sleep(1.0)
        b.kill()
        killed = time.monotonic()
        assert wait_until(lambda: state_of(admin, "app", b.address) == "down", 5, 0.02)
        took = time.monotonic() - killed
        # fall (2) x interval (200 ms, +10% jitter) + timeout (100 ms); 1 s of room for a loaded
        # machine (the check loop and this poll share it with the stream).
        assert took < 2 * 0.22 + 0.1 + 1.0, f"marked down after {took:.2f}s"
        time.sleep(1.0)
        b2 = hb("b", port=b.port)
        assert wait_until(lambda: state_of(admin, "app", b.address) == "up", 5, 0.02)
        back = time.monotonic()
        ramping = backend_status(admin, "app", b.address)
        assert ramping["slow_start"] and ramping["weight_scale"] < 1000, ramping
        assert wait_until(lambda: not backend_status(admin, "app", b.address)["slow_start"], 8)
        time.sleep(0.5)
    finally:
        outcomes = stream.stop()
    proc_code, err = proc.stop()
    assert proc_code == 0, err
    assert [o for o in outcomes if o.status != 200] == []
    assert len(outcomes) > 200
    assert f"backend app/{b.address} is down (2 checks failed" in err
    assert f"backend app/{b.address} is up (2 checks passed)" in err
    assert f"backend app/{b.address}: slow start done" in err

    def share(lo: float, hi: float) -> float:
        window = [o for o in outcomes if lo <= o.at < hi]
        return sum(1 for o in window if o.backend == "b") / max(1, len(window))

    first, last = share(back, back + 0.75), share(back + 3.2, back + 10)
    assert first < 0.2 and last > 0.25, (first, last)
    assert not_checks(b2) > 0


def test_tcp_only_connections_on_the_killed_backend_fail(backends, fastlb):
    a, b = backends(name_then_echo, "a"), backends(name_then_echo, "b")
    port = free_port()
    fastlb(l4_config(port, [a.address, b.address]), port)
    conns = [tcp_connect(port) for _ in range(10)]
    assert {name for _, name in conns} == {"a", "b"}
    b.close()
    try:
        for s, name in conns:
            assert echoes(s) == (name == "a"), name
        # new connections: the dead backend is skipped (connect refused, next backend)
        fresh = [tcp_connect(port) for _ in range(10)]
        assert {name for _, name in fresh} == {"a"}
        assert all(echoes(s) for s, _ in fresh)
        for s, _ in fresh:
            s.close()
    finally:
        for s, _ in conns:
            s.close()


# --- passive ejection -------------------------------------------------------------------------


def test_passive_ejection_before_any_active_check(hb, fastlb):
    """A backend resetting every connection is out after `consecutive_failures`, though its
    active checks (hourly here) have not run once; clients see only 200s (retries)."""
    good, bad = hb("good"), hb("bad", mode="reset")
    port, admin = free_port(), free_port()
    checks = {**CHECKS, "interval": "1h", "timeout": "1s"}
    passive = {"consecutive_failures": 3, "eject": "30s"}
    cfg = http_config(
        port,
        [pool("app", [good.address, bad.address], health=checks, passive=passive)],
        admin=f"127.0.0.1:{admin}",
        workers=1,
    )
    proc = fastlb(cfg, port)
    statuses = [get(port, f"/{i}")[0] for i in range(40)]
    assert statuses == [200] * 40
    assert bad.connections == 3, "ejected after exactly 3 failures in a row"
    s = backend_status(admin, "app", bad.address)
    # the reset surfaces in connect or in the exchange, depending on timing
    assert s["state"] == "down" and s["ejections"] == 1 and s["failures_total"] == 3, s
    assert wait_until(lambda: backend_status(admin, "app", bad.address)["ejected"], 2)
    assert not any(r.path == "/health" for r in good.received), "an active check ran"
    code, err = proc.stop()
    assert code == 0
    assert f"backend app/{bad.address} ejected: 3 failures in a row; back after 30s" in err


def test_ejected_backend_without_active_checks_returns_after_eject(hb, fastlb):
    good, flaky = hb("good"), hb("flaky", mode="reset")
    port, admin = free_port(), free_port()
    passive = {"consecutive_failures": 2, "eject": "1s"}
    cfg = http_config(
        port,
        [pool("app", [good.address, flaky.address], passive=passive)],
        admin=f"127.0.0.1:{admin}",
        workers=1,
    )
    proc = fastlb(cfg, port)
    assert [get(port)[0] for _ in range(10)] == [200] * 10
    assert state_of(admin, "app", flaky.address) == "down"
    flaky.close()
    fixed = hb("flaky", port=flaky.port)
    assert wait_until(lambda: state_of(admin, "app", flaky.address) == "up", 5)
    assert wait_until(lambda: "flaky" in {get(port)[2].decode() for _ in range(4)}, 5)
    code, err = proc.stop()
    assert code == 0 and f"backend app/{flaky.address} returns after its ejection" in err
    assert fixed.received


def test_5xx_eject_a_backend_when_counted(hb, fastlb):
    """http 5xx count as failures: a backend answering 500 is ejected (and its 500s, which are
    not retried for a 500, reach the client until then)."""
    good, sick = hb("good"), HttpBackend("sick", status_override=500)
    try:
        port, admin = free_port(), free_port()
        passive = {"consecutive_failures": 2, "eject": "30s"}
        cfg = http_config(
            port,
            [pool("app", [good.address, sick.address], passive=passive)],
            admin=f"127.0.0.1:{admin}",
            workers=1,
        )
        fastlb(cfg, port)
        statuses = Counter(get(port)[0] for _ in range(20))
        assert statuses == {200: 18, 500: 2}, statuses
        assert backend_status(admin, "app", sick.address)["ejections"] == 1
    finally:
        sick.close()


# --- backup, all down -------------------------------------------------------------------------


def test_backup_serves_only_while_every_primary_is_down_then_503(hb, fastlb):
    p1, p2, spare = hb("p1"), hb("p2"), hb("spare")
    port, admin = free_port(), free_port()
    backends = [p1.address, p2.address, {"address": spare.address, "backup": True}]
    cfg = http_config(port, [pool("app", backends, health=CHECKS)], admin=f"127.0.0.1:{admin}")
    fastlb(cfg, port)
    assert {get(port)[2] for _ in range(20)} == {b"p1", b"p2"}
    p1.close()
    assert {get(port)[2] for _ in range(10)} == {b"p2"}
    assert wait_until(lambda: state_of(admin, "app", p1.address) == "down", 5)
    p2.close()
    assert wait_until(lambda: state_of(admin, "app", p2.address) == "down", 5)
    assert {get(port)[2] for _ in range(10)} == {b"spare"}
    spare.close()
    assert wait_until(lambda: state_of(admin, "app", spare.address) == "down", 5)
    t0 = time.monotonic()
    status, _, body, _ = get(port)
    assert status == 503 and body
    assert time.monotonic() - t0 < 5, "all down must answer at once, not hang"
    _, st = api(admin, "GET", "/api/status")
    assert st["listeners"][0]["dropped"]["no_backend"] >= 1
    assert st["pools"][0]["healthy_backends"] == 0


def test_tcp_all_backends_down_closes_at_once_and_counts(backends, fastlb):
    a = backends(name_then_echo, "a")
    port, admin = free_port(), free_port()
    fastlb(l4_config(port, [a.address], admin=f"127.0.0.1:{admin}"), port)
    assert api(admin, "POST", f"/api/pools/app/backends/{a.address}/disable")[0] == 200
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(10) == b""  # closed at once, not left hanging
    _, st = api(admin, "GET", "/api/status")
    assert st["listeners"][0]["dropped"]["no_backend"] == 1


# --- drain, enable, disable, weight -----------------------------------------------------------


def test_drain_keeps_held_connections_and_sends_no_new_ones(backends, fastlb):
    a, b = backends(name_then_echo, "a"), backends(name_then_echo, "b")
    port, admin = free_port(), free_port()
    fastlb(l4_config(port, [a.address, b.address], admin=f"127.0.0.1:{admin}", drain_timeout="30s"), port)
    held = [tcp_connect(port) for _ in range(6)]
    on_b = [s for s, name in held if name == "b"]
    assert on_b
    status, body = api(admin, "POST", f"/api/pools/app/backends/{b.address}/drain")
    assert status == 200 and body["ok"], body
    assert state_of(admin, "app", b.address) == "draining"
    fresh = [tcp_connect(port) for _ in range(10)]
    assert {name for _, name in fresh} == {"a"}
    assert all(echoes(s) for s, _ in held), "held connections must keep working while draining"
    for s, _ in held + fresh:
        s.close()
    assert wait_until(lambda: state_of(admin, "app", b.address) == "drained", 5)
    # enable puts it back
    assert api(admin, "POST", f"/api/pools/app/backends/{b.address}/enable")[0] == 200
    assert state_of(admin, "app", b.address) == "up"
    names = set()
    for _ in range(10):
        s, name = tcp_connect(port)
        names.add(name)
        s.close()
    assert names == {"a", "b"}


def test_drain_timeout_closes_what_is_left(backends, fastlb):
    a, b = backends(name_then_echo, "a"), backends(name_then_echo, "b")
    port, admin = free_port(), free_port()
    proc = fastlb(
        l4_config(port, [a.address, b.address], admin=f"127.0.0.1:{admin}", drain_timeout="1s"), port
    )
    held = [tcp_connect(port) for _ in range(6)]
    api(admin, "POST", f"/api/pools/app/backends/{b.address}/drain")
    assert wait_until(lambda: state_of(admin, "app", b.address) == "drained", 10)
    for s, name in held:
        assert echoes(s) == (name == "a"), name
        s.close()
    _, err = proc.stop()
    assert f"backend app/{b.address}: drain_timeout reached, closing" in err


def test_http_drain_moves_keepalive_clients_without_a_failure(hb, fastlb):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    cfg = http_config(port, [pool("app", [a.address, b.address])], admin=f"127.0.0.1:{admin}")
    fastlb(cfg, port)
    stream = Stream(port, threads=3).start()
    time.sleep(0.5)
    api(admin, "POST", f"/api/pools/app/backends/{b.address}/drain")
    drained_at = time.monotonic()
    assert wait_until(lambda: state_of(admin, "app", b.address) == "drained", 5)
    time.sleep(0.5)
    outcomes = stream.stop()
    assert [o for o in outcomes if o.status != 200] == []
    late = [o.backend for o in outcomes if o.at > drained_at + 0.2]
    assert late and set(late) == {"a"}


def test_disable_and_weight(hb, fastlb):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    cfg = http_config(port, [pool("app", [a.address, b.address])], admin=f"127.0.0.1:{admin}", workers=1)
    fastlb(cfg, port)
    assert api(admin, "POST", f"/api/pools/app/backends/{a.address}/disable")[0] == 200
    assert state_of(admin, "app", a.address) == "disabled"
    assert {get(port)[2] for _ in range(6)} == {b"b"}
    api(admin, "POST", f"/api/pools/app/backends/{a.address}/enable")
    status, body = api(admin, "PUT", f"/api/pools/app/backends/{a.address}/weight", {"weight": 3})
    assert status == 200 and body["weight"] == 3
    assert backend_status(admin, "app", a.address)["weight"] == 3
    counts = Counter(get(port)[2] for _ in range(40))
    assert counts == {b"a": 30, b"b": 10}, counts


# --- admin API errors, /healthz, fastlb ctl ----------------------------------------------------


def test_admin_api_errors_are_json_with_a_clear_message(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"), port)
    assert api(admin, "GET", "/healthz") == (200, "ok\n")
    base = f"/api/pools/app/backends/{a.address}"
    cases = [
        ("POST", "/api/pools/nope/backends/1.2.3.4:80/drain", None, 404, "unknown pool 'nope'"),
        (
            "POST",
            "/api/pools/app/backends/1.2.3.4:80/enable",
            None,
            404,
            "pool 'app' has no backend '1.2.3.4:80'",
        ),
        ("PUT", f"{base}/weight", b"{", 400, "body: not JSON"),
        ("PUT", f"{base}/weight", {"weight": 1001}, 400, "weight: an integer from 0 to 1000"),
        ("PUT", f"{base}/weight", {"weight": "3"}, 400, "weight: an integer from 0 to 1000"),
        ("PUT", f"{base}/weight", {"w": 3}, 400, 'body: expected {"weight": N}'),
        ("GET", "/api/nothing", None, 404, "no such path: /api/nothing"),
        ("DELETE", "/api/status", None, 405, "DELETE not allowed on /api/status"),
    ]
    for method, path, body, want_status, want in cases:
        status, answer = api(admin, method, path, body)
        assert status == want_status, (path, answer)
        assert want in answer["error"], (path, answer)


def ctl(admin: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_fastlb_ctl_covers_every_call(hb, fastlb):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    proc = fastlb(http_config(port, [pool("app", [a.address, b.address])], admin=f"127.0.0.1:{admin}"), port)
    out = ctl(admin, "status")
    assert out.returncode == 0, out.stderr
    assert "pool app (round_robin): 2/2 up" in out.stdout
    assert a.address in out.stdout and "web" in out.stdout
    assert ctl(admin, "drain", "app", a.address).stdout.strip() == f"app/{a.address}: drain done"
    assert "drained" in ctl(admin, "status").stdout
    assert ctl(admin, "disable", "app", b.address).returncode == 0
    assert state_of(admin, "app", b.address) == "disabled"
    assert ctl(admin, "enable", "app", b.address).returncode == 0
    assert ctl(admin, "weight", "app", b.address, "7").stdout.strip() == f"app/{b.address}: weight 7"
    st = json.loads(ctl(admin, "--json", "status").stdout)
    assert [x["weight"] for x in st["pools"][0]["backends"]] == [1, 7]
    after = json.loads(ctl(admin, "status", "--json").stdout)  # the flag after the action too
    assert [x["weight"] for x in after["pools"][0]["backends"]] == [1, 7]
    missing = ctl(admin, "drain", "app", "9.9.9.9:1")
    assert missing.returncode == 2 and "pool 'app' has no backend '9.9.9.9:1'" in missing.stderr
    assert ctl(admin, "reload").stdout.strip() == "reloaded: 1 listeners, 1 pools"
    proc.config_path.write_text("[[pools]]\nname = 1\n")
    bad = ctl(admin, "reload")
    assert bad.returncode == 2 and "reload refused" in bad.stderr and "pools[0].name" in bad.stderr
    proc.stop()
    gone = ctl(admin, "status")
    assert gone.returncode == 1 and "cannot reach the admin API" in gone.stderr


# --- reload -----------------------------------------------------------------------------------


def test_reload_under_load_fails_nothing_and_the_new_route_serves_at_once(hb, fastlb):
    a, v2 = hb("a"), hb("v2")
    port, admin = free_port(), free_port()
    pools = [pool("app", [a.address]), pool("v2", [v2.address])]
    proc = fastlb(http_config(port, pools, admin=f"127.0.0.1:{admin}"), port)
    stream = Stream(port, threads=4, paths=("/", "/v2/x")).start()
    try:
        time.sleep(0.7)
        new = http_config(
            port, pools, admin=f"127.0.0.1:{admin}", routes=[{"path_prefix": "/v2/", "pool": "v2"}]
        )
        proc.config_path.write_text(new)
        status, body = api(admin, "POST", "/api/reload")
        reloaded = time.monotonic()
        assert status == 200 and body["ok"], body
        # the very next request on an open keep-alive connection takes the new route
        with RawConn(port) as c:
            c.send(b"GET /v2/y HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.read_response().header("x-backend") == "v2"
        time.sleep(0.7)
        # SIGHUP does the same (here with an unchanged file)
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
    finally:
        outcomes = stream.stop()
    assert [o for o in outcomes if o.status != 200] == []
    before = {o.backend for o in outcomes if o.path == "/v2/x" and o.at < reloaded - 0.05}
    after = {o.backend for o in outcomes if o.path == "/v2/x" and o.at > reloaded + 0.05}
    assert before == {"a"} and after == {"v2"}, (before, after)
    _, err = proc.stop()
    assert err.count("reloaded: 1 listeners, 2 pools") == 2, err


def test_invalid_reload_is_400_and_the_old_config_keeps_serving(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    proc = fastlb(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"), port)
    good = proc.config_path.read_text()
    proc.config_path.write_text(good.replace('algorithm = "round_robin"', 'algorithm = "fastest"'))
    status, body = api(admin, "POST", "/api/reload")
    assert status == 400
    assert body["error"] == "reload refused; the running config is unchanged"
    assert any(e.startswith("pools[0].algorithm") for e in body["errors"]), body
    assert get(port)[:3:2] == (200, b"a")
    # a listener that cannot bind: refused the same way, nothing changed
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    extra = f'\n[[listeners]]\nname = "more"\nbind = "127.0.0.1:{taken}"\nprotocol = "http"\npool = "app"\n'
    proc.config_path.write_text(good.replace("[[pools]]", extra + "\n[[pools]]", 1))
    status, body = api(admin, "POST", "/api/reload")
    busy.close()
    assert status == 400 and "cannot bind" in body["errors"][0], body
    assert get(port)[:3:2] == (200, b"a")
    # SIGHUP with a bad file: a log line, still serving
    proc.config_path.write_text("[runtime\n")
    proc.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert get(port)[:3:2] == (200, b"a")
    code, err = proc.stop()
    assert code == 0
    assert "reload refused, keeping the running config:" in err


def test_reload_keeps_runtime_state_of_unchanged_backends(hb, fastlb):
    a, b, c = hb("a"), hb("b"), hb("c")
    port, admin = free_port(), free_port()
    cfg = http_config(
        port, [pool("app", [a.address, b.address], slow_start="30s")], admin=f"127.0.0.1:{admin}"
    )
    proc = fastlb(cfg, port)
    api(admin, "POST", f"/api/pools/app/backends/{a.address}/disable")
    api(admin, "PUT", f"/api/pools/app/backends/{b.address}/weight", {"weight": 9})
    proc.config_path.write_text(
        cfg.replace(f'"{b.address}" }}]', f'"{b.address}" }}, {{ address = "{c.address}" }}]')
    )
    assert api(admin, "POST", "/api/reload")[0] == 200
    assert state_of(admin, "app", a.address) == "disabled"
    assert backend_status(admin, "app", b.address)["weight"] == 9
    assert not backend_status(admin, "app", b.address)["slow_start"]
    # the added backend is up, its share ramping
    added = backend_status(admin, "app", c.address)
    assert added["state"] == "up" and added["slow_start"] and added["weight_scale"] < 1000, added


def test_removed_listener_finishes_keepalive_connections_with_close(hb, fastlb):
    a = hb("a")
    port, port2, admin = free_port(), free_port(), free_port()
    two = http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}")
    old = f'[[listeners]]\nname = "old"\nbind = "127.0.0.1:{port2}"\nprotocol = "http"\npool = "app"\n'
    two = two.replace("[[pools]]", old + "\n[[pools]]")
    proc = fastlb(two, port)
    busy, idle = RawConn(port2), RawConn(port2)
    for c in (busy, idle):
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200
    busy.send(b"GET /sleep/800 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    proc.config_path.write_text(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"))
    assert api(admin, "POST", "/api/reload")[0] == 200
    # the request in flight is answered, then its connection closes; the idle one is closed
    assert busy.read_response().status == 200
    assert busy.read_to_eof() == b""
    assert idle.read_to_eof() == b""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port2), timeout=2).close()
    busy.close()
    idle.close()


# --- graceful stop ----------------------------------------------------------------------------


def test_sigterm_during_a_large_download_lets_it_finish_then_exits_0(hb, fastlb):
    a = hb("a")
    port = free_port()
    size = 32 << 20
    proc = fastlb(http_config(port, [pool("app", [a.address], drain_timeout="30s")]), port)
    idle = RawConn(port)  # an idle keep-alive client must not hold the stop up
    idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.read_response().status == 200
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.sendall(f"GET /big/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = bytearray(s.recv(1 << 16))
    proc.proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert idle.read_to_eof() == b"", "idle keep-alive connection closed at the stop"
    idle.close()
    while len(got) < 300 or b"\r\n\r\n" not in got:
        got += s.recv(1 << 16)
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    body = bytearray(body)
    while len(body) < size:
        time.sleep(0.0005)  # a slow reader: the download outlasts the signal
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    s.close()
    assert f"content-length: {size}".encode() in head.lower()
    assert len(body) == size and bytes(body) == payload(size)
    code, err = proc.stop(timeout=30)
    assert code == 0, err
    assert "stopped" in err
    assert time.monotonic() - stopped_at < 25, "waited for the idle connection"


def test_healthz_turns_503_while_stopping(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    proc = fastlb(
        http_config(port, [pool("app", [a.address], drain_timeout="30s")], admin=f"127.0.0.1:{admin}"), port
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /sleep/1500 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    proc.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: api(admin, "GET", "/healthz") == (503, "stopping\n"), 2)
    data = b""
    while chunk := s.recv(1 << 16):
        data += chunk
    s.close()
    # answered whole, then closed (the request began before the stop, so without
    # Connection: close in its head)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\na")
    assert proc.proc.wait(20) == 0
