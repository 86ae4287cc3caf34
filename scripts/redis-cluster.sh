#!/usr/bin/env bash
# Starts a three-node Redis Cluster (primaries only) on loopback ports
# 7101-7103 from Debian's redis-server, in a scratch directory, and prints
# its seed URL list. `scripts/redis-cluster.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PORTS=(${REDIS_CLUSTER_PORTS:-7101 7102 7103})
DIR=${REDIS_CLUSTER_DIR:-target/redis-cluster}

stop_cluster() {
  for port in "${PORTS[@]}"; do
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
}

if [ "${1:-start}" = stop ]; then
  stop_cluster
  exit 0
fi

command -v redis-server >/dev/null 2>&1 || apt_install redis-server
stop_cluster
rm -rf "$DIR"
for port in "${PORTS[@]}"; do
  mkdir -p "$DIR/$port"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$DIR/$port" --daemonize yes \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --save '' --appendonly no --logfile "$PWD/$DIR/$port/redis.log" >/dev/null
done
for port in "${PORTS[@]}"; do
  for _ in $(seq 1 50); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
done
nodes=()
for port in "${PORTS[@]}"; do nodes+=("127.0.0.1:$port"); done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$DIR/create.log" 2>&1
for _ in $(seq 1 100); do
  redis-cli -p "${PORTS[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
  sleep 0.1
done
redis-cli -p "${PORTS[0]}" cluster info | grep -q 'cluster_state:ok' \
  || { say "Redis Cluster did not form; see $DIR"; exit 1; }
urls=()
for port in "${PORTS[@]}"; do urls+=("redis://127.0.0.1:$port"); done
(IFS=,; echo "${urls[*]}")
