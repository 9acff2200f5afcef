#!/usr/bin/env bash
# Measures what a person waits for: how long `marina serve` takes to be ready (first run, which
# installs the notebook environment, and a second run), and how long a local notebook takes from
# `start` to running (Sail and Marimo both healthy), over several starts.
#   scripts/bench-startup.sh [STARTS]        (default 5)
# Uses target/release/marina (built if missing). Prints a markdown table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
starts=${1:-5}
[ -x target/release/marina ] || cargo build --release --bin marina
data=$(mktemp -d /tmp/marina-startup.XXXXXX)
cport=18480; eport=18400; aport=18490
api=http://127.0.0.1:$cport
now() { date +%s.%N; }
since() { python3 -c 'import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 3))' "$(now)" "$1"; }
pid=
stop() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; pid=; }
trap 'stop; rm -rf "$data"' EXIT

# Starts the server and sets `ready` to the seconds it took (no subshell: `pid` must survive).
serve() {
  MARINA_PROXY__ADMIN_LISTEN=127.0.0.1:$aport target/release/marina serve --data-dir "$data" \
    --control-listen 127.0.0.1:$cport --proxy-listen 127.0.0.1:$eport >"$data/serve-$1.log" 2>&1 &
  pid=$!
  local t0; t0=$(now)
  until grep -q "Marina is ready" "$data/serve-$1.log" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat "$data/serve-$1.log"; exit 1; }
    sleep 0.05
  done
  ready=$(since "$t0")
}

serve first; first=$ready
stop
serve second; second=$ready
key=$(cat "$data/admin-api-key")
H=(-H "Authorization: Bearer $key" -H "Content-Type: application/json")
cfg=$(curl -fsS "${H[@]}" $api/workloads/configs -d '{"name":"bench","config":{"sail":{}}}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
nb=$(curl -fsS "${H[@]}" $api/workloads/notebooks -d "{\"workloadConfigId\":\"$cfg\",\"name\":\"bench\"}" | python3 -c 'import sys,json;print(json.load(sys.stdin)["item"]["notebookId"])')
times=()
for _ in $(seq "$starts"); do
  t0=$(now)
  curl -fsS "${H[@]}" -X POST $api/workloads/notebooks/$nb/start >/dev/null
  while :; do
    s=$(curl -fsS "${H[@]}" $api/workloads/notebooks/$nb | python3 -c 'import sys,json;print(json.load(sys.stdin)["included"]["notebooks"][0]["status"])')
    case $s in running|idle|detached) break;; failed) echo "start failed"; exit 1;; esac
    sleep 0.02
  done
  times+=("$(since "$t0")")
  curl -fsS "${H[@]}" -X POST $api/workloads/notebooks/$nb/stop >/dev/null
  until [ "$(curl -fsS "${H[@]}" $api/workloads/notebooks/$nb | python3 -c 'import sys,json;print(json.load(sys.stdin)["included"]["notebooks"][0]["status"])')" = stopped ]; do sleep 0.05; done
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
median=$(echo "$sorted" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
printf '| what | seconds |\n|---|---|\n'
printf '| first `marina serve` ready (installs the notebook environment) | %.1f |\n' "$first"
printf '| second `marina serve` ready | %.2f |\n' "$second"
printf '| local notebook start → running, median of %s (min %.2f, max %.2f) | %.2f |\n' \
  "$starts" "$(echo "$sorted" | head -1)" "$(echo "$sorted" | tail -1)" "$median"
