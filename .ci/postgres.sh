#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the tests and print its URL.
# Usage: eval "$(.ci/postgres.sh)"   -> exports SCRUTINY_TEST_POSTGRES_URL
# Fails (exit 1) when no server can be started: CI must not skip the PostgreSQL tests.
set -euo pipefail
PORT="${SCRUTINY_PG_PORT:-54329}"
bindir=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bindir="$d"; done
if [ -z "$bindir" ]; then
  echo "PostgreSQL server binaries not found; installing the Debian package" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bindir="$d"; done
fi
[ -n "$bindir" ] || { echo "no PostgreSQL server available" >&2; exit 1; }
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "port $PORT is in use (a server left from an earlier run?): stop it, or set" \
       "SCRUTINY_PG_PORT to a free port" >&2
  exit 1
fi
data=$(mktemp -d -t scrutiny-pg-XXXX)
trap 'rm -rf "$data"' ERR  # (a server that did not start leaves nothing behind)
chown postgres:postgres "$data"
run() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
run "$bindir/initdb" -D "$data/db" --auth=trust --username=postgres -E UTF8 >/dev/null
run "$bindir/pg_ctl" -D "$data/db" -l "$data/log" -w -t 60 \
  -o "-p $PORT -k $data -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2
run "$bindir/createdb" -h 127.0.0.1 -p "$PORT" -U postgres scrutiny_test
echo "export SCRUTINY_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/scrutiny_test"
echo "export SCRUTINY_PG_DATA=$data/db SCRUTINY_PG_BIN=$bindir"
