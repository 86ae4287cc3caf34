//! The audit trail: recorded events list newest first, keyset-paged, per org.

use std::collections::HashSet;

use db::audit::Record;
use diesel_async::AsyncConnection;
use test_support::TestDb;

use crate::support::{self, acme};

#[tokio::test(flavor = "multi_thread")]
async fn audit_events_list_newest_first_in_keyset_pages() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    for i in 0..5 {
        db::audit::record(
            &mut conn,
            Record {
                org: &org,
                actor: "admin@acme",
                action: "job.cancel",
                target_type: "job",
                target_id: format!("job-{i}"),
                request_id: Some("req-9"),
                details: serde_json::json!({"n": i}),
            },
        )
        .await
        .expect("record");
    }
    db::audit::record(
        &mut conn,
        Record {
            org: &globex,
            actor: "admin@globex",
            action: "job.cancel",
            target_type: "job",
            target_id: "theirs".into(),
            request_id: None,
            details: serde_json::json!({}),
        },
    )
    .await
    .expect("record");

    let mut pages = Vec::new();
    let mut before = None;
    loop {
        assert!(pages.len() < 10, "paging does not terminate");
        let page = db::audit::list(&mut conn, &org, before, 2)
            .await
            .expect("list");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        pages.push(page);
    }

    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let events: Vec<_> = pages.into_iter().flatten().collect();
    let targets: Vec<_> = events.iter().map(|e| e.target_id.as_str()).collect();
    assert_eq!(
        targets,
        ["job-4", "job-3", "job-2", "job-1", "job-0"],
        "newest first"
    );
    let ids: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 5);
    let newest = &events[0];
    assert_eq!(newest.org_id, "acme");
    assert_eq!(newest.actor, "admin@acme");
    assert_eq!(newest.action, "job.cancel");
    assert_eq!(newest.target_type, "job");
    assert_eq!(newest.request_id.as_deref(), Some("req-9"));
    assert_eq!(newest.details, serde_json::json!({"n": 4}));
    assert!(events.windows(2).all(|w| w[0].at >= w[1].at));
    let theirs = db::audit::list(&mut conn, &globex, None, 10)
        .await
        .expect("list");
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].target_id, "theirs");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_audit_event_recorded_in_a_rolled_back_transaction_is_not_kept() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;

    let result: Result<(), db::DbError> = conn
        .transaction(async |c| {
            db::audit::record(
                c,
                Record {
                    org: &org,
                    actor: "admin@acme",
                    action: "repository.delete",
                    target_type: "repository",
                    target_id: "web".into(),
                    request_id: None,
                    details: serde_json::json!({}),
                },
            )
            .await?;
            Err(db::DbError::NotFound)
        })
        .await;

    assert!(result.is_err());
    assert!(
        db::audit::list(&mut conn, &org, None, 10)
            .await
            .expect("list")
            .is_empty()
    );
}
