"""The kernel data path (`data_path = "kernel"`) against going direct and the bare epoll relay
(../shared/tools/floor_relay.c), on loopback inside a network namespace of its own (so nftables
changes nothing outside it). Whole-machine CPU from /proc/stat, because kernel work lands in
softirq on any CPU.

Backends: nginx, one worker on CPU 1, "ok" on three ports (as compare_lb.py). Client: wrk on
CPU 1. Relays under test on CPU 0: the floor relay, fastlb's proxy tcp listener, and fastlb's
kernel listener (nftables NAT: no process relays anything; fastlb only programs the table).

Figures per target:
- c1: one keep-alive connection, p50/p99; added = target minus direct.
- cpu_us_per_req: all CPUs' busy time over a c=64 keep-alive run divided by its requests; over
  direct = target minus direct (the relay's own share, wherever the kernel ran it).
- concurrent: `--flows N` connections opened through the kernel listener and held, counted in
  conntrack (fastlb's marks), then a byte echoed on a sample of them.
Ratios are within one run. Prints one JSON object.

    sudo .venv/bin/python bench/kernel_compare.py [--secs 5] [--flows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_times, stop_all, wait_port, wrk

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ROOT.parent / "shared" / "tools" / "floor_relay.c"
BACKENDS = [19001, 19002, 19003]
PORTS = {"floor-relay": 18100, "fastlb-proxy": 18101, "fastlb-kernel": 18102}
HOLD_BACKENDS, HOLD_PORT = [19011, 19012, 19013, 19014], 18103  # the concurrency test's


def whole_machine_cpu_per_req(port: int, secs: int) -> tuple[float, dict[str, Any]]:
    before = cpu_times()
    run = wrk(port, 64, secs)
    after = cpu_times()
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(after[c][0] - before[c][0] for c in after) / hz
    return round(busy / max(run["requests"], 1) * 1e6, 2), run


def nginx_backends(
    d: Path, workers: int = 1, ports: list[int] = BACKENDS, tag: str = "backend"
) -> subprocess.Popen[bytes]:
    """nginx answering "ok" on `ports`; more workers hold more connections (one fd limit each)."""
    servers = " ".join(
        f"server {{ listen 127.0.0.1:{p} reuseport; access_log off; keepalive_requests 1000000;"
        f" location / {{ return 200 'ok\\n'; }} }}"
        for p in ports
    )
    conf = d / f"{tag}.conf"
    conf.write_text(
        f"daemon off; worker_processes {workers}; pid {d}/{tag}.pid;"
        f" error_log {d}/{tag}.err; events {{ worker_connections 16000; }} http {{ {servers} }}"
    )
    return subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", str(conf)])


def fastlb_config(d: Path, name: str, port: int, data_path: str, backends: list[int] = BACKENDS) -> Path:
    listed = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in backends)
    path = d / f"{name}.toml"
    path.write_text(
        f"""[runtime]
workers = 1
cpu_affinity = [0]
[admin]
bind = "127.0.0.1:{port + 1000}"
[[listeners]]
name = "l4"
bind = "127.0.0.1:{port}"
protocol = "tcp"
pool = "app"
data_path = "{data_path}"
[[pools]]
name = "app"
backends = [{listed}]
"""
    )
    return path


PER_HOLDER = 12_000  # sockets per process: under this machine's hard fd limit (20k), with room


def holder(port: int, n: int, src: str) -> None:
    """One holding process: `n` connections from `src`, "ready" on stdout, then on a line from
    stdin a request on a sample of them; prints how many answered."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.readline()
    ok = 0
    for s in socks[:: max(1, n // 50)]:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ok += b"200 OK" in s.recv(512)
    print(ok, min(n, len(socks[:: max(1, n // 50)])), flush=True)


def hold_flows(port: int, n: int) -> dict[str, Any]:
    """`n` connections through the kernel listener held at once by several processes (each
    from its own loopback source: ~28k ephemeral ports per source), counted in conntrack
    (fastlb's marks), then a request answered on a sample of them."""
    from fastlb.kernel_path import read_conntrack

    holders = []
    t0 = time.monotonic()
    for k, start in enumerate(range(0, n, PER_HOLDER)):
        count = min(PER_HOLDER, n - start)
        cmd = [
            sys.executable,
            __file__,
            "--hold",
            str(count),
            "--src",
            f"127.0.0.{2 + k}",
            "--port",
            str(port),
        ]
        holders.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for h in holders:
            assert h.stdout is not None and h.stdout.readline().strip() == "ready"
        opened_s = time.monotonic() - t0
        time.sleep(1)
        flows = sum((read_conntrack() or {}).values())
        answered = sampled = 0
        for h in holders:
            assert h.stdin is not None and h.stdout is not None
            h.stdin.write("go\n")
            h.stdin.flush()
            ok, of = h.stdout.readline().split()
            answered, sampled = answered + int(ok), sampled + int(of)
        return {"held": n, "open_s": round(opened_s, 2), "conntrack_flows": flows,
                "sample": sampled, "sample_answered": answered}  # fmt: skip
    finally:
        for h in holders:
            h.kill()
            h.wait()


def inside(a: argparse.Namespace) -> dict[str, Any]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # held flows: a socket each
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    d = Path(tempfile.mkdtemp(prefix="kernel-bench-"))
    procs: list[subprocess.Popen[Any]] = []
    out: dict[str, Any] = {"machine": {"nproc": os.cpu_count()}, "secs": a.secs, "targets": {}}
    try:
        procs.append(nginx_backends(d))
        for p in BACKENDS:
            wait_port(p)
        subprocess.run(["gcc", "-O2", "-o", str(d / "floor_relay"), str(FLOOR)], check=True)
        env = dict(os.environ, BACKENDS=",".join(f"127.0.0.1:{p}" for p in BACKENDS))
        relay = subprocess.Popen(
            ["taskset", "-c", "0", str(d / "floor_relay")], env=dict(env, PORT=str(PORTS["floor-relay"]))
        )
        procs.append(relay)
        for name, data_path in (("fastlb-proxy", "proxy"), ("fastlb-kernel", "kernel")):
            cfg = fastlb_config(d, name, PORTS[name], data_path)
            log = (d / f"{name}.log").open("w")
            cmd = ["taskset", "-c", "0", sys.executable, "-m", "fastlb", "serve", "-c", str(cfg)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        for port in PORTS.values():
            wait_port(port, 20)
        time.sleep(1)
        for name, port in [("direct", BACKENDS[0]), *PORTS.items()]:
            c1 = wrk(port, 1, a.secs)
            cpu, c64 = whole_machine_cpu_per_req(port, a.secs)
            out["targets"][name] = {"c1": c1, "c64_rps": c64["rps"], "cpu_us_per_req": cpu}
            print(name, json.dumps(out["targets"][name]), file=sys.stderr)
        t = out["targets"]
        base = t["direct"]
        for name in PORTS:
            t[name]["added_p50_ms"] = round(t[name]["c1"]["p50_ms"] - base["c1"]["p50_ms"], 4)
            t[name]["cpu_us_over_direct"] = round(t[name]["cpu_us_per_req"] - base["cpu_us_per_req"], 2)
        floor = t["floor-relay"]
        for name in ("fastlb-proxy", "fastlb-kernel"):
            t[name]["vs_floor"] = {
                "added_latency": round(t[name]["added_p50_ms"] / max(floor["added_p50_ms"], 1e-6), 3),
                "cpu_over_direct": round(
                    t[name]["cpu_us_over_direct"] / max(floor["cpu_us_over_direct"], 1e-6), 3
                ),
            }
        if a.flows:
            procs.append(nginx_backends(d, 4, HOLD_BACKENDS, "hold"))
            cfg = fastlb_config(d, "hold", HOLD_PORT, "kernel", HOLD_BACKENDS)
            log = (d / "hold.log").open("w")
            cmd = [sys.executable, "-m", "fastlb", "serve", "-c", str(cfg)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            wait_port(HOLD_PORT, 20)
            out["concurrent"] = hold_flows(HOLD_PORT, a.flows)
        return out
    finally:
        stop_all(list(reversed(procs)))
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--flows", type=int, default=50_000)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hold", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--src", default="127.0.0.2", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hold:
        holder(a.port, a.hold, a.src)
        return
    if a.inside:
        print(json.dumps(inside(a), indent=1))
        return
    ns = f"fastlb-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = [sys.executable, __file__, "--inside", "--secs", str(a.secs), "--flows", str(a.flows)]
        subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    main()
