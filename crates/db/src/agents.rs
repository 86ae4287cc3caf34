//! Agents, their credentials and the registration tokens that admit them.
//! Secrets are returned once and stored only as hashes ([`crate::secrets`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use domain::agent::{AgentProfile, AgentStatus};
use domain::job::Labels;
use domain::{AgentId, DomainError, OrgId, RegistrationTokenId};
use serde::Serialize;
use uuid::Uuid;

use crate::schema::{agent_credentials, agents, registration_tokens};
use crate::secrets;
use crate::{DbError, DbResult, PgConn};

#[derive(Clone, Debug, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = agents)]
pub struct Agent {
    pub id: Uuid,
    pub org_id: String,
    pub name: String,
    pub labels: Vec<String>,
    pub capacity: i32,
    pub version: String,
    pub status: String,
    pub registration_token_id: Option<Uuid>,
    pub gateway_id: Option<String>,
    pub session_id: Option<Uuid>,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Agent {
    pub fn agent_id(&self) -> AgentId {
        AgentId(self.id)
    }

    pub fn status(&self) -> AgentStatus {
        self.status.parse().unwrap_or(AgentStatus::Offline)
    }

    pub fn labels(&self) -> Labels {
        Labels::new(self.labels.iter().cloned())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = registration_tokens)]
pub struct RegistrationToken {
    pub id: Uuid,
    pub org_id: String,
    pub description: Option<String>,
    pub labels: Vec<String>,
    pub max_uses: i32,
    pub uses: i32,
    pub expires_at: DateTime<Utc>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What an admin asks for when creating a registration token.
pub struct NewRegistrationToken<'a> {
    pub org: &'a OrgId,
    pub description: Option<&'a str>,
    /// Labels every agent registered with this token gets, on top of its own.
    pub labels: &'a Labels,
    pub max_uses: u32,
    pub ttl: Duration,
    pub created_by: &'a str,
}

/// Creates a token and returns it with its plaintext, which is never stored.
pub async fn create_registration_token(
    conn: &mut PgConn,
    new: NewRegistrationToken<'_>,
) -> DbResult<(RegistrationToken, String)> {
    let secret = secrets::generate(secrets::REGISTRATION_TOKEN_PREFIX);
    let expires_at =
        Utc::now() + chrono::Duration::from_std(new.ttl).unwrap_or(chrono::Duration::hours(1));
    let token = diesel::insert_into(registration_tokens::table)
        .values((
            registration_tokens::id.eq(RegistrationTokenId::new().as_uuid()),
            registration_tokens::org_id.eq(new.org.as_str()),
            registration_tokens::token_hash.eq(secrets::hash(&secret)),
            registration_tokens::description.eq(new.description),
            registration_tokens::labels.eq(new.labels.to_vec()),
            registration_tokens::max_uses.eq(new.max_uses.clamp(1, i32::MAX as u32) as i32),
            registration_tokens::expires_at.eq(expires_at),
            registration_tokens::created_by.eq(new.created_by),
        ))
        .returning(RegistrationToken::as_returning())
        .get_result(conn)
        .await?;
    Ok((token, secret))
}

/// Why a registration was refused. Deliberately vague to the caller (one
/// message for all), precise in the server's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationRefused {
    #[error("registration token unknown")]
    Unknown,
    #[error("registration token expired or revoked")]
    Expired,
    #[error("registration token used up")]
    UsedUp,
}

/// A newly registered agent and its secret (shown once).
pub struct Registered {
    pub agent: Agent,
    pub secret: String,
}

/// Exchanges a registration token for an agent identity and secret. The
/// token's use is counted in the same statement that checks it, so
/// concurrent registrations can never exceed `max_uses`.
pub async fn register(
    conn: &mut PgConn,
    token: &str,
    profile: &AgentProfile,
) -> DbResult<Result<Registered, RegistrationRefused>> {
    profile.validate()?;
    let hash = secrets::hash(token);
    conn.transaction(async |conn| {
        let used: Option<(Uuid, String, Vec<String>)> = diesel::update(registration_tokens::table)
            .filter(registration_tokens::token_hash.eq(&hash))
            .filter(registration_tokens::revoked_at.is_null())
            .filter(registration_tokens::expires_at.gt(diesel::dsl::now))
            .filter(registration_tokens::uses.lt(registration_tokens::max_uses))
            .set(registration_tokens::uses.eq(registration_tokens::uses + 1))
            .returning((
                registration_tokens::id,
                registration_tokens::org_id,
                registration_tokens::labels,
            ))
            .get_result(conn)
            .await
            .optional()?;
        let Some((token_id, org_id, token_labels)) = used else {
            let found: Option<(Option<DateTime<Utc>>, DateTime<Utc>)> = registration_tokens::table
                .filter(registration_tokens::token_hash.eq(&hash))
                .select((
                    registration_tokens::revoked_at,
                    registration_tokens::expires_at,
                ))
                .first(conn)
                .await
                .optional()?;
            return Ok(Err(match found {
                None => RegistrationRefused::Unknown,
                Some((revoked, expires)) if revoked.is_some() || expires <= Utc::now() => {
                    RegistrationRefused::Expired
                }
                Some(_) => RegistrationRefused::UsedUp,
            }));
        };
        let mut labels = profile.labels.clone();
        labels.0.extend(token_labels);
        let agent: Agent = diesel::insert_into(agents::table)
            .values((
                agents::id.eq(AgentId::new().as_uuid()),
                agents::org_id.eq(&org_id),
                agents::name.eq(&profile.name),
                agents::labels.eq(labels.to_vec()),
                agents::capacity.eq(profile.capacity as i32),
                agents::version.eq(&profile.version),
                agents::registration_token_id.eq(token_id),
            ))
            .returning(Agent::as_returning())
            .get_result(conn)
            .await?;
        let secret = secrets::generate(secrets::AGENT_SECRET_PREFIX);
        diesel::insert_into(agent_credentials::table)
            .values((
                agent_credentials::id.eq(Uuid::now_v7()),
                agent_credentials::agent_id.eq(agent.id),
                agent_credentials::secret_hash.eq(secrets::hash(&secret)),
            ))
            .execute(conn)
            .await?;
        let org = OrgId::parse(org_id.clone()).map_err(DomainError::from)?;
        crate::audit::record(
            conn,
            crate::audit::Record {
                org: &org,
                actor: &format!("registration_token:{token_id}"),
                action: "agent.registered",
                target_type: "agent",
                target_id: agent.id.to_string(),
                request_id: None,
                details: serde_json::json!({ "name": agent.name, "labels": agent.labels, "capacity": agent.capacity }),
            },
        )
        .await?;
        Ok(Ok(Registered { agent, secret }))
    })
    .await
}

/// The agent owning `secret`, if the credential and agent are not revoked.
pub async fn authenticate(conn: &mut PgConn, secret: &str) -> DbResult<Option<Agent>> {
    Ok(agent_credentials::table
        .inner_join(agents::table)
        .filter(agent_credentials::secret_hash.eq(secrets::hash(secret)))
        .filter(agent_credentials::revoked_at.is_null())
        .filter(agents::revoked_at.is_null())
        .select(Agent::as_select())
        .first(conn)
        .await
        .optional()?)
}

pub async fn get(conn: &mut PgConn, org: &OrgId, id: AgentId) -> DbResult<Agent> {
    Ok(agents::table
        .filter(agents::org_id.eq(org.as_str()))
        .filter(agents::id.eq(id.as_uuid()))
        .select(Agent::as_select())
        .first(conn)
        .await?)
}

pub async fn list(conn: &mut PgConn, org: &OrgId) -> DbResult<Vec<Agent>> {
    Ok(agents::table
        .filter(agents::org_id.eq(org.as_str()))
        .order(agents::id.asc())
        .select(Agent::as_select())
        .load(conn)
        .await?)
}

/// Sets an agent's status; a revoked agent stays revoked.
pub async fn set_status(conn: &mut PgConn, id: AgentId, status: AgentStatus) -> DbResult<Agent> {
    let updated = diesel::update(agents::table)
        .filter(agents::id.eq(id.as_uuid()))
        .filter(agents::status.ne(AgentStatus::Revoked.as_str()))
        .set((
            agents::status.eq(status.as_str()),
            agents::last_seen_at.eq(diesel::dsl::now),
        ))
        .returning(Agent::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    updated.ok_or(DbError::NotFound)
}

/// Revokes the agent and all its credentials, for good.
pub async fn revoke(conn: &mut PgConn, org: &OrgId, id: AgentId) -> DbResult<Agent> {
    conn.transaction(async |conn| {
        let agent: Agent = diesel::update(agents::table)
            .filter(agents::org_id.eq(org.as_str()))
            .filter(agents::id.eq(id.as_uuid()))
            .set((
                agents::status.eq(AgentStatus::Revoked.as_str()),
                agents::revoked_at.eq(diesel::dsl::now),
            ))
            .returning(Agent::as_returning())
            .get_result(conn)
            .await?;
        diesel::update(agent_credentials::table)
            .filter(agent_credentials::agent_id.eq(id.as_uuid()))
            .filter(agent_credentials::revoked_at.is_null())
            .set(agent_credentials::revoked_at.eq(diesel::dsl::now))
            .execute(conn)
            .await?;
        Ok(agent)
    })
    .await
}

#[derive(QueryableByName)]
struct ActivityRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    running: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    success_rate: Option<f64>,
}

/// Jobs the agent holds now, and its success rate over its last 20
/// finished attempts (`None` before any).
pub async fn activity(conn: &mut PgConn, id: AgentId) -> DbResult<(i64, Option<f64>)> {
    let row: ActivityRow = diesel::sql_query(
        "SELECT (SELECT count(*) FROM jobs \
                   WHERE org_id = (SELECT org_id FROM agents WHERE id = $1) AND agent_id = $1 \
                   AND status IN ('leased', 'running', 'cancel_requested')) AS running, \
                (SELECT avg((outcome = 'succeeded')::int)::float8 FROM \
                   (SELECT outcome FROM attempts WHERE agent_id = $1 \
                    AND outcome IN ('succeeded', 'failed', 'lost') ORDER BY ended_at DESC LIMIT 20) r) AS success_rate",
    )
    .bind::<diesel::sql_types::Uuid, _>(id.as_uuid())
    .get_result(conn)
    .await?;
    Ok((row.running, row.success_rate))
}

/// Agents connected now, across all orgs.
pub async fn online_count(conn: &mut PgConn) -> DbResult<i64> {
    Ok(agents::table
        .filter(
            agents::status.eq_any([AgentStatus::Online.as_str(), AgentStatus::Draining.as_str()]),
        )
        .count()
        .get_result(conn)
        .await?)
}
