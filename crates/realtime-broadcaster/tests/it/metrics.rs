//! The broadcaster's `/metrics` move with its connections and deliveries.

use std::time::Duration;

use service_kit::ops::sample;
use test_support::{RunningService, TestDb, TestRedis};

use crate::support::{Client, Incoming, Writer, bus, start, token};

async fn scrape(service: &RunningService) -> String {
    reqwest::get(format!("{}/metrics", service.url()))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

async fn gauge_becomes(service: &RunningService, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = sample(&scrape(service).await, series);
        if now == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed {now:?}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_connections_feeds_and_delivered_lines_are_counted() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let token = token(&["acme"]);

    gauge_becomes(
        &service,
        "switchyard_broadcaster_websocket_connections",
        0.0,
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = Client::connect(&service, &token).await;
        client.subscribe(&writer.channel(), 0).await;
        clients.push(client);
    }
    gauge_becomes(
        &service,
        "switchyard_broadcaster_websocket_connections",
        2.0,
    )
    .await;
    gauge_becomes(&service, "switchyard_broadcaster_feeds", 1.0).await;
    // Both subscriptions are live once their first frame (the status) came.
    for client in &mut clients {
        match client.next_within(Duration::from_secs(5)).await {
            Incoming::Frame(_) => {}
            Incoming::Closed(code) => panic!("closed: {code:?}"),
        }
    }

    let before = sample(
        &scrape(&service).await,
        "switchyard_broadcaster_log_lines_delivered_total",
    )
    .unwrap_or(0.0);
    writer.append(5, 10).await;
    // Five lines to each of two subscribers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let delivered = sample(
            &scrape(&service).await,
            "switchyard_broadcaster_log_lines_delivered_total",
        )
        .unwrap_or(0.0);
        if delivered - before >= 10.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {delivered} (from {before})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    drop(clients);
    gauge_becomes(
        &service,
        "switchyard_broadcaster_websocket_connections",
        0.0,
    )
    .await;
    gauge_becomes(&service, "switchyard_broadcaster_feeds", 0.0).await;
}
