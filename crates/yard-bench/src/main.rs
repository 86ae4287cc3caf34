//! yard-bench: benchmarks a running Switchyard through its public
//! interfaces only (REST, the gRPC agent session, WebSocket). See
//! `scripts/bench.sh`, which starts the services and runs this.

mod agents;
mod api;
mod pgfloor;
mod report;
mod scenarios;
mod stats;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use crate::report::Report;

const SCENARIOS: &[&str] = &[
    "floor",
    "enqueue",
    "idle",
    "steady",
    "burndown",
    "lifecycle",
    "logs",
    "ws",
    "fanout",
];

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmarks a running Switchyard through REST, gRPC and WebSocket"
)]
struct Args {
    /// Scenarios to run (default: all): floor enqueue idle steady burndown lifecycle logs ws fanout.
    scenarios: Vec<String>,
    /// job-api base URL.
    #[arg(long, env = "BENCH_API_URL", default_value = "http://127.0.0.1:18080")]
    api: String,
    /// agent-gateway gRPC URL.
    #[arg(long, env = "BENCH_GRPC_URL", default_value = "http://127.0.0.1:50151")]
    grpc: String,
    /// realtime-broadcaster WebSocket URL.
    #[arg(
        long,
        env = "BENCH_WS_URL",
        default_value = "ws://127.0.0.1:18090/v1/ws"
    )]
    ws: String,
    /// A token with the Owner role in every scenario's org: each scenario works in the org
    /// named like its agent label (bench-enqueue, bench-idle, bench-steady, bench-burndown,
    /// bench-lifecycle, bench-logs, bench-fanout), since the scheduler dispatches per org and
    /// one scenario's leftovers must not hold up the next (`yard dev-token --org .. --org ..`).
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// The bench database, for the in-run PostgreSQL floor and commits/WAL per job.
    #[arg(long, env = "BENCH_PG_URL", hide_env_values = true)]
    pg_url: Option<String>,
    /// The broadcaster's process id, to read its memory.
    #[arg(long, env = "BENCH_BROADCASTER_PID")]
    broadcaster_pid: Option<u32>,
    /// socket.io server (WebSocket base, e.g. ws://127.0.0.1:18190) for the fan-out comparison.
    #[arg(long, env = "BENCH_SOCKETIO_WS")]
    socketio_ws: Option<String>,
    /// socket.io publisher endpoint (HTTP POST of {"lines": [...]}).
    #[arg(long, env = "BENCH_SOCKETIO_PUBLISH")]
    socketio_publish: Option<String>,
    /// Small sizes, for CI: checks the harness works, asserts no speed.
    #[arg(long)]
    smoke: bool,
    /// Baselines measured elsewhere in this run, NAME=VALUE (e.g. raw-pg/drain-batch=55593).
    #[arg(long = "baseline")]
    baselines: Vec<String>,
    /// Burn-down size (default 100,000; smoke 2,000).
    #[arg(long, env = "N")]
    n: Option<u64>,
    /// Steady-load rates in jobs/s, comma-separated (default 100,500,1000,2000; smoke 100,200).
    #[arg(long, env = "BENCH_STEADY_RATES", value_delimiter = ',')]
    steady_rates: Vec<u64>,
    /// Simulated agents for burn-down, lifecycle and steady load.
    #[arg(long, env = "BENCH_AGENTS")]
    agents: Option<usize>,
    /// Capacity (concurrent jobs) of each simulated agent.
    #[arg(long, env = "BENCH_CAPACITY")]
    capacity: Option<u32>,
    /// Idle WebSocket connections to hold (default 19,000: the file limit here is 20,000 per process).
    #[arg(long, env = "BENCH_IDLE_CONNECTIONS")]
    idle_connections: Option<usize>,
    /// Idle-latency samples.
    #[arg(long, env = "LAT_N")]
    lat_n: Option<usize>,
    /// Write the results here as JSON.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Peer-kit mode: run `burndown` or `latency` and print the kit's RESULT line.
    #[arg(long)]
    peer: Option<String>,
}

pub struct SocketIo {
    pub ws: String,
    pub publish: String,
}

/// Where the services are and how to reach them.
pub struct Ctx {
    pub api: api::Api,
    pub grpc: String,
    pub ws: String,
    pub token: String,
    pub pg_url: Option<String>,
    pub pg: Option<tokio_postgres::Client>,
    pub broadcaster_pid: Option<u32>,
    pub socketio: Option<SocketIo>,
}

/// How big each scenario is.
pub struct Sizes {
    pub floor_duration: Duration,
    pub enqueue_duration: Duration,
    /// (clients, jobs per request).
    pub enqueue_cases: Vec<(usize, usize)>,
    /// Stop a case early after this many jobs: every enqueued job is then drained through
    /// agents, so this bounds the clean-up (300 smoke, 5,000 full).
    pub enqueue_max_jobs: u64,
    pub drain_timeout: Duration,
    pub burndown_n: u64,
    pub burndown_timeout: Duration,
    pub lifecycle_n: u64,
    pub agents: usize,
    pub capacity: u32,
    pub idle_samples: usize,
    pub idle_gap_ms: (u64, u64),
    pub steady_rates: Vec<u64>,
    pub steady_duration: Duration,
    pub log_subscribers: usize,
    pub log_duration: Duration,
    pub log_latency_rate: u64,
    pub idle_connections: usize,
    pub fanout_subscribers: usize,
    pub fanout_lines_per_frame: usize,
    pub fanout_frame_rates: Vec<u64>,
    pub fanout_step: Duration,
}

impl Sizes {
    fn new(args: &Args) -> Self {
        let s = |smoke: u64, full: u64| if args.smoke { smoke } else { full };
        let secs =
            |smoke: f64, full: f64| Duration::from_secs_f64(if args.smoke { smoke } else { full });
        Self {
            floor_duration: secs(1.0, 5.0),
            enqueue_duration: secs(2.0, 8.0),
            enqueue_cases: if args.smoke {
                vec![(1, 1), (8, 1), (32, 1), (4, 100)]
            } else {
                vec![(1, 1), (8, 1), (32, 1), (4, 100), (2, 1000)]
            },
            enqueue_max_jobs: s(300, 5_000),
            drain_timeout: secs(60.0, 600.0),
            burndown_n: args.n.unwrap_or(s(2_000, 100_000)),
            burndown_timeout: secs(60.0, 900.0),
            lifecycle_n: s(1_000, 20_000),
            agents: args.agents.unwrap_or(8),
            capacity: args.capacity.unwrap_or(256),
            idle_samples: args.lat_n.unwrap_or(s(30, 200) as usize),
            idle_gap_ms: if args.smoke { (5, 55) } else { (5, 505) },
            steady_rates: if !args.steady_rates.is_empty() {
                args.steady_rates.clone()
            } else if args.smoke {
                vec![100, 200]
            } else {
                vec![100, 500, 1000, 2000]
            },
            steady_duration: secs(2.0, 10.0),
            log_subscribers: s(10, 100) as usize,
            log_duration: secs(1.0, 5.0),
            log_latency_rate: s(1_000, 10_000),
            idle_connections: args.idle_connections.unwrap_or(s(200, 19_000) as usize),
            fanout_subscribers: s(20, 500) as usize,
            fanout_lines_per_frame: 10,
            fanout_frame_rates: if args.smoke {
                vec![20, 50]
            } else {
                vec![50, 100, 150, 200, 300, 400, 600, 800, 1200, 1600]
            },
            fanout_step: secs(1.0, 3.0),
        }
    }
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    json!({ "cpus": cpus, "cpu_model": model })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = Sizes::new(&args);
    let pg = match &args.pg_url {
        Some(url) => Some(pgfloor::connect(url).await?),
        None => None,
    };
    let ctx = Ctx {
        api: api::Api::new(&args.api, &args.token)?,
        grpc: args.grpc.clone(),
        ws: args.ws.clone(),
        token: args.token.clone(),
        pg_url: args.pg_url.clone(),
        pg,
        broadcaster_pid: args.broadcaster_pid,
        socketio: match (&args.socketio_ws, &args.socketio_publish) {
            (Some(ws), Some(publish)) => Some(SocketIo {
                ws: ws.clone(),
                publish: publish.clone(),
            }),
            _ => None,
        },
    };
    let mut report = Report {
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: machine(),
        ..Report::default()
    };
    for raw in &args.baselines {
        let (name, value) = raw
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--baseline takes NAME=VALUE, not {raw:?}"))?;
        report.add_baseline(name, value.parse()?);
    }
    // Targets from issue #8, for the rows whose in-run comparison is a target.
    report.add_baseline("target-steady-p99-ms", 30.0);
    report.add_baseline("target-log-lines-per-s", 100_000.0);
    report.add_baseline("target-log-p99-ms", 50.0);
    report.add_baseline("target-ws-kib-per-conn", 12.0);

    if let Some(peer) = &args.peer {
        let version = env!("CARGO_PKG_VERSION");
        match peer.as_str() {
            "burndown" => {
                let jps = scenarios::burndown(&ctx, &sizes, &mut report).await?;
                anyhow::ensure!(report.failures.is_empty(), "{}", report.failures.join("; "));
                let row = &report.rows[0];
                println!(
                    "RESULT peer=switchyard@{version} workload=burndown jobs_per_s={} n={} seconds={:.2} agents={} capacity={} enqueue_jobs_per_s={}",
                    jps.round(),
                    sizes.burndown_n,
                    row.detail["seconds"].as_f64().unwrap_or(0.0),
                    sizes.agents,
                    sizes.capacity,
                    row.detail["enqueue_jobs_per_s"]
                );
            }
            "latency" => {
                let l = scenarios::idle(&ctx, &sizes, &mut report).await?;
                // The services this run started read the same environment:
                // an idle job is leased by job-api's create, or else by the
                // scheduler.
                let path = match std::env::var("JOB_API_LEASE_ON_CREATE").as_deref() {
                    Ok("false" | "0" | "no" | "off") => "rest-scheduler-grpc",
                    _ => "rest-jobapi-grpc",
                };
                println!(
                    "RESULT peer=switchyard@{version} workload=idle-latency p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2} mean_ms={:.2} n={} path={path}",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.mean_ms, l.n
                );
            }
            other => anyhow::bail!("--peer takes burndown or latency, not {other:?}"),
        }
        return Ok(());
    }

    let wanted: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    for name in &wanted {
        anyhow::ensure!(
            SCENARIOS.contains(&name.as_str()),
            "unknown scenario {name:?}; known: {}",
            SCENARIOS.join(" ")
        );
    }
    for name in SCENARIOS.iter().filter(|s| wanted.iter().any(|w| w == *s)) {
        eprintln!("yard-bench: == {name}");
        let outcome = match *name {
            "floor" => scenarios::floor(&ctx, &sizes, &mut report).await,
            "enqueue" => scenarios::enqueue(&ctx, &sizes, &mut report).await,
            "idle" => scenarios::idle(&ctx, &sizes, &mut report).await.map(drop),
            "steady" => scenarios::steady(&ctx, &sizes, &mut report).await,
            "burndown" => scenarios::burndown(&ctx, &sizes, &mut report)
                .await
                .map(drop),
            "lifecycle" => scenarios::lifecycle(&ctx, &sizes, &mut report).await,
            "logs" => scenarios::logs(&ctx, &sizes, &mut report).await,
            "ws" => scenarios::ws_idle(&ctx, &sizes, &mut report).await,
            "fanout" => scenarios::fanout(&ctx, &sizes, &mut report).await,
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            eprintln!("yard-bench: {name} FAILED: {e:#}");
            report.failures.push(format!("{name}: {e:#}"));
        }
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", report.markdown());
    eprintln!("yard-bench: results written to {}", args.out.display());
    anyhow::ensure!(
        report.failures.is_empty(),
        "{} scenario(s) failed",
        report.failures.len()
    );
    Ok(())
}
