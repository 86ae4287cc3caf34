//! The reference agent as a real process.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use domain::agent::AgentStatus;
use domain::events::Event;
use domain::job::JobStatus;
use domain::retry::InfraReason;
use test_support::{TestDb, TestRedis};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_registers_runs_a_job_streams_its_logs_and_reports_success() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = Gateway::start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let scratch = Scratch::new();
    let agent = AgentProcess::spawn(&[&gateway.grpc_url], &token, &scratch.0, "a1");
    let id = agent.agent_id().await;
    let mode = std::fs::metadata(&agent.credential)
        .expect("credential file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "credential file mode");
    wait_agent(&db, id, AgentStatus::Online).await;

    let job = submit(&db, "echo one; echo two >&2; printf 'three\\nfour'; exit 0").await;
    offer(&db, &bus, job, id).await;
    wait_status(&db, job, JobStatus::Succeeded).await;
    let row = job_row(&db, job).await;
    assert_eq!(row.exit_code, Some(0));
    let lines = log_lines(&db, job).await;
    let seqs: Vec<i64> = lines.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "contiguous sequence: {lines:?}");
    let mut texts: Vec<&str> = lines.iter().map(|(_, t)| t.as_str()).collect();
    texts.sort_unstable();
    assert_eq!(texts, ["four", "one", "three", "two"]);
    // The job ran in its own directory.
    assert!(agent.work_dir.join(job.to_string()).is_dir());

    // A failing command is reported with its exit code.
    let failing = submit(&db, "exit 3").await;
    offer(&db, &bus, failing, id).await;
    eventually("failure recorded", WAIT, || async {
        job_row(&db, failing).await.app_failures == 1
    })
    .await;
    assert_eq!(job_row(&db, failing).await.exit_code, Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_a_running_sleep_600_within_the_grace_period() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = Gateway::start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let scratch = Scratch::new();
    let agent = AgentProcess::spawn(&[&gateway.grpc_url], &token, &scratch.0, "a1");
    let id = agent.agent_id().await;
    wait_agent(&db, id, AgentStatus::Online).await;

    let job = submit(&db, "echo $$ > pid; exec sleep 600").await;
    let epoch = offer(&db, &bus, job, id).await;
    wait_status(&db, job, JobStatus::Running).await;
    let pid_file = agent.work_dir.join(job.to_string()).join("pid");
    eventually("pid written", WAIT, || async { pid_file.exists() }).await;
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    let proc_dir = format!("/proc/{pid}");
    assert!(
        std::path::Path::new(&proc_dir).exists(),
        "sleep 600 is running"
    );

    let grace = Duration::from_secs(3);
    {
        let mut conn = db.conn().await;
        db::leases::operate(
            &mut conn,
            &org(),
            job,
            db::leases::OperatorAction::Cancel { grace },
        )
        .await
        .expect("cancel");
    }
    let asked = Instant::now();
    bus.publish(
        &bus::Channel::Agent(id),
        &domain::events::Envelope::new(
            org(),
            Event::CancelRequested {
                agent_id: id,
                job_id: job,
                epoch,
                grace_ms: grace.as_millis() as u64,
            },
        ),
    )
    .await
    .expect("publish cancel");
    eventually("process gone", grace, || async {
        !std::path::Path::new(&proc_dir).exists()
    })
    .await;
    assert!(asked.elapsed() < grace, "took {:?}", asked.elapsed());
    wait_status(&db, job, JobStatus::Cancelled).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agents_job_is_re_leased_to_another_agent_and_succeeds() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = Gateway::start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let scratch = Scratch::new();
    let mut doomed = AgentProcess::spawn(&[&gateway.grpc_url], &token, &scratch.0, "doomed");
    let doomed_id = doomed.agent_id().await;
    let survivor = AgentProcess::spawn(&[&gateway.grpc_url], &token, &scratch.0, "survivor");
    let survivor_id = survivor.agent_id().await;
    wait_agent(&db, doomed_id, AgentStatus::Online).await;
    wait_agent(&db, survivor_id, AgentStatus::Online).await;

    let job = submit(&db, "sleep 2; echo done").await;
    let first = offer(&db, &bus, job, doomed_id).await;
    wait_status(&db, job, JobStatus::Running).await;
    doomed.child.kill().expect("kill -9 the agent");
    let _ = doomed.child.wait();
    wait_agent(&db, doomed_id, AgentStatus::Offline).await;

    // The scheduler's expiry sweep, played by hand once the lease ran out
    // (no heartbeats renew it any more).
    eventually("lease expired", WAIT, || async {
        job_row(&db, job)
            .await
            .lease_expires_at
            .is_some_and(|at| at < chrono::Utc::now())
    })
    .await;
    {
        let mut conn = db.conn().await;
        let ended = db::leases::end_attempt(
            &mut conn,
            job,
            Some(first),
            db::leases::Ending::Lost(InfraReason::LeaseExpired),
        )
        .await
        .expect("expire");
        assert_eq!(ended.status, JobStatus::Queued);
    }
    let second = offer(&db, &bus, job, survivor_id).await;
    assert_eq!(second, first + 1);
    wait_status(&db, job, JobStatus::Succeeded).await;
    let row = job_row(&db, job).await;
    assert_eq!(row.agent_id, Some(survivor_id.as_uuid()));
    assert_eq!(row.infra_failures, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_its_gateway_dies_the_agent_resumes_on_another_and_finishes_the_same_attempt() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let first = Gateway::start(&db, redis.url(), redis.prefix());
    let second = Gateway::start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let scratch = Scratch::new();
    let agent = AgentProcess::spawn(
        &[&first.grpc_url, &second.grpc_url],
        &token,
        &scratch.0,
        "a1",
    );
    let id = agent.agent_id().await;
    wait_agent(&db, id, AgentStatus::Online).await;

    let job = submit(&db, "echo start; sleep 3; echo end").await;
    let epoch = offer(&db, &bus, job, id).await;
    eventually("first line stored", WAIT, || async {
        !log_lines(&db, job).await.is_empty()
    })
    .await;
    first.stop().await;

    wait_status(&db, job, JobStatus::Succeeded).await;
    let row = job_row(&db, job).await;
    assert_eq!(row.lease_epoch as u64, epoch, "the same attempt finished");
    assert_eq!(row.app_failures + row.infra_failures, 0);
    assert_eq!(
        log_lines(&db, job).await,
        [(1, "start".to_owned()), (2, "end".to_owned())]
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_sigterm_the_agent_finishes_its_job_takes_no_new_one_and_exits() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = Gateway::start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let scratch = Scratch::new();
    let mut agent = AgentProcess::spawn(&[&gateway.grpc_url], &token, &scratch.0, "a1");
    let id = agent.agent_id().await;
    wait_agent(&db, id, AgentStatus::Online).await;

    let job = submit(&db, "sleep 1; echo finished").await;
    offer(&db, &bus, job, id).await;
    wait_status(&db, job, JobStatus::Running).await;
    agent.signal("TERM");
    wait_agent(&db, id, AgentStatus::Draining).await;
    let late = submit(&db, "echo late").await;
    offer(&db, &bus, late, id).await;
    wait_status(&db, job, JobStatus::Succeeded).await;
    // The late offer was given back.
    wait_status(&db, late, JobStatus::Queued).await;
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = agent.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    wait_agent(&db, id, AgentStatus::Offline).await;
}
