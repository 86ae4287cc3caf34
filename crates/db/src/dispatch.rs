//! Dispatch: turning queued jobs into leases, one org at a time.
//!
//! One transaction per org per tick: take the org's dispatch lock (a
//! transaction-scoped advisory lock, so it also works behind a transaction
//! pooler and is released by a crash), read the agents with free capacity,
//! the limits in use and the heads of every repository's queue, let
//! [`domain::scheduling`] order and place them, then lease the whole batch
//! in one statement. Because every lease of an org is granted under its
//! lock, several scheduler replicas never overfill an agent or a limit, and
//! the `status = 'queued'` guard means no job is leased twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Double, Int2, Int4, Int8, Jsonb, Nullable, Text, Timestamptz,
    Uuid as SqlUuid,
};
use diesel_async::{AsyncConnectionCore, AsyncPgConnection, RunQueryDsl};
use domain::job::Labels;
use domain::scheduling::{AgentOffer, Candidate, Limits, order, plan};
use domain::{AgentId, JobId, OrgId, RepositoryId};
use uuid::Uuid;

use crate::cached::CacheStatement;
use crate::{DbResult, PgConn};

/// Dispatch settings.
#[derive(Clone, Debug)]
pub struct DispatchSettings {
    /// Time an agent has to acknowledge an assignment.
    pub ack_timeout: Duration,
    /// Priority boost interval (see [`domain::scheduling`]); `None` = no aging.
    pub aging: Option<Duration>,
    /// Most leases granted for one org in one tick.
    pub max_leases_per_tick: usize,
    /// Fewest jobs read from the head of each fairness group's queue per
    /// tick (more when one group's share of the free slots is larger).
    pub heads_per_group: i64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(10),
            aging: Some(Duration::from_secs(60)),
            max_leases_per_tick: 1_000,
            heads_per_group: 64,
        }
    }
}

/// A lease granted by a dispatch, with what the agent needs to hear of it.
#[derive(Clone, Debug, PartialEq, QueryableByName)]
pub struct Granted {
    #[diesel(sql_type = SqlUuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub agent_id: Uuid,
    #[diesel(sql_type = Text)]
    pub org_id: String,
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    #[diesel(sql_type = Int4)]
    pub attempt: i32,
    #[diesel(sql_type = Timestamptz)]
    pub lease_expires_at: DateTime<Utc>,
    /// When the job was queued: dispatch latency is measured from here.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub queued_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub traceparent: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub tracestate: Option<String>,
    // What the agent needs to run the job (see `offered_job`).
    #[diesel(sql_type = Text)]
    pub queue: String,
    #[diesel(sql_type = Jsonb)]
    pub payload: serde_json::Value,
    #[diesel(sql_type = Jsonb)]
    pub metadata: serde_json::Value,
    #[diesel(sql_type = Array<Text>)]
    pub required_labels: Vec<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub run_timeout_ms: Option<i64>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub repository_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub deadline_at: Option<DateTime<Utc>>,
}

impl Granted {
    /// The trace of the request that created the job.
    pub fn trace(&self) -> Option<domain::events::TraceContext> {
        crate::jobs::stored_trace(self.traceparent.as_deref(), self.tracestate.as_deref())
    }

    /// The lease of a job its create inserted leased.
    pub(crate) fn of_created(job: &crate::jobs::Job) -> Self {
        Self {
            job_id: job.id,
            agent_id: job.agent_id.unwrap_or_default(),
            org_id: job.org_id.clone(),
            epoch: job.lease_epoch,
            attempt: job.app_failures + job.infra_failures + 1,
            lease_expires_at: job.lease_expires_at.unwrap_or(job.created_at),
            queued_at: job.queued_at,
            traceparent: job.traceparent.clone(),
            tracestate: job.tracestate.clone(),
            queue: job.queue.clone(),
            payload: job.payload.clone(),
            metadata: job.metadata.clone(),
            required_labels: job.required_labels.clone(),
            run_timeout_ms: job.run_timeout_ms,
            repository_id: job.repository_id,
            deadline_at: job.deadline_at,
        }
    }

    /// The lease as its agent's offer, continuing `trace`.
    pub fn offer(
        &self,
        trace: Option<domain::events::TraceContext>,
    ) -> (AgentId, domain::events::Offer) {
        let offer = domain::events::Offer {
            job_id: JobId(self.job_id),
            epoch: self.epoch as u64,
            attempt: self.attempt as u32,
            lease_expires_at: self.lease_expires_at,
            trace,
            job: self.offered_job(),
        };
        (AgentId(self.agent_id), offer)
    }

    /// The job as its offer carries it, unless it is too big to carry.
    pub fn offered_job(&self) -> Option<domain::events::OfferedJob> {
        let size = self.payload.to_string().len() + self.metadata.to_string().len();
        (size <= domain::events::OfferedJob::MAX_CARRIED_BYTES).then(|| {
            domain::events::OfferedJob {
                queue: self.queue.clone(),
                payload: self.payload.clone(),
                metadata: self.metadata.clone(),
                required_labels: self.required_labels.clone(),
                run_timeout_ms: self.run_timeout_ms.map(|ms| ms.max(0) as u64),
                repository_id: self.repository_id,
                deadline_at: self.deadline_at,
            }
        })
    }
}

#[derive(QueryableByName)]
struct OrgRow {
    #[diesel(sql_type = Text)]
    org_id: String,
}

/// Orgs with due queued jobs and at least one online agent. Runs on every
/// tick (under load, after every batch of results), so it probes the
/// queue once per org, not once per online agent.
pub async fn orgs_with_work(conn: &mut PgConn) -> DbResult<Vec<OrgId>> {
    let rows: Vec<OrgRow> = diesel::sql_query(
        "SELECT o.org_id FROM (SELECT DISTINCT org_id FROM agents WHERE status = 'online') o \
         WHERE EXISTS ( \
           SELECT 1 FROM jobs j WHERE j.org_id = o.org_id AND j.status = 'queued' AND j.run_at <= now())",
    )
    .cached()
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| OrgId::parse(r.org_id).ok())
        .collect())
}

/// The org's leased jobs (what holds agent capacity and limits).
macro_rules! held {
    () => {
        "org_id = $1 AND status IN ('leased', 'running', 'cancel_requested')"
    };
}
const HELD: &str = held!();

/// How many jobs agent `a` holds, as a lateral join: each agent's count
/// walks only its own entries of the `jobs_held` index. A grouped count of
/// the org's held jobs joined on the agent was planned (generic plan) as a
/// nested loop that recounted every held job once per agent: with 8 full
/// agents of 256, 16,000 index entries and heap visits, 5.9 ms per tick
/// against 1.6 ms.
const HELD_BY_AGENT: &str = concat!(
    "LEFT JOIN LATERAL (SELECT count(*) AS held FROM jobs WHERE ",
    held!(),
    " AND agent_id = a.id) h ON true"
);

#[derive(QueryableByName)]
struct AgentRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Array<Text>)]
    labels: Vec<String>,
    #[diesel(sql_type = Int8)]
    free: i64,
    #[diesel(sql_type = Double)]
    success_rate: f64,
}

/// Online agents of the org with free capacity, and their recent success rate.
pub async fn agent_offers<C>(conn: &mut C, org: &OrgId) -> DbResult<Vec<AgentOffer>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    let rows: Vec<AgentRow> = diesel::sql_query(format!(
        "SELECT a.id, a.labels, a.capacity - COALESCE(h.held, 0) AS free, \
                COALESCE(s.rate, 1.0)::float8 AS success_rate \
         FROM agents a \
         {HELD_BY_AGENT} \
         LEFT JOIN LATERAL (SELECT avg((r.outcome = 'succeeded')::int)::float8 AS rate FROM \
                    (SELECT outcome FROM attempts WHERE agent_id = a.id \
                     AND outcome IN ('succeeded', 'failed', 'lost') \
                     ORDER BY ended_at DESC LIMIT 20) r) s ON true \
         WHERE a.org_id = $1 AND a.status = 'online' AND a.capacity - COALESCE(h.held, 0) > 0"
    ))
    .bind::<Text, _>(org.as_str())
    .cached()
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| AgentOffer {
            agent_id: AgentId(r.id),
            labels: Labels::new(r.labels),
            free: r.free.max(0) as u32,
            success_rate: r.success_rate,
        })
        .collect())
}

/// One row of [`limits`]: the org's cap and usage (`org`), a capped
/// repository's (`repository`), or the slots a concurrency key holds (`key`).
#[derive(QueryableByName)]
struct LimitRow {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    repository_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Int4>)]
    max_jobs: Option<i32>,
    #[diesel(sql_type = Int8)]
    leased: i64,
    #[diesel(sql_type = Nullable<Text>)]
    key: Option<String>,
    #[diesel(sql_type = Nullable<Array<Int4>>)]
    slots: Option<Vec<i32>>,
}

/// The limits that constrain the org's dispatch and how much of each is
/// used, plus the slot numbers held per concurrency key: one statement
/// (it is on every dispatch's path).
pub async fn limits<C>(conn: &mut C, org: &OrgId) -> DbResult<(Limits, HashMap<String, Vec<i32>>)>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    let rows: Vec<LimitRow> = diesel::sql_query(format!(
        "SELECT 'org' AS kind, NULL::uuid AS repository_id, \
                (SELECT max_concurrent_jobs FROM org_settings WHERE org_id = $1) AS max_jobs, \
                count(*) AS leased, NULL::text AS key, NULL::int4[] AS slots \
         FROM jobs WHERE {HELD} \
         UNION ALL \
         SELECT 'repository', r.id, r.max_concurrent_jobs, COALESCE(u.leased, 0), NULL, NULL \
         FROM repositories r \
         LEFT JOIN (SELECT repository_id, count(*) AS leased FROM jobs WHERE {HELD} \
                    GROUP BY repository_id) u ON u.repository_id = r.id \
         WHERE r.org_id = $1 AND r.max_concurrent_jobs IS NOT NULL \
         UNION ALL \
         SELECT 'key', NULL, NULL, 0, key, array_agg(slot ORDER BY slot) \
         FROM concurrency_slots WHERE org_id = $1 GROUP BY key"
    ))
    .bind::<Text, _>(org.as_str())
    .cached()
    .load(conn)
    .await?;
    let mut limits = Limits::default();
    let mut held = HashMap::new();
    for row in rows {
        match (row.kind.as_str(), row.repository_id, row.key) {
            ("org", _, _) => {
                limits.org_max = row.max_jobs.map(|n| n as u32);
                limits.org_running = row.leased as u32;
            }
            ("repository", Some(repo), _) => {
                limits.repositories.insert(
                    RepositoryId(repo),
                    (row.max_jobs.map(|n| n as u32), row.leased as u32),
                );
            }
            ("key", _, Some(key)) => {
                let slots = row.slots.unwrap_or_default();
                limits.keys_held.insert(key.clone(), slots.len() as u32);
                held.insert(key, slots);
            }
            _ => {}
        }
    }
    Ok((limits, held))
}

#[derive(QueryableByName)]
struct CandidateRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    repository_id: Option<Uuid>,
    #[diesel(sql_type = Int2)]
    queue_rank: i16,
    #[diesel(sql_type = Int4)]
    priority: i32,
    #[diesel(sql_type = Int8)]
    position: i64,
    #[diesel(sql_type = Timestamptz)]
    queued_at: DateTime<Utc>,
    #[diesel(sql_type = Array<Text>)]
    required_labels: Vec<String>,
    #[diesel(sql_type = Nullable<Text>)]
    concurrency_key: Option<String>,
    #[diesel(sql_type = Nullable<Int4>)]
    concurrency_limit: Option<i32>,
}

const CANDIDATE_COLUMNS: &str = "id, repository_id, queue_rank, priority, position, \
    COALESCE(queued_at, created_at) AS queued_at, required_labels, concurrency_key, concurrency_limit";

/// Only jobs some online agent of the org has the labels for: otherwise
/// more unrunnable jobs than a tick reads would hold the heads of a queue
/// and starve everything queued behind them. Checked against the `online`
/// label sets, read once per statement: probing the agents index for each
/// candidate instead made a read of 1,000 candidates take 2.9 ms, not 2.1.
const RUNNABLE: &str = "EXISTS (SELECT 1 FROM online WHERE online.labels @> jobs.required_labels)";

/// A job's fairness group: its repository, or the nil UUID (never a
/// repository's id) for jobs without one. Spelled exactly as in the ready
/// indexes' expression, so the planner uses them.
const GROUP: &str = "COALESCE(repository_id, '00000000-0000-0000-0000-000000000000'::uuid)";

/// Since when a job has been waiting in its queue, spelled as in the
/// `jobs_ready_group_oldest` index.
const WAITED: &str = "COALESCE(queued_at, created_at)";

/// Jobs queued before this instant may have been lifted by aging (see
/// [`candidates`]). An interval reaching before the calendar's start lifts
/// nothing, so it gives `None` rather than overflowing.
fn lifted_before(now: DateTime<Utc>, aging: Option<Duration>) -> Option<DateTime<Utc>> {
    let interval = TimeDelta::from_std(aging?).ok()?;
    now.checked_sub_signed(interval)
}

/// The heads of every fairness group's ready queue, among the jobs an
/// online agent could run: per group, the first ones by static dispatch
/// order and as many of the longest waiting among the jobs queued before
/// `lifted_before`. Only those can have been lifted by aging; a job aging
/// did not lift that belongs in the tick is among the first by static
/// order. `None` (no aging) reads only the first. Each group gives at least
/// `heads` and its share of what the tick can place: the free slots of the
/// org's online agents, at most `most`. So one busy group can fill every
/// free slot in one tick. Found by skipping through the index one group at
/// a time, never by reading a whole backlog; nothing is read when no agent
/// has a free slot.
///
/// The free slots are counted here, not taken from [`agent_offers`], so
/// that this read goes out in the same round trip as that one.
pub async fn candidates<C>(
    conn: &mut C,
    org: &OrgId,
    heads: i64,
    most: i64,
    lifted_before: Option<DateTime<Utc>>,
) -> DbResult<Vec<Candidate>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    let sql = format!(
        "WITH RECURSIVE groups(id) AS ( \
            (SELECT {GROUP} FROM jobs WHERE org_id = $1 AND status = 'queued' ORDER BY 1 LIMIT 1) \
            UNION ALL \
            SELECT (SELECT {GROUP} FROM jobs WHERE org_id = $1 AND status = 'queued' \
                    AND {GROUP} > groups.id ORDER BY 1 LIMIT 1) \
            FROM groups WHERE groups.id IS NOT NULL), \
         online(labels) AS MATERIALIZED ( \
            SELECT DISTINCT labels FROM agents WHERE org_id = $1 AND status = 'online'), \
         free(n) AS ( \
            SELECT least($3, COALESCE(sum(greatest(a.capacity - COALESCE(h.held, 0), 0)), 0)) \
            FROM agents a \
            {HELD_BY_AGENT} \
            WHERE a.org_id = $1 AND a.status = 'online'), \
         share(n) AS (SELECT greatest($2, free.n / greatest(count(*), 1)) FROM free, groups \
                      WHERE free.n > 0 AND groups.id IS NOT NULL GROUP BY free.n) \
         SELECT DISTINCT ON (id) c.* FROM share CROSS JOIN groups g CROSS JOIN LATERAL ( \
             (SELECT {CANDIDATE_COLUMNS} FROM jobs WHERE org_id = $1 AND status = 'queued' \
                AND {GROUP} = g.id AND run_at <= now() AND {RUNNABLE} \
                ORDER BY queue_rank, priority DESC, position LIMIT share.n) \
             UNION ALL \
             (SELECT {CANDIDATE_COLUMNS} FROM jobs WHERE org_id = $1 AND status = 'queued' \
                AND {GROUP} = g.id AND {WAITED} <= $4 AND run_at <= now() AND {RUNNABLE} \
                ORDER BY {WAITED} LIMIT share.n)) c \
         WHERE g.id IS NOT NULL"
    );
    let rows: Vec<CandidateRow> = diesel::sql_query(sql)
        .bind::<Text, _>(org.as_str())
        .bind::<BigInt, _>(heads)
        .bind::<BigInt, _>(most)
        .bind::<Nullable<Timestamptz>, _>(lifted_before)
        .cached()
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(CandidateRow::into_candidate).collect())
}

impl CandidateRow {
    fn into_candidate(self) -> Candidate {
        Candidate {
            job_id: JobId(self.id),
            repository_id: self.repository_id.map(RepositoryId),
            queue_rank: self.queue_rank,
            priority: self.priority,
            position: self.position,
            queued_at: self.queued_at,
            required_labels: Labels::new(self.required_labels),
            concurrency_key: self.concurrency_key,
            concurrency_limit: self.concurrency_limit.unwrap_or(1).max(1) as u32,
        }
    }
}

/// Every due queued job of the org (up to `limit`), for computing queue
/// positions with the same ordering the dispatcher uses.
pub async fn queued_candidates(
    conn: &mut PgConn,
    org: &OrgId,
    limit: i64,
) -> DbResult<Vec<Candidate>> {
    let rows: Vec<CandidateRow> = diesel::sql_query(format!(
        "SELECT {CANDIDATE_COLUMNS} FROM jobs WHERE org_id = $1 AND status = 'queued' AND run_at <= now() \
         ORDER BY queue_rank, priority DESC, position LIMIT $2"
    ))
    .bind::<Text, _>(org.as_str())
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(CandidateRow::into_candidate).collect())
}

/// Leases the planned (job, agent) pairs in one statement and takes their
/// concurrency slots; returns what was granted.
async fn lease_batch<C>(
    conn: &mut C,
    org: &OrgId,
    pairs: &[(JobId, AgentId)],
    keys: &HashMap<JobId, String>,
    mut held: HashMap<String, Vec<i32>>,
    ack_timeout: Duration,
) -> DbResult<Vec<Granted>>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    let jobs: Vec<Uuid> = pairs.iter().map(|(j, _)| j.as_uuid()).collect();
    let agents: Vec<Uuid> = pairs.iter().map(|(_, a)| a.as_uuid()).collect();
    let granted: Vec<Granted> = diesel::sql_query(
        "UPDATE jobs j SET status = 'leased', lease_epoch = j.lease_epoch + 1, agent_id = p.agent, \
            leased_at = now(), started_at = NULL, run_deadline_at = NULL, \
            lease_expires_at = now() + $3 * interval '1 millisecond', \
            cancel_reason = NULL, cancel_requested_at = NULL, cancel_deadline_at = NULL, updated_at = now() \
         FROM unnest($1::uuid[], $2::uuid[]) AS p(job, agent) \
         WHERE j.id = p.job AND j.status = 'queued' \
         RETURNING j.id AS job_id, j.agent_id AS agent_id, j.org_id, j.lease_epoch AS epoch, \
            j.app_failures + j.infra_failures + 1 AS attempt, j.lease_expires_at, j.queued_at, \
            j.traceparent, j.tracestate, j.queue, j.payload, j.metadata, j.required_labels, \
            j.run_timeout_ms, j.repository_id, j.deadline_at",
    )
    .bind::<Array<SqlUuid>, _>(&jobs)
    .bind::<Array<SqlUuid>, _>(&agents)
    .bind::<BigInt, _>(ack_timeout.as_millis().min(i64::MAX as u128) as i64)
    .cached()
    .load(conn)
    .await?;
    let mut slot_jobs = Vec::new();
    let mut slot_keys = Vec::new();
    let mut slot_numbers = Vec::new();
    let mut slot_epochs = Vec::new();
    for lease in &granted {
        let Some(key) = keys.get(&JobId(lease.job_id)) else {
            continue;
        };
        let free = free_slot(&held, key);
        held.entry(key.clone()).or_default().push(free);
        slot_jobs.push(lease.job_id);
        slot_keys.push(key.clone());
        slot_numbers.push(free);
        slot_epochs.push(lease.epoch);
    }
    if !slot_jobs.is_empty() {
        take_slots(
            conn,
            org,
            &slot_keys,
            &slot_numbers,
            &slot_jobs,
            &slot_epochs,
        )
        .await?;
    }
    Ok(granted)
}

/// The lowest slot number of `key` that `held` does not hold.
fn free_slot(held: &HashMap<String, Vec<i32>>, key: &str) -> i32 {
    let used: HashSet<i32> = held.get(key).into_iter().flatten().copied().collect();
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

/// Records that each leased job holds its concurrency key's slot.
pub(crate) async fn take_slots<C>(
    conn: &mut C,
    org: &OrgId,
    keys: &[String],
    slots: &[i32],
    jobs: &[Uuid],
    epochs: &[i64],
) -> DbResult<()>
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    diesel::sql_query(
        "INSERT INTO concurrency_slots (org_id, key, slot, job_id, epoch) \
         SELECT $1, s.key, s.slot, s.job, s.epoch \
         FROM unnest($2::text[], $3::int4[], $4::uuid[], $5::int8[]) AS s(key, slot, job, epoch)",
    )
    .bind::<Text, _>(org.as_str())
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<Int4>, _>(slots)
    .bind::<Array<SqlUuid>, _>(jobs)
    .bind::<Array<BigInt>, _>(epochs)
    .cached()
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// Namespace of the per-org dispatch advisory locks.
const DISPATCH_LOCK_NAMESPACE: i32 = 0x5359_4450; // "SYDP"

/// Planner settings for a dispatch transaction (see [`dispatch_org`] for
/// why), as a `FROM` item of its first statement.
const DISPATCH_PLANNING: &str = "set_config('enable_bitmapscan', 'off', true) AS bitmap, \
    set_config('plan_cache_mode', 'force_generic_plan', true) AS plans";

/// What one dispatch of an org did.
#[derive(Debug, Default)]
pub struct Dispatched {
    pub granted: Vec<Granted>,
    /// Another dispatch right away could lease more: the per-tick cap was
    /// reached, or free slots remain while some group had more queued than
    /// its share of this read.
    pub more: bool,
    /// Another transaction held the org's dispatch lock, so nothing was
    /// read: it may not have seen jobs committed since, so try again soon.
    pub contended: bool,
}

/// Dispatches one org: orders its ready jobs, places them on its agents and
/// leases the batch. Returns nothing if another replica holds the org's
/// lock right now (it is doing the same work).
pub async fn dispatch_org(
    conn: &mut PgConn,
    org: &OrgId,
    settings: &DispatchSettings,
) -> DbResult<Dispatched> {
    let owner: &PgConn = conn;
    // BEGIN goes out with the first statements (one round trip fewer).
    owner
        .pipelined_transaction(async {
            // Bitmap scans are off for this transaction: they never mark index
            // entries of dead rows as dead, and every status change leaves such
            // entries in the leased and ready indexes until vacuum, so each tick
            // would visit thousands of dead heap rows again (48 ms per tick
            // counting 2,000 leases at a 100,000-job burn-down). Plain index
            // scans mark them on the first visit and skip them after (0.4 ms).
            // Plans are generic: custom planning of the candidates query took
            // 1.3 ms per tick, longer than running it, and with bitmap scans off
            // its generic plan walks the same indexes whatever the backlog
            // (checked from empty statistics to 100,000 queued jobs).
            //
            // The lock and the three reads go in one pipeline, in that order:
            // one round trip instead of four on every dispatch (when the lock
            // is not granted, the reads are thrown away).
            let shared = conn.pipeline();
            let (mut for_lock, mut for_agents, mut for_limits, mut for_candidates) =
                (shared, shared, shared, shared);
            let lock = diesel::sql_query(format!(
            "SELECT pg_try_advisory_xact_lock($1, hashtext($2)) AS locked FROM {DISPATCH_PLANNING}"
        ))
        .bind::<Int4, _>(DISPATCH_LOCK_NAMESPACE)
        .bind::<Text, _>(org.as_str())
        .cached()
        .get_result::<Locked>(&mut for_lock);
            let most = settings.max_leases_per_tick as i64;
            let (lock, agents, (limits, held), mut ready) = futures_util::try_join!(
                async { Ok(lock.await?) },
                agent_offers(&mut for_agents, org),
                limits(&mut for_limits, org),
                candidates(
                    &mut for_candidates,
                    org,
                    settings.heads_per_group,
                    most,
                    lifted_before(Utc::now(), settings.aging),
                ),
            )?;
            if !lock.locked {
                return Ok(Dispatched {
                    contended: true,
                    ..Dispatched::default()
                });
            }
            if agents.is_empty() {
                return Ok(Dispatched::default());
            }
            let free: usize = agents.iter().map(|a| a.free as usize).sum();
            let wanted = free.min(settings.max_leases_per_tick);
            let mut conn = shared;
            order(&mut ready, Utc::now(), settings.aging);
            let placement = plan(&ready, &agents, &limits, wanted);
            if placement.assignments.is_empty() {
                return Ok(Dispatched::default());
            }
            let mut per_group: HashMap<Option<RepositoryId>, i64> = HashMap::new();
            for candidate in &ready {
                *per_group.entry(candidate.repository_id).or_default() += 1;
            }
            let some_group_cut = per_group.values().any(|&n| n >= settings.heads_per_group);
            let keys: HashMap<JobId, String> = ready
                .iter()
                .filter_map(|c| c.concurrency_key.clone().map(|k| (c.job_id, k)))
                .collect();
            let lease = lease_batch(
                &mut conn,
                org,
                &placement.assignments,
                &keys,
                held,
                settings.ack_timeout,
            );
            // Without concurrency keys the lease is the last statement, and
            // nothing it answers can call the dispatch off: COMMIT goes out
            // behind it (slots are taken from what the lease answers).
            let keyed = placement
                .assignments
                .iter()
                .any(|(job, _)| keys.contains_key(job));
            let granted = if keyed {
                lease.await?
            } else {
                let commit = async { owner.commit_behind().await.map_err(crate::DbError::from) };
                futures_util::try_join!(lease, commit)?.0
            };
            let more = !granted.is_empty()
                && (granted.len() >= settings.max_leases_per_tick
                    || (granted.len() < wanted && some_group_cut));
            Ok(Dispatched {
                granted,
                more,
                contended: false,
            })
        })
        .await
}

/// Where a job about to be created can be leased at once: the agent, and
/// the slot of its concurrency key it would hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub agent: AgentId,
    pub slot: Option<(String, i32)>,
}

/// Places `jobs`, jobs about to be inserted in this transaction, when
/// nothing else of their org is ready and no dispatch of the org is
/// running: the caller then inserts the placed ones already leased, so they
/// go out with their create's commit, without the scheduler's round of
/// wake-up, reads, lease and commit. The rest (all of them when no online
/// agent can take one) are inserted queued for the scheduler.
///
/// It takes the org's dispatch lock, held until the create commits, so it
/// never overfills an agent or a limit any more than the scheduler does; a
/// scheduler that finds the lock taken tries again shortly (see
/// [`Dispatched::contended`]). The gate, the agents and the limits go out
/// in one round trip.
pub async fn place_created(
    shared: &AsyncPgConnection,
    org: &OrgId,
    mut jobs: Vec<Candidate>,
) -> DbResult<Vec<(JobId, Placement)>> {
    let (mut for_gate, mut for_agents, mut for_limits) = (shared, shared, shared);
    let gate = diesel::sql_query(format!(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE org_id = $2 AND status = 'queued' \
                                  AND run_at <= now()) \
                THEN false ELSE pg_try_advisory_xact_lock($1, hashtext($2)) END AS locked \
         FROM {DISPATCH_PLANNING}"
    ))
    .bind::<Int4, _>(DISPATCH_LOCK_NAMESPACE)
    .bind::<Text, _>(org.as_str())
    .cached()
    .get_result::<Locked>(&mut for_gate);
    let (gate, agents, (limits, mut held)) = futures_util::try_join!(
        async { Ok(gate.await?) },
        agent_offers(&mut for_agents, org),
        limits(&mut for_limits, org),
    )?;
    if !gate.locked || agents.is_empty() {
        return Ok(Vec::new());
    }
    order(&mut jobs, Utc::now(), None);
    let placed = plan(&jobs, &agents, &limits, jobs.len()).assignments;
    let keys: HashMap<JobId, String> = jobs
        .into_iter()
        .filter_map(|job| job.concurrency_key.map(|key| (job.job_id, key)))
        .collect();
    Ok(placed
        .into_iter()
        .map(|(job, agent)| {
            let slot = keys.get(&job).map(|key| {
                let slot = free_slot(&held, key);
                held.entry(key.clone()).or_default().push(slot);
                (key.clone(), slot)
            });
            (job, Placement { agent, slot })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aging_lifts_jobs_queued_one_interval_ago_and_an_absurd_interval_lifts_none() {
        let now = Utc::now();
        assert_eq!(
            lifted_before(now, Some(Duration::from_secs(60))),
            Some(now - TimeDelta::seconds(60))
        );
        assert_eq!(lifted_before(now, None), None);
        assert_eq!(
            lifted_before(now, Some(Duration::from_secs(u64::MAX))),
            None
        );
        assert_eq!(
            lifted_before(now, Some(Duration::from_secs(400_000 * 365 * 86_400))),
            None
        );
    }
}
