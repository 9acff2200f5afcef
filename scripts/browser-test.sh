#!/usr/bin/env bash
# The browser tests: a real `marina serve` (control plane, edge, local runtime with real Marimo
# and Sail), the example host page, and Debian's headless Chromium driven by tests/browser/run.mjs.
#   scripts/browser-test.sh
# Screenshots of every step go to $ARTIFACTS_DIR (default artifacts/browser). The server listens
# on its own ports (CONTROL_PORT 18080, EDGE_PORT 18000, EDGE_ADMIN_PORT 19090) so that a
# `marina serve` on the defaults can keep running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
control_port=${CONTROL_PORT:-18080}
edge_port=${EDGE_PORT:-18000}
admin_port=${EDGE_ADMIN_PORT:-19090}
artifacts=${ARTIFACTS_DIR:-$root/artifacts/browser}

if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
scripts/setup-python.sh "$root/.venv"
# scripts/test.sh has just built target/debug/marina with `cargo test` (whose feature set differs
# from a plain `cargo build`): reuse it instead of rebuilding the dependency tree.
if [ -z "${BROWSER_TEST_PREBUILT:-}" ] || [ ! -x target/debug/marina ]; then
  cargo build --bin marina
fi

data=$(mktemp -d /tmp/marina-browser-test.XXXXXX)
mkdir -p "$artifacts"
# A short idle_after, so that the tests see a shown but untouched notebook become idle; exported,
# so that run.mjs knows it too.
export MARINA_CONTROL__IDLE_AFTER_SECONDS=${MARINA_CONTROL__IDLE_AFTER_SECONDS:-10}
# Its own process group (setsid), so that stopping it takes everything it started.
MARINA_RUNTIME__LOCAL__VENV_DIR="$root/.venv" \
MARINA_PROXY__ADMIN_LISTEN="127.0.0.1:$admin_port" \
  setsid target/debug/marina serve --data-dir "$data" \
    --control-listen "127.0.0.1:$control_port" --proxy-listen "127.0.0.1:$edge_port" \
    >"$artifacts/marina-serve.log" 2>&1 &
server=$!
stop_server() {
  kill -TERM -- "-$server" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$server" 2>/dev/null || true
  rm -rf "$data"
}
trap stop_server EXIT

echo "waiting for marina serve (log: $artifacts/marina-serve.log)"
for i in $(seq 240); do
  if curl -fsS "http://127.0.0.1:$control_port/readyz" >/dev/null 2>&1 && [ -s "$data/admin-api-key" ]; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "marina serve exited:"; tail -30 "$artifacts/marina-serve.log"; exit 1; fi
  if [ "$i" = 240 ]; then echo "marina serve not ready after 120 s:"; tail -30 "$artifacts/marina-serve.log"; exit 1; fi
  sleep 0.5
done

status=0
HOST_URL="http://127.0.0.1:$control_port" EDGE_URL="http://127.0.0.1:$edge_port" \
ADMIN_KEY=$(cat "$data/admin-api-key") ARTIFACTS_DIR="$artifacts" \
  node tests/browser/run.mjs || status=$?
if [ "$status" != 0 ]; then echo "last lines of the server log:"; tail -40 "$artifacts/marina-serve.log"; fi
exit "$status"
