#!/usr/bin/env bash
# Where an idle dispatch's time goes, hop by hop (issue #8). Runs the peer kit's idle-latency
# workload (`bench/peers/switchyard.sh latency`: one job at a time, created through REST,
# assignment received over gRPC) with tcpdump on loopback, then splits each job's path at the
# packets that mark its hops and prints the median and p90 of each:
#   job-api: request in -> first statement out; its statements until COMMIT is answered;
#   COMMIT answered -> wake-up published; Redis -> scheduler; scheduler: wake-up in -> first
#   statement out; its statements until COMMIT is answered; COMMIT answered -> offer published;
#   Redis -> gateway; gateway: offer in -> assignment written to the agent's stream. A job its
#   create leased (JOB_API_LEASE_ON_CREATE) goes from job-api's COMMIT straight to its offer;
#   each path gets its own table.
# Needs tcpdump (installed with apt-get when missing and run as root) and python3; the release
# binaries are used as they are when BENCH_SKIP_BUILD=1. LAT_N sets the number of jobs (200).
# Usage: scripts/idle-timeline.sh [pcap file to analyse instead of measuring]
set -euo pipefail
cd "$(dirname "$0")/.."

api=${BENCH_API_PORT:-18080} grpc=${BENCH_GRPC_PORT:-50151}
pg=${PGPORT:-5432} redis=${REDIS_PORT:-6379}
pcap=${1:-}
if [[ -z $pcap ]]; then
  if ! command -v tcpdump >/dev/null; then
    [[ $(id -u) == 0 ]] || { echo "idle-timeline: tcpdump is missing (apt-get install tcpdump)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump >/dev/null
  fi
  mkdir -p target/bench
  pcap=target/bench/idle-timeline.pcap
  # 300 bytes of each packet: enough for the headers and PostgreSQL's short answers.
  tcpdump -i lo -n -s 300 -w "$pcap" \
    "tcp port $api or tcp port $pg or tcp port $redis or tcp port $grpc" 2>/dev/null &
  dump=$!
  trap 'kill $dump 2>/dev/null || true' EXIT
  sleep 1
  bash bench/peers/switchyard.sh latency | grep RESULT
  sleep 0.5
  kill -INT $dump
  wait $dump 2>/dev/null || true
  trap - EXIT
fi

tcpdump -r "$pcap" -n -tt -A 2>/dev/null |
  API=$api GRPC=$grpc PG=$pg REDIS=$redis python3 -c '
import os, re, statistics, sys

api, grpc, pg, redis = (int(os.environ[k]) for k in ("API", "GRPC", "PG", "REDIS"))
header = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): .* length (\d+)")
packets = []  # (time, source port, destination port, payload text)
for line in sys.stdin:
    m = header.match(line)
    if m:
        packets.append([float(m[1]), int(m[2]), int(m[3]), int(m[4]), ""])
    elif packets:
        packets[-1][4] += line
packets = [p for p in packets if p[3] > 0]

def first(after, test, within):
    for p in within:
        if p[0] >= after and test(p):
            return p
    raise LookupError

def commit_answer(port, after, within):
    # PostgreSQL answers COMMIT with the command tag "COMMIT".
    return first(after, lambda p: p[1] == pg and p[2] == port and "COMMIT" in p[4], within)

paths = {}  # path name -> hop name -> durations
for i, request in enumerate(packets):
    if request[2] != api or "POST /v1/orgs/" not in request[4]:
        continue
    t0 = request[0]
    window = [p for p in packets[i + 1 : i + 200] if p[0] - t0 < 0.05]
    try:
        api_first = first(t0, lambda p: p[2] == pg, window)
        api_commit = commit_answer(api_first[1], t0, window)
        published = first(api_commit[0], lambda p: p[2] == redis, window)
        if "scheduler:wake" in published[4]:
            path = "through the scheduler"
            wake = published
            wake_in = first(wake[0], lambda p: p[1] == redis and p[2] != wake[1], window)
            sched_first = first(wake_in[0], lambda p: p[2] == pg and p[1] != api_first[1], window)
            sched_commit = commit_answer(sched_first[1], sched_first[0], window)
            offer = first(sched_commit[0], lambda p: p[2] == redis, window)
        else:
            path = "leased on create"
            offer = published
        offer_in = first(offer[0], lambda p: p[1] == redis and p[2] != offer[1], window)
        assignment = first(offer_in[0], lambda p: p[1] == grpc, window)
    except LookupError:
        continue
    marks = [
        ("job-api: request in -> first statement out", t0, api_first),
        ("job-api: statements, COMMIT answered", api_first[0], api_commit),
    ]
    if path == "through the scheduler":
        marks += [
            ("job-api: COMMIT -> wake-up published", api_commit[0], wake),
            ("Redis: wake-up -> scheduler", wake[0], wake_in),
            ("scheduler: wake-up -> first statement out", wake_in[0], sched_first),
            ("scheduler: statements, COMMIT answered", sched_first[0], sched_commit),
            ("scheduler: COMMIT -> offer published", sched_commit[0], offer),
        ]
    else:
        marks += [("job-api: COMMIT -> offer published", api_commit[0], offer)]
    marks += [
        ("Redis: offer -> gateway", offer[0], offer_in),
        ("gateway: offer -> assignment written", offer_in[0], assignment),
        ("total: request in -> assignment written", t0, assignment),
    ]
    hops = paths.setdefault(path, {})
    for name, start, end in marks:
        hops.setdefault(name, []).append((end[0] - start) * 1000)
if not paths:
    sys.exit("idle-timeline: no complete job path found in the capture")
def p90(values):
    return sorted(values)[int(0.9 * (len(values) - 1))]
for path, hops in paths.items():
    n = len(next(iter(hops.values())))
    print(f"\n| hop, {path} ({n} jobs) | p50 ms | p90 ms |")
    print("|---|---|---|")
    for name, values in hops.items():
        print(f"| {name} | {statistics.median(values):.3f} | {p90(values):.3f} |")
'
