#!/usr/bin/env python3
"""fastlb, HAProxy and nginx terminating TLS on this machine, measured the same way for each.

One ECDSA P-256 certificate, made at run time in a temporary folder (removed at the end), serves
every TLS endpoint. Backend: one nginx (one worker) answering "ok" and a 256 MiB file at /big,
in plain HTTP on BACKEND and over TLS on BACKEND_TLS, keep-alive on both. Each target (haproxy,
nginx, fastlb) runs as one process group pinned to --proxy-cpus with one worker, serving two
listeners at once: an https one in front of the plain backend and an http one in front of the
TLS backend (re-encryption). All targets run from the start and each figure is measured for
every target in turn, so that what is compared was measured within a minute. The clients
(this script's own Python clients, wrk, curl, openssl) and the backend run on --client-cpus.

Figures, each the target's CPU time (utime + stime of all its processes, from /proc) over what
went through it:
- handshake_cpu_us: per full TLS 1.3 handshake with one request on the connection. The client is
  Python's ssl (OpenSSL 3.0) in --hs-procs processes, a new connection each time; it never offers
  a session, so nothing can be resumed, and every connection is checked: TLS 1.3, not resumed,
  our certificate (ECDSA P-256). `openssl s_client -brief` is run once per target and recorded
  (signature type, key exchange), and the target's own counters where it has them (fastlb:
  fastlb_tls_handshakes_total; HAProxy: `show info`). OpenSSL 3.0 spends ~2 ms of client CPU per
  handshake here, so the client, not the target, sets the rate (a few hundred a second).
- keepalive_cpu_us: per keep-alive HTTPS request, wrk -c64 (one thread).
- bulk_cpu_s_per_GB: a 256 MiB HTTPS download (curl --http1.1 -k), --bulk-times times in a row.
- idle_bytes_per_conn: RSS growth per idle TLS connection (--idle-conns connections that finished
  the handshake and sent nothing, opened by --hs-procs processes); the first and last of each
  process's share are then checked still open.
- reencrypt_cpu_us: per keep-alive request at c64 (wrk, plain http to the target) that the
  target sends over TLS to the backend, on connections it keeps alive.
The two wrk steps also give backend_conns_opened (from the backend's stub_status): 64 when the
target keeps every backend connection alive. Upstream keep-alive: HAProxy `http-reuse always`
(no idle cap), nginx `keepalive 64` (as compare.py), fastlb its default (32 idle per backend per
worker); `--fastlb-keepalive N` adds a target fastlb-keepalive-N, the same with `keepalive = N`.

For every figure the JSON gives each target's ratio to the better anchor (the lower of haproxy
and nginx), each fastlb target's ratio to the anchor the goal names, and whether the goal holds. Compare
figures of one run only. Progress and a table go to stderr; one JSON object to stdout.

`--perf DIR` records `perf record -g` of the fastlb process during each of its load steps and
writes `perf report --no-children` heads to DIR (the figures of such a run are perturbed).

usage: python bench/tls_compare.py [--secs 8] [--only haproxy,nginx,fastlb] [--figures ...]
       [--proxy-cpus 0] [--client-cpus 1] [--fastlb-keepalive N] [--perf DIR]
fastlb is started as `sys.executable -m fastlb serve`, so PYTHONPATH picks the build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compare import BIG, rss_bytes

from harness import cpu_seconds, process_tree, stop_all, wait_port, wrk

BACKEND = 19121
BACKEND_TLS = 19122
PORTS = {  # target: (https listener, http listener re-encrypting to BACKEND_TLS)
    "haproxy": (18270, 18271),
    "nginx": (18272, 18273),
    "fastlb": (18290, 18291),
}
ADMIN = {"fastlb": 18299}  # fastlb targets: their admin API, for the handshake counters
ANCHORS = ("haproxy", "nginx")
FIGURES = ("handshake", "keepalive", "reencrypt", "bulk", "idle")
KEYS = {
    "handshake": "handshake_cpu_us",
    "keepalive": "keepalive_cpu_us",
    "bulk": "bulk_cpu_s_per_GB",
    "idle": "idle_bytes_per_conn",
    "reencrypt": "reencrypt_cpu_us",
}
# The goals: fastlb's figure at most `bound` x the anchor named ("best": the better one).
GOALS = {
    "handshake": ("best", 0.6),
    "keepalive": ("nginx", 0.85),
    "bulk": ("haproxy", 0.7),
    "idle": ("best", 0.5),
    "reencrypt": ("haproxy", 0.8),
}
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def make_cert(d: Path) -> bytes:
    """An ECDSA P-256 self-signed certificate for localhost; returns its DER."""
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-keyout", str(d / "site.key"), "-out", str(d / "site.pem"), "-days", "7"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    (d / "site.combined.pem").write_bytes((d / "site.pem").read_bytes() + (d / "site.key").read_bytes())
    for f in ("site.key", "site.pem", "site.combined.pem"):
        (d / f).chmod(0o644)  # nginx's backend workers run as nobody; the folder is temporary
    return ssl.PEM_cert_to_DER_cert((d / "site.pem").read_text())


def backend_conf(d: Path) -> Path:
    """compare.py's backend (return 'ok', /big by sendfile), plain and over TLS, and
    /stub_status (connections accepted: how many a target opened to it)."""
    locations = f"location / {{ return 200 'ok\\n'; }} location /big {{ alias {d}/big; }}"
    conf = d / "backend.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {d}/backend.pid; error_log {d}/backend.err;"
        " events { worker_connections 4096; } http { sendfile on; access_log off;"
        f" server {{ listen 127.0.0.1:{BACKEND} reuseport; keepalive_requests 1000000; {locations}"
        " location = /stub_status { stub_status; } }"
        f" server {{ listen 127.0.0.1:{BACKEND_TLS} ssl reuseport; keepalive_requests 1000000;"
        f" ssl_certificate {d}/site.pem; ssl_certificate_key {d}/site.key; ssl_protocols TLSv1.2 TLSv1.3;"
        f" {locations} }} }}"
    )
    return conf


def haproxy_conf(d: Path) -> Path:
    https, reenc = PORTS["haproxy"]
    conf = d / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread 1
    maxconn 9000
    stats socket {d}/haproxy.sock
defaults
    timeout connect 5s
    timeout client 50s
    timeout server 50s
frontend fs
    mode http
    bind 127.0.0.1:{https} ssl crt {d}/site.combined.pem
    option http-keep-alive
    default_backend plain
backend plain
    mode http
    http-reuse always
    server s 127.0.0.1:{BACKEND}
frontend fr
    mode http
    bind 127.0.0.1:{reenc}
    option http-keep-alive
    default_backend tls
backend tls
    mode http
    http-reuse always
    server s 127.0.0.1:{BACKEND_TLS} ssl verify none
"""
    )
    return conf


def nginx_conf(d: Path) -> Path:
    https, reenc = PORTS["nginx"]
    keep = 'proxy_http_version 1.1; proxy_set_header Connection "";'
    conf = d / "nginxlb.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {d}/lb.pid; error_log {d}/lb.err;"
        " events { worker_connections 20000; }"
        " http { access_log off;"
        f" upstream plain {{ server 127.0.0.1:{BACKEND}; keepalive 64; }}"
        f" upstream tls {{ server 127.0.0.1:{BACKEND_TLS}; keepalive 64; }}"
        f" server {{ listen 127.0.0.1:{https} ssl; keepalive_requests 1000000;"
        f" ssl_certificate {d}/site.pem; ssl_certificate_key {d}/site.key; ssl_protocols TLSv1.2 TLSv1.3;"
        f" location / {{ proxy_pass http://plain; {keep} }} }}"
        f" server {{ listen 127.0.0.1:{reenc}; keepalive_requests 1000000;"
        f" location / {{ proxy_pass https://tls; {keep} proxy_ssl_session_reuse on; }} }} }}"
    )
    return conf


def fastlb_conf(d: Path, name: str, proxy_cpus: str, keepalive: int | None) -> Path:
    """keepalive: the pools' idle connections kept per backend; None: fastlb's default (32).
    header_read is 60 s, as nginx's client_header_timeout (HAProxy: timeout client 50s), so that
    the idle connections stay open while they are counted."""
    https, reenc = PORTS[name]
    cpus = ", ".join(proxy_cpus.split(","))
    keep = "" if keepalive is None else f"keepalive = {keepalive}\n"
    conf = d / f"{name}.toml"
    conf.write_text(
        f"""[runtime]
workers = 1
cpu_affinity = [{cpus}]
max_connections = 100000

[admin]
bind = "127.0.0.1:{ADMIN[name]}"

[[listeners]]
name = "web"
bind = "127.0.0.1:{https}"
protocol = "https"
pool = "app"
timeouts = {{ header_read = "60s" }}
  [listeners.tls]
  certificates = [{{ cert = "site.pem", key = "site.key" }}]

[[listeners]]
name = "reencrypt"
bind = "127.0.0.1:{reenc}"
protocol = "http"
pool = "tlsapp"

[[pools]]
name = "app"
backends = [{{ address = "127.0.0.1:{BACKEND}" }}]
health = {{ type = "none" }}
{keep}
[[pools]]
name = "tlsapp"
backends = [{{ address = "127.0.0.1:{BACKEND_TLS}" }}]
health = {{ type = "none" }}
{keep}  [pools.tls]
  verify = false
"""
    )
    return conf


def backend_accepts() -> int:
    """Connections the backend has accepted so far, counting the one this asks on."""
    url = f"http://127.0.0.1:{BACKEND}/stub_status"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return int(text.splitlines()[2].split()[0])


def client_context() -> ssl.SSLContext:
    """OpenSSL's defaults for a client, without verification (the CertificateVerify signature
    is still checked), and no session is ever offered: each handshake is a full one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _handshake_loop(port: int, secs: float, cert: bytes, out: Any) -> None:
    """One client process: new connection, full handshake, one request, read to EOF; repeat."""
    ctx = client_context()
    done = 0
    seen: Counter[str] = Counter()
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as s,
            ):
                seen[s.version() or "none"] += 1
                seen[f"cipher {(s.cipher() or ('none',))[0]}"] += 1
                if s.session_reused:
                    seen["resumed"] += 1
                if s.getpeercert(binary_form=True) != cert:
                    seen["other certificate"] += 1
                s.sendall(REQUEST)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if not data.startswith(b"HTTP/1.1 200") or not data.endswith(b"ok\n"):
                seen["bad response"] += 1
                continue
            done += 1
        except (OSError, ValueError) as e:
            seen[f"error {type(e).__name__}: {e}"] += 1
    out.put((done, dict(seen)))


def handshakes(port: int, pids: list[int], secs: float, procs: int, cert: bytes) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    c0 = cpu_seconds(pids)
    workers = [ctx.Process(target=_handshake_loop, args=(port, secs, cert, q)) for _ in range(procs)]
    for w in workers:
        w.start()
    parts = [q.get(timeout=secs + 60) for _ in workers]
    for w in workers:
        w.join()
    c1 = cpu_seconds(pids)
    done = sum(n for n, _ in parts)
    seen: Counter[str] = Counter()
    for _, s in parts:
        seen.update(s)
    assert seen.get("TLSv1.3", 0) == sum(v for k, v in seen.items() if k.startswith("TLS")), seen
    assert not seen.get("resumed") and not seen.get("other certificate"), seen
    return {
        "handshakes": done,
        "per_s": round(done / secs),
        "client_saw": dict(seen),
        "handshake_cpu_us": round((c1 - c0) / max(done, 1) * 1e6, 1),
    }


def s_client_probe(port: int) -> dict[str, str]:
    """What `openssl s_client -brief` says of one handshake (version, signature, key exchange)."""
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-brief"],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
    )
    keep = ("Protocol version", "Ciphersuite", "Signature type", "Peer signature type", "Hash used")
    keep_too = ("Server Temp Key", "Peer Temp Key")
    out = {}
    for line in (r.stdout + r.stderr).splitlines():
        k, _, v = line.partition(": ")
        if k.strip() in keep or k.strip() in keep_too:
            out[k.strip()] = v.strip()
    return out


def server_handshake_counts(target: str, d: Path) -> dict[str, Any]:
    """The target's own view of its handshakes, where it has one (read outside CPU windows)."""
    try:
        if target.startswith("fastlb"):
            url = f"http://127.0.0.1:{ADMIN[target]}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            found = re.findall(r"^fastlb_tls_handshakes_total\{([^}]*)\} (\S+)", text, re.M)
            return {labels: float(v) for labels, v in found if float(v)}
        if target == "haproxy":
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(d / "haproxy.sock"))
                s.sendall(b"show info\n")
                text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
            want = ("CumSslConns", "SslFrontendSessionReuse_pct", "SslCacheLookups", "SslCacheMisses")
            return {k: v for k, _, v in (x.partition(": ") for x in text.splitlines()) if k in want}
    except OSError as e:
        return {"error": str(e)}
    return {}


def _idle_holder(port: int, n: int, out: Any, measured: Any) -> None:
    """One client process: opens `n` TLS connections and sends nothing until `measured` is set;
    then checks that its first and last are still open (a request on each) and closes all."""
    ctx = client_context()
    socks: list[ssl.SSLSocket] = []
    try:
        for _ in range(n):
            raw = socket.create_connection(("127.0.0.1", port))
            socks.append(ctx.wrap_socket(raw, server_hostname="localhost"))
        out.put(("open", n))
        measured.wait(120)
        alive = 0
        for s in (socks[0], socks[-1]):
            with contextlib.suppress(OSError):
                s.settimeout(5)
                s.sendall(REQUEST)
                alive += s.recv(65536).startswith(b"HTTP/1.1 200")
        out.put(("alive", alive))
    except OSError as e:
        out.put(("error", repr(e)))
    finally:
        for s in socks:
            s.close()


def idle(port: int, pids: list[int], n: int, procs: int) -> dict[str, Any]:
    """RSS growth per TLS connection that finished its handshake and sent nothing, opened by
    `procs` client processes at once."""
    ctx = multiprocessing.get_context("fork")
    q, measured = ctx.Queue(), ctx.Event()
    shares = [n // procs + (i < n % procs) for i in range(procs)]
    before = rss_bytes(pids)
    t0 = time.monotonic()
    holders = [ctx.Process(target=_idle_holder, args=(port, k, q, measured)) for k in shares]
    for h in holders:
        h.start()
    try:
        opened = [q.get(timeout=120) for _ in holders]
        assert all(kind == "open" for kind, _ in opened), opened
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
        "first_and_last_alive": all(kind == "alive" and v == 2 for kind, v in alive),
        "idle_bytes_per_conn": round((after - before) / n),
    }


def bulk(port: int, pids: list[int], times: int) -> dict[str, Any]:
    """The 256 MiB file downloaded `times` times in a row (one figure over them all)."""
    c0, t0 = cpu_seconds(pids), time.monotonic()
    for _ in range(times):
        out = subprocess.run(
            [
                *("curl", "--http1.1", "-k", "-s", "-o", "/dev/null", "-w", "%{size_download}"),
                f"https://127.0.0.1:{port}/big",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert int(out) == BIG, out
    took = time.monotonic() - t0
    return {
        "downloads": times,
        "bulk_MBps": round(times * BIG / took / 1e6, 1),
        "bulk_cpu_s_per_GB": round((cpu_seconds(pids) - c0) / (times * BIG / 1e9), 3),
    }


def per_request(port: int, pids: list[int], secs: int, cpus: str, scheme: str, key: str) -> dict[str, Any]:
    a0 = backend_accepts()
    c0 = cpu_seconds(pids)
    r = wrk(port, 64, secs, cpu=cpus, scheme=scheme)
    r[key] = round((cpu_seconds(pids) - c0) / max(r["requests"], 1) * 1e6, 2)
    r["backend_conns_opened"] = backend_accepts() - a0 - 1  # less the ask itself
    assert r["non2xx"] == 0, r
    return r


@contextlib.contextmanager
def profiled(perf_dir: Path | None, name: str, pid: int, call_graph: str = "fp") -> Iterator[None]:
    """perf record on `pid` (stacks by `call_graph`: fp, dwarf) while the block runs; the
    report's head goes to perf_dir."""
    if perf_dir is None:
        yield
        return
    data = perf_dir / f"{name}.data"
    rec = subprocess.Popen(
        ["perf", "record", "--call-graph", call_graph, "-p", str(pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait(30)
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--stdio"],
            capture_output=True,
            text=True,
        ).stdout
        (perf_dir / f"{name}.txt").write_text("\n".join(report.splitlines()[:60]) + "\n")


def measure(
    fig: str, name: str, pids: list[int], args: argparse.Namespace, cert: bytes, d: Path
) -> dict[str, Any]:
    """One figure of one target."""
    https, reenc = PORTS[name]
    perf_dir = Path(args.perf) / name if args.perf and name.startswith("fastlb") else None
    if perf_dir:
        perf_dir.mkdir(parents=True, exist_ok=True)
    main = pids[-1] if name == "nginx" else pids[0]  # nginx: the worker; else the process itself
    cpus = args.client_cpus
    with profiled(perf_dir if fig != "idle" else None, fig, main, args.perf_call_graph):
        if fig == "handshake":
            res = handshakes(https, pids, args.secs, args.hs_procs, cert)
        elif fig == "keepalive":
            res = per_request(https, pids, args.secs, cpus, "https", KEYS[fig])
        elif fig == "reencrypt":
            res = per_request(reenc, pids, args.secs, cpus, "http", KEYS[fig])
        elif fig == "bulk":
            res = bulk(https, pids, args.bulk_times)
        else:
            res = idle(https, pids, args.idle_conns, args.hs_procs)
    if fig == "handshake":
        res["server_counters"] = server_handshake_counts(name, d)
    return res


def summary(
    targets: dict[str, dict[str, Any]],
    keys: dict[str, str] = KEYS,
    goals: dict[str, tuple[str, float]] = GOALS,
) -> dict[str, Any]:
    """Per figure: each target's value, its ratio to the better anchor, and, for each fastlb
    target, its ratio to the anchor the goal names and whether the goal holds (`keys`: figure ->
    its key in a target's result; `goals`: figure -> the anchor named, or "best", and the bound;
    h2_compare.py passes its own)."""
    out: dict[str, Any] = {}
    for fig, key in keys.items():
        vals = {t: r[fig][key] for t, r in targets.items() if fig in r}
        if not vals:
            continue
        entry: dict[str, Any] = {"values": vals}
        anchors = {a: vals[a] for a in ANCHORS if a in vals}
        if anchors:
            best = min(anchors, key=lambda a: anchors[a])
            entry["better_anchor"] = best
            entry["ratio_to_better_anchor"] = {t: round(v / anchors[best], 3) for t, v in vals.items()}
            named, bound = goals[fig]
            ref = best if named == "best" else named
            ours = {t: v for t, v in vals.items() if t.startswith("fastlb")}
            if ours and ref in anchors:
                entry["goal"] = f"<= {bound} x {'better anchor' if named == 'best' else named}"
                entry["to_goal_anchor"] = {t: round(v / anchors[ref], 3) for t, v in ours.items()}
                entry["goal_met"] = {t: r <= bound for t, r in entry["to_goal_anchor"].items()}
        out[key] = entry
    return out


def table(figs: dict[str, Any]) -> str:
    """The figures as a markdown table: values, then each fastlb target's ratio to the goal's
    anchor with whether it holds."""
    names = list(dict.fromkeys(t for f in figs.values() for t in f["values"]))
    ours = [t for t in names if t.startswith("fastlb")]
    header = ["figure", *names, "goal", *(f"{t} ratio" for t in ours)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " --- |" * (len(header) - 1)]
    for key, f in figs.items():
        cells = [str(f["values"].get(t, "-")) for t in names]
        ratios = [
            f"{f['to_goal_anchor'][t]} ({'met' if f['goal_met'][t] else 'missed'})"
            if t in f.get("to_goal_anchor", {})
            else "-"
            for t in ours
        ]
        lines.append(f"| {key} | " + " | ".join([*cells, f.get("goal", "-"), *ratios]) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]

    return {
        "haproxy": first(["haproxy", "-v"]),
        "nginx": first(["nginx", "-v"]),
        "openssl": first(["openssl", "version"]),
        "wrk": first(["wrk", "-v"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=8, help="each load step (handshakes, wrk)")
    ap.add_argument("--only", default="", help="comma-separated targets: haproxy,nginx,fastlb")
    ap.add_argument("--figures", default=",".join(FIGURES))
    ap.add_argument("--hs-procs", type=int, default=4, help="handshake client processes")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--bulk-times", type=int, default=3, help="downloads of the 256 MiB file")
    ap.add_argument("--proxy-cpus", default="0")
    ap.add_argument("--client-cpus", default="1", help="clients and the backend")
    ap.add_argument(
        "--fastlb-keepalive",
        type=int,
        default=None,
        help="also measure fastlb with this pools' keepalive (its default is 32), as fastlb-keepalive-N",
    )
    ap.add_argument("--perf", default="", help="folder for perf profiles of fastlb's load steps")
    ap.add_argument("--perf-call-graph", default="fp", help="perf record --call-graph: fp or dwarf")
    args = ap.parse_args()
    variant = f"fastlb-keepalive-{args.fastlb_keepalive}"
    if args.fastlb_keepalive is not None:
        PORTS[variant] = (18292, 18293)
        ADMIN[variant] = 18298
    only = [t for t in PORTS if not args.only or t in args.only.split(",")]
    figures = set(args.figures.split(","))
    if args.perf:
        Path(args.perf).mkdir(parents=True, exist_ok=True)
    for port in {BACKEND, BACKEND_TLS, *ADMIN.values(), *(p for t in only for p in PORTS[t])}:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                sys.exit(f"port {port} is in use: is another benchmark running?")
    # This script's own clients run where wrk does; the targets are pinned apart by taskset.
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    d = Path(tempfile.mkdtemp(prefix="fastlb-tlsbench-"))
    d.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cert = make_cert(d)
        with (d / "big").open("wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(BIG >> 20):
                f.write(block)
        (d / "big").chmod(0o644)
        procs.append(
            subprocess.Popen(["taskset", "-c", args.client_cpus, "nginx", "-c", str(backend_conf(d))])
        )
        wait_port(BACKEND)
        wait_port(BACKEND_TLS)
        fastlb = [sys.executable, "-m", "fastlb", "serve", "-c"]
        commands = {
            "haproxy": ["haproxy", "-f", str(haproxy_conf(d))],
            "nginx": ["nginx", "-c", str(nginx_conf(d))],
            "fastlb": [*fastlb, str(fastlb_conf(d, "fastlb", args.proxy_cpus, None))],
        }
        if args.fastlb_keepalive is not None:
            conf = fastlb_conf(d, variant, args.proxy_cpus, args.fastlb_keepalive)
            commands[variant] = [*fastlb, str(conf)]
        results: dict[str, Any] = {
            "machine": {"nproc": os.cpu_count()},
            "versions": versions(),
            "secs": args.secs,
            "perturbed_by_perf": bool(args.perf),
            "targets": {name: {"name": name} for name in only},
        }
        # Every target runs from the start (idle, each costs next to nothing), and each figure is
        # measured for all targets one after the other: on a noisy machine the figures compared
        # are then taken within a minute of each other.
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
            results["targets"][name]["s_client"] = s_client_probe(PORTS[name][0])
        for fig in [f for f in FIGURES if f in figures]:
            for name in only:
                print(f"  {fig} {name} ...", file=sys.stderr, flush=True)
                res = measure(fig, name, pids[name], args, cert, d)
                results["targets"][name][fig] = res
                print(f"    {KEYS[fig]} {res[KEYS[fig]]}", file=sys.stderr, flush=True)
        results["figures"] = summary(results["targets"])
        print(table(results["figures"]), file=sys.stderr)
        print(json.dumps(results, indent=1))
    finally:
        stop_all(procs)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
