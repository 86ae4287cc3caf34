//! `yard-fault`: the multi-process fault test.
//!
//! Starts a PostgreSQL and a Redis of its own, two replicas of every
//! service and a few `yard-agent`s as separate processes, pushes jobs
//! through both job-api replicas while WebSocket clients follow a sample of
//! them through both broadcasters, and meanwhile SIGKILLs and restarts one
//! replica of each service and one agent, restarts Redis and restarts
//! PostgreSQL, timing how long the system takes to make progress again.
//! Then it checks, against PostgreSQL, that every job ended as it should,
//! none completed twice, no stale write landed, and every watcher saw
//! every line exactly once and in order. Exits non-zero if any check fails.
//!
//! Settings (environment): `YARD_FAULT_JOBS` (default 500),
//! `YARD_FAULT_WATCHERS` (60), `YARD_FAULT_AGENTS` (4),
//! `YARD_FAULT_DEADLINE_SECS` (240), `YARD_FAULT_KEEP=1` keeps the
//! temporary directory (logs) even when every check passes,
//! `YARD_FAULT_STRICT=1` fails the run on known (reported) service issues
//! too, not only on the checks' own failures.

mod api;
mod checks;
mod cluster;
mod stale;
mod watcher;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::api::Api;
use crate::checks::{Check, Kind, TERMINAL};
use crate::cluster::{Postgres, Proc, Redis, free_port};

const ORG: &str = "fault-org";
const FLEET_LABEL: &str = "fleet";
const LINES_PER_JOB: usize = 20;
const REPLICAS: usize = 2;
const SERVICES: [&str; 4] = [
    "job-api",
    "scheduler",
    "agent-gateway",
    "realtime-broadcaster",
];

struct Settings {
    jobs: usize,
    watchers: usize,
    agents: usize,
    agent_capacity: u32,
    deadline: Duration,
    keep: bool,
    strict: bool,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            jobs: number("YARD_FAULT_JOBS", 500) as usize,
            watchers: number("YARD_FAULT_WATCHERS", 60) as usize,
            agents: number("YARD_FAULT_AGENTS", 4).max(2) as usize,
            agent_capacity: 5,
            deadline: Duration::from_secs(number("YARD_FAULT_DEADLINE_SECS", 240)),
            keep: std::env::var("YARD_FAULT_KEEP").is_ok_and(|v| v == "1"),
            strict: std::env::var("YARD_FAULT_STRICT").is_ok_and(|v| v == "1"),
        }
    }
}

/// Every process of the system under test.
struct Cluster {
    pg: Postgres,
    redis: Option<Redis>,
    /// `SERVICES[s]` replica `r` is `services[s * REPLICAS + r]`.
    services: Vec<Proc>,
    agents: Vec<Proc>,
    agent_dirs: Vec<PathBuf>,
    logs: PathBuf,
}

impl Cluster {
    fn service(&mut self, name: &str, replica: usize) -> &mut Proc {
        let s = SERVICES.iter().position(|n| *n == name).unwrap_or(0);
        &mut self.services[s * REPLICAS + replica]
    }

    async fn all_ready(&mut self, http: &reqwest::Client, within: Duration) -> anyhow::Result<()> {
        for service in &mut self.services {
            service.wait_ready(http, within).await?;
        }
        Ok(())
    }

    fn log_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self
            .services
            .iter()
            .chain(&self.agents)
            .map(|p| p.log.clone())
            .collect();
        paths.push(self.pg.log.clone());
        paths.push(self.logs.join("migrate.log"));
        paths
    }

    async fn stop(&mut self) {
        for p in self.services.iter_mut().chain(self.agents.iter_mut()) {
            p.kill().await;
        }
        self.pg.stop().await;
        self.redis = None;
    }
}

struct Fault {
    name: String,
    injected_at: Duration,
    recovery: Option<Duration>,
    detail: String,
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("yard-fault: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Settings::from_env())) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("yard-fault: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(started: Instant, message: impl AsRef<str>) {
    println!(
        "[{:>6.1}s] {}",
        started.elapsed().as_secs_f64(),
        message.as_ref()
    );
}

async fn run(settings: Settings) -> anyhow::Result<bool> {
    let started = Instant::now();
    let root = std::env::temp_dir().join(format!("yard-fault-{}", Uuid::new_v4().simple()));
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    let bin = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    say(started, format!("working in {}", root.display()));

    let pg = Postgres::start(&root).await.context("start PostgreSQL")?;
    let redis = Redis::start().await.context("start Redis")?;
    say(
        started,
        format!("PostgreSQL on port {}, Redis at {}", pg.port, redis.url()),
    );
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let common = common_env(&pg.url(), &redis.url(), &secret);

    migrate(&bin, &common, &logs).await?;

    let http = reqwest::Client::builder().build()?;
    let mut services = Vec::new();
    let mut api_bases = Vec::new();
    let mut grpc_gateways = Vec::new();
    let mut http_gateways = Vec::new();
    let mut broadcasters = Vec::new();
    for service in SERVICES {
        for replica in 0..REPLICAS {
            let port = free_port()?;
            let mut env = common.clone();
            let addr = format!("127.0.0.1:{port}");
            match service {
                "job-api" => {
                    env.push(("JOB_API_ADDR".into(), addr.clone()));
                    api_bases.push(format!("http://{addr}"));
                }
                "scheduler" => env.push(("SCHEDULER_HTTP_ADDR".into(), addr.clone())),
                "agent-gateway" => {
                    let grpc = free_port()?;
                    env.push(("GATEWAY_HTTP_ADDR".into(), addr.clone()));
                    env.push(("GATEWAY_GRPC_ADDR".into(), format!("127.0.0.1:{grpc}")));
                    env.push(("GATEWAY_ID".into(), format!("gateway-{replica}")));
                    grpc_gateways.push(format!("http://127.0.0.1:{grpc}"));
                    http_gateways.push(format!("http://{addr}"));
                }
                _ => {
                    env.push(("BROADCASTER_ADDR".into(), addr.clone()));
                    broadcasters.push(format!("ws://{addr}"));
                }
            }
            let mut proc = Proc::new(
                format!("{service}-{replica}"),
                bin.join(service),
                env,
                &logs,
                Some(format!("http://{addr}/readyz")),
            );
            proc.spawn()?;
            services.push(proc);
        }
    }
    let mut cluster = Cluster {
        pg,
        redis: Some(redis),
        services,
        agents: Vec::new(),
        agent_dirs: Vec::new(),
        logs: logs.clone(),
    };
    let outcome = exercise(
        &settings,
        &mut cluster,
        &bin,
        &secret,
        &http,
        api_bases,
        grpc_gateways,
        http_gateways,
        broadcasters,
        started,
    )
    .await;
    let passed = match outcome {
        Ok(passed) => passed,
        Err(e) => {
            println!("\nyard-fault: the run stopped early: {e:#}");
            false
        }
    };
    cluster.stop().await;
    if passed && !settings.keep {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        println!("\nlogs:");
        for path in cluster.log_paths() {
            println!("  {}", path.display());
        }
    }
    say(started, if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

fn common_env(database_url: &str, redis_url: &str, secret: &str) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database_url),
        ("DATABASE_POOL_SIZE", "8"),
        ("DATABASE_ACQUIRE_TIMEOUT_MS", "3000"),
        ("REDIS_URL", redis_url),
        ("LOG_FORMAT", "compact"),
        ("RUST_LOG", "info"),
        ("AUTH_HS256_SECRET", secret),
        ("AUTH_ISSUER", "yard-fault"),
        ("HTTP_WORKERS", "2"),
        ("HTTP_SHUTDOWN_TIMEOUT_SECS", "2"),
        // Short timings so recovery fits in the run: a lost agent's leases
        // expire in seconds, not the production half-minute.
        ("SCHEDULER_SWEEP_INTERVAL_MS", "500"),
        ("SCHEDULER_ACK_TIMEOUT_MS", "5000"),
        ("AGENT_HEARTBEAT_INTERVAL_MS", "1000"),
        ("AGENT_LEASE_TTL_MS", "8000"),
        ("AGENT_OFFLINE_GRACE_MS", "2000"),
        ("AGENT_CLAIM_MAX_WAIT_MS", "2000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn migrate(bin: &Path, env: &[(String, String)], logs: &Path) -> anyhow::Result<()> {
    let log = std::fs::File::create(logs.join("migrate.log"))?;
    let status = tokio::process::Command::new(bin.join("job-api"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .await?;
    if !status.success() {
        bail!(
            "job-api migrate failed; see {}",
            logs.join("migrate.log").display()
        );
    }
    Ok(())
}

async fn dev_token(bin: &Path, secret: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(bin.join("yard"))
        .args(["dev-token", "--org", ORG, "--role", "Owner"])
        .env_clear()
        .env("AUTH_HS256_SECRET", secret)
        .env("AUTH_ISSUER", "yard-fault")
        .output()
        .await
        .context("run yard dev-token")?;
    if !output.status.success() {
        bail!(
            "yard dev-token: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

fn job_spec(kind: Kind) -> Value {
    let lines = format!(r#"for i in $(seq 1 {LINES_PER_JOB}); do echo "line $i"; sleep 0.1; done"#);
    let (command, retry) = match kind {
        Kind::Normal => (
            lines,
            json!({ "initial_interval_ms": 200, "maximum_attempts": 3, "maximum_infrastructure_attempts": 0 }),
        ),
        Kind::Flaky => (
            format!(r#"{lines}; [ "$SWITCHYARD_JOB_ATTEMPT" -ge 2 ]"#),
            json!({ "initial_interval_ms": 200, "maximum_attempts": 3, "maximum_infrastructure_attempts": 0 }),
        ),
        Kind::Doomed => (
            format!("{lines}; exit 3"),
            json!({ "initial_interval_ms": 200, "maximum_attempts": 2, "maximum_infrastructure_attempts": 0 }),
        ),
        Kind::Probe => (
            "echo probe".to_owned(),
            json!({ "initial_interval_ms": 100, "maximum_infrastructure_attempts": 0 }),
        ),
    };
    let mut spec = json!({
        "command": command,
        "labels": [FLEET_LABEL],
        "retry_policy": retry,
        "metadata": { "kind": format!("{kind:?}") },
    });
    if kind == Kind::Probe {
        // Ahead of the backlog, so it measures recovery, not queue length.
        spec["priority"] = json!(1000);
    }
    spec
}

fn kind_of(n: usize) -> Kind {
    match n {
        _ if n % 97 == 13 => Kind::Doomed,
        _ if n % 25 == 7 => Kind::Flaky,
        _ => Kind::Normal,
    }
}

#[allow(clippy::too_many_arguments)]
async fn exercise(
    settings: &Settings,
    cluster: &mut Cluster,
    bin: &Path,
    secret: &str,
    http: &reqwest::Client,
    api_bases: Vec<String>,
    grpc_gateways: Vec<String>,
    http_gateways: Vec<String>,
    broadcasters: Vec<String>,
    started: Instant,
) -> anyhow::Result<bool> {
    cluster.all_ready(http, Duration::from_secs(90)).await?;
    say(started, "every service replica is ready");
    let token = dev_token(bin, secret).await?;
    let api = Arc::new(Api::new(http.clone(), api_bases, ORG, &token));

    // Agents, registered with one REST registration token, alternating
    // which gateway they try first.
    let registration = api.registration_token(settings.agents as u32).await?;
    for n in 0..settings.agents {
        let dir = cluster
            .logs
            .parent()
            .unwrap_or(&cluster.logs)
            .join(format!("agent-{n}"));
        std::fs::create_dir_all(dir.join("work"))?;
        let urls = if n % 2 == 0 {
            grpc_gateways.clone()
        } else {
            grpc_gateways.iter().rev().cloned().collect()
        };
        let env = vec![
            ("SWITCHYARD_GATEWAY_URL".into(), urls.join(",")),
            ("SWITCHYARD_REGISTRATION_TOKEN".into(), registration.clone()),
            (
                "SWITCHYARD_CREDENTIAL_FILE".into(),
                dir.join("credential.json").display().to_string(),
            ),
            ("SWITCHYARD_AGENT_NAME".into(), format!("agent-{n}")),
            ("SWITCHYARD_AGENT_LABELS".into(), FLEET_LABEL.into()),
            (
                "SWITCHYARD_AGENT_CAPACITY".into(),
                settings.agent_capacity.to_string(),
            ),
            (
                "SWITCHYARD_WORK_DIR".into(),
                dir.join("work").display().to_string(),
            ),
            ("RUST_LOG".into(), "info".into()),
        ];
        let mut agent = Proc::new(
            format!("yard-agent-{n}"),
            bin.join("yard-agent"),
            env,
            &cluster.logs,
            None,
        );
        agent.spawn()?;
        cluster.agents.push(agent);
        cluster.agent_dirs.push(dir);
    }
    say(started, format!("{} agents started", settings.agents));

    let db = cluster.pg.url();
    let run_started = Instant::now();
    let deadline = started + settings.deadline;

    // The stale-write probe runs alongside the load.
    let stale_task = {
        let api = api.clone();
        let grpc = grpc_gateways[1].clone();
        let gateways = http_gateways.clone();
        tokio::spawn(
            async move { stale::run(&api, &grpc, gateways, Duration::from_secs(90)).await },
        )
    };

    // The load: batches and single creates on both replicas, in waves, so
    // jobs are still arriving when the first faults land.
    let kinds: Arc<Mutex<HashMap<Uuid, Kind>>> = Arc::default();
    let watchers: Arc<Mutex<Vec<tokio::task::JoinHandle<watcher::Watched>>>> = Arc::default();
    let submitter = {
        let api = api.clone();
        let kinds = kinds.clone();
        let watchers = watchers.clone();
        let broadcasters = broadcasters.clone();
        let token = token.clone();
        let total = settings.jobs;
        let watch_every = (total / settings.watchers.max(1)).max(1);
        tokio::spawn(async move {
            submit_load(
                &api,
                total,
                watch_every,
                &kinds,
                &watchers,
                broadcasters,
                token,
                deadline,
            )
            .await
        })
    };

    let faults = inject_faults(cluster, &api, http, &db, &kinds, run_started, started).await;

    let submitted = submitter.await?;
    if let Err(e) = &submitted {
        say(started, format!("submission failed: {e:#}"));
    }
    say(started, "faults done; waiting for every job to finish");
    let total_jobs = kinds.lock().await.len();
    loop {
        let open: i64 = match connect(&db).await {
            Ok(client) => client
                .query_one(
                    "SELECT count(*) FROM jobs WHERE org_id = $1 AND NOT (status = ANY($2))",
                    &[&ORG, &TERMINAL.to_vec()],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(-1),
            Err(_) => -1,
        };
        if open == 0 || Instant::now() > deadline {
            say(
                started,
                format!("{open} of {total_jobs}+ jobs not finished"),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let load_secs = run_started.elapsed();
    let stale = match tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
        stale_task,
    )
    .await
    {
        Ok(Ok(result)) => Some(result),
        Ok(Err(e)) => Some(Err(anyhow::anyhow!("stale probe task: {e}"))),
        Err(_) => Some(Err(anyhow::anyhow!(
            "stale probe did not finish by the deadline"
        ))),
    };
    let mut watched = Vec::new();
    for handle in std::mem::take(&mut *watchers.lock().await) {
        watched.push(handle.await?);
    }

    let snap = checks::snapshot(&connect(&db).await?, ORG).await?;
    let kinds = kinds.lock().await.clone();
    let mut all = checks::run_all(&snap, &kinds, LINES_PER_JOB, &watched, stale.as_ref());
    let unrecovered: Vec<String> = faults
        .iter()
        .filter(|f| f.recovery.is_none())
        .map(|f| format!("{}: {}", f.name, f.detail))
        .collect();
    all.push(Check {
        known_issue: false,
        name: "the system made progress again after every fault".into(),
        pass: unrecovered.is_empty() && faults.len() == 7,
        detail: if unrecovered.is_empty() {
            format!("{} faults", faults.len())
        } else {
            unrecovered.join("; ")
        },
    });
    let mut crashed = Vec::new();
    for p in cluster.services.iter_mut().chain(cluster.agents.iter_mut()) {
        if let Some(status) = p.exited() {
            crashed.push(format!("{} exited on its own ({status})", p.name));
        }
    }
    all.push(Check {
        known_issue: false,
        name: "no process exited on its own".into(),
        pass: crashed.is_empty(),
        detail: if crashed.is_empty() {
            "all alive at the end".into()
        } else {
            crashed.join("; ")
        },
    });
    if let Err(e) = &submitted {
        all.push(Check {
            known_issue: false,
            name: "every submission accepted".into(),
            pass: false,
            detail: format!("{e:#}"),
        });
    }

    // How often a gateway told an agent to stop a job whose lease had moved.
    let told_stale = cluster
        .agents
        .iter()
        .map(|a| {
            std::fs::read_to_string(&a.log)
                .map(|text| text.matches("lease is stale").count())
                .unwrap_or(0)
        })
        .sum::<usize>();
    print_summary(
        &snap,
        &kinds,
        &watched,
        &faults,
        &all,
        (load_secs, started.elapsed()),
        told_stale,
    );
    Ok(all
        .iter()
        .all(|c| c.pass || (c.known_issue && !settings.strict)))
}

/// A fresh connection each time: PostgreSQL is restarted mid-run, and a
/// few connections a second cost nothing here.
async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[allow(clippy::too_many_arguments)]
async fn submit_load(
    api: &Api,
    total: usize,
    watch_every: usize,
    kinds: &Mutex<HashMap<Uuid, Kind>>,
    watchers: &Mutex<Vec<tokio::task::JoinHandle<watcher::Watched>>>,
    broadcasters: Vec<String>,
    token: String,
    deadline: Instant,
) -> anyhow::Result<()> {
    const WAVES: usize = 10;
    let per_wave = total.div_ceil(WAVES);
    let mut n = 0usize;
    let mut watching = 0usize;
    for _wave in 0..WAVES {
        if n >= total {
            break;
        }
        let wave_end = (n + per_wave).min(total);
        // Four fifths of a wave in one batch, the rest one by one.
        let batch_end = n + (wave_end - n) * 4 / 5;
        let batch_kinds: Vec<Kind> = (n..batch_end).map(kind_of).collect();
        let single_kinds: Vec<Kind> = (batch_end..wave_end).map(kind_of).collect();
        let mut created: Vec<(Uuid, Kind)> = Vec::new();
        if !batch_kinds.is_empty() {
            let ids = api
                .create_batch(
                    batch_kinds.iter().map(|k| job_spec(*k)).collect(),
                    Duration::from_secs(60),
                )
                .await?;
            created.extend(ids.into_iter().zip(batch_kinds));
        }
        let singles = futures_util::future::join_all(single_kinds.iter().map(|k| async move {
            api.create_job(&job_spec(*k), Duration::from_secs(60))
                .await
                .map(|id| (id, *k))
        }))
        .await;
        for single in singles {
            created.push(single?);
        }
        let mut map = kinds.lock().await;
        for (id, kind) in created {
            map.insert(id, kind);
            // Watch a sample, always including the jobs that retry.
            if n.is_multiple_of(watch_every) || kind != Kind::Normal {
                let first = watching % broadcasters.len();
                watching += 1;
                watchers.lock().await.push(tokio::spawn(watcher::watch(
                    id,
                    broadcasters.clone(),
                    first,
                    token.clone(),
                    deadline,
                )));
            }
            n += 1;
        }
        drop(map);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    Ok(())
}

/// Each fault in turn: inject, then time until a probe job submitted right
/// after it has succeeded and every replica answers /readyz again.
async fn inject_faults(
    cluster: &mut Cluster,
    api: &Api,
    http: &reqwest::Client,
    db: &str,
    kinds: &Mutex<HashMap<Uuid, Kind>>,
    run_started: Instant,
    started: Instant,
) -> Vec<Fault> {
    let names = [
        "SIGKILL job-api-1",
        "SIGKILL agent-gateway-0",
        "SIGKILL scheduler-0",
        "SIGKILL yard-agent-0",
        "SIGKILL realtime-broadcaster-0",
        "restart Redis",
        "restart PostgreSQL",
    ];
    let mut faults = Vec::new();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for name in names {
        let injected = Instant::now();
        say(started, format!("fault: {name}"));
        let mut detail = String::new();
        let injection = inject(cluster, db, name, &mut detail).await;
        let recovery = match injection {
            Err(e) => {
                detail = format!("injection failed: {e:#}");
                None
            }
            Ok(orphans) => match recover(
                cluster,
                api,
                http,
                db,
                kinds,
                injected,
                orphans,
                &mut detail,
            )
            .await
            {
                Ok(took) => Some(took),
                Err(e) => {
                    detail = format!("{detail} not recovered: {e:#}");
                    None
                }
            },
        };
        say(
            started,
            format!(
                "  recovered in {}",
                recovery.map_or("-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
            ),
        );
        faults.push(Fault {
            name: name.to_owned(),
            injected_at: injected - run_started,
            recovery,
            detail,
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    faults
}

/// Injects one fault. For the agent, returns the jobs it held (and their
/// epochs), which must move on without it.
async fn inject(
    cluster: &mut Cluster,
    db: &str,
    name: &str,
    detail: &mut String,
) -> anyhow::Result<Vec<(String, i64)>> {
    let restart_after = Duration::from_millis(500);
    match name {
        "restart Redis" => {
            let redis = cluster.redis.take().context("no Redis")?;
            cluster.redis = Some(redis.restart().await?);
        }
        "restart PostgreSQL" => cluster.pg.restart().await?,
        "SIGKILL yard-agent-0" => {
            let credential: Value = serde_json::from_str(&std::fs::read_to_string(
                cluster.agent_dirs[0].join("credential.json"),
            )?)?;
            let agent_id = credential["agent_id"]
                .as_str()
                .context("agent_id")?
                .to_owned();
            cluster.agents[0].kill().await;
            let held: Vec<(String, i64)> = connect(db)
                .await?
                .query(
                    "SELECT id::text, lease_epoch FROM jobs WHERE agent_id::text = $1 \
                     AND status IN ('leased', 'running', 'cancel_requested')",
                    &[&agent_id],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            *detail = format!("{} jobs held", held.len());
            tokio::time::sleep(restart_after).await;
            cluster.agents[0].spawn()?;
            return Ok(held);
        }
        _ => {
            let (service, replica) = name
                .trim_start_matches("SIGKILL ")
                .rsplit_once('-')
                .context("fault name")?;
            let replica: usize = replica.parse()?;
            let proc = cluster.service(service, replica);
            proc.kill().await;
            tokio::time::sleep(restart_after).await;
            proc.spawn()?;
        }
    }
    Ok(Vec::new())
}

#[allow(clippy::too_many_arguments)]
async fn recover(
    cluster: &mut Cluster,
    api: &Api,
    http: &reqwest::Client,
    db: &str,
    kinds: &Mutex<HashMap<Uuid, Kind>>,
    injected: Instant,
    orphans: Vec<(String, i64)>,
    detail: &mut String,
) -> anyhow::Result<Duration> {
    let within = Duration::from_secs(60);
    let probe = api.create_job(&job_spec(Kind::Probe), within).await?;
    kinds.lock().await.insert(probe, Kind::Probe);
    loop {
        let job = api.get_job(probe, within).await?;
        match job["status"].as_str() {
            Some("succeeded") => break,
            Some(status) if TERMINAL.contains(&status) => bail!("probe job {probe} ended {status}"),
            _ => {}
        }
        if injected.elapsed() > within {
            bail!("probe job {probe} not done after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probe_done = injected.elapsed();
    cluster.all_ready(http, within).await?;
    let mut recovered = injected.elapsed();
    if !detail.is_empty() {
        detail.push_str("; ");
    }
    detail.push_str(&format!("probe {:.1}s", probe_done.as_secs_f64()));
    if !orphans.is_empty() {
        // The killed agent's leases must be taken back: each of its jobs
        // queued again, leased again (a new epoch) or finished.
        loop {
            let mut waiting = 0;
            for (id, epoch) in &orphans {
                let row = connect(db)
                    .await?
                    .query_one(
                        "SELECT status, lease_epoch FROM jobs WHERE id::text = $1",
                        &[id],
                    )
                    .await?;
                let status: String = row.get(0);
                let now: i64 = row.get(1);
                let leased = ["leased", "running", "cancel_requested"].contains(&status.as_str());
                if now == *epoch && leased {
                    waiting += 1;
                }
            }
            if waiting == 0 {
                break;
            }
            if injected.elapsed() > within {
                bail!("{waiting} of the killed agent's jobs still leased at their old epoch");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        recovered = injected.elapsed();
        detail.push_str(&format!(
            "; its leases taken back after {:.1}s",
            recovered.as_secs_f64()
        ));
    }
    Ok(recovered)
}

fn print_summary(
    snap: &checks::Snapshot,
    kinds: &HashMap<Uuid, Kind>,
    watched: &[watcher::Watched],
    faults: &[Fault],
    checks: &[Check],
    (load, total): (Duration, Duration),
    told_stale: usize,
) {
    let count = |pred: &dyn Fn(&str) -> bool| {
        kinds
            .iter()
            .filter(|(id, kind)| {
                **kind != Kind::Probe && snap.jobs.get(id).is_some_and(|j| pred(&j.status))
            })
            .count()
    };
    let workload = kinds.values().filter(|k| **k != Kind::Probe).count();
    println!("\n=== yard-fault summary ===");
    println!(
        "jobs submitted     {workload:>6}   (+{} probe jobs)",
        kinds.len() - workload
    );
    println!("  succeeded        {:>6}", count(&|s| s == "succeeded"));
    println!("  failed           {:>6}", count(&|s| s == "failed"));
    println!("  dead             {:>6}", count(&|s| s == "dead"));
    println!(
        "  other            {:>6}",
        count(&|s| !["succeeded", "failed", "dead"].contains(&s))
    );
    let retried = snap
        .attempts
        .iter()
        .filter(|(id, a)| kinds.contains_key(id) && a.len() > 1)
        .count();
    println!("  ran more than once {retried:>4}");
    println!(
        "watchers           {:>6}   lines checked {}",
        watched.len(),
        watched.iter().map(|w| w.lines.len()).sum::<usize>()
    );
    println!("agents told a lease was stale: {told_stale} (from the agents' logs)");
    println!(
        "load phase         {:>5.1}s   whole run {:.1}s",
        load.as_secs_f64(),
        total.as_secs_f64()
    );
    println!(
        "\n{:<34} {:>9} {:>9}  detail",
        "fault", "injected", "recovery"
    );
    for fault in faults {
        println!(
            "{:<34} {:>8.1}s {:>9}  {}",
            fault.name,
            fault.injected_at.as_secs_f64(),
            fault
                .recovery
                .map_or("NONE".to_owned(), |d| format!("{:.1}s", d.as_secs_f64())),
            fault.detail
        );
    }
    println!("\n{:<6} check", "result");
    for check in checks {
        let result = match (check.pass, check.known_issue) {
            (true, _) => "PASS",
            (false, true) => "WARN",
            (false, false) => "FAIL",
        };
        println!("{result:<6} {} — {}", check.name, check.detail);
    }
    if checks.iter().any(|c| !c.pass && c.known_issue) {
        println!(
            "WARN = a known service issue, reported; YARD_FAULT_STRICT=1 makes it fail the run"
        );
    }
}
