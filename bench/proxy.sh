#!/usr/bin/env bash
# Proxy throughput: shoal vs HAProxy vs NGINX vs Pingora, measured in the same run.
#
# Backend: Debian's nginx, 1 worker, `return 200 "hello\n"`. Each proxy runs alone on CPU 1
# with one worker thread; wrk and the backend share CPU 0. wrk -t1 -c50 -d${DURATION}s
# --latency runs alternately against each target for ${ROUNDS} rounds; the medians (proxy CPU
# per request first) and the ratios shoal/HAProxy, shoal/Pingora, shoal/NGINX, shoal/direct are
# printed. Then shoal's idle RSS and its RSS holding 10,000 idle keep-alive client connections.
#
# Pingora is the minimal load balancer in bench/pingora (its own Cargo project, built here on
# first use into bench/pingora/target; needs cmake, installed via apt if missing), or
# PINGORA_BIN=path.
#
# MODE=close measures a new connection per request instead: wrk -t1 -c20 with
# `Connection: close`; upstream connections stay pooled in both modes.
#
# Usage: bench/proxy.sh            (ROUNDS=5 DURATION=10 IDLE_CONNS=10000 by default;
#        TARGETS="haproxy shoal" for a quick A/B, IDLE_CONNS=0 to skip the memory part,
#        MODE=close for a new client connection per request)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
IDLE_CONNS=${IDLE_CONNS:-10000}
MODE=${MODE:-keepalive}
case $MODE in
  keepalive) WRK=(-t1 -c50) ;;
  close) WRK=(-t1 -c20 -H "Connection: close") ;;
  *) echo "MODE is keepalive or close" >&2; exit 2 ;;
esac
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need haproxy || ! need nginx; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk haproxy nginx-light >/dev/null
fi
[ -n "${SHOAL_BIN:-}" ] || [ -x target/release/shoal ] || cargo build --release -q
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}
read -r -a targets <<<"${TARGETS:-direct haproxy nginx pingora shoal}"
has_target() { local t; for t in "${targets[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
PINGORA=${PINGORA_BIN:-$PWD/bench/pingora/target/release/pingora-lb}
if has_target pingora && [ -z "${PINGORA_BIN:-}" ]; then
  # libz-ng-sys (a Pingora dependency) builds zlib-ng with cmake.
  need cmake || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
  cargo build --release -q --manifest-path bench/pingora/Cargo.toml
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

BACKEND=$(free_port); P_SHOAL=$(free_port); P_HAPROXY=$(free_port); P_NGINX=$(free_port); ADMIN=$(free_port)
P_PINGORA=$(free_port)
mkdir -p "$work/nb" "$work/np"
cat >"$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/nb/pid; error_log $work/nb/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/nb; proxy_temp_path $work/nb; fastcgi_temp_path $work/nb; uwsgi_temp_path $work/nb; scgi_temp_path $work/nb;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "hello\n"; } } }
EOF
cat >"$work/proxy.conf" <<EOF
worker_processes 1; daemon off; pid $work/np/pid; error_log $work/np/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/np; proxy_temp_path $work/np; fastcgi_temp_path $work/np; uwsgi_temp_path $work/np; scgi_temp_path $work/np;
  keepalive_requests 1000000;
  upstream b { server 127.0.0.1:$BACKEND; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$P_NGINX; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
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
  bind 127.0.0.1:$P_HAPROXY
  default_backend b
backend b
  server s1 127.0.0.1:$BACKEND
EOF

taskset -c 0 nginx -c "$work/backend.conf" -p "$work/nb" 2>/dev/null & pids+=($!)
taskset -c 1 nginx -c "$work/proxy.conf" -p "$work/np" 2>/dev/null & pids+=($!); NGINX_PID=$!
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db 2>/dev/null & pids+=($!); HAPROXY_PID=$!
RUST_LOG=warn taskset -c 1 "$SHOAL" proxy --threads 1 --listen 127.0.0.1:$P_SHOAL \
  --backend 127.0.0.1:$BACKEND --admin 127.0.0.1:$ADMIN & pids+=($!); SHOAL_PID=$!
ports="$BACKEND $P_SHOAL $P_HAPROXY $P_NGINX"
if has_target pingora; then
  # One process, one service thread (threads: 1), not daemonized: this pid does the work.
  taskset -c 1 "$PINGORA" 127.0.0.1:$P_PINGORA 127.0.0.1:$BACKEND & pids+=($!); PINGORA_PID=$!
  ports+=" $P_PINGORA"
fi
for p in $ports; do wait_port "$p"; done

IDLE_RSS_KB=$(awk '/VmRSS/ {print $2}' /proc/$SHOAL_PID/status)
# NGINX does its work in the worker, a child of the master started above.
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1)

# CPU time (user + system, clock ticks) a proxy has used so far; 0 for the direct target.
cpu_ticks() {
  local pid
  case $1 in haproxy) pid=$HAPROXY_PID;; nginx) pid=$NGINX_WORKER;; pingora) pid=$PINGORA_PID;; shoal) pid=$SHOAL_PID;;
    *) echo 0; return;; esac
  awk '{print $14 + $15}' "/proc/$pid/stat"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

declare -A RPS P99 CPU
port_of() { case $1 in direct) echo $BACKEND;; haproxy) echo $P_HAPROXY;; nginx) echo $P_NGINX;; pingora) echo $P_PINGORA;;
  shoal) echo $P_SHOAL;; esac; }
to_ms() { # wrk latency like 1.23ms / 456.00us / 1.02s -> ms
  python3 -c 'import sys,re; v=sys.argv[1]; m=re.match(r"([\d.]+)(us|ms|s)",v); n=float(m.group(1)); print({"us":n/1000,"ms":n,"s":n*1000}[m.group(2)])' "$1"; }
for t in "${targets[@]}"; do taskset -c 0 wrk "${WRK[@]}" -d2s "http://127.0.0.1:$(port_of $t)/" >/dev/null; done # warm-up
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    c0=$(cpu_ticks "$t")
    out=$(taskset -c 0 wrk "${WRK[@]}" -d"${DURATION}"s --latency "http://127.0.0.1:$(port_of $t)/")
    c1=$(cpu_ticks "$t")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu_us=$(echo "($c1 - $c0) * $TICK_US / $total" | bc -l)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
    [ -n "$errs" ] && echo "round $r $t: $errs" >&2
    RPS[$t]+="$rps "; P99[$t]+="$(to_ms "$p99") "; CPU[$t]+="$cpu_us "
    printf 'round %d  %-8s %10.0f req/s  p99 %7.2f ms  proxy CPU %5.1f us/req\n' "$r" "$t" "$rps" "$(to_ms "$p99")" "$cpu_us"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "mode: $MODE (wrk ${WRK[*]})"
echo "| target | proxy CPU us/req (median of $ROUNDS) | req/s (median) | p99 ms (median) | ratio to direct |"
echo "|---|---|---|---|---|"
[ -n "${RPS[direct]:-}" ] || RPS[direct]="${RPS[shoal]}"
D=$(median <<<"${RPS[direct]}")
for t in "${targets[@]}"; do
  m=$(median <<<"${RPS[$t]}"); p=$(median <<<"${P99[$t]}"); c=$(median <<<"${CPU[$t]}")
  printf '| %s | %.1f | %.0f | %.2f | %.2f |\n' "$t" "$c" "$m" "$p" "$(echo "$m / $D" | bc -l)"
done
S=$(median <<<"${RPS[shoal]}"); H=$(median <<<"${RPS[haproxy]:-$S}"); N=$(median <<<"${RPS[nginx]:-$S}")
SP=$(median <<<"${P99[shoal]}"); HP=$(median <<<"${P99[haproxy]:-${P99[shoal]}}")
echo
printf 'shoal/HAProxy req/s: %.2f   (target >= 1.15)\n' "$(echo "$S / $H" | bc -l)"
if [ -n "${RPS[haproxy]:-}" ]; then
  # Rounds alternate targets, so a round's pair saw the same machine state.
  read -r -a sr <<<"${RPS[shoal]}"; read -r -a hr <<<"${RPS[haproxy]}"
  per=""; for i in "${!sr[@]}"; do per+="$(echo "${sr[$i]} / ${hr[$i]}" | bc -l | cut -c1-4) "; done
  printf 'shoal/HAProxy per round: %s(median %.2f)\n' "$per" "$(median <<<"$per")"
  printf 'proxy CPU per request, shoal/HAProxy: %.2f\n' "$(echo "$(median <<<"${CPU[shoal]}") / $(median <<<"${CPU[haproxy]}")" | bc -l)"
fi
if [ -n "${RPS[pingora]:-}" ]; then
  G=$(median <<<"${RPS[pingora]}")
  read -r -a sr <<<"${RPS[shoal]}"; read -r -a gr <<<"${RPS[pingora]}"
  per=""; for i in "${!sr[@]}"; do per+="$(echo "${sr[$i]} / ${gr[$i]}" | bc -l | cut -c1-4) "; done
  printf 'shoal/Pingora req/s: %.2f\n' "$(echo "$S / $G" | bc -l)"
  printf 'shoal/Pingora per round: %s(median %.2f)\n' "$per" "$(median <<<"$per")"
  printf 'proxy CPU per request, shoal/Pingora: %.2f\n' "$(echo "$(median <<<"${CPU[shoal]}") / $(median <<<"${CPU[pingora]}")" | bc -l)"
fi
printf 'shoal/NGINX   req/s: %.2f\n' "$(echo "$S / $N" | bc -l)"
printf 'shoal/direct  req/s: %.2f\n' "$(echo "$S / $D" | bc -l)"
printf 'p99 shoal %.2f ms vs HAProxy %.2f ms (target: no worse)\n' "$SP" "$HP"

# Memory: idle, then holding IDLE_CONNS idle keep-alive client connections.
[ "$IDLE_CONNS" -gt 0 ] || exit 0
python3 - "$P_SHOAL" "$IDLE_CONNS" "$SHOAL_PID" "$IDLE_RSS_KB" <<'EOF'
import asyncio, resource, sys
port, n, pid, idle_kb = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
def rss_kb():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
async def one(conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    await w.drain()
    await r.readuntil(b"hello\n")
    conns.append(w)
async def main():
    conns = []
    sem = asyncio.Semaphore(500)
    async def guarded():
        async with sem:
            await one(conns)
    await asyncio.gather(*(guarded() for _ in range(n)))
    await asyncio.sleep(1)
    print(f"\nshoal idle RSS: {idle_kb/1024:.1f} MiB (target <= 15 MB)")
    print(f"shoal RSS with {len(conns)} idle keep-alive connections: {rss_kb()/1024:.1f} MiB")
    for w in conns:
        w.close()
asyncio.run(main())
EOF
