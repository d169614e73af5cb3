"""The control plane of a running `fastlb serve`: what the admin API, `fastlb ctl` and signals
drive. It decides; the data plane (`Engine`) only receives the decisions.

- One owner of backend state: the engine holds each backend's admin state, health verdict and
  runtime weight, keyed by `pool/address`, and keeps them across every reload that keeps the id
  (whatever else changed). This module keeps only its timers (drains, slow-start ramps, the end of
  an ejection) under the same ids, and reads the state from the engine when it decides.
- Health: active checks (`fastlb.health`), and passive ejection reported by the engine, which is
  polled here: an ejected backend is held down for `passive.eject`, then returns through its
  active checks (or, in a pool without them, when `eject` has passed).
- Slow start: a backend that comes back (checks, the end of an ejection, `enable`) or is added by
  a reload gets its share ramped from ~0 to all of its weight, linearly over `slow_start`.
- Draining: no new connections or requests; the backend is `drained` once idle, and at the
  pool's `drain_timeout` whatever is still open to it is closed.
- Reload: validate, then swap; an invalid file changes nothing.
- Splits: live split weights (`set_split`) are the engine's, kept across a reload unless the
  file's split of the route changed; canary releases (`fastlb.canary`) set them each interval.
- The event loop never waits on the data plane: stats snapshots (which wait for the workers),
  reloads (file, DNS, table building) and weight changes (table rebuilds) run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastlb.alerts import Alerts
from fastlb.audit import AuditLog
from fastlb.canary import Canaries, Release
from fastlb.config import Config, ConfigError, Duration, Pool
from fastlb.discovery import Discovery, Found
from fastlb.engine import AdminState, Engine
from fastlb.health import HealthChecker
from fastlb.kernel_path import KernelPath

log = logging.getLogger("fastlb")

# How often the engine is asked for ejections, and a draining backend for its open connections.
EJECTION_POLL_S = 0.1
DRAIN_POLL_S = 0.1
# Slow start moves the scale at most this often (and in at least 20 steps).
RAMP_MIN_STEP_S = 0.1
# The share a backend starts its slow start with, per mille.
RAMP_START_PER_MILLE = 10


class ReloadError(Exception):
    """A reload that was refused; `errors` are one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


class StatsSource:
    """Engine snapshots taken in a thread, one at a time: whoever asks while one is being taken
    shares it (alerts, /metrics, /api/status and the dashboard may ask at once), unless the
    engine took a change since it began (a read after a write sees the write: an operator's
    promote, then /api/status)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._pending_writes = -1  # engine.writes when the pending snapshot began

    async def __call__(self) -> dict[str, Any]:
        if self._pending is None or self._pending_writes != self.engine.writes:
            pending = asyncio.ensure_future(asyncio.to_thread(self.engine.stats))
            self._pending, self._pending_writes = pending, self.engine.writes
            pending.add_done_callback(self._taken)
        # shielded: one caller giving up does not cancel the snapshot for the others
        return await asyncio.shield(self._pending)

    def _taken(self, snapshot: asyncio.Future[dict[str, Any]]) -> None:
        if self._pending is snapshot:
            self._pending = None


class ControlPlane:
    """Runtime control of one engine: health, ejection, slow start, drain, weights, reload."""

    def __init__(
        self,
        engine: Engine,
        reload: Callable[[], Config] | None = None,
        discovered: tuple[Config, dict[str, list[Found]]] | None = None,
    ) -> None:
        """`discovered`: the config as written and what DNS gave before the engine started
        (fastlb.discovery), when the engine runs a config expanded from them."""
        self.engine = engine
        self._reload = reload
        self._reloading = asyncio.Lock()
        self.stats = StatsSource(engine)
        self.checker = HealthChecker(engine, on_flip=self._on_health_flip, held=self._held)
        self.stopping = False
        self._ejected_until: dict[str, float] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._ramps: dict[str, asyncio.Task[None]] = {}
        self._returns: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.started = time.time()
        self.reloads = 0
        self.alerts = Alerts(engine.config.alerts, self.status)
        self.audit = AuditLog()
        self.canaries = Canaries(engine, self.stats, self.audit)
        self.kernel = KernelPath(engine)
        # called with the new config after each reload that took (the admin API's TLS)
        self.reload_hooks: list[Callable[[Config], None]] = []
        file_config, found = discovered or (engine.config, {})
        self.discovery = Discovery(file_config, self._apply_discovered, self._drain_out, self.enable, found)

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Raises KernelPathError (naming the listener) when nftables cannot be programmed."""
        self.kernel.start()
        self.checker.start()
        self.alerts.start()
        self.canaries.start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_ejections(), name="ejections")

    async def start_discovery(self) -> None:
        """Backends from DNS: the first lookups, their result applied, then the lookup loops."""
        if await self.discovery.start():
            await self._apply_discovered(self.discovery.current())

    async def stop(self) -> None:
        """Stops checks and timers; the engine keeps its last decisions."""
        self.stopping = True
        tasks = [*self._drains.values(), *self._ramps.values(), *self._returns.values()]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.discovery.stop()
        await self.canaries.stop()
        await self.alerts.stop()
        await self.checker.stop()

    # --- runtime control (admin API, `fastlb ctl`) -------------------------------------------

    def pool(self, name: str) -> Pool:
        for p in self.engine.config.pools:
            if p.name == name:
                return p
        raise KeyError(f"unknown pool '{name}'")

    def _check(self, pool: str, address: str) -> str:
        """The backend's id; KeyError naming what does not exist."""
        p = self.pool(pool)
        if not any(b.address == address for b in p.backends):
            raise KeyError(f"pool '{pool}' has no backend '{address}'")
        return f"{pool}/{address}"

    def _admin(self, pool: str, address: str) -> AdminState:
        return self.engine.backend_state(pool, address).admin

    def drain(self, pool: str, address: str) -> None:
        """No new connections or requests; open ones finish, up to the pool's drain_timeout."""
        bid = self._check(pool, address)
        if self._admin(pool, address) == "draining":
            return
        self._set_admin(bid, pool, address, "draining")
        timeout = self.pool(pool).drain_timeout.seconds
        log.info("backend %s draining (closing what is left after %gs)", bid, timeout)
        self._spawn(self._drains, bid, self._drain(pool, address, timeout))

    def enable(self, pool: str, address: str) -> None:
        """Back into rotation; with slow start, its share ramps up."""
        bid = self._check(pool, address)
        was = self._admin(pool, address)
        self._set_admin(bid, pool, address, "enabled")
        if was != "enabled":
            log.info("backend %s enabled", bid)
            self._start_ramp(pool, address)

    def disable(self, pool: str, address: str) -> None:
        """Out of rotation at once; open connections finish."""
        bid = self._check(pool, address)
        self._set_admin(bid, pool, address, "disabled")
        log.info("backend %s disabled", bid)

    async def set_weight(self, pool: str, address: str, weight: int) -> None:
        """A runtime weight: it stays across reloads until the file's weight for the backend
        changes (then the file wins)."""
        bid = self._check(pool, address)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            raise ValueError("weight: an integer from 0 to 1000")
        # rebuilding rings and tables for the new weight is the engine's work, off the loop
        await asyncio.to_thread(self.engine.set_backend_weight, pool, address, weight)
        log.info("backend %s weight %d", bid, weight)

    async def set_split(self, listener: str, route: str, weights: object) -> bool:
        """Live weights of a split route, one per pool of its split (0..1000, not all 0); a
        running canary of the route is paused. Returns whether one was. KeyError for an unknown
        listener or route, ValueError naming the field for bad weights."""
        if not isinstance(weights, dict) or not weights:
            raise ValueError('weights: an object of pool names to weights, e.g. {"v1": 50, "v2": 50}')
        for pool, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 1000:
                raise ValueError(f"weights.{pool}: an integer from 0 to 1000")
        given = {str(pool): int(w) for pool, w in weights.items()}

        async def apply() -> None:
            await asyncio.to_thread(self.engine.set_split_weights, listener, route, given)

        paused = await self.canaries.manual_split(listener, route, apply)
        said = " ".join(f"{pool}={w}" for pool, w in given.items())
        log.info(
            "route %s/%s: split weights %s%s", listener, route, said, "; its canary paused" if paused else ""
        )
        return paused

    async def canary(self, listener: str, route: str, action: str) -> Release:
        """pause | resume | promote | rollback the canary of a route (fastlb.canary)."""
        return await self.canaries.act(listener, route, action)

    async def reload(self) -> Config:
        """Re-reads the config file and applies it; ReloadError (nothing changed) if it is
        invalid or cannot be applied. Reading, resolving and table building run in a thread;
        reloads run one at a time."""
        if self._reload is None:
            raise ReloadError(["this server was not started from a config file"])
        async with self._reloading:
            try:
                new = await asyncio.to_thread(self._reload)
            except ConfigError as err:
                raise ReloadError(list(err.errors)) from None
            except OSError as err:
                raise ReloadError([f"cannot read the config: {err}"]) from None
            new = await self.discovery.update(new)
            old_ids = self._backend_ids()
            try:
                await asyncio.to_thread(self.engine.update, new)
            except (OSError, RuntimeError, ValueError) as err:
                raise ReloadError([str(err)]) from None
            self._after_reload(old_ids)
        log.info("reloaded: %d listeners, %d pools", len(new.listeners), len(new.pools))
        for line in new.warnings:
            log.warning("config: %s", line)
        return new

    async def _apply_discovered(self, config: Config) -> None:
        """What DNS discovery found, applied as a reload applies a file."""
        async with self._reloading:
            old_ids = self._backend_ids()
            try:
                await asyncio.to_thread(self.engine.update, config)
            except (OSError, RuntimeError, ValueError) as err:
                log.error("discovery: the new backends could not be applied: %s", err)
                return
            self._after_reload(old_ids, counted=False)

    async def _drain_out(self, pool: str, address: str) -> None:
        """Drains a backend DNS no longer gives; returns once it is drained (or timed out)."""
        self.drain(pool, address)
        task = self._drains.get(f"{pool}/{address}")
        if task is not None:
            await asyncio.shield(task)

    def _after_reload(self, old_ids: set[str], counted: bool = True) -> None:
        """Follows the new config: checks, alerts, timers of removed and added backends, and
        backends whose pool gained or lost its active checks."""
        self.reloads += counted
        self.checker.update()
        self.alerts.update(self.engine.config.alerts)
        self.canaries.update(self.engine.config)
        for hook in self.reload_hooks:
            hook(self.engine.config)
        ids = self._backend_ids()
        for bid in old_ids - ids:
            self._forget(bid)
        for bid in ids - old_ids:
            pool, _, address = bid.partition("/")
            self._start_ramp(pool, address)
        for bid in ids & old_ids:
            if bid not in self.checker.backends:
                self._without_checks(bid)
            else:
                # the checks decide from now on, after the hold
                self._cancel(self._returns, bid)

    def _without_checks(self, bid: str) -> None:
        """A backend of a pool with no active checks (any more): nothing would bring it back
        but the end of an ejection."""
        pool, _, address = bid.partition("/")
        if self.engine.backend_state(pool, address).up:
            return
        left = self._ejected_until.get(bid, 0.0) - time.monotonic()
        if left > 0:
            if bid not in self._returns:
                self._spawn(self._returns, bid, self._return_after(pool, address, left))
            return
        self.engine.set_backend_up(pool, address, True)
        log.info("backend %s is up: its pool has no active checks any more", bid)
        if self._admin(pool, address) == "enabled":
            self._start_ramp(pool, address)

    async def status(self) -> dict[str, Any]:
        """/api/status: listeners, pools and backends with their state, why, and counters."""
        stats = await self.stats()
        kernel_listeners, kernel_backends = await self.kernel.status()
        now = time.monotonic()
        pools_cfg = {p.name: p for p in self.engine.config.pools}
        pools = []
        for p in stats["pools"]:
            cfg = pools_cfg.get(p["name"])
            if cfg is None:
                continue  # removed by a reload since the snapshot
            backends = [
                {
                    **self._backend_status(cfg, _with_kernel(b, kernel_backends), now),
                    "kernel": kernel_backends.get(b["id"]),
                }
                for b in p["backends"]
            ]
            healthy = sum(1 for b in backends if b["state"] == "up")
            pools.append(
                {
                    "name": p["name"],
                    "algorithm": cfg.algorithm,
                    "healthy_backends": healthy,
                    # backends from DNS (host names, srv) now; null: the pool's are as written
                    "discovered": self.discovery.counts().get(p["name"]),
                    "backends": backends,
                }
            )
        return {
            **{k: stats[k] for k in ("buckets_s", "responses", "log_dropped")},
            "version": _version(),
            "uptime_s": round(time.time() - self.started, 3),
            "reloads": self.reloads,
            "stopping": self.stopping,
            "connections_active": stats["connections_active"],
            "listeners": [
                *({**self._listener_status(li), "data_path": "proxy"} for li in stats["listeners"]),
                *kernel_listeners,  # the same shape, counted by nftables and conntrack
            ],
            "pools": pools,
        }

    def _listener_status(self, li: dict[str, Any]) -> dict[str, Any]:
        """A listener as the engine counts it, with its routes (http/https; null on the others):
        name, split (live and the file's weights), requests and 5xx per pool, and the canary."""
        routes = li.get("routes")
        if routes is None:
            return li
        return {
            **li,
            "routes": [
                {
                    "name": r["name"],
                    "index": r["index"],
                    "split": r["split"],
                    "affinity_cookie": r["affinity_cookie"],
                    "pools": {
                        pool: {"requests": c["requests"], "responses_5xx": c["responses_5xx"]}
                        for pool, c in r["pools"].items()
                    },
                    "canary": self.canaries.status(li["name"], r["name"]),
                }
                for r in routes
            ],
        }

    def _backend_status(self, cfg: Pool, b: dict[str, Any], now: float) -> dict[str, Any]:
        bid = b["id"]
        health = self.checker.backends.get(bid)
        until = self._ejected_until.get(bid, 0.0)
        return {
            **b,
            "reason": self._reason(cfg, b, until - now),
            "failures_total": sum(b["failures"].values()),
            "health": {
                "type": cfg.health.type,
                "up": b["up"],
                "last_error": health.last_error if health is not None else "",
                "checks_failed": health.checks_failed if health is not None else 0,
            },
            "ejected": until > now,
            "slow_start": bid in self._ramps,
        }

    def _reason(self, cfg: Pool, b: dict[str, Any], ejected_left: float) -> str:
        """Why the backend is in the state it is, in a few words ("" when it is simply up)."""
        state = b["state"]
        if state == "disabled":
            return "disabled through the admin API"
        if state in ("draining", "drained"):
            return f"{state} through the admin API"
        if state == "up":
            return "slow start" if b["id"] in self._ramps else ""
        if ejected_left > 0:
            then = f" and {cfg.health.rise} passing checks" if b["id"] in self.checker.backends else ""
            return f"ejected by passive detection; back in {ejected_left:.0f}s{then}"
        health = self.checker.backends.get(b["id"])
        if health is not None:
            return f"health checks failing: {health.last_error}" if health.last_error else "health checks"
        return "down"

    # --- internals --------------------------------------------------------------------------

    def _backend_ids(self) -> set[str]:
        return {f"{p.name}/{b.address}" for p in self.engine.config.pools for b in p.backends}

    def _held(self, bid: str) -> bool:
        """Whether the backend is within an ejection (its checks' successes do not count)."""
        return self._ejected_until.get(bid, 0.0) > time.monotonic()

    def _set_admin(self, bid: str, pool: str, address: str, state: AdminState) -> None:
        self.engine.set_backend_admin(pool, address, state)
        if state != "draining":
            self._cancel(self._drains, bid)
        if state != "enabled":
            self._cancel(self._ramps, bid)

    def _forget(self, bid: str) -> None:
        """A reload removed the backend: its timers go with it."""
        for tasks in (self._drains, self._ramps, self._returns):
            self._cancel(tasks, bid)
        self._ejected_until.pop(bid, None)

    def _spawn(self, tasks: dict[str, asyncio.Task[None]], bid: str, work: Coroutine[Any, Any, None]) -> None:
        self._cancel(tasks, bid)
        task = asyncio.get_running_loop().create_task(work, name=bid)
        tasks[bid] = task
        task.add_done_callback(lambda t: tasks.pop(bid, None) if tasks.get(bid) is t else None)

    @staticmethod
    def _cancel(tasks: dict[str, asyncio.Task[None]], bid: str) -> None:
        task = tasks.pop(bid, None)
        if task is not None:
            task.cancel()

    def _active(self, pool: str, address: str) -> int | None:
        """Open to the backend now (one shared counter: no worker is asked), None if it is gone."""
        try:
            return self.engine.backend_active(pool, address) + self.kernel.active(pool, address)
        except KeyError:
            return None

    async def _drain(self, pool: str, address: str, timeout: float) -> None:
        bid = f"{pool}/{address}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kernel.enabled:
                await self.kernel.figures()  # conntrack now: `_active` adds its flows
            active = self._active(pool, address)
            if active is None:
                return
            if active == 0:
                log.info("backend %s drained", bid)
                return
            await asyncio.sleep(DRAIN_POLL_S)
        left = self._active(pool, address) or 0
        log.warning("backend %s: drain_timeout reached, closing %d connections", bid, left)
        with contextlib.suppress(KeyError):
            self.engine.close_backend(pool, address)

    def _start_ramp(self, pool: str, address: str) -> None:
        try:
            duration = self.pool(pool).slow_start.seconds
        except KeyError:
            return
        if duration <= 0:
            return
        self._spawn(self._ramps, f"{pool}/{address}", self._ramp(pool, address, duration))

    async def _ramp(self, pool: str, address: str, duration: float) -> None:
        step = max(RAMP_MIN_STEP_S, duration / 20)
        start = time.monotonic()
        try:
            while (elapsed := time.monotonic() - start) < duration:
                scale = max(RAMP_START_PER_MILLE, int(1000 * elapsed / duration))
                self.engine.set_backend_scale(pool, address, scale)
                await asyncio.sleep(step)
            self.engine.set_backend_scale(pool, address, 1000)
            log.info("backend %s: slow start done", f"{pool}/{address}")
        except KeyError:
            return  # removed by a reload

    def _on_health_flip(self, bid: str, up: bool) -> None:
        pool, _, address = bid.partition("/")
        if up:
            self._ejected_until.pop(bid, None)
            if self._admin(pool, address) == "enabled":
                self._start_ramp(pool, address)
        else:
            self._cancel(self._ramps, bid)

    async def _watch_ejections(self) -> None:
        while True:
            await asyncio.sleep(EJECTION_POLL_S)
            for bid in self.engine.take_ejected():
                self._on_ejected(bid)

    def _on_ejected(self, bid: str) -> None:
        pool, _, address = bid.partition("/")
        try:
            cfg = self.pool(pool)
        except KeyError:
            return
        # A reload may have turned passive detection off since: the ejection ends at once.
        eject = cfg.passive.eject if cfg.passive is not None else Duration(0)
        failures = cfg.passive.consecutive_failures if cfg.passive is not None else 0
        self._ejected_until[bid] = time.monotonic() + eject.seconds
        self._cancel(self._ramps, bid)
        health = self.checker.backends.get(bid)
        if health is not None:
            health.eject()
            log.warning(
                "backend %s ejected: %d failures in a row; back after %s and %d passing checks",
                bid,
                failures,
                eject.text,
                cfg.health.rise,
            )
        else:
            log.warning(
                "backend %s ejected: %d failures in a row; back in %s",
                bid,
                failures,
                eject.text,
            )
            self._spawn(self._returns, bid, self._return_after(pool, address, eject.seconds))

    async def _return_after(self, pool: str, address: str, delay: float) -> None:
        """A pool without active checks: the ejection simply ends (Envoy's behaviour)."""
        await asyncio.sleep(delay)
        bid = f"{pool}/{address}"
        self._ejected_until.pop(bid, None)
        try:
            self.engine.set_backend_up(pool, address, True)
            enabled = self._admin(pool, address) == "enabled"
        except KeyError:
            return
        log.info("backend %s returns after its ejection", bid)
        if enabled:
            self._start_ramp(pool, address)


def _version() -> str:
    from fastlb import __version__

    return __version__


def _with_kernel(b: dict[str, Any], kernel: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A backend the engine calls drained is still draining while kernel flows to it are open."""
    flows = sum(k["flows_active"] for k in (kernel.get(b["id"]) or {}).get("listeners", {}).values())
    return {**b, "state": "draining"} if b["state"] == "drained" and flows else b
