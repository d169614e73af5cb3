#!/usr/bin/env python3
"""fastlb, HAProxy and nginx serving HTTP/2 and gRPC on this machine, measured the same way (issue 13).

Backends, both on --client-cpus with the clients:
- an HTTP/1.1 nginx (one worker) answering "ok", keep-alive, with /stub_status (the connections
  it accepted: how many each target opened to it);
- bench/grpc_responder.c, compiled with gcc into a temporary folder at run time (removed at the
  end): a single-threaded h2c server answering every stream with one gRPC unary reply (headers,
  one message, trailers `grpc-status: 0`) and counting the streams it answered and the
  connections it accepted (SIGUSR1). It costs a few µs per call (h2load straight to it: ~360k
  calls/s on one core), far below any proxy, so the proxies set the figures (a grpcio server
  runs Python for every call, which would put the backend, not the proxy, at the limit).
One ECDSA P-256 certificate, made at run time (tls_compare.make_cert), serves every TLS listener.

Targets, each one process group under `taskset -c --proxy-cpus` with one worker, serving two
listeners: an https one (ALPN h2 and http/1.1) in front of the HTTP/1.1 backend, and an h2c one
(HTTP/2 with prior knowledge, no TLS) in front of the gRPC backend over HTTP/2:
- haproxy 2.6: `bind ... ssl crt ... alpn h2,http/1.1`; `bind ... proto h2` and
  `server ... proto h2` for gRPC; `http-reuse always` on both backends; nbthread 1;
- nginx 1.22: `listen ... ssl http2`; `listen ... http2` with `grpc_pass`; upstream
  `keepalive NGINX_KEEPALIVE` (1024) and `keepalive_requests 1000000`: nginx sends one request
  per upstream connection at a time (HTTP/1.1 and gRPC alike), and -c 64 -m 10 keeps 640 in
  flight, so a smaller idle cache would close and reopen upstream connections all the time;
- fastlb (--fastlb, default: the `fastlb` next to this Python): an https listener with
  `[listeners.tls]` and an http listener (h2c), both with `[listeners.http2]`
  max_concurrent_streams = 100 (HAProxy's default; nginx's is 128); the gRPC pool with
  `http_version = "2"`; `keepalive = NGINX_KEEPALIVE` on the HTTP/1.1 pool, as nginx's.
  Skipped, with `fastlb check`'s reason in the
  JSON, when the build's config refuses that.
All targets run from the start and each figure is taken for every target in turn, so that what
is compared was measured within a minute or two.

Figures, in this order (CPU: the target's utime + stime of all its processes and threads, from
/proc, over what went through it):
- idle: `idle_bytes_per_conn`, RSS growth per idle HTTP/2 TLS connection: --idle-conns
  connections (ALPN h2, opened by --procs client processes), each having made one request
  (GET /, answered 200) and then sending nothing; the first and last of each process's share
  are checked still open (a second request each). Goal: fastlb <= 0.5 x haproxy. Taken
  first, before any load: the load steps leave freed memory in the allocators (HAProxy's pools,
  malloc's free lists: 640 backend connections and their buffers) that idle connections reuse
  without RSS growth (measured after them: 524 B per connection for HAProxy, 1065 B for nginx).
- h2: `h2_cpu_us`, per request, h2load over TLS (`--npn-list=h2`: ALPN h2 or no connection) to
  the https listener, -c 64 -m 10
  (64 connections, 10 streams each), GET /, for --secs seconds. The 64 handshakes are inside
  the window (~1 ms each over ~200k requests: ~0.3 µs per request). Every request h2load saw
  succeed must have been served by the backend (stub_status's request count: nothing cached);
  also backend_conns_opened (stub_status: ~640 when the target keeps every backend connection
  alive).
  Goal: fastlb <= 0.8 x the better of haproxy and nginx.
- grpc: `grpc_cpu_us`, per unary call, h2load to the h2c listener, -c 64 -m 10, POST of one
  length-prefixed gRPC message (`-d`) with `content-type: application/grpc` and
  `te: trailers`, path /bench.Bench/Unary. Every call h2load saw succeed must have been
  answered by the backend (its own count): a proxy answering a gRPC call itself (a
  trailers-only error is HTTP 200 too) would show there. Also backend_conns_opened (the
  responder's accept count). Goal: fastlb <= 0.8 x haproxy.
Before the load steps each target is probed outside the CPU windows: ALPN on the https
listener, one h2 GET, and one gRPC call through curl (status 200, the reply's message,
`grpc-status: 0` in the trailers).

Per load step also: h2load's requests/s, failed/errored counts, the application protocol it
negotiated and its mean time per request; `target_busy` (its CPU / wall time) and
`client_busy` (the client CPUs' busy share, by anything); `others_on_proxy_cpus` (all CPU time
on the proxy's CPUs from /proc/stat, less the target's): other work on the machine, ~0 when it
is quiet. A step disturbed by more than 10% of a CPU is taken again, up to --retries times, after
waiting (up to --quiet-wait s) for the CPUs to be quiet. The script refuses to start while
`cargo`, `rustc`, `maturin`, `cc1` or `ld` runs (`--allow-builds` overrides that).

The JSON gives, per figure, each target's value and ratio to the better anchor, and fastlb's
ratio to the anchor its goal names, with whether the goal holds (tls_compare.summary). A figure
whose checks failed (the probe of its listener, h2load's protocol, failures or errors, calls not
seen by the backend, idle connections closed) stays in the JSON but out of the summary; a step
that could not run at all is recorded as `FIGURE_error`, and the other targets go on. Compare
figures of one run only. Progress and a table go to stderr; one JSON object to stdout.

usage: python bench/h2_compare.py [--figures idle,h2,grpc] [--only haproxy,nginx,fastlb] [--secs 8]
       [--idle-conns 2000] [--procs 4] [--proxy-cpus 0] [--client-cpus 1] [--fastlb PATH]
       [--allow-builds] [--quiet-wait 20] [--retries 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from compare import rss_bytes
from tls_compare import client_context, make_cert, summary, table

import harness
from harness import (
    busy,
    busy_builds,
    cpu_seconds,
    cpu_times,
    cpus,
    process_tree,
    stop_all,
    wait_port,
    wait_quiet,
)

HERE = Path(__file__).resolve().parent
BACKEND = 19141  # the HTTP/1.1 nginx
BACKEND_GRPC = 19142  # grpc_responder
PORTS = {  # target: (https listener, ALPN h2; h2c listener in front of the gRPC backend)
    "haproxy": (18470, 18471),
    "nginx": (18472, 18473),
    "fastlb": (18490, 18491),
}
FASTLB_ADMIN = 18499
FIGURES = ("idle", "h2", "grpc")
KEYS = {"h2": "h2_cpu_us", "grpc": "grpc_cpu_us", "idle": "idle_bytes_per_conn"}
# The goals: fastlb's figure at most `bound` x the anchor named ("best": the better one).
GOALS = {"h2": ("best", 0.8), "grpc": ("haproxy", 0.8), "idle": ("haproxy", 0.5)}
NGINX_KEEPALIVE = 1024
GRPC_PATH = "/bench.Bench/Unary"
GRPC_REQUEST = b"\x00\x00\x00\x00\x07\x0a\x05hello"  # one message: field 1 (string) = "hello"
GRPC_REPLY = b"\x00\x00\x00\x00\x04\x0a\x02ok"  # what grpc_responder answers
CONCURRENCY = ("-c", "64", "-m", "10")

# A minimal HTTP/2 client for the idle connections and the probes: frames by hand, HPACK with
# static-table indices and literals without indexing only (nothing enters a dynamic table).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_GET = b"\x82\x87\x84\x01\x09localhost"  # :method GET, :scheme https, :path /, :authority
STATUS_200 = 0x88  # HPACK: ":status: 200", static index 8 (how all three targets send it)


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_request(s: ssl.SSLSocket, stream: int, first: bool) -> bool:
    """GET / on `stream` (the connection preface and an empty SETTINGS first when `first`),
    then reads frames until the stream ends, acknowledging the server's SETTINGS on the way;
    True if its response headers began with `:status: 200`."""
    head = H2_PREFACE + h2_frame(4, 0, 0) if first else b""
    s.sendall(head + h2_frame(1, 0x5, stream, H2_GET))  # END_STREAM | END_HEADERS
    buf, status_ok = b"", False
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            buf += chunk
        n = int.from_bytes(buf[:3], "big")
        kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload, buf = buf[9 : 9 + n], buf[9 + n :]
        if kind == 4 and not flags & 0x1:
            s.sendall(h2_frame(4, 0x1, 0))
        elif kind == 7:
            raise ConnectionError(f"GOAWAY {payload.hex()}")
        elif kind == 3 and sid == stream:
            raise ConnectionError(f"RST_STREAM {payload.hex()}")
        elif kind == 1 and sid == stream:
            skip = (1 + payload[0] if flags & 0x8 else 0) + (5 if flags & 0x20 else 0)  # PADDED, PRIORITY
            status_ok = status_ok or payload[skip : skip + 1] == bytes([STATUS_200])
        if kind in (0, 1) and sid == stream and flags & 0x1:
            return status_ok


def h2_connect(port: int) -> ssl.SSLSocket:
    """A TLS connection offering ALPN h2 only; refuses anything else."""
    ctx = client_context()
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    if s.selected_alpn_protocol() != "h2":
        s.close()
        raise ConnectionError(f"ALPN: {s.selected_alpn_protocol()}")
    return s


def backend_conf(d: Path) -> Path:
    conf = d / "backend.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {d}/backend.pid; error_log {d}/backend.err;"
        " events { worker_connections 4096; } http { access_log off;"
        f" server {{ listen 127.0.0.1:{BACKEND} reuseport; keepalive_requests 1000000;"
        " location / { return 200 'ok\\n'; } location = /stub_status { stub_status; } } }"
    )
    return conf


def haproxy_conf(d: Path) -> Path:
    https, grpc = PORTS["haproxy"]
    conf = d / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread 1
    maxconn 9000
defaults
    timeout connect 5s
    timeout client 50s
    timeout server 50s
frontend fh2
    mode http
    bind 127.0.0.1:{https} ssl crt {d}/site.combined.pem alpn h2,http/1.1
    default_backend plain
backend plain
    mode http
    http-reuse always
    server s 127.0.0.1:{BACKEND}
frontend fgrpc
    mode http
    bind 127.0.0.1:{grpc} proto h2
    default_backend grpc
backend grpc
    mode http
    http-reuse always
    server s 127.0.0.1:{BACKEND_GRPC} proto h2
"""
    )
    return conf


def nginx_conf(d: Path) -> Path:
    https, grpc = PORTS["nginx"]
    keep = f"keepalive {NGINX_KEEPALIVE}; keepalive_requests 1000000;"
    conf = d / "nginxlb.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; worker_rlimit_nofile 20000; pid {d}/lb.pid; error_log {d}/lb.err;"
        " events { worker_connections 20000; }"
        " http { access_log off;"
        f" upstream plain {{ server 127.0.0.1:{BACKEND}; {keep} }}"
        f" upstream grpcb {{ server 127.0.0.1:{BACKEND_GRPC}; {keep} }}"
        f" server {{ listen 127.0.0.1:{https} ssl http2; keepalive_requests 1000000;"
        f" ssl_certificate {d}/site.pem; ssl_certificate_key {d}/site.key; ssl_protocols TLSv1.2 TLSv1.3;"
        ' location / { proxy_pass http://plain; proxy_http_version 1.1; proxy_set_header Connection ""; } }'
        f" server {{ listen 127.0.0.1:{grpc} http2; keepalive_requests 1000000;"
        " location / { grpc_pass grpc://grpcb; } } }"
    )
    return conf


def fastlb_conf(d: Path, proxy_cpus: str) -> Path:
    https, grpc = PORTS["fastlb"]
    cpu_list = ", ".join(str(c) for c in cpus(proxy_cpus))
    conf = d / "fastlb.toml"
    conf.write_text(
        f"""[runtime]
workers = 1
cpu_affinity = [{cpu_list}]
max_connections = 100000

[admin]
bind = "127.0.0.1:{FASTLB_ADMIN}"

[[listeners]]
name = "h2tls"
bind = "127.0.0.1:{https}"
protocol = "https"
pool = "app"
  [listeners.tls]
  certificates = [{{ cert = "site.pem", key = "site.key" }}]
  [listeners.http2]
  max_concurrent_streams = 100

[[listeners]]
name = "grpc"
bind = "127.0.0.1:{grpc}"
protocol = "http"
pool = "grpc"
  [listeners.http2]
  max_concurrent_streams = 100

[[pools]]
name = "app"
keepalive = {NGINX_KEEPALIVE}
backends = [{{ address = "127.0.0.1:{BACKEND}" }}]
health = {{ type = "none" }}

[[pools]]
name = "grpc"
http_version = "2"
backends = [{{ address = "127.0.0.1:{BACKEND_GRPC}" }}]
health = {{ type = "none" }}
"""
    )
    return conf


class Responder(harness.Responder):
    """The gRPC backend, and its own counts (SIGUSR1): streams answered, connections accepted."""

    def __init__(self, exe: Path, d: Path, client_cpus: str) -> None:
        super().__init__(exe, d, client_cpus, BACKEND_GRPC)

    def counts(self) -> tuple[int, int]:
        answered, accepted = self.report(r"answered (\d+) accepted (\d+)")
        return answered, accepted


def backend_counts() -> tuple[int, int]:
    """Connections the HTTP/1.1 backend has accepted and requests it has served so far, counting
    this ask's connection and request."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{BACKEND}/stub_status", timeout=5).read().decode()
    accepts, _, requests = text.splitlines()[2].split()
    return int(accepts), int(requests)


def h2load(url: str, client_cpus: str, secs: int, extra: list[str]) -> dict[str, Any]:
    """One h2load run pinned to `client_cpus` (a thread per CPU); its counts."""
    threads = str(len(cpus(client_cpus)))
    cmd = ["taskset", "-c", client_cpus, "h2load", *CONCURRENCY, "-t", threads, "-D", str(secs), *extra, url]
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = done.stdout

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        if not m:
            raise RuntimeError(f"h2load: no {pattern!r} in: {text[-2000:]} {done.stderr[-2000:]}")
        return float(m.group(1))

    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
        text,
    )
    if done.returncode != 0 or not req:
        raise RuntimeError(f"h2load failed: {text[-2000:]} {done.stderr[-2000:]}")
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", text)
    proto = re.search(r"Application protocol: (\S+)", text)
    return {
        "rps": round(num(r"finished in [\d.]+s, ([\d.]+) req/s")),
        "succeeded": int(req.group(4)),
        "failed": int(req.group(5)),
        "errored": int(req.group(6)),
        "status_2xx": int(num(r"status codes: (\d+) 2xx")),
        "protocol": proto.group(1) if proto else None,
        "mean_ms": _ms(mean.group(1)) if mean else None,
    }


def _ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    assert m, v
    x, unit = float(m.group(1)), m.group(2)
    return round(x / 1000 if unit == "us" else x * 1000 if unit == "s" else x, 3)


def load_step(
    fig: str, name: str, pids: list[int], args: argparse.Namespace, d: Path, backend: Responder
) -> dict[str, Any]:
    """One h2load run against a target (h2 or grpc), with the target's CPU meanwhile."""
    https, grpc = PORTS[name]
    if fig == "h2":
        url, extra, want_proto = f"https://127.0.0.1:{https}/", ["--npn-list=h2"], "h2"
        accepted0, answered0 = backend_counts()
    else:
        url, want_proto = f"http://127.0.0.1:{grpc}{GRPC_PATH}", "h2c"
        extra = [
            "-d",
            str(d / "grpc_request.bin"),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]
        answered0, accepted0 = backend.counts()
    m0 = cpu_times()
    c0, t0 = cpu_seconds(pids), time.monotonic()
    r = h2load(url, args.client_cpus, args.secs, extra)
    c1, wall = cpu_seconds(pids), time.monotonic() - t0
    m1 = cpu_times()
    if fig == "h2":
        accepted1, answered1 = backend_counts()
        accepted1, answered1 = accepted1 - 1, answered1 - 1  # less the ask itself
    else:
        answered1, accepted1 = backend.counts()
    r["backend_answered"] = answered1 - answered0
    r["backend_conns_opened"] = accepted1 - accepted0
    r["all_answers_from_backend"] = r["backend_answered"] >= r["succeeded"]
    r[KEYS[fig]] = round((c1 - c0) / max(r["succeeded"], 1) * 1e6, 2)
    r["target_cpu_s"] = round(c1 - c0, 2)
    r["target_busy"] = round((c1 - c0) / wall, 2)
    r["client_busy"] = busy(m0, m1, cpus(args.client_cpus))
    r["others_on_proxy_cpus"] = round(max(0.0, busy(m0, m1, cpus(args.proxy_cpus)) - r["target_busy"]), 2)
    r["ok"] = (
        r["protocol"] == want_proto
        and r["failed"] == 0
        and r["errored"] == 0
        and r["status_2xx"] == r["succeeded"] > 0
        and r["all_answers_from_backend"]
    )
    return r


def step(
    fig: str, name: str, pids: list[int], args: argparse.Namespace, d: Path, backend: Responder
) -> dict[str, Any]:
    """load_step(), taken again (up to --retries times, after waiting for quiet) while other work
    took more than 10% of a proxy CPU meanwhile; the last attempt counts."""
    for attempt in range(args.retries + 1):
        waited = wait_quiet(cpus(args.proxy_cpus) + cpus(args.client_cpus), args.quiet_wait)
        r = load_step(fig, name, pids, args, d, backend)
        r["attempt"], r["waited_for_quiet_s"] = attempt + 1, waited
        r["disturbed"] = r["others_on_proxy_cpus"] > 0.1
        if not r["disturbed"]:
            break
    return r


def _idle_holder(port: int, n: int, out: Any, measured: Any) -> None:
    """One client process: opens `n` h2 TLS connections, one request on each, then sends
    nothing until `measured` is set; then a second request on its first and last, and closes all."""
    socks: list[ssl.SSLSocket] = []
    try:
        bad = 0
        for _ in range(n):
            s = h2_connect(port)
            s.settimeout(10)
            socks.append(s)
            bad += not h2_request(s, 1, first=True)
        out.put(("open", bad))
        measured.wait(180)
        alive = 0
        for s in (socks[0], socks[-1]):
            with contextlib.suppress(OSError):
                alive += h2_request(s, 3, first=False)
        out.put(("alive", alive))
    except OSError as e:
        out.put(("error", repr(e)))
    finally:
        for s in socks:
            s.close()


def idle(port: int, pids: list[int], n: int, procs: int) -> dict[str, Any]:
    """RSS growth per idle h2 TLS connection (one request answered on each), opened by `procs`
    client processes at once."""
    ctx = multiprocessing.get_context("fork")
    q, measured = ctx.Queue(), ctx.Event()
    shares = [n // procs + (i < n % procs) for i in range(procs)]
    before = rss_bytes(pids)
    t0 = time.monotonic()
    holders = [ctx.Process(target=_idle_holder, args=(port, k, q, measured)) for k in shares]
    for h in holders:
        h.start()
    try:
        opened = [q.get(timeout=300) for _ in holders]
        if errors := [v for kind, v in opened if kind != "open"]:
            raise RuntimeError(f"{len(errors)} of {procs} client processes failed, the first: {errors[0]}")
        took = time.monotonic() - t0
        time.sleep(1.0)
        after = rss_bytes(pids)
    finally:
        measured.set()
    alive = [q.get(timeout=60) for _ in holders]
    for h in holders:
        h.join()
    return {
        "idle_conns": n,
        "open_s": round(took, 2),
        "first_request_not_200": sum(bad for _, bad in opened),
        "first_and_last_alive": all(kind == "alive" and v == 2 for kind, v in alive),
        "idle_bytes_per_conn": round((after - before) / n),
    }


def probe(name: str, d: Path) -> dict[str, Any]:
    """Outside the CPU windows: ALPN and one h2 GET on the https listener; one gRPC call through
    the h2c listener with curl (status, the reply's message, the trailers)."""
    https, grpc = PORTS[name]
    out: dict[str, Any] = {}
    try:
        with h2_connect(https) as s:
            s.settimeout(10)
            out["h2_alpn"] = s.selected_alpn_protocol()
            out["h2_get_200"] = h2_request(s, 1, first=True)
    except OSError as e:
        out["h2_error"] = repr(e)
    r = subprocess.run(
        [
            *("curl", "-s", "--http2-prior-knowledge", "-D", "-", "-o", str(d / "grpc_reply.bin")),
            *("--data-binary", f"@{d / 'grpc_request.bin'}", "-H", "content-type: application/grpc"),
            *("-H", "te: trailers", "-w", "%{http_version} %{http_code}", "--max-time", "10"),
            f"http://127.0.0.1:{grpc}{GRPC_PATH}",
        ],
        capture_output=True,
        text=True,
    )
    head, _, trailers = r.stdout.partition("\n\n")  # text mode: curl's CRLFs read as "\n"
    reply = (d / "grpc_reply.bin").read_bytes() if (d / "grpc_reply.bin").exists() else b""
    out["grpc_curl"] = r.stdout.rsplit("\n", 1)[-1].strip()  # "2 200"
    out["grpc_content_type"] = "content-type: application/grpc" in head.lower()
    out["grpc_reply_ok"] = reply == GRPC_REPLY
    out["grpc_status_0"] = bool(re.search(r"^grpc-status: 0\r?$", trailers, re.M))
    out["h2_ok"] = out.get("h2_get_200") is True
    out["grpc_ok"] = out["grpc_curl"] == "2 200" and out["grpc_reply_ok"] and out["grpc_status_0"]
    out["ok"] = out["h2_ok"] and out["grpc_ok"]
    return out


def passed(t: dict[str, Any]) -> dict[str, Any]:
    """A target's figures whose checks held (the probe of that listener, the step's own checks),
    for the summary: a figure measured on failures (a target without HTTP/2 that fell back to
    HTTP/1.1, or answered nothing) is left out of it, and stays in the JSON."""
    out: dict[str, Any] = {"name": t["name"]}
    for fig in FIGURES:
        if (r := t.get(fig)) is None:
            continue
        if fig == "idle":
            good = r["first_and_last_alive"] and not r["first_request_not_200"]
        else:
            good = r["ok"] and t.get("probe", {}).get(f"{fig}_ok", False)
        if good:
            out[fig] = r
    return out


def details(results: dict[str, Any]) -> str:
    """Per target and figure: what a figure's value rests on (h2load's rate and checks, backend
    connections opened, how busy each side was, other work on the proxy's CPUs), and the probes."""
    lines = [
        "| target | figure | value | req/s | checks | backend conns opened | target busy | client busy"
        " | others on proxy CPUs |",
        "| --- |" + " --- |" * 8,
    ]
    for name, t in results["targets"].items():
        if "skipped" in t:
            lines.append(f"| {name} | skipped: {t['skipped']} |" + " |" * 7)
            continue
        for fig in FIGURES:
            if f"{fig}_error" in t:
                lines.append(f"| {name} | {fig} | failed: {t[f'{fig}_error'][:200]} |" + " |" * 6)
            if fig not in t:
                continue
            r = t[fig]
            if fig == "idle":
                ok = r["first_and_last_alive"] and not r["first_request_not_200"]
                lines.append(
                    f"| {name} | idle ({r['idle_conns']} conns, opened in {r['open_s']} s) |"
                    f" {r[KEYS[fig]]} B | - | {'ok' if ok else 'FAILED'} | - | - | - | - |"
                )
                continue
            mark = " *" if r.get("disturbed") else ""
            probe_ok = t.get("probe", {}).get(f"{fig}_ok")
            checks = "ok" if r["ok"] and probe_ok else f"FAILED (probe {probe_ok}, step {r['ok']})"
            lines.append(
                f"| {name} | {fig} | {r[KEYS[fig]]} µs{mark} | {r['rps']} | {checks} |"
                f" {r['backend_conns_opened']} | {r['target_busy']} | {r['client_busy']} |"
                f" {r['others_on_proxy_cpus']} |"
            )
    if any(t.get(f, {}).get("disturbed") for t in results["targets"].values() for f in FIGURES):
        lines += ["", "\\* other work took over 10% of a proxy CPU during that step, after retries."]
    return "\n".join(lines)


def versions(fastlb: str | None) -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except OSError as e:
            return str(e)
        return ((r.stdout + r.stderr).strip().splitlines() or [""])[0]

    out = {
        "haproxy": first(["haproxy", "-v"]),
        "nginx": first(["nginx", "-v"]),
        "openssl": first(["openssl", "version"]),
        "h2load": first(["h2load", "--version"]),
        "kernel": os.uname().release,
    }
    if fastlb:
        out["fastlb"] = first([fastlb, "--version"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--figures", default=",".join(FIGURES), help="comma-separated: idle, h2, grpc (taken in that order)"
    )
    ap.add_argument("--only", default="", help="comma-separated targets: haproxy,nginx,fastlb")
    ap.add_argument("--secs", type=int, default=8, help="each h2load run")
    ap.add_argument("--idle-conns", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=4, help="client processes holding the idle connections")
    ap.add_argument("--proxy-cpus", default="0")
    ap.add_argument("--client-cpus", default="1", help="clients and the backends")
    ap.add_argument("--fastlb", default=str(Path(sys.executable).parent / "fastlb"))
    ap.add_argument("--allow-builds", action="store_true", help="run even while a compiler runs")
    ap.add_argument("--quiet-wait", type=float, default=20, help="most seconds to wait for idle CPUs")
    ap.add_argument("--retries", type=int, default=1, help="retakes of a step disturbed by other work")
    args = ap.parse_args()
    only = [t for t in PORTS if not args.only or t in args.only.split(",")]
    figures = [f for f in FIGURES if f in args.figures.split(",")]
    missing = [
        t for t in ("gcc", "taskset", "h2load", "curl", "openssl", "haproxy", "nginx") if not shutil.which(t)
    ]
    if missing:
        sys.exit(f"missing: {' '.join(missing)}; apt-get install -y nghttp2-client haproxy nginx curl gcc")
    if (builds := busy_builds()) and not args.allow_builds:
        sys.exit(f"a build is running ({', '.join(builds)}): it would skew the figures; wait for it")
    for port in {BACKEND, BACKEND_GRPC, FASTLB_ADMIN, *(p for t in only for p in PORTS[t])}:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                sys.exit(f"port {port} is in use: is another benchmark running?")
    # This script's own clients run where h2load does; the targets are pinned apart by taskset.
    os.sched_setaffinity(0, set(cpus(args.client_cpus)))
    d = Path(tempfile.mkdtemp(prefix="fastlb-h2bench-"))
    d.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "load_before": os.getloadavg()[0]},
        "versions": versions(args.fastlb if "fastlb" in only else None),
        "settings": {
            "secs": args.secs,
            "idle_conns": args.idle_conns,
            "h2load": " ".join(CONCURRENCY),
            "proxy_cpus": args.proxy_cpus,
            "client_cpus": args.client_cpus,
            "nginx_keepalive": NGINX_KEEPALIVE,
            "grpc_backend": "bench/grpc_responder.c",
        },
        "targets": {name: {"name": name} for name in only},
    }
    try:
        make_cert(d)
        (d / "grpc_request.bin").write_bytes(GRPC_REQUEST)
        exe = d / "grpc_responder"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "grpc_responder.c")], check=True)
        backend = Responder(exe, d, args.client_cpus)
        procs.append(backend.proc)
        procs.append(
            subprocess.Popen(["taskset", "-c", args.client_cpus, "nginx", "-c", str(backend_conf(d))])
        )
        wait_port(BACKEND)
        wait_port(BACKEND_GRPC)
        commands = {
            "haproxy": ["haproxy", "-f", str(haproxy_conf(d))],
            "nginx": ["nginx", "-c", str(nginx_conf(d))],
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
        # Every target runs from the start (idle, each costs next to nothing), and each figure is
        # measured for all targets one after the other.
        pids: dict[str, list[int]] = {}
        for name in only:
            log = (d / f"{name}.log").open("w")
            running = subprocess.Popen(
                ["taskset", "-c", args.proxy_cpus, *commands[name]], stdout=subprocess.DEVNULL, stderr=log
            )
            procs.append(running)
            for port in PORTS[name]:
                wait_port(port, timeout=30)
            time.sleep(0.5)
            pids[name] = process_tree(running.pid)
            results["targets"][name]["probe"] = p = probe(name, d)
            if not p["ok"]:
                print(f"  {name}: probe failed: {p}", file=sys.stderr, flush=True)
        for fig in figures:
            for name in only:
                print(f"  {fig} {name} ...", file=sys.stderr, flush=True)
                try:
                    if fig == "idle":
                        res = idle(PORTS[name][0], pids[name], args.idle_conns, args.procs)
                    else:
                        res = step(fig, name, pids[name], args, d, backend)
                except (RuntimeError, AssertionError, OSError, queue.Empty) as e:
                    # a target that cannot do this (no HTTP/2 yet) is recorded; the others go on
                    results["targets"][name][f"{fig}_error"] = why = f"{type(e).__name__}: {e}"[:2000]
                    print(f"    failed: {why[:300]}", file=sys.stderr, flush=True)
                    continue
                results["targets"][name][fig] = res
                more = (
                    ""
                    if fig == "idle"
                    else f", {res['rps']} req/s, ok {res['ok']}, others {res['others_on_proxy_cpus']}"
                )
                print(f"    {KEYS[fig]} {res[KEYS[fig]]}{more}", file=sys.stderr, flush=True)
        results["machine"]["builds_during_run"] = busy_builds()
        results["figures"] = summary({n: passed(t) for n, t in results["targets"].items()}, KEYS, GOALS)
        print(table(results["figures"]), file=sys.stderr)
        print(details(results), file=sys.stderr)
        print(json.dumps(results, indent=1))
    finally:
        stop_all(list(reversed(procs)))
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
