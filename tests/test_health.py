"""Active health checks: rise/fall state, pushed to the running data plane."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable

from httpbackend import HttpBackend

from fastlb.config import Health
from fastlb.health import BackendHealth

from backends import says_name
from conftest import free_port


def test_fall_then_rise_flip_only_at_the_thresholds() -> None:
    b = BackendHealth("app", "a:1", "127.0.0.1:1", Health(rise=2, fall=3), "a")
    assert [b.record(False, "refused") for _ in range(4)] == [None, None, False, None]
    assert not b.up and b.last_error == "refused"
    assert [b.record(True) for _ in range(3)] == [None, True, None]
    assert b.up
    # a success between failures resets the count
    assert [b.record(ok) for ok in (False, False, True, False, False)] == [None] * 5
    assert b.up


def config(port: int, addresses: list[str]) -> str:
    backends = ", ".join(f'{{ address = "{a}" }}' for a in addresses)
    return f"""
[runtime]
workers = 1
[admin]
bind = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
pool = "app"
[[pools]]
name = "app"
backends = [{backends}]
health = {{ type = "http", path = "/health", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }}
"""


def served_by(port: int, n: int) -> list[str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    names = []
    for _ in range(n):
        c.request("GET", "/")
        r = c.getresponse()
        names.append(f"{r.status} {r.read().decode()}")
    c.close()
    return names


def regular(b: HttpBackend) -> int:
    """Requests that were not health checks."""
    return sum(1 for r in b.received if r.header("user-agent") != "fastlb-health")


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_failing_http_check_takes_a_backend_out_and_passing_brings_it_back(hb, fastlb):
    sick, well = hb("sick", status_override=503), hb("well")
    port = free_port()
    fastlb(config(port, [sick.address, well.address]), port)
    assert wait_until(lambda: len([r for r in sick.received if r.path == "/health"]) >= 2)
    checks = [r for r in sick.received if r.path == "/health"]
    assert checks[0].header("host") == "127.0.0.1" and checks[0].method == "GET"
    time.sleep(0.3)  # the second failed check has been pushed to the engine
    before = regular(sick)
    assert served_by(port, 20) == ["200 well"] * 20
    assert regular(sick) == before, "a backend marked down still got requests"

    sick.status_override = None  # healthy again: back after `rise` passing checks
    assert wait_until(lambda: "200 sick" in served_by(port, 4)), "never back in rotation"


def test_tcp_check_marks_a_closed_backend_down_and_logs_it(backends, fastlb):
    gone, stays = backends(says_name, "gone"), backends(says_name, "stays")
    port = free_port()
    cfg = config(port, [gone.address, stays.address]).replace('protocol = "http"', 'protocol = "tcp"')
    cfg = cfg.replace('type = "http", path = "/health", ', 'type = "tcp", ')
    proc = fastlb(cfg, port)
    gone.close()
    time.sleep(1.2)  # fall (2) x interval (200 ms) + timeout, with room for a slow machine
    code, err = proc.stop()
    assert code == 0, err
    assert f"backend app/{gone.address} is down (2 checks failed" in err, err
    assert f"app/{stays.address} is down" not in err


def test_ejected_backend_is_held_down_then_needs_rise_checks() -> None:
    b = BackendHealth("app", "a:1", "127.0.0.1:1", Health(rise=2, fall=3), "a")
    b.eject()
    assert not b.up and b.last_error == "ejected by passive detection"
    # passing checks during the ejection (held) do not count, not even toward rise
    assert [b.record(True, held=True) for _ in range(5)] == [None] * 5
    assert [b.record(True, held=True), b.record(True)] == [None, None]
    assert not b.up
    # after it, `rise` passing checks bring it back
    assert b.record(True) is True
    assert b.up
