//! Test fixtures: the gateway in-process on two port-0 listeners, an org
//! with a registered agent, a raw protocol client, and the scheduler's part
//! played by hand (create a job, lease it, publish the offer).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use agent_gateway::{Config, Listeners};
use bus::{Bus, Channel};
use db::leases::Lease;
use domain::agent::{AgentProfile, AgentStatus};
use domain::events::{Envelope, Event};
use domain::job::{Labels, NewJob, Payload, QueueName, Timeouts};
use domain::org::OrgSettings;
use domain::retry::RetryPolicy;
use domain::{AgentId, JobId, OrgId};
use test_support::{TestDb, common_config};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use yard_proto::v1 as pb;
use yard_proto::v1::agent_gateway_client::AgentGatewayClient;
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);
pub const WAIT: Duration = Duration::from_secs(10);

/// A gateway running in-process.
pub struct TestGateway {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config(db: &TestDb, redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> Config {
    let mut vars: Vec<(String, String)> = vec![
        ("AGENT_HEARTBEAT_INTERVAL_MS".into(), "200".into()),
        ("AGENT_LEASE_TTL_MS".into(), "5000".into()),
        ("AGENT_OFFLINE_GRACE_MS".into(), "300".into()),
        ("AGENT_CANCEL_GRACE_MS".into(), "2000".into()),
        ("AGENT_LOG_CHUNK_MAX_BYTES".into(), "65536".into()),
        ("AGENT_CLAIM_MAX_WAIT_MS".into(), "3000".into()),
    ];
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    let lookup = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Config::from_parts(
        common_config(agent_gateway::SERVICE, db, redis_url, prefix),
        &lookup,
    )
    .expect("gateway config")
}

pub fn start_with(config: Config) -> TestGateway {
    let grpc = TcpListener::bind("127.0.0.1:0").expect("bind grpc");
    let http = TcpListener::bind("127.0.0.1:0").expect("bind http");
    let addrs = (
        grpc.local_addr().expect("addr"),
        http.local_addr().expect("addr"),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(agent_gateway::run(
        config,
        Listeners { grpc, http },
        shutdown.clone(),
    ));
    TestGateway {
        grpc: addrs.0,
        http: addrs.1,
        shutdown,
        task: Some(task),
    }
}

pub fn start(db: &TestDb, redis_url: &str, prefix: &str) -> TestGateway {
    start_with(config(db, redis_url, prefix, &[]))
}

pub fn bus(redis_url: &str, prefix: &str) -> Bus {
    Bus::connect(&test_support::bus_config(redis_url, prefix)).expect("bus")
}

pub fn org() -> OrgId {
    OrgId::parse("acme").expect("org")
}

/// Creates the org and a registration token; returns the token.
pub async fn registration_token(db: &TestDb) -> String {
    let mut conn = db.conn().await;
    db::orgs::ensure_org(&mut conn, &org(), Some("Acme"))
        .await
        .expect("org");
    let (_, token) = db::agents::create_registration_token(
        &mut conn,
        db::agents::NewRegistrationToken {
            org: &org(),
            description: Some("tests"),
            labels: &Labels::new(["pool=test"]),
            max_uses: 10,
            ttl: Duration::from_secs(3600),
            created_by: "tester",
        },
    )
    .await
    .expect("registration token");
    token
}

/// A registered agent: its id and secret.
pub struct Registered {
    pub id: AgentId,
    pub secret: String,
}

/// Registers an agent through the gateway's `Register` RPC.
pub async fn register(gateway: &TestGateway, token: &str, name: &str) -> Registered {
    let mut client = AgentGatewayClient::connect(gateway.grpc_url())
        .await
        .expect("connect");
    let response = client
        .register(pb::RegisterRequest {
            registration_token: token.to_owned(),
            name: name.to_owned(),
            labels: vec!["os=linux".into()],
            capacity: 2,
            version: "test".into(),
        })
        .await
        .expect("register")
        .into_inner();
    assert!(response.labels.contains(&"pool=test".to_owned()));
    Registered {
        id: response.agent_id.parse().expect("agent id"),
        secret: response.agent_secret,
    }
}

/// Registers directly in the database (no gateway needed).
pub async fn register_in_db(db: &TestDb, token: &str, name: &str) -> Registered {
    let mut conn = db.conn().await;
    let registered = db::agents::register(
        &mut conn,
        token,
        &AgentProfile {
            name: name.into(),
            labels: Labels::default(),
            capacity: 2,
            version: "test".into(),
        },
    )
    .await
    .expect("db")
    .expect("registered");
    Registered {
        id: registered.agent.agent_id(),
        secret: registered.secret,
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
        metadata: serde_json::json!({"ticket": "T-1"}),
    }
}

/// Submits a job (what job-api does).
pub async fn submit(db: &TestDb, command: &str) -> JobId {
    submit_in_trace(db, command, None).await
}

/// [`submit`], the job created in `trace` (as job-api stores a request's).
pub async fn submit_in_trace(
    db: &TestDb,
    command: &str,
    trace: Option<&domain::events::TraceContext>,
) -> JobId {
    let mut conn = db.conn().await;
    let settings = OrgSettings::default();
    let ctx = db::jobs::CreateContext {
        org: &org(),
        settings: &settings,
        settings_version: db::orgs::SettingsVersion::Current,
        created_by: Some("tester"),
        request_id: None,
        trace,
        lease_on_create: None,
    };
    db::jobs::create_jobs(&mut conn, &ctx, &[command_job(command)], None)
        .await
        .expect("create job")
        .jobs[0]
        .job_id()
}

/// Plays the scheduler: leases `job` to `agent` and publishes the offer.
pub async fn offer(db: &TestDb, bus: &Bus, job: JobId, agent: AgentId) -> Lease {
    offer_in_trace(db, bus, job, agent, None).await
}

/// [`offer`], the offer carrying the job's trace context.
pub async fn offer_in_trace(
    db: &TestDb,
    bus: &Bus,
    job: JobId,
    agent: AgentId,
    trace: Option<domain::events::TraceContext>,
) -> Lease {
    let mut conn = db.conn().await;
    let lease = db::leases::lease_job(&mut conn, job, agent, ACK_TIMEOUT)
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
    )
    .with_trace(trace);
    bus.publish(&Channel::Agent(agent), &envelope)
        .await
        .expect("publish offer");
    lease
}

pub async fn publish_to_agent(bus: &Bus, agent: AgentId, event: Event) {
    bus.publish(&Channel::Agent(agent), &Envelope::new(org(), event))
        .await
        .expect("publish");
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

/// Polls until `check` holds, or fails after `WAIT`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
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

pub async fn wait_online(db: &TestDb, agent: AgentId) {
    eventually("agent online", || async {
        agent_status(db, agent).await == AgentStatus::Online
    })
    .await;
}

/// A session spoken by hand, message by message.
pub struct RawSession {
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub rx: Streaming<pb::ServerMessage>,
    pub welcome: pb::Welcome,
}

impl RawSession {
    pub async fn open(url: &str, secret: &str, running: Vec<pb::RunningJob>) -> Self {
        Self::try_open(url, secret, running)
            .await
            .expect("session opens")
    }

    pub async fn try_open(
        url: &str,
        secret: &str,
        running: Vec<pb::RunningJob>,
    ) -> Result<Self, tonic::Status> {
        let mut client = AgentGatewayClient::connect(url.to_owned())
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(64);
        tx.send(msg(AgentMsg::Hello(pb::Hello {
            labels: vec!["raw".into()],
            capacity: 2,
            version: "raw-test".into(),
            running,
        })))
        .await
        .expect("hello");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {secret}").parse().expect("metadata"),
        );
        let mut rx = client.open_session(request).await?.into_inner();
        let first = tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("welcome in time")?;
        let Some(pb::ServerMessage {
            msg: Some(ServerMsg::Welcome(welcome)),
        }) = first
        else {
            panic!("expected welcome, got {first:?}");
        };
        Ok(Self { tx, rx, welcome })
    }

    pub async fn send(&self, m: AgentMsg) {
        self.tx.send(msg(m)).await.expect("send");
    }

    /// The next server message.
    pub async fn next(&mut self) -> ServerMsg {
        let next = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("server message in time")
            .expect("stream ok")
            .expect("stream open");
        next.msg.expect("message set")
    }

    /// Skips messages until `pick` returns something.
    pub async fn next_where<T>(&mut self, mut pick: impl FnMut(ServerMsg) -> Option<T>) -> T {
        loop {
            if let Some(found) = pick(self.next().await) {
                return found;
            }
        }
    }

    pub async fn assignment(&mut self) -> pb::Assignment {
        self.next_where(|m| match m {
            ServerMsg::Assignment(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// The next assignment if one comes within `wait`.
    pub async fn assignment_within(&mut self, wait: Duration) -> Option<pb::Assignment> {
        tokio::time::timeout(wait, self.assignment()).await.ok()
    }
}

pub fn msg(m: AgentMsg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

pub fn chunk(job: JobId, epoch: u64, offset: u64, data: &str) -> AgentMsg {
    AgentMsg::LogChunk(pb::LogChunk {
        job_id: job.to_string(),
        epoch,
        stream: pb::LogStream::Stdout as i32,
        offset,
        data: data.as_bytes().to_vec(),
        trace: None,
    })
}

pub fn result(job: JobId, epoch: u64, exit_code: i32) -> AgentMsg {
    AgentMsg::Result(pb::JobResult {
        job_id: job.to_string(),
        epoch,
        outcome: if exit_code == 0 {
            pb::Outcome::Succeeded as i32
        } else {
            pb::Outcome::Failed as i32
        },
        exit_code: Some(exit_code),
        error_kind: if exit_code == 0 {
            String::new()
        } else {
            "exit_code".into()
        },
        message: String::new(),
        trace: None,
    })
}

/// Stored log lines of a job: (seq, text).
pub async fn log_lines(db: &TestDb, job: JobId) -> Vec<(i64, String)> {
    let mut conn = db.conn().await;
    db::logs::read(&mut conn, job, 0, 10_000)
        .await
        .expect("read logs")
        .into_iter()
        .map(|l| (l.seq, l.line))
        .collect()
}
