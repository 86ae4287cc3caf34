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
use db::jobs::{CreateContext, Job};
use db::orgs::{SettingsVersion, VersionedSettings};
use db::{Db, DbError};
use domain::OrgId;
use domain::events::{Envelope, Event, TraceContext};
use domain::job::NewJob;
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
    pub fn start(db: Db, bus: Bus) -> Self {
        let (requests, incoming) = mpsc::unbounded_channel();
        let incoming = Arc::new(Mutex::new(incoming));
        for _ in 0..WRITERS {
            tokio::spawn(write(db.clone(), bus.clone(), incoming.clone()));
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

async fn write(db: Db, bus: Bus, incoming: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
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
            write_group(&db, &bus, group).await;
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

async fn write_group(db: &Db, bus: &Bus, group: Vec<Request>) {
    let written = {
        let requests: Vec<(CreateContext<'_>, &[NewJob])> = group
            .iter()
            .map(|r| (context(&r.pending), r.pending.jobs.as_slice()))
            .collect();
        match db.conn().await {
            Ok(mut conn) => db::jobs::create_together(&mut conn, &requests).await,
            Err(e) => Err(e),
        }
    };
    match written {
        Ok(made) => {
            announce(bus, &group, &made).await;
            for (request, jobs) in group.into_iter().zip(made) {
                let _ = request.reply.send(Written::Created(jobs));
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

/// After commit: one scheduler wake for the group (first: it is on the
/// dispatch path), then each job's `job_created` for org watchers under its
/// request's id and trace, in one Redis round trip; a lost message is
/// repaired by the sweeps.
async fn announce(bus: &Bus, group: &[Request], made: &[Vec<Job>]) {
    let Some(first) = made.iter().flatten().next() else {
        return;
    };
    let org = &group[0].pending.org;
    let envelope = |event: Event, pending: &Pending| {
        Envelope::new(org.clone(), event)
            .with_request_id(pending.request_id.clone())
            .with_trace(pending.trace.clone())
    };
    let wake = envelope(
        Event::QueueChanged {
            queue: first.queue_name(),
        },
        &group[0].pending,
    );
    let mut messages: Vec<(Channel, String)> = bus::message(Channel::SchedulerWake, &wake)
        .into_iter()
        .collect();
    for (request, jobs) in group.iter().zip(made) {
        messages.extend(jobs.iter().take(100).filter_map(|job| {
            let created = Event::JobCreated {
                job_id: job.job_id(),
                queue: job.queue_name(),
                status: job.status(),
            };
            bus::message(
                Channel::Org(org.clone()),
                &envelope(created, &request.pending),
            )
        }));
    }
    if let Err(error) = bus.publish_many(&messages).await {
        tracing::warn!(error = %error, events = messages.len(),
            "events not published; consumers will catch up from PostgreSQL");
    }
}
