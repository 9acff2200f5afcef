#!/usr/bin/env bash
# Marina's performance harness: the edge against the upstream directly, nginx and HAProxy, in one
# run on this machine, with the proxy and the upstream pinned to CPU 0 and the load generator to
# CPU 1. Writes the medians and ratios into BENCHMARKS.md (between the bench markers).
#
#   scripts/bench.sh [--targets "direct edge nginx haproxy relay"] [--rounds 3] [--duration 8]
#                    [--warmup 1] [--idle 2000] [--quiet-wait 90] [--no-build] [--no-report]
#
# Every server binds to 127.0.0.1 and all load goes there. Everything started here is stopped on
# exit. Needs root only to install nginx/haproxy when they are missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGETS="direct edge nginx haproxy relay"
ROUNDS=3
DURATION=8
WARMUP=1
IDLE_CONNS=2000
QUIET_WAIT=90
BUILD=1
REPORT=1
PORT_BASE=${BENCH_PORT_BASE:-18100}

while [ $# -gt 0 ]; do
  case "$1" in
    --targets) TARGETS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --idle) IDLE_CONNS=$2; shift 2 ;;
    --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-report) REPORT=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

case " $TARGETS " in *" edge "*) WANT_EDGE=1 ;; *) WANT_EDGE=0 ;; esac

UP_PORT=$((PORT_BASE + 1))
EDGE_PORT=$((PORT_BASE + 2))
EDGE_ADMIN=$((PORT_BASE + 3))
NGINX_PORT=$((PORT_BASE + 4))
HAPROXY_PORT=$((PORT_BASE + 5))
RELAY_PORT=$((PORT_BASE + 6))
NB=A1B2C3D4E5
SID=S1S2S3S4S5
OWNER=M1M2M3M4M5
P=/notebooks/$NB

# Two CPUs are needed to separate the load generator from what it measures.
if [ "$(nproc --all)" -lt 2 ]; then
  echo "bench.sh needs at least 2 CPUs (proxy+upstream on 0, load generator on 1)" >&2
  exit 1
fi
PIN_SERVER="taskset -c 0"
PIN_LOAD="taskset -c 1"

# 2,000 held WebSockets: the client, the proxy (both sides) and the upstream each need a socket.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# HAProxy needs two descriptors per connection and checks the limit up front.
HAPROXY_MAXCONN=$(((NOFILE - 200) / 2))
if [ "$HAPROXY_MAXCONN" -gt 30000 ]; then HAPROXY_MAXCONN=30000; fi
if [ "$NOFILE" -lt $((IDLE_CONNS * 2 + 1000)) ]; then
  echo "open-file limit $(ulimit -n) is too low for $IDLE_CONNS idle WebSockets" >&2
  exit 1
fi

# --- tools ------------------------------------------------------------------------------------
need_apt=()
case " $TARGETS " in *" nginx "*) command -v nginx >/dev/null || need_apt+=(nginx) ;; esac
case " $TARGETS " in *" haproxy "*) command -v haproxy >/dev/null || need_apt+=(haproxy) ;; esac
command -v openssl >/dev/null || need_apt+=(openssl)
command -v taskset >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing from Debian: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The package may start a system nginx/haproxy; ours run from private configs, stop those.
  if command -v service >/dev/null; then
    service nginx stop >/dev/null 2>&1 || true
    service haproxy stop >/dev/null 2>&1 || true
  fi
fi

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
  cargo build --release -p marina-bench
  if [ "$WANT_EDGE" = 1 ]; then cargo build --release --bin marina; fi
fi
TGT=${CARGO_TARGET_DIR:-$ROOT/target}/release
LOAD="$TGT/bench-load"
UPSTREAM="$TGT/bench-upstream"
RELAY="$TGT/bench-relay"
MARINA="$TGT/marina"

WORK=$(mktemp -d /tmp/marina-bench.XXXXXX)
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
echo "work directory: $WORK"

# --- process management -----------------------------------------------------------------------
STARTED=()
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  STARTED=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop() { # stop PID…: stops processes this script started
  local pid
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  local keep=() p
  for p in "${STARTED[@]}"; do
    case " $* " in *" $p "*) ;; *) keep+=("$p") ;; esac
  done
  STARTED=("${keep[@]+"${keep[@]}"}")
}

wait_port() { # wait_port PORT PID: until something accepts on 127.0.0.1:PORT (max 30 s)
  for _ in $(seq 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || { echo "process $2 died before listening on $1" >&2; return 1; }
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after 30 s" >&2
  return 1
}

port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "port $1 is already in use; set BENCH_PORT_BASE" >&2
    exit 1
  fi
}
for p in $UP_PORT $EDGE_PORT $EDGE_ADMIN $NGINX_PORT $HAPROXY_PORT $RELAY_PORT; do port_free "$p"; done

# --- configurations ---------------------------------------------------------------------------
# shellcheck source=scripts/bench-config.sh
. "$ROOT/scripts/bench-config.sh"
write_bench_configs

# --- targets ----------------------------------------------------------------------------------
UP_PID=""
TGT_PID=""
MEM_PIDS=""
ADDR=""
COOKIE=""
ORIGIN=""

start_upstream() {
  $PIN_SERVER "$UPSTREAM" --listen "127.0.0.1:$UP_PORT" >"$WORK/upstream.log" 2>&1 &
  UP_PID=$!
  STARTED+=("$UP_PID")
  wait_port "$UP_PORT" "$UP_PID"
}

edge_cookie() {
  local token
  token=$("$LOAD" mint --key "$WORK/url-signing.pem" --kid k1 --sub "$OWNER" --nb "$NB" --sid "$SID" --mode edit)
  "$LOAD" login --addr "127.0.0.1:$EDGE_PORT" --path "$P/_auth?token=$token"
}

start_target() { # start_target NAME: sets TGT_PID, MEM_PIDS, ADDR, ORIGIN
  TGT_PID=""
  ORIGIN=""
  case "$1" in
    direct)
      ADDR=127.0.0.1:$UP_PORT
      MEM_PIDS=$UP_PID
      ;;
    edge)
      $PIN_SERVER "$MARINA" proxy --config "$WORK/edge.toml" >>"$WORK/edge.log" 2>&1 &
      TGT_PID=$!
      STARTED+=("$TGT_PID")
      wait_port "$EDGE_PORT" "$TGT_PID"
      ADDR=127.0.0.1:$EDGE_PORT
      MEM_PIDS=$TGT_PID
      ORIGIN=http://127.0.0.1:$EDGE_PORT
      COOKIE=$(edge_cookie)
      ;;
    nginx)
      $PIN_SERVER nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log" >>"$WORK/nginx.log" 2>&1 &
      TGT_PID=$!
      STARTED+=("$TGT_PID")
      wait_port "$NGINX_PORT" "$TGT_PID"
      ADDR=127.0.0.1:$NGINX_PORT
      # The worker process holds the connections; the master only supervises.
      MEM_PIDS=""
      for _ in $(seq 50); do
        MEM_PIDS=$(pgrep -P "$TGT_PID" | head -1 || true)
        [ -n "$MEM_PIDS" ] && break
        sleep 0.1
      done
      [ -n "$MEM_PIDS" ] || { echo "no nginx worker" >&2; return 1; }
      ;;
    haproxy)
      $PIN_SERVER haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
      TGT_PID=$!
      STARTED+=("$TGT_PID")
      wait_port "$HAPROXY_PORT" "$TGT_PID"
      ADDR=127.0.0.1:$HAPROXY_PORT
      MEM_PIDS=$TGT_PID
      ;;
    relay)
      # The reference floor: bytes relayed without any HTTP work (benches/src/bin/bench-relay.rs).
      $PIN_SERVER "$RELAY" --listen "127.0.0.1:$RELAY_PORT" --upstream "127.0.0.1:$UP_PORT" >>"$WORK/relay.log" 2>&1 &
      TGT_PID=$!
      STARTED+=("$TGT_PID")
      wait_port "$RELAY_PORT" "$TGT_PID"
      ADDR=127.0.0.1:$RELAY_PORT
      MEM_PIDS=$TGT_PID
      ;;
    *) echo "unknown target $1" >&2; return 1 ;;
  esac
}

RUSTC_SEEN=()
note_noise() { RUSTC_SEEN+=("$(pgrep -c rustc || true)"); }

wait_quiet() { # up to QUIET_WAIT seconds for other engineers' compilers to finish
  local i
  for ((i = 0; i < QUIET_WAIT; i++)); do
    [ "$(pgrep -c rustc || true)" = 0 ] && return 0
    sleep 1
  done
}

scenario() { # scenario TARGET ROUND NAME ARGS…
  local target=$1 round=$2 name=$3
  shift 3
  note_noise
  local out
  if out=$($PIN_LOAD "$LOAD" "$@" --target "$target" --scenario "$name" --round "$round" 2>>"$WORK/load.err"); then
    echo "$out" >>"$RESULTS"
    echo "  $name: $out"
  else
    echo "  $name: FAILED (see $WORK/load.err)" | tee -a "$WORK/failures.txt"
  fi
  sleep 1
}

run_target() { # run_target NAME ROUND
  local t=$1 r=$2
  wait_quiet
  start_upstream
  start_target "$t"
  local cookie=${COOKIE:-}
  # CPU time per request: the proxy's processes (none for direct) and the upstream's.
  local cpu=(--upstream-pid "$UP_PID")
  if [ "$t" != direct ]; then cpu+=(--proxy-pid "$MEM_PIDS"); fi
  echo "round $r, $t at $ADDR (memory and CPU of pid $MEM_PIDS)"
  # Idle first, while the process is fresh, so earlier load does not pre-grow its heap.
  scenario "$t" "$r" idle-2000 idle --addr "$ADDR" --path "$P/ws" -c "$IDLE_CONNS" \
    --pid "$MEM_PIDS" --settle 3 --cookie "$cookie" --origin "$ORIGIN"
  scenario "$t" "$r" small-50 http --addr "$ADDR" --path "$P/small" -c 50 \
    --duration "$DURATION" --warmup "$WARMUP" --cookie "$cookie" "${cpu[@]}"
  scenario "$t" "$r" small-256 http --addr "$ADDR" --path "$P/small" -c 256 \
    --duration "$DURATION" --warmup "$WARMUP" --cookie "$cookie" "${cpu[@]}"
  scenario "$t" "$r" 64k-50 http --addr "$ADDR" --path "$P/64k" -c 50 \
    --duration "$DURATION" --warmup "$WARMUP" --cookie "$cookie" "${cpu[@]}"
  scenario "$t" "$r" ws-100 ws --addr "$ADDR" --path "$P/ws" -c 100 --size 64 \
    --duration "$DURATION" --warmup "$WARMUP" --cookie "$cookie" --origin "$ORIGIN" "${cpu[@]}"
  if [ -n "$TGT_PID" ]; then stop "$TGT_PID"; fi
  stop "$UP_PID"
}

# The same Cookie header goes to every target, so every proxy parses the same request bytes.
if [ "$WANT_EDGE" = 1 ]; then
  start_upstream
  start_target edge
  stop "$TGT_PID" "$UP_PID"
else
  COOKIE="marina=$(openssl rand -hex 80)"
fi

STARTED_AT=$(date -u '+%Y-%m-%d %H:%M UTC')
for ((round = 1; round <= ROUNDS; round++)); do
  for t in $TARGETS; do
    run_target "$t" "$round"
  done
done
FINISHED_AT=$(date -u '+%H:%M UTC')

mkdir -p "$ROOT/benches/results"
cp "$RESULTS" "$ROOT/benches/results/latest.jsonl"

if [ "$REPORT" = 1 ]; then
  rustc_min=$(printf '%s\n' "${RUSTC_SEEN[@]}" | sort -n | head -1)
  rustc_max=$(printf '%s\n' "${RUSTC_SEEN[@]}" | sort -n | tail -1)
  busy=$(printf '%s\n' "${RUSTC_SEEN[@]}" | awk '$1 > 0' | wc -l)
  [ -f "$ROOT/BENCHMARKS.md" ] || cat >"$ROOT/BENCHMARKS.md" <<'EOF'
# Benchmarks

Marina's edge (`marina proxy`) measured against the same upstream reached directly and through
nginx and HAProxy (Debian packages) configured as equivalent reverse proxies, all in one run on
one machine by `scripts/bench.sh`. The proxy (or, for `direct`, nothing) and the upstream
(`bench-upstream`, a small hyper server) share CPU 0; the load generator (`bench-load`) runs on
CPU 1, so the proxies compete on equal terms. Every scenario sends the same `Cookie` header (a
valid edge session cookie). Figures are medians of the rounds; ratios compare the edge with the
better of nginx and HAProxy (above 1.0 is better for throughput, below 1.0 better for latency
and memory).

Scenarios: small GET (~100-byte body) with 50 and 256 keep-alive connections; 64 KiB GET with
50 connections; WebSocket echo of 64-byte messages over 100 connections (one message in flight
per connection); 2,000 idle proxied WebSockets held, resident memory (`VmRSS`) growth of the
proxy process per connection (nginx: its one worker). Latencies are closed-loop (each connection
waits for its answer), measured from writing the request to reading the whole response.

Run it with `scripts/bench.sh` (options: `--targets`, `--rounds`, `--duration`; see its header).
Raw results of the latest run: `benches/results/latest.jsonl`.

## Latest run

EOF
  "$LOAD" report --results "$RESULTS" --out "$ROOT/BENCHMARKS.md" \
    --meta "taken=$STARTED_AT – $FINISHED_AT by scripts/bench.sh (rounds $ROUNDS, ${DURATION} s measured after ${WARMUP} s warm-up per scenario)" \
    --meta "machine=$(nproc --all) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)" \
    --meta "pinning=proxy and upstream on CPU 0 (taskset -c 0), load generator on CPU 1 (taskset -c 1)" \
    --meta "versions=$(nginx -v 2>&1 | sed 's/^nginx version: //') (1 worker); $(haproxy -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}') (nbthread 1); marina $(git -C "$ROOT" rev-parse --short HEAD)" \
    --meta "noise=other engineers' rustc processes seen at scenario starts: ${rustc_min:-0}–${rustc_max:-0} (busy at $busy of ${#RUSTC_SEEN[@]} scenarios); the machine is shared, so treat single figures with care"
fi
if [ -s "$WORK/failures.txt" ]; then
  echo "some scenarios failed:" >&2
  cat "$WORK/failures.txt" >&2
  exit 1
fi
