#!/usr/bin/env bash
# Starts a Redis Sentinel deployment on loopback from Debian's redis-server:
# a primary (port 7201), one replica (7202) and three Sentinels
# (26401-26403, quorum 2) monitoring it under the master name
# `switchyard`, with data and configs in a scratch directory. Prints the
# Sentinel URL list for REDIS_URL (with REDIS_SENTINEL_MASTER=switchyard).
# `scripts/redis-sentinel.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

MASTER=${REDIS_SENTINEL_MASTER_NAME:-switchyard}
PRIMARY_PORT=${REDIS_SENTINEL_PRIMARY_PORT:-7201}
REPLICA_PORT=${REDIS_SENTINEL_REPLICA_PORT:-7202}
SENTINEL_PORTS=(${REDIS_SENTINEL_PORTS:-26401 26402 26403})
DIR=${REDIS_SENTINEL_DIR:-${TMPDIR:-/tmp}/switchyard-redis-sentinel}

stop_all() {
  # Sentinels first, so they do not fail over while the data nodes stop.
  for port in "${SENTINEL_PORTS[@]}" "$REPLICA_PORT" "$PRIMARY_PORT"; do
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
}

wait_for_pong() {
  for _ in $(seq 1 50); do
    [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  say "redis on port $1 did not start; see $DIR"
  return 1
}

if [ "${1:-start}" = stop ]; then
  stop_all
  exit 0
fi

command -v redis-server >/dev/null 2>&1 || apt_install redis-server
stop_all
rm -rf "$DIR"
mkdir -p "$DIR"

# Config files rather than arguments: Sentinel rewrites its own, and runs
# CONFIG REWRITE on the data nodes it reconfigures.
for port in "$PRIMARY_PORT" "$REPLICA_PORT"; do
  {
    echo "port $port"
    echo "bind 127.0.0.1"
    echo "daemonize yes"
    echo "save \"\""
    echo "appendonly no"
    echo "dir $DIR"
    echo "dbfilename dump-$port.rdb"
    echo "logfile $DIR/redis-$port.log"
    [ "$port" = "$REPLICA_PORT" ] && echo "replicaof 127.0.0.1 $PRIMARY_PORT"
  } >"$DIR/redis-$port.conf"
  redis-server "$DIR/redis-$port.conf"
  wait_for_pong "$port"
done

# Short timings so failovers (forced by tests) finish in seconds.
for port in "${SENTINEL_PORTS[@]}"; do
  cat >"$DIR/sentinel-$port.conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
dir $DIR
logfile $DIR/sentinel-$port.log
sentinel monitor $MASTER 127.0.0.1 $PRIMARY_PORT 2
sentinel down-after-milliseconds $MASTER 1000
sentinel failover-timeout $MASTER 5000
sentinel parallel-syncs $MASTER 1
EOF
  # Debian's redis-server runs as a Sentinel with --sentinel (the
  # redis-sentinel package only adds a symlink and a service).
  redis-server "$DIR/sentinel-$port.conf" --sentinel
  wait_for_pong "$port"
done

# Ready when the replica is in sync and every Sentinel sees it and the
# two other Sentinels (they find each other through the primary).
formed() {
  redis-cli -p "$REPLICA_PORT" info replication | grep -q 'master_link_status:up' || return 1
  for port in "${SENTINEL_PORTS[@]}"; do
    redis-cli -p "$port" sentinel replicas "$MASTER" | grep -qx "127.0.0.1" || return 1
    [ "$(redis-cli -p "$port" sentinel sentinels "$MASTER" | grep -cx 'name')" -ge 2 ] || return 1
  done
}
for _ in $(seq 1 150); do
  formed && break
  sleep 0.2
done
formed || { say "Redis Sentinel setup did not form; see $DIR"; exit 1; }

urls=()
for port in "${SENTINEL_PORTS[@]}"; do urls+=("redis://127.0.0.1:$port"); done
(IFS=,; echo "${urls[*]}")
