#!/usr/bin/env python3
"""Where does splice(2) start to cost less CPU than read/write? (sets l4::forward::SPLICE_THRESHOLD)

For each response size, fastlb (one worker, CPU 0) relays keep-alive HTTP responses from an nginx
backend (CPU 1) to wrk (CPU 1), once per relay mode, and the proxy's CPU per response is compared:
  copy     FASTLB_SPLICE_THRESHOLD=1MiB: read/write through a 1 MiB scratch buffer, never splice
  splice   FASTLB_SPLICE_THRESHOLD=1KiB: a 1 KiB read, then splice for the rest
  default  the compiled-in threshold
Needs nginx and wrk (Debian packages). Prints a Markdown table.

usage: python bench/splice_threshold.py [--secs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import cpu_seconds, process_tree, wait_port, wrk

SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
MODES = {"copy": str(1 << 20), "splice": "1024", "default": ""}
BACKEND_PORT, PROXY_PORT = 19201, 19202


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fastlb-splice-"))
    os.chmod(root, 0o755)
    for size in SIZES:
        (root / f"s{size}").write_bytes(os.urandom(size))
        os.chmod(root / f"s{size}", 0o644)
    (root / "nginx.conf").write_text(
        f"daemon off; worker_processes 1; pid {root}/nginx.pid; error_log {root}/nginx.err;"
        " events { worker_connections 1024; } http { access_log off; sendfile on;"
        f" server {{ listen 127.0.0.1:{BACKEND_PORT}; keepalive_requests 1000000; root {root}; }} }}"
    )
    backend = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", str(root / "nginx.conf")])
    rows: dict[int, dict[str, float]] = {size: {} for size in SIZES}
    try:
        wait_port(BACKEND_PORT)
        for mode, threshold in MODES.items():
            env = dict(os.environ, PORT=str(PROXY_PORT), BACKENDS=f"127.0.0.1:{BACKEND_PORT}")
            if threshold:
                env["FASTLB_SPLICE_THRESHOLD"] = threshold
            proxy = subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, str(Path(__file__).parent / "lb_from_env.py"), "tcp"],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_port(PROXY_PORT)
                time.sleep(0.3)
                pids = process_tree(proxy.pid)
                for size in SIZES:
                    c0 = cpu_seconds(pids)
                    res = wrk(PROXY_PORT, 8, args.secs, f"/s{size}")
                    rows[size][mode] = (cpu_seconds(pids) - c0) / max(res["requests"], 1) * 1e6
                    print(f"{mode:8} {size:>8} B: {rows[size][mode]:.1f} us/response", file=sys.stderr)
            finally:
                proxy.send_signal(signal.SIGTERM)
                proxy.wait(10)
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    print("| response size | copy (read/write) us | splice us | default us | splice / copy |")
    print("| --- | --- | --- | --- | --- |")
    for size, r in rows.items():
        print(
            f"| {size // 1024} KiB | {r['copy']:.1f} | {r['splice']:.1f} | {r['default']:.1f}"
            f" | {r['splice'] / r['copy']:.2f} |"
        )


if __name__ == "__main__":
    main()
