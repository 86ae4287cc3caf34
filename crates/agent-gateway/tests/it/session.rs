//! The gRPC session, spoken message by message.

use std::time::{Duration, Instant};

use domain::JobId;
use domain::agent::AgentStatus;
use domain::events::Event;
use domain::job::JobStatus;
use futures_util::StreamExt;
use test_support::{TestDb, TestRedis};
use yard_proto::v1 as pb;
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn register_session_assignment_logs_result_job_succeeds() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;

    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    assert_eq!(session.welcome.agent_id, agent.id.to_string());
    assert_eq!(session.welcome.heartbeat_interval_ms, 200);
    wait_online(&db, agent.id).await;

    let job = submit(&db, "echo hello").await;
    let lease = offer(&db, &bus, job, agent.id).await;
    let assignment = session.assignment().await;
    assert_eq!(assignment.job_id, job.to_string());
    assert_eq!(assignment.epoch, lease.epoch as u64);
    assert_eq!(assignment.attempt, 1);
    let spec = assignment.spec.expect("spec");
    assert_eq!(spec.command.as_deref(), Some("echo hello"));
    assert_eq!(spec.metadata_json, r#"{"ticket":"T-1"}"#);
    let epoch = assignment.epoch;

    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    let update = session
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) => Some(u),
            _ => None,
        })
        .await;
    assert_eq!(update.epoch, epoch);
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Running);

    // Two chunks, then the first resent: stored once, sequence contiguous.
    session.send(chunk(job, epoch, 0, "line 1\nline 2\n")).await;
    session.send(chunk(job, epoch, 14, "line 3\n")).await;
    session.send(chunk(job, epoch, 0, "line 1\nline 2\n")).await;
    let mut acks = Vec::new();
    while acks.len() < 3 {
        if let ServerMsg::LogAck(ack) = session.next().await {
            acks.push(ack.committed_offset);
        }
    }
    assert_eq!(acks, [14, 21, 21]);
    let lines = log_lines(&db, job).await;
    assert_eq!(
        lines,
        [
            (1, "line 1".to_owned()),
            (2, "line 2".to_owned()),
            (3, "line 3".to_owned())
        ]
    );

    session
        .send(AgentMsg::Heartbeat(pb::Heartbeat {
            running: vec![pb::RunningJob {
                job_id: job.to_string(),
                epoch,
                log_offset: 21,
            }],
        }))
        .await;
    let renewed = session
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) => Some(u),
            _ => None,
        })
        .await;
    assert!(!renewed.cancel_requested);

    session.send(result(job, epoch, 0)).await;
    let ack = session
        .next_where(|m| match m {
            ServerMsg::ResultAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(ack.status, "succeeded");
    let row = job_row(&db, job).await;
    assert_eq!(row.status(), JobStatus::Succeeded);
    assert_eq!(row.exit_code, Some(0));

    // The same result again (a resend after a reconnect) is harmless.
    session.send(result(job, epoch, 0)).await;
    let again = session
        .next_where(|m| match m {
            ServerMsg::ResultAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(again.status, "succeeded");
    gateway.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_with_a_stale_epoch_is_answered_stale_and_changes_nothing() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;

    let job = submit(&db, "true").await;
    offer(&db, &bus, job, agent.id).await;
    let old = session.assignment().await.epoch;
    // The agent never acknowledges; the lease is given back and re-leased.
    {
        let mut conn = db.conn().await;
        db::leases::end_attempt(
            &mut conn,
            job,
            Some(old),
            db::leases::Ending::Released {
                delay: Duration::ZERO,
            },
        )
        .await
        .expect("release");
    }
    let current = offer(&db, &bus, job, agent.id).await.epoch as u64;
    assert_eq!(current, old + 1);
    let before = job_row(&db, job).await;

    for stale_write in [
        AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch: old,
            trace: None,
        }),
        chunk(job, old, 0, "ghost\n"),
        result(job, old, 0),
    ] {
        session.send(stale_write).await;
        let stale = session
            .next_where(|m| match m {
                ServerMsg::Stale(s) => Some(s),
                _ => None,
            })
            .await;
        assert_eq!(stale.job_id, job.to_string());
        assert_eq!(stale.your_epoch, old);
        assert_eq!(stale.current_epoch, current);
    }
    let after = job_row(&db, job).await;
    assert_eq!(after.status(), JobStatus::Leased);
    assert_eq!(after.lease_epoch, before.lease_epoch);
    assert_eq!(after.updated_at, before.updated_at);
    assert!(log_lines(&db, job).await.is_empty());

    // The session is still up: the current epoch works.
    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch: current,
            trace: None,
        }))
        .await;
    session
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) if u.epoch == current => Some(u),
            _ => None,
        })
        .await;
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Running);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_a_clear_code_and_the_session_stays_up() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;

    let unknown = domain::JobId::new();
    session.send(chunk(unknown, 1, 0, "x\n")).await;
    let ServerMsg::Error(error) = session.next().await else {
        panic!("expected an error");
    };
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert!(error.message.contains("unknown job"), "{}", error.message);

    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: "not-a-uuid".into(),
            epoch: 1,
            trace: None,
        }))
        .await;
    let ServerMsg::Error(error) = session.next().await else {
        panic!("expected an error");
    };
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert!(error.message.contains("not a UUID"), "{}", error.message);

    session
        .tx
        .send(pb::AgentMessage { msg: None })
        .await
        .expect("send");
    let ServerMsg::Error(error) = session.next().await else {
        panic!("expected an error");
    };
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);

    let job = submit(&db, "true").await;
    let epoch = offer(&db, &bus, job, agent.id).await.epoch as u64;
    session.assignment().await;
    let oversized = "x".repeat(70_000);
    session.send(chunk(job, epoch, 0, &oversized)).await;
    let ServerMsg::Error(error) = session.next().await else {
        panic!("expected an error");
    };
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert!(
        error.message.contains("exceeds the limit"),
        "{}",
        error.message
    );

    // A result for a job that is merely leased (never acknowledged) is a
    // failed precondition.
    session
        .send(AgentMsg::CancelAck(pb::CancelAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    let ServerMsg::Error(error) = session.next().await else {
        panic!("expected an error");
    };
    assert_eq!(error.code, tonic::Code::FailedPrecondition as i32);

    // Still serving this agent.
    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    session
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) => Some(u),
            _ => None,
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_without_a_valid_secret_is_unauthenticated() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gateway = start(&db, redis.url(), redis.prefix());
    let error = RawSession::try_open(&gateway.grpc_url(), "sya_wrong", vec![])
        .await
        .err()
        .expect("refused");
    assert_eq!(error.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_agent_ends_its_session_within_a_second() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;

    {
        let mut conn = db.conn().await;
        db::agents::revoke(&mut conn, &org(), agent.id)
            .await
            .expect("revoke");
    }
    let revoked_at = Instant::now();
    publish_to_agent(&bus, agent.id, Event::AgentRevoked { agent_id: agent.id }).await;
    let ended = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match session.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("session ended within a second");
    assert_eq!(
        ended.expect("ended with a status").code(),
        tonic::Code::Unauthenticated
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // And it cannot come back.
    let again = RawSession::try_open(&gateway.grpc_url(), &agent.secret, vec![])
        .await
        .err()
        .expect("refused");
    assert_eq!(again.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disconnected_agent_goes_offline_after_the_grace_unless_it_is_back() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;

    // Disconnect and reconnect at once: still online after the grace.
    let first = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;
    drop(first);
    let second = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(agent_status(&db, agent.id).await, AgentStatus::Online);

    drop(second);
    eventually("agent offline", || async {
        agent_status(&db, agent.id).await == AgentStatus::Offline
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_drain_are_pushed_to_the_session() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;
    let job = submit(&db, "sleep 600").await;
    let epoch = offer(&db, &bus, job, agent.id).await.epoch as u64;
    session.assignment().await;
    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    eventually("running", || async {
        job_row(&db, job).await.status() == JobStatus::Running
    })
    .await;

    // What job-api does for a cancel.
    {
        let mut conn = db.conn().await;
        db::leases::operate(
            &mut conn,
            &org(),
            job,
            db::leases::OperatorAction::Cancel {
                grace: Duration::from_secs(5),
            },
        )
        .await
        .expect("cancel");
    }
    publish_to_agent(
        &bus,
        agent.id,
        Event::CancelRequested {
            agent_id: agent.id,
            job_id: job,
            epoch,
            grace_ms: 5000,
        },
    )
    .await;
    let cancel = session
        .next_where(|m| match m {
            ServerMsg::Cancel(c) => Some(c),
            _ => None,
        })
        .await;
    assert_eq!(cancel.grace_period_ms, 5000);
    // The heartbeat reply also says so (repairs a lost push).
    session
        .send(AgentMsg::Heartbeat(pb::Heartbeat {
            running: vec![pb::RunningJob {
                job_id: job.to_string(),
                epoch,
                log_offset: 0,
            }],
        }))
        .await;
    let update = session
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) => Some(u),
            _ => None,
        })
        .await;
    assert!(update.cancel_requested);
    session
        .send(AgentMsg::CancelAck(pb::CancelAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    let ack = session
        .next_where(|m| match m {
            ServerMsg::ResultAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(ack.status, "cancelled");
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Cancelled);

    publish_to_agent(&bus, agent.id, Event::DrainRequested { agent_id: agent.id }).await;
    session
        .next_where(|m| match m {
            ServerMsg::Drain(d) => Some(d),
            _ => None,
        })
        .await;
    session.send(AgentMsg::Draining(pb::Draining {})).await;
    eventually("draining", || async {
        agent_status(&db, agent.id).await == AgentStatus::Draining
    })
    .await;
}

/// Two gateways on one database and Redis, an agent in session on the
/// first, and a job assigned to it there (not yet acknowledged).
struct AssignedOnFirst {
    db: TestDb,
    _redis: TestRedis,
    first: TestGateway,
    second: TestGateway,
    agent: Registered,
    session: RawSession,
    job: domain::JobId,
    epoch: u64,
}

async fn assigned_on_the_first_of_two_gateways(command: &str) -> AssignedOnFirst {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let first = start(&db, redis.url(), redis.prefix());
    let second = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&first, &token, "runner-1").await;
    let mut session = RawSession::open(&first.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;
    let job = submit(&db, command).await;
    let epoch = offer(&db, &bus, job, agent.id).await.epoch as u64;
    session.assignment().await;
    AssignedOnFirst {
        db,
        _redis: redis,
        first,
        second,
        agent,
        session,
        job,
        epoch,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_resumes_on_another_gateway_with_the_same_epoch() {
    let AssignedOnFirst {
        db,
        _redis,
        first,
        second,
        agent,
        mut session,
        job,
        epoch,
    } = assigned_on_the_first_of_two_gateways("long job").await;
    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    session.send(chunk(job, epoch, 0, "before\n")).await;
    session
        .next_where(|m| match m {
            ServerMsg::LogAck(a) if a.committed_offset == 7 => Some(a),
            _ => None,
        })
        .await;

    // The first gateway dies; the agent comes back on the second.
    first.stop().await.expect("first gateway stops");
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match session.rx.message().await {
                Ok(Some(_)) => continue,
                other => return other.err(),
            }
        }
    })
    .await
    .expect("session ends");
    assert_eq!(ended.map(|s| s.code()), Some(tonic::Code::Unavailable));

    let mut resumed = RawSession::open(
        &second.grpc_url(),
        &agent.secret,
        vec![pb::RunningJob {
            job_id: job.to_string(),
            epoch,
            log_offset: 15,
        }],
    )
    .await;
    assert_ne!(resumed.welcome.gateway_id, "");
    let lease = resumed
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) => Some(u),
            _ => None,
        })
        .await;
    assert_eq!(lease.epoch, epoch);
    let log_ack = resumed
        .next_where(|m| match m {
            ServerMsg::LogAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(
        log_ack.committed_offset, 7,
        "resume logs from the committed offset"
    );
    resumed.send(chunk(job, epoch, 7, "after\n")).await;
    resumed.send(result(job, epoch, 0)).await;
    let ack = resumed
        .next_where(|m| match m {
            ServerMsg::ResultAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(ack.status, "succeeded");
    let row = job_row(&db, job).await;
    assert_eq!(row.lease_epoch as u64, epoch, "the same attempt finished");
    assert_eq!(row.app_failures + row.infra_failures, 0);
    assert_eq!(
        log_lines(&db, job).await,
        [(1, "before".to_owned()), (2, "after".to_owned())]
    );
    // The old gateway's offline timer does not touch the new session.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(agent_status(&db, agent.id).await, AgentStatus::Online);
}

/// The gateway holding the session dies before it stores the agent's
/// acknowledgement: the job is still `leased` when the agent, which runs
/// it, resumes elsewhere. The resume stands for the acknowledgement.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_acknowledges_an_assignment_whose_ack_was_lost() {
    let AssignedOnFirst {
        db,
        _redis,
        first,
        second,
        agent,
        session,
        job,
        epoch,
    } = assigned_on_the_first_of_two_gateways("acked job").await;
    first.stop().await.expect("first gateway stops");
    drop(session);
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Leased);

    let mut resumed = RawSession::open(
        &second.grpc_url(),
        &agent.secret,
        vec![pb::RunningJob {
            job_id: job.to_string(),
            epoch,
            log_offset: 0,
        }],
    )
    .await;
    let lease = resumed
        .next_where(|m| match m {
            ServerMsg::LeaseUpdate(u) => Some(Ok(u)),
            ServerMsg::Stale(s) => Some(Err(s)),
            _ => None,
        })
        .await
        .expect("the lease is renewed, not declared stale");
    assert_eq!(lease.epoch, epoch);
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Running);
    resumed.send(result(job, epoch, 0)).await;
    let ack = resumed
        .next_where(|m| match m {
            ServerMsg::ResultAck(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(ack.status, "succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_and_reflection_answer() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gateway = start(&db, redis.url(), redis.prefix());
    let channel = tonic::transport::Endpoint::from_shared(gateway.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "switchyard.agent.v1.AgentGateway".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"switchyard.agent.v1.AgentGateway".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

fn ack(job: JobId, epoch: u64) -> AgentMsg {
    AgentMsg::AssignmentAck(pb::AssignmentAck {
        job_id: job.to_string(),
        epoch,
        trace: None,
    })
}

/// Acks and results sent back to back reach the gateway together and are
/// recorded in one statement per kind: each still gets its own answer, a
/// stale one among them is refused, a repeated result changes nothing,
/// and a job's ack, log and result keep their order.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_acks_and_results_is_answered_one_by_one() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;

    let mut jobs = Vec::new();
    for n in 0..6 {
        let job = submit(&db, &format!("echo {n}")).await;
        let lease = offer(&db, &bus, job, agent.id).await;
        jobs.push((job, lease.epoch as u64));
    }
    for _ in 0..jobs.len() {
        session.assignment().await;
    }

    for (job, epoch) in &jobs {
        session.send(ack(*job, *epoch)).await;
    }
    let (stale_job, stale_epoch) = (jobs[0].0, jobs[0].1 + 5);
    session.send(ack(stale_job, stale_epoch)).await;
    let mut updated = Vec::new();
    let mut stale = Vec::new();
    while updated.len() < jobs.len() || stale.is_empty() {
        match session.next().await {
            ServerMsg::LeaseUpdate(update) => updated.push((update.job_id, update.epoch)),
            ServerMsg::Stale(refused) => stale.push((refused.job_id, refused.your_epoch)),
            _ => {}
        }
    }
    updated.sort();
    let mut expected: Vec<(String, u64)> = jobs
        .iter()
        .map(|(job, epoch)| (job.to_string(), *epoch))
        .collect();
    expected.sort();
    assert_eq!(updated, expected, "one lease update per ack");
    assert_eq!(stale, [(stale_job.to_string(), stale_epoch)]);

    // The last job logs between its ack and its result, in the same burst.
    let (logging, logging_epoch) = jobs[5];
    session
        .send(chunk(logging, logging_epoch, 0, "last words\n"))
        .await;
    for (job, epoch) in &jobs {
        session.send(result(*job, *epoch, 0)).await;
    }
    session.send(result(jobs[1].0, jobs[1].1, 0)).await;
    let mut answered = Vec::new();
    while answered.len() < jobs.len() + 1 {
        if let ServerMsg::ResultAck(done) = session.next().await {
            assert_eq!(done.status, "succeeded", "{done:?}");
            answered.push(done.job_id);
        }
    }
    answered.sort();
    let mut expected: Vec<String> = jobs.iter().map(|(job, _)| job.to_string()).collect();
    expected.push(jobs[1].0.to_string());
    expected.sort();
    assert_eq!(answered, expected, "one answer per result, the repeat too");

    let mut conn = db.conn().await;
    for (job, epoch) in &jobs {
        assert_eq!(job_row(&db, *job).await.status(), JobStatus::Succeeded);
        let attempts: i64 = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query("SELECT count(*) AS count FROM attempts WHERE job_id = $1")
                .bind::<diesel::sql_types::Uuid, _>(job.as_uuid()),
            &mut conn,
        )
        .await
        .map(|row: Count| row.count)
        .expect("count attempts");
        assert_eq!(attempts, 1, "job {job} epoch {epoch}: one attempt row");
    }
    let stored: Vec<String> = log_lines(&db, logging)
        .await
        .into_iter()
        .map(|(_, line)| line)
        .collect();
    assert_eq!(stored, ["last words"], "the log stored before the result");
}

/// An ack sent together with its attempt's success needs no write of its
/// own: the success records both. Either way the agent hears one
/// `ResultAck` per job and no `Stale`, the attempt has its start time, and
/// watchers hear `running` before `succeeded`. A job whose heartbeat comes
/// between its ack and its result is started first, so the heartbeat
/// finds it running.
#[tokio::test(flavor = "multi_thread")]
async fn an_ack_sent_with_its_result_is_recorded_by_the_result() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;

    let quick = submit(&db, "true").await;
    let quick_epoch = offer(&db, &bus, quick, agent.id).await.epoch as u64;
    let beating = submit(&db, "true").await;
    let beating_epoch = offer(&db, &bus, beating, agent.id).await.epoch as u64;
    session.assignment().await;
    session.assignment().await;
    let mut statuses = bus
        .subscribe(&[bus::Channel::Job(quick)])
        .await
        .expect("subscribe");

    session.send(ack(quick, quick_epoch)).await;
    session.send(result(quick, quick_epoch, 0)).await;
    session.send(ack(beating, beating_epoch)).await;
    session
        .send(AgentMsg::Heartbeat(pb::Heartbeat {
            running: vec![pb::RunningJob {
                job_id: beating.to_string(),
                epoch: beating_epoch,
                log_offset: 0,
            }],
        }))
        .await;
    session.send(result(beating, beating_epoch, 0)).await;
    let mut answered = Vec::new();
    while answered.len() < 2 {
        match session.next().await {
            ServerMsg::ResultAck(done) => {
                assert_eq!(done.status, "succeeded", "{done:?}");
                answered.push(done.job_id);
            }
            ServerMsg::Stale(stale) => panic!("a stale answer: {stale:?}"),
            _ => {}
        }
    }
    answered.sort();
    let mut expected = vec![quick.to_string(), beating.to_string()];
    expected.sort();
    assert_eq!(answered, expected);

    let mut seen = Vec::new();
    while seen.last() != Some(&JobStatus::Succeeded) {
        let envelope = tokio::time::timeout(Duration::from_secs(5), statuses.next())
            .await
            .expect("a status event in time")
            .expect("subscription open");
        if let Event::JobStatusChanged { status, .. } = envelope.event {
            seen.push(status);
        }
    }
    assert_eq!(seen, [JobStatus::Running, JobStatus::Succeeded]);

    let mut conn = db.conn().await;
    for job in [quick, beating] {
        assert_eq!(job_row(&db, job).await.status(), JobStatus::Succeeded);
        let started: Count = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT count(*) AS count FROM attempts \
                 WHERE job_id = $1 AND started_at IS NOT NULL AND outcome = 'succeeded'",
            )
            .bind::<diesel::sql_types::Uuid, _>(job.as_uuid()),
            &mut conn,
        )
        .await
        .expect("count attempts");
        assert_eq!(
            started.count, 1,
            "job {job}: one succeeded attempt with a start time"
        );
    }
}

/// A connected agent and `jobs` jobs leased to it (`echo stored <n>`),
/// offered to nobody yet: the offer tests publish their own offers.
struct OfferFixture {
    bus: bus::Bus,
    agent: Registered,
    session: RawSession,
    leases: Vec<(JobId, db::leases::Lease)>,
    // Kept for the test's lifetime: bind the fixture, then take fields out
    // of it with `..`, so these stay until the end of the test.
    _gateway: TestGateway,
    _redis: TestRedis,
    _db: TestDb,
}

impl OfferFixture {
    async fn start(jobs: usize) -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let bus = bus(redis.url(), redis.prefix());
        let gateway = start(&db, redis.url(), redis.prefix());
        let token = registration_token(&db).await;
        let agent = register(&gateway, &token, "runner-1").await;
        let session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
        wait_online(&db, agent.id).await;
        let mut conn = db.conn().await;
        let mut leases = Vec::new();
        for n in 0..jobs {
            let job = submit(&db, &format!("echo stored {n}")).await;
            let lease = db::leases::lease_job(&mut conn, job, agent.id, ACK_TIMEOUT)
                .await
                .expect("lease");
            leases.push((job, lease));
        }
        drop(conn);
        Self {
            bus,
            agent,
            session,
            leases,
            _gateway: gateway,
            _redis: redis,
            _db: db,
        }
    }
}

/// One message can offer an agent several leases (the scheduler sends one
/// per agent per dispatch): each current one is delivered once, in the
/// trace its own offer carries; a repeat and an outdated epoch are not.
#[tokio::test(flavor = "multi_thread")]
async fn a_batched_offer_delivers_each_current_assignment_once_in_its_own_trace() {
    let fixture = OfferFixture::start(3).await;
    let OfferFixture {
        bus,
        agent,
        mut session,
        leases,
        ..
    } = fixture;
    let mut offers = Vec::new();
    for (n, (job, lease)) in (0u8..).zip(leases) {
        offers.push(domain::events::Offer {
            job_id: job,
            epoch: lease.epoch as u64,
            attempt: lease.attempt as u32,
            lease_expires_at: lease.expires_at,
            trace: Some(domain::events::TraceContext {
                traceparent: format!("00-{:032x}-{:016x}-01", u128::from(n) + 1, 7),
                tracestate: None,
            }),
            job: None,
        });
    }
    let mut sent = offers.clone();
    sent.push(offers[0].clone());
    sent.push(domain::events::Offer {
        epoch: offers[1].epoch + 1,
        ..offers[1].clone()
    });
    publish_to_agent(
        &bus,
        agent.id,
        Event::AssignmentsOffered {
            agent_id: agent.id,
            offers: sent,
        },
    )
    .await;

    let mut delivered = Vec::new();
    for _ in 0..offers.len() {
        let assignment = session.assignment().await;
        let trace_id = assignment
            .trace
            .as_ref()
            .and_then(|t| telemetry::trace_id_in(&t.traceparent).map(str::to_owned));
        delivered.push((assignment.job_id, assignment.epoch, trace_id));
    }
    delivered.sort();
    let mut expected: Vec<(String, u64, Option<String>)> = offers
        .iter()
        .map(|o| {
            let trace = o.trace.as_ref().expect("trace");
            let trace_id = telemetry::trace_id_in(&trace.traceparent).map(str::to_owned);
            (o.job_id.to_string(), o.epoch, trace_id)
        })
        .collect();
    expected.sort();
    assert_eq!(delivered, expected);
    let extra = session.assignment_within(Duration::from_millis(500)).await;
    assert!(extra.is_none(), "delivered again: {extra:?}");
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    count: i64,
}

/// Offers published back to back are delivered together (their jobs read
/// in one statement): each current one once, an outdated one not at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_offers_delivers_each_current_one_once() {
    let fixture = OfferFixture::start(5).await;
    let OfferFixture {
        bus,
        agent,
        mut session,
        leases: offers,
        ..
    } = fixture;
    let outdated = offers[0].0;
    // Every offer, the first one twice, then one for an epoch never leased.
    for (job, lease) in offers.iter().chain([&offers[0]]) {
        let epoch = lease.epoch as u64;
        publish_to_agent(
            &bus,
            agent.id,
            Event::AssignmentOffered {
                agent_id: agent.id,
                job_id: *job,
                epoch,
                attempt: lease.attempt as u32,
                lease_expires_at: lease.expires_at,
                job: None,
            },
        )
        .await;
    }
    publish_to_agent(
        &bus,
        agent.id,
        Event::AssignmentOffered {
            agent_id: agent.id,
            job_id: outdated,
            epoch: offers[0].1.epoch as u64 + 1,
            attempt: 1,
            lease_expires_at: offers[0].1.expires_at,
            job: None,
        },
    )
    .await;

    let mut delivered = Vec::new();
    for _ in 0..offers.len() {
        let assignment = session.assignment().await;
        delivered.push((assignment.job_id, assignment.epoch));
    }
    delivered.sort();
    let mut expected: Vec<(String, u64)> = offers
        .iter()
        .map(|(job, lease)| (job.to_string(), lease.epoch as u64))
        .collect();
    expected.sort();
    assert_eq!(delivered, expected);
    // Neither the repeated offer nor the outdated one is delivered again.
    let extra = session.assignment_within(Duration::from_millis(500)).await;
    assert!(extra.is_none(), "delivered again: {extra:?}");
}

/// An offer that carries its job is handed over as carried, without reading
/// the job back; one whose lease has lapsed as carried is checked against
/// PostgreSQL instead (and an epoch never leased is not delivered).
#[tokio::test(flavor = "multi_thread")]
async fn an_offer_carrying_its_job_is_delivered_as_carried_while_its_lease_lasts() {
    let fixture = OfferFixture::start(2).await;
    let OfferFixture {
        bus,
        agent,
        mut session,
        leases,
        ..
    } = fixture;
    let carried = |command: &str| domain::events::OfferedJob {
        queue: "default".to_owned(),
        payload: serde_json::json!({ "command": command }),
        metadata: serde_json::json!({ "from": "offer" }),
        required_labels: vec!["linux".to_owned()],
        run_timeout_ms: Some(60_000),
        repository_id: None,
        deadline_at: None,
    };
    let (current, lease) = &leases[0];
    publish_to_agent(
        &bus,
        agent.id,
        Event::AssignmentOffered {
            agent_id: agent.id,
            job_id: *current,
            epoch: lease.epoch as u64,
            attempt: lease.attempt as u32,
            lease_expires_at: lease.expires_at,
            job: Some(carried("echo carried")),
        },
    )
    .await;
    let assignment = session.assignment().await;
    assert_eq!(assignment.job_id, current.to_string());
    let spec = assignment.spec.expect("spec");
    assert_eq!(
        spec.command.as_deref(),
        Some("echo carried"),
        "the offer's job, not a read of the stored one"
    );
    assert_eq!(spec.required_labels, vec!["linux".to_owned()]);

    // Lapsed as carried, and for an epoch never leased: PostgreSQL says no.
    let (other, lease) = &leases[1];
    publish_to_agent(
        &bus,
        agent.id,
        Event::AssignmentsOffered {
            agent_id: agent.id,
            offers: vec![
                domain::events::Offer {
                    job_id: *other,
                    epoch: lease.epoch as u64 + 1,
                    attempt: 1,
                    lease_expires_at: chrono::Utc::now() - chrono::Duration::seconds(1),
                    trace: None,
                    job: Some(carried("echo lapsed")),
                },
                // The one delivered already, again.
                domain::events::Offer {
                    job_id: *current,
                    epoch: leases[0].1.epoch as u64,
                    attempt: 1,
                    lease_expires_at: leases[0].1.expires_at,
                    trace: None,
                    job: Some(carried("echo carried")),
                },
            ],
        },
    )
    .await;
    let extra = session.assignment_within(Duration::from_millis(500)).await;
    assert!(extra.is_none(), "delivered: {extra:?}");
}
