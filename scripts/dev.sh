#!/usr/bin/env bash
# Sets up and runs the whole system locally: PostgreSQL and Redis
# (installed and started if missing), the database, migrations, a build,
# and every service. Prints the URLs and a development token.
# Ctrl-C stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
command -v openssl >/dev/null 2>&1 || apt_install openssl
command -v curl >/dev/null 2>&1 || apt_install curl

DATABASE=${SWITCHYARD_DATABASE:-switchyard}
if ! PGPASSWORD=$PG_PASSWORD psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -Atqc \
    "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1; then
  say "creating database $DATABASE"
  PGPASSWORD=$PG_PASSWORD psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "CREATE DATABASE \"$DATABASE\""
fi

say "building (first build takes a few minutes)"
cargo build --bins

mkdir -p .dev/logs
# A development signing secret, kept across runs so tokens stay valid.
[ -s .dev/hs256-secret ] || openssl rand -hex 32 > .dev/hs256-secret

export DATABASE_URL="postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/$DATABASE"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export LOG_FORMAT=${LOG_FORMAT:-compact}
export RUST_LOG=${RUST_LOG:-info}
export AUTH_HS256_SECRET=$(cat .dev/hs256-secret)
export AUTH_ISSUER=switchyard-dev
export JOB_API_ADDR=${JOB_API_ADDR:-127.0.0.1:8080}
export GATEWAY_GRPC_ADDR=${GATEWAY_GRPC_ADDR:-127.0.0.1:50051}
export GATEWAY_HTTP_ADDR=${GATEWAY_HTTP_ADDR:-127.0.0.1:8081}
export SCHEDULER_HTTP_ADDR=${SCHEDULER_HTTP_ADDR:-127.0.0.1:8082}
export BROADCASTER_ADDR=${BROADCASTER_ADDR:-127.0.0.1:8090}

say "migrating"
target/debug/job-api migrate

pids=()
stop_all() {
  trap - INT TERM
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  say "stopped"
  exit 0
}
trap stop_all INT TERM

declare -A addresses=(
  [job-api]=$JOB_API_ADDR
  [agent-gateway]=$GATEWAY_HTTP_ADDR
  [scheduler]=$SCHEDULER_HTTP_ADDR
  [realtime-broadcaster]=$BROADCASTER_ADDR
)
for service in job-api agent-gateway scheduler realtime-broadcaster; do
  target/debug/$service >".dev/logs/$service.log" 2>&1 &
  pids+=($!)
done

for service in "${!addresses[@]}"; do
  url="http://${addresses[$service]}/readyz"
  for i in $(seq 1 60); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && break
    if [ "$i" = 60 ]; then
      say "$service is not ready; see .dev/logs/$service.log"
      stop_all
    fi
    sleep 0.5
  done
done

# A development token in PropelAuth's shape (org dev-org, role Owner).
token=$(target/debug/yard dev-token --org dev-org --role Owner)
printf '%s\n' "$token" > .dev/dev-token

# A demo agent: registered afresh each run with a one-use token from job-api.
registration=$(curl -fsS -X POST "http://$JOB_API_ADDR/v1/orgs/dev-org/registration-tokens" \
  -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"description":"demo agent (scripts/dev.sh)","max_uses":1,"ttl_secs":600}' \
  | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
rm -f .dev/agent-credential.json
mkdir -p .dev/agent-work
SWITCHYARD_GATEWAY_URL="http://$GATEWAY_GRPC_ADDR" \
SWITCHYARD_REGISTRATION_TOKEN="$registration" \
SWITCHYARD_CREDENTIAL_FILE=.dev/agent-credential.json \
SWITCHYARD_AGENT_NAME=demo-agent \
SWITCHYARD_AGENT_LABELS=demo \
SWITCHYARD_AGENT_CAPACITY=2 \
SWITCHYARD_WORK_DIR=.dev/agent-work \
  target/debug/yard-agent >.dev/logs/yard-agent.log 2>&1 &
pids+=($!)

cat <<TXT

Switchyard is running (logs in .dev/logs/; Ctrl-C stops everything).

  job-api               http://$JOB_API_ADDR
  agent-gateway (HTTP)  http://$GATEWAY_HTTP_ADDR
  scheduler             http://$SCHEDULER_HTTP_ADDR
  realtime-broadcaster  http://$BROADCASTER_ADDR
  agent-gateway (gRPC)  http://$GATEWAY_GRPC_ADDR   (demo agent "demo-agent" connected)
  API docs              http://$JOB_API_ADDR/docs/
  dashboard             http://$BROADCASTER_ADDR/#token=$token

  Each answers /healthz, /readyz, /version and /metrics. Try:
    curl -H "Authorization: Bearer \$(cat .dev/dev-token)" -H 'Content-Type: application/json' \\
      -d '{"command":"echo hello"}' http://$JOB_API_ADDR/v1/orgs/dev-org/jobs
  Development token (org dev-org, role Owner; also in .dev/dev-token):
  $token

TXT
wait
