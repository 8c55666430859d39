#!/usr/bin/env bash
# Fuzzes the parts of the data path that read untrusted bytes — the request-head planner and
# the hygiene rules under it, the response planner, the chunk tracker, the route matcher and
# config parsing — with the property tests in crates/shoal-proxy/src/fuzz/, built in release.
# Prints the inputs run and the panics found per target and in total; fails if any property
# fails, anything panics, or fewer than TOTAL inputs ran.
#
# Usage: bench/fuzz.sh                 (TOTAL=1000000 inputs, spread over the targets)
#        TOTAL=100000 bench/fuzz.sh    (a shorter pass)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_TARGET=${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}
TOTAL=${TOTAL:-1000000}
# Property targets in crates/shoal-proxy/src/fuzz/ (the tests that call `run`).
TARGETS=$(grep -rhoE '^\s*run\(\s*$|^\s*run\("' crates/shoal-proxy/src/fuzz/*.rs | wc -l)
export SHOAL_FUZZ_CASES=$(((TOTAL + TARGETS - 1) / TARGETS))
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo test --release -q -p shoal-proxy --lib --no-run
start=$(date +%s%N)
set +e
cargo test --release -q -p shoal-proxy --lib h1::fuzz:: -- --test-threads=2 --nocapture >"$log" 2>&1
rc=$?
set -e
ms=$((($(date +%s%N) - start) / 1000000))
# Test progress dots may precede a line: match the counts anywhere.
counts=$(grep -aoE 'fuzz [a-z_]+: [0-9]+ (inputs, [0-9]+ panics|of [0-9]+ heads planned)' "$log" || true)
echo "$counts"
grep -aE 'test result:|panicked|FAILED|failed' "$log" || true
read -r inputs panics < <(awk '/inputs,/ { n += $3; p += $5 } END { print n + 0, p + 0 }' <<<"$counts")
printf 'inputs run: %d (%d targets x %d cases), panics found: %d, time: %d.%01d s\n' \
  "$inputs" "$TARGETS" "$SHOAL_FUZZ_CASES" "$panics" $((ms / 1000)) $((ms % 1000 / 100))
if [ "$rc" -ne 0 ] || [ "$panics" -ne 0 ] || [ "$inputs" -lt "$TOTAL" ]; then
  echo "FAILED (see the output above)"
  exit 1
fi
