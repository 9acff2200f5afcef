#!/usr/bin/env bash
# Issue #13's scale benchmark: a control plane on a throwaway PostgreSQL with N running notebooks
# (their upstream one benchmark-only stand-in server), M members in T teams, and two real edges
# (`marina proxy`) following the routes feed. Writes scale.json and report.md to the out folder
# and exits non-zero when a measurement could not be made.
#
#   scripts/bench-scale.sh [--notebooks N] [--members M] [--teams T] [--samples S] [--out DIR] [--quick]
#
# Defaults: 10,000 notebooks, 100,000 members, 2,000 teams, out target/bench-scale.
# --quick: 1,000 notebooks, 10,000 members, 200 teams, 20 samples per kind.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=target/bench-scale
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) args+=(--quick); shift ;;
    --out) out=$2; shift 2 ;;
    --notebooks|--members|--teams|--samples|--concurrency) args+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bench-scale: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "bench-scale: installing postgresql from Debian…" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
fi
echo "bench-scale: building marina and the scale benchmark (release)…" >&2
cargo build -q --release -p marina --bin marina -p marina-bench --bin scale
mkdir -p "$out"
exec target/release/scale run --marina target/release/marina --out "$out" "${args[@]}"
