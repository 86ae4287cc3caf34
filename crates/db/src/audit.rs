//! The audit trail: who did what to which resource, when, under which request.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel_async::{AsyncConnectionCore, RunQueryDsl};
use domain::OrgId;
use futures_util::future::Either;
use serde::Serialize;
use uuid::Uuid;

use crate::schema::audit_events;
use crate::{DbResult, PgConn};

#[derive(Clone, Debug, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = audit_events)]
pub struct AuditEvent {
    pub id: Uuid,
    pub org_id: String,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
    pub at: DateTime<Utc>,
}

/// What to record; call inside the transaction that makes the change.
pub struct Record<'a> {
    pub org: &'a OrgId,
    pub actor: &'a str,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: String,
    pub request_id: Option<&'a str>,
    pub details: serde_json::Value,
}

/// An audit row as inserted. `None` is sent as NULL, not `DEFAULT`, so the
/// statement's text is the same for every event and diesel keeps it prepared.
#[derive(Insertable)]
#[diesel(table_name = audit_events, treat_none_as_default_value = false)]
struct NewAuditEvent<'a> {
    id: Uuid,
    org_id: &'a str,
    actor: &'a str,
    action: &'a str,
    target_type: &'a str,
    target_id: String,
    request_id: Option<&'a str>,
    details: serde_json::Value,
}

impl<'a> From<Record<'a>> for NewAuditEvent<'a> {
    fn from(event: Record<'a>) -> Self {
        Self {
            id: Uuid::now_v7(),
            org_id: event.org.as_str(),
            actor: event.actor,
            action: event.action,
            target_type: event.target_type,
            target_id: event.target_id,
            request_id: event.request_id,
            details: event.details,
        }
    }
}

/// Records `event`. The statement is built and handed to the connection
/// when this is called, not when the future is first polled, so it joins a
/// pipeline with the statements issued before it.
pub fn record<'a, C>(conn: &'a mut C, event: Record<'a>) -> impl Future<Output = DbResult<()>> + 'a
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    let insert = diesel::insert_into(audit_events::table)
        .values(NewAuditEvent::from(event))
        .execute(conn);
    async move {
        insert.await?;
        Ok(())
    }
}

/// Records `events` in one statement, built when this is called (as
/// [`record`]'s).
pub fn record_many<'a, C>(
    conn: &'a mut C,
    mut events: Vec<Record<'a>>,
) -> impl Future<Output = DbResult<()>> + 'a
where
    C: AsyncConnectionCore<Backend = Pg> + Send,
{
    // One event keeps `record`'s statement, which diesel keeps prepared; a
    // longer list's text grows with it.
    if events.len() == 1 {
        let event = events.remove(0);
        Either::Left(record(conn, event))
    } else {
        let rows: Vec<NewAuditEvent<'_>> = events.into_iter().map(NewAuditEvent::from).collect();
        let insert = diesel::insert_into(audit_events::table)
            .values(rows)
            .execute(conn);
        Either::Right(async move {
            insert.await?;
            Ok(())
        })
    }
}

/// Newest first, keyset-paged by id.
pub async fn list(
    conn: &mut PgConn,
    org: &OrgId,
    before: Option<Uuid>,
    limit: u32,
) -> DbResult<Vec<AuditEvent>> {
    let mut query = audit_events::table
        .filter(audit_events::org_id.eq(org.as_str()))
        .select(AuditEvent::as_select())
        .into_boxed();
    if let Some(before) = before {
        query = query.filter(audit_events::id.lt(before));
    }
    Ok(query
        .order(audit_events::id.desc())
        .limit(i64::from(limit.max(1)))
        .load(conn)
        .await?)
}
