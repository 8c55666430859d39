#!/usr/bin/env bash
# HTTP cache conformance: the public cache-tests suite (https://cache-tests.fyi, npm
# `http-cache-tests`) run through `shoal proxy --cache-memory 64MiB`.
#
# The suite's origin server (`server/server.mjs`) and `shoal proxy` in front of it run on
# free loopback ports; the suite's command-line client (`cli.mjs`) runs every test against
# the proxy and writes one result per test id (`true`, or `[error name, message]`). The
# script counts passes per kind (`required`, `optimal`, `check`; the test definitions'
# `kind`, `required` when absent), prints one summary line and every test that did not pass,
# with its kind, how it failed, its name and the failure message. The raw results go to $OUT.
#
# Usage: bench/cache-tests.sh
#   SHOAL_BIN=path     the shoal binary (default target/release/shoal, built if missing)
#   OUT=file           where to write the raw JSON results (default a temp file, kept)
#   ID=test-id         run one test only and show its requests and responses and shoal's
#                      log (debugging; RUST_LOG=debug for more)
#   CACHE_TESTS_VERSION=0.4.5, CACHE_MEMORY=64MiB, TIMEOUT=600 (seconds for the client)
#   CACHE_TESTS_DIR    where the suite is installed (default ~/.cache/shoal/cache-tests)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${CACHE_TESTS_VERSION:-0.4.5}
CACHE_MEMORY=${CACHE_MEMORY:-64MiB}
TIMEOUT=${TIMEOUT:-600}
ID=${ID:-}

command -v node >/dev/null || { echo "cache-tests: node (>= 14.8) and npm are needed" >&2; exit 1; }
if [ -z "${SHOAL_BIN:-}" ]; then
  [ -x target/release/shoal ] || cargo build --release -q -p shoal
fi
SHOAL=${SHOAL_BIN:-$PWD/target/release/shoal}
[ -x "$SHOAL" ] || { echo "cache-tests: no shoal binary at $SHOAL" >&2; exit 1; }

# The suite, installed once per version.
DIR=${CACHE_TESTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal/cache-tests}/$VERSION
PKG=$DIR/node_modules/http-cache-tests
if [ "$(node -p "try { require('$PKG/package.json').version } catch (e) { '' }")" != "$VERSION" ]; then
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --no-audit --no-fund --silent "http-cache-tests@$VERSION" >&2
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })'; }
wait_port() {
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "cache-tests: port $1 ($2) never opened" >&2; tail -20 "$work/$2.log" >&2; exit 1
}

ORIGIN=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
# The suite reads its settings from npm's environment variables (as `npm run server` and
# `npm run cli` would set them); the origin serves files from its working directory.
(cd "$PKG" && exec env npm_config_protocol=http npm_config_port="$ORIGIN" \
  npm_config_pidfile="$work/origin.pid" node server/server.mjs) >"$work/origin.log" 2>&1 &
pids+=($!)
RUST_LOG=${RUST_LOG:-warn} "$SHOAL" proxy --listen "127.0.0.1:$PROXY" --backend "127.0.0.1:$ORIGIN" \
  --admin "127.0.0.1:$ADMIN" --cache-memory "$CACHE_MEMORY" >"$work/shoal.log" 2>&1 &
pids+=($!)
wait_port "$ORIGIN" origin
wait_port "$PROXY" shoal

echo "cache-tests: http-cache-tests $VERSION, origin 127.0.0.1:$ORIGIN, shoal 127.0.0.1:$PROXY (--cache-memory $CACHE_MEMORY), $("$SHOAL" --version 2>/dev/null || echo "$SHOAL")" >&2
(cd "$PKG" && exec env -u npm_config_id npm_config_base="http://127.0.0.1:$PROXY" \
  npm_package_config_id="$ID" timeout "$TIMEOUT" node --no-warnings cli.mjs) >"$work/cli.out" 2>"$work/cli.err" &
pids+=($!)
rc=0; wait "${pids[-1]}" || rc=$?
if [ -n "$ID" ]; then
  cat "$work/cli.out"; cat "$work/cli.err" >&2
  if [ -s "$work/shoal.log" ]; then echo "=== shoal log (RUST_LOG=${RUST_LOG:-warn})"; cat "$work/shoal.log"; fi
  exit "$rc"
fi
if [ "$rc" != 0 ] || ! node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$work/cli.out" 2>/dev/null; then
  echo "cache-tests: the client failed (exit $rc)" >&2
  tail -20 "$work/cli.err" >&2; tail -20 "$work/shoal.log" >&2
  exit 1
fi
OUT=${OUT:-$(mktemp "${TMPDIR:-/tmp}/cache-tests-XXXXXX.json")}
cp "$work/cli.out" "$OUT"
kill -0 "${pids[1]}" 2>/dev/null || { echo "cache-tests: shoal exited during the run" >&2; tail -20 "$work/shoal.log" >&2; }

cat >"$work/summary.mjs" <<'EOF'
// Counts passes per kind and lists every test that did not pass, from the suite's own test
// definitions (the same list cli.mjs runs: tests/index.mjs plus surrogate-control).
import fs from 'fs'
import { pathToFileURL } from 'url'
const [pkg, resultsFile] = process.argv.slice(2)
const load = async f => (await import(pathToFileURL(`${pkg}/tests/${f}`).href)).default
const suites = await load('index.mjs')
suites.push(await load('surrogate-control.mjs'))
const results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))
const kinds = ['required', 'optimal', 'check']
const tests = new Map()
for (const suite of suites) {
  for (const test of suite.tests) {
    if (test.browser_only === true) continue
    tests.set(test.id, { ...test, kind: test.kind || 'required', suite: suite.name })
  }
}
const passed = id => results[id] === true
// As cache-tests.fyi shows it: a test whose dependency did not pass is "dependency failed"
// (shown grey there, whatever its own result), and that applies through chains of them.
const shownPass = id => passed(id) && (tests.get(id)?.depends_on || []).every(shownPass)
const depFailed = test => (test.depends_on || []).filter(d => !shownPass(d))
const count = { raw: {}, shown: {} }
for (const k of kinds) { count.raw[k] = [0, 0]; count.shown[k] = [0, 0] }
const failing = []
for (const test of tests.values()) {
  const k = test.kind
  count.raw[k][1]++; count.shown[k][1]++
  const deps = depFailed(test)
  if (passed(test.id)) {
    count.raw[k][0]++
    if (deps.length === 0) count.shown[k][0]++
    continue
  }
  const r = results[test.id]
  let how
  if (r === undefined) how = 'not run'
  else if (r[0] === 'Setup') how = r[1] === 'retry' ? 'retry' : 'setup failure'
  else if (r[0] === 'Assertion') how = { required: 'FAIL', optimal: 'not optimal', check: 'no' }[k]
  else how = `harness error (${r[0]})`
  if (deps.length) how += `; depends on failing ${deps.join(', ')}`
  failing.push({ test, how, message: r === undefined ? '' : String(r[1]) })
}
const fmt = c => kinds.map(k => `${k} ${c[k][0]}/${c[k][1]}`).join(', ')
console.log(`cache-tests: ${fmt(count.raw)}`)
if (fmt(count.raw) !== fmt(count.shown)) {
  console.log(`  (passes whose dependencies also pass, as cache-tests.fyi shows them: ${fmt(count.shown)})`)
}
for (const k of kinds) {
  const list = failing.filter(f => f.test.kind === k)
  if (list.length === 0) continue
  console.log(`\n${k}: ${list.length} not passed`)
  for (const { test, how, message } of list) {
    const known = test.id.startsWith('age-parse-') ? ' [known: the suite changed these, see bench/README.md]' : ''
    console.log(`  ${test.id}  [${how}]${known}\n      ${test.name}\n      -> ${message}`)
  }
}
const unknown = Object.keys(results).filter(id => !tests.has(id))
if (unknown.length) console.log(`\nresults for ids not in the definitions: ${unknown.join(', ')}`)
EOF
node "$work/summary.mjs" "$PKG" "$OUT"
echo "raw results: $OUT"
