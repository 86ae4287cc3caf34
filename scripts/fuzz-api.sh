#!/usr/bin/env bash
# Fuzzes job-api with schemathesis (from PyPI, into a private venv) using the
# API's own /openapi.json: no request may get a 5xx, and every response must
# match the documented schema. Starts its own job-api on a fresh database.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
VENV=${FUZZ_VENV:-target/fuzz-venv}
if [ ! -x "$VENV/bin/schemathesis" ]; then
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q schemathesis==4.32.5
fi

cargo build -q --bin job-api --bin yard
DATABASE=switchyard_fuzz_$$
export PGPASSWORD=$PG_PASSWORD
psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $DATABASE"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DATABASE_URL="postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/$DATABASE"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX="fuzz:$$:"
export AUTH_HS256_SECRET=fuzz-secret-$$ JOB_API_ADDR="127.0.0.1:$PORT" LOG_FORMAT=compact RUST_LOG=warn
target/debug/job-api --migrate > target/fuzz-job-api.log 2>&1 &
API=$!
cleanup() {
  kill "$API" 2>/dev/null || true
  wait "$API" 2>/dev/null || true
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null && break
  sleep 0.2
done
FUZZ_TOKEN=$(target/debug/yard dev-token --org fuzz --role Owner)
export FUZZ_TOKEN

say "schemathesis against http://127.0.0.1:$PORT/openapi.json"
"$VENV/bin/schemathesis" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  --phases examples,fuzzing,stateful --max-examples "${FUZZ_EXAMPLES:-60}" --seed "${FUZZ_SEED:-1}" \
  --workers 2 --no-color "$@"
