//! The gRPC side: `Register`, the bidirectional `OpenSession`, gRPC health
//! checking and server reflection, with message size limits and HTTP/2
//! keepalive. A session is a task that reads the agent's messages, listens
//! on the agent's bus channel (assignments, cancels, drain, revocation from
//! whichever process issued them) and writes the server's messages.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::time::Duration;

use chrono::Utc;
use domain::agent::AgentProfile;
use domain::events::{Envelope, Event, LogStream, Offer};
use domain::job::{JobStatus, Labels};
use domain::{AgentId, JobId};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;
use yard_proto::v1 as pb;
use yard_proto::v1::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

use crate::config::GrpcSettings;
use crate::core::{AgentContext, AssignmentView, Finish, Gateway, LogAppend};
use crate::error::GatewayError;
use crate::metrics::ConnectedAgent;
use bus::Channel;
use domain::events::TraceContext;
use tracing::Instrument;

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbound messages buffered per session before the agent is too slow.
const OUTBOUND_BUFFER: usize = 256;

/// The `AgentGateway` gRPC service.
#[derive(Clone)]
pub struct AgentGatewayService {
    gateway: Gateway,
    shutdown: CancellationToken,
}

/// Serves gRPC on `listener` until `shutdown`; then sessions are ended
/// (agents reconnect elsewhere) and the server stops within `drain`.
pub async fn serve(
    gateway: Gateway,
    listener: std::net::TcpListener,
    settings: &GrpcSettings,
    shutdown: CancellationToken,
    drain: Duration,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let service = AgentGatewayServer::new(AgentGatewayService {
        gateway,
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(settings.max_message_bytes)
    .max_encoding_message_size(settings.max_message_bytes);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AgentGatewayServer<AgentGatewayService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Small frames (acks, results) must not wait for Nagle's algorithm:
    // with the agent's delayed ACKs that costs tens of milliseconds a
    // message. tonic's own `tcp_nodelay` applies only to listeners it binds.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        stream.and_then(|stream| {
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    });
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .tcp_keepalive(Some(settings.keepalive_interval))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                health
                    .set_not_serving::<AgentGatewayServer<AgentGatewayService>>()
                    .await;
            }
        });
    tokio::select! {
        result = server => result?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!("gRPC connections still open after the drain time; closing them");
        }
    }
    Ok(())
}

fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<String, GatewayError> {
    let value = metadata
        .get("authorization")
        .ok_or(GatewayError::Unauthenticated(
            "missing `authorization: Bearer <agent secret>` metadata",
        ))?
        .to_str()
        .map_err(|_| GatewayError::Unauthenticated("malformed authorization metadata"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or(GatewayError::Unauthenticated(
            "authorization metadata must be `Bearer <agent secret>`",
        ))
}

/// The most messages a session takes in one go.
const MAX_BATCH: usize = 256;

/// Drops from `left` one ack or result per `(job, epoch)` a batched
/// statement recorded; a repeat of one stays, to be answered on its own.
fn drop_answered(left: &mut Vec<pb::AgentMessage>, recorded: impl Iterator<Item = (Uuid, i64)>) {
    let mut answered: HashSet<(String, u64)> = recorded
        .map(|(job, epoch)| (job.to_string(), epoch as u64))
        .collect();
    left.retain(|m| attempt_named(m).is_none_or(|attempt| !answered.remove(&attempt)));
}

/// The attempt an ack or a result is about.
fn attempt_named(message: &pb::AgentMessage) -> Option<(String, u64)> {
    match &message.msg {
        Some(AgentMsg::AssignmentAck(ack)) => Some((ack.job_id.clone(), ack.epoch)),
        Some(AgentMsg::Result(result)) => Some((result.job_id.clone(), result.epoch)),
        _ => None,
    }
}

/// Every job a message names (a heartbeat names each job it holds).
fn jobs_named(message: &pb::AgentMessage) -> Vec<&str> {
    match &message.msg {
        Some(AgentMsg::Heartbeat(heartbeat)) => heartbeat
            .running
            .iter()
            .map(|j| j.job_id.as_str())
            .collect(),
        Some(AgentMsg::AssignmentAck(m)) => vec![&m.job_id],
        Some(AgentMsg::AssignmentReject(m)) => vec![&m.job_id],
        Some(AgentMsg::LogChunk(m)) => vec![&m.job_id],
        Some(AgentMsg::StatusUpdate(m)) => vec![&m.job_id],
        Some(AgentMsg::Result(m)) => vec![&m.job_id],
        Some(AgentMsg::CancelAck(m)) => vec![&m.job_id],
        Some(AgentMsg::Hello(_) | AgentMsg::Draining(_)) | None => Vec::new(),
    }
}

/// The acks whose attempt's success is in the same batch while no other
/// message of the batch names that job: those the success records. (A
/// log or heartbeat in between needs the job running first.)
fn acks_recorded_by_success(
    acks: &[pb::AgentMessage],
    others: &[pb::AgentMessage],
    successes: &[pb::AgentMessage],
) -> HashSet<(String, u64)> {
    let named: HashSet<&str> = others.iter().flat_map(jobs_named).collect();
    let succeeding: HashSet<(String, u64)> = successes.iter().filter_map(attempt_named).collect();
    acks.iter()
        .filter_map(attempt_named)
        .filter(|attempt| succeeding.contains(attempt) && !named.contains(attempt.0.as_str()))
        .collect()
}

fn parse_job(raw: &str) -> Result<JobId, GatewayError> {
    raw.parse()
        .map_err(|_| GatewayError::invalid(format!("job_id {raw:?} is not a UUID")))
}

fn msg(m: ServerMsg) -> pb::ServerMessage {
    pb::ServerMessage { msg: Some(m) }
}

/// A trace context from the agent protocol (absent or empty: none).
pub(crate) fn trace_from_pb(trace: Option<&pb::TraceContext>) -> Option<TraceContext> {
    let trace = trace?;
    (!trace.traceparent.is_empty()).then(|| TraceContext {
        traceparent: trace.traceparent.clone(),
        tracestate: Some(trace.tracestate.clone()).filter(|s| !s.is_empty()),
    })
}

pub(crate) fn trace_to_pb(trace: Option<TraceContext>) -> Option<pb::TraceContext> {
    trace.map(|trace| pb::TraceContext {
        traceparent: trace.traceparent,
        tracestate: trace.tracestate.unwrap_or_default(),
    })
}

/// The session's own trace, from the `traceparent`/`tracestate` metadata
/// the agent sent when it opened the stream.
fn trace_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<TraceContext> {
    let value = |name: &str| {
        metadata
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    value("traceparent").map(|traceparent| TraceContext {
        traceparent,
        tracestate: value("tracestate").filter(|s| !s.is_empty()),
    })
}

/// The assignment as sent to the agent; `trace` is the job's trace context.
pub(crate) fn assignment_message(
    view: &AssignmentView,
    trace: Option<TraceContext>,
) -> pb::Assignment {
    pb::Assignment {
        trace: trace_to_pb(trace),
        job_id: view.job_id.to_string(),
        epoch: view.epoch,
        attempt: view.attempt,
        lease_expires_at_unix_ms: view.lease_expires_at.timestamp_millis(),
        deadline_unix_ms: view.deadline.map(|d| d.timestamp_millis()),
        spec: Some(pb::JobSpec {
            org_id: view.org_id.clone(),
            queue: view.queue.clone(),
            command: view.command.clone(),
            prompt: view.prompt.clone(),
            metadata_json: view.metadata.to_string(),
            run_timeout_ms: view.run_timeout_ms,
            required_labels: view.required_labels.clone(),
            repository_id: view.repository_id.map(|r| r.to_string()),
        }),
    }
}

type Inbound = Streaming<pb::AgentMessage>;
type Outbound = mpsc::Sender<Result<pb::ServerMessage, Status>>;
type Events = Pin<Box<dyn Stream<Item = Envelope> + Send>>;

#[tonic::async_trait]
impl AgentGateway for AgentGatewayService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        let profile = AgentProfile {
            name: request.name,
            labels: Labels::new(request.labels),
            capacity: request.capacity,
            version: request.version,
        };
        let registered = self
            .gateway
            .register(&request.registration_token, &profile)
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            agent_id: registered.agent.id.to_string(),
            agent_secret: registered.secret,
            org_id: registered.agent.org_id,
            labels: registered.agent.labels,
        }))
    }

    type OpenSessionStream = ReceiverStream<Result<pb::ServerMessage, Status>>;

    async fn open_session(
        &self,
        request: Request<Inbound>,
    ) -> Result<Response<Self::OpenSessionStream>, Status> {
        let secret = bearer(request.metadata())?;
        let trace = trace_from_metadata(request.metadata());
        let agent = self.gateway.authenticate(&secret).await?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let ctx = AgentContext::from_agent(&agent, Uuid::now_v7())?;
        let span = tracing::info_span!(
            "session",
            agent.id = %ctx.id,
            session.id = %ctx.session_id,
            gateway.id = %self.gateway.gateway_id,
            trace_id = tracing::field::Empty
        );
        telemetry::adopt_trace(&span, trace.as_ref());
        let session = Session {
            gateway: self.gateway.clone(),
            ctx,
            tx,
            offered: HashSet::new(),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(session.run(agent, request.into_inner()).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a session ended.
enum End {
    /// The agent hung up (or its connection broke).
    Gone,
    /// The session was ended by the server with this status.
    Status(Status),
}

struct Session {
    gateway: Gateway,
    ctx: AgentContext,
    tx: Outbound,
    /// Assignments already delivered in this session (offers may repeat).
    offered: HashSet<(JobId, u64)>,
    shutdown: CancellationToken,
}

impl Session {
    async fn run(mut self, agent: db::agents::Agent, mut inbound: Inbound) {
        let agent_id = self.ctx.id;
        let opened = self.open(&agent, &mut inbound).await;
        let mut events = match opened {
            Ok(events) => events,
            Err(end) => {
                if let End::Status(status) = end {
                    let _ = self.tx.send(Err(status)).await;
                }
                return;
            }
        };
        tracing::info!(agent.id = %agent_id, session.id = %self.ctx.session_id, gateway.id = %self.gateway.gateway_id, "session open");
        let connected = ConnectedAgent::new(&self.gateway.metrics.connected_agents);
        let end = self.serve(&mut inbound, &mut events).await;
        drop(connected);
        match end {
            End::Gone => {}
            End::Status(status) => {
                let _ = self.tx.send(Err(status)).await;
            }
        }
        tracing::info!(agent.id = %agent_id, session.id = %self.ctx.session_id, "session closed");
        self.gateway.close_session_later(&self.ctx, None);
    }

    async fn send(&self, m: ServerMsg) -> Result<(), End> {
        self.tx.send(Ok(msg(m))).await.map_err(|_| End::Gone)
    }

    async fn subscribe(&self) -> Result<Events, GatewayError> {
        let stream = self
            .gateway
            .bus
            .subscribe(&[Channel::Agent(self.ctx.id)])
            .await?;
        Ok(Box::pin(stream))
    }

    /// Hello, subscription, online, welcome, resume, redelivery.
    async fn open(
        &mut self,
        agent: &db::agents::Agent,
        inbound: &mut Inbound,
    ) -> Result<Events, End> {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(End::Status(Status::deadline_exceeded(
                    "no hello within 10 s of opening the session",
                )));
            }
            Ok(Err(_) | Ok(None)) => return Err(End::Gone),
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(AgentMsg::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(End::Status(Status::invalid_argument(
                    "the first message of a session must be hello",
                )));
            }
        };
        // Subscribe before going online, so no assignment offered after the
        // scheduler sees us online can be missed.
        let events = self.subscribe().await.map_err(|e| End::Status(e.into()))?;
        self.gateway
            .open_session(
                agent,
                self.ctx.session_id,
                &hello.labels,
                hello.capacity,
                &hello.version,
            )
            .await
            .map_err(|e| End::Status(e.into()))?;
        let settings = &self.gateway.settings;
        self.send(ServerMsg::Welcome(pb::Welcome {
            agent_id: self.ctx.id.to_string(),
            session_id: self.ctx.session_id.to_string(),
            gateway_id: self.gateway.gateway_id.clone(),
            heartbeat_interval_ms: settings.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: settings.lease_ttl.as_millis() as u64,
            limits: Some(pb::Limits {
                max_log_chunk_bytes: settings.log_chunk_max_bytes as u64,
                max_message_bytes: 0,
                default_cancel_grace_ms: settings.cancel_grace.as_millis() as u64,
            }),
            server_time_unix_ms: Utc::now().timestamp_millis(),
        }))
        .await?;
        if !hello.running.is_empty() {
            self.resume(&hello.running).await?;
        }
        self.redeliver().await?;
        Ok(events)
    }

    /// Jobs the agent still runs after a reconnect: renew their leases
    /// (same epoch), tell it where each log stands, or that it is stale.
    async fn resume(&mut self, running: &[pb::RunningJob]) -> Result<(), End> {
        let mut held = Vec::new();
        for job in running {
            match parse_job(&job.job_id) {
                Ok(id) => held.push((id, job.epoch)),
                Err(e) => self.refuse(&job.job_id, e).await?,
            }
        }
        // Reporting a job as running proves the agent accepted it, even when
        // the gateway that received the acknowledgement died before storing
        // it (the job is then still `leased`, and its lease cannot be
        // renewed). Jobs that ended meanwhile fail here and are explained
        // by the renewal below.
        for &(job, epoch) in &held {
            if let Err(error) = self.gateway.acknowledge(&self.ctx, job, epoch).await {
                tracing::debug!(job.id = %job, epoch, error = %error, "resumed job not acknowledged");
            }
        }
        self.renew(&held).await?;
        for (job, epoch) in held {
            match self.gateway.committed_offset(job, epoch).await {
                Ok(committed) => {
                    self.send(ServerMsg::LogAck(pb::LogAck {
                        job_id: job.to_string(),
                        epoch,
                        committed_offset: committed,
                    }))
                    .await?
                }
                Err(e) => self.refuse(&job.to_string(), e).await?,
            }
        }
        Ok(())
    }

    /// Delivers assignments leased to the agent but not yet acknowledged.
    async fn redeliver(&mut self) -> Result<(), End> {
        match self.gateway.pending_assignments(&self.ctx).await {
            Ok(pending) => {
                for view in pending {
                    self.deliver(view, None).await?;
                }
            }
            Err(e) => e.log(),
        }
        Ok(())
    }

    /// Sends an assignment once per session. `offered` is the trace the
    /// offer carried, passed on as is when no span is being recorded.
    async fn deliver(
        &mut self,
        view: AssignmentView,
        offered: Option<&TraceContext>,
    ) -> Result<(), End> {
        if self.offered.insert((view.job_id, view.epoch)) {
            tracing::info!(job.id = %view.job_id, job.epoch = view.epoch, agent.id = %self.ctx.id, "assignment delivered");
            let trace = match offered {
                // The current span continues the offer's trace; with no
                // span recording, the offer's context is passed on as is.
                Some(offered) => {
                    telemetry::current_trace_context().or_else(|| Some(offered.clone()))
                }
                // A redelivery continues the trace stored with the job,
                // not the session's.
                None => view.trace.clone().or_else(telemetry::current_trace_context),
            };
            self.send(ServerMsg::Assignment(assignment_message(&view, trace)))
                .await?;
        }
        Ok(())
    }

    async fn serve(&mut self, inbound: &mut Inbound, events: &mut Events) -> End {
        let mut resubscribe: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let step = tokio::select! {
                () = self.shutdown.cancelled() => {
                    return End::Status(Status::unavailable("the gateway is shutting down; reconnect"));
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        // Take every message already waiting too, so a
                        // burst of acks or results costs one statement.
                        let mut batch = vec![message];
                        let mut ended = false;
                        while batch.len() < MAX_BATCH {
                            match inbound.message().now_or_never() {
                                Some(Ok(Some(message))) => batch.push(message),
                                Some(Ok(None) | Err(_)) => {
                                    ended = true;
                                    break;
                                }
                                None => break,
                            }
                        }
                        let handled = self.handle_batch(batch).await;
                        if ended && handled.is_ok() {
                            return End::Gone;
                        }
                        handled
                    }
                    Ok(None) => return End::Gone,
                    Err(status) => {
                        tracing::debug!(error = %status, "agent stream ended");
                        return End::Gone;
                    }
                },
                event = events.next(), if resubscribe.is_none() => match event {
                    Some(envelope) => {
                        // Offers come in bursts: take those already waiting.
                        let mut batch = vec![envelope];
                        while batch.len() < MAX_BATCH {
                            match events.next().now_or_never() {
                                Some(Some(envelope)) => batch.push(envelope),
                                // An ended stream is seen again on the next turn.
                                Some(None) | None => break,
                            }
                        }
                        self.on_events(batch).await
                    }
                    None => {
                        tracing::warn!(agent.id = %self.ctx.id, "bus subscription lost; resubscribing");
                        resubscribe = Some(Box::pin(tokio::time::sleep(Duration::from_millis(500))));
                        Ok(())
                    }
                },
                () = async { if let Some(sleep) = resubscribe.as_mut() { sleep.await } }, if resubscribe.is_some() => {
                    match self.subscribe().await {
                        Ok(stream) => {
                            *events = stream;
                            resubscribe = None;
                            // Offers published while we were deaf.
                            self.redeliver().await
                        }
                        Err(_) => {
                            resubscribe = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
                            Ok(())
                        }
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Handles messages that arrived together. Acknowledgements, and then
    /// successful results, are each recorded in one statement when there
    /// are several; an ack that came with its attempt's success, and with
    /// nothing else about that job, is recorded by the success itself (one
    /// write, not two, for a job that ran at once; its `ResultAck` answers
    /// both). Everything else, and whatever those statements did not
    /// record, goes through [`handle`](Self::handle) one by one. Acks run
    /// first and results last, so each job's ack, logs and result keep
    /// their order.
    async fn handle_batch(&mut self, batch: Vec<pb::AgentMessage>) -> Result<(), End> {
        if batch.len() == 1 {
            return self
                .handle(batch.into_iter().next().expect("one message"))
                .await;
        }
        let mut acks = Vec::new();
        let mut middle = Vec::new();
        let mut successes = Vec::new();
        for message in batch {
            match &message.msg {
                Some(AgentMsg::AssignmentAck(_)) => acks.push(message),
                Some(AgentMsg::Result(result))
                    if result.outcome == pb::Outcome::Succeeded as i32 =>
                {
                    successes.push(message)
                }
                _ => middle.push(message),
            }
        }
        let folded = acks_recorded_by_success(&acks, &middle, &successes);
        acks.retain(|m| attempt_named(m).is_none_or(|attempt| !folded.contains(&attempt)));

        if acks.len() >= 2 {
            let parsed: Vec<(JobId, u64, Option<TraceContext>)> = acks
                .iter()
                .filter_map(|m| match &m.msg {
                    Some(AgentMsg::AssignmentAck(ack)) => parse_job(&ack.job_id)
                        .ok()
                        .map(|job| (job, ack.epoch, trace_from_pb(ack.trace.as_ref()))),
                    _ => None,
                })
                .collect();
            if let Ok(started) = self.gateway.acknowledge_many(&self.ctx, &parsed).await {
                for lease in &started {
                    tracing::info!(job.id = %lease.job_id, "assignment acknowledged");
                    self.send(ServerMsg::LeaseUpdate(pb::LeaseUpdate {
                        job_id: lease.job_id.to_string(),
                        epoch: lease.epoch as u64,
                        lease_expires_at_unix_ms: lease.lease_expires_at.timestamp_millis(),
                        cancel_requested: false,
                    }))
                    .await?;
                }
                drop_answered(&mut acks, started.iter().map(|s| (s.job_id, s.epoch)));
            }
        }
        for message in acks.into_iter().chain(middle) {
            self.handle(message).await?;
        }
        if successes.len() >= 2 || !folded.is_empty() {
            let parsed: Vec<(JobId, u64, Option<i32>, Option<TraceContext>)> = successes
                .iter()
                .filter_map(|m| match &m.msg {
                    Some(AgentMsg::Result(result)) => parse_job(&result.job_id).ok().map(|job| {
                        (
                            job,
                            result.epoch,
                            result.exit_code,
                            trace_from_pb(result.trace.as_ref()),
                        )
                    }),
                    _ => None,
                })
                .collect();
            let acknowledged: HashSet<JobId> = folded
                .iter()
                .filter_map(|(job, _)| job.parse().ok())
                .collect();
            if let Ok(succeeded) = self
                .gateway
                .succeed_many(&self.ctx, &parsed, &acknowledged)
                .await
            {
                for done in &succeeded {
                    let epoch = done.epoch as u64;
                    tracing::info!(job.id = %done.job_id, job.epoch = epoch, job.status = "succeeded", "attempt ended");
                    self.send(ServerMsg::ResultAck(pb::ResultAck {
                        job_id: done.job_id.to_string(),
                        epoch,
                        status: JobStatus::Succeeded.as_str().to_owned(),
                    }))
                    .await?;
                }
                drop_answered(
                    &mut successes,
                    succeeded.iter().map(|s| (s.job_id, s.epoch)),
                );
            }
        }
        for message in successes {
            self.handle(message).await?;
        }
        Ok(())
    }

    /// Answers a refused write without ending the session.
    async fn refuse(&mut self, job: &str, error: GatewayError) -> Result<(), End> {
        error.log();
        match error {
            GatewayError::Stale {
                job: id,
                given,
                current,
            } => {
                self.send(ServerMsg::Stale(pb::Stale {
                    job_id: id.to_string(),
                    your_epoch: given,
                    current_epoch: current,
                }))
                .await
            }
            other => {
                self.send(ServerMsg::Error(pb::Error {
                    job_id: job.to_owned(),
                    code: other.code() as i32,
                    message: other.to_string(),
                }))
                .await
            }
        }
    }

    async fn renew(&mut self, held: &[(JobId, u64)]) -> Result<(), End> {
        let renewal = match self.gateway.heartbeat(&self.ctx, held).await {
            Ok(renewal) => renewal,
            Err(e) => return self.refuse("", e).await,
        };
        for lease in renewal.extended {
            self.send(ServerMsg::LeaseUpdate(pb::LeaseUpdate {
                job_id: lease.job_id.to_string(),
                epoch: lease.epoch.max(0) as u64,
                lease_expires_at_unix_ms: lease.expires_at.timestamp_millis(),
                cancel_requested: lease.cancel_requested,
            }))
            .await?;
        }
        for (job, epoch) in renewal.stale {
            let error = self.gateway.explain_unextended(&self.ctx, job, epoch).await;
            match error {
                // Ended while the agent was away (it reported, or the job
                // was cancelled or re-leased): stop it.
                GatewayError::Transition { .. }
                | GatewayError::UnknownJob(_)
                | GatewayError::NotYourJob(_) => {
                    self.send(ServerMsg::Stale(pb::Stale {
                        job_id: job.to_string(),
                        your_epoch: epoch,
                        current_epoch: 0,
                    }))
                    .await?
                }
                other => self.refuse(&job.to_string(), other).await?,
            }
        }
        Ok(())
    }

    /// Handles one agent message in a span; a message about a job
    /// continues that job's trace (sent by the agent on the message).
    async fn handle(&mut self, message: pb::AgentMessage) -> Result<(), End> {
        let about: Option<(&'static str, &str, u64, Option<&pb::TraceContext>)> = match &message.msg
        {
            Some(AgentMsg::AssignmentAck(m)) => Some(("ack", &m.job_id, m.epoch, m.trace.as_ref())),
            Some(AgentMsg::AssignmentReject(m)) => {
                Some(("reject", &m.job_id, m.epoch, m.trace.as_ref()))
            }
            Some(AgentMsg::LogChunk(m)) => Some(("log", &m.job_id, m.epoch, m.trace.as_ref())),
            Some(AgentMsg::StatusUpdate(m)) => {
                Some(("status", &m.job_id, m.epoch, m.trace.as_ref()))
            }
            Some(AgentMsg::Result(m)) => Some(("result", &m.job_id, m.epoch, m.trace.as_ref())),
            Some(AgentMsg::CancelAck(m)) => {
                Some(("cancel_ack", &m.job_id, m.epoch, m.trace.as_ref()))
            }
            _ => None,
        };
        let Some((kind, job, epoch, trace)) = about else {
            return self.handle_message(message).await;
        };
        let span = tracing::info_span!(
            "agent_message",
            kind,
            job.id = %job,
            job.epoch = epoch,
            trace_id = tracing::field::Empty
        );
        telemetry::adopt_trace(&span, trace_from_pb(trace).as_ref());
        self.handle_message(message).instrument(span).await
    }

    async fn handle_message(&mut self, message: pb::AgentMessage) -> Result<(), End> {
        let Some(message) = message.msg else {
            return self
                .refuse(
                    "",
                    GatewayError::invalid("empty agent message (no field of `msg` set)"),
                )
                .await;
        };
        match message {
            AgentMsg::Hello(_) => {
                self.refuse(
                    "",
                    GatewayError::invalid("hello may only be the first message"),
                )
                .await
            }
            AgentMsg::Heartbeat(heartbeat) => {
                let mut held = Vec::with_capacity(heartbeat.running.len());
                for job in &heartbeat.running {
                    match parse_job(&job.job_id) {
                        Ok(id) => held.push((id, job.epoch)),
                        Err(e) => self.refuse(&job.job_id, e).await?,
                    }
                }
                self.renew(&held).await
            }
            AgentMsg::AssignmentAck(ack) => {
                let result = match parse_job(&ack.job_id) {
                    Ok(job) => self.gateway.acknowledge(&self.ctx, job, ack.epoch).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(job) => {
                        tracing::info!(job.id = %ack.job_id, job.epoch = ack.epoch, "assignment acknowledged");
                        self.send(ServerMsg::LeaseUpdate(pb::LeaseUpdate {
                            job_id: ack.job_id,
                            epoch: ack.epoch,
                            lease_expires_at_unix_ms: job
                                .lease_expires_at
                                .map_or(0, |at| at.timestamp_millis()),
                            cancel_requested: job.status() == JobStatus::CancelRequested,
                        }))
                        .await
                    }
                    Err(e) => self.refuse(&ack.job_id, e).await,
                }
            }
            AgentMsg::AssignmentReject(reject) => {
                let result = match parse_job(&reject.job_id) {
                    Ok(job) => {
                        tracing::info!(job.id = %job, reason = %reject.reason, "assignment rejected");
                        self.gateway
                            .release(&self.ctx, job, reject.epoch, Duration::ZERO)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(_) => Ok(()),
                    Err(e) => self.refuse(&reject.job_id, e).await,
                }
            }
            AgentMsg::LogChunk(chunk) => self.on_log_chunk(chunk).await,
            AgentMsg::StatusUpdate(update) => {
                tracing::debug!(job.id = %update.job_id, job.epoch = update.epoch, message = %update.message, "status update");
                Ok(())
            }
            AgentMsg::Result(result) => {
                let finish = match pb::Outcome::try_from(result.outcome) {
                    Ok(pb::Outcome::Succeeded) => Finish::Succeeded {
                        exit_code: result.exit_code,
                    },
                    Ok(pb::Outcome::Failed) => Finish::Failed {
                        exit_code: result.exit_code,
                        error_kind: Some(result.error_kind.clone()).filter(|k| !k.is_empty()),
                        message: Some(result.message.clone()).filter(|m| !m.is_empty()),
                    },
                    _ => {
                        return self
                            .refuse(
                                &result.job_id,
                                GatewayError::invalid("result.outcome must be SUCCEEDED or FAILED"),
                            )
                            .await;
                    }
                };
                self.finish(&result.job_id, result.epoch, finish).await
            }
            AgentMsg::CancelAck(ack) => {
                self.finish(&ack.job_id, ack.epoch, Finish::CancelAcknowledged)
                    .await
            }
            AgentMsg::Draining(_) => match self.gateway.drain(&self.ctx).await {
                Ok(()) => Ok(()),
                Err(e) => self.refuse("", e).await,
            },
        }
    }

    async fn finish(&mut self, job: &str, epoch: u64, finish: Finish) -> Result<(), End> {
        let result = match parse_job(job) {
            Ok(id) => self.gateway.finish(&self.ctx, id, epoch, finish).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(status) => {
                tracing::info!(job.id = %job, job.epoch = epoch, job.status = %status, "attempt ended");
                self.send(ServerMsg::ResultAck(pb::ResultAck {
                    job_id: job.to_owned(),
                    epoch,
                    status: status.as_str().to_owned(),
                }))
                .await
            }
            Err(e) => self.refuse(job, e).await,
        }
    }

    async fn on_log_chunk(&mut self, chunk: pb::LogChunk) -> Result<(), End> {
        let stream = match pb::LogStream::try_from(chunk.stream) {
            Ok(pb::LogStream::Stdout) => LogStream::Stdout,
            Ok(pb::LogStream::Stderr) => LogStream::Stderr,
            Ok(pb::LogStream::System) => LogStream::System,
            _ => {
                return self
                    .refuse(
                        &chunk.job_id,
                        GatewayError::invalid("log_chunk.stream must be STDOUT, STDERR or SYSTEM"),
                    )
                    .await;
            }
        };
        let result = match parse_job(&chunk.job_id) {
            Ok(job) => {
                self.gateway
                    .append_logs(
                        &self.ctx,
                        job,
                        chunk.epoch,
                        stream,
                        chunk.offset,
                        &chunk.data,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        let committed = match result {
            Ok(LogAppend::Committed(committed)) | Ok(LogAppend::Gap { committed }) => committed,
            Err(e) => return self.refuse(&chunk.job_id, e).await,
        };
        self.send(ServerMsg::LogAck(pb::LogAck {
            job_id: chunk.job_id,
            epoch: chunk.epoch,
            committed_offset: committed,
        }))
        .await
    }

    /// Handles events that arrived together. When every one of them meant
    /// for this agent is an offer, all their jobs are read in one
    /// statement; otherwise each goes through [`on_event`](Self::on_event)
    /// in order.
    async fn on_events(&mut self, batch: Vec<Envelope>) -> Result<(), End> {
        let me = self.ctx.id;
        let mut offers = Vec::new();
        let mut commands = 0;
        for envelope in &batch {
            if let Some(found) = offers_for(me, &envelope.event, envelope.trace.as_ref()) {
                offers.extend(found);
                continue;
            }
            match &envelope.event {
                Event::CancelRequested { agent_id, .. }
                | Event::DrainRequested { agent_id }
                | Event::AgentRevoked { agent_id }
                    if *agent_id == me =>
                {
                    commands += 1
                }
                _ => {}
            }
        }
        if commands == 0 {
            return self.deliver_offers(offers).await;
        }
        for envelope in batch {
            self.on_event(envelope).await?;
        }
        Ok(())
    }

    /// Delivers the offered assignments still current (those whose offer
    /// does not carry the job are read in one statement), each in an
    /// `assignment` span continuing the trace its offer carried.
    async fn deliver_offers(&mut self, offers: Vec<Offer>) -> Result<(), End> {
        if offers.is_empty() {
            return Ok(());
        }
        let views = match self.gateway.offered_assignments(&self.ctx, &offers).await {
            Ok(views) => views,
            Err(e) => {
                // The leases lapse and are requeued if we cannot deliver.
                e.log();
                return Ok(());
            }
        };
        let mut traces: HashMap<(JobId, u64), Option<TraceContext>> = offers
            .into_iter()
            .map(|offer| ((offer.job_id, offer.epoch), offer.trace))
            .collect();
        for view in views {
            let offered = traces.remove(&(view.job_id, view.epoch)).flatten();
            let span = tracing::info_span!(
                "assignment",
                job.id = %view.job_id,
                job.epoch = view.epoch,
                trace_id = tracing::field::Empty
            );
            telemetry::adopt_trace(&span, offered.as_ref());
            self.deliver(view, offered.as_ref())
                .instrument(span)
                .await?;
        }
        Ok(())
    }

    async fn on_event(&mut self, envelope: Envelope) -> Result<(), End> {
        if let Some(offers) = offers_for(self.ctx.id, &envelope.event, envelope.trace.as_ref()) {
            return self.deliver_offers(offers).await;
        }
        match envelope.event {
            Event::CancelRequested {
                agent_id,
                job_id,
                epoch,
                grace_ms,
            } if agent_id == self.ctx.id => {
                tracing::info!(job.id = %job_id, job.epoch = epoch, "cancel delivered");
                self.send(ServerMsg::Cancel(pb::Cancel {
                    job_id: job_id.to_string(),
                    epoch,
                    grace_period_ms: grace_ms,
                    reason: "cancel requested".to_owned(),
                }))
                .await
            }
            Event::DrainRequested { agent_id } if agent_id == self.ctx.id => {
                self.send(ServerMsg::Drain(pb::Drain {
                    reason: "drain requested by an operator".to_owned(),
                }))
                .await
            }
            Event::AgentRevoked { agent_id } if agent_id == self.ctx.id => {
                tracing::info!(agent.id = %agent_id, "agent revoked; ending its session");
                crate::tokens::revoke_all(&self.gateway.bus, agent_id).await;
                Err(End::Status(Status::unauthenticated(
                    "this agent's credential was revoked",
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The offers an event makes to agent `me`, each with the trace it
/// continues (a single offer's is the envelope's).
fn offers_for(
    me: AgentId,
    event: &Event,
    envelope_trace: Option<&TraceContext>,
) -> Option<Vec<Offer>> {
    match event {
        Event::AssignmentOffered {
            agent_id,
            job_id,
            epoch,
            attempt,
            lease_expires_at,
            job,
        } if *agent_id == me => Some(vec![Offer {
            job_id: *job_id,
            epoch: *epoch,
            attempt: *attempt,
            lease_expires_at: *lease_expires_at,
            trace: envelope_trace.cloned(),
            job: job.clone(),
        }]),
        Event::AssignmentsOffered { agent_id, offers } if *agent_id == me => Some(offers.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(job: &str, epoch: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(AgentMsg::AssignmentAck(pb::AssignmentAck {
                job_id: job.into(),
                epoch,
                trace: None,
            })),
        }
    }

    fn success(job: &str, epoch: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(AgentMsg::Result(pb::JobResult {
                job_id: job.into(),
                epoch,
                outcome: pb::Outcome::Succeeded as i32,
                exit_code: Some(0),
                error_kind: String::new(),
                message: String::new(),
                trace: None,
            })),
        }
    }

    fn heartbeat(job: &str, epoch: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(AgentMsg::Heartbeat(pb::Heartbeat {
                running: vec![pb::RunningJob {
                    job_id: job.into(),
                    epoch,
                    log_offset: 0,
                }],
            })),
        }
    }

    #[test]
    fn only_an_ack_whose_success_came_with_it_alone_is_recorded_by_the_success() {
        let acks = [ack("a", 1), ack("b", 1), ack("c", 1), ack("d", 2)];
        // b's heartbeat needs it running; c has no result; d's result is
        // for another epoch.
        let others = [heartbeat("b", 1)];
        let successes = [success("a", 1), success("b", 1), success("d", 1)];
        let folded = acks_recorded_by_success(&acks, &others, &successes);
        assert_eq!(folded, HashSet::from([("a".to_owned(), 1)]));
    }
}
