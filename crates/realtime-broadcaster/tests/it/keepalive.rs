//! Keepalive: a connection that does not answer pings is closed.

use std::time::Duration;

use test_support::{TestDb, TestRedis};

use crate::support::{Client, Incoming, config, start_with, token};

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_misses_a_pong_is_closed_with_4002() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut config = config(&db, redis.url(), redis.prefix());
    config.settings.ping_interval = Duration::from_millis(200);
    let service = start_with(config);

    // A client that reads (and so answers pings) stays connected.
    let mut alive = Client::connect(&service, &token(&["acme"])).await;
    let reading = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_millis(900), alive.next())
            .await
            .is_err()
    });
    // One that reads nothing does not answer, and is closed.
    let mut silent = Client::connect(&service, &token(&["acme"])).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(matches!(
        silent.next_within(Duration::from_secs(5)).await,
        Incoming::Closed(Some(4002))
    ));
    assert!(
        reading.await.expect("reader"),
        "the reading client stayed open"
    );
}

/// The HTTP request deadline bounds the handshake, not the connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_outlives_the_http_request_timeout() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut config = config(&db, redis.url(), redis.prefix());
    config.common.http.request_timeout = Duration::from_secs(1);
    let service = start_with(config);
    let mut client = Client::connect(&service, &token(&["acme"])).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    client
        .send(serde_json::json!({"type": "ping", "id": "still-there"}))
        .await;
    match client.next_within(Duration::from_secs(5)).await {
        Incoming::Frame(frame) => assert_eq!(frame.kind, "pong"),
        Incoming::Closed(code) => panic!("closed: {code:?}"),
    }
}
