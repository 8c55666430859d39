#!/usr/bin/env bash
# Cache-hit throughput: shoal vs NGINX proxy_cache vs Varnish, measured in the same run.
#
# Same layout as bench/proxy.sh: the origin (Debian's nginx, 1 worker) serves static objects
# of 1 KiB and 100 KiB with `Cache-Control: max-age=3600`; each cache runs alone on CPU 1
# with one worker (shoal `--threads 1`, NGINX `worker_processes 1`, Varnish one thread pool);
# wrk and the origin share CPU 0. After a warm-up that fills every cache, wrk -t1 -c50
# -d${DURATION}s --latency runs alternately against each target for ${ROUNDS} rounds per
# object size; medians and the ratios shoal/NGINX and shoal/Varnish are printed, and the
# origin's access count shows every target answered from cache.
#
# SIZES=pass measures misses instead: /pass (1 KiB) is `no-store`, so every request goes
# through the cache phase to the origin (hit-for-pass after the first).
#
# Usage: bench/cache.sh     (ROUNDS=5 DURATION=10 by default; SIZES="1k 100k", or "pass";
#        TARGETS="nginx varnish shoal", add "base" with SHOAL_BASE=path-to-another-build;
#        SHOAL_BIN to measure another build)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need varnishd; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light varnish >/dev/null
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

ORIGIN=$(free_port); P_SHOAL=$(free_port); P_NGINX=$(free_port); P_VARNISH=$(free_port); ADMIN=$(free_port)
mkdir -p "$work/www" "$work/no" "$work/np" "$work/nc" "$work/varnish"
python3 -c 'import sys, random
for name, n in (("1k", 1024), ("100k", 102400), ("pass", 1024)):
    open(sys.argv[1] + "/" + name, "w").write("".join(random.choice("abcdefghij") for _ in range(n)))' "$work/www"
cat >"$work/origin.conf" <<EOF
worker_processes 1; daemon off; pid $work/no/pid; error_log $work/no/error.log;
events { worker_connections 4096; }
http { access_log $work/no/access.log; client_body_temp_path $work/no; proxy_temp_path $work/no; fastcgi_temp_path $work/no; uwsgi_temp_path $work/no; scgi_temp_path $work/no;
  keepalive_requests 1000000; default_type text/plain;
  server { listen 127.0.0.1:$ORIGIN; root $work/www; add_header Cache-Control "max-age=3600";
    location = /pass { add_header Cache-Control "no-store"; } } }
EOF
cat >"$work/nginx-cache.conf" <<EOF
worker_processes 1; daemon off; pid $work/np/pid; error_log $work/np/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/np; proxy_temp_path $work/np; fastcgi_temp_path $work/np; uwsgi_temp_path $work/np; scgi_temp_path $work/np;
  keepalive_requests 1000000;
  proxy_cache_path $work/nc levels=1:2 keys_zone=c:16m max_size=256m inactive=60m use_temp_path=off;
  upstream b { server 127.0.0.1:$ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$P_NGINX;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache c; proxy_cache_lock on; add_header Cache-Status \$upstream_cache_status; } } }
EOF
cat >"$work/default.vcl" <<EOF
vcl 4.1;
backend default { .host = "127.0.0.1"; .port = "$ORIGIN"; }
EOF

taskset -c 0 nginx -c "$work/origin.conf" -p "$work/no" 2>/dev/null & pids+=($!)
taskset -c 1 nginx -c "$work/nginx-cache.conf" -p "$work/np" 2>/dev/null & pids+=($!)
taskset -c 1 varnishd -F -j none -n "$work/varnish" -a 127.0.0.1:$P_VARNISH -f "$work/default.vcl" \
  -s malloc,256m -p thread_pools=1 -p thread_pool_min=50 -p thread_pool_max=200 >/dev/null 2>&1 & pids+=($!)
RUST_LOG=warn taskset -c 1 "$SHOAL" proxy --threads 1 --listen 127.0.0.1:$P_SHOAL \
  --backend 127.0.0.1:$ORIGIN --admin 127.0.0.1:$ADMIN --cache-memory 256MiB & pids+=($!)
# SHOAL_BASE=path: a second shoal build (e.g. before a change) as target `base`, same flags.
P_BASE=$(free_port)
if [ -n "${SHOAL_BASE:-}" ]; then
  RUST_LOG=warn taskset -c 1 "$SHOAL_BASE" proxy --threads 1 --listen 127.0.0.1:$P_BASE \
    --backend 127.0.0.1:$ORIGIN --admin 127.0.0.1:$(free_port) --cache-memory 256MiB & pids+=($!)
  wait_port "$P_BASE"
fi
for p in $ORIGIN $P_SHOAL $P_NGINX $P_VARNISH; do wait_port "$p"; done

declare -A RPS P99
read -r -a targets <<<"${TARGETS:-nginx varnish shoal}"
read -r -a sizes <<<"${SIZES:-1k 100k}"
port_of() { case $1 in nginx) echo $P_NGINX;; varnish) echo $P_VARNISH;; shoal) echo $P_SHOAL;; base) echo $P_BASE;; esac; }
to_ms() { python3 -c 'import sys,re; v=sys.argv[1]; m=re.match(r"([\d.]+)(us|ms|s)",v); n=float(m.group(1)); print({"us":n/1000,"ms":n,"s":n*1000}[m.group(2)])' "$1"; }
for s in "${sizes[@]}"; do for t in "${targets[@]}"; do
  curl -sf -o /dev/null "http://127.0.0.1:$(port_of $t)/$s"
  taskset -c 0 wrk -t1 -c50 -d2s "http://127.0.0.1:$(port_of $t)/$s" >/dev/null
  echo "$t /$s: $(curl -sI "http://127.0.0.1:$(port_of $t)/$s" | grep -iE '^(cache-status|x-varnish|age):' | tr -d '\r' | tr '\n' ' ')"
done; done
before=$(wc -l <"$work/no/access.log")
for s in "${sizes[@]}"; do
  for r in $(seq "$ROUNDS"); do
    for t in "${targets[@]}"; do
      out=$(taskset -c 0 wrk -t1 -c50 -d"${DURATION}"s --latency "http://127.0.0.1:$(port_of $t)/$s")
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
      errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
      [ -n "$errs" ] && echo "round $r $t $s: $errs" >&2
      RPS[$t/$s]+="$rps "; P99[$t/$s]+="$(to_ms "$p99") "
      printf 'round %d  %-4s %-8s %10.0f req/s  p99 %7.2f ms\n' "$r" "$s" "$t" "$rps" "$(to_ms "$p99")"
    done
  done
done
after=$(wc -l <"$work/no/access.log")

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "| object | target | req/s (median of $ROUNDS) | p99 ms (median) |"
echo "|---|---|---|---|"
for s in "${sizes[@]}"; do for t in "${targets[@]}"; do
  printf '| %s | %s | %.0f | %.2f |\n' "$s" "$t" "$(median <<<"${RPS[$t/$s]}")" "$(median <<<"${P99[$t/$s]}")"
done; done
echo
for s in "${sizes[@]}"; do
  S=$(median <<<"${RPS[shoal/$s]:-0}")
  [ -n "${RPS[nginx/$s]:-}" ] && printf '%s: shoal/NGINX %.2f (target >= 1.2 for 1k)' "$s" "$(echo "$S / $(median <<<"${RPS[nginx/$s]}")" | bc -l)"
  [ -n "${RPS[varnish/$s]:-}" ] && printf '   shoal/Varnish %.2f' "$(echo "$S / $(median <<<"${RPS[varnish/$s]}")" | bc -l)"
  [ -n "${RPS[base/$s]:-}" ] && printf '   shoal/base %.2f' "$(echo "$S / $(median <<<"${RPS[base/$s]}")" | bc -l)"
  echo
done
echo "origin requests during the measured rounds: $((after - before)) (0: every target answered from cache; /pass always reaches it)"
