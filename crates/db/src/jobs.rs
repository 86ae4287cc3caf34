//! Creating, reading and listing jobs. Lease-related changes are in
//! [`crate::leases`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use domain::job::{JobStatus, Labels, NewJob};
use domain::org::OrgSettings;
use domain::retry::{FailureCounts, RetryPolicy};
use domain::state::{CancelReason, Lifecycle};
use domain::{DomainError, JobId, OrgId, RepositoryId};
use futures_util::FutureExt;
use serde::Serialize;
use uuid::Uuid;

use crate::schema::{idempotency_keys, jobs};
use crate::{DbError, DbResult, PgConn};

/// A job row.
#[derive(Clone, Debug, PartialEq, Serialize, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = jobs)]
pub struct Job {
    pub id: Uuid,
    pub org_id: String,
    pub repository_id: Option<Uuid>,
    pub queue: String,
    pub queue_rank: i16,
    pub priority: i32,
    pub position: i64,
    pub status: String,
    pub required_labels: Vec<String>,
    pub concurrency_key: Option<String>,
    pub concurrency_limit: Option<i32>,
    pub requires_approval: bool,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub retry_policy: serde_json::Value,
    pub schedule_to_start_ms: Option<i64>,
    pub run_timeout_ms: Option<i64>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub run_at: DateTime<Utc>,
    pub lease_epoch: i64,
    pub app_failures: i32,
    pub infra_failures: i32,
    pub cancel_reason: Option<String>,
    pub agent_id: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub leased_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub run_deadline_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub cancel_deadline_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub created_by: Option<String>,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The creating request's W3C trace context.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Job {
    pub fn job_id(&self) -> JobId {
        JobId(self.id)
    }

    /// The trace the job's life continues.
    pub fn trace(&self) -> Option<domain::events::TraceContext> {
        stored_trace(self.traceparent.as_deref(), self.tracestate.as_deref())
    }

    pub fn status(&self) -> JobStatus {
        // The CHECK constraint admits only the domain's statuses.
        self.status.parse().unwrap_or(JobStatus::Failed)
    }

    pub fn queue_name(&self) -> domain::job::QueueName {
        // The column only ever holds names that parsed on the way in.
        domain::job::QueueName::parse(self.queue.clone())
            .unwrap_or_else(|_| domain::job::QueueName::backlog())
    }

    /// The job's retry policy. The row holds the fields that differ from
    /// the defaults ([`stored_retry_policy`]); the defaults fill the rest, so
    /// changing a default in `RetryPolicy` changes it for stored jobs too.
    pub fn retry_policy(&self) -> RetryPolicy {
        serde_json::from_value(self.retry_policy.clone()).unwrap_or_default()
    }

    /// The state-machine view of this row.
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            status: self.status(),
            epoch: self.lease_epoch as u64,
            failures: FailureCounts {
                application: self.app_failures as u32,
                infrastructure: self.infra_failures as u32,
            },
            cancel_reason: self.cancel_reason.as_deref().and_then(parse_cancel_reason),
        }
    }
}

pub(crate) fn parse_cancel_reason(raw: &str) -> Option<CancelReason> {
    [
        CancelReason::User,
        CancelReason::RunTimeout,
        CancelReason::Deadline,
    ]
    .into_iter()
    .find(|r| r.as_str() == raw)
}

/// `None` is sent as NULL (every optional column defaults to NULL anyway),
/// not as `DEFAULT`: then the statement's text does not depend on which
/// fields are set, and diesel can keep it prepared.
#[derive(Insertable)]
#[diesel(table_name = jobs, treat_none_as_default_value = false)]
struct NewJobRow<'a> {
    id: Uuid,
    org_id: &'a str,
    repository_id: Option<Uuid>,
    queue: &'a str,
    queue_rank: i16,
    priority: i32,
    status: &'static str,
    required_labels: Vec<String>,
    concurrency_key: Option<&'a str>,
    concurrency_limit: Option<i32>,
    requires_approval: bool,
    payload: serde_json::Value,
    metadata: &'a serde_json::Value,
    retry_policy: serde_json::Value,
    schedule_to_start_ms: Option<i64>,
    run_timeout_ms: Option<i64>,
    deadline_at: Option<DateTime<Utc>>,
    run_at: DateTime<Utc>,
    // Set when the job is leased by its create (see `create_rows`).
    lease_epoch: i64,
    agent_id: Option<Uuid>,
    leased_at: Option<DateTime<Utc>>,
    lease_expires_at: Option<DateTime<Utc>>,
    created_by: Option<&'a str>,
    request_id: Option<&'a str>,
    created_at: DateTime<Utc>,
    queued_at: Option<DateTime<Utc>>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

/// Who is creating jobs, and under which settings.
pub struct CreateContext<'a> {
    pub org: &'a OrgId,
    pub settings: &'a OrgSettings,
    pub settings_version: crate::orgs::SettingsVersion,
    pub created_by: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// The creating request's trace: the jobs' dispatch and run continue it.
    pub trace: Option<&'a domain::events::TraceContext>,
    /// Lease a single due job in its own transaction when its org is idle
    /// (see [`crate::dispatch::place_created`]), with this time to
    /// acknowledge; `None` leaves every job to the scheduler.
    pub lease_on_create: Option<std::time::Duration>,
}

/// An idempotency key and the hash of the request it came with.
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub request_hash: Vec<u8>,
}

#[derive(Debug)]
pub struct Created {
    pub jobs: Vec<Job>,
    /// True when an earlier request with the same idempotency key and body
    /// already created these jobs; nothing new was written.
    pub replayed: bool,
    /// Leases granted in the same transaction (see
    /// [`CreateContext::lease_on_create`]): their offers are the creator's
    /// to publish after commit.
    pub leased: Vec<crate::dispatch::Granted>,
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, diesel::result::Error> {
    serde_json::to_value(value).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}

/// A job's retry policy as its row stores it: only the fields that differ
/// from [`RetryPolicy::default`] (reading fills the rest back in, see
/// [`Job::retry_policy`]). Most jobs take the defaults, and the full policy
/// was a third of a job row: every status change copies the row into a new
/// version and into the WAL.
fn stored_retry_policy(policy: &RetryPolicy) -> Result<serde_json::Value, diesel::result::Error> {
    let mut stored = to_json(policy)?;
    let defaults = to_json(&RetryPolicy::default())?;
    if let (Some(fields), Some(defaults)) = (stored.as_object_mut(), defaults.as_object()) {
        fields.retain(|name, value| defaults.get(name) != Some(value));
    }
    Ok(stored)
}

/// The rows of `new_jobs`, created now by `ctx`'s requester.
fn new_rows<'a>(
    ctx: &CreateContext<'a>,
    new_jobs: &'a [NewJob],
    now: DateTime<Utc>,
    rows: &mut Vec<NewJobRow<'a>>,
) -> DbResult<()> {
    for job in new_jobs {
        let requires_approval = ctx
            .settings
            .approval_policy
            .requires_approval(job.requires_approval);
        let status = if requires_approval {
            JobStatus::PendingApproval
        } else {
            JobStatus::Queued
        };
        rows.push(NewJobRow {
            id: JobId::new().as_uuid(),
            org_id: ctx.org.as_str(),
            repository_id: job.repository_id.map(|r| r.as_uuid()),
            queue: job.queue.as_str(),
            queue_rank: ctx.settings.queue_rank(&job.queue),
            priority: job.priority,
            status: status.as_str(),
            required_labels: job.required_labels.to_vec(),
            concurrency_key: job.concurrency.as_ref().map(|c| c.key.as_str()),
            concurrency_limit: job.concurrency.as_ref().map(|c| c.limit as i32),
            requires_approval,
            payload: to_json(&job.payload)?,
            metadata: &job.metadata,
            retry_policy: stored_retry_policy(&job.retry_policy)?,
            schedule_to_start_ms: job.timeouts.schedule_to_start_ms.map(|ms| ms as i64),
            run_timeout_ms: job.timeouts.run_timeout_ms.map(|ms| ms as i64),
            deadline_at: job.deadline_at(now),
            run_at: job.run_at.unwrap_or(now).max(now),
            lease_epoch: 0,
            agent_id: None,
            leased_at: None,
            lease_expires_at: None,
            created_by: ctx.created_by,
            request_id: ctx.request_id,
            created_at: now,
            queued_at: (status == JobStatus::Queued).then_some(now),
            traceparent: ctx.trace.map(|t| t.traceparent.as_str()),
            tracestate: ctx.trace.and_then(|t| t.tracestate.as_deref()),
        });
    }
    Ok(())
}

/// Creates all `new_jobs` in one transaction (all or nothing), with their
/// `job.created` audit event. With an idempotency key, a repeated request
/// returns the jobs the first one made, and the same key with a different
/// body is a [`DbError::Conflict`].
pub async fn create_jobs(
    conn: &mut PgConn,
    ctx: &CreateContext<'_>,
    new_jobs: &[NewJob],
    idempotency: Option<Idempotency<'_>>,
) -> DbResult<Created> {
    for job in new_jobs {
        job.validate()?;
    }
    let mut rows = Vec::with_capacity(new_jobs.len());
    new_rows(ctx, new_jobs, Utc::now(), &mut rows)?;
    let org_id = ctx.org.as_str();
    let Some(idem) = idempotency else {
        // Nothing here depends on what the transaction reads, so BEGIN is
        // not awaited on its own and the inserts and the audit event go out
        // together, then COMMIT (an idle create took five round trips). The
        // repositories are checked first: one never changes org, and one
        // deleted meanwhile fails the insert's foreign key.
        check_repositories(conn, org_id, &rows).await?;
        let audits = vec![created_audit(ctx, &rows)];
        let leasable = rows.len() == 1;
        let (jobs, leased) = conn
            .pipelined_transaction(create_rows(conn, ctx, rows, audits, leasable, true))
            .await?;
        return Ok(Created {
            jobs,
            replayed: false,
            leased,
        });
    };
    conn.transaction(async |conn| {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let claimed = diesel::insert_into(idempotency_keys::table)
            .values((
                idempotency_keys::org_id.eq(org_id),
                idempotency_keys::key.eq(idem.key),
                idempotency_keys::request_hash.eq(&idem.request_hash),
                idempotency_keys::job_ids.eq(&ids),
            ))
            .on_conflict_do_nothing()
            .execute(conn)
            .await?;
        if claimed == 0 {
            let (hash, job_ids): (Vec<u8>, Vec<Uuid>) = idempotency_keys::table
                .find((org_id, idem.key))
                .select((idempotency_keys::request_hash, idempotency_keys::job_ids))
                .first(conn)
                .await?;
            if hash != idem.request_hash {
                return Err(DbError::Conflict("idempotency_key_reused".into()));
            }
            let found = jobs::table
                .filter(jobs::id.eq_any(&job_ids))
                .select(Job::as_select())
                .load(conn)
                .await?;
            return Ok(Created {
                jobs: in_order_of(found, job_ids.iter().copied()),
                replayed: true,
                leased: Vec::new(),
            });
        }
        check_repositories(conn, org_id, &rows).await?;
        let audits = vec![created_audit(ctx, &rows)];
        let leasable = rows.len() == 1;
        let (jobs, leased) = create_rows(conn, ctx, rows, audits, leasable, false).await?;
        Ok(Created {
            jobs,
            replayed: false,
            leased,
        })
    })
    .await
}

/// Creates the jobs of several requests of one org, made with the same
/// settings, in one transaction (all or nothing; each request keeps its own
/// `job.created` audit event); returns what each request made, in order.
/// Concurrent single-job creates share their statements and commit this
/// way (a create's statements and commit cost about the same for one row
/// as for ten), and when each request asks for one job they are leased on
/// create together, as [`create_jobs`] leases a lone one.
pub async fn create_together(
    conn: &mut PgConn,
    requests: &[(CreateContext<'_>, &[NewJob])],
) -> DbResult<Vec<Created>> {
    let Some((first, _)) = requests.first() else {
        return Ok(Vec::new());
    };
    let now = Utc::now();
    let mut rows = Vec::new();
    let mut ends = Vec::with_capacity(requests.len());
    for (ctx, jobs) in requests {
        if ctx.org != first.org || ctx.settings_version != first.settings_version {
            return Err(
                DomainError::invalid("jobs", "requests of different orgs or settings").into(),
            );
        }
        for job in *jobs {
            job.validate()?;
        }
        new_rows(ctx, jobs, now, &mut rows)?;
        ends.push(rows.len());
    }
    check_repositories(conn, first.org.as_str(), &rows).await?;
    let mut start = 0;
    let audits = requests
        .iter()
        .zip(&ends)
        .map(|((ctx, _), &end)| {
            let audit = created_audit(ctx, &rows[start..end]);
            start = end;
            audit
        })
        .collect();
    let leasable = requests.iter().all(|(_, jobs)| jobs.len() == 1);
    let (jobs, leased) = conn
        .pipelined_transaction(create_rows(conn, first, rows, audits, leasable, true))
        .await?;
    let mut leased: HashMap<Uuid, crate::dispatch::Granted> = leased
        .into_iter()
        .map(|lease| (lease.job_id, lease))
        .collect();
    let mut jobs = jobs.into_iter();
    let mut start = 0;
    Ok(ends
        .iter()
        .map(|&end| {
            let jobs: Vec<Job> = jobs.by_ref().take(end - start).collect();
            start = end;
            Created {
                leased: jobs
                    .iter()
                    .filter_map(|job| leased.remove(&job.id))
                    .collect(),
                jobs,
                replayed: false,
            }
        })
        .collect())
}

/// Inserts the rows with their audit events (call inside a transaction).
/// When `ctx` leases on create, the rows of `leasable` jobs due at once are
/// inserted already leased where [`crate::dispatch::place_created`] places
/// them; those leases are returned for their offers. `pipelined`: the
/// transaction is [`PgConn::pipelined_transaction`]'s, whose `COMMIT` may go
/// out with the last statements.
async fn create_rows<'a>(
    owner: &'a PgConn,
    ctx: &'a CreateContext<'a>,
    mut rows: Vec<NewJobRow<'a>>,
    audits: Vec<crate::audit::Record<'a>>,
    leasable: bool,
    pipelined: bool,
) -> DbResult<(Vec<Job>, Vec<crate::dispatch::Granted>)> {
    let conn = owner.pipeline();
    let mut pipeline = conn;
    let (candidates, ack_timeout) = match ctx.lease_on_create {
        Some(ack_timeout) if leasable => (candidates(&rows), ack_timeout),
        _ => (Vec::new(), std::time::Duration::ZERO),
    };
    if candidates.is_empty() {
        let jobs = insert_with_audit(&mut pipeline, ctx, &rows, audits, true).await?;
        return Ok((jobs, Vec::new()));
    }
    // The settings are checked in the placement's round trip, before the
    // rows are written either way.
    let unchanged = settings_check(conn, ctx);
    let (unchanged, placements) = futures_util::try_join!(
        async {
            match unchanged {
                Some(check) => check.await,
                None => Ok(true),
            }
        },
        crate::dispatch::place_created(conn, ctx.org, candidates)
    )?;
    if !unchanged {
        return Err(DbError::StaleSettings);
    }
    let index: HashMap<Uuid, usize> = rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let (mut slot_keys, mut slot_numbers, mut slot_jobs) = (Vec::new(), Vec::new(), Vec::new());
    for (job, placement) in placements {
        let Some(&i) = index.get(&job.as_uuid()) else {
            continue;
        };
        let row = &mut rows[i];
        row.status = JobStatus::Leased.as_str();
        row.lease_epoch = 1;
        row.agent_id = Some(placement.agent.as_uuid());
        row.leased_at = Some(row.created_at);
        // The client's clock, as for `created_at`; the sweep compares with
        // the server's, so skew between them shortens or lengthens the ack
        // time.
        row.lease_expires_at = Some(
            chrono::Duration::from_std(ack_timeout)
                .ok()
                .and_then(|ack| row.created_at.checked_add_signed(ack))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        );
        if let Some((key, slot)) = placement.slot {
            slot_keys.push(key);
            slot_numbers.push(slot);
            slot_jobs.push(row.id);
        }
    }
    let mut for_slots = conn;
    let inserted = insert_with_audit(&mut pipeline, ctx, &rows, audits, false);
    let epochs = vec![1; slot_jobs.len()];
    let slots = async {
        if slot_jobs.is_empty() {
            return Ok(());
        }
        crate::dispatch::take_slots(
            &mut for_slots,
            ctx.org,
            &slot_keys,
            &slot_numbers,
            &slot_jobs,
            &epochs,
        )
        .await
    };
    // Nothing answered from here on can call the create off, so in a
    // pipelined transaction COMMIT goes out behind the rows: one round trip
    // fewer for an idle create.
    let commit = async {
        match pipelined {
            true => owner.commit_behind().await.map_err(DbError::from),
            false => Ok(()),
        }
    };
    let (jobs, (), ()) = futures_util::try_join!(inserted, slots, commit)?;
    let leased = jobs
        .iter()
        .filter(|job| job.status() == JobStatus::Leased)
        .map(crate::dispatch::Granted::of_created)
        .collect();
    Ok((jobs, leased))
}

/// The rows' queued jobs that are due at once, as dispatch candidates.
fn candidates(rows: &[NewJobRow<'_>]) -> Vec<domain::scheduling::Candidate> {
    rows.iter()
        .filter(|row| row.status == JobStatus::Queued.as_str() && row.run_at <= row.created_at)
        .map(|row| domain::scheduling::Candidate {
            job_id: JobId(row.id),
            repository_id: row.repository_id.map(RepositoryId),
            queue_rank: row.queue_rank,
            priority: row.priority,
            position: 0,
            queued_at: row.created_at,
            required_labels: Labels::new(row.required_labels.clone()),
            concurrency_key: row.concurrency_key.map(str::to_owned),
            concurrency_limit: row.concurrency_limit.unwrap_or(1).max(1) as u32,
        })
        .collect()
}

/// Whether the cached settings the create was made with are still current;
/// `None` when they were read in this transaction (nothing to check). The
/// statement is built here, before the future is polled.
fn settings_check<'a>(
    conn: &'a AsyncPgConnection,
    ctx: &'a CreateContext<'a>,
) -> Option<impl Future<Output = DbResult<bool>> + 'a> {
    match ctx.settings_version {
        crate::orgs::SettingsVersion::Cached(updated_at) => {
            Some(crate::orgs::settings_unchanged(conn, ctx.org, updated_at))
        }
        crate::orgs::SettingsVersion::Current => None,
    }
}

/// Refuses repositories that are not the org's.
async fn check_repositories(
    conn: &mut PgConn,
    org_id: &str,
    rows: &[NewJobRow<'_>],
) -> DbResult<()> {
    let mut repositories: Vec<Uuid> = rows.iter().filter_map(|r| r.repository_id).collect();
    repositories.sort_unstable();
    repositories.dedup();
    if repositories.is_empty() {
        return Ok(());
    }
    let owned: i64 = crate::schema::repositories::table
        .filter(crate::schema::repositories::org_id.eq(org_id))
        .filter(crate::schema::repositories::id.eq_any(&repositories))
        .count()
        .get_result(conn)
        .await?;
    if owned != repositories.len() as i64 {
        return Err(unknown_repository().into());
    }
    Ok(())
}

/// A job names a repository its org does not have.
pub(crate) fn unknown_repository() -> DomainError {
    DomainError::invalid("repository_id", "no such repository in this organization")
}

/// The `job.created` audit event of `ctx`'s request, which made `rows`.
fn created_audit<'a>(ctx: &CreateContext<'a>, rows: &[NewJobRow<'_>]) -> crate::audit::Record<'a> {
    crate::audit::Record {
        org: ctx.org,
        actor: ctx.created_by.unwrap_or("system"),
        action: "job.created",
        target_type: "job",
        target_id: rows
            .iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>()
            .join(","),
        request_id: ctx.request_id,
        details: serde_json::json!({ "count": rows.len() }),
    }
}

/// Inserts the rows and their requests' `job.created` audit events, all in
/// one pipeline (call inside a transaction); returns the jobs in row order.
/// Every statement is built here, before the future is first polled, so
/// they go out back to back after whatever was issued before.
fn insert_with_audit<'a>(
    conn: &'a mut &'a AsyncPgConnection,
    ctx: &'a CreateContext<'a>,
    rows: &'a [NewJobRow<'a>],
    audits: Vec<crate::audit::Record<'a>>,
    check_settings: bool,
) -> impl Future<Output = DbResult<Vec<Job>>> + 'a {
    // A one-row insert is a statement of fixed text, so diesel keeps it
    // prepared (one round trip, no parse); a batch's text grows with its
    // length. Chunks stay well under PostgreSQL's 65,535 bind parameters.
    let shared: &'a AsyncPgConnection = conn;
    // Cached settings are checked first, in the same pipeline (unless the
    // caller has).
    let unchanged = check_settings
        .then(|| settings_check(shared, ctx))
        .flatten();
    let inserts: Vec<_> = rows
        .chunks(500)
        .map(|chunk| {
            let mut conn = shared;
            match chunk {
                [row] => diesel::insert_into(jobs::table)
                    .values(row)
                    .returning(Job::as_returning())
                    .get_results(&mut conn)
                    .boxed(),
                _ => diesel::insert_into(jobs::table)
                    .values(chunk)
                    .returning(Job::as_returning())
                    .get_results(&mut conn)
                    .boxed(),
            }
        })
        .collect();
    let audit = crate::audit::record_many(conn, audits);
    async move {
        let (unchanged, chunks, ()) = futures_util::try_join!(
            async {
                match unchanged {
                    Some(check) => check.await,
                    None => Ok(true),
                }
            },
            async { Ok::<_, DbError>(futures_util::future::try_join_all(inserts).await?) },
            audit
        )?;
        if !unchanged {
            return Err(DbError::StaleSettings);
        }
        let created: Vec<Job> = chunks.into_iter().flatten().collect();
        Ok(in_order_of(created, rows.iter().map(|r| r.id)))
    }
}

/// `jobs` in the order of `ids` (a request's order).
fn in_order_of(mut jobs: Vec<Job>, ids: impl Iterator<Item = Uuid>) -> Vec<Job> {
    let order: HashMap<Uuid, usize> = ids.enumerate().map(|(i, id)| (id, i)).collect();
    jobs.sort_by_key(|j| order.get(&j.id).copied());
    jobs
}

/// A job of `org`; another org's job is not found.
pub async fn get(conn: &mut PgConn, org: &OrgId, id: JobId) -> DbResult<Job> {
    Ok(jobs::table
        .filter(jobs::org_id.eq(org.as_str()))
        .filter(jobs::id.eq(id.as_uuid()))
        .select(Job::as_select())
        .first(conn)
        .await?)
}

/// A job by id alone, for components that already authorized the caller
/// by other means (the gateway checks the lease).
pub async fn get_any(conn: &mut PgConn, id: JobId) -> DbResult<Job> {
    Ok(jobs::table
        .find(id.as_uuid())
        .select(Job::as_select())
        .first(conn)
        .await?)
}

/// A trace context as stored with a job.
pub(crate) fn stored_trace(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<domain::events::TraceContext> {
    traceparent.map(|traceparent| domain::events::TraceContext {
        traceparent: traceparent.to_owned(),
        tracestate: tracestate.map(str::to_owned),
    })
}

/// Several jobs by id, in no particular order; unknown ids are left out.
pub async fn get_many(conn: &mut PgConn, ids: &[JobId]) -> DbResult<Vec<Job>> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    Ok(jobs::table
        .filter(jobs::id.eq_any(ids))
        .select(Job::as_select())
        .load(conn)
        .await?)
}

#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub queue: Option<String>,
    pub repository_id: Option<RepositoryId>,
    pub label: Option<String>,
    /// Keyset cursor: return jobs strictly older than this id.
    pub before: Option<JobId>,
    pub limit: u32,
}

/// Newest first. Ids are UUIDv7, so `id < cursor` pages are stable while
/// new jobs keep arriving (they sort before every page already read).
///
/// A listing of one status reads `jobs_org_status_listing` in order (of a
/// held status, `jobs_held`, and sorts what the org's agents hold), one of
/// a repository `jobs_repository`. There is no index of an org's jobs by
/// id alone (each status change would add an entry to it), so a listing
/// of every status takes the newest page of each status and merges them:
/// at most a page per status is read.
pub async fn list(conn: &mut PgConn, org: &OrgId, filter: &ListFilter) -> DbResult<Vec<Job>> {
    if filter.status.is_none() && filter.repository_id.is_none() {
        return list_every_status(conn, org, filter).await;
    }
    let mut query = jobs::table
        .filter(jobs::org_id.eq(org.as_str()))
        .select(Job::as_select())
        .into_boxed();
    if let Some(status) = filter.status {
        query = query.filter(jobs::status.eq(status.as_str()));
    }
    if let Some(queue) = &filter.queue {
        query = query.filter(jobs::queue.eq(queue.clone()));
    }
    if let Some(repo) = filter.repository_id {
        query = query.filter(jobs::repository_id.eq(repo.as_uuid()));
    }
    if let Some(label) = &filter.label {
        query = query.filter(jobs::required_labels.contains(vec![label.clone()]));
    }
    if let Some(before) = filter.before {
        query = query.filter(jobs::id.lt(before.as_uuid()));
    }
    Ok(query
        .order(jobs::id.desc())
        .limit(i64::from(filter.limit.max(1)))
        .load(conn)
        .await?)
}

/// One branch per status, each naming its status as a literal: the partial
/// indexes serve a branch only when the planner can prove their predicate
/// from it. Built once.
static EVERY_STATUS_LISTING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let pages: Vec<String> = JobStatus::ALL
        .iter()
        .map(|status| {
            format!(
                "(SELECT * FROM jobs WHERE org_id = $1 AND status = '{}' \
                   AND ($2::text IS NULL OR queue = $2) \
                   AND ($3::text IS NULL OR required_labels @> ARRAY[$3]) \
                   AND ($4::uuid IS NULL OR id < $4) \
                 ORDER BY id DESC LIMIT $5)",
                status.as_str()
            )
        })
        .collect();
    format!(
        "SELECT page.* FROM ({}) page ORDER BY page.id DESC LIMIT $5",
        pages.join(" UNION ALL ")
    )
});

async fn list_every_status(
    conn: &mut PgConn,
    org: &OrgId,
    filter: &ListFilter,
) -> DbResult<Vec<Job>> {
    Ok(diesel::sql_query(EVERY_STATUS_LISTING.as_str())
        .bind::<Text, _>(org.as_str())
        .bind::<Nullable<Text>, _>(filter.queue.as_deref())
        .bind::<Nullable<Text>, _>(filter.label.as_deref())
        .bind::<Nullable<SqlUuid>, _>(filter.before.map(|id| id.as_uuid()))
        .bind::<BigInt, _>(i64::from(filter.limit.max(1)))
        .load(conn)
        .await?)
}

/// Turns a guarded update that matched no row into the precise reason:
/// unknown job, stale epoch, or a transition the job's state forbids.
pub(crate) async fn explain_refusal(
    conn: &mut PgConn,
    id: JobId,
    epoch: Option<u64>,
    action: domain::state::Action,
) -> DbError {
    let found: Result<Option<(String, i64)>, _> = jobs::table
        .find(id.as_uuid())
        .select((jobs::status, jobs::lease_epoch))
        .first(conn)
        .await
        .optional();
    match found {
        Err(e) => e.into(),
        Ok(None) => DbError::NotFound,
        Ok(Some((status, current))) => {
            let status: JobStatus = status.parse().unwrap_or(JobStatus::Failed);
            match epoch {
                Some(given) if given != current as u64 => {
                    DbError::Domain(DomainError::StaleEpoch {
                        given,
                        current: current as u64,
                    })
                }
                _ => DbError::Domain(DomainError::InvalidTransition {
                    from: status,
                    action: action.verb(),
                }),
            }
        }
    }
}

/// One finished attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = crate::schema::attempts)]
pub struct Attempt {
    pub job_id: Uuid,
    pub epoch: i64,
    pub attempt: i32,
    pub agent_id: Uuid,
    pub leased_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
}

/// The job's finished attempts, oldest first.
pub async fn attempts(conn: &mut PgConn, id: JobId) -> DbResult<Vec<Attempt>> {
    use crate::schema::attempts;
    Ok(attempts::table
        .filter(attempts::job_id.eq(id.as_uuid()))
        .order(attempts::epoch.asc())
        .select(Attempt::as_select())
        .load(conn)
        .await?)
}
