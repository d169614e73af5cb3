"""Small helpers shared by the benchmark scripts: process CPU time, CPU busyness, ports, wrk."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
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


def busy_builds() -> list[str]:
    """Compilers running on this machine (they would skew every figure on 2 cores)."""
    found = []
    for name in ("cargo", "rustc", "maturin", "cc1", "cc1plus", "ld"):
        out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
        found += [f"{name}:{pid}" for pid in out]
    return found


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU, from /proc/stat: (busy, total) jiffies; busy is all but idle and iowait."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0].startswith("cpu") and f[0] != "cpu":
            vals = [int(x) for x in f[1:]]
            out[int(f[0][3:])] = (sum(vals[:8]) - vals[3] - vals[4], sum(vals[:8]))
    return out


def cpus(spec: str) -> list[int]:
    """A taskset list ("0", "0,2", "0-3") as CPU numbers."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], which: list[int]) -> float:
    """How busy these CPUs were meanwhile, by anything at all (0..len(which))."""
    b = sum(after[c][0] - before[c][0] for c in which)
    t = sum(after[c][1] - before[c][1] for c in which)
    return round(len(which) * b / max(t, 1), 2)


def wait_quiet(which: list[int], most: float) -> float:
    """Waits (up to `most` seconds) for a 1 s window in which each of these CPUs was under 8%
    busy; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < most:
        a = cpu_times()
        time.sleep(1.0)
        b = cpu_times()
        if all(busy(a, b, [c]) < 0.08 for c in which):
            break
    return round(time.monotonic() - t0, 1)


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
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs wrk pinned to `cpu` (one thread per CPU given); returns requests, rps and latency
    percentiles (ms). `close`: a new connection per request. `scheme`: "https" for TLS (wrk does
    not verify the certificate). `headers`: fields every request carries."""
    threads = max(1, min(conns, len(cpu.split(","))))
    cmd = ["taskset", "-c", cpu, "wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
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


class Responder:
    """A C backend under taskset (bench/*_responder.c) that prints its counts on SIGUSR1 to the
    log its stderr goes to."""

    def __init__(self, exe: Path, d: Path, cpus: str, port: int) -> None:
        self.name = exe.name
        self.log_path = d / "responder.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(["taskset", "-c", cpus, str(exe), str(port)], stderr=self.log)

    def report(self, pattern: str) -> tuple[int, ...]:
        """The numbers of the next count line, which must match `pattern`."""
        lines = len(self.log_path.read_text().splitlines())
        self.proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            text = self.log_path.read_text().splitlines()
            if len(text) > lines:
                m = re.match(pattern, text[-1])
                assert m, text[-1]
                return tuple(int(g) for g in m.groups())
            time.sleep(0.01)
        raise RuntimeError(
            f"{self.name} did not report its counts (exit status {self.proc.poll()}):"
            f" {self.log_path.read_text()[-500:]}"
        )
