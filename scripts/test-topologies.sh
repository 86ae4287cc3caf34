#!/usr/bin/env bash
# Runs the end-to-end suites (bus, every service, the agent and the CLI)
# against a three-node Redis Cluster on loopback ports, with events on
# sharded pub/sub. The cluster is started here and stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/postgres}

say "starting a three-node Redis Cluster"
seeds=$(bash scripts/redis-cluster.sh)
trap 'bash scripts/redis-cluster.sh stop' EXIT
say "end-to-end suites against Redis Cluster ($seeds)"
TEST_REDIS_CLUSTER=true TEST_REDIS_URL=$seeds \
  cargo test --no-fail-fast -p bus -p scheduler -p agent-gateway -p realtime-broadcaster \
    -p yard-agent -p job-api -p yard "$@"
