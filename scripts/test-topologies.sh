#!/usr/bin/env bash
# Runs the end-to-end suites (bus, every service, the agent and the CLI)
# against the setups operators scale to: a three-node Redis Cluster on
# loopback ports, with events on sharded pub/sub; a Redis primary with a
# replica behind three Sentinels; then the database and end-to-end suites
# through PgBouncer in transaction pooling mode. Each setup is started here
# and stopped afterwards; a failing run does not keep the next from running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/postgres}
status=0

cleanup=()
stop_all() { for step in "${cleanup[@]}"; do eval "$step" || true; done; }
trap stop_all EXIT

say "starting a three-node Redis Cluster"
seeds=$(bash scripts/redis-cluster.sh)
cleanup+=("bash scripts/redis-cluster.sh stop")
say "end-to-end suites against Redis Cluster ($seeds)"
TEST_REDIS_CLUSTER=true TEST_REDIS_URL=$seeds \
  cargo test --no-fail-fast -p bus -p scheduler -p agent-gateway -p realtime-broadcaster \
    -p yard-agent -p job-api -p yard "$@" || status=1

say "starting a Redis primary, a replica and three Sentinels"
sentinels=$(bash scripts/redis-sentinel.sh)
cleanup+=("bash scripts/redis-sentinel.sh stop")
say "end-to-end suites against Redis Sentinel ($sentinels)"
TEST_REDIS_SENTINEL_MASTER=${REDIS_SENTINEL_MASTER_NAME:-switchyard} TEST_REDIS_URL=$sentinels \
  cargo test --no-fail-fast -p bus -p scheduler -p agent-gateway -p realtime-broadcaster \
    -p yard-agent -p job-api -p yard "$@" || status=1

say "starting PgBouncer in transaction pooling mode"
pooler=$(bash scripts/pgbouncer.sh)
cleanup+=("bash scripts/pgbouncer.sh stop")
say "database and end-to-end suites through PgBouncer ($pooler)"
TEST_PGBOUNCER_URL=$pooler \
  cargo test --no-fail-fast -p db -p scheduler -p agent-gateway -p realtime-broadcaster \
    -p yard-agent -p job-api -p yard "$@" || status=1

exit $status
