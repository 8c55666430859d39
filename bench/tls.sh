#!/usr/bin/env bash
# TLS termination cost: shoal vs HAProxy, measured in the same run.
#
# Same layout as bench/proxy.sh: Debian's nginx (1 worker, `return 200 "hello\n"`) as the
# backend; each proxy alone on CPU 1 with one worker thread; wrk and the backend on CPU 0.
# Both proxies serve the same ECDSA P-256 certificate (HAProxy: `bind ... ssl crt`, its
# defaults; it links the system OpenSSL, 3.0 on Debian 12). Two modes, each run for
# ${ROUNDS} rounds alternating the targets:
#   keepalive  wrk -t1 -c50 over https: TLS records only, no handshakes after the first
#   reconnect  wrk -t1 -c20 with `Connection: close`: a new connection per request; wrk
#              resumes TLS sessions (shoal's handshake counter shows full vs resumed)
#   full       openssl s_time -new -www /: one client, a full handshake (no resumption)
#              and one request per connection: proxy CPU per full handshake
# The figure that compares proxies is CPU per request: the proxy's utime+stime over a run
# divided by the requests served (the client saturates first on this box); req/s and p99
# beside it. Medians over rounds, and shoal/HAProxy per round.
#
# Usage: bench/tls.sh   (ROUNDS=5 DURATION=10 by default; MODES="keepalive" for one mode)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need haproxy || ! need nginx || ! need openssl; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk haproxy nginx-light openssl >/dev/null
fi
SHOAL=${SHOAL_BIN:-}
if [ -z "$SHOAL" ]; then
  for c in target/release/shoal target/x86_64-unknown-linux-gnu/release/shoal; do
    [ -x "$c" ] && SHOAL=$PWD/$c && break
  done
fi
[ -n "$SHOAL" ] || { cargo build --release -q -p shoal && SHOAL=$PWD/target/release/shoal; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" >"$work/haproxy.pem"

BACKEND=$(free_port); P_SHOAL=$(free_port); P_HAPROXY=$(free_port); ADMIN=$(free_port)
mkdir -p "$work/nb"
cat >"$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/nb/pid; error_log $work/nb/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/nb; proxy_temp_path $work/nb; fastcgi_temp_path $work/nb; uwsgi_temp_path $work/nb; scgi_temp_path $work/nb;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "hello\n"; } } }
EOF
cat >"$work/haproxy.cfg" <<EOF
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
  bind 127.0.0.1:$P_HAPROXY ssl crt $work/haproxy.pem alpn http/1.1
  default_backend b
backend b
  server s1 127.0.0.1:$BACKEND
EOF

taskset -c 0 nginx -c "$work/backend.conf" -p "$work/nb" 2>/dev/null & pids+=($!)
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db 2>/dev/null & pids+=($!); HAPROXY_PID=$!
RUST_LOG=${RUST_LOG:-warn} taskset -c 1 "$SHOAL" proxy --threads 1 --listen 127.0.0.1:$P_SHOAL \
  --backend 127.0.0.1:$BACKEND --admin 127.0.0.1:$ADMIN \
  --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" & pids+=($!); SHOAL_PID=$!
for p in $BACKEND $P_SHOAL $P_HAPROXY; do wait_port "$p"; done
echo "HAProxy: $(haproxy -vv 2>/dev/null | grep -m1 -i 'Running on: OpenSSL' || haproxy -vv | grep -m1 OpenSSL)"
echo "shoal:   rustls 0.23 (aws-lc-rs)"

cpu_ticks() {
  local pid
  case $1 in haproxy) pid=$HAPROXY_PID;; shoal) pid=$SHOAL_PID;; esac
  awk '{print $14 + $15}' "/proc/$pid/stat"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
port_of() { case $1 in haproxy) echo $P_HAPROXY;; shoal) echo $P_SHOAL;; esac; }
to_ms() { python3 -c 'import sys,re; v=sys.argv[1]; m=re.match(r"([\d.]+)(us|ms|s)",v); n=float(m.group(1)); print({"us":n/1000,"ms":n,"s":n*1000}[m.group(2)])' "$1"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
wrk_args() { case $1 in keepalive) ARGS=(-t1 -c50);; reconnect) ARGS=(-t1 -c20 -H "Connection: close");; esac; }
# One mode-`full` run: prints "conns cpu_us_per_conn".
s_time_run() {
  local c0 c1 out n
  c0=$(cpu_ticks "$1")
  out=$(taskset -c 0 openssl s_time -connect "127.0.0.1:$(port_of "$1")" -new -time "$DURATION" -www / 2>&1)
  c1=$(cpu_ticks "$1")
  n=$(awk '/connections in/ {print $1; exit}' <<<"$out")
  echo "$n $(echo "($c1 - $c0) * $TICK_US / $n" | bc -l)"
}

targets=(haproxy shoal)
for mode in ${MODES:-keepalive reconnect full}; do
  declare -A RPS=() P99=() CPU=()
  if [ "$mode" = full ]; then
    echo; echo "== full (openssl s_time -new, one client) =="
    for r in $(seq "$ROUNDS"); do
      for t in "${targets[@]}"; do
        read -r n cpu_us < <(s_time_run "$t")
        CPU[$t]+="$cpu_us "
        printf 'round %d  %-8s %6d handshakes in %ss  proxy CPU %6.1f us/handshake+request\n' "$r" "$t" "$n" "$DURATION" "$cpu_us"
      done
    done
    read -r -a sc <<<"${CPU[shoal]}"; read -r -a hc <<<"${CPU[haproxy]}"
    per=""; for i in "${!sc[@]}"; do per+="$(echo "${sc[$i]} / ${hc[$i]}" | bc -l | cut -c1-4) "; done
    printf 'medians: haproxy %.1f us, shoal %.1f us; shoal/HAProxy per round: %s(median %.2f; target <= 0.8)\n' \
      "$(median <<<"${CPU[haproxy]}")" "$(median <<<"${CPU[shoal]}")" "$per" "$(median <<<"$per")"
    continue
  fi
  wrk_args "$mode"
  for t in "${targets[@]}"; do taskset -c 0 wrk "${ARGS[@]}" -d2s "https://127.0.0.1:$(port_of $t)/" >/dev/null; done
  echo; echo "== $mode =="
  for r in $(seq "$ROUNDS"); do
    for t in "${targets[@]}"; do
      c0=$(cpu_ticks "$t")
      out=$(taskset -c 0 wrk "${ARGS[@]}" -d"${DURATION}"s --latency "https://127.0.0.1:$(port_of $t)/")
      c1=$(cpu_ticks "$t")
      total=$(awk '/requests in/ {print $1}' <<<"$out")
      cpu_us=$(echo "($c1 - $c0) * $TICK_US / $total" | bc -l)
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      p99=$(awk '$1=="99%" {print $2}' <<<"$out")
      errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
      [ -n "$errs" ] && echo "round $r $t: $errs" >&2
      RPS[$t]+="$rps "; P99[$t]+="$(to_ms "$p99") "; CPU[$t]+="$cpu_us "
      printf 'round %d  %-8s %10.0f req/s  p99 %7.2f ms  proxy CPU %6.1f us/req\n' "$r" "$t" "$rps" "$(to_ms "$p99")" "$cpu_us"
    done
  done
  echo
  echo "| $mode | req/s (median of $ROUNDS) | p99 ms (median) | proxy CPU us/req (median) |"
  echo "|---|---|---|---|"
  for t in "${targets[@]}"; do
    printf '| %s | %.0f | %.2f | %.1f |\n' "$t" "$(median <<<"${RPS[$t]}")" "$(median <<<"${P99[$t]}")" "$(median <<<"${CPU[$t]}")"
  done
  read -r -a sc <<<"${CPU[shoal]}"; read -r -a hc <<<"${CPU[haproxy]}"
  per=""; for i in "${!sc[@]}"; do per+="$(echo "${sc[$i]} / ${hc[$i]}" | bc -l | cut -c1-4) "; done
  printf 'CPU per request shoal/HAProxy per round: %s(median %.2f; target <= 0.8)\n' "$per" "$(median <<<"$per")"
done
echo
echo "shoal handshakes:"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^shoal_tls_handshakes_total' | grep -v ' 0$' || true
