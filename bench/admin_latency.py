#!/usr/bin/env python3
"""How long the admin API keeps a client waiting while the data plane is under full load.

`Engine.stats()` runs on the control plane's event loop: the alert loop calls it every second,
and so does every `/metrics` scrape and every `/api/status`. Whatever it waits for, `/healthz`,
the health checks and signal handling wait too. This measures that from outside:

- Backends: 6 loopback HTTP/1.1 keep-alive servers (slow_backends.py's, with no service delay)
  in one uvloop process of their own.
- fastlb: a real `fastlb serve` process: an http listener, 2 workers, the admin API on a free
  loopback port, 3 pools of 2 backends with http health checks every 1 s, default alerts (the
  config has no [[alerts]]).
- Load: `wrk -t1 -c64` keep-alive on the listener for the whole measurement (plus warm-up).
- Admin traffic, each request due at a fixed time and its latency counted from that due time,
  whether or not the previous one had finished (no coordinated omission):
  - a Prometheus-like scraper: `GET /metrics` every 100 ms, keep-alive;
  - the dashboard (static/dashboard.html): every 1 s, `/api/status` and `/api/alerts` at once
    (its `setInterval(refresh, 1000)` with `Promise.all`), keep-alive;
  - a liveness probe, in a process of its own: `GET /healthz` every 20 ms, each on a new
    connection with `Connection: close` (as a kubelet or a load balancer's check would).
- A second, shorter phase (`--idle-secs`) makes the same admin traffic with no wrk, as the
  reference.

Reported: p50/p99/p99.9/max per admin endpoint, the share of /healthz over 20 ms (the target
is a /healthz p99 of at most 20 ms under load), wrk's requests/s for context, and the CPU that
other processes on the machine used meanwhile (/proc/stat less this benchmark's own processes):
on a shared machine another job's compile can turn the tail into hundreds of ms, so a run
counts only where that is near 0.
Writes bench/ADMIN_LATENCY.md. Traffic goes to 127.0.0.1 only; everything is bounded by --secs.

With --attribute, fastlb runs under a wrapper that also times Engine.stats(),
ControlPlane.status() and the /metrics render on its event loop (not the plain entry point,
so the headline figures come from runs without it).

usage: python bench/admin_latency.py [--secs 20] [--idle-secs 5] [--conns 64] [--runs 1]
                                     [--attribute] [--out bench/ADMIN_LATENCY.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from slow_backends import free_port, percentile, serve_backends

from harness import HZ, cpu_seconds, process_tree, wait_port, wrk

HERE = Path(__file__).resolve().parent
POOLS = {"web": 2, "api": 2, "static": 2}  # pool name -> backends; wrk's "/" goes to "web"
HEALTHZ_EVERY_S = 0.020
METRICS_EVERY_S = 0.100
DASHBOARD_EVERY_S = 1.0  # static/dashboard.html: REFRESH_MS = 1000
WARMUP_S = 1.5  # wrk runs this long before the admin traffic starts
REQUEST_TIMEOUT_S = 5.0
TARGET_P99_MS = 20.0


# --- admin clients (run in child processes: `admin_latency.py --probe healthz|scrape PORT T0 SECS`) --


class Client:
    """A bare HTTP/1.1 GET client. keep-alive: idle connections are reused (one per request in
    flight); otherwise a new connection per request, with `Connection: close`."""

    def __init__(self, port: int, keepalive: bool) -> None:
        self.port = port
        self.keepalive = keepalive
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> int:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        close = "" if self.keepalive else "Connection: close\r\n"
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:  # aiohttp sends a length for every response fastlb's admin makes
                raise ValueError("no Content-Length")
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if self.keepalive:
            self.idle.append(conn)
        else:
            writer.close()
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def open_loop(port: int, plan: list[tuple[str, float, bool]], t0_wall: float, secs: float) -> dict:
    """Each (path, every, keepalive) of `plan`: a request due every `every` seconds from t0_wall
    for `secs`, each in a task of its own; latency from the due time to the last body byte."""
    t0 = time.perf_counter() + (t0_wall - time.time())
    results: dict[str, dict[str, Any]] = {}

    async def one(client: Client, path: str, due: float) -> None:
        r = results[path]
        r["lag_s"].append(time.perf_counter() - due)  # this client's own delay: its CPU share
        try:
            status = await asyncio.wait_for(client.get(path), REQUEST_TIMEOUT_S)
            if status != 200:
                r["errors"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            r["errors"] += 1  # still counted below: the time until it failed
        r["latency_s"].append(time.perf_counter() - due)

    async def schedule(path: str, every: float, keepalive: bool) -> None:
        results[path] = {"latency_s": [], "lag_s": [], "errors": 0, "every_s": every, "keepalive": keepalive}
        client = Client(port, keepalive)
        tasks = []
        for i in range(int(secs / every)):
            due = t0 + i * every
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, path, due)))
        await asyncio.gather(*tasks)
        client.close()

    await asyncio.gather(*(schedule(*p) for p in plan))
    return results


PROBES = {
    # the liveness probe: a process of its own, so the scraper's parsing never delays it
    "healthz": [("/healthz", HEALTHZ_EVERY_S, False)],
    "scrape": [
        ("/metrics", METRICS_EVERY_S, True),
        ("/api/status", DASHBOARD_EVERY_S, True),
        ("/api/alerts", DASHBOARD_EVERY_S, True),
    ],
}


def probe_main(kind: str, port: int, t0_wall: float, secs: float) -> None:
    import uvloop

    print(json.dumps(uvloop.run(open_loop(port, PROBES[kind], t0_wall, secs))), flush=True)


# What --attribute times inside `fastlb serve`; each is called on the control plane's event loop
# and each includes the one before it.
TIMED = [
    ("fastlb.engine", "Engine", "stats", "Engine.stats()"),
    ("fastlb.control", "ControlPlane", "status", "ControlPlane.status()"),
    ("fastlb.admin", None, "render", "/metrics render"),
]


def attributed_serve(times: str, argv: list[str]) -> None:
    """`fastlb serve` (fastlb.cli.main) with the calls of TIMED timed: one line per call,
    `label<TAB>start<TAB>seconds`, start in time.monotonic() (CLOCK_MONOTONIC, shared by all
    processes on Linux). Written as they happen: `fastlb serve` ends with os._exit."""
    import functools
    import importlib
    import inspect

    out = open(times, "w", buffering=1)  # noqa: SIM115 - open until os._exit
    for module, cls, name, label in TIMED:
        owner = getattr(importlib.import_module(module), cls) if cls else importlib.import_module(module)
        original = getattr(owner, name)

        def note(label: str, start: float) -> None:
            out.write(f"{label}\t{start:.6f}\t{time.monotonic() - start:.6f}\n")

        if inspect.iscoroutinefunction(original):

            async def timed_async(*a: Any, _original: Any = original, _label: str = label, **k: Any) -> Any:
                start = time.monotonic()
                try:
                    return await _original(*a, **k)
                finally:
                    note(_label, start)

            setattr(owner, name, functools.wraps(original)(timed_async))
            continue

        def timed(*a: Any, _original: Any = original, _label: str = label, **k: Any) -> Any:
            start = time.monotonic()
            try:
                return _original(*a, **k)
            finally:
                note(_label, start)

        setattr(owner, name, functools.wraps(original)(timed))
    from fastlb.cli import main

    sys.exit(main(argv))


def backends_main(ports: list[str]) -> None:
    import uvloop

    uvloop.run(serve_backends([f"{p}:0:-1" for p in ports]))


# --- one fastlb, two phases ---------------------------------------------------------------------


def config_text(lb_port: int, admin_port: int, backend_ports: list[int]) -> str:
    lines = [
        "[runtime]",
        "workers = 2",
        "[admin]",
        f'bind = "127.0.0.1:{admin_port}"',
        "[[listeners]]",
        'name = "web"',
        f'bind = "127.0.0.1:{lb_port}"',
        'protocol = "http"',
        'pool = "web"',
        "  [[listeners.routes]]",
        '  path_prefix = "/api/"',
        '  pool = "api"',
        "  [[listeners.routes]]",
        '  path_prefix = "/static/"',
        '  pool = "static"',
    ]
    ports = iter(backend_ports)
    for pool, n in POOLS.items():
        backends = ", ".join(f'{{ address = "127.0.0.1:{next(ports)}" }}' for _ in range(n))
        lines += [
            "[[pools]]",
            f'name = "{pool}"',
            f"backends = [{backends}]",
            'health = { type = "http", path = "/", interval = "1s", timeout = "500ms" }',
            'drain_timeout = "1s"',
        ]
    return "\n".join(lines) + "\n"


def wait_healthy(admin_port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/status", timeout=5) as r:
            status = json.loads(r.read())
        states = [b["state"] for p in status["pools"] for b in p["backends"]]
        if states and all(s == "up" for s in states):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"backends not all up after {timeout:g} s: {states}")
        time.sleep(0.2)


def busy_cpu_seconds() -> float:
    """CPU time all processes spent, from /proc/stat: user, nice and system. Interrupts and
    softirqs (much of loopback TCP) are left out, as processes' own counts leave them out."""
    with open("/proc/stat") as f:
        user, nice, system = (int(x) for x in f.readline().split()[1:4])
    return (user + nice + system) / HZ


def own_cpu_seconds() -> float:
    """CPU time of this process, its live descendants (fastlb, backends) and the children it
    has waited for (wrk, the clients)."""
    t = os.times()
    return cpu_seconds(process_tree(os.getpid())) + t.children_user + t.children_system


def phase(lb_port: int, admin_port: int, secs: float, conns: int) -> dict[str, Any]:
    """Admin traffic for `secs`; under wrk with `conns` connections unless conns is 0. Also
    returns the CPUs that other processes on the machine used meanwhile (`others_cpus`): this
    benchmark only means something on an otherwise quiet machine."""
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    t0 = time.time() + WARMUP_S
    start = time.monotonic() + WARMUP_S
    probes = {
        kind: subprocess.Popen(
            [sys.executable, __file__, "--probe", kind, str(admin_port), repr(t0), str(secs)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for kind in PROBES
    }
    try:
        load = None
        if conns:
            # One wrk thread on all CPUs: harness.wrk starts one thread per comma-separated CPU,
            # so a range is one thread, and pins nothing.
            cpus = sorted(os.sched_getaffinity(0))
            load = wrk(lb_port, conns, math.ceil(WARMUP_S + secs + 1), cpu=f"{cpus[0]}-{cpus[-1]}")
        results: dict[str, Any] = {"wrk": load, "window": (start, start + secs)}
        for kind, proc in probes.items():
            out, _ = proc.communicate(timeout=WARMUP_S + secs + REQUEST_TIMEOUT_S + 30)
            if proc.returncode:
                raise RuntimeError(f"probe {kind} failed ({proc.returncode})")
            results.update(json.loads(out))
        others = (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)
        results["others_cpus"] = max(0.0, others) / (time.monotonic() - wall0)
        return results
    finally:
        for proc in probes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def hog(n: int, secs: float) -> list[subprocess.Popen[bytes]]:
    """`n` processes that spin for `secs` (bounded): a noisy neighbour taking CPU from fastlb's
    workers and event loop, the condition under which a loop that waits for the workers stalls."""
    spin = f"import time\nend = time.monotonic() + {secs}\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    secs, idle_secs, conns, attribute = args.secs, args.idle_secs, args.conns, args.attribute
    ok = False  # on failure the config and fastlb's log stay in `tmp`
    lb_port, admin_port = free_port(), free_port()
    backend_ports = [free_port() for _ in range(sum(POOLS.values()))]
    backends = subprocess.Popen(
        [sys.executable, __file__, "--serve", *map(str, backend_ports)], stdout=subprocess.PIPE, text=True
    )
    tmp = Path(tempfile.mkdtemp(prefix="admin_latency."))
    (tmp / "fastlb.toml").write_text(config_text(lb_port, admin_port, backend_ports))
    python = str(args.python)
    fastlb = Path(python).with_name("fastlb")
    cmd = [str(fastlb)] if fastlb.exists() else [python, "-m", "fastlb"]
    times = tmp / "timed.tsv"
    if attribute:
        cmd = [python, __file__, "--attributed-serve", str(times)]
    with open(tmp / "fastlb.log", "w") as log:
        lb = subprocess.Popen([*cmd, "serve", "-c", str(tmp / "fastlb.toml")], stderr=log)
    try:
        assert backends.stdout is not None and backends.stdout.readline().strip() == "ready"
        wait_port(lb_port, 20)
        wait_port(admin_port, 20)
        wait_healthy(admin_port)
        print(f"under load: wrk -c{conns} and admin traffic, {secs:g} s ...", file=sys.stderr, flush=True)
        hogs = hog(args.hog, secs + 1)
        try:
            loaded = phase(lb_port, admin_port, secs, conns)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        idle = None
        if idle_secs > 0:
            print(f"idle: admin traffic only, {idle_secs:g} s ...", file=sys.stderr, flush=True)
            idle = phase(lb_port, admin_port, idle_secs, 0)
        if lb.poll() is not None:
            raise RuntimeError(f"fastlb exited ({lb.returncode}); see {tmp / 'fastlb.log'}")
        timed = [line.split("\t") for line in times.read_text().splitlines()] if attribute else None
        ok = True
        return {"loaded": loaded, "idle": idle, "timed": timed}
    finally:
        lb.send_signal(signal.SIGTERM)
        try:
            lb.wait(30)
        except subprocess.TimeoutExpired:
            lb.kill()
            lb.wait()
        backends.kill()
        backends.wait()
        if ok:
            shutil.rmtree(tmp)
        else:
            print(f"fastlb's config and log: {tmp}", file=sys.stderr)


# --- report -------------------------------------------------------------------------------------


def summary(r: dict[str, Any]) -> dict[str, float]:
    lat = sorted(r["latency_s"])
    ms = {q: percentile(lat, p) * 1e3 for q, p in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))}
    return {
        **ms,
        "max": max(lat, default=float("nan")) * 1e3,
        "n": len(lat),
        "errors": r["errors"],
        "over_target": sum(x * 1e3 > TARGET_P99_MS for x in lat) / max(1, len(lat)),
        "lag_p99": percentile(sorted(r["lag_s"]), 0.99) * 1e3,
    }


def rows(results: dict[str, Any], label: str) -> list[str]:
    out = []
    for path, every, keepalive in PROBES["healthz"] + PROBES["scrape"]:
        s = summary(results[path])
        how = f"every {every * 1e3:g} ms, {'keep-alive' if keepalive else 'new connection'}"
        out.append(
            f"| {label} | `{path}` ({how}) | {s['p50']:.1f} | {s['p99']:.1f} | {s['p999']:.1f} |"
            f" {s['max']:.1f} | {s['over_target'] * 100:.1f}% | {s['lag_p99']:.1f} | {s['n']} |"
            f" {s['errors']} |"
        )
    return out


def timed_rows(timed: list[list[str]], window: tuple[float, float], label: str) -> list[str]:
    """--attribute: the calls of TIMED that started within the phase's window."""
    out = []
    for *_, name in TIMED:
        ms = sorted(
            float(secs) * 1e3
            for what, start, secs in timed
            if what == name and window[0] <= float(start) < window[1]
        )
        share = sum(ms) / 1e3 / (window[1] - window[0])
        out.append(
            f"| {label} | `{name}` | {len(ms)} | {percentile(ms, 0.5):.2f} | {percentile(ms, 0.99):.2f} |"
            f" {max(ms, default=float('nan')):.2f} | {sum(ms):.0f} | {share * 100:.1f}% |"
        )
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    command = "python bench/admin_latency.py " + shlex.join(sys.argv[1:])
    many = len(runs) > 1
    table = [
        "| phase | request | p50 ms | p99 ms | p99.9 ms | max ms | over 20 ms | client lag p99 ms"
        " | requests | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    timed = [
        "| phase | call | calls | p50 ms | p99 ms | max ms | total ms | share of the phase |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    loads, verdicts = [], []
    for n, res in enumerate(runs, 1):
        loaded, idle = res["loaded"], res["idle"]
        tag = f"run {n}, " if many else ""
        table += rows(loaded, f"{tag}wrk -c{args.conns}")
        table += rows(idle, f"{tag}idle") if idle else []
        if res["timed"] is not None:
            timed += timed_rows(res["timed"], loaded["window"], f"{tag}wrk -c{args.conns}")
            timed += timed_rows(res["timed"], idle["window"], f"{tag}idle") if idle else []
        w, health = loaded["wrk"], summary(loaded["/healthz"])
        loads.append(
            f"\n  - {tag}{w['rps']} req/s ({w['non2xx']} non-2xx; p50 {w['p50_ms']} ms,"
            f" p99 {w['p99_ms']} ms); other processes on the machine meanwhile:"
            f" {loaded['others_cpus']:.2f} CPUs"
            + (f" (idle phase: {idle['others_cpus']:.2f})" if idle else "")
        )
        verdicts.append(
            f"{tag}{'met' if health['p99'] <= TARGET_P99_MS else 'NOT met'} (p99 {health['p99']:.1f} ms,"
            f" max {health['max']:.1f} ms)"
        )
    attribution = ""
    if runs[0]["timed"] is not None:
        attribution = f"""
Inside fastlb (`--attribute`: `fastlb serve` run through `admin_latency.py --attributed-serve`,
which times these calls on the control plane's event loop; each includes the one above it):

{chr(10).join(timed)}
"""
    hogs = f" and {args.hog} CPU hogs" if args.hog else ""
    return f"""# Admin API latency under data-plane load

`{command.strip()}` on {platform.node()}, {time.strftime("%Y-%m-%d %H:%M")}:
{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu_model()}, Linux {platform.release()}.

- fastlb: `fastlb serve`, http listener, 2 workers, 3 pools of 2 loopback backends (one uvloop
  process, slow_backends.py's server with no delay), http health checks every 1 s, default
  alerts{"; a fresh fastlb and backends per run" if many else ""}.
- Load: `wrk -t1 -c{args.conns}` keep-alive on the listener, through fastlb:{"".join(loads)}
- Admin traffic for {args.secs:g} s: `/metrics` 10/s; the dashboard's `/api/status` +
  `/api/alerts` 1/s; `/healthz` every 20 ms on a new connection each, from its own process.
  Latency from each request's due time (open loop). "client lag": how late the client itself
  got to a request (its own CPU share), included in the latency. Nothing is pinned: wrk, the
  backends, fastlb and the two clients share the machine's CPUs; a run where other processes
  took CPU says little about fastlb. Over at most 1000
  requests p99.9 is the largest one; over at most 100, p99 is.

{chr(10).join(table)}

**Target: `/healthz` p99 <= {TARGET_P99_MS:g} ms under load:** {"; ".join(verdicts)}.
Runs on this machine move by several ms; compare runs of one invocation (`--runs`).
{attribution}
Why: `/healthz` is answered on the control plane's event loop, so it waits for whatever else
holds that loop. `Engine.stats()` waits until every worker has answered its snapshot request (at
most `SNAPSHOT_WAIT`, 250 ms, native/src/engine.rs); builds before the one-owner change called it
on the loop (alerts 1/s, each `/metrics` scrape, each `/api/status`), later ones in a thread,
one snapshot shared by concurrent callers. Also on the loop: the rest of the `/metrics` render,
and a free CPU, shared with the workers, wrk, the backends{hogs}.
`--attribute` shows how much of it is `Engine.stats()`. Measured build: `{args.python}`.
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=float, default=20.0, help="seconds of admin traffic under load")
    ap.add_argument("--idle-secs", type=float, default=5.0, help="the same with no load (0: skip)")
    ap.add_argument("--conns", type=int, default=64, help="wrk's keep-alive connections")
    ap.add_argument("--runs", type=int, default=1, help="runs, each with a fresh fastlb (1 to 5)")
    ap.add_argument("--out", type=Path, default=HERE / "ADMIN_LATENCY.md")
    ap.add_argument(
        "--python",
        type=Path,
        default=Path(sys.executable),
        help="the interpreter whose fastlb is measured (another build's venv: an A/B)",
    )
    ap.add_argument(
        "--hog", type=int, default=0, help="CPU-spinning processes during the loaded phase (0 to 8)"
    )
    ap.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument(
        "--attribute",
        action="store_true",
        help="also time Engine.stats(), ControlPlane.status() and the /metrics render inside fastlb",
    )
    ap.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--attributed-serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attributed_serve:
        attributed_serve(args.attributed_serve[0], args.attributed_serve[1:])
        return
    if args.serve:
        backends_main(args.serve)
        return
    if args.probe:
        kind, port, t0, secs = args.probe
        probe_main(kind, int(port), float(t0), float(secs))
        return
    if not (0 < args.secs <= 600 and args.idle_secs <= 600 and 0 < args.conns <= 1024 and 0 < args.runs <= 5):
        ap.error("--secs and --idle-secs: at most 600; --conns: 1 to 1024; --runs: 1 to 5")
    if not 0 <= args.hog <= 8:
        ap.error("--hog: 0 to 8")
    runs = []
    for n in range(args.runs):
        print(f"run {n + 1}/{args.runs}", file=sys.stderr, flush=True)
        runs.append(run(args))
    text = report(args, runs)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
