//! Creating, reading and listing jobs: batches are all or nothing,
//! idempotency keys replay, orgs are isolated, and keyset pages are stable.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use db::DbError;
use db::jobs::{Idempotency, ListFilter};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use domain::job::{JobStatus, Labels, QueueName};
use domain::org::{ApprovalPolicy, OrgSettings, RepositorySpec};
use domain::{AgentId, DomainError, JobId, RepositoryId};
use test_support::TestDb;
use uuid::Uuid;

use crate::support::{self, ACK, acme, context, create, create_one, job};

fn command_of(job: &db::jobs::Job) -> String {
    job.payload["command"]
        .as_str()
        .expect("command payload")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_jobs_stores_a_queued_job_with_every_field() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = support::with_key(job("make test"), "deploy", 2);
    new.queue = QueueName::rework();
    new.priority = 7;
    new.required_labels = Labels::new(["gpu", "os=linux"]);
    new.metadata = serde_json::json!({"ticket": "SW-1"});
    new.timeouts.run_timeout_ms = Some(60_000);
    new.timeouts.deadline_ms = Some(3_600_000);
    let before = Utc::now();

    let created = create_one(&mut conn, &org, new).await;

    assert_eq!(created.org_id, "acme");
    assert_eq!(created.status(), JobStatus::Queued);
    assert_eq!(created.queue, "rework");
    assert_eq!(
        created.queue_rank, 0,
        "rework is first in the default precedence"
    );
    assert_eq!(created.priority, 7);
    assert_eq!(created.required_labels, ["gpu", "os=linux"]);
    assert_eq!(created.concurrency_key.as_deref(), Some("deploy"));
    assert_eq!(created.concurrency_limit, Some(2));
    assert_eq!(created.payload["command"], "make test");
    assert_eq!(created.metadata, serde_json::json!({"ticket": "SW-1"}));
    assert_eq!(created.run_timeout_ms, Some(60_000));
    assert_eq!(created.lease_epoch, 0);
    assert_eq!((created.app_failures, created.infra_failures), (0, 0));
    assert_eq!(created.created_by.as_deref(), Some("tester"));
    assert_eq!(created.request_id.as_deref(), Some("req-1"));
    assert!(!created.requires_approval);
    assert!(created.queued_at.is_some());
    assert!(created.agent_id.is_none());
    let deadline = created.deadline_at.expect("deadline set");
    support::assert_between(
        deadline,
        before + support::secs(3_600),
        Utc::now() + support::secs(3_600),
    );
    assert_eq!(
        db::jobs::get(&mut conn, &org, created.job_id())
            .await
            .expect("get"),
        created
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_policy_is_stored_as_its_changes_from_the_defaults_and_read_back_whole() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut custom = job("flaky");
    custom.retry_policy.maximum_attempts = 5;
    custom.retry_policy.non_retryable_error_kinds = vec!["config".to_owned()];

    let plain = create_one(&mut conn, &org, job("make")).await;
    let changed = create_one(&mut conn, &org, custom.clone()).await;

    assert_eq!(plain.retry_policy, serde_json::json!({}));
    assert_eq!(plain.retry_policy(), domain::retry::RetryPolicy::default());
    assert_eq!(
        changed.retry_policy,
        serde_json::json!({"maximum_attempts": 5, "non_retryable_error_kinds": ["config"]})
    );
    assert_eq!(changed.retry_policy(), custom.retry_policy);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_jobs_inserts_a_batch_of_a_thousand_in_request_order() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let batch: Vec<_> = (0..1000).map(|i| job(&format!("echo {i}"))).collect();

    let created = create(&mut conn, &org, &batch).await;

    assert_eq!(created.len(), 1000);
    for (i, job) in created.iter().enumerate() {
        assert_eq!(command_of(job), format!("echo {i}"));
    }
    let ids: HashSet<Uuid> = created.iter().map(|j| j.id).collect();
    assert_eq!(ids.len(), 1000);
    assert!(
        created.windows(2).all(|w| w[0].id < w[1].id),
        "ids are time-ordered"
    );
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        1000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_invalid_job_in_a_batch_inserts_nothing() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut batch: Vec<_> = (0..10).map(|i| job(&format!("echo {i}"))).collect();
    batch[6].priority = 1_000_000;
    let settings = OrgSettings::default();

    let result = db::jobs::create_jobs(&mut conn, &context(&org, &settings), &batch, None).await;

    match result {
        Err(DbError::Domain(DomainError::Invalid(errors))) => {
            assert_eq!(errors[0].field, "priority");
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_error_mid_batch_rolls_back_the_whole_batch() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    // The bad row is in the second 500-row chunk: whether the ownership
    // check or the foreign key refuses it, nothing may remain.
    let mut batch: Vec<_> = (0..800).map(|i| job(&format!("echo {i}"))).collect();
    batch[700].repository_id = Some(RepositoryId::new());
    let settings = OrgSettings::default();
    let idem = || Idempotency {
        key: "batch-1",
        request_hash: vec![1; 32],
    };

    let result =
        db::jobs::create_jobs(&mut conn, &context(&org, &settings), &batch, Some(idem())).await;

    assert!(
        matches!(
            result,
            Err(DbError::Domain(domain::DomainError::Invalid(_)))
                | Err(DbError::Query(DieselError::DatabaseError(
                    DatabaseErrorKind::ForeignKeyViolation,
                    _
                )))
        ),
        "expected a foreign key violation, got {result:?}"
    );
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        0
    );
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM idempotency_keys").await,
        0,
        "the failed request must not claim its idempotency key"
    );

    // The key is free: the corrected request creates the jobs.
    batch[700].repository_id = None;
    let retried = db::jobs::create_jobs(&mut conn, &context(&org, &settings), &batch, Some(idem()))
        .await
        .expect("corrected batch");
    assert!(!retried.replayed);
    assert_eq!(retried.jobs.len(), 800);
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        800
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_and_body_replays_the_first_jobs() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let batch: Vec<_> = (0..3).map(|i| job(&format!("echo {i}"))).collect();
    let settings = OrgSettings::default();
    let idem = || Idempotency {
        key: "key-1",
        request_hash: vec![7; 32],
    };

    let first = db::jobs::create_jobs(&mut conn, &context(&org, &settings), &batch, Some(idem()))
        .await
        .expect("first");
    let second = db::jobs::create_jobs(&mut conn, &context(&org, &settings), &batch, Some(idem()))
        .await
        .expect("replay");

    assert!(!first.replayed);
    assert!(second.replayed);
    let first_ids: Vec<Uuid> = first.jobs.iter().map(|j| j.id).collect();
    let second_ids: Vec<Uuid> = second.jobs.iter().map(|j| j.id).collect();
    assert_eq!(second_ids, first_ids, "same jobs, same order");
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        3
    );
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM idempotency_keys").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_with_another_body_is_a_conflict() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let settings = OrgSettings::default();
    db::jobs::create_jobs(
        &mut conn,
        &context(&org, &settings),
        &[job("echo a")],
        Some(Idempotency {
            key: "key-1",
            request_hash: vec![1; 32],
        }),
    )
    .await
    .expect("first");

    let reused = db::jobs::create_jobs(
        &mut conn,
        &context(&org, &settings),
        &[job("echo b"), job("echo c")],
        Some(Idempotency {
            key: "key-1",
            request_hash: vec![2; 32],
        }),
    )
    .await;

    assert!(
        matches!(&reused, Err(DbError::Conflict(what)) if what == "idempotency_key_reused"),
        "got {reused:?}"
    );
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_are_scoped_to_the_org() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let acme = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let settings = OrgSettings::default();
    let idem = || Idempotency {
        key: "shared-key",
        request_hash: vec![3; 32],
    };

    let a = db::jobs::create_jobs(
        &mut conn,
        &context(&acme, &settings),
        &[job("a")],
        Some(idem()),
    )
    .await
    .expect("acme");
    let b = db::jobs::create_jobs(
        &mut conn,
        &context(&globex, &settings),
        &[job("a")],
        Some(idem()),
    )
    .await
    .expect("globex");

    assert!(!a.replayed && !b.replayed);
    assert_ne!(a.jobs[0].id, b.jobs[0].id);
    assert_eq!(b.jobs[0].org_id, "globex");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_with_one_idempotency_key_create_the_jobs_once() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let pool = support::pool(&test_db, 6);

    let mut tasks = Vec::new();
    for _ in 0..6 {
        let pool = pool.clone();
        let org = org.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            let settings = OrgSettings::default();
            let batch: Vec<_> = (0..5).map(|i| job(&format!("echo {i}"))).collect();
            db::jobs::create_jobs(
                &mut conn,
                &context(&org, &settings),
                &batch,
                Some(Idempotency {
                    key: "race",
                    request_hash: vec![9; 32],
                }),
            )
            .await
            .expect("create or replay")
        }));
    }
    let results = futures_util::future::join_all(tasks).await;

    let results: Vec<_> = results.into_iter().map(|r| r.expect("join")).collect();
    assert_eq!(results.iter().filter(|r| !r.replayed).count(), 1);
    let ids: Vec<Vec<Uuid>> = results
        .iter()
        .map(|r| r.jobs.iter().map(|j| j.id).collect())
        .collect();
    assert!(ids.iter().all(|set| set == &ids[0] && set.len() == 5));
    assert_eq!(
        db::orgs::job_count(&mut conn, &org).await.expect("count"),
        5
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_job_is_not_found() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let acme = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let created = create_one(&mut conn, &acme, job("echo")).await;

    let foreign = db::jobs::get(&mut conn, &globex, created.job_id()).await;
    let unknown = db::jobs::get(&mut conn, &acme, JobId::new()).await;

    assert!(matches!(foreign, Err(DbError::NotFound)), "got {foreign:?}");
    assert!(matches!(unknown, Err(DbError::NotFound)), "got {unknown:?}");
    let filter = ListFilter {
        limit: 100,
        ..ListFilter::default()
    };
    assert!(
        db::jobs::list(&mut conn, &globex, &filter)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        db::jobs::list(&mut conn, &acme, &filter)
            .await
            .expect("list")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_of_every_status_pages_newest_first_across_statuses() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut specs = Vec::new();
    for n in 0..7 {
        let mut spec = job(&format!("job {n}"));
        spec.requires_approval = n % 3 == 2;
        specs.push(spec);
    }
    let created = create(&mut conn, &org, &specs).await;
    for (n, job) in created.iter().enumerate() {
        if n % 3 == 1 {
            support::lease_and_start(&mut conn, job.job_id(), AgentId::new()).await;
        }
    }
    let mut newest_first: Vec<Uuid> = created.iter().map(|j| j.id).collect();
    newest_first.sort_by(|a, b| b.cmp(a));

    // Pages of two: each page must interleave the statuses by id.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = db::jobs::list(
            &mut conn,
            &org,
            &ListFilter {
                before,
                limit: 2,
                ..ListFilter::default()
            },
        )
        .await
        .expect("list");
        let Some(last) = page.last() else { break };
        before = Some(last.job_id());
        paged.extend(page.iter().map(|j| j.id));
    }
    assert_eq!(paged, newest_first);
    let statuses: HashSet<String> = db::jobs::list(
        &mut conn,
        &org,
        &ListFilter {
            limit: 100,
            ..ListFilter::default()
        },
    )
    .await
    .expect("list")
    .into_iter()
    .map(|j| j.status)
    .collect();
    assert_eq!(
        statuses.len(),
        3,
        "queued, running and pending: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_by_status_queue_label_and_repository() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let repo = db::repositories::create(
        &mut conn,
        &org,
        &RepositorySpec {
            name: "api".into(),
            url: None,
            max_concurrent_jobs: None,
        },
    )
    .await
    .expect("repository");
    let mut in_repo = job("in repo");
    in_repo.repository_id = Some(RepositoryId(repo.id));
    in_repo.required_labels = Labels::new(["gpu"]);
    let mut rework = job("rework");
    rework.queue = QueueName::rework();
    let mut approval = job("needs approval");
    approval.requires_approval = true;
    let mut nightly = job("nightly");
    nightly.queue = QueueName::parse("nightly").expect("queue");
    nightly.required_labels = Labels::new(["gpu", "os=linux"]);
    let created = create(&mut conn, &org, &[in_repo, rework, approval, nightly]).await;
    let running = created[1].job_id();
    support::lease_and_start(&mut conn, running, AgentId::new()).await;

    let commands = async |conn: &mut db::PgConn, filter: ListFilter| -> Vec<String> {
        let filter = ListFilter {
            limit: 100,
            ..filter
        };
        let mut found: Vec<String> = db::jobs::list(conn, &org, &filter)
            .await
            .expect("list")
            .iter()
            .map(command_of)
            .collect();
        found.sort();
        found
    };

    let all = commands(&mut conn, ListFilter::default()).await;
    assert_eq!(all, ["in repo", "needs approval", "nightly", "rework"]);
    let queued = commands(
        &mut conn,
        ListFilter {
            status: Some(JobStatus::Queued),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(queued, ["in repo", "nightly"]);
    let pending = commands(
        &mut conn,
        ListFilter {
            status: Some(JobStatus::PendingApproval),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(pending, ["needs approval"]);
    let by_running = commands(
        &mut conn,
        ListFilter {
            status: Some(JobStatus::Running),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(by_running, ["rework"]);
    let backlog = commands(
        &mut conn,
        ListFilter {
            queue: Some("backlog".into()),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(backlog, ["in repo", "needs approval"]);
    let gpu = commands(
        &mut conn,
        ListFilter {
            label: Some("gpu".into()),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(gpu, ["in repo", "nightly"]);
    let linux = commands(
        &mut conn,
        ListFilter {
            label: Some("os=linux".into()),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(linux, ["nightly"]);
    let in_repository = commands(
        &mut conn,
        ListFilter {
            repository_id: Some(RepositoryId(repo.id)),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(in_repository, ["in repo"]);
    let combined = commands(
        &mut conn,
        ListFilter {
            status: Some(JobStatus::Queued),
            label: Some("gpu".into()),
            queue: Some("nightly".into()),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(combined, ["nightly"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn keyset_pages_skip_and_repeat_nothing_while_jobs_are_inserted() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let original: Vec<_> = (0..230).map(|i| job(&format!("original {i}"))).collect();
    let original: HashSet<Uuid> = create(&mut conn, &org, &original)
        .await
        .iter()
        .map(|j| j.id)
        .collect();

    let inserted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let inserter = {
        let pool = support::pool(&test_db, 1);
        let (org, inserted, stop) = (org.clone(), inserted.clone(), stop.clone());
        tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                support::create(&mut conn, &org, &[job(&format!("new {n}")), job("new too")]).await;
                n += 1;
                inserted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let mut seen = Vec::new();
    let mut before = None;
    let mut pages = 0;
    loop {
        assert!(pages < 100, "paging does not terminate");
        // Let the inserter commit between every two pages.
        while inserted.load(Ordering::SeqCst) <= pages {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let page = db::jobs::list(
            &mut conn,
            &org,
            &ListFilter {
                before,
                limit: 20,
                ..ListFilter::default()
            },
        )
        .await
        .expect("page");
        pages += 1;
        let Some(last) = page.last() else { break };
        before = Some(last.job_id());
        seen.extend(page.iter().map(|j| j.id));
    }
    stop.store(true, Ordering::SeqCst);
    inserter.await.expect("inserter");

    assert!(pages >= 12, "230 jobs take at least 12 pages of 20");
    assert!(
        inserted.load(Ordering::SeqCst) >= pages,
        "inserts interleaved with paging"
    );
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first, strictly"
    );
    let unique: HashSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no job appears on two pages");
    let missing: Vec<_> = original.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "{} original jobs were skipped",
        missing.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_always_approval_policy_makes_new_jobs_wait_for_approval() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let saved = OrgSettings {
        approval_policy: ApprovalPolicy::Always,
        ..OrgSettings::default()
    };
    db::orgs::update_settings(&mut conn, &org, &saved)
        .await
        .expect("save settings");
    let settings = db::orgs::settings(&mut conn, &org).await.expect("settings");

    let created = support::create_with(&mut conn, &org, &settings, &[job("a"), job("b")]).await;

    for job in &created {
        assert_eq!(job.status(), JobStatus::PendingApproval);
        assert!(job.requires_approval);
        assert!(job.queued_at.is_none());
    }
    let lease = db::leases::lease_job(&mut conn, created[0].job_id(), AgentId::new(), ACK).await;
    assert!(
        matches!(
            lease,
            Err(DbError::Domain(DomainError::InvalidTransition {
                from: JobStatus::PendingApproval,
                ..
            }))
        ),
        "got {lease:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_at_is_kept_when_future_and_clamped_to_now_when_past() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let later = Utc::now() + support::secs(3_600);
    let mut scheduled = job("later");
    scheduled.run_at = Some(later);
    let mut overdue = job("overdue");
    overdue.run_at = Some(Utc::now() - support::secs(3_600));
    let before = Utc::now();

    let created = create(&mut conn, &org, &[scheduled, overdue]).await;

    support::assert_between(created[0].run_at, later, later);
    support::assert_between(created[1].run_at, before, Utc::now());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cannot_reference_another_orgs_repository() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let acme = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let theirs = db::repositories::create(
        &mut conn,
        &globex,
        &RepositorySpec {
            name: "secret-project".into(),
            url: None,
            max_concurrent_jobs: None,
        },
    )
    .await
    .expect("repository");
    let mut new = job("echo");
    new.repository_id = Some(RepositoryId(theirs.id));
    let settings = OrgSettings::default();

    let result = db::jobs::create_jobs(&mut conn, &context(&acme, &settings), &[new], None).await;

    assert!(
        result.is_err(),
        "acme's job was attached to globex's repository"
    );
    assert_eq!(
        db::orgs::job_count(&mut conn, &acme).await.expect("count"),
        0
    );
}
