"""Metrics, access log, alerts and the dashboard, through real processes (and a real browser)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
from pathlib import Path

from admin import api, scrape, state_of
from httputil import RawConn, get, http_config, pool

from backends import echo
from conftest import free_port, wait_until
from l4util import l4_config


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name, key(**labels)]


CHECKS = {"type": "tcp", "interval": "200ms", "timeout": "100ms", "rise": 1, "fall": 1}


# --- metrics ----------------------------------------------------------------------------------


def test_http_metrics_equal_what_was_sent(hb, fastlb):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    cfg = http_config(port, [pool("app", [a.address, b.address])], admin=f"127.0.0.1:{admin}", workers=2)
    fastlb(cfg, port)
    before = value(scrape(admin), "fastlb_connections_total", listener="web")  # the start-up probe
    sent = {200: 6, 404: 4, 500: 2}
    for code, n in sent.items():
        for _ in range(n):
            assert get(port, f"/status/{code}")[0] == code
    with RawConn(port) as c:  # malformed: 400 from fastlb, never a backend
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        assert c.read_response().status == 400
    m = scrape(admin)
    for code, n in sent.items():
        per_backend = [
            m.get(
                ("fastlb_requests_total", key(listener="web", pool="app", backend=x.address, code=str(code))),
                0,
            )
            for x in (a, b)
        ]
        assert sum(per_backend) == n, (code, per_backend)
    assert value(m, "fastlb_requests_total", listener="web", pool="", backend="", code="400") == 1
    assert value(m, "fastlb_connections_dropped_total", listener="web", reason="bad_request") == 1
    assert value(m, "fastlb_connections_total", listener="web") == before + sum(sent.values()) + 1
    assert value(m, "fastlb_connections_active", listener="web") == 0
    assert value(m, "fastlb_request_duration_seconds_count", listener="web", pool="app") == sum(sent.values())
    assert value(m, "fastlb_request_duration_seconds_bucket", listener="web", pool="app", le="+Inf") == 12
    assert value(m, "fastlb_request_duration_seconds_bucket", listener="web", pool="app", le="10") == 12
    total_5xx = sum(
        value(m, "fastlb_backend_failures_total", pool="app", backend=x.address, kind="5xx") for x in (a, b)
    )
    assert total_5xx == 2
    assert value(m, "fastlb_healthy_backends", pool="app") == 2


def test_tcp_bytes_active_and_dropped_are_exact(backends, fastlb):
    e = backends(echo, "e")
    port, admin = free_port(), free_port()
    runtime = "max_connections = 3"
    fastlb(l4_config(port, [e.address], admin=f"127.0.0.1:{admin}", runtime=runtime), port)
    # the start-up probe's connection must be gone before the limit is tested
    assert wait_until(lambda: value(scrape(admin), "fastlb_connections_active", listener="front") == 0, 5)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    for i, s in enumerate(held):  # 1000, 2000, 3000 bytes each way
        data = bytes([65 + i]) * (1000 * (i + 1))
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            assert chunk, f"connection {i} closed after {len(got)} bytes"
            got += chunk
        assert got == data
    m = scrape(admin)
    assert value(m, "fastlb_connections_active", listener="front") == 3
    assert value(m, "fastlb_backend_connections_active", pool="app", backend=e.address) == 3
    refused = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert refused.recv(10) == b""  # over max_connections: closed
    refused.close()
    for s in held:
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()

    def settled() -> bool:
        m = scrape(admin)
        return value(m, "fastlb_connections_active", listener="front") == 0

    assert wait_until(settled, 5)
    m = scrape(admin)
    assert value(m, "fastlb_bytes_total", listener="front", direction="in") == 6000
    assert value(m, "fastlb_bytes_total", listener="front", direction="out") == 6000
    assert value(m, "fastlb_backend_connections_active", pool="app", backend=e.address) == 0
    assert value(m, "fastlb_connections_dropped_total", listener="front", reason="max_connections") == 1
    assert value(m, "fastlb_connections_total", listener="front") == 5  # and the start-up probe
    # tcp connections count their lifetime, never a response code
    assert value(m, "fastlb_request_duration_seconds_count", listener="front", pool="app") == 4
    assert not any(name == "fastlb_requests_total" for name, _ in m)


def test_backend_up_drops_to_0_when_killed(hb, fastlb):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    fastlb(
        http_config(port, [pool("app", [a.address, b.address], health=CHECKS)], admin=f"127.0.0.1:{admin}"),
        port,
    )
    assert value(scrape(admin), "fastlb_backend_up", pool="app", backend=b.address) == 1
    b.close()
    assert wait_until(
        lambda: value(scrape(admin), "fastlb_backend_up", pool="app", backend=b.address) == 0, 5
    )
    m = scrape(admin)
    assert value(m, "fastlb_healthy_backends", pool="app") == 1
    assert value(m, "fastlb_backend_failures_total", pool="app", backend=b.address, kind="health") >= 1
    assert value(m, "fastlb_backend_up", pool="app", backend=a.address) == 1


# --- access log -------------------------------------------------------------------------------


def read_lines(path: Path, n: int, timeout: float = 5) -> list[dict]:
    assert wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= n, timeout)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_access_log_has_a_line_per_request_and_reopens_on_sigusr1(hb, fastlb, tmp_path):
    a = hb("a")
    port, admin = free_port(), free_port()
    log_path = tmp_path / "access.log"
    cfg = http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}", workers=1)
    cfg = cfg.replace("[admin]", f'[log]\naccess_log = "{log_path}"\n\n[admin]')
    proc = fastlb(cfg, port)
    assert get(port, "/x/y?z=1")[0] == 200
    assert get(port, "/status/404", headers={"X-Request-Id": "req-42"})[0] == 404
    with RawConn(port) as c:
        c.send(b"BREW / HTTP/1.1\r\n\r\n")  # no Host: 400
        assert c.read_response().status == 400
    lines = read_lines(log_path, 3)
    assert len(lines) == 3
    first, second, bad = lines
    assert first["listener"] == "web" and first["pool"] == "app" and first["backend"] == a.address
    assert (first["method"], first["path"], first["status"]) == ("GET", "/x/y?z=1", 200)
    assert first["client"].startswith("127.0.0.1:") and first["route"] is None and first["retries"] == 0
    assert first["bytes_in"] > 0 and first["bytes_out"] > 0
    assert first["duration_ms"] >= first["ttfb_ms"] >= 0
    assert first["connect_ms"] is None or first["connect_ms"] >= 0
    assert len(first["request_id"]) == 32 and first["time"].endswith("Z")
    forwarded = a.received[0].header("x-request-id")
    assert forwarded == first["request_id"], "the logged id is the one the backend got"
    assert (second["status"], second["request_id"]) == (404, "req-42")
    assert bad["status"] == 400 and bad["backend"] is None and bad["pool"] is None
    # logrotate: move the file away, SIGUSR1, next lines go to a new file
    shutil.move(log_path, tmp_path / "access.log.1")
    proc.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert get(port, "/after")[0] == 200
    assert [x["path"] for x in read_lines(log_path, 1)] == ["/after"]
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 3
    assert value(scrape(admin), "fastlb_log_dropped_total") == 0


def test_access_log_tcp_line(backends, fastlb, tmp_path):
    e = backends(echo, "e")
    port = free_port()
    log_path = tmp_path / "tcp.log"
    cfg = l4_config(port, [e.address]).replace("[admin]", f'[log]\naccess_log = "{log_path}"\n\n[admin]')
    fastlb(cfg, port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"hello"
    # the start-up probe's connection and this one, in the order they closed (either)
    lines = read_lines(log_path, 2)
    line = max(lines, key=lambda li: li["bytes_in"])
    assert line["protocol"] == "tcp" and line["backend"] == e.address and line["pool"] == "app"
    assert (line["bytes_in"], line["bytes_out"]) == (5, 5)
    assert line["duration_ms"] >= line["connect_ms"] >= 0


# --- alerts -----------------------------------------------------------------------------------


def alert(admin: int, name: str) -> dict:
    _, alerts = api(admin, "GET", "/api/alerts")
    return next(a for a in alerts if a["name"] == name)


def test_alerts_fire_and_clear_and_are_logged(hb, fastlb):
    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    rules = """
[[alerts]]
name = "FewBackends"
expr = "healthy_backends < 2"
for = "0s"

[[alerts]]
name = "Errors"
expr = "error_rate > 0.2"

[[alerts]]
name = "Draining"
expr = "draining_backends > 0"
"""
    cfg = http_config(port, [pool("app", [a.address, b.address], health=CHECKS)], admin=f"127.0.0.1:{admin}")
    proc = fastlb(cfg + rules, port)
    assert {x["name"]: x["state"] for x in api(admin, "GET", "/api/alerts")[1]} == {
        "FewBackends": "ok",
        "Errors": "ok",
        "Draining": "ok",
    }
    b.close()
    assert wait_until(lambda: alert(admin, "FewBackends")["state"] == "firing", 10)
    firing = alert(admin, "FewBackends")
    assert (
        firing["value"] == 1 and firing["since"].endswith("Z") and "pool app: 1 of 2 up" in firing["detail"]
    )
    hb("b", port=b.port)
    assert wait_until(lambda: alert(admin, "FewBackends")["state"] == "ok", 10)
    # errors: a backend answering 500 to everything
    a.status_override = 500
    for _ in range(10):
        get(port)
    assert wait_until(lambda: alert(admin, "Errors")["state"] == "firing", 10)
    assert alert(admin, "Errors")["value"] >= 0.2
    api(admin, "POST", f"/api/pools/app/backends/{a.address}/drain")
    assert wait_until(lambda: alert(admin, "Draining")["state"] == "firing", 10)
    api(admin, "POST", f"/api/pools/app/backends/{a.address}/enable")
    assert wait_until(lambda: alert(admin, "Draining")["state"] == "ok", 10)
    _, err = proc.stop()
    assert "alert FewBackends firing: healthy_backends = 1" in err
    assert "alert FewBackends cleared" in err
    assert "alert Draining cleared" in err


def test_default_alerts_are_listed(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"), port)
    names = [x["name"] for x in api(admin, "GET", "/api/alerts")[1]]
    assert names == [
        "UnhealthyBackends",
        "HighErrorRate",
        "HighLatencyP99",
        "ManyDraining",
        "CanaryRolledBack",
    ]


# --- dashboard --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_in_a_real_browser(hb, fastlb):
    assert CHROMIUM, "the dashboard test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    a, b = hb("a"), hb("b")
    port, admin = free_port(), free_port()
    fastlb(http_config(port, [pool("app", [a.address, b.address])], admin=f"127.0.0.1:{admin}"), port)
    for _ in range(20):
        get(port)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{admin}/")
            row = page.locator(f'tr[data-backend="app/{b.address}"]')
            row.wait_for(timeout=10_000)
            assert page.locator("tr[data-backend]").count() == 2
            assert row.locator("[data-testid=state]").inner_text() == "up"
            assert page.locator('tr[data-listener="web"]').count() == 1
            row.locator("button[data-action=drain]").click()
            state = f"document.querySelector('tr[data-backend=\"app/{b.address}\"] [data-testid=state]')"
            page.wait_for_function(
                f"() => ['draining', 'drained'].includes({state}.textContent)", timeout=10_000
            )
            assert state_of(admin, "app", b.address) in ("draining", "drained")
            assert row.locator("[data-testid=state]").inner_text() in ("draining", "drained")
            row.locator("button[data-action=enable]").click()
            page.wait_for_function(f"() => {state}.textContent === 'up'", timeout=10_000)
            assert state_of(admin, "app", b.address) == "up"
        finally:
            browser.close()


def test_dashboard_is_served_without_outside_resources(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"), port)
    status, page = api(admin, "GET", "/")
    assert status == 200 and "<title>fastlb</title>" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_ctl_status_shows_latency_and_top_refreshes(hb, fastlb):
    import subprocess
    import sys

    a = hb("a")
    port, admin = free_port(), free_port()
    fastlb(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"), port)
    for _ in range(5):
        get(port)
    ctl = [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}"]
    out = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30)
    assert "p99 ms" in out.stdout and a.address in out.stdout
    top = subprocess.run([*ctl, "top", "--count", "2"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and "pool app (round_robin): 1/1 up" in top.stdout, top.stderr
