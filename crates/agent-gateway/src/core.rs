//! The gateway's operations, independent of transport: the gRPC session
//! ([`crate::grpc`]) and the HTTP pull API ([`crate::http`]) are thin
//! translators over these functions, so both apply the same leases, epochs
//! and log offsets and an agent can switch transport in the middle of a job.
//!
//! Every write goes through a `db` function that is guarded by the lease
//! epoch; events are published on the bus only after the change commits.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use db::agents::Agent;
use db::jobs::Job;
use db::leases::{Ending, Extended, Success};
use db::logs::IncomingLine;
use db::{Db, DbError, PooledConn};
use domain::agent::{AgentProfile, AgentStatus};
use domain::events::{
    Envelope, Event, JobStatusChange, LogStream, Offer, OfferedJob, TraceContext,
};
use domain::job::{JobStatus, Labels, Payload};
use domain::{AgentId, JobId, OrgId};
use serde::Deserialize;
use uuid::Uuid;

use crate::config::AgentSettings;
use crate::error::{GatewayError, GatewayResult};
use crate::metrics::GatewayMetrics;
use crate::successes::SuccessWriter;
use bus::{Bus, Channel};

/// The authenticated agent behind a session or an HTTP token.
#[derive(Clone, Debug)]
pub struct AgentContext {
    pub id: AgentId,
    pub org: OrgId,
    pub session_id: Uuid,
}

impl AgentContext {
    pub fn from_agent(agent: &Agent, session_id: Uuid) -> GatewayResult<Self> {
        Ok(Self {
            id: agent.agent_id(),
            org: OrgId::parse(agent.org_id.clone())
                .map_err(|e| GatewayError::Internal(e.to_string()))?,
            session_id,
        })
    }
}

/// An assignment, as both transports deliver it.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignmentView {
    pub job_id: JobId,
    pub epoch: u64,
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
    pub deadline: Option<DateTime<Utc>>,
    pub org_id: String,
    pub queue: String,
    pub command: Option<String>,
    pub prompt: Option<String>,
    pub metadata: serde_json::Value,
    pub run_timeout_ms: Option<u64>,
    pub required_labels: Vec<String>,
    pub repository_id: Option<Uuid>,
    /// The trace stored with the job, for deliveries without an offer.
    pub trace: Option<TraceContext>,
}

impl AssignmentView {
    pub fn from_job(job: &Job) -> Self {
        let payload: Payload = serde_json::from_value(job.payload.clone()).unwrap_or_default();
        Self {
            job_id: job.job_id(),
            epoch: job.lease_epoch as u64,
            attempt: (job.app_failures + job.infra_failures + 1).max(1) as u32,
            lease_expires_at: job.lease_expires_at.unwrap_or_else(Utc::now),
            deadline: job.deadline_at,
            org_id: job.org_id.clone(),
            queue: job.queue.clone(),
            command: payload.command,
            prompt: payload.prompt,
            metadata: job.metadata.clone(),
            run_timeout_ms: job.run_timeout_ms.map(|ms| ms.max(0) as u64),
            required_labels: job.required_labels.clone(),
            repository_id: job.repository_id,
            trace: job.trace(),
        }
    }

    /// The assignment as its offer carried it.
    fn from_offer(org: &OrgId, offer: &Offer, job: &OfferedJob) -> Self {
        let payload = Payload::deserialize(&job.payload).unwrap_or_default();
        Self {
            job_id: offer.job_id,
            epoch: offer.epoch,
            attempt: offer.attempt.max(1),
            lease_expires_at: offer.lease_expires_at,
            deadline: job.deadline_at,
            org_id: org.as_str().to_owned(),
            queue: job.queue.clone(),
            command: payload.command,
            prompt: payload.prompt,
            metadata: job.metadata.clone(),
            run_timeout_ms: job.run_timeout_ms,
            required_labels: job.required_labels.clone(),
            repository_id: job.repository_id,
            trace: None,
        }
    }
}

/// How an attempt ended, as the agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    Succeeded {
        exit_code: Option<i32>,
    },
    Failed {
        exit_code: Option<i32>,
        error_kind: Option<String>,
        message: Option<String>,
    },
    /// The process stopped after a cancel.
    CancelAcknowledged,
}

/// Heartbeat outcome: leases renewed, and those that were not (stale).
#[derive(Debug, Default)]
pub struct Renewal {
    pub extended: Vec<Extended>,
    pub stale: Vec<(JobId, u64)>,
}

/// The result of a log append.
#[derive(Debug, PartialEq)]
pub enum LogAppend {
    Committed(u64),
    /// The chunk started past the committed offset: resend from here.
    Gap {
        committed: u64,
    },
}

/// The gateway's shared state: cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    pub db: Db,
    pub bus: Bus,
    pub gateway_id: String,
    pub settings: AgentSettings,
    pub metrics: GatewayMetrics,
    successes: SuccessWriter,
}

impl Gateway {
    /// Needs a Tokio runtime: it starts the success writers.
    pub fn new(db: Db, bus: Bus, gateway_id: String, settings: AgentSettings) -> Self {
        Self {
            successes: SuccessWriter::start(db.clone()),
            db,
            bus,
            gateway_id,
            settings,
            metrics: GatewayMetrics::new(),
        }
    }

    pub async fn conn(&self) -> GatewayResult<PooledConn> {
        self.db
            .conn()
            .await
            .map_err(|e| GatewayError::from_db(None, e))
    }

    /// Exchanges a registration token for an agent id and secret.
    pub async fn register(
        &self,
        token: &str,
        profile: &AgentProfile,
    ) -> GatewayResult<db::agents::Registered> {
        if token.trim().is_empty() {
            return Err(GatewayError::invalid("registration_token is required"));
        }
        let mut conn = self.conn().await?;
        match db::agents::register(&mut conn, token.trim(), profile).await {
            Ok(Ok(registered)) => {
                tracing::info!(agent.id = %registered.agent.id, org.id = %registered.agent.org_id, "agent registered");
                Ok(registered)
            }
            Ok(Err(refused)) => {
                tracing::info!(reason = %refused, "registration refused");
                Err(GatewayError::RegistrationRefused)
            }
            Err(e) => Err(GatewayError::from_db(None, e)),
        }
    }

    /// The agent owning `secret`, unless it or the credential is revoked.
    pub async fn authenticate(&self, secret: &str) -> GatewayResult<Agent> {
        let mut conn = self.conn().await?;
        db::agents::authenticate(&mut conn, secret)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?
            .ok_or(GatewayError::Unauthenticated(
                "unknown or revoked agent credential",
            ))
    }

    /// Marks the agent online on this replica under `session_id`, merging
    /// the labels it announces into those it registered with.
    pub async fn open_session(
        &self,
        agent: &Agent,
        session_id: Uuid,
        labels: &[String],
        capacity: u32,
        version: &str,
    ) -> GatewayResult<Agent> {
        let mut all = agent.labels();
        all.0.extend(labels.iter().cloned());
        let profile = AgentProfile {
            name: agent.name.clone(),
            labels: all.clone(),
            capacity: if capacity == 0 {
                agent.capacity.max(1) as u32
            } else {
                capacity
            },
            version: version.to_owned(),
        };
        profile
            .validate()
            .map_err(|e| GatewayError::InvalidArgument(e.to_string()))?;
        let mut conn = self.conn().await?;
        let agent = db::sessions::open(
            &mut conn,
            agent.agent_id(),
            db::sessions::SessionOpen {
                gateway_id: &self.gateway_id,
                session_id,
                labels: &Labels::new(all.0),
                capacity: profile.capacity,
                version,
            },
        )
        .await
        .map_err(|e| GatewayError::from_db(None, e))?;
        if let Ok(org) = OrgId::parse(agent.org_id.clone()) {
            let envelope = Envelope::new(
                org.clone(),
                Event::AgentStatusChanged {
                    agent_id: agent.agent_id(),
                    status: AgentStatus::Online,
                },
            )
            .with_trace(telemetry::current_trace_context());
            self.bus
                .publish_best_effort(&Channel::Org(org), &envelope)
                .await;
            self.bus
                .publish_best_effort(&Channel::SchedulerWake, &envelope)
                .await;
        }
        Ok(agent)
    }

    /// Marks the agent offline after the grace period, unless it opened
    /// another session meanwhile (here or on another replica).
    pub fn close_session_later(&self, ctx: &AgentContext, idle: Option<Duration>) {
        let gateway = self.clone();
        let ctx = ctx.clone();
        let grace = idle.unwrap_or(self.settings.offline_grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let closed = match gateway.db.conn().await {
                Ok(mut conn) => db::sessions::close(&mut conn, ctx.id, ctx.session_id, idle).await,
                Err(e) => Err(e),
            };
            match closed {
                Ok(true) => {
                    tracing::info!(agent.id = %ctx.id, "agent offline");
                    let envelope = Envelope::new(
                        ctx.org.clone(),
                        Event::AgentStatusChanged {
                            agent_id: ctx.id,
                            status: AgentStatus::Offline,
                        },
                    )
                    .with_trace(telemetry::current_trace_context());
                    gateway
                        .bus
                        .publish_best_effort(&Channel::Org(ctx.org.clone()), &envelope)
                        .await;
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(agent.id = %ctx.id, error = %error, "could not mark agent offline")
                }
            }
        });
    }

    /// The agent takes no new work.
    pub async fn drain(&self, ctx: &AgentContext) -> GatewayResult<()> {
        let mut conn = self.conn().await?;
        if db::sessions::drain(&mut conn, ctx.id, ctx.session_id)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?
        {
            let envelope = Envelope::new(
                ctx.org.clone(),
                Event::AgentStatusChanged {
                    agent_id: ctx.id,
                    status: AgentStatus::Draining,
                },
            )
            .with_trace(telemetry::current_trace_context());
            self.bus
                .publish_best_effort(&Channel::Org(ctx.org.clone()), &envelope)
                .await;
        }
        Ok(())
    }

    /// Loads the job and checks the agent holds its lease at `epoch`. A
    /// stale epoch on an agent write (`write` names its kind) is counted.
    async fn leased_job(
        &self,
        conn: &mut PooledConn,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
        write: Option<&'static str>,
    ) -> GatewayResult<Job> {
        let row = db::jobs::get_any(conn, job)
            .await
            .map_err(|e| GatewayError::from_db(Some(job), e))?;
        if row.org_id != ctx.org.as_str() {
            return Err(GatewayError::UnknownJob(job));
        }
        let current = row.lease_epoch.max(0) as u64;
        if current != epoch {
            if let Some(kind) = write {
                self.metrics.stale_writes.with_label_values(&[kind]).inc();
            }
            return Err(GatewayError::Stale {
                job,
                given: epoch,
                current,
            });
        }
        if row.agent_id != Some(ctx.id.as_uuid()) {
            return Err(GatewayError::NotYourJob(job));
        }
        Ok(row)
    }

    /// The assignments for offers read in one statement: those whose job is
    /// still leased to this agent at the offered epoch (an offer may be
    /// outdated by the time it lands).
    async fn assignments(
        &self,
        ctx: &AgentContext,
        offers: &[(JobId, u64)],
    ) -> GatewayResult<Vec<AssignmentView>> {
        let ids: Vec<JobId> = offers.iter().map(|(job, _)| *job).collect();
        let offered: HashSet<(JobId, u64)> = offers.iter().copied().collect();
        let mut conn = self.conn().await?;
        let rows = db::jobs::get_many(&mut conn, &ids)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?;
        Ok(rows
            .iter()
            .filter(|row| {
                row.org_id == ctx.org.as_str()
                    && row.agent_id == Some(ctx.id.as_uuid())
                    && row.status() == JobStatus::Leased
                    && offered.contains(&(row.job_id(), row.lease_epoch.max(0) as u64))
            })
            .map(AssignmentView::from_job)
            .collect())
    }

    /// The assignments for offers that arrived together. An offer that
    /// carries its job is handed over as it is while its lease lasts: the
    /// scheduler published it after committing that lease, and the agent's
    /// acknowledgement is fenced by the epoch. The others are read in one
    /// statement, outdated ones left out.
    pub async fn offered_assignments(
        &self,
        ctx: &AgentContext,
        offers: &[Offer],
    ) -> GatewayResult<Vec<AssignmentView>> {
        let now = Utc::now();
        let mut views = Vec::with_capacity(offers.len());
        let mut to_read = Vec::new();
        for offer in offers {
            match &offer.job {
                Some(job) if offer.lease_expires_at > now => {
                    views.push(AssignmentView::from_offer(&ctx.org, offer, job));
                }
                _ => to_read.push((offer.job_id, offer.epoch)),
            }
        }
        if !to_read.is_empty() {
            views.extend(self.assignments(ctx, &to_read).await?);
        }
        Ok(views)
    }

    /// Leased jobs of this agent not yet acknowledged.
    pub async fn pending_assignments(
        &self,
        ctx: &AgentContext,
    ) -> GatewayResult<Vec<AssignmentView>> {
        let mut conn = self.conn().await?;
        let jobs = db::sessions::pending_assignments(&mut conn, ctx.id)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?;
        Ok(jobs.iter().map(AssignmentView::from_job).collect())
    }

    /// The agent accepted the assignment: the job is running. A repeated
    /// acknowledgement of a job already running at that epoch is harmless.
    pub async fn acknowledge(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
    ) -> GatewayResult<Job> {
        let mut conn = self.conn().await?;
        // The guarded update checks epoch and holder itself; only a refusal
        // needs the row read to say why (or to see a repeated ack).
        let refused = match db::leases::start_as(
            &mut conn,
            Some(ctx.id),
            job,
            epoch,
            self.settings.lease_ttl,
        )
        .await
        {
            Ok(started) => {
                drop(conn);
                self.publish_status(ctx, job, attempt_of(&started), epoch, JobStatus::Running)
                    .await;
                return Ok(started);
            }
            Err(refused) => refused,
        };
        let row = self
            .leased_job(&mut conn, ctx, job, epoch, Some("ack"))
            .await?;
        if matches!(
            row.status(),
            JobStatus::Running | JobStatus::CancelRequested
        ) {
            return Ok(row);
        }
        Err(GatewayError::from_db(Some(job), refused))
    }

    /// Acknowledges several assignments in one statement (a session that
    /// found many acks waiting); returns those started. The rest were
    /// refused or repeated: the caller takes them one by one
    /// ([`acknowledge`](Self::acknowledge)) to learn which and why.
    pub async fn acknowledge_many(
        &self,
        ctx: &AgentContext,
        acks: &[(JobId, u64, Option<TraceContext>)],
    ) -> GatewayResult<Vec<db::leases::Started>> {
        let held: Vec<(JobId, u64)> = acks.iter().map(|(job, epoch, _)| (*job, *epoch)).collect();
        let mut conn = self.conn().await?;
        let started = db::leases::start_many(&mut conn, ctx.id, &held, self.settings.lease_ttl)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?;
        drop(conn);
        let done: Vec<(JobId, u32)> = started
            .iter()
            .map(|s| (JobId(s.job_id), s.attempt.max(1) as u32))
            .collect();
        self.publish_statuses(ctx, acks, &done, |_| &[JobStatus::Running])
            .await;
        Ok(started)
    }

    /// Records several successes, in one statement with those other
    /// sessions reported meanwhile ([`SuccessWriter`]); returns those
    /// recorded. The rest go one by one through [`finish`](Self::finish). Jobs in
    /// `acknowledged` had their ack arrive with the result: it is recorded
    /// by the success (a leased job may succeed directly), and watchers
    /// still hear `running` before `succeeded`.
    pub async fn succeed_many(
        &self,
        ctx: &AgentContext,
        results: &[(JobId, u64, Option<i32>, Option<TraceContext>)],
        acknowledged: &HashSet<JobId>,
    ) -> GatewayResult<Vec<db::leases::Succeeded>> {
        let succeeded = self
            .record_successes(
                ctx,
                results
                    .iter()
                    .map(|&(job, epoch, exit_code, _)| (job, epoch, exit_code)),
            )
            .await?;
        let done: Vec<(JobId, u32)> = succeeded
            .iter()
            .map(|s| (JobId(s.job_id), s.attempt.max(1) as u32))
            .collect();
        let traced: Vec<(JobId, u64, Option<TraceContext>)> = results
            .iter()
            .map(|(job, epoch, _, trace)| (*job, *epoch, trace.clone()))
            .collect();
        // One pipeline: each job's `running` goes out just before its
        // `succeeded`.
        self.publish_statuses(ctx, &traced, &done, |job| {
            if acknowledged.contains(&job) {
                &[JobStatus::Running, JobStatus::Succeeded]
            } else {
                &[JobStatus::Succeeded]
            }
        })
        .await;
        Ok(succeeded)
    }

    /// Publishes, for each `done` job, the statuses `statuses_of` gives it
    /// (in that order), each continuing the trace its agent message carried.
    async fn publish_statuses(
        &self,
        ctx: &AgentContext,
        messages: &[(JobId, u64, Option<TraceContext>)],
        done: &[(JobId, u32)],
        statuses_of: impl Fn(JobId) -> &'static [JobStatus],
    ) {
        let by_job: HashMap<JobId, (u64, Option<&TraceContext>)> = messages
            .iter()
            .map(|(job, epoch, trace)| (*job, (*epoch, trace.as_ref())))
            .collect();
        let mut changes = Vec::with_capacity(done.len());
        for (job, attempt) in done {
            let Some(&(epoch, trace)) = by_job.get(job) else {
                continue;
            };
            let span = tracing::info_span!(
                "agent_message",
                job.id = %job,
                job.epoch = epoch,
                trace_id = tracing::field::Empty
            );
            telemetry::adopt_trace(&span, trace);
            let trace = telemetry::trace_context_of(&span);
            for &status in statuses_of(*job) {
                let change = JobStatusChange {
                    job_id: *job,
                    status,
                    attempt: *attempt,
                    epoch,
                    agent_id: Some(ctx.id),
                };
                changes.push((change, trace.clone()));
            }
        }
        self.publish_status_changes(ctx, changes).await;
    }

    /// The agent gives the job back: queued again after `delay`, no attempt spent.
    pub async fn release(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
        delay: Duration,
    ) -> GatewayResult<JobStatus> {
        self.end(ctx, job, epoch, Ending::Released { delay }).await
    }

    /// Extends every listed lease in one statement.
    pub async fn heartbeat(
        &self,
        ctx: &AgentContext,
        held: &[(JobId, u64)],
    ) -> GatewayResult<Renewal> {
        if held.is_empty() {
            return Ok(Renewal::default());
        }
        let mut conn = self.conn().await?;
        let extended = db::leases::extend_leases(&mut conn, ctx.id, held, self.settings.lease_ttl)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?;
        let stale = held
            .iter()
            .filter(|(job, epoch)| {
                !extended
                    .iter()
                    .any(|x| x.job_id == job.as_uuid() && x.epoch as u64 == *epoch)
            })
            .copied()
            .collect();
        Ok(Renewal { extended, stale })
    }

    /// Why a lease could not be extended: the refusal to report.
    pub async fn explain_unextended(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
    ) -> GatewayError {
        let mut conn = match self.conn().await {
            Ok(conn) => conn,
            Err(e) => return e,
        };
        match self
            .leased_job(&mut conn, ctx, job, epoch, Some("heartbeat"))
            .await
        {
            Ok(row) => GatewayError::Transition {
                job,
                from: row.status(),
                action: "have its lease extended",
            },
            Err(e) => e,
        }
    }

    /// Where the attempt's stored output ends.
    pub async fn committed_offset(&self, job: JobId, epoch: u64) -> GatewayResult<u64> {
        let mut conn = self.conn().await?;
        db::sessions::committed_log_offset(&mut conn, job, epoch)
            .await
            .map_err(|e| GatewayError::from_db(Some(job), e))
    }

    /// Stores a chunk of output: whole lines, in one multi-row insert, with
    /// the job's gapless sequence; then publishes them for live viewers.
    pub async fn append_logs(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
        stream: LogStream,
        offset: u64,
        data: &[u8],
    ) -> GatewayResult<LogAppend> {
        let limit = self.settings.log_chunk_max_bytes;
        if data.len() > limit {
            return Err(GatewayError::ChunkTooLarge {
                size: data.len(),
                limit,
            });
        }
        let lines = split_lines(data, offset, Utc::now(), stream);
        self.metrics.log_lines_received.inc_by(lines.len() as u64);
        let mut conn = self.conn().await?;
        self.leased_job(&mut conn, ctx, job, epoch, Some("log"))
            .await?;
        let appended = db::logs::append(&mut conn, job, epoch, offset, &lines)
            .await
            .map_err(|e| GatewayError::from_db(Some(job), e))?;
        drop(conn);
        match appended {
            Ok(appended) => {
                let committed = appended.committed_offset;
                if !appended.lines.is_empty() {
                    let envelope = Envelope::new(
                        ctx.org.clone(),
                        Event::LogLinesAppended {
                            job_id: job,
                            epoch,
                            lines: appended.lines,
                        },
                    )
                    .with_trace(telemetry::current_trace_context());
                    self.bus
                        .publish_best_effort(&Channel::Job(job), &envelope)
                        .await;
                }
                Ok(LogAppend::Committed(committed))
            }
            Err(gap) => Ok(LogAppend::Gap {
                committed: gap.committed,
            }),
        }
    }

    /// Records how the attempt ended and returns the job's new status. A
    /// result repeated after it was stored (a resend after a reconnect)
    /// returns the stored status and changes nothing.
    pub async fn finish(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
        finish: Finish,
    ) -> GatewayResult<JobStatus> {
        let kind = match finish {
            Finish::CancelAcknowledged => "cancel_ack",
            _ => "result",
        };
        let ending = match finish {
            Finish::Succeeded { exit_code } => {
                return self.succeed(ctx, job, epoch, exit_code).await;
            }
            Finish::Failed {
                exit_code,
                error_kind,
                message,
            } => Ending::Failed {
                exit_code,
                error_kind,
                message,
            },
            Finish::CancelAcknowledged => Ending::CancelAcknowledged,
        };
        let mut conn = self.conn().await?;
        let row = self
            .leased_job(&mut conn, ctx, job, epoch, Some(kind))
            .await?;
        let status = row.status();
        if ended_by_this_attempt(status) {
            return Ok(status);
        }
        self.end_leased(conn, ctx, &row, epoch, ending).await
    }

    /// Hands `ctx`'s successes to the writers ([`SuccessWriter`]).
    async fn record_successes(
        &self,
        ctx: &AgentContext,
        successes: impl IntoIterator<Item = (JobId, u64, Option<i32>)>,
    ) -> GatewayResult<Vec<db::leases::Succeeded>> {
        let successes = successes
            .into_iter()
            .map(|(job, epoch, exit_code)| Success {
                job,
                epoch,
                exit_code,
                holder: Some(ctx.id),
            })
            .collect();
        self.successes
            .record(successes)
            .await
            .map_err(|e| GatewayError::Unavailable(e.to_string()))
    }

    /// [`finish`](Self::finish) for a success: recorded with the successes
    /// other sessions reported meanwhile; the job is read only to tell a
    /// repeated report from a refusal.
    async fn succeed(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
        exit_code: Option<i32>,
    ) -> GatewayResult<JobStatus> {
        let recorded = self
            .record_successes(ctx, [(job, epoch, exit_code)])
            .await?;
        if let Some(succeeded) = recorded.first() {
            let attempt = succeeded.attempt.max(1) as u32;
            self.publish_status(ctx, job, attempt, epoch, JobStatus::Succeeded)
                .await;
            return Ok(JobStatus::Succeeded);
        }
        let mut conn = self.conn().await?;
        let refused = db::leases::why_not_succeeded(&mut conn, job, epoch).await;
        let row = self
            .leased_job(&mut conn, ctx, job, epoch, Some("result"))
            .await?;
        match row.status() {
            status if ended_by_this_attempt(status) => Ok(status),
            _ => Err(GatewayError::from_db(Some(job), refused)),
        }
    }

    async fn end(
        &self,
        ctx: &AgentContext,
        job: JobId,
        epoch: u64,
        ending: Ending,
    ) -> GatewayResult<JobStatus> {
        let mut conn = self.conn().await?;
        let row = self
            .leased_job(&mut conn, ctx, job, epoch, Some("release"))
            .await?;
        self.end_leased(conn, ctx, &row, epoch, ending).await
    }

    async fn end_leased(
        &self,
        mut conn: PooledConn,
        ctx: &AgentContext,
        row: &Job,
        epoch: u64,
        ending: Ending,
    ) -> GatewayResult<JobStatus> {
        let job = row.job_id();
        let ended = db::leases::end_attempt(&mut conn, job, Some(epoch), ending)
            .await
            .map_err(|e| GatewayError::from_db(Some(job), e))?;
        drop(conn);
        self.publish_status(ctx, job, attempt_of(row), ended.epoch, ended.status)
            .await;
        Ok(ended.status)
    }

    /// Publishes a status change on the job's and the org's channels, and
    /// wakes the scheduler when the change freed capacity.
    async fn publish_status(
        &self,
        ctx: &AgentContext,
        job: JobId,
        attempt: u32,
        epoch: u64,
        status: JobStatus,
    ) {
        let change = JobStatusChange {
            job_id: job,
            status,
            attempt,
            epoch,
            agent_id: Some(ctx.id),
        };
        self.publish_status_changes(ctx, vec![(change, telemetry::current_trace_context())])
            .await;
    }

    /// Publishes each change on its job's channel and, batched, on the
    /// org's ([`bus::statuses_messages`]), all in one pipeline, and wakes
    /// the scheduler once when a change freed capacity.
    async fn publish_status_changes(
        &self,
        ctx: &AgentContext,
        changes: Vec<(JobStatusChange, Option<TraceContext>)>,
    ) {
        let jobs = changes.len();
        let frees_capacity = changes.iter().any(|(c, _)| !c.status.holds_lease());
        let mut messages =
            bus::statuses_messages(&ctx.org, changes, telemetry::current_trace_context());
        // The wake carries one job's message: the scheduler reads only its org.
        if frees_capacity && let Some((_, payload)) = messages.first() {
            messages.push((Channel::SchedulerWake, payload.clone()));
        }
        if let Err(error) = self.bus.publish_many(&messages).await {
            tracing::warn!(error = %error, jobs,
                "status events not published; consumers will catch up from PostgreSQL");
        }
    }

    /// Wakes the scheduler (an agent has room for work).
    pub async fn wake_scheduler(&self, ctx: &AgentContext) {
        let envelope = Envelope::new(
            ctx.org.clone(),
            Event::AgentStatusChanged {
                agent_id: ctx.id,
                status: AgentStatus::Online,
            },
        )
        .with_trace(telemetry::current_trace_context());
        self.bus
            .publish_best_effort(&Channel::SchedulerWake, &envelope)
            .await;
    }

    /// Maps a db error for `job` (used by transports for direct calls).
    pub fn db_error(job: Option<JobId>, error: DbError) -> GatewayError {
        GatewayError::from_db(job, error)
    }
}

/// A fenced report found its job queued or finished at the same epoch:
/// only an earlier report of this very attempt can have done that, so the
/// report is a repeat and is answered with the status it led to.
fn ended_by_this_attempt(status: JobStatus) -> bool {
    status.is_terminal() || status == JobStatus::Queued
}

/// The number of the job's current attempt.
fn attempt_of(row: &Job) -> u32 {
    (row.app_failures + row.infra_failures + 1).max(1) as u32
}

/// Splits a chunk into lines, each with the byte offset just past its end
/// (counted on the raw bytes, so offsets agree with the agent's).
pub fn split_lines(
    data: &[u8],
    start_offset: u64,
    at: DateTime<Utc>,
    stream: LogStream,
) -> Vec<IncomingLine> {
    let mut lines = Vec::new();
    let mut position = 0usize;
    while position < data.len() {
        let end = data[position..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |i| position + i + 1);
        let mut text = &data[position..end];
        if let Some(stripped) = text.strip_suffix(b"\n") {
            text = stripped;
        }
        if let Some(stripped) = text.strip_suffix(b"\r") {
            text = stripped;
        }
        lines.push(IncomingLine {
            stream,
            at,
            line: String::from_utf8_lossy(text).into_owned(),
            end_offset: start_offset + end as u64,
        });
        position = end;
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_their_end_offsets() {
        let lines = split_lines(b"one\ntwo\r\nthree", 10, Utc::now(), LogStream::Stdout);
        let got: Vec<(&str, u64)> = lines
            .iter()
            .map(|l| (l.line.as_str(), l.end_offset))
            .collect();
        assert_eq!(got, [("one", 14), ("two", 19), ("three", 24)]);
        assert!(split_lines(b"", 5, Utc::now(), LogStream::Stderr).is_empty());
    }

    #[test]
    fn invalid_utf8_is_replaced_but_offsets_count_raw_bytes() {
        let lines = split_lines(b"a\xff\n", 0, Utc::now(), LogStream::Stdout);
        assert_eq!(lines[0].line, "a\u{fffd}");
        assert_eq!(lines[0].end_offset, 3);
    }
}
