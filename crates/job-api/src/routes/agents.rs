//! Agents and registration tokens.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use bus::Channel;
use db::agents::{Agent, NewRegistrationToken};
use domain::AgentId;
use domain::agent::AgentStatus;
use domain::events::Event;
use domain::job::Labels;
use domain::validation::Errors;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::caller::{Authorized, ManageAgents, OrgCaller};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/orgs/{org_id}/registration-tokens",
        web::post().to(create_registration_token),
    )
    .route("/orgs/{org_id}/agents", web::get().to(list_agents))
    .route("/orgs/{org_id}/agents/{agent_id}", web::get().to(get_agent))
    .route(
        "/orgs/{org_id}/agents/{agent_id}",
        web::delete().to(revoke_agent),
    )
    .route(
        "/orgs/{org_id}/agents/{agent_id}/drain",
        web::post().to(drain_agent),
    );
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRegistrationToken {
    pub description: Option<String>,
    /// Seconds the token stays valid (60 .. 30 days; default 1 hour).
    pub ttl_secs: Option<u64>,
    /// Agents it may register (1..=10000; default 1).
    pub max_uses: Option<u32>,
    /// Labels every agent registered with it gets.
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RegistrationTokenCreated {
    pub id: uuid::Uuid,
    /// Shown once; only its hash is stored.
    pub token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub max_uses: i32,
    pub labels: Vec<String>,
}

/// Create a registration token for agents (Admin or `agents:manage`). The secret is shown once.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/registration-tokens", tag = "agents", params(("org_id" = String, Path)),
    request_body = CreateRegistrationToken,
    responses((status = 201, body = RegistrationTokenCreated), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create_registration_token(
    state: web::Data<AppState>,
    caller: Authorized<ManageAgents>,
    body: web::Json<CreateRegistrationToken>,
) -> ApiResult<HttpResponse> {
    let body = body.into_inner();
    let ttl = body.ttl_secs.unwrap_or(3_600);
    let max_uses = body.max_uses.unwrap_or(1);
    let labels = Labels::new(body.labels.clone());
    let mut errors = Errors::default();
    if !(60..=30 * 24 * 3_600).contains(&ttl) {
        errors.push("ttl_secs", "must be 60 to 2592000");
    }
    if !(1..=10_000).contains(&max_uses) {
        errors.push("max_uses", "must be 1 to 10000");
    }
    if body.description.as_ref().is_some_and(|d| d.len() > 200) {
        errors.push("description", "must be at most 200 characters");
    }
    labels.validate("labels", &mut errors);
    errors.into_result()?;
    let actor = caller.actor();
    let mut conn = state.db.conn().await?;
    let (token, secret) = db::agents::create_registration_token(
        &mut conn,
        NewRegistrationToken {
            org: &caller.org,
            description: body.description.as_deref(),
            labels: &labels,
            max_uses,
            ttl: Duration::from_secs(ttl),
            created_by: &actor,
        },
    )
    .await?;
    db::audit::record(
        &mut conn,
        db::audit::Record {
            org: &caller.org,
            actor: &actor,
            action: "registration_token.created",
            target_type: "registration_token",
            target_id: token.id.to_string(),
            request_id: caller.request_id(),
            details: serde_json::json!({ "max_uses": max_uses, "ttl_secs": ttl }),
        },
    )
    .await?;
    Ok(HttpResponse::Created().json(RegistrationTokenCreated {
        id: token.id,
        token: secret,
        expires_at: token.expires_at,
        max_uses: token.max_uses,
        labels: token.labels,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct AgentView {
    pub id: uuid::Uuid,
    pub name: String,
    pub status: String,
    pub labels: Vec<String>,
    pub capacity: i32,
    pub version: String,
    pub running_jobs: i64,
    pub last_seen_at: Option<chrono::DateTime<chrono::Utc>>,
    pub connected_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Share of its last 20 finished attempts that succeeded (null: none yet).
    pub success_rate: Option<f64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

async fn view(conn: &mut db::PgConn, agent: Agent) -> ApiResult<AgentView> {
    let (running, success_rate) = db::agents::activity(conn, agent.agent_id()).await?;
    Ok(AgentView {
        id: agent.id,
        name: agent.name,
        status: agent.status,
        labels: agent.labels,
        capacity: agent.capacity,
        version: agent.version,
        running_jobs: running,
        last_seen_at: agent.last_seen_at,
        connected_at: agent.connected_at,
        success_rate,
        created_at: agent.created_at,
    })
}

/// List the org's agents.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents", tag = "agents", params(("org_id" = String, Path)),
    responses((status = 200, body = AgentList)), security(("bearer" = [])))]
pub async fn list_agents(state: web::Data<AppState>, caller: OrgCaller) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let mut agents = Vec::new();
    for agent in db::agents::list(&mut conn, &caller.org).await? {
        agents.push(view(&mut conn, agent).await?);
    }
    Ok(HttpResponse::Ok().json(AgentList { agents }))
}

#[derive(Deserialize)]
pub struct AgentPath {
    pub org_id: String,
    pub agent_id: String,
}

impl AgentPath {
    fn id(&self) -> ApiResult<AgentId> {
        self.agent_id
            .parse()
            .map_err(|_| ApiError::NotFound("agent"))
    }
}

fn agent_not_found(error: db::DbError) -> ApiError {
    match error {
        db::DbError::NotFound => ApiError::NotFound("agent"),
        other => other.into(),
    }
}

/// Show an agent.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents/{agent_id}", tag = "agents",
    params(("org_id" = String, Path), ("agent_id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn get_agent(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<AgentPath>,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let agent = db::agents::get(&mut conn, &caller.org, path.id()?)
        .await
        .map_err(agent_not_found)?;
    Ok(HttpResponse::Ok().json(view(&mut conn, agent).await?))
}

async fn audit(
    conn: &mut db::PgConn,
    caller: &OrgCaller,
    action: &str,
    agent: AgentId,
) -> ApiResult<()> {
    db::audit::record(
        conn,
        db::audit::Record {
            org: &caller.org,
            actor: &caller.actor(),
            action,
            target_type: "agent",
            target_id: agent.to_string(),
            request_id: caller.request_id(),
            details: serde_json::json!({}),
        },
    )
    .await?;
    Ok(())
}

/// Drain an agent: it finishes its jobs and takes no new ones (Admin or `agents:manage`).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/drain", tag = "agents",
    params(("org_id" = String, Path), ("agent_id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn drain_agent(
    state: web::Data<AppState>,
    caller: Authorized<ManageAgents>,
    path: web::Path<AgentPath>,
) -> ApiResult<HttpResponse> {
    let id = path.id()?;
    let mut conn = state.db.conn().await?;
    db::agents::get(&mut conn, &caller.org, id)
        .await
        .map_err(agent_not_found)?;
    let agent = db::agents::set_status(&mut conn, id, AgentStatus::Draining)
        .await
        .map_err(agent_not_found)?;
    audit(&mut conn, &caller, "agent.drained", id).await?;
    state
        .publish(
            Channel::Agent(id),
            &caller.org,
            Event::DrainRequested { agent_id: id },
            caller.request_id(),
        )
        .await;
    Ok(HttpResponse::Ok().json(view(&mut conn, agent).await?))
}

/// Revoke an agent's credential; a connected agent is cut off within a second (Admin or `agents:manage`).
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/agents/{agent_id}", tag = "agents",
    params(("org_id" = String, Path), ("agent_id" = String, Path)),
    responses((status = 204), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn revoke_agent(
    state: web::Data<AppState>,
    caller: Authorized<ManageAgents>,
    path: web::Path<AgentPath>,
) -> ApiResult<HttpResponse> {
    let id = path.id()?;
    let mut conn = state.db.conn().await?;
    db::agents::revoke(&mut conn, &caller.org, id)
        .await
        .map_err(agent_not_found)?;
    audit(&mut conn, &caller, "agent.revoked", id).await?;
    state
        .publish(
            Channel::Agent(id),
            &caller.org,
            Event::AgentRevoked { agent_id: id },
            caller.request_id(),
        )
        .await;
    Ok(HttpResponse::NoContent().finish())
}
