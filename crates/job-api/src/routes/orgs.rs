//! The caller's organizations and their settings.

use actix_web::{HttpResponse, web};
use domain::job::QueueName;
use domain::org::{ApprovalPolicy, OrgSettings};
use domain::retry::RetryPolicy;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::caller::{Authorized, Caller, ManageSettings, OrgCaller};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/orgs", web::get().to(list_orgs))
        .route("/orgs/{org_id}/settings", web::get().to(get_settings))
        .route("/orgs/{org_id}/settings", web::patch().to(update_settings));
}

#[derive(Serialize, ToSchema)]
pub struct OrgView {
    pub org_id: String,
    pub org_name: Option<String>,
    pub role: String,
    pub permissions: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct OrgList {
    pub orgs: Vec<OrgView>,
}

/// The organizations the token is a member of.
#[utoipa::path(get, path = "/v1/orgs", tag = "orgs",
    responses((status = 200, body = OrgList), (status = 401, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn list_orgs(caller: Caller) -> HttpResponse {
    HttpResponse::Ok().json(OrgList {
        orgs: caller
            .principal
            .orgs
            .values()
            .map(|m| OrgView {
                org_id: m.org_id.to_string(),
                org_name: m.org_name.clone(),
                role: m.role.as_str().to_owned(),
                permissions: m.permissions.clone(),
            })
            .collect(),
    })
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SettingsView {
    /// Most jobs of the org running at once; null = unlimited.
    pub max_concurrent_jobs: Option<u32>,
    #[schema(value_type = Object)]
    pub default_retry_policy: RetryPolicy,
    pub default_queue: String,
    /// `per_job` or `always`.
    pub approval_policy: String,
    /// Queues in service order.
    pub queue_precedence: Vec<String>,
}

impl From<OrgSettings> for SettingsView {
    fn from(s: OrgSettings) -> Self {
        Self {
            max_concurrent_jobs: s.max_concurrent_jobs,
            default_retry_policy: s.default_retry_policy,
            default_queue: s.default_queue.to_string(),
            approval_policy: s.approval_policy.as_str().to_owned(),
            queue_precedence: s.queue_precedence.iter().map(|q| q.to_string()).collect(),
        }
    }
}

/// A partial update: only the fields present change. `max_concurrent_jobs: null` removes the limit.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<u32>)]
    pub max_concurrent_jobs: Option<Option<u32>>,
    #[schema(value_type = Option<Object>)]
    pub default_retry_policy: Option<RetryPolicy>,
    pub default_queue: Option<String>,
    pub approval_policy: Option<String>,
    pub queue_precedence: Option<Vec<String>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(deserializer).map(Some)
    }

    pub fn serialize<S, T>(value: &Option<Option<T>>, serializer: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Serialize,
    {
        value.serialize(serializer)
    }
}

/// The org's settings.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/settings", tag = "orgs", params(("org_id" = String, Path)),
    responses((status = 200, body = SettingsView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn get_settings(
    state: web::Data<AppState>,
    caller: OrgCaller,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    Ok(HttpResponse::Ok().json(SettingsView::from(
        db::orgs::settings(&mut conn, &caller.org).await?,
    )))
}

/// Change the org's settings (Admin).
#[utoipa::path(patch, path = "/v1/orgs/{org_id}/settings", tag = "orgs", params(("org_id" = String, Path)),
    request_body = SettingsPatch,
    responses((status = 200, body = SettingsView), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn update_settings(
    state: web::Data<AppState>,
    caller: Authorized<ManageSettings>,
    patch: web::Json<SettingsPatch>,
) -> ApiResult<HttpResponse> {
    let patch = patch.into_inner();
    let mut conn = state.db.conn().await?;
    let mut settings = db::orgs::settings(&mut conn, &caller.org).await?;
    if let Some(max) = patch.max_concurrent_jobs {
        settings.max_concurrent_jobs = max;
    }
    if let Some(policy) = patch.default_retry_policy.clone() {
        settings.default_retry_policy = policy;
    }
    if let Some(queue) = &patch.default_queue {
        settings.default_queue = QueueName::parse(queue.clone())
            .map_err(|e| ApiError::invalid("default_queue", e.message))?;
    }
    if let Some(policy) = &patch.approval_policy {
        settings.approval_policy = ApprovalPolicy::parse(policy)
            .ok_or_else(|| ApiError::invalid("approval_policy", "must be per_job or always"))?;
    }
    if let Some(queues) = &patch.queue_precedence {
        settings.queue_precedence = queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                QueueName::parse(q.clone())
                    .map_err(|e| ApiError::invalid(&format!("queue_precedence[{i}]"), e.message))
            })
            .collect::<ApiResult<_>>()?;
    }
    db::orgs::update_settings(&mut conn, &caller.org, &settings).await?;
    state.forget_settings(&caller.org);
    db::audit::record(
        &mut conn,
        db::audit::Record {
            org: &caller.org,
            actor: &caller.actor(),
            action: "settings.changed",
            target_type: "org",
            target_id: caller.org.to_string(),
            request_id: caller.request_id(),
            details: serde_json::to_value(&patch).unwrap_or_default(),
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(SettingsView::from(settings)))
}
