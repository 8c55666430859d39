#!/usr/bin/env bash
# Every check shoal's CI runs: formatting, lints, and all tests (unit, integration with real
# processes and sockets, promtool on /metrics). Installs the system packages the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# One target triple for build, clippy and test so C dependencies are built once.
export CARGO_BUILD_TARGET=${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# Every process the suite starts inherits this marker, so leftovers of *this* run can be
# found afterwards (other runs on the same machine carry other markers, or none).
export SHOAL_TEST_RUN="run-$$-$(date +%s%N)"
# Live (non-zombie) processes carrying the marker, other than this script and its cargo.
leftovers() {
  local pid
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    { [ "$pid" = "$$" ] || [ "$pid" = "$BASHPID" ]; } && continue
    if { tr '\0' '\n' < "$env"; } 2>/dev/null | grep -qx "SHOAL_TEST_RUN=$SHOAL_TEST_RUN"; then
      [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = "Z" ] && continue
      echo "$pid $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null)"
    fi
  done
}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# One test at a time: the integration tests run real fleets and load on a 2-core machine, and
# free ports picked by one test must not be taken by another's instances meanwhile.
cargo test --workspace -- --test-threads=1 2>&1 | tee "$log"
# One closing line over every test binary (cargo's last line is a doc-test run, often empty).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# The suite must leave nothing running: instances, shoal, servers it started. Give
# watchdogs and graceful stops a moment, then fail on anything still alive.
for _ in 1 2 3 4 5 6 7 8 9 10; do
  [ -z "$(leftovers)" ] && break
  sleep 1
done
left=$(leftovers)
if [ -n "$left" ]; then
  echo "FAIL: processes started by the tests are still running:" >&2
  echo "$left" >&2
  exit 1
fi
echo "no process left behind"
