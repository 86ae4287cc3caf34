//! What the dispatcher reads of an org's limits, and that it honours them.

use std::collections::HashSet;

use db::dispatch::{DispatchSettings, dispatch_org, limits, orgs_with_work};
use domain::org::{OrgSettings, RepositorySpec};
use domain::{AgentId, RepositoryId};
use test_support::TestDb;

use crate::support::{self, acme, create, job, with_key};

fn repository(name: &str, max_concurrent_jobs: Option<u32>) -> RepositorySpec {
    RepositorySpec {
        name: name.to_owned(),
        url: None,
        max_concurrent_jobs,
    }
}

async fn cap_org(conn: &mut db::PgConn, org: &domain::OrgId, max_concurrent_jobs: u32) {
    let settings = OrgSettings {
        max_concurrent_jobs: Some(max_concurrent_jobs),
        ..OrgSettings::default()
    };
    db::orgs::update_settings(conn, org, &settings)
        .await
        .expect("settings");
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_read_the_org_cap_capped_repositories_and_held_key_slots() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let other = support::org(&mut conn, "globex").await;

    let (empty, held) = limits(&mut conn, &org).await.expect("limits");
    assert_eq!((empty.org_max, empty.org_running), (None, 0));
    assert!(empty.repositories.is_empty() && empty.keys_held.is_empty() && held.is_empty());

    cap_org(&mut conn, &org, 7).await;
    let web = db::repositories::create(&mut conn, &org, &repository("web", Some(4)))
        .await
        .expect("web");
    let docs = db::repositories::create(&mut conn, &org, &repository("docs", None))
        .await
        .expect("docs");
    let in_repo = |id: uuid::Uuid, command: &str| {
        let mut new = job(command);
        new.repository_id = Some(RepositoryId(id));
        new
    };
    let jobs = create(
        &mut conn,
        &org,
        &[
            in_repo(web.id, "web 1"),
            in_repo(web.id, "web 2"),
            in_repo(web.id, "web queued"),
            in_repo(docs.id, "docs 1"),
            with_key(job("deploy 1"), "deploy", 3),
            with_key(job("deploy 2"), "deploy", 3),
        ],
    )
    .await;
    let elsewhere = create(&mut conn, &other, &[job("globex 1")]).await;
    // All but "web queued" (the third) hold a lease.
    for (i, job) in jobs.iter().enumerate() {
        if i != 2 {
            support::lease_and_start(&mut conn, job.job_id(), AgentId::new()).await;
        }
    }
    support::lease_and_start(&mut conn, elsewhere[0].job_id(), AgentId::new()).await;

    let (read, held) = limits(&mut conn, &org).await.expect("limits");

    assert_eq!(read.org_max, Some(7));
    assert_eq!(
        read.org_running, 5,
        "every leased job of the org, not another org's"
    );
    assert_eq!(
        read.repositories.get(&RepositoryId(web.id)),
        Some(&(Some(4), 2)),
        "the capped repository with its two leased jobs"
    );
    assert!(
        !read.repositories.contains_key(&RepositoryId(docs.id)),
        "an uncapped repository is not a limit"
    );
    assert_eq!(read.keys_held.get("deploy"), Some(&2));
    let slots: HashSet<i32> = held
        .get("deploy")
        .expect("deploy slots")
        .iter()
        .copied()
        .collect();
    assert_eq!(slots.len(), 2, "two distinct slots held: {slots:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatch_stops_at_the_org_cap_and_the_repository_cap() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    cap_org(&mut conn, &org, 3).await;
    let web = db::repositories::create(&mut conn, &org, &repository("web", Some(1)))
        .await
        .expect("web");
    let mut batch: Vec<_> = (0..4)
        .map(|i| {
            let mut new = job(&format!("web {i}"));
            new.repository_id = Some(RepositoryId(web.id));
            new
        })
        .collect();
    batch.extend((0..4).map(|i| job(&format!("loose {i}"))));
    let jobs = create(&mut conn, &org, &batch).await;
    support::exec(
        &mut conn,
        "INSERT INTO agents (id, org_id, name, capacity, status) \
         VALUES (gen_random_uuid(), 'acme', 'wide', 10, 'online')",
    )
    .await;

    let mut granted = Vec::new();
    for _ in 0..3 {
        let round = dispatch_org(&mut conn, &org, &DispatchSettings::default())
            .await
            .expect("dispatch");
        granted.extend(round.granted.into_iter().map(|g| g.job_id));
    }

    assert_eq!(
        granted.len(),
        3,
        "the org cap of 3 holds over rounds: {granted:?}"
    );
    let from_web = jobs
        .iter()
        .filter(|j| j.repository_id == Some(web.id) && granted.contains(&j.id))
        .count();
    assert_eq!(from_web, 1, "the repository cap of 1 holds");
}

#[tokio::test(flavor = "multi_thread")]
async fn orgs_with_work_are_those_with_a_due_job_and_an_online_agent() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let ready = support::org(&mut conn, "ready").await;
    let idle = support::org(&mut conn, "idle").await;
    let unattended = support::org(&mut conn, "unattended").await;
    let later = support::org(&mut conn, "later").await;
    let mut delayed = job("later");
    delayed.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    create(&mut conn, &ready, &[job("now"), job("now too")]).await;
    create(&mut conn, &unattended, &[job("nobody to run it")]).await;
    create(&mut conn, &later, &[delayed]).await;
    // Two online agents in "ready" (the org is listed once), one in "idle"
    // and "later", an offline one in "unattended".
    support::exec(
        &mut conn,
        "INSERT INTO agents (id, org_id, name, capacity, status) VALUES \
         (gen_random_uuid(), 'ready', 'r1', 1, 'online'), \
         (gen_random_uuid(), 'ready', 'r2', 1, 'online'), \
         (gen_random_uuid(), 'idle', 'i1', 1, 'online'), \
         (gen_random_uuid(), 'later', 'l1', 1, 'online'), \
         (gen_random_uuid(), 'unattended', 'u1', 1, 'offline')",
    )
    .await;

    let orgs = orgs_with_work(&mut conn).await.expect("orgs with work");

    assert_eq!(
        orgs,
        vec![ready],
        "not {idle:?} (no jobs), {unattended:?} (no agent online), {later:?} (not due)"
    );
}

/// A lease returns the job for its offer only when payload and metadata are
/// small; a big job's offer goes without it (the gateway reads it).
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_returns_small_jobs_for_their_offer_and_not_big_ones() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut big = job("big");
    big.metadata = serde_json::json!({
        "notes": "x".repeat(domain::events::OfferedJob::MAX_CARRIED_BYTES * 2)
    });
    let small = job("echo small");
    let jobs = create(&mut conn, &org, &[big, small]).await;
    support::exec(
        &mut conn,
        "INSERT INTO agents (id, org_id, name, capacity, status) \
         VALUES (gen_random_uuid(), 'acme', 'wide', 10, 'online')",
    )
    .await;
    let round = dispatch_org(&mut conn, &org, &DispatchSettings::default())
        .await
        .expect("dispatch");
    assert_eq!(round.granted.len(), 2);
    for lease in &round.granted {
        let offered = lease.offered_job();
        if lease.job_id == jobs[0].id {
            assert!(offered.is_none(), "the big job is not carried");
        } else {
            let offered = offered.expect("the small job is carried");
            assert_eq!(offered.payload["command"], "echo small");
            assert_eq!(offered.queue, "backlog");
        }
    }
}

/// Aging reaches a job however far behind the heads it sits: the dispatcher
/// also reads the longest waiting, and only those old enough to be lifted.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_lifted_by_aging_is_leased_from_behind_more_heads_than_a_tick_reads() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let settings = DispatchSettings {
        heads_per_group: 4,
        ..DispatchSettings::default()
    };
    let old = create(&mut conn, &org, &[job("waited ten minutes")]).await;
    support::exec(
        &mut conn,
        &format!(
            "UPDATE jobs SET queued_at = now() - interval '10 minutes' WHERE id = '{}'",
            old[0].id
        ),
    )
    .await;
    let urgent: Vec<_> = (0..10)
        .map(|n| {
            let mut new = job(&format!("urgent {n}"));
            new.priority = 5;
            new
        })
        .collect();
    create(&mut conn, &org, &urgent).await;
    support::exec(
        &mut conn,
        "INSERT INTO agents (id, org_id, name, capacity, status) \
         VALUES (gen_random_uuid(), 'acme', 'one slot', 1, 'online')",
    )
    .await;

    // Ten minutes at one point a minute lift priority 0 above 5.
    let round = dispatch_org(&mut conn, &org, &settings)
        .await
        .expect("dispatch");
    let leased: Vec<_> = round.granted.iter().map(|lease| lease.job_id).collect();
    assert_eq!(leased, [old[0].id]);

    // Without aging the urgent jobs go first.
    let second = create(&mut conn, &org, &[job("waited too")]).await;
    support::exec(
        &mut conn,
        &format!(
            "UPDATE jobs SET queued_at = now() - interval '10 minutes' WHERE id = '{}'",
            second[0].id
        ),
    )
    .await;
    support::exec(
        &mut conn,
        &format!(
            "UPDATE jobs SET status = 'succeeded' WHERE id = '{}'",
            old[0].id
        ),
    )
    .await;
    let unaged = DispatchSettings {
        aging: None,
        ..settings
    };
    let round = dispatch_org(&mut conn, &org, &unaged)
        .await
        .expect("dispatch");
    assert_eq!(round.granted.len(), 1);
    assert_ne!(round.granted[0].job_id, second[0].id);
}
