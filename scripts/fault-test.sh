#!/usr/bin/env bash
# The multi-process fault test: builds the binaries (a no-op when they are
# built already), then runs target/debug/yard-fault, which starts its own
# PostgreSQL and Redis on free ports (never the shared ones), two replicas
# of every service and four agents, pushes 500 jobs through while killing
# and restarting processes, Redis and PostgreSQL, and checks that no job is
# lost, completed twice or written by a stale lease. Exits non-zero on any
# failed check and then prints where each process logged.
#
# Settings: YARD_FAULT_JOBS, YARD_FAULT_WATCHERS, YARD_FAULT_AGENTS,
# YARD_FAULT_DEADLINE_SECS, YARD_FAULT_KEEP=1 (keep logs on success).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

# The PostgreSQL server binaries (initdb, pg_ctl) and redis-server; the
# test starts instances of its own with them.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
command -v redis-server >/dev/null 2>&1 || apt_install redis-server

say "cargo build --bins"
cargo build --bins
say "yard-fault"
exec target/debug/yard-fault "$@"
