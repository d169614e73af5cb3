"""Alerts: `[[alerts]]` rules (DEFAULT_ALERTS when the config has none), evaluated every
`EVAL_S` against the engine's counters, listed at `GET /api/alerts`, logged when they fire and
when they clear.

Metrics a rule may use:
- `healthy_backends`: per pool, backends up and enabled. A pool configured with fewer primaries
  than the threshold is held to what it has (a one-backend pool fires only when that backend is
  down). The value is the worst pool's.
- `error_rate`: 5xx responses / all http responses over the last 5 minutes (0 without traffic).
- `latency_p99`: seconds, the 99th percentile of http request durations over the last 5
  minutes, at the duration histogram's bucket bounds (the bucket's upper bound).
- `draining_backends`: backends draining or drained, all pools.
- `canary_rolled_back`: canary releases (fastlb.canary) in state `rolled_back`, all routes; the
  default rule CanaryRolledBack fires on the first.

A rule whose condition holds becomes `pending`, then `firing` once it has held for `for`; it is
`ok` again as soon as the condition stops holding.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastlb.config import Alert

log = logging.getLogger("fastlb.alerts")

EVAL_S = 1.0
WINDOW_S = 300.0

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass
class Sample:
    at: float
    responses: int
    errors: int
    # cumulative counts per bucket bound of http request durations, and their total
    buckets: list[int]
    count: int


@dataclass
class AlertState:
    rule: Alert
    state: str = "ok"  # ok | pending | firing
    since: float | None = None  # time.time() of entering pending or firing
    value: float | None = None
    detail: str = ""
    pending_at: float = 0.0  # time.monotonic() the condition started holding

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.rule.name,
            "expr": self.rule.expr,
            "for": self.rule.for_.text,
            "state": self.state,
            "since": None if self.since is None else _iso(self.since),
            "value": self.value,
            "detail": self.detail,
        }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


StatusSource = Callable[[], Awaitable[dict[str, Any]]]


class Alerts:
    """The rules, and `status`: what they are evaluated against (an `/api/status` document)."""

    def __init__(self, rules: Sequence[Alert], status: StatusSource) -> None:
        self.status = status
        self.states: dict[str, AlertState] = {}
        self.samples: deque[Sample] = deque()
        self._task: asyncio.Task[None] | None = None
        self.update(rules)

    def update(self, rules: Sequence[Alert]) -> None:
        """Follows a reload's rules; a rule that stays (same name and expression) keeps its
        state."""
        new: dict[str, AlertState] = {}
        for rule in rules:
            old = self.states.get(rule.name)
            new[rule.name] = (
                AlertState(rule, old.state, old.since, old.value, old.detail, old.pending_at)
                if old is not None and old.rule.expr == rule.expr
                else AlertState(rule)
            )
        self.states = new

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def as_json(self) -> list[dict[str, Any]]:
        return [s.as_json() for s in self.states.values()]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(EVAL_S)
            try:
                self.evaluate(await self.status())
            except Exception:  # an evaluation bug must not end alerting for good
                log.exception("alert evaluation failed")

    def evaluate(self, status: dict[str, Any], now: float | None = None, wall: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        values = self.values(status, now)
        for s in self.states.values():
            metric, op, threshold = s.rule.parts
            value, detail = values[metric](threshold)
            s.value = None if value is None else round(value, 6)
            s.detail = detail
            holds = value is not None and OPERATORS[op](value, threshold)
            if not holds:
                if s.state == "firing":
                    log.info("alert %s cleared: %s = %s", s.rule.name, metric, _fmt(value))
                s.state, s.since = "ok", None
                continue
            if s.state == "ok":
                s.state, s.since, s.pending_at = "pending", wall, now
            if s.state == "pending" and now - s.pending_at >= s.rule.for_.seconds:
                s.state, s.since = "firing", wall
                log.warning(
                    "alert %s firing: %s = %s (%s)%s",
                    s.rule.name,
                    metric,
                    _fmt(value),
                    s.rule.expr.strip(),
                    f"; {detail}" if detail else "",
                )

    def values(
        self, status: dict[str, Any], now: float
    ) -> dict[str, Callable[[float], tuple[float | None, str]]]:
        """Per metric: a function of the rule's threshold giving (value, detail)."""
        sample = self._sample(status, now)
        # the window starts at the oldest sample not older than WINDOW_S
        while len(self.samples) > 1 and now - self.samples[0].at > WINDOW_S:
            self.samples.popleft()
        base = self.samples[0]
        responses = sample.responses - base.responses
        errors = sample.errors - base.errors

        def healthy(threshold: float) -> tuple[float | None, str]:
            worst: tuple[float, str] | None = None
            for pool in status["pools"]:
                primaries = sum(1 for b in pool["backends"] if not b["backup"])
                # a pool smaller than the threshold is measured against its own size
                value = pool["healthy_backends"] + max(0.0, threshold - primaries)
                if worst is None or value < worst[0]:
                    worst = (value, f"pool {pool['name']}: {pool['healthy_backends']} of {primaries} up")
            return (None, "") if worst is None else worst

        def error_rate(_: float) -> tuple[float | None, str]:
            if responses <= 0:
                return 0.0, "no http responses in the window"
            return errors / responses, f"{errors} of {responses} responses were 5xx"

        def latency_p99(_: float) -> tuple[float | None, str]:
            count = sample.count - base.count
            if count <= 0:
                return None, "no http requests in the window"
            target = 0.99 * count
            bounds = status["buckets_s"]
            for bound, now_c, base_c in zip(bounds, sample.buckets, base.buckets, strict=True):
                if now_c - base_c >= target:
                    return bound, f"{count} requests"
            return math.inf, f"{count} requests, p99 above {bounds[-1]}s"

        def draining(_: float) -> tuple[float | None, str]:
            names = [
                b["id"]
                for p in status["pools"]
                for b in p["backends"]
                if b["state"] in ("draining", "drained")
            ]
            return float(len(names)), ", ".join(names)

        def rolled_back(_: float) -> tuple[float | None, str]:
            names = [
                f"{li['name']}/{r['name']}"
                for li in status["listeners"]
                for r in li.get("routes") or []
                if r.get("canary") is not None and r["canary"]["state"] == "rolled_back"
            ]
            return float(len(names)), ", ".join(names)

        return {
            "canary_rolled_back": rolled_back,
            "healthy_backends": healthy,
            "error_rate": error_rate,
            "latency_p99": latency_p99,
            "draining_backends": draining,
        }

    def _sample(self, status: dict[str, Any], now: float) -> Sample:
        http = {li["name"] for li in status["listeners"] if li["protocol"] in ("http", "https")}
        responses = sum(r["count"] for r in status["responses"])
        errors = sum(r["count"] for r in status["responses"] if r["code"] >= 500)
        buckets = [0] * len(status["buckets_s"])
        count = 0
        for li in status["listeners"]:
            if li["name"] not in http:
                continue
            for d in li["durations"]:
                count += d["count"]
                buckets = [a + b for a, b in zip(buckets, d["buckets"], strict=True)]
        sample = Sample(now, responses, errors, buckets, count)
        self.samples.append(sample)
        return sample


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"
