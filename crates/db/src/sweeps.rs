//! What the scheduler's periodic sweep looks for: leases past their
//! deadline, cancels past their grace period, run timeouts, overall
//! deadlines, jobs that waited too long to start, and cancels to (re)push.
//! Each query reads a small partial index; the changes themselves go
//! through [`crate::leases`], so a job changed meanwhile by someone else is
//! simply refused there.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use domain::{AgentId, JobId};
use uuid::Uuid;

use crate::cached::CacheStatement;
use crate::{DbResult, PgConn};

/// A job found by a sweep, with the epoch it had when found.
#[derive(Clone, Debug, PartialEq, QueryableByName)]
pub struct Due {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
}

impl Due {
    pub fn job(&self) -> JobId {
        JobId(self.job_id)
    }
}

async fn due(conn: &mut PgConn, sql: &str, limit: i64) -> DbResult<Vec<Due>> {
    Ok(diesel::sql_query(sql)
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await?)
}

/// Leases whose deadline passed (unacknowledged, or no heartbeat).
pub async fn expired_leases(conn: &mut PgConn, limit: i64) -> DbResult<Vec<Due>> {
    due(
        conn,
        "SELECT id AS job_id, lease_epoch AS epoch FROM jobs \
         WHERE status IN ('leased', 'running', 'cancel_requested') AND lease_expires_at < now() \
         ORDER BY lease_expires_at LIMIT $1",
        limit,
    )
    .await
}

/// Cancels whose grace period ran out: to be forced.
pub async fn overdue_cancels(conn: &mut PgConn, limit: i64) -> DbResult<Vec<Due>> {
    due(
        conn,
        "SELECT id AS job_id, lease_epoch AS epoch FROM jobs \
         WHERE status = 'cancel_requested' AND cancel_deadline_at < now() \
         ORDER BY cancel_deadline_at LIMIT $1",
        limit,
    )
    .await
}

/// Running attempts past their run timeout.
pub async fn run_timeouts(conn: &mut PgConn, limit: i64) -> DbResult<Vec<Due>> {
    due(
        conn,
        "SELECT id AS job_id, lease_epoch AS epoch FROM jobs \
         WHERE status = 'running' AND run_deadline_at < now() ORDER BY run_deadline_at LIMIT $1",
        limit,
    )
    .await
}

/// Jobs past their overall deadline that are not finished.
pub async fn past_deadline(conn: &mut PgConn, limit: i64) -> DbResult<Vec<Due>> {
    due(
        conn,
        "SELECT id AS job_id, lease_epoch AS epoch FROM jobs \
         WHERE deadline_at IS NOT NULL AND deadline_at < now() \
           AND status IN ('pending_approval', 'queued', 'leased', 'running') \
         ORDER BY deadline_at LIMIT $1",
        limit,
    )
    .await
}

/// Queued jobs that waited longer than their schedule-to-start timeout.
pub async fn schedule_to_start_expired(conn: &mut PgConn, limit: i64) -> DbResult<Vec<Due>> {
    due(
        conn,
        "SELECT id AS job_id, lease_epoch AS epoch FROM jobs \
         WHERE status = 'queued' AND schedule_to_start_ms IS NOT NULL \
           AND queued_at + schedule_to_start_ms * interval '1 millisecond' < now() \
         ORDER BY queued_at LIMIT $1",
        limit,
    )
    .await
}

/// A cancel the agent holding the job must hear about.
#[derive(Clone, Debug, PartialEq, QueryableByName)]
pub struct PendingCancel {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub agent_id: Uuid,
    #[diesel(sql_type = Text)]
    pub org_id: String,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub cancel_deadline_at: Option<DateTime<Utc>>,
}

impl PendingCancel {
    pub fn agent(&self) -> AgentId {
        AgentId(self.agent_id)
    }
}

pub async fn pending_cancels(conn: &mut PgConn, limit: i64) -> DbResult<Vec<PendingCancel>> {
    Ok(diesel::sql_query(
        "SELECT id AS job_id, agent_id, org_id, lease_epoch AS epoch, cancel_deadline_at FROM jobs \
         WHERE status = 'cancel_requested' AND agent_id IS NOT NULL \
         ORDER BY cancel_deadline_at LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?)
}

#[derive(QueryableByName)]
struct NextRun {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    at: Option<DateTime<Utc>>,
}

/// The earliest future run-at among queued jobs (delayed jobs, backoffs).
/// A job runnable at once has `run_at = created_at`; `run_at > created_at`
/// names the `jobs_delayed` index, which holds only the others.
///
/// Spelled as the first row in `run_at` order rather than `min(run_at)`:
/// only `jobs_delayed` yields that order, so even the plan cached while
/// the table was empty reads it (two pages), where `min` was planned over
/// the ready index and walked the whole ready set once it filled (54 ms at
/// 100,000 queued jobs). So the statement can stay prepared.
pub const NEXT_RUN_AT: &str = "SELECT (SELECT run_at FROM jobs \
    WHERE status = 'queued' AND run_at > created_at AND run_at > now() \
    ORDER BY run_at LIMIT 1) AS at";

/// [`NEXT_RUN_AT`]: the scheduler sleeps until then instead of polling rows.
pub async fn next_run_at(conn: &mut PgConn) -> DbResult<Option<DateTime<Utc>>> {
    let next: NextRun = diesel::sql_query(NEXT_RUN_AT)
        .cached()
        .get_result(conn)
        .await?;
    Ok(next.at)
}

/// Forgets idempotency keys older than `hours`.
pub async fn purge_idempotency_keys(conn: &mut PgConn, hours: i64) -> DbResult<usize> {
    Ok(diesel::sql_query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - $1 * interval '1 hour'",
    )
    .bind::<BigInt, _>(hours)
    .execute(conn)
    .await?)
}

/// Queued jobs per (org, queue), for the queue-depth gauge.
#[derive(Clone, Debug, PartialEq, QueryableByName)]
pub struct QueueDepth {
    #[diesel(sql_type = Text)]
    pub org_id: String,
    #[diesel(sql_type = Text)]
    pub queue: String,
    #[diesel(sql_type = BigInt)]
    pub depth: i64,
}

pub async fn queue_depths(conn: &mut PgConn) -> DbResult<Vec<QueueDepth>> {
    Ok(diesel::sql_query(
        "SELECT org_id, queue, count(*) AS depth FROM jobs WHERE status = 'queued' GROUP BY org_id, queue",
    )
    .load(conn)
    .await?)
}
