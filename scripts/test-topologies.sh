#!/usr/bin/env bash
# Runs the end-to-end suites (bus, every service, the agent and the CLI)
# against the Redis deployments beyond a single node: a three-node Redis
# Cluster on loopback ports, with events on sharded pub/sub, then a primary
# with a replica behind three Sentinels. Each is started here and stopped
# afterwards; a failing run does not keep the next from running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/postgres}
SUITES=(-p bus -p scheduler -p agent-gateway -p realtime-broadcaster -p yard-agent -p job-api -p yard)
status=0

say "starting a three-node Redis Cluster"
seeds=$(bash scripts/redis-cluster.sh)
trap 'bash scripts/redis-cluster.sh stop' EXIT
say "end-to-end suites against Redis Cluster ($seeds)"
TEST_REDIS_CLUSTER=true TEST_REDIS_URL=$seeds \
  cargo test --no-fail-fast "${SUITES[@]}" "$@" || status=1
bash scripts/redis-cluster.sh stop

say "starting a Redis primary, a replica and three Sentinels"
sentinels=$(bash scripts/redis-sentinel.sh)
trap 'bash scripts/redis-cluster.sh stop; bash scripts/redis-sentinel.sh stop' EXIT
say "end-to-end suites against Redis Sentinel ($sentinels)"
TEST_REDIS_SENTINEL_MASTER=${REDIS_SENTINEL_MASTER_NAME:-switchyard} TEST_REDIS_URL=$sentinels \
  cargo test --no-fail-fast "${SUITES[@]}" "$@" || status=1

exit $status
