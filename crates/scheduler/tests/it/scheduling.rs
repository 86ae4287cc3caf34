//! The scheduler's acceptance tests (issue 4).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use db::DbError;
use domain::DomainError;
use domain::job::{ConcurrencyKey, JobStatus};
use domain::retry::RetryPolicy;
use test_support::{TestDb, TestRedis};
use tokio::sync::Mutex;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn two_schedulers_lease_every_attempt_exactly_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let ids = create_jobs(&db, &acme, &vec![job("true"); 5_000]).await;
    let _agents = spawn_agents(
        &db,
        &bus,
        &acme,
        20,
        8,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    let (stop_a, task_a) = start_engine(&db, &bus, fast_settings());
    let (stop_b, task_b) = start_engine(&db, &bus, fast_settings());
    let statuses = wait_until_finished(&db, &ids, Duration::from_secs(240)).await;
    stop_a.cancel();
    stop_b.cancel();
    let _ = tokio::join!(task_a, task_b);

    assert!(statuses.values().all(|s| *s == JobStatus::Succeeded));
    // Every job was leased once (epoch 1) and has exactly one attempt row.
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM jobs WHERE lease_epoch <> 1").await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM attempts").await,
        5_000
    );
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM (SELECT job_id FROM attempts GROUP BY job_id HAVING count(*) > 1) d").await,
        0
    );
    let journal = journal.lock().await;
    let unique: HashSet<_> = journal
        .started
        .iter()
        .map(|(job, epoch, _)| (*job, *epoch))
        .collect();
    assert_eq!(
        unique.len(),
        journal.started.len(),
        "an attempt was started twice"
    );
    assert_eq!(journal.finished.len(), 5_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_agent_loses_its_job_within_ttl_plus_a_sweep_and_its_epoch_goes_stale() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let lease_ttl = Duration::from_millis(800);
    let silent = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        1,
        &[],
        lease_ttl,
        Behaviour::GoSilent,
        journal.clone(),
    )
    .await;
    let settings = fast_settings();
    let sweep = settings.sweep_interval;
    let (stop, task) = start_engine(&db, &bus, settings);
    let ids = create_jobs(&db, &acme, &[job("true")]).await;
    wake(&bus, &acme).await;

    // The silent agent acknowledges, then stops heartbeating.
    let started_at = loop {
        if let Some(entry) = journal.lock().await.started.first().copied() {
            break (entry, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ((job_id, first_epoch, _), acked) = started_at;
    assert_eq!(first_epoch, 1);
    // A healthy agent arrives; the silent one is no longer offered work.
    for agent in &silent {
        agent.stop.cancel();
    }
    let mut conn = db.conn().await;
    db::agents::set_status(&mut conn, silent[0].id, domain::agent::AgentStatus::Offline)
        .await
        .expect("offline");
    let _healthy = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        1,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    let statuses = wait_until_finished(&db, &ids, Duration::from_secs(20)).await;
    assert_eq!(statuses[&job_id], JobStatus::Succeeded);
    let journal = journal.lock().await;
    let (_, second_epoch, _) = journal.started[1];
    assert_eq!(second_epoch, 2, "re-leased with epoch + 1");
    let relet_after = acked.elapsed();
    assert!(
        relet_after < lease_ttl + sweep + Duration::from_secs(2),
        "took {relet_after:?} to recover the lease"
    );
    // The old epoch's completion is rejected and changes nothing.
    let stale = db::leases::succeed(&mut conn, job_id, first_epoch, Some(0)).await;
    assert!(matches!(
        stale,
        Err(DbError::Domain(DomainError::StaleEpoch {
            given: 1,
            current: 2
        }))
    ));
    let lost = count(
        &db,
        "SELECT count(*) AS n FROM attempts WHERE outcome = 'lost' AND epoch = 1",
    )
    .await;
    assert_eq!(lost, 1, "the silent attempt is recorded as lost");
    stop.cancel();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrency_key_never_exceeds_its_slots() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let mut keyed = job("true");
    keyed.concurrency = Some(ConcurrencyKey {
        key: "deploy".into(),
        limit: 3,
    });
    let ids = create_jobs(&db, &acme, &vec![keyed; 1_000]).await;
    let _agents = spawn_agents(
        &db,
        &bus,
        &acme,
        10,
        5,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::from_millis(2)),
        journal.clone(),
    )
    .await;
    // Sample the number of jobs holding the key continuously.
    let peak = Arc::new(AtomicI64::new(0));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let url = db.direct_url().to_owned();
        let peak = peak.clone();
        let sampling = sampling.clone();
        async move {
            use diesel_async::{AsyncConnection, RunQueryDsl};
            let mut conn = diesel_async::AsyncPgConnection::establish(&url)
                .await
                .expect("sampler");
            let mut samples = 0u64;
            while !sampling.is_cancelled() {
                let row: Count = diesel::sql_query(
                    "SELECT count(*) AS n FROM jobs WHERE concurrency_key = 'deploy' \
                     AND status IN ('leased', 'running', 'cancel_requested')",
                )
                .get_result(&mut conn)
                .await
                .expect("sample");
                peak.fetch_max(row.n, Ordering::SeqCst);
                samples += 1;
            }
            samples
        }
    });
    let (stop, task) = start_engine(&db, &bus, fast_settings());
    wait_until_finished(&db, &ids, Duration::from_secs(180)).await;
    sampling.cancel();
    let samples = sampler.await.expect("sampler");
    stop.cancel();
    let _ = task.await;
    assert!(samples > 50, "only {samples} samples taken");
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "{peak} jobs held the key at once");
    assert!(
        peak >= 2,
        "the key's slots were used in parallel (peak {peak})"
    );
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM concurrency_slots").await,
        0,
        "no slot leaked"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_tenant_does_not_starve_another() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let (flood_repo, small_repo) = (
        create_repository(&db, &acme, "flood").await,
        create_repository(&db, &acme, "small").await,
    );
    let journal = Arc::new(Mutex::new(Journal::default()));
    let mut flood_job = job("true");
    flood_job.repository_id = Some(flood_repo);
    let flood = create_jobs(&db, &acme, &vec![flood_job; 5_000]).await;
    let mut small_job = job("true");
    small_job.repository_id = Some(small_repo);
    let small = create_jobs(&db, &acme, &vec![small_job; 10]).await;
    let _agents = spawn_agents(
        &db,
        &bus,
        &acme,
        4,
        4,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::from_millis(1)),
        journal.clone(),
    )
    .await;
    let (stop, task) = start_engine(&db, &bus, fast_settings());
    wait_until_finished(&db, &small, Duration::from_secs(60)).await;
    stop.cancel();
    let _ = task.await;
    let journal = journal.lock().await;
    let small: HashSet<_> = small.into_iter().collect();
    let last_small = journal
        .started
        .iter()
        .rposition(|(job, _, _)| small.contains(job))
        .expect("small jobs started");
    // Round-robin across repositories: the 10 small jobs start within the
    // first few dozen starts, not after 5,000.
    assert!(
        last_small < 60,
        "the small tenant's last job started {last_small}th"
    );
    assert!(flood.len() == 5_000);
}

/// Dispatch fills the free slots in a few rounds however the backlog is
/// spread: here 300 jobs without a repository (far more than the fewest
/// heads read per group) beside a repository's five. The first round serves
/// both groups and leases more than a fixed per-group read would allow; the
/// rounds stop by themselves once everything runnable is leased.
#[tokio::test(flavor = "multi_thread")]
async fn dispatch_fills_free_slots_in_few_rounds_and_serves_every_group() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let repo = create_repository(&db, &acme, "small").await;
    let unowned = create_jobs(&db, &acme, &vec![job("true"); 300]).await;
    let mut owned_job = job("true");
    owned_job.repository_id = Some(repo);
    let owned = create_jobs(&db, &acme, &vec![owned_job; 5]).await;
    let settings = db::dispatch::DispatchSettings::default();
    let _agents = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        400,
        &[],
        Duration::from_secs(30),
        Behaviour::GoSilent,
        Arc::new(Mutex::new(Journal::default())),
    )
    .await;
    let mut conn = db.conn().await;
    let mut leased = Vec::new();
    let mut rounds = 0;
    loop {
        let dispatched = db::dispatch::dispatch_org(&mut conn, &acme, &settings)
            .await
            .expect("dispatch");
        rounds += 1;
        if rounds == 1 {
            assert!(dispatched.granted.len() as i64 > 2 * settings.heads_per_group);
            let first: HashSet<_> = dispatched
                .granted
                .iter()
                .map(|g| domain::JobId(g.job_id))
                .collect();
            assert!(
                owned.iter().all(|id| first.contains(id)),
                "the small group waited"
            );
        }
        leased.extend(dispatched.granted.iter().map(|g| domain::JobId(g.job_id)));
        if !dispatched.more {
            break;
        }
        assert!(rounds < 4, "still more to lease after {rounds} rounds");
    }
    let distinct: HashSet<_> = leased.iter().copied().collect();
    assert_eq!(distinct.len(), leased.len(), "a job leased twice");
    let wanted: HashSet<_> = unowned.iter().chain(&owned).copied().collect();
    assert_eq!(distinct, wanted);
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_back_off_within_policy_then_dead_letter_then_redrive_runs_again() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let policy = RetryPolicy {
        initial_interval_ms: 300,
        backoff_coefficient: 2.0,
        maximum_interval_ms: 1_000,
        maximum_attempts: 3,
        ..RetryPolicy::default()
    };
    let mut failing = job("false");
    failing.retry_policy = policy.clone();
    let ids = create_jobs(&db, &acme, &[failing]).await;
    let job_id = ids[0];
    let failers = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        1,
        &[],
        Duration::from_secs(30),
        Behaviour::Fail,
        journal.clone(),
    )
    .await;
    let (stop, task) = start_engine(&db, &bus, fast_settings());
    let statuses = wait_until_finished(&db, &ids, Duration::from_secs(30)).await;
    assert_eq!(
        statuses[&job_id],
        JobStatus::Dead,
        "dead-lettered after the last attempt"
    );

    // Each retry's wait (attempt end → next lease) stayed within the ceiling.
    #[derive(diesel::QueryableByName)]
    struct Gap {
        #[diesel(sql_type = diesel::sql_types::Double)]
        gap_ms: f64,
    }
    let mut conn = db.conn().await;
    let gaps: Vec<Gap> = diesel_async::RunQueryDsl::load(
        diesel::sql_query(
            "SELECT (EXTRACT(EPOCH FROM (next.leased_at - prev.ended_at)) * 1000)::float8 AS gap_ms \
             FROM attempts prev JOIN attempts next ON next.job_id = prev.job_id AND next.epoch = prev.epoch + 1 \
             ORDER BY prev.epoch",
        ),
        &mut conn,
    )
    .await
    .expect("gaps");
    assert_eq!(gaps.len(), 2, "three attempts, two waits");
    for (retry, gap) in gaps.iter().enumerate() {
        let ceiling = policy.delay_ceiling(retry as u32 + 1).as_millis() as f64;
        // Dispatch happens when run_at comes (the engine sleeps until then),
        // plus scheduling slack.
        assert!(
            gap.gap_ms <= ceiling + 400.0,
            "retry {retry}: waited {} ms, ceiling {ceiling}",
            gap.gap_ms
        );
        assert!(gap.gap_ms >= 0.0);
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM attempts WHERE outcome = 'failed'"
        )
        .await,
        3
    );

    // Redrive runs it again; this time an agent succeeds.
    for agent in &failers {
        agent.stop.cancel();
        db::agents::set_status(&mut conn, agent.id, domain::agent::AgentStatus::Offline)
            .await
            .expect("offline");
    }
    let _good = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        1,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    db::leases::operate(
        &mut conn,
        &acme,
        job_id,
        db::leases::OperatorAction::Redrive,
    )
    .await
    .expect("redrive");
    wake(&bus, &acme).await;
    let statuses = wait_until_finished(&db, &ids, Duration::from_secs(30)).await;
    assert_eq!(statuses[&job_id], JobStatus::Succeeded);
    stop.cancel();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unapproved_job_is_never_leased_until_approved() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let mut gated = job("deploy");
    gated.requires_approval = true;
    let ids = create_jobs(&db, &acme, &[gated]).await;
    let _agents = spawn_agents(
        &db,
        &bus,
        &acme,
        2,
        2,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    let (stop, task) = start_engine(&db, &bus, fast_settings());
    wake(&bus, &acme).await;
    // Several sweeps pass: still pending, never leased.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut conn = db.conn().await;
    let pending = db::jobs::get(&mut conn, &acme, ids[0]).await.expect("job");
    assert_eq!(pending.status(), JobStatus::PendingApproval);
    assert_eq!(pending.lease_epoch, 0);
    assert!(journal.lock().await.started.is_empty());

    db::leases::operate(
        &mut conn,
        &acme,
        ids[0],
        db::leases::OperatorAction::Approve,
    )
    .await
    .expect("approve");
    wake(&bus, &acme).await;
    let statuses = wait_until_finished(&db, &ids, Duration::from_secs(10)).await;
    assert_eq!(statuses[&ids[0]], JobStatus::Succeeded);
    stop.cancel();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_wait_for_run_at_without_polling_and_labels_route_work() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let mut delayed = job("later");
    delayed.run_at = Some(chrono::Utc::now() + chrono::Duration::milliseconds(1_500));
    let mut gpu = job("train");
    gpu.required_labels = domain::job::Labels::new(["gpu"]);
    let ids = create_jobs(&db, &acme, &[delayed, gpu]).await;
    let cpu_agents = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        4,
        &["cpu"],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    let mut settings = fast_settings();
    settings.sweep_interval = Duration::from_secs(30); // prove the run-at timer, not the sweep, fires
    let (stop, task) = start_engine(&db, &bus, settings);
    let created = Instant::now();
    wait_until_finished(&db, &ids[..1], Duration::from_secs(10)).await;
    let waited = created.elapsed();
    assert!(
        waited >= Duration::from_millis(1_300),
        "ran early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "ran late: {waited:?}");
    let mut conn = db.conn().await;
    let gpu_job = db::jobs::get(&mut conn, &acme, ids[1]).await.expect("job");
    assert_eq!(
        gpu_job.status(),
        JobStatus::Queued,
        "no agent has the gpu label"
    );
    let gpu_agents = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        1,
        &["gpu"],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    wake(&bus, &acme).await;
    wait_until_finished(&db, &ids[1..], Duration::from_secs(10)).await;
    let by_job: HashMap<_, _> = journal
        .lock()
        .await
        .started
        .iter()
        .map(|(j, _, a)| (*j, *a))
        .collect();
    assert_eq!(by_job[&ids[1]], gpu_agents[0].id);
    assert_eq!(by_job[&ids[0]], cpu_agents[0].id);
    stop.cancel();
    let _ = task.await;
}

/// Jobs no online agent can run (here: a label nobody has) must not hold
/// the heads of the queue: more of them than a tick reads go first, yet
/// the runnable job behind them is leased.
#[tokio::test(flavor = "multi_thread")]
async fn unrunnable_jobs_at_the_head_do_not_block_the_queue() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let mut gpu = job("train");
    gpu.required_labels = domain::job::Labels::new(["gpu"]);
    let heads_per_tick = db::dispatch::DispatchSettings::default().heads_per_group as usize;
    let blocked = vec![gpu; 2 * heads_per_tick + 5];
    create_jobs(&db, &acme, &blocked).await;
    let runnable = create_jobs(&db, &acme, &[job("build")]).await;
    spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        4,
        &["cpu"],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::ZERO),
        journal.clone(),
    )
    .await;
    let (stop, task) = start_engine(&db, &bus, fast_settings());
    wait_until_finished(&db, &runnable, Duration::from_secs(10)).await;
    stop.cancel();
    let _ = task.await;
}
