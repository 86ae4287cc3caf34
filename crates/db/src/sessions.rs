//! Agent sessions as the gateway sees them: which replica holds an agent's
//! session (so assignments can be routed to it), when it went offline, and
//! the lookups a gateway needs to resume an agent's work after a reconnect.
//!
//! A session is named by a fresh id on every (re)connect. Ending a session
//! is guarded by that id, so a replica that lost an agent never marks it
//! offline after the agent reconnected elsewhere.

use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use domain::agent::AgentStatus;
use domain::job::{JobStatus, Labels};
use domain::{AgentId, JobId};
use uuid::Uuid;

use crate::agents::Agent;
use crate::jobs::Job;
use crate::schema::{agents, job_log_heads, jobs};
use crate::{DbError, DbResult, PgConn};

/// What the agent declares when its session opens.
pub struct SessionOpen<'a> {
    pub gateway_id: &'a str,
    pub session_id: Uuid,
    /// The agent's full label set (stored labels plus any it announces).
    pub labels: &'a Labels,
    pub capacity: u32,
    pub version: &'a str,
}

/// Marks the agent online on this gateway under a new session id. A
/// revoked agent is refused ([`DbError::NotFound`]).
pub async fn open(conn: &mut PgConn, agent: AgentId, open: SessionOpen<'_>) -> DbResult<Agent> {
    let updated = diesel::update(agents::table)
        .filter(agents::id.eq(agent.as_uuid()))
        .filter(agents::revoked_at.is_null())
        .filter(agents::status.ne(AgentStatus::Revoked.as_str()))
        .set((
            agents::status.eq(AgentStatus::Online.as_str()),
            agents::gateway_id.eq(open.gateway_id),
            agents::session_id.eq(open.session_id),
            agents::connected_at.eq(diesel::dsl::now),
            agents::last_seen_at.eq(diesel::dsl::now),
            agents::labels.eq(open.labels.to_vec()),
            agents::capacity.eq(open.capacity.clamp(1, i32::MAX as u32) as i32),
            agents::version.eq(open.version),
        ))
        .returning(Agent::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    updated.ok_or(DbError::NotFound)
}

/// Keeps an open session's presence fresh (HTTP agents between polls).
pub async fn touch(conn: &mut PgConn, agent: AgentId, session_id: Uuid) -> DbResult<bool> {
    let updated = diesel::update(agents::table)
        .filter(agents::id.eq(agent.as_uuid()))
        .filter(agents::session_id.eq(session_id))
        .set(agents::last_seen_at.eq(diesel::dsl::now))
        .execute(conn)
        .await?;
    Ok(updated == 1)
}

/// Marks the agent offline if `session_id` is still its session (it did
/// not reconnect elsewhere meanwhile) and it is online or draining. With
/// `idle`, only if it was not seen for that long. Returns whether it changed.
pub async fn close(
    conn: &mut PgConn,
    agent: AgentId,
    session_id: Uuid,
    idle: Option<Duration>,
) -> DbResult<bool> {
    let statuses = [AgentStatus::Online.as_str(), AgentStatus::Draining.as_str()];
    let query = diesel::update(agents::table)
        .filter(agents::id.eq(agent.as_uuid()))
        .filter(agents::session_id.eq(session_id))
        .filter(agents::status.eq_any(statuses));
    let set = (
        agents::status.eq(AgentStatus::Offline.as_str()),
        agents::gateway_id.eq(None::<String>),
    );
    let updated = match idle {
        None => query.set(set).execute(conn).await?,
        Some(idle) => {
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(idle).unwrap_or(chrono::Duration::zero());
            query
                .filter(agents::last_seen_at.lt(cutoff))
                .set(set)
                .execute(conn)
                .await?
        }
    };
    Ok(updated == 1)
}

/// Marks the agent draining (it takes no new work) if `session_id` is its
/// current session.
pub async fn drain(conn: &mut PgConn, agent: AgentId, session_id: Uuid) -> DbResult<bool> {
    let updated = diesel::update(agents::table)
        .filter(agents::id.eq(agent.as_uuid()))
        .filter(agents::session_id.eq(session_id))
        .filter(agents::status.eq(AgentStatus::Online.as_str()))
        .set(agents::status.eq(AgentStatus::Draining.as_str()))
        .execute(conn)
        .await?;
    Ok(updated == 1)
}

/// An agent by id alone (the caller authenticated it), revoked or not.
pub async fn agent(conn: &mut PgConn, agent: AgentId) -> DbResult<Agent> {
    Ok(agents::table
        .find(agent.as_uuid())
        .select(Agent::as_select())
        .first(conn)
        .await?)
}

/// The org of `agent`, as a subquery: the index of held leases
/// (`jobs_held`) is found by org first, then agent.
fn org_of(
    agent: AgentId,
) -> diesel::dsl::SingleValue<
    diesel::dsl::Select<diesel::dsl::Find<agents::table, Uuid>, agents::org_id>,
> {
    agents::table
        .find(agent.as_uuid())
        .select(agents::org_id)
        .single_value()
}

/// Jobs leased to `agent` and not yet acknowledged, with time left on the
/// acknowledgement deadline: assignments to (re)deliver when a session
/// opens, in case the push on the bus was missed.
pub async fn pending_assignments(conn: &mut PgConn, agent: AgentId) -> DbResult<Vec<Job>> {
    Ok(jobs::table
        .filter(jobs::org_id.nullable().eq(org_of(agent)))
        .filter(jobs::agent_id.eq(agent.as_uuid()))
        .filter(jobs::status.eq(JobStatus::Leased.as_str()))
        .filter(jobs::lease_expires_at.gt(diesel::dsl::now))
        .order(jobs::leased_at.asc())
        .select(Job::as_select())
        .load(conn)
        .await?)
}

/// How many jobs hold a lease of `agent` (leased, running or cancelling).
pub async fn leased_count(conn: &mut PgConn, agent: AgentId) -> DbResult<i64> {
    let held: Vec<&str> = JobStatus::LEASED.iter().map(|s| s.as_str()).collect();
    Ok(jobs::table
        .filter(jobs::org_id.nullable().eq(org_of(agent)))
        .filter(jobs::agent_id.eq(agent.as_uuid()))
        .filter(jobs::status.eq_any(held))
        .count()
        .get_result(conn)
        .await?)
}

/// Bytes of the attempt at `epoch` whose log lines are stored: where an
/// agent resumes sending. 0 when nothing of that attempt is stored.
pub async fn committed_log_offset(conn: &mut PgConn, job: JobId, epoch: u64) -> DbResult<u64> {
    let head: Option<(i64, i64)> = job_log_heads::table
        .find(job.as_uuid())
        .select((job_log_heads::epoch, job_log_heads::committed_offset))
        .first(conn)
        .await
        .optional()?;
    Ok(match head {
        Some((head_epoch, committed)) if head_epoch == epoch as i64 => committed.max(0) as u64,
        _ => 0,
    })
}
