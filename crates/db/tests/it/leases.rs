//! Leases and every later change of a job: epochs fence agent writes,
//! failures retry with backoff until the budget is spent, lost and released
//! leases are requeued, and cancellation waits for the agent.

use std::time::Duration;

use chrono::Utc;
use db::DbError;
use db::leases::{Ending, OperatorAction, Success};
use diesel_async::RunQueryDsl;
use domain::job::JobStatus;
use domain::retry::{InfraReason, RetryPolicy};
use domain::{AgentId, DomainError, JobId};
use test_support::TestDb;
use uuid::Uuid;

use crate::support::{self, ACK, TTL, acme, attempts_of, create_one, job, lease_and_start, reload};

fn failed(exit_code: i32, kind: &str) -> Ending {
    Ending::Failed {
        exit_code: Some(exit_code),
        error_kind: Some(kind.to_owned()),
        message: Some(format!("exit {exit_code}")),
    }
}

#[track_caller]
fn assert_stale(result: &Result<impl std::fmt::Debug, DbError>, given: u64, current: u64) {
    match result {
        Err(DbError::Domain(DomainError::StaleEpoch {
            given: g,
            current: c,
        })) => {
            assert_eq!((*g, *c), (given, current));
        }
        other => panic!("expected a stale epoch, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid_from(result: &Result<impl std::fmt::Debug, DbError>, from: JobStatus) {
    match result {
        Err(DbError::Domain(DomainError::InvalidTransition { from: f, .. })) => {
            assert_eq!(*f, from);
        }
        other => panic!("expected an invalid transition from {from}, got {other:?}"),
    }
}

/// Releases a leased or running job at `epoch` so it can be leased again.
async fn release(conn: &mut db::PgConn, job: JobId, epoch: i64) {
    db::leases::end_attempt(
        conn,
        job,
        Some(epoch as u64),
        Ending::Released {
            delay: Duration::ZERO,
        },
    )
    .await
    .expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_lease_raises_the_epoch_by_one() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();
    let (first_agent, second_agent) = (AgentId::new(), AgentId::new());
    let before = Utc::now();

    let first = db::leases::lease_job(&mut conn, id, first_agent, ACK)
        .await
        .expect("lease 1");
    let leased = reload(&mut conn, id).await;
    release(&mut conn, id, first.epoch).await;
    let second = db::leases::lease_job(&mut conn, id, second_agent, ACK)
        .await
        .expect("lease 2");

    assert_eq!(
        (first.job_id, first.epoch, first.attempt),
        (id.as_uuid(), 1, 1)
    );
    assert_eq!(second.epoch, 2);
    assert_eq!(second.attempt, 1, "a released lease spends no attempt");
    support::assert_between(
        first.expires_at,
        before + support::secs(30),
        Utc::now() + support::secs(30),
    );
    assert_eq!(leased.status(), JobStatus::Leased);
    assert_eq!(leased.agent_id, Some(first_agent.as_uuid()));
    let row = reload(&mut conn, id).await;
    assert_eq!(row.lease_epoch, 2);
    assert_eq!(row.status(), JobStatus::Leased);
    assert_eq!(row.agent_id, Some(second_agent.as_uuid()));
    assert_eq!(row.lease_expires_at, Some(second.expires_at));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leased_job_cannot_be_leased_again() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();
    db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease");

    let again = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;

    assert_invalid_from(&again, JobStatus::Leased);
    assert_eq!(reload(&mut conn, id).await.lease_epoch, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_pending_approval_cannot_be_leased() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = job("echo");
    new.requires_approval = true;
    let id = create_one(&mut conn, &org, new).await.job_id();

    let lease = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;

    assert_invalid_from(&lease, JobStatus::PendingApproval);
    let row = reload(&mut conn, id).await;
    assert_eq!(
        (row.status(), row.lease_epoch),
        (JobStatus::PendingApproval, 0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_scheduled_for_later_cannot_be_leased_yet() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = job("echo");
    new.run_at = Some(Utc::now() + support::secs(3_600));
    let id = create_one(&mut conn, &org, new).await.job_id();

    let lease = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;

    assert!(matches!(lease, Err(DbError::Domain(_))), "got {lease:?}");
    let row = reload(&mut conn, id).await;
    assert_eq!((row.status(), row.lease_epoch), (JobStatus::Queued, 0));
    assert!(row.agent_id.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn leasing_an_unknown_job_is_not_found() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;

    let lease = db::leases::lease_job(&mut conn, JobId::new(), AgentId::new(), ACK).await;

    assert!(matches!(lease, Err(DbError::NotFound)), "got {lease:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_makes_the_job_running_with_heartbeat_and_run_deadlines() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = job("echo");
    new.timeouts.run_timeout_ms = Some(600_000);
    let id = create_one(&mut conn, &org, new).await.job_id();
    let lease = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease");
    let before = Utc::now();

    let started = db::leases::start(&mut conn, id, lease.epoch as u64, TTL)
        .await
        .expect("start");

    let after = Utc::now();
    assert_eq!(started.status(), JobStatus::Running);
    assert_eq!(started.lease_epoch, 1);
    support::assert_between(started.started_at.expect("started_at"), before, after);
    support::assert_between(
        started.lease_expires_at.expect("heartbeat deadline"),
        before + support::secs(60),
        after + support::secs(60),
    );
    support::assert_between(
        started.run_deadline_at.expect("run deadline"),
        before + support::secs(600),
        after + support::secs(600),
    );
    assert_eq!(reload(&mut conn, id).await, started);
}

#[tokio::test(flavor = "multi_thread")]
async fn start_with_a_stale_epoch_is_refused_and_changes_nothing() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();
    let old = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease 1");
    release(&mut conn, id, old.epoch).await;
    db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease 2");
    let before = reload(&mut conn, id).await;

    let started = db::leases::start(&mut conn, id, old.epoch as u64, TTL).await;

    assert_stale(&started, 1, 2);
    assert_eq!(reload(&mut conn, id).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_epoch_cannot_complete_job() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = support::with_key(job("echo"), "deploy", 1);
    new.retry_policy = support::no_backoff(3);
    let id = create_one(&mut conn, &org, new).await.job_id();
    let old = lease_and_start(&mut conn, id, AgentId::new()).await;
    db::leases::end_attempt(
        &mut conn,
        id,
        Some(1),
        Ending::Lost(InfraReason::AgentVanished),
    )
    .await
    .expect("lost");
    let current = lease_and_start(&mut conn, id, AgentId::new()).await;
    let before = reload(&mut conn, id).await;

    let done = db::leases::succeed(&mut conn, id, old.epoch as u64, Some(0)).await;

    assert_stale(&done, 1, 2);
    assert_eq!(reload(&mut conn, id).await, before, "the row is unchanged");
    let outcomes: Vec<_> = attempts_of(&mut conn, id)
        .await
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(
        outcomes,
        ["lost"],
        "no attempt recorded for the stale write"
    );
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        1,
        "the current lease keeps its slot"
    );
    db::leases::succeed(&mut conn, id, current.epoch as u64, Some(0))
        .await
        .expect("the current epoch completes");
}

#[tokio::test(flavor = "multi_thread")]
async fn succeed_records_a_succeeded_attempt_and_finishes_the_job() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, support::with_key(job("echo"), "deploy", 1))
        .await
        .job_id();
    let agent = AgentId::new();
    let lease = lease_and_start(&mut conn, id, agent).await;
    let running = reload(&mut conn, id).await;

    db::leases::succeed(&mut conn, id, lease.epoch as u64, Some(0))
        .await
        .expect("succeed");

    let row = reload(&mut conn, id).await;
    assert_eq!(row.status(), JobStatus::Succeeded);
    assert_eq!(row.exit_code, Some(0));
    assert!(row.finished_at.is_some());
    assert!(row.lease_expires_at.is_none());
    let attempts = attempts_of(&mut conn, id).await;
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(
        (attempt.job_id, attempt.epoch, attempt.attempt),
        (id.as_uuid(), 1, 1)
    );
    assert_eq!(attempt.outcome, "succeeded");
    assert_eq!(attempt.agent_id, agent.as_uuid());
    assert_eq!(attempt.exit_code, Some(0));
    assert_eq!(Some(attempt.leased_at), running.leased_at);
    assert_eq!(attempt.started_at, running.started_at);
    assert!(attempt.ended_at >= attempt.leased_at);
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        0,
        "success frees the slot"
    );

    let again = db::leases::succeed(&mut conn, id, lease.epoch as u64, Some(0)).await;
    assert_invalid_from(&again, JobStatus::Succeeded);
    assert_eq!(attempts_of(&mut conn, id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_statement_of_several_agents_successes_records_each_only_for_its_holder_at_its_epoch() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (first, second) = (AgentId::new(), AgentId::new());
    let mut leases = Vec::new();
    for holder in [first, second, second, first] {
        let id = create_one(&mut conn, &org, job("echo")).await.job_id();
        leases.push((
            id,
            lease_and_start(&mut conn, id, holder).await.epoch as u64,
        ));
    }
    let success = |(job, epoch): (JobId, u64), holder: AgentId| Success {
        job,
        epoch,
        exit_code: Some(0),
        holder: Some(holder),
    };

    let recorded = db::leases::succeed_each(
        &mut conn,
        &[
            success(leases[0], first),
            success(leases[1], second),
            // Reported by an agent that does not hold the job.
            success(leases[2], first),
            // An epoch the job never had.
            success((leases[3].0, leases[3].1 + 1), first),
        ],
    )
    .await
    .expect("succeed_each");

    let mut ids: Vec<Uuid> = recorded.iter().map(|s| s.job_id).collect();
    ids.sort();
    let mut expected = vec![leases[0].0.as_uuid(), leases[1].0.as_uuid()];
    expected.sort();
    assert_eq!(ids, expected);
    let statuses: Vec<JobStatus> = {
        let mut statuses = Vec::new();
        for (id, _) in &leases {
            statuses.push(reload(&mut conn, *id).await.status());
        }
        statuses
    };
    assert_eq!(
        statuses,
        [
            JobStatus::Succeeded,
            JobStatus::Succeeded,
            JobStatus::Running,
            JobStatus::Running
        ]
    );
    assert_eq!(attempts_of(&mut conn, leases[2].0).await.len(), 0);
    assert_eq!(
        attempts_of(&mut conn, leases[1].0).await[0].agent_id,
        second.as_uuid()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn extend_leases_extends_only_leases_the_agent_holds_at_their_epoch() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (agent, other_agent) = (AgentId::new(), AgentId::new());
    let held = create_one(&mut conn, &org, job("held")).await.job_id();
    let wrong_epoch = create_one(&mut conn, &org, job("wrong epoch"))
        .await
        .job_id();
    let others = create_one(&mut conn, &org, job("another agent's"))
        .await
        .job_id();
    let unacked = create_one(&mut conn, &org, job("not started"))
        .await
        .job_id();
    let held_lease = lease_and_start(&mut conn, held, agent).await;
    let wrong_lease = lease_and_start(&mut conn, wrong_epoch, agent).await;
    let others_lease = lease_and_start(&mut conn, others, other_agent).await;
    let unacked_lease = db::leases::lease_job(&mut conn, unacked, agent, ACK)
        .await
        .expect("lease");
    let before = [
        reload(&mut conn, wrong_epoch).await,
        reload(&mut conn, others).await,
        reload(&mut conn, unacked).await,
    ];
    let hour = Duration::from_secs(3_600);
    let called_at = Utc::now();

    let extended = db::leases::extend_leases(
        &mut conn,
        agent,
        &[
            (held, held_lease.epoch as u64),
            (wrong_epoch, wrong_lease.epoch as u64 + 1),
            (others, others_lease.epoch as u64),
            (unacked, unacked_lease.epoch as u64),
        ],
        hour,
    )
    .await
    .expect("extend");

    assert_eq!(extended.len(), 1, "{extended:?}");
    assert_eq!((extended[0].job_id, extended[0].epoch), (held.as_uuid(), 1));
    assert!(!extended[0].cancel_requested);
    support::assert_between(
        extended[0].expires_at,
        called_at + support::secs(3_600),
        Utc::now() + support::secs(3_600),
    );
    assert_eq!(
        reload(&mut conn, held).await.lease_expires_at,
        Some(extended[0].expires_at)
    );
    let after = [
        reload(&mut conn, wrong_epoch).await,
        reload(&mut conn, others).await,
        reload(&mut conn, unacked).await,
    ];
    assert_eq!(
        after, before,
        "leases not held at that epoch by that agent are untouched"
    );
    assert!(
        db::leases::extend_leases(&mut conn, agent, &[], hour)
            .await
            .expect("nothing to extend")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_reports_a_cancel_requested_by_an_operator() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let agent = AgentId::new();
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();
    let lease = lease_and_start(&mut conn, id, agent).await;
    db::leases::operate(&mut conn, &org, id, OperatorAction::Cancel { grace: TTL })
        .await
        .expect("cancel");

    let extended = db::leases::extend_leases(&mut conn, agent, &[(id, lease.epoch as u64)], TTL)
        .await
        .expect("extend");

    assert_eq!(extended.len(), 1);
    assert!(extended[0].cancel_requested);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_attempt_is_queued_again_after_a_backoff_within_the_ceiling() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let policy = RetryPolicy {
        initial_interval_ms: 600_000,
        maximum_attempts: 3,
        ..RetryPolicy::default()
    };
    let mut new = support::with_key(job("flaky"), "deploy", 1);
    new.retry_policy = policy.clone();
    let id = create_one(&mut conn, &org, new).await.job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;
    let before = Utc::now();

    let ended =
        db::leases::end_attempt(&mut conn, id, Some(lease.epoch as u64), failed(2, "flaky"))
            .await
            .expect("fail");

    let after = Utc::now();
    let ceiling = chrono::Duration::from_std(policy.delay_ceiling(1)).expect("ceiling");
    assert_eq!(ended.status, JobStatus::Queued);
    let retry_at = ended.retry_at.expect("retry time");
    support::assert_between(retry_at, before, after + ceiling);
    let row = reload(&mut conn, id).await;
    assert_eq!(row.status(), JobStatus::Queued);
    assert_eq!((row.app_failures, row.infra_failures), (1, 0));
    assert_eq!(row.lease_epoch, 1);
    support::assert_between(row.run_at, retry_at, retry_at);
    assert_eq!(row.exit_code, Some(2));
    assert_eq!(row.error_kind.as_deref(), Some("flaky"));
    assert!(row.lease_expires_at.is_none());
    let attempts = attempts_of(&mut conn, id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "failed");
    assert_eq!(attempts[0].exit_code, Some(2));
    assert_eq!(attempts[0].error_kind.as_deref(), Some("flaky"));
    assert_eq!(attempts[0].error_message.as_deref(), Some("exit 2"));
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        0,
        "the failed attempt's slot is freed"
    );
    // The backoff holds: the job is not leasable before its retry time
    // (a zero delay has probability ~1e-5 with a ten-minute ceiling).
    let early = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;
    assert!(early.is_err(), "leased before its backoff: {early:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_goes_dead_after_maximum_attempts_and_redrive_queues_it() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = job("always fails");
    new.retry_policy = support::no_backoff(2);
    let id = create_one(&mut conn, &org, new).await.job_id();

    let first = lease_and_start(&mut conn, id, AgentId::new()).await;
    let after_first =
        db::leases::end_attempt(&mut conn, id, Some(first.epoch as u64), failed(1, "boom"))
            .await
            .expect("first failure");
    let second = lease_and_start(&mut conn, id, AgentId::new()).await;
    let after_second =
        db::leases::end_attempt(&mut conn, id, Some(second.epoch as u64), failed(1, "boom"))
            .await
            .expect("second failure");

    assert_eq!(after_first.status, JobStatus::Queued);
    assert_eq!(second.attempt, 2);
    assert_eq!(after_second.status, JobStatus::Dead);
    assert_eq!(after_second.retry_at, None);
    let dead = reload(&mut conn, id).await;
    assert_eq!(dead.status(), JobStatus::Dead);
    assert_eq!(dead.app_failures, 2);
    assert!(dead.finished_at.is_some());
    let attempts: Vec<_> = attempts_of(&mut conn, id)
        .await
        .into_iter()
        .map(|a| (a.epoch, a.attempt, a.outcome))
        .collect();
    assert_eq!(
        attempts,
        [(1, 1, "failed".to_owned()), (2, 2, "failed".to_owned())]
    );
    let leased = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;
    assert_invalid_from(&leased, JobStatus::Dead);

    let redriven = db::leases::operate(&mut conn, &org, id, OperatorAction::Redrive)
        .await
        .expect("redrive");

    assert_eq!(redriven.status(), JobStatus::Queued);
    assert_eq!((redriven.app_failures, redriven.infra_failures), (0, 0));
    assert_eq!(
        redriven.lease_epoch, 2,
        "the epoch is kept so old writes stay stale"
    );
    assert!(redriven.finished_at.is_none());
    let third = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease again");
    assert_eq!((third.epoch, third.attempt), (3, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_retryable_error_fails_the_job_and_an_operator_can_retry_it() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = job("bad input");
    new.retry_policy = RetryPolicy {
        non_retryable_error_kinds: vec!["bad_input".into()],
        ..support::no_backoff(5)
    };
    let id = create_one(&mut conn, &org, new).await.job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;

    let ended = db::leases::end_attempt(
        &mut conn,
        id,
        Some(lease.epoch as u64),
        failed(3, "bad_input"),
    )
    .await
    .expect("fail");

    assert_eq!(ended.status, JobStatus::Failed);
    let redrive = db::leases::operate(&mut conn, &org, id, OperatorAction::Redrive).await;
    assert_invalid_from(&redrive, JobStatus::Failed);
    let retried = db::leases::operate(&mut conn, &org, id, OperatorAction::Retry)
        .await
        .expect("retry");
    assert_eq!(retried.status(), JobStatus::Queued);
    assert_eq!(retried.app_failures, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_unacknowledged_lease_is_requeued_without_counting_a_failure() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, support::with_key(job("echo"), "deploy", 1))
        .await
        .job_id();
    let lease = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease");

    let ended = db::leases::end_attempt(
        &mut conn,
        id,
        Some(lease.epoch as u64),
        Ending::Lost(InfraReason::LeaseExpired),
    )
    .await
    .expect("lost");

    assert_eq!(ended.status, JobStatus::Queued);
    let row = reload(&mut conn, id).await;
    assert_eq!(row.status(), JobStatus::Queued);
    assert_eq!((row.app_failures, row.infra_failures), (0, 0));
    assert!(row.run_at <= Utc::now(), "requeued for immediate use");
    assert!(
        attempts_of(&mut conn, id).await.is_empty(),
        "an unacknowledged lease is no attempt"
    );
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        0
    );
    let next = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK)
        .await
        .expect("lease again");
    assert_eq!((next.epoch, next.attempt), (2, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_running_lease_counts_an_infrastructure_failure() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;

    let ended = db::leases::end_attempt(
        &mut conn,
        id,
        Some(lease.epoch as u64),
        Ending::Lost(InfraReason::LeaseExpired),
    )
    .await
    .expect("lost");

    assert_eq!(ended.status, JobStatus::Queued);
    let row = reload(&mut conn, id).await;
    assert_eq!((row.app_failures, row.infra_failures), (0, 1));
    let attempts = attempts_of(&mut conn, id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_released_job_is_queued_again_after_its_delay_without_a_failure() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;
    let before = Utc::now();

    let ended = db::leases::end_attempt(
        &mut conn,
        id,
        Some(lease.epoch as u64),
        Ending::Released {
            delay: Duration::from_secs(30),
        },
    )
    .await
    .expect("release");

    let after = Utc::now();
    assert_eq!(ended.status, JobStatus::Queued);
    let row = reload(&mut conn, id).await;
    assert_eq!(row.status(), JobStatus::Queued);
    assert_eq!((row.app_failures, row.infra_failures), (0, 0));
    support::assert_between(
        row.run_at,
        before + support::secs(30),
        after + support::secs(30),
    );
    let attempts = attempts_of(&mut conn, id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "released");
    let early = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;
    assert!(early.is_err(), "leased before its release delay: {early:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ending_an_attempt_with_a_stale_epoch_changes_nothing() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = support::with_key(job("echo"), "deploy", 1);
    new.retry_policy = support::no_backoff(3);
    let id = create_one(&mut conn, &org, new).await.job_id();
    let old = lease_and_start(&mut conn, id, AgentId::new()).await;
    release(&mut conn, id, old.epoch).await;
    lease_and_start(&mut conn, id, AgentId::new()).await;
    let before = reload(&mut conn, id).await;

    let failed =
        db::leases::end_attempt(&mut conn, id, Some(old.epoch as u64), failed(1, "late")).await;
    let lost = db::leases::end_attempt(
        &mut conn,
        id,
        Some(old.epoch as u64),
        Ending::Lost(InfraReason::AgentVanished),
    )
    .await;

    assert_stale(&failed, 1, 2);
    assert_stale(&lost, 1, 2);
    assert_eq!(reload(&mut conn, id).await, before);
    assert_eq!(
        attempts_of(&mut conn, id).await.len(),
        1,
        "only the released attempt"
    );
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_queued_job_cancels_it_at_once() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("echo")).await.job_id();

    let cancelled = db::leases::operate(&mut conn, &org, id, OperatorAction::Cancel { grace: TTL })
        .await
        .expect("cancel");

    assert_eq!(cancelled.status(), JobStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());
    assert!(cancelled.cancel_deadline_at.is_none());
    let lease = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;
    assert_invalid_from(&lease, JobStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_running_job_waits_for_the_agent_to_acknowledge() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, support::with_key(job("echo"), "deploy", 1))
        .await
        .job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;
    let before = Utc::now();

    let requested = db::leases::operate(
        &mut conn,
        &org,
        id,
        OperatorAction::Cancel {
            grace: Duration::from_secs(45),
        },
    )
    .await
    .expect("cancel");

    let after = Utc::now();
    assert_eq!(requested.status(), JobStatus::CancelRequested);
    assert_eq!(requested.cancel_reason.as_deref(), Some("user"));
    assert_eq!(requested.lease_epoch, lease.epoch);
    support::assert_between(
        requested.cancel_requested_at.expect("requested at"),
        before,
        after,
    );
    support::assert_between(
        requested.cancel_deadline_at.expect("cancel deadline"),
        before + support::secs(45),
        after + support::secs(45),
    );
    // Asking again changes nothing, in particular not the deadline.
    let again = db::leases::operate(&mut conn, &org, id, OperatorAction::Cancel { grace: TTL })
        .await
        .expect("cancel again");
    assert_eq!(again.cancel_deadline_at, requested.cancel_deadline_at);

    let ended = db::leases::end_attempt(
        &mut conn,
        id,
        Some(lease.epoch as u64),
        Ending::CancelAcknowledged,
    )
    .await
    .expect("acknowledge");

    assert_eq!(ended.status, JobStatus::Cancelled);
    let row = reload(&mut conn, id).await;
    assert_eq!(row.status(), JobStatus::Cancelled);
    assert!(row.finished_at.is_some());
    assert!(row.cancel_deadline_at.is_none());
    let outcomes: Vec<_> = attempts_of(&mut conn, id)
        .await
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, ["cancelled"]);
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_the_agent_never_acknowledges_is_forced() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, support::with_key(job("echo"), "deploy", 1))
        .await
        .job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;
    // Forcing needs a pending cancel.
    let premature = db::leases::end_attempt(&mut conn, id, None, Ending::CancelForced).await;
    assert_invalid_from(&premature, JobStatus::Running);
    db::leases::operate(&mut conn, &org, id, OperatorAction::Cancel { grace: TTL })
        .await
        .expect("cancel");

    let ended = db::leases::end_attempt(&mut conn, id, None, Ending::CancelForced)
        .await
        .expect("force");

    assert_eq!(ended.status, JobStatus::Cancelled);
    let row = reload(&mut conn, id).await;
    assert_eq!(row.status(), JobStatus::Cancelled);
    assert_eq!(row.lease_epoch, lease.epoch);
    let outcomes: Vec<_> = attempts_of(&mut conn, id)
        .await
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, ["cancelled"]);
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM concurrency_slots").await,
        0,
        "a forced cancel frees the slot"
    );
    let late = db::leases::succeed(&mut conn, id, lease.epoch as u64, Some(0)).await;
    assert_invalid_from(&late, JobStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn approving_queues_a_job_and_rejecting_cancels_it() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let mut new = job("echo");
    new.requires_approval = true;
    let to_approve = create_one(&mut conn, &org, new.clone()).await.job_id();
    let to_reject = create_one(&mut conn, &org, new).await.job_id();

    let foreign =
        db::leases::operate(&mut conn, &globex, to_approve, OperatorAction::Approve).await;
    let approved = db::leases::operate(&mut conn, &org, to_approve, OperatorAction::Approve)
        .await
        .expect("approve");
    let rejected = db::leases::operate(&mut conn, &org, to_reject, OperatorAction::Reject)
        .await
        .expect("reject");

    assert!(matches!(foreign, Err(DbError::NotFound)), "got {foreign:?}");
    assert_eq!(approved.status(), JobStatus::Queued);
    assert!(approved.queued_at.is_some());
    assert_eq!(rejected.status(), JobStatus::Cancelled);
    assert!(rejected.finished_at.is_some());
    let twice = db::leases::operate(&mut conn, &org, to_approve, OperatorAction::Approve).await;
    assert_invalid_from(&twice, JobStatus::Queued);
    let reject_queued =
        db::leases::operate(&mut conn, &org, to_approve, OperatorAction::Reject).await;
    assert_invalid_from(&reject_queued, JobStatus::Queued);
    db::leases::lease_job(&mut conn, to_approve, AgentId::new(), ACK)
        .await
        .expect("an approved job can be leased");
}

#[tokio::test(flavor = "multi_thread")]
async fn approving_a_scheduled_job_keeps_its_run_at() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let later = Utc::now() + support::secs(3_600);
    let mut new = job("nightly deploy");
    new.requires_approval = true;
    new.run_at = Some(later);
    let id = create_one(&mut conn, &org, new).await.job_id();

    let approved = db::leases::operate(&mut conn, &org, id, OperatorAction::Approve)
        .await
        .expect("approve");

    support::assert_between(approved.run_at, later, later);
    let early = db::leases::lease_job(&mut conn, id, AgentId::new(), ACK).await;
    assert!(early.is_err(), "a job scheduled in an hour was leased now");
}

#[derive(diesel::QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
    line: String,
}

/// The scheduler keeps the statement prepared from its first wait, often
/// while `jobs` is empty, and reuses that plan as the table fills: it must
/// read `jobs_delayed`, never the ready set.
#[tokio::test]
async fn the_next_run_at_is_planned_over_the_delayed_index_even_on_an_empty_table() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let plan: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN {}", db::sweeps::NEXT_RUN_AT))
        .load(&mut conn)
        .await
        .expect("explain");
    let plan: Vec<String> = plan.into_iter().map(|l| l.line).collect();
    assert!(
        plan.iter().any(|l| l.contains("jobs_delayed"))
            && !plan.iter().any(|l| l.contains("jobs_ready")),
        "{plan:#?}"
    );
}

#[tokio::test]
async fn the_next_run_at_names_delayed_jobs_and_backoffs_not_jobs_due_now() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    create_one(&mut conn, &org, job("due now")).await;
    assert_eq!(
        db::sweeps::next_run_at(&mut conn).await.expect("next"),
        None
    );

    let mut later = job("in an hour");
    let in_an_hour = Utc::now() + support::secs(3600);
    later.run_at = Some(in_an_hour);
    create_one(&mut conn, &org, later).await;
    let next = db::sweeps::next_run_at(&mut conn).await.expect("next");
    support::assert_between(next.expect("a delayed job"), in_an_hour, in_an_hour);

    // A released job waits out its delay: sooner than the delayed job.
    let id = create_one(&mut conn, &org, job("given back"))
        .await
        .job_id();
    let lease = lease_and_start(&mut conn, id, AgentId::new()).await;
    let before = Utc::now();
    let delay = Duration::from_secs(60);
    db::leases::end_attempt(
        &mut conn,
        id,
        Some(lease.epoch as u64),
        Ending::Released { delay },
    )
    .await
    .expect("release");
    let next = db::sweeps::next_run_at(&mut conn)
        .await
        .expect("next")
        .expect("the backoff");
    support::assert_between(
        next,
        before + support::secs(60),
        Utc::now() + support::secs(60),
    );
}
