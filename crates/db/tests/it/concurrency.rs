//! Races between real transactions: concurrency-key slots never exceed
//! their limit, and no (job, epoch) lease is ever granted twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use db::DbError;
use db::leases::Ending;
use diesel_async::AsyncConnection;
use domain::AgentId;
use domain::job::JobStatus;
use rand::Rng;
use test_support::TestDb;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::support::{self, ACK, TTL, acme, create, job, reload, with_key};

#[tokio::test(flavor = "multi_thread")]
async fn a_full_concurrency_key_refuses_a_lease_until_a_slot_frees() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let batch: Vec<_> = (0..3)
        .map(|i| with_key(job(&format!("deploy {i}")), "deploy", 2))
        .collect();
    let jobs = create(&mut conn, &org, &batch).await;
    let other_key = support::create_one(&mut conn, &org, with_key(job("other"), "build", 2)).await;
    let first = support::lease_and_start(&mut conn, jobs[0].job_id(), AgentId::new()).await;
    db::leases::lease_job(&mut conn, jobs[1].job_id(), AgentId::new(), ACK)
        .await
        .expect("second slot");

    let third = db::leases::lease_job(&mut conn, jobs[2].job_id(), AgentId::new(), ACK).await;

    assert!(
        matches!(&third, Err(DbError::Conflict(what)) if what == "concurrency_key_full"),
        "got {third:?}"
    );
    let refused = reload(&mut conn, jobs[2].job_id()).await;
    assert_eq!(
        (refused.status(), refused.lease_epoch),
        (JobStatus::Queued, 0),
        "refusal rolls back the lease"
    );
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(*) AS count FROM concurrency_slots WHERE key = 'deploy'"
        )
        .await,
        2
    );
    db::leases::lease_job(&mut conn, other_key.job_id(), AgentId::new(), ACK)
        .await
        .expect("another key has slots of its own");

    db::leases::succeed(&mut conn, jobs[0].job_id(), first.epoch as u64, Some(0))
        .await
        .expect("succeed");
    let freed = db::leases::lease_job(&mut conn, jobs[2].job_id(), AgentId::new(), ACK).await;

    assert!(freed.is_ok(), "the freed slot is taken: {freed:?}");
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(*) AS count FROM concurrency_slots WHERE key = 'deploy'"
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_workers_never_hold_more_slots_than_the_limit() {
    const JOBS: usize = 50;
    const LIMIT: i64 = 3;
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let batch: Vec<_> = (0..JOBS)
        .map(|i| with_key(job(&format!("deploy {i}")), "deploy", LIMIT as u32))
        .collect();
    let ids: Arc<Vec<_>> = Arc::new(
        create(&mut conn, &org, &batch)
            .await
            .iter()
            .map(|j| j.job_id())
            .collect(),
    );
    let pool = support::pool(&test_db, 12);
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let sampler = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            let (mut max_slots, mut max_holding, mut samples) = (0, 0, 0);
            while !stop.load(Ordering::SeqCst) {
                max_slots = max_slots.max(
                    support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots")
                        .await,
                );
                max_holding = max_holding.max(
                    support::count(
                        &mut conn,
                        "SELECT count(*) AS count FROM jobs WHERE concurrency_key = 'deploy' \
                         AND status IN ('leased', 'running', 'cancel_requested')",
                    )
                    .await,
                );
                samples += 1;
            }
            (max_slots, max_holding, samples)
        })
    };
    let mut workers = Vec::new();
    for _ in 0..10 {
        let (pool, ids, done) = (pool.clone(), ids.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            let agent = AgentId::new();
            let mut full = 0;
            while done.load(Ordering::SeqCst) < JOBS {
                let job = ids[rand::rng().random_range(0..ids.len())];
                match db::leases::lease_job(&mut conn, job, agent, ACK).await {
                    Ok(lease) => {
                        db::leases::start(&mut conn, job, lease.epoch as u64, TTL)
                            .await
                            .expect("start");
                        // Long enough that ten workers contend for three slots.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        db::leases::succeed(&mut conn, job, lease.epoch as u64, Some(0))
                            .await
                            .expect("succeed");
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(DbError::Conflict(what)) if what == "concurrency_key_full" => full += 1,
                    Err(DbError::Domain(_)) => {} // taken or finished by another worker
                    Err(other) => panic!("unexpected lease error: {other:?}"),
                }
            }
            full
        }));
    }
    let refusals: usize = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .map(|r| r.expect("worker"))
        .sum();
    stop.store(true, Ordering::SeqCst);
    let (max_slots, max_holding, samples) = sampler.await.expect("sampler");

    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert!(max_slots <= LIMIT, "{max_slots} slots held at once");
    assert!(
        max_holding <= LIMIT,
        "{max_holding} jobs of the key leased at once"
    );
    assert!(max_holding >= 1, "the sampler saw work in progress");
    assert!(refusals > 0, "the limit was contended");
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(*) AS count FROM jobs WHERE status = 'succeeded'"
        )
        .await,
        JOBS as i64
    );
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(*) AS count FROM attempts WHERE outcome = 'succeeded'"
        )
        .await,
        JOBS as i64
    );
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_job_is_leased_twice_for_one_epoch() {
    const JOBS: usize = 200;
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let batch: Vec<_> = (0..JOBS).map(|i| job(&format!("echo {i}"))).collect();
    let ids: Arc<Vec<_>> = Arc::new(
        create(&mut conn, &org, &batch)
            .await
            .iter()
            .map(|j| j.job_id())
            .collect(),
    );
    let pool = support::pool(&test_db, 8);

    let mut workers = Vec::new();
    for _ in 0..8 {
        let (pool, ids) = (pool.clone(), ids.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            let agent = AgentId::new();
            let mut granted = Vec::new();
            for _ in 0..150 {
                let job = ids[rand::rng().random_range(0..ids.len())];
                match db::leases::lease_job(&mut conn, job, agent, ACK).await {
                    Ok(lease) => {
                        granted.push((lease.job_id, lease.epoch));
                        // Give most leases back so jobs are leased many times.
                        if rand::rng().random_bool(0.8) {
                            db::leases::end_attempt(
                                &mut conn,
                                job,
                                Some(lease.epoch as u64),
                                Ending::Released {
                                    delay: Duration::ZERO,
                                },
                            )
                            .await
                            .expect("release");
                        }
                    }
                    Err(DbError::Domain(_)) => {} // leased by someone else right now
                    Err(other) => panic!("unexpected lease error: {other:?}"),
                }
            }
            granted
        }));
    }
    let granted: Vec<(Uuid, i64)> = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .flat_map(|r| r.expect("worker"))
        .collect();

    let unique: HashSet<(Uuid, i64)> = granted.iter().copied().collect();
    assert_eq!(
        unique.len(),
        granted.len(),
        "a (job, epoch) lease was granted twice"
    );
    let mut per_job: HashMap<Uuid, Vec<i64>> = HashMap::new();
    for (job, epoch) in &granted {
        per_job.entry(*job).or_default().push(*epoch);
    }
    let mut releases_seen = 0;
    for id in ids.iter() {
        let row = reload(&mut conn, *id).await;
        let mut epochs = per_job.remove(&id.as_uuid()).unwrap_or_default();
        epochs.sort_unstable();
        assert_eq!(
            row.lease_epoch,
            epochs.len() as i64,
            "job {id}: epoch vs leases granted"
        );
        assert!(
            epochs.iter().copied().eq(1..=epochs.len() as i64),
            "job {id}: epochs {epochs:?} are not 1..=n"
        );
        releases_seen += epochs.len().saturating_sub(1);
    }
    assert!(
        granted.len() > JOBS / 2,
        "enough leases were granted ({})",
        granted.len()
    );
    assert!(releases_seen > 0, "some jobs were leased more than once");
}

/// Waits until some backend of this database waits on a lock.
async fn wait_for_lock_waiter(conn: &mut db::PgConn) {
    for _ in 0..500 {
        let waiting = support::count(
            conn,
            "SELECT count(*) AS count FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no backend ever waited on a lock");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_racing_another_is_not_refused_while_a_slot_is_free() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let batch = [
        with_key(job("a"), "deploy", 2),
        with_key(job("b"), "deploy", 2),
    ];
    let jobs = create(&mut conn, &org, &batch).await;
    let (first, second) = (jobs[0].job_id(), jobs[1].job_id());
    let (held_tx, held_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    // The first lease takes slot 0 inside a transaction that stays open, as
    // it would while another scheduler's statement is still committing.
    let mut holder = test_db.conn().await;
    let holding = tokio::spawn(async move {
        holder
            .transaction(async move |c| {
                let lease = db::leases::lease_job(c, first, AgentId::new(), ACK).await?;
                held_tx.send(()).expect("test alive");
                go_rx.await.expect("test alive");
                Ok::<_, DbError>(lease)
            })
            .await
    });
    held_rx.await.expect("first lease taken");
    let racer_db = test_db.db().clone();
    let racing = tokio::spawn(async move {
        let mut conn = support::conn_from(&racer_db).await;
        db::leases::lease_job(&mut conn, second, AgentId::new(), ACK).await
    });
    wait_for_lock_waiter(&mut conn).await;

    go_tx.send(()).expect("holder alive");
    holding.await.expect("join").expect("first lease commits");
    let raced = racing.await.expect("join");

    assert!(raced.is_ok(), "refused with slot 1 of 2 free: {raced:?}");
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        2
    );
}
