#!/usr/bin/env bash
# Starts PgBouncer from Debian's package in transaction pooling mode on
# 127.0.0.1:${PGBOUNCER_PORT:-6543}, in front of the local PostgreSQL
# (scripts/lib.sh), serving every database, and prints its base URL (add
# the database name). `scripts/pgbouncer.sh stop` stops it. Tests use it
# through TEST_PGBOUNCER_URL (see crates/test-support).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PORT=${PGBOUNCER_PORT:-6543}
DIR=${PGBOUNCER_DIR:-/tmp/switchyard-pgbouncer-$PORT}

stop_pgbouncer() {
  if [ -f "$DIR/pgbouncer.pid" ]; then
    kill "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -f "$DIR/pgbouncer.pid" ] && kill -0 "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null || break
      sleep 0.1
    done
  fi
}

if [ "${1:-start}" = stop ]; then
  stop_pgbouncer
  exit 0
fi

command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || apt_install pgbouncer
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
stop_pgbouncer
rm -rf "$DIR"
mkdir -p "$DIR"
# Every server connection counts against PostgreSQL's max_connections
# (100 by default), which the tests' direct admin connections share.
cat >"$DIR/pgbouncer.ini" <<INI
[databases]
* = host=$PG_HOST port=$PG_PORT user=postgres password=$PG_PASSWORD

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = trust
auth_file = $DIR/users.txt
pool_mode = transaction
default_pool_size = 8
max_user_connections = 60
max_client_conn = 2000
server_idle_timeout = 10
ignore_startup_parameters = extra_float_digits,options
logfile = $DIR/pgbouncer.log
pidfile = $DIR/pgbouncer.pid
INI
printf '"postgres" "%s"\n' "$PG_PASSWORD" >"$DIR/users.txt"
# PgBouncer refuses to run as root.
if [ "$(id -u)" = 0 ]; then
  chown -R postgres "$DIR"
  "$PGBOUNCER" -d -u postgres "$DIR/pgbouncer.ini" >/dev/null
else
  "$PGBOUNCER" -d "$DIR/pgbouncer.ini" >/dev/null
fi
for _ in $(seq 1 50); do
  PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atqc 'SELECT 1' \
    >/dev/null 2>&1 && break
  sleep 0.1
done
PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null \
  || { say "PgBouncer does not answer on $PORT; see $DIR/pgbouncer.log"; exit 1; }
echo "postgres://postgres:$PG_PASSWORD@127.0.0.1:$PORT/postgres"
