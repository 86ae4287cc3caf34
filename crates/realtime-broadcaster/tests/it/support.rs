//! Shared test helpers: the service on port 0, a job being written to the
//! way the gateway writes (append in PostgreSQL, then publish), tokens and
//! a small WebSocket client.

use std::time::Duration;

use auth::Role;
use bus::{Bus, Channel};
use chrono::Utc;
use db::logs::IncomingLine;
use domain::events::{Envelope, Event, LogStream};
use domain::job::{JobStatus, Labels, NewJob, Payload, QueueName, Timeouts};
use domain::org::OrgSettings;
use domain::retry::RetryPolicy;
use domain::{AgentId, JobId, OrgId};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use test_support::{RunningService, TestDb, common_config, spawn_service};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "broadcaster-test-secret";

pub fn config(db: &TestDb, redis_url: &str, prefix: &str) -> realtime_broadcaster::Config {
    realtime_broadcaster::Config {
        common: common_config(realtime_broadcaster::SERVICE, db, redis_url, prefix),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth: auth::AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..auth::AuthConfig::default()
        },
        dashboard_api_url: "http://127.0.0.1:8080".into(),
        settings: realtime_broadcaster::Settings::default(),
        check_interval: Duration::from_millis(500),
    }
}

pub fn start_with(config: realtime_broadcaster::Config) -> RunningService {
    spawn_service(move |listener, shutdown| realtime_broadcaster::run(config, listener, shutdown))
}

pub fn start(db: &TestDb, redis_url: &str, prefix: &str) -> RunningService {
    start_with(config(db, redis_url, prefix))
}

/// A member's token for `orgs`.
pub fn token(orgs: &[&str]) -> String {
    let orgs: Vec<(OrgId, Role)> = orgs
        .iter()
        .map(|o| (OrgId::parse(*o).expect("org"), Role::Member))
        .collect();
    auth::dev::mint_hs256(SECRET, None, "user-1", &orgs, Duration::from_secs(3600))
}

pub fn bus(redis_url: &str, prefix: &str) -> Bus {
    Bus::connect(&test_support::bus_config(redis_url, prefix)).expect("bus")
}

fn new_job() -> NewJob {
    NewJob {
        queue: QueueName::backlog(),
        priority: 0,
        repository_id: None,
        required_labels: Labels::default(),
        concurrency: None,
        requires_approval: false,
        retry_policy: RetryPolicy::default(),
        timeouts: Timeouts::default(),
        run_at: None,
        payload: Payload {
            prompt: None,
            command: Some("yes".into()),
        },
        metadata: serde_json::json!({}),
    }
}

/// A running job whose output the test writes, as the gateway does.
pub struct Writer {
    db: db::Db,
    bus: Bus,
    pub org: OrgId,
    pub job: JobId,
    epoch: u64,
    offset: u64,
    pub last_seq: i64,
}

impl Writer {
    pub async fn new(db: &TestDb, bus: Bus, org: &str) -> Writer {
        let org = OrgId::parse(org).expect("org");
        let mut conn = db.conn().await;
        db::orgs::ensure_org(&mut conn, &org, None)
            .await
            .expect("org");
        let settings = OrgSettings::default();
        let ctx = db::jobs::CreateContext {
            org: &org,
            settings: &settings,
            settings_version: db::orgs::SettingsVersion::Current,
            created_by: Some("tester"),
            request_id: None,
            trace: None,
            lease_on_create: None,
        };
        let job = db::jobs::create_jobs(&mut conn, &ctx, &[new_job()], None)
            .await
            .expect("create")
            .jobs[0]
            .job_id();
        drop(conn);
        Writer::adopt(db, bus, org, job).await
    }

    /// Plays the agent for an existing queued job: leases and starts it.
    pub async fn adopt(db: &TestDb, bus: Bus, org: OrgId, job: JobId) -> Writer {
        let mut conn = db.conn().await;
        let lease = db::leases::lease_job(&mut conn, job, AgentId::new(), Duration::from_secs(60))
            .await
            .expect("lease");
        let epoch = lease.epoch as u64;
        db::leases::start(&mut conn, job, epoch, Duration::from_secs(600))
            .await
            .expect("start");
        Writer {
            db: db.db().clone(),
            bus,
            org,
            job,
            epoch,
            offset: 0,
            last_seq: 0,
        }
    }

    pub fn channel(&self) -> String {
        format!("job:{}", self.job)
    }

    /// Appends `count` lines of about `width` bytes and publishes them.
    pub async fn append(&mut self, count: usize, width: usize) -> i64 {
        self.append_and(count, width, true).await
    }

    /// Appends without publishing: the event is lost on the way.
    pub async fn append_unannounced(&mut self, count: usize, width: usize) -> i64 {
        self.append_and(count, width, false).await
    }

    async fn append_and(&mut self, count: usize, width: usize, publish: bool) -> i64 {
        let start = self.offset;
        let mut lines = Vec::with_capacity(count);
        for i in 0..count {
            let seq = self.last_seq + 1 + i as i64;
            let mut line = format!("line {seq} ");
            while line.len() < width {
                line.push('x');
            }
            self.offset += line.len() as u64 + 1;
            lines.push(IncomingLine {
                stream: LogStream::Stdout,
                at: Utc::now(),
                line,
                end_offset: self.offset,
            });
        }
        let mut conn = self.db.conn().await.expect("conn");
        let appended = db::logs::append(&mut conn, self.job, self.epoch, start, &lines)
            .await
            .expect("append")
            .expect("no gap");
        drop(conn);
        if let Some(last) = appended.lines.last() {
            self.last_seq = last.seq;
        }
        if !publish {
            return self.last_seq;
        }
        let envelope = Envelope::new(
            self.org.clone(),
            Event::LogLinesAppended {
                job_id: self.job,
                epoch: self.epoch,
                lines: appended.lines,
            },
        );
        self.bus
            .publish_best_effort(&Channel::Job(self.job), &envelope)
            .await;
        self.last_seq
    }

    /// Succeeds the job and announces it.
    pub async fn finish(&self) {
        self.finish_unannounced().await;
        let envelope = Envelope::new(
            self.org.clone(),
            Event::JobStatusChanged {
                job_id: self.job,
                status: JobStatus::Succeeded,
                attempt: 1,
                epoch: self.epoch,
                agent_id: None,
            },
        );
        self.bus.job_status_changed(&envelope).await;
    }

    /// Succeeds the job without announcing it.
    pub async fn finish_unannounced(&self) {
        let mut conn = self.db.conn().await.expect("conn");
        db::leases::succeed(&mut conn, self.job, self.epoch, Some(0))
            .await
            .expect("succeed");
    }
}

/// The parts of a server message the tests look at.
#[derive(Debug, Deserialize)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub lines: Vec<Line>,
    #[serde(default)]
    pub terminal: Option<bool>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Line {
    pub seq: i64,
}

/// What a client read before it stopped.
#[derive(Debug)]
pub enum Incoming {
    Frame(Frame),
    Closed(Option<u16>),
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
}

impl Client {
    pub async fn connect(service: &RunningService, token: &str) -> Client {
        let mut request = format!("ws://{}/v1/ws", service.addr)
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        Client { ws }
    }

    /// Connects through a socket with a tiny receive buffer (a slow reader).
    pub async fn connect_small_buffer(service: &RunningService, token: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let stream = socket.connect(service.addr).await.expect("tcp");
        let mut request = format!("ws://{}/v1/ws", service.addr)
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .expect("connect");
        Client { ws }
    }

    pub async fn send(&mut self, value: serde_json::Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    pub async fn subscribe(&mut self, channel: &str, since_seq: i64) {
        self.send(
            serde_json::json!({"type": "subscribe", "channel": channel, "since_seq": since_seq}),
        )
        .await;
    }

    /// The next message, or how the connection ended.
    pub async fn next(&mut self) -> Incoming {
        loop {
            match self.ws.next().await {
                None | Some(Err(_)) => return Incoming::Closed(None),
                Some(Ok(Message::Text(text))) => {
                    let frame: Frame = serde_json::from_str(text.as_str()).expect("server JSON");
                    return Incoming::Frame(frame);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Incoming::Closed(frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn next_within(&mut self, limit: Duration) -> Incoming {
        tokio::time::timeout(limit, self.next())
            .await
            .expect("a message in time")
    }
}

/// Lines received until the terminal status (or the connection ended).
pub struct Received {
    pub seqs: Vec<i64>,
    pub terminal: bool,
    pub closed: Option<Option<u16>>,
}

/// Reads a job subscription until its terminal status.
pub async fn collect(client: &mut Client, limit: Duration) -> Received {
    let mut received = Received {
        seqs: Vec::new(),
        terminal: false,
        closed: None,
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next())
            .await
            .expect("terminal status in time");
        match event {
            Incoming::Closed(code) => {
                received.closed = Some(code);
                return received;
            }
            Incoming::Frame(frame) => match frame.kind.as_str() {
                "log" => received.seqs.extend(frame.lines.iter().map(|l| l.seq)),
                "status" if frame.terminal == Some(true) => {
                    received.terminal = true;
                    return received;
                }
                "error" => panic!("unexpected error frame: {frame:?}"),
                _ => {}
            },
        }
    }
}

/// Asserts `seqs` is exactly `from..=to`.
pub fn assert_exactly(seqs: &[i64], from: i64, to: i64, who: &str) {
    let expected: Vec<i64> = (from..=to).collect();
    if seqs != expected.as_slice() {
        let dup = seqs.windows(2).find(|w| w[1] <= w[0]);
        let gap = seqs.windows(2).find(|w| w[1] > w[0] + 1);
        panic!(
            "{who}: expected {from}..={to} ({} lines), got {} lines (first {:?}, last {:?}, first out-of-order {dup:?}, first gap {gap:?})",
            expected.len(),
            seqs.len(),
            seqs.first(),
            seqs.last()
        );
    }
}
