//! Fixtures: gateways in-process, agent processes, and the scheduler's
//! lease-and-offer step.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_gateway::{Config, Listeners};
use bus::{Bus, Channel};
use domain::agent::AgentStatus;
use domain::events::{Envelope, Event};
use domain::job::{JobStatus, Labels, NewJob, Payload, QueueName, Timeouts};
use domain::org::OrgSettings;
use domain::retry::RetryPolicy;
use domain::{AgentId, JobId, OrgId};
use test_support::{TestDb, common_config};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Gateway {
    pub grpc_url: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub fn start(db: &TestDb, redis_url: &str, prefix: &str) -> Self {
        let vars: Vec<(&str, &str)> = vec![
            ("AGENT_HEARTBEAT_INTERVAL_MS", "200"),
            ("AGENT_LEASE_TTL_MS", "1500"),
            ("AGENT_OFFLINE_GRACE_MS", "300"),
            ("HTTP_SHUTDOWN_TIMEOUT_SECS", "2"),
        ];
        let lookup = move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        let config = Config::from_parts(
            common_config(agent_gateway::SERVICE, db, redis_url, prefix),
            &lookup,
        )
        .expect("config");
        let grpc = TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = TcpListener::bind("127.0.0.1:0").expect("bind");
        let grpc_url = format!("http://{}", grpc.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent_gateway::run(
            config,
            Listeners { grpc, http },
            shutdown.clone(),
        ));
        Self {
            grpc_url,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("clean stop");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn bus(redis_url: &str, prefix: &str) -> Bus {
    Bus::connect(&test_support::bus_config(redis_url, prefix)).expect("bus")
}

pub fn org() -> OrgId {
    OrgId::parse("acme").expect("org")
}

pub async fn registration_token(db: &TestDb) -> String {
    let mut conn = db.conn().await;
    db::orgs::ensure_org(&mut conn, &org(), None)
        .await
        .expect("org");
    db::agents::create_registration_token(
        &mut conn,
        db::agents::NewRegistrationToken {
            org: &org(),
            description: None,
            labels: &Labels::default(),
            max_uses: 10,
            ttl: Duration::from_secs(3600),
            created_by: "tester",
        },
    )
    .await
    .expect("token")
    .1
}

/// A scratch directory, removed at the end.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("yard-agent-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `yard-agent` process.
pub struct AgentProcess {
    pub child: Child,
    pub credential: PathBuf,
    pub work_dir: PathBuf,
}

impl AgentProcess {
    pub fn spawn(urls: &[&str], token: &str, dir: &Path, name: &str) -> Self {
        let credential = dir.join(format!("{name}.credential.json"));
        let work_dir = dir.join(format!("{name}-work"));
        let child = Command::new(env!("CARGO_BIN_EXE_yard-agent"))
            .env("SWITCHYARD_GATEWAY_URL", urls.join(","))
            .env("SWITCHYARD_REGISTRATION_TOKEN", token)
            .env("SWITCHYARD_CREDENTIAL_FILE", &credential)
            .env("SWITCHYARD_AGENT_NAME", name)
            .env("SWITCHYARD_AGENT_LABELS", "os=linux")
            .env("SWITCHYARD_AGENT_CAPACITY", "2")
            .env("SWITCHYARD_WORK_DIR", &work_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start yard-agent");
        Self {
            child,
            credential,
            work_dir,
        }
    }

    /// The agent's id once it has registered.
    pub async fn agent_id(&self) -> AgentId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.credential)
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(id) = value["agent_id"].as_str()
            {
                return id.parse().expect("agent id");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not register"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn command_job(command: &str) -> NewJob {
    NewJob {
        queue: QueueName::backlog(),
        priority: 0,
        repository_id: None,
        required_labels: Labels::default(),
        concurrency: None,
        requires_approval: false,
        retry_policy: RetryPolicy {
            initial_interval_ms: 0,
            maximum_interval_ms: 0,
            ..RetryPolicy::default()
        },
        timeouts: Timeouts::default(),
        run_at: None,
        payload: Payload {
            prompt: None,
            command: Some(command.to_owned()),
        },
        metadata: serde_json::json!({}),
    }
}

pub async fn submit(db: &TestDb, command: &str) -> JobId {
    let mut conn = db.conn().await;
    let settings = OrgSettings::default();
    let ctx = db::jobs::CreateContext {
        org: &org(),
        settings: &settings,
        settings_version: db::orgs::SettingsVersion::Current,
        created_by: None,
        request_id: None,
        trace: None,
        lease_on_create: None,
    };
    db::jobs::create_jobs(&mut conn, &ctx, &[command_job(command)], None)
        .await
        .expect("create")
        .jobs[0]
        .job_id()
}

/// Plays the scheduler: lease the job to the agent and offer it.
pub async fn offer(db: &TestDb, bus: &Bus, job: JobId, agent: AgentId) -> u64 {
    let mut conn = db.conn().await;
    let lease = db::leases::lease_job(&mut conn, job, agent, Duration::from_secs(30))
        .await
        .expect("lease");
    let envelope = Envelope::new(
        org(),
        Event::AssignmentOffered {
            agent_id: agent,
            job_id: job,
            epoch: lease.epoch as u64,
            attempt: lease.attempt as u32,
            lease_expires_at: lease.expires_at,
            job: None,
        },
    );
    bus.publish(&Channel::Agent(agent), &envelope)
        .await
        .expect("offer");
    lease.epoch as u64
}

pub async fn job_row(db: &TestDb, job: JobId) -> db::jobs::Job {
    let mut conn = db.conn().await;
    db::jobs::get_any(&mut conn, job).await.expect("job")
}

pub async fn agent_status(db: &TestDb, agent: AgentId) -> AgentStatus {
    let mut conn = db.conn().await;
    db::sessions::agent(&mut conn, agent)
        .await
        .expect("agent")
        .status()
}

pub async fn eventually<F, Fut>(what: &str, wait: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_status(db: &TestDb, job: JobId, status: JobStatus) {
    eventually(&format!("job {status}"), WAIT, || async {
        job_row(db, job).await.status() == status
    })
    .await;
}

pub async fn wait_agent(db: &TestDb, agent: AgentId, status: AgentStatus) {
    eventually(&format!("agent {status}"), WAIT, || async {
        agent_status(db, agent).await == status
    })
    .await;
}

pub async fn log_lines(db: &TestDb, job: JobId) -> Vec<(i64, String)> {
    let mut conn = db.conn().await;
    db::logs::read(&mut conn, job, 0, 10_000)
        .await
        .expect("logs")
        .into_iter()
        .map(|l| (l.seq, l.line))
        .collect()
}
