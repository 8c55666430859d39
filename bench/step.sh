#!/usr/bin/env bash
# The README demo's step: examples/shoal.toml on free ports, idle with one instance, then
# `shoal load .../work?cpu_ms=20 --rate 60 --duration 60` (≈ 1.2 cores: 2 instances at the 0.6
# target). Polls the admin API every 50 ms and prints when the second instance was ready after
# the step, the peak desired count, the desired count at the end, the failed requests and the
# p99 of the step minute. Targets: second instance ≤ 2 s, peak 2, 0 failed.
#
# Usage: bench/step.sh [SHOAL_BINARY]     (default target/release/shoal)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-$PWD/target/release/shoal}
[ -x "$B" ] || { echo "no binary at $B (cargo build --release)" >&2; exit 1; }
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LISTEN=$(free_port); ADMIN=$(free_port)
sed "s/127.0.0.1:8080/127.0.0.1:$LISTEN/; s/127.0.0.1:9900/127.0.0.1:$ADMIN/; s|data_dir = \".shoal\"|data_dir = \"$work/data\"|" \
  examples/shoal.toml >"$work/shoal.toml"
"$B" run --config "$work/shoal.toml" >"$work/shoal.log" 2>&1 &
SP=$!
trap 'kill $SP 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.2; done
# One ready instance, then a few idle seconds.
for _ in $(seq 200); do
  curl -s "127.0.0.1:$ADMIN/api/services/demo" | grep -q '"state":"ready"' && break; sleep 0.1
done
sleep 5
"$B" load "http://127.0.0.1:$LISTEN/work?cpu_ms=20" --rate 60 --duration 60 --json >"$work/load.json" &
LP=$!
python3 - "$ADMIN" "$LP" <<'EOF'
import json, os, sys, time, urllib.request
admin, loader = sys.argv[1], int(sys.argv[2])
start = time.monotonic()
second, peak, last = None, 0, 0
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
while alive(loader):
    v = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/services/demo"))
    ready = sum(1 for i in v["instances"] if i["state"] == "ready")
    if second is None and ready >= 2:
        second = time.monotonic() - start
    peak = max(peak, v["desired"])
    last = v["desired"]
    time.sleep(0.05)
print(f"second instance ready after {second:.2f} s" if second else "never 2 ready")
print(f"peak desired {peak}, desired at the end {last}")
EOF
wait $LP || true
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); l=d["latency"]; print("requests", d["requests"], "failed", d["errors"]["total"], "p50 %.1f ms p99 %.1f ms" % (l["p50_us"]/1e3, l["p99_us"]/1e3))' "$work/load.json"
curl -s "127.0.0.1:$ADMIN/api/services/demo/decisions" | python3 -c 'import json,sys; [print("  ", round(d["inputs"]["now_secs"],1), d["inputs"]["current_desired"], "->", d["desired"], d["reason"], d["detail"]) for d in json.load(sys.stdin)["decisions"] if d["direction"] == "up"]'
kill -TERM $SP; wait $SP || true
