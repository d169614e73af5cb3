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


def curl(url: str, *args: str) -> str:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "5", *args, url], capture_output=True, text=True, check=True
    ).stdout


def test_demo_routes_and_splits_http_with_curl():
    port, admin = free_port(), free_port()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastlb",
            "demo",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            f"127.0.0.1:{admin}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_port(port)
        bodies = [curl(url) for _ in range(40)]
        assert all(body.startswith("hello from backend-") for body in bodies), bodies
        stable = [b for b in bodies if "(stable," in b]
        assert {b.split()[2] for b in stable} == {"backend-1", "backend-2"}, bodies
        assert len(stable) >= 30, "90% of requests go to the stable pool"
        canary = [curl(url, "-H", "x-canary: 1") for _ in range(5)]
        assert all(b.startswith("hello from backend-3 (canary,") for b in canary), canary
        wait_port(admin)
        status = subprocess.run(
            [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}", "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "pool stable (round_robin): 2/2 up" in status.stdout, status.stdout + status.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=20)
    assert demo.returncode == 0
    assert f"curl -s {url}" in out and "x-canary: 1" in out
    assert f"fastlb ctl --admin 127.0.0.1:{admin} status" in out


def test_usage_errors_exit_2():
    r = subprocess.run([sys.executable, "-m", "fastlb", "serve"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "-c" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastlb", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2


def test_serve_runs_an_http_listener(backends, fastlb):
    b = backends(says_name)
    port = free_port()
    p = fastlb(l4_config(port, [b.address]).replace('protocol = "tcp"', 'protocol = "http"'), port)
    code, err = p.stop()
    assert code == 0, err
    assert "(http, listener" in err and "Traceback" not in err


def test_version_is_the_packages_one_and_names_the_build() -> None:
    """One version: Cargo.toml's, as the package metadata, the data plane and the CLI say it."""
    import importlib.metadata
    import platform
    import tomllib
    from pathlib import Path

    import fastlb

    cargo = tomllib.loads((Path(__file__).parent.parent / "Cargo.toml").read_text())["package"]["version"]
    assert importlib.metadata.version("fastlb") == fastlb.__version__ == cargo
    out = subprocess.run(
        [sys.executable, "-m", "fastlb", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    line = out.stdout.strip()
    assert "\n" not in line, line
    assert line.startswith(f"fastlb {cargo} (data plane: rustc "), line
    assert (
        "release" in line
        and "TLS: rustls (aws-lc-rs)" in line
        and f"target: {platform.machine()}-linux" in line
    ), line
