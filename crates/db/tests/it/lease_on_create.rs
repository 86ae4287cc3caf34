//! A job created while its org is idle is leased in its create's own
//! transaction; anything else is left to the scheduler.

use db::dispatch::{DispatchSettings, dispatch_org};
use db::jobs::Created;
use domain::OrgId;
use domain::job::{JobStatus, Labels, NewJob};
use domain::org::OrgSettings;
use test_support::TestDb;

use crate::support::{self, ACK, acme, job, reload};

/// Creates `new` as job-api does, leasing it on create when it can.
async fn create_leasing(conn: &mut db::PgConn, org: &OrgId, new: NewJob) -> Created {
    let settings = OrgSettings::default();
    let mut ctx = support::context(org, &settings);
    ctx.lease_on_create = Some(ACK);
    db::jobs::create_jobs(conn, &ctx, &[new], None)
        .await
        .expect("create")
}

async fn online_agent(conn: &mut db::PgConn, org: &str, capacity: i32, labels: &str) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    support::exec(
        conn,
        &format!(
            "INSERT INTO agents (id, org_id, name, capacity, labels, status) \
             VALUES ('{id}', '{org}', 'agent-{id}', {capacity}, '{labels}', 'online')"
        ),
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_created_while_its_org_is_idle_is_leased_with_its_create() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let agent = online_agent(&mut conn, "acme", 1, "{}").await;

    let first = create_leasing(&mut conn, &org, job("echo first")).await;

    let [lease] = first.leased.as_slice() else {
        panic!("one lease: {:?}", first.leased);
    };
    let job_id = first.jobs[0].job_id();
    assert_eq!(
        (lease.job_id, lease.agent_id, lease.epoch),
        (job_id.as_uuid(), agent, 1)
    );
    let stored = reload(&mut conn, job_id).await;
    assert_eq!(stored.status(), JobStatus::Leased);
    assert_eq!((stored.agent_id, stored.lease_epoch), (Some(agent), 1));

    // The agent's only slot is taken: the next job waits for the scheduler.
    let second = create_leasing(&mut conn, &org, job("echo second")).await;
    assert!(second.leased.is_empty(), "{:?}", second.leased);
    let waiting = reload(&mut conn, second.jobs[0].job_id()).await;
    assert_eq!(waiting.status(), JobStatus::Queued);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotent_create_leases_its_job_too_but_a_replay_does_not() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    online_agent(&mut conn, "acme", 2, "{}").await;
    let settings = OrgSettings::default();
    let mut ctx = support::context(&org, &settings);
    ctx.lease_on_create = Some(ACK);
    let create = async |conn: &mut db::PgConn| {
        let idempotency = db::jobs::Idempotency {
            key: "once",
            request_hash: vec![1],
        };
        db::jobs::create_jobs(conn, &ctx, &[job("echo once")], Some(idempotency))
            .await
            .expect("create")
    };

    let first = create(&mut conn).await;
    let replay = create(&mut conn).await;

    assert_eq!(first.leased.len(), 1);
    assert!(replay.replayed && replay.leased.is_empty());
    let stored = reload(&mut conn, first.jobs[0].job_id()).await;
    assert_eq!(
        (stored.status(), stored.lease_epoch),
        (JobStatus::Leased, 1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_leaves_its_job_to_the_scheduler_unless_the_org_is_idle() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    online_agent(&mut conn, "acme", 5, "{}").await;

    // No online agent has the label: nothing to lease it to.
    let mut gpu = job("train");
    gpu.required_labels = Labels::new(vec!["gpu".to_owned()]);
    let unplaceable = create_leasing(&mut conn, &org, gpu).await;
    assert!(unplaceable.leased.is_empty());

    // Another job of the org is ready, so this one queues behind it even
    // though an agent is free: order is the scheduler's to keep.
    let behind = create_leasing(&mut conn, &org, job("echo behind")).await;
    assert!(behind.leased.is_empty());
    assert_eq!(
        reload(&mut conn, behind.jobs[0].job_id()).await.status(),
        JobStatus::Queued
    );

    // In an idle org: a job due later, and a create that does not ask.
    let other = support::org(&mut conn, "globex").await;
    online_agent(&mut conn, "globex", 5, "{}").await;
    let mut later = job("later");
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    assert!(
        create_leasing(&mut conn, &other, later)
            .await
            .leased
            .is_empty()
    );
    let unasked = support::create_one(&mut conn, &other, job("echo unasked")).await;
    assert_eq!(
        reload(&mut conn, unasked.job_id()).await.status(),
        JobStatus::Queued
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn while_a_dispatch_holds_the_org_lock_a_create_does_not_lease_and_the_scheduler_retries() {
    use diesel_async::AsyncConnection;
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    online_agent(&mut conn, "acme", 5, "{}").await;

    // Another transaction holds the org's dispatch lock meanwhile (a real
    // transaction, so it also holds behind a transaction pooler).
    let mut holder = test_db.conn().await;
    let created = holder
        .transaction(async |h| {
            support::exec(
                h,
                &format!(
                    "SELECT pg_advisory_xact_lock({}, hashtext('acme'))",
                    0x5359_4450
                ),
            )
            .await;
            let created = create_leasing(&mut conn, &org, job("echo wait")).await;
            assert!(created.leased.is_empty(), "the lock is held elsewhere");
            let meanwhile = dispatch_org(&mut conn, &org, &DispatchSettings::default())
                .await
                .expect("dispatch");
            assert!(meanwhile.contended && meanwhile.granted.is_empty());
            Ok::<_, db::DbError>(created)
        })
        .await
        .expect("holder's transaction");

    let after = dispatch_org(&mut conn, &org, &DispatchSettings::default())
        .await
        .expect("dispatch");
    assert!(!after.contended);
    assert_eq!(
        after.granted.iter().map(|g| g.job_id).collect::<Vec<_>>(),
        vec![created.jobs[0].id]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_leased_by_its_create_holds_its_concurrency_slot() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    online_agent(&mut conn, "acme", 5, "{}").await;

    let first = create_leasing(&mut conn, &org, support::with_key(job("deploy"), "prod", 1)).await;
    assert_eq!(first.leased.len(), 1);
    let (limits, held) = db::dispatch::limits(&mut conn, &org).await.expect("limits");
    assert_eq!(held.get("prod"), Some(&vec![0]), "{limits:?}");

    // The key's only slot is held: the next job with it is not leased,
    // although the agent has room and nothing else is ready.
    let second = create_leasing(
        &mut conn,
        &org,
        support::with_key(job("deploy 2"), "prod", 1),
    )
    .await;
    assert!(second.leased.is_empty());
    assert_eq!(
        reload(&mut conn, second.jobs[0].job_id()).await.status(),
        JobStatus::Queued
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_written_together_lease_what_fits_and_keep_their_own_jobs_and_audit_events() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let agent = online_agent(&mut conn, "acme", 2, "{}").await;
    let settings = OrgSettings::default();
    let jobs = [
        support::with_key(job("deploy a"), "prod", 1),
        support::with_key(job("deploy b"), "prod", 1),
        job("echo c"),
    ];
    let request_ids = ["req-a", "req-b", "req-c"];
    let requests: Vec<_> = jobs
        .iter()
        .zip(request_ids)
        .map(|(new, request_id)| {
            let mut ctx = support::context(&org, &settings);
            ctx.request_id = Some(request_id);
            ctx.lease_on_create = Some(ACK);
            (ctx, std::slice::from_ref(new))
        })
        .collect();

    let created = db::jobs::create_together(&mut conn, &requests)
        .await
        .expect("create together");

    // Two slots on the agent; the second "prod" job would exceed its key's
    // limit, so it waits for the scheduler and the plain job takes the slot.
    let leased: Vec<usize> = created.iter().map(|c| c.leased.len()).collect();
    assert_eq!(leased, vec![1, 0, 1]);
    for (made, new) in created.iter().zip(&jobs) {
        let [job] = made.jobs.as_slice() else {
            panic!("one job per request: {made:?}");
        };
        assert_eq!(
            job.payload,
            serde_json::to_value(&new.payload).expect("payload")
        );
        assert!(
            made.leased
                .iter()
                .all(|lease| lease.job_id == job.id && lease.agent_id == agent)
        );
    }
    for (made, expected) in
        created
            .iter()
            .zip([JobStatus::Leased, JobStatus::Queued, JobStatus::Leased])
    {
        assert_eq!(
            reload(&mut conn, made.jobs[0].job_id()).await.status(),
            expected
        );
    }
    let (_, held) = db::dispatch::limits(&mut conn, &org).await.expect("limits");
    assert_eq!(held.get("prod"), Some(&vec![0]));
    let audit = db::audit::list(&mut conn, &org, None, 10)
        .await
        .expect("audit");
    let mut recorded: Vec<(String, String)> = audit
        .into_iter()
        .filter(|event| event.action == "job.created")
        .map(|event| (event.request_id.unwrap_or_default(), event.target_id))
        .collect();
    recorded.sort();
    let expected: Vec<(String, String)> = request_ids
        .iter()
        .zip(&created)
        .map(|(request_id, made)| (request_id.to_string(), made.jobs[0].id.to_string()))
        .collect();
    assert_eq!(recorded, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_written_together_are_all_or_nothing() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let settings = OrgSettings::default();
    let mut stray = job("echo stray");
    stray.repository_id = Some(domain::RepositoryId(uuid::Uuid::new_v4()));
    let jobs = [job("echo fine"), stray];
    let requests: Vec<_> = jobs
        .iter()
        .map(|new| (support::context(&org, &settings), std::slice::from_ref(new)))
        .collect();

    let refused = db::jobs::create_together(&mut conn, &requests).await;

    assert!(
        matches!(refused, Err(db::DbError::Domain(_))),
        "{refused:?}"
    );
    let count: i64 = {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        db::schema::jobs::table
            .count()
            .get_result(&mut conn)
            .await
            .expect("count")
    };
    assert_eq!(count, 0, "nothing of the group was written");
}

/// The create's COMMIT goes out behind its rows. Here every statement is
/// prepared on its first run, and still the job, its audit event and its
/// concurrency slot are written by the one transaction that leased it.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_create_writes_its_job_audit_event_and_slot_in_one_transaction() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    online_agent(&mut conn, "acme", 1, "{}").await;

    let created = create_leasing(
        &mut conn,
        &org,
        support::with_key(job("echo keyed"), "k", 1),
    )
    .await;

    assert_eq!(created.leased.len(), 1, "{:?}", created.leased);
    let id = created.jobs[0].job_id();
    let writers = format!(
        "SELECT count(DISTINCT writer) AS count FROM ( \
           SELECT xmin::text AS writer FROM jobs WHERE id = '{id}' \
           UNION ALL SELECT xmin::text FROM audit_events WHERE target_id = '{id}' \
           UNION ALL SELECT xmin::text FROM concurrency_slots WHERE job_id = '{id}') w"
    );
    let rows = format!(
        "SELECT (SELECT count(*) FROM audit_events WHERE target_id = '{id}') \
              + (SELECT count(*) FROM concurrency_slots WHERE job_id = '{id}') AS count"
    );
    assert_eq!(support::count(&mut conn, &rows).await, 2);
    assert_eq!(support::count(&mut conn, &writers).await, 1);
}
