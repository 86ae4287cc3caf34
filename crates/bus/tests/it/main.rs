//! The bus against a real Redis.

mod sentinel;

use std::time::Duration;

use bus::{Bus, Channel};
use domain::events::{Envelope, Event};
use domain::job::{JobStatus, QueueName};
use domain::{JobId, OrgId};
use futures_util::StreamExt;
use test_support::TestRedis;

pub(crate) fn created(org: &OrgId) -> Envelope {
    Envelope::new(
        org.clone(),
        Event::JobCreated {
            job_id: JobId::new(),
            queue: QueueName::backlog(),
            status: JobStatus::Queued,
        },
    )
    .with_request_id(Some("req-42".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn published_events_reach_subscribers_intact() {
    let redis = TestRedis::new();
    let bus = Bus::connect(&test_support::bus_config(redis.url(), redis.prefix())).expect("bus");
    let org = OrgId::parse("acme").expect("org");
    let mut events = bus
        .subscribe(&[Channel::Org(org.clone())])
        .await
        .expect("subscribe");
    let sent = created(&org);
    let receivers = bus
        .publish(&Channel::Org(org.clone()), &sent)
        .await
        .expect("publish");
    assert_eq!(receivers, 1);
    let received = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("in time")
        .expect("an event");
    assert_eq!(received, sent);
}

/// Several payloads published together reach each channel's subscribers,
/// each channel's in the order given.
#[tokio::test(flavor = "multi_thread")]
async fn payloads_published_together_each_reach_their_channel_in_order() {
    let redis = TestRedis::new();
    let bus = Bus::connect(&test_support::bus_config(redis.url(), redis.prefix())).expect("bus");
    let (acme, globex) = (
        OrgId::parse("acme").expect("org"),
        OrgId::parse("globex").expect("org"),
    );
    let mut acme_events = bus
        .subscribe(&[Channel::Org(acme.clone())])
        .await
        .expect("subscribe");
    let mut globex_events = bus
        .subscribe(&[Channel::Org(globex.clone())])
        .await
        .expect("subscribe");
    let sent = [created(&acme), created(&globex), created(&acme)];
    let messages: Vec<(Channel, String)> = sent
        .iter()
        .map(|e| {
            let payload = serde_json::to_string(e).expect("encode");
            (Channel::Org(e.org_id.clone()), payload)
        })
        .collect();
    bus.publish_many(&messages).await.expect("publish");
    let next = async |events: &mut (dyn futures_util::Stream<Item = Envelope> + Unpin)| {
        tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("in time")
            .expect("an event")
    };
    assert_eq!(next(&mut acme_events).await, sent[0]);
    assert_eq!(next(&mut acme_events).await, sent[2]);
    assert_eq!(next(&mut globex_events).await, sent[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefixes_isolate_tests_sharing_one_redis() {
    let (mine, theirs) = (TestRedis::new(), TestRedis::new());
    let my_bus = Bus::connect(&test_support::bus_config(mine.url(), mine.prefix())).expect("bus");
    let their_bus =
        Bus::connect(&test_support::bus_config(theirs.url(), theirs.prefix())).expect("bus");
    let org = OrgId::parse("acme").expect("org");
    let mut mine_events = my_bus
        .subscribe(&[Channel::Org(org.clone())])
        .await
        .expect("subscribe");
    assert_eq!(
        their_bus
            .publish(&Channel::Org(org.clone()), &created(&org))
            .await
            .expect("publish"),
        0
    );
    let ours = created(&org);
    my_bus
        .publish(&Channel::Org(org.clone()), &ours)
        .await
        .expect("publish");
    let first = tokio::time::timeout(Duration::from_secs(5), mine_events.next())
        .await
        .expect("in time")
        .expect("event");
    assert_eq!(first, ours, "only our own prefix's message arrives");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_skipped_not_fatal() {
    let redis = TestRedis::new();
    let bus = Bus::connect(&test_support::bus_config(redis.url(), redis.prefix())).expect("bus");
    let org = OrgId::parse("acme").expect("org");
    let channel = Channel::Org(org.clone());
    let mut events = bus
        .subscribe(std::slice::from_ref(&channel))
        .await
        .expect("subscribe");
    bus.publish_raw(&channel, "{not json".into())
        .await
        .expect("publish raw");
    let good = created(&org);
    bus.publish(&channel, &good).await.expect("publish");
    let received = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("in time")
        .expect("event");
    assert_eq!(received, good);
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_fails_fast_when_redis_is_down() {
    let mut server = test_support::RedisServer::start();
    let bus = Bus::connect(&test_support::bus_config(&server.url(), "sy:")).expect("bus");
    bus.ping().await.expect("up");
    server.stop();
    let started = std::time::Instant::now();
    assert!(bus.ping().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bus.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
