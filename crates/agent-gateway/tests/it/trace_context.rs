//! The job's trace context reaches the agent on both transports: on the
//! `Assignment` message of a session, and with each job the HTTP pull API
//! hands out. (No tracer records spans in this test binary, so this is the
//! context the offer carried, passed on as is; the full chain with a real
//! tracer is yard-agent's `trace` test.)

use std::time::Duration;

use bus::Bus;
use domain::events::TraceContext;
use domain::{AgentId, JobId};
use serde_json::{Value, json};
use test_support::{TestDb, TestRedis};

use crate::support::*;
use yard_proto::v1 as pb;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn job_trace() -> TraceContext {
    TraceContext {
        traceparent: TRACEPARENT.into(),
        tracestate: Some("vendor=1".into()),
    }
}

/// Submits a job created in [`job_trace`], as job-api stores it.
async fn traced_job(db: &TestDb, command: &str) -> JobId {
    submit_in_trace(db, command, Some(&job_trace())).await
}

/// Plays the scheduler, with the job's trace on the offer.
async fn traced_offer(db: &TestDb, bus: &Bus, job: JobId, agent: AgentId) -> u64 {
    offer_in_trace(db, bus, job, agent, Some(job_trace()))
        .await
        .epoch as u64
}

fn assert_job_trace(trace: Option<pb::TraceContext>) {
    let trace = trace.expect("the assignment carries a trace");
    assert_eq!(
        telemetry::trace_id_in(&trace.traceparent),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(trace.tracestate, "vendor=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_assignment_message_carries_the_jobs_trace() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;

    let job = traced_job(&db, "echo traced").await;
    traced_offer(&db, &bus, job, agent.id).await;
    assert_job_trace(session.assignment().await.trace);
}

/// An assignment redelivered when a session opens (its offer went to no
/// one) continues the job's stored trace, not the session's.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_assignment_carries_the_jobs_stored_trace() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;
    let job = traced_job(&db, "echo traced later").await;
    let mut conn = db.conn().await;
    db::leases::lease_job(&mut conn, job, agent.id, ACK_TIMEOUT)
        .await
        .expect("lease");
    drop(conn);

    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    let assignment = session.assignment().await;
    assert_eq!(assignment.job_id, job.to_string());
    assert_job_trace(assignment.trace);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_claimed_job_comes_with_its_traceparent() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "http-1").await;
    let client = reqwest::Client::new();
    let login: Value = client
        .post(format!("{}/v1/agent/auth", gateway.http_url()))
        .bearer_auth(&agent.secret)
        .send()
        .await
        .expect("auth")
        .json()
        .await
        .expect("json");
    let session_token = login["token"].as_str().expect("token").to_owned();

    let claim = tokio::spawn({
        let url = format!("{}/v1/agent/claim", gateway.http_url());
        async move {
            client
                .post(url)
                .bearer_auth(session_token)
                .json(&json!({"max_jobs": 1, "wait_ms": 3000}))
                .send()
                .await
                .expect("claim")
                .json::<Value>()
                .await
                .expect("json")
        }
    });
    wait_online(&db, agent.id).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = traced_job(&db, "echo traced over http").await;
    traced_offer(&db, &bus, job, agent.id).await;
    let claimed = claim.await.expect("join");
    let first = &claimed["jobs"][0];
    assert_eq!(first["job_id"], job.to_string());
    let traceparent = first["traceparent"].as_str().expect("a traceparent");
    assert_eq!(
        telemetry::trace_id_in(traceparent),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(first["tracestate"], "vendor=1");
}
