"""Canary releases and live split weights (issue 17, python/fastlb/canary.py): the decision and
weight arithmetic alone, then real `fastlb serve` processes with real backends: a failing canary
rolled back, a healthy one promoted, a slow one rolled back by max_p99_ratio, the operator's
actions through the API and `fastlb ctl`, live split weights, reload semantics, and sticky A/B
groups (split_affinity).

Intervals are short (0.3-0.5 s) under a steady keep-alive stream; what is asserted is the
sequence of decisions, never how long they took (waits are bounded generously)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import pytest
from admin import Stream, api, scrape
from h2util import H2Client
from httputil import http_config, pool

from fastlb.canary import Counts, Figures, decide, quantile_ms, split_weights
from fastlb.config import Canary

from conftest import free_port, wait_until

# --- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "canary", "percent", "expected"),
    [
        ([("v1", 95), ("v2", 5)], "v2", 5, {"v1": 95, "v2": 5}),
        ([("v1", 95), ("v2", 5)], "v2", 25, {"v1": 75, "v2": 25}),
        ([("v1", 95), ("v2", 5)], "v2", 100, {"v1": 0, "v2": 100}),
        ([("v1", 95), ("v2", 5)], "v2", 0, {"v1": 100, "v2": 0}),
        # the others share the rest by their configured weights; the sum stays 100
        ([("a", 1), ("b", 1), ("c", 1), ("new", 0)], "new", 0, {"a": 34, "b": 33, "c": 33, "new": 0}),
        ([("a", 2), ("new", 1), ("b", 1)], "new", 10, {"a": 60, "new": 10, "b": 30}),
        ([("a", 1), ("b", 2), ("new", 1)], "new", 5, {"a": 32, "b": 63, "new": 5}),
    ],
)
def test_split_weights(
    split: list[tuple[str, int]], canary: str, percent: int, expected: dict[str, int]
) -> None:
    weights = split_weights(split, canary, percent)
    assert weights == expected
    assert list(weights) == [p for p, _ in split] and sum(weights.values()) == 100


def test_quantile_interpolates_within_the_bucket() -> None:
    bounds = [100, 200, 400, 800]
    assert quantile_ms(0.99, [0, 0, 0, 0], bounds, 0) is None
    # 100 requests, all within (200, 400]: the 99th lies 99% of the way through that bucket
    assert quantile_ms(0.99, [0, 0, 100, 100], bounds, 100) == pytest.approx(0.398)
    # 90 below 100 us and 10 in (400, 800]: the 99th is 90% into the last bucket
    assert quantile_ms(0.99, [90, 90, 90, 100], bounds, 100) == pytest.approx(0.76)
    # beyond the last bound: the last bound
    assert quantile_ms(0.99, [0, 0, 0, 50], bounds, 100) == 0.8


def test_counts_deltas_and_sums() -> None:
    before, now = Counts(10, 1, [5, 8, 10]), Counts(30, 4, [15, 25, 30])
    assert now.since(before) == Counts(20, 3, [10, 17, 20])
    assert now.since(Counts()) == now  # a pool not seen before: all of it
    assert Counts() + now == now and now + Counts(1, 0, [1, 1, 1]) == Counts(31, 4, [16, 26, 31])


def cfg(**keys: Any) -> Canary:
    return Canary.model_validate({"pool": "v2", **keys})


def test_decide() -> None:
    c = cfg(min_requests=100, max_error_rate=0.01, max_p99_ratio=1.5)
    ok = Figures(1000, 0, 10.0)
    assert decide(c, Figures(99, 50, 90.0), ok) == (
        "hold",
        "99 canary requests, fewer than min_requests = 100",
    )
    verdict, why = decide(c, Figures(100, 2, 10.0), ok)
    assert verdict == "rollback" and "5xx rate 2.00% above max_error_rate 1.00%" in why
    assert decide(c, Figures(100, 1, 10.0), ok)[0] == "step"  # 1% is not above 1%
    verdict, why = decide(c, Figures(200, 0, 15.1), ok)
    assert verdict == "rollback" and "p99 15.10ms above max_p99_ratio 1.5 x baseline p99 10.00ms" in why
    assert decide(c, Figures(200, 0, 15.0), ok)[0] == "step"
    # no baseline traffic (the canary took it all): latency is not compared
    assert decide(c, Figures(200, 0, 99.0), Figures(0, 0, None)) == ("step", "within bounds")
    # min_requests = 0: steps on time alone
    assert decide(cfg(min_requests=0), Figures(0, 0, None), Figures(0, 0, None))[0] == "step"


# --- real processes ---------------------------------------------------------------------------

SPLIT = [{"pool": "v1", "weight": 95}, {"pool": "v2", "weight": 5}]


def canary_config(
    port: int,
    admin: int,
    v1: Any,
    v2: Any,
    canary: dict[str, Any] | None,
    split: list[dict[str, Any]] = SPLIT,
    **route: Any,
) -> str:
    """Listener web: route `checkout` (every path) splitting v1/v2, with this canary."""
    r: dict[str, Any] = {"name": "checkout", "path_prefix": "/", "split": split, **route}
    if canary is not None:
        r["canary"] = canary
    pools = [pool("v1", [v1.address]), pool("v2", [v2.address])]
    return http_config(port, pools, default_pool="v1", routes=[r], admin=f"127.0.0.1:{admin}")


def route_of(admin: int, name: str = "checkout") -> dict[str, Any]:
    status, body = api(admin, "GET", "/api/status")
    assert status == 200, body
    web = next(li for li in body["listeners"] if li["name"] == "web")
    return dict(next(r for r in web["routes"] if r["name"] == name))


def canary_of(admin: int, name: str = "checkout") -> dict[str, Any]:
    c = route_of(admin, name)["canary"]
    assert c is not None
    return dict(c)


def decisions(c: dict[str, Any]) -> list[str]:
    return [h["decision"] for h in c["history"]]


def backends_of(port: int, n: int, path: str = "/", headers: dict[str, str] | None = None) -> Counter[str]:
    """X-Backend of n requests on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: Counter[str] = Counter()
    try:
        for _ in range(n):
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            r.read()
            seen[r.getheader("x-backend") or f"status {r.status}"] += 1
    finally:
        conn.close()
    return seen


def ctl(admin: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_failing_canary_is_rolled_back_at_its_first_judged_interval_and_gets_nothing_after(hb, fastlb):
    """v2 answers 500 to a third of its requests: the first interval with min_requests of them
    rolls it back (no step before), its weight goes to 0 at once, and it sees no request after;
    the log, the audit trail, the metric and the CanaryRolledBack alert say so."""
    v1, v2 = hb("v1"), hb("v2", fail_every=3)
    port, admin = free_port(), free_port()
    canary = {"pool": "v2", "steps": [20, 50, 100], "interval": "500ms", "min_requests": 10}
    proc = fastlb(canary_config(port, admin, v1, v2, canary | {"max_p99_ratio": 1000}), port)
    assert route_of(admin)["split"] == {"live": {"v1": 80, "v2": 20}, "configured": {"v1": 95, "v2": 5}}
    stream = Stream(port, threads=4, limit_s=40).start()
    try:
        assert wait_until(lambda: canary_of(admin)["state"] == "rolled_back", 20)
        at_rollback = len(v2.received)
        c = canary_of(admin)
        judged = [h for h in c["history"] if h["decision"] not in ("start", "hold")]
        assert judged[0]["decision"] == "rollback", c["history"]
        assert "step" not in decisions(c)
        assert 0.2 < judged[0]["canary"]["error_rate"] < 0.5 and "5xx rate" in judged[0]["reason"]
        assert judged[0]["baseline"]["error_rate"] == 0
        assert (c["weight"], c["step"]) == (0, 0)
        assert route_of(admin)["split"]["live"] == {"v1": 100, "v2": 0}
        # at most the requests in flight at the switch still reach v2; nothing after them
        base = len(v1.received)
        assert wait_until(lambda: len(v1.received) > base + 50, 15)
        settled = len(v2.received)
        assert settled - at_rollback <= 4
        base = len(v1.received)
        assert wait_until(lambda: len(v1.received) > base + 200, 15)
        assert len(v2.received) == settled
        metrics = scrape(admin)
        assert (
            metrics["fastlb_canary_weight", (("listener", "web"), ("pool", "v2"), ("route", "checkout"))] == 0
        )
        assert (
            metrics["fastlb_canary_weight", (("listener", "web"), ("pool", "v1"), ("route", "checkout"))]
            == 100
        )

        def alert() -> dict[str, Any]:
            return next(a for a in api(admin, "GET", "/api/alerts")[1] if a["name"] == "CanaryRolledBack")

        assert wait_until(lambda: alert()["state"] == "firing", 10)
        assert alert()["detail"] == "web/checkout"
        events = api(admin, "GET", "/api/events")[1]["events"]
        rollback = [e for e in events if e["action"] == "canary/rollback"]
        assert rollback and rollback[0]["actor"] == "canary" and rollback[0]["client"] == "-"
        assert rollback[0]["target"] == 'web/checkout {"v1":100,"v2":0}'
    finally:
        stream.stop()
    _, err = proc.stop()
    assert "canary web/checkout: rolled back (v1=100% v2=0%): canary 5xx rate" in err
    assert "alert CanaryRolledBack firing" in err


def test_healthy_canary_walks_every_step_to_promoted(hb, fastlb):
    """Two like backends: every judged interval passes, and the canary is promoted. (The p99
    ratio gets room: with ~20 canary requests an interval, its p99 is about their slowest, and a
    loaded machine's scheduling hiccup is not what this test is about.)"""
    v1, v2 = hb("v1", delay_ms=10), hb("v2", delay_ms=10)
    port, admin = free_port(), free_port()
    canary = {
        "pool": "v2",
        "steps": [10, 50, 100],
        "interval": "400ms",
        "min_requests": 5,
        "max_p99_ratio": 10,
    }
    proc = fastlb(canary_config(port, admin, v1, v2, canary), port)
    stream = Stream(port, threads=4, limit_s=40).start()
    try:
        assert wait_until(lambda: canary_of(admin)["state"] != "running", 20)
        c = canary_of(admin)
        assert c["state"] == "promoted", c["history"]
        moved = [(h["decision"], h["weight"]) for h in c["history"] if h["decision"] != "hold"]
        assert moved == [("start", 10), ("step", 50), ("promote", 100)]
        assert all(h["canary"]["requests"] >= 5 for h in c["history"][1:] if h["decision"] != "hold")
        assert route_of(admin)["split"]["live"] == {"v1": 0, "v2": 100}
    finally:
        outcomes = stream.stop()
    assert all(o.status == 200 for o in outcomes)
    assert backends_of(port, 20) == Counter({"v2": 20})
    _, err = proc.stop()
    assert "canary web/checkout: step 1, v2 at 50% (v1=50% v2=50%): within bounds; canary v2:" in err
    assert "canary web/checkout: promoted (v1=0% v2=100%)" in err


def test_slow_canary_is_rolled_back_by_max_p99_ratio(hb, fastlb):
    """v2 answers in 20 ms, v1 in 10 ms: the canary's p99 is twice the baseline's."""
    v1, v2 = hb("v1", delay_ms=10), hb("v2", delay_ms=20)
    port, admin = free_port(), free_port()
    canary = {
        "pool": "v2",
        "steps": [20, 30, 40, 50, 60, 70, 80, 90, 100],
        "interval": "500ms",
        "min_requests": 10,
        "max_p99_ratio": 1.5,
        "max_error_rate": 1,
    }
    proc = fastlb(canary_config(port, admin, v1, v2, canary), port)
    stream = Stream(port, threads=6, limit_s=40).start()
    try:
        assert wait_until(lambda: canary_of(admin)["state"] != "running", 25)
        c = canary_of(admin)
        assert c["state"] == "rolled_back", c["history"]
        last = c["history"][-1]
        assert last["decision"] == "rollback" and "above max_p99_ratio 1.5" in last["reason"]
        assert last["canary"]["p99_ms"] > 1.5 * last["baseline"]["p99_ms"]
        assert last["canary"]["p99_ms"] >= 20 and last["canary"]["error_rate"] == 0
        assert route_of(admin)["split"]["live"] == {"v1": 100, "v2": 0}
    finally:
        stream.stop()
    proc.stop()


def test_operator_actions_manual_split_and_ctl(hb, fastlb):
    """pause, resume, promote, rollback (and resume after it) with a long interval, so only the
    operator moves the weights; a manual split pauses a running canary; errors name the field."""
    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    fastlb(canary_config(port, admin, v1, v2, {"pool": "v2", "interval": "1h"}), port)
    base = "/api/listeners/web/routes/checkout"
    assert wait_until(lambda: decisions(canary_of(admin)) == ["start"], 5)
    assert route_of(admin)["split"]["live"] == {"v1": 95, "v2": 5}

    status, body = api(admin, "POST", f"{base}/canary/pause")
    assert status == 200 and body["ok"] and body["canary"]["state"] == "paused", body
    status, body = api(admin, "POST", f"{base}/canary/resume")
    assert status == 200 and body["canary"]["state"] == "running"
    status, body = api(admin, "POST", f"{base}/canary/promote")
    assert status == 200 and body["canary"]["state"] == "promoted" and body["canary"]["weight"] == 100
    assert route_of(admin)["split"]["live"] == {"v1": 0, "v2": 100}
    assert backends_of(port, 10) == Counter({"v2": 10})
    assert api(admin, "POST", f"{base}/canary/resume") == (
        409,
        {"error": "canary web/checkout is promoted: there is nothing to resume"},
    )
    status, body = api(admin, "POST", f"{base}/canary/rollback")
    assert status == 200 and body["canary"]["state"] == "rolled_back"
    assert backends_of(port, 10) == Counter({"v1": 10})
    status, body = api(admin, "POST", f"{base}/canary/resume")  # from rolled_back: step 0 again
    assert status == 200 and (body["canary"]["state"], body["canary"]["weight"]) == ("running", 5)
    assert route_of(admin)["split"]["live"] == {"v1": 95, "v2": 5}
    assert decisions(canary_of(admin)) == ["start", "pause", "resume", "promote", "rollback", "resume"]

    # a manual split on a running canary pauses it
    status, body = api(admin, "PUT", f"{base}/split", {"weights": {"v1": 50, "v2": 50}})
    assert status == 200 and body["canary_paused"] is True and "paused" in body["note"], body
    assert canary_of(admin)["state"] == "paused"
    assert canary_of(admin)["history"][-1]["reason"] == "manual split weights through the admin API"
    assert route_of(admin)["split"] == {"live": {"v1": 50, "v2": 50}, "configured": {"v1": 95, "v2": 5}}

    for bad, message in [
        ({"weights": {"v1": "x", "v2": 1}}, "weights.v1: an integer from 0 to 1000"),
        ({"weights": {"v1": 1001, "v2": 1}}, "weights.v1: an integer from 0 to 1000"),
        ({"weights": {"v1": 50}}, "weights: give one for each pool of the split, and only those: v1, v2"),
        ({"weights": {"v1": 0, "v2": 0}}, "weights: at least one pool needs a weight above 0"),
        ({"weights": []}, "weights: an object of pool names to weights"),
        ({"weight": 1}, "weights: required"),
        ({"weights": {"v1": 1, "v2": 1}, "x": 1}, "body: unknown field 'x'"),
    ]:
        status, answer = api(admin, "PUT", f"{base}/split", bad)
        assert status == 400 and answer["error"].startswith(message), (bad, answer)
    assert api(admin, "PUT", f"{base}/split", b"{nope")[0] == 400
    assert api(admin, "PUT", "/api/listeners/web/routes/nope/split", {"weights": {"v1": 1}}) == (
        404,
        {"error": "listener 'web' has no route 'nope'"},
    )
    assert api(admin, "PUT", "/api/listeners/nope/routes/0/split", {"weights": {"v1": 1}})[0] == 404
    assert api(admin, "POST", f"{base}/canary/explode") == (
        400,
        {"error": "action: one of pause, resume, promote, rollback, not 'explode'"},
    )
    assert api(admin, "POST", "/api/listeners/web/routes/nope/canary/pause") == (
        404,
        {"error": "listener 'web' has no route 'nope' with a canary"},
    )

    # fastlb ctl
    out = ctl(admin, "split", "web", "checkout", "v1=1", "v2=3")
    assert out.returncode == 0 and out.stdout.strip() == "web/checkout: split v1=1 v2=3", out.stderr
    assert route_of(admin)["split"]["live"] == {"v1": 1, "v2": 3}
    assert backends_of(port, 8) == Counter({"v1": 2, "v2": 6})
    out = ctl(admin, "canary", "web", "checkout", "resume")
    assert out.returncode == 0 and out.stdout.strip() == "web/checkout: canary running, v2 at 5%", out.stderr
    table = ctl(admin, "status").stdout
    assert "split routes" in table and "v1=95 v2=5" in table and "running v2 5% (step 1/4)" in table
    bad = ctl(admin, "split", "web", "checkout", "v1:50")
    assert bad.returncode == 2 and "'v1:50' is not POOL=WEIGHT" in bad.stderr
    refused = ctl(admin, "split", "web", "checkout", "v1=50")
    assert refused.returncode == 2 and "give one for each pool of the split" in refused.stderr
    assert ctl(admin, "canary", "web", "checkout", "promote").returncode == 0
    assert ctl(admin, "canary", "web", "checkout", "resume").returncode == 2

    events = api(admin, "GET", "/api/events")[1]["events"]
    actions = [(e["action"], e["target"].split(" ")[0], e["status"]) for e in events]
    assert ("canary/pause", "web/checkout", 200) in actions and ("split", "web/checkout", 200) in actions
    assert ("canary/resume", "web/checkout", 409) in actions


def test_live_split_weights_apply_to_the_next_requests_and_follow_reloads(hb, fastlb):
    """A split route without a canary (named by its index): live weights through the API apply
    to the next request; a reload keeps them while the file's split stays, the file wins once
    it changes."""
    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    half = [{"pool": "v1", "weight": 1}, {"pool": "v2", "weight": 1}]

    def config(split: list[dict[str, Any]]) -> str:
        pools = [pool("v1", [v1.address]), pool("v2", [v2.address])]
        routes = [{"path_prefix": "/", "split": split}]
        return http_config(port, pools, default_pool="v1", routes=routes, admin=f"127.0.0.1:{admin}")

    proc = fastlb(config(half), port)
    assert backends_of(port, 10) == Counter({"v1": 5, "v2": 5})
    assert api(admin, "PUT", "/api/listeners/web/routes/0/split", {"weights": {"v1": 0, "v2": 1}})[0] == 200
    assert backends_of(port, 10) == Counter({"v2": 10})
    assert route_of(admin, "0")["split"] == {"live": {"v1": 0, "v2": 1}, "configured": {"v1": 1, "v2": 1}}
    assert route_of(admin, "0")["canary"] is None
    assert api(admin, "POST", "/api/reload")[0] == 200  # the same file: the live weights stay
    assert backends_of(port, 10) == Counter({"v2": 10})
    proc.config_path.write_text(config([{"pool": "v1", "weight": 3}, {"pool": "v2", "weight": 1}]))
    assert api(admin, "POST", "/api/reload")[0] == 200  # a new split: the file wins
    assert route_of(admin, "0")["split"] == {"live": {"v1": 3, "v2": 1}, "configured": {"v1": 3, "v2": 1}}
    assert backends_of(port, 8) == Counter({"v1": 6, "v2": 2})
    metrics = scrape(admin)
    assert metrics["fastlb_canary_weight", (("listener", "web"), ("pool", "v1"), ("route", "0"))] == 75


def test_reload_keeps_an_unchanged_canary_and_restarts_a_changed_one(hb, fastlb):
    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    canary = {"pool": "v2", "interval": "1h"}
    proc = fastlb(canary_config(port, admin, v1, v2, canary), port)
    base = "/api/listeners/web/routes/checkout"
    assert wait_until(lambda: decisions(canary_of(admin)) == ["start"], 5)
    assert api(admin, "POST", f"{base}/canary/promote")[0] == 200
    assert api(admin, "POST", "/api/reload")[0] == 200  # same split, same canary: kept
    c = canary_of(admin)
    assert c["state"] == "promoted" and decisions(c) == ["start", "promote"]
    assert route_of(admin)["split"]["live"] == {"v1": 0, "v2": 100}
    # the canary changed (the split did not): it starts again at step 0
    proc.config_path.write_text(canary_config(port, admin, v1, v2, canary | {"max_error_rate": 0.02}))
    assert api(admin, "POST", "/api/reload")[0] == 200
    assert wait_until(lambda: decisions(canary_of(admin)) == ["start"], 5)
    assert (canary_of(admin)["state"], canary_of(admin)["weight"]) == ("running", 5)
    assert route_of(admin)["split"]["live"] == {"v1": 95, "v2": 5}
    # the split changed: fresh too, from the new split's shares
    split = [{"pool": "v1", "weight": 1}, {"pool": "v2", "weight": 1}]
    assert api(admin, "POST", f"{base}/canary/rollback")[0] == 200
    proc.config_path.write_text(canary_config(port, admin, v1, v2, canary | {"steps": [40, 100]}, split))
    assert api(admin, "POST", "/api/reload")[0] == 200
    assert wait_until(lambda: route_of(admin)["split"]["live"] == {"v1": 60, "v2": 40}, 5)
    assert canary_of(admin)["state"] == "running"
    # no canary any more: the route is no longer driven
    proc.config_path.write_text(canary_config(port, admin, v1, v2, None, split))
    assert api(admin, "POST", "/api/reload")[0] == 200
    assert route_of(admin)["canary"] is None
    assert api(admin, "POST", f"{base}/canary/pause")[0] == 404
    _, err = proc.stop()
    assert "canary web/checkout: no canary in the config any more" in err


def test_split_affinity_places_new_clients_by_the_weights_and_keeps_their_group(hb, fastlb):
    """10k clients without the cookie: 50/50 within 2 points, each given the group cookie; a
    sample of 40 then sends 20 requests each with its cookie and stays in its group."""
    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    split = [{"pool": "v1", "weight": 50}, {"pool": "v2", "weight": 50}]
    affinity = {"cookie": "ab-test", "ttl": "30d"}
    fastlb(canary_config(port, admin, v1, v2, None, split, split_affinity=affinity), port)
    assert route_of(admin)["affinity_cookie"] == "ab-test"

    placed: Counter[str] = Counter()
    cookies: dict[str, str] = {}
    lock = threading.Lock()
    problems: list[str] = []

    def newcomers(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(n):
                conn.request("GET", "/")
                r = conn.getresponse()
                r.read()
                backend = r.getheader("x-backend") or "?"
                cookie = r.getheader("set-cookie") or ""
                with lock:
                    placed[backend] += 1
                    if not cookie.startswith("ab-test=") or "Max-Age=2592000" not in cookie:
                        problems.append(cookie)
                    cookies.setdefault(cookie.split(";")[0], backend)
        finally:
            conn.close()

    threads = [threading.Thread(target=newcomers, args=(2500,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(placed.values()) == 10_000 and not problems[:1]
    assert abs(placed["v1"] - 5000) <= 200, placed
    # one opaque token per group: two cookies, one per pool, neither naming it
    assert sorted(cookies.values()) == ["v1", "v2"]
    assert all("v1" not in c.split("=", 1)[1] and "v2" not in c.split("=", 1)[1] for c in cookies)
    for k in range(40):
        cookie, group = list(cookies.items())[k % 2]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(20):
                conn.request("GET", "/", headers={"Cookie": f"other=1; {cookie}"})
                r = conn.getresponse()
                r.read()
                assert r.getheader("x-backend") == group
                assert r.getheader("set-cookie") is None  # a member is not placed again
        finally:
            conn.close()


def test_split_affinity_and_route_counts_over_http2(hb, fastlb):
    """An h2c client (prior knowledge) is placed in a group and given its cookie like an HTTP/1
    one, keeps it on later streams, and its streams count on the route's pools."""
    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    split = [{"pool": "v1", "weight": 1}, {"pool": "v2", "weight": 1}]
    affinity = {"cookie": "ab-test", "ttl": "1h"}
    fastlb(canary_config(port, admin, v1, v2, None, split, split_affinity=affinity), port)
    with H2Client(port) as c:
        placed = [c.get("/") for _ in range(4)]
        assert sorted(r.header("x-backend") or "" for r in placed) == ["v1", "v1", "v2", "v2"]
        for r in placed:
            cookie = r.header("set-cookie") or ""
            assert cookie.startswith("ab-test=") and cookie.endswith("Max-Age=3600"), cookie
        group, first = placed[0].header("set-cookie").split(";")[0], placed[0].header("x-backend")
        for _ in range(6):
            r = c.get("/", headers=[("cookie", group)])
            assert (r.header("x-backend"), r.header("set-cookie")) == (first, None)
    pools = route_of(admin)["pools"]
    assert sum(pools[p]["requests"] for p in ("v1", "v2")) == 10
    assert pools[first]["requests"] == 8 and pools[first]["responses_5xx"] == 0


def test_status_routes_shape(hb, fastlb):
    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    fastlb(canary_config(port, admin, v1, v2, {"pool": "v2", "interval": "1h"}), port)
    assert wait_until(lambda: decisions(canary_of(admin)) == ["start"], 5)
    backends_of(port, 20)
    r = route_of(admin)
    assert set(r) == {"name", "index", "split", "affinity_cookie", "pools", "canary"}
    assert r["index"] == 0 and r["pools"]["v1"]["requests"] + r["pools"]["v2"]["requests"] == 20
    c = r["canary"]
    assert {k: c[k] for k in ("pool", "state", "step", "weight", "steps", "interval")} == {
        "pool": "v2",
        "state": "running",
        "step": 0,
        "weight": 5,
        "steps": [5, 25, 50, 100],
        "interval": "1h",
    }
    assert json.dumps(c)  # plain JSON all through


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_routes_panel_and_canary_buttons(hb, fastlb):
    """The Routes panel in a real browser: live vs configured weights, the canary's state, and
    its buttons driving the API."""
    assert CHROMIUM, "the dashboard test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    v1, v2 = hb("v1"), hb("v2")
    port, admin = free_port(), free_port()
    fastlb(canary_config(port, admin, v1, v2, {"pool": "v2", "interval": "1h"}), port)
    assert wait_until(lambda: decisions(canary_of(admin)) == ["start"], 5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{admin}/")
            row = page.locator('tr[data-route="web/checkout"]')
            row.wait_for(timeout=10_000)
            assert row.locator("[data-testid=canary-state]").inner_text() == "running"
            assert row.locator("[data-testid=live]").inner_text() == "v1=95 v2=5"
            assert row.locator("[data-testid=configured]").inner_text() == "v1=95 v2=5"
            assert "start at 5%" in page.locator('tr[data-history="web/checkout"]').inner_text()
            row.locator("button[data-action=promote]").click()
            state = "document.querySelector('tr[data-route=\"web/checkout\"] [data-testid=canary-state]')"
            page.wait_for_function(f"() => {state}.textContent === 'promoted'", timeout=10_000)
            assert canary_of(admin)["state"] == "promoted"
            assert row.locator("[data-testid=live]").inner_text() == "v1=0 v2=100"
            row.locator("button[data-action=rollback]").click()
            page.wait_for_function(f"() => {state}.textContent === 'rolled_back'", timeout=10_000)
            assert route_of(admin)["split"]["live"] == {"v1": 100, "v2": 0}
        finally:
            browser.close()
