#!/usr/bin/env bash
# Runs the whole test suite. Starts (installing if needed) PostgreSQL and
# Redis first. Extra arguments go to `cargo test` (e.g. `-p db`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_backing_services
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/postgres}
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT}

# The dashboard's browser test drives Debian's Chromium.
command -v chromium >/dev/null 2>&1 || apt_install chromium

say "cargo test --workspace --no-fail-fast $*"
cargo test --workspace --no-fail-fast --features realtime-broadcaster/browser-test "$@"
