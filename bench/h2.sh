#!/usr/bin/env bash
# HTTP/2 to the instances: shoal vs HAProxy, each in front of the same h2c backend, measured
# in the same run.
#
# Backend: nghttpd (nghttp2-server) without TLS serving a 6-byte file. Clients speak h2c
# (prior knowledge) to each proxy; each proxy speaks h2c to the backend (shoal:
# --upstream-protocol h2c; HAProxy: `server ... proto h2`, `bind ... proto h2`). Each proxy
# runs alone on CPU 1 with one worker thread; h2load and the backend share CPU 0.
# h2load -c${CONNS} -m${STREAMS} -D${DURATION} runs alternately against each target for
# ${ROUNDS} rounds; printed: per round and medians of req/s, mean latency, and proxy CPU
# per request (utime + stime over the run / requests), with shoal/HAProxy per round.
#
# Usage: bench/h2.sh   (ROUNDS=5 DURATION=8 CONNS=10 STREAMS=10; SHOAL_BIN=path)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CONNS=${CONNS:-10}
STREAMS=${STREAMS:-10}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need h2load || ! need nghttpd || ! need haproxy; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client nghttp2-server haproxy >/dev/null
fi
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}
[ -x "$SHOAL" ] || cargo build --release -q

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

BACKEND=$(free_port); P_SHOAL=$(free_port); P_HAPROXY=$(free_port); ADMIN=$(free_port)
mkdir -p "$work/www" && printf 'hello\n' >"$work/www/index.html"
cat >"$work/haproxy.cfg" <<EOF2
global
  nbthread 1
  maxconn 5000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$P_HAPROXY proto h2
  default_backend b
backend b
  server s1 127.0.0.1:$BACKEND proto h2
EOF2

taskset -c 0 nghttpd --no-tls -d "$work/www" -n 1 "$BACKEND" >/dev/null 2>&1 & pids+=($!)
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db 2>/dev/null & pids+=($!); HAPROXY_PID=$!
RUST_LOG=warn taskset -c 1 "$SHOAL" proxy --threads 1 --listen 127.0.0.1:$P_SHOAL \
  --backend 127.0.0.1:$BACKEND --upstream-protocol h2c --admin 127.0.0.1:$ADMIN & pids+=($!); SHOAL_PID=$!
for p in $BACKEND $P_SHOAL $P_HAPROXY; do wait_port "$p"; done

cpu_ticks() {
  local pid
  case $1 in haproxy) pid=$HAPROXY_PID;; shoal) pid=$SHOAL_PID;; *) echo 0; return;; esac
  awk '{print $14 + $15}' "/proc/$pid/stat"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
port_of() { case $1 in direct) echo $BACKEND;; haproxy) echo $P_HAPROXY;; shoal) echo $P_SHOAL;; esac; }

declare -A RPS LAT CPU
read -r -a targets <<<"${TARGETS:-direct haproxy shoal}"
for t in "${targets[@]}"; do taskset -c 0 h2load -c"$CONNS" -m"$STREAMS" -D2 "http://127.0.0.1:$(port_of $t)/index.html" >/dev/null; done
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    c0=$(cpu_ticks "$t")
    out=$(taskset -c 0 h2load -c"$CONNS" -m"$STREAMS" -D"$DURATION" "http://127.0.0.1:$(port_of $t)/index.html")
    c1=$(cpu_ticks "$t")
    done_n=$(awk '/^requests:/ {print $8}' <<<"$out")
    failed=$(awk '/^requests:/ {print $10}' <<<"$out")
    rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' <<<"$out")
    lat=$(awk '/^time for request:/ {print $6}' <<<"$out")
    lat_ms=$(python3 -c 'import sys,re; v=sys.argv[1]; m=re.match(r"([\d.]+)(us|ms|s)",v); n=float(m.group(1)); print({"us":n/1000,"ms":n,"s":n*1000}[m.group(2)])' "$lat")
    cpu_us=$(echo "($c1 - $c0) * $TICK_US / ($done_n + 0.000001)" | bc -l)
    [ "$failed" != "0" ] && echo "round $r $t: $failed failed" >&2
    RPS[$t]+="$rps "; LAT[$t]+="$lat_ms "; CPU[$t]+="$cpu_us "
    printf 'round %d  %-8s %10.0f req/s  mean %7.2f ms  proxy CPU %5.1f us/req\n' "$r" "$t" "$rps" "$lat_ms" "$cpu_us"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "| target | req/s (median of $ROUNDS) | mean latency ms (median) | proxy CPU us/req (median) |"
echo "|---|---|---|---|"
for t in "${targets[@]}"; do
  printf '| %s | %.0f | %.2f | %.1f |\n' "$t" "$(median <<<"${RPS[$t]}")" "$(median <<<"${LAT[$t]}")" "$(median <<<"${CPU[$t]}")"
done
if [ -n "${CPU[haproxy]:-}" ] && [ -n "${CPU[shoal]:-}" ]; then
  read -r -a sc <<<"${CPU[shoal]}"; read -r -a hc <<<"${CPU[haproxy]}"
  per=""; for i in "${!sc[@]}"; do per+="$(echo "${sc[$i]} / ${hc[$i]}" | bc -l | cut -c1-4) "; done
  printf '\nproxy CPU per request, shoal/HAProxy per round: %s(median %.2f)\n' "$per" "$(median <<<"$per")"
fi
