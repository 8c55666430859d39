#!/usr/bin/env bash
# Certificate reload under load: h2load over TLS (h2, 20 long-lived connections) and curl
# (a new connection every 20 ms) for ${DURATION}s against `shoal proxy --tls-cert`, while the
# certificate files are replaced every second (written aside and renamed, as a deploy tool
# does; the file watch picks them up, plus a SIGHUP every 5 s). Prints h2load's summary
# (the figure to watch: 0 failed, 0 errored) and the subject new handshakes see at the end.
#
# Usage: bench/tls-reload.sh   (DURATION=20)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20}
need() { command -v "$1" >/dev/null 2>&1; }
if ! need h2load || ! need nginx || ! need openssl; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client nginx-light openssl >/dev/null
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
issue() { # issue CN: a new ECDSA pair, renamed into place
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$1" \
    -addext "subjectAltName=DNS:reload.test" -keyout "$work/key.tmp" -out "$work/cert.tmp" 2>/dev/null
  mv "$work/key.tmp" "$work/key.pem"; mv "$work/cert.tmp" "$work/cert.pem"
}

BACKEND=$(free_port); P=$(free_port); ADMIN=$(free_port)
mkdir -p "$work/nb"
cat >"$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/nb/pid; error_log $work/nb/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/nb; proxy_temp_path $work/nb; fastcgi_temp_path $work/nb; uwsgi_temp_path $work/nb; scgi_temp_path $work/nb;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "hello\n"; } } }
EOF
issue gen-0
nginx -c "$work/backend.conf" -p "$work/nb" 2>/dev/null & pids+=($!)
RUST_LOG=info "$SHOAL" proxy --threads 1 --listen 127.0.0.1:$P --backend 127.0.0.1:$BACKEND \
  --admin 127.0.0.1:$ADMIN --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --tls-watch 200ms 2>"$work/shoal.log" & pids+=($!); SHOAL_PID=$!
wait_port $BACKEND; wait_port $P

# -c 20 connections; --rate with --rate-period opens new connections throughout the run.
h2load -D "$DURATION" -c 20 -m 4 "https://127.0.0.1:$P/" >"$work/h2load-keep.txt" 2>&1 &
H1=$!
# And a new connection (full handshake, HTTP/1.1) every 20 ms: each sees whatever set serves.
( ok=0; bad=0; end=$((SECONDS + DURATION))
  while [ $SECONDS -lt $end ]; do
    if [ "$(curl -sk -o /dev/null -w '%{http_code}' "https://127.0.0.1:$P/")" = 200 ]; then ok=$((ok+1)); else bad=$((bad+1)); fi
    sleep 0.02
  done; echo "new connections: $ok answered 200, $bad failed" >"$work/new.txt" ) &
H2=$!
for i in $(seq 1 "$DURATION"); do
  sleep 1
  issue "gen-$i"
  [ $((i % 5)) -eq 0 ] && kill -HUP "$SHOAL_PID"
done
wait $H1 $H2 || true
echo "== long-lived connections (h2load -c 20 -m 4) =="; grep -E "^requests:|^status codes:|^finished in" "$work/h2load-keep.txt"
echo "== one new connection per request, throughout (curl) =="; cat "$work/new.txt"
echo "last certificate written: gen-$DURATION"
echo "a new handshake sees: $(openssl s_client -connect 127.0.0.1:$P -servername reload.test </dev/null 2>/dev/null | grep -m1 '^subject=')"
echo "reloads logged: $(grep -c 'tls certificates reloaded' "$work/shoal.log"), refused: $(grep -c 'tls reload refused' "$work/shoal.log" || true)"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^shoal_tls_' | grep -v ' 0$' || true
