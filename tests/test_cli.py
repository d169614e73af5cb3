"""The `fastlb` command as users run it: serve with SIGHUP reload, demo, usage errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from backends import says_name
from conftest import free_port, wait_port
from l4util import ask_name, l4_config


def test_sighup_reload_applies_a_valid_config_and_keeps_the_old_one_on_errors(backends, fastlb):
    a, b = backends(says_name, "a"), backends(says_name, "b")
    port = free_port()
    p = fastlb(l4_config(port, [a.address]), port)
    assert ask_name(port) == "a"
    p.config_path.write_text(l4_config(port, [b.address]))
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while ask_name(port) != "b" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ask_name(port) == "b"
    p.config_path.write_text(
        l4_config(port, [b.address]).replace('algorithm = "round_robin"', "algorithm = 7")
    )
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert [ask_name(port) for _ in range(5)] == ["b"] * 5, "an invalid reload keeps the running config"
    code, err = p.stop()
    assert code == 0
    assert "pools[0].algorithm" in err and "keeping the running config" in err


def test_demo_balances_over_three_backends_with_curl():
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "fastlb", "demo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port)
        bodies = [
            subprocess.run(
                ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for _ in range(6)
        ]
        assert len(set(bodies)) == 3, bodies
        assert all(body.startswith("hello from backend-") for body in bodies)
    finally:
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=20)
    assert demo.returncode == 0
    assert "curl" in out


def test_usage_errors_exit_2():
    r = subprocess.run([sys.executable, "-m", "fastlb", "serve"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "-c" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastlb", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2


def test_serve_refuses_http_listeners_until_l7_lands(backends, tmp_path):
    b = backends(says_name)
    path = tmp_path / "http.toml"
    path.write_text(l4_config(free_port(), [b.address]).replace('protocol = "tcp"', 'protocol = "http"'))
    r = subprocess.run(
        [sys.executable, "-m", "fastlb", "serve", "-c", str(path)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "listeners[0].protocol" in r.stderr and "Traceback" not in r.stderr
