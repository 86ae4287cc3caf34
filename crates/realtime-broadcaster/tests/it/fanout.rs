//! Per-node fan-out: one Redis subscription per channel, freed with its
//! last subscriber; org channels; finished jobs; the dashboard.

use std::time::Duration;

use domain::events::JobStatusChange;
use domain::job::JobStatus;
use domain::{AgentId, JobId, OrgId};
use test_support::{TestDb, TestRedis};

use crate::support::{Client, Incoming, Writer, assert_exactly, bus, collect, start, token};

async fn subscribers_on(redis_url: &str, channel: &str) -> i64 {
    let config = test_support::bus_config(redis_url, "");
    let redis = ::bus::Bus::connect(&config).expect("bus");
    // The broadcaster subscribes with sharded pub/sub on a cluster.
    let kind = if config.topology == ::bus::Topology::Cluster {
        "SHARDNUMSUB"
    } else {
        "NUMSUB"
    };
    let counts: std::collections::HashMap<String, i64> = redis::cmd("PUBSUB")
        .arg(kind)
        .arg(channel)
        .query_async(&mut redis.connection())
        .await
        .expect("pubsub numsub");
    counts.get(channel).copied().unwrap_or(0)
}

async fn until_status(client: &mut Client) {
    loop {
        match client.next_within(Duration::from_secs(5)).await {
            Incoming::Frame(frame) if frame.kind == "status" => return,
            Incoming::Frame(_) => {}
            Incoming::Closed(code) => panic!("closed: {code:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_redis_subscription_per_channel_dropped_when_the_last_subscriber_leaves() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let redis_channel = format!("{}{}", redis.prefix(), writer.channel());
    let token = token(&["acme"]);

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(&service, &token).await;
        client.subscribe(&writer.channel(), 0).await;
        until_status(&mut client).await;
        clients.push(client);
    }
    assert_eq!(subscribers_on(redis.url(), &redis_channel).await, 1);

    drop(clients.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(subscribers_on(redis.url(), &redis_channel).await, 1);

    drop(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while subscribers_on(redis.url(), &redis_channel).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still subscribed after every client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn org_subscribers_see_status_changes_of_the_orgs_jobs() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let mut client = Client::connect(&service, &token(&["acme"])).await;
    client.subscribe("org:acme", 0).await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected subscribed");
    };
    assert_eq!(frame.kind, "subscribed");
    writer.finish().await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected a status");
    };
    assert_eq!(frame.kind, "status");
    assert_eq!(frame.channel.as_deref(), Some("org:acme"));
    assert_eq!(frame.terminal, Some(true));
}

/// A write that changed several jobs announces them to the org in one
/// message; subscribers still get one status frame per job, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_status_changes_reaches_org_subscribers_job_by_job() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let bus = bus(redis.url(), redis.prefix());
    let mut client = Client::connect(&service, &token(&["acme"])).await;
    client.subscribe("org:acme", 0).await;
    let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
        panic!("expected subscribed");
    };
    assert_eq!(frame.kind, "subscribed");
    let org = OrgId::parse("acme").expect("org");
    let statuses = [JobStatus::Running, JobStatus::Succeeded, JobStatus::Running];
    let changes: Vec<_> = statuses
        .iter()
        .map(|&status| {
            let change = JobStatusChange {
                job_id: JobId::new(),
                status,
                attempt: 1,
                epoch: 1,
                agent_id: Some(AgentId::new()),
            };
            (change, None)
        })
        .collect();
    let expected: Vec<(String, &str)> = changes
        .iter()
        .map(|(c, _)| (c.job_id.to_string(), c.status.as_str()))
        .collect();
    let messages = bus::statuses_messages(&org, changes, None);
    // One message per job's channel, one for the org.
    assert_eq!(messages.len(), statuses.len() + 1);
    bus.publish_many(&messages).await.expect("publish");
    for (job_id, status) in expected {
        let Incoming::Frame(frame) = client.next_within(Duration::from_secs(5)).await else {
            panic!("expected a status");
        };
        assert_eq!(frame.kind, "status");
        assert_eq!(frame.channel.as_deref(), Some("org:acme"));
        assert_eq!(frame.job_id.as_deref(), Some(job_id.as_str()));
        assert_eq!(frame.status.as_deref(), Some(status));
        assert_eq!(frame.terminal, Some(status == "succeeded"));
    }
    service.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_job_sends_every_line_in_pages_then_the_terminal_status() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    for _ in 0..12 {
        writer.append(100, 30).await;
    }
    writer.finish().await;
    let token = token(&["acme"]);
    for since in [0, 499, 500, 1199, 1200] {
        let mut client = Client::connect(&service, &token).await;
        client.subscribe(&writer.channel(), since).await;
        let received = collect(&mut client, Duration::from_secs(10)).await;
        assert!(received.terminal);
        assert_exactly(&received.seqs, since + 1, 1200, &format!("since {since}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_is_served_from_the_binary() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let client = reqwest::Client::new();
    let page = client
        .get(format!("{}/", service.url()))
        .send()
        .await
        .expect("index");
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/html")
    );
    let html = page.text().await.expect("html");
    assert!(html.contains(r#"window.SWITCHYARD_API = "http://127.0.0.1:8080""#));
    for (path, kind) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let response = client
            .get(format!("{}{path}", service.url()))
            .send()
            .await
            .expect("asset");
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .expect("type")
                .starts_with(kind)
        );
    }
}

/// Replicas share nothing but PostgreSQL and Redis: subscribers on two
/// replicas of the same job both get every line.
#[tokio::test(flavor = "multi_thread")]
async fn subscribers_on_two_replicas_both_get_every_line() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let a = start(&db, redis.url(), redis.prefix());
    let b = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let token = token(&["acme"]);
    let mut readers = Vec::new();
    for replica in [&a, &b, &a, &b] {
        let mut client = Client::connect(replica, &token).await;
        client.subscribe(&writer.channel(), 0).await;
        readers.push(tokio::spawn(async move {
            collect(&mut client, Duration::from_secs(20)).await
        }));
    }
    for _ in 0..50 {
        writer.append(3, 20).await;
    }
    writer.finish().await;
    for reader in readers {
        let received = reader.await.expect("reader");
        assert!(received.terminal);
        assert_exactly(&received.seqs, 1, writer.last_seq, "replica subscriber");
    }
}
