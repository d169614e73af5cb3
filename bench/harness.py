"""Small helpers shared by the benchmark scripts: process CPU time, ports, wrk."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out = [pid]
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for kid in kids:
        out += process_tree(int(kid))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / HZ


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def wrk(
    port: int,
    conns: int,
    secs: int,
    path: str = "/",
    cpu: str = "1",
    close: bool = False,
    scheme: str = "http",
) -> dict[str, Any]:
    """Runs wrk pinned to `cpu` (one thread per CPU given); returns requests, rps and latency
    percentiles (ms). `close`: a new connection per request. `scheme`: "https" for TLS (wrk does
    not verify the certificate)."""
    threads = max(1, min(conns, len(cpu.split(","))))
    cmd = ["taskset", "-c", cpu, "wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    text = subprocess.run(
        [*cmd, f"{scheme}://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True
    ).stdout

    def ms(v: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        assert m, v
        x, unit = float(m.group(1)), m.group(2)
        return x / 1000 if unit == "us" else x * 1000 if unit == "s" else x

    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.M))
    requests = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    assert requests and rps, text
    return {
        "rps": round(float(rps.group(1))),
        "requests": int(requests.group(1)),
        "p50_ms": ms(lat["50"]),
        "p99_ms": ms(lat["99"]),
        "non2xx": int(errors.group(1)) if errors else 0,
    }


def stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM each process in order, waiting up to 5 s for each, then SIGKILL what is left."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(5)
        except Exception:
            p.kill()
