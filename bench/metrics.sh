#!/usr/bin/env bash
# /metrics scrape cost with many instances: `shoal proxy` over INSTANCES static backends
# (nothing listens on them and nothing is sent: every per-instance series exists anyway),
# then REQUESTS scrapes with curl per format; prints shoal's CPU time per scrape (user +
# system from /proc, steady on a busy machine; includes the dashboard sampler's own render
# once a second), the median and p90 wall time per scrape and the body size. Text 0.0.4 is what curl and the dashboard sampler get, OpenMetrics what
# Prometheus asks for.
#
# Usage: bench/metrics.sh   (INSTANCES=200 REQUESTS=200; SHOAL_BIN=path for another build)
set -euo pipefail
cd "$(dirname "$0")/.."
INSTANCES=${INSTANCES:-200}
REQUESTS=${REQUESTS:-200}
[ -x target/release/shoal ] || cargo build --release -q
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LISTEN=$(free_port); ADMIN=$(free_port)
args=()
for i in $(seq 1 "$INSTANCES"); do args+=(--backend "127.0.0.2:$((20000 + i))"); done
taskset -c 1 "$SHOAL" proxy --threads 1 --listen "127.0.0.1:$LISTEN" --admin "127.0.0.1:$ADMIN" "${args[@]}" \
  2>"$work/shoal.log" &
pid=$!
for _ in $(seq 100); do curl -sf "127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.05; done

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
scrape() { # $1: label, $2: Accept header
  : >"$work/times"
  local t0; t0=$(cpu_ticks)
  for _ in $(seq "$REQUESTS"); do
    curl -s -o "$work/body" -H "Accept: $2" -w '%{time_total}\n' "127.0.0.1:$ADMIN/metrics" >>"$work/times"
  done
  local cpu_ms; cpu_ms=$(awk -v a="$t0" -v b="$(cpu_ticks)" -v hz="$(getconf CLK_TCK)" -v n="$REQUESTS" \
    'BEGIN { print (b - a) * 1000 / hz / n }')
  sort -n "$work/times" | awk -v label="$1" -v cpu="$cpu_ms" -v bytes="$(wc -c <"$work/body")" -v series="$(grep -vc '^#' "$work/body")" \
    '{ t[NR] = $1 } END { printf "%-12s CPU %.2f ms/scrape  wall median %.2f ms  p90 %.2f ms  %d bytes  %d samples\n", label, cpu, t[int(NR/2)+1]*1000, t[int(NR*0.9)]*1000, bytes, series }'
}
echo "shoal $("$SHOAL" --version) — $INSTANCES instances, $REQUESTS scrapes per format"
scrape "text 0.0.4" "text/plain"
scrape "openmetrics" "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
