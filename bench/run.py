#!/usr/bin/env python3
"""`make bench`: the L4 and L7 comparisons with HAProxy and nginx (bench/compare.py), the
splice threshold, the micro benchmarks, the slow-backend scenario, the admin API's latency
under load (bench/admin_latency.py), TLS termination beside HAProxy and nginx
(bench/tls_compare.py, two runs), UDP DNS beside nginx stream and dnsdist
(bench/udp_compare.py, two runs) and HTTP/2 and gRPC beside HAProxy and nginx
(bench/h2_compare.py, two runs); writes bench/RESULTS.md and the charts bench/results.png,
bench/tls.png, bench/udp.png and bench/h2.png.

Needs Debian's haproxy, nginx, libnginx-mod-stream, wrk and curl, dnsperf and dnsdist for
the udp part and nghttp2-client (h2load) for the h2 part (`make bench` installs them with
apt-get when it can). A bare C relay is shown as the floor when its source is found
(--floor-source, and gcc). Every figure is a ratio within one run: the machine is shared and
noisy. Pinning: the proxies on --proxy-cpus, wrk and the backend on --client-cpus.

usage: python bench/run.py [--runs 3] [--secs 5] [--layers l4,l7]
                           [--parts compare,micro,slow,admin,tls,udp,h2] [--proxy-cpus 0] [--client-cpus 1]
                           [--fastlb PATH (the udp and h2 parts' fastlb)]
`--parts udp` alone rewrites UDP.md, udp_results.json, udp.png and the UDP section of RESULTS.md;
`--parts h2` alone H2.md, h2_results.json, h2.png and the HTTP/2 section of RESULTS.md.
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
TOOLS = ["haproxy", "nginx", "wrk", "curl", "taskset"]
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


def compare_run(secs: int, floor: Path | None, layer: str, pinning: list[str]) -> dict[str, dict[str, Any]]:
    """One bench/compare.py run over this layer's anchors and fastlb."""
    fastlb, anchors, _ = LAYERS[layer]
    names = [a for a in anchors if a != "floor" or floor is not None]
    cmd = [
        sys.executable,
        str(HERE / "compare.py"),
        "--secs",
        str(secs),
        "--only",
        ",".join([*names, fastlb]),
        *pinning,
    ]
    if floor is not None:
        cmd += ["--extra", f"floor={floor}"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(out)["targets"]}


def ratio(ours: object, theirs: object) -> str:
    numbers = isinstance(ours, int | float) and isinstance(theirs, int | float)
    return f"{ours / theirs:.2f}" if numbers and theirs else "-"  # type: ignore[operator]


def layer_table(layer: str, runs: list[dict[str, dict[str, Any]]]) -> list[str]:
    fastlb, anchors, _ = LAYERS[layer]
    anchors = [a for a in anchors if all(a in run for run in runs)]
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


CHART_FIGURES = [
    ("cpu_us_per_req", "CPU / keep-alive req"),
    ("cpu_us_per_conn", "CPU / new conn"),
    ("bulk_cpu_s_per_GB", "CPU / GB bulk"),
    ("bytes_per_idle_conn", "RSS / idle conn"),
    ("c1.p50_ms", "p50 @1 conn"),
    ("c1.p99_ms", "p99 @1 conn"),
    ("c64.p50_ms", "p50 @64 conns"),
    ("c64.p99_ms", "p99 @64 conns"),
]


def figure(target: dict[str, Any], key: str) -> float | None:
    value: Any = target
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def chart(results: dict[str, list[dict[str, dict[str, Any]]]], path: Path) -> None:
    """fastlb / anchor per figure (median over runs), one panel per layer; below 1 is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [layer for layer, runs in results.items() if runs]
    fig, axes = plt.subplots(len(layers), 1, figsize=(11, 3.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        fastlb, anchors, _ = LAYERS[layer]
        runs = results[layer]
        anchors = [a for a in anchors if all(a in run for run in runs)]
        width = 0.8 / max(1, len(anchors))
        for j, anchor in enumerate(anchors):
            ratios = []
            for key, _ in CHART_FIGURES:
                if anchor == "floor" and key == "bytes_per_idle_conn":
                    ratios.append(0.0)  # the bare relay keeps no per-connection state to compare
                    continue
                per_run = [
                    ours / theirs
                    for run in runs
                    if (ours := figure(run[fastlb], key)) is not None and (theirs := figure(run[anchor], key))
                ]
                ratios.append(sorted(per_run)[len(per_run) // 2] if per_run else 0.0)
            xs = [i + (j - (len(anchors) - 1) / 2) * width for i in range(len(CHART_FIGURES))]
            bars = ax.bar(xs, ratios, width, label=f"fastlb / {anchor}")
            ax.bar_label(bars, labels=[f"{r:.2f}" if r else "" for r in ratios], fontsize=6, padding=1)
        ax.set_ylim(0, 2.0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(CHART_FIGURES)), [label for _, label in CHART_FIGURES], fontsize=8)
        ax.set_ylabel("ratio (lower is better)")
        ax.set_title(f"{layer.upper()}: {fastlb} against the anchors, median of {len(runs)} runs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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


def goal_chart(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """fastlb's ratio to the anchor each goal names, per figure and run, with the goal (the
    figures of tls_compare.summary: TLS and HTTP/2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(runs[0]["figures"])
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        ratios = [run["figures"][k].get("to_goal_anchor", {}).get("fastlb", 0.0) for k in keys]
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, ratios, width, label=f"run {j + 1}")
        ax.bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=7, padding=1)
    goals = [float(runs[0]["figures"][k].get("goal", "<= 0 x").split()[1]) for k in keys]
    ax.scatter(range(len(keys)), goals, marker="_", s=900, color="black", label="goal", zorder=3)
    ax.set_xticks(
        range(len(keys)), [f"{k}\n/ {runs[0]['figures'][k].get('goal', '')[3:]}" for k in keys], fontsize=7
    )
    ax.set_ylim(0, 2.0)
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_ylabel("fastlb / anchor (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tls_part(runs: int) -> list[str]:
    """Runs bench/tls_compare.py `runs` times; writes TLS.md, tls_results.json and tls.png."""
    results = []
    for i in range(runs):
        print(f"TLS comparison run {i + 1}/{runs} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, str(HERE / "tls_compare.py")], capture_output=True, text=True, check=True
        )
        results.append(json.loads(done.stdout))
    (HERE / "tls_results.json").write_text(json.dumps(results, indent=1))
    return tls_section(results)


def tls_section(results: list[dict[str, Any]]) -> list[str]:
    """TLS.md and tls.png from tls_compare.py's results (`--tls-from-json` redraws them)."""
    from tls_compare import table

    goal_chart(results, HERE / "tls.png", "TLS: fastlb against the anchor each goal names")
    lines = [
        "## TLS beside HAProxy and nginx (bench/tls_compare.py)",
        "",
        "One ECDSA P-256 certificate; HAProxy and nginx with Debian's OpenSSL 3.0, fastlb with rustls"
        " (aws-lc-rs); one worker each on CPU 0, clients and the nginx backend on CPU 1. Values per target,"
        " then fastlb's ratio to the anchor the goal names (bench/README.md explains each figure).",
        "",
    ]
    for i, run in enumerate(results):
        lines += [f"Run {i + 1}:", "", table(run["figures"]), ""]
    lines += ["![fastlb's TLS figures against the anchors](tls.png)", ""]
    (HERE / "TLS.md").write_text("\n".join(lines) + "\n")
    return lines


def udp_chart(runs: list[dict[str, Any]], path: Path) -> None:
    """fastlb's ratio to the anchor of each UDP goal, per run, with the goal's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = [g for g in runs[0]["figures"]["goals"] if g["figure"] != "fixed_loss_pct"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        ratios = [g.get("ratio", 0.0) for g in run["figures"]["goals"] if g["figure"] != "fixed_loss_pct"]
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(goals))]
        bars = ax.bar(xs, ratios, width, label=f"run {j + 1}")
        ax.bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=7, padding=1)
    bounds = [float(g["goal"].split()[2]) for g in goals]
    ax.scatter(range(len(goals)), bounds, marker="_", s=900, color="black", label="goal", zorder=3)
    ax.set_xticks(
        range(len(goals)), [f"{g['figure'].split(' (')[0]}\n{g['goal']}" for g in goals], fontsize=7
    )
    ax.set_ylim(0, max(2.0, *bounds) + 0.2)
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_ylabel("fastlb / anchor")
    ax.set_title("UDP DNS: fastlb against the anchor each goal names (CPU: lower is better; rate: higher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def udp_part(runs: int, fastlb: str | None) -> list[str]:
    """Runs bench/udp_compare.py `runs` times; writes UDP.md, udp_results.json and udp.png."""
    results = []
    for i in range(runs):
        print(f"UDP comparison run {i + 1}/{runs} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(HERE / "udp_compare.py"), *(["--fastlb", fastlb] if fastlb else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"udp_compare.py failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout))
    (HERE / "udp_results.json").write_text(json.dumps(results, indent=1))
    return udp_section(results)


def udp_section(results: list[dict[str, Any]]) -> list[str]:
    """UDP.md and udp.png from udp_compare.py's results (`--udp-from-json` redraws them)."""
    from udp_compare import table

    have_fastlb = any("ratio" in g for g in results[0]["figures"]["goals"])
    if have_fastlb:
        try:
            udp_chart(results, HERE / "udp.png")
        except ImportError:  # no matplotlib (`pip install -e .[bench]`): the tables still count
            print("no matplotlib: udp.png not drawn", file=sys.stderr)
            have_fastlb = False
    s = results[0]["settings"]
    lines = [
        f"## UDP DNS beside nginx stream and dnsdist (bench/udp_compare.py, {time.strftime('%Y-%m-%d')})",
        "",
        "dnsperf against nginx 1.22 stream (`udp`, `proxy_responses 1`), dnsdist 1.7 and fastlb"
        ' (`protocol = "udp"`, `udp = { responses = 1 }`), each with one worker on CPU'
        f" {s['proxy_cpus']}, in front of one backend (bench/dns_responder.c, recvmmsg/sendmmsg) that"
        f" shares CPU {s['client_cpus']} with dnsperf (-c {s['clients']}); `direct` is dnsperf straight"
        f" to the backend. Fixed rate: `-Q {s['rate']}` for {s['secs']} s; unthrottled: `-q"
        f" {s['outstanding']}`; highest clean rate: loss < 0.1% and >= 98% of the asked rate answered,"
        f" by bisection in {s['search_steps']} runs of {s['search_secs']} s. CPU per query is the"
        ' target\'s utime + stime over the queries answered; "target busy" and "CPU 1 busy" are CPU'
        " over wall time (near 1.0: that core bounds the rate). bench/README.md explains the method.",
        "",
    ]
    for i, run in enumerate(results):
        lines += [f"Run {i + 1}:", "", table(run), ""]
    if have_fastlb:
        lines += ["![fastlb's UDP figures against the anchors](udp.png)", ""]
    (HERE / "UDP.md").write_text("\n".join(lines) + "\n")
    return lines


def h2_part(runs: int, fastlb: str | None) -> list[str]:
    """Runs bench/h2_compare.py `runs` times; writes H2.md, h2_results.json and h2.png."""
    results = []
    for i in range(runs):
        print(f"HTTP/2 comparison run {i + 1}/{runs} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(HERE / "h2_compare.py"), *(["--fastlb", fastlb] if fastlb else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"h2_compare.py failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout))
    (HERE / "h2_results.json").write_text(json.dumps(results, indent=1))
    return h2_section(results)


def h2_section(results: list[dict[str, Any]]) -> list[str]:
    """H2.md and h2.png from h2_compare.py's results (`--h2-from-json` redraws them)."""
    from h2_compare import details
    from tls_compare import table

    have_fastlb = any("to_goal_anchor" in f for f in results[0]["figures"].values())
    if have_fastlb:
        try:
            goal_chart(results, HERE / "h2.png", "HTTP/2 and gRPC: fastlb against the anchor each goal names")
        except ImportError:  # no matplotlib (`pip install -e .[bench]`): the tables still count
            print("no matplotlib: h2.png not drawn", file=sys.stderr)
            have_fastlb = False
    s = results[0]["settings"]
    lines = [
        f"## HTTP/2 and gRPC beside HAProxy and nginx (bench/h2_compare.py, {time.strftime('%Y-%m-%d')})",
        "",
        "HAProxy 2.6 and nginx 1.22 (Debian, OpenSSL 3.0) and fastlb, one worker each on CPU"
        f" {s['proxy_cpus']}; h2load (`{s['h2load']}`, {s['secs']} s), the HTTP/1.1 nginx backend and"
        f" bench/grpc_responder.c on CPU {s['client_cpus']}. `idle_bytes_per_conn`: RSS growth per idle"
        f" h2 TLS connection ({s['idle_conns']}, one request each, taken before any load);"
        " `h2_cpu_us`: CPU per request, h2 over TLS to an HTTP/1.1 backend; `grpc_cpu_us`: CPU per"
        " gRPC unary call, h2c to an HTTP/2 backend. Values per target, then fastlb's ratio to the"
        " anchor the goal names (bench/README.md explains each figure).",
        "",
    ]
    for i, run in enumerate(results):
        lines += [f"Run {i + 1}:", "", table(run["figures"]), "", details(run), ""]
    if have_fastlb:
        lines += ["![fastlb's HTTP/2 figures against the anchors](h2.png)", ""]
    (HERE / "H2.md").write_text("\n".join(lines) + "\n")
    return lines


def replace_section(path: Path, lines: list[str]) -> None:
    """Puts `lines` (starting with a `## ` heading) in place of the section of RESULTS.md with the
    same heading start (up to the next `## `), or at its end."""
    key = lines[0].split(" (")[0]
    old = path.read_text().rstrip("\n").splitlines() if path.exists() else []
    start = next((i for i, x in enumerate(old) if x.startswith(key)), None)
    if start is None:
        new = [*old, "", *lines]
    else:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = [*old[:start], *lines, *old[end:]]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--layers", default="l4,l7", help="comma-separated: l4, l7")
    ap.add_argument(
        "--floor-source",
        type=Path,
        default=ROOT.parent / "shared" / "tools" / "floor_relay.c",
        help="a bare C relay to show as the floor, if present",
    )
    ap.add_argument("--chart-only", action="store_true", help="redraw results.png from results.json")
    ap.add_argument(
        "--tls-from-json", action="store_true", help="rewrite TLS.md and tls.png from tls_results.json"
    )
    ap.add_argument(
        "--udp-from-json", action="store_true", help="rewrite UDP.md and udp.png from udp_results.json"
    )
    ap.add_argument(
        "--h2-from-json", action="store_true", help="rewrite H2.md and h2.png from h2_results.json"
    )
    ap.add_argument("--proxy-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    ap.add_argument(
        "--parts",
        default="compare,micro,slow,admin,tls,udp,h2",
        help="comma-separated: compare, micro, slow, admin, tls, udp, h2",
    )
    ap.add_argument(
        "--fastlb", default=None, help="the udp and h2 parts' fastlb (default: next to this python)"
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.chart_only:
        chart(json.loads((HERE / "results.json").read_text()), HERE / "results.png")
        return
    if args.tls_from_json:
        tls_section(json.loads((HERE / "tls_results.json").read_text()))
        return
    if args.udp_from_json:
        replace_section(HERE / "RESULTS.md", udp_section(json.loads((HERE / "udp_results.json").read_text())))
        return
    if args.h2_from_json:
        replace_section(HERE / "RESULTS.md", h2_section(json.loads((HERE / "h2_results.json").read_text())))
        return
    if "compare" not in parts:
        args.layers = ""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing and "compare" in parts:
        sys.exit(
            f"missing: {' '.join(missing)}; apt-get install -y haproxy nginx libnginx-mod-stream wrk gcc"
        )
    floor: Path | None = None
    if "admin" in parts and not shutil.which("wrk"):
        sys.exit("missing: wrk; apt-get install -y wrk")
    if "h2" in parts and not shutil.which("h2load"):
        sys.exit("missing: h2load; apt-get install -y nghttp2-client")
    if "compare" in parts and args.floor_source.exists() and shutil.which("gcc"):
        floor = Path(tempfile.mkdtemp()) / "floor_relay"
        subprocess.run(["gcc", "-O2", "-o", str(floor), str(args.floor_source)], check=True)
    pinning = ["--proxy-cpus", args.proxy_cpus, "--client-cpus", args.client_cpus]
    layers = [x for x in args.layers.split(",") if x]
    results: dict[str, list[dict[str, dict[str, Any]]]] = {layer: [] for layer in layers}
    for i in range(args.runs):
        for layer in layers:
            print(f"{layer} comparison run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            results[layer].append(compare_run(args.secs, floor, layer, pinning))
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
        " the nginx backend on CPU 1 (`bench/compare.py`). Ratios are within one run. `floor` is the bare C"
        " read/write relay (an L4 relay, shown at L7 too as the least any proxy can spend).",
        "",
    ]
    for layer in layers:
        lines += layer_table(layer, results[layer])
    if layers:
        (HERE / "results.json").write_text(json.dumps(results, indent=1))
        chart(results, HERE / "results.png")
        lines += ["![fastlb against the anchors](results.png)", ""]
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
    if "admin" in parts:
        print("admin API latency under load ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, str(HERE / "admin_latency.py"), "--runs", "2"], check=True, capture_output=True
        )
        admin = (HERE / "ADMIN_LATENCY.md").read_text().replace("# Admin API latency", "## Admin API latency")
        lines += [admin]
    if "tls" in parts:
        lines += tls_part(2)
    udp: list[str] = []
    if "udp" in parts:
        udp = udp_part(2, args.fastlb)
        lines += udp
    h2: list[str] = []
    if "h2" in parts:
        h2 = h2_part(2, args.fastlb)
        lines += h2
    if parts >= {"compare", "micro", "slow"}:
        (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    else:  # a partial run leaves RESULTS.md as it is but for its UDP and HTTP/2 sections; MICRO.md,
        # SLOW_BACKENDS.md, ADMIN_LATENCY.md, TLS.md, UDP.md and H2.md are rewritten by the parts that ran
        for section in (udp, h2):
            if section:
                replace_section(HERE / "RESULTS.md", section)
        rewritten = " and ".join(name for name, section in (("UDP", udp), ("HTTP/2", h2)) if section)
        print(
            "partial run: see bench/MICRO.md, SLOW_BACKENDS.md, ADMIN_LATENCY.md, TLS.md, UDP.md and H2.md"
            + (f" (RESULTS.md's {rewritten} section was rewritten)" if rewritten else ""),
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
