//! A scheduler process killed with SIGKILL mid-run and started again.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use domain::job::JobStatus;
use test_support::{TestDb, TestRedis};
use tokio::sync::Mutex;

use crate::harness::*;

fn start_process(db: &TestDb, redis: &TestRedis) -> Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    Command::new(env!("CARGO_BIN_EXE_scheduler"))
        .envs(db.env_vars())
        .env("REDIS_URL", redis.url())
        .env("REDIS_CLUSTER", redis.is_cluster().to_string())
        .env("REDIS_SENTINEL_MASTER", redis.sentinel_master())
        .env("REDIS_KEY_PREFIX", redis.prefix())
        .env("SCHEDULER_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("SCHEDULER_SWEEP_INTERVAL_MS", "200")
        .env("SCHEDULER_ACK_TIMEOUT_MS", "2000")
        .env("SCHEDULER_MAX_LEASES_PER_TICK", "50")
        .env("HTTP_WORKERS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scheduler")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduler_killed_mid_run_loses_nothing_and_completes_nothing_twice() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    let journal = Arc::new(Mutex::new(Journal::default()));
    let ids = create_jobs(&db, &acme, &vec![job("true"); 1_000]).await;
    let _agents = spawn_agents(
        &db,
        &bus,
        &acme,
        8,
        4,
        &[],
        Duration::from_secs(30),
        Behaviour::Succeed(Duration::from_millis(5)),
        journal.clone(),
    )
    .await;

    let mut first = start_process(&db, &redis);
    // Let it get well into the work, then kill it without warning.
    loop {
        let done = journal.lock().await.finished.len();
        if done >= 250 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    let done_at_kill = journal.lock().await.finished.len();
    assert!(done_at_kill < 1_000, "killed too late to prove anything");

    let mut second = start_process(&db, &redis);
    let statuses = wait_until_finished(&db, &ids, Duration::from_secs(120)).await;
    second.kill().expect("stop");
    second.wait().expect("reaped");

    assert!(
        statuses.values().all(|s| *s == JobStatus::Succeeded),
        "no job lost"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM attempts WHERE outcome = 'succeeded'"
        )
        .await,
        1_000,
        "exactly one successful attempt per job"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM (SELECT job_id FROM attempts WHERE outcome = 'succeeded' \
                    GROUP BY job_id HAVING count(*) > 1) twice"
        )
        .await,
        0
    );
    let journal = journal.lock().await;
    let finished: HashSet<_> = journal.finished.iter().map(|(job, _)| *job).collect();
    assert_eq!(
        finished.len(),
        journal.finished.len(),
        "an agent completed a job twice"
    );
    assert_eq!(finished.len(), 1_000);
}
