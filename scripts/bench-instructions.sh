#!/usr/bin/env bash
# User-space instructions per small GET, counted by valgrind's callgrind, for the edge, nginx
# and HAProxy proxying the same upstream. Instruction counts do not depend on what else the
# machine is doing, so unlike requests/s (scripts/bench.sh) they can compare two builds, or two
# proxies, on a noisy shared machine. They leave out the kernel's share (system calls, context
# switches), which BENCHMARKS.md discusses.
#
#   scripts/bench-instructions.sh [--targets "edge nginx haproxy"] [--marina PATH] [--seconds 8]
#                                 [--no-build]
#
# --marina measures another build of the edge (e.g. an older commit built elsewhere). Everything
# binds to 127.0.0.1 and is stopped on exit. Needs valgrind (installed from Debian if missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGETS="edge nginx haproxy"
SECONDS_MEASURED=8
BUILD=1
MARINA=""
PORT_BASE=${BENCH_PORT_BASE:-18300}

while [ $# -gt 0 ]; do
  case "$1" in
    --targets) TARGETS=$2; shift 2 ;;
    --marina) MARINA=$2; shift 2 ;;
    --seconds) SECONDS_MEASURED=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

need=()
command -v valgrind >/dev/null || need+=(valgrind)
case " $TARGETS " in *" nginx "*) command -v nginx >/dev/null || need+=(nginx) ;; esac
case " $TARGETS " in *" haproxy "*) command -v haproxy >/dev/null || need+=(haproxy) ;; esac
if [ ${#need[@]} -gt 0 ]; then
  echo "installing from Debian: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
  cargo build --release -p marina-bench
  [ -n "$MARINA" ] || cargo build --release --bin marina
fi
TGT=${CARGO_TARGET_DIR:-$ROOT/target}/release
LOAD="$TGT/bench-load"
MARINA=${MARINA:-$TGT/marina}

UP_PORT=$((PORT_BASE + 1))
EDGE_PORT=$((PORT_BASE + 2))
NGINX_PORT=$((PORT_BASE + 4))
HAPROXY_PORT=$((PORT_BASE + 5))
NB=A1B2C3D4E5
SID=S1S2S3S4S5
OWNER=M1M2M3M4M5

WORK=$(mktemp -d /tmp/marina-instructions.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 240); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.25
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# The same configurations as scripts/bench.sh, nginx as one process (no master) for valgrind.
EDGE_ADMIN=$((PORT_BASE + 3))
NOFILE=$(ulimit -n)
HAPROXY_MAXCONN=1000
NGINX_MASTER=off
# shellcheck source=scripts/bench-config.sh
. "$ROOT/scripts/bench-config.sh"
write_bench_configs

taskset -c 0 "$TGT/bench-upstream" --listen "127.0.0.1:$UP_PORT" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT"

measure() { # measure NAME PORT COOKIE COMMAND…: prints instructions per request
  local name=$1 port=$2 cookie=$3
  shift 3
  taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$name.%p" "$@" \
    >"$WORK/$name.log" 2>&1 &
  local vp=$!
  PIDS+=("$vp")
  wait_port "$port"
  if [ "$cookie" = login ]; then
    local token
    token=$("$LOAD" mint --key "$WORK/url-signing.pem" --kid k1 --sub "$OWNER" --nb "$NB" --sid "$SID" --mode edit)
    cookie=$("$LOAD" login --addr "127.0.0.1:$port" --path "/notebooks/$NB/_auth?token=$token")
    echo "$cookie" >"$WORK/cookie"
  fi
  load() {
    taskset -c 1 "$LOAD" http --addr "127.0.0.1:$port" --path "/notebooks/$NB/small" -c 10 \
      --duration "$1" --warmup 0 --cookie "$cookie" --target "$name" --scenario small-10 --round 1
  }
  load 2 >/dev/null # warm up: connections, pools, caches
  callgrind_control -z "$vp" >/dev/null 2>&1
  local out count file ir
  out=$(load "$SECONDS_MEASURED")
  callgrind_control -d "$vp" >/dev/null 2>&1
  sleep 1
  count=$(echo "$out" | sed -n 's/.*"count":\([0-9]*\).*/\1/p')
  file=$(ls -t "$WORK"/cg."$name".*.* | head -1)
  ir=$(sed -n 's/^summary: //p' "$file" | head -1)
  printf '%-8s %10s requests  %14s instructions  %8s per request\n' \
    "$name" "$count" "$ir" "$((ir / count))"
  kill "$vp" 2>/dev/null || true
  wait "$vp" 2>/dev/null || true
}

echo "user-space instructions per small GET (10 connections, ${SECONDS_MEASURED} s under callgrind):"
for t in $TARGETS; do
  case "$t" in
    edge) measure edge "$EDGE_PORT" login "$MARINA" proxy --config "$WORK/edge.toml" ;;
    nginx)
      # The edge's cookie header when the edge ran first, so every proxy parses the same bytes.
      c=$(cat "$WORK/cookie" 2>/dev/null || echo "marina=$(openssl rand -hex 80)")
      measure nginx "$NGINX_PORT" "$c" nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
      ;;
    haproxy)
      c=$(cat "$WORK/cookie" 2>/dev/null || echo "marina=$(openssl rand -hex 80)")
      measure haproxy "$HAPROXY_PORT" "$c" haproxy -db -f "$WORK/haproxy.cfg"
      ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
done
