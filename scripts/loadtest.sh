#!/usr/bin/env bash
# The load-tested deployment, on this machine's loopback: a throwaway PostgreSQL, the control
# plane (with the local runtime: real Marimo and Sail in their sandboxes), N edge replicas,
# notebooks with an owner working and viewers watching, faults injected while they do.
# Writes report.md, report.json and timeline.svg (and the parts' logs) to the output folder and
# exits non-zero when a check failed.
#
#   scripts/loadtest.sh [--smoke] [--notebooks N] [--viewers V] [--edges E] [--duration S]
#                       [--direct K] [--large-bytes B] [--think-ms MIN-MAX] [--no-faults]
#                       [--out DIR] [--release]
#
# --smoke: 3 notebooks (+1 straight to Marimo, +1 idle tab, +1 closed tab), 2 viewers each,
# 2 edges, 100 s: about 3 minutes on 2 cores; scripts/test.sh runs it. Without --smoke the
# defaults are 8 notebooks (+2 direct), 3 viewers, 2 edges, 300 s, built with --release.
# To size a real deployment instead, see docs/deploy.md ("Load-testing your deployment").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=release
out=target/loadtest
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) args+=(--smoke); profile=${LOADTEST_PROFILE:-debug}; out=target/loadtest-smoke; shift ;;
    --release) profile=release; shift ;;
    --out) out=$2; shift 2 ;;
    --no-faults) args+=("$1"); shift ;;
    --notebooks|--viewers|--edges|--duration|--direct|--large-bytes|--think-ms) args+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "loadtest: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# What it needs, as scripts/test.sh installs it: PostgreSQL, the sandbox tools, the venv.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
   || ! command -v bwrap >/dev/null || ! command -v pasta >/dev/null; then
  echo "loadtest: installing postgresql, bubblewrap and passt from Debian…" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql bubblewrap passt >&2
fi
export NOTEBOOK_VENV=${NOTEBOOK_VENV:-$root/.venv}
[ -x "$NOTEBOOK_VENV/bin/marimo" ] || scripts/setup-python.sh "$NOTEBOOK_VENV" >&2

flag=; [ "$profile" = release ] && flag=--release
echo "loadtest: building marina and the load test ($profile)…" >&2
cargo build -q $flag -p marina --bin marina -p marina-bench --bin loadtest
mkdir -p "$out"
exec "target/$profile/loadtest" --marina "target/$profile/marina" --out "$out" "${args[@]}"
