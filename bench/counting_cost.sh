#!/usr/bin/env bash
# What per-request counting costs at L7: the same data plane built with and without it
# (cargo feature `no-counting`), run in alternation (A B A B ...) against one nginx backend,
# fastlb pinned to CPU 0 and wrk to CPU 1. Prints CPU microseconds per keep-alive request.
# usage: bench/counting_cost.sh [pairs]   (default 4; about 25 s per pair)
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-4}
WORK=$(mktemp -d)
trap 'pkill -f "fastlb serve -c $WORK" || true; [ -f $WORK/ng.pid ] && kill "$(cat $WORK/ng.pid)" || true; rm -rf $WORK' EXIT
LB_PORT=18680 BE_PORT=18691
cat > "$WORK/ng.conf" <<NG
worker_processes 1;
daemon on;
pid $WORK/ng.pid;
error_log $WORK/ng.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$BE_PORT; location / { return 200 "ok"; } } }
NG
taskset -c 1 nginx -c "$WORK/ng.conf"
cat > "$WORK/lb.toml" <<TOML
[runtime]
workers = 1
cpu_affinity = "off"
[admin]
bind = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:$LB_PORT"
protocol = "http"
pool = "app"
[[pools]]
name = "app"
backends = [{ address = "127.0.0.1:$BE_PORT" }]
health = { type = "none" }
TOML
# the no-counting build, beside the installed one
CARGO_TARGET_DIR="$WORK/target" cargo build -q --release --lib --features no-counting
mkdir -p "$WORK/pkg" && cp -r python/fastlb "$WORK/pkg/"
cp "$WORK/target/release/lib_native.so" "$WORK/pkg/fastlb/_native.abi3.so"

run() {  # $1 label, $2 PYTHONPATH
  PYTHONPATH=$2 taskset -c 0 .venv/bin/python -m fastlb serve -c "$WORK/lb.toml" 2>/dev/null &
  local lb=$!
  sleep 1.5
  local pid; pid=$(pgrep -f "fastlb serve -c $WORK/lb.toml")
  taskset -c 1 wrk -t1 -c32 -d7s "http://127.0.0.1:$LB_PORT/" > "$WORK/wrk.txt" &
  local wrk=$!
  sleep 1
  local t0 t1; t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  sleep 5
  t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  wait $wrk
  local rps; rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
  python3 -c "import os; t=($t1-$t0)/os.sysconf('SC_CLK_TCK'); print(f'$1 {t*1e6/($rps*5):.2f}')"
  kill $lb; wait $lb 2>/dev/null || true
}
for _ in $(seq "$PAIRS"); do
  run counting ""
  run no-counting "$WORK/pkg"
done | awk '{print; s[$1]+=$2; n[$1]++} END {for (k in s) printf "mean %s: %.2f us/request\n", k, s[k]/n[k]}'
