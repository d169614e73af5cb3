#!/usr/bin/env python3
"""Starts `fastlb serve` for a comparison harness: listens on 127.0.0.1:$PORT and balances over
$BACKENDS (comma-separated host:port), the contract of ../shared/tools/compare_lb.py.

usage: lb_from_env.py tcp|http [workers]   (round robin, health checks off, one worker default)
"""

from __future__ import annotations

import os
import sys
import tempfile


def main() -> None:
    protocol = sys.argv[1] if len(sys.argv) > 1 else "tcp"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    backends = ", ".join(f'{{ address = "{a}" }}' for a in os.environ["BACKENDS"].split(","))
    config = f"""
[runtime]
workers = {workers}
cpu_affinity = "auto"
max_connections = 100000

[admin]
bind = "off"

[[listeners]]
name = "bench"
bind = "127.0.0.1:{os.environ["PORT"]}"
protocol = "{protocol}"
pool = "bench"

[[pools]]
name = "bench"
algorithm = "round_robin"
backends = [{backends}]
health = {{ type = "none" }}
drain_timeout = "1s"
"""
    fd, path = tempfile.mkstemp(prefix="fastlb-bench-", suffix=".toml")
    os.write(fd, config.encode())
    os.close(fd)
    fastlb = os.path.join(os.path.dirname(sys.executable), "fastlb")
    os.execv(fastlb, [fastlb, "serve", "-c", path])


if __name__ == "__main__":
    main()
