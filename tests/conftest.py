"""Shared fixtures: free ports, real backends, real `fastlb serve` processes."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from httpbackend import HttpBackend

from fastlb.config import Config

from backends import Backend, Handler

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never one this test run was given before: a port freed at
    once may be handed out again, and a test asking for three must get three."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(
    port: int, host: str = "127.0.0.1", timeout: float = 15.0, alive: Callable[[], bool] = lambda: True
) -> None:
    """Waits until `port` accepts TCP connections; gives up early once `alive()` is false."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and alive():
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """`backends(handler, name=...)` starts a backend; all are closed after the test."""
    started: list[Backend] = []

    def start(handler: Handler, name: str = "") -> Backend:
        b = Backend(handler, name)
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


@pytest.fixture
def hb() -> Iterator[Callable[..., HttpBackend]]:
    """`hb(name, mode=..., status_override=..., port=..., fail_every=..., delay_ms=...)` starts
    an HTTP backend (tests/httpbackend.py); all are closed after the test, which fails if a
    backend's handler raised."""
    started: list[HttpBackend] = []

    def start(
        name: str = "",
        mode: str = "normal",
        status_override: int | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        fail_every: int = 0,
        delay_ms: int = 0,
    ) -> HttpBackend:
        b = HttpBackend(
            name, mode, status_override, port=port, tls=tls, fail_every=fail_every, delay_ms=delay_ms
        )
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()
    errors = [e for b in started for e in b.errors]
    assert not errors, f"backend handler errors: {errors}"


class FastlbProcess:
    def __init__(self, config_path: Path, proc: subprocess.Popen[str]) -> None:
        self.config_path = config_path
        self.proc = proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def fastlb(tmp_path: Path) -> Iterator[Callable[..., FastlbProcess]]:
    """`fastlb(config_toml, port)` runs `fastlb serve` on that config and waits for `port`."""
    running: list[FastlbProcess] = []

    def start(config: str, port: int, host: str = "127.0.0.1") -> FastlbProcess:
        path = tmp_path / f"fastlb-{len(running)}.toml"
        path.write_text(config)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastlb", "serve", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        p = FastlbProcess(path, proc)
        running.append(p)
        try:
            alive = lambda: proc.poll() is None  # noqa: E731 - a process that exited will not listen
            wait_port(port, host, alive=alive)
            admin = tomllib.loads(config).get("admin", {}).get("bind", "off")
            if admin != "off":  # the admin API starts just after the listeners
                admin_host, _, admin_port = admin.rpartition(":")
                wait_port(int(admin_port), admin_host.strip("[]"), alive=alive)
        except TimeoutError:
            code, err = p.stop()
            raise AssertionError(f"fastlb did not start (exit {code}): {err}") from None
        return p

    yield start
    for p in running:
        p.stop()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    """Polls `cond` until it holds or `timeout` passes; returns whether it held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


class FakeEngine:
    """What HealthChecker asks of the engine: the config, its JSON, and where flips go."""

    def __init__(self, config: Config) -> None:
        self.config, self.spec = config, config.to_engine()
        self.flips: list[bool] = []

    def backend_state(self, pool: str, address: str) -> Any:
        raise KeyError(address)  # a first start: every backend starts up

    def set_backend_up(self, pool: str, address: str, up: bool) -> None:
        self.flips.append(up)
