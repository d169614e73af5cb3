"""Compression against nginx's gzip: CPU per MB of input and the ratio, at the same level.

Both proxies sit in front of the same static backend (an nginx serving a file, no gzip, its CPU
not counted) and get the same load: wrk, one connection at a time per thread, each request
asking `Accept-Encoding: gzip` for the same text file (this repository's own source, about
1 MB: real text, not a repeated line). The figure is the proxy process's CPU time
(user + system, from /proc) over the run, divided by the MB of body it compressed; the ratio
is compressed bytes over original. Quoted as fastlb/nginx within one run (the machine is
shared and noisy).

    python3 bench/compress_compare.py --fastlb .venv/bin/fastlb [--level 6] [--seconds 5]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import cpu_seconds, process_tree, stop_all, wait_port, wrk

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def corpus(folder: Path) -> bytes:
    """About 1 MB of this repository's source text."""
    text = b""
    for path in sorted([*ROOT.glob("native/src/**/*.rs"), *ROOT.glob("python/fastlb/*.py")]):
        text += path.read_bytes()
        if len(text) >= 1 << 20:
            break
    (folder / "data.html").write_bytes(text[: 1 << 20])
    return text[: 1 << 20]


def nginx(nginx_bin: str, folder: Path, name: str, server: str) -> subprocess.Popen[bytes]:
    conf = folder / f"{name}.conf"
    tmp = folder / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    conf.write_text(
        f"worker_processes 1;\npid {folder}/{name}.pid;\nerror_log {folder}/{name}-error.log;\n"
        "events { worker_connections 1024; }\nhttp {\n  access_log off;\n"
        f"  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n"
        f"  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  default_type text/html;\n{server}\n}}\n"
    )
    return subprocess.Popen(
        [nginx_bin, "-c", str(conf), "-p", str(folder), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def compressed_size(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/data.html", headers={"Accept-Encoding": "gzip"})
    r = conn.getresponse()
    body = r.read()
    assert r.getheader("content-encoding") == "gzip", r.getheaders()
    assert len(gzip.decompress(body)) == 1 << 20
    conn.close()
    return len(body)


def measure(port: int, pids: list[int], seconds: int) -> dict[str, float]:
    size = compressed_size(port)
    before = cpu_seconds(pids)
    # unpinned, two threads and two connections: the proxies are what is measured
    requests = wrk(port, 2, seconds, "/data.html", cpu="0,1", headers={"Accept-Encoding": "gzip"})["requests"]
    cpu = cpu_seconds(pids) - before
    mb = requests * (1 << 20) / 1e6
    return {"requests": requests, "cpu_ms_per_mb": 1000 * cpu / mb, "ratio": size / (1 << 20)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fastlb", default=str(ROOT / ".venv" / "bin" / "fastlb"))
    parser.add_argument("--level", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    nginx_bin = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not nginx_bin or not shutil.which("wrk"):
        print("needs nginx and wrk (apt-get install nginx wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # nginx's workers run as another user and must read the file
        corpus(folder)
        origin, front, lb = free_port(), free_port(), free_port()
        procs = [
            nginx(nginx_bin, folder, "origin", f"  server {{ listen 127.0.0.1:{origin}; root {folder}; }}"),
            nginx(
                nginx_bin,
                folder,
                "front",
                f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 16; }}\n"
                f"  server {{ listen 127.0.0.1:{front};\n    gzip on; gzip_comp_level {args.level};"
                " gzip_types text/html; gzip_proxied any; gzip_min_length 1024;\n"
                "    location / { proxy_pass http://origin; proxy_http_version 1.1;"
                ' proxy_set_header Connection ""; }\n  }',
            ),
        ]
        config = folder / "fastlb.toml"
        config.write_text(
            '[runtime]\nworkers = 1\ncpu_affinity = "off"\n[admin]\nbind = "off"\n'
            f'[[listeners]]\nname = "web"\nbind = "127.0.0.1:{lb}"\nprotocol = "http"\npool = "origin"\n'
            f'compression = {{ algorithms = ["gzip"], levels = {{ gzip = {args.level} }} }}\n'
            f'[[pools]]\nname = "origin"\nbackends = [{{ address = "127.0.0.1:{origin}" }}]\n'
            'health = { type = "none" }\n'
        )
        fastlb = subprocess.Popen([args.fastlb, "serve", "-c", str(config)], stderr=subprocess.DEVNULL)
        procs.append(fastlb)
        try:
            for port in (origin, front, lb):
                wait_port(port)
            time.sleep(0.5)
            results = {
                "nginx": measure(front, process_tree(procs[1].pid), args.seconds),
                "fastlb": measure(lb, [fastlb.pid], args.seconds),
            }
        finally:
            stop_all(procs)
    for name, r in results.items():
        print(
            f"{name:7s} gzip level {args.level}: {r['requests']:5d} requests, "
            f"{r['cpu_ms_per_mb']:6.2f} ms CPU per MB of input, ratio {r['ratio']:.4f}"
        )
    cpu = results["fastlb"]["cpu_ms_per_mb"] / results["nginx"]["cpu_ms_per_mb"]
    ratio = results["fastlb"]["ratio"] / results["nginx"]["ratio"]
    print(f"fastlb/nginx: CPU per MB {cpu:.2f}x, compressed size {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
