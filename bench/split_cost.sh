#!/usr/bin/env bash
# What a split route costs at L7 over the listener's default pool: route matching, the split's
# pick and the route's own counters (requests, 5xx, latency histogram per pool, what a canary
# is judged by). One data plane, two configs run in alternation (A B A B ...) against one nginx
# backend, fastlb pinned to CPU 0 and wrk to CPU 1. Prints CPU microseconds per keep-alive
# request. usage: bench/split_cost.sh [pairs]   (default 4; about 25 s per pair)
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
head() {
  cat <<TOML
[runtime]
workers = 1
cpu_affinity = "off"
[admin]
bind = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:$LB_PORT"
protocol = "http"
pool = "v1"
TOML
}
pools() {
  for p in v1 v2; do
    printf '[[pools]]\nname = "%s"\nbackends = [{ address = "127.0.0.1:%s" }]\nhealth = { type = "none" }\n' "$p" "$BE_PORT"
  done
}
{ head; pools; } > "$WORK/plain.toml"
{ head; printf '  [[listeners.routes]]\n  path_prefix = "/"\n  split = [{ pool = "v1", weight = 95 }, { pool = "v2", weight = 5 }]\n'; pools; } > "$WORK/split.toml"

run() {  # $1 config name
  taskset -c 0 .venv/bin/python -m fastlb serve -c "$WORK/$1.toml" 2>/dev/null &
  local lb=$!
  sleep 1.5
  local pid; pid=$(pgrep -f "fastlb serve -c $WORK/$1.toml")
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
  run plain
  run split
done | awk '{print; s[$1]+=$2; n[$1]++} END {for (k in s) printf "mean %s: %.2f us/request\n", k, s[k]/n[k]}'
