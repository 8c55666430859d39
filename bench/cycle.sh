#!/usr/bin/env bash
# A 5-minute up-and-down cycle against the demo fleet (examples/shoal.toml on free ports):
# phases of `shoal load` at changing rates; prints errors per phase, the desired count after
# each, and the total. Target: 0 failed requests, scale-in included.
#
# Usage: bench/cycle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/shoal ] || cargo build --release -q
B=$PWD/target/release/shoal
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LISTEN=$(free_port); ADMIN=$(free_port)
sed "s/127.0.0.1:8080/127.0.0.1:$LISTEN/; s/127.0.0.1:9900/127.0.0.1:$ADMIN/; s|data_dir = \".shoal\"|data_dir = \"$work/data\"|" \
  examples/shoal.toml >"$work/shoal.toml"
"$B" run --config "$work/shoal.toml" >"$work/shoal.log" 2>&1 &
SP=$!
trap 'kill $SP 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.2; done
sleep 2
start=$(date +%s); total_err=0; total_req=0
for phase in "40 60" "5 30" "60 60" "5 30" "30 60" "5 60"; do
  read -r rate secs <<<"$phase"
  out=$("$B" load "http://127.0.0.1:$LISTEN/work?cpu_ms=20&sleep_ms=5" --rate "$rate" --duration "$secs" --json)
  read -r e n < <(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["errors"]["total"], d["requests"])' <<<"$out")
  total_err=$((total_err + e)); total_req=$((total_req + n))
  desired=$(curl -s "127.0.0.1:$ADMIN/api/services/demo" | python3 -c 'import json,sys; print(json.load(sys.stdin)["desired"])')
  echo "$(( $(date +%s) - start ))s  rate=$rate for ${secs}s  requests=$n errors=$e  desired after=$desired"
done
echo "TOTAL requests=$total_req failed=$total_err"
echo "instances started: $(grep -c 'instance started' "$work/shoal.log"), stopped after draining: $(grep -c 'instance stopped' "$work/shoal.log")"
kill -TERM $SP; wait $SP; echo "shoal exit $?"
