#!/usr/bin/env bash
# Renders job-api's Swagger UI (/docs) in headless Chromium with the network
# cut off from everything but the local API, and checks that the operations
# appear: the assets come from the binary, not a CDN. Installs Debian's
# chromium when it is missing. Writes target/docs.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
command -v chromium >/dev/null 2>&1 || apt_install chromium
cargo build -q --bin job-api
DATABASE=switchyard_docs_$$
export PGPASSWORD=$PG_PASSWORD
psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $DATABASE"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DATABASE_URL="postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/$DATABASE"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX="docs:$$:"
export AUTH_HS256_SECRET=docs-$$ JOB_API_ADDR="127.0.0.1:$PORT" RUST_LOG=warn
target/debug/job-api --migrate > target/docs-job-api.log 2>&1 &
API=$!
PROFILE=$(mktemp -d)
cleanup() {
  kill "$API" 2>/dev/null || true
  wait "$API" 2>/dev/null || true
  rm -rf "$PROFILE"
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null && break
  sleep 0.2
done

# Any request leaving 127.0.0.1 would fail: a CDN asset could not load.
CHROME=(chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --user-data-dir="$PROFILE" --host-resolver-rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
  --virtual-time-budget=15000)
DOM=$("${CHROME[@]}" --dump-dom "http://127.0.0.1:$PORT/docs/" 2>/dev/null)
"${CHROME[@]}" --window-size=1280,1600 --screenshot="$PWD/target/docs.png" "http://127.0.0.1:$PORT/docs/" >/dev/null 2>&1 || true
operations=$(grep -o 'class="opblock opblock-' <<<"$DOM" | wc -l)
if [ "$operations" -lt 20 ] || ! grep -q 'Switchyard job-api' <<<"$DOM"; then
  echo "Swagger UI did not render (found $operations operations)" >&2
  exit 1
fi
echo "Swagger UI rendered offline with $operations operations (screenshot: target/docs.png)"
