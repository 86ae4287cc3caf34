//! Repositories: CRUD with a per-repository concurrency limit.

use actix_web::{HttpResponse, web};
use db::repositories::Repository;
use domain::RepositoryId;
use domain::org::RepositorySpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::caller::{Authorized, ManageRepositories, OrgCaller};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/orgs/{org_id}/repositories",
        web::post().to(create_repository),
    )
    .route(
        "/orgs/{org_id}/repositories",
        web::get().to(list_repositories),
    )
    .route(
        "/orgs/{org_id}/repositories/{repository_id}",
        web::get().to(get_repository),
    )
    .route(
        "/orgs/{org_id}/repositories/{repository_id}",
        web::patch().to(update_repository),
    )
    .route(
        "/orgs/{org_id}/repositories/{repository_id}",
        web::delete().to(delete_repository),
    );
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepositoryBody {
    pub name: String,
    pub url: Option<String>,
    /// Most jobs of this repository running at once; null = unlimited.
    pub max_concurrent_jobs: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct RepositoryView {
    pub id: uuid::Uuid,
    pub name: String,
    pub url: Option<String>,
    pub max_concurrent_jobs: Option<i32>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<Repository> for RepositoryView {
    fn from(r: Repository) -> Self {
        Self {
            id: r.id,
            name: r.name,
            url: r.url,
            max_concurrent_jobs: r.max_concurrent_jobs,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct RepositoryList {
    pub repositories: Vec<RepositoryView>,
}

#[derive(Deserialize)]
pub struct RepositoryPath {
    pub org_id: String,
    pub repository_id: String,
}

impl RepositoryPath {
    fn id(&self) -> ApiResult<RepositoryId> {
        self.repository_id
            .parse()
            .map_err(|_| ApiError::NotFound("repository"))
    }
}

fn spec(body: RepositoryBody) -> RepositorySpec {
    RepositorySpec {
        name: body.name,
        url: body.url,
        max_concurrent_jobs: body.max_concurrent_jobs,
    }
}

fn conflict_is_name(error: db::DbError) -> ApiError {
    match error {
        db::DbError::Conflict(_) => ApiError::Conflict("a repository with this name exists".into()),
        db::DbError::NotFound => ApiError::NotFound("repository"),
        other => other.into(),
    }
}

/// Create a repository (Admin).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/repositories", tag = "repositories", params(("org_id" = String, Path)),
    request_body = RepositoryBody,
    responses((status = 201, body = RepositoryView), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create_repository(
    state: web::Data<AppState>,
    caller: Authorized<ManageRepositories>,
    body: web::Json<RepositoryBody>,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let repo = db::repositories::create(&mut conn, &caller.org, &spec(body.into_inner()))
        .await
        .map_err(conflict_is_name)?;
    Ok(HttpResponse::Created().json(RepositoryView::from(repo)))
}

/// List repositories.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/repositories", tag = "repositories", params(("org_id" = String, Path)),
    responses((status = 200, body = RepositoryList)), security(("bearer" = [])))]
pub async fn list_repositories(
    state: web::Data<AppState>,
    caller: OrgCaller,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let repositories = db::repositories::list(&mut conn, &caller.org).await?;
    Ok(HttpResponse::Ok().json(RepositoryList {
        repositories: repositories.into_iter().map(RepositoryView::from).collect(),
    }))
}

/// Show a repository.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/repositories/{repository_id}", tag = "repositories",
    params(("org_id" = String, Path), ("repository_id" = String, Path)),
    responses((status = 200, body = RepositoryView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn get_repository(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<RepositoryPath>,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let repo = db::repositories::get(&mut conn, &caller.org, path.id()?)
        .await
        .map_err(conflict_is_name)?;
    Ok(HttpResponse::Ok().json(RepositoryView::from(repo)))
}

/// Replace a repository's name, URL and limit (Admin).
#[utoipa::path(patch, path = "/v1/orgs/{org_id}/repositories/{repository_id}", tag = "repositories",
    params(("org_id" = String, Path), ("repository_id" = String, Path)), request_body = RepositoryBody,
    responses((status = 200, body = RepositoryView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn update_repository(
    state: web::Data<AppState>,
    caller: Authorized<ManageRepositories>,
    path: web::Path<RepositoryPath>,
    body: web::Json<RepositoryBody>,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let repo =
        db::repositories::update(&mut conn, &caller.org, path.id()?, &spec(body.into_inner()))
            .await
            .map_err(conflict_is_name)?;
    Ok(HttpResponse::Ok().json(RepositoryView::from(repo)))
}

/// Delete a repository (Admin). Its jobs stay, without a repository.
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/repositories/{repository_id}", tag = "repositories",
    params(("org_id" = String, Path), ("repository_id" = String, Path)),
    responses((status = 204), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn delete_repository(
    state: web::Data<AppState>,
    caller: Authorized<ManageRepositories>,
    path: web::Path<RepositoryPath>,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    db::repositories::delete(&mut conn, &caller.org, path.id()?)
        .await
        .map_err(conflict_is_name)?;
    Ok(HttpResponse::NoContent().finish())
}
