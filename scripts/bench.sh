#!/usr/bin/env bash
# The benchmark in one command (issue #8). Starts PostgreSQL and Redis if they are down, creates a
# fresh bench database, builds, migrates, starts the four services as processes on their own
# ports (so a running scripts/dev.sh is not disturbed), mints a token with `yard dev-token`, runs
# yard-bench against them, stops everything, prints the table and writes JSON.
#
# Usage: scripts/bench.sh [--smoke] [--out FILE] [--no-ceiling] [--no-socketio] [scenario...]
#        scripts/bench.sh --peer burndown|latency     (for the peer kit: RESULT lines on stdout)
#   scenarios: floor enqueue idle steady burndown lifecycle logs ws fanout (default: all)
#   --smoke       small sizes for CI (a couple of minutes, no speed assertions); debug build
#   --out FILE    JSON results (default target/bench/results.json)
#   --no-ceiling  skip the raw-PostgreSQL ceilings of the peer kit (run by default when the kit
#                 is found at $BENCH_PEERS_DIR, default ../shared/peers, and not in --smoke)
#   --no-socketio skip the socket.io comparison (otherwise installed from npm into
#                 target/bench/npm when node and npm are present)
# Env: BENCH_PROFILE=release|debug (default release; debug with --smoke), BENCH_SKIP_BUILD=1 (use
#      the binaries already built), BENCH_KEEP_DB=1 (keep the bench database), N (burn-down size),
#      BENCH_AGENTS, BENCH_CAPACITY, BENCH_IDLE_CONNECTIONS, LAT_N, BENCH_STEADY_RATES, plus BENCH_*_PORT below;
#      BENCH_SQL and BENCH_BROADCASTER_WRAPPER for profiling (see where they are used).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

smoke=0 peer="" out=target/bench/results.json ceiling=1 socketio=1 scenarios=()
while (($#)); do
  case $1 in
    --smoke) smoke=1 ;;
    --peer) peer=${2:?--peer needs burndown or latency}; shift ;;
    --out) out=${2:?--out needs a file}; shift ;;
    --no-ceiling) ceiling=0 ;;
    --no-socketio) socketio=0 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
    *) scenarios+=("$1") ;;
  esac
  shift
done
if [[ -n $peer ]]; then
  ceiling=0 socketio=0
  # Everything but the RESULT line goes to stderr: the kit reads stdout.
  exec 3>&1 1>&2
fi
((smoke)) && ceiling=0
profile=${BENCH_PROFILE:-$( ((smoke)) && echo debug || echo release)}
bin=target/$profile

API_PORT=${BENCH_API_PORT:-18080}
GRPC_PORT=${BENCH_GRPC_PORT:-50151}
GW_HTTP_PORT=${BENCH_GATEWAY_HTTP_PORT:-18081}
SCHED_PORT=${BENCH_SCHEDULER_PORT:-18082}
WS_PORT=${BENCH_BROADCASTER_PORT:-18090}
SIO_PORT=${BENCH_SOCKETIO_PORT:-18190}
SIO_PUB_PORT=$((SIO_PORT + 1))
DATABASE=${BENCH_DATABASE:-switchyard_bench}
work=target/bench
mkdir -p "$work/logs"

ensure_backing_services
psql_admin() { PGPASSWORD=$PG_PASSWORD psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq "$@"; }

# Raw-PostgreSQL ceilings from the peer kit, before anything else runs (they share the cores).
baselines=()
peers_dir=${BENCH_PEERS_DIR:-$repo/../shared/peers}
if ((ceiling)) && [[ -x $peers_dir/pg-ceiling.sh ]]; then
  say "raw-PostgreSQL ceilings ($peers_dir/pg-ceiling.sh all)"
  if ceiling_out=$("$peers_dir/pg-ceiling.sh" all); then
    while read -r line; do
      workload=$(sed -n 's/.* workload=\([^ ]*\).*/\1/p' <<<"$line")
      jps=$(sed -n 's/.* jobs_per_s=\([0-9.]*\).*/\1/p' <<<"$line")
      [[ -n $workload && -n $jps ]] && baselines+=(--baseline "raw-pg/$workload=$jps")
    done < <(grep '^RESULT ' <<<"$ceiling_out")
    printf '%s\n' "$ceiling_out" | grep '^RESULT ' >"$work/ceiling.txt" || true
  else
    say "pg-ceiling.sh failed; continuing without the kit's ceilings"
  fi
fi

started=$(date +%s)
if [[ -n ${BENCH_SKIP_BUILD:-} ]]; then
  say "using the binaries already in $bin (BENCH_SKIP_BUILD)"
else
  say "building ($profile)"
  if [[ $profile == release ]]; then cargo build --release --bins; else cargo build --bins; fi
  say "build took $(($(date +%s) - started)) s"
fi

say "fresh database $DATABASE"
psql_admin -c "DROP DATABASE IF EXISTS \"$DATABASE\" WITH (FORCE)" -c "CREATE DATABASE \"$DATABASE\""

export DATABASE_URL="postgres://postgres:$PG_PASSWORD@$PG_HOST:$PG_PORT/$DATABASE"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export REDIS_KEY_PREFIX="bench-$$:"
export LOG_FORMAT=compact RUST_LOG=${BENCH_RUST_LOG:-warn}
export AUTH_HS256_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export AUTH_ISSUER=switchyard-bench
export JOB_API_ADDR=127.0.0.1:$API_PORT
export GATEWAY_GRPC_ADDR=127.0.0.1:$GRPC_PORT
export GATEWAY_HTTP_ADDR=127.0.0.1:$GW_HTTP_PORT
export SCHEDULER_HTTP_ADDR=127.0.0.1:$SCHED_PORT
export BROADCASTER_ADDR=127.0.0.1:$WS_PORT
export DASHBOARD_API_URL=http://$JOB_API_ADDR
export JOB_API_CORS_ORIGINS=http://$BROADCASTER_ADDR
# Many idle WebSocket connections: one descriptor each, in the broadcaster and in yard-bench.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

say "migrating"
"$bin/job-api" migrate
# BENCH_SQL runs once on the fresh database after the migrations, to try a schema change
# (an index, a storage parameter) without a rebuild, e.g. BENCH_SQL="ALTER TABLE jobs SET (fillfactor = 80)".
if [[ -n ${BENCH_SQL:-} ]]; then
  PGPASSWORD=$PG_PASSWORD psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -Atq -c "$BENCH_SQL"
fi

pids=()
declare -A pid_of=()
stop_all() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -z ${BENCH_KEEP_DB:-} ]]; then
    psql_admin -c "DROP DATABASE IF EXISTS \"$DATABASE\" WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# BENCH_BROADCASTER_WRAPPER runs the broadcaster under a profiler, e.g. "heaptrack -o target/bench/ws"
# (its memory figure is then the wrapper's, not the broadcaster's).
for service in job-api agent-gateway scheduler realtime-broadcaster; do
  wrapper=()
  [[ $service == realtime-broadcaster && -n ${BENCH_BROADCASTER_WRAPPER:-} ]] && read -ra wrapper <<<"$BENCH_BROADCASTER_WRAPPER"
  "${wrapper[@]}" "$bin/$service" >"$work/logs/$service.log" 2>&1 &
  pids+=($!)
  pid_of[$service]=$!
done
for address in "$JOB_API_ADDR" "$GATEWAY_HTTP_ADDR" "$SCHEDULER_HTTP_ADDR" "$BROADCASTER_ADDR"; do
  for i in $(seq 1 120); do
    curl -fsS -o /dev/null "http://$address/readyz" 2>/dev/null && break
    if [[ $i == 120 ]]; then
      say "a service on $address is not ready; see $work/logs/"
      tail -n 20 "$work"/logs/*.log >&2
      exit 1
    fi
    sleep 0.5
  done
done
say "services up (logs in $work/logs/)"

# socket.io + @socket.io/redis-adapter for the fan-out comparison, installed at run time.
sio_args=()
wants_fanout=1
if ((${#scenarios[@]})); then
  wants_fanout=0
  for s in "${scenarios[@]}"; do [[ $s == fanout ]] && wants_fanout=1; done
fi
if ((socketio && wants_fanout)) && command -v node >/dev/null && command -v npm >/dev/null; then
  npm_dir=$work/npm
  if [[ ! -f $npm_dir/node_modules/@socket.io/redis-adapter/package.json ]]; then
    say "installing socket.io 4.8.1, @socket.io/redis-adapter 8.3.0, redis 4.7.0 into $npm_dir (npm)"
    mkdir -p "$npm_dir"
    [[ -f $npm_dir/package.json ]] || printf '{"name":"bench-scratch","private":true}\n' >"$npm_dir/package.json"
    npm install --prefix "$npm_dir" --no-audit --no-fund --loglevel=error \
      socket.io@4.8.1 @socket.io/redis-adapter@8.3.0 redis@4.7.0 >"$work/logs/npm.log" 2>&1 \
      || { say "npm install failed (see $work/logs/npm.log); no socket.io comparison"; socketio=0; }
  fi
  if ((socketio)); then
    for role in serve publish; do
      port=$SIO_PORT; [[ $role == publish ]] && port=$SIO_PUB_PORT
      NODE_PATH=$npm_dir/node_modules SIO_PREFIX="bench-sio-$$" node bench/socketio/fanout.js "$role" "$port" \
        >"$work/logs/socketio-$role.log" 2>&1 &
      pids+=($!)
    done
    for port in "$SIO_PORT" "$SIO_PUB_PORT"; do
      for _ in $(seq 1 40); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.25; done
    done
    sio_args=(--socketio-ws "ws://127.0.0.1:$SIO_PORT" --socketio-publish "http://127.0.0.1:$SIO_PUB_PORT/")
  fi
fi

# One token for every scenario's org (each scenario works in its own org).
orgs=()
for o in enqueue idle steady burndown lifecycle logs fanout; do orgs+=(--org "bench-$o"); done
BENCH_TOKEN=$("$bin/yard" dev-token "${orgs[@]}" --role Owner)
export BENCH_TOKEN

args=(--api "http://$JOB_API_ADDR" --grpc "http://$GATEWAY_GRPC_ADDR" --ws "ws://$BROADCASTER_ADDR/v1/ws"
  --pg-url "$DATABASE_URL" --broadcaster-pid "${pid_of[realtime-broadcaster]}" --out "$out"
  "${baselines[@]}" "${sio_args[@]}")
((smoke)) && args+=(--smoke)
if [[ -n $peer ]]; then
  "$bin/yard-bench" "${args[@]}" --peer "$peer" | grep '^RESULT ' >&3
  exit "${PIPESTATUS[0]}"
fi
say "running yard-bench ${scenarios[*]:-(all scenarios)} on $(nproc) cores"
"$bin/yard-bench" "${args[@]}" "${scenarios[@]}"
