#!/usr/bin/env bash
# What the notebook sandbox costs: start → running and memory of one idle local notebook,
# sandboxed (the default, bubblewrap + pasta) and unsandboxed (runtime.local.sandbox = "none"),
# measured in the same run, alternating the two modes.
#   scripts/bench-sandbox.sh [STARTS]        (default 5 per mode)
# Uses target/release/marina, or BENCH_MARINA_BIN. Memory is the resident set (RSS, and PSS from
# /proc/<pid>/smaps_rollup) summed over every process of the notebook: the servers, their
# kernels, and for a sandbox its bwrap and pasta processes. Prints a markdown table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
starts=${1:-5}
bin=${BENCH_MARINA_BIN:-target/release/marina}
[ -x "$bin" ] || cargo build --release --bin marina
venv=${NOTEBOOK_VENV:-$root/.venv}
cport=18580; eport=18500; aport=18590
api=http://127.0.0.1:$cport
now() { date +%s.%N; }
pid=
stop() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; pid=; }
trap 'stop' EXIT

# Every process of a notebook: members of the recorded process groups and of the PID
# namespaces of its sandboxes.
notebook_pids() {
  python3 - "$1" <<'PY'
import json, os, sys
run = json.load(open(sys.argv[1]))
groups, nss = set(), set()
for s in ("sail", "marimo"):
    for p in (run[s]["pid"], (run[s].get("net") or {}).get("pid")):
        if p is None: continue
        groups.add(p)
        try:
            for c in open(f"/proc/{p}/task/{p}/children").read().split():
                nss.add(os.readlink(f"/proc/{c}/ns/pid"))
        except OSError: pass
own = os.readlink("/proc/self/ns/pid")
nss.discard(own)
for d in os.listdir("/proc"):
    if not d.isdigit(): continue
    try:
        st = open(f"/proc/{d}/stat").read()
        pgrp = int(st[st.rfind(")") + 2:].split()[2])
        ns = os.readlink(f"/proc/{d}/ns/pid")
    except OSError: continue
    if pgrp in groups or ns in nss: print(d)
PY
}
mem_kib() { # RSS and PSS sums, KiB
  local rss=0 pss=0 r p
  for p in $(notebook_pids "$1"); do
    r=$(awk '/^VmRSS:/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)
    s=$(awk '/^Pss:/ {print $2}' /proc/$p/smaps_rollup 2>/dev/null || echo 0)
    rss=$((rss + ${r:-0})); pss=$((pss + ${s:-0}))
  done
  echo "$rss $pss"
}

declare -A times rss pss breakdown
for round in $(seq "$starts"); do
  for mode in bubblewrap none; do
    data=$(mktemp -d /tmp/marina-sandbox-bench.XXXXXX)
    MARINA_RUNTIME__LOCAL__SANDBOX=$mode MARINA_RUNTIME__LOCAL__VENV_DIR=$venv \
      MARINA_PROXY__ADMIN_LISTEN=127.0.0.1:$aport "$bin" serve --data-dir "$data" \
      --control-listen 127.0.0.1:$cport --proxy-listen 127.0.0.1:$eport >"$data/serve.log" 2>&1 &
    pid=$!
    until grep -q "Marina is ready" "$data/serve.log" 2>/dev/null; do
      kill -0 "$pid" 2>/dev/null || { cat "$data/serve.log"; exit 1; }
      sleep 0.05
    done
    key=$(cat "$data/admin-api-key")
    H=(-H "Authorization: Bearer $key" -H "Content-Type: application/json")
    cfg=$(curl -fsS "${H[@]}" $api/workloads/configs -d '{"name":"bench","config":{"sail":{}}}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
    nb=$(curl -fsS "${H[@]}" $api/workloads/notebooks -d "{\"workloadConfigId\":\"$cfg\",\"name\":\"bench\"}" | python3 -c 'import sys,json;print(json.load(sys.stdin)["item"]["notebookId"])')
    t0=$(now)
    curl -fsS "${H[@]}" -X POST $api/workloads/notebooks/$nb/start >/dev/null
    while :; do
      s=$(curl -fsS "${H[@]}" $api/workloads/notebooks/$nb | python3 -c 'import sys,json;print(json.load(sys.stdin)["included"]["notebooks"][0]["status"])')
      case $s in running|idle|detached) break;; failed) echo "start failed ($mode)"; cat "$data/serve.log"; exit 1;; esac
      sleep 0.02
    done
    times[$mode]+="$(python3 -c 'import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 3))' "$(now)" "$t0") "
    sleep 3 # let both servers settle before reading memory
    read -r r p < <(mem_kib "$data/notebooks/$nb/run.json")
    rss[$mode]+="$r "; pss[$mode]+="$p "
    # Where the memory is, by program (the last round's of each mode is printed).
    breakdown[$mode]=$(for q in $(notebook_pids "$data/notebooks/$nb/run.json"); do
        printf '%s %s\n' "$(cat /proc/$q/comm 2>/dev/null)" "$(awk '/^Pss:/ {print $2}' /proc/$q/smaps_rollup 2>/dev/null || echo 0)"
      done | awk '{n[$1]++; k[$1]+=$2} END {for (c in k) printf "%s×%d %.1f MiB; ", c, n[c], k[c]/1024}')
    stop
    rm -rf "$data"
  done
done
median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '| %s | sandboxed (bubblewrap + pasta) | unsandboxed | ratio |\n|---|---:|---:|---:|\n' "median of $starts"
tb=$(median "${times[bubblewrap]}"); tn=$(median "${times[none]}")
printf '| start → running, s | %s | %s | %.2f× |\n' "$tb" "$tn" "$(python3 -c "print($tb/$tn)")"
rb=$(median "${rss[bubblewrap]}"); rn=$(median "${rss[none]}")
printf '| RSS of all the notebook'"'"'s processes, MiB | %.0f | %.0f | %.2f× |\n' "$(python3 -c "print($rb/1024)")" "$(python3 -c "print($rn/1024)")" "$(python3 -c "print($rb/$rn)")"
pb=$(median "${pss[bubblewrap]}"); pn=$(median "${pss[none]}")
printf '| PSS of the same, MiB | %.0f | %.0f | %.2f× |\n' "$(python3 -c "print($pb/1024)")" "$(python3 -c "print($pn/1024)")" "$(python3 -c "print($pb/$pn)")"
echo
echo "raw start seconds: sandboxed ${times[bubblewrap]}; unsandboxed ${times[none]}"
echo "PSS by program, sandboxed: ${breakdown[bubblewrap]}"
echo "PSS by program, unsandboxed: ${breakdown[none]}"
