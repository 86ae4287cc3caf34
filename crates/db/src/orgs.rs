//! Organizations and their settings. Membership comes from the identity
//! provider's token; the row is created on first use.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::{AsyncConnection, RunQueryDsl};
use domain::OrgId;
use domain::job::QueueName;
use domain::org::{ApprovalPolicy, OrgSettings};
use domain::retry::RetryPolicy;

use crate::cached::CacheStatement;
use crate::schema::{jobs, org_settings, orgs};
use crate::{DbResult, PgConn};

/// Makes sure the org exists (idempotent), refreshing its display name.
pub async fn ensure_org(conn: &mut PgConn, org: &OrgId, name: Option<&str>) -> DbResult<()> {
    diesel::insert_into(orgs::table)
        .values((orgs::id.eq(org.as_str()), orgs::name.eq(name)))
        .on_conflict(orgs::id)
        .do_update()
        .set(orgs::name.eq(diesel::dsl::sql::<
            diesel::sql_types::Nullable<diesel::sql_types::Text>,
        >("COALESCE(excluded.name, orgs.name)")))
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = org_settings)]
struct SettingsRow {
    max_concurrent_jobs: Option<i32>,
    default_retry_policy: serde_json::Value,
    default_queue: String,
    approval_policy: String,
    queue_precedence: Vec<String>,
}

impl SettingsRow {
    fn into_domain(self) -> OrgSettings {
        let defaults = OrgSettings::default();
        OrgSettings {
            max_concurrent_jobs: self.max_concurrent_jobs.map(|n| n as u32),
            default_retry_policy: serde_json::from_value::<RetryPolicy>(self.default_retry_policy)
                .unwrap_or(defaults.default_retry_policy),
            default_queue: QueueName::parse(self.default_queue).unwrap_or(defaults.default_queue),
            approval_policy: ApprovalPolicy::parse(&self.approval_policy)
                .unwrap_or(defaults.approval_policy),
            queue_precedence: self
                .queue_precedence
                .into_iter()
                .filter_map(|q| QueueName::parse(q).ok())
                .collect(),
        }
    }
}

/// The org's settings, or the defaults if none were ever saved.
pub async fn settings(conn: &mut PgConn, org: &OrgId) -> DbResult<OrgSettings> {
    Ok(versioned_settings(conn, org).await?.settings)
}

/// An org's settings with the version they were read at, so a copy kept
/// in a cache can be checked inside a later write (see
/// [`SettingsVersion::Cached`]).
#[derive(Clone, Debug, PartialEq)]
pub struct VersionedSettings {
    pub settings: OrgSettings,
    /// `updated_at` of the row; `None` for an org that never saved any.
    pub updated_at: Option<DateTime<Utc>>,
}

/// Which settings a write was prepared with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SettingsVersion {
    /// Read for this write: nothing to check.
    Current,
    /// From a cache: the write first checks, in its own transaction, that
    /// the stored settings are still these, and fails with
    /// [`DbError::StaleSettings`](crate::DbError::StaleSettings) otherwise.
    Cached(Option<DateTime<Utc>>),
}

pub async fn versioned_settings(conn: &mut PgConn, org: &OrgId) -> DbResult<VersionedSettings> {
    let row = org_settings::table
        .find(org.as_str())
        .select((SettingsRow::as_select(), org_settings::updated_at))
        .first(conn)
        .await
        .optional()?;
    Ok(match row {
        Some((row, updated_at)) => VersionedSettings {
            settings: row.into_domain(),
            updated_at: Some(updated_at),
        },
        None => VersionedSettings {
            settings: OrgSettings::default(),
            updated_at: None,
        },
    })
}

/// Whether the org's stored settings are still at `updated_at`: a
/// statement for a pipeline inside the write's transaction.
pub(crate) fn settings_unchanged<'a>(
    conn: &'a diesel_async::AsyncPgConnection,
    org: &'a OrgId,
    updated_at: Option<DateTime<Utc>>,
) -> impl std::future::Future<Output = DbResult<bool>> + 'a {
    let mut conn = conn;
    #[derive(QueryableByName)]
    struct Unchanged {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        unchanged: bool,
    }
    let statement = diesel::sql_query(
        "SELECT (SELECT updated_at FROM org_settings WHERE org_id = $1) \
                IS NOT DISTINCT FROM $2 AS unchanged",
    )
    .bind::<diesel::sql_types::Text, _>(org.as_str())
    .bind::<diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>, _>(updated_at)
    .cached()
    .get_result::<Unchanged>(&mut conn);
    async move { Ok(statement.await?.unchanged) }
}

/// Saves the settings and re-ranks the org's queued jobs if the queue
/// precedence changed, in one transaction.
pub async fn update_settings(conn: &mut PgConn, org: &OrgId, new: &OrgSettings) -> DbResult<()> {
    new.validate()?;
    let org_id = org.as_str().to_owned();
    let new = new.clone();
    conn.transaction(async |conn| {
        let precedence: Vec<String> = new.queue_precedence.iter().map(|q| q.to_string()).collect();
        let policy = serde_json::to_value(&new.default_retry_policy)
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        diesel::insert_into(org_settings::table)
            .values((
                org_settings::org_id.eq(&org_id),
                org_settings::max_concurrent_jobs.eq(new.max_concurrent_jobs.map(|n| n as i32)),
                org_settings::default_retry_policy.eq(&policy),
                org_settings::default_queue.eq(new.default_queue.as_str()),
                org_settings::approval_policy.eq(new.approval_policy.as_str()),
                org_settings::queue_precedence.eq(&precedence),
            ))
            .on_conflict(org_settings::org_id)
            .do_update()
            .set((
                org_settings::max_concurrent_jobs.eq(excluded(org_settings::max_concurrent_jobs)),
                org_settings::default_retry_policy.eq(excluded(org_settings::default_retry_policy)),
                org_settings::default_queue.eq(excluded(org_settings::default_queue)),
                org_settings::approval_policy.eq(excluded(org_settings::approval_policy)),
                org_settings::queue_precedence.eq(excluded(org_settings::queue_precedence)),
                org_settings::updated_at.eq(diesel::dsl::now),
            ))
            .execute(conn)
            .await?;
        // Keep the ready index's queue order in step with the settings.
        diesel::sql_query(
            "UPDATE jobs SET queue_rank = COALESCE(array_position($2, queue), cardinality($2) + 1) - 1 \
             WHERE org_id = $1 AND status IN ('queued', 'pending_approval') \
             AND queue_rank <> COALESCE(array_position($2, queue), cardinality($2) + 1) - 1",
        )
        .bind::<diesel::sql_types::Text, _>(&org_id)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&precedence)
        .execute(conn)
        .await?;
        Ok::<_, crate::DbError>(())
    })
    .await
}

/// Whether the org has any jobs at all (used by tests and stats).
pub async fn job_count(conn: &mut PgConn, org: &OrgId) -> DbResult<i64> {
    Ok(jobs::table
        .filter(jobs::org_id.eq(org.as_str()))
        .count()
        .get_result(conn)
        .await?)
}
