//! The agent's main loop: one session at a time with a gateway, and the
//! jobs it runs, which outlive sessions. After a disconnect it reconnects
//! with jittered exponential backoff (to the next URL, if several) and
//! resumes: its hello lists the jobs still running with their epochs, the
//! gateway renews their leases and says where each log stands, and the
//! agent resends output from there.
//!
//! Output is kept until the gateway acknowledges it; a job's result is sent
//! only once all its output is stored, and the job is forgotten once the
//! result is acknowledged.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::Context;
use domain::events::TraceContext;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;
use yard_proto::v1 as pb;
use yard_proto::v1::agent_gateway_client::AgentGatewayClient;
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

use crate::config::AgentConfig;
use crate::credential::Credential;
use crate::runner::{Control, Exit, JobEvent, JobSpec, Runner, Stream};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Connects to a gateway URL with HTTP/2 keepalive, so a dead gateway is
/// noticed even when no message is due.
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad gateway URL {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach the gateway at {url}"))
}

/// Loads the saved credential, or registers with the registration token
/// and saves the credential (mode 0600).
pub async fn credential(config: &AgentConfig) -> anyhow::Result<Credential> {
    let path = config.credential_path();
    if let Some(credential) = Credential::load(&path)? {
        return Ok(credential);
    }
    let token = config.registration_token.as_deref().context(
        "no credential file yet: set SWITCHYARD_REGISTRATION_TOKEN (or --registration-token) to register",
    )?;
    let url = config.gateway_url.first().context("no gateway URL")?;
    let mut client = AgentGatewayClient::new(connect(url).await?);
    let response = client
        .register(pb::RegisterRequest {
            registration_token: token.to_owned(),
            name: config.agent_name(),
            labels: config.labels(),
            capacity: config.capacity,
            version: VERSION.to_owned(),
        })
        .await
        .map_err(|status| anyhow::anyhow!("registration failed: {}", status.message()))?
        .into_inner();
    let credential = Credential {
        agent_id: response.agent_id,
        agent_secret: response.agent_secret,
        org_id: response.org_id,
    };
    credential.save(&path)?;
    tracing::info!(agent.id = %credential.agent_id, path = %path.display(), "registered; credential saved");
    Ok(credential)
}

struct Line {
    stream: Stream,
    data: Vec<u8>,
    end: u64,
}

/// A job this agent holds, across sessions.
struct Held {
    epoch: u64,
    lines: VecDeque<Line>,
    produced: u64,
    sent: u64,
    committed: u64,
    /// Chunks sent and not yet acknowledged: (start, end).
    in_flight: VecDeque<(u64, u64)>,
    exit: Option<Exit>,
    cancel_requested: bool,
    result_sent: bool,
    control: mpsc::UnboundedSender<Control>,
    /// The job's span: it continues the trace the assignment carried and
    /// lasts until the job is forgotten.
    span: tracing::Span,
    /// The trace context the assignment carried.
    assigned_trace: Option<TraceContext>,
}

impl Held {
    /// The trace context to put on messages about this job: the job span's,
    /// or, when this agent records no spans, the one it was given.
    fn trace(&self) -> Option<pb::TraceContext> {
        trace_to_pb(telemetry::trace_context_of(&self.span).or_else(|| self.assigned_trace.clone()))
    }

    fn running(&self, job_id: &str) -> pb::RunningJob {
        pb::RunningJob {
            job_id: job_id.to_owned(),
            epoch: self.epoch,
            log_offset: self.produced,
        }
    }

    fn acknowledge(&mut self, committed: u64) {
        self.committed = self.committed.max(committed);
        if let Some((start, _)) = self.in_flight.pop_front()
            && committed < start
        {
            // The gateway has less than we thought: resend from there.
            self.sent = self.committed;
            self.in_flight.clear();
        }
        self.sent = self.sent.max(self.committed);
        while self.lines.front().is_some_and(|l| l.end <= self.committed) {
            self.lines.pop_front();
        }
    }

    fn rewind(&mut self) {
        self.sent = self.committed;
        self.in_flight.clear();
    }
}

/// How a session ended.
enum SessionEnd {
    /// Drained: nothing runs and no new work is taken. Exit.
    Drained,
    /// The connection was lost (or never made); reconnect.
    Lost(anyhow::Error),
    /// The gateway refused this agent for good (revoked).
    Refused(String),
}

pub struct Agent {
    config: AgentConfig,
    credential: Credential,
    runner: Runner,
    jobs: HashMap<String, Held>,
    events_tx: mpsc::UnboundedSender<JobEvent>,
    draining: bool,
    max_chunk: usize,
    heartbeat_every: Duration,
    default_grace: Duration,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        credential: Credential,
    ) -> (Self, mpsc::UnboundedReceiver<JobEvent>) {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let runner = Runner {
            work_dir: config.work_dir.clone(),
            shell: config.shell.clone(),
            executor: config.executor.clone(),
        };
        let agent = Self {
            config,
            credential,
            runner,
            jobs: HashMap::new(),
            events_tx,
            draining: false,
            max_chunk: 256 * 1024,
            heartbeat_every: Duration::from_secs(5),
            default_grace: Duration::from_secs(10),
        };
        (agent, events_rx)
    }

    /// Runs until drained (after `drain` is cancelled and every job is
    /// done) or until the gateway refuses the agent.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<JobEvent>,
        drain: CancellationToken,
    ) -> anyhow::Result<()> {
        let urls = self.config.gateway_url.clone();
        anyhow::ensure!(!urls.is_empty(), "no gateway URL");
        let mut failures: u32 = 0;
        let mut index = 0usize;
        loop {
            let url = &urls[index % urls.len()];
            let (end, welcomed) = self.session(url, &mut events, &drain).await;
            match end {
                SessionEnd::Drained => {
                    tracing::info!("drained; exiting");
                    return Ok(());
                }
                SessionEnd::Refused(why) => anyhow::bail!("the gateway refused this agent: {why}"),
                SessionEnd::Lost(error) => {
                    tracing::warn!(gateway = %url, error = format!("{error:#}"), "session lost; reconnecting");
                }
            }
            failures = if welcomed {
                0
            } else {
                failures.saturating_add(1)
            };
            index += 1;
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32 << failures.min(8))
                .min(BACKOFF_MAX);
            let wait = ceiling
                .mul_f64(rand::random::<f64>())
                .max(Duration::from_millis(50));
            // Keep collecting output while disconnected.
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    event = events.recv() => if let Some(event) = event { self.on_job_event(event) },
                    () = drain.cancelled(), if !self.draining => self.draining = true,
                }
            }
            if self.draining && self.jobs.is_empty() {
                return Ok(());
            }
        }
    }

    fn hello(&self) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(AgentMsg::Hello(pb::Hello {
                labels: self.config.labels(),
                capacity: self.config.capacity,
                version: VERSION.to_owned(),
                running: self.jobs.iter().map(|(id, job)| job.running(id)).collect(),
            })),
        }
    }

    /// One session; returns how it ended and whether it got as far as a welcome.
    async fn session(
        &mut self,
        url: &str,
        events: &mut mpsc::UnboundedReceiver<JobEvent>,
        drain: &CancellationToken,
    ) -> (SessionEnd, bool) {
        let span = tracing::info_span!("session", gateway = %url, trace_id = tracing::field::Empty);
        telemetry::record_trace_id(&span);
        self.session_in(url, events, drain, &span)
            .instrument(span.clone())
            .await
    }

    async fn session_in(
        &mut self,
        url: &str,
        events: &mut mpsc::UnboundedReceiver<JobEvent>,
        drain: &CancellationToken,
        span: &tracing::Span,
    ) -> (SessionEnd, bool) {
        let channel = match connect(url).await {
            Ok(channel) => channel,
            Err(e) => return (SessionEnd::Lost(e), false),
        };
        let mut client = AgentGatewayClient::new(channel)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
        for job in self.jobs.values_mut() {
            job.rewind();
            job.result_sent = false;
        }
        let _ = tx.send(self.hello()).await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {}", self.credential.agent_secret);
        match bearer.parse() {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => {
                return (
                    SessionEnd::Refused("the agent secret is not valid metadata".into()),
                    false,
                );
            }
        }
        // The session's own trace, once per stream; each job's trace comes
        // on its assignment instead.
        if let Some(trace) = telemetry::trace_context_of(span) {
            if let Ok(value) = trace.traceparent.parse() {
                request.metadata_mut().insert("traceparent", value);
            }
            if let Some(Ok(value)) = trace.tracestate.map(|s| s.parse()) {
                request.metadata_mut().insert("tracestate", value);
            }
        }
        let mut inbound = match client.open_session(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return (SessionEnd::Refused(status.message().to_owned()), false);
            }
            Err(status) => return (SessionEnd::Lost(status.into()), false),
        };
        match inbound.message().await {
            Ok(Some(pb::ServerMessage {
                msg: Some(ServerMsg::Welcome(welcome)),
            })) => {
                tracing::info!(gateway = %url, gateway.id = %welcome.gateway_id, session.id = %welcome.session_id, "session open");
                self.heartbeat_every =
                    Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
                if let Some(limits) = welcome.limits {
                    if limits.max_log_chunk_bytes > 0 {
                        self.max_chunk = (limits.max_log_chunk_bytes as usize).max(1024);
                    }
                    if limits.default_cancel_grace_ms > 0 {
                        self.default_grace = Duration::from_millis(limits.default_cancel_grace_ms);
                    }
                }
            }
            Ok(_) => {
                return (
                    SessionEnd::Lost(anyhow::anyhow!("the gateway did not welcome us")),
                    false,
                );
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return (SessionEnd::Refused(status.message().to_owned()), false);
            }
            Err(status) => return (SessionEnd::Lost(status.into()), false),
        }
        if self.draining {
            let _ = tx
                .send(agent_msg(AgentMsg::Draining(pb::Draining {})))
                .await;
        }
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.draining && self.jobs.is_empty() {
                return (SessionEnd::Drained, true);
            }
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Some(message) = message.msg {
                            self.on_server(message, &tx).await;
                        }
                    }
                    Ok(None) => return (SessionEnd::Lost(anyhow::anyhow!("the gateway closed the session")), true),
                    Err(status) if status.code() == tonic::Code::Unauthenticated => {
                        return (SessionEnd::Refused(status.message().to_owned()), true);
                    }
                    Err(status) => return (SessionEnd::Lost(status.into()), true),
                },
                event = events.recv() => if let Some(event) = event { self.on_job_event(event) },
                _ = heartbeat.tick() => {
                    let running = self.jobs.iter().map(|(id, job)| job.running(id)).collect();
                    let _ = tx.send(agent_msg(AgentMsg::Heartbeat(pb::Heartbeat { running }))).await;
                }
                _ = flush.tick() => self.flush(&tx).await,
                () = drain.cancelled(), if !self.draining => {
                    tracing::info!(running = self.jobs.len(), "draining: finishing running jobs, taking no new ones");
                    self.draining = true;
                    let _ = tx.send(agent_msg(AgentMsg::Draining(pb::Draining {}))).await;
                }
            }
        }
    }

    fn on_job_event(&mut self, event: JobEvent) {
        match event {
            JobEvent::Output {
                job_id,
                epoch,
                stream,
                line,
            } => {
                if let Some(job) = self.jobs.get_mut(&job_id).filter(|j| j.epoch == epoch) {
                    job.produced += line.len() as u64;
                    job.lines.push_back(Line {
                        stream,
                        data: line,
                        end: job.produced,
                    });
                }
            }
            JobEvent::Exited {
                job_id,
                epoch,
                exit,
            } => {
                if let Some(job) = self.jobs.get_mut(&job_id).filter(|j| j.epoch == epoch) {
                    tracing::info!(job.id = %job_id, job.epoch = epoch, exit.code = ?exit.code, "job process ended");
                    if let Some(error) = &exit.error {
                        let line = format!("yard-agent: {error}\n").into_bytes();
                        job.produced += line.len() as u64;
                        job.lines.push_back(Line {
                            stream: Stream::System,
                            data: line,
                            end: job.produced,
                        });
                    }
                    job.exit = Some(exit);
                }
            }
        }
    }

    /// Sends unsent output in chunks of one stream each, then any result
    /// whose output is all stored.
    async fn flush(&mut self, tx: &mpsc::Sender<pb::AgentMessage>) {
        let max_chunk = self.max_chunk;
        let mut outgoing = Vec::new();
        for (job_id, job) in &mut self.jobs {
            let mut chunk: Option<(Stream, u64, Vec<u8>)> = None;
            let already = job.sent;
            for line in job.lines.iter().filter(|l| l.end > already) {
                let start = line.end - line.data.len() as u64;
                let fits = chunk.as_ref().is_some_and(|(stream, _, data)| {
                    *stream == line.stream && data.len() + line.data.len() <= max_chunk
                });
                if !fits {
                    if let Some((stream, offset, data)) = chunk.take() {
                        job.in_flight
                            .push_back((offset, offset + data.len() as u64));
                        outgoing.push(log_chunk(job_id, job, stream, offset, data));
                    }
                    chunk = Some((line.stream, start, Vec::new()));
                }
                if let Some((_, _, data)) = chunk.as_mut() {
                    data.extend_from_slice(&line.data);
                }
                job.sent = line.end;
            }
            if let Some((stream, offset, data)) = chunk.take() {
                job.in_flight
                    .push_back((offset, offset + data.len() as u64));
                outgoing.push(log_chunk(job_id, job, stream, offset, data));
            }
            if let Some(exit) = &job.exit
                && !job.result_sent
                && job.committed >= job.produced
            {
                job.result_sent = true;
                outgoing.push(result_message(
                    job_id,
                    job.epoch,
                    exit,
                    job.cancel_requested,
                    job.trace(),
                ));
            }
        }
        for message in outgoing {
            if tx.send(message).await.is_err() {
                return;
            }
        }
    }

    fn cancel(&mut self, job_id: &str, epoch: u64, grace: Duration) {
        if let Some(job) = self.jobs.get_mut(job_id).filter(|j| j.epoch == epoch)
            && !job.cancel_requested
        {
            tracing::info!(job.id = %job_id, job.epoch = epoch, grace_ms = grace.as_millis() as u64, "cancelling job");
            job.cancel_requested = true;
            let _ = job.control.send(Control::Cancel { grace });
        }
    }

    async fn on_server(&mut self, message: ServerMsg, tx: &mpsc::Sender<pb::AgentMessage>) {
        match message {
            ServerMsg::Welcome(_) => {}
            ServerMsg::Assignment(assignment) => self.on_assignment(assignment, tx).await,
            ServerMsg::Cancel(cancel) => {
                let grace = Duration::from_millis(cancel.grace_period_ms);
                self.cancel(&cancel.job_id, cancel.epoch, grace);
            }
            ServerMsg::LogAck(ack) => {
                if let Some(job) = self
                    .jobs
                    .get_mut(&ack.job_id)
                    .filter(|j| j.epoch == ack.epoch)
                {
                    job.acknowledge(ack.committed_offset);
                }
            }
            ServerMsg::LeaseUpdate(update) => {
                if update.cancel_requested {
                    let grace = self.default_grace;
                    self.cancel(&update.job_id, update.epoch, grace);
                }
            }
            ServerMsg::Stale(stale) => {
                if let Some(job) = self
                    .jobs
                    .get(&stale.job_id)
                    .filter(|j| j.epoch == stale.your_epoch)
                {
                    tracing::warn!(job.id = %stale.job_id, job.epoch = stale.your_epoch, "lease is stale; stopping the job");
                    let _ = job.control.send(Control::Kill);
                    self.jobs.remove(&stale.job_id);
                }
            }
            ServerMsg::Drain(drain) => {
                tracing::info!(reason = %drain.reason, "drain requested by the gateway");
                if !self.draining {
                    self.draining = true;
                    let _ = tx
                        .send(agent_msg(AgentMsg::Draining(pb::Draining {})))
                        .await;
                }
            }
            ServerMsg::ResultAck(ack) => {
                if self
                    .jobs
                    .get(&ack.job_id)
                    .is_some_and(|j| j.epoch == ack.epoch)
                {
                    tracing::info!(job.id = %ack.job_id, job.status = %ack.status, "result stored");
                    self.jobs.remove(&ack.job_id);
                }
            }
            ServerMsg::Error(error) => {
                tracing::warn!(job.id = %error.job_id, code = error.code, message = %error.message, "the gateway refused a message");
                if let Some(job) = self.jobs.get_mut(&error.job_id) {
                    // Retry what may not have landed.
                    job.rewind();
                    if error.code == tonic::Code::Unavailable as i32
                        || error.code == tonic::Code::Internal as i32
                    {
                        job.result_sent = false;
                    }
                }
            }
        }
    }

    async fn on_assignment(
        &mut self,
        assignment: pb::Assignment,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) {
        let job_id = assignment.job_id.clone();
        let epoch = assignment.epoch;
        let assigned_trace = trace_from_pb(assignment.trace.as_ref());
        if let Some(held) = self.jobs.get(&job_id).filter(|held| held.epoch == epoch) {
            // Delivered again (after a reconnect): acknowledge again.
            let _ = tx
                .send(agent_msg(AgentMsg::AssignmentAck(pb::AssignmentAck {
                    job_id,
                    epoch,
                    trace: held.trace(),
                })))
                .await;
            return;
        }
        let full = self.jobs.len() >= self.config.capacity as usize;
        if self.draining || full || self.jobs.contains_key(&job_id) {
            let reason = if self.draining {
                "draining"
            } else {
                "at capacity"
            };
            tracing::info!(job.id = %job_id, reason, "rejecting assignment");
            let _ = tx
                .send(agent_msg(AgentMsg::AssignmentReject(
                    pb::AssignmentReject {
                        job_id,
                        epoch,
                        reason: reason.to_owned(),
                        trace: trace_to_pb(assigned_trace),
                    },
                )))
                .await;
            return;
        }
        let spec = assignment.spec.unwrap_or_default();
        let job = JobSpec {
            job_id: job_id.clone(),
            epoch,
            attempt: assignment.attempt,
            command: spec.command,
            prompt: spec.prompt,
            metadata_json: spec.metadata_json,
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        // The job's span continues the job's trace (not the session's), so
        // its run, logs and result join the trace that created the job.
        let span = tracing::info_span!(
            "job",
            job.id = %job_id,
            job.epoch = epoch,
            attempt = assignment.attempt,
            trace_id = tracing::field::Empty
        );
        telemetry::adopt_trace(&span, assigned_trace.as_ref());
        let held = Held {
            epoch,
            lines: VecDeque::new(),
            produced: 0,
            sent: 0,
            committed: 0,
            in_flight: VecDeque::new(),
            exit: None,
            cancel_requested: false,
            result_sent: false,
            control: control_tx,
            span: span.clone(),
            assigned_trace,
        };
        let trace = held.trace();
        self.jobs.insert(job_id.clone(), held);
        let _ = tx
            .send(agent_msg(AgentMsg::AssignmentAck(pb::AssignmentAck {
                job_id: job_id.clone(),
                epoch,
                trace,
            })))
            .await;
        span.in_scope(|| {
            tracing::info!(job.id = %job_id, job.epoch = epoch, attempt = assignment.attempt, "job started");
        });
        tokio::spawn(
            self.runner
                .clone()
                .run(job, self.events_tx.clone(), control_rx)
                .instrument(span),
        );
    }
}

fn agent_msg(msg: AgentMsg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

fn trace_from_pb(trace: Option<&pb::TraceContext>) -> Option<TraceContext> {
    let trace = trace?;
    (!trace.traceparent.is_empty()).then(|| TraceContext {
        traceparent: trace.traceparent.clone(),
        tracestate: Some(trace.tracestate.clone()).filter(|s| !s.is_empty()),
    })
}

fn trace_to_pb(trace: Option<TraceContext>) -> Option<pb::TraceContext> {
    trace.map(|trace| pb::TraceContext {
        traceparent: trace.traceparent,
        tracestate: trace.tracestate.unwrap_or_default(),
    })
}

fn log_chunk(
    job_id: &str,
    job: &Held,
    stream: Stream,
    offset: u64,
    data: Vec<u8>,
) -> pb::AgentMessage {
    let stream = match stream {
        Stream::Stdout => pb::LogStream::Stdout,
        Stream::Stderr => pb::LogStream::Stderr,
        Stream::System => pb::LogStream::System,
    };
    agent_msg(AgentMsg::LogChunk(pb::LogChunk {
        job_id: job_id.to_owned(),
        epoch: job.epoch,
        stream: stream as i32,
        offset,
        data,
        trace: job.trace(),
    }))
}

fn result_message(
    job_id: &str,
    epoch: u64,
    exit: &Exit,
    cancelled: bool,
    trace: Option<pb::TraceContext>,
) -> pb::AgentMessage {
    if cancelled {
        return agent_msg(AgentMsg::CancelAck(pb::CancelAck {
            job_id: job_id.to_owned(),
            epoch,
            trace,
        }));
    }
    let (outcome, error_kind, message) = if exit.success() {
        (pb::Outcome::Succeeded, String::new(), String::new())
    } else if let Some(error) = &exit.error {
        (
            pb::Outcome::Failed,
            "spawn_failed".to_owned(),
            error.clone(),
        )
    } else {
        (
            pb::Outcome::Failed,
            "exit_code".to_owned(),
            format!("the process exited with {:?}", exit.code),
        )
    };
    agent_msg(AgentMsg::Result(pb::JobResult {
        job_id: job_id.to_owned(),
        epoch,
        outcome: outcome as i32,
        exit_code: exit.code,
        error_kind,
        message,
        trace,
    }))
}
