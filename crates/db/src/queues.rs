//! Queue summaries, reordering, and org statistics.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Int4, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, RunQueryDsl};
use domain::{DomainError, JobId, OrgId};
use serde::Serialize;
use uuid::Uuid;

use crate::jobs::Job;
use crate::schema::jobs;
use crate::{DbError, DbResult, PgConn};

/// One queue's state.
#[derive(Clone, Debug, PartialEq, Serialize, QueryableByName)]
pub struct QueueSummary {
    #[diesel(sql_type = Text)]
    pub queue: String,
    #[diesel(sql_type = Int8)]
    pub queued: i64,
    #[diesel(sql_type = Int8)]
    pub pending_approval: i64,
    #[diesel(sql_type = Int8)]
    pub running: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub oldest_queued_at: Option<DateTime<Utc>>,
    /// Jobs of this queue that finished in the last 10 minutes.
    #[diesel(sql_type = Int8)]
    pub finished_last_10m: i64,
}

pub async fn summaries(conn: &mut PgConn, org: &OrgId) -> DbResult<Vec<QueueSummary>> {
    Ok(diesel::sql_query(
        "SELECT queue, \
            count(*) FILTER (WHERE status = 'queued') AS queued, \
            count(*) FILTER (WHERE status = 'pending_approval') AS pending_approval, \
            count(*) FILTER (WHERE status IN ('leased', 'running', 'cancel_requested')) AS running, \
            min(COALESCE(queued_at, created_at)) FILTER (WHERE status = 'queued') AS oldest_queued_at, \
            count(*) FILTER (WHERE finished_at > now() - interval '10 minutes') AS finished_last_10m \
         FROM jobs WHERE org_id = $1 AND (status IN ('queued', 'pending_approval') \
            OR status IN ('leased', 'running', 'cancel_requested') \
            OR finished_at > now() - interval '10 minutes') \
         GROUP BY queue ORDER BY queue",
    )
    .bind::<Text, _>(org.as_str())
    .load(conn)
    .await?)
}

/// Where to move a job in its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Before(JobId),
    After(JobId),
}

#[derive(QueryableByName)]
struct Neighbour {
    #[diesel(sql_type = Nullable<Int8>)]
    position: Option<i64>,
}

/// Gap left between neighbours when a queue is renumbered.
const SPACING: i64 = 1 << 20;

/// Moves a waiting job just before or after another waiting job of the same
/// queue; it takes that job's priority so the two stay adjacent in dispatch
/// order. Positions are spaced, so this rewrites one row, except when a gap
/// runs out and the queue is renumbered.
pub async fn reorder(
    conn: &mut PgConn,
    org: &OrgId,
    job: JobId,
    placement: Placement,
) -> DbResult<Job> {
    let org = org.clone();
    conn.transaction(async |conn| {
        let anchor_id = match placement {
            Placement::Before(id) | Placement::After(id) => id,
        };
        if anchor_id == job {
            return Err(DomainError::invalid("target", "a job cannot be placed relative to itself").into());
        }
        let waiting = ["queued", "pending_approval"];
        let moving: Job = jobs::table
            .filter(jobs::org_id.eq(org.as_str()))
            .filter(jobs::id.eq(job.as_uuid()))
            .select(Job::as_select())
            .for_update()
            .first(conn)
            .await?;
        let anchor: Option<Job> = jobs::table
            .filter(jobs::org_id.eq(org.as_str()))
            .filter(jobs::id.eq(anchor_id.as_uuid()))
            .select(Job::as_select())
            .for_update()
            .first(conn)
            .await
            .optional()?;
        let anchor = anchor.ok_or_else(|| DbError::Domain(DomainError::invalid("target", "no such job")))?;
        if !waiting.contains(&moving.status.as_str()) || !waiting.contains(&anchor.status.as_str()) {
            return Err(DomainError::invalid("target", "only queued or pending jobs can be reordered").into());
        }
        if anchor.queue != moving.queue {
            return Err(DomainError::invalid("target", "the jobs are in different queues").into());
        }
        for _ in 0..2 {
            let anchor_position: i64 = jobs::table
                .find(anchor.id)
                .select(jobs::position)
                .first(conn)
                .await?;
            let (comparison, aggregate) = match placement {
                Placement::Before(_) => ("<", "max"),
                Placement::After(_) => (">", "min"),
            };
            let neighbour: Neighbour = diesel::sql_query(format!(
                "SELECT {aggregate}(position) AS position FROM jobs \
                 WHERE org_id = $1 AND queue = $2 AND status IN ('queued', 'pending_approval') \
                   AND priority = $3 AND id <> $4 AND position {comparison} $5"
            ))
            .bind::<Text, _>(org.as_str())
            .bind::<Text, _>(&moving.queue)
            .bind::<Int4, _>(anchor.priority)
            .bind::<SqlUuid, _>(moving.id)
            .bind::<BigInt, _>(anchor_position)
            .get_result(conn)
            .await?;
            let bound = neighbour.position.unwrap_or(match placement {
                Placement::Before(_) => anchor_position - 2 * SPACING,
                Placement::After(_) => anchor_position + 2 * SPACING,
            });
            let (low, high) = match placement {
                Placement::Before(_) => (bound, anchor_position),
                Placement::After(_) => (anchor_position, bound),
            };
            if high - low >= 2 {
                let position = low + (high - low) / 2;
                return Ok(diesel::update(jobs::table.find(moving.id))
                    .set((
                        jobs::position.eq(position),
                        jobs::priority.eq(anchor.priority),
                        jobs::updated_at.eq(diesel::dsl::now),
                    ))
                    .returning(Job::as_returning())
                    .get_result(conn)
                    .await?);
            }
            // No room left between the neighbours: respace the queue.
            diesel::sql_query(
                "UPDATE jobs j SET position = r.n * $3 FROM ( \
                   SELECT id, row_number() OVER (ORDER BY position) AS n FROM jobs \
                   WHERE org_id = $1 AND queue = $2 AND status IN ('queued', 'pending_approval')) r \
                 WHERE j.id = r.id",
            )
            .bind::<Text, _>(org.as_str())
            .bind::<Text, _>(&moving.queue)
            .bind::<BigInt, _>(SPACING)
            .execute(conn)
            .await?;
        }
        Err(DbError::Conflict("reorder could not find room".into()))
    })
    .await
}

/// The queue's waiting jobs (queued or pending approval) in queue order:
/// priority first, then position.
pub async fn waiting_order(
    conn: &mut PgConn,
    org: &OrgId,
    queue: &domain::job::QueueName,
) -> DbResult<Vec<JobId>> {
    let ids: Vec<Uuid> = jobs::table
        .filter(jobs::org_id.eq(org.as_str()))
        .filter(jobs::queue.eq(queue.as_str()))
        .filter(jobs::status.eq_any(["queued", "pending_approval"]))
        .order((jobs::priority.desc(), jobs::position.asc()))
        .select(jobs::id)
        .limit(100_000)
        .load(conn)
        .await?;
    Ok(ids.into_iter().map(JobId).collect())
}

/// Statistics over a time window.
#[derive(Clone, Debug, PartialEq, Serialize, QueryableByName)]
pub struct WindowStats {
    #[diesel(sql_type = Int8)]
    pub created: i64,
    #[diesel(sql_type = Int8)]
    pub succeeded: i64,
    #[diesel(sql_type = Int8)]
    pub failed: i64,
    #[diesel(sql_type = Int8)]
    pub cancelled: i64,
    #[diesel(sql_type = Int8)]
    pub timed_out: i64,
    #[diesel(sql_type = Int8)]
    pub dead: i64,
    #[diesel(sql_type = Nullable<Double>)]
    pub queue_wait_p50_ms: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    pub queue_wait_p95_ms: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    pub run_time_p50_ms: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    pub run_time_p95_ms: Option<f64>,
}

/// An id below that of any job created in the last `$2` seconds. Job ids
/// are UUIDv7, whose first 48 bits are the creation's Unix milliseconds, so
/// a window's read is a range of the primary key (no index holds every job
/// of an org); a minute's slack covers an id minted a little before its
/// `created_at`.
const CREATED_SINCE: &str = "(lpad(to_hex((extract(epoch FROM now() - $2 * interval '1 second' \
    - interval '1 minute') * 1000)::int8), \
    12, '0') || '00000000000000000000')::uuid";

pub async fn window_stats(
    conn: &mut PgConn,
    org: &OrgId,
    window_secs: i64,
) -> DbResult<WindowStats> {
    Ok(diesel::sql_query(format!(
        "WITH recent AS (SELECT * FROM jobs WHERE org_id = $1 AND created_at > now() - $2 * interval '1 second' \
                          AND id >= {CREATED_SINCE}), \
              finished AS (SELECT a.* FROM attempts a JOIN jobs j ON j.id = a.job_id \
                           WHERE j.org_id = $1 AND a.ended_at > now() - $2 * interval '1 second') \
         SELECT (SELECT count(*) FROM recent) AS created, \
           (SELECT count(*) FROM recent WHERE status = 'succeeded') AS succeeded, \
           (SELECT count(*) FROM recent WHERE status = 'failed') AS failed, \
           (SELECT count(*) FROM recent WHERE status = 'cancelled') AS cancelled, \
           (SELECT count(*) FROM recent WHERE status = 'timed_out') AS timed_out, \
           (SELECT count(*) FROM recent WHERE status = 'dead') AS dead, \
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000) \
              FROM recent WHERE started_at IS NOT NULL) AS queue_wait_p50_ms, \
           (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000) \
              FROM recent WHERE started_at IS NOT NULL) AS queue_wait_p95_ms, \
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ended_at - started_at) * 1000) \
              FROM finished WHERE started_at IS NOT NULL) AS run_time_p50_ms, \
           (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM ended_at - started_at) * 1000) \
              FROM finished WHERE started_at IS NOT NULL) AS run_time_p95_ms"
    ))
    .bind::<Text, _>(org.as_str())
    .bind::<BigInt, _>(window_secs)
    .get_result(conn)
    .await?)
}

/// One agent's record over the window.
#[derive(Clone, Debug, PartialEq, Serialize, QueryableByName)]
pub struct AgentStats {
    #[diesel(sql_type = SqlUuid)]
    pub agent_id: Uuid,
    #[diesel(sql_type = Int8)]
    pub attempts: i64,
    #[diesel(sql_type = Double)]
    pub success_rate: f64,
}

pub async fn agent_stats(
    conn: &mut PgConn,
    org: &OrgId,
    window_secs: i64,
) -> DbResult<Vec<AgentStats>> {
    Ok(diesel::sql_query(
        "SELECT a.agent_id, count(*) AS attempts, avg((a.outcome = 'succeeded')::int)::float8 AS success_rate \
         FROM attempts a JOIN jobs j ON j.id = a.job_id \
         WHERE j.org_id = $1 AND a.ended_at > now() - $2 * interval '1 second' \
           AND a.outcome IN ('succeeded', 'failed', 'lost') \
         GROUP BY a.agent_id ORDER BY a.agent_id",
    )
    .bind::<Text, _>(org.as_str())
    .bind::<BigInt, _>(window_secs)
    .load(conn)
    .await?)
}
