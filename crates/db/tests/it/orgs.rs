//! Organizations and their settings.

use db::DbError;
use db::schema::orgs;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use domain::job::QueueName;
use domain::org::{ApprovalPolicy, OrgSettings};
use domain::retry::RetryPolicy;
use domain::{AgentId, DomainError};
use test_support::TestDb;

use crate::support::{self, acme, create, job};

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).expect("queue name")
}

fn custom_settings() -> OrgSettings {
    OrgSettings {
        max_concurrent_jobs: Some(25),
        default_retry_policy: RetryPolicy {
            initial_interval_ms: 250,
            backoff_coefficient: 1.5,
            maximum_interval_ms: 60_000,
            maximum_attempts: 7,
            maximum_infrastructure_attempts: 4,
            non_retryable_error_kinds: vec!["bad_input".into()],
        },
        default_queue: queue("nightly"),
        approval_policy: ApprovalPolicy::Always,
        queue_precedence: vec![queue("hotfix"), QueueName::rework(), QueueName::backlog()],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_are_the_defaults_until_saved() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let never_created = support::org_id("ghost");

    assert_eq!(
        db::orgs::settings(&mut conn, &org).await.expect("settings"),
        OrgSettings::default()
    );
    assert_eq!(
        db::orgs::settings(&mut conn, &never_created)
            .await
            .expect("settings"),
        OrgSettings::default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn updated_settings_are_persisted_and_can_be_updated_again() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let first = custom_settings();

    db::orgs::update_settings(&mut conn, &org, &first)
        .await
        .expect("save");

    assert_eq!(
        db::orgs::settings(&mut conn, &org).await.expect("settings"),
        first
    );
    assert_eq!(
        db::orgs::settings(&mut conn, &globex)
            .await
            .expect("settings"),
        OrgSettings::default(),
        "settings belong to one org"
    );
    let second = OrgSettings {
        max_concurrent_jobs: None,
        approval_policy: ApprovalPolicy::PerJob,
        ..first
    };
    db::orgs::update_settings(&mut conn, &org, &second)
        .await
        .expect("save again");
    assert_eq!(
        db::orgs::settings(&mut conn, &org).await.expect("settings"),
        second
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_settings_are_refused_and_nothing_changes() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let invalid = OrgSettings {
        max_concurrent_jobs: Some(0),
        ..custom_settings()
    };

    let result = db::orgs::update_settings(&mut conn, &org, &invalid).await;

    assert!(
        matches!(result, Err(DbError::Domain(DomainError::Invalid(_)))),
        "got {result:?}"
    );
    assert_eq!(
        db::orgs::settings(&mut conn, &org).await.expect("settings"),
        OrgSettings::default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_queue_precedence_reranks_waiting_jobs_only() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let in_queue = |name: &str| {
        let mut new = job(name);
        new.queue = queue(name);
        new
    };
    let mut pending = in_queue("nightly");
    pending.requires_approval = true;
    let jobs = create(
        &mut conn,
        &org,
        &[
            in_queue("rework"),
            in_queue("backlog"),
            in_queue("nightly"),
            pending,
            in_queue("rework"),
        ],
    )
    .await;
    let theirs = support::create_one(&mut conn, &globex, in_queue("nightly")).await;
    let running = jobs[4].job_id();
    support::lease_and_start(&mut conn, running, AgentId::new()).await;
    let ranks_before: Vec<i16> = jobs.iter().map(|j| j.queue_rank).collect();
    assert_eq!(
        ranks_before,
        [0, 1, 2, 2, 0],
        "default precedence: rework, backlog, then the rest"
    );

    let settings = OrgSettings {
        queue_precedence: vec![queue("nightly"), QueueName::backlog()],
        ..OrgSettings::default()
    };
    db::orgs::update_settings(&mut conn, &org, &settings)
        .await
        .expect("save");

    let mut ranks = Vec::new();
    for job in &jobs {
        ranks.push(support::reload(&mut conn, job.job_id()).await.queue_rank);
    }
    assert_eq!(
        ranks,
        [2, 1, 0, 0, 0],
        "queued and pending jobs follow the new order; the running job keeps its rank"
    );
    for job in &jobs[..4] {
        let expected = settings.queue_rank(&queue(&job.queue));
        assert_eq!(
            support::reload(&mut conn, job.job_id()).await.queue_rank,
            expected
        );
    }
    assert_eq!(
        support::reload(&mut conn, theirs.job_id()).await.queue_rank,
        2,
        "another org's jobs keep their ranks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_org_is_idempotent_and_keeps_a_known_name() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = support::org_id("acme");
    let name = async |conn: &mut db::PgConn| -> Option<String> {
        orgs::table
            .find("acme")
            .select(orgs::name)
            .first(conn)
            .await
            .expect("org row")
    };

    db::orgs::ensure_org(&mut conn, &org, None)
        .await
        .expect("create");
    let unnamed = name(&mut conn).await;
    db::orgs::ensure_org(&mut conn, &org, Some("Acme Corp"))
        .await
        .expect("name");
    let named = name(&mut conn).await;
    db::orgs::ensure_org(&mut conn, &org, None)
        .await
        .expect("again");
    let kept = name(&mut conn).await;
    db::orgs::ensure_org(&mut conn, &org, Some("Acme Inc"))
        .await
        .expect("rename");
    let renamed = name(&mut conn).await;

    assert_eq!(unnamed, None);
    assert_eq!(named.as_deref(), Some("Acme Corp"));
    assert_eq!(kept.as_deref(), Some("Acme Corp"));
    assert_eq!(renamed.as_deref(), Some("Acme Inc"));
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM orgs").await,
        1
    );
}
