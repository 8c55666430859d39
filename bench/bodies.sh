#!/usr/bin/env bash
# Request bodies through shoal builds, A/B in the same run: CPU per request (user + system of
# the proxy ÷ requests), req/s and p99 for GET and for POST bodies of 1 KiB and 100 KiB, sent
# with Content-Length and chunked.
#
# Backend: Debian's nginx, 1 worker, `return 200 "hello\n"` (it reads and drops the body).
# Each shoal runs on CPU 1 with one worker thread; wrk and the backend share CPU 0. For every
# workload, wrk -t1 -c50 -d${DURATION}s runs against each build in turn for ${ROUNDS} rounds.
#
# Usage: bench/bodies.sh [SHOAL_BIN ...]   (default target/release/shoal; ROUNDS=3
#        DURATION=5; WORKLOADS="get cl1k cl100k ch1k ch100k")
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WORKLOADS=${WORKLOADS:-get cl1k cl100k ch1k ch100k}
need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  [ -x target/release/shoal ] || cargo build --release -q
  bins=("$PWD/target/release/shoal")
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# wrk scripts: Content-Length bodies through wrk.body, chunked ones as raw requests.
for n in 1024 102400; do
  k=$((n / 1024))k
  printf 'wrk.method = "POST"\nwrk.body = string.rep("x", %d)\n' "$n" >"$work/cl$k.lua"
  cat >"$work/ch$k.lua" <<EOF
local piece, left = string.rep("x", 16384), $n
local parts = {"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n"}
while left > 0 do
  local m = math.min(left, #piece)
  parts[#parts + 1] = string.format("%x\r\n", m) .. string.sub(piece, 1, m) .. "\r\n"
  left = left - m
end
parts[#parts + 1] = "0\r\n\r\n"
local req = table.concat(parts)
request = function() return req end
EOF
done

BACKEND=$(free_port)
mkdir -p "$work/nb"
cat >"$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/nb/pid; error_log $work/nb/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/nb; proxy_temp_path $work/nb; fastcgi_temp_path $work/nb; uwsgi_temp_path $work/nb; scgi_temp_path $work/nb;
  keepalive_requests 1000000; client_max_body_size 10m;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "hello\n"; } } }
EOF
taskset -c 0 nginx -c "$work/backend.conf" -p "$work/nb" 2>/dev/null & pids+=($!)
ports=(); spids=()
for b in "${bins[@]}"; do
  p=$(free_port); a=$(free_port)
  RUST_LOG=warn taskset -c 1 "$b" proxy --threads 1 --listen 127.0.0.1:$p \
    --backend 127.0.0.1:$BACKEND --admin 127.0.0.1:$a & pids+=($!)
  spids+=($!); ports+=("$p")
done
wait_port "$BACKEND"; for p in "${ports[@]}"; do wait_port "$p"; done
TICK_US=$((1000000 / $(getconf CLK_TCK)))
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
to_ms() { python3 -c 'import sys,re; m=re.match(r"([\d.]+)(us|ms|s)",sys.argv[1]); n=float(m.group(1)); print({"us":n/1000,"ms":n,"s":n*1000}[m.group(2)])' "$1"; }

echo "| workload | build | req/s (median) | p99 ms (median) | CPU us/req (median) |"
echo "|---|---|---|---|---|"
for w in $WORKLOADS; do
  declare -A RPS=() P99=() CPU=()
  script=(); [ "$w" = get ] || script=(-s "$work/$w.lua")
  for r in $(seq "$ROUNDS"); do
    for i in "${!bins[@]}"; do
      c0=$(ticks "${spids[$i]}")
      out=$(taskset -c 0 wrk -t1 -c50 -d"${DURATION}"s --latency "${script[@]}" "http://127.0.0.1:${ports[$i]}/")
      c1=$(ticks "${spids[$i]}")
      total=$(awk '/requests in/ {print $1}' <<<"$out")
      errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
      [ -n "$errs" ] && echo "round $r $w ${bins[$i]}: $errs" >&2
      RPS[$i]+="$(awk '/Requests\/sec/ {print $2}' <<<"$out") "
      P99[$i]+="$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")") "
      CPU[$i]+="$(echo "($c1 - $c0) * $TICK_US / $total" | bc -l) "
    done
  done
  for i in "${!bins[@]}"; do
    printf '| %s | %s | %.0f | %.2f | %.1f |\n' "$w" "${bins[$i]}" "$(median <<<"${RPS[$i]}")" \
      "$(median <<<"${P99[$i]}")" "$(median <<<"${CPU[$i]}")"
  done
done
