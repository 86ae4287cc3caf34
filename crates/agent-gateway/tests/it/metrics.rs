//! The gateway's `/metrics` move with what agents do.

use std::time::Duration;

use service_kit::ops::{sample, sum};
use test_support::{TestDb, TestRedis};
use yard_proto::v1 as pb;
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

use crate::support::*;

async fn scrape(gateway: &TestGateway) -> String {
    reqwest::get(format!("{}/metrics", gateway.http_url()))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

#[tokio::test(flavor = "multi_thread")]
async fn connected_agents_log_lines_and_stale_writes_are_counted() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(redis.url(), redis.prefix());
    let gateway = start(&db, redis.url(), redis.prefix());
    let token = registration_token(&db).await;
    let agent = register(&gateway, &token, "runner-1").await;

    let before = scrape(&gateway).await;
    assert_eq!(
        sample(&before, "switchyard_gateway_connected_agents"),
        Some(0.0)
    );
    assert!(sample(&before, "switchyard_db_pool_connections_max").is_some_and(|n| n > 0.0));

    let mut session = RawSession::open(&gateway.grpc_url(), &agent.secret, vec![]).await;
    wait_online(&db, agent.id).await;
    // The session counts itself once its opening finished, which may be
    // just after the agent row says online.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let open = scrape(&gateway).await;
        let connected = sample(&open, "switchyard_gateway_connected_agents");
        if connected == Some(1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connected agents stayed at {connected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let job = submit(&db, "echo hello").await;
    offer(&db, &bus, job, agent.id).await;
    let epoch = session.assignment().await.epoch;
    session
        .send(AgentMsg::AssignmentAck(pb::AssignmentAck {
            job_id: job.to_string(),
            epoch,
            trace: None,
        }))
        .await;
    session
        .send(chunk(job, epoch, 0, "one\ntwo\nthree\n"))
        .await;
    session
        .next_where(|m| match m {
            ServerMsg::LogAck(ack) => Some(ack),
            _ => None,
        })
        .await;
    // A write from an older lease is refused and counted by kind.
    session.send(chunk(job, epoch - 1, 0, "late\n")).await;
    session
        .next_where(|m| match m {
            ServerMsg::Stale(stale) => Some(stale),
            _ => None,
        })
        .await;

    let busy = scrape(&gateway).await;
    assert_eq!(
        sample(&busy, "switchyard_gateway_log_lines_received_total"),
        Some(4.0),
        "three lines, then one stale"
    );
    assert_eq!(
        sample(
            &busy,
            r#"switchyard_gateway_stale_writes_total{kind="log"}"#
        ),
        Some(1.0)
    );
    // The job went running: a status event was published on Redis.
    assert!(sum(&busy, "switchyard_redis_publish_total") > 0.0, "{busy}");
    assert!(sample(&busy, "switchyard_redis_subscribed_channels").is_some_and(|n| n >= 1.0));
    assert!(
        sum(&busy, "switchyard_http_requests_total") > 0.0,
        "the scrapes themselves are counted"
    );

    drop(session);
    eventually("the session closed", || async {
        sample(
            &scrape(&gateway).await,
            "switchyard_gateway_connected_agents",
        ) == Some(0.0)
    })
    .await;
}
