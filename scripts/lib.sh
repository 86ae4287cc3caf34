# Shared by scripts/dev.sh and scripts/test.sh: make sure PostgreSQL and
# Redis answer on 127.0.0.1, installing them from Debian/Ubuntu packages
# and starting them when they are missing. Safe to run again and again.

PG_HOST=127.0.0.1
PG_PORT=5432
PG_PASSWORD=postgres
REDIS_PORT=6379

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

as_postgres() {
  if command -v runuser >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    sudo -u postgres "$@"
  fi
}

APT_UPDATED=
apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    say "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  say "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_answers() {
  PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=2 psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres \
    -Atqc 'SELECT 1' >/dev/null 2>&1
}

ensure_postgres() {
  if command -v psql >/dev/null 2>&1 && pg_answers; then
    return 0
  fi
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  if ! pg_isready -h "$PG_HOST" -p "$PG_PORT" -q 2>/dev/null; then
    local version
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
      say "creating PostgreSQL $version cluster"
      as_root pg_createcluster "$version" main >/dev/null
    fi
    local cluster
    cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
    say "starting PostgreSQL cluster $cluster"
    # shellcheck disable=SC2086
    as_root pg_ctlcluster --skip-systemctl-redirect $cluster start 2>/dev/null \
      || as_root pg_ctlcluster $cluster start
  fi
  for _ in $(seq 1 60); do
    pg_isready -h "$PG_HOST" -p "$PG_PORT" -q && break
    sleep 0.5
  done
  if ! pg_answers; then
    # A fresh Debian cluster only allows password logins over TCP: give
    # the postgres role the development password.
    say "setting the local postgres role's development password"
    as_postgres psql -qc "ALTER USER postgres PASSWORD '$PG_PASSWORD'" >/dev/null
  fi
  pg_answers || { say "PostgreSQL does not answer on $PG_HOST:$PG_PORT"; return 1; }
}

redis_answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  else
    (exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null
  fi
}

ensure_redis() {
  if redis_answers; then
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
  fi
  local dir=/var/lib/redis
  [ -w "$dir" ] || dir=${TMPDIR:-/tmp}
  say "starting Redis on 127.0.0.1:$REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/switchyard-redis.log" >/dev/null
  for _ in $(seq 1 40); do
    redis_answers && return 0
    sleep 0.25
  done
  say "Redis does not answer on 127.0.0.1:$REDIS_PORT"
  return 1
}

ensure_backing_services() {
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  ensure_postgres
  ensure_redis
}
