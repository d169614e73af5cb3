#!/usr/bin/env python3
"""`make bench`: the L4 comparison with HAProxy, nginx and the bare C relay, plus the splice
threshold measurement; writes bench/RESULTS.md.

Needs Debian's haproxy, nginx, libnginx-mod-stream, wrk and gcc (it offers the apt-get line if they
are missing), and the comparison harness compare_lb.py (looked up in ../shared/tools, or given
with --compare). Every figure is a ratio within one run: the machine is shared and noisy.

usage: python bench/run.py [--runs 3] [--secs 5] [--compare PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOOLS = ["haproxy", "nginx", "wrk", "gcc", "taskset"]
FIGURES = [
    ("cpu_us_per_req", "CPU us per keep-alive request (c64)"),
    ("cpu_us_per_conn", "CPU us per new connection"),
    ("bulk_cpu_s_per_GB", "bulk CPU s per GB"),
    ("bytes_per_idle_conn", "RSS bytes per idle connection"),
]


def compare_run(compare: Path, secs: int, floor: Path) -> dict[str, dict[str, Any]]:
    cmd = [
        sys.executable,
        str(compare),
        "--secs",
        str(secs),
        "--only",
        "haproxy-tcp,nginx-stream,fastlb-tcp,floor",
        "--fastlb-tcp",
        f"{sys.executable} {HERE / 'lb_from_env.py'} tcp",
        "--extra",
        f"floor={floor}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(out)["targets"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--compare", type=Path, default=ROOT.parent / "shared" / "tools" / "compare_lb.py")
    args = ap.parse_args()
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        sys.exit(
            f"missing: {' '.join(missing)}; apt-get install -y haproxy nginx libnginx-mod-stream wrk gcc"
        )
    if not args.compare.exists():
        sys.exit(f"no comparison harness at {args.compare}; pass --compare PATH")
    floor = Path(tempfile.mkdtemp()) / "floor_relay"
    subprocess.run(["gcc", "-O2", "-o", str(floor), str(args.compare.parent / "floor_relay.c")], check=True)
    runs = []
    for i in range(args.runs):
        print(f"comparison run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
        runs.append(compare_run(args.compare, args.secs, floor))
    print("splice threshold ...", file=sys.stderr, flush=True)
    splice = subprocess.run(
        [sys.executable, str(HERE / "splice_threshold.py")], capture_output=True, text=True, check=True
    ).stdout
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` ({time.strftime('%Y-%m-%d')}) on {platform.node()}: {os.cpu_count()} CPUs,"
        f" {platform.machine()}, Linux {platform.release()}. Proxy pinned to CPU 0 with one worker; wrk and"
        " the nginx backend on CPU 1 (`compare_lb.py`). Ratios are within one run.",
        "",
        "## L4, per run: fastlb and its ratio to each anchor",
        "",
        "| run | figure | fastlb | haproxy-tcp | nginx-stream | floor | / haproxy | / nginx | / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, run in enumerate(runs, 1):
        for key, label in FIGURES:
            vals = [run[name].get(key) for name in ("fastlb-tcp", "haproxy-tcp", "nginx-stream", "floor")]
            ratios = [f"{vals[0] / v:.2f}" if v else "-" for v in vals[1:]]
            lines.append(
                f"| {n} | {label} | " + " | ".join(str(v) for v in vals) + " | " + " | ".join(ratios) + " |"
            )
        lat = " / ".join(
            f"{name} {run[name]['c1']['p50_ms']}/{run[name]['c1']['p99_ms']}"
            for name in ("fastlb-tcp", "haproxy-tcp", "nginx-stream", "floor")
        )
        lines.append(f"| {n} | latency p50/p99 ms at c=1 | {lat} | | | | | | |")
    lines += ["", "## Splice threshold (bench/splice_threshold.py)", "", splice]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
