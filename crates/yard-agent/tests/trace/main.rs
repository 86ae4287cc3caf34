//! One job's life is one trace: a REST request with a `traceparent` header
//! creates a job, and the trace id is followed hop by hop, with a real
//! (in-memory) OpenTelemetry tracer and every service in-process: job-api's
//! request span and the `JobCreated` envelope → the offer span (job-api's,
//! for a job leased on create; the scheduler's otherwise)
//! and `AssignmentOffered` envelope → the gateway's assignment span → the
//! agent's job span (which only the `Assignment` message can have given it)
//! → the gateway's spans for the agent's log and result messages and the
//! log envelope they publish → the broadcaster's fan-out span.
//!
//! Its own test binary, because it installs the process-wide subscriber.

#[path = "../common/services.rs"]
mod services;

#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

use std::time::Duration;

use auth::Role;
use bus::Channel;
use domain::OrgId;
use domain::agent::AgentStatus;
use domain::events::{Envelope, Event};
use domain::job::JobStatus;
use futures_util::{SinkExt, Stream, StreamExt};
use opentelemetry_sdk::trace::SpanData;
use test_support::{TestDb, TestRedis};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use support::*;

const SECRET: &str = "trace-test-secret";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const LATER_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const LATER_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn trace_id_of(envelope: &Envelope) -> Option<&str> {
    envelope
        .trace
        .as_ref()
        .and_then(|t| telemetry::trace_id_in(&t.traceparent))
}

/// The first envelope on `events` that `pick` accepts.
async fn first<S, F>(events: &mut S, what: &str, mut pick: F) -> Envelope
where
    S: Stream<Item = Envelope> + Unpin,
    F: FnMut(&Envelope) -> bool,
{
    tokio::time::timeout(WAIT, async {
        loop {
            let envelope = events.next().await.expect("subscription open");
            if pick(&envelope) {
                return envelope;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} envelope"))
}

/// Creates a job in `acme` through REST, in the trace `traceparent` names.
async fn create_job(
    api: &str,
    token: &str,
    traceparent: &str,
    body: serde_json::Value,
) -> domain::JobId {
    let response = reqwest::Client::new()
        .post(format!("{api}/v1/orgs/acme/jobs"))
        .bearer_auth(token)
        .header("traceparent", traceparent)
        .json(&body)
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let job: serde_json::Value = response.json().await.expect("job");
    job["id"].as_str().expect("id").parse().expect("uuid")
}

fn span_names(spans: &[SpanData]) -> Vec<String> {
    let mut names: Vec<String> = spans.iter().map(|s| s.name.to_string()).collect();
    names.sort();
    names.dedup();
    names
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_trace_follows_it_from_the_rest_request_to_the_websocket() {
    let exporter = telemetry::testing::install();
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let auth = services::hs256(SECRET);
    let api = services::job_api(&db, &redis, auth.clone());
    let _scheduler = services::scheduler(&db, &redis, scheduler::Settings::default());
    let gateway = Gateway::start(&db, redis.url(), redis.prefix());
    let broadcaster = services::broadcaster(&db, &redis, auth);

    // The agent, in-process so its spans reach the same tracer.
    let token = registration_token(&db).await;
    let scratch = Scratch::new();
    let credential = scratch.0.join("credential.json");
    let agent_config = {
        use clap::Parser;
        yard_agent::AgentConfig::parse_from([
            "yard-agent",
            "--gateway-url",
            gateway.grpc_url.as_str(),
            "--registration-token",
            token.as_str(),
            "--credential-file",
            credential.to_str().expect("path"),
            "--work-dir",
            scratch.0.join("work").to_str().expect("path"),
            "--name",
            "traced",
        ])
    };
    let drain = tokio_util::sync::CancellationToken::new();
    let agent_task = tokio::spawn(yard_agent::run(agent_config, drain.clone()));
    let agent_id: domain::AgentId = {
        let mut id = None;
        eventually("the agent registered", WAIT, || {
            let found = std::fs::read_to_string(&credential)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|v| v["agent_id"].as_str().and_then(|s| s.parse().ok()));
            if found.is_some() {
                id = found;
            }
            std::future::ready(found.is_some())
        })
        .await;
        id.expect("agent id")
    };
    wait_agent(&db, agent_id, AgentStatus::Online).await;

    let mut org_events = Box::pin(
        bus.subscribe(&[Channel::Org(OrgId::parse("acme").expect("org"))])
            .await
            .expect("sub"),
    );
    let mut offers = Box::pin(
        bus.subscribe(&[Channel::Agent(agent_id)])
            .await
            .expect("sub"),
    );

    // The REST request, in the caller's trace.
    let member = auth::dev::mint_hs256(
        SECRET,
        None,
        "user-1",
        &[(OrgId::parse("acme").expect("org"), Role::Member)],
        Duration::from_secs(600),
    );
    let job_id = create_job(
        &api.url(),
        &member,
        TRACEPARENT,
        serde_json::json!({"command": "sleep 1; echo traced; echo twice"}),
    )
    .await;

    // A viewer of the job's logs, before the job prints anything.
    let mut viewer = {
        let mut request = format!("ws://{}/v1/ws", broadcaster.addr)
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {member}").parse().expect("header"),
        );
        tokio_tungstenite::connect_async(request)
            .await
            .expect("ws")
            .0
    };
    viewer
        .send(Message::text(
            serde_json::json!({"type": "subscribe", "channel": format!("job:{job_id}"), "since_seq": 0})
                .to_string(),
        ))
        .await
        .expect("subscribe");
    let mut logs = Box::pin(bus.subscribe(&[Channel::Job(job_id)]).await.expect("sub"));

    // Hop 1: job-api put the request's trace on the envelope it published,
    // and on the job, where the scheduler reads it when it leases the job.
    let created = first(
        &mut org_events,
        "JobCreated",
        |e| matches!(e.event, Event::JobCreated { job_id: id, .. } if id == job_id),
    )
    .await;
    assert_eq!(trace_id_of(&created), Some(TRACE_ID), "JobCreated envelope");
    let stored: Option<String> = {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        db::schema::jobs::table
            .find(job_id.as_uuid())
            .select(db::schema::jobs::traceparent)
            .first(&mut db.conn().await)
            .await
            .expect("job row")
    };
    assert_eq!(
        stored.as_deref().and_then(telemetry::trace_id_in),
        Some(TRACE_ID),
        "traceparent stored on the job"
    );

    // Hop 2: the offer continues it (job-api's: the org was idle, so the
    // create leased the job itself).
    let offered = first(
        &mut offers,
        "AssignmentOffered",
        |e| matches!(e.event, Event::AssignmentOffered { job_id: id, .. } if id == job_id),
    )
    .await;
    assert_eq!(
        trace_id_of(&offered),
        Some(TRACE_ID),
        "AssignmentOffered envelope"
    );

    // Hop 4 → 5: the agent's log lines come back as an envelope in the trace.
    let appended = first(&mut logs, "LogLinesAppended", |e| {
        matches!(e.event, Event::LogLinesAppended { .. })
    })
    .await;
    assert_eq!(
        trace_id_of(&appended),
        Some(TRACE_ID),
        "LogLinesAppended envelope"
    );

    wait_status(&db, job_id, JobStatus::Succeeded).await;
    // The viewer got the lines.
    let mut seen = String::new();
    tokio::time::timeout(WAIT, async {
        while !seen.contains("twice") {
            match viewer.next().await {
                Some(Ok(Message::Text(text))) => seen.push_str(text.as_str()),
                Some(Ok(_)) => {}
                other => panic!("viewer closed: {other:?}"),
            }
        }
    })
    .await
    .expect("the viewer received the job's lines");

    // Every hop's span is in the trace. The agent's job span ends when the
    // job is forgotten (after its result is stored).
    let mut spans = Vec::new();
    eventually("every hop's span was exported", WAIT, || {
        spans = telemetry::testing::spans_of(&exporter, TRACE_ID);
        let names = span_names(&spans);
        std::future::ready(
            [
                "request",
                "offer",
                "assignment",
                "job",
                "agent_message",
                "fan_out",
            ]
            .iter()
            .all(|n| names.iter().any(|have| have == n)),
        )
    })
    .await;
    let named =
        |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
    // The request span is the client's span's child.
    let request = named("request");
    assert!(
        request
            .iter()
            .any(|s| s.parent_span_id.to_string() == "00f067aa0ba902b7"),
        "job-api's request span continues the incoming traceparent"
    );
    // The agent's job span is the child of the gateway's assignment span:
    // the context travelled on the Assignment message.
    let assignment = named("assignment");
    let job_span = named("job");
    assert!(
        job_span.iter().any(|job| assignment
            .iter()
            .any(|a| a.span_context.span_id() == job.parent_span_id)),
        "the agent's job span hangs under the gateway's assignment span"
    );
    // The gateway handled the agent's log and result messages in the trace.
    let kinds: Vec<String> = named("agent_message")
        .iter()
        .filter_map(|s| attribute(s, "kind"))
        .collect();
    for kind in ["ack", "log", "result"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    // The broadcaster fanned the log lines out in the trace.
    assert!(
        named("fan_out")
            .iter()
            .any(|s| attribute(s, "event").as_deref() == Some("log_lines_appended")),
        "the broadcaster's fan-out of the lines is in the trace"
    );

    // A job due later is not leased by its create but by the scheduler,
    // whose offer continues the trace stored on the job.
    let later = create_job(
        &api.url(),
        &member,
        LATER_TRACEPARENT,
        serde_json::json!({
            "command": "echo later",
            "run_at": chrono::Utc::now() + chrono::Duration::milliseconds(300),
        }),
    )
    .await;
    let offered = first(
        &mut offers,
        "AssignmentOffered of the later job",
        |e| matches!(e.event, Event::AssignmentOffered { job_id: id, .. } if id == later),
    )
    .await;
    assert_eq!(trace_id_of(&offered), Some(LATER_TRACE_ID));
    eventually(
        "the scheduler's offer span is in the later job's trace",
        WAIT,
        || {
            let spans = telemetry::testing::spans_of(&exporter, LATER_TRACE_ID);
            std::future::ready(spans.iter().any(|s| s.name == "offer"))
        },
    )
    .await;

    drain.cancel();
    let _ = tokio::time::timeout(WAIT, agent_task).await;
}
