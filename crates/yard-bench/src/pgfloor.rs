//! The physical floor, measured in the same run on the same PostgreSQL:
//! durable single-row INSERT commits at 1/8/32 clients, 100-row INSERT
//! commits, and the latency of one durable commit. A scratch table in the
//! bench database, dropped afterwards. Also the database's commit and WAL
//! counters, to give commits and WAL bytes per job for each scenario.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_postgres::{Client, NoTls};

use crate::stats::{Latency, now_ns};

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to PostgreSQL for the floor measurement")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

const TABLE: &str = "yard_bench_floor";

/// Rows committed per second with `clients` connections, `rows` per statement.
pub async fn insert_rate(
    url: &str,
    clients: usize,
    rows: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let admin = connect(url).await?;
    admin
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = connect(url).await?;
        let stop = stop.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let sql = format!(
                "INSERT INTO {TABLE} (payload) SELECT '{{\"command\":\"true\",\"labels\":[\"bench\"]}}'::jsonb FROM generate_series(1, $1::int)"
            );
            let statement = client.prepare(&sql).await?;
            while !stop.load(Ordering::Relaxed) {
                client.execute(&statement, &[&(rows as i32)]).await?;
                count.fetch_add(rows as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let done = count.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    admin.batch_execute(&format!("TRUNCATE {TABLE}")).await?;
    Ok(done as f64 / elapsed)
}

/// Latency of one durable single-row commit, one client, `samples` times.
pub async fn commit_latency(url: &str, samples: usize) -> anyhow::Result<Latency> {
    let client = connect(url).await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let statement = client
        .prepare(&format!(
            "INSERT INTO {TABLE} (payload) VALUES ('{{}}'::jsonb)"
        ))
        .await?;
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = now_ns();
        client.execute(&statement, &[]).await?;
        latencies.push(now_ns() - t0);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(Latency::from_ns(&latencies))
}

pub async fn drop_table(url: &str) -> anyhow::Result<()> {
    connect(url)
        .await?
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .await?;
    Ok(())
}

/// Commit and WAL counters of the bench database.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    pub commits: i64,
    pub wal_bytes: f64,
}

pub async fn counters(client: &Client) -> anyhow::Result<Counters> {
    let row = client
        .query_one(
            "SELECT xact_commit, (SELECT wal_bytes::float8 FROM pg_stat_wal) FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(Counters {
        commits: row.get(0),
        wal_bytes: row.get(1),
    })
}

/// Commits and WAL bytes per job between two readings (the WAL figure is
/// cluster-wide, so other databases' writes are included).
pub fn per_job(before: Counters, after: Counters, jobs: u64) -> serde_json::Value {
    let jobs = jobs.max(1) as f64;
    json!({
        "commits_per_job": ((after.commits - before.commits) as f64 / jobs * 100.0).round() / 100.0,
        "wal_bytes_per_job": ((after.wal_bytes - before.wal_bytes) / jobs).round(),
    })
}
