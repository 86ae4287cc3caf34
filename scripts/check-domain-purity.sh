#!/usr/bin/env bash
# The domain crate must stay pure: no storage, transport or bus crates.
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden=$(cargo tree -p domain -e normal --prefix none --format '{p}' \
  | awk '{print $1}' | grep -E '^(diesel|diesel-async|actix-web|actix|tonic|redis|tokio-postgres|deadpool)' | sort -u || true)
if [ -n "$forbidden" ]; then
  echo "domain depends on forbidden crates: $forbidden" >&2
  exit 1
fi
echo "domain is pure: no diesel, actix, tonic or redis"
