#!/usr/bin/env python3
"""fastlb, nginx stream and dnsdist balancing UDP DNS on this machine, measured the same way.

Backend: bench/dns_responder.c, compiled with gcc into a temporary folder at run time (removed at
the end): a single-threaded C responder that answers every query with the question echoed and
one fixed A record, batched with recvmmsg/sendmmsg, pinned to --client-cpus. It costs ~3.5-4 us
of CPU per query here, Knot 3.2 ~5.6-6.4 us (and knotd binds one of its UDP workers to CPU 0 by
itself, out of taskset's reach, so it would compete with the proxy). Every target forwards to it:
- direct: dnsperf straight to the backend, the reference (what CPU 1 alone can do; the target's
  CPU is the backend's);
- nginx: stream, `listen ... udp reuseport`, `proxy_responses 1`, `proxy_timeout 2s`, one
  worker_process with worker_cpu_affinity on --proxy-cpus;
- dnsdist: one backend (health-checked once a second, the responder answers that too), no
  packet cache (none is configured), console and carbon not configured, security polling off,
  setMaxUDPOutstanding(65535), its UDP timeout left at the default 2 s;
  `--dnsdist-vector N` adds dnsdist-mmsg, the same with setUDPMultipleMessagesVectorSize(N);
- fastlb: `protocol = "udp"`, `udp = { responses = 1 }`, `timeouts.session_idle = "2s"`, one
  worker, cpu_affinity on --proxy-cpus. Run as --fastlb (default: the `fastlb` next to this
  Python); skipped, with the reason in the JSON, when `fastlb check` rejects the config (a build
  without UDP listeners).
Each target runs under `taskset -c --proxy-cpus`; dnsperf and the backend share --client-cpus.
All targets run from the start and each step is taken for every target in turn.

Steps, each one dnsperf run (-c --clients sockets, -t 1 s timeout, a query file of --names
names that the backend answers, `-b 2048` KiB socket buffers so dnsperf is not the one dropping):
- fixed: `-Q --rate` for --secs seconds, -q 2000 outstanding so that the load stays open-loop
  (a target that falls behind loses queries rather than slowing dnsperf down);
- unthrottled: no -Q, -q --outstanding queries in flight (closed loop) for --secs seconds;
- clean: the highest -Q with loss < 0.1% and at least 98% of the asked rate answered, by
  bisection in --search-steps runs of --search-secs seconds between the fixed rate (if that
  was clean) and 1.25 x the unthrottled rate (tested first; if it is clean, it is reported with
  `at_least`).
Per step: queries sent, completed and lost (dnsperf's counts: lost = no answer within -t),
loss_pct = lost / sent, the answered rate, the target's CPU (utime + stime of all its processes
and threads, /proc/PID/stat, before and after) per completed query, `target_busy` (its CPU / wall
time: near 1.0 means the target's core is full) and `cpu1_busy` (dnsperf's and the backend's CPU
/ wall time: near 1.0 means the load generator's core, not the target, bounds the rate), and
the queries the backend answered meanwhile (from the responder's own counter) against those
dnsperf saw answered: every answer went through the backend, nothing was cached.

Figures, fastlb's ratio to each anchor within this run, with the issue's goals: CPU per query
<= 0.7 x nginx and <= 1.0 x dnsdist (fixed rate and unthrottled), loss < 0.1% at the fixed rate,
highest clean rate >= 1.5 x nginx's. Progress and tables go to stderr; one JSON object to stdout.

usage: python bench/udp_compare.py [--only direct,nginx,dnsdist,fastlb] [--rate 10000] [--secs 8]
       [--outstanding 200] [--clients 20] [--search-steps 5] [--search-secs 4]
       [--proxy-cpus 0] [--client-cpus 1] [--fastlb PATH] [--dnsdist-vector N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import harness
from harness import busy, busy_builds, cpu_seconds, cpu_times, cpus, process_tree, stop_all, wait_quiet

HERE = Path(__file__).resolve().parent
BACKEND = 19131
PORTS = {"direct": BACKEND, "nginx": 18370, "dnsdist": 18371, "dnsdist-mmsg": 18372, "fastlb": 18390}
FASTLB_ADMIN = 18399
ANCHORS = ("nginx", "dnsdist")
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
LOSS_OK_PCT = 0.1  # "clean": loss under this, and at least ANSWERED_OK of the asked rate answered
ANSWERED_OK = 0.98
SESSION_IDLE_S = 2  # nginx proxy_timeout, fastlb session_idle; dnsdist's UDP timeout is 2 s
# The goals: (figure, anchor, bound, "le" fastlb <= bound x anchor | "ge" fastlb >= ...)
GOALS = [
    ("fixed_cpu_us", "nginx", 0.7, "le"),
    ("fixed_cpu_us", "dnsdist", 1.0, "le"),
    ("unthrottled_cpu_us", "nginx", 0.7, "le"),
    ("unthrottled_cpu_us", "dnsdist", 1.0, "le"),
    ("clean_qps", "nginx", 1.5, "ge"),
]


def build_responder(d: Path) -> Path:
    exe = d / "dns_responder"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "dns_responder.c")], check=True)
    return exe


def query_file(d: Path, names: int) -> Path:
    path = d / "queries.txt"
    path.write_text("".join(f"host{i}.bench.example. A\n" for i in range(names)))
    return path


def nginx_conf(d: Path, proxy_cpus: str) -> Path:
    """worker_cpu_affinity takes a bit mask per worker: the first of --proxy-cpus."""
    mask = format(1 << int(re.split(r"[,-]", proxy_cpus)[0]), "b")
    conf = d / "nginx.conf"
    conf.write_text(
        f"load_module {STREAM_MODULE}; worker_processes 1; worker_cpu_affinity {mask};"
        f" worker_rlimit_nofile 200000; pid {d}/nginx.pid; error_log {d}/nginx.err;"
        " events { worker_connections 65536; }"
        f" stream {{ upstream dns {{ server 127.0.0.1:{BACKEND}; }}"
        f" server {{ listen 127.0.0.1:{PORTS['nginx']} udp reuseport; proxy_pass dns;"
        f" proxy_responses 1; proxy_timeout {SESSION_IDLE_S}s; }} }}"
    )
    return conf


def dnsdist_conf(d: Path, name: str, vector: int | None) -> Path:
    conf = d / f"{name}.conf"
    vec = f"setUDPMultipleMessagesVectorSize({vector})\n" if vector else ""
    conf.write_text(
        f"""setSecurityPollSuffix("")
setMaxUDPOutstanding(65535)
{vec}setLocal("127.0.0.1:{PORTS[name]}", {{reusePort=true}})
newServer({{address="127.0.0.1:{BACKEND}", name="backend", checkInterval=1}})
"""
    )
    return conf


def fastlb_conf(d: Path, proxy_cpus: str) -> Path:
    cpus = ", ".join(proxy_cpus.split(","))
    conf = d / "fastlb.toml"
    conf.write_text(
        f"""[runtime]
workers = 1
cpu_affinity = [{cpus}]

[admin]
bind = "127.0.0.1:{FASTLB_ADMIN}"

[[listeners]]
name = "dns"
bind = "127.0.0.1:{PORTS["fastlb"]}"
protocol = "udp"
pool = "dns"
timeouts = {{ session_idle = "{SESSION_IDLE_S}s" }}
udp = {{ responses = 1 }}

[[pools]]
name = "dns"
backends = [{{ address = "127.0.0.1:{BACKEND}" }}]
health = {{ type = "none" }}
"""
    )
    return conf


class Responder(harness.Responder):
    """The backend process, and its own count of the queries it answered (SIGUSR1)."""

    def __init__(self, exe: Path, d: Path, cpus: str) -> None:
        super().__init__(exe, d, cpus, BACKEND)
        time.sleep(0.2)
        if self.proc.poll() is not None:
            sys.exit(f"dns_responder did not start: {self.log_path.read_text()}")

    def answered(self) -> int:
        return self.report(r"answered (\d+)")[0]


def udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (/proc/net/snmp: RcvbufErrors, SndbufErrors, ...) and the drops
    of the sockets bound to each local port now open (/proc/net/udp), as "port:N"."""
    out: dict[str, int] = {}
    lines = [x.split() for x in Path("/proc/net/snmp").read_text().splitlines() if x.startswith("Udp:")]
    out |= {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        port = f"port:{int(f[1].split(':')[1], 16)}"
        out[port] = out.get(port, 0) + int(f[-1])
    return out


def drops(before: dict[str, int], after: dict[str, int], target_port: int) -> dict[str, int]:
    """Datagrams the kernel dropped meanwhile: all of them (RcvbufErrors, SndbufErrors), and those
    at the target's listening socket and at the backend's."""
    return {
        "rcvbuf_errors": after["RcvbufErrors"] - before["RcvbufErrors"],
        "sndbuf_errors": after["SndbufErrors"] - before["SndbufErrors"],
        "at_target_listener": after.get(f"port:{target_port}", 0) - before.get(f"port:{target_port}", 0),
        "at_backend": after.get(f"port:{BACKEND}", 0) - before.get(f"port:{BACKEND}", 0),
    }


def ask(port: int, timeout: float = 1.0) -> bool:
    """One query through `port`: answered with our A record?"""
    q = bytes.fromhex("abcd01000001000000000000") + b"\x05probe\x05bench\x07example\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q, ("127.0.0.1", port))
            r = s.recv(4096)
        except OSError:
            return False
    return r[:2] == q[:2] and r.endswith(b"\x00\x04\x7f\x00\x00\x01")


def wait_answering(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ask(port, 0.3):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers DNS on udp port {port}")


def dnsperf(port: int, args: argparse.Namespace, qfile: Path, secs: int, rate: int | None) -> dict[str, Any]:
    """One dnsperf run pinned to --client-cpus; its counts, and its own CPU time."""
    cmd = [
        *("taskset", "-c", args.client_cpus, "dnsperf", "-s", "127.0.0.1", "-p", str(port)),
        *("-d", str(qfile), "-l", str(secs), "-c", str(args.clients), "-t", "1", "-b", "2048"),
    ]
    cmd += ["-Q", str(rate), "-q", "2000"] if rate else ["-q", str(args.outstanding)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = done.stdout
    if done.returncode != 0 or "Queries sent" not in text:
        raise RuntimeError(f"dnsperf failed: {text[-2000:]} {done.stderr[-2000:]}")

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        assert m, (pattern, text)
        return float(m.group(1))

    codes = dict(re.findall(r"(\w+) (\d+) \([\d.]+%\)", text.split("Response codes:", 1)[1].split("\n")[0]))
    return {
        "sent": int(num(r"Queries sent:\s+(\d+)")),
        "completed": int(num(r"Queries completed:\s+(\d+)")),
        "lost": int(num(r"Queries lost:\s+(\d+)")),
        "run_s": num(r"Run time \(s\):\s+([\d.]+)"),
        "dnsperf_qps": round(num(r"Queries per second:\s+([\d.]+)")),
        "latency_avg_ms": round(num(r"Average Latency \(s\):\s+([\d.]+)") * 1000, 3),
        "rcodes": {k: int(v) for k, v in codes.items()},
        "dnsperf_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def measure(
    name: str,
    pids: list[int],
    backend: Responder,
    args: argparse.Namespace,
    qfile: Path,
    secs: int,
    rate: int | None,
) -> dict[str, Any]:
    """One dnsperf run against a target, with the target's and CPU 1's CPU time meanwhile."""
    bpids = [backend.proc.pid]
    a0 = backend.answered()
    k0, m0 = udp_counters(), cpu_times()
    c0, b0, t0 = cpu_seconds(pids), cpu_seconds(bpids), time.monotonic()
    r = dnsperf(PORTS[name], args, qfile, secs, rate)
    c1, b1, wall = cpu_seconds(pids), cpu_seconds(bpids), time.monotonic() - t0
    m1 = cpu_times()
    r["proxy_cpus_busy_all"] = busy(m0, m1, cpus(args.proxy_cpus))
    r["client_cpus_busy_all"] = busy(m0, m1, cpus(args.client_cpus))
    r["kernel_drops"] = drops(k0, udp_counters(), PORTS[name])
    r["backend_answered"] = backend.answered() - a0
    # Every answer dnsperf got must have come from the backend (plus dnsdist's health checks):
    # a target that answered more than the backend did would be caching or inventing answers.
    r["all_answers_from_backend"] = r["backend_answered"] >= r["completed"]
    r["asked_qps"] = rate
    r["answered_qps"] = round(r["completed"] / r["run_s"])
    r["loss_pct"] = round(100 * r["lost"] / max(r["sent"], 1), 4)
    r["target_cpu_s"] = round(c1 - c0, 2)
    r["cpu_us"] = round((c1 - c0) / max(r["completed"], 1) * 1e6, 2)
    r["backend_cpu_us"] = round((b1 - b0) / max(r["completed"], 1) * 1e6, 2)
    r["target_busy"] = round((c1 - c0) / wall, 2)
    r["cpu1_busy"] = round((r["dnsperf_cpu_s"] + b1 - b0) / wall, 2)
    # What else ran on the CPUs meanwhile (other work on the machine; ~0 on a quiet one). For
    # `direct` the target is the backend, on the client CPUs, and nothing of ours is on the
    # proxy's.
    ours = 0.0 if name == "direct" else r["target_busy"]
    r["others_on_proxy_cpus"] = round(max(0.0, r["proxy_cpus_busy_all"] - ours), 2)
    r["others_on_client_cpus"] = round(max(0.0, r["client_cpus_busy_all"] - r["cpu1_busy"]), 2)
    r["dnsperf_cpu_s"] = round(r["dnsperf_cpu_s"], 2)
    r["clean"] = r["loss_pct"] < LOSS_OK_PCT and (not rate or r["answered_qps"] >= ANSWERED_OK * rate)
    return r


def step(
    name: str,
    pids: list[int],
    backend: Responder,
    args: argparse.Namespace,
    qfile: Path,
    secs: int,
    rate: int | None,
) -> dict[str, Any]:
    """measure(), taken again (up to --retries times, after waiting for quiet) while other work
    on the machine took more than 10% of a CPU meanwhile; the last attempt counts."""
    for attempt in range(args.retries + 1):
        waited = wait_quiet(cpus(args.proxy_cpus) + cpus(args.client_cpus), args.quiet_wait)
        r = measure(name, pids, backend, args, qfile, secs, rate)
        r["attempt"], r["waited_for_quiet_s"] = attempt + 1, waited
        r["disturbed"] = max(r["others_on_proxy_cpus"], r["others_on_client_cpus"]) > 0.1
        if not r["disturbed"]:
            break
        settle(r)
    return r


def settle(r: dict[str, Any]) -> None:
    """After a run with losses, the targets' sessions for the lost queries time out first."""
    if r["lost"]:
        time.sleep(SESSION_IDLE_S + 0.5)


def search(
    name: str,
    pids: list[int],
    backend: Responder,
    args: argparse.Namespace,
    qfile: Path,
    fixed: dict[str, Any],
    unthrottled: dict[str, Any],
) -> dict[str, Any]:
    """The highest clean -Q, by bisection between the fixed rate (when clean) and 1.25 x the
    unthrottled rate (tested first)."""
    lo = args.rate if fixed["clean"] else 0
    hi = round(max(unthrottled["answered_qps"] * 1.25, lo * 1.25) / 250) * 250
    tried = []
    r = step(name, pids, backend, args, qfile, args.search_secs, hi)
    tried.append(brief(r))
    settle(r)
    if r["clean"]:
        return {"clean_qps": hi, "at_least": True, "tried": tried}
    for _ in range(args.search_steps - 1):
        mid = round((lo + hi) / 2 / 250) * 250
        if mid <= lo or mid >= hi:
            break
        r = step(name, pids, backend, args, qfile, args.search_secs, mid)
        tried.append(brief(r))
        settle(r)
        lo, hi = (mid, hi) if r["clean"] else (lo, mid)
    return {"clean_qps": lo, "at_least": False, "tried": tried}


def brief(r: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "others_on_proxy_cpus",
        "others_on_client_cpus",
        "attempt",
        "disturbed",
        "asked_qps",
        "answered_qps",
        "loss_pct",
        "cpu_us",
        "target_busy",
        "cpu1_busy",
        "kernel_drops",
        "clean",
    )
    return {k: r[k] for k in keep if k in r}


def fastlb_udp_stats() -> Any:
    """fastlb's own udp counters per listener, from /api/status (read outside the CPU windows)."""
    try:
        url = f"http://127.0.0.1:{FASTLB_ADMIN}/api/status"
        status = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except (OSError, ValueError) as e:
        return {"error": str(e)}
    return {x.get("name"): x.get("udp") for x in status.get("listeners", [])}


def summary(targets: dict[str, dict[str, Any]], rate: int) -> dict[str, Any]:
    """Per figure: each target's value; fastlb's ratio to each anchor; the goals."""
    values: dict[str, dict[str, Any]] = {
        f"fixed_cpu_us (at {rate} q/s)": {},
        "fixed_loss_pct": {},
        "unthrottled_cpu_us": {},
        "unthrottled_qps": {},
        "clean_qps": {},
    }
    keys = list(values)
    for name, t in targets.items():
        if "fixed" not in t:
            continue
        values[keys[0]][name] = t["fixed"]["cpu_us"]
        values[keys[1]][name] = t["fixed"]["loss_pct"]
        values[keys[2]][name] = t["unthrottled"]["cpu_us"]
        values[keys[3]][name] = t["unthrottled"]["answered_qps"]
        values[keys[4]][name] = t["search"]["clean_qps"]
    out: dict[str, Any] = {"values": values, "ratios": {}, "goals": []}
    for key, vals in values.items():
        if "fastlb" in vals:
            out["ratios"][key] = {
                f"fastlb/{a}": round(vals["fastlb"] / vals[a], 3) for a in ANCHORS if vals.get(a)
            }
    for fig, anchor, bound, how in GOALS:
        key = next(k for k in keys if k.startswith(fig))
        vals = values[key]
        goal: dict[str, Any] = {
            "figure": key,
            "goal": f"fastlb {'<=' if how == 'le' else '>='} {bound} x {anchor}",
        }
        if "fastlb" in vals and vals.get(anchor):
            r = round(vals["fastlb"] / vals[anchor], 3)
            goal |= {"ratio": r, "met": r <= bound if how == "le" else r >= bound}
        out["goals"].append(goal)
    loss = values["fixed_loss_pct"].get("fastlb")
    out["goals"].append(
        {
            "figure": "fixed_loss_pct",
            "goal": f"fastlb < {LOSS_OK_PCT}% at {rate} q/s",
            **({"ratio": loss, "met": loss < LOSS_OK_PCT} if loss is not None else {}),
        }
    )
    return out


def table(results: dict[str, Any]) -> str:
    """One row per target, then fastlb's ratios and goals (when fastlb ran)."""
    rate = results["settings"]["rate"]
    lines = [
        f"| target | fixed {rate} q/s: answered q/s | loss % | CPU µs/query | unthrottled: q/s | CPU µs/query"
        " | target busy | CPU 1 busy | highest clean q/s | backend µs/query |",
        "| --- |" + " --- |" * 9,
    ]
    for name, t in results["targets"].items():
        if "fixed" not in t:
            lines.append(f"| {name} | skipped: {t.get('skipped', '?')} |" + " |" * 8)
            continue
        f, u, s = t["fixed"], t["unthrottled"], t["search"]
        clean = f"{'>= ' if s['at_least'] else ''}{s['clean_qps']}"
        if any(x.get("disturbed") for x in s["tried"]):
            clean += " *"
        fm, um = (" *" if x.get("disturbed") else "" for x in (f, u))
        lines.append(
            f"| {name} | {f['answered_qps']}{fm} | {f['loss_pct']}{fm} | {f['cpu_us']}{fm} |"
            f" {u['answered_qps']}{um} | {u['cpu_us']}{um} | {u['target_busy']} | {u['cpu1_busy']} |"
            f" {clean} | {u['backend_cpu_us']} |"
        )
    if any(x.get("disturbed") for t in results["targets"].values() for x in steps_of(t)):
        lines += ["", "\\* other work on the machine took over 10% of a CPU during that step, after retries."]
    goals = results["figures"]["goals"]
    if any("ratio" in g for g in goals):
        lines += [
            "",
            "| figure | goal | fastlb's ratio (loss: its value) | met |",
            "| --- | --- | --- | --- |",
        ]
        for g in goals:
            met = "-" if "met" not in g else "met" if g["met"] else "missed"
            lines.append(f"| {g['figure']} | {g['goal']} | {g.get('ratio', '-')} | {met} |")
    anchors_only = {
        k: v for k, v in results["figures"]["values"].items() if v.get("nginx") and v.get("dnsdist")
    }
    if anchors_only:
        lines += ["", "| figure | nginx / dnsdist |", "| --- | --- |"]
        lines += [f"| {k} | {round(v['nginx'] / v['dnsdist'], 3)} |" for k, v in anchors_only.items()]
    return "\n".join(lines)


def steps_of(t: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in (t.get("fixed"), t.get("unthrottled")) if x] + t.get("search", {}).get("tried", [])


def versions(fastlb: str | None) -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except OSError as e:
            return str(e)
        return ((r.stdout + r.stderr).strip().splitlines() or [""])[0]

    out = {
        "nginx": first(["nginx", "-v"]),
        "dnsdist": first(["dnsdist", "--version"]),
        "dnsperf": first(["sh", "-c", "dnsperf -h 2>&1 | grep -i '^version'"]),
        "kernel": os.uname().release,
    }
    if fastlb:
        out["fastlb"] = first([fastlb, "--version"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated: direct,nginx,dnsdist,fastlb")
    ap.add_argument("--rate", type=int, default=10000, help="the fixed rate, queries per second")
    ap.add_argument("--secs", type=int, default=8, help="the fixed-rate and unthrottled runs")
    ap.add_argument("--outstanding", type=int, default=200, help="dnsperf -q when unthrottled")
    ap.add_argument("--clients", type=int, default=20, help="dnsperf -c: sockets (flows)")
    ap.add_argument("--names", type=int, default=1000, help="distinct names in the query file")
    ap.add_argument("--search-steps", type=int, default=5)
    ap.add_argument("--search-secs", type=int, default=4)
    ap.add_argument("--proxy-cpus", default="0")
    ap.add_argument("--client-cpus", default="1", help="dnsperf and the backend")
    ap.add_argument("--fastlb", default=str(Path(sys.executable).parent / "fastlb"))
    ap.add_argument("--dnsdist-vector", type=int, default=0, help="also dnsdist-mmsg with this vector size")
    ap.add_argument("--allow-builds", action="store_true", help="run even while a compiler runs")
    ap.add_argument("--quiet-wait", type=float, default=20, help="most seconds to wait for idle CPUs")
    ap.add_argument("--retries", type=int, default=2, help="retakes of a step disturbed by other work")
    args = ap.parse_args()
    names = ["direct", "nginx", "dnsdist", *(["dnsdist-mmsg"] if args.dnsdist_vector else []), "fastlb"]
    only = [n for n in names if not args.only or n in args.only.split(",")]
    missing = [t for t in ("gcc", "taskset", "dnsperf", "nginx", "dnsdist") if not shutil.which(t)]
    if missing:
        sys.exit(
            f"missing: {' '.join(missing)}; apt-get install -y dnsperf dnsdist nginx libnginx-mod-stream gcc"
        )
    if (builds := busy_builds()) and not args.allow_builds:
        sys.exit(f"a build is running ({', '.join(builds)}): it would skew the figures; wait for it")
    for port in {BACKEND, FASTLB_ADMIN, *(PORTS[n] for n in only)}:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                sys.exit(f"udp port {port} is in use: is another benchmark running?")
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    d = Path(tempfile.mkdtemp(prefix="fastlb-udpbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "load_before": os.getloadavg()[0]},
        "versions": versions(args.fastlb if "fastlb" in only else None),
        "settings": {
            k: getattr(args, k)
            for k in ("rate", "secs", "outstanding", "clients", "names", "search_steps", "search_secs")
        }
        | {
            "proxy_cpus": args.proxy_cpus,
            "client_cpus": args.client_cpus,
            "backend": "bench/dns_responder.c",
        },
        "targets": {n: {"name": n} for n in only},
    }
    backend: Responder | None = None
    try:
        exe = build_responder(d)
        qfile = query_file(d, args.names)
        backend = Responder(exe, d, args.client_cpus)
        procs.append(backend.proc)
        wait_answering(BACKEND)
        commands: dict[str, list[str]] = {
            "nginx": ["nginx", "-p", str(d), "-c", str(nginx_conf(d, args.proxy_cpus)), "-g", "daemon off;"],
            "dnsdist": [
                "dnsdist",
                "--supervised",
                "--disable-syslog",
                "-C",
                str(dnsdist_conf(d, "dnsdist", None)),
            ],
            "dnsdist-mmsg": [
                *("dnsdist", "--supervised", "--disable-syslog", "-C"),
                str(dnsdist_conf(d, "dnsdist-mmsg", args.dnsdist_vector)),
            ],
            "fastlb": [args.fastlb, "serve", "-c", str(fastlb_conf(d, args.proxy_cpus))],
        }
        if "fastlb" in only:
            check = subprocess.run(
                [args.fastlb, "check", "-c", str(d / "fastlb.toml")], capture_output=True, text=True
            )
            if check.returncode != 0:
                why = (check.stderr or check.stdout).strip().splitlines()
                results["targets"]["fastlb"]["skipped"] = "`fastlb check` rejects the config: " + "; ".join(
                    why[-3:]
                )
                print(f"  fastlb skipped: {why[-3:]}", file=sys.stderr)
                only.remove("fastlb")
        pids: dict[str, list[int]] = {"direct": [backend.proc.pid]}
        for name in only:
            if name == "direct":
                continue
            log = (d / f"{name}.log").open("w")
            running = subprocess.Popen(
                ["taskset", "-c", args.proxy_cpus, *commands[name]], stdout=log, stderr=subprocess.STDOUT
            )
            procs.append(running)
            wait_answering(PORTS[name])
            time.sleep(0.5)
            pids[name] = process_tree(running.pid)
        time.sleep(1.0)
        for label, secs, rate in (("fixed", args.secs, args.rate), ("unthrottled", args.secs, None)):
            for name in only:
                print(f"  {label} {name} ...", file=sys.stderr, flush=True)
                r = step(name, pids[name], backend, args, qfile, secs, rate)
                results["targets"][name][label] = r
                print(
                    f"    {r['answered_qps']} q/s, loss {r['loss_pct']}%, {r['cpu_us']} us/query,"
                    f" busy {r['target_busy']}, cpu1 {r['cpu1_busy']}, others {r['others_on_proxy_cpus']}"
                    f" / {r['others_on_client_cpus']} (attempt {r['attempt']}),"
                    f" kernel drops {r['kernel_drops']}",
                    file=sys.stderr,
                    flush=True,
                )
                settle(r)
        for name in only:
            print(f"  clean rate {name} ...", file=sys.stderr, flush=True)
            t = results["targets"][name]
            t["search"] = search(name, pids[name], backend, args, qfile, t["fixed"], t["unthrottled"])
            print(f"    {t['search']['clean_qps']} q/s", file=sys.stderr, flush=True)
        if "fastlb" in only:
            results["targets"]["fastlb"]["udp_stats"] = fastlb_udp_stats()
        results["machine"]["builds_during_run"] = busy_builds()
        results["figures"] = summary(results["targets"], args.rate)
        print(table(results), file=sys.stderr)
        print(json.dumps(results, indent=1))
    finally:
        stop_all(list(reversed(procs)))
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
