//! Repositories: named groups of jobs with their own concurrency limit.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use domain::org::RepositorySpec;
use domain::{OrgId, RepositoryId};
use serde::Serialize;
use uuid::Uuid;

use crate::schema::repositories;
use crate::{DbError, DbResult, PgConn};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = repositories)]
pub struct Repository {
    pub id: Uuid,
    pub org_id: String,
    pub name: String,
    pub url: Option<String>,
    pub max_concurrent_jobs: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn create(conn: &mut PgConn, org: &OrgId, spec: &RepositorySpec) -> DbResult<Repository> {
    spec.validate()?;
    Ok(diesel::insert_into(repositories::table)
        .values((
            repositories::id.eq(RepositoryId::new().as_uuid()),
            repositories::org_id.eq(org.as_str()),
            repositories::name.eq(&spec.name),
            repositories::url.eq(&spec.url),
            repositories::max_concurrent_jobs.eq(spec.max_concurrent_jobs.map(|n| n as i32)),
        ))
        .returning(Repository::as_returning())
        .get_result(conn)
        .await?)
}

/// Scoped by org: another org's repository is simply not found.
pub async fn get(conn: &mut PgConn, org: &OrgId, id: RepositoryId) -> DbResult<Repository> {
    Ok(repositories::table
        .filter(repositories::org_id.eq(org.as_str()))
        .filter(repositories::id.eq(id.as_uuid()))
        .select(Repository::as_select())
        .first(conn)
        .await?)
}

pub async fn list(conn: &mut PgConn, org: &OrgId) -> DbResult<Vec<Repository>> {
    Ok(repositories::table
        .filter(repositories::org_id.eq(org.as_str()))
        .order(repositories::name.asc())
        .select(Repository::as_select())
        .load(conn)
        .await?)
}

pub async fn update(
    conn: &mut PgConn,
    org: &OrgId,
    id: RepositoryId,
    spec: &RepositorySpec,
) -> DbResult<Repository> {
    spec.validate()?;
    Ok(diesel::update(
        repositories::table
            .filter(repositories::org_id.eq(org.as_str()))
            .filter(repositories::id.eq(id.as_uuid())),
    )
    .set((
        repositories::name.eq(&spec.name),
        repositories::url.eq(&spec.url),
        repositories::max_concurrent_jobs.eq(spec.max_concurrent_jobs.map(|n| n as i32)),
        repositories::updated_at.eq(diesel::dsl::now),
    ))
    .returning(Repository::as_returning())
    .get_result(conn)
    .await?)
}

pub async fn delete(conn: &mut PgConn, org: &OrgId, id: RepositoryId) -> DbResult<()> {
    let deleted = diesel::delete(
        repositories::table
            .filter(repositories::org_id.eq(org.as_str()))
            .filter(repositories::id.eq(id.as_uuid())),
    )
    .execute(conn)
    .await?;
    if deleted == 0 {
        return Err(DbError::NotFound);
    }
    Ok(())
}
