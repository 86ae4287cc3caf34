//! Leases and every state change of a job: granting a lease (epoch + 1),
//! acknowledging it, heartbeats, results, cancellation, expiry, and the
//! operator actions (approve, reject, cancel, retry, redrive).
//!
//! The hot paths (lease, start, heartbeat, success) are single statements
//! guarded by status and epoch. Paths that need the retry policy lock the
//! row, let [`domain::state::Lifecycle`] decide, and write the outcome in the
//! same transaction, so the domain's rules are the only rules.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Int4, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, RunQueryDsl};
use domain::job::JobStatus;
use domain::retry::{Failure, InfraReason};
use domain::state::{Action, AfterFailure, Lifecycle};
use domain::{AgentId, JobId, OrgId};
use uuid::Uuid;

use crate::cached::CacheStatement;
use crate::jobs::{Job, explain_refusal};
use crate::schema::jobs;
use crate::{DbError, DbResult, PgConn};

fn sources(action: Action) -> Vec<&'static str> {
    action.sources().iter().map(|s| s.as_str()).collect()
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis().min(i64::MAX as u128) as i64
}

/// A lease just granted.
#[derive(Clone, Debug, PartialEq, QueryableByName)]
pub struct Lease {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    #[diesel(sql_type = Int4)]
    pub attempt: i32,
    #[diesel(sql_type = Timestamptz)]
    pub expires_at: DateTime<Utc>,
}

/// Leases one queued job to `agent`: the epoch goes up by one, and the
/// agent must acknowledge within `ack_timeout` or the lease lapses and the
/// job is queued again without spending an attempt. A job with a
/// concurrency key also takes a free slot, or is not leased at all.
pub async fn lease_job(
    conn: &mut PgConn,
    job: JobId,
    agent: AgentId,
    ack_timeout: Duration,
) -> DbResult<Lease> {
    conn.transaction(async |conn| {
        let lease: Option<Lease> = diesel::sql_query(
            "UPDATE jobs SET status = 'leased', lease_epoch = lease_epoch + 1, agent_id = $2, \
                leased_at = now(), started_at = NULL, run_deadline_at = NULL, \
                lease_expires_at = now() + $3 * interval '1 millisecond', \
                cancel_reason = NULL, cancel_requested_at = NULL, cancel_deadline_at = NULL, \
                updated_at = now() \
             WHERE id = $1 AND status = ANY($4) AND run_at <= now() \
             RETURNING id AS job_id, lease_epoch AS epoch, \
                app_failures + infra_failures + 1 AS attempt, lease_expires_at AS expires_at",
        )
        .bind::<SqlUuid, _>(job.as_uuid())
        .bind::<SqlUuid, _>(agent.as_uuid())
        .bind::<BigInt, _>(millis(ack_timeout))
        .bind::<Array<Text>, _>(sources(Action::Lease))
        .cached()
        .get_result(conn)
        .await
        .optional()?;
        let Some(lease) = lease else {
            return Err(explain_refusal(conn, job, None, Action::Lease).await);
        };
        // Serialize slot choice per key, so two leases racing for slot 0
        // do not leave one refused while slot 1 is free.
        diesel::sql_query(
            "SELECT pg_advisory_xact_lock(hashtext(org_id), hashtext(concurrency_key)) \
             FROM jobs WHERE id = $1 AND concurrency_key IS NOT NULL",
        )
        .bind::<SqlUuid, _>(job.as_uuid())
        .cached()
        .execute(conn)
        .await?;
        let slot_taken = diesel::sql_query(
            "INSERT INTO concurrency_slots (org_id, key, slot, job_id, epoch) \
             SELECT j.org_id, j.concurrency_key, s.slot, j.id, j.lease_epoch \
             FROM jobs j, generate_series(0, j.concurrency_limit - 1) AS s(slot) \
             WHERE j.id = $1 AND j.concurrency_key IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM concurrency_slots c \
                   WHERE c.org_id = j.org_id AND c.key = j.concurrency_key AND c.slot = s.slot) \
             ORDER BY s.slot LIMIT 1 \
             ON CONFLICT DO NOTHING",
        )
        .bind::<SqlUuid, _>(job.as_uuid())
        .cached()
        .execute(conn)
        .await?;
        let needs_slot: bool = jobs::table
            .find(job.as_uuid())
            .select(jobs::concurrency_key.is_not_null())
            .first(conn)
            .await?;
        if needs_slot && slot_taken == 0 {
            return Err(DbError::Conflict("concurrency_key_full".into()));
        }
        Ok(lease)
    })
    .await
}

/// The agent acknowledged the assignment: the job is running, the lease
/// now lasts `lease_ttl` and is extended by heartbeats.
pub async fn start(
    conn: &mut PgConn,
    job: JobId,
    epoch: u64,
    lease_ttl: Duration,
) -> DbResult<Job> {
    start_as(conn, None, job, epoch, lease_ttl).await
}

/// [`start`], and only if `holder` (when given) holds the lease: an agent's
/// acknowledgement needs no separate check of whose job it is.
pub async fn start_as(
    conn: &mut PgConn,
    holder: Option<AgentId>,
    job: JobId,
    epoch: u64,
    lease_ttl: Duration,
) -> DbResult<Job> {
    let mut update = diesel::update(jobs::table)
        .filter(jobs::id.eq(job.as_uuid()))
        .filter(jobs::lease_epoch.eq(epoch as i64))
        .filter(jobs::status.eq_any(sources(Action::Start)))
        .into_boxed();
    if let Some(agent) = holder {
        update = update.filter(jobs::agent_id.eq(agent.as_uuid()));
    }
    let updated: Option<Job> = update
        .set((
            jobs::status.eq(JobStatus::Running.as_str()),
            jobs::started_at.eq(diesel::dsl::now),
            jobs::lease_expires_at.eq(diesel::dsl::sql::<Nullable<Timestamptz>>(&format!(
                "now() + interval '{} milliseconds'",
                millis(lease_ttl)
            ))),
            jobs::run_deadline_at.eq(diesel::dsl::sql::<Nullable<Timestamptz>>(
                "now() + run_timeout_ms * interval '1 millisecond'",
            )),
            jobs::updated_at.eq(diesel::dsl::now),
        ))
        .returning(Job::as_returning())
        .cached()
        .get_result(conn)
        .await
        .optional()?;
    match updated {
        Some(job) => Ok(job),
        None => Err(explain_refusal(conn, job, Some(epoch), Action::Start).await),
    }
}

/// A lease an agent still holds after a heartbeat.
#[derive(Clone, Debug, PartialEq, QueryableByName)]
pub struct Extended {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    #[diesel(sql_type = Timestamptz)]
    pub expires_at: DateTime<Utc>,
    /// Piggybacked on the heartbeat reply so a missed cancel push is healed.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub cancel_requested: bool,
}

/// `(job, epoch)` pairs as the two arrays a statement unnests.
fn ids_and_epochs(pairs: &[(JobId, u64)]) -> (Vec<Uuid>, Vec<i64>) {
    pairs
        .iter()
        .map(|(job, epoch)| (job.as_uuid(), *epoch as i64))
        .unzip()
}

/// Extends every listed lease of `agent` in one statement. Leases missing
/// from the result were stale (wrong epoch, not this agent, or over).
pub async fn extend_leases(
    conn: &mut PgConn,
    agent: AgentId,
    held: &[(JobId, u64)],
    lease_ttl: Duration,
) -> DbResult<Vec<Extended>> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, epochs) = ids_and_epochs(held);
    let mut shared = conn.pipeline();
    conn.keyed_transaction(async {
        Ok(diesel::sql_query(
            "UPDATE jobs j SET lease_expires_at = now() + $4 * interval '1 millisecond' \
         FROM unnest($1::uuid[], $2::int8[]) AS held(id, epoch) \
         WHERE j.id = held.id AND j.lease_epoch = held.epoch AND j.agent_id = $3 \
           AND j.status IN ('running', 'cancel_requested') \
         RETURNING j.id AS job_id, j.lease_epoch AS epoch, j.lease_expires_at AS expires_at, \
           j.status = 'cancel_requested' AS cancel_requested",
        )
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<BigInt>, _>(&epochs)
        .bind::<SqlUuid, _>(agent.as_uuid())
        .bind::<BigInt, _>(millis(lease_ttl))
        .cached()
        .load(&mut shared)
        .await?)
    })
    .await
}

/// A success just recorded.
#[derive(Clone, Copy, Debug, PartialEq, QueryableByName)]
pub struct Succeeded {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    /// The number of the attempt that succeeded.
    #[diesel(sql_type = Int4)]
    pub attempt: i32,
}

/// Records success in one statement: the job, its attempt row and its
/// concurrency slot change together, only if `epoch` is still current.
/// A job still `leased` (its ack came with the result, or never) counts
/// as started now.
pub async fn succeed(
    conn: &mut PgConn,
    job: JobId,
    epoch: u64,
    exit_code: Option<i32>,
) -> DbResult<()> {
    succeed_as(conn, None, job, epoch, exit_code)
        .await
        .map(drop)
}

/// [`succeed`], and only if `holder` (when given) holds the lease.
pub async fn succeed_as(
    conn: &mut PgConn,
    holder: Option<AgentId>,
    job: JobId,
    epoch: u64,
    exit_code: Option<i32>,
) -> DbResult<Succeeded> {
    let success = Success {
        job,
        epoch,
        exit_code,
        holder,
    };
    let done = succeed_each(conn, &[success]).await?;
    match done.into_iter().next() {
        Some(succeeded) => Ok(succeeded),
        None => Err(why_not_succeeded(conn, job, epoch).await),
    }
}

/// Why a success of attempt `epoch` of `job` was refused: the job is
/// unknown, the epoch stale, or the job no longer running.
pub async fn why_not_succeeded(conn: &mut PgConn, job: JobId, epoch: u64) -> DbError {
    explain_refusal(conn, job, Some(epoch), Action::Succeed).await
}

/// A success to record: the attempt `epoch` of `job`, reported by `holder`
/// (when given, it must hold the lease).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Success {
    pub job: JobId,
    pub epoch: u64,
    pub exit_code: Option<i32>,
    pub holder: Option<AgentId>,
}

/// Records several successes in one statement, each as [`succeed`] does;
/// returns those recorded. A success missing from the result was refused
/// (stale epoch, another holder, or no longer running). A gateway records
/// what all its agents reported meanwhile in one statement.
pub async fn succeed_each(conn: &mut PgConn, successes: &[Success]) -> DbResult<Vec<Succeeded>> {
    if successes.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = successes.iter().map(|s| s.job.as_uuid()).collect();
    let epochs: Vec<i64> = successes.iter().map(|s| s.epoch as i64).collect();
    let exit_codes: Vec<Option<i32>> = successes.iter().map(|s| s.exit_code).collect();
    let holders: Vec<Option<Uuid>> = successes
        .iter()
        .map(|s| s.holder.map(|agent| agent.as_uuid()))
        .collect();
    // Only jobs with a concurrency key hold a slot; the others skip the
    // slot index probe.
    let mut shared = conn.pipeline();
    conn.keyed_transaction(async {
    Ok(diesel::sql_query(
        "WITH done AS ( \
            UPDATE jobs j SET status = 'succeeded', exit_code = r.exit_code, error_kind = NULL, \
                error_message = NULL, started_at = COALESCE(j.started_at, now()), \
                finished_at = now(), lease_expires_at = NULL, \
                cancel_deadline_at = NULL, updated_at = now() \
            FROM unnest($1::uuid[], $2::int8[], $3::int4[], $5::uuid[]) AS r(id, epoch, exit_code, holder) \
            WHERE j.id = r.id AND j.lease_epoch = r.epoch AND j.status = ANY($4) \
              AND (r.holder IS NULL OR j.agent_id = r.holder) \
            RETURNING j.id, j.lease_epoch, j.agent_id, j.leased_at, j.started_at, j.exit_code, \
                j.app_failures + j.infra_failures + 1 AS attempt, \
                j.concurrency_key IS NOT NULL AS keyed), \
         freed AS (DELETE FROM concurrency_slots s USING done WHERE done.keyed AND s.job_id = done.id), \
         recorded AS ( \
            INSERT INTO attempts (job_id, epoch, attempt, agent_id, leased_at, started_at, outcome, exit_code) \
            SELECT id, lease_epoch, attempt, agent_id, leased_at, started_at, 'succeeded', exit_code FROM done) \
         SELECT id AS job_id, lease_epoch AS epoch, attempt::int4 AS attempt FROM done",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<BigInt>, _>(&epochs)
    .bind::<Array<Nullable<Int4>>, _>(&exit_codes)
    .bind::<Array<Text>, _>(sources(Action::Succeed))
    .bind::<Array<Nullable<SqlUuid>>, _>(&holders)
    .cached()
    .load(&mut shared)
    .await?)
    })
    .await
}

/// An acknowledgement just recorded by [`start_many`].
#[derive(Clone, Copy, Debug, PartialEq, QueryableByName)]
pub struct Started {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    #[diesel(sql_type = Int4)]
    pub attempt: i32,
    #[diesel(sql_type = Timestamptz)]
    pub lease_expires_at: DateTime<Utc>,
}

/// Acknowledges several of `holder`'s assignments in one statement, each
/// as [`start_as`] does; returns those started. An assignment missing from
/// the result was refused or already running.
pub async fn start_many(
    conn: &mut PgConn,
    holder: AgentId,
    assignments: &[(JobId, u64)],
    lease_ttl: Duration,
) -> DbResult<Vec<Started>> {
    if assignments.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, epochs) = ids_and_epochs(assignments);
    let mut shared = conn.pipeline();
    conn.keyed_transaction(async {
        Ok(diesel::sql_query(
            "UPDATE jobs j SET status = 'running', started_at = now(), \
            lease_expires_at = now() + $4 * interval '1 millisecond', \
            run_deadline_at = now() + j.run_timeout_ms * interval '1 millisecond', \
            updated_at = now() \
         FROM unnest($1::uuid[], $2::int8[]) AS a(id, epoch) \
         WHERE j.id = a.id AND j.lease_epoch = a.epoch AND j.agent_id = $3 AND j.status = ANY($5) \
         RETURNING j.id AS job_id, j.lease_epoch AS epoch, \
            (j.app_failures + j.infra_failures + 1)::int4 AS attempt, j.lease_expires_at",
        )
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<BigInt>, _>(&epochs)
        .bind::<SqlUuid, _>(holder.as_uuid())
        .bind::<BigInt, _>(millis(lease_ttl))
        .bind::<Array<Text>, _>(sources(Action::Start))
        .cached()
        .load(&mut shared)
        .await?)
    })
    .await
}

/// How an attempt ended, other than in success.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    /// The job ran and failed.
    Failed {
        exit_code: Option<i32>,
        error_kind: Option<String>,
        message: Option<String>,
    },
    /// The lease lapsed or the agent went away.
    Lost(InfraReason),
    /// The agent gave the job back; it may run again after `delay`.
    Released { delay: Duration },
    /// The agent confirmed a cancellation.
    CancelAcknowledged,
    /// The cancel grace period passed without confirmation.
    CancelForced,
}

/// Where a job went after [`end_attempt`].
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub status: JobStatus,
    pub retry_at: Option<DateTime<Utc>>,
    pub org_id: String,
    /// The epoch of the attempt that ended.
    pub epoch: u64,
    /// The number of the attempt that ended.
    pub attempt: u32,
    /// The agent that held the lease.
    pub agent_id: Option<Uuid>,
}

async fn lock_job(conn: &mut PgConn, job: JobId) -> DbResult<Job> {
    Ok(jobs::table
        .find(job.as_uuid())
        .select(Job::as_select())
        .for_update()
        .first(conn)
        .await?)
}

/// Ends the attempt at `epoch` for any reason but success: the domain
/// decides between retry (with jittered backoff), failed, dead, cancelled
/// or timed out. The lease's concurrency slot is freed in the same
/// transaction. `epoch: None` is for the platform's own forced endings,
/// which act on whatever lease is current.
pub async fn end_attempt(
    conn: &mut PgConn,
    job: JobId,
    epoch: Option<u64>,
    ending: Ending,
) -> DbResult<Ended> {
    let unit: f64 = rand::random();
    conn.transaction(async |conn| {
        let row = lock_job(conn, job).await?;
        let now_state = row.lifecycle();
        let epoch = epoch.unwrap_or(now_state.epoch);
        let policy = row.retry_policy();
        let after: AfterFailure = match &ending {
            Ending::Failed { error_kind, .. } => now_state.fail(
                epoch,
                &Failure::Application {
                    error_kind: error_kind.clone(),
                },
                &policy,
                unit,
            )?,
            Ending::Lost(reason) => now_state.expire_lease(
                epoch,
                &Failure::Infrastructure { reason: *reason },
                &policy,
                unit,
            )?,
            Ending::Released { delay } => AfterFailure {
                next: now_state.release(epoch)?,
                retry_after: Some(*delay),
            },
            Ending::CancelAcknowledged => AfterFailure {
                next: now_state.acknowledge_cancel(epoch)?,
                retry_after: None,
            },
            Ending::CancelForced => {
                if epoch != now_state.epoch {
                    return Err(DbError::Domain(domain::DomainError::StaleEpoch {
                        given: epoch,
                        current: now_state.epoch,
                    }));
                }
                AfterFailure {
                    next: now_state.force_cancel()?,
                    retry_after: None,
                }
            }
        };
        let next = after.next;
        let now = Utc::now();
        let retry_at = (next.status == JobStatus::Queued).then(|| {
            now + chrono::Duration::from_std(after.retry_after.unwrap_or_default())
                .unwrap_or_default()
        });
        let (exit_code, error_kind, message) = match &ending {
            Ending::Failed {
                exit_code,
                error_kind,
                message,
            } => (*exit_code, error_kind.clone(), message.clone()),
            Ending::Lost(reason) => (
                None,
                Some(reason.as_str().to_owned()),
                Some("the lease was lost".to_owned()),
            ),
            _ => (
                row.exit_code,
                row.error_kind.clone(),
                row.error_message.clone(),
            ),
        };
        let outcome = attempt_outcome(&ending, &now_state, &next);
        // A lease never acknowledged is not an attempt: no history row.
        if now_state.status != JobStatus::Leased || outcome != "released" {
            record_attempt(
                conn,
                &row,
                outcome,
                exit_code,
                error_kind.as_deref(),
                message.as_deref(),
            )
            .await?;
        }
        diesel::sql_query("DELETE FROM concurrency_slots WHERE job_id = $1")
            .bind::<SqlUuid, _>(job.as_uuid())
            .cached()
            .execute(conn)
            .await?;
        write_lifecycle(conn, job, &next, retry_at, now).await?;
        diesel::update(jobs::table.find(job.as_uuid()))
            .set((
                jobs::exit_code.eq(exit_code),
                jobs::error_kind.eq(error_kind),
                jobs::error_message.eq(message),
                jobs::lease_expires_at.eq(None::<DateTime<Utc>>),
                jobs::cancel_deadline_at.eq(None::<DateTime<Utc>>),
                jobs::run_deadline_at.eq(None::<DateTime<Utc>>),
            ))
            .execute(conn)
            .await?;
        Ok(Ended {
            status: next.status,
            retry_at,
            org_id: row.org_id.clone(),
            epoch: row.lease_epoch as u64,
            attempt: now_state.attempt(),
            agent_id: row.agent_id,
        })
    })
    .await
}

fn attempt_outcome(ending: &Ending, before: &Lifecycle, next: &Lifecycle) -> &'static str {
    match ending {
        Ending::Released { .. } => "released",
        Ending::Lost(_) if before.status == JobStatus::Leased => "released",
        Ending::CancelAcknowledged | Ending::CancelForced => match next.status {
            JobStatus::TimedOut => "timed_out",
            _ => "cancelled",
        },
        _ if next.status == JobStatus::Cancelled => "cancelled",
        _ if next.status == JobStatus::TimedOut => "timed_out",
        Ending::Lost(_) => "lost",
        Ending::Failed { .. } => "failed",
    }
}

async fn record_attempt(
    conn: &mut PgConn,
    row: &Job,
    outcome: &str,
    exit_code: Option<i32>,
    error_kind: Option<&str>,
    message: Option<&str>,
) -> DbResult<()> {
    let (Some(agent_id), Some(leased_at)) = (row.agent_id, row.leased_at) else {
        return Ok(());
    };
    diesel::sql_query(
        "INSERT INTO attempts (job_id, epoch, attempt, agent_id, leased_at, started_at, outcome, \
            exit_code, error_kind, error_message) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
    )
    .bind::<SqlUuid, _>(row.id)
    .bind::<BigInt, _>(row.lease_epoch)
    .bind::<Int4, _>(row.app_failures + row.infra_failures + 1)
    .bind::<SqlUuid, _>(agent_id)
    .bind::<Timestamptz, _>(leased_at)
    .bind::<Nullable<Timestamptz>, _>(row.started_at)
    .bind::<Text, _>(outcome)
    .bind::<Nullable<Int4>, _>(exit_code)
    .bind::<Nullable<Text>, _>(error_kind)
    .bind::<Nullable<Text>, _>(message)
    .cached()
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes a lifecycle decided by the domain onto the (locked) row.
async fn write_lifecycle(
    conn: &mut PgConn,
    job: JobId,
    next: &Lifecycle,
    retry_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DbResult<()> {
    let queued = next.status == JobStatus::Queued;
    diesel::update(jobs::table.find(job.as_uuid()))
        .set((
            jobs::status.eq(next.status.as_str()),
            jobs::lease_epoch.eq(next.epoch as i64),
            jobs::app_failures.eq(next.failures.application as i32),
            jobs::infra_failures.eq(next.failures.infrastructure as i32),
            jobs::cancel_reason.eq(next.cancel_reason.map(|r| r.as_str())),
            jobs::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    if queued {
        diesel::update(jobs::table.find(job.as_uuid()))
            .set((
                jobs::run_at.eq(retry_at.unwrap_or(now)),
                jobs::queued_at.eq(now),
                jobs::finished_at.eq(None::<DateTime<Utc>>),
            ))
            .execute(conn)
            .await?;
    } else if next.status.is_terminal() {
        diesel::update(jobs::table.find(job.as_uuid()))
            .set(jobs::finished_at.eq(now))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Operator actions on a job, checked by the domain state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    Approve,
    Reject,
    /// Cancel; a leased job gets `grace` to stop before the cancel is forced.
    Cancel {
        grace: Duration,
    },
    Retry,
    Redrive,
}

/// Applies an operator action to a job of `org` and returns the new row.
pub async fn operate(
    conn: &mut PgConn,
    org: &OrgId,
    job: JobId,
    action: OperatorAction,
) -> DbResult<Job> {
    conn.transaction(async |conn| {
        let row: Job = jobs::table
            .filter(jobs::org_id.eq(org.as_str()))
            .filter(jobs::id.eq(job.as_uuid()))
            .select(Job::as_select())
            .for_update()
            .first(conn)
            .await?;
        let state = row.lifecycle();
        let next = match action {
            OperatorAction::Approve => state.approve()?,
            OperatorAction::Reject => state.reject()?,
            OperatorAction::Cancel { .. } => state.request_cancel()?,
            OperatorAction::Retry => state.retry()?,
            OperatorAction::Redrive => state.redrive()?,
        };
        let now = Utc::now();
        if let OperatorAction::Cancel { grace } = action
            && next.status == JobStatus::CancelRequested
            && state.status != JobStatus::CancelRequested
        {
            diesel::update(jobs::table.find(job.as_uuid()))
                .set((
                    jobs::cancel_requested_at.eq(now),
                    jobs::cancel_deadline_at
                        .eq(now + chrono::Duration::from_std(grace).unwrap_or_default()),
                ))
                .execute(conn)
                .await?;
        }
        // Approval must not pull a scheduled job forward.
        let run_at = (action == OperatorAction::Approve).then(|| row.run_at.max(now));
        write_lifecycle(conn, job, &next, run_at, now).await?;
        Ok(jobs::table
            .find(job.as_uuid())
            .select(Job::as_select())
            .first(conn)
            .await?)
    })
    .await
}

/// A limit the platform enforces on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// The attempt at `epoch` ran past its run timeout.
    Run { epoch: u64 },
    /// The overall deadline passed.
    Deadline,
    /// The job waited in the queue past its schedule-to-start timeout.
    ScheduleToStart,
}

/// Applies a timeout: unleased jobs time out at once; leased ones move to
/// `cancel_requested` with `grace` to stop before the cancel is forced.
pub async fn time_out(
    conn: &mut PgConn,
    job: JobId,
    timeout: Timeout,
    grace: Duration,
) -> DbResult<Job> {
    conn.transaction(async |conn| {
        let row = lock_job(conn, job).await?;
        let state = row.lifecycle();
        let next = match timeout {
            Timeout::Run { epoch } => state.run_timeout(epoch)?,
            Timeout::Deadline => state.deadline_exceeded()?,
            Timeout::ScheduleToStart => state.schedule_to_start_timeout()?,
        };
        let now = Utc::now();
        if next.status == JobStatus::CancelRequested {
            diesel::update(jobs::table.find(job.as_uuid()))
                .set((
                    jobs::cancel_requested_at.eq(now),
                    jobs::cancel_deadline_at
                        .eq(now + chrono::Duration::from_std(grace).unwrap_or_default()),
                ))
                .execute(conn)
                .await?;
        }
        write_lifecycle(conn, job, &next, None, now).await?;
        Ok(jobs::table
            .find(job.as_uuid())
            .select(Job::as_select())
            .first(conn)
            .await?)
    })
    .await
}

/// An operator action recorded with who did it: the change, its audit
/// event and (for approvals) the approval record commit together.
pub async fn operate_audited(
    conn: &mut PgConn,
    org: &OrgId,
    job: JobId,
    action: OperatorAction,
    actor: &str,
    request_id: Option<&str>,
) -> DbResult<Job> {
    let org = org.clone();
    conn.transaction(async |conn| {
        let updated = operate(conn, &org, job, action).await?;
        let (verb, decision) = match action {
            OperatorAction::Approve => ("job.approved", Some("approved")),
            OperatorAction::Reject => ("job.rejected", Some("rejected")),
            OperatorAction::Cancel { .. } => ("job.cancelled", None),
            OperatorAction::Retry => ("job.retried", None),
            OperatorAction::Redrive => ("job.redriven", None),
        };
        if let Some(decision) = decision {
            diesel::insert_into(crate::schema::approvals::table)
                .values((
                    crate::schema::approvals::id.eq(Uuid::now_v7()),
                    crate::schema::approvals::job_id.eq(job.as_uuid()),
                    crate::schema::approvals::decision.eq(decision),
                    crate::schema::approvals::decided_by.eq(actor),
                ))
                .execute(conn)
                .await?;
        }
        crate::audit::record(
            conn,
            crate::audit::Record {
                org: &org,
                actor,
                action: verb,
                target_type: "job",
                target_id: job.to_string(),
                request_id,
                details: serde_json::json!({ "status": updated.status }),
            },
        )
        .await?;
        Ok(updated)
    })
    .await
}
