//! Single-job creates of busy orgs, written together.
//!
//! Each single-job create was its own transaction: one statement for the
//! row, one for its audit event and a commit, all for one job. At a steady
//! 1,000 creates/s those fixed costs were most of what PostgreSQL did for
//! a job. Here the requests hand their jobs to a few writers; a writer
//! writes everything handed over while it was busy in one transaction per
//! org and wakes the scheduler once for it. A lone create is written at
//! once: nothing waits for a batch to fill.

use std::sync::Arc;

use bus::{Bus, Channel};
use db::dispatch::Granted;
use db::jobs::{CreateContext, Created, Job};
use db::orgs::{SettingsVersion, VersionedSettings};
use db::{Db, DbError};
use domain::OrgId;
use domain::events::{Envelope, Event, TraceContext};
use domain::job::{JobStatus, NewJob};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::ApiError;

/// Writers writing at once: one fills its batch while another commits.
const WRITERS: usize = 2;
/// Jobs one writer takes at most before writing.
const BATCH_LIMIT: usize = 1_000;

/// One request's jobs, made with its org's cached settings.
pub struct Pending {
    pub org: OrgId,
    pub settings: VersionedSettings,
    pub created_by: String,
    pub request_id: Option<String>,
    pub trace: Option<TraceContext>,
    pub jobs: Vec<NewJob>,
}

/// What became of a request handed to the writers.
pub enum Written {
    Created(Vec<Job>),
    /// Nothing was written for it, through no fault of its own (settings
    /// changed meanwhile, or another request written with it was refused):
    /// the caller writes it on its own.
    Alone,
    Failed(ApiError),
}

struct Request {
    pending: Pending,
    reply: oneshot::Sender<Written>,
}

/// The requests' side: hands jobs to the writers.
#[derive(Clone)]
pub struct CreateWriter {
    requests: mpsc::UnboundedSender<Request>,
}

impl CreateWriter {
    /// Starts the writers; they stop when the last `CreateWriter` clone is
    /// dropped and what was handed over is written.
    pub fn start(db: Db, bus: Bus, leases_on_create: prometheus::IntCounter) -> Self {
        let (requests, incoming) = mpsc::unbounded_channel();
        let incoming = Arc::new(Mutex::new(incoming));
        let writer = Arc::new(Writer {
            db,
            bus,
            leases_on_create,
        });
        for _ in 0..WRITERS {
            tokio::spawn(write(writer.clone(), incoming.clone()));
        }
        Self { requests }
    }

    /// Writes `pending` (with whatever else was handed over meanwhile) and
    /// announces its jobs.
    pub async fn create(&self, pending: Pending) -> Written {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request { pending, reply }).is_err() {
            return Written::Alone;
        }
        answer.await.unwrap_or(Written::Alone)
    }
}

struct Writer {
    db: Db,
    bus: Bus,
    leases_on_create: prometheus::IntCounter,
}

async fn write(writer: Arc<Writer>, incoming: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
    loop {
        let batch = {
            let mut incoming = incoming.lock().await;
            let Some(first) = incoming.recv().await else {
                return;
            };
            let mut size = first.pending.jobs.len();
            let mut batch = vec![first];
            while size < BATCH_LIMIT {
                let Ok(next) = incoming.try_recv() else { break };
                size += next.pending.jobs.len();
                batch.push(next);
            }
            batch
        };
        for group in by_org_and_settings(batch) {
            write_group(&writer, group).await;
        }
    }
}

/// Splits `batch` into requests that can share a transaction, each group
/// in the order handed over.
fn by_org_and_settings(batch: Vec<Request>) -> Vec<Vec<Request>> {
    let mut groups: Vec<Vec<Request>> = Vec::new();
    for request in batch {
        let key = |r: &Request| (r.pending.org.clone(), r.pending.settings.updated_at);
        match groups.iter_mut().find(|g| key(&g[0]) == key(&request)) {
            Some(group) => group.push(request),
            None => groups.push(vec![request]),
        }
    }
    groups
}

async fn write_group(writer: &Writer, group: Vec<Request>) {
    let written = {
        let requests: Vec<(CreateContext<'_>, &[NewJob])> = group
            .iter()
            .map(|r| (context(&r.pending), r.pending.jobs.as_slice()))
            .collect();
        match writer.db.conn().await {
            Ok(mut conn) => db::jobs::create_together(&mut conn, &requests).await,
            Err(e) => Err(e),
        }
    };
    match written {
        Ok(created) => {
            let made: Vec<Made<'_>> = group
                .iter()
                .zip(&created)
                .map(|(request, created)| Made {
                    created,
                    request_id: request.pending.request_id.as_deref(),
                    trace: request.pending.trace.as_ref(),
                })
                .collect();
            announce(
                &writer.bus,
                &writer.leases_on_create,
                &group[0].pending.org,
                &made,
            )
            .await;
            for (request, created) in group.into_iter().zip(created) {
                let _ = request.reply.send(Written::Created(created.jobs));
            }
        }
        Err(error) if group.len() == 1 && !matches!(error, DbError::StaleSettings) => {
            if let Some(request) = group.into_iter().next() {
                let _ = request.reply.send(Written::Failed(error.into()));
            }
        }
        Err(error) => {
            for request in group {
                let outcome = match &error {
                    // Refused by a statement, so rolled back: nothing of
                    // the group was written.
                    DbError::StaleSettings
                    | DbError::Domain(_)
                    | DbError::Conflict(_)
                    | DbError::NotFound => Written::Alone,
                    // Perhaps at COMMIT: whether it went through is
                    // unknown, so nothing is written again here.
                    DbError::Unavailable(detail) => {
                        Written::Failed(DbError::Unavailable(detail.clone()).into())
                    }
                    DbError::Query(detail) => {
                        Written::Failed(ApiError::Internal(detail.to_string()))
                    }
                };
                let _ = request.reply.send(outcome);
            }
        }
    }
}

fn context(pending: &Pending) -> CreateContext<'_> {
    CreateContext {
        org: &pending.org,
        settings: &pending.settings.settings,
        settings_version: SettingsVersion::Cached(pending.settings.updated_at),
        created_by: Some(&pending.created_by),
        request_id: pending.request_id.as_deref(),
        trace: pending.trace.as_ref(),
        lease_on_create: None,
    }
}

/// What one request created, and under which request id and trace.
pub struct Made<'a> {
    pub created: &'a Created,
    pub request_id: Option<&'a str>,
    pub trace: Option<&'a TraceContext>,
}

/// After commit: the offers of the leases granted on create (first: the
/// agents wait for them), one scheduler wake when jobs were left to it,
/// then each job's `job_created` for org watchers under its request's id
/// and trace, all in one Redis round trip; a lost message is repaired by
/// the sweeps. (The request's trace is stored on each job, so the job's
/// dispatch, run and logs join it.)
pub async fn announce(
    bus: &Bus,
    leases_on_create: &prometheus::IntCounter,
    org: &OrgId,
    made: &[Made<'_>],
) {
    let Some(first) = made.first() else {
        return;
    };
    let envelope = |event: Event, request_id: Option<&str>, trace: Option<&TraceContext>| {
        Envelope::new(org.clone(), event)
            .with_request_id(request_id.map(str::to_owned))
            .with_trace(trace.cloned())
    };
    let leased: Vec<&Granted> = made.iter().flat_map(|m| &m.created.leased).collect();
    let mut messages = Vec::new();
    if !leased.is_empty() {
        leases_on_create.inc_by(leased.len() as u64);
        // Each offer in its own span in its job's trace, as the scheduler's
        // offers are under their dispatch.
        let offers = leased.iter().map(|lease| {
            let span = tracing::info_span!(
                "offer",
                job.id = %lease.job_id,
                job.epoch = lease.epoch,
                agent.id = %lease.agent_id
            );
            telemetry::adopt_trace(&span, lease.trace().as_ref());
            lease.offer(telemetry::trace_context_of(&span))
        });
        messages = bus::offer_messages(org, offers.collect(), first.trace.cloned());
    }
    let jobs = made.iter().flat_map(|m| &m.created.jobs);
    if let Some(queued) = jobs.clone().find(|job| job.status() != JobStatus::Leased) {
        let wake = Event::QueueChanged {
            queue: queued.queue_name(),
        };
        messages.extend(bus::message(
            Channel::SchedulerWake,
            &envelope(wake, first.request_id, first.trace),
        ));
    }
    for m in made {
        messages.extend(m.created.jobs.iter().take(100).filter_map(|job| {
            let created = Event::JobCreated {
                job_id: job.job_id(),
                queue: job.queue_name(),
                status: job.status(),
            };
            bus::message(
                Channel::Org(org.clone()),
                &envelope(created, m.request_id, m.trace),
            )
        }));
    }
    if let Err(error) = bus.publish_many(&messages).await {
        tracing::warn!(error = %error, events = messages.len(),
            "events not published; consumers will catch up from PostgreSQL");
    }
}
