"""Canary releases that drive themselves (docs/canary.md): for each split route with `canary`,
the share of the canary pool walks up `steps`, one step per `interval`, while the canary pool's
figures on that route stay within bounds of the other pools' (the baseline) over the same
interval; out of bounds, the canary's share goes to 0 at once and stays there.

- States: `running` (stepping), `paused` (weights stay; an operator's pause or a manual split),
  `promoted` (the canary at 100%), `rolled_back` (the canary at 0%, held until an operator
  acts).
- Weights: the canary pool gets `steps[step]` percent; the other pools share the rest in
  proportion to their configured weights (integers that sum to 100 with the canary's).
- The decision each interval, from the engine's per-route per-pool counters (deltas since the
  interval began): fewer than `min_requests` canary requests: no decision (`hold`); canary 5xx
  rate above `max_error_rate`: `rollback`; the baseline saw requests and the canary p99 is above
  `max_p99_ratio` times the baseline p99: `rollback`; else the next step (`step`, or `promote`
  when it reaches 100). p99 is interpolated within the engine's fine latency buckets.
- Every decision that changes weights is logged (logger `fastlb.canary`), kept in the release's
  history (the last HISTORY) and in the audit trail (actor `canary`).
- Reload: a release whose route (listener name and route name) keeps the same split and the same
  canary keeps its state; any other starts again at step 0; a route that lost its canary is no
  longer driven (its live weights stay until the file's split changes, as for manual weights).

The event loop never waits on the data plane: weights are set in a thread, and stats come from
the control plane's shared snapshot source.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from fastlb.audit import AuditLog
from fastlb.config import Canary, Config, route_name
from fastlb.engine import Engine

log = logging.getLogger("fastlb.canary")

State = Literal["running", "paused", "promoted", "rolled_back"]
ACTIONS = ("pause", "resume", "promote", "rollback")
HISTORY = 50
P99 = 0.99

StatsSource = Callable[[], Awaitable[dict[str, Any]]]
Key = tuple[str, str]  # (listener name, route name)


class CanaryConflict(Exception):
    """An operator action that does not apply in the release's state (resume a promoted one)."""


# --- the arithmetic (pure) --------------------------------------------------------------------


def split_weights(split: Sequence[tuple[str, int]], canary: str, percent: int) -> dict[str, int]:
    """Live weights in percent, in split order: the canary pool gets `percent`, the others share
    the rest in proportion to their configured weights (largest remainders round up, so the
    sum is exactly 100)."""
    others = [(pool, weight) for pool, weight in split if pool != canary]
    rest = 100 - percent
    total = sum(weight for _, weight in others)
    shares: dict[str, int] = {}
    remainders: list[tuple[int, int, str]] = []
    for k, (pool, weight) in enumerate(others):
        share, remainder = divmod(rest * weight, total)
        shares[pool] = share
        remainders.append((-remainder, k, pool))
    for _, _, pool in sorted(remainders)[: rest - sum(shares.values())]:
        shares[pool] += 1
    return {pool: percent if pool == canary else shares[pool] for pool, _ in split}


@dataclass
class Counts:
    """A pool's cumulative figures on one route: responses, 5xx among them, and cumulative
    latency counts at the engine's `route_latency_buckets_us`."""

    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=list)

    def since(self, before: Counts) -> Counts:
        """The interval's figures (clamped at 0: the engine never resets them, but be safe)."""
        buckets = [
            max(0, a - b) for a, b in zip(self.buckets, _pad(before.buckets, self.buckets), strict=True)
        ]
        return Counts(max(0, self.requests - before.requests), max(0, self.errors - before.errors), buckets)

    def __add__(self, other: Counts) -> Counts:
        mine, theirs = _pad(self.buckets, other.buckets), _pad(other.buckets, self.buckets)
        buckets = [a + b for a, b in zip(mine, theirs, strict=True)]
        return Counts(self.requests + other.requests, self.errors + other.errors, buckets)


def _pad(buckets: list[int], like: list[int]) -> list[int]:
    """`buckets`, or zeros as long as `like` when it has none (a pool not seen yet)."""
    return buckets if buckets else [0] * len(like)


def quantile_ms(q: float, buckets: Sequence[int], bounds_us: Sequence[int], total: int) -> float | None:
    """The q-quantile in ms from cumulative bucket counts, interpolated linearly within the
    bucket that holds it (Prometheus histogram_quantile); None without requests; the last
    bound when it lies beyond it."""
    if total <= 0 or not bounds_us:
        return None
    rank = q * total
    below_count, below_bound = 0, 0
    for bound, count in zip(bounds_us, buckets, strict=True):
        if count >= rank:
            if count == below_count:
                return bound / 1000
            return (below_bound + (bound - below_bound) * (rank - below_count) / (count - below_count)) / 1000
        below_count, below_bound = count, bound
    return bounds_us[-1] / 1000


@dataclass(frozen=True)
class Figures:
    """One side's interval figures, as shown and judged."""

    requests: int
    errors: int
    p99_ms: float | None

    @classmethod
    def of(cls, counts: Counts, bounds_us: Sequence[int]) -> Figures:
        total = max(counts.requests, counts.buckets[-1] if counts.buckets else 0)
        return cls(counts.requests, counts.errors, quantile_ms(P99, counts.buckets, bounds_us, total))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_json(self) -> dict[str, Any]:
        p99 = None if self.p99_ms is None else round(self.p99_ms, 3)
        return {"requests": self.requests, "error_rate": round(self.error_rate, 6), "p99_ms": p99}

    def text(self) -> str:
        p99 = "-" if self.p99_ms is None else f"{self.p99_ms:.2f}ms"
        return f"{self.requests} requests, {self.error_rate:.2%} 5xx, p99 {p99}"


Verdict = Literal["hold", "step", "rollback"]


def decide(cfg: Canary, canary: Figures, baseline: Figures) -> tuple[Verdict, str]:
    """The interval's verdict and why (docs/canary.md, "The decision")."""
    if canary.requests < cfg.min_requests:
        return "hold", f"{canary.requests} canary requests, fewer than min_requests = {cfg.min_requests}"
    if canary.error_rate > cfg.max_error_rate:
        return (
            "rollback",
            f"canary 5xx rate {canary.error_rate:.2%} above max_error_rate {cfg.max_error_rate:.2%}",
        )
    if baseline.requests > 0 and canary.p99_ms is not None and baseline.p99_ms is not None:
        limit = cfg.max_p99_ratio * baseline.p99_ms
        if canary.p99_ms > limit:
            return "rollback", (
                f"canary p99 {canary.p99_ms:.2f}ms above max_p99_ratio {cfg.max_p99_ratio:g}"
                f" x baseline p99 {baseline.p99_ms:.2f}ms"
            )
    return "step", "within bounds"


# --- one release ------------------------------------------------------------------------------


@dataclass
class Release:
    """The canary of one route and where it stands."""

    listener: str
    route: str
    cfg: Canary
    split: list[tuple[str, int]]  # the file's split: (pool, weight)
    state: State = "running"
    step: int = 0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last: dict[str, Any] | None = None  # the last judged interval: canary and baseline figures
    # bumped by every change of state: a driving loop of an older generation stops
    generation: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> Key:
        return self.listener, self.route

    @property
    def name(self) -> str:
        return f"{self.listener}/{self.route}"

    @property
    def weight(self) -> int:
        """The canary pool's share in percent."""
        if self.state == "promoted":
            return 100
        if self.state == "rolled_back":
            return 0
        return self.cfg.steps[self.step]

    def weights(self) -> dict[str, int]:
        return split_weights(self.split, self.cfg.pool, self.weight)

    def as_json(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "pool": c.pool,
            "state": self.state,
            "step": self.step,
            "weight": self.weight,
            "steps": list(c.steps),
            "interval": c.interval.text,
            "max_error_rate": c.max_error_rate,
            "max_p99_ratio": c.max_p99_ratio,
            "min_requests": c.min_requests,
            "last": self.last,
            "history": list(self.history),
        }


def _releases(config: Config) -> dict[Key, tuple[Canary, list[tuple[str, int]]]]:
    found: dict[Key, tuple[Canary, list[tuple[str, int]]]] = {}
    for lst in config.listeners:
        if not lst.is_http:
            continue
        for j, r in enumerate(lst.routes):
            if r.canary is not None and r.split is not None:
                found[lst.name, route_name(j, r)] = (r.canary, [(e.pool, e.weight) for e in r.split])
    return found


class Canaries:
    """Every release of the running config, driven on the control plane's event loop."""

    def __init__(self, engine: Engine, stats: StatsSource, audit: AuditLog) -> None:
        self.engine = engine
        self.stats = stats
        self.audit = audit
        self.releases: dict[Key, Release] = {}

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.update(self.engine.config)

    async def stop(self) -> None:
        tasks = [r.task for r in self.releases.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def update(self, config: Config) -> None:
        """Follows a (re)loaded config: same split and canary, same state; else from step 0."""
        found = _releases(config)
        for key in set(self.releases) - set(found):
            gone = self.releases.pop(key)
            self._halt(gone)
            log.info("canary %s: no canary in the config any more; its weights stay as they are", gone.name)
        for key, (cfg, split) in found.items():
            old = self.releases.get(key)
            if old is not None and old.cfg == cfg and old.split == split:
                continue
            if old is not None:
                self._halt(old)
                log.info("canary %s: its split or canary changed; it starts again", old.name)
            release = Release(key[0], key[1], cfg, split)
            self.releases[key] = release
            self._spawn(release, self._begin(release))

    def rolled_back(self) -> int:
        return sum(1 for r in self.releases.values() if r.state == "rolled_back")

    def status(self, listener: str, route: str) -> dict[str, Any] | None:
        release = self.releases.get((listener, route))
        return None if release is None else release.as_json()

    # --- operators --------------------------------------------------------------------------

    def release(self, listener: str, route: str) -> Release:
        release = self.releases.get((listener, route))
        if release is None:
            raise KeyError(f"listener '{listener}' has no route '{route}' with a canary")
        return release

    async def act(self, listener: str, route: str, action: str) -> Release:
        """pause, resume, promote or rollback; KeyError without a canary, ValueError for an
        unknown action, CanaryConflict where the action does not apply."""
        if action not in ACTIONS:
            raise ValueError(f"action: one of {', '.join(ACTIONS)}, not {action!r}")
        release = self.release(listener, route)
        async with release.lock:
            await self._act(release, action)
        return release

    async def _act(self, r: Release, action: str) -> None:
        if action == "pause":
            if r.state in ("promoted", "rolled_back"):
                raise CanaryConflict(f"canary {r.name} is {r.state}: there is nothing to pause")
            if r.state == "running":
                self._transition(r, "paused", "pause", "operator")
            return
        if action == "resume":
            if r.state == "promoted":
                raise CanaryConflict(f"canary {r.name} is promoted: there is nothing to resume")
            if r.state == "running":
                return
            step = 0 if r.state == "rolled_back" else r.step
            await self._apply(r, split_weights(r.split, r.cfg.pool, r.cfg.steps[step]))
            r.step = step
            self._transition(r, "running", "resume", "operator")
            self._spawn(r, self._drive(r, r.generation))
            return
        state: State = "promoted" if action == "promote" else "rolled_back"
        await self._apply(r, split_weights(r.split, r.cfg.pool, 100 if state == "promoted" else 0))
        self._transition(r, state, action, "operator")

    async def manual_split(self, listener: str, route: str, apply: Callable[[], Awaitable[None]]) -> bool:
        """Live weights set by hand (`apply`); a running canary of the route is paused (else its
        next step would overwrite them). Returns whether one was paused."""
        release = self.releases.get((listener, route))
        if release is None:
            await apply()
            return False
        async with release.lock:
            await apply()
            if release.state != "running":
                return False
            self._transition(release, "paused", "pause", "manual split weights through the admin API")
            return True

    # --- driving ----------------------------------------------------------------------------

    async def _begin(self, r: Release) -> None:
        async with r.lock:
            try:
                await self._apply(r, r.weights())
            except (KeyError, ValueError) as err:
                log.error("canary %s: cannot set its weights: %s", r.name, err)
                return
            self._record(r, "start", f"step 0: {r.cfg.pool} at {r.weight}%")
            log.info("canary %s: starts, %s at %d%% (%s)", r.name, r.cfg.pool, r.weight, _text(r.weights()))
        await self._drive(r, r.generation)

    async def _drive(self, r: Release, generation: int) -> None:
        """One loop per running release: every interval, judge and act."""
        before = await self._counts(r)
        while before is not None:
            await asyncio.sleep(r.cfg.interval.seconds)
            if r.generation != generation or r.state != "running":
                return
            now = await self._counts(r)
            if now is None:
                return
            async with r.lock:
                if r.generation != generation or r.state != "running":
                    return
                try:
                    await self._judge(r, before, now)
                except (KeyError, ValueError) as err:  # a reload took the route or its pools away
                    log.error("canary %s: cannot set its weights, stops driving: %s", r.name, err)
                    return
            before = now

    async def _counts(self, r: Release) -> tuple[dict[str, Counts], list[int]] | None:
        """The route's cumulative figures per pool now, and the latency bucket bounds; None when
        the engine no longer has the route (a reload is taking it away)."""
        stats = await self.stats()
        for li in stats["listeners"]:
            if li["name"] != r.listener:
                continue
            for route in li.get("routes") or []:
                if route["name"] == r.route:
                    pools = {
                        pool: Counts(c["requests"], c["responses_5xx"], list(c["latency_buckets"]))
                        for pool, c in route["pools"].items()
                    }
                    return pools, list(stats["route_latency_buckets_us"])
        return None

    async def _judge(
        self,
        r: Release,
        before: tuple[dict[str, Counts], list[int]],
        now: tuple[dict[str, Counts], list[int]],
    ) -> None:
        (was, _), (pools, bounds) = before, now
        delta = {pool: c.since(was.get(pool, Counts())) for pool, c in pools.items()}
        canary = Figures.of(delta.get(r.cfg.pool, Counts()), bounds)
        base = Counts()
        for pool, c in delta.items():
            if pool != r.cfg.pool:
                base = base + c
        baseline = Figures.of(base, bounds)
        figures = {"canary": canary.as_json(), "baseline": baseline.as_json()}
        r.last = figures
        verdict, reason = decide(r.cfg, canary, baseline)
        said = f"{reason}; canary {r.cfg.pool}: {canary.text()}; baseline: {baseline.text()}"
        if verdict == "hold":
            self._record(r, "hold", f"{reason}: no decision", figures)
            log.info("canary %s: no decision at %d%%: %s", r.name, r.weight, said)
            return
        if verdict == "rollback":
            weights = split_weights(r.split, r.cfg.pool, 0)
            await self._apply(r, weights)
            self._transition(r, "rolled_back", "rollback", reason, figures)
            self._audit(r, "rollback", weights)
            log.warning("canary %s: rolled back (%s): %s", r.name, _text(weights), said)
            return
        step = r.step + 1
        weights = split_weights(r.split, r.cfg.pool, r.cfg.steps[step])
        await self._apply(r, weights)
        r.step = step
        if r.cfg.steps[step] == 100:
            self._transition(r, "promoted", "promote", reason, figures)
            self._audit(r, "promote", weights)
            log.info("canary %s: promoted (%s): %s", r.name, _text(weights), said)
            return
        self._record(r, "step", reason, figures)
        self._audit(r, "step", weights)
        log.info(
            "canary %s: step %d, %s at %d%% (%s): %s",
            r.name,
            step,
            r.cfg.pool,
            r.weight,
            _text(weights),
            said,
        )

    # --- helpers ----------------------------------------------------------------------------

    async def _apply(self, r: Release, weights: dict[str, int]) -> None:
        await asyncio.to_thread(self.engine.set_split_weights, r.listener, r.route, weights)

    def _transition(
        self, r: Release, state: State, decision: str, reason: str, figures: dict[str, Any] | None = None
    ) -> None:
        r.state = state
        r.generation += 1
        self._record(r, decision, reason, figures)
        if figures is None:  # an operator's: the automatic decisions log their figures
            log.info(
                "canary %s: %s (%s): %s, %s at %d%%", r.name, decision, reason, state, r.cfg.pool, r.weight
            )

    @staticmethod
    def _record(r: Release, decision: str, reason: str, figures: dict[str, Any] | None = None) -> None:
        figures = figures or {}
        r.history.append(
            {
                "time": round(time.time(), 3),
                "step": r.step,
                "weight": r.weight,
                "decision": decision,
                "reason": reason,
                "canary": figures.get("canary"),
                "baseline": figures.get("baseline"),
            }
        )

    def _audit(self, r: Release, action: str, weights: dict[str, int]) -> None:
        target = f"{r.name} {orjson.dumps(weights).decode()}"
        self.audit.record("canary", "-", f"canary/{action}", target, 200, "ok")

    @staticmethod
    def _spawn(r: Release, work: Coroutine[Any, Any, None]) -> None:
        """The release's driving task; an older one (resumed while it slept) is cancelled."""
        old = r.task
        if old is not None and not old.done() and old is not asyncio.current_task():
            old.cancel()
        r.task = asyncio.get_running_loop().create_task(work, name=f"canary {r.name}")

    @staticmethod
    def _halt(r: Release) -> None:
        r.generation += 1
        if r.task is not None:
            r.task.cancel()


def _text(weights: dict[str, int]) -> str:
    return " ".join(f"{pool}={w}%" for pool, w in weights.items())
