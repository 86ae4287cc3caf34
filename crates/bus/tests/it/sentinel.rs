//! The bus behind Redis Sentinel: round trips through the Sentinels, and a
//! forced failover the bus follows without restart.
//!
//! These run when `TEST_REDIS_SENTINEL_MASTER` is set (the Sentinel run of
//! `scripts/test-topologies.sh`) and print a notice otherwise. The failover
//! test starts a private primary, replica and Sentinels of its own, so the
//! shared setup the other suites use is never failed over.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bus::{Bus, Channel, Topology};
use domain::OrgId;
use futures_util::StreamExt;
use test_support::{SentinelSetup, TestRedis};

use crate::created;

fn sentinel_enabled(test: &str) -> bool {
    let enabled = test_support::shared_sentinel_master().is_some();
    if !enabled {
        eprintln!(
            "skipping {test}: TEST_REDIS_SENTINEL_MASTER is not set (scripts/test-topologies.sh sets it)"
        );
    }
    enabled
}

async fn next_within<S: futures_util::Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("in time")
}

#[tokio::test(flavor = "multi_thread")]
async fn events_and_keys_travel_through_the_primary_the_sentinels_name() {
    if !sentinel_enabled("events_and_keys_travel_through_the_primary_the_sentinels_name") {
        return;
    }
    let redis = TestRedis::new();
    let config = test_support::bus_config(redis.url(), redis.prefix());
    assert!(
        matches!(config.topology, Topology::Sentinel { .. }),
        "{config:?}"
    );
    let bus = Bus::connect(&config).expect("bus");
    bus.ping().await.expect("a primary is reachable");
    let org = OrgId::parse("acme").expect("org");
    let mut events = bus
        .subscribe(&[Channel::Org(org.clone())])
        .await
        .expect("subscribe");
    let sent = created(&org);
    assert_eq!(
        bus.publish(&Channel::Org(org.clone()), &sent)
            .await
            .expect("publish"),
        1
    );
    assert_eq!(next_within(&mut events).await, Some(sent));

    // Writes land on the primary: a replica would answer READONLY.
    let key = bus.key("sentinel-probe");
    let mut conn = bus.connection();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("SET on the primary");
    let role: redis::Role = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .expect("ROLE");
    assert!(matches!(role, redis::Role::Primary { .. }), "{role:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_the_bus_publishes_on_the_new_primary_and_old_subscriptions_end() {
    if !sentinel_enabled(
        "after_a_failover_the_bus_publishes_on_the_new_primary_and_old_subscriptions_end",
    ) {
        return;
    }
    let setup = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| SentinelSetup::start("failover-test"))
            .await
            .expect("start sentinel setup"),
    );
    let bus = Bus::connect(&setup.bus_config("fo:")).expect("bus");
    let org = OrgId::parse("acme").expect("org");
    let channel = Channel::Org(org.clone());
    let name = bus.channel_name(&channel);

    let before = setup.primary_port().expect("primary");
    let mut old = bus
        .subscribe(std::slice::from_ref(&channel))
        .await
        .expect("subscribe");
    let first = created(&org);
    bus.publish(&channel, &first).await.expect("publish");
    assert_eq!(next_within(&mut old).await, Some(first));

    let [a, b] = setup.data_urls();
    let future_primary = if a.ends_with(&format!(":{before}")) {
        b
    } else {
        a
    };

    let failing_over = setup.clone();
    let (old_port, new_port) = tokio::task::spawn_blocking(move || failing_over.failover())
        .await
        .expect("failover");
    assert_eq!(old_port, before);
    assert!(future_primary.ends_with(&format!(":{new_port}")));
    let failed_over = Instant::now();

    // A witness subscribed directly on the new primary (after the failover:
    // Sentinel kills the clients of the node it promotes too). A publish on
    // the primary reaches its subscribers; one sent to the demoted node (a
    // replica now) would not travel up to it. So every publish the bus
    // reports done from now on must show up here.
    let mut witness = redis::Client::open(future_primary.as_str())
        .expect("client")
        .get_async_pubsub()
        .await
        .expect("witness connection");
    witness.subscribe(&name).await.expect("witness subscribe");
    let mut witness = witness.into_on_message();

    // The old subscription ends, so its reader backfills from PostgreSQL.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while old.next().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the subscription on the demoted node did not end"
    );

    // Within a bounded time, publishing works again (the first command on
    // the killed connection may fail; that loss is what sweeps repair).
    let mut published = Vec::new();
    let deadline = failed_over + Duration::from_secs(10);
    let mut fresh = loop {
        assert!(
            Instant::now() < deadline,
            "the bus did not reach the new primary"
        );
        if bus.ping().await.is_ok()
            && let Ok(fresh) = bus.subscribe(std::slice::from_ref(&channel)).await
        {
            break fresh;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut delivered_fresh = false;
    for _ in 0..20 {
        let event = created(&org);
        match bus.publish(&channel, &event).await {
            Ok(receivers) => {
                // The fresh subscription and the witness.
                assert!(receivers >= 2, "{receivers} receivers: not the primary");
                published.push(event.clone());
                if !delivered_fresh {
                    assert_eq!(next_within(&mut fresh).await, Some(event));
                    delivered_fresh = true;
                }
            }
            Err(error) => assert!(Instant::now() < deadline, "publish still fails: {error}"),
        }
    }
    assert!(delivered_fresh);

    // Every publish reported done reached the new primary's witness.
    let mut seen = HashSet::new();
    let expected: HashSet<String> = published
        .iter()
        .map(|e| serde_json::to_string(e).expect("json"))
        .collect();
    while !expected.is_subset(&seen) {
        let message = tokio::time::timeout(Duration::from_secs(5), witness.next())
            .await
            .expect("the witness on the new primary got every publish")
            .expect("witness open");
        seen.insert(message.get_payload::<String>().expect("payload"));
    }

    // Keys too: a write lands on the new primary, not READONLY on the old.
    let key = bus.key("after-failover");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("ok")
        .query_async(&mut bus.connection())
        .await
        .expect("SET after failover");
    let mut direct = redis::Client::open(future_primary.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("new primary");
    let value: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut direct)
        .await
        .expect("GET");
    assert_eq!(value.as_deref(), Some("ok"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_fast_when_no_sentinel_answers() {
    // Nothing listens on these ports once the listeners are dropped.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("port")
                .port()
        })
        .collect();
    let urls = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let bus = Bus::connect(&bus::BusConfig::sentinel(urls, "nobody", "sy:"))
        .expect("prepared without connecting");
    let started = Instant::now();
    let error = bus.ping().await.expect_err("no primary");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.to_string().contains("Sentinel"), "{error}");
    assert!(
        bus.publish(
            &Channel::SchedulerWake,
            &created(&OrgId::parse("acme").expect("org"))
        )
        .await
        .is_err()
    );
}

/// Runs `REPLICAOF` on the node at `url` (`None`: become a primary).
async fn replicaof(url: &str, primary_port: Option<u16>) {
    let mut conn = redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("data node");
    let mut cmd = redis::cmd("REPLICAOF");
    match primary_port {
        Some(port) => cmd.arg("127.0.0.1").arg(port),
        None => cmd.arg("NO").arg("ONE"),
    };
    let _: () = cmd.query_async(&mut conn).await.expect("REPLICAOF");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_answering_readonly_is_dropped_not_retried() {
    if !sentinel_enabled("a_node_answering_readonly_is_dropped_not_retried") {
        return;
    }
    let setup = tokio::task::spawn_blocking(|| SentinelSetup::start("readonly-test"))
        .await
        .expect("start sentinel setup");
    let bus = Bus::connect(&setup.bus_config("ro:")).expect("bus");
    let key = bus.key("k");
    let set = || async {
        redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .query_async::<()>(&mut bus.connection())
            .await
    };
    set().await.expect("SET on the primary");

    // Demote the primary by hand, behind the Sentinels' back: unlike a
    // Sentinel failover this kills no client, so the bus's connection
    // stays open on a node that now answers READONLY.
    let primary_port = setup.primary_port().expect("primary");
    let [a, b] = setup.data_urls();
    let (primary, replica) = if a.ends_with(&format!(":{primary_port}")) {
        (a, b)
    } else {
        (b, a)
    };
    let replica_port: u16 = replica
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    replicaof(&replica, None).await;
    replicaof(&primary, Some(replica_port)).await;

    // The Sentinels still name the demoted node, and `ROLE` refuses it, so
    // commands fail; but none is sent to the demoted node again.
    let mut readonly = 0;
    for _ in 0..10 {
        if let Err(error) = set().await
            && error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        {
            eprintln!("answered READONLY: {error}");
            readonly += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        readonly <= 1,
        "{readonly} commands answered READONLY: the bus kept using the demoted node"
    );
    assert!(bus.ping().await.is_err(), "ready without a primary");

    // Undo, so the Sentinels' view is right again: the bus finds the
    // primary again with no restart.
    replicaof(&primary, None).await;
    replicaof(&replica, Some(primary_port)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while set().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no write after the primary came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.ping().await.expect("ready again");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_the_primary_is_gone_and_recovers_after_the_sentinels_promote() {
    if !sentinel_enabled(
        "readiness_fails_while_the_primary_is_gone_and_recovers_after_the_sentinels_promote",
    ) {
        return;
    }
    let mut setup = tokio::task::spawn_blocking(|| SentinelSetup::start("crash-test"))
        .await
        .expect("start sentinel setup");
    let bus = Bus::connect(&setup.bus_config("crash:")).expect("bus");
    bus.ping().await.expect("ready");
    let old = setup.primary_port().expect("primary");
    setup.kill_node(old);

    // Not ready, and quickly so, while no primary answers.
    let started = Instant::now();
    assert!(bus.ping().await.is_err(), "ready with the primary dead");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // Ready again once the Sentinels promote the replica: no restart.
    let setup = std::sync::Arc::new(setup);
    let waiting = setup.clone();
    let new = tokio::task::spawn_blocking(move || {
        waiting.wait_for_new_primary(old, Duration::from_secs(30))
    })
    .await
    .expect("promotion");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = bus.ping().await {
        assert!(
            Instant::now() < deadline,
            "not ready after promoting {new}: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = redis::cmd("SET")
        .arg(bus.key("k"))
        .arg("v")
        .query_async(&mut bus.connection())
        .await
        .expect("write on the promoted replica");
}
