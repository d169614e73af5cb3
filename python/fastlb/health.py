"""Active health checks, HAProxy style: every `interval` (jittered) a TCP connect or an HTTP GET
per backend; `fall` consecutive failures mark it down, `rise` consecutive successes mark it up
again. A flip is pushed to the data plane at once (`Engine.set_backend_up`) and logged.

Checks run on the control plane's event loop; nothing here touches a worker thread. A backend
starts up (as in HAProxy) and its first check comes at a random point of the first interval, so
thousands of backends do not check in lockstep.

A backend that passive detection ejected (`eject`) is held down: checks keep running, but
successes count only once its `eject` time has passed (the control plane owns that deadline:
`held`), and then `rise` of them bring it back.

The verdict itself is the engine's (one owner of backend state): a check entry created for a
backend that already runs, because a reload changed its check or added checks to its pool,
starts from the engine's verdict, not from "up".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fastlb.config import Health, split_host_port
from fastlb.engine import Engine

log = logging.getLogger("fastlb.health")

# Most of a check response read for `expect_body`; HAProxy's check buffer is 16 KiB.
MAX_CHECK_BODY = 64 * 1024


@dataclass
class BackendHealth:
    """Check state of one backend (`pool/address`)."""

    pool: str
    address: str
    addr: str  # resolved host:port the data plane connects to
    check: Health
    host_header: str
    up: bool = True
    successes: int = 0
    failures: int = 0
    checks_failed: int = 0  # every failed check since start: fastlb_backend_failures_total{kind="health"}
    last_error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return f"{self.pool}/{self.address}"

    def key(self) -> tuple[str, Health, str]:
        """What a check depends on: a reload that changes none of it keeps the state."""
        return self.addr, self.check, self.host_header

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
    host, port = split_host_port(b.addr)
    timeout = b.check.timeout.seconds
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if b.check.type == "http":
                    return await _http_probe(b, reader, writer)
                return ""
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"no answer within {b.check.timeout.text}"
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
            for backend in pool.backends:
                host = pool.health.host or split_host_port(backend.address)[0]
                b = BackendHealth(pool.name, backend.address, resolved[backend.address], pool.health, host)
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
