//! Dead letters, the audit trail and the system summary.

use actix_web::{HttpResponse, web};
use db::jobs::ListFilter;
use db::leases::OperatorAction;
use domain::job::JobStatus;
use domain::validation::limits;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::caller::{Caller, OrgCaller};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::views::{JobPage, JobView};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/orgs/{org_id}/dead-letters",
        web::get().to(list_dead_letters),
    )
    .route(
        "/orgs/{org_id}/dead-letters/{job_id}/redrive",
        web::post().to(redrive_dead_letter),
    )
    .route("/orgs/{org_id}/audit", web::get().to(list_audit_events))
    .route("/system", web::get().to(get_system));
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub cursor: Option<Uuid>,
    /// 1..=500, default 50.
    pub limit: Option<u32>,
}

impl PageQuery {
    fn limit(&self) -> ApiResult<u32> {
        let limit = self.limit.unwrap_or(limits::PAGE_SIZE_DEFAULT);
        if limit == 0 || limit > limits::PAGE_SIZE_MAX {
            return Err(ApiError::invalid(
                "limit",
                format!("must be 1 to {}", limits::PAGE_SIZE_MAX),
            ));
        }
        Ok(limit)
    }
}

/// Jobs whose retry budget is spent, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/dead-letters", tag = "jobs", params(("org_id" = String, Path), PageQuery),
    responses((status = 200, body = JobPage)), security(("bearer" = [])))]
pub async fn list_dead_letters(
    state: web::Data<AppState>,
    caller: OrgCaller,
    query: web::Query<PageQuery>,
) -> ApiResult<HttpResponse> {
    let limit = query.limit()?;
    let mut conn = state.db.conn().await?;
    let mut jobs = db::jobs::list(
        &mut conn,
        &caller.org,
        &ListFilter {
            status: Some(JobStatus::Dead),
            before: query.cursor.map(domain::JobId),
            limit: limit + 1,
            ..ListFilter::default()
        },
    )
    .await?;
    let next_cursor = (jobs.len() > limit as usize).then(|| {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id)
    });
    Ok(HttpResponse::Ok().json(JobPage {
        items: jobs.iter().map(JobView::from).collect(),
        next_cursor: next_cursor.flatten(),
    }))
}

#[derive(Deserialize)]
pub struct DeadLetterPath {
    pub org_id: String,
    pub job_id: String,
}

/// Take a job out of the dead letters and queue it again with a fresh budget.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/dead-letters/{job_id}/redrive", tag = "jobs",
    params(("org_id" = String, Path), ("job_id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn redrive_dead_letter(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<DeadLetterPath>,
) -> ApiResult<HttpResponse> {
    let id = crate::routes::jobs::job_id_param(&path.job_id)?;
    crate::routes::jobs::act(&state, &caller, id, OperatorAction::Redrive).await
}

#[derive(Serialize, ToSchema)]
pub struct AuditEventView {
    pub id: Uuid,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub request_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub at: chrono::DateTime<chrono::Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEventView>,
    pub next_cursor: Option<Uuid>,
}

/// The audit trail, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/audit", tag = "audit", params(("org_id" = String, Path), PageQuery),
    responses((status = 200, body = AuditPage)), security(("bearer" = [])))]
pub async fn list_audit_events(
    state: web::Data<AppState>,
    caller: OrgCaller,
    query: web::Query<PageQuery>,
) -> ApiResult<HttpResponse> {
    let limit = query.limit()?;
    let mut conn = state.db.conn().await?;
    let mut events = db::audit::list(&mut conn, &caller.org, query.cursor, limit + 1).await?;
    let next_cursor = if events.len() > limit as usize {
        events.truncate(limit as usize);
        events.last().map(|e| e.id)
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(AuditPage {
        items: events
            .into_iter()
            .map(|e| AuditEventView {
                id: e.id,
                actor: e.actor,
                action: e.action,
                target_type: e.target_type,
                target_id: e.target_id,
                request_id: e.request_id,
                details: e.details,
                at: e.at,
            })
            .collect(),
        next_cursor,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct SystemView {
    pub version: String,
    pub git_commit: String,
    pub auth_modes: Vec<String>,
    pub connected_agents: i64,
    #[schema(value_type = Object)]
    pub limits: serde_json::Value,
}

/// Version, auth modes, limits and connected agents (any authenticated user).
#[utoipa::path(get, path = "/v1/system", tag = "system",
    responses((status = 200, body = SystemView), (status = 401, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn get_system(state: web::Data<AppState>, _caller: Caller) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let connected_agents = db::agents::online_count(&mut conn).await?;
    Ok(HttpResponse::Ok().json(SystemView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: service_kit::GIT_COMMIT.to_owned(),
        auth_modes: state
            .verifier
            .modes()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        connected_agents,
        limits: serde_json::json!({
            "body_bytes": crate::BODY_LIMIT_BYTES,
            "batch_max_jobs": limits::BATCH_MAX_JOBS,
            "page_size_max": limits::PAGE_SIZE_MAX,
            "prompt_max_bytes": limits::PROMPT_MAX_BYTES,
            "command_max_bytes": limits::COMMAND_MAX_BYTES,
            "labels_max": limits::LABELS_MAX,
        }),
    }))
}
