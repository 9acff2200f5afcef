#!/usr/bin/env bash
# The whole test suite, on a fresh machine: what README.md tells you to run and what .ci/run runs.
# It installs and starts what the tests need (a throwaway PostgreSQL, the pinned notebook Python
# environment, Debian's Chromium for the browser tests), then runs lints, every Rust test
# (unit, API on SQLite and PostgreSQL, real Marimo and Sail processes, end to end), the
# smoke-size load test (scripts/loadtest.sh --smoke: its report lands in target/loadtest-smoke)
# and the browser tests.
#   scripts/test.sh            everything
#   SKIP_LINT=1 scripts/test.sh   without fmt/clippy
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n== %s\n' "$*"; }

step "PostgreSQL for the store tests"
started_pg=
if [ -z "${TEST_POSTGRES_URL:-}" ]; then
  TEST_POSTGRES_URL=$(scripts/pg-test-server.sh)
  started_pg=1
fi
export TEST_POSTGRES_URL
echo "$TEST_POSTGRES_URL"
cleanup() { if [ -n "$started_pg" ]; then scripts/pg-test-server.sh stop || true; fi; }
trap cleanup EXIT

step "notebook sandbox tools (bubblewrap, passt)"
if ! command -v bwrap >/dev/null || ! command -v pasta >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap passt
fi
bwrap --version; command -v pasta

step "notebook Python environment (marimo, pysail, pyspark-client)"
scripts/setup-python.sh "$root/.venv"
export NOTEBOOK_VENV="$root/.venv"

if [ -z "${SKIP_LINT:-}" ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy"
  cargo clippy --workspace --all-targets -- -D warnings
fi

step "cargo test"
cargo test --workspace --no-fail-fast

step "the notebook sandbox as an unprivileged Marina makes it"
scripts/test-sandbox-unprivileged.sh

step "load test, smoke size (PostgreSQL, control plane, 2 edges, real notebooks, faults)"
scripts/loadtest.sh --smoke --out target/loadtest-smoke

if [ -x scripts/browser-test.sh ]; then
  step "browser tests (headless Chromium)"
  BROWSER_TEST_PREBUILT=1 scripts/browser-test.sh
fi
step "all tests passed"
