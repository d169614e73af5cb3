#!/usr/bin/env python3
"""`make bench`: the L4 and L7 comparisons with HAProxy, nginx and the bare C relay, plus the
splice threshold measurement; writes bench/RESULTS.md.

Needs Debian's haproxy, nginx, libnginx-mod-stream, wrk and gcc (it offers the apt-get line if they
are missing), and the comparison harness compare_lb.py (looked up in ../shared/tools, or given
with --compare). Every figure is a ratio within one run: the machine is shared and noisy.

usage: python bench/run.py [--runs 3] [--secs 5] [--layers l4,l7] [--compare PATH]
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


# Per layer: fastlb's target name, the anchors, and the protocol lb_from_env.py serves.
LAYERS = {
    "l4": ("fastlb-tcp", ["haproxy-tcp", "nginx-stream", "floor"], "tcp"),
    "l7": ("fastlb-http", ["haproxy-http", "nginx-http", "floor"], "http"),
}


def compare_run(compare: Path, secs: int, floor: Path, layer: str) -> dict[str, dict[str, Any]]:
    fastlb, anchors, protocol = LAYERS[layer]
    cmd = [
        sys.executable,
        str(compare),
        "--secs",
        str(secs),
        "--only",
        ",".join([*anchors, fastlb]),
        f"--fastlb-{protocol}",
        f"{sys.executable} {HERE / 'lb_from_env.py'} {protocol}",
        "--extra",
        f"floor={floor}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(out)["targets"]}


def ratio(ours: object, theirs: object) -> str:
    numbers = isinstance(ours, int | float) and isinstance(theirs, int | float)
    return f"{ours / theirs:.2f}" if numbers and theirs else "-"  # type: ignore[operator]


def layer_table(layer: str, runs: list[dict[str, dict[str, Any]]]) -> list[str]:
    fastlb, anchors, _ = LAYERS[layer]
    names = [fastlb, *anchors]
    lines = [
        f"## {layer.upper()}, per run: fastlb and its ratio to each anchor",
        "",
        "| run | figure | " + " | ".join(names) + " | " + " | ".join(f"/ {a}" for a in anchors) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names + anchors) + " |",
    ]
    for n, run in enumerate(runs, 1):
        for key, label in FIGURES:
            vals = [run[name].get(key) for name in names]
            ratios = [ratio(vals[0], v) for v in vals[1:]]
            cells = " | ".join(str(v) for v in vals) + " | " + " | ".join(ratios)
            lines.append(f"| {n} | {label} | {cells} |")
        for conns in ("c1", "c64"):
            lat = " | ".join(f"{run[name][conns]['p50_ms']}/{run[name][conns]['p99_ms']}" for name in names)
            lines.append(f"| {n} | latency p50/p99 ms at {conns} | {lat} |" + " |" * len(anchors))
    return [*lines, ""]


def micro_table() -> list[str]:
    """Runs bench/micro fully (pytest-benchmark) and returns its figures per operation."""
    out = Path(tempfile.mkdtemp()) / "micro.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            str(HERE / "micro"),
            f"--benchmark-json={out}",
            "--benchmark-min-rounds=10",
            "-p",
            "no:cacheprovider",
        ],
        check=True,
        capture_output=True,
    )
    data = json.loads(out.read_text())
    lines = [
        "## Micro benchmarks (bench/micro, pytest-benchmark)",
        "",
        "Median per operation. Hash lookups are called from Python (the call is included), the"
        " seed's ConsistentHash as the article wrote it (md5, 160 virtual nodes, a sorted scan"
        " per lookup); parsing and selection run their loop inside Rust.",
        "",
        "| benchmark | ns per operation | what |",
        "| --- | --- | --- |",
    ]
    for b in data["benchmarks"]:
        ops = b["extra_info"].get("ops_per_call", 1)
        lines.append(
            f"| {b['name']} | {b['stats']['median'] / ops * 1e9:.1f} | {b['extra_info'].get('note', '')} |"
        )
    (HERE / "MICRO.md").write_text("\n".join(lines) + "\n")
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--layers", default="l4,l7", help="comma-separated: l4, l7")
    ap.add_argument("--compare", type=Path, default=ROOT.parent / "shared" / "tools" / "compare_lb.py")
    ap.add_argument("--parts", default="compare,micro,slow", help="comma-separated: compare, micro, slow")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if "compare" not in parts:
        args.layers = ""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing and "compare" in parts:
        sys.exit(
            f"missing: {' '.join(missing)}; apt-get install -y haproxy nginx libnginx-mod-stream wrk gcc"
        )
    if "compare" in parts and not args.compare.exists():
        sys.exit(f"no comparison harness at {args.compare}; pass --compare PATH")
    floor = Path(tempfile.mkdtemp()) / "floor_relay"
    if "compare" in parts:
        subprocess.run(
            ["gcc", "-O2", "-o", str(floor), str(args.compare.parent / "floor_relay.c")], check=True
        )
    layers = [x for x in args.layers.split(",") if x]
    results: dict[str, list[dict[str, dict[str, Any]]]] = {layer: [] for layer in layers}
    for i in range(args.runs):
        for layer in layers:
            print(f"{layer} comparison run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            results[layer].append(compare_run(args.compare, args.secs, floor, layer))
    splice = ""
    if "compare" in parts:
        print("splice threshold ...", file=sys.stderr, flush=True)
        splice = subprocess.run(
            [sys.executable, str(HERE / "splice_threshold.py")], capture_output=True, text=True, check=True
        ).stdout
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` ({time.strftime('%Y-%m-%d')}) on {platform.node()}: {os.cpu_count()} CPUs,"
        f" {platform.machine()}, Linux {platform.release()}. Proxy pinned to CPU 0 with one worker; wrk and"
        " the nginx backend on CPU 1 (`compare_lb.py`). Ratios are within one run. `floor` is the bare C"
        " read/write relay (an L4 relay, shown at L7 too as the least any proxy can spend).",
        "",
    ]
    for layer in layers:
        lines += layer_table(layer, results[layer])
    if splice:
        lines += ["## Splice threshold (bench/splice_threshold.py)", "", splice]
    if "micro" in parts:
        print("micro benchmarks ...", file=sys.stderr, flush=True)
        lines += micro_table()
    if "slow" in parts:
        print("slow-backend scenario ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(HERE / "slow_backends.py")], check=True, capture_output=True)
        slow = (
            (HERE / "SLOW_BACKENDS.md")
            .read_text()
            .replace("# The slow-backend scenario", "## The slow-backend scenario")
        )
        lines += [slow]
    if parts >= {"compare", "micro", "slow"}:
        (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    else:  # a partial run leaves RESULTS.md as it is; MICRO.md / SLOW_BACKENDS.md are rewritten
        print("partial run: see bench/MICRO.md and bench/SLOW_BACKENDS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
