//! History then live with no gap and no duplicate, whatever happens on the
//! way: mid-stream joins, a broadcaster restart, a Redis restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use test_support::{RedisServer, TestDb, TestRedis};

use crate::support::{Client, Incoming, Writer, assert_exactly, bus, collect, start, token};

/// Acceptance 1: 200 subscribers join a job while it writes as fast as it
/// can, from the start, from its current end, or from a random point;
/// every one sees every line after its `since_seq` exactly once, in order,
/// then the terminal status.
#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_mid_stream_joins_each_see_every_line_once_in_order() {
    const TRIALS: usize = 200;
    let started = Instant::now();
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let channel = writer.channel();
    let head = Arc::new(AtomicI64::new(0));
    let joined = Arc::new(AtomicI64::new(0));

    let writing = {
        let head = head.clone();
        let joined = joined.clone();
        tokio::spawn(async move {
            while joined.load(Ordering::SeqCst) < TRIALS as i64 {
                let batch = rand::random_range(1..=4);
                head.store(writer.append(batch, 40).await, Ordering::SeqCst);
            }
            // A little more after the last join, then the end.
            for _ in 0..100 {
                head.store(writer.append(2, 40).await, Ordering::SeqCst);
            }
            writer.finish().await;
            writer.last_seq
        })
    };

    let token = token(&["acme"]);
    let mut trials = Vec::new();
    for trial in 0..TRIALS {
        tokio::time::sleep(Duration::from_millis(12)).await;
        let now = head.load(Ordering::SeqCst);
        let since = match trial % 3 {
            0 => 0,
            1 => now,
            _ => rand::random_range(0..=now),
        };
        let mut client = Client::connect(&service, &token).await;
        client.subscribe(&channel, since).await;
        joined.fetch_add(1, Ordering::SeqCst);
        trials.push(tokio::spawn(async move {
            let received = collect(&mut client, Duration::from_secs(60)).await;
            (trial, since, received)
        }));
    }
    let last = writing.await.expect("writer");
    for trial in trials {
        let (trial, since, received) = trial.await.expect("trial");
        assert!(
            received.terminal,
            "trial {trial} ended without the terminal status: {:?}",
            received.closed
        );
        assert_exactly(
            &received.seqs,
            since + 1,
            last,
            &format!("trial {trial} (since {since})"),
        );
    }
    eprintln!("{TRIALS} trials, {last} lines, {:?}", started.elapsed());
    service.stop().await.expect("clean shutdown");
}

/// Acceptance 2: the broadcaster is stopped mid-stream (clients see 1001)
/// and another one started; a client resuming with `since_seq` ends with
/// the complete sequence.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_with_since_seq_after_the_broadcaster_restarts() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let first = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let channel = writer.channel();
    let token = token(&["acme"]);
    writer.append(50, 20).await;

    let mut client = Client::connect(&first, &token).await;
    client.subscribe(&channel, 0).await;
    let mut seqs = Vec::new();
    while seqs.len() < 50 {
        if let Incoming::Frame(frame) = client.next_within(Duration::from_secs(10)).await {
            seqs.extend(frame.lines.iter().map(|l| l.seq));
        }
    }
    let writing = tokio::spawn(async move {
        for _ in 0..100 {
            writer.append(3, 20).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writer.finish().await;
        writer.last_seq
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.stop().await.expect("clean shutdown");
    let closed = loop {
        match client.next_within(Duration::from_secs(10)).await {
            Incoming::Frame(frame) => seqs.extend(frame.lines.iter().map(|l| l.seq)),
            Incoming::Closed(code) => break code,
        }
    };
    assert_eq!(closed, Some(1001), "shutdown says going away");

    let second = start(&db, redis.url(), redis.prefix());
    let mut client = Client::connect(&second, &token).await;
    let resume_from = *seqs.last().expect("some lines");
    client.subscribe(&channel, resume_from).await;
    let received = collect(&mut client, Duration::from_secs(30)).await;
    assert!(received.terminal);
    seqs.extend(received.seqs);
    let last = writing.await.expect("writer");
    assert_exactly(&seqs, 1, last, "resumed client");
    second.stop().await.expect("clean shutdown");
}

/// Acceptance 3: Redis restarts while a job streams; live events published
/// while it was down are lost, yet every subscriber ends with every line
/// (backfilled from PostgreSQL).
#[tokio::test(flavor = "multi_thread")]
async fn subscribers_get_every_line_when_redis_restarts_mid_stream() {
    let db = TestDb::new().await;
    let mut redis = RedisServer::start();
    let service = start(&db, &redis.url(), "sy:");
    let mut writer = Writer::new(&db, bus(&redis.url(), "sy:"), "acme").await;
    let channel = writer.channel();
    let token = token(&["acme"]);
    let mut clients = Vec::new();
    for since in [0, 0, 0] {
        let mut client = Client::connect(&service, &token).await;
        client.subscribe(&channel, since).await;
        clients.push(tokio::spawn(async move {
            collect(&mut client, Duration::from_secs(60)).await
        }));
    }
    for _ in 0..30 {
        writer.append(2, 20).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.stop();
    for _ in 0..10 {
        // Published while Redis is down: lost.
        writer.append(2, 20).await;
    }
    redis.restart();
    for _ in 0..30 {
        writer.append(2, 20).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.finish().await;
    for client in clients {
        let received = client.await.expect("client");
        assert!(received.terminal, "ended with {:?}", received.closed);
        assert_exactly(
            &received.seqs,
            1,
            writer.last_seq,
            "subscriber across a Redis restart",
        );
    }
    service.stop().await.expect("clean shutdown");
}

/// Redis pub/sub drops messages silently (no reconnect to notice): lines
/// and a terminal status whose events never arrive still reach every
/// subscriber, from the periodic comparison with PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn lines_and_status_lost_on_redis_arrive_from_the_postgres_check() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    writer.append(5, 20).await;
    let mut client = Client::connect(&service, &token(&["acme"])).await;
    client.subscribe(&writer.channel(), 0).await;
    let reader = tokio::spawn(async move { collect(&mut client, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer.append(5, 20).await;
    writer.append_unannounced(7, 20).await;
    writer.finish_unannounced().await;
    let received = reader.await.expect("reader");
    assert!(received.terminal, "the lost terminal status arrived");
    assert_exactly(&received.seqs, 1, 17, "subscriber with lost events");
}

/// Acceptance 2 with a real kill: the broadcaster binary is killed with
/// SIGKILL mid-stream (no close frame) and started again on the same
/// address; the client reconnects with `since_seq` and ends with the
/// complete sequence.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_after_the_broadcaster_process_is_killed() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // Both processes' warnings, shown if the test fails.
    let log_path = std::env::temp_dir().join(format!("broadcaster-kill-test-{port}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_realtime-broadcaster"))
            .env_clear()
            .envs(db.env_vars())
            .env("DATABASE_POOL_SIZE", "4")
            .env("REDIS_URL", redis.url())
            .env("REDIS_CLUSTER", redis.is_cluster().to_string())
            .env("REDIS_SENTINEL_MASTER", redis.sentinel_master())
            .env("REDIS_KEY_PREFIX", redis.prefix())
            .env("BROADCASTER_ADDR", addr.to_string())
            .env("AUTH_HS256_SECRET", crate::support::SECRET)
            .env("HTTP_WORKERS", "1")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log.try_clone().expect("broadcaster log"))
            .spawn()
            .map(KillOnDrop)
            .expect("start the broadcaster binary")
    };
    let wait_up = || async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("http://{addr}/healthz"))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the broadcaster did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut process = spawn();
    wait_up().await;

    let mut writer = Writer::new(&db, bus(redis.url(), redis.prefix()), "acme").await;
    let channel = writer.channel();
    let token = token(&["acme"]);
    let writing = tokio::spawn(async move {
        for _ in 0..150 {
            writer.append(3, 20).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writer.finish().await;
        writer.last_seq
    });

    let mut seqs: Vec<i64> = Vec::new();
    let mut killed = false;
    let mut retries = 0;
    loop {
        let ws_url = format!("ws://{addr}/v1/ws?access_token={token}");
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("connect");
        let mut client = Client { ws };
        client
            .subscribe(&channel, seqs.last().copied().unwrap_or(0))
            .await;
        let mut finished = false;
        let mut retry = false;
        // Until the end of the job, or the connection drops with the kill.
        loop {
            let Ok(incoming) = tokio::time::timeout(Duration::from_secs(20), client.next()).await
            else {
                panic!(
                    "no message within 20 s after {} lines (killed: {killed}); broadcaster log:\n{}",
                    seqs.len(),
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            };
            let Incoming::Frame(frame) = incoming else {
                break;
            };
            if frame.kind == "error" {
                // A restarted broadcaster may not reach storage at once; its
                // answer says to subscribe again.
                assert_eq!(frame.code.as_deref(), Some("unavailable"), "{frame:?}");
                retry = true;
                break;
            }
            seqs.extend(frame.lines.iter().map(|l| l.seq));
            if frame.kind == "status" && frame.terminal == Some(true) {
                finished = true;
                break;
            }
            if !killed && seqs.len() >= 100 {
                killed = true;
                process.0.kill().expect("SIGKILL");
                let _ = process.0.wait();
            }
        }
        if finished {
            break;
        }
        if retry {
            retries += 1;
            assert!(
                retries <= 25,
                "storage stayed unavailable; broadcaster log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert!(killed, "the connection ended without a kill");
        tokio::time::sleep(Duration::from_millis(300)).await;
        process = spawn();
        wait_up().await;
    }
    assert!(killed, "the job ended before the kill");
    let last = writing.await.expect("writer");
    assert_exactly(&seqs, 1, last, "client across a SIGKILL");
    drop(process);
    let _ = std::fs::remove_file(&log_path);
}

/// A child process killed when the test ends, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
