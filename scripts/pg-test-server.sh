#!/usr/bin/env bash
# Starts (once) a throwaway PostgreSQL server for the tests, on 127.0.0.1:${PGPORT:-25432} (below
# the ephemeral port range, so no client socket of a busy machine can hold the port),
# with its data in target/pg, and prints its URL. Installs Debian's PostgreSQL if it is missing.
#   scripts/pg-test-server.sh [start|stop]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
port=${PGPORT:-25432}
dir=$root/target/pg
url="postgres://marina:marina@127.0.0.1:$port/postgres"

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "installing PostgreSQL from Debian…" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

# PostgreSQL refuses to run as root: run it as the `postgres` user (created by the package).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "${1:-start}" = stop ]; then
  [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >&2 || true
  exit 0
fi

if as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  echo "$url"
  exit 0
fi

mkdir -p "$dir"
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
if [ ! -f "$dir/data/PG_VERSION" ]; then
  rm -rf "$dir/data"
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
fi
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=300 -c fsync=off" start >&2 \
  || { cat "$dir/server.log" >&2; exit 1; }
as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -q -c \
  "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'marina') THEN CREATE ROLE marina LOGIN SUPERUSER PASSWORD 'marina'; END IF; END \$\$;" >&2
echo "$url"
