#!/usr/bin/env python3
"""fastlb beside HAProxy and nginx on this machine, measured the same way for each.

Backends: one nginx (one worker) answering "ok" on three ports, plus a 256 MiB file at /big.
Targets, started one after the other, each pinned to --proxy-cpus with --workers workers
(nbthread for HAProxy, worker_processes for nginx): haproxy-http, haproxy-tcp, nginx-http,
nginx-stream, fastlb-http, fastlb-tcp, and any `--extra NAME=CMD` (a shell command listening
on 127.0.0.1:$PORT and balancing over $BACKENDS). wrk and the backend run on --client-cpus.

Per target:
- c1 and c64: latency and throughput with 1 and 64 keep-alive connections;
- cpu_us_per_req: the target's CPU time (utime + stime of its processes, from /proc) per
  request at c64. That holds up on a noisy machine far better than requests per second.
- close: 32 connections, one request each (`Connection: close`), and cpu_us_per_conn;
- bulk_cpu_s_per_GB: a 256 MiB download through the target, CPU seconds per GB;
- bytes_per_idle_conn: RSS growth per open client connection that sent half a request.

Compare figures of one run only. Progress goes to stderr; one JSON object to stdout.
usage: python bench/compare.py [--secs 5] [--only a,b] [--workers 1] [--proxy-cpus 0] [--client-cpus 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cpu_seconds, process_tree, stop_all, wait_port, wrk

HERE = Path(__file__).resolve().parent
BACKEND_PORTS = [19101, 19102, 19103]
PORTS = {
    "haproxy-http": 18180,
    "haproxy-tcp": 18181,
    "nginx-http": 18182,
    "nginx-stream": 18183,
    "fastlb-http": 18190,
    "fastlb-tcp": 18191,
}
BIG = 256 << 20
IDLE_CONNS = 4000
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def backend_conf(d: Path, cpus: str) -> Path:
    servers = "\n".join(
        f"server {{ listen 127.0.0.1:{p} reuseport; access_log off; keepalive_requests 1000000;"
        f" location / {{ return 200 'ok\\n'; }} location /big {{ alias {d}/big; }} }}"
        for p in BACKEND_PORTS
    )
    conf = d / "backend.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {d}/backend.pid; error_log {d}/backend.err;"
        f" events {{ worker_connections 4096; }} http {{ sendfile on; {servers} }}"
    )
    return conf


def haproxy_conf(d: Path, workers: int) -> Path:
    servers = "\n".join(f"    server s{p} 127.0.0.1:{p}" for p in BACKEND_PORTS)
    conf = d / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread {workers}
    maxconn 9000
defaults
    timeout connect 5s
    timeout client 50s
    timeout server 50s
frontend fh
    mode http
    bind 127.0.0.1:{PORTS["haproxy-http"]}
    option http-keep-alive
    default_backend bh
backend bh
    mode http
    balance roundrobin
    http-reuse always
{servers}
frontend ft
    mode tcp
    bind 127.0.0.1:{PORTS["haproxy-tcp"]}
    default_backend bt
backend bt
    mode tcp
    balance roundrobin
{servers}
"""
    )
    return conf


def nginx_conf(d: Path, workers: int) -> Path:
    upstreams = " ".join(f"server 127.0.0.1:{p};" for p in BACKEND_PORTS)
    load = f"load_module {STREAM_MODULE};" if Path(STREAM_MODULE).exists() else ""
    conf = d / "nginxlb.conf"
    conf.write_text(
        f"{load} daemon off; worker_processes {workers}; pid {d}/lb.pid; error_log {d}/lb.err;"
        " events { worker_connections 20000; }"
        f" http {{ access_log off; upstream u {{ {upstreams} keepalive 64; }}"
        f" server {{ listen 127.0.0.1:{PORTS['nginx-http']}; keepalive_requests 1000000;"
        ' location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } } }'
        f" stream {{ upstream t {{ {upstreams} }} server {{ listen 127.0.0.1:{PORTS['nginx-stream']};"
        " proxy_pass t; } }"
    )
    return conf


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def idle_bytes(port: int, pids: list[int]) -> int:
    before = rss_bytes(pids)
    socks = []
    try:
        for _ in range(IDLE_CONNS):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        time.sleep(1.0)
        return round((rss_bytes(pids) - before) / IDLE_CONNS)
    finally:
        for s in socks:
            s.close()


def bulk(port: int, pids: list[int], cpus: str) -> dict[str, float]:
    c0, t0 = cpu_seconds(pids), time.monotonic()
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            f"http://127.0.0.1:{port}/big",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    took = time.monotonic() - t0
    return {
        "bulk_MBps": round(int(out) / took / 1e6, 1),
        "bulk_cpu_s_per_GB": round((cpu_seconds(pids) - c0) / (BIG / 1e9), 3),
    }


def measure(name: str, port: int, pids: list[int], secs: int, cpus: str) -> dict[str, Any]:
    res: dict[str, Any] = {"name": name, "c1": wrk(port, 1, secs, cpu=cpus)}
    c0 = cpu_seconds(pids)
    res["c64"] = wrk(port, 64, secs, cpu=cpus)
    c1 = cpu_seconds(pids)
    res["cpu_us_per_req"] = round((c1 - c0) / max(res["c64"]["requests"], 1) * 1e6, 2)
    res["close"] = wrk(port, 32, secs, cpu=cpus, close=True)
    c2 = cpu_seconds(pids)
    res["cpu_us_per_conn"] = round((c2 - c1) / max(res["close"]["requests"], 1) * 1e6, 2)
    if pids:
        res.update(bulk(port, pids, cpus))
        res["bytes_per_idle_conn"] = idle_bytes(port, pids)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated target names")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--proxy-cpus", default="0")
    ap.add_argument("--client-cpus", default="1", help="wrk and the backend")
    ap.add_argument("--extra", action="append", default=[], help="NAME=CMD listening on $PORT; repeatable")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    d = Path(tempfile.mkdtemp(prefix="fastlb-bench-"))
    d.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        big = d / "big"
        with big.open("wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(BIG >> 20):
                f.write(block)
        big.chmod(0o644)
        procs.append(
            subprocess.Popen(
                ["taskset", "-c", args.client_cpus, "nginx", "-c", str(backend_conf(d, args.client_cpus))]
            )
        )
        for p in BACKEND_PORTS:
            wait_port(p)
        lb = f"{sys.executable} {HERE / 'lb_from_env.py'}"
        commands: list[tuple[str, list[str]]] = [
            ("haproxy-http", ["haproxy", "-f", str(haproxy_conf(d, args.workers))]),
            ("haproxy-tcp", ["haproxy", "-f", str(d / "haproxy.cfg")]),
            ("nginx-http", ["nginx", "-c", str(nginx_conf(d, args.workers))]),
            ("nginx-stream", ["nginx", "-c", str(d / "nginxlb.conf")]),
            ("fastlb-http", ["bash", "-c", f"{lb} http {args.workers}"]),
            ("fastlb-tcp", ["bash", "-c", f"{lb} tcp {args.workers}"]),
        ]
        for i, extra in enumerate(args.extra):
            name, cmd = extra.split("=", 1)
            PORTS[name] = 18200 + i
            commands.append((name, ["bash", "-c", cmd]))
        env = dict(os.environ, BACKENDS=",".join(f"127.0.0.1:{p}" for p in BACKEND_PORTS))
        results: dict[str, Any] = {
            "machine": {"nproc": os.cpu_count()},
            "workers": args.workers,
            "targets": [],
        }
        running: subprocess.Popen[bytes] | None = None
        running_cmd: list[str] = []
        for name, cmd in commands:
            if only and name not in only:
                continue
            print(f"  {name} ...", file=sys.stderr, flush=True)
            if cmd != running_cmd:  # haproxy and nginx serve both of their targets at once
                if running is not None:
                    running.send_signal(signal.SIGTERM)
                    running.wait(15)
                log = (d / f"{name}.log").open("w")
                running = subprocess.Popen(
                    ["taskset", "-c", args.proxy_cpus, *cmd],
                    env=dict(env, PORT=str(PORTS[name])),
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
                procs.append(running)
                running_cmd = cmd
            wait_port(PORTS[name])
            time.sleep(0.3)
            assert running is not None
            pids = process_tree(running.pid)
            results["targets"].append(measure(name, PORTS[name], pids, args.secs, args.client_cpus))
        print(json.dumps(results, indent=1))
    finally:
        stop_all(procs)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
