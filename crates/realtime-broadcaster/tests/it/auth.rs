//! Who may subscribe to what.

use std::time::Duration;

use futures_util::SinkExt;
use test_support::{TestDb, TestRedis};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Incoming, Writer, bus, start, token};

/// Acceptance 4: a subscription to another org's job, or to another org,
/// gets an error and no data; the connection stays usable.
#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_job_gets_an_error_and_no_data() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    writer.append(10, 20).await;

    let mut client = Client::connect(&service, &token(&["globex"])).await;
    client.subscribe(&writer.channel(), 0).await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected an error frame");
    };
    assert_eq!(frame.kind, "error");
    assert_eq!(frame.code.as_deref(), Some("not_found"));
    assert_eq!(frame.channel.as_deref(), Some(writer.channel().as_str()));

    client.subscribe("org:acme", 0).await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected an error frame");
    };
    assert_eq!(frame.code.as_deref(), Some("not_found"));

    // More lines come; none reach the outsider, who still gets a pong.
    writer.append(10, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .send(serde_json::json!({"type": "ping", "id": 7}))
        .await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected a pong");
    };
    assert_eq!(frame.kind, "pong", "no data before the pong: {frame:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_is_closed_with_4001_and_bad_frames_are_answered() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());

    let mut client = Client::connect(&service, "not-a-jwt").await;
    assert!(matches!(
        client.next_within(Duration::from_secs(5)).await,
        Incoming::Closed(Some(4001))
    ));

    // The browser way: the token in the query string.
    let url = format!(
        "ws://{}/v1/ws?access_token={}",
        service.addr,
        token(&["acme"])
    );
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let mut client = Client { ws };
    client.send(serde_json::json!({"type": "dance"})).await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected an error frame");
    };
    assert_eq!(frame.code.as_deref(), Some("bad_request"));
    client
        .send(serde_json::json!({"type": "subscribe", "channel": "agent:x"}))
        .await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected an error frame");
    };
    assert_eq!(frame.code.as_deref(), Some("bad_request"));
    client
        .ws
        .send(Message::text("{not json"))
        .await
        .expect("send");
    assert!(matches!(
        client.next_within(Duration::from_secs(5)).await,
        Incoming::Closed(Some(4000))
    ));
}
