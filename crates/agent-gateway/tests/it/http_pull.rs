//! The HTTP pull API: same leases, epochs and log offsets as the session.

use std::time::Duration;

use domain::job::JobStatus;
use serde_json::{Value, json};
use test_support::{TestDb, TestRedis};
use yard_proto::v1 as pb;
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

use crate::support::*;

struct HttpAgent {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl HttpAgent {
    async fn login(gateway: &TestGateway, secret: &str) -> Self {
        let client = reqwest::Client::new();
        let response = client
            .post(format!("{}/v1/agent/auth", gateway.http_url()))
            .bearer_auth(secret)
            .send()
            .await
            .expect("auth");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        Self {
            base: gateway.http_url(),
            token: body["token"].as_str().expect("token").to_owned(),
            client,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_using_only_http_completes_a_job() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register_in_db(&db, &token, "http-runner").await;
    let http = HttpAgent::login(&gateway, &agent.secret).await;

    // Nothing to do: 204 after the wait.
    let (status, _, _) = http
        .post("/v1/agent/claim", json!({"max_jobs": 1, "wait_ms": 200}))
        .await;
    assert_eq!(status, 204);

    // A long poll that an offer made while it waits ends.
    let job = submit(&db, "echo over http").await;
    let claim = {
        let http = HttpAgent {
            base: http.base.clone(),
            token: http.token.clone(),
            client: http.client.clone(),
        };
        tokio::spawn(async move {
            http.post("/v1/agent/claim", json!({"max_jobs": 2, "wait_ms": 3000}))
                .await
        })
    };
    wait_online(&db, agent.id).await;
    let lease = offer(&db, &bus, job, agent.id).await;
    let (status, body, _) = claim.await.expect("claim");
    assert_eq!(status, 200, "{body}");
    let claimed = &body["jobs"][0];
    assert_eq!(claimed["job_id"], job.to_string());
    assert_eq!(claimed["epoch"], lease.epoch);
    assert_eq!(claimed["spec"]["command"], "echo over http");
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Running);
    let epoch = lease.epoch as u64;
    let logs = format!("/v1/agent/jobs/{job}/logs");

    let (status, body, _) = http
        .post(
            &logs,
            json!({"epoch": epoch, "stream": "stdout", "offset": 0, "data": "a\nb\n"}),
        )
        .await;
    assert_eq!((status, body["committed_offset"].as_u64()), (200, Some(4)));
    // A resend is idempotent.
    let (status, body, _) = http
        .post(
            &logs,
            json!({"epoch": epoch, "stream": "stdout", "offset": 0, "data": "a\nb\n"}),
        )
        .await;
    assert_eq!((status, body["committed_offset"].as_u64()), (200, Some(4)));
    // A gap answers 416 with the offset to resume from.
    let (status, body, headers) = http
        .post(
            &logs,
            json!({"epoch": epoch, "stream": "stderr", "offset": 9, "data": "lost\n"}),
        )
        .await;
    assert_eq!(status, 416);
    assert_eq!(body["committed_offset"], 4);
    assert_eq!(
        headers
            .get("job-log-committed-offset")
            .and_then(|v| v.to_str().ok()),
        Some("4")
    );
    let (status, _, _) = http
        .post(
            &logs,
            json!({"epoch": epoch, "stream": "stderr", "offset": 4, "data": "c\n"}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/extend"),
            json!({"epoch": epoch}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancel_requested"], false);

    // A stale epoch: 409, nothing changes.
    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/result"),
            json!({"epoch": epoch - 1, "outcome": "succeeded", "exit_code": 0}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["current_epoch"], epoch);
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Running);

    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/result"),
            json!({"epoch": epoch, "outcome": "succeeded", "exit_code": 0}),
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("succeeded")));
    assert_eq!(
        log_lines(&db, job).await,
        [
            (1, "a".to_owned()),
            (2, "b".to_owned()),
            (3, "c".to_owned())
        ]
    );
    assert_eq!(job_row(&db, job).await.status(), JobStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_switching_from_the_stream_to_http_mid_job_keeps_its_lease() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "switcher").await;
    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;
    let job = submit(&db, "make").await;
    let epoch = offer(&db, &bus, job, agent.id).await.epoch as u64;
    session.assignment().await;
    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    session.send(chunk(job, epoch, 0, "over grpc\n")).await;
    session
        .next_where(|m| match m {
            ServerMsg::LogAck(a) if a.committed_offset == 10 => Some(a),
            _ => None,
        })
        .await;
    drop(session);

    let http = HttpAgent::login(&gateway, &agent.secret).await;
    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/extend"),
            json!({"epoch": epoch}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["epoch"], epoch);
    // Resuming at an old offset is harmless; where to continue is answered.
    let logs = format!("/v1/agent/jobs/{job}/logs");
    let (status, body, _) = http
        .post(
            &logs,
            json!({"epoch": epoch, "stream": "stdout", "offset": 0, "data": "over grpc\n"}),
        )
        .await;
    assert_eq!((status, body["committed_offset"].as_u64()), (200, Some(10)));
    let (status, _, _) = http
        .post(
            &logs,
            json!({"epoch": epoch, "stream": "stdout", "offset": 10, "data": "over http\n"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/result"),
            json!({"epoch": epoch, "outcome": "failed", "exit_code": 2, "error_kind": "exit_code"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Retryable: queued again for the next attempt.
    assert_eq!(body["status"], "queued");
    let row = job_row(&db, job).await;
    assert_eq!(row.lease_epoch as u64, epoch);
    assert_eq!(row.app_failures, 1);
    assert_eq!(
        log_lines(&db, job).await,
        [(1, "over grpc".to_owned()), (2, "over http".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_answers_410_for_a_cancelled_job_and_401_without_a_token() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register_in_db(&db, &token, "http-runner").await;
    let http = HttpAgent::login(&gateway, &agent.secret).await;
    let job = submit(&db, "sleep 600").await;
    let epoch = offer(&db, &bus, job, agent.id).await.epoch as u64;
    let (status, _, _) = http.post("/v1/agent/claim", json!({"wait_ms": 100})).await;
    assert_eq!(status, 200);

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
    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/extend"),
            json!({"epoch": epoch}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["cancel_requested"], true);
    // Forced by the scheduler after the grace period:
    db::leases::end_attempt(&mut conn, job, None, db::leases::Ending::CancelForced)
        .await
        .expect("force");
    let (status, body, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/extend"),
            json!({"epoch": epoch}),
        )
        .await;
    assert_eq!(status, 410, "{body}");
    let (status, _, _) = http
        .post(
            &format!("/v1/agent/jobs/{job}/logs"),
            json!({"epoch": epoch, "stream": "stdout", "offset": 0, "data": "late\n"}),
        )
        .await;
    assert_eq!(status, 410);

    let anonymous = reqwest::Client::new()
        .post(format!("{}/v1/agent/claim", gateway.http_url()))
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        anonymous
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    // A revoked agent's token stops working.
    db::agents::revoke(&mut conn, &org(), agent.id)
        .await
        .expect("revoke");
    let (status, _, _) = http.post("/v1/agent/claim", json!({"wait_ms": 10})).await;
    assert_eq!(status, 401);
}
