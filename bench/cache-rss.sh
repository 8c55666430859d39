#!/usr/bin/env bash
# Memory under cache churn: shoal with `--cache-memory ${CACHE:-32MiB}` in front of an origin
# whose every URL is a new cacheable 10 KiB object (nginx, 1 worker, `max-age=3600`), driven by
# wrk -t1 -c50 with a Lua script that never repeats a path, for ${DURATION} s. shoal's RSS
# (VmRSS) is sampled every second; printed: the peak, the last, the objects and bytes the
# memory tier reports, and requests/s. Target: RSS ≤ 64 MiB at 32 MiB of cache.
#
# Usage: bench/cache-rss.sh   (DURATION=60 CACHE=32MiB SIZE=10240 THREADS=1; SHOAL_BIN to
#        measure another build)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-60}
CACHE=${CACHE:-32MiB}
SIZE=${SIZE:-10240}
THREADS=${THREADS:-1}
need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
if [ -z "${SHOAL_BIN:-}" ]; then [ -x target/release/shoal ] || cargo build --release -q; fi
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

ORIGIN=$(free_port); P=$(free_port); ADMIN=$(free_port)
mkdir -p "$work/www" "$work/no"
head -c "$SIZE" /dev/zero | tr '\0' 'x' >"$work/www/obj"
cat >"$work/origin.conf" <<EOF
worker_processes 1; daemon off; pid $work/no/pid; error_log $work/no/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/no; proxy_temp_path $work/no; fastcgi_temp_path $work/no; uwsgi_temp_path $work/no; scgi_temp_path $work/no;
  keepalive_requests 1000000; default_type text/plain;
  server { listen 127.0.0.1:$ORIGIN; root $work/www; add_header Cache-Control "max-age=3600";
    location / { rewrite ^ /obj break; } } }
EOF
cat >"$work/unique.lua" <<'EOF'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/u/" .. tostring(math.random(1, 1e9)) .. "/" .. n)
end
EOF
taskset -c 0 nginx -c "$work/origin.conf" -p "$work/no" 2>/dev/null & pids+=($!)
RUST_LOG=warn taskset -c 1 "$SHOAL" proxy --threads "$THREADS" --listen 127.0.0.1:$P \
  --backend 127.0.0.1:$ORIGIN --admin 127.0.0.1:$ADMIN --cache-memory "$CACHE" & spid=$!; pids+=($spid)
wait_port "$ORIGIN"; wait_port "$P"; wait_port "$ADMIN"
rss() { awk '/VmRSS/ {print $2}' "/proc/$spid/status"; }
echo "idle RSS: $(( $(rss) / 1024 )) MiB"
taskset -c 0 wrk -t1 -c50 -d"${DURATION}"s -s "$work/unique.lua" "http://127.0.0.1:$P/" >"$work/wrk.out" & wpid=$!
peak=0
while kill -0 "$wpid" 2>/dev/null; do
  r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
  sleep 1
done
wait "$wpid" || true
last=$(rss)
stats=$(curl -sf "http://127.0.0.1:$ADMIN/api/cache")
python3 - "$peak" "$last" "$stats" "$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out")" "$CACHE" <<'EOF'
import json, sys
peak, last, stats, rps, cache = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
print(f"cache {cache}: memory tier {stats.get('memory_bytes', 0) / 2**20:.1f} MiB in {stats.get('objects', stats.get('memory_objects', '?'))} objects, "
      f"{stats.get('evictions', '?')} evictions; {rps} req/s")
print(f"RSS peak {peak / 1024:.1f} MiB, at the end {last / 1024:.1f} MiB (target <= 64 MiB at 32MiB)")
EOF
