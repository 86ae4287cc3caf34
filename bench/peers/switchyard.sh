#!/usr/bin/env bash
# bench/peers/switchyard.sh: Switchyard as a peer in the peer kit (../shared/peers/run-all.sh).
# Takes "burndown" or "latency" like the kit's scripts and prints the kit's RESULT line on
# stdout; progress goes to stderr. It starts its own services on bench ports with a fresh
# database (scripts/bench.sh --peer), so nothing needs to be running.
#   burndown: N pre-enqueued no-op jobs (REST batches) through simulated gRPC agents
#             (BENCH_AGENTS=8 × BENCH_CAPACITY=256), completed jobs/s
#   latency:  one idle agent; LAT_N jobs created one at a time through REST, each after the
#             previous completed, random gap 5-505 ms; created -> assignment received p50/p99
# Run beside the peers (no link into the kit needed; PEER_SCRIPTS takes absolute paths):
#   PEER_SCRIPTS="$PWD/bench/peers/switchyard.sh ../shared/peers/graphile-burndown.sh \
#     ../shared/peers/pgboss-burndown.sh" ../shared/peers/run-all.sh
set -euo pipefail
mode=${1:-burndown}
case $mode in
  burndown | latency) ;;
  *) echo "usage: $0 burndown|latency" >&2; exit 2 ;;
esac
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/scripts/bench.sh" --peer "$mode"
